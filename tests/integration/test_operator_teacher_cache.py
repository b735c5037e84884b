"""The teacher cache on Kubernetes, on the real API server: a DistillJob with spec.mode cacheTeacher writes the cache
(`kubedistill cache-teacher`), a train job naming it in spec.teacherCacheFrom waits (no RayJob) until it has
Succeeded, then starts on the same claim and cache directory. KubeRay's part is played (operator_fixtures)."""

from __future__ import annotations

import copy

import pytest
import yaml

from kube_cluster import wait_for
from tests.integration.operator_fixtures import (  # noqa: F401  (fixtures)
    REPO,
    distilljob,
    distilljob_crd,
    entrypoint,
    jobs,
    operator,
)
from distill_trainer.config import config_from_dict

pytestmark = pytest.mark.k8s


def cache_job(namespace: str) -> dict:
    body = distilljob("teacher-cache", namespace, mode="cacheTeacher")
    body["spec"]["distill"]["teacher_cache_dir"] = "cache"  # relative: /checkpoints/<ns>/teacher-cache/cache
    return body


def train_job(name: str, namespace: str, claim: str = "checkpoints") -> dict:
    body = distilljob(name, namespace, teacherCacheFrom="teacher-cache", storage={"claimName": claim})
    body["spec"]["distill"]["teacher_cache_dir"] = "cache"  # relative: under the cache job's directory
    return body


def test_train_job_waits_for_the_cache_job_then_starts(operator, jobs, kube, kubectl, kube_namespace):
    ns = kube_namespace
    jobs.create(train_job("student", ns))
    status = wait_for(lambda: jobs.status("student") if jobs.status("student").get("reason") ==
                      "WaitingForTeacherCache" else None, timeout=20, message="student waiting")
    assert status["state"] == "Pending" and "teacher-cache" in status["message"]
    assert "does not exist" in status["message"]
    created = jobs.condition("student", "Created")
    assert (created["status"], created["reason"]) == ("False", "WaitingForTeacherCache")
    listing = kubectl("get", "dj", "student", "-n", ns).stdout.split()
    assert listing[listing.index("student") + 1: listing.index("student") + 3] == ["Pending", "WaitingForTeacherCache"]
    assert jobs.rayjobs() == []

    # The cache job: the same RayJob, running `kubedistill cache-teacher`; the train job's message follows its state.
    jobs.create(cache_job(ns))
    rayjob = jobs.rayjob("teacher-cache-0")
    assert entrypoint(rayjob) == ["kubedistill", "cache-teacher", "/etc/kubedistill/distill.yaml"]
    cm = kube.get("v1", "ConfigMap", "teacher-cache-config", ns)
    assert config_from_dict(yaml.safe_load(cm["data"]["distill.yaml"])).teacher_cache_dir == \
        f"/checkpoints/{ns}/teacher-cache/cache"
    wait_for(lambda: "it is Pending" in jobs.status("student").get("message", ""), timeout=20,
             message="student names the cache job's state")

    # A train job on another claim can never read that cache: refused at once.
    jobs.create(train_job("elsewhere", ns, claim="other-claim"))
    failed = jobs.wait_state("elsewhere", "Failed")
    assert failed["reason"] == "TeacherCacheMismatch" and "'other-claim' differs from 'checkpoints'" in failed["message"]

    jobs.play_kuberay("teacher-cache-0", "Running", "RUNNING")
    jobs.wait_state("teacher-cache", "Running")
    wait_for(lambda: "it is Running" in jobs.status("student").get("message", ""), timeout=20,
             message="student sees the cache job running")
    assert jobs.status("student")["state"] == "Pending" and [r["metadata"]["name"] for r in jobs.rayjobs()] == [
        "teacher-cache-0"]

    jobs.play_kuberay("teacher-cache-0", "Complete", "SUCCEEDED")
    done = jobs.wait_state("teacher-cache", "Succeeded")
    assert done["message"].endswith(f"the teacher cache /checkpoints/{ns}/teacher-cache/cache is complete")

    # Now the train job starts: `kubedistill train` reading the cache job's directory.
    rayjob = jobs.rayjob("student-0")
    assert entrypoint(rayjob) == ["kubedistill", "train", "/etc/kubedistill/distill.yaml"]
    config = config_from_dict(yaml.safe_load(kube.get("v1", "ConfigMap", "student-config", ns)["data"]["distill.yaml"]))
    assert config.teacher_cache_dir == f"/checkpoints/{ns}/teacher-cache/cache"
    assert config.output_dir == f"/checkpoints/{ns}/student/output"
    status = jobs.wait_state("student", "Pending")
    assert status["rayJobName"] == "student-0" and jobs.condition("student", "Created")["status"] == "True"
    assert kube.get("ray.io/v1", "RayJob", "elsewhere-0", ns) is None  # the refused one never launched
    reasons = {r for _, r in jobs.events("student")}
    assert {"WaitingForTeacherCache", "RayJobCreated"} <= reasons


def test_the_example_is_accepted_and_refusals_name_the_field(kubectl, kube_namespace, distilljob_crd):
    result = kubectl("apply", "--dry-run=server", "-n", kube_namespace, "-f",
                     str(REPO / "examples" / "manifests" / "distilljob-teacher-cache.yaml"))
    assert result.stdout.count("created (server dry run)") == 2, result.stdout
    bad = copy.deepcopy(cache_job(kube_namespace))
    bad["spec"]["mode"] = "cache"
    result = kubectl("apply", "--validate=false", "-f", "-", input=yaml.safe_dump(bad), check=False)
    assert result.returncode != 0 and "spec.mode" in result.stderr, result.stderr
