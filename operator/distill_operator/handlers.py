"""The kopf wiring: every trigger calls ``reconcile``; the decisions live in conditions.py, the manifests in render.py.

Triggers: a DistillJob the operator has not acted on yet (new, spec changed, or operator just started), any status
change of a RayJob the operator created, and one operator-wide timer loop for what is due by the clock (deadlines,
TTL, Ray Jobs API polling) and for retrying failed reconciles. ``reconcile`` reads the DistillJob fresh, observes the current attempt,
asks ``conditions.decide`` what to do, does it (launch / stop / delete), then writes the operator's status keys
with a merge patch. Reconciles of one job are serialized by a lock; children have deterministic names, so running
it twice, or after an operator restart, never creates a second RayJob, and a name taken by an object the job does
not own is a ``Conflict`` condition, never a write to that object (children.py).

Edits of the immutable spec fields are ignored: the job runs with the original ones, read back from its config
ConfigMap (children.py), and a ``SpecChangeIgnored`` condition names the field. The trainer's progress reports
(its ``<job>-progress`` ConfigMap, the only object it may write) are checked and mirrored into ``status.progress``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from datetime import datetime, timezone
from functools import partial
from types import SimpleNamespace
from typing import Any

import kopf
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from distill_operator import access, children, metrics, render
from distill_operator.conditions import (
    OPERATOR_STATUS_KEYS,
    changed_fields,
    decide,
    launch_blocked,
    needs_reconcile,
    spec_hashes,
    timer_due,
)
from distill_operator.launchers import launcher_for
from distill_operator.render import JobRef
from distill_operator.resources import GROUP, KIND, PLURAL, TERMINAL_STATES, VERSION, LauncherSpec, parse_spec
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
    core = client.CoreV1Api(api)
    now = datetime.now(timezone.utc)
    generation = body["metadata"].get("generation")

    # Immutable fields: the original ones, whatever the spec says now (conditions.changed_fields names edits).
    raw = body.get("spec") or {}
    hashes = status.get("specHashes") or spec_hashes(raw)
    ignored = changed_fields(raw, hashes)
    effective, spec_error = raw, None
    if ignored:
        original = children.original_spec(core, job, hashes)
        if original is None:
            spec_error = (
                f"{', '.join(ignored)} changed after creation and the original configuration (ConfigMap "
                f"{render.configmap_name(job)}) is gone: revert the edit, or delete and re-create the DistillJob"
            )
        else:
            effective = children.with_original(raw, original)
    spec = launcher = None
    if spec_error is None:
        try:
            spec = parse_spec(effective)
            check_allowed(spec, job, OperatorSettings.from_env())  # service account / claim allow-lists
            launcher = launcher_for(spec, api)
        except ValidationError as error:
            spec, spec_error = None, format_validation_error(error, "spec").replace("\n", ";")
        except ValueError as error:
            spec, spec_error = None, str(error)
    if launcher is None:
        launcher = _launcher_of_invalid_spec(effective, api)  # still able to stop what runs
    attempt = status.get("attempt")
    observation = launcher.observe(job, attempt) if launcher and attempt is not None else None
    decision = decide(
        spec=spec,
        spec_error=spec_error,
        status=status,
        generation=generation,
        observation=observation,
        now=now,
        run_name=partial(launcher.run_name, job) if launcher else None,
        hashes=hashes,
        ignored_changes=ignored,
    )

    try:
        first = not status.get("specHashes") and decision.status.get("state") not in TERMINAL_STATES
        if spec is not None and (first or decision.action == "launch"):
            children.ensure_config(core, spec, effective, job)  # the record of the original, from the start
        if decision.action == "launch":
            children.ensure_trainer_access(
                core, client.RbacAuthorizationV1Api(api), spec, job, pods=launcher.kind == "KubeRay"
            )
            launcher.launch(spec, job, decision.attempt, decision.resume, decision.remaining_deadline)
            if decision.status.get("restarts", 0) > (status.get("restarts") or 0):
                metrics.RESTARTS.inc()
    except children.ChildConflict as conflict:
        decision = launch_blocked(status, decision, str(conflict), now, generation)
        # Logged once, when the Conflict condition appears (it is retried quietly on every tick).
        level = logging.WARNING if decision.events else logging.DEBUG
        log.log(level, "DistillJob %s/%s: %s", namespace, name, conflict)
    if decision.action == "stop" and launcher is not None:
        launcher.stop(job, decision.attempt)
    elif decision.action == "delete_job":
        log.info("ttlSecondsAfterFinished passed: deleting DistillJob %s/%s", namespace, name)
        try:
            custom.delete_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name, propagation_policy="Background",
                body=client.V1DeleteOptions(preconditions=client.V1Preconditions(uid=job.uid)),
            )
        except ApiException as error:
            if error.status not in (404, 409):
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
        post_event(core, body, type_, reason, message)
    metrics.record_conditions(namespace, name, new.get("conditions", []))


def _launcher_of_invalid_spec(spec: dict[str, Any], api: client.ApiClient) -> Any:
    """For a spec that does not validate: a launcher built from spec.launcher alone, to stop a running attempt."""
    try:
        return launcher_for(SimpleNamespace(launcher=LauncherSpec.model_validate(spec.get("launcher") or {})), api)
    except (ValidationError, ValueError):
        return None


def mirror_progress(namespace: str, name: str, data: Any) -> None:
    """The trainer's report (its progress ConfigMap's data), checked, into status.progress of its DistillJob."""
    progress = access.progress_from_report(data)
    key = (namespace, name)
    if not progress or key not in _watched:
        return
    with _lock_for(namespace, name):
        if (_watched[key][1].get("progress") or {}) == progress:
            return
        # A merge patch: keys the report no longer has are removed (null).
        patch = {"status": {"progress": {k: progress.get(k) for k in access.PROGRESS_FIELDS}}}
        try:
            client.CustomObjectsApi(api_client()).patch_namespaced_custom_object_status(
                GROUP, VERSION, namespace, PLURAL, name, patch,
                field_manager=render.MANAGER, _content_type="application/merge-patch+json",
            )
        except ApiException as error:
            if error.status != 404:
                raise
        _acted.add(key)


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
# (namespace, progress ConfigMap name) -> (DistillJob name, uid): which job a progress report belongs to, from the
# operator's own records (never from labels or owners on the ConfigMap, which its trainer may patch).
_progress_of: dict[tuple[str, str], tuple[str, str]] = {}
_timer_task: asyncio.Task | None = None


@kopf.on.event(GROUP, VERSION, PLURAL)
def distilljob_changed(type: str, body: Any, namespace: str, name: str, **_: Any) -> None:
    """Create, resume and update in one: every watch event of a DistillJob, including the listing at start.

    It reconciles when the operator has not yet acted on this generation (a new job, a spec change such as
    suspend/resume) or when the operator just started (``type`` None: resume). Status writes (ours, and the
    trainer's progress) do not change the generation, so they do not trigger a reconcile.
    """
    key = (namespace, name)
    progress_key = (namespace, render.progress_configmap_name(JobRef(name, namespace, "")))
    if type == "DELETED":
        _progress_of.pop(progress_key, None)
        _watched.pop(key, None)
        _retry.discard(key)
        _acted.discard(key)
        metrics.forget(namespace, name)
        with _locks_lock:
            _locks.pop(key, None)
        return
    spec, status = dict(body.get("spec") or {}), dict(body.get("status") or {})
    _watched[key] = (spec, status)
    _progress_of[progress_key] = (name, body.get("metadata", {}).get("uid", ""))
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


@kopf.on.event(
    "", "v1", "configmaps",
    labels={render.LABEL_MANAGED_BY: render.MANAGER, access.COMPONENT_LABEL: access.PROGRESS_COMPONENT},
)
def progress_changed(type: str, body: Any, namespace: str, name: str, **_: Any) -> None:
    """A trainer reported progress: mirror it (checked) into status.progress of the job that owns that ConfigMap."""
    owner = _progress_of.get((namespace, name))
    if type == "DELETED" or owner is None:
        return
    job_name, uid = owner
    if not uid or uid not in [ref.get("uid") for ref in body.get("metadata", {}).get("ownerReferences") or []]:
        return  # not the ConfigMap the operator created for this job
    mirror_progress(namespace, job_name, body.get("data"))


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
