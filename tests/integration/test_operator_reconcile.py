"""The operator against a real API server: DistillJob -> ConfigMap + RayJob -> conditions, run policy.

No KubeRay controller runs here. The tests play KubeRay's part by patching each RayJob's status
(jobDeploymentStatus/jobStatus) through the status subresource, as KubeRay would, and check what the
operator (running in-process with kopf.testing.KopfRunner) does in response.
"""

from __future__ import annotations

import time

import pytest
import yaml

from distill_trainer.config import config_from_dict
from distill_trainer.k8s_progress import K8sProgressReporter
from kube_cluster import wait_for
from tests.integration.operator_fixtures import (  # noqa: F401
    distilljob,
    distilljob_crd,
    entrypoint,
    jobs,
    operator,
    running_operator,
)

pytestmark = pytest.mark.k8s

RESUME = "resume_from_checkpoint=true"


def test_create_renders_children_and_conditions_follow_rayjob_to_success(operator, jobs, kube, kube_namespace):
    created = jobs.create(distilljob("ok", kube_namespace))
    rayjob = jobs.rayjob("ok-0")
    assert entrypoint(rayjob) == ["kubedistill", "train", "/etc/kubedistill/distill.yaml"]
    assert rayjob["spec"]["shutdownAfterJobFinishes"] is True
    owner = rayjob["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["uid"]) == ("DistillJob", "ok", created["metadata"]["uid"])
    worker = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1" and worker["image"] == "kubedistill:test"
    cm = kube.get("v1", "ConfigMap", "ok-config", kube_namespace)
    config = config_from_dict(yaml.safe_load(cm["data"]["distill.yaml"]))
    assert config.max_steps == 10 and config.output_dir == f"/checkpoints/{kube_namespace}/ok/output"

    status = jobs.wait_state("ok", "Pending")
    assert jobs.condition("ok", "Created")["status"] == "True"
    assert jobs.condition("ok", "Running")["status"] == "False"
    assert status["rayJobName"] == "ok-0" and status["observedGeneration"] == 1

    jobs.play_kuberay("ok-0", "Initializing")
    jobs.play_kuberay("ok-0", "Running", "RUNNING")
    jobs.wait_state("ok", "Running")
    running_since = jobs.condition("ok", "Running")["lastTransitionTime"]

    # The trainer reports progress into its own ConfigMap; the operator mirrors it into status.progress.
    reporter = K8sProgressReporter("ok", kube_namespace, max_steps=10, min_interval_seconds=0)
    reporter.log(5, {"train/loss": 1.25, "train/tokens_per_second": 900.0})
    reporter.checkpoint_saved(5, "/checkpoints/ok/output/checkpoint-5")
    wait_for(lambda: jobs.status("ok").get("progress", {}).get("step") == 5, message="progress step 5")

    jobs.play_kuberay("ok-0", "Complete", "SUCCEEDED")
    status = jobs.wait_state("ok", "Succeeded")
    assert jobs.condition("ok", "Succeeded")["status"] == "True"
    assert jobs.condition("ok", "Running")["status"] == "False"
    assert status["completionTime"]
    # The operator's status writes left the trainer's progress alone.
    assert status["progress"]["loss"] == 1.25 and status["progress"]["lastCheckpoint"].endswith("checkpoint-5")
    progress_cm = kube.get("v1", "ConfigMap", "ok-progress", kube_namespace)
    assert "kubedistill-trainer" in {m["manager"] for m in progress_cm["metadata"]["managedFields"]}
    assert "kubedistill-trainer" not in {m["manager"] for m in jobs.get("ok")["metadata"]["managedFields"]}
    assert running_since <= jobs.condition("ok", "Running")["lastTransitionTime"]
    reasons = wait_for(lambda: {r for _, r in jobs.events("ok")} >= {"RayJobCreated", "RayJobRunning", "Succeeded"}
                       and {r for _, r in jobs.events("ok")}, message="events")
    assert reasons
    assert len(jobs.rayjobs()) == 1
    assert not jobs.get("ok")["metadata"].get("finalizers")  # deletable even with no operator running


def test_failure_is_retried_with_resume_until_backoff_limit(operator, jobs, kube_namespace):
    jobs.create(distilljob("retry", kube_namespace, run_policy={"backoffLimit": 1}))
    jobs.rayjob("retry-0")
    jobs.play_kuberay("retry-0", "Running", "RUNNING")
    jobs.wait_state("retry", "Running")
    jobs.play_kuberay("retry-0", "Failed", "FAILED")
    second = jobs.rayjob("retry-1")
    assert entrypoint(second)[-1] == RESUME
    status = jobs.wait_state("retry", "Restarting")
    assert status["restarts"] == 1 and jobs.condition("retry", "Restarting")["reason"] == "RayJobFailed"
    jobs.play_kuberay("retry-1", "Running", "RUNNING")
    jobs.wait_state("retry", "Running")
    assert jobs.condition("retry", "Restarting")["status"] == "False"
    jobs.play_kuberay("retry-1", "Complete", "FAILED")
    jobs.wait_state("retry", "Failed")
    assert jobs.condition("retry", "Failed")["reason"] == "BackoffLimitExceeded"
    time.sleep(1.5)  # a few reconcile intervals: terminal stays terminal, no third RayJob
    assert sorted(r["metadata"]["name"] for r in jobs.rayjobs()) == ["retry-0", "retry-1"]
    assert jobs.status("retry")["state"] == "Failed"
    assert ("Warning", "Restarting") in jobs.events("retry")


def test_suspend_deletes_the_rayjob_and_resume_continues_from_checkpoint(operator, jobs, kube_namespace):
    jobs.create(distilljob("pause", kube_namespace))
    jobs.rayjob("pause-0")
    jobs.play_kuberay("pause-0", "Running", "RUNNING")
    jobs.wait_state("pause", "Running")
    jobs.patch_spec("pause", {"runPolicy": {"suspend": True}})
    jobs.wait_state("pause", "Suspended")
    wait_for(lambda: not jobs.rayjobs(), message="RayJob deleted on suspend")
    assert jobs.condition("pause", "Suspended")["observedGeneration"] == 2
    jobs.patch_spec("pause", {"runPolicy": {"suspend": False}})
    resumed = jobs.rayjob("pause-1")
    assert entrypoint(resumed)[-1] == RESUME
    jobs.wait_state("pause", "Pending")
    assert jobs.condition("pause", "Suspended")["reason"] == "Resumed"
    jobs.play_kuberay("pause-1", "Running", "RUNNING")
    jobs.wait_state("pause", "Running")
    assert jobs.status("pause").get("restarts", 0) == 0  # suspending is not a failure


def test_deadlines_fail_the_job_and_stop_the_rayjob(operator, jobs, kube_namespace):
    jobs.create(distilljob("slow", kube_namespace, run_policy={"activeDeadlineSeconds": 3}))
    jobs.create(distilljob("stuck", kube_namespace, run_policy={"preRunningDeadlineSeconds": 2}))
    assert jobs.rayjob("slow-0")["spec"]["activeDeadlineSeconds"] <= 3
    jobs.rayjob("stuck-0")
    jobs.play_kuberay("slow-0", "Running", "RUNNING")
    jobs.play_kuberay("stuck-0", "Initializing")  # e.g. GPU pods unschedulable
    jobs.wait_state("stuck", "Failed", timeout=15)
    assert jobs.condition("stuck", "Failed")["reason"] == "PreRunningDeadlineExceeded"
    jobs.wait_state("slow", "Failed", timeout=15)
    assert jobs.condition("slow", "Failed")["reason"] == "DeadlineExceeded"
    wait_for(lambda: not jobs.rayjobs(), message="RayJobs of failed jobs deleted")


def test_ttl_after_finished_deletes_the_distilljob(operator, jobs, kube_namespace):
    jobs.create(distilljob("short", kube_namespace, run_policy={"ttlSecondsAfterFinished": 1}))
    jobs.rayjob("short-0")
    jobs.play_kuberay("short-0", "Complete", "SUCCEEDED")
    jobs.wait_state("short", "Succeeded")
    try:
        wait_for(lambda: jobs.get("short") is None, timeout=15, message="DistillJob deleted after its TTL")
    except TimeoutError as error:
        raise AssertionError(f"not deleted: {(jobs.get('short') or {}).get('metadata')}") from error


def test_operator_restart_mid_job_creates_no_second_rayjob(kubeconfig_env, distilljob_crd, jobs, kube_namespace):
    with running_operator(kube_namespace):
        jobs.create(distilljob("steady", kube_namespace))
        jobs.rayjob("steady-0")
        jobs.play_kuberay("steady-0", "Running", "RUNNING")
        jobs.wait_state("steady", "Running")
        before = jobs.status("steady")
    with running_operator(kube_namespace):
        time.sleep(2)  # resume handlers and several timer reconciles
        assert [r["metadata"]["name"] for r in jobs.rayjobs()] == ["steady-0"]
        assert jobs.condition("steady", "Running") == next(c for c in before["conditions"] if c["type"] == "Running")
        jobs.play_kuberay("steady-0", "Complete", "SUCCEEDED")
        jobs.wait_state("steady", "Succeeded")
    assert len(jobs.rayjobs()) == 1


def test_rayjob_deleted_behind_the_operators_back_counts_against_backoff_limit(operator, jobs, kube, kube_namespace):
    jobs.create(distilljob("gone", kube_namespace, run_policy={"backoffLimit": 1}))
    jobs.rayjob("gone-0")
    jobs.play_kuberay("gone-0", "Running", "RUNNING")
    jobs.wait_state("gone", "Running")
    kube.delete("ray.io/v1", "RayJob", "gone-0", kube_namespace)
    assert entrypoint(jobs.rayjob("gone-1"))[-1] == RESUME
    assert jobs.condition("gone", "Restarting")["reason"] == "RayJobDeleted" or jobs.wait_state("gone", "Restarting")
    kube.delete("ray.io/v1", "RayJob", "gone-1", kube_namespace)
    jobs.wait_state("gone", "Failed")
    assert jobs.condition("gone", "Failed")["reason"] == "BackoffLimitExceeded"
    assert not jobs.rayjobs()


def test_invalid_spec_that_the_schema_cannot_catch_fails_with_reason(operator, jobs, kube_namespace):
    body = distilljob("odd", kube_namespace)
    body["spec"]["distill"]["teacher"] = {"device_mapping": [0]}  # student has none: the trainer's model refuses
    try:
        jobs.create(body)
    except Exception as error:  # an API server >= 1.25 enforces the CRD's CEL rule for this already
        assert "device_mapping" in str(error)
        return
    jobs.wait_state("odd", "Failed")
    failed = jobs.condition("odd", "Failed")
    assert failed["reason"] == "InvalidSpec" and "device_mapping" in failed["message"]
    assert not jobs.rayjobs()
