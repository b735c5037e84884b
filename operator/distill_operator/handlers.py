"""The kopf wiring: every trigger calls ``reconcile``; the decisions live in conditions.py, the manifests in render.py.

Triggers: create/resume/spec update of a DistillJob, a timer (deadlines, TTL, Ray Jobs API polling) and any
event of a RayJob the operator created. ``reconcile`` reads the DistillJob fresh, observes the current attempt,
asks ``conditions.decide`` what to do, does it (launch / stop / delete), then writes the operator's status keys
with a merge patch that never contains ``status.progress`` (the trainer's, written with server-side apply).
Reconciles of one job are serialized by a lock; children have deterministic names, so running it twice, or
after an operator restart, never creates a second RayJob.
"""

from __future__ import annotations

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
from distill_operator.conditions import OPERATOR_STATUS_KEYS, decide
from distill_operator.launchers import launcher_for
from distill_operator.render import JobRef
from distill_operator.resources import GROUP, KIND, PLURAL, TERMINAL_STATES, VERSION, parse_spec
from distill_trainer.config import format_validation_error

log = logging.getLogger(__name__)

# Seconds between timer reconciles of one job (deadlines, TTL and the RayAddress launcher are polled).
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


def reconcile(namespace: str, name: str, handler: str) -> None:
    with metrics.track(handler), _lock_for(namespace, name):
        _reconcile(namespace, name)


def _reconcile(namespace: str, name: str) -> None:
    api = api_client()
    custom = client.CustomObjectsApi(api)
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
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # kopf's bookkeeping goes to annotations under our prefix; status stays ours and the trainer's.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.posting.level = logging.WARNING  # our own events say what happened; skip "handler succeeded"
    settings.execution.max_workers = 16
    settings.watching.server_timeout = 300


@kopf.on.login()
def login(**kwargs: Any) -> Any:
    """In-cluster service account, else KUBECONFIG (read at login time, not at import)."""
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
def reconcile_distilljob(namespace: str, name: str, **_: Any) -> None:
    """Create, operator start, or spec change (suspend/resume): launch or stop as the run policy says."""
    reconcile(namespace, name, "distilljob")


def _needs_timer(status: Any, spec: Any, **_: Any) -> bool:
    terminal = (status or {}).get("state") in TERMINAL_STATES
    return not terminal or (spec or {}).get("runPolicy", {}).get("ttlSecondsAfterFinished") is not None


@kopf.timer(GROUP, VERSION, PLURAL, interval=RECONCILE_INTERVAL, initial_delay=RECONCILE_INTERVAL, when=_needs_timer)
def poll_distilljob(namespace: str, name: str, **_: Any) -> None:
    """Deadlines, TTL, and the RayAddress launcher (which has no watch) are checked on a timer."""
    reconcile(namespace, name, "timer")


@kopf.on.event("ray.io", "v1", "rayjobs", labels={render.LABEL_MANAGED_BY: render.MANAGER})
def rayjob_changed(body: Any, namespace: str, **_: Any) -> None:
    """KubeRay updated (or someone deleted) a RayJob we own: reconcile its DistillJob now."""
    for ref in body.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("kind") == KIND and ref.get("apiVersion", "").startswith(f"{GROUP}/"):
            reconcile(namespace, ref["name"], "rayjob")


@kopf.on.event(GROUP, VERSION, PLURAL)
def distilljob_event(type: str, namespace: str, name: str, **_: Any) -> None:
    if type == "DELETED":
        metrics.forget(namespace, name)
        with _locks_lock:
            _locks.pop((namespace, name), None)


@kopf.on.probe(id="reconciles")
def reconciles_probe(**_: Any) -> float:
    return sum(sample.value for sample in metrics.RECONCILES.collect()[0].samples if sample.name.endswith("_total"))
