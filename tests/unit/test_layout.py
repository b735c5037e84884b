"""A Megatron layout the model's shape cannot take is refused before Ray starts, with the numbers and what fits."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from distill_trainer.config import ConfigError, config_from_dict
from distill_trainer.layout import (check_parallel_layout, layout_problems, pipeline_split_settings,
                                   pipeline_stage_layers)
from tests.conftest import tiny_config_dict


def test_each_uneven_split_is_named_with_the_sizes_that_fit():
    qwen_like = {"num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                 "intermediate_size": 18944}
    assert layout_problems("teacher", "/m/qwen", qwen_like, tp_size=4, pp_size=4) == []
    problems = layout_problems("teacher", "/m/qwen", qwen_like, tp_size=8, pp_size=3)  # 28 layers: 9 | 10 | 9
    assert problems == [
        "teacher.strategy_args.tp_size=8 does not divide the 28 attention heads of /m/qwen (Megatron splits them "
        "evenly over tp_size); tp_size values that fit: 1, 2, 4, 7, 14, 28",
        "teacher.strategy_args.tp_size=8 does not divide the 4 key/value heads of /m/qwen (Megatron splits them "
        "evenly over tp_size); tp_size values that fit: 1, 2, 4",
    ]  # 18944 = 8 x 2368: the MLP splits
    assert layout_problems("student", "/m/s", {"num_hidden_layers": 3}, tp_size=1, pp_size=1) == []


def test_a_one_layer_student_at_pp_2_is_refused_before_ray_starts(tiny_setup, tmp_path):
    # The user's case from the issue: Megatron's AssertionError came after Ray and the ranks had started.
    data = tiny_config_dict(tiny_setup, tmp_path)
    megatron = {"tp_size": 1, "pp_size": 2}  # strategy_args fields
    data["student"].update(device_mapping=[0, 1],
                           strategy_args={"strategy_name": "megatron_train", **megatron})
    data["teacher"].update(device_mapping=[0, 1],
                           strategy_args={"strategy_name": "megatron_infer", **megatron})
    path = tmp_path / "distill.yaml"
    path.write_text(yaml.safe_dump(data))
    done = subprocess.run([sys.executable, "-m", "distill_trainer.cli", "train", str(path)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-3000:]
    assert ("student.strategy_args.pp_size=2 is more than the 1 transformer layers of" in done.stderr
            and "every pipeline stage needs at least one layer; pp_size values that fit: 1" in done.stderr)
    assert "teacher" not in done.stderr.split("error: ", 1)[1]  # the 2-layer teacher splits: only the student
    assert "Ray" not in done.stderr and not (tmp_path / "output").exists()


def test_fewer_micro_batches_than_pipeline_stages_is_a_warning_with_the_bubble():
    from distill_trainer.layout import pipeline_bubble_warning

    assert pipeline_bubble_warning(1, 1) is None and pipeline_bubble_warning(4, 4) is None
    assert pipeline_bubble_warning(4, 1) == (
        "student.training_args.gradient_accumulation_steps=1 is below pp_size=4: each pipeline stage idles 75% of "
        "every step (Megatron's 1F1B bubble, (pp-1)/(m+pp-1)); gradient_accumulation_steps >= 16 keeps it at most 16%")


def test_a_pipeline_that_does_not_divide_the_layers_gets_the_first_and_last_stages_lightest():
    # Megatron's uneven form: first and last stage free, the stages between equal.
    assert pipeline_stage_layers(28, 4) == [7, 7, 7, 7]  # divisible: Megatron's even default
    assert pipeline_split_settings(28, 4) == {}
    assert pipeline_stage_layers(3, 2) == [2, 1]
    assert pipeline_stage_layers(28, 3) == [9, 10, 9]
    assert pipeline_stage_layers(30, 4) == [7, 8, 8, 7]
    assert pipeline_stage_layers(61, 8) == [7, 8, 8, 8, 8, 8, 8, 6]
    assert pipeline_stage_layers(5, 4) == [2, 1, 1, 1]  # no split leaves both ends lighter than the middle
    assert pipeline_split_settings(3, 2) == {"num_layers_in_first_pipeline_stage": 2,
                                             "num_layers_in_last_pipeline_stage": 1}
    # As set: the other stages share the rest equally.
    assert pipeline_stage_layers(28, 4, first=4) == [4, 8, 8, 8]
    assert pipeline_stage_layers(28, 4, last=1) == [9, 9, 9, 1]
    assert pipeline_stage_layers(28, 4, 2, 2) == [2, 12, 12, 2]
    assert pipeline_split_settings(28, 4, 7) == {"num_layers_in_first_pipeline_stage": 7,
                                                 "num_layers_in_last_pipeline_stage": 7}


def test_a_split_megatron_cannot_build_is_refused_with_the_numbers():
    def problems(pp, first=None, last=None, layers=28):
        return layout_problems("student", "/m/s", {"num_hidden_layers": layers}, tp_size=1, pp_size=pp,
                               first=first, last=last)

    assert problems(3) == [] and problems(4, 4) == []
    assert problems(4, 5) == [
        "student.strategy_args.num_layers_in_first_pipeline_stage=5 leaves 23 of the 28 transformer layers of /m/s "
        "for the other 3 pipeline stage(s) of student.strategy_args.pp_size=4; Megatron gives each of them the same "
        "number, at least one: the rest must be a positive multiple of 3"]
    assert problems(3, 20, 10) == [
        "student.strategy_args.num_layers_in_first_pipeline_stage=20 + "
        "student.strategy_args.num_layers_in_last_pipeline_stage=10 leave 0 of the 28 transformer layers of /m/s for "
        "the other 1 pipeline stage(s) of student.strategy_args.pp_size=3; Megatron gives each of them the same "
        "number, at least one: the rest must be a positive multiple of 1"]
    assert problems(2, 1, 1, layers=3) == [
        "student.strategy_args.num_layers_in_first_pipeline_stage=1 + "
        "student.strategy_args.num_layers_in_last_pipeline_stage=1 must add up to the 3 transformer layers of /m/s "
        "with student.strategy_args.pp_size=2 (got 2)"]
    assert problems(4, layers=3) == [
        "student.strategy_args.pp_size=4 is more than the 3 transformer layers of /m/s: every pipeline stage needs at "
        "least one layer; pp_size values that fit: 1 to 3"]


def _megatron(first=None, last=None, pp=2, strategy="megatron", **extra):
    args = {"strategy_name": f"{strategy}_train", "pp_size": pp, **extra}
    if first is not None:
        args["num_layers_in_first_pipeline_stage"] = first
    if last is not None:
        args["num_layers_in_last_pipeline_stage"] = last
    return {"max_steps": 10, "student_pretrain": "s", "teacher_pretrain": "t",
            "student": {"data_args": {"file_name": "x"}, "strategy_args": args, "device_mapping": list(range(pp)),
                        "training_args": {"gradient_accumulation_steps": 4}},
            "teacher": {"strategy_args": {"strategy_name": f"{strategy}_infer", "pp_size": pp},
                        "device_mapping": list(range(pp))}}


def test_pipeline_stage_counts_need_megatron_with_pp_above_1_and_map_from_strategy_config():
    config = config_from_dict(_megatron(first=3))
    assert config.student.strategy_args.num_layers_in_first_pipeline_stage == 3
    assert config.student.strategy_args.num_layers_in_last_pipeline_stage is None
    original = _megatron()
    original["student"]["strategy_args"]["strategy_config"] = {"num_layers_in_last_pipeline_stage": 2}
    assert config_from_dict(original).student.strategy_args.num_layers_in_last_pipeline_stage == 2
    with pytest.raises(ConfigError, match=r"student.strategy_args.num_layers_in_last_pipeline_stage: needs pp_size > "
                                          r"1 .* \(got 2\)"):
        config_from_dict(_megatron(last=2, pp=1))
    with pytest.raises(ConfigError, match=r"student.strategy_args.num_layers_in_first_pipeline_stage: a pipeline "
                                          r"split needs megatron_train/megatron_infer"):
        config_from_dict(_megatron(first=1, pp=1, strategy="torch"))
    with pytest.raises(ConfigError, match="num_layers_in_first_pipeline_stage"):
        config_from_dict(_megatron(first=0))


def test_the_chosen_split_is_logged_and_an_impossible_one_refused_before_ray(tmp_path, caplog):
    import json
    import logging

    for name, layers in (("s", 3), ("t", 4)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({"num_hidden_layers": layers}))
    data = _megatron()
    data.update(student_pretrain=str(tmp_path / "s"), teacher_pretrain=str(tmp_path / "t"))
    with caplog.at_level(logging.INFO, logger="distill_trainer.layout"):
        check_parallel_layout(config_from_dict(data))
    assert caplog.messages == [
        "student: 3 transformer layers over 2 pipeline stages: 2 | 1 (num_layers_in_first_pipeline_stage=2, "
        "num_layers_in_last_pipeline_stage=1; chosen because pp_size=2 does not divide them; set "
        "student.strategy_args.num_layers_in_first_pipeline_stage / num_layers_in_last_pipeline_stage for another "
        "split)"]  # the teacher's 4 layers split evenly: nothing to say
    with pytest.raises(ConfigError, match=r"student.strategy_args.num_layers_in_first_pipeline_stage=2 \+ "
                                          r"student.strategy_args.num_layers_in_last_pipeline_stage=2 must add up "
                                          r"to the 3 transformer layers of"):
        check_parallel_layout(config_from_dict(_megatron(2, 2) | {"student_pretrain": str(tmp_path / "s"),
                                                                   "teacher_pretrain": str(tmp_path / "t")}))
