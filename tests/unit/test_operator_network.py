"""network.py: the NetworkPolicy fencing a DistillJob's Ray pods, and the peer syntax of its settings."""

from __future__ import annotations

import pytest

from distill_operator import network, render
from distill_operator.network import Peer, parse_peer
from distill_operator.render import JobRef

JOB = JobRef(name="qwen-distill", namespace="ml", uid="0123456789abcdef")


def test_policy_admits_the_jobs_own_pods_the_dashboard_clients_and_prometheus_only():
    policy = network.render_network_policy(JOB)
    assert (policy["apiVersion"], policy["kind"]) == ("networking.k8s.io/v1", "NetworkPolicy")
    assert policy["metadata"]["name"] == "qwen-distill-ray" and policy["metadata"]["namespace"] == "ml"
    assert policy["metadata"]["ownerReferences"] == [render.owner_reference(JOB)]
    own = {"matchLabels": {"kubedistill.io/distilljob": "qwen-distill",
                           "app.kubernetes.io/managed-by": "kubedistill-operator"}}
    spec = policy["spec"]
    assert spec["podSelector"] == own and spec["policyTypes"] == ["Ingress"]
    assert spec["ingress"] == [
        # Head, workers and submitter of the job: every port (GCS 6379, raylet, object manager, workers, 8265).
        {"from": [{"podSelector": own}]},
        {"from": [
            {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}},
            {"namespaceSelector": {},
             "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kubedistill-operator"}}},
        ], "ports": [{"protocol": "TCP", "port": 8265}]},
        # Ray's metrics on every pod, the trainer's (kubedistill_trainer_*) on the head.
        {"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}],
         "ports": [{"protocol": "TCP", "port": 8080}, {"protocol": "TCP", "port": 9108}]},
    ]


def test_policy_selects_exactly_the_labels_render_puts_on_ray_pods():
    from distill_operator.resources import parse_spec
    from tests.unit.test_operator_render import _pods, spec_dict

    rj = render.render_rayjob(parse_spec(spec_dict()), JOB, attempt=1, resume=True)
    cluster = rj["spec"]["rayClusterSpec"]
    templates = [cluster["headGroupSpec"]["template"], cluster["workerGroupSpecs"][0]["template"],
                 rj["spec"]["submitterPodTemplate"]]
    selector = network.job_pod_selector(JOB)["matchLabels"]
    for template in templates:
        assert selector.items() <= template["metadata"]["labels"].items()
    assert len(_pods(rj)) == 3


def test_metrics_rule_opens_the_ports_render_exposes_for_metrics():
    from distill_operator.resources import parse_spec
    from tests.unit.test_operator_render import spec_dict

    rj = render.render_rayjob(parse_spec(spec_dict()), JOB, attempt=1, resume=False)
    head = rj["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    metrics_ports = {p["containerPort"] for p in head["ports"] if p["name"] in ("metrics", "trainer-metrics")}
    rule = network.render_network_policy(JOB, metrics_clients=(parse_peer("team=obs:app=vm"),))["spec"]["ingress"][-1]
    assert {p["port"] for p in rule["ports"]} == metrics_ports == {8080, 9108}
    assert rule["from"] == [{"namespaceSelector": {"matchLabels": {"team": "obs"}},
                             "podSelector": {"matchLabels": {"app": "vm"}}}]


def test_empty_client_lists_drop_their_rule():
    spec = network.render_network_policy(JOB, dashboard_clients=(), metrics_clients=())["spec"]
    assert spec["ingress"] == [{"from": [{"podSelector": network.job_pod_selector(JOB)}]}]


def test_peer_syntax():
    assert parse_peer("app=x") == Peer((), (("app", "x"),))
    peer = parse_peer("kubernetes.io/metadata.name=monitoring:app.kubernetes.io/name=prometheus,team=a")
    assert peer.to_manifest() == {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus", "team": "a"}},
    }
    assert parse_peer(str(peer)) == peer
    assert parse_peer("team=ml:").to_manifest() == {"namespaceSelector": {"matchLabels": {"team": "ml"}},
                                                    "podSelector": {}}


@pytest.mark.parametrize("text", ["", " ", "app", "=x", "a b=c", ":", "app=x y", "bad/key/x=1"])
def test_malformed_peers_are_refused(text):
    with pytest.raises(ValueError):
        parse_peer(text)
