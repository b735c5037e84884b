"""Fixtures shared by unit and integration tests: tiny models, task data, a local Ray.

Everything is built in-process and offline: a BPE tokenizer trained on the demo task's text, randomly
initialized Qwen2 teacher and student, and JSONL files of generated question/answer records.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("KUBEDISTILL_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _one_torch_thread():
    # Two shared cores: several threads per test make timings collapse and tests flaky under load.
    import torch

    torch.set_num_threads(1)


@dataclass(frozen=True)
class TinySetup:
    root: Path
    teacher: Path
    student: Path
    train_file: Path
    eval_file: Path


@pytest.fixture(scope="session")
def tiny_setup(tmp_path_factory) -> TinySetup:
    """A tokenizer, a teacher (embedding padded to a multiple of 64, Qwen-style), a student, and data."""
    from distill_trainer.demo.task import make_splits, write_jsonl
    from distill_trainer.demo.tiny_models import build_causal_lm, build_tokenizer

    root = tmp_path_factory.mktemp("tiny")
    splits = make_splits(seed=1, n_train=64, n_transfer=0, n_eval=16)
    texts = [r["question"] + r["answer"] for r in splits["train"]]
    tokenizer = build_tokenizer(texts, None)
    build_causal_lm(tokenizer, root / "teacher", hidden_size=32, num_layers=2, num_heads=2,
                    intermediate_size=64, seed=0, vocab_multiple=64)
    build_causal_lm(tokenizer, root / "student", hidden_size=16, num_layers=1, num_heads=2,
                    intermediate_size=32, seed=1)
    write_jsonl(splits["train"], root / "train.jsonl")
    write_jsonl(splits["eval"], root / "eval.jsonl")
    return TinySetup(root, root / "teacher", root / "student", root / "train.jsonl", root / "eval.jsonl")


def tiny_config_dict(setup: TinySetup, out: Path, **overrides) -> dict:
    """A complete, valid config for the tiny models; tests override what they exercise."""
    config = {
        "exp_name": "test",
        "seed": 7,
        "output_dir": str(out / "output"),
        "logging_dir": str(out / "logs"),
        "max_steps": 4,
        "save_steps": 2,
        "eval_steps": 2,
        "logging_steps": 1,
        "student_pretrain": str(setup.student),
        "teacher_pretrain": str(setup.teacher),
        "sequence_length": 32,
        "logits_topk": 16,
        "student": {
            "training_args": {"learning_rate": 1e-2, "per_device_train_batch_size": 4,
                              "gradient_accumulation_steps": 2, "warmup_steps": 1},
            "data_args": {"file_name": str(setup.train_file), "eval_file_name": str(setup.eval_file)},
        },
        "teacher": {"strategy_args": {"strategy_name": "torch_infer"}},
    }
    for key, value in overrides.items():
        config[key] = value
    return config


def logged_metrics(out: Path) -> list[dict]:
    """The records of ``<out>/logs/metrics.jsonl`` of a run made with ``tiny_config_dict(setup, out)``."""
    import json

    return [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]


def checkpoint_weights(out: Path, step: int) -> dict:
    """The student weights of ``<out>/output/checkpoint-<step>`` of such a run."""
    from safetensors.torch import load_file

    return load_file(str(out / "output" / f"checkpoint-{step}" / "student" / "model.safetensors"))


@pytest.fixture(scope="session")
def local_ray():
    """One embedded Ray for the whole test session (starting one costs ~10 s); 127.0.0.1 only."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False,
                 _node_ip_address="127.0.0.1")
    yield
    ray.shutdown()


def mount_tmpfs(path: Path, size: str, read_only: bool = False) -> None:
    """Mount a tmpfs of ``size`` at ``path``, or skip the test: mounting needs root (CAP_SYS_ADMIN)."""
    import subprocess

    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root/CAP_SYS_ADMIN): {done.stderr.strip()}")


def unmount(path: Path) -> None:
    import subprocess

    subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 4 MiB filesystem (tmpfs) at a fresh path, for out-of-space cases; unmounted after the test."""
    path = tmp_path / "small-disk"
    mount_tmpfs(path, "4m")
    yield path
    unmount(path)


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory no file can be created in: a read-only tmpfs as root, else a chmod 0o555 directory."""
    path = tmp_path / "read-only"
    if os.geteuid() != 0:
        path.mkdir()
        path.chmod(0o555)
        yield path
        path.chmod(0o755)
        return
    mount_tmpfs(path, "1m", read_only=True)
    yield path
    unmount(path)
