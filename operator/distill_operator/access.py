"""Pure builders of what a trainer may touch: one ServiceAccount, one progress ConfigMap, one Role, one RoleBinding
per DistillJob, all owned by it (garbage-collected with it), with deterministic names.

Why not ``patch`` on ``distilljobs/status``: RBAC cannot limit which fields of a status a subject patches, so a
trainer holding it could rewrite conditions, restarts or the state of any job in the namespace. Instead the
trainer writes its report into ``<job>-progress`` and may read and patch that one object (``resourceNames``)
and nothing else; the operator validates the report and mirrors it into ``status.progress``. Everything the
operator decides from (state, conditions, restarts, completion) comes from the RayJob and its own status.

The Role's rule is within what the operator itself holds (get/patch on ConfigMaps), so creating the binding
needs no ``bind`` or ``escalate`` permission.
"""

from __future__ import annotations

import json
import math
from typing import Any, Mapping

from distill_operator.render import JobRef, labels, owner_reference, progress_configmap_name, trainer_service_account
from distill_trainer.shared_names import PROGRESS_KEY

COMPONENT_LABEL = "app.kubernetes.io/component"
PROGRESS_COMPONENT = "progress"
RBAC_API = "rbac.authorization.k8s.io/v1"


def trainer_role_name(job: JobRef) -> str:
    """The per-job Role and RoleBinding (one name for both, the same as the per-job ServiceAccount's)."""
    return trainer_service_account(job)


def _metadata(job: JobRef, name: str, **extra_labels: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": job.namespace,
        "labels": {**labels(job), **extra_labels},
        "ownerReferences": [owner_reference(job)],
    }


def render_service_account(job: JobRef) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _metadata(job, trainer_service_account(job))}


def render_progress_configmap(job: JobRef) -> dict[str, Any]:
    """Created empty by the operator; the trainer patches ``data[PROGRESS_KEY]`` (a JSON object)."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(job, progress_configmap_name(job), **{COMPONENT_LABEL: PROGRESS_COMPONENT}),
        "data": {},
    }


def render_trainer_role(job: JobRef) -> dict[str, Any]:
    """get and patch of this job's progress ConfigMap, nothing else (no list/watch: resourceNames cannot limit them)."""
    return {
        "apiVersion": RBAC_API,
        "kind": "Role",
        "metadata": _metadata(job, trainer_role_name(job)),
        "rules": [
            {
                "apiGroups": [""],
                "resources": ["configmaps"],
                "resourceNames": [progress_configmap_name(job)],
                "verbs": ["get", "patch"],
            }
        ],
    }


def render_trainer_rolebinding(job: JobRef, service_account: str) -> dict[str, Any]:
    """Binds the per-job Role to the account the Ray pods run as (the per-job one, or spec.serviceAccountName)."""
    return {
        "apiVersion": RBAC_API,
        "kind": "RoleBinding",
        "metadata": _metadata(job, trainer_role_name(job)),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": trainer_role_name(job)},
        "subjects": [{"kind": "ServiceAccount", "name": service_account, "namespace": job.namespace}],
    }


# --- the trainer's report -> status.progress ----------------------------------------------------------------

PROGRESS_FIELDS = ("step", "maxSteps", "loss", "tokensPerSecond", "lastCheckpoint", "updatedAt")
MAX_REPORT_BYTES = 16 * 1024
MAX_STEP = 10**12
MAX_TEXT = 1024


def _integer(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_STEP:
        return None
    return value


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) and abs(value) <= 1e30 else None


def _text(value: Any, limit: int = MAX_TEXT) -> str | None:
    if not isinstance(value, str) or not value or len(value) > limit or not value.isprintable():
        return None
    return value


def progress_from_report(data: Mapping[str, Any] | None) -> dict[str, Any]:
    """The trainer's report (``data`` of its progress ConfigMap) as ``status.progress``: only known keys, each of
    its type and within bounds (int steps in [0, 1e12], finite numbers, printable strings of <= 1024 chars);
    anything else is dropped. Never raises: the report is input from a pod the operator does not trust."""
    text = (data or {}).get(PROGRESS_KEY)
    if not isinstance(text, str) or len(text) > MAX_REPORT_BYTES:
        return {}
    try:
        report = json.loads(text)
    except ValueError:
        return {}
    if not isinstance(report, dict):
        return {}
    checks: dict[str, Any] = {
        "step": _integer,
        "maxSteps": _integer,
        "loss": _number,
        "tokensPerSecond": lambda v: None if (n := _number(v)) is None or n < 0 else n,
        "lastCheckpoint": _text,
        "updatedAt": lambda v: _text(v, 64),
    }
    out = {}
    for key, check in checks.items():
        value = check(report.get(key))
        if value is not None:
            out[key] = value
    return out
