"""Kueue: the RayJob as Kueue's RayJob integration expects it, and Queued/Preempted from the Workload, no cluster."""

from __future__ import annotations

import pytest

from distill_operator import render
from distill_operator.conditions import Observation, observe_rayjob, parse_time, timer_due
from distill_operator.resources import parse_spec
from tests.unit.test_operator_conditions import PENDING, RUNNING, T0, Job, spec
from tests.unit.test_operator_render import JOB, spec_dict


def test_a_queued_rayjob_carries_kueues_labels_and_is_created_suspended():
    queued = render.render_rayjob(
        parse_spec(spec_dict(runPolicy={"queueName": "team-a", "priorityClassName": "high"})), JOB, 0, False)
    assert queued["metadata"]["labels"][render.KUEUE_QUEUE_LABEL] == "team-a"
    assert queued["metadata"]["labels"][render.KUEUE_PRIORITY_LABEL] == "high"
    assert queued["spec"]["suspend"] is True and queued["spec"]["shutdownAfterJobFinishes"] is True
    assert "clusterSelector" not in queued["spec"]
    plain = render.render_rayjob(parse_spec(spec_dict(runPolicy={"priorityClassName": "high"})), JOB, 0, False)
    assert "suspend" not in plain["spec"]  # no queue: Kueue is not involved, start at once
    assert not any(key.startswith("kueue.x-k8s.io/") for key in plain["metadata"]["labels"])


@pytest.mark.parametrize("name", ["Team-A", "team a", "-a", "x" * 64])
def test_queue_names_must_be_label_values(name):
    with pytest.raises(Exception, match="queue_name|queueName"):
        parse_spec(spec_dict(runPolicy={"queueName": name}))


def suspended(deployment="Suspended"):
    return {"metadata": {"name": "x-0", "namespace": "ml", "uid": "u1",
                         "labels": {render.KUEUE_QUEUE_LABEL: "team-a"}},
            "spec": {"suspend": True}, "status": {"jobDeploymentStatus": deployment}}


def workload(*conditions, active=True):
    return {"metadata": {"name": "rayjob-x-0-abcde"}, "spec": {"active": active},
            "status": {"conditions": [{"type": t, "status": s, "reason": r, "message": m}
                                      for t, s, r, m in conditions]}}


def test_a_suspended_rayjob_is_queued_with_the_workloads_reason_and_what_to_do():
    assert observe_rayjob(suspended(), workload()).reason == "WorkloadCreated"  # Kueue has not evaluated it yet
    none = observe_rayjob(suspended(""), None)
    assert (none.phase, none.reason) == ("Queued", "WaitingForWorkload")
    assert "ray.io/rayjob" in none.message and "kubectl get localqueue -n ml team-a" in none.message
    pending = observe_rayjob(suspended(), workload(
        ("QuotaReserved", "False", "Pending", "couldn't assign flavors to pod set head: insufficient quota")))
    assert (pending.phase, pending.reason) == ("Queued", "Pending")
    assert "Kueue LocalQueue ml/team-a: couldn't assign flavors" in pending.message
    assert "kubectl describe workload -n ml rayjob-x-0-abcde" in pending.message
    checks = observe_rayjob(suspended(), workload(("QuotaReserved", "True", "QuotaReserved", ""),
                                                  ("Admitted", "False", "NoChecks", "waiting for provisioning")))
    assert (checks.phase, checks.reason) == ("Queued", "QuotaReserved") and "waiting for provisioning" in checks.message
    inactive = observe_rayjob(suspended(), workload(("Evicted", "True", "Deactivated", "backoff"), active=False))
    assert (inactive.phase, inactive.reason) == ("Queued", "WorkloadInactive") and "active" in inactive.message


def test_evicted_after_admission_is_preempted_once_kuberay_deleted_the_cluster():
    evicted = workload(("QuotaReserved", "False", "Pending", ""),
                       ("Evicted", "True", "Preempted", "Preempted to accommodate a higher priority Workload"))
    suspending = observe_rayjob(suspended("Suspending"), evicted)
    assert (suspending.phase, suspending.reason, suspending.settled) == ("Queued", "Preempted", False)
    preempted = observe_rayjob(suspended("Suspended"), evicted)
    assert (preempted.phase, preempted.reason) == ("Preempted", "Preempted")
    assert "higher priority Workload" in preempted.message
    unsuspended = dict(suspended("Running"), spec={"suspend": False})
    unsuspended["status"]["jobStatus"] = "RUNNING"
    assert observe_rayjob(unsuspended, None).phase == "Running"


QUEUED = Observation("Queued", "Pending", "waits in Kueue LocalQueue ml/team-a: no quota")
PREEMPTED = Observation("Preempted", "Preempted", "Kueue evicted RayJob job-0 (Preempted: higher priority)")


def test_queued_until_admitted_then_the_clocks_count_from_admission():
    job = Job(spec(queueName="team-a", activeDeadlineSeconds=100, preRunningDeadlineSeconds=30))
    d = job.step()
    assert (d.action, job.status["state"], job.status["reason"]) == ("launch", "Queued", "WaitingForWorkload")
    assert job.condition("Queued")["status"] == "True" and "team-a" in job.condition("Queued")["message"]
    job.step(QUEUED, after=1)
    assert (job.status["state"], job.status["reason"]) == ("Queued", "Pending")
    assert job.condition("Queued")["message"] == QUEUED.message
    assert job.step(QUEUED, after=500).action == "none"  # past both deadlines: queue time does not count
    assert timer_due({"runPolicy": {"queueName": "team-a"}}, job.status, job.now)  # the Workload is polled
    d = job.step(PENDING, after=1)  # admitted: KubeRay starts it
    assert (job.status["state"], job.condition("Queued")["reason"]) == ("Pending", "Admitted")
    assert ("Normal", "Admitted") in [e[:2] for e in d.events]
    assert parse_time(job.status["attemptStartTime"]) == job.now
    assert parse_time(job.status["startTime"]) == job.now  # queued since its creation: nothing ran before
    assert job.step(PENDING, after=20).action == "none"
    assert job.step(PENDING, after=20).status["reason"] == "PreRunningDeadlineExceeded"  # 40 s after admission


def test_preemption_resumes_in_a_new_queued_attempt_without_counting_a_restart():
    job = Job(spec(queueName="team-a", backoffLimit=0, activeDeadlineSeconds=100))
    job.step()
    job.step(QUEUED, after=10)
    job.step(RUNNING, after=1)
    job.step(RUNNING, after=50, progress={"step": 5, "lastCheckpoint": "/ckpt/checkpoint-4"})
    d = job.step(PREEMPTED, after=1)
    assert (d.action, d.attempt, d.resume, d.replaces) == ("launch", 1, True, 0)
    assert (job.status["state"], job.status["reason"], job.status["restarts"]) == ("Queued", "Preempted", 0)
    assert "job-1 resumes from /ckpt/checkpoint-4 when Kueue admits it" in job.status["message"]
    assert ("Warning", "Preempted") in [e[:2] for e in d.events]
    job.step(QUEUED, after=1000)  # requeued for long: the deadline's clock stands still
    job.step(RUNNING, after=1)
    assert job.status["state"] == "Running"
    assert job.step(RUNNING, after=40).action == "none"  # ~52 s of running so far
    assert job.step(RUNNING, after=10).status["reason"] == "DeadlineExceeded"


def test_a_rayjob_suspended_at_rest_after_it_ran_is_preempted_even_without_a_workload():
    job = Job(spec(queueName="team-a"))
    job.step()
    job.step(RUNNING, after=1)
    tearing_down = Observation("Queued", "WaitingForWorkload", "suspended", settled=False)
    assert job.step(tearing_down, after=1).action == "none"  # KubeRay still deleting the cluster
    d = job.step(Observation("Queued", "WaitingForWorkload", "suspended"), after=1)
    assert (d.action, d.attempt, d.resume, d.replaces) == ("launch", 1, True, 0)
    assert (job.status["state"], job.status["reason"], job.status["restarts"]) == ("Queued", "RayJobSuspended", 0)


def test_run_policy_suspend_deletes_a_queued_rayjob_and_resume_queues_again():
    job = Job(spec(queueName="team-a"))
    job.step()
    job.step(QUEUED, after=1)
    job.spec = spec(queueName="team-a", suspend=True)
    d = job.step(QUEUED, after=1)
    assert (d.action, job.status["state"], job.condition("Queued")["status"]) == ("stop", "Suspended", "False")
    job.spec = spec(queueName="team-a")
    d = job.step(None, after=1)
    assert (d.action, d.attempt, d.resume, job.status["state"]) == ("launch", 1, True, "Queued")


def test_a_rayjob_deleted_while_queued_is_a_failure_not_an_admission():
    job = Job(spec(queueName="team-a", backoffLimit=1))
    job.step()
    job.step(QUEUED, after=1)
    d = job.step(Observation("Missing", "RayJobDeleted", "the attempt's RayJob no longer exists"), after=1)
    assert "Admitted" not in [e[1] for e in d.events]
    assert (d.action, d.attempt, job.status["restarts"], job.status["state"]) == ("launch", 1, 1, "Queued")
    assert job.condition("Queued")["reason"] == "WaitingForWorkload"  # the retry, queued in turn
