"""PrometheusSink: the trainer's series, their labels, NaN gauges, the non-finite counter, and the HTTP endpoint."""

from __future__ import annotations

import math
import socket
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from distill_trainer import prometheus_sink as ps
from distill_trainer.config import config_from_dict
from distill_trainer.prometheus_sink import PrometheusSink

JOB = {"distilljob_namespace": "ml", "distilljob_name": "qwen", "exp_name": "exp"}

TRAIN = {
    "train/loss": 1.5, "train/distill_loss": 2.0, "train/student_loss": 1.0, "train/grad_norm": 0.7,
    "student/lr": 1e-4, "train/tokens_per_second": 812.0, "time/teacher_forward": 0.25,
    "time/logits_transfer": 0.01, "time/student_step": 0.5, "train/mfu": 0.25,
}


def make_sink(**kwargs) -> PrometheusSink:
    options = dict(max_steps=100, exp_name="exp", port=None, job_namespace="ml", job_name="qwen", clock=lambda: 1000.0)
    return PrometheusSink(**{**options, **kwargs})


def value(sink: PrometheusSink, name: str, **extra) -> float | None:
    return sink.registry.get_sample_value(name, {**sink.labels, **extra})


def test_logged_step_sets_every_training_series_labelled_by_the_distilljob():
    sink = make_sink()
    sink.log(10, TRAIN)
    assert sink.labels == JOB
    expected = {
        (ps.STEP, ()): 10, (ps.MAX_STEPS, ()): 100, (ps.START_TIMESTAMP, ()): 1000.0,
        (ps.LOSS, (("term", "total"),)): 1.5, (ps.LOSS, (("term", "distill"),)): 2.0,
        (ps.LOSS, (("term", "student"),)): 1.0, (ps.LEARNING_RATE, ()): 1e-4, (ps.GRAD_NORM, ()): 0.7,
        (ps.TOKENS_PER_SECOND, ()): 812.0, (ps.MFU, ()): 0.25,
        (ps.STEP_PHASE_SECONDS, (("phase", "teacher_forward"),)): 0.25,
        (ps.STEP_PHASE_SECONDS, (("phase", "logits_transfer"),)): 0.01,
        (ps.STEP_PHASE_SECONDS, (("phase", "student_step"),)): 0.5,
        (ps.NONFINITE_STEPS, ()): 0,
    }
    for (name, extra), want in expected.items():
        assert value(sink, name, **dict(extra)) == want, name
    # Not yet evaluated or checkpointed: those series are absent, not 0.
    for name in (ps.EVAL_LOSS, ps.EVAL_EXACT_MATCH, ps.LAST_CHECKPOINT_STEP, ps.LAST_CHECKPOINT_TIMESTAMP):
        assert value(sink, name) is None, name
    # Every sample of every family carries exactly the job labels (plus term/phase).
    for family in sink.registry.collect():
        for sample in family.samples:
            assert {k: v for k, v in sample.labels.items() if k not in ("term", "phase")} == JOB


def test_eval_and_checkpoint_update_their_series():
    now = [1000.0]
    sink = make_sink(clock=lambda: now[0])
    sink.log(20, TRAIN)
    sink.log(20, {"val/loss": 0.9, "val/exact_match": 0.75})
    now[0] = 1234.5
    sink.checkpoint_saved(20, "/out/checkpoint-20")
    assert (value(sink, ps.EVAL_LOSS), value(sink, ps.EVAL_EXACT_MATCH)) == (0.9, 0.75)
    assert value(sink, ps.LAST_CHECKPOINT_STEP) == 20
    assert value(sink, ps.LAST_CHECKPOINT_TIMESTAMP) == 1234.5
    assert value(sink, ps.START_TIMESTAMP) == 1000.0
    assert value(sink, ps.LOSS, term="total") == 1.5  # an eval-only call leaves the training series alone


def test_sft_only_run_has_no_distill_term():
    sink = make_sink()
    sink.log(1, {k: v for k, v in TRAIN.items() if k != "train/distill_loss"})
    assert value(sink, ps.LOSS, term="student") == 1.0
    assert value(sink, ps.LOSS, term="distill") is None


def test_nonfinite_step_sets_nan_gauges_and_counts_once_per_step():
    sink = make_sink()
    sink.log(1, TRAIN)
    nan = float("nan")
    sink.log(2, {**TRAIN, "train/loss": nan, "train/student_loss": nan, "train/distill_loss": nan})
    sink.log(2, {"val/loss": 0.9})  # more of the same step: not a second non-finite step
    assert math.isnan(value(sink, ps.LOSS, term="total"))
    assert value(sink, ps.NONFINITE_STEPS) == 1
    sink.log(3, {**TRAIN, "train/grad_norm": math.inf})
    assert value(sink, ps.NONFINITE_STEPS) == 2 and value(sink, ps.GRAD_NORM) == math.inf
    sink.log(4, TRAIN)
    assert value(sink, ps.LOSS, term="total") == 1.5 and value(sink, ps.NONFINITE_STEPS) == 2


def test_local_run_has_empty_distilljob_labels(monkeypatch, tmp_path):
    monkeypatch.delenv("KUBEDISTILL_DISTILLJOB_NAME", raising=False)
    monkeypatch.delenv("KUBEDISTILL_DISTILLJOB_NAMESPACE", raising=False)
    config = config_from_dict({"max_steps": 5, "student_pretrain": "s", "teacher_pretrain": "t", "exp_name": "demo",
                               "student": {"data_args": {"file_name": "x"}}})
    assert (config.metrics_port, config.metrics_bind_address) == (0, "127.0.0.1")
    sink = PrometheusSink.from_config(config)
    assert sink.labels == {"distilljob_namespace": "", "distilljob_name": "", "exp_name": "demo"}
    assert value(sink, ps.MAX_STEPS) == 5

    monkeypatch.setenv("KUBEDISTILL_DISTILLJOB_NAME", "qwen")
    monkeypatch.setenv("KUBEDISTILL_DISTILLJOB_NAMESPACE", "ml")
    sink = PrometheusSink.from_config(config)
    assert sink.labels == {"distilljob_namespace": "ml", "distilljob_name": "qwen", "exp_name": "demo"}


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_series_are_served_over_http_until_close():
    sink = make_sink(port=0)  # a free port
    try:
        sink.log(3, {**TRAIN, "train/loss": float("nan")})
        samples = scrape(sink.port)
        labels = tuple(sorted(JOB.items()))
        assert samples[(ps.STEP, labels)] == 3
        assert math.isnan(samples[(ps.LOSS, tuple(sorted({**JOB, "term": "total"}.items())))])
        assert samples[(ps.NONFINITE_STEPS, labels)] == 1
        # Only the trainer's series: a registry of its own, not the process-global one (no python_gc_*, ...).
        assert {name for name, _ in samples} <= {name for name in vars(ps).values() if isinstance(name, str)
                                                 and name.startswith("kubedistill_trainer_")}
    finally:
        sink.close()
    sink.close()  # twice is fine
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", sink.port), timeout=2):
        pass


def test_a_taken_port_fails_at_start():
    first = make_sink(port=0)
    try:
        with pytest.raises(OSError):
            make_sink(port=first.port)
    finally:
        first.close()


def test_close_keeps_serving_the_final_values_for_the_linger_time(monkeypatch):
    sink = make_sink(port=0, linger_seconds=30)
    sink.log(7, TRAIN)
    during_linger = []

    def sleep(seconds):  # instead of waiting: scrape as Prometheus would meanwhile
        during_linger.append((seconds, scrape(sink.port)[(ps.STEP, tuple(sorted(JOB.items())))]))

    monkeypatch.setattr(ps.time, "sleep", sleep)
    sink.close()
    assert during_linger == [(30, 7)]
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", sink.port), timeout=2):
        pass


def test_pipeline_serves_metrics_only_with_metrics_port_and_trains_on_when_the_port_is_taken(monkeypatch, caplog):
    from distill_trainer.pipeline import DistillPipeline

    for name in ("KUBEDISTILL_DISTILLJOB_NAME", "KUBEDISTILL_DISTILLJOB_NAMESPACE"):
        monkeypatch.delenv(name, raising=False)
    base = {"max_steps": 5, "student_pretrain": "s", "teacher_pretrain": "t", "student": {"data_args": {"file_name": "x"}}}
    assert DistillPipeline(config_from_dict(base))._sinks() == []

    taken = make_sink(port=0)
    try:
        config = config_from_dict({**base, "metrics_port": taken.port})
        assert DistillPipeline(config)._sinks() == []
        assert f"cannot serve Prometheus metrics on 127.0.0.1:{taken.port}" in caplog.text
    finally:
        taken.close()
    (sink,) = DistillPipeline(config)._sinks()  # now free
    try:
        assert isinstance(sink, PrometheusSink) and sink.port == taken.port
    finally:
        sink.close()


def test_a_teacher_cache_write_reports_its_shards_records_and_eta():
    sink = make_sink(max_steps=40)  # `kubedistill cache-teacher`: steps are shards
    sink.log(3, {"cache/records_written": 3072.0, "cache/records_per_second": 51.2, "cache/eta_seconds": 740.0,
                 "cache/shards_done": 3.0, "cache/shards": 40.0})
    assert value(sink, "kubedistill_trainer_step") == 3
    assert value(sink, "kubedistill_trainer_max_steps") == 40
    assert value(sink, "kubedistill_trainer_cache_records_written") == 3072
    assert value(sink, "kubedistill_trainer_cache_records_per_second") == 51.2
    assert value(sink, "kubedistill_trainer_cache_eta_seconds") == 740
    assert value(sink, "kubedistill_trainer_loss", term="total") is None  # no training series


def test_on_policy_runs_report_the_sampling_phase_and_the_on_policy_reverse_kl():
    sink = make_sink()
    sink.log(5, {**TRAIN, "time/sample": 1.25})
    sink.log(5, {"val/loss": 0.9, "eval/onpolicy_rkl": 0.042})
    assert value(sink, ps.STEP_PHASE_SECONDS, phase="sample") == 1.25
    assert value(sink, ps.EVAL_ONPOLICY_RKL) == 0.042
