"""access.py: what a trainer may touch (per-job account, Role, RoleBinding, progress ConfigMap) and how its report
becomes status.progress, without a cluster."""

from __future__ import annotations

import json

import pytest

from distill_operator import access, render
from distill_operator.render import JobRef
from distill_trainer import k8s_progress

JOB = JobRef(name="qwen", namespace="ml", uid="0123-uid")


def test_the_trainer_role_allows_get_and_patch_of_its_own_progress_configmap_only():
    role = access.render_trainer_role(JOB)
    assert role["metadata"]["name"] == "qwen-trainer" and role["metadata"]["namespace"] == "ml"
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["qwen-progress"], "verbs": ["get", "patch"]}
    ]
    assert "*" not in json.dumps(role["rules"])


def test_the_binding_names_the_account_the_pods_run_as():
    binding = access.render_trainer_rolebinding(JOB, "qwen-trainer")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "qwen-trainer"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "qwen-trainer", "namespace": "ml"}]
    assert access.render_trainer_rolebinding(JOB, "team-sa")["subjects"][0]["name"] == "team-sa"


def test_every_child_is_owned_by_the_distilljob_and_named_deterministically():
    built = [
        access.render_service_account(JOB),
        access.render_progress_configmap(JOB),
        access.render_trainer_role(JOB),
        access.render_trainer_rolebinding(JOB, "qwen-trainer"),
    ]
    assert [b["metadata"]["name"] for b in built] == ["qwen-trainer", "qwen-progress", "qwen-trainer", "qwen-trainer"]
    for b in built:
        assert b["metadata"]["ownerReferences"] == [render.owner_reference(JOB)]
        assert b["metadata"]["labels"][render.LABEL_MANAGED_BY] == render.MANAGER
    assert access.render_progress_configmap(JOB)["metadata"]["labels"][access.COMPONENT_LABEL] == "progress"
    assert access.render_progress_configmap(JOB)["data"] == {}
    long = JobRef("a" * 250, "ml", "u")
    assert len(render.progress_configmap_name(long)) <= 253 and len(access.trainer_role_name(long)) <= 253


def report(**fields):
    return {k8s_progress.PROGRESS_KEY: json.dumps(fields)}


def test_a_report_becomes_progress_with_types_and_bounds():
    good = dict(step=5, maxSteps=10, loss=1.25, tokensPerSecond=900.0, lastCheckpoint="/c/checkpoint-5",
                updatedAt="2025-01-01T00:00:00Z")
    assert access.progress_from_report(report(**good)) == good
    assert access.progress_from_report(report(step=5, extra="x", state="Succeeded")) == {"step": 5}


@pytest.mark.parametrize(
    "data",
    [
        None,
        {},
        {k8s_progress.PROGRESS_KEY: "not json"},
        {k8s_progress.PROGRESS_KEY: "[1, 2]"},
        {k8s_progress.PROGRESS_KEY: json.dumps({"lastCheckpoint": "x" * 20_000})},  # over the size bound
        report(step=-1, maxSteps=True, loss=float("nan"), tokensPerSecond=-3.0, lastCheckpoint="a\nb",
               updatedAt="x" * 100),
        report(step=10**13, loss="1.0", lastCheckpoint=""),
    ],
)
def test_a_bad_report_is_dropped_field_by_field_and_never_raises(data):
    assert access.progress_from_report(data) == {}
