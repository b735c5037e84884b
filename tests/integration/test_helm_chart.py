"""The Helm chart (charts/kubedistill), checked with a real helm (scripts/helm/ensure.sh) and the real API server.

- ``helm lint`` and ``helm template`` with the default values and with every optional feature on;
- every rendered object, both ways, applied with a server-side dry run (prometheus-operator's kinds against minimal
  copies of its CRDs, tests/fixtures/prometheus-operator-crds.yaml);
- a real ``helm install`` of CRD, RBAC and Deployment on an empty API server (no kubelet: the pod never starts);
- a mistyped value is rejected by values.schema.json, and nothing is installed;
- the operator's RBAC is exactly what its code calls (tests/operator_rbac.py derives that), and the operator
  reconciles a DistillJob end to end with the token of the chart's ServiceAccount, not as cluster admin.

The test API server is Kubernetes 1.20: it refuses the CEL rules (x-kubernetes-validations, >= 1.25) of the chart's
CRD, so on servers older than 1.25 the chart is installed from a copy whose crds/ holds crds/distilljob-no-cel.yaml,
as the README tells users of such clusters to do (``--skip-crds`` and the no-CEL CRD).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
import yaml
from kubernetes import client

import operator_rbac
from kube_cluster import load_manifests, start_cluster, wait_for
from tests.integration.operator_fixtures import (  # noqa: F401
    distilljob,
    distilljob_crd,
    jobs,
    running_operator,
    service_account_kubeconfig,
)

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "kubedistill"
PROMETHEUS_CRDS = REPO / "tests" / "fixtures" / "prometheus-operator-crds.yaml"

# Every optional feature on, and every operator flag set.
ALL_ON = {
    "operator": {
        "namespaces": ["team-a", "team-b"],
        "logLevel": "debug",
        "reconcileInterval": 5,
        "livenessApiTimeout": 90,
        "allowServiceAccounts": ["ml/*"],
        "allowClaims": ["checkpoints-*"],
        "dashboardClients": ["kubernetes.io/metadata.name=ray-system:app.kubernetes.io/name=kuberay-operator"],
        "metricsClients": [],
        "extraArgs": ["--verbose"],
    },
    "image": {"digest": "sha256:" + "0" * 64},
    "imagePullSecrets": [{"name": "registry"}],
    "serviceAccount": {"annotations": {"example.com/role": "operator"}},
    "podAnnotations": {"example.com/a": "b"},
    "priorityClassName": "system-cluster-critical",
    "metricsService": {"annotations": {"example.com/scrape": "true"}},
    "serviceMonitor": {"enabled": True, "interval": "15s", "scrapeTimeout": "10s", "labels": {"release": "kps"}},
    "podMonitor": {"enabled": True, "labels": {"release": "kps"}},
    "prometheusRule": {"enabled": True, "labels": {"release": "kps"}},
    "grafanaDashboards": {"enabled": True, "annotations": {"grafana_folder": "kubedistill"}},
}


@pytest.fixture(scope="session")
def helm() -> str:
    done = subprocess.run(["bash", str(REPO / "scripts" / "helm" / "ensure.sh")], capture_output=True, text=True,
                          timeout=300)
    if done.returncode != 0:
        message = f"no helm: {done.stderr.strip()}"
        if os.environ.get("KUBEDISTILL_REQUIRE_K8S") == "1":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return done.stdout.strip().splitlines()[-1]


def _run(*args: str, check: bool = True, kubeconfig: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, HELM_CACHE_HOME="/tmp/kubedistill-helm/cache", HELM_CONFIG_HOME="/tmp/kubedistill-helm/config",
               HELM_DATA_HOME="/tmp/kubedistill-helm/data")
    env["NO_PROXY"] = env["no_proxy"] = ",".join(filter(None, [env.get("NO_PROXY"), "127.0.0.1,localhost"]))
    if kubeconfig is not None:
        env["KUBECONFIG"] = str(kubeconfig)
    done = subprocess.run(list(args), capture_output=True, text=True, timeout=120, env=env)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done


def _values_file(tmp_path: Path, values: dict, name: str = "values.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(values))
    return str(path)


def _template(helm: str, tmp_path: Path, values: dict | None = None, namespace: str = "kubedistill",
              *extra: str) -> list[dict]:
    args = [helm, "template", "kd", str(CHART), "--namespace", namespace, *extra]
    if values:
        args += ["-f", _values_file(tmp_path, values)]
    return load_manifests(_run(*args).stdout)


def _by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def _chart_for(server_minor: int, tmp_path: Path) -> Path:
    """The chart, or below Kubernetes 1.25 a copy whose crds/ holds the CRD without CEL rules."""
    if server_minor >= 25:
        return CHART
    copy = tmp_path / "kubedistill"
    shutil.copytree(CHART, copy)
    shutil.copy(REPO / "crds" / "distilljob-no-cel.yaml", copy / "crds" / "distilljob.yaml")
    return copy


def _minor(api_client) -> int:
    return int(client.VersionApi(api_client).get_code().minor.rstrip("+"))


# --- helm lint / template (no cluster) ------------------------------------------------------------------------


@pytest.mark.parametrize("values", [None, ALL_ON], ids=["defaults", "all-features-on"])
def test_helm_lint_passes(helm, tmp_path, values):
    args = [helm, "lint", str(CHART), "--strict"]
    if values:
        args += ["-f", _values_file(tmp_path, values)]
    _run(*args)


def test_template_with_defaults_renders_the_operator_and_no_optional_kinds(helm, tmp_path):
    objects = _template(helm, tmp_path)
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == ["ClusterRole", "ClusterRole", "ClusterRoleBinding", "ClusterRoleBinding", "ConfigMap",
                     "ConfigMap", "Deployment", "PodDisruptionBudget", "Role", "RoleBinding", "Service",
                     "ServiceAccount"]
    (deployment,) = _by_kind(objects, "Deployment")
    spec = deployment["spec"]
    # Two replicas, one leader (leader election on by default); a rolling update never runs two writers.
    assert spec["replicas"] == 2
    assert spec["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    (budget,) = _by_kind(objects, "PodDisruptionBudget")
    assert budget["spec"]["minAvailable"] == 1
    assert budget["spec"]["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    # The Lease permissions: a Role in the operator's namespace only.
    (role,) = _by_kind(objects, "Role")
    assert role["metadata"]["namespace"] == "kubedistill"
    assert role["rules"] == [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                              "verbs": ["get", "create", "update"]}]
    (binding,) = _by_kind(objects, "RoleBinding")
    assert binding["metadata"]["namespace"] == "kubedistill" and binding["roleRef"]["name"] == role["metadata"]["name"]
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "healthz"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "readyz"}
    env = {e["name"]: e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") for e in container["env"]}
    assert env["POD_NAMESPACE"] == "metadata.namespace" and env["POD_NAME"] == "metadata.name"
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    assert container["image"] == "kubedistill/operator:0.1.0"  # the chart's appVersion
    # The pod label the operator's default --dashboard-client admits, and the alerts' runbooks select.
    assert spec["template"]["metadata"]["labels"]["app.kubernetes.io/name"] == "kubedistill-operator"
    # The flags parse with the operator's own parser.
    from distill_operator.__main__ import build_parser, settings_from_args

    args = build_parser().parse_args(container["args"])
    assert (args.bind_address, args.metrics_port, args.liveness_port, args.reconcile_interval, args.log_level) == (
        "0.0.0.0", 9090, 8080, 10.0, "info")
    assert args.namespace == [] and settings_from_args(args).allowed_claims == ("*",)
    assert args.liveness_api_timeout == 60
    assert args.leader_election and args.leader_election_lease_name == "kd-kubedistill-operator"
    assert (args.leader_election_lease_duration, args.leader_election_renew_deadline,
            args.leader_election_retry_period, args.readiness_port) == (15, 10, 2, 8081)
    assert {p["name"]: p["containerPort"] for p in container["ports"]}["readyz"] == 8081
    (service,) = _by_kind(objects, "Service")
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    dashboards = _by_kind(objects, "ConfigMap")
    assert {name for d in dashboards for name in d["data"]} == {p.name for p in (CHART / "dashboards").glob("*.json")}
    for dashboard in dashboards:
        assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
        for text in dashboard["data"].values():
            json.loads(text)


def test_template_with_every_feature_on(helm, tmp_path):
    objects = _template(helm, tmp_path, ALL_ON)
    (container,) = _by_kind(objects, "Deployment")[0]["spec"]["template"]["spec"]["containers"]
    from distill_operator import network
    from distill_operator.__main__ import build_parser, settings_from_args

    args = build_parser().parse_args(container["args"])
    settings = settings_from_args(args)
    assert args.namespace == ["team-a", "team-b"] and args.log_level == "debug" and args.reconcile_interval == 5
    assert args.liveness_api_timeout == 90
    assert settings.allowed_service_accounts == ("ml/*",) and settings.allowed_claims == ("checkpoints-*",)
    assert settings.dashboard_clients == (network.parse_peer(ALL_ON["operator"]["dashboardClients"][0]),)
    assert settings.metrics_clients == ()  # [] drops the rule
    assert container["image"].endswith("@sha256:" + "0" * 64)
    # Listed namespaces: the namespaced permissions are bound in those namespaces only.
    assert sorted(b["metadata"]["namespace"] for b in _by_kind(objects, "RoleBinding")
                  if b["roleRef"]["kind"] == "ClusterRole") == ["team-a", "team-b"]
    assert [b["roleRef"]["name"] for b in _by_kind(objects, "ClusterRoleBinding")] == ["kd-kubedistill-operator-cluster"]
    (monitor,) = _by_kind(objects, "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics" and monitor["metadata"]["labels"]["release"] == "kps"
    (pods,) = _by_kind(objects, "PodMonitor")
    from distill_operator import render

    assert pods["spec"]["podMetricsEndpoints"][0]["port"] == "trainer-metrics"
    assert pods["spec"]["selector"]["matchLabels"][render.LABEL_MANAGED_BY] == render.MANAGER
    assert pods["spec"]["namespaceSelector"] == {"matchNames": ["team-a", "team-b"]}
    (rule,) = _by_kind(objects, "PrometheusRule")
    groups = yaml.safe_load((CHART / "rules" / "kubedistill.rules.yaml").read_text())["groups"]
    assert rule["spec"]["groups"] == groups  # the rules file as it is, {{ $labels }} templates untouched
    assert all(d["metadata"]["annotations"] == {"grafana_folder": "kubedistill"} for d in _by_kind(objects, "ConfigMap"))


def test_head_pods_match_the_pod_monitor(helm, tmp_path):
    """The PodMonitor selects the Ray head of a rendered RayJob (KubeRay adds ray.io/node-type) by the operator's
    labels, and scrapes a port the head declares under that name."""
    from distill_operator import render
    from distill_operator.render import JobRef
    from distill_operator.resources import parse_spec

    body = distilljob("job", "ns")
    rayjob = render.render_rayjob(parse_spec(body["spec"]), JobRef("job", "ns", "uid"), 0, False)
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]
    labels = {**head["metadata"]["labels"], "ray.io/node-type": "head"}
    (pods,) = _by_kind(_template(helm, tmp_path, {"podMonitor": {"enabled": True}}), "PodMonitor")
    selector = pods["spec"]["selector"]
    assert selector["matchLabels"].items() <= labels.items()
    assert all(e["key"] in labels for e in selector["matchExpressions"] if e["operator"] == "Exists")
    ports = {p["name"]: p["containerPort"] for c in head["spec"]["containers"] for p in c.get("ports", [])}
    endpoint = pods["spec"]["podMetricsEndpoints"][0]["port"]
    assert endpoint == render.TRAINER_METRICS_PORT_NAME and ports[endpoint] == render.TRAINER_METRICS_PORT


# --- RBAC: exactly what the code calls ---------------------------------------------------------------------------


@pytest.mark.parametrize("values, namespaced", [(None, False), ({"operator": {"namespaces": ["a", "b"]}}, True)],
                         ids=["all-namespaces", "listed-namespaces"])
def test_operator_rbac_is_exactly_what_its_code_calls(helm, tmp_path, values, namespaced):
    objects = _template(helm, tmp_path, values)
    rules = [rule for role in _by_kind(objects, "ClusterRole") for rule in role["rules"]]
    # The Lease (leader election) in the operator's namespace only: a Role there, nothing cluster-wide.
    assert not any("leases" in rule["resources"] for rule in rules)
    (lease_role,) = [role for role in _by_kind(objects, "Role") if role["metadata"]["name"].endswith("-leader-election")]
    assert lease_role["metadata"]["namespace"] == "kubedistill"
    rules += lease_role["rules"]
    assert not any("*" in rule.get(k, []) for rule in rules for k in ("apiGroups", "resources", "verbs"))
    assert not any(rule.get("resourceNames") or rule.get("nonResourceURLs") for rule in rules)
    granted = operator_rbac.granted(rules)
    needed = operator_rbac.required(namespaced=namespaced)
    missing = {k: v for k, v in needed.items() if k not in granted}
    extra = granted - needed.keys()
    assert not missing, f"the chart does not grant what the code calls (group, resource, verb: where): {missing}"
    assert not extra, f"the chart grants what no code calls: {sorted(extra)}"


def test_rbac_examples_are_rendered_from_the_chart():
    """RBAC has one source: no hand-written copies under examples/."""
    assert not list((REPO / "examples" / "manifests").glob("*rbac*"))


# --- against the API server ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prometheus_crds(kube):
    kube.apply(PROMETHEUS_CRDS)
    for plural in ("servicemonitors", "podmonitors", "prometheusrules"):
        kube.wait_crd_established(f"{plural}.monitoring.coreos.com")


@pytest.mark.k8s
@pytest.mark.parametrize("values", [None, ALL_ON], ids=["defaults", "all-features-on"])
def test_rendered_manifests_pass_a_server_side_dry_run(helm, tmp_path, kube, kube_cluster, kubectl, kube_namespace,
                                                       prometheus_crds, values):
    values = json.loads(json.dumps(values)) if values else {}
    if values.get("operator", {}).get("namespaces"):
        values["operator"]["namespaces"] = [kube_namespace]  # RoleBindings go into an existing namespace
    # As helm install would render against this server (policy/v1 PodDisruptionBudget from 1.21 on).
    version = client.VersionApi(kube.api_client).get_code()
    objects = _template(helm, tmp_path, values, kube_namespace, "--kube-version",
                        f"{version.major}.{version.minor.rstrip('+')}.0")
    kinds = {o["kind"] for o in objects}
    assert {"PodDisruptionBudget", "Role"} <= kinds
    if values:
        assert {"ServiceMonitor", "PodMonitor", "PrometheusRule", "RoleBinding"} <= kinds
    manifest = tmp_path / "rendered.yaml"
    manifest.write_text(yaml.safe_dump_all(objects))
    result = kubectl("apply", "--dry-run=server", "--server-side", "--field-manager=helm-test", "-f", str(manifest))
    assert result.stdout.count("(server dry run)") == len(objects), result.stdout


@pytest.fixture(scope="module")
def empty_cluster(tmp_path_factory):
    """A second, empty API server (no CRDs, no controller-manager): what `helm install` meets on a new cluster."""
    cluster = start_cluster(tmp_path_factory.mktemp("empty-cluster"), with_controller_manager=False)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.mark.k8s
def test_helm_install_creates_the_crd_rbac_and_deployment(helm, tmp_path, kube_cluster, empty_cluster):
    with empty_cluster.api_client() as api:
        chart = _chart_for(_minor(api), tmp_path)
        _run(helm, "install", "kd", str(chart), "--namespace", "kubedistill", "--create-namespace",
             kubeconfig=empty_cluster.kubeconfig)
        crd = client.ApiextensionsV1Api(api).read_custom_resource_definition("distilljobs.kubedistill.io")
        assert any(c.type == "Established" and c.status == "True" for c in crd.status.conditions)
        assert {p.name for p in crd.spec.versions[0].additional_printer_columns} >= {"State", "Step", "Loss"}
        deployment = client.AppsV1Api(api).read_namespaced_deployment("kd-kubedistill-operator", "kubedistill")
        assert deployment.spec.template.spec.service_account_name == "kd-kubedistill-operator"
        client.CoreV1Api(api).read_namespaced_service_account("kd-kubedistill-operator", "kubedistill")
        rbac = client.RbacAuthorizationV1Api(api)
        assert rbac.read_cluster_role("kd-kubedistill-operator").rules
        binding = rbac.read_cluster_role_binding("kd-kubedistill-operator")
        assert [(s.kind, s.name, s.namespace) for s in binding.subjects] == [
            ("ServiceAccount", "kd-kubedistill-operator", "kubedistill")]
        assert deployment.spec.replicas == 2
        assert rbac.read_namespaced_role("kd-kubedistill-operator-leader-election", "kubedistill").rules
        budgets = kube_cluster_budgets(api, "kubedistill")
        assert budgets == ["kd-kubedistill-operator"]
        status = json.loads(_run(helm, "status", "kd", "-n", "kubedistill", "-o", "json",
                                 kubeconfig=empty_cluster.kubeconfig).stdout)
        assert status["info"]["status"] == "deployed"
        # The chart's CRD is the one a DistillJob is validated against: kubectl explain works from it.
        _run(helm, "uninstall", "kd", "-n", "kubedistill", kubeconfig=empty_cluster.kubeconfig)
        # helm keeps CRDs (and so every DistillJob) when a release is uninstalled.
        client.ApiextensionsV1Api(api).read_custom_resource_definition("distilljobs.kubedistill.io")


@pytest.mark.k8s
@pytest.mark.parametrize("flag, message", [
    ("operator.reconcileIntervall=3", "additional properties 'reconcileIntervall' not allowed"),
    ("operator.metricsPort=http", "/operator/metricsPort"),
    ("operator.logLevel=verbose", "/operator/logLevel"),
    ("operator.livenessApiTimeout=-1", "/operator/livenessApiTimeout"),
    ("serviceMonitor.enable=true", "additional properties 'enable' not allowed"),
    ("operator.leaderElection.leaseDurationSeconds=15", "additional properties 'leaseDurationSeconds' not allowed"),
    ("replicaCount=0", "/replicaCount"),
    ("securityContext.allowPrivilegeEscalation=true", "/securityContext/allowPrivilegeEscalation"),
])
def test_helm_install_with_a_mistyped_value_is_rejected(helm, kube_cluster, kube_namespace, flag, message):
    release = f"bad-{uuid.uuid4().hex[:6]}"
    done = _run(helm, "install", release, str(CHART), "--namespace", kube_namespace, "--skip-crds", "--set", flag,
                check=False, kubeconfig=kube_cluster.kubeconfig)
    assert done.returncode != 0 and message in done.stderr, done.stderr
    listed = _run(helm, "list", "-n", kube_namespace, "-q", kubeconfig=kube_cluster.kubeconfig).stdout
    assert release not in listed


# --- the operator under the chart's RBAC ---------------------------------------------------------------------------


@pytest.mark.k8s
def test_operator_reconciles_with_the_charts_service_account(helm, tmp_path, kube, kube_cluster, kube_api_client,
                                                             kubeconfig_env, distilljob_crd, jobs, kube_namespace):
    """The chart installed (CRD skipped: the suite's is there) with the job's namespace listed; the operator runs
    with a token of the chart's ServiceAccount: a job goes Running -> Succeeded, the trainer's report (its own
    token) is mirrored, and ttlSecondsAfterFinished deletes the job. Any call the chart does not allow is a 403."""
    system = f"kd-system-{uuid.uuid4().hex[:6]}"
    release = f"kd-{uuid.uuid4().hex[:6]}"
    _run(helm, "install", release, str(CHART), "--namespace", system, "--create-namespace", "--skip-crds",
         "--set", f"operator.namespaces={{{kube_namespace}}}", kubeconfig=kube_cluster.kubeconfig)
    try:
        account = f"{release}-kubedistill-operator"
        config = service_account_kubeconfig(kube_api_client, system, account, tmp_path / "sa.kubeconfig")
        with running_operator(kube_namespace, credentials=config) as runner:
            jobs.create(distilljob("charted", kube_namespace, run_policy={"ttlSecondsAfterFinished": 1}))
            jobs.rayjob("charted-0")
            jobs.play_kuberay("charted-0", "Running", "RUNNING")
            jobs.wait_state("charted", "Running")
            _report_progress(kube_cluster, kube_api_client, kube_namespace, "charted")
            wait_for(lambda: jobs.status("charted").get("progress", {}).get("step") == 3, message="progress mirrored")
            jobs.play_kuberay("charted-0", "Complete", "SUCCEEDED")
            wait_for(lambda: jobs.get("charted") is None, timeout=30, message="deleted after ttlSecondsAfterFinished")
        assert "403" not in runner.output and "Forbidden" not in runner.output, runner.output
        assert jobs.events("charted"), "the operator posted no Event on the job"
    finally:
        _run(helm, "uninstall", release, "-n", system, check=False, kubeconfig=kube_cluster.kubeconfig)


def kube_cluster_budgets(api, namespace: str) -> list[str]:
    """Names of the PodDisruptionBudgets in ``namespace`` (policy/v1, or v1beta1 before Kubernetes 1.21)."""
    from kubernetes.dynamic import DynamicClient

    version = "policy/v1" if _minor(api) >= 21 else "policy/v1beta1"
    budgets = DynamicClient(api).resources.get(api_version=version, kind="PodDisruptionBudget")
    return [b.metadata.name for b in budgets.get(namespace=namespace).items]


def _report_progress(kube_cluster, kube_api_client, namespace: str, job: str) -> None:
    """What the trainer's reporter does, with the per-job account's own token."""
    from distill_trainer.k8s_progress import K8sProgressReporter

    token = client.CoreV1Api(kube_api_client).create_namespaced_service_account_token(
        f"{job}-trainer", namespace, client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(audiences=[]))
    ).status.token
    cfg = kube_cluster.configuration()
    cfg.api_key = {"authorization": token}
    with client.ApiClient(cfg) as trainer:
        reporter = K8sProgressReporter(job, namespace, max_steps=10, min_interval_seconds=0)
        reporter._api = client.CoreV1Api(trainer)
        reporter.log(3, {"train/loss": 0.25})
