"""Invalid DistillJobs are rejected by the API server at `kubectl apply`, and the message names the field.

Only the CRD's OpenAPI schema (crds/distilljob.yaml, generated from resources.py) is at work here: no operator
runs. The API server is the real kube-apiserver 1.20 started by tests/kube_cluster.py.
"""

from __future__ import annotations

import copy

import pytest
import yaml

from tests.integration.operator_fixtures import distilljob, distilljob_crd  # noqa: F401

pytestmark = pytest.mark.k8s


def _set(body: dict, path: str, value) -> dict:
    body = copy.deepcopy(body)
    *parents, leaf = path.split(".")
    node = body
    for key in parents:
        node = node.setdefault(key, {})
    if value is _DELETE:
        node.pop(leaf)
    else:
        node[leaf] = value
    return body


_DELETE = object()

MISTAKES = [
    # (what is wrong, path to change, bad value, field path the message must name)
    ("unknown objective", "spec.distill.kd_objective", "kl", "spec.distill.kd_objective"),
    ("loss weight above 1", "spec.distill.distill_loss_weight", 1.5, "spec.distill.distill_loss_weight"),
    ("zero temperature", "spec.distill.kd_temperature", 0, "spec.distill.kd_temperature"),
    ("negative teacher temperature", "spec.distill.teacher_temperature", -1.0, "spec.distill.teacher_temperature"),
    ("negative top-k", "spec.distill.logits_topk", -1, "spec.distill.logits_topk"),
    ("zero max_steps", "spec.distill.max_steps", 0, "spec.distill.max_steps"),
    ("missing student model", "spec.distill.student_pretrain", _DELETE, "spec.distill.student_pretrain"),
    ("missing image", "spec.image", _DELETE, "spec.image"),
    ("string where a number goes", "spec.distill.max_steps", "ten", "spec.distill.max_steps"),
    ("nested learning rate of 0", "spec.distill.student.training_args.learning_rate", 0,
     "spec.distill.student.training_args.learning_rate"),
    ("no worker replicas", "spec.workers.replicas", 0, "spec.workers.replicas"),
    ("negative backoffLimit", "spec.runPolicy.backoffLimit", -1, "spec.runPolicy.backoffLimit"),
    ("zero activeDeadlineSeconds", "spec.runPolicy.activeDeadlineSeconds", 0, "spec.runPolicy.activeDeadlineSeconds"),
    ("unknown launcher", "spec.launcher.type", "Slurm", "spec.launcher.type"),
    ("relative mount path", "spec.storage.mountPath", "ckpt", "spec.storage.mountPath"),
    ("storage without a claim", "spec.storage.claimName", _DELETE, "spec.storage.claimName"),
    ("bad dtype", "spec.distill.teacher.model_args.dtype", "fp8", "spec.distill.teacher.model_args.dtype"),
    ("ray address with a path and query", "spec.launcher.rayAddress", "http://host:8265/any/path?x=1",
     "spec.launcher.rayAddress"),
    ("ray address with a user", "spec.launcher.rayAddress", "http://user:secret@host:8265", "spec.launcher.rayAddress"),
    ("ray address without a scheme", "spec.launcher.rayAddress", "host:8265", "spec.launcher.rayAddress"),
    ("root user for the ray pods", "spec.podSecurity.runAsUser", 0, "spec.podSecurity.runAsUser"),
    ("typo in a field name", "spec.distill.learning_rat", 0.1, "learning_rat"),
]


def _names_field(message: str, field: str) -> bool:
    """The API server says `spec.distill.kd_temperature`; kubectl's client-side check says
    `ValidationError(DistillJob.spec.distill): ... "kd_temperature"` or `...spec.distill.kd_temperature`."""
    parent, _, leaf = field.rpartition(".")
    return field in message or (f"DistillJob.{parent}" in message and f'"{leaf}"' in message)


@pytest.mark.parametrize("what, path, value, field", MISTAKES, ids=[m[0].replace(" ", "-") for m in MISTAKES])
def test_invalid_manifest_is_rejected_with_field_path(kubectl, kube_namespace, distilljob_crd, what, path, value, field):
    manifest = yaml.safe_dump(_set(distilljob("bad", kube_namespace), path, value))
    # What a user sees: kubectl apply (kubectl checks against the schema the API server publishes, then the server).
    result = kubectl("apply", "-f", "-", input=manifest, check=False)
    assert result.returncode != 0, f"{what}: accepted\n{result.stdout}"
    assert _names_field(result.stderr, field), f"{what}: {result.stderr}"
    if what == "typo in a field name":
        return  # a 1.20 API server prunes unknown fields silently; only kubectl's check (and >= 1.25 servers) reject it
    # The API server alone rejects it too (no client-side validation), naming the full field path.
    result = kubectl("apply", "--validate=false", "-f", "-", input=manifest, check=False)
    assert result.returncode != 0, f"{what}: accepted by the API server\n{result.stdout}"
    assert field in result.stderr, f"{what}: {result.stderr}"


def test_valid_manifest_and_example_are_accepted(kubectl, kube_namespace, distilljob_crd):
    body = distilljob("good", kube_namespace, run_policy={"suspend": True})
    body["spec"]["distill"]["resume_from_checkpoint"] = True  # bool | str: preserved, checked by the operator
    result = kubectl("apply", "-f", "-", input=yaml.safe_dump(body))
    assert "created" in result.stdout
    got = kubectl("get", "dj", "good", "-n", kube_namespace, "-o", "yaml")
    assert yaml.safe_load(got.stdout)["spec"]["distill"]["resume_from_checkpoint"] is True
    listing = kubectl("get", "distilljobs", "-n", kube_namespace)
    assert listing.stdout.split()[:7] == ["NAME", "STATE", "REASON", "STEP", "MAX", "LOSS", "AGE"]


@pytest.mark.parametrize("example", ["distilljob-qwen.yaml", "distilljob-tiny-local.yaml",
                                     "distilljob-qwen-on-policy.yaml"])
def test_example_manifests_are_accepted(kubectl, kube_namespace, distilljob_crd, example):
    path = f"examples/manifests/{example}"
    result = kubectl("apply", "--dry-run=server", "-n", kube_namespace, "-f", path)
    assert "created (server dry run)" in result.stdout
