"""Security of what the operator creates, against the real API server (issue 10, items 7-9).

- The Ray pods' security settings survive the RayJob CRD (tests/fixtures/rayjob-crd.yaml types them as KubeRay's
  real CRD does, so a misspelled field would be pruned) and are valid core/v1 pods (server dry run).
- Each job gets a NetworkPolicy, owned by it, admitting only its own pods, the dashboard clients and Prometheus.
- A DistillJob naming a ServiceAccount that is not allow-listed gets no child and a condition naming the flag.
(An invalid rayAddress rejected at kubectl apply is in test_operator_validation.py.)
"""

from __future__ import annotations

import pytest

from distill_operator import network, render
from distill_operator.render import JobRef
from distill_operator.resources import parse_spec
from distill_operator.settings import ENV_ALLOWED_SERVICE_ACCOUNTS, ENV_DASHBOARD_CLIENTS, ENV_METRICS_CLIENTS
from kube_cluster import wait_for
from tests.integration.operator_fixtures import (  # noqa: F401
    distilljob,
    distilljob_crd,
    jobs,
    operator,
    running_operator,
)

pytestmark = pytest.mark.k8s


def _templates(rayjob: dict) -> dict[str, dict]:
    cluster = rayjob["spec"]["rayClusterSpec"]
    return {
        "head": cluster["headGroupSpec"]["template"],
        "worker": cluster["workerGroupSpecs"][0]["template"],
        "submitter": rayjob["spec"]["submitterPodTemplate"],
    }


def test_rendered_rayjob_keeps_pod_security_through_the_rayjob_crd_and_pods_are_valid(
    kube, rayjob_crd, kube_namespace
):
    job = JobRef("secure", kube_namespace, "0123456789abcdef")
    spec = parse_spec(distilljob("secure", kube_namespace)["spec"])
    manifest = render.render_rayjob(spec, job, attempt=0, resume=False)
    manifest["metadata"].pop("ownerReferences")  # no such DistillJob: the GC would delete the object
    res = kube.resource("ray.io/v1", "RayJob")
    stored = kube.dyn.create(res, body=manifest, namespace=kube_namespace, dry_run="All").to_dict()
    # Nothing pruned: every field rendered is in the CRD's schema (typed as in KubeRay's CRD).
    for role, template in _templates(stored).items():
        assert template == _templates(manifest)[role], role
        pod = template["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 1000
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        context = pod["containers"][0]["securityContext"]
        assert context["readOnlyRootFilesystem"] is True and context["allowPrivilegeEscalation"] is False
        assert context["capabilities"] == {"drop": ["ALL"]}
        assert pod["automountServiceAccountToken"] is (role == "head")

    # Each template is a valid core/v1 Pod for the API server (full validation of securityContext, fieldRef
    # env, emptyDir volumes), and the server keeps every field.
    kube.create({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "secure-trainer"}}, kube_namespace)
    # On 1.20 the ServiceAccount admission plugin refuses a pod (even a dry run) until the controller-manager's
    # token controller has given the account its token secret: wait for that instead of racing it.
    wait_for(lambda: kube.get("v1", "ServiceAccount", "secure-trainer", kube_namespace).get("secrets"),
             timeout=60, message="the ServiceAccount's token secret")
    pods = kube.resource("v1", "Pod")
    for role, template in _templates(manifest).items():
        pod_spec = dict(template["spec"])
        pod_spec.setdefault("restartPolicy", "Never")
        if role != "submitter":
            pod_spec["volumes"] = [v for v in pod_spec["volumes"] if "configMap" not in v]  # no such ConfigMap
            pod_spec["containers"] = [dict(pod_spec["containers"][0])]
            pod_spec["containers"][0]["volumeMounts"] = [
                m for m in pod_spec["containers"][0]["volumeMounts"] if m["name"] != "kubedistill-config"
            ]
        body = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"secure-{role}"}, "spec": pod_spec}
        created = kube.dyn.create(pods, body=body, namespace=kube_namespace, dry_run="All").to_dict()["spec"]
        assert created["securityContext"] == pod_spec["securityContext"], role
        container = created["containers"][0]
        assert container["securityContext"] == pod_spec["containers"][0]["securityContext"], role
        assert {v["name"] for v in created["volumes"]} >= {"tmp", "home"}, role
        assert created["automountServiceAccountToken"] is (role == "head"), role


def test_network_policy_is_owned_by_the_job_and_admits_only_its_pods_dashboard_clients_and_prometheus(
    operator, jobs, kube, kube_namespace
):
    created = jobs.create(distilljob("fenced", kube_namespace))
    rayjob = jobs.rayjob("fenced-0")
    policy = wait_for(lambda: kube.get("networking.k8s.io/v1", "NetworkPolicy", "fenced-ray", kube_namespace),
                      message="NetworkPolicy fenced-ray")
    owner = policy["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["uid"]) == ("DistillJob", "fenced", created["metadata"]["uid"])
    own = {"matchLabels": {"kubedistill.io/distilljob": "fenced", "app.kubernetes.io/managed-by": "kubedistill-operator"}}
    spec = policy["spec"]
    assert spec["podSelector"] == own and spec["policyTypes"] == ["Ingress"]
    assert spec["ingress"] == [
        {"from": [{"podSelector": own}]},
        {"from": [
            {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}},
            {"namespaceSelector": {},
             "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kubedistill-operator"}}},
        ], "ports": [{"protocol": "TCP", "port": 8265}]},
        {"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}],
         "ports": [{"protocol": "TCP", "port": 8080}, {"protocol": "TCP", "port": 9108}]},  # Ray's, the trainer's
    ]
    # The policy selects every Ray pod of the job, submitter included (KubeRay copies template labels to pods).
    for template in _templates(rayjob).values():
        assert own["matchLabels"].items() <= template["metadata"]["labels"].items()


def test_network_policy_clients_follow_the_operator_settings(
    kubeconfig_env, distilljob_crd, jobs, kube, kube_namespace, monkeypatch
):
    monkeypatch.setenv(ENV_DASHBOARD_CLIENTS, "kubernetes.io/metadata.name=ray-system:app.kubernetes.io/name=kuberay-operator")
    monkeypatch.setenv(ENV_METRICS_CLIENTS, "")
    with running_operator(kube_namespace):
        jobs.create(distilljob("narrow", kube_namespace))
        jobs.rayjob("narrow-0")
    ingress = kube.get("networking.k8s.io/v1", "NetworkPolicy", "narrow-ray", kube_namespace)["spec"]["ingress"]
    assert ingress[1:] == [{
        "from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ray-system"}},
                  "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}}],
        "ports": [{"protocol": "TCP", "port": 8265}],
    }]
    assert ingress[0] == {"from": [{"podSelector": network.job_pod_selector(JobRef("narrow", kube_namespace, ""))}]}


def test_service_account_not_on_the_allow_list_gets_no_child_and_a_condition_naming_the_flag(
    operator, jobs, kube, kube_namespace
):
    jobs.create(distilljob("borrower", kube_namespace, serviceAccountName="admin"))
    status = jobs.wait_state("borrower", "Failed")
    failed = jobs.condition("borrower", "Failed")
    for part in ("spec.serviceAccountName", "'admin'", "--allow-service-account admin"):
        assert part in failed["message"], failed
    assert part in status["message"]
    assert not jobs.rayjobs()
    assert kube.get("networking.k8s.io/v1", "NetworkPolicy", "borrower-ray", kube_namespace) is None
    assert kube.get("v1", "ConfigMap", render.configmap_name(JobRef("borrower", kube_namespace, "")),
                    kube_namespace) is None


def test_allow_listed_service_account_is_used_by_the_ray_pods(
    kubeconfig_env, distilljob_crd, jobs, kube_namespace, monkeypatch
):
    monkeypatch.setenv(ENV_ALLOWED_SERVICE_ACCOUNTS, f"{kube_namespace}/team-*")
    with running_operator(kube_namespace):
        jobs.create(distilljob("team", kube_namespace, serviceAccountName="team-ml"))
        rayjob = jobs.rayjob("team-0")
    assert {t["spec"]["serviceAccountName"] for t in _templates(rayjob).values()} == {"team-ml"}
