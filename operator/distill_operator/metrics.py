"""Prometheus metrics of the operator (served on --metrics-port).

Names carry the ``kubedistill_`` prefix and base units (seconds); counters end in ``_total``. Labels are
bounded: ``handler`` (a few fixed names), ``launcher`` (KubeRay, RayAddress), ``condition`` (the condition types).
One family names jobs, ``kubedistill_distilljob_condition{distilljob_namespace, distilljob_name, condition}``
(as kube-state-metrics does for pods), so that an alert can say which job failed: one series per condition type
and DistillJob the operator knows, dropped when the job is deleted. Its job labels are the trainer's
(``kubedistill_trainer_*``), so the two join ``on (distilljob_namespace, distilljob_name)``.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Iterator, Mapping

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

from distill_operator.resources import CONDITION_TYPES

RECONCILES = Counter("kubedistill_reconciles_total", "Reconciles of DistillJobs, by trigger.", ["handler"])
RECONCILE_ERRORS = Counter(
    "kubedistill_reconcile_errors_total", "Reconciles that raised an error, by trigger.", ["handler"]
)
RECONCILE_DURATION = Histogram(
    "kubedistill_reconcile_duration_seconds",
    "Wall time of one reconcile, by trigger.",
    ["handler"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
RAYJOBS_CREATED = Counter(
    "kubedistill_rayjobs_created_total", "Attempts launched (RayJobs or Ray Jobs API submissions).", ["launcher"]
)
RESTARTS = Counter("kubedistill_distilljob_restarts_total", "Retries of DistillJobs after a failed attempt.")
LEADER = Gauge("kubedistill_operator_leader", "1 on the replica holding the leader Lease (or without leader election).")

_conditions_lock = threading.Lock()
_true_conditions: dict[tuple[str, str], frozenset[str]] = {}


def record_conditions(namespace: str, name: str, conditions: list[Mapping[str, object]]) -> None:
    """Remember which condition types are True for one job (for kubedistill_distilljobs)."""
    true = frozenset(str(c.get("type")) for c in conditions if c.get("status") == "True")
    with _conditions_lock:
        _true_conditions[(namespace, name)] = true


def forget(namespace: str, name: str) -> None:
    with _conditions_lock:
        _true_conditions.pop((namespace, name), None)


class _JobsByCondition:
    """kubedistill_distilljobs{condition}: DistillJobs whose condition of that type is True; and per job,
    kubedistill_distilljob_condition{distilljob_namespace, distilljob_name, condition}: 1 while True, else 0."""

    def collect(self):  # noqa: D401 - prometheus collector protocol
        family = GaugeMetricFamily(
            "kubedistill_distilljobs", "DistillJobs whose condition of this type is True.", labels=["condition"]
        )
        per_job = GaugeMetricFamily(
            "kubedistill_distilljob_condition",
            "1 while this condition of the DistillJob is True, else 0.",
            labels=["distilljob_namespace", "distilljob_name", "condition"],
        )
        with _conditions_lock:
            jobs = sorted(_true_conditions.items())
        for condition in CONDITION_TYPES:
            family.add_metric([condition], sum(condition in true for _, true in jobs))
        for (namespace, name), true in jobs:
            for condition in CONDITION_TYPES:
                per_job.add_metric([namespace, name, condition], float(condition in true))
        yield family
        yield per_job


def register(registry: CollectorRegistry = REGISTRY) -> None:
    registry.register(_JobsByCondition())


register()


@contextmanager
def track(handler: str) -> Iterator[None]:
    """Count one reconcile and its duration; count it as an error when it raises."""
    RECONCILES.labels(handler=handler).inc()
    errors = RECONCILE_ERRORS.labels(handler=handler)  # exported from the first reconcile on, at 0 until one fails
    start = time.perf_counter()
    try:
        yield
    except Exception:
        errors.inc()
        raise
    finally:
        RECONCILE_DURATION.labels(handler=handler).observe(time.perf_counter() - start)
