"""Prometheus metrics of one training run, served over HTTP by the driver: a ``MetricsSink`` of ``tracking.Tracker``.

On when ``metrics_port`` > 0 (off by default for local runs; under a DistillJob the operator sets port 9108 on the
Ray head, see ``distill_operator.render``). Each sink has its own ``CollectorRegistry`` (not the process-global
one), so two runs in one process, or the tests, never share series.

Every series carries ``distilljob_namespace``, ``distilljob_name`` (empty for a local run) and ``exp_name``:

    kubedistill_trainer_step                              last logged optimizer step
    kubedistill_trainer_max_steps                         max_steps of the run
    kubedistill_trainer_loss{term="total"|"distill"|"student"}
                                                          total loss, KD term, student cross-entropy (distill is
                                                          absent for SFT-only runs); NaN for a non-finite step
    kubedistill_trainer_learning_rate                     student learning rate
    kubedistill_trainer_grad_norm                         gradient norm before clipping
    kubedistill_trainer_tokens_per_second                 input tokens per wall-clock second of the step
    kubedistill_trainer_mfu                               model FLOPs utilization of the step, 0-1 (only with a known
                                                          device peak: device_peak_tflops; see flops.py)
    kubedistill_trainer_step_phase_seconds{phase="teacher_forward"|"logits_transfer"|"student_step"|"sample"}
                                                          seconds of the last logged step in each phase (sample:
                                                          sampling completions, on-policy distillation / seq_kd)
    kubedistill_trainer_eval_loss                         loss on the eval file (after the first evaluation)
    kubedistill_trainer_eval_exact_match                  greedy exact match (with eval_exact_match)
    kubedistill_trainer_eval_onpolicy_reverse_kl          eval/onpolicy_rkl: per-token KL(student ‖ teacher) on the
                                                          student's greedy completions (with eval_onpolicy_rkl)
    kubedistill_trainer_last_checkpoint_step              step of the newest checkpoint this run wrote
    kubedistill_trainer_last_checkpoint_timestamp_seconds unix time it was committed (age: time() - x)
    kubedistill_trainer_start_timestamp_seconds           unix time the run's metrics started
    kubedistill_trainer_nonfinite_steps_total             counter: steps whose loss or grad norm was NaN/inf

`kubedistill cache-teacher` serves the same endpoint with step/max_steps counting shards, and:

    kubedistill_trainer_cache_records_written             records whose targets this run wrote
    kubedistill_trainer_cache_records_per_second          records per second so far
    kubedistill_trainer_cache_eta_seconds                 seconds left at that pace

A gauge appears once its value was first logged (the checkpoint gauges after the run's first checkpoint); the
counter is there from the start at 0. The endpoint stays up ``linger_seconds`` after the run ends (finished or
failed), so that the last scrape sees the final values, e.g. the NaN of a run stopped by ``on_nonfinite_loss``.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from . import k8s_progress, shared_names

log = logging.getLogger(__name__)

# The names dashboards and alerts are written against (charts/kubedistill/), from the shared module.
STEP = shared_names.TRAINER_STEP
MAX_STEPS = shared_names.TRAINER_MAX_STEPS
LOSS = shared_names.TRAINER_LOSS
LEARNING_RATE = shared_names.TRAINER_LEARNING_RATE
GRAD_NORM = shared_names.TRAINER_GRAD_NORM
TOKENS_PER_SECOND = shared_names.TRAINER_TOKENS_PER_SECOND
MFU = shared_names.TRAINER_MFU
STEP_PHASE_SECONDS = shared_names.TRAINER_STEP_PHASE_SECONDS
EVAL_LOSS = shared_names.TRAINER_EVAL_LOSS
EVAL_EXACT_MATCH = shared_names.TRAINER_EVAL_EXACT_MATCH
EVAL_ONPOLICY_RKL = shared_names.TRAINER_EVAL_ONPOLICY_RKL
LAST_CHECKPOINT_STEP = shared_names.TRAINER_LAST_CHECKPOINT_STEP
LAST_CHECKPOINT_TIMESTAMP = shared_names.TRAINER_LAST_CHECKPOINT_TIMESTAMP
START_TIMESTAMP = shared_names.TRAINER_START_TIMESTAMP
NONFINITE_STEPS = shared_names.TRAINER_NONFINITE_STEPS
LABELS = shared_names.METRIC_LABELS

_HELP = {
    STEP: "Last logged optimizer step.",
    MAX_STEPS: "Optimizer steps the run trains (max_steps).",
    LOSS: "Training loss of the last logged step: total, distill (KD term), student (cross-entropy); NaN if not finite.",
    LEARNING_RATE: "Learning rate of the student's optimizer.",
    GRAD_NORM: "Gradient norm before clipping of the last logged step.",
    TOKENS_PER_SECOND: "Input tokens per wall-clock second of the last logged step.",
    MFU: "Model FLOPs utilization of the last logged step (0-1): student 6N + teacher 2N per token, plus attention, "
    "over the step time and the devices' peak (device_peak_tflops).",
    STEP_PHASE_SECONDS: "Seconds of the last logged step spent in teacher forward, logits transfer, student step, "
    "and sampling completions (on-policy distillation, seq_kd).",
    EVAL_LOSS: "Loss on the eval file at the last evaluation.",
    shared_names.TRAINER_CACHE_RECORDS_WRITTEN: "kubedistill cache-teacher: records whose targets this run wrote.",
    shared_names.TRAINER_CACHE_RECORDS_PER_SECOND: "kubedistill cache-teacher: records written per second so far.",
    shared_names.TRAINER_CACHE_ETA_SECONDS: "kubedistill cache-teacher: seconds left at the pace so far.",
    EVAL_EXACT_MATCH: "Greedy exact-match accuracy on the eval file at the last evaluation.",
    EVAL_ONPOLICY_RKL: "Per-token reverse KL(student || teacher) on the student's greedy completions of the eval "
    "prompts at the last evaluation.",
    LAST_CHECKPOINT_STEP: "Step of the newest checkpoint this run committed.",
    LAST_CHECKPOINT_TIMESTAMP: "Unix time the newest checkpoint of this run was committed.",
    START_TIMESTAMP: "Unix time this run (attempt) started exporting metrics.",
    NONFINITE_STEPS: "Optimizer steps whose loss or gradient norm was NaN/inf (never applied).",
}

# Tracker tag -> (gauge, its extra label). The tags are those tracking.py documents.
_TAGS: dict[str, tuple[str, tuple[str, str] | None]] = {
    "train/loss": (LOSS, ("term", "total")),
    "train/distill_loss": (LOSS, ("term", "distill")),
    "train/student_loss": (LOSS, ("term", "student")),
    "student/lr": (LEARNING_RATE, None),
    "train/grad_norm": (GRAD_NORM, None),
    "train/tokens_per_second": (TOKENS_PER_SECOND, None),
    "train/mfu": (MFU, None),
    "time/teacher_forward": (STEP_PHASE_SECONDS, ("phase", "teacher_forward")),
    "time/logits_transfer": (STEP_PHASE_SECONDS, ("phase", "logits_transfer")),
    "time/student_step": (STEP_PHASE_SECONDS, ("phase", "student_step")),
    "time/sample": (STEP_PHASE_SECONDS, ("phase", "sample")),
    "val/loss": (EVAL_LOSS, None),
    "val/exact_match": (EVAL_EXACT_MATCH, None),
    "eval/onpolicy_rkl": (EVAL_ONPOLICY_RKL, None),
    "cache/records_written": (shared_names.TRAINER_CACHE_RECORDS_WRITTEN, None),
    "cache/records_per_second": (shared_names.TRAINER_CACHE_RECORDS_PER_SECOND, None),
    "cache/eta_seconds": (shared_names.TRAINER_CACHE_ETA_SECONDS, None),
}
# A step counts as non-finite when one of these is NaN/inf (what the pipeline refuses to apply).
_NONFINITE_TAGS = ("train/loss", "train/distill_loss", "train/student_loss", "train/grad_norm")


class PrometheusSink:
    """Keeps the latest value of each series and serves them on ``bind_address:port`` (see the module docstring).

    ``port=None`` serves nothing (the registry alone, e.g. for tests); ``port=0`` takes a free port, which
    ``self.port`` then holds. Starting the server raises ``OSError`` when the port is taken.
    """

    def __init__(
        self,
        *,
        max_steps: int,
        exp_name: str,
        port: int | None,
        bind_address: str = "127.0.0.1",
        job_namespace: str = "",
        job_name: str = "",
        linger_seconds: float = 0.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.labels = {"distilljob_namespace": job_namespace, "distilljob_name": job_name, "exp_name": exp_name}
        self.linger_seconds = linger_seconds
        self._clock = clock
        self._lock = threading.Lock()
        # (metric, extra label or None) -> value
        self._gauges: dict[tuple[str, tuple[str, str] | None], float] = {
            (MAX_STEPS, None): float(max_steps),
            (START_TIMESTAMP, None): clock(),
        }
        self._nonfinite_steps = 0
        self._last_nonfinite_step: int | None = None
        self.registry = CollectorRegistry()
        self.registry.register(self)
        self.port: int | None = None
        self._server = None
        if port is not None:
            self._server, _ = start_http_server(port, addr=bind_address, registry=self.registry)
            self.port = self._server.server_port
            log.info("serving Prometheus metrics on http://%s:%d/metrics", bind_address, self.port)

    @classmethod
    def from_config(cls, config, **kwargs) -> "PrometheusSink":
        """The sink a run's ``DistillConfig`` asks for, labelled with the DistillJob named in the environment
        (``metrics_port`` 0: not served)."""
        kwargs.setdefault("max_steps", config.max_steps)
        return cls(
            exp_name=config.exp_name,
            port=config.metrics_port or None,
            bind_address=config.metrics_bind_address,
            job_namespace=os.environ.get(k8s_progress.ENV_NAMESPACE, ""),
            job_name=os.environ.get(k8s_progress.ENV_NAME, ""),
            linger_seconds=config.metrics_linger_seconds,
            **kwargs,
        )

    # --- the MetricsSink protocol --------------------------------------------------------------------------
    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        with self._lock:
            self._gauges[(STEP, None)] = float(step)
            for tag, value in metrics.items():
                if tag in _TAGS:
                    self._gauges[_TAGS[tag]] = float(value)  # NaN stays NaN: `x != x` finds it
            bad = any(tag in metrics and not math.isfinite(float(metrics[tag])) for tag in _NONFINITE_TAGS)
            if bad and step != self._last_nonfinite_step:
                self._nonfinite_steps += 1
                self._last_nonfinite_step = step

    def checkpoint_saved(self, step: int, path: str) -> None:
        with self._lock:
            self._gauges[(LAST_CHECKPOINT_STEP, None)] = float(step)
            self._gauges[(LAST_CHECKPOINT_TIMESTAMP, None)] = self._clock()

    def close(self) -> None:
        """Stop serving, after ``linger_seconds`` (so a scrape sees the final values). Safe to call twice."""
        server, self._server = self._server, None
        if server is None:
            return
        if self.linger_seconds > 0:
            log.info("serving the final metrics for %g s more (metrics_linger_seconds)", self.linger_seconds)
            time.sleep(self.linger_seconds)
        server.shutdown()
        server.server_close()

    # --- the prometheus_client collector protocol -----------------------------------------------------------
    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        with self._lock:
            gauges, nonfinite = dict(self._gauges), self._nonfinite_steps
        base = list(self.labels.values())
        families: dict[str, GaugeMetricFamily] = {}
        for (name, extra), value in sorted(gauges.items(), key=lambda item: (item[0][0], item[0][1] or ("", ""))):
            if name not in families:
                names = list(LABELS) + ([extra[0]] if extra else [])
                families[name] = GaugeMetricFamily(name, _HELP[name], labels=names)
            families[name].add_metric(base + ([extra[1]] if extra else []), value)
        yield from families.values()
        counter = CounterMetricFamily(NONFINITE_STEPS, _HELP[NONFINITE_STEPS], labels=list(LABELS))
        counter.add_metric(base, nonfinite)
        yield counter
