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
import time
from datetime import datetime, timezone
from functools import partial
from types import SimpleNamespace
from typing import Any, Mapping

import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from distill_operator import access, children, metrics, render
from distill_operator.conditions import (
    OPERATOR_STATUS_KEYS,
    changed_fields,
    decide,
    event_key,
    event_name,
    launch_blocked,
    needs_reconcile,
    recorded_events,
    spec_hashes,
    teacher_cache_gate,
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
# /healthz fails once the API server has been unreachable, or the DistillJob watch silent about a change a list shows,
# for longer than this (seconds; 0: never, /healthz then only says the process answers). --liveness-api-timeout.
ENV_LIVENESS_API_TIMEOUT = "KUBEDISTILL_LIVENESS_API_TIMEOUT_SECONDS"
DEFAULT_LIVENESS_API_TIMEOUT = 60.0


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
                 reconcile_interval: float = DEFAULT_RECONCILE_INTERVAL, api: client.ApiClient | None = None,
                 leader: Any = None):
        self.settings = settings or OperatorSettings()
        # Leader election (leader.LeaderElector), or None: this process is the only one and always writes.
        self.leader = leader
        self._leader_since = float("-inf")  # monotonic time this process became the leader
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_operator: Any = None  # set when the lease is lost: kopf stops, the process exits 1
        # Seconds between ticks of the timer loop (deadlines, TTL and the RayAddress launcher are checked on ticks).
        self.reconcile_interval = reconcile_interval
        self._api = api
        self._api_lock = threading.Lock()
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._locks_lock = threading.Lock()
        self._watched: dict[tuple[str, str], tuple[dict[str, Any], dict[str, Any]]] = {}
        self._retry: set[tuple[str, str]] = set()
        self._acted: set[tuple[str, str]] = set()  # jobs whose status this process has written
        # Jobs whose recorded transitions have their Events (checked once per job and leadership term).
        self._events_checked: set[tuple[str, str]] = set()
        self._events_pending: set[tuple[str, str]] = set()  # an Event failed: reconciled again on the next tick
        # (namespace, progress ConfigMap name) -> (DistillJob name, uid): which job a progress report belongs to,
        # from the operator's own records (never from labels or owners on the ConfigMap, which its trainer may patch).
        self._progress_of: dict[tuple[str, str], tuple[str, str]] = {}
        self._timer_task: asyncio.Task | None = None
        # Liveness (see health()): set from the flags after construction; namespaces None = not known (kopf run):
        # the watch check then covers the namespaces the watch has shown.
        self.liveness_api_timeout = DEFAULT_LIVENESS_API_TIMEOUT
        self.namespaces: tuple[str, ...] | None = None
        self._last_api_contact = time.monotonic()  # the start counts as contact: a grace period of one limit
        self._watch_rv: dict[tuple[str, str], str | None] = {}  # the resourceVersion the watch last delivered
        self._unseen: dict[tuple[str, str], tuple[str, float]] = {}  # listed, not yet watched: (rv, since)
        self._health_task: asyncio.Task | None = None
        self._unhealthy: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "OperatorRuntime":
        """Configured from the environment: what ``kopf run -m distill_operator.handlers`` (and the tests) use."""
        env = os.environ if env is None else env
        interval = float(env.get(ENV_RECONCILE_INTERVAL) or DEFAULT_RECONCILE_INTERVAL)
        runtime = cls(OperatorSettings.from_env(env), interval)
        runtime.liveness_api_timeout = float(env.get(ENV_LIVENESS_API_TIMEOUT) or DEFAULT_LIVENESS_API_TIMEOUT)
        return runtime

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

    # --- leader election --------------------------------------------------------------------------------------

    def leading(self) -> bool:
        """Whether this process may write now: no election, or it holds the Lease (renewed within the deadline)."""
        return self.leader is None or self.leader.leading

    def ready(self) -> bool:
        """/readyz: the leader, or a standby in contact with the Lease (able to take over)."""
        return self.leader is None or self.leader.ready

    def _check_leading(self) -> None:
        if not self.leading():
            raise NotLeading()

    def start_leader_election(self, stop_operator: Any = None) -> None:
        """Start campaigning (kopf's startup, on its event loop); ``stop_operator`` is set when the lease is lost."""
        if self.leader is None:
            return
        self._loop, self._stop_operator = asyncio.get_running_loop(), stop_operator
        self.leader.start(on_started=self._took_over, on_lost=self._lost_lease)

    def _took_over(self) -> None:
        """Now the leader (the elector's thread): reconcile every job the watch has shown, as at a restart."""
        self._leader_since = time.monotonic()
        self._events_checked.clear()  # the previous leader may have died between a status write and its Event
        if self._loop is not None:
            self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._takeover_pass()))

    async def _takeover_pass(self) -> None:
        loop = asyncio.get_running_loop()
        for namespace, name in sorted(self._watched):
            spec, status = self._watched.get((namespace, name), ({}, {}))
            if status.get("state") in TERMINAL_STATES and not timer_due(spec, status, datetime.now(timezone.utc)):
                body = self._finished_body(namespace, name, status)
                if body is not None:
                    await loop.run_in_executor(None, self.recover_events, body)
                continue
            try:
                await loop.run_in_executor(None, self.reconcile, namespace, name, "takeover")
            except NotLeading:
                return
            except Exception:  # noqa: BLE001 - retried on the next tick
                log.exception("reconcile of %s/%s failed; retrying on the next tick", namespace, name)

    def _finished_body(self, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any] | None:
        """A finished job as watched (name, uid, status), enough to post its Events; None when its uid is unknown."""
        progress_key = (namespace, render.progress_configmap_name(JobRef(name, namespace, "")))
        uid = (self._progress_of.get(progress_key) or ("", ""))[1]
        if not uid:
            return None
        return {"metadata": {"name": name, "namespace": namespace, "uid": uid}, "status": status}

    def _lost_lease(self) -> None:
        """The renew deadline passed (the elector's thread): ``leading`` is already false; stop the operator."""
        if self._stop_operator is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._stop_operator.set)

    def step_down(self) -> None:
        """Clean shutdown (kopf's cleanup): stop writing, let running reconciles end, release the Lease at once."""
        if self.leader is None:
            return
        self.leader.step_down()
        with self._locks_lock:
            locks = list(self._locks.values())
        for lock in locks:  # a reconcile that had started finishes its writes before the standby starts its own
            if lock.acquire(timeout=5):
                lock.release()
        self.leader.release()

    def _lock_for(self, namespace: str, name: str) -> threading.Lock:
        with self._locks_lock:
            return self._locks.setdefault((namespace, name), threading.Lock())

    # --- reconcile --------------------------------------------------------------------------------------------

    def reconcile(self, namespace: str, name: str, handler: str, fresh_body: Any = None) -> None:
        """Reconcile one DistillJob; failures are retried on the next timer tick.

        ``fresh_body`` may be passed for a job the operator has never written to (nothing to be stale about);
        otherwise the job is read from the API server under the job's lock.
        """
        if not self.leading():
            return  # a standby writes nothing; the leader reconciles this job (or we do, when we take over)
        try:
            with metrics.track(handler), self._lock_for(namespace, name):
                self._check_leading()
                self._reconcile(namespace, name, fresh_body)
        except NotLeading:
            return
        except Exception:
            self._retry.add((namespace, name))
            raise
        self._retry.discard((namespace, name))
        self.api_contact()

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
        cache_gate = None
        if spec is not None and spec.teacher_cache_from and attempt is None and status.get("state") not in \
                TERMINAL_STATES:
            cache_gate = teacher_cache_gate(spec, job, self._cache_job(custom, namespace, spec.teacher_cache_from))
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
            cache_gate=cache_gate,
            teacher_cache_path=render.teacher_cache_path(spec, job) if spec is not None else None,
        )

        self._check_leading()  # the reads took time: still the leader before any write?
        try:
            first = not status.get("specHashes") and decision.status.get("state") not in TERMINAL_STATES
            if spec is not None and (first or decision.action == "launch"):
                children.ensure_config(core, spec, effective, job)  # the record of the original, from the start
            if decision.action == "launch":
                children.ensure_trainer_access(
                    core, client.RbacAuthorizationV1Api(api), spec, job, pods=launcher.kind == "KubeRay"
                )
                launcher.launch(spec, job, decision.attempt, decision.resume, decision.remaining_deadline)
                if decision.replaces is not None:  # Kueue preempted it: the new attempt exists, delete the old one
                    launcher.stop(job, decision.replaces)
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
        self._check_leading()
        if any(status.get(k) != v for k, v in new.items()):
            custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, namespace, PLURAL, name, {"status": new},
                field_manager=render.MANAGER, _content_type="application/merge-patch+json",
            )
            self._acted.add((namespace, name))
        # The Events after the status they report: each named after its transition (a repeat is a 409, not a
        # second Event); on this process's first reconcile of the job, also those the status records (recover_events).
        events = [(type_, reason, message, event_key(decision.status, reason))
                  for type_, reason, message in decision.events]
        self._post_events(core, body, events, decision.status)
        metrics.record_conditions(namespace, name, new.get("conditions", []))

    @staticmethod
    def _cache_job(custom: client.CustomObjectsApi, namespace: str, name: str) -> dict[str, Any] | None:
        """The DistillJob a train job's spec.teacherCacheFrom names, read fresh (its state gates the launch)."""
        try:
            return custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    def _wake_cache_readers(self, namespace: str, name: str) -> None:
        """DistillJob ``name`` appeared, changed state or went away: reconcile now the jobs in its namespace that wait
        for its teacher cache (spec.teacherCacheFrom, not launched yet) instead of on their next timer tick."""
        for (other_ns, other), (spec, status) in sorted(self._watched.items()):
            if (other_ns != namespace or other == name or spec.get("teacherCacheFrom") != name
                    or status.get("attempt") is not None or status.get("state") in TERMINAL_STATES):
                continue
            try:
                self.reconcile(other_ns, other, "teachercache")
            except Exception:  # noqa: BLE001 - retried on the next tick (reconcile marked it)
                log.exception("reconcile of %s/%s failed; retrying on the next tick", other_ns, other)

    def mirror_progress(self, namespace: str, name: str, data: Any) -> None:
        """The trainer's report (its progress ConfigMap's data), checked, into status.progress of its DistillJob."""
        progress = access.progress_from_report(data)
        key = (namespace, name)
        if not progress or key not in self._watched or not self.leading():
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

    def _post_events(self, core: client.CoreV1Api, body: Any, events: list, status: Mapping[str, Any]) -> None:
        key = (body["metadata"]["namespace"], body["metadata"]["name"])
        if key not in self._events_checked:
            named = {event[3] for event in events}
            events = events + [e for e in recorded_events(status) if e[3] not in named]
        failed = False
        for type_, reason, message, transition in events:
            self._check_leading()
            failed |= not post_event(core, body, type_, reason, message, transition)
        if failed:  # transient errors past the retries: post what the status records on the next tick
            self._events_checked.discard(key)
            self._events_pending.add(key)
        else:
            self._events_checked.add(key)
            self._events_pending.discard(key)

    def recover_events(self, body: Any) -> None:
        """Post the Events of the transitions a finished job's status records (the listing at start, a takeover):
        a predecessor killed between its status write and the Event lost it. Idempotent (named Events)."""
        key = (body["metadata"]["namespace"], body["metadata"]["name"])
        if key in self._events_checked or not self.leading():
            return
        with self._lock_for(*key):
            try:
                self._check_leading()
                self._post_events(client.CoreV1Api(self.api_client()), body, [], body.get("status") or {})
            except NotLeading:
                return

    # --- watch events (called by the kopf handlers in handlers.py) ---------------------------------------------

    def distilljob_event(self, type: str | None, body: Any, namespace: str, name: str) -> None:
        """Create, resume and update in one: every watch event of a DistillJob, including the listing at start.

        It reconciles when the operator has not yet acted on this generation (a new job, a spec change such as
        suspend/resume) or when the operator just started (``type`` None: resume). Status writes (ours, and the
        trainer's progress) do not change the generation, so they do not trigger a reconcile.
        """
        key = (namespace, name)
        self._watch_delivered(key, None if type == "DELETED" else body)
        progress_key = (namespace, render.progress_configmap_name(JobRef(name, namespace, "")))
        was_state = (self._watched.get(key) or ({}, {}))[1].get("state")
        if type == "DELETED":
            self._progress_of.pop(progress_key, None)
            self._watched.pop(key, None)
            self._retry.discard(key)
            self._acted.discard(key)
            self._events_checked.discard(key)
            self._events_pending.discard(key)
            metrics.forget(namespace, name)
            with self._locks_lock:
                self._locks.pop(key, None)
            if self.leading():
                self._wake_cache_readers(namespace, name)
            return
        spec, status = dict(body.get("spec") or {}), dict(body.get("status") or {})
        self._watched[key] = (spec, status)
        self._progress_of[progress_key] = (name, body.get("metadata", {}).get("uid", ""))
        if not self.leading():
            return  # a standby only keeps track (above); it reconciles everything when it takes over
        if type != "MODIFIED" or status.get("state") != was_state:
            self._wake_cache_readers(namespace, name)  # a teacher-cache job appeared or moved on
        if status.get("state") in TERMINAL_STATES and not needs_reconcile(body):
            metrics.record_conditions(namespace, name, status.get("conditions") or [])
            if type is None:  # the listing at start: its last Events may have been lost with the previous process
                self.recover_events(body)
            return  # finished: nothing to resume (the timer loop handles a TTL)
        if type is None or needs_reconcile(body):
            # A body without status is used as it is (no GET) unless this process became the leader moments ago:
            # then the previous leader may have written a status this (queued) event does not show yet.
            settled = self.leader is None or time.monotonic() - self._leader_since > self.leader.renew_deadline
            self.reconcile(namespace, name, "distilljob", fresh_body=body if not status and settled else None)

    def rayjob_event(self, type: str | None, body: Any, namespace: str) -> None:
        """KubeRay updated (or someone deleted) a RayJob we own: reconcile its DistillJob now."""
        self.api_contact()  # a watch event: the stream is alive
        if type in ("ADDED", None) and not body.get("status"):
            return  # our own create (or a restart's listing) before KubeRay wrote anything: nothing to react to
        for ref in body.get("metadata", {}).get("ownerReferences") or []:
            if ref.get("kind") == KIND and ref.get("apiVersion", "").startswith(f"{GROUP}/"):
                self.reconcile(namespace, ref["name"], "rayjob")

    def progress_event(self, type: str | None, body: Any, namespace: str, name: str) -> None:
        """A trainer reported progress: mirror it (checked) into status.progress of the job that owns that ConfigMap."""
        self.api_contact()
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
        if self.liveness_api_timeout:
            self._health_task = asyncio.create_task(self._health_loop())

    def stop_timer(self) -> None:
        if self._timer_task is not None:
            self._timer_task.cancel()
            self._timer_task = None
        if self._health_task is not None:
            self._health_task.cancel()
            self._health_task = None

    async def _timer_loop(self) -> None:
        """Every ``reconcile_interval`` seconds: reconcile the jobs whose deadline or TTL has come, RayAddress jobs
        (no watch), jobs waiting for a teacher cache (spec.teacherCacheFrom), and jobs whose last reconcile failed. One loop for the operator, not a kopf timer per object
        (those need a finalizer on every DistillJob and wake every job on every tick)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.reconcile_interval)
            if not self.leading():
                continue
            now = datetime.now(timezone.utc)
            due = {key for key, (spec, status) in list(self._watched.items()) if timer_due(spec, status, now)}
            for namespace, name in sorted(due | ((self._retry | self._events_pending) & self._watched.keys())):
                try:
                    await loop.run_in_executor(None, self.reconcile, namespace, name, "timer")
                except Exception:  # noqa: BLE001 - counted in metrics; retried on the next tick
                    log.exception("reconcile of %s/%s failed; retrying on the next tick", namespace, name)


    # --- liveness: the API server answers, and the DistillJob watch delivers what a list shows ------------------

    def api_contact(self) -> None:
        """A successful exchange with the API server: a reconcile, a watch event, a heartbeat, a list."""
        self._last_api_contact = time.monotonic()

    def _watch_delivered(self, key: tuple[str, str], body: Any) -> None:
        """A DistillJob watch event (``body`` None: deleted): the stream is alive and has shown this version."""
        self.api_contact()
        if body is None:
            self._watch_rv.pop(key, None)
        else:
            self._watch_rv[key] = (body.get("metadata") or {}).get("resourceVersion")
        self._unseen.pop(key, None)

    def health(self) -> str | None:
        """None when live; else why not, for the liveness probe (handlers.py) to fail with.

        Not live once, for longer than ``liveness_api_timeout``: nothing from the API server (no reconcile, watch
        event or heartbeat succeeded; the heartbeat calls GET /version whenever the operator has been idle for a
        third of the limit), or a DistillJob change that a list shows and the watch has not delivered (a watch
        stream dead or stuck while the API server answers: kopf does not restart a watcher that failed at start-up,
        kopf#1077). The kubelet then restarts the operator, which lists and watches afresh."""
        limit = self.liveness_api_timeout
        if not limit:
            return None
        now = time.monotonic()
        silent = now - self._last_api_contact
        if silent > limit:
            return f"no answer from the API server for {silent:.0f} s (--liveness-api-timeout {limit:g})"
        late = sorted((since, key) for key, (_, since) in list(self._unseen.items()) if now - since > limit)
        if late:
            # Every late job is named (up to three): the oldest may be the operator's own status patch of a job
            # it already knew, while the one a user just created is the one they are looking for.
            names = ", ".join(f"{namespace}/{name}" for _, (namespace, name) in late[:3])
            more = f" and {len(late) - 3} more" if len(late) > 3 else ""
            return (f"the DistillJob watch has not delivered the change{'s' if len(late) > 1 else ''} of {names}{more}"
                    f" a list showed {now - late[0][0]:.0f} s ago (--liveness-api-timeout {limit:g})")
        return None

    def seconds_since_api_contact(self) -> float:
        return round(time.monotonic() - self._last_api_contact, 1)

    async def _health_loop(self) -> None:
        """Heartbeat (GET /version when idle for a third of the limit) and the watch check (a list of DistillJobs
        every half limit, compared with what the watch delivered); logs when liveness changes."""
        loop = asyncio.get_running_loop()
        limit = self.liveness_api_timeout
        period = max(0.5, min(limit / 3, 10.0))
        next_list = time.monotonic() + max(period, limit / 2)
        while True:
            await asyncio.sleep(period)
            try:
                if time.monotonic() - self._last_api_contact >= period:
                    await loop.run_in_executor(None, self._heartbeat, period)
                if time.monotonic() >= next_list:
                    next_list = time.monotonic() + max(period, limit / 2)
                    await loop.run_in_executor(None, self._check_watch, max(period, 5.0))
            except Exception as error:  # noqa: BLE001 - unreachable: health() reports it once the limit passes
                log.debug("liveness heartbeat failed: %s", error)
            problem = self.health()
            if problem != self._unhealthy:
                if problem and not self._unhealthy:
                    log.error("not live: %s", problem)
                elif not problem:
                    log.info("live again: the API server answers and the watch delivers")
                self._unhealthy = problem

    def _heartbeat(self, timeout: float) -> None:
        client.VersionApi(self.api_client()).get_code(_request_timeout=timeout)
        self.api_contact()

    def _check_watch(self, timeout: float) -> None:
        """List the watched DistillJobs; a listed resourceVersion the watch has not delivered starts a clock
        (``_unseen``), stopped by the watch delivering that job or a later list matching it."""
        custom = client.CustomObjectsApi(self.api_client())
        patterns = self.namespaces
        if patterns is None:  # not known: the namespaces the watch has shown
            namespaces: list[str] | None = sorted({namespace for namespace, _ in list(self._watched)})
        elif patterns and not any(set(p) & set("*?[!") for p in patterns):
            namespaces = list(patterns)
        else:
            namespaces = None  # all, or globs: one list of all namespaces, filtered like kopf does
        if namespaces is None:
            items = custom.list_cluster_custom_object(GROUP, VERSION, PLURAL, _request_timeout=timeout)["items"]
            if patterns:
                items = [i for i in items if _namespace_matches(i["metadata"]["namespace"], patterns)]
        else:
            items = []
            for namespace in namespaces:
                items += custom.list_namespaced_custom_object(
                    GROUP, VERSION, namespace, PLURAL, _request_timeout=timeout)["items"]
        self.api_contact()
        now = time.monotonic()
        listed = {(i["metadata"]["namespace"], i["metadata"]["name"]): i["metadata"].get("resourceVersion")
                  for i in items}
        for key in list(self._unseen):
            if key not in listed:
                self._unseen.pop(key, None)
        for key, version in listed.items():
            if self._watch_rv.get(key) == version:
                self._unseen.pop(key, None)
            else:
                self._unseen.setdefault(key, (version, now))


def _namespace_matches(namespace: str, patterns: tuple[str, ...]) -> bool:
    """kopf's namespace patterns: globs, ``!glob`` excludes."""
    import fnmatch

    included = any(fnmatch.fnmatchcase(namespace, p) for p in patterns if not p.startswith("!"))
    return included and not any(fnmatch.fnmatchcase(namespace, p[1:]) for p in patterns if p.startswith("!"))


class NotLeading(Exception):
    """This process does not hold the leader Lease (any more): it must not write."""


def _launcher_of_invalid_spec(spec: dict[str, Any], api: client.ApiClient, settings: OperatorSettings) -> Any:
    """For a spec that does not validate: a launcher built from spec.launcher alone, to stop a running attempt."""
    try:
        launcher = LauncherSpec.model_validate(spec.get("launcher") or {})
        return launcher_for(SimpleNamespace(launcher=launcher), api, settings)
    except (ValidationError, ValueError):
        return None


TRANSIENT_STATUSES = (429, 500, 502, 503, 504)
EVENT_RETRY_DELAYS = (0.2, 0.5, 1.0, 2.0)  # seconds before each retry of an Event create on a transient error


def post_event(core: client.CoreV1Api, body: Any, type_: str, reason: str, message: str,
               transition: tuple[str, ...] = ()) -> bool:
    """A core/v1 Event on the DistillJob (kubectl describe dj shows it), named after its transition
    (``conditions.event_name``): a 409 means it was posted already (by us, or a previous leader) and counts as done.
    Transient errors (a 429 or 5xx, no connection) are retried; False when it could not be posted (then the caller
    tries again later). Never raises for an API error."""
    meta = body["metadata"]
    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    event = {
        "metadata": {"name": event_name(meta["name"], meta.get("uid") or "", transition or (reason, message)),
                     "namespace": meta["namespace"]},
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
    if not event["involvedObject"]["resourceVersion"]:
        del event["involvedObject"]["resourceVersion"]
    for delay in (*EVENT_RETRY_DELAYS, None):
        try:
            core.create_namespaced_event(meta["namespace"], event, _request_timeout=10)
            return True
        except ApiException as error:
            if error.status == 409:
                return True  # this transition's Event exists
            problem, transient = f"{error.status} {error.reason}", error.status in TRANSIENT_STATUSES
        except (urllib3.exceptions.HTTPError, OSError) as error:
            problem, transient = str(error), True
        if not transient or delay is None:
            log.warning("could not post event %s on %s/%s: %s", reason, meta["namespace"], meta["name"], problem)
            return not transient  # a permanent refusal is not retried later either
        time.sleep(delay)
    return False
