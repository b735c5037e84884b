"""The trainer's progress reporter: off without the env, writes only its progress ConfigMap, rate-limited, never
raising."""

from __future__ import annotations

import json

from distill_trainer import k8s_progress
from distill_trainer.k8s_progress import K8sProgressReporter


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def reporter(apply, clock, interval=10.0, max_steps=100):
    return K8sProgressReporter("job", "ns", max_steps, min_interval_seconds=interval, apply=apply, clock=clock)


def test_off_unless_running_under_a_distilljob(monkeypatch):
    monkeypatch.delenv("KUBEDISTILL_DISTILLJOB_NAME", raising=False)
    monkeypatch.delenv("KUBEDISTILL_DISTILLJOB_NAMESPACE", raising=False)
    assert k8s_progress.from_env(max_steps=10) is None
    monkeypatch.setenv("KUBEDISTILL_DISTILLJOB_NAME", "job")
    assert k8s_progress.from_env(max_steps=10) is None
    monkeypatch.setenv("KUBEDISTILL_DISTILLJOB_NAMESPACE", "ns")
    r = k8s_progress.from_env(max_steps=10)
    assert (r.name, r.namespace, r.max_steps, r.configmap) == ("job", "ns", 10, "job-progress")
    monkeypatch.setenv("KUBEDISTILL_PROGRESS_CONFIGMAP", "job-abc123-progress")  # the operator's (bounded) name
    assert k8s_progress.from_env(max_steps=10).configmap == "job-abc123-progress"


def sent_progress(patch):
    """The report a patch carries: one JSON object under data["progress.json"], nothing else."""
    assert set(patch) == {"data"} and set(patch["data"]) == {k8s_progress.PROGRESS_KEY}
    return json.loads(patch["data"][k8s_progress.PROGRESS_KEY])


def test_reports_are_rate_limited_and_checkpoints_flush_at_once():
    sent, clock = [], Clock()
    r = reporter(sent.append, clock)
    r.log(1, {"train/loss": 2.5, "train/tokens_per_second": 1000.0, "other": 1.0})
    assert len(sent) == 1
    progress = sent_progress(sent[0])
    assert progress["step"] == 1 and progress["maxSteps"] == 100
    assert progress["loss"] == 2.5 and progress["tokensPerSecond"] == 1000.0 and progress["updatedAt"]
    clock.t = 5
    r.log(2, {"train/loss": 2.0})
    assert len(sent) == 1  # within the interval
    r.checkpoint_saved(2, "/ckpt/checkpoint-2")
    assert len(sent) == 2 and sent_progress(sent[-1])["lastCheckpoint"] == "/ckpt/checkpoint-2"
    clock.t = 20
    r.log(3, {"train/loss": float("nan")})
    assert sent_progress(sent[-1])["step"] == 3 and sent_progress(sent[-1])["loss"] == 2.0
    clock.t = 21
    r.log(4, {})
    r.close()
    assert sent_progress(sent[-1])["step"] == 4
    n = len(sent)
    r.close()
    assert len(sent) == n  # nothing new to say


def test_last_step_is_always_reported():
    sent, clock = [], Clock()
    r = reporter(sent.append, clock, max_steps=2)
    r.log(1, {})
    r.log(2, {})
    assert sent_progress(sent[-1])["step"] == 2


def test_api_errors_never_reach_training(caplog):
    def broken(_patch):
        raise ConnectionError("apiserver down")

    r = reporter(broken, Clock())
    r.log(1, {"train/loss": 1.0})
    r.checkpoint_saved(1, "/c")
    r.close()
    assert "could not report progress" in caplog.text
