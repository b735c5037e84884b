"""Checkpoints: HF-loadable student, exact optimizer/scheduler/RNG round trip, pruning, atomic commit."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import random
import select
import signal
import time

import numpy as np
import pytest
import torch

from distill_trainer import checkpoint as ckpt
from distill_trainer.checkpoint import (
    CheckpointError,
    find_latest_checkpoint,
    load_checkpoint,
    resolve_resume_checkpoint,
    save_checkpoint,
)

torch.set_num_threads(1)

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 +=?"


def tiny_tokenizer():
    """A character-level tokenizer, built offline."""
    vocab = {"<pad>": 0, "<unk>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(CHARS)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Split(tokenizers.Regex("."), behavior="isolated")
    tok.decoder = tokenizers.decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="</s>"
    )


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.Qwen2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return transformers.AutoModelForCausalLM.from_config(config)


def optimizer_and_scheduler(model):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 4))
    return optimizer, scheduler


def train_steps(model, optimizer, scheduler, n: int) -> None:
    for _ in range(n):
        ids = torch.randint(3, 64, (2, 8))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()


@pytest.fixture(scope="module")
def trained():
    """A tiny student after two optimizer steps, with its tokenizer, optimizer and scheduler."""
    model = tiny_model()
    optimizer, scheduler = optimizer_and_scheduler(model)
    train_steps(model, optimizer, scheduler, 2)
    return {"model": model, "tokenizer": tiny_tokenizer(), "optimizer": optimizer, "scheduler": scheduler}


def save(output_dir, step, trained, **kwargs):
    kwargs.setdefault("trainer_state", {"samples_seen": 4 * step})
    return save_checkpoint(output_dir, step, **trained, **kwargs)


def hidden_entries(output_dir) -> list[str]:
    return sorted(p.name for p in pathlib.Path(output_dir).iterdir() if p.name.startswith("."))


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# -------------------------------------------------------------------------------------- layout


def test_checkpoint_student_loads_with_transformers_and_generates(tmp_path, trained):
    path = save(tmp_path, 2, trained, config={"exp_name": "t", "kd_temperature": 2.0})

    assert path == tmp_path / "checkpoint-2"
    for name in ["optimizer.pt", "scheduler.pt", "rng_state.pt", "trainer_state.json", "distill_config.json",
                 "student/config.json", "student/model.safetensors"]:
        assert (path / name).is_file(), name
    assert json.loads((path / "trainer_state.json").read_text()) == {"step": 2, "samples_seen": 8}
    assert json.loads((path / "distill_config.json").read_text())["kd_temperature"] == 2.0
    assert hidden_entries(tmp_path) == []

    model = transformers.AutoModelForCausalLM.from_pretrained(path / "student")
    tokenizer = transformers.AutoTokenizer.from_pretrained(path / "student")
    assert_same_tensors(model.state_dict(), trained["model"].state_dict())
    inputs = tokenizer("1+2=", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 3)
    assert isinstance(tokenizer.decode(out[0]), str)


def test_resume_restores_optimizer_scheduler_rng_and_trainer_state(tmp_path, trained):
    path = save(tmp_path, 2, trained, trainer_state={"samples_seen": 8, "epoch": 0})
    expected_next = (torch.rand(3), random.random(), np.random.rand(2))

    # Disturb every generator, then resume into a fresh optimizer/scheduler like the pipeline does:
    # model from <ckpt>/student first, then load_checkpoint.
    torch.manual_seed(123), random.seed(123), np.random.seed(123)
    model = transformers.AutoModelForCausalLM.from_pretrained(path / "student")
    optimizer, scheduler = optimizer_and_scheduler(model)
    trainer_state = load_checkpoint(path, optimizer=optimizer, scheduler=scheduler)

    assert trainer_state == {"step": 2, "samples_seen": 8, "epoch": 0}
    assert torch.equal(torch.rand(3), expected_next[0])
    assert random.random() == expected_next[1]
    assert np.array_equal(np.random.rand(2), expected_next[2])
    assert scheduler.state_dict() == trained["scheduler"].state_dict()
    assert scheduler.get_last_lr() == trained["scheduler"].get_last_lr()
    restored, original = optimizer.state_dict(), trained["optimizer"].state_dict()
    assert restored["param_groups"] == original["param_groups"]
    assert restored["state"].keys() == original["state"].keys()
    for index in original["state"]:
        assert_same_tensors(restored["state"][index], original["state"][index])


def test_rng_state_round_trips_in_process():
    state = ckpt.capture_rng_state()
    expected = (torch.randn(4), random.getrandbits(64), np.random.standard_normal(3))
    ckpt.restore_rng_state(state)
    assert torch.equal(torch.randn(4), expected[0])
    assert random.getrandbits(64) == expected[1]
    assert np.array_equal(np.random.standard_normal(3), expected[2])


def test_non_json_trainer_state_fails_before_anything_is_written(tmp_path, trained):
    with pytest.raises(TypeError):
        save(tmp_path, 1, trained, trainer_state={"bad": object()})
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------ pruning, re-save


def test_pruning_keeps_the_newest_checkpoints(tmp_path, trained):
    for step in (1, 2, 3, 4):
        save(tmp_path, step, trained, max_to_keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3", "checkpoint-4"]


def test_pruning_never_deletes_the_checkpoint_just_saved(tmp_path, trained):
    for step in (3, 4):
        save(tmp_path, step, trained)
    save(tmp_path, 2, trained, max_to_keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-4"]


def test_max_to_keep_zero_keeps_all(tmp_path, trained):
    for step in (1, 2, 3):
        save(tmp_path, step, trained, max_to_keep=0)
    assert len(list(tmp_path.iterdir())) == 3


def test_resaving_an_existing_step_replaces_it(tmp_path, trained):
    save(tmp_path, 5, trained, trainer_state={"run": 1})
    save(tmp_path, 5, trained, trainer_state={"run": 2})
    assert json.loads((tmp_path / "checkpoint-5" / "trainer_state.json").read_text())["run"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-5"]


def test_failed_resave_keeps_the_existing_checkpoint(tmp_path, trained, monkeypatch):
    save(tmp_path, 5, trained, trainer_state={"run": 1})
    real_replace = os.replace
    calls = []

    def replace_failing_on_commit(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # 1st: old aside, 2nd: new in
            raise OSError("disk went away")
        real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", replace_failing_on_commit)
    with pytest.raises(OSError, match="disk went away"):
        save(tmp_path, 5, trained, trainer_state={"run": 2})
    monkeypatch.undo()

    assert json.loads((tmp_path / "checkpoint-5" / "trainer_state.json").read_text())["run"] == 1
    assert hidden_entries(tmp_path) == []


def test_failure_while_writing_leaves_no_partial_checkpoint(tmp_path, trained, monkeypatch):
    save(tmp_path, 1, trained)

    def broken_save(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", broken_save)
    with pytest.raises(OSError, match="No space left"):
        save(tmp_path, 2, trained)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]
    assert find_latest_checkpoint(tmp_path) == tmp_path / "checkpoint-1"


# ------------------------------------------------------------------------------- find / resolve


def test_find_latest_orders_by_step_and_ignores_incomplete_and_hidden_dirs(tmp_path, trained):
    assert find_latest_checkpoint(tmp_path / "missing") is None
    assert find_latest_checkpoint(tmp_path) is None
    save(tmp_path, 9, trained)
    save(tmp_path, 10, trained)
    (tmp_path / "checkpoint-11").mkdir()  # incomplete: no trainer_state.json, no student/
    (tmp_path / "checkpoint-12" / "student").mkdir(parents=True)
    (tmp_path / "checkpoint-12" / "student" / "config.json").write_text("{}")  # no trainer_state.json
    (tmp_path / "checkpoint-latest").mkdir()
    (tmp_path / "checkpoint-99.txt").write_text("")
    (tmp_path / ".checkpoint-20.tmp-123").mkdir()
    assert find_latest_checkpoint(tmp_path) == tmp_path / "checkpoint-10"


def test_resolve_false_means_start_fresh(tmp_path, trained):
    save(tmp_path, 1, trained)
    assert resolve_resume_checkpoint(False, tmp_path) is None


def test_resolve_true_without_checkpoints_starts_fresh_and_says_so(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="distill_trainer.checkpoint"):
        assert resolve_resume_checkpoint(True, tmp_path / "never-written") is None
    assert "starting from step 0" in caplog.text


def test_resolve_true_picks_the_newest_checkpoint(tmp_path, trained):
    save(tmp_path, 2, trained)
    save(tmp_path, 4, trained)
    assert resolve_resume_checkpoint(True, tmp_path) == tmp_path / "checkpoint-4"


def test_resolve_path_accepts_absolute_and_output_dir_relative(tmp_path, trained):
    path = save(tmp_path, 3, trained)
    assert resolve_resume_checkpoint(str(path), tmp_path) == path
    assert resolve_resume_checkpoint("checkpoint-3", tmp_path) == path


def test_resolve_missing_path_is_a_clear_error(tmp_path):
    missing = tmp_path / "checkpoint-7"
    with pytest.raises(CheckpointError, match="does not exist") as info:
        resolve_resume_checkpoint(str(missing), tmp_path)
    assert str(missing) in str(info.value)
    assert "resume_from_checkpoint=true" in str(info.value)


def test_resolve_incomplete_checkpoint_is_a_clear_error(tmp_path):
    broken = tmp_path / "checkpoint-7"
    (broken / "student").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="not a complete checkpoint") as info:
        resolve_resume_checkpoint(str(broken), tmp_path)
    assert str(broken) in str(info.value)
    assert "trainer_state.json" in str(info.value) and "student/config.json" in str(info.value)


def test_resolve_output_dir_given_as_checkpoint_suggests_the_newest(tmp_path, trained):
    save(tmp_path, 6, trained)
    with pytest.raises(CheckpointError, match="did you mean .*checkpoint-6"):
        resolve_resume_checkpoint(str(tmp_path), tmp_path)


def test_load_incomplete_checkpoint_is_a_clear_error(tmp_path, trained):
    path = save(tmp_path, 1, trained)
    (path / "optimizer.pt").unlink()
    with pytest.raises(CheckpointError, match="missing optimizer.pt") as info:
        load_checkpoint(path, optimizer=trained["optimizer"], scheduler=trained["scheduler"])
    assert str(path) in str(info.value)


# ----------------------------------------------------------------------------- crash during save

# A forked child (torch and the model are already loaded, so this takes milliseconds) saves a
# checkpoint and hangs at a chosen point after announcing it through a pipe; the test SIGKILLs it
# there. The monkeypatching happens only inside the child.
def kill_child_during_save(output_dir: pathlib.Path, step: int, hang_at: str, trained) -> None:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        try:
            os.close(read_end)

            def hang():
                os.write(write_end, b"ready")
                time.sleep(600)

            real_replace = os.replace
            if hang_at == "mid_write":  # optimizer.pt half written
                def slow_save(obj, f, *args, **kwargs):
                    with open(f, "wb") as out:
                        out.write(b"partial")
                        out.flush()
                        hang()
                ckpt.torch.save = slow_save
            elif hang_at == "before_rename":  # everything written, nothing committed
                ckpt._fsync_tree = lambda root: hang()
            elif hang_at == "between_renames":  # old checkpoint moved aside, new one not yet in
                def replace(src, dst):
                    real_replace(src, dst)
                    if ".old-" in str(dst):
                        hang()
                ckpt.os.replace = replace
            save(output_dir, step, trained, trainer_state={"from": "child"})
        finally:
            os._exit(1)  # reached only if the child did not hang: the parent sees EOF and fails

    os.close(write_end)
    try:
        ready = select.select([read_end], [], [], 60)[0] and os.read(read_end, 5)
        assert ready == b"ready", "child never reached the hang point"
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(read_end)


def assert_is_intact(path: pathlib.Path, trained) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(path / "student")
    assert_same_tensors(model.state_dict(), trained["model"].state_dict())
    transformers.AutoTokenizer.from_pretrained(path / "student")
    optimizer, scheduler = optimizer_and_scheduler(model)
    assert "from" not in load_checkpoint(path, optimizer=optimizer, scheduler=scheduler)


needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="the crash tests fork a child to kill")


@needs_fork
@pytest.mark.parametrize("hang_at", ["mid_write", "before_rename"])
def test_kill_during_save_of_a_new_step_leaves_previous_checkpoint_loadable(tmp_path, trained, hang_at):
    output_dir = tmp_path / "out"
    previous = save(output_dir, 1, trained)
    kill_child_during_save(output_dir, 2, hang_at, trained)

    assert [name.split(".tmp-")[0] for name in hidden_entries(output_dir)] == [".checkpoint-2"]  # the partial
    assert find_latest_checkpoint(output_dir) == previous
    assert resolve_resume_checkpoint(True, output_dir) == previous
    assert_is_intact(previous, trained)

    save(output_dir, 2, trained)  # the next save cleans the stale temp dir
    assert hidden_entries(output_dir) == []
    assert find_latest_checkpoint(output_dir) == output_dir / "checkpoint-2"


@needs_fork
def test_kill_during_resave_of_an_existing_step_keeps_it(tmp_path, trained):
    output_dir = tmp_path / "out"
    existing = save(output_dir, 2, trained)
    kill_child_during_save(output_dir, 2, "mid_write", trained)

    assert find_latest_checkpoint(output_dir) == existing
    assert_is_intact(existing, trained)


@needs_fork
def test_kill_between_the_renames_of_a_resave_is_repaired_on_resume(tmp_path, trained):
    output_dir = tmp_path / "out"
    save(output_dir, 1, trained)
    existing = save(output_dir, 2, trained)
    kill_child_during_save(output_dir, 2, "between_renames", trained)

    assert not existing.exists()  # killed with checkpoint-2 renamed aside
    assert [name.split(".old-")[0] for name in hidden_entries(output_dir) if ".old-" in name] == [".checkpoint-2"]
    assert resolve_resume_checkpoint(True, output_dir) == existing  # moved back before looking
    assert_is_intact(existing, trained)
    assert hidden_entries(output_dir) == []  # the child's uncommitted temp dir is gone too


# ----------------------------------------------------------------------------------- run identity

from distill_trainer.checkpoint import RunConflictError, claim_output_dir  # noqa: E402
from distill_trainer.run_identity import ENV_JOB_UID, RunIdentity, identity_from_dict, job_from_env  # noqa: E402


def run_config(**changes) -> dict:
    """The fingerprinted part of a config, as a checkpoint's distill_config.json holds it."""
    config = {
        "student_pretrain": "/models/student", "teacher_pretrain": "/models/teacher", "seed": 1,
        "kd_objective": "forward_kl", "distill_loss_weight": 0.5, "logits_topk": 64, "sequence_length": 32,
        "max_steps": 20, "exp_name": "a",
        "student": {"data_args": {"file_name": "/data/train.jsonl"},
                    "training_args": {"per_device_train_batch_size": 4, "learning_rate": 1e-3}},
    }
    for key, value in changes.items():
        config[key] = value
    return config


RUN_A = identity_from_dict(run_config())
RUN_B = identity_from_dict(run_config(seed=2, kd_objective="reverse_kl"))


def save_as(output_dir, step, trained, identity, **kwargs):
    return save(output_dir, step, trained, identity=identity, **kwargs)


def checkpoint_names(output_dir) -> list[str]:
    return sorted(p.name for p in pathlib.Path(output_dir).iterdir() if p.name.startswith("checkpoint-"))


def test_pruning_never_deletes_another_runs_checkpoints(tmp_path, trained):
    save_as(tmp_path, 18, trained, RUN_A)
    save_as(tmp_path, 20, trained, RUN_A)
    save_as(tmp_path, 2, trained, RUN_B, max_to_keep=1)
    save_as(tmp_path, 4, trained, RUN_B, max_to_keep=1)
    assert checkpoint_names(tmp_path) == ["checkpoint-18", "checkpoint-20", "checkpoint-4"]


def test_fresh_run_into_another_runs_output_dir_is_refused_naming_both(tmp_path, trained):
    save_as(tmp_path, 18, trained, RUN_A)
    save_as(tmp_path, 20, trained, RUN_A)
    with pytest.raises(RunConflictError) as error:
        claim_output_dir(tmp_path, RUN_B)
    message = str(error.value)
    assert "checkpoint-18, checkpoint-20 of another run" in message
    assert RUN_A.fingerprint in message and RUN_B.fingerprint in message
    assert "seed: 1 (theirs) vs 2 (this run)" in message
    assert "kd_objective: 'forward_kl' (theirs) vs 'reverse_kl' (this run)" in message
    assert "overwrite_output_dir=true" in message
    assert checkpoint_names(tmp_path) == ["checkpoint-18", "checkpoint-20"]  # nothing touched


def test_overwrite_deletes_only_the_other_runs_checkpoints(tmp_path, trained):
    save_as(tmp_path, 20, trained, RUN_A)
    save_as(tmp_path, 2, trained, RUN_B)
    assert claim_output_dir(tmp_path, RUN_B, overwrite=True) == ["checkpoint-20"]
    assert checkpoint_names(tmp_path) == ["checkpoint-2"]
    assert hidden_entries(tmp_path) == []


def test_own_checkpoints_are_claimed_silently(tmp_path, trained):
    save_as(tmp_path, 2, trained, RUN_A)
    assert claim_output_dir(tmp_path, RUN_A) == []


def test_resume_true_refuses_another_runs_newest_checkpoint(tmp_path, trained):
    save_as(tmp_path, 20, trained, RUN_A)
    with pytest.raises(RunConflictError, match="refusing to resume from a checkpoint of another run"):
        resolve_resume_checkpoint(True, tmp_path, RUN_B)
    assert resolve_resume_checkpoint(True, tmp_path, RUN_A) == tmp_path / "checkpoint-20"


def test_resume_from_an_explicit_checkpoint_of_another_run_is_refused(tmp_path, trained):
    path = save_as(tmp_path / "a", 20, trained, RUN_A)
    with pytest.raises(RunConflictError, match=r"student_pretrain=.*checkpoint-20/student"):
        resolve_resume_checkpoint(str(path), tmp_path / "b", RUN_B)


def test_identity_ignores_what_may_change_on_resume():
    extended = identity_from_dict(run_config(max_steps=200, exp_name="longer",
                                             student={"data_args": {"file_name": "/data/train.jsonl"},
                                                      "training_args": {"per_device_train_batch_size": 4,
                                                                        "learning_rate": 5e-4}}))
    assert extended.fingerprint == RUN_A.fingerprint
    bigger_batch = identity_from_dict(run_config(student={"data_args": {"file_name": "/data/train.jsonl"},
                                                          "training_args": {"per_device_train_batch_size": 8}}))
    assert bigger_batch.fingerprint != RUN_A.fingerprint


def test_a_recreated_distilljob_is_another_run():
    env = {"KUBEDISTILL_DISTILLJOB_NAME": "dj", "KUBEDISTILL_DISTILLJOB_NAMESPACE": "team"}
    first = identity_from_dict(run_config(), job=job_from_env({**env, ENV_JOB_UID: "uid-1"}))
    again = identity_from_dict(run_config(), job=job_from_env({**env, ENV_JOB_UID: "uid-1"}))
    recreated = identity_from_dict(run_config(), job=job_from_env({**env, ENV_JOB_UID: "uid-2"}))
    assert first.fingerprint == again.fingerprint != recreated.fingerprint
    assert first.fingerprint != RUN_A.fingerprint  # a local run with the same config is not the job
    assert job_from_env({}) is None


def test_checkpoint_without_identity_file_is_identified_by_its_recorded_config(tmp_path, trained):
    # Written before run identities existed: only distill_config.json says which run it was.
    save(tmp_path, 20, trained, config=run_config())
    assert ckpt.checkpoint_identity(tmp_path / "checkpoint-20").fingerprint == RUN_A.fingerprint
    assert claim_output_dir(tmp_path, RUN_A) == []
    with pytest.raises(RunConflictError):
        claim_output_dir(tmp_path, RUN_B)


def test_identity_round_trips_through_the_checkpoint(tmp_path, trained):
    path = save_as(tmp_path, 2, trained, RUN_B)
    assert ckpt.checkpoint_identity(path) == RunIdentity(fields=RUN_B.fields)


# -------------------------------------------------------------------------- non-finite, full disk


def test_model_with_nonfinite_weights_is_never_saved_and_prunes_nothing(tmp_path, trained):
    save(tmp_path, 2, trained)
    model = tiny_model()
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("nan")
    optimizer, scheduler = optimizer_and_scheduler(model)
    with pytest.raises(CheckpointError, match=r"refusing to write checkpoint-4: parameter .* NaN/inf"):
        save_checkpoint(tmp_path, 4, model=model, tokenizer=trained["tokenizer"], optimizer=optimizer,
                        scheduler=scheduler, trainer_state={}, max_to_keep=1)
    assert checkpoint_names(tmp_path) == ["checkpoint-2"]


def test_full_disk_names_the_directory_and_the_intact_checkpoint(small_tmpfs, trained):
    first = save(small_tmpfs, 2, trained)
    size = sum(f.stat().st_size for f in first.rglob("*") if f.is_file())
    # Fill what is left but less than one more checkpoint needs.
    free = os.statvfs(small_tmpfs).f_bavail * os.statvfs(small_tmpfs).f_frsize
    (small_tmpfs / "ballast").write_bytes(b"\0" * max(0, free - size // 2))
    with pytest.raises(CheckpointError) as error:
        save(small_tmpfs, 4, trained)
    assert str(error.value).startswith(f"no space left on {small_tmpfs}: checkpoint-4 not written; "
                                       f"the previous checkpoint-2 is intact")
    assert checkpoint_names(small_tmpfs) == ["checkpoint-2"] and hidden_entries(small_tmpfs) == []
    (small_tmpfs / "ballast").unlink()
    optimizer, scheduler = optimizer_and_scheduler(tiny_model())
    assert load_checkpoint(first, optimizer=optimizer, scheduler=scheduler)["step"] == 2
