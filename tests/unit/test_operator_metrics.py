"""The operator's Prometheus metrics follow the naming rules and keep labels bounded."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY, generate_latest

from distill_operator import metrics
from distill_operator.resources import CONDITION_TYPES


def _value(name, **labels):
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_names_units_and_labels():
    # The registry is process-wide and other tests in this process may have reconciled jobs already:
    # compare against the values before this test, not against absolute numbers.
    created = _value("kubedistill_distilljobs", condition="Created")
    running = _value("kubedistill_distilljobs", condition="Running")
    errors = _value("kubedistill_reconcile_errors_total", handler="timer")
    with metrics.track("timer"):
        pass
    with pytest.raises(RuntimeError), metrics.track("timer"):
        raise RuntimeError("boom")
    metrics.record_conditions("ns", "a", [{"type": "Running", "status": "True"}, {"type": "Created", "status": "True"}])
    metrics.record_conditions("ns", "b", [{"type": "Created", "status": "True"}])
    text = generate_latest(REGISTRY).decode()
    families = {m.name: m for m in REGISTRY.collect() if m.name.startswith("kubedistill_")}
    assert {"kubedistill_reconciles", "kubedistill_reconcile_errors", "kubedistill_reconcile_duration_seconds",
            "kubedistill_rayjobs_created", "kubedistill_distilljobs"} <= set(families)
    for family in families.values():
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples)
        for sample in family.samples:
            if family.name == "kubedistill_distilljob_condition":  # the one family that names jobs
                assert set(sample.labels) == {"distilljob_namespace", "distilljob_name", "condition"}
            else:
                assert set(sample.labels) <= {"handler", "launcher", "condition", "le"}
    assert 'kubedistill_distilljobs{condition="Created"}' in text
    assert _value("kubedistill_distilljobs", condition="Created") == created + 2
    assert _value("kubedistill_distilljobs", condition="Running") == running + 1
    assert _value("kubedistill_reconcile_errors_total", handler="timer") == errors + 1
    metrics.forget("ns", "a")
    metrics.forget("ns", "b")
    assert _value("kubedistill_distilljobs", condition="Created") == created


def test_each_job_exports_its_conditions_until_forgotten():
    def job(name):
        return {c: _value("kubedistill_distilljob_condition", distilljob_namespace="team", distilljob_name=name,
                          condition=c) for c in ("Created", "Running", "Failed")}

    metrics.record_conditions("team", "qwen", [{"type": "Created", "status": "True"},
                                               {"type": "Running", "status": "True"}])
    metrics.record_conditions("team", "llama", [{"type": "Created", "status": "True"},
                                                {"type": "Running", "status": "False"},
                                                {"type": "Failed", "status": "True"}])
    assert job("qwen") == {"Created": 1.0, "Running": 1.0, "Failed": 0.0}
    assert job("llama") == {"Created": 1.0, "Running": 0.0, "Failed": 1.0}
    # Every condition type per job, 0 or 1: an alert or a panel can select `== 1`.
    samples = [s for m in REGISTRY.collect() if m.name == "kubedistill_distilljob_condition" for s in m.samples
               if s.labels["distilljob_name"] == "qwen"]
    assert len(samples) == len(CONDITION_TYPES) and {s.value for s in samples} == {0.0, 1.0}
    metrics.forget("team", "qwen")
    metrics.forget("team", "llama")
    assert REGISTRY.get_sample_value("kubedistill_distilljob_condition", {
        "distilljob_namespace": "team", "distilljob_name": "qwen", "condition": "Created"}) is None


def test_reconcile_errors_are_exported_at_zero_before_the_first_error():
    # rate() of a counter that does not exist yet is no data: dashboards and alerts need the 0.
    with metrics.track("zero-errors-probe"):
        pass
    assert REGISTRY.get_sample_value("kubedistill_reconcile_errors_total", {"handler": "zero-errors-probe"}) == 0.0
