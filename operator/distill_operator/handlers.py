"""The kopf wiring: every trigger calls ``reconcile``; the decisions live in conditions.py, the manifests in render.py.

Triggers: a DistillJob the operator has not acted on yet (new, spec changed, or operator just started), any status
change of a RayJob the operator created, and one operator-wide timer loop for what is due by the clock (deadlines,
TTL, Ray Jobs API polling) and for retrying failed reconciles. ``reconcile`` reads the DistillJob fresh, observes the current attempt,
asks ``conditions.decide`` what to do, does it (launch / stop / delete), then writes the operator's status keys
with a merge patch that never contains ``status.progress`` (the trainer's, written with server-side apply).
Reconciles of one job are serialized by a lock; children have deterministic names, so running it twice, or
after an operator restart, never creates a second RayJob.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from datetime import datetime, timezone
from functools import partial
from typing import Any

import kopf
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from distill_operator import metrics, render
from distill_operator.conditions import OPERATOR_STATUS_KEYS, decide, needs_reconcile, timer_due
from distill_operator.launchers import launcher_for
from distill_operator.render import JobRef
from distill_operator.resources import GROUP, KIND, PLURAL, TERMINAL_STATES, VERSION, parse_spec
from distill_operator.settings import OperatorSettings, check_allowed
from distill_trainer.config import format_validation_error

log = logging.getLogger(__name__)

# Seconds between ticks of the timer loop (deadlines, TTL and the RayAddress launcher are checked on ticks).
RECONCILE_INTERVAL = float(os.environ.get("KUBEDISTILL_RECONCILE_INTERVAL_SECONDS", "10"))

_api: client.ApiClient | None = None
_api_lock = threading.Lock()
_locks: dict[tuple[str, str], threading.Lock] = {}
_locks_lock = threading.Lock()


def api_client() -> client.ApiClient:
    """In-cluster credentials when running in a pod, else KUBECONFIG / ~/.kube/config."""
    global _api
    with _api_lock:
        if _api is None:
            configuration = client.Configuration()
            try:
                config.load_incluster_config(client_configuration=configuration)
            except config.ConfigException:
                # KUBECONFIG is read now: the kubernetes package reads it once at import, which may be too early.
                config.load_kube_config(config_file=os.environ.get("KUBECONFIG"), client_configuration=configuration)
            configuration.connection_pool_maxsize = 32
            _api = client.ApiClient(configuration)
        return _api


def reset_api_client() -> None:
    global _api
    with _api_lock:
        _api = None


def _lock_for(namespace: str, name: str) -> threading.Lock:
    with _locks_lock:
        return _locks.setdefault((namespace, name), threading.Lock())


def reconcile(namespace: str, name: str, handler: str, fresh_body: Any = None) -> None:
    """Reconcile one DistillJob; failures are retried on the next timer tick.

    ``fresh_body`` may be passed for a job the operator has never written to (nothing to be stale about);
    otherwise the job is read from the API server under the job's lock.
    """
    try:
        with metrics.track(handler), _lock_for(namespace, name):
            _reconcile(namespace, name, fresh_body)
    except Exception:
        _retry.add((namespace, name))
        raise
    _retry.discard((namespace, name))


def _reconcile(namespace: str, name: str, fresh_body: Any = None) -> None:
    api = api_client()
    custom = client.CustomObjectsApi(api)
    body = fresh_body if (namespace, name) not in _acted else None  # once we wrote to it, read it fresh
    if body is None:
        try:
            body = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except ApiException as error:
            if error.status == 404:
                return
            raise
    if body["metadata"].get("deletionTimestamp"):
        return
    job = JobRef.from_body(body)
    status = body.get("status") or {}
    spec = launcher = None
    spec_error = None
    try:
        spec = parse_spec(body.get("spec") or {})
        check_allowed(spec, job, OperatorSettings.from_env())  # service account / claim allow-lists
        launcher = launcher_for(spec, api)
    except ValidationError as error:
        spec, spec_error = None, format_validation_error(error, "spec").replace("\n", ";")
    except ValueError as error:
        spec, spec_error = None, str(error)
    attempt = status.get("attempt")
    observation = launcher.observe(job, attempt) if launcher and attempt is not None else None
    decision = decide(
        spec=spec,
        spec_error=spec_error,
        status=status,
        generation=body["metadata"].get("generation"),
        observation=observation,
        now=datetime.now(timezone.utc),
        run_name=partial(launcher.run_name, job) if launcher else None,
    )

    if decision.action == "launch":
        _ensure_configmap(client.CoreV1Api(api), spec, job)
        launcher.launch(spec, job, decision.attempt, decision.resume, decision.remaining_deadline)
        if decision.status.get("restarts", 0) > (status.get("restarts") or 0):
            metrics.RESTARTS.inc()
    elif decision.action == "stop":
        launcher.stop(job, decision.attempt)
    elif decision.action == "delete_job":
        log.info("ttlSecondsAfterFinished passed: deleting DistillJob %s/%s", namespace, name)
        try:
            custom.delete_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name, propagation_policy="Background"
            )
        except ApiException as error:
            if error.status != 404:
                raise
        metrics.forget(namespace, name)
        return

    new = {k: decision.status[k] for k in OPERATOR_STATUS_KEYS if k in decision.status}
    if any(status.get(k) != v for k, v in new.items()):
        custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, PLURAL, name, {"status": new},
            field_manager=render.MANAGER, _content_type="application/merge-patch+json",
        )
        _acted.add((namespace, name))
    for type_, reason, message in decision.events:
        post_event(client.CoreV1Api(api), body, type_, reason, message)
    metrics.record_conditions(namespace, name, new.get("conditions", []))


def _ensure_configmap(core: client.CoreV1Api, spec: Any, job: JobRef) -> None:
    """Create the trainer ConfigMap, or bring its data up to date (the spec may change while suspended)."""
    manifest = render.render_configmap(spec, job)
    try:
        core.create_namespaced_config_map(job.namespace, manifest, field_manager=render.MANAGER)
    except ApiException as error:
        if error.status != 409:
            raise
        core.patch_namespaced_config_map(
            manifest["metadata"]["name"], job.namespace, {"data": manifest["data"]}, field_manager=render.MANAGER
        )


def post_event(core: client.CoreV1Api, body: Any, type_: str, reason: str, message: str) -> None:
    """A core/v1 Event on the DistillJob (kubectl describe dj shows it). Never fails the reconcile."""
    meta = body["metadata"]
    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    event = {
        "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
        "involvedObject": {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": KIND,
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta.get("uid"),
            "resourceVersion": meta.get("resourceVersion"),
        },
        "type": type_,
        "reason": reason,
        "message": message[:1024],
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
        "source": {"component": render.MANAGER},
        "reportingComponent": render.MANAGER,
    }
    try:
        core.create_namespaced_event(meta["namespace"], event)
    except ApiException as error:
        log.warning("could not post event %s on %s/%s: %s", reason, meta["namespace"], meta["name"], error.reason)


# --- kopf wiring -------------------------------------------------------------------------------------------


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # Only watch-event handlers are used: kopf keeps no state on the objects (no annotations, no finalizers),
    # so a DistillJob stays deletable when the operator is not running.
    settings.posting.level = logging.WARNING  # our own events say what happened; skip "handler succeeded"
    settings.execution.max_workers = 16
    settings.watching.server_timeout = 300
    global _timer_task
    _timer_task = asyncio.create_task(_timer_loop())


@kopf.on.cleanup()
async def stop_timer(**_: Any) -> None:
    if _timer_task is not None:
        _timer_task.cancel()


@kopf.on.login()
def login(**kwargs: Any) -> Any:
    """In-cluster service account, else KUBECONFIG (read at login time, not at import)."""
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


# The last watched spec/status of every DistillJob, for the timer loop (no API calls to find what is due),
# and the jobs whose last reconcile failed (retried on the next tick).
_watched: dict[tuple[str, str], tuple[dict[str, Any], dict[str, Any]]] = {}
_retry: set[tuple[str, str]] = set()
_acted: set[tuple[str, str]] = set()  # jobs whose status this process has written
_timer_task: asyncio.Task | None = None


@kopf.on.event(GROUP, VERSION, PLURAL)
def distilljob_changed(type: str, body: Any, namespace: str, name: str, **_: Any) -> None:
    """Create, resume and update in one: every watch event of a DistillJob, including the listing at start.

    It reconciles when the operator has not yet acted on this generation (a new job, a spec change such as
    suspend/resume) or when the operator just started (``type`` None: resume). Status writes (ours, and the
    trainer's progress) do not change the generation, so they do not trigger a reconcile.
    """
    key = (namespace, name)
    if type == "DELETED":
        _watched.pop(key, None)
        _retry.discard(key)
        _acted.discard(key)
        metrics.forget(namespace, name)
        with _locks_lock:
            _locks.pop(key, None)
        return
    spec, status = dict(body.get("spec") or {}), dict(body.get("status") or {})
    _watched[key] = (spec, status)
    if status.get("state") in TERMINAL_STATES and not needs_reconcile(body):
        metrics.record_conditions(namespace, name, status.get("conditions") or [])
        return  # finished: nothing to resume (the timer loop handles a TTL)
    if type is None or needs_reconcile(body):
        reconcile(namespace, name, "distilljob", fresh_body=body if not status else None)


@kopf.on.event("ray.io", "v1", "rayjobs", labels={render.LABEL_MANAGED_BY: render.MANAGER})
def rayjob_changed(type: str, body: Any, namespace: str, **_: Any) -> None:
    """KubeRay updated (or someone deleted) a RayJob we own: reconcile its DistillJob now."""
    if type in ("ADDED", None) and not body.get("status"):
        return  # our own create (or a restart's listing) before KubeRay wrote anything: nothing to react to
    for ref in body.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("kind") == KIND and ref.get("apiVersion", "").startswith(f"{GROUP}/"):
            reconcile(namespace, ref["name"], "rayjob")


async def _timer_loop() -> None:
    """Every RECONCILE_INTERVAL: reconcile the jobs whose deadline or TTL has come, RayAddress jobs (no watch),
    and jobs whose last reconcile failed. One loop for the operator, not a kopf timer per object (those need a
    finalizer on every DistillJob and wake every job on every tick)."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(RECONCILE_INTERVAL)
        now = datetime.now(timezone.utc)
        due = {key for key, (spec, status) in list(_watched.items()) if timer_due(spec, status, now)}
        for namespace, name in sorted(due | (_retry & _watched.keys())):
            try:
                await loop.run_in_executor(None, reconcile, namespace, name, "timer")
            except Exception:  # noqa: BLE001 - counted in metrics; retried on the next tick
                log.exception("reconcile of %s/%s failed; retrying on the next tick", namespace, name)


@kopf.on.probe(id="reconciles")
def reconciles_probe(**_: Any) -> float:
    return sum(sample.value for sample in metrics.RECONCILES.collect()[0].samples if sample.name.endswith("_total"))
