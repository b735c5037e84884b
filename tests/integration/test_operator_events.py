"""Events that survive a kill -9 of the operator and are never posted twice (issue 21), on the real API server.

Each transition's Event is named after it (``conditions.event_name``: job uid and the transition as the status
records it), posted with an awaited create after the status write, retried on transient errors; a new leader posts
the Events of the transitions the status records that have none (a cheap create, a 409 when it exists).
"""

from __future__ import annotations

import os
import signal
from collections import Counter

import pytest

from kube_cluster import wait_for
from distill_operator import runtime
from distill_operator.conditions import event_key
from tests.integration.operator_fixtures import distilljob, distilljob_crd, jobs, operator_credentials  # noqa: F401
from tests.integration.test_operator_leader_election import FAST, lease, replicas  # noqa: F401

pytestmark = pytest.mark.k8s


def _events(jobs, uid: str) -> list[dict]:
    return [e for e in jobs.kube.list("v1", "Event", jobs.ns) if e["involvedObject"].get("uid") == uid]


def _by_reason(jobs, uid: str) -> Counter:
    return Counter(e["reason"] for e in _events(jobs, uid))


def test_kill_9_and_restart_each_transition_has_exactly_one_event(replicas, jobs, kube, kube_namespace):
    first = replicas("a", *FAST)
    first.wait_role("leader")
    jobs.create(distilljob("ev", kube_namespace))
    jobs.create(distilljob("evdone", kube_namespace))
    for name in ("ev", "evdone"):
        jobs.rayjob(f"{name}-0")
        jobs.wait_state(name, "Pending")
        jobs.play_kuberay(f"{name}-0", "Running", "RUNNING")
        jobs.wait_state(name, "Running")
    jobs.play_kuberay("evdone-0", "Complete", "SUCCEEDED")
    jobs.wait_state("evdone", "Succeeded")
    uid, done_uid = jobs.get("ev")["metadata"]["uid"], jobs.get("evdone")["metadata"]["uid"]
    wait_for(lambda: _by_reason(jobs, uid) == Counter(RayJobCreated=1, RayJobRunning=1)
             and _by_reason(jobs, done_uid) == Counter(RayJobCreated=1, RayJobRunning=1, Succeeded=1),
             message=f"the Events before the kill: {_by_reason(jobs, uid)}, {_by_reason(jobs, done_uid)}")
    os.killpg(first.process.pid, signal.SIGKILL)
    assert first.stop() == -signal.SIGKILL
    # What a kill between the status write and the Event leaves: the transition in the status, no Event.
    for job_uid, reason in ((uid, "RayJobRunning"), (done_uid, "Succeeded")):
        [lost] = [e for e in _events(jobs, job_uid) if e["reason"] == reason]
        kube.delete("v1", "Event", lost["metadata"]["name"], kube_namespace)

    second = replicas("b", *FAST)  # the same Lease: it takes over once the killed leader's lease has expired
    second.wait_role("leader", timeout=30)
    assert lease(kube, kube_namespace)["spec"]["holderIdentity"] == second.identity()
    wait_for(lambda: _by_reason(jobs, uid)["RayJobRunning"] and _by_reason(jobs, done_uid)["Succeeded"],
             timeout=20, message=f"the lost Events posted again\n{second.log()[-3000:]}")
    jobs.play_kuberay("ev-0", "Complete", "SUCCEEDED")  # and the new leader goes on, one Event per transition
    jobs.wait_state("ev", "Succeeded")
    wait_for(lambda: _by_reason(jobs, uid)["Succeeded"], message="the Succeeded Event")
    assert _by_reason(jobs, uid) == Counter(RayJobCreated=1, RayJobRunning=1, Succeeded=1), _events(jobs, uid)
    assert _by_reason(jobs, done_uid) == Counter(RayJobCreated=1, RayJobRunning=1, Succeeded=1)
    recovered = next(e for e in _events(jobs, uid) if e["reason"] == "RayJobRunning")
    assert (recovered["type"], recovered["involvedObject"]["name"]) == ("Normal", "ev")
    assert "ev-0" in recovered["message"]  # the Running condition's message when it was posted again


def test_posting_the_same_transition_twice_leaves_one_event(kube_cluster, kube, jobs, kube_namespace):
    import kubernetes

    body = {"metadata": {"name": "twice", "namespace": kube_namespace, "uid": "0000-twice", "resourceVersion": "1"}}
    created = {"type": "Created", "status": "True", "reason": "RayJobCreated", "message": "twice-0 created",
               "lastTransitionTime": "2025-01-01T12:00:00Z"}
    status = {"attempt": 0, "conditions": [created]}
    key = event_key(status, "RayJobCreated")
    with kube_cluster.api_client() as api:
        core = kubernetes.client.CoreV1Api(api)
        for _ in range(2):
            assert runtime.post_event(core, body, "Normal", "RayJobCreated", "twice-0 created", key)
        # another transition of the same job (a later attempt's restart) is its own Event
        restart = event_key({"attempt": 1}, "Restarting")
        for _ in range(2):
            assert runtime.post_event(core, body, "Warning", "Restarting", "restart 1", restart)
    assert _by_reason(jobs, "0000-twice") == Counter(RayJobCreated=1, Restarting=1)
