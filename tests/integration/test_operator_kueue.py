"""Kueue on a real API server with Kueue's real CRDs (tests/fixtures/kueue/, the CRD bases).

No Kueue controller runs here: the test plays Kueue's part (it creates the Workload owned by the RayJob, as Kueue's
RayJob integration does, writes its conditions, and flips the RayJob's spec.suspend) and KubeRay's (RayJob status).
The operator runs with the Helm chart's credentials, so the Workload read is also a check of the chart's RBAC.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from kube_cluster import wait_for
from tests.integration.operator_fixtures import (  # noqa: F401  (fixtures)
    RAY_API,
    RAY_KIND,
    distilljob,
    distilljob_crd,
    entrypoint,
    jobs,
    operator,
)

pytestmark = pytest.mark.k8s

KUEUE_CRDS = Path(__file__).resolve().parents[1] / "fixtures" / "kueue"
KUEUE_API = "kueue.x-k8s.io/v1beta2"
QUEUE_LABEL, PRIORITY_LABEL = "kueue.x-k8s.io/queue-name", "kueue.x-k8s.io/priority-class"


@pytest.fixture(scope="session")
def kueue_crds(kube_cluster, kube):
    """Kueue's five CRDs as published, created with kubectl (the workloads CRD, ~1.4 MB, does not fit client-side
    apply's last-applied annotation). --validate=false: kubectl's client-side schema check of a 1.20 server does not
    know x-kubernetes-validations (that server drops them; newer ones enforce them).

    One concession to this suite's 1.20 API server, which Kueue itself does not support (it needs >= 1.29): that
    server refuses an empty-string ``default: ""`` in a CRD schema (it reads it as null; the 67 in the workloads CRD
    are the pod template's ``name`` fields, e.g. configMapKeyRef.name). Only when the file as published is refused
    for exactly that reason is it created without those defaults (the one list-map key among them,
    imagePullSecrets[].name, made required instead); everything else, the Workload's own fields and conditions
    included, is Kueue's schema unchanged. A newer API server takes the files as they are."""
    import shutil

    binary = shutil.which("kubectl")
    if not binary:
        pytest.skip("kubectl is not installed")
    files = sorted(KUEUE_CRDS.glob("kueue.x-k8s.io_*.yaml"))
    assert len(files) == 5

    def create(text: str) -> subprocess.CompletedProcess:
        return subprocess.run([binary, f"--kubeconfig={kube_cluster.kubeconfig}", "create", "--validate=false",
                               "-f", "-"], input=text, capture_output=True, text=True, timeout=120)

    for path in files:
        text = path.read_text()
        done = create(text)
        if done.returncode != 0 and 'default: Invalid value: "null"' in done.stderr:
            done = create(json.dumps(_without_empty_string_defaults(yaml.load(text, Loader=_Loader))))
        assert done.returncode == 0 or "AlreadyExists" in done.stderr, done.stderr[-2000:]
    for plural in ("workloads", "localqueues", "clusterqueues", "workloadpriorityclasses", "resourceflavors"):
        kube.wait_crd_established(f"{plural}.kueue.x-k8s.io")


_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _without_empty_string_defaults(node):
    """A CRD without its ``default: ""`` schema entries, for an API server that reads them as null; a list-map key
    among them (imagePullSecrets[].name), which needs a default or to be required, becomes required instead."""
    if isinstance(node, list):
        return [_without_empty_string_defaults(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _without_empty_string_defaults(value) for key, value in node.items() if not (
        key == "default" and value == "")}
    items = node.get("items")
    if isinstance(items, dict) and node.get("x-kubernetes-list-map-keys"):
        for key in node["x-kubernetes-list-map-keys"]:
            if (items.get("properties") or {}).get(key, {}).get("default") == "":
                required = out["items"].setdefault("required", [])
                if key not in required:
                    required.append(key)
    return out


def play_kueue_workload(kube, rayjob: dict, conditions: list[tuple[str, str, str, str]]) -> str:
    """What Kueue's RayJob integration creates for a RayJob: a Workload owned by it, named rayjob-<name>-<hash>,
    labelled with the job's uid; then its status conditions. Returns its name."""
    meta = rayjob["metadata"]
    name = f"rayjob-{meta['name']}-{hashlib.sha256(meta['uid'].encode()).hexdigest()[:5]}"
    if kube.get(KUEUE_API, "Workload", name, meta["namespace"]) is None:
        kube.create({
            "apiVersion": KUEUE_API, "kind": "Workload",
            "metadata": {"name": name, "labels": {"kueue.x-k8s.io/job-uid": meta["uid"]},
                         "ownerReferences": [{"apiVersion": RAY_API, "kind": RAY_KIND, "name": meta["name"],
                                              "uid": meta["uid"], "controller": True, "blockOwnerDeletion": True}]},
            "spec": {"queueName": meta["labels"][QUEUE_LABEL],
                     "podSets": [{"name": "head", "count": 1,
                                  "template": {"spec": {"containers": [{"name": "ray-head", "image": "img"}]}}}]},
        }, meta["namespace"])
    kube.patch_status(KUEUE_API, "Workload", name, {"conditions": [
        {"type": t, "status": s, "reason": r, "message": m, "lastTransitionTime": "2026-01-01T00:00:00Z"}
        for t, s, r, m in conditions]}, meta["namespace"])
    return name


def test_a_queued_job_waits_in_kueue_runs_when_admitted_and_resumes_after_preemption(
        operator, jobs, kube, kubectl, kube_namespace, kueue_crds):
    ns = kube_namespace
    kube.create({"apiVersion": KUEUE_API, "kind": "WorkloadPriorityClass", "metadata": {"name": "kd-high"},
                 "value": 1000, "description": "test"})
    kube.create({"apiVersion": KUEUE_API, "kind": "LocalQueue", "metadata": {"name": "team-a"},
                 "spec": {"clusterQueue": "cq"}}, ns)
    jobs.create(distilljob("kq", ns, {"queueName": "team-a", "priorityClassName": "kd-high",
                                      "preRunningDeadlineSeconds": 3}))

    # Created suspended with exactly Kueue's labels; the DistillJob is Queued.
    rayjob = jobs.rayjob("kq-0")
    assert rayjob["spec"]["suspend"] is True and rayjob["spec"]["shutdownAfterJobFinishes"] is True
    assert "clusterSelector" not in rayjob["spec"]
    assert {k: v for k, v in rayjob["metadata"]["labels"].items() if k.startswith("kueue.x-k8s.io/")} == {
        QUEUE_LABEL: "team-a", PRIORITY_LABEL: "kd-high"}
    assert "resume_from_checkpoint=true" not in entrypoint(rayjob)
    status = jobs.wait_state("kq", "Queued")
    assert status["reason"] == "WaitingForWorkload" and "team-a" in jobs.condition("kq", "Queued")["message"]

    # Kueue's Workload says why it waits: the DistillJob shows that reason (polled) and what to do.
    jobs.play_kuberay("kq-0", "Suspended")
    workload = play_kueue_workload(kube, rayjob, [
        ("QuotaReserved", "False", "Pending", "couldn't assign flavors to pod set head: insufficient quota for "
         "nvidia.com/gpu in flavor h100, 8 more needed")])
    wait_for(lambda: jobs.status("kq").get("reason") == "Pending", message="the Workload's reason")
    queued = jobs.condition("kq", "Queued")
    assert queued["status"] == "True" and "insufficient quota for nvidia.com/gpu" in queued["message"]
    assert f"Kueue LocalQueue {ns}/team-a" in queued["message"] and f"describe workload -n {ns} {workload}" in \
        queued["message"]
    row = kubectl("get", "dj", "kq", "-n", ns, "--no-headers").stdout.split()
    assert row[:3] == ["kq", "Queued", "Pending"]
    time.sleep(3.5)  # longer than preRunningDeadlineSeconds: time queued does not count
    assert jobs.status("kq")["state"] == "Queued"

    # Admitted: Kueue reserves quota and unsuspends the RayJob; KubeRay runs it.
    play_kueue_workload(kube, rayjob, [("QuotaReserved", "True", "QuotaReserved", "Quota reserved in cq"),
                                       ("Admitted", "True", "Admitted", "The workload is admitted")])
    kube.patch(RAY_API, RAY_KIND, "kq-0", {"spec": {"suspend": False}}, ns)
    jobs.play_kuberay("kq-0", "Running", "RUNNING")
    jobs.wait_state("kq", "Running")
    admitted = jobs.condition("kq", "Queued")
    assert (admitted["status"], admitted["reason"]) == ("False", "Admitted")
    assert "kq-0 admitted by Kueue after" in admitted["message"] and ("Normal", "Admitted") in jobs.events("kq")
    assert kube.get(RAY_API, RAY_KIND, "kq-0", ns)["spec"]["suspend"] is False  # the operator never wrote it back

    # Preempted: Kueue evicts the Workload and suspends the RayJob; KubeRay deletes the cluster (Suspending ->
    # Suspended). A new attempt, created suspended, resumes from the newest checkpoint; no restart is counted.
    play_kueue_workload(kube, rayjob, [
        ("QuotaReserved", "False", "Pending", "Preempted"),
        ("Admitted", "False", "NoReservation", "The workload has no reservation"),
        ("Evicted", "True", "Preempted", "Preempted to accommodate a workload (UID: 1) due to prioritization")])
    kube.patch(RAY_API, RAY_KIND, "kq-0", {"spec": {"suspend": True}}, ns)
    jobs.play_kuberay("kq-0", "Suspending")
    jobs.play_kuberay("kq-0", "Suspended")
    retry = jobs.rayjob("kq-1")
    assert retry["spec"]["suspend"] is True and entrypoint(retry)[-1] == "resume_from_checkpoint=true"
    assert retry["metadata"]["labels"][QUEUE_LABEL] == "team-a"
    wait_for(lambda: kube.get(RAY_API, RAY_KIND, "kq-0", ns) is None, message="the preempted RayJob deleted")
    status = jobs.wait_state("kq", "Queued")
    assert (status["reason"], status["restarts"], status["attempt"]) == ("Preempted", 0, 1)
    assert "kq-1 resumes from the newest checkpoint when Kueue admits it" in status["message"]
    assert ("Warning", "Preempted") in jobs.events("kq")
    row = kubectl("get", "dj", "kq", "-n", ns, "--no-headers").stdout.split()
    assert row[:3] == ["kq", "Queued", "Preempted"]
    play_kueue_workload(kube, retry, [("QuotaReserved", "False", "Pending", "insufficient quota")])
    wait_for(lambda: jobs.status("kq").get("reason") == "Pending", message="the new attempt's Workload")

    # runPolicy.suspend still deletes the (queued) RayJob; resuming queues a new attempt.
    jobs.patch_spec("kq", {"runPolicy": {"suspend": True}})
    jobs.wait_state("kq", "Suspended")
    wait_for(lambda: kube.get(RAY_API, RAY_KIND, "kq-1", ns) is None, message="the queued RayJob deleted")
    jobs.patch_spec("kq", {"runPolicy": {"suspend": False}})
    assert jobs.rayjob("kq-2")["spec"]["suspend"] is True
    jobs.wait_state("kq", "Queued")
