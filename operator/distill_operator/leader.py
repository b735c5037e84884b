"""Leader election on a coordination.k8s.io/v1 Lease, client-go's algorithm and defaults (15 s / 10 s / 2 s).

Several operator replicas may run; only the one holding the Lease writes (runtime.py gates every reconcile, status
patch, Event and progress mirror on ``LeaderElector.leading``). The others watch like the leader does (so they know
every job when they take over) and write nothing.

- Acquire: the Lease is free when it has no holder, or when its record (holder, renewTime) has not changed for
  ``lease_duration`` seconds *as observed on this process's monotonic clock* (client-go's rule: no trust in the
  other node's wall clock). The update carries the read resourceVersion, so two candidates never both win.
- Renew: every ``retry_period``. ``leading`` is false as soon as ``renew_deadline`` has passed since the start of
  the last successful renew, whatever the renewing thread is doing (a hung request cannot extend it). A standby
  waits ``lease_duration`` (> ``renew_deadline``) from when it saw the last renew, so the old leader has stopped
  writing before anyone else starts.
- Lost (the renew deadline passed): ``on_lost`` is called once; the operator stops (exit code 1, the kubelet
  restarts it as a standby), as client-go's users do.
- Release (clean shutdown): holderIdentity emptied and leaseDurationSeconds 1, so a standby takes over at its next
  retry instead of waiting out the lease.

A thread, not a task on kopf's event loop: renewing must not wait behind a busy loop.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Callable

from kubernetes import client
from kubernetes.client.exceptions import ApiException

log = logging.getLogger(__name__)

DEFAULT_LEASE_DURATION = 15.0
DEFAULT_RENEW_DEADLINE = 10.0
DEFAULT_RETRY_PERIOD = 2.0
DEFAULT_LEASE_NAME = "kubedistill-operator"
JITTER = 1.2  # client-go's JitterFactor: a standby retries every retry_period * [1, 1 + JITTER)


def default_identity() -> str:
    """POD_NAME (downward API) or the hostname, plus a random suffix: a restarted container is a new candidate."""
    return f"{os.environ.get('POD_NAME') or socket.gethostname()}_{uuid.uuid4().hex[:8]}"


def default_namespace(watched: list[str]) -> str | None:
    """POD_NAMESPACE (downward API), the service account's namespace in a pod, else the first watched namespace
    without glob characters."""
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    try:
        with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace") as file:
            return file.read().strip() or None
    except OSError:
        pass
    return next((n for n in watched if not any(c in n for c in "*?[!")), None)


def _now() -> datetime:
    return datetime.now(timezone.utc)


class LeaderElector:
    def __init__(self, api: Callable[[], client.ApiClient], namespace: str, name: str = DEFAULT_LEASE_NAME,
                 identity: str | None = None, lease_duration: float = DEFAULT_LEASE_DURATION,
                 renew_deadline: float = DEFAULT_RENEW_DEADLINE, retry_period: float = DEFAULT_RETRY_PERIOD):
        if not lease_duration > renew_deadline > retry_period > 0:
            raise ValueError(
                f"leader election needs lease duration > renew deadline > retry period > 0 "
                f"(got {lease_duration}, {renew_deadline}, {retry_period})"
            )
        self._api = api
        self.namespace, self.name = namespace, name
        self.identity = identity or default_identity()
        self.lease_duration, self.renew_deadline, self.retry_period = lease_duration, renew_deadline, retry_period
        self._renewed_at: float | None = None  # monotonic start of the last successful acquire/renew while leading
        self._observed: tuple | None = None  # (holder, renewTime, resourceVersion) last read
        self._observed_at = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._on_started: Callable[[], None] = lambda: None
        self._on_lost: Callable[[], None] = lambda: None
        self._contact_at: float | None = None  # monotonic time of the last successful read or write of the Lease
        self._held = False  # this process has held the Lease (release then hands it over)

    # --- what the operator asks ------------------------------------------------------------------------------

    @property
    def leading(self) -> bool:
        renewed = self._renewed_at
        return renewed is not None and not self._stop.is_set() and time.monotonic() - renewed < self.renew_deadline

    @property
    def ready(self) -> bool:
        """Leading, or a standby able to take over: its last read of the Lease succeeded within lease_duration."""
        contact = self._contact_at
        return self.leading or (contact is not None and not self._stop.is_set()
                                and time.monotonic() - contact < self.lease_duration)

    def start(self, on_started: Callable[[], None], on_lost: Callable[[], None]) -> None:
        self._on_started, self._on_lost = on_started, on_lost
        self._thread = threading.Thread(target=self._run, name="leader-election", daemon=True)
        self._thread.start()
        log.info("leader election: candidate %s for Lease %s/%s (lease %gs, renew deadline %gs, retry %gs)",
                 self.identity, self.namespace, self.name, self.lease_duration, self.renew_deadline,
                 self.retry_period)

    def step_down(self) -> None:
        """Stop writing now (``leading`` false); the Lease is kept until ``release``."""
        self._stop.set()
        self._renewed_at = None

    def release(self) -> None:
        """Clean shutdown: stop, and hand the Lease over at once if this process holds it."""
        self.step_down()
        if self._thread is not None:
            self._thread.join(timeout=self.retry_period + 5)
        if not self._held:
            return
        self._held = False
        api = client.CoordinationV1Api(self._api())
        try:
            lease = api.read_namespaced_lease(self.name, self.namespace, _request_timeout=5)
            if lease.spec.holder_identity != self.identity:
                return
            now = _now()
            lease.spec.holder_identity = None
            lease.spec.lease_duration_seconds = 1
            lease.spec.acquire_time = now
            lease.spec.renew_time = now
            api.replace_namespaced_lease(self.name, self.namespace, lease, _request_timeout=5)
            log.info("leader election: released Lease %s/%s", self.namespace, self.name)
        except Exception as error:  # noqa: BLE001 - the standby takes over when the lease expires instead
            log.warning("leader election: could not release Lease %s/%s: %s", self.namespace, self.name, error)

    # --- the loop --------------------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():  # standby
            if self._try(acquiring=True):
                log.info("leader election: %s is the leader (Lease %s/%s)", self.identity, self.namespace, self.name)
                try:
                    self._on_started()
                except Exception:  # noqa: BLE001
                    log.exception("leader election: on_started failed")
                break
            self._stop.wait(self.retry_period * (1 + random.random() * JITTER))
        while not self._stop.wait(self.retry_period):  # leader
            self._try(acquiring=False)
            if not self.leading and not self._stop.is_set():
                self._renewed_at = None
                log.error("leader election: Lease %s/%s not renewed within %gs: stopping", self.namespace,
                          self.name, self.renew_deadline)
                try:
                    self._on_lost()
                finally:
                    return

    def _try(self, acquiring: bool) -> bool:
        """One acquire or renew; True when this process holds the Lease afterwards."""
        started = time.monotonic()
        api = client.CoordinationV1Api(self._api())
        timeout = max(1.0, min(self.renew_deadline / 2, 5.0))
        try:
            try:
                lease = api.read_namespaced_lease(self.name, self.namespace, _request_timeout=timeout)
            except ApiException as error:
                if error.status != 404:
                    raise
                now = _now()
                api.create_namespaced_lease(self.namespace, client.V1Lease(
                    metadata=client.V1ObjectMeta(name=self.name, namespace=self.namespace),
                    spec=client.V1LeaseSpec(holder_identity=self.identity, lease_duration_seconds=round(
                        self.lease_duration), acquire_time=now, renew_time=now, lease_transitions=0),
                ), _request_timeout=timeout)
                self._renewed_at, self._held = started, True
                self._contact_at = started
                return True
            self._contact_at = started
            spec = lease.spec
            record = (spec.holder_identity, spec.renew_time, spec.lease_duration_seconds)
            if record != self._observed:
                self._observed, self._observed_at = record, started
            holder = spec.holder_identity
            if holder and holder != self.identity:
                # Someone else's: free only once its record has not changed for its lease duration (our clock).
                duration = spec.lease_duration_seconds or self.lease_duration
                if started - self._observed_at < duration:
                    return False
            elif not acquiring and holder != self.identity:
                return False  # released under us (should not happen): stop leading
            now = _now()
            if holder != self.identity:
                spec.acquire_time = now
                spec.lease_transitions = (spec.lease_transitions or 0) + (1 if holder else 0)
            spec.holder_identity = self.identity
            spec.lease_duration_seconds = round(self.lease_duration)
            spec.renew_time = now
            api.replace_namespaced_lease(self.name, self.namespace, lease, _request_timeout=timeout)
            self._renewed_at, self._held = started, True
            return True
        except ApiException as error:
            if error.status != 409:  # 409: another candidate wrote first
                log.warning("leader election: Lease %s/%s: %s %s", self.namespace, self.name, error.status,
                            error.reason)
            return False
        except Exception as error:  # noqa: BLE001 - the API server unreachable: retried
            log.warning("leader election: Lease %s/%s: %s", self.namespace, self.name, error)
            return False
