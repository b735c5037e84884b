"""The operator's runtime state in one object: settings, the API client, what it watches, retries and timers.

``OperatorRuntime`` is built once per operator process from its flags (``__main__``) or, for
``kopf run -m distill_operator.handlers``, from the environment (``from_env``), and reaches the kopf handlers
through kopf's ``memo``. Every trigger calls ``reconcile``, which reads the DistillJob fresh, observes the current
attempt, asks ``conditions.decide`` what to do, does it (launch / stop / delete), then writes the operator's status
keys with a merge patch. Reconciles of one job are serialized by a lock; children have deterministic names, so
running it twice, or after an operator restart, never creates a second RayJob, and a name taken by an object the job
does not own is a ``Conflict`` condition, never a write to that object (children.py).

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
from typing import Any, Mapping

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

ENV_RECONCILE_INTERVAL = "KUBEDISTILL_RECONCILE_INTERVAL_SECONDS"
DEFAULT_RECONCILE_INTERVAL = 10.0


class OperatorRuntime:
    """What one operator process keeps between events; the kopf handlers call its methods.

    - ``settings`` (allow-lists, NetworkPolicy peers) and ``reconcile_interval``: from the flags, fixed;
    - the API client, made on first use (in-cluster credentials, else KUBECONFIG);
    - per job: a lock serializing its reconciles, the last watched spec/status (the timer loop finds what is due
      without API calls), whether its last reconcile failed (retried on the next tick), whether this process wrote
      its status (then it is read fresh), and which progress ConfigMap belongs to it;
    - the timer loop's task.
    """

    def __init__(self, settings: OperatorSettings | None = None,
                 reconcile_interval: float = DEFAULT_RECONCILE_INTERVAL, api: client.ApiClient | None = None):
        self.settings = settings or OperatorSettings()
        # Seconds between ticks of the timer loop (deadlines, TTL and the RayAddress launcher are checked on ticks).
        self.reconcile_interval = reconcile_interval
        self._api = api
        self._api_lock = threading.Lock()
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._locks_lock = threading.Lock()
        self._watched: dict[tuple[str, str], tuple[dict[str, Any], dict[str, Any]]] = {}
        self._retry: set[tuple[str, str]] = set()
        self._acted: set[tuple[str, str]] = set()  # jobs whose status this process has written
        # (namespace, progress ConfigMap name) -> (DistillJob name, uid): which job a progress report belongs to,
        # from the operator's own records (never from labels or owners on the ConfigMap, which its trainer may patch).
        self._progress_of: dict[tuple[str, str], tuple[str, str]] = {}
        self._timer_task: asyncio.Task | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "OperatorRuntime":
        """Configured from the environment: what ``kopf run -m distill_operator.handlers`` (and the tests) use."""
        env = os.environ if env is None else env
        interval = float(env.get(ENV_RECONCILE_INTERVAL) or DEFAULT_RECONCILE_INTERVAL)
        return cls(OperatorSettings.from_env(env), interval)

    def api_client(self) -> client.ApiClient:
        """In-cluster credentials when running in a pod, else KUBECONFIG / ~/.kube/config."""
        with self._api_lock:
            if self._api is None:
                configuration = client.Configuration()
                try:
                    config.load_incluster_config(client_configuration=configuration)
                except config.ConfigException:
                    # KUBECONFIG is read now: the kubernetes package reads it once at import, which may be too early.
                    config.load_kube_config(
                        config_file=os.environ.get("KUBECONFIG"), client_configuration=configuration
                    )
                configuration.connection_pool_maxsize = 32
                self._api = client.ApiClient(configuration)
            return self._api

    def _lock_for(self, namespace: str, name: str) -> threading.Lock:
        with self._locks_lock:
            return self._locks.setdefault((namespace, name), threading.Lock())

    # --- reconcile --------------------------------------------------------------------------------------------

    def reconcile(self, namespace: str, name: str, handler: str, fresh_body: Any = None) -> None:
        """Reconcile one DistillJob; failures are retried on the next timer tick.

        ``fresh_body`` may be passed for a job the operator has never written to (nothing to be stale about);
        otherwise the job is read from the API server under the job's lock.
        """
        try:
            with metrics.track(handler), self._lock_for(namespace, name):
                self._reconcile(namespace, name, fresh_body)
        except Exception:
            self._retry.add((namespace, name))
            raise
        self._retry.discard((namespace, name))

    def _reconcile(self, namespace: str, name: str, fresh_body: Any = None) -> None:
        api = self.api_client()
        custom = client.CustomObjectsApi(api)
        body = fresh_body if (namespace, name) not in self._acted else None  # once we wrote to it, read it fresh
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
                check_allowed(spec, job, self.settings)  # service account / claim allow-lists
                launcher = launcher_for(spec, api, self.settings)
            except ValidationError as error:
                spec, spec_error = None, format_validation_error(error, "spec").replace("\n", ";")
            except ValueError as error:
                spec, spec_error = None, str(error)
        if launcher is None:
            launcher = _launcher_of_invalid_spec(effective, api, self.settings)  # still able to stop what runs
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
            self._acted.add((namespace, name))
        for type_, reason, message in decision.events:
            post_event(core, body, type_, reason, message)
        metrics.record_conditions(namespace, name, new.get("conditions", []))

    def mirror_progress(self, namespace: str, name: str, data: Any) -> None:
        """The trainer's report (its progress ConfigMap's data), checked, into status.progress of its DistillJob."""
        progress = access.progress_from_report(data)
        key = (namespace, name)
        if not progress or key not in self._watched:
            return
        with self._lock_for(namespace, name):
            if (self._watched[key][1].get("progress") or {}) == progress:
                return
            # A merge patch: keys the report no longer has are removed (null).
            patch = {"status": {"progress": {k: progress.get(k) for k in access.PROGRESS_FIELDS}}}
            try:
                client.CustomObjectsApi(self.api_client()).patch_namespaced_custom_object_status(
                    GROUP, VERSION, namespace, PLURAL, name, patch,
                    field_manager=render.MANAGER, _content_type="application/merge-patch+json",
                )
            except ApiException as error:
                if error.status != 404:
                    raise
            self._acted.add(key)

    # --- watch events (called by the kopf handlers in handlers.py) ---------------------------------------------

    def distilljob_event(self, type: str | None, body: Any, namespace: str, name: str) -> None:
        """Create, resume and update in one: every watch event of a DistillJob, including the listing at start.

        It reconciles when the operator has not yet acted on this generation (a new job, a spec change such as
        suspend/resume) or when the operator just started (``type`` None: resume). Status writes (ours, and the
        trainer's progress) do not change the generation, so they do not trigger a reconcile.
        """
        key = (namespace, name)
        progress_key = (namespace, render.progress_configmap_name(JobRef(name, namespace, "")))
        if type == "DELETED":
            self._progress_of.pop(progress_key, None)
            self._watched.pop(key, None)
            self._retry.discard(key)
            self._acted.discard(key)
            metrics.forget(namespace, name)
            with self._locks_lock:
                self._locks.pop(key, None)
            return
        spec, status = dict(body.get("spec") or {}), dict(body.get("status") or {})
        self._watched[key] = (spec, status)
        self._progress_of[progress_key] = (name, body.get("metadata", {}).get("uid", ""))
        if status.get("state") in TERMINAL_STATES and not needs_reconcile(body):
            metrics.record_conditions(namespace, name, status.get("conditions") or [])
            return  # finished: nothing to resume (the timer loop handles a TTL)
        if type is None or needs_reconcile(body):
            self.reconcile(namespace, name, "distilljob", fresh_body=body if not status else None)

    def rayjob_event(self, type: str | None, body: Any, namespace: str) -> None:
        """KubeRay updated (or someone deleted) a RayJob we own: reconcile its DistillJob now."""
        if type in ("ADDED", None) and not body.get("status"):
            return  # our own create (or a restart's listing) before KubeRay wrote anything: nothing to react to
        for ref in body.get("metadata", {}).get("ownerReferences") or []:
            if ref.get("kind") == KIND and ref.get("apiVersion", "").startswith(f"{GROUP}/"):
                self.reconcile(namespace, ref["name"], "rayjob")

    def progress_event(self, type: str | None, body: Any, namespace: str, name: str) -> None:
        """A trainer reported progress: mirror it (checked) into status.progress of the job that owns that ConfigMap."""
        owner = self._progress_of.get((namespace, name))
        if type == "DELETED" or owner is None:
            return
        job_name, uid = owner
        if not uid or uid not in [ref.get("uid") for ref in body.get("metadata", {}).get("ownerReferences") or []]:
            return  # not the ConfigMap the operator created for this job
        self.mirror_progress(namespace, job_name, body.get("data"))

    # --- the timer loop ------------------------------------------------------------------------------------------

    def start_timer(self) -> None:
        """Start the timer loop on the running event loop (kopf's startup)."""
        self._timer_task = asyncio.create_task(self._timer_loop())

    def stop_timer(self) -> None:
        if self._timer_task is not None:
            self._timer_task.cancel()
            self._timer_task = None

    async def _timer_loop(self) -> None:
        """Every ``reconcile_interval`` seconds: reconcile the jobs whose deadline or TTL has come, RayAddress jobs
        (no watch), and jobs whose last reconcile failed. One loop for the operator, not a kopf timer per object
        (those need a finalizer on every DistillJob and wake every job on every tick)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.reconcile_interval)
            now = datetime.now(timezone.utc)
            due = {key for key, (spec, status) in list(self._watched.items()) if timer_due(spec, status, now)}
            for namespace, name in sorted(due | (self._retry & self._watched.keys())):
                try:
                    await loop.run_in_executor(None, self.reconcile, namespace, name, "timer")
                except Exception:  # noqa: BLE001 - counted in metrics; retried on the next tick
                    log.exception("reconcile of %s/%s failed; retrying on the next tick", namespace, name)


def _launcher_of_invalid_spec(spec: dict[str, Any], api: client.ApiClient, settings: OperatorSettings) -> Any:
    """For a spec that does not validate: a launcher built from spec.launcher alone, to stop a running attempt."""
    try:
        launcher = LauncherSpec.model_validate(spec.get("launcher") or {})
        return launcher_for(SimpleNamespace(launcher=launcher), api, settings)
    except (ValidationError, ValueError):
        return None


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
