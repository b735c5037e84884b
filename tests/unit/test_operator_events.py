"""Events named after their transitions (conditions.event_name/event_key/recorded_events, runtime.post_event):
a repeat is a 409, never a second Event, and a restarted operator finds the same names from the status."""

from __future__ import annotations

import re

import pytest
from kubernetes.client.exceptions import ApiException

from distill_operator import runtime
from distill_operator.conditions import MISSING, event_key, event_name, recorded_events
from tests.unit.test_operator_conditions import FAILED, PENDING, RUNNING, SUCCEEDED, Job, spec

DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def test_event_name_is_deterministic_a_dns_subdomain_and_at_most_253_characters():
    key = ("Created", "True", "2025-01-01T12:00:00Z")
    name = event_name("qwen", "uid-1", key)
    assert name == event_name("qwen", "uid-1", key) and re.fullmatch(r"qwen\.[0-9a-f]{16}", name)
    assert name != event_name("qwen", "uid-2", key)  # a re-created job (new uid) has its own Events
    assert name != event_name("qwen", "uid-1", ("Created", "True", "2025-01-01T12:00:01Z"))
    for job in ("a" * 253, "a." * 117 + "b" * 19, "x-" * 126 + "y"):
        long_name = event_name(job, "uid", key)
        assert len(long_name) <= 253 and DNS_SUBDOMAIN.match(long_name), long_name


def _lifecycle():
    """A job created, running, failed and restarted twice, suspended, resumed, then succeeded: every decision."""
    job = Job(spec(backoffLimit=3))
    steps = [lambda: job.step(), lambda: job.step(PENDING, 1), lambda: job.step(RUNNING, 1),
             lambda: job.step(FAILED, 1), lambda: job.step(MISSING, 1), lambda: job.step(RUNNING, 1)]
    out = [(step(), dict(job.status)) for step in steps]
    job.spec = spec(backoffLimit=3, suspend=True)
    out.append((job.step(RUNNING, 1), dict(job.status)))
    job.spec = spec(backoffLimit=3)
    out.append((job.step(None, 1), dict(job.status)))
    out += [(job.step(RUNNING, 1), dict(job.status)), (job.step(SUCCEEDED, 1), dict(job.status))]
    return out


def test_each_transition_has_its_own_key_and_the_status_after_it_gives_the_same_key_back():
    posted = []
    for decision, status in _lifecycle():
        recorded = {(e[1], e[3]) for e in recorded_events(status)}
        for type_, reason, _ in decision.events:
            key = event_key(status, reason)
            posted.append((reason, key))
            assert (reason, key) in recorded, (reason, key, recorded)  # a restart right now posts the same name
    reasons = [reason for reason, _ in posted]
    assert reasons == ["RayJobCreated", "RayJobRunning", "Restarting", "Restarting", "RayJobRunning", "Suspended",
                       "Resumed", "RayJobRunning", "Succeeded"]
    assert len({key for _, key in posted}) == len(posted)  # two restarts, three runs: all distinct
    # What the final status records was all posted already: a restart then adds no Event.
    final = _lifecycle()[-1][1]
    assert {(e[1], e[3]) for e in recorded_events(final)} <= set(posted)


class FakeCore:
    def __init__(self, *outcomes):
        self.outcomes, self.created = list(outcomes), []

    def create_namespaced_event(self, namespace, body, **_):
        outcome = self.outcomes.pop(0) if self.outcomes else None
        if outcome is not None:
            raise outcome
        self.created.append(body)


BODY = {"metadata": {"name": "job", "namespace": "ns", "uid": "u1", "resourceVersion": "7"}}


@pytest.fixture(autouse=True)
def no_delays(monkeypatch):
    monkeypatch.setattr(runtime, "EVENT_RETRY_DELAYS", (0, 0, 0, 0))


def test_post_event_retries_transient_errors_and_treats_409_as_done():
    key = ("Created", "True", "t")
    core = FakeCore(ApiException(status=503), OSError("connection reset"))
    assert runtime.post_event(core, BODY, "Normal", "RayJobCreated", "job-0 created", key)
    [event] = core.created
    assert event["metadata"]["name"] == event_name("job", "u1", key)
    assert (event["type"], event["reason"], event["message"]) == ("Normal", "RayJobCreated", "job-0 created")
    assert event["involvedObject"]["uid"] == "u1" and event["involvedObject"]["kind"] == "DistillJob"
    assert runtime.post_event(FakeCore(ApiException(status=409)), BODY, "Normal", "RayJobCreated", "m", key)
    # Past the retries: False (posted again on the next tick); a permanent refusal is logged and dropped.
    assert not runtime.post_event(FakeCore(*[ApiException(status=500)] * 5), BODY, "Normal", "R", "m", key)
    assert runtime.post_event(FakeCore(ApiException(status=403)), BODY, "Normal", "R", "m", key)
