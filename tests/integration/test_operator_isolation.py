"""What no user edit, trainer or foreign object may do to a DistillJob, against the real API server (1.20, no CEL).

- Immutable spec fields (distill, storage, launcher): an edit while the job runs is ignored with a condition
  naming the field; retries keep the original config and storage; a job that cannot keep its original fails and
  its RayJob is deleted (never a running RayJob behind a terminal DistillJob).
- A trainer (the per-job ServiceAccount's own token) may patch its own progress ConfigMap and nothing else: not
  another job's progress, not any DistillJob status, not its config ConfigMap.
- A pre-existing object with a child's name is never written to: the job gets a Conflict condition naming it,
  and proceeds once it is gone.
"""

from __future__ import annotations

import time

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from distill_operator import render
from distill_trainer.config import config_from_dict
from distill_trainer.k8s_progress import K8sProgressReporter
from kube_cluster import wait_for
from tests.integration.operator_fixtures import (  # noqa: F401
    RAY_API,
    RAY_KIND,
    distilljob,
    distilljob_crd,
    entrypoint,
    jobs,
    operator,
)

pytestmark = pytest.mark.k8s


def _config(kube, namespace: str, job: str) -> dict:
    return yaml.safe_load(kube.get("v1", "ConfigMap", f"{job}-config", namespace)["data"]["distill.yaml"])


def _claim(rayjob: dict) -> str:
    volumes = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["volumes"]
    return next(v["persistentVolumeClaim"]["claimName"] for v in volumes if "persistentVolumeClaim" in v)


# --- 5: spec edits while a job runs --------------------------------------------------------------------------


def test_edit_of_immutable_fields_is_ignored_and_retries_keep_the_original(operator, jobs, kube, kube_namespace):
    jobs.create(distilljob("frozen", kube_namespace, run_policy={"backoffLimit": 1}))
    jobs.rayjob("frozen-0")
    jobs.play_kuberay("frozen-0", "Running", "RUNNING")
    jobs.wait_state("frozen", "Running")
    original = _config(kube, kube_namespace, "frozen")

    jobs.patch_spec("frozen", {
        "distill": {"max_steps": 99, "output_dir": "/elsewhere"},
        "storage": {"claimName": "another-jobs-claim"},
        "runPolicy": {"backoffLimit": 2},  # mutable: applies at once
    })
    ignored = wait_for(lambda: jobs.condition("frozen", "SpecChangeIgnored").get("status") == "True"
                       and jobs.condition("frozen", "SpecChangeIgnored"), message="SpecChangeIgnored")
    assert ignored["reason"] == "ImmutableFieldChanged"
    assert "spec.distill, spec.storage changed after creation" in ignored["message"]
    assert ignored["observedGeneration"] == 2 and jobs.status("frozen")["observedGeneration"] == 2
    assert ("Warning", "ImmutableFieldChanged") in wait_for(lambda: jobs.events("frozen"), message="events")
    assert jobs.status("frozen")["state"] == "Running" and len(jobs.rayjobs()) == 1  # the attempt runs on
    assert _config(kube, kube_namespace, "frozen") == original  # never regenerated from the edited spec

    jobs.play_kuberay("frozen-0", "Failed", "FAILED")
    retry = jobs.rayjob("frozen-1")
    assert entrypoint(retry)[-1] == "resume_from_checkpoint=true"
    assert _claim(retry) == "checkpoints"  # the original storage, not the edited claim
    assert _config(kube, kube_namespace, "frozen") == original
    assert config_from_dict(original).max_steps == 10
    status = jobs.wait_state("frozen", "Restarting")
    assert status["restarts"] == 1  # backoffLimit 2 (the mutable edit) allowed the retry

    # Reverting the edit clears the condition.
    jobs.patch_spec("frozen", {"distill": {"max_steps": 10, "output_dir": None},
                               "storage": {"claimName": "checkpoints"}})
    wait_for(lambda: jobs.condition("frozen", "SpecChangeIgnored").get("status") == "False",
             message="SpecChangeIgnored cleared after the revert")


def test_invalid_edit_of_immutable_field_leaves_the_running_job_alone(operator, jobs, kube_namespace):
    jobs.create(distilljob("keep", kube_namespace))
    jobs.rayjob("keep-0")
    jobs.play_kuberay("keep-0", "Running", "RUNNING")
    jobs.wait_state("keep", "Running")
    jobs.patch_spec("keep", {"distill": {"teacher": {"device_mapping": [0]}}})  # the trainer's model refuses it
    wait_for(lambda: jobs.condition("keep", "SpecChangeIgnored").get("status") == "True", message="ignored")
    time.sleep(1.5)
    assert jobs.status("keep")["state"] == "Running" and jobs.rayjob("keep-0")


def test_an_invalid_edit_of_a_mutable_field_fails_the_job_and_deletes_its_rayjob(operator, jobs, kube_namespace):
    jobs.create(distilljob("borrow", kube_namespace))
    jobs.rayjob("borrow-0")
    jobs.play_kuberay("borrow-0", "Running", "RUNNING")
    jobs.wait_state("borrow", "Running")
    jobs.patch_spec("borrow", {"serviceAccountName": "admin"})  # not on the operator's allow-list
    jobs.wait_state("borrow", "Failed")
    failed = jobs.condition("borrow", "Failed")
    assert failed["reason"] == "InvalidSpec" and "spec.serviceAccountName" in failed["message"]
    wait_for(lambda: not jobs.rayjobs(), message="the RayJob of the failed job deleted")
    assert jobs.condition("borrow", "Running")["status"] == "False"


def test_a_job_that_cannot_keep_its_original_fails_and_its_rayjob_is_deleted(operator, jobs, kube, kube_namespace):
    jobs.create(distilljob("lost", kube_namespace))
    jobs.rayjob("lost-0")
    jobs.play_kuberay("lost-0", "Running", "RUNNING")
    jobs.wait_state("lost", "Running")
    kube.delete("v1", "ConfigMap", "lost-config", kube_namespace)  # the record of the original, gone
    jobs.patch_spec("lost", {"distill": {"max_steps": 99}})
    jobs.wait_state("lost", "Failed")
    failed = jobs.condition("lost", "Failed")
    assert failed["reason"] == "InvalidSpec" and "spec.distill changed after creation" in failed["message"]
    wait_for(lambda: not jobs.rayjobs(), message="the RayJob of the failed job deleted")


# --- 6: what a trainer may touch -----------------------------------------------------------------------------


def _token_client(kube_cluster, kube_api_client, namespace: str, account: str) -> client.ApiClient:
    """An ApiClient authenticated as ServiceAccount ``account`` (a TokenRequest, as the kubelet mounts one)."""
    core = client.CoreV1Api(kube_api_client)
    request = core.create_namespaced_service_account_token(
        account, namespace, client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(audiences=[]))
    )
    cfg = kube_cluster.configuration()
    cfg.api_key = {"authorization": request.status.token}
    return client.ApiClient(cfg)


def _forbidden(call) -> bool:
    try:
        call()
    except ApiException as error:
        return error.status == 403
    return False


def test_a_trainer_may_patch_its_own_progress_and_nothing_else(operator, jobs, kube, kube_cluster, kube_api_client,
                                                                kube_namespace):
    ns = kube_namespace
    jobs.create(distilljob("mine", ns))
    jobs.create(distilljob("theirs", ns, run_policy={"backoffLimit": 3}))
    mine_rayjob = jobs.rayjob("mine-0")
    jobs.rayjob("theirs-0")
    for job in ("mine", "theirs"):
        jobs.play_kuberay(f"{job}-0", "Running", "RUNNING")
        jobs.wait_state(job, "Running")
    # The per-job account, Role and RoleBinding, owned by the DistillJob; the Ray pods run as that account.
    uid = jobs.get("mine")["metadata"]["uid"]
    for api, kind, name in [("v1", "ServiceAccount", "mine-trainer"), ("v1", "ConfigMap", "mine-progress"),
                            ("rbac.authorization.k8s.io/v1", "Role", "mine-trainer"),
                            ("rbac.authorization.k8s.io/v1", "RoleBinding", "mine-trainer")]:
        assert [r["uid"] for r in kube.get(api, kind, name, ns)["metadata"]["ownerReferences"]] == [uid], kind
    head = mine_rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert head["serviceAccountName"] == "mine-trainer"

    with _token_client(kube_cluster, kube_api_client, ns, "mine-trainer") as trainer:
        # Its own progress: the real reporter, with the trainer's credentials.
        reporter = K8sProgressReporter("mine", ns, max_steps=10, min_interval_seconds=0)
        reporter._api = client.CoreV1Api(trainer)
        reporter.log(4, {"train/loss": 0.5})
        reporter.checkpoint_saved(4, "/checkpoints/mine/checkpoint-4")
        progress = wait_for(lambda: jobs.status("mine").get("progress", {}).get("lastCheckpoint")
                            and jobs.status("mine")["progress"], message="progress mirrored")
        assert progress["loss"] == 0.5 and progress["lastCheckpoint"] == "/checkpoints/mine/checkpoint-4"

        core, custom = client.CoreV1Api(trainer), client.CustomObjectsApi(trainer)
        report = {"data": {"progress.json": '{"step": 10}'}}
        assert _forbidden(lambda: core.patch_namespaced_config_map("theirs-progress", ns, report))
        assert _forbidden(lambda: core.read_namespaced_config_map("theirs-progress", ns))
        for job in ("mine", "theirs"):
            done = {"status": {"state": "Succeeded", "restarts": 0}}
            assert _forbidden(lambda: custom.patch_namespaced_custom_object_status(
                "kubedistill.io", "v1alpha1", ns, "distilljobs", job, done))
            assert _forbidden(lambda: custom.get_namespaced_custom_object("kubedistill.io", "v1alpha1", ns,
                                                                           "distilljobs", job))
        assert _forbidden(lambda: core.read_namespaced_config_map("mine-config", ns))
        assert _forbidden(lambda: core.patch_namespaced_config_map("mine-config", ns, {"data": {"distill.yaml": "x"}}))
        assert _forbidden(lambda: core.list_namespaced_config_map(ns))
        assert _forbidden(lambda: client.RbacAuthorizationV1Api(trainer).patch_namespaced_role(
            "mine-trainer", ns, {"rules": []}))

        # What it does write is only ever progress: a forged report changes no state, condition or restart count.
        before = jobs.status("mine")
        core.patch_namespaced_config_map("mine-progress", ns, {"data": {"progress.json": (
            '{"step": 7, "state": "Succeeded", "restarts": 0, "conditions": [], "loss": "NaN"}')}})
        wait_for(lambda: jobs.status("mine").get("progress", {}).get("step") == 7, message="forged report mirrored")
        after = jobs.status("mine")
        assert after["progress"] == {"step": 7}  # only the checked keys
        assert {k: v for k, v in after.items() if k != "progress"} == {k: v for k, v in before.items()
                                                                        if k != "progress"}
    assert jobs.status("theirs")["state"] == "Running" and "progress" not in jobs.status("theirs")


# --- 10: foreign objects with a child's name -----------------------------------------------------------------

FOREIGN = [
    ("v1", "ConfigMap", "{job}-config", {"data": {"distill.yaml": "someone else's"}}),
    ("v1", "ServiceAccount", "{job}-trainer", {}),
    ("rbac.authorization.k8s.io/v1", "Role", "{job}-trainer",
     {"rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}]}),
    ("ray.io/v1", "RayJob", "{job}-0", {"spec": {"entrypoint": "python theirs.py"}}),
]


@pytest.mark.parametrize("api, kind, pattern, body", FOREIGN, ids=[f[1] for f in FOREIGN])
def test_a_foreign_object_with_a_childs_name_is_never_written_and_named_in_a_condition(
    operator, jobs, kube, kube_namespace, api, kind, pattern, body
):
    name = pattern.format(job="adopt")
    foreign = kube.create({"apiVersion": api, "kind": kind, "metadata": {"name": name}, **body}, kube_namespace)
    jobs.create(distilljob("adopt", kube_namespace))
    conflict = wait_for(lambda: jobs.condition("adopt", "Conflict").get("status") == "True"
                        and jobs.condition("adopt", "Conflict"), message="Conflict condition")
    assert conflict["reason"] == "NameConflict" and f"{kind} {kube_namespace}/{name}" in conflict["message"]
    status = jobs.status("adopt")
    assert status["state"] == "Pending" and f"{kind} {kube_namespace}/{name}" in status["message"]
    assert "attempt" not in status
    time.sleep(1.5)  # several timer ticks: still untouched, no RayJob of ours, one event
    now = kube.get(api, kind, name, kube_namespace)
    assert not now["metadata"].get("ownerReferences")
    assert render.MANAGER not in {m["manager"] for m in now["metadata"].get("managedFields") or []}  # never written
    unchanged = lambda obj: {k: v for k, v in obj.items() if k not in ("metadata", "secrets")}  # noqa: E731
    assert unchanged(now) == unchanged(foreign)  # (the token controller adds a ServiceAccount's secrets)
    assert [r["metadata"]["name"] for r in jobs.rayjobs()] == ([name] if kind == "RayJob" else [])
    assert jobs.events("adopt").count(("Warning", "NameConflict")) == 1

    kube.delete(api, kind, name, kube_namespace)
    wait_for(lambda: jobs.condition("adopt", "Conflict").get("status") == "False", message="Conflict resolved")
    rayjob = wait_for(lambda: (r := kube.get(RAY_API, RAY_KIND, "adopt-0", kube_namespace))
                      and r["metadata"].get("ownerReferences") and r, message="our RayJob")
    assert rayjob["metadata"]["ownerReferences"][0]["uid"] == jobs.get("adopt")["metadata"]["uid"]
    assert jobs.status("adopt")["rayJobName"] == "adopt-0"


def test_the_trainer_role_of_a_job_is_not_widened_by_a_foreign_progress_configmap(operator, jobs, kube,
                                                                                    kube_namespace):
    # A ConfigMap someone else owns under the progress name: granting the trainer patch on it would hand over
    # someone else's data, so nothing is created or launched.
    kube.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "grab-progress"},
                 "data": {"secret": "value"}}, kube_namespace)
    jobs.create(distilljob("grab", kube_namespace))
    wait_for(lambda: jobs.condition("grab", "Conflict").get("status") == "True", message="Conflict condition")
    assert kube.get("rbac.authorization.k8s.io/v1", "Role", "grab-trainer", kube_namespace) is None
    assert not jobs.rayjobs()
    assert kube.get("v1", "ConfigMap", "grab-progress", kube_namespace)["data"] == {"secret": "value"}
