"""A run never loses or adopts work: run identity in output_dir, writable directories checked before Ray,
non-finite losses stopped or skipped, a full disk named. Real local Ray, tiny models."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from distill_trainer.checkpoint import CheckpointError, RunConflictError
from distill_trainer.config import ConfigError, config_from_dict
from distill_trainer.pipeline import DistillPipeline, NonFiniteLossError, prepare
from tests.conftest import tiny_config_dict


def pipeline(setup, out, **overrides):
    return DistillPipeline(config_from_dict(tiny_config_dict(setup, out, **overrides)), num_threads=1, console=False)


def checkpoints(output_dir):
    return sorted(p.name for p in output_dir.iterdir() if p.name.startswith("checkpoint-"))


def test_second_run_in_the_same_output_dir_neither_prunes_nor_resumes_the_first(tiny_setup, tmp_path, local_ray):
    out = tmp_path / "output"
    pipeline(tiny_setup, tmp_path, max_steps=4, save_steps=2).run()
    assert checkpoints(out) == ["checkpoint-2", "checkpoint-4"]
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}

    other = dict(seed=8, kd_objective="reverse_kl", max_ckpt_to_keep=1)
    for resume in (False, True):
        with pytest.raises(RunConflictError) as error:
            pipeline(tiny_setup, tmp_path, resume_from_checkpoint=resume, **other).run()
        assert "checkpoint-2, checkpoint-4 of another run" in str(error.value)
        assert "seed: 7 (theirs) vs 8 (this run)" in str(error.value)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # nothing touched

    # Told to overwrite, the second run deletes the first run's checkpoints and trains from step 0.
    result = pipeline(tiny_setup, tmp_path, overwrite_output_dir=True, max_steps=2, **other).run()
    assert result.final_step == 2 and checkpoints(out) == ["checkpoint-2"]


def test_output_dir_that_is_a_file_stops_before_ray(tiny_setup, tmp_path):
    (tmp_path / "output").write_text("not a directory")
    with pytest.raises(ConfigError, match=r"output_dir=.*output' is an existing file"):
        prepare(config_from_dict(tiny_config_dict(tiny_setup, tmp_path)))
    (tmp_path / "output").unlink()
    (tmp_path / "parent").write_text("a file")
    config = tiny_config_dict(tiny_setup, tmp_path, logging_dir=str(tmp_path / "parent" / "logs"))
    with pytest.raises(ConfigError, match=r"logging_dir=.*cannot be created"):
        prepare(config_from_dict(config))


def test_read_only_output_dir_stops_before_ray(tiny_setup, tmp_path, read_only_dir):
    config = tiny_config_dict(tiny_setup, tmp_path, output_dir=str(read_only_dir))
    with pytest.raises(ConfigError, match=r"output_dir=.* is not writable"):
        prepare(config_from_dict(config))


def test_nonfinite_loss_stops_at_its_step_and_keeps_the_good_checkpoint(tiny_setup, tmp_path, local_ray):
    run = pipeline(tiny_setup, tmp_path, max_steps=6, save_steps=1, eval_steps=0, max_ckpt_to_keep=1,
                   student={**tiny_config_dict(tiny_setup, tmp_path)["student"],
                            "training_args": {"learning_rate": 1e30, "per_device_train_batch_size": 4,
                                              "gradient_accumulation_steps": 2, "lr_scheduler_type": "constant"}})
    with pytest.raises(NonFiniteLossError, match=r"^step (\d+): the loss or gradient norm is NaN/inf") as error:
        run.run()
    bad_step = int(str(error.value).split(":")[0].split()[1])
    out = tmp_path / "output"
    # Every checkpoint on disk is from before the bad step and wholly finite.
    names = checkpoints(out)
    assert names and all(int(n.split("-")[1]) < bad_step for n in names)
    for name in names:
        assert all(torch.isfinite(t).all() for t in load_file(str(out / name / "student" / "model.safetensors")).values())
    logged = [json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["step"] == bad_step  # the bad step is on record


def test_skip_policy_drops_nonfinite_steps_then_stops_after_the_limit(tiny_setup, tmp_path, local_ray):
    student = {**tiny_config_dict(tiny_setup, tmp_path)["student"],
               "training_args": {"learning_rate": 1e30, "per_device_train_batch_size": 4,
                                 "lr_scheduler_type": "constant"}}
    run = pipeline(tiny_setup, tmp_path, max_steps=8, save_steps=0, eval_steps=0, student=student,
                   on_nonfinite_loss="skip", max_skipped_steps=2)
    with pytest.raises(NonFiniteLossError, match=r"for 2 steps in a row \(max_skipped_steps\)"):
        run.run()
    assert not (tmp_path / "output").exists() or checkpoints(tmp_path / "output") == []


def test_full_disk_at_a_save_names_the_disk_and_the_intact_checkpoint(tiny_setup, tmp_path, local_ray, small_tmpfs):
    # The first checkpoint fits; fill the disk so that the second cannot.
    run = pipeline(tiny_setup, tmp_path, output_dir=str(small_tmpfs), max_steps=2, save_steps=1, eval_steps=0)
    run.run()
    shutil.rmtree(small_tmpfs / "checkpoint-2")  # as if the run had died after step 1
    first = small_tmpfs / "checkpoint-1"
    size = sum(f.stat().st_size for f in first.rglob("*") if f.is_file())
    stat = os.statvfs(small_tmpfs)
    (small_tmpfs / "ballast").write_bytes(b"\0" * max(0, stat.f_bavail * stat.f_frsize - size // 2))
    run = pipeline(tiny_setup, tmp_path, output_dir=str(small_tmpfs), max_steps=2, save_steps=1, eval_steps=0,
                   resume_from_checkpoint=True)
    with pytest.raises(CheckpointError) as error:
        run.run()
    assert str(error.value).startswith(
        f"no space left on {small_tmpfs}: checkpoint-2 not written; the previous checkpoint-1 is intact")
    assert checkpoints(small_tmpfs) == ["checkpoint-1"]


def test_a_teacher_channel_over_its_memory_limit_is_refused_before_ray_with_its_size(tiny_setup, tmp_path):
    # Full-vocabulary targets of 4 x 32 rows: 2 slots (the streaming torch student), 4 without the overlap (the
    # student then holds a step's 2 micro-batches while the teacher computes the next step's).
    from distill_trainer.models import check_shared_vocab

    vocab = check_shared_vocab(str(tiny_setup.student), str(tiny_setup.teacher)).size
    slot = (4 * 32 * vocab * 4 + 63) // 64 * 64 * 1.25  # one micro-batch's fp32 logits, 64-byte aligned, headroom
    limit = 3 * slot / 2**30  # room for 3 slots
    for overlap, slots in ((True, 2), (False, 4)):
        config = config_from_dict(tiny_config_dict(tiny_setup, tmp_path, logits_topk=0, channel_memory_limit_gb=limit,
                                                   overlap_teacher=overlap))
        if slots <= 3:
            prepare(config)
            continue
        with pytest.raises(ConfigError) as error:
            prepare(config)
        message = str(error.value)
        assert f"needs {4 * slot / 2**30:.1f} GiB per teacher rank, over channel_memory_limit_gb={limit:g}" in message
        assert "4 slots (2 x gradient_accumulation_steps" in message and f"128 rows of fp32 full-vocabulary logits "\
            f"({vocab:,} columns)" in message and "Set logits_topk" in message


def test_the_channel_limit_counts_top_k_targets_not_the_vocabulary(tiny_setup, tmp_path):
    tiny = 1e-4  # GiB: ~107 KB, under what 4 slots of full-vocabulary targets take
    full = config_from_dict(tiny_config_dict(tiny_setup, tmp_path, logits_topk=0, overlap_teacher=False,
                                             channel_memory_limit_gb=tiny))
    with pytest.raises(ConfigError, match="full-vocabulary logits"):
        prepare(full)
    assert not (tmp_path / "output").exists()  # refused before anything was written
    top = config_from_dict(tiny_config_dict(tiny_setup, tmp_path, logits_topk=16, overlap_teacher=False,
                                            channel_memory_limit_gb=tiny))
    prepare(top)  # 4 slots x 128 rows x (16 values + 16 indices + the tail): about 90 KB
