"""Creating a DistillJob's children without ever writing to an object the job does not own.

Every child has a deterministic name, so an object of that name may already exist: ours from an earlier
reconcile (fine), or someone else's (a ``ChildConflict``: the operator neither adopts nor modifies it, nothing
is launched, and the job gets a ``Conflict`` condition naming the object). Ownership is a controller
``ownerReference`` carrying the DistillJob's uid.

The config ConfigMap is created once and never rewritten: it holds the trainer YAML of the job's original spec
and, in an annotation, the original immutable fields (``resources.IMMUTABLE_SPEC_FIELDS``), which the operator
reads back (checked against ``status.specHashes``) to keep running the original when those fields are edited.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Mapping

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from distill_operator import access, render
from distill_operator.conditions import spec_hashes
from distill_operator.render import JobRef
from distill_operator.resources import IMMUTABLE_SPEC_FIELDS, DistillJobSpec
from distill_trainer import shared_names

FROZEN_SPEC_ANNOTATION = f"{shared_names.GROUP}/original-spec"


class ChildConflict(Exception):
    """A child's name is taken by an object the DistillJob does not own."""

    def __init__(self, kind: str, namespace: str, name: str):
        self.kind, self.namespace, self.name = kind, namespace, name
        super().__init__(f"{kind} {namespace}/{name} exists and is not owned by this DistillJob")


def _owner_uids(obj: Any) -> list[str]:
    if isinstance(obj, Mapping):
        return [ref.get("uid") for ref in (obj.get("metadata") or {}).get("ownerReferences") or []]
    return [ref.uid for ref in (obj.metadata.owner_references or [])]


def owned_by(obj: Any, job: JobRef) -> bool:
    """Whether ``obj`` (a dict or a kubernetes client model) has an ownerReference to this DistillJob's uid."""
    return bool(job.uid) and job.uid in _owner_uids(obj)


def ensure(
    kind: str,
    job: JobRef,
    manifest: dict[str, Any],
    create: Callable[[dict[str, Any]], Any],
    read: Callable[[str], Any],
    update: Callable[[Any], None] | None = None,
) -> None:
    """Create ``manifest``; if its name exists: ours -> ``update(existing)`` (when given), else ChildConflict."""
    name = manifest["metadata"]["name"]
    try:
        create(manifest)
        return
    except ApiException as error:
        if error.status != 409:
            raise
    existing = read(name)
    if not owned_by(existing, job):
        raise ChildConflict(kind, job.namespace, name)
    if update is not None:
        update(existing)


def _frozen(raw_spec: Mapping[str, Any]) -> dict[str, Any]:
    return {name: raw_spec[name] for name in IMMUTABLE_SPEC_FIELDS if name in raw_spec}


def ensure_config(core: client.CoreV1Api, spec: DistillJobSpec, raw_spec: Mapping[str, Any], job: JobRef) -> None:
    """The trainer ConfigMap, created once from the job's original spec; an existing one of ours is left as is."""
    manifest = render.render_configmap(spec, job)
    manifest["metadata"]["annotations"] = {
        FROZEN_SPEC_ANNOTATION: json.dumps(_frozen(raw_spec), sort_keys=True, separators=(",", ":"))
    }
    ensure(
        "ConfigMap",
        job,
        manifest,
        lambda m: core.create_namespaced_config_map(job.namespace, m, field_manager=render.MANAGER),
        lambda name: core.read_namespaced_config_map(name, job.namespace),
    )


def original_spec(core: client.CoreV1Api, job: JobRef, hashes: Mapping[str, str]) -> dict[str, Any] | None:
    """The immutable fields as first seen, from our config ConfigMap, if it is ours and matches ``hashes``."""
    try:
        configmap = core.read_namespaced_config_map(render.configmap_name(job), job.namespace)
    except ApiException as error:
        if error.status == 404:
            return None
        raise
    if not owned_by(configmap, job):
        return None
    try:
        frozen = json.loads((configmap.metadata.annotations or {}).get(FROZEN_SPEC_ANNOTATION) or "")
    except ValueError:
        return None
    if not isinstance(frozen, dict) or any(spec_hashes(frozen)[k] != v for k, v in hashes.items()):
        return None
    return frozen


def with_original(raw_spec: Mapping[str, Any], original: Mapping[str, Any]) -> dict[str, Any]:
    """The spec as edited, with its immutable fields put back to the original."""
    out = {k: v for k, v in raw_spec.items() if k not in IMMUTABLE_SPEC_FIELDS}
    out.update(original)
    return out


def ensure_trainer_access(
    core: client.CoreV1Api, rbac: client.RbacAuthorizationV1Api, spec: DistillJobSpec, job: JobRef, pods: bool
) -> None:
    """The progress ConfigMap the trainer writes, and, when the operator runs the Ray pods (``pods``: KubeRay),
    the per-job ServiceAccount (unless the spec names one) with a Role/RoleBinding that allows get/patch of that
    ConfigMap only. Created before the RayJob; a Role or RoleBinding of ours is reset to what it should be."""
    ns = job.namespace
    ensure(
        "ConfigMap",
        job,
        access.render_progress_configmap(job),
        lambda m: core.create_namespaced_config_map(ns, m, field_manager=render.MANAGER),
        lambda name: core.read_namespaced_config_map(name, ns),
    )  # never rewritten: its data is the trainer's report
    if not pods:
        return
    account = render.service_account(spec, job)
    if not spec.service_account_name:
        ensure(
            "ServiceAccount",
            job,
            access.render_service_account(job),
            lambda m: core.create_namespaced_service_account(ns, m, field_manager=render.MANAGER),
            lambda name: core.read_namespaced_service_account(name, ns),
        )
    role = access.render_trainer_role(job)
    ensure(
        "Role",
        job,
        role,
        lambda m: rbac.create_namespaced_role(ns, m, field_manager=render.MANAGER),
        lambda name: rbac.read_namespaced_role(name, ns),
        lambda _: rbac.patch_namespaced_role(
            role["metadata"]["name"], ns, {"rules": role["rules"]}, field_manager=render.MANAGER
        ),
    )
    binding = access.render_trainer_rolebinding(job, account)
    ensure(
        "RoleBinding",
        job,
        binding,
        lambda m: rbac.create_namespaced_role_binding(ns, m, field_manager=render.MANAGER),
        lambda name: rbac.read_namespaced_role_binding(name, ns),
        lambda _: rbac.patch_namespaced_role_binding(
            binding["metadata"]["name"], ns, {"subjects": binding["subjects"]}, field_manager=render.MANAGER
        ),
    )
