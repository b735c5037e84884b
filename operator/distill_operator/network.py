"""Pure builder of the NetworkPolicy that fences a DistillJob's Ray pods (one per job, owned by it).

Ray has no authentication: whoever reaches the head's dashboard (8265, the Ray Jobs API) runs code as the trainer,
with its service account token and the checkpoint volume; GCS (6379), the Ray client server (10001) and the
raylet/object-manager/worker ports accept any peer too. So ingress to the job's pods is limited to
- the job's own pods (head, workers, KubeRay's submitter: every pod labelled ``kubedistill.io/distilljob=<job>``
  by render.py), on all ports: Ray's GCS, raylet and worker ports must stay reachable between them;
- the dashboard clients (``--dashboard-client``; default KubeRay's controller, which polls the job through the
  dashboard, and this operator) on the dashboard port only;
- the metrics clients (``--metrics-client``; default Prometheus) on the metrics ports only: Ray's (8080, every
  pod) and the trainer's (9108, the driver on the head).
Egress is not restricted (the trainer reads models and data, the head reaches the API server).

A peer is written ``[NAMESPACE_LABELS:]POD_LABELS``, each side ``key=value[,key=value...]``; an empty side matches
everything, and without ``NAMESPACE_LABELS:`` the pods may be in any namespace. E.g.
``kubernetes.io/metadata.name=monitoring:app.kubernetes.io/name=prometheus``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from distill_operator.render import (
    DASHBOARD_PORT,
    LABEL_JOB,
    LABEL_MANAGED_BY,
    METRICS_PORT,
    TRAINER_METRICS_PORT,
    JobRef,
    _bounded,
    labels,
)
from distill_operator.render import owner_reference

# A label key: an optional DNS-subdomain prefix and '/', then a name; a value: empty or a name (<= 63 chars).
_NAME = r"[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?"
_LABEL_KEY = re.compile(rf"^([a-z0-9]([a-z0-9.-]{{0,251}}[a-z0-9])?/)?{_NAME}$")
_LABEL_VALUE = re.compile(rf"^({_NAME})?$")


@dataclass(frozen=True)
class Peer:
    """Pods allowed in: those matching ``pod_labels`` in namespaces matching ``namespace_labels`` ({} = all)."""

    namespace_labels: tuple[tuple[str, str], ...] = ()
    pod_labels: tuple[tuple[str, str], ...] = ()

    def to_manifest(self) -> dict[str, Any]:
        return {
            "namespaceSelector": {"matchLabels": dict(self.namespace_labels)} if self.namespace_labels else {},
            "podSelector": {"matchLabels": dict(self.pod_labels)} if self.pod_labels else {},
        }

    def __str__(self) -> str:
        def text(pairs: tuple[tuple[str, str], ...]) -> str:
            return ",".join(f"{k}={v}" for k, v in pairs)

        return f"{text(self.namespace_labels)}:{text(self.pod_labels)}" if self.namespace_labels else text(self.pod_labels)


def _parse_labels(text: str, what: str) -> tuple[tuple[str, str], ...]:
    pairs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not _LABEL_KEY.match(key) or not _LABEL_VALUE.match(value):
            raise ValueError(f"{what}: {item!r} is not a label key=value")
        pairs.append((key, value))
    return tuple(sorted(pairs))


def parse_peer(text: str) -> Peer:
    """``[NAMESPACE_LABELS:]POD_LABELS`` -> Peer (ValueError with the offending part)."""
    if not text.strip():
        raise ValueError("an empty peer would match every pod of every namespace; name some labels")
    namespace_text, sep, pod_text = text.rpartition(":")
    peer = Peer(_parse_labels(namespace_text, f"namespace labels of {text!r}"), _parse_labels(pod_text, f"pod labels of {text!r}"))
    if sep and not peer.namespace_labels and not peer.pod_labels:
        raise ValueError(f"{text!r} matches every pod of every namespace; name some labels")
    return peer


DEFAULT_DASHBOARD_CLIENTS = (
    parse_peer("app.kubernetes.io/name=kuberay-operator"),
    parse_peer("app.kubernetes.io/name=kubedistill-operator"),
)
DEFAULT_METRICS_CLIENTS = (parse_peer("app.kubernetes.io/name=prometheus"),)


def network_policy_name(job: JobRef) -> str:
    return _bounded(f"{job.name}-ray", 253)


def job_pod_selector(job: JobRef) -> dict[str, Any]:
    """Every pod of every attempt of the job (render.py puts these labels on head, workers and submitter)."""
    own = labels(job)
    return {"matchLabels": {LABEL_JOB: own[LABEL_JOB], LABEL_MANAGED_BY: own[LABEL_MANAGED_BY]}}


def render_network_policy(
    job: JobRef,
    dashboard_clients: tuple[Peer, ...] = DEFAULT_DASHBOARD_CLIENTS,
    metrics_clients: tuple[Peer, ...] = DEFAULT_METRICS_CLIENTS,
) -> dict[str, Any]:
    """Ingress to the job's Ray pods: from themselves (any port), dashboard clients (8265), metrics clients (Ray's
    8080 and the trainer's 9108)."""
    ingress: list[dict[str, Any]] = [{"from": [{"podSelector": job_pod_selector(job)}]}]
    for peers, ports in ((dashboard_clients, (DASHBOARD_PORT,)), (metrics_clients, (METRICS_PORT, TRAINER_METRICS_PORT))):
        if peers:
            ingress.append({
                "from": [peer.to_manifest() for peer in peers],
                "ports": [{"protocol": "TCP", "port": port} for port in ports],
            })
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": network_policy_name(job),
            "namespace": job.namespace,
            "labels": labels(job),
            "ownerReferences": [owner_reference(job)],
        },
        "spec": {"podSelector": job_pod_selector(job), "policyTypes": ["Ingress"], "ingress": ingress},
    }
