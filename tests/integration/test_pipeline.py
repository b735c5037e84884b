"""The distillation pipeline end to end on a real local Ray with tiny models."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from distill_trainer.config import config_from_dict
from distill_trainer.pipeline import DistillPipeline
from tests.conftest import tiny_config_dict


def run(setup, out, **overrides):
    config = config_from_dict(tiny_config_dict(setup, out, **overrides))
    return config, DistillPipeline(config, num_threads=1, console=False).run()


def weights(checkpoint_dir):
    return load_file(str(checkpoint_dir / "student" / "model.safetensors"))


@pytest.fixture(scope="module")
def straight_run(tiny_setup, tmp_path_factory, local_ray):
    out = tmp_path_factory.mktemp("straight")
    config, result = run(tiny_setup, out)
    return out, config, result


def test_run_writes_checkpoints_metrics_and_eval(straight_run):
    out, config, result = straight_run
    assert result.final_step == 4
    assert sorted(p.name for p in (out / "output").iterdir() if p.name.startswith("checkpoint-")) == [
        "checkpoint-2", "checkpoint-4"]
    assert result.last_checkpoint.endswith("checkpoint-4")
    assert set(result.eval_metrics) == {"val/loss"}

    lines = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    tags = set().union(*lines)
    for tag in ["train/loss", "train/distill_loss", "train/student_loss", "train/grad_norm", "student/lr",
                "train/tokens_per_second", "time/teacher_forward", "time/logits_transfer", "time/student_step",
                "val/loss"]:
        assert tag in tags, tag
    train_lines = [line for line in lines if "train/loss" in line]
    assert [line["step"] for line in train_lines] == [1, 2, 3, 4]
    for line in train_lines:
        w = config.distill_loss_weight
        expected = (1 - w) * line["train/student_loss"] + w * line["train/distill_loss"]
        assert line["train/loss"] == pytest.approx(expected, rel=1e-5)
        assert line["train/distill_loss"] > 0


def test_tensorboard_events_hold_the_named_tags(straight_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _, _ = straight_run
    accumulator = EventAccumulator(str(out / "logs"))
    accumulator.Reload()
    scalars = set(accumulator.Tags()["scalars"])
    assert {"train/loss", "train/distill_loss", "train/student_loss", "train/grad_norm", "student/lr",
            "train/tokens_per_second", "time/teacher_forward", "time/logits_transfer", "time/student_step",
            "val/loss"} <= scalars


def test_checkpoint_loads_with_transformers_and_generates(straight_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _, _ = straight_run
    path = out / "output" / "checkpoint-4" / "student"
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompt = tokenizer("12+34=", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] > prompt["input_ids"].shape[1]


def test_resume_reproduces_uninterrupted_run(straight_run, tiny_setup, tmp_path):
    out, _, _ = straight_run
    # A run that stopped after step 2: only its step-2 checkpoint exists in its output_dir.
    shutil.copytree(out / "output" / "checkpoint-2", tmp_path / "output" / "checkpoint-2")
    _, result = run(tiny_setup, tmp_path, resume_from_checkpoint=True)
    assert result.final_step == 4
    straight, resumed = weights(out / "output" / "checkpoint-4"), weights(tmp_path / "output" / "checkpoint-4")
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    steps = [json.loads(line)["step"] for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert 1 not in steps and steps[-1] == 4


def test_sft_only_run_needs_no_teacher_and_logs_no_distill_loss(tiny_setup, tmp_path, local_ray):
    _, result = run(tiny_setup, tmp_path, distill_loss_weight=0.0, max_steps=2, save_steps=0)
    assert "train/distill_loss" not in result.last_train_metrics
    assert result.last_train_metrics["train/loss"] == pytest.approx(result.last_train_metrics["train/student_loss"])


@pytest.mark.parametrize("objective", ["reverse_kl", "adaptive_kl", "js_divergence"])
def test_full_vocabulary_and_other_objectives_train(tiny_setup, tmp_path, local_ray, objective):
    _, result = run(tiny_setup, tmp_path, logits_topk=0, kd_objective=objective, max_steps=2, save_steps=0,
                    eval_steps=0)
    assert result.last_train_metrics["train/distill_loss"] >= 0
    assert result.final_step == 2


def test_bad_data_stops_before_anything_is_written(tiny_setup, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "1+1=", "answer": "2"}\n{"question": "2+2="}\n')
    data = tiny_config_dict(tiny_setup, tmp_path)
    data["student"]["data_args"]["file_name"] = str(bad)
    from distill_trainer.data import DataError

    with pytest.raises(DataError, match=r"bad\.jsonl:2: missing key 'answer'"):
        DistillPipeline(config_from_dict(data), num_threads=1).run()
    assert not (tmp_path / "output").exists() and not (tmp_path / "logs").exists()


def test_object_store_transport_gives_the_same_step_as_shared_memory(straight_run, tiny_setup, tmp_path, local_ray):
    # logits_transfer_backend "ray": the teacher's targets go through Ray's object store instead of shared memory
    # (with system_envs set, the actors start with a runtime_env).
    _, result = run(tiny_setup, tmp_path, max_steps=1, save_steps=0, eval_steps=0, logits_transfer_backend="ray",
                    system_envs={"KUBEDISTILL_TEST_MARKER": "1"})
    straight_out, _, _ = straight_run
    first = json.loads((straight_out / "logs" / "metrics.jsonl").read_text().splitlines()[0])
    for tag in ("train/loss", "train/student_loss", "train/distill_loss", "train/grad_norm"):
        assert result.last_train_metrics[tag] == first[tag], tag


def test_overlapped_teacher_gives_the_same_losses_and_weights_as_taking_turns(straight_run, tiny_setup, tmp_path,
                                                                              local_ray):
    # straight_run overlaps (overlap_teacher defaults to true: the teacher computes step k+1 while the student
    # trains on k); this run takes turns. Same batches in the same order: every loss and weight bit for bit.
    # device_peak_tflops only adds train/mfu to the metrics.
    config, result = run(tiny_setup, tmp_path, overlap_teacher=False, device_peak_tflops=1.0)
    assert result.final_step == 4
    straight_out, straight_config, _ = straight_run
    assert straight_config.overlap_teacher

    def records(out):
        return [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]

    compared = ("train/loss", "train/student_loss", "train/distill_loss", "train/grad_norm", "student/lr", "val/loss")
    overlapped, in_turns = records(straight_out), records(tmp_path)
    assert [r["step"] for r in overlapped] == [r["step"] for r in in_turns] == [1, 2, 3, 4]
    for a, b in zip(overlapped, in_turns):
        for tag in compared:
            assert (tag in a) == (tag in b), tag
            if tag in a:
                assert a[tag] == b[tag], (a["step"], tag)
    for name in ("checkpoint-2", "checkpoint-4"):
        straight, turns = weights(straight_out / "output" / name), weights(tmp_path / "output" / name)
        assert straight.keys() == turns.keys()
        for key in straight:
            assert torch.equal(straight[key], turns[key]), (name, key)

    # MFU: only with a known peak; (6·N_student + 2·N_teacher)·tokens/s over the peak, plus attention terms.
    from distill_trainer.flops import ModelShape

    assert all("train/mfu" not in r for r in overlapped)
    student, teacher = ModelShape.of(config.student_pretrain), ModelShape.of(config.teacher_pretrain)
    for r in (r for r in in_turns if "train/loss" in r):
        per_token = 6 * student.matmul_params + 2 * teacher.matmul_params
        attention = (3 * student.attention_flops_per_position + teacher.attention_flops_per_position) * 32
        low = per_token * r["train/tokens_per_second"] / 1e12
        assert low < r["train/mfu"] <= low + attention * r["train/tokens_per_second"] / 1e12
