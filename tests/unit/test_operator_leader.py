"""LeaderElector (operator/distill_operator/leader.py) against an in-memory Lease: acquire, the observed-clock expiry,
renew deadline, release, conflicts. The real API server runs in tests/integration/test_operator_leader_election.py."""

from __future__ import annotations

import copy

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from distill_operator import leader as leader_module
from distill_operator.leader import LeaderElector
from distill_operator.runtime import OperatorRuntime


class FakeLeases:
    """One Lease, with resourceVersion checks like the API server's."""

    def __init__(self):
        self.lease: client.V1Lease | None = None
        self.version = 0
        self.fail = False

    def __call__(self, _api=None):
        return self

    def read_namespaced_lease(self, name, namespace, **_):
        if self.fail:
            raise ApiException(status=503, reason="Unavailable")
        if self.lease is None:
            raise ApiException(status=404, reason="Not Found")
        return copy.deepcopy(self.lease)

    def create_namespaced_lease(self, namespace, body, **_):
        if self.lease is not None:
            raise ApiException(status=409, reason="AlreadyExists")
        self.version += 1
        body.metadata.resource_version = str(self.version)
        self.lease = copy.deepcopy(body)

    def replace_namespaced_lease(self, name, namespace, body, **_):
        if self.fail:
            raise ApiException(status=503, reason="Unavailable")
        if body.metadata.resource_version != self.lease.metadata.resource_version:
            raise ApiException(status=409, reason="Conflict")
        self.version += 1
        body.metadata.resource_version = str(self.version)
        self.lease = copy.deepcopy(body)


@pytest.fixture
def leases(monkeypatch):
    fake = FakeLeases()
    monkeypatch.setattr(leader_module.client, "CoordinationV1Api", fake)
    return fake


@pytest.fixture
def clock(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(leader_module.time, "monotonic", lambda: now[0])
    return now


def elector(identity: str) -> LeaderElector:
    return LeaderElector(lambda: None, "ns", "lease", identity=identity, lease_duration=15, renew_deadline=10,
                         retry_period=2)


def test_first_candidate_creates_the_lease_and_leads(leases, clock):
    a = elector("a")
    assert not a.leading and not a.ready
    assert a._try(acquiring=True)
    assert a.leading and a.ready
    assert leases.lease.spec.holder_identity == "a" and leases.lease.spec.lease_duration_seconds == 15


def test_a_standby_waits_the_lease_duration_on_its_own_clock(leases, clock):
    a, b = elector("a"), elector("b")
    assert a._try(acquiring=True)
    assert not b._try(acquiring=True) and b.ready and not b.leading  # in contact: Ready, not leading
    clock[0] += 14
    assert not b._try(acquiring=True)  # the record has not changed for 14 s only
    clock[0] += 1.5
    assert b._try(acquiring=True)
    assert leases.lease.spec.holder_identity == "b" and leases.lease.spec.lease_transitions == 1
    # The old leader stopped writing 10 s after its last renew, before b could take over (15 s).
    assert not a.leading


def test_renews_keep_the_standby_out(leases, clock):
    a, b = elector("a"), elector("b")
    assert a._try(acquiring=True)
    for _ in range(20):
        clock[0] += 2
        assert a._try(acquiring=False) and a.leading
        assert not b._try(acquiring=True)


def test_the_leader_stops_leading_at_the_renew_deadline(leases, clock):
    a = elector("a")
    assert a._try(acquiring=True)
    leases.fail = True
    clock[0] += 9.9
    assert not a._try(acquiring=False) and a.leading
    clock[0] += 0.2
    assert not a.leading  # 10 s since the start of the last successful renew


def test_a_taken_lease_is_not_renewed(leases, clock):
    a = elector("a")
    assert a._try(acquiring=True)
    leases.lease.spec.holder_identity = "someone-else"
    assert not a._try(acquiring=False)


def test_two_candidates_for_a_free_lease_one_wins(leases, clock):
    a, b = elector("a"), elector("b")
    assert a._try(acquiring=True)
    a.release()
    read_a = leases.read_namespaced_lease("lease", "ns")
    assert read_a.spec.holder_identity is None  # released: free at once
    c, d = elector("c"), elector("d")
    # Both read the free Lease; the second write carries a stale resourceVersion: 409, it stays a standby.
    original = leases.read_namespaced_lease
    stale = copy.deepcopy(read_a)
    leases.read_namespaced_lease = lambda *args, **kwargs: copy.deepcopy(stale)
    assert c._try(acquiring=True)
    assert not d._try(acquiring=True)
    leases.read_namespaced_lease = original
    assert leases.lease.spec.holder_identity == "c"
    assert not b.leading


def test_release_only_hands_over_its_own_lease(leases, clock):
    a = elector("a")
    assert a._try(acquiring=True)
    leases.lease.spec.holder_identity = "b"
    leases.lease.metadata.resource_version = "99"
    leases.version = 99
    a.release()
    assert leases.lease.spec.holder_identity == "b"
    assert not a.leading and not a.ready


def test_durations_must_be_ordered():
    with pytest.raises(ValueError, match="lease duration > renew deadline > retry period"):
        LeaderElector(lambda: None, "ns", lease_duration=10, renew_deadline=10, retry_period=2)


def test_a_standby_runtime_writes_nothing(leases, clock):
    """The runtime's gate: a standby neither reconciles nor mirrors progress (no API client is ever made)."""
    runtime = OperatorRuntime(leader=elector("a"))
    runtime.api_client = lambda: pytest.fail("a standby made an API call")
    body = {"metadata": {"name": "j", "namespace": "ns", "uid": "u", "generation": 1}, "spec": {}}
    runtime.distilljob_event("ADDED", body, "ns", "j")
    runtime.reconcile("ns", "j", "timer")
    runtime.mirror_progress("ns", "j", {"step": "1"})
    assert ("ns", "j") in runtime._watched  # it keeps track, to reconcile when it takes over
    assert not runtime.leading() and OperatorRuntime().leading()


def test_identity_and_namespace_defaults(monkeypatch):
    monkeypatch.setenv("POD_NAME", "op-7d9f")
    monkeypatch.setenv("POD_NAMESPACE", "kd-system")
    identity = leader_module.default_identity()
    assert identity.startswith("op-7d9f_") and identity != leader_module.default_identity()
    assert leader_module.default_namespace(["team-a"]) == "kd-system"
    monkeypatch.delenv("POD_NAMESPACE")
    monkeypatch.setattr(leader_module, "open", lambda *_: (_ for _ in ()).throw(OSError()), raising=False)
    assert leader_module.default_namespace(["team-*", "team-a"]) == "team-a"
    assert leader_module.default_namespace([]) is None
