"""The kopf wiring: each handler passes its event to the operator's ``OperatorRuntime`` (runtime.py).

Triggers: a DistillJob the operator has not acted on yet (new, spec changed, or operator just started), any status
change of a RayJob the operator created, a trainer's progress report (its ``<job>-progress`` ConfigMap), and one
operator-wide timer loop for what is due by the clock (deadlines, TTL, Ray Jobs API polling) and for retrying failed
reconciles. The decisions live in conditions.py, the manifests in render.py, the state in runtime.py.

The runtime reaches the handlers through kopf's ``memo``: ``python -m distill_operator`` builds it from its flags;
``kopf run -m distill_operator.handlers`` (and the tests) get one configured from the environment at startup.
kopf keeps no state on the objects (only watch-event handlers: no annotations, no finalizers), so a DistillJob
stays deletable when the operator is not running.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import kopf

from distill_operator import access, metrics, render
from distill_operator.resources import GROUP, PLURAL, VERSION
from distill_operator.runtime import OperatorRuntime


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.posting.level = logging.WARNING  # our own events say what happened; skip "handler succeeded"
    settings.execution.max_workers = 16
    settings.watching.server_timeout = 300
    if memo.get("runtime") is None:  # kopf run -m distill_operator.handlers: configured from the environment
        memo.runtime = OperatorRuntime.from_env()
    memo.runtime.start_timer()
    memo.runtime.start_leader_election(memo.get("stop_operator"))  # no-op without --leader-election


@kopf.on.cleanup()
async def stop_timer(memo: kopf.Memo, **_: Any) -> None:
    if memo.get("runtime") is not None:
        memo.runtime.stop_timer()
        await asyncio.to_thread(memo.runtime.step_down)  # the leader hands its Lease over at once


SERVICE_ACCOUNT_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"


@kopf.on.login()
def login(**kwargs: Any) -> Any:
    """In-cluster service account, else KUBECONFIG (read at login time, not at import).

    In a pod: the kubernetes package's in-cluster config, which connects where the kubelet says the API server is
    (KUBERNETES_SERVICE_HOST/PORT), as runtime.api_client does; kopf.login_with_service_account would always use
    https://kubernetes.default.svc (tests/images/test_images.py, in-cluster)."""
    if os.environ.get("KUBERNETES_SERVICE_HOST") and os.path.exists(SERVICE_ACCOUNT_TOKEN):
        return kopf.login_via_client(**kwargs)
    return kopf.login_with_kubeconfig(**kwargs)


@kopf.on.event(GROUP, VERSION, PLURAL)
def distilljob_changed(type: str, body: Any, namespace: str, name: str, memo: kopf.Memo, **_: Any) -> None:
    """Create, resume and update in one: every watch event of a DistillJob, including the listing at start."""
    memo.runtime.distilljob_event(type, body, namespace, name)


@kopf.on.event("ray.io", "v1", "rayjobs", labels={render.LABEL_MANAGED_BY: render.MANAGER})
def rayjob_changed(type: str, body: Any, namespace: str, memo: kopf.Memo, **_: Any) -> None:
    """KubeRay updated (or someone deleted) a RayJob we own: reconcile its DistillJob now."""
    memo.runtime.rayjob_event(type, body, namespace)


@kopf.on.event(
    "", "v1", "configmaps",
    labels={render.LABEL_MANAGED_BY: render.MANAGER, access.COMPONENT_LABEL: access.PROGRESS_COMPONENT},
)
def progress_changed(type: str, body: Any, namespace: str, name: str, memo: kopf.Memo, **_: Any) -> None:
    """A trainer reported progress: mirror it (checked) into status.progress of the job that owns that ConfigMap."""
    memo.runtime.progress_event(type, body, namespace, name)


@kopf.on.probe(id="reconciles")
def reconciles_probe(**_: Any) -> float:
    return sum(sample.value for sample in metrics.RECONCILES.collect()[0].samples if sample.name.endswith("_total"))


@kopf.on.probe(id="apiContactSecondsAgo")
async def api_probe(memo: kopf.Memo, **_: Any) -> float:
    """/healthz fails (HTTP 500) once the API server has been unreachable, or the DistillJob watch silent about a
    change, for longer than --liveness-api-timeout (OperatorRuntime.health): kopf's own endpoint only shows that
    its server task is alive, which it stays through an API outage and with a dead watcher (kopf#1077)."""
    runtime = memo.get("runtime")
    if runtime is None:
        return 0.0
    problem = runtime.health()
    if problem:
        raise kopf.PermanentError(problem)
    return runtime.seconds_since_api_contact()
