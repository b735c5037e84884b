"""Training metrics: console progress, TensorBoard scalars, metrics.jsonl, and pluggable sinks.

One `Tracker` per run (on the driver). Every `log(step, metrics)` call goes to:
- TensorBoard event files in `logging_dir` (one scalar per key; the key is the tag),
- `<logging_dir>/metrics.jsonl`: one JSON object per logged step, `{"step": ..., <key>: <value>, ..., "time": <unix>}`
  (several calls for one step, e.g. train then eval, merge into its one line), flushed at once so
  `tail -f` and a crashed run both see every logged step; non-finite values are written as `null`
  (JSON has no NaN),
- every extra `MetricsSink`: the Prometheus exporter (`prometheus_sink.py`, on with `metrics_port`), the
  DistillJob progress reporter (`k8s_progress.py`, under a DistillJob), ...

Tags the pipeline logs:
    train/loss               the loss trained on: (1 - distill_loss_weight) * CE + distill_loss_weight * KD
                             (in a KD run not comparable with an SFT run's: compare train/student_loss, val/loss)
    train/distill_loss       KD term (the kd_objective), per label token
    train/student_loss       the student's full-vocabulary cross-entropy against the labels, per label token
                             (always computed, also with distill_loss_weight 1: the SFT-comparable figure)
    train/grad_norm          gradient norm before clipping
    student/lr               learning rate of the student's optimizer
    train/tokens_per_second  input tokens of the step's batches per wall-clock second of the step
    train/mfu                model FLOPs utilization of the step (0-1; only when the device's peak FLOP/s is known:
                             device_peak_tflops or KUBEDISTILL_PEAK_TFLOPS; see flops.py)
    time/teacher_forward     seconds in teacher forward (+ temperature, top-k) per step
    time/logits_transfer     seconds handing the logits from teacher to student per step
    time/student_step        seconds in student forward, backward and optimizer step per step
    time/sample              seconds sampling completions per step (on-policy distillation, seq_kd; the slowest
                             replica's), also shown on the console line: `| time: sample 0.08s, teacher 0.02s,
                             transfer 0.00s, student 0.03s |`
    eval/onpolicy_rkl        the teacher's per-token reverse KL on the student's greedy completions of the eval
                             prompts (eval_onpolicy_rkl)
    val/loss                 loss on the eval file
    val/exact_match          greedy exact-match accuracy on the eval file (the demo task only)

Console: on an interactive terminal a tqdm bar (step/max_steps, loss, ETA); otherwise (CI logs, Ray
job logs, `console=False`) no bar, which would redraw into the log as thousands of lines, but one
plain line per `log` call: `distill step 10/100 (10%) loss 1.2340 | 812 tok/s | elapsed 0:00:12 | ETA 0:01:48`
(`| 812 tok/s, MFU 41.2% |` when train/mfu is logged)
(plus `| val/loss 1.1 | ...` when the call carries eval metrics). In a KD run (`train/distill_loss` logged) the
student's cross-entropy follows the mixed loss: `loss 2.6010 (student CE 5.2140)`, and the bar shows both.

Resuming (`start_step > 0`): TensorBoard hides events after `start_step` written by the interrupted
run (`purge_step`), and metrics.jsonl is rewritten without the lines after `start_step`, so each
step appears once and the file reads as one run.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import pathlib
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


class MetricsSink(Protocol):
    """Somewhere else metrics go (Prometheus, the DistillJob status). Errors it raises are logged, not fatal."""

    def log(self, step: int, metrics: Mapping[str, float]) -> None: ...

    def checkpoint_saved(self, step: int, path: str) -> None: ...

    def close(self) -> None: ...


class Tracker:
    """Fan-out of one run's metrics to console, TensorBoard, metrics.jsonl and sinks."""

    def __init__(
        self,
        logging_dir: str | os.PathLike,
        *,
        max_steps: int,
        start_step: int = 0,
        exp_name: str = "distill",
        console: bool = True,
        sinks: Sequence[MetricsSink] = (),
    ) -> None:
        self.logging_dir = pathlib.Path(logging_dir)
        self.logging_dir.mkdir(parents=True, exist_ok=True)
        self.max_steps = max_steps
        self.start_step = start_step
        self.exp_name = exp_name
        self._sinks = list(sinks)
        self._failed_sinks: set[int] = set()
        self._closed = False
        self._step = start_step
        self._last_loss: float | None = None
        self._last_student_ce: float | None = None  # KD runs: train/student_loss, shown beside the mixed loss
        self._last_tokens_per_second: float | None = None
        self._last_mfu: float | None = None
        self._last_split: str | None = None  # a step's time split, shown when completions are sampled
        # ETA from this run's own pace: steps done before a resume took no time in this process.
        self._start_time = time.monotonic()

        self.metrics_path = self.logging_dir / METRICS_FILE
        _drop_lines_after(self.metrics_path, start_step)
        # Binary append: tell() offsets are exact, which _write_record needs to rewrite the last line.
        self._jsonl = open(self.metrics_path, "ab")
        self._last_record: dict | None = None
        self._last_record_offset = 0
        # purge_step: TensorBoard hides the interrupted run's events from this step on. flush_secs is
        # short so a crash loses little and a live TensorBoard keeps up.
        self._writer = SummaryWriter(log_dir=str(self.logging_dir), purge_step=start_step + 1, flush_secs=10)

        # tqdm writes to stderr, so that is the stream whose TTY-ness decides bar vs. plain lines.
        self._interactive = console and sys.stderr.isatty()
        self._bar = tqdm(
            total=max_steps,
            initial=start_step,
            desc=exp_name,
            unit="step",
            dynamic_ncols=True,
            disable=not self._interactive,
        )

    # ------------------------------------------------------------------------------------ logging

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Record `metrics` (tag -> value) at `step` everywhere.

        Several calls for the same step (train metrics, then eval metrics) are merged into that step's
        one metrics.jsonl record.
        """
        if self._closed:
            raise RuntimeError("Tracker.log called after close()")
        reserved = {"step", "time"} & set(metrics)
        if reserved:
            raise ValueError(f"metric names {sorted(reserved)} are reserved for the metrics.jsonl record")
        values = {key: float(value) for key, value in metrics.items()}  # also accepts 0-d tensors

        for tag, value in values.items():
            self._writer.add_scalar(tag, value, global_step=step)
        self._write_record(step, values)
        for sink in self._sinks:
            self._call_sink(sink, "log", step, values)

        if "train/loss" in values:
            self._last_loss = values["train/loss"]
        if "train/distill_loss" in values and "train/student_loss" in values:
            self._last_student_ce = values["train/student_loss"]
        if "train/tokens_per_second" in values:
            self._last_tokens_per_second = values["train/tokens_per_second"]
        if "train/mfu" in values:
            self._last_mfu = values["train/mfu"]
        if "time/sample" in values:
            self._last_split = "time: " + ", ".join(
                f"{name} {values.get(tag, 0.0):.2f}s" for name, tag in (
                    ("sample", "time/sample"), ("teacher", "time/teacher_forward"),
                    ("transfer", "time/logits_transfer"), ("student", "time/student_step")))
        evaluation = " | ".join(f"{k} {v:.4g}" for k, v in values.items() if k.startswith("val/"))
        if self._interactive:
            if self._last_loss is not None:
                shown = {"loss": f"{self._last_loss:.4f}"}
                if self._last_student_ce is not None:
                    shown["student_CE"] = f"{self._last_student_ce:.4f}"
                if self._last_mfu is not None:
                    shown["MFU"] = f"{100 * self._last_mfu:.1f}%"
                self._bar.set_postfix(shown)
            if evaluation:
                self._bar.write(f"{self.exp_name} step {step}: {evaluation}")
            self.advance(step)
        else:
            print(self._status_line(step) + (f" | {evaluation}" if evaluation else ""), flush=True)

    def advance(self, step: int) -> None:
        """Move the console progress to `step` (call once per optimizer step)."""
        if self._closed:
            return
        self._step = step
        if self._interactive and step > self._bar.n:
            self._bar.update(step - self._bar.n)

    def checkpoint_saved(self, step: int, path: str | os.PathLike) -> None:
        """Tell the console and the sinks that checkpoint `path` for `step` is committed."""
        if self._closed:
            raise RuntimeError("Tracker.checkpoint_saved called after close()")
        message = f"{self.exp_name} step {step}: saved checkpoint {path}"
        if self._interactive:
            self._bar.write(message)
        else:
            print(message, flush=True)
        for sink in self._sinks:
            self._call_sink(sink, "checkpoint_saved", step, str(path))

    def close(self) -> None:
        """Flush and close everything. Safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        self._bar.close()
        self._writer.close()  # flushes pending events
        self._jsonl.close()
        for sink in self._sinks:
            self._call_sink(sink, "close")

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # ---------------------------------------------------------------------------------- internals

    def _write_record(self, step: int, values: dict[str, float]) -> None:
        finite = {key: (value if math.isfinite(value) else None) for key, value in values.items()}
        if self._last_record is not None and self._last_record["step"] == step:
            # Same step again: replace the last line by the merged record. A crash between truncate
            # and write leaves a torn last line, which a resume drops like any torn line.
            record = {**self._last_record, **finite}
            self._jsonl.truncate(self._last_record_offset)
        else:
            record = {"step": step, **finite}
            self._last_record_offset = self._jsonl.seek(0, os.SEEK_END)
        self._jsonl.write((json.dumps({**record, "time": time.time()}, allow_nan=False) + "\n").encode())
        self._jsonl.flush()
        self._last_record = record

    def _status_line(self, step: int) -> str:
        parts = [f"{self.exp_name} step {step}/{self.max_steps} ({100 * step / max(self.max_steps, 1):.0f}%)"]
        if self._last_loss is not None:
            parts[0] += f" loss {self._last_loss:.4f}"
            if self._last_student_ce is not None:
                parts[0] += f" (student CE {self._last_student_ce:.4f})"
        if self._last_tokens_per_second is not None:
            parts.append(f"{self._last_tokens_per_second:.0f} tok/s"
                         + (f", MFU {100 * self._last_mfu:.1f}%" if self._last_mfu is not None else ""))
        if self._last_split is not None:
            parts.append(self._last_split)
        elapsed = time.monotonic() - self._start_time
        parts.append(f"elapsed {_hms(elapsed)}")
        done = step - self.start_step
        if done > 0 and step < self.max_steps:
            parts.append(f"ETA {_hms(elapsed / done * (self.max_steps - step))}")
        return " | ".join(parts)

    def _call_sink(self, sink: MetricsSink, method: str, *args: Any) -> None:
        # A sink is a side channel (an API server that is briefly down, a port already taken): losing
        # one update must not stop hours of training. The first failure per sink is logged with its
        # traceback, later ones quietly, so a dead sink does not flood the log.
        try:
            getattr(sink, method)(*args)
        except Exception:
            first = id(sink) not in self._failed_sinks
            self._failed_sinks.add(id(sink))
            logger.log(
                logging.WARNING if first else logging.DEBUG,
                "metrics sink %s.%s failed%s", type(sink).__name__, method,
                "" if first else " again", exc_info=first,
            )


def _hms(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


def _drop_lines_after(path: pathlib.Path, start_step: int) -> None:
    """Rewrite metrics.jsonl keeping only records with step <= start_step.

    Lines after `start_step` belong to the interrupted run and will be logged again; an unparsable
    line is the torn last write of a killed process. Rewritten via temp file + rename, so a crash
    here leaves either the old or the new file, never a truncated one.
    """
    if not path.exists():
        return
    kept, dropped = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
                keep = int(record["step"]) <= start_step
            except (ValueError, KeyError, TypeError):
                keep = False
            if keep:
                kept.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    if not dropped:
        return
    logger.info("%s: dropping %d record(s) after step %d from an earlier run", path, dropped, start_step)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
