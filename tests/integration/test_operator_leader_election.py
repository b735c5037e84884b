"""Leader election (operator/distill_operator/leader.py): several `python -m distill_operator` processes, as the
chart's replicas run, with the chart's ServiceAccount token (its leader-election Role) against the real API server.

- one writer: with two replicas and a burst of jobs, exactly one RayJob per job, no DistillJob state going
  backwards, and the standby created nothing (its /metrics);
- kill -9 of the leader: the standby takes over after the lease duration (not before), and keeps the jobs going;
- SIGTERM of the leader: it releases the Lease, the standby takes over at its next retry;
- the Lease taken by someone else: the leader stops writing and exits 1.

The default-suite tests use short durations (lease 4 s, renew deadline 3 s, retry 0.5 s); the slow test measures
the failover with the defaults (15 s / 10 s / 2 s) and prints it (README "High availability").
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from kube_cluster import free_port, http_get, wait_for
from tests.integration.operator_fixtures import (  # noqa: F401  (fixtures)
    OPERATOR_SYSTEM_NAMESPACE,
    distilljob,
    distilljob_crd,
    jobs,
    leader_election_args,
    operator_credentials,
)

pytestmark = pytest.mark.k8s

FAST = ["--leader-election-lease-duration", "4", "--leader-election-renew-deadline", "3",
        "--leader-election-retry-period", "0.5"]
STATE_ORDER = [None, "Pending", "Running", "Succeeded"]


class Replica:
    """One operator process (a replica of the chart's Deployment)."""

    def __init__(self, kubeconfig: Path, namespace: str, workdir: Path, name: str, *flags: str):
        self.name = name
        self.metrics_port, self.liveness_port, self.readiness_port = free_port(), free_port(), free_port()
        self.log_path = workdir / f"operator-{name}.log"
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "distill_operator", "--namespace", namespace, "--reconcile-interval", "0.5",
             "--metrics-port", str(self.metrics_port), "--liveness-port", str(self.liveness_port),
             "--readiness-port", str(self.readiness_port), *leader_election_args(namespace), *flags],
            env=dict(os.environ, KUBECONFIG=str(kubeconfig), POD_NAME=f"replica-{name}"),
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def readyz(self) -> tuple[int, str]:
        return http_get(f"http://127.0.0.1:{self.readiness_port}/readyz", timeout=2)

    def healthz(self) -> int:
        return http_get(f"http://127.0.0.1:{self.liveness_port}/healthz", timeout=2)[0]

    def metric(self, line_prefix: str) -> float:
        text = http_get(f"http://127.0.0.1:{self.metrics_port}/metrics")[1]
        values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_prefix)]
        return sum(values)

    def wait_role(self, role: str, timeout: float = 30) -> None:
        wait_for(lambda: self.readyz() == (200, f"{role}\n") and self.healthz() == 200, timeout=timeout,
                 message=f"replica {self.name} {role} (readyz {self.readyz()})\n{self.log()[-2000:]}")

    def identity(self) -> str:
        return wait_for(lambda: (re.search(r"candidate (\S+) for Lease", self.log()) or [None, None])[1],
                        timeout=20, message="candidate identity in the log")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()
        return self.process.returncode


@pytest.fixture
def replicas(kube_cluster, distilljob_crd, kube_namespace, tmp_path):
    """Start replicas with ``replicas(name, *flags)``; each is stopped (SIGTERM) at the end and must exit cleanly
    unless the test stopped it itself."""
    credentials = operator_credentials(str(kube_cluster.kubeconfig))
    started: list[Replica] = []

    def start(name: str, *flags: str) -> Replica:
        replica = Replica(credentials, kube_namespace, tmp_path, name, *flags)
        started.append(replica)
        return replica

    yield start
    running = [replica for replica in started if replica.process.poll() is None]
    for replica in running:  # all at once: each takes kopf's ~5 s to stop
        replica.process.send_signal(signal.SIGTERM)
    for replica in running:
        code = replica.stop(sig=0)  # signal 0: only wait
        assert code in (0, -signal.SIGTERM), replica.log()[-3000:]
    for replica in started:
        assert "Forbidden" not in replica.log(), f"a call the chart's RBAC refused:\n{replica.log()[-3000:]}"


def lease(kube, namespace: str) -> dict:
    name = leader_election_args(namespace)[-1]
    return kube.get("coordination.k8s.io/v1", "Lease", name, OPERATOR_SYSTEM_NAMESPACE) or {}


@contextlib.contextmanager
def state_watch(jobs, interval: float = 0.1):
    """Poll every DistillJob's state; yields {job: [states in the order seen, repeats dropped]}."""
    seen: dict[str, list] = {}
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            for item in jobs.kube.list("kubedistill.io/v1alpha1", "DistillJob", jobs.ns):
                states = seen.setdefault(item["metadata"]["name"], [None])
                state = (item.get("status") or {}).get("state")
                if states[-1] != state:
                    states.append(state)
            stop.wait(interval)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join(5)


def assert_forward_only(seen: dict[str, list]) -> None:
    for job, states in seen.items():
        ranks = [STATE_ORDER.index(s) for s in states]
        assert ranks == sorted(ranks), f"{job}: state went backwards: {states}"


def test_two_replicas_one_writer_burst_of_jobs(replicas, jobs, kube, kube_namespace):
    first = replicas("a", *FAST)
    first.wait_role("leader")
    second = replicas("b", *FAST)
    second.wait_role("standby")  # live and Ready: able to take over
    assert lease(kube, kube_namespace)["spec"]["holderIdentity"] == first.identity()
    names = [f"burst-{i}" for i in range(10)]
    with state_watch(jobs) as seen:
        for name in names:
            jobs.create(distilljob(name, kube_namespace))
        wait_for(lambda: len(jobs.rayjobs()) >= len(names), timeout=30, message="a RayJob per job")
        for name in names:
            jobs.wait_state(name, "Pending")
            jobs.play_kuberay(f"{name}-0", "Running", "RUNNING")
        for name in names:
            jobs.wait_state(name, "Running")
        time.sleep(1)  # a late write of a second writer would show now
    assert sorted(r["metadata"]["name"] for r in jobs.rayjobs()) == sorted(f"{n}-0" for n in names)
    assert set(seen) == set(names)
    assert_forward_only(seen)
    assert all(seen[name][-1] == "Running" for name in names), seen
    # The standby wrote nothing: no reconcile ran there, no RayJob was created there.
    assert first.metric("kubedistill_rayjobs_created_total") == len(names)
    assert second.metric("kubedistill_rayjobs_created_total") == 0
    assert second.metric("kubedistill_reconciles_total") == 0
    assert (first.metric("kubedistill_operator_leader"), second.metric("kubedistill_operator_leader")) == (1, 0)
    # One Event per transition: created, then running.
    for name in names:
        assert sorted(jobs.events(name)) == [("Normal", "RayJobCreated"), ("Normal", "RayJobRunning")], name


def _failover_after_kill(replicas, jobs, kube, kube_namespace, flags: list[str], lease_duration: float) -> float:
    first = replicas("a", *flags)
    first.wait_role("leader")
    second = replicas("b", *flags)
    second.wait_role("standby")
    with state_watch(jobs) as seen:
        jobs.create(distilljob("before", kube_namespace))
        jobs.rayjob("before-0")
        jobs.wait_state("before", "Pending")
        os.killpg(first.process.pid, signal.SIGKILL)
        killed = time.monotonic()
        jobs.create(distilljob("after", kube_namespace))
        jobs.rayjob("after-0", timeout=lease_duration + 20)
        failover = time.monotonic() - killed
        jobs.wait_state("after", "Pending")
    assert_forward_only(seen)
    print(f"\nfailover after kill -9 of the leader (lease {lease_duration:g}s): {failover:.2f}s "
          f"(kill -> RayJob of a job created right after the kill)")
    assert first.stop() == -signal.SIGKILL
    second.wait_role("leader", timeout=5)
    assert lease(kube, kube_namespace)["spec"]["holderIdentity"] == second.identity()
    # The new leader carries on with the job the old one launched.
    jobs.play_kuberay("before-0", "Running", "RUNNING")
    jobs.wait_state("before", "Running")
    assert sorted(r["metadata"]["name"] for r in jobs.rayjobs()) == ["after-0", "before-0"]
    # The transitions made just before the kill and after it: each Event once.
    assert sorted(jobs.events("before")) == [("Normal", "RayJobCreated"), ("Normal", "RayJobRunning")]
    assert jobs.events("after") == [("Normal", "RayJobCreated")]
    return failover


def _failover_after_sigterm(replicas, jobs, kube, kube_namespace, flags: list[str]) -> float:
    first = replicas("a", *flags)
    first.wait_role("leader")
    second = replicas("b", *flags)
    second.wait_role("standby")
    first.process.send_signal(signal.SIGTERM)
    stopped = time.monotonic()
    jobs.create(distilljob("after", kube_namespace))
    jobs.rayjob("after-0", timeout=30)
    failover = time.monotonic() - stopped
    print(f"\nfailover after SIGTERM of the leader: {failover:.2f}s (SIGTERM -> RayJob of a job created right after)")
    assert first.stop() == 0, first.log()[-3000:]
    assert "released Lease" in first.log()
    assert lease(kube, kube_namespace)["spec"]["holderIdentity"] == second.identity()
    return failover


def test_kill_9_of_the_leader_the_standby_takes_over_after_the_lease(replicas, jobs, kube, kube_namespace):
    failover = _failover_after_kill(replicas, jobs, kube, kube_namespace, FAST, 4)
    # Not before the lease ran out since the last renew (<= 0.5 s before the kill), and soon after it.
    assert 3.4 < failover < 4 + 0.5 * 2.2 + 3


def test_sigterm_of_the_leader_releases_the_lease(replicas, jobs, kube, kube_namespace):
    failover = _failover_after_sigterm(replicas, jobs, kube, kube_namespace, FAST)
    assert failover < 4  # well under the 4 s lease: released, taken at the standby's next retry


def test_a_leader_that_loses_the_lease_stops_writing_and_exits(replicas, jobs, kube, kube_namespace):
    from datetime import datetime, timezone

    first = replicas("a", *FAST)
    first.wait_role("leader")
    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    kube.patch("coordination.k8s.io/v1", "Lease", leader_election_args(kube_namespace)[-1],
               {"spec": {"holderIdentity": "someone-else", "renewTime": now, "leaseDurationSeconds": 600}},
               OPERATOR_SYSTEM_NAMESPACE)
    taken = time.monotonic()
    code = first.process.wait(15)
    lost_after = time.monotonic() - taken
    assert code == 1, first.log()[-3000:]
    assert lost_after < 3 + 0.5 + 3  # the renew deadline, a retry, the shutdown
    assert "not renewed" in first.log() and "lease was lost" in first.log().lower()
    assert first.readyz()[0] == 0  # gone
    # It did not hand over (or clear) a Lease it no longer holds.
    assert lease(kube, kube_namespace)["spec"]["holderIdentity"] == "someone-else"


@pytest.mark.slow
def test_failover_with_the_default_durations(replicas, jobs, kube, kube_namespace, tmp_path):
    """The numbers of README "High availability": client-go's defaults, 15 s lease, 10 s renew deadline, 2 s retry."""
    killed = _failover_after_kill(replicas, jobs, kube, kube_namespace, [], 15)
    assert 13 < killed < 15 + 2 * 2.2 + 3


@pytest.mark.slow
def test_clean_failover_with_the_default_durations(replicas, jobs, kube, kube_namespace):
    stopped = _failover_after_sigterm(replicas, jobs, kube, kube_namespace, [])
    assert stopped < 2 * 2.2 + 3  # the standby's next retry (2 s, jittered), not the 15 s lease
