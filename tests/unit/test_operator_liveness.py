"""OperatorRuntime.health(): /healthz tells whether the API server answers and the DistillJob watch delivers."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import kopf
import pytest

from distill_operator import handlers, runtime
from distill_operator.__main__ import build_parser
from distill_operator.runtime import OperatorRuntime


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(runtime, "time", SimpleNamespace(monotonic=fake.monotonic))
    return fake


def _job(name: str, version: str, namespace: str = "ns") -> dict:
    return {"metadata": {"name": name, "namespace": namespace, "resourceVersion": version, "uid": f"u-{name}"},
            "spec": {}, "status": {"state": "Succeeded", "observedGeneration": None}}


class FakeCustom:
    def __init__(self, items: list[dict]) -> None:
        self.items, self.calls = items, []

    def list_namespaced_custom_object(self, group, version, namespace, plural, **_):
        self.calls.append(namespace)
        return {"items": [i for i in self.items if i["metadata"]["namespace"] == namespace]}

    def list_cluster_custom_object(self, group, version, plural, **_):
        self.calls.append("*")
        return {"items": list(self.items)}


def _with_api(monkeypatch, state: OperatorRuntime, custom: FakeCustom) -> None:
    state._api = object()
    monkeypatch.setattr(runtime.client, "CustomObjectsApi", lambda api: custom)


def test_flag_default_and_environment():
    assert build_parser().parse_args([]).liveness_api_timeout == 60
    assert build_parser().parse_args(["--liveness-api-timeout", "3"]).liveness_api_timeout == 3
    assert OperatorRuntime.from_env({}).liveness_api_timeout == 60
    assert OperatorRuntime.from_env({"KUBEDISTILL_LIVENESS_API_TIMEOUT_SECONDS": "3"}).liveness_api_timeout == 3


def test_unhealthy_after_the_limit_without_api_contact_and_healthy_again(clock):
    state = OperatorRuntime()
    state.liveness_api_timeout = 3
    assert state.health() is None  # the start counts as contact
    clock.now += 3
    assert state.health() is None
    clock.now += 0.5
    assert "no answer from the API server for 4 s" in state.health()
    state.rayjob_event("ADDED", {"metadata": {}}, "ns")  # any watch event is contact
    assert state.health() is None
    clock.now += 100
    state.liveness_api_timeout = 0  # 0: never
    assert state.health() is None


def test_a_change_the_watch_does_not_deliver_fails_liveness(monkeypatch, clock):
    state = OperatorRuntime()
    state.liveness_api_timeout, state.namespaces = 10, ("ns",)
    custom = FakeCustom([_job("a", "5"), _job("b", "7")])
    _with_api(monkeypatch, state, custom)
    state.distilljob_event(None, _job("a", "5"), "ns", "a")  # the watch showed a, never b
    state._check_watch(5)
    assert custom.calls == ["ns"] and set(state._unseen) == {("ns", "b")}
    clock.now += 9
    state._check_watch(5)  # the clock runs from the first list that showed it
    clock.now += 2
    assert "has not delivered the change of ns/b a list showed 11 s ago" in state.health()
    state.distilljob_event("ADDED", _job("b", "7"), "ns", "b")
    assert state.health() is None


def test_every_late_job_is_named_oldest_first(monkeypatch, clock):
    state = OperatorRuntime()
    state.liveness_api_timeout, state.namespaces = 10, ("ns",)
    custom = FakeCustom([_job("old", "3")])
    _with_api(monkeypatch, state, custom)
    state._check_watch(5)
    clock.now += 4
    custom.items = [_job("old", "3")] + [_job(name, "9") for name in ("new", "c", "d")]
    state._check_watch(5)
    clock.now += 7
    assert "the change of ns/old a list showed 11 s ago" in state.health()  # the others are not late yet
    clock.now += 4
    state.api_contact()  # the API server answers; only the watch is silent
    problem = state.health()
    assert "the changes of ns/old, ns/c, ns/d and 1 more a list showed 15 s ago" in problem, problem


def test_a_list_that_catches_up_or_a_deleted_job_stops_the_clock(monkeypatch, clock):
    state = OperatorRuntime()
    state.liveness_api_timeout, state.namespaces = 10, ()
    custom = FakeCustom([_job("a", "4", "x")])
    _with_api(monkeypatch, state, custom)
    state.distilljob_event("MODIFIED", _job("a", "5", "x"), "x", "a")
    state._check_watch(5)  # the list (from a cache) is behind the watch: a mismatch for now
    assert custom.calls == ["*"] and ("x", "a") in state._unseen
    custom.items = [_job("a", "5", "x")]
    clock.now += 20
    state._check_watch(5)
    assert not state._unseen and state.health() is None
    custom.items = [_job("gone", "9", "x")]
    state._check_watch(5)
    custom.items = []
    clock.now += 20
    state._check_watch(5)
    assert not state._unseen and state.health() is None


def test_namespace_patterns_like_kopf(monkeypatch):
    custom = FakeCustom([_job("a", "1", "team-a"), _job("b", "1", "team-b"), _job("c", "1", "other")])
    state = OperatorRuntime()
    state.namespaces = ("team-*", "!team-b")
    _with_api(monkeypatch, state, custom)
    state._check_watch(5)
    assert custom.calls == ["*"] and set(state._unseen) == {("team-a", "a")}
    state = OperatorRuntime()  # not known (kopf run): the namespaces the watch has shown
    _with_api(monkeypatch, state, custom)
    state.distilljob_event("MODIFIED", _job("c", "1", "other"), "other", "c")
    state._check_watch(5)
    assert custom.calls[-1] == "other" and not state._unseen


def test_the_probe_fails_with_the_reason(clock):
    state = OperatorRuntime()
    state.liveness_api_timeout = 1
    memo = kopf.Memo(runtime=state)
    assert asyncio.run(handlers.api_probe(memo=memo)) == 0.0
    clock.now += 2
    with pytest.raises(kopf.PermanentError, match="no answer from the API server"):
        asyncio.run(handlers.api_probe(memo=memo))
