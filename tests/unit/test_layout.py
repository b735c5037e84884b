"""A Megatron layout the model's shape cannot take is refused before Ray starts, with the numbers and what fits."""

from __future__ import annotations

import subprocess
import sys

import yaml

from distill_trainer.layout import layout_problems
from tests.conftest import tiny_config_dict


def test_each_uneven_split_is_named_with_the_sizes_that_fit():
    qwen_like = {"num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                 "intermediate_size": 18944}
    assert layout_problems("teacher", "/m/qwen", qwen_like, tp_size=4, pp_size=4) == []
    problems = layout_problems("teacher", "/m/qwen", qwen_like, tp_size=8, pp_size=3)
    assert problems == [
        "teacher.strategy_args.pp_size=3 does not divide the 28 transformer layers of /m/qwen (Megatron splits them "
        "evenly over pp_size); pp_size values that fit: 1, 2, 4, 7, 14, 28",
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
    assert "student.strategy_args.pp_size=2 does not divide the 1 transformer layers of" in done.stderr
    assert "teacher" not in done.stderr.split("error: ", 1)[1]  # the 2-layer teacher splits: only the student
    assert "Ray" not in done.stderr and not (tmp_path / "output").exists()
