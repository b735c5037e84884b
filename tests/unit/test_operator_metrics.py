"""The operator's Prometheus metrics follow the naming rules and keep labels bounded."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY, generate_latest

from distill_operator import metrics


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
            assert set(sample.labels) <= {"handler", "launcher", "condition", "le"}
    assert 'kubedistill_distilljobs{condition="Created"}' in text
    assert _value("kubedistill_distilljobs", condition="Created") == created + 2
    assert _value("kubedistill_distilljobs", condition="Running") == running + 1
    assert _value("kubedistill_reconcile_errors_total", handler="timer") == errors + 1
    metrics.forget("ns", "a")
    metrics.forget("ns", "b")
    assert _value("kubedistill_distilljobs", condition="Created") == created
