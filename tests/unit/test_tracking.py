"""Tracker: TensorBoard tags, metrics.jsonl records, resume truncation, console output, sinks."""

from __future__ import annotations

import json
import math

import pytest
import torch

from distill_trainer.tracking import Tracker

torch.set_num_threads(1)

PIPELINE_TAGS = [
    "train/loss", "train/distill_loss", "train/student_loss", "train/grad_norm", "student/lr",
    "train/tokens_per_second", "time/teacher_forward", "time/logits_transfer", "time/student_step",
    "val/loss", "val/exact_match",
]


def metrics_for(step: int, offset: float = 0.0) -> dict[str, float]:
    return {tag: step + i / 100 + offset for i, tag in enumerate(PIPELINE_TAGS)}


def read_jsonl(logging_dir) -> list[dict]:
    return [json.loads(line) for line in (logging_dir / "metrics.jsonl").read_text().splitlines()]


def read_scalars(logging_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logging_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


class RecordingSink:
    def __init__(self):
        self.calls = []

    def log(self, step, metrics):
        self.calls.append(("log", step, dict(metrics)))

    def checkpoint_saved(self, step, path):
        self.calls.append(("checkpoint_saved", step, path))

    def close(self):
        self.calls.append(("close",))


def test_tensorboard_events_contain_the_pipeline_tags(tmp_path):
    with Tracker(tmp_path, max_steps=4, console=False) as tracker:
        for step in (2, 4):
            tracker.log(step, metrics_for(step))

    scalars = read_scalars(tmp_path)
    assert set(PIPELINE_TAGS) <= set(scalars)
    for i, tag in enumerate(PIPELINE_TAGS):
        assert [s for s, _ in scalars[tag]] == [2, 4]
        assert [v for _, v in scalars[tag]] == pytest.approx([2 + i / 100, 4 + i / 100])


def test_metrics_jsonl_has_one_record_per_logged_step(tmp_path):
    with Tracker(tmp_path, max_steps=4, console=False) as tracker:
        for step in (1, 2, 3):
            tracker.log(step, {"train/loss": torch.tensor(1.5 / step), "student/lr": 1e-3})

    records = read_jsonl(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert [r["train/loss"] for r in records] == pytest.approx([1.5, 0.75, 0.5])
    assert all(r["student/lr"] == 1e-3 and isinstance(r["time"], float) for r in records)


def test_train_and_eval_metrics_of_one_step_share_one_record(tmp_path, capsys):
    with Tracker(tmp_path, max_steps=4, console=False) as tracker:
        tracker.log(1, {"train/loss": 3.0})
        tracker.log(2, {"train/loss": 2.0})
        tracker.log(2, {"val/loss": 2.5, "val/exact_match": 0.25})
        tracker.log(3, {"train/loss": 1.0})

    records = read_jsonl(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[1]["train/loss"] == 2.0 and records[1]["val/loss"] == 2.5 and records[1]["val/exact_match"] == 0.25
    assert "val/loss 2.5 | val/exact_match 0.25" in capsys.readouterr().out


def test_non_finite_values_are_written_as_json_null(tmp_path):
    with Tracker(tmp_path, max_steps=2, console=False) as tracker:
        tracker.log(1, {"train/loss": math.nan, "train/grad_norm": math.inf})
    line = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in line and "Infinity" not in line
    assert read_jsonl(tmp_path)[0]["train/loss"] is None


def test_reserved_metric_names_are_rejected(tmp_path):
    with Tracker(tmp_path, max_steps=2, console=False) as tracker:
        with pytest.raises(ValueError, match="reserved"):
            tracker.log(1, {"step": 1.0})


def test_resume_drops_records_after_the_resumed_step(tmp_path):
    # The interrupted run logged steps 1..5 (and died mid-write of step 6); its checkpoint was step 3.
    with Tracker(tmp_path, max_steps=6, console=False) as first:
        for step in range(1, 6):
            first.log(step, {"train/loss": float(step)})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "train/lo')

    with Tracker(tmp_path, max_steps=6, start_step=3, console=False) as resumed:
        for step in range(4, 7):
            resumed.log(step, {"train/loss": step + 0.5})

    records = read_jsonl(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r["train/loss"] for r in records] == [1.0, 2.0, 3.0, 4.5, 5.5, 6.5]
    assert not list(tmp_path.glob(".metrics.jsonl.tmp-*"))
    # TensorBoard hides the interrupted run's steps 4..5 as well.
    assert read_scalars(tmp_path)["train/loss"] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.5), (5, 5.5), (6, 6.5)]


def test_close_is_idempotent_and_closes_sinks_once(tmp_path):
    sink = RecordingSink()
    tracker = Tracker(tmp_path, max_steps=2, console=False, sinks=[sink])
    tracker.log(1, {"train/loss": 1.0})
    tracker.close()
    tracker.close()
    assert sink.calls.count(("close",)) == 1
    with pytest.raises(RuntimeError, match="after close"):
        tracker.log(2, {"train/loss": 1.0})


def test_sinks_receive_metrics_and_checkpoints(tmp_path):
    sink = RecordingSink()
    with Tracker(tmp_path, max_steps=10, console=False, sinks=[sink]) as tracker:
        tracker.log(5, {"train/loss": 0.25})
        tracker.checkpoint_saved(5, tmp_path / "checkpoint-5")
    assert sink.calls == [
        ("log", 5, {"train/loss": 0.25}),
        ("checkpoint_saved", 5, str(tmp_path / "checkpoint-5")),
        ("close",),
    ]


def test_a_failing_sink_does_not_stop_training(tmp_path, caplog):
    class BrokenSink(RecordingSink):
        def log(self, step, metrics):
            raise ConnectionError("API server unreachable")

    healthy = RecordingSink()
    with Tracker(tmp_path, max_steps=10, console=False, sinks=[BrokenSink(), healthy]) as tracker:
        tracker.log(1, {"train/loss": 1.0})
        tracker.log(2, {"train/loss": 0.5})
    assert [c[1] for c in healthy.calls if c[0] == "log"] == [1, 2]
    assert [r["step"] for r in read_jsonl(tmp_path)] == [1, 2]
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and warnings[0].exc_info  # the traceback once, not once per step


def test_without_a_terminal_each_log_prints_one_plain_line(tmp_path, capsys):
    # Under pytest stderr is not a TTY: no progress bar redraws, one readable line per log call.
    with Tracker(tmp_path, max_steps=100, exp_name="tiny", sinks=()) as tracker:
        for step in range(1, 11):
            tracker.advance(step)
        tracker.log(10, {"train/loss": 1.23456, "train/tokens_per_second": 812.4})
        tracker.checkpoint_saved(10, "out/checkpoint-10")
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("tiny step 10/100 (10%) loss 1.2346 | 812 tok/s | elapsed ")
    assert "ETA " in lines[0]
    assert lines[1] == "tiny step 10: saved checkpoint out/checkpoint-10"
    assert err == ""


def test_mfu_is_shown_beside_the_throughput_only_when_logged(tmp_path, capsys):
    with Tracker(tmp_path, max_steps=100, exp_name="gpu", sinks=()) as tracker:
        tracker.log(1, {"train/loss": 1.0, "train/tokens_per_second": 812.4})
        tracker.log(2, {"train/loss": 1.0, "train/tokens_per_second": 900.0, "train/mfu": 0.4123})
    first, second = capsys.readouterr().out.splitlines()
    assert "| 812 tok/s | elapsed " in first and "MFU" not in first
    assert "| 900 tok/s, MFU 41.2% | elapsed " in second
    assert read_jsonl(tmp_path)[-1]["train/mfu"] == 0.4123


def test_a_kd_run_shows_the_students_cross_entropy_beside_the_mixed_loss(tmp_path, capsys):
    with Tracker(tmp_path, max_steps=100, exp_name="kd", sinks=()) as tracker:
        tracker.log(3, {"train/loss": 2.6, "train/student_loss": 5.214, "train/distill_loss": 0.07})
        tracker.log(4, {"train/loss": 5.1, "train/student_loss": 5.1})  # SFT-like record: nothing to add
    first, second = capsys.readouterr().out.splitlines()
    assert first.startswith("kd step 3/100 (3%) loss 2.6000 (student CE 5.2140) | elapsed ")
    assert "student CE 5.2140" in second  # the last KD figure stays until the next one


def test_on_a_terminal_the_progress_bar_shows_step_and_loss(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("sys.stderr.isatty", lambda: True)
    with Tracker(tmp_path, max_steps=20, start_step=5, exp_name="tiny") as tracker:
        tracker.advance(6)
        tracker.log(6, {"train/loss": 0.5})
    out, err = capsys.readouterr()
    assert out == ""
    assert "6/20" in err and "loss=0.5000" in err


def test_a_run_that_samples_completions_shows_its_time_split(tmp_path, capsys):
    with Tracker(tmp_path, max_steps=100, exp_name="tiny", console=True) as tracker:
        tracker.log(10, {"train/loss": 1.0, "train/tokens_per_second": 812.0, "time/teacher_forward": 0.02,
                         "time/logits_transfer": 0.001, "time/student_step": 0.03})
        tracker.log(11, {"train/loss": 1.0, "train/tokens_per_second": 812.0, "time/sample": 0.081,
                         "time/teacher_forward": 0.02, "time/logits_transfer": 0.001, "time/student_step": 0.03})
    first, second = capsys.readouterr().out.splitlines()
    assert "time:" not in first
    assert "| 812 tok/s | time: sample 0.08s, teacher 0.02s, transfer 0.00s, student 0.03s | elapsed " in second
