"""Fixtures for the operator's tests against the real API server (tests/kube_cluster.py).

No KubeRay controller can run here: the tests play KubeRay's part by patching RayJob status through the
status subresource (``play_kuberay``), exactly the fields KubeRay writes (jobDeploymentStatus, jobStatus).
The operator runs in-process with ``kopf.testing.KopfRunner``, watching only the test's namespace, with a short
reconcile interval so that timers (deadlines, TTL) fire within seconds, and with the credentials it has when
installed: a token of the Helm chart's ServiceAccount, bound to the chart's RBAC (installed once per test session;
``operator_credentials``). A call the chart does not allow fails the test like it would fail in a cluster.
"""

from __future__ import annotations

import os

# Read by OperatorRuntime.from_env at each operator's startup: fast timers for the tests.
os.environ.setdefault("KUBEDISTILL_RECONCILE_INTERVAL_SECONDS", "0.5")

import atexit  # noqa: E402
import base64  # noqa: E402
import contextlib  # noqa: E402
import functools  # noqa: E402
import shlex  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Iterator  # noqa: E402

import pytest  # noqa: E402
from kopf.testing import KopfRunner  # noqa: E402

from kube_cluster import free_port, http_get, wait_for  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CRD_FILE = REPO / "crds" / "distilljob.yaml"  # with CEL rules: Kubernetes >= 1.25
CRD_FILE_NO_CEL = REPO / "crds" / "distilljob-no-cel.yaml"
DJ_API, DJ_KIND = "kubedistill.io/v1alpha1", "DistillJob"
RAY_API, RAY_KIND = "ray.io/v1", "RayJob"


@pytest.fixture(scope="session")
def distilljob_crd(kube_cluster, rayjob_crd, kube):
    """Our CRD (the committed, generated file for this server's version), applied with kubectl as a user would,
    and KubeRay's RayJob CRD; both Established."""
    import shutil
    import subprocess

    import kubernetes

    minor = int(kubernetes.client.VersionApi(kube.api_client).get_code().minor.rstrip("+"))
    crd_file = CRD_FILE if minor >= 25 else CRD_FILE_NO_CEL
    binary = os.environ.get("KUBEDISTILL_KUBECTL") or shutil.which("kubectl")
    if not binary:
        pytest.skip("kubectl is not installed")
    result = subprocess.run([binary, f"--kubeconfig={kube_cluster.kubeconfig}", "apply", "-f", str(crd_file)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return kube.wait_crd_established("distilljobs.kubedistill.io")


def distilljob(name: str, namespace: str, run_policy: dict | None = None, **spec: Any) -> dict:
    """A small valid DistillJob."""
    body = {
        "apiVersion": DJ_API,
        "kind": DJ_KIND,
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "image": "kubedistill:test",
            "distill": {
                "max_steps": 10,
                "student_pretrain": "/models/student",
                "teacher_pretrain": "/models/teacher",
                "student": {"data_args": {"file_name": "/data/train.jsonl"}},
            },
            "workers": {"replicas": 1, "gpusPerWorker": 1},
            "storage": {"claimName": "checkpoints"},
            "runPolicy": {"backoffLimit": 0, **(run_policy or {})},
        },
    }
    body["spec"].update(spec)
    return body


CHART = REPO / "charts" / "kubedistill"
OPERATOR_RELEASE, OPERATOR_SYSTEM_NAMESPACE = "kd-tests", "kubedistill-tests-system"


@functools.lru_cache(maxsize=None)
def operator_credentials(admin_kubeconfig: str) -> Path:
    """A kubeconfig holding a token of the chart's operator ServiceAccount, the chart (RBAC, ServiceAccount,
    Deployment; no CRDs, the suite installs those) installed once with ``helm install`` by the admin credentials.
    Cluster-wide, as with the chart's default values. Uninstalled when the test process exits."""
    from kubernetes import config

    helm_done = subprocess.run(["bash", str(REPO / "scripts" / "helm" / "ensure.sh")], capture_output=True,
                               text=True, timeout=300)
    if helm_done.returncode != 0:
        pytest.fail(f"no helm, so the operator cannot get the chart's credentials: {helm_done.stderr.strip()}")
    helm = helm_done.stdout.strip().splitlines()[-1]
    env = dict(os.environ, KUBECONFIG=admin_kubeconfig, HELM_CACHE_HOME="/tmp/kubedistill-helm/cache",
               HELM_CONFIG_HOME="/tmp/kubedistill-helm/config", HELM_DATA_HOME="/tmp/kubedistill-helm/data")
    # The tests run the operator with --namespace <the test's namespace>, and each test makes a new namespace: the
    # chart's form for that is a glob (cluster-wide bindings plus the namespace reads kopf then needs).
    helm_args = ["upgrade", "--install", OPERATOR_RELEASE, str(CHART), "--namespace", OPERATOR_SYSTEM_NAMESPACE,
                 "--create-namespace", "--skip-crds", "--set", "operator.namespaces={*-*}"]
    done = subprocess.run([helm, *helm_args], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    atexit.register(subprocess.run, [helm, "uninstall", OPERATOR_RELEASE, "-n", OPERATOR_SYSTEM_NAMESPACE],
                    capture_output=True, timeout=120, env=env)

    admin = config.new_client_from_config(config_file=admin_kubeconfig)
    return service_account_kubeconfig(admin, OPERATOR_SYSTEM_NAMESPACE, f"{OPERATOR_RELEASE}-kubedistill-operator",
                                      Path(admin_kubeconfig).with_name("operator-sa.kubeconfig"))


def service_account_kubeconfig(admin: Any, namespace: str, account: str, path: Path) -> Path:
    """Write a kubeconfig at ``path`` that authenticates as ServiceAccount ``namespace/account`` (a TokenRequest
    token, valid for the whole test session) against the server ``admin`` (an ApiClient) talks to."""
    import yaml
    from kubernetes import client

    token = client.CoreV1Api(admin).create_namespaced_service_account_token(
        account, namespace,
        client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=6 * 3600)),
    ).status.token
    cluster = {"server": admin.configuration.host}
    if admin.configuration.ssl_ca_cert:
        cluster["certificate-authority-data"] = base64.b64encode(
            Path(admin.configuration.ssl_ca_cert).read_bytes()).decode()
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "sa",
        "clusters": [{"name": "test", "cluster": cluster}],
        "users": [{"name": account, "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "test", "user": account}}],
    }))
    return path


@contextlib.contextmanager
def running_operator(namespace: str, credentials: Path | None = None) -> Iterator[KopfRunner]:
    """The operator, in-process, watching one namespace, with the chart's credentials (or ``credentials``; the admin
    KUBECONFIG of the test, see ``kubeconfig_env``, only installs them); stopped (and checked for crashes and for
    calls its RBAC refused) on exit. Each run gets a fresh OperatorRuntime (API client included) configured from the
    environment at kopf's startup."""
    import kubernetes.config.kube_config

    admin = os.environ["KUBECONFIG"]
    credentials = str(credentials or operator_credentials(admin))
    args = ["run", "--standalone", "--namespace", namespace, "-m", "distill_operator.handlers"]
    os.environ["KUBECONFIG"] = kubernetes.config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION = credentials
    try:
        with KopfRunner(args, timeout=60) as runner:
            yield runner
    finally:
        os.environ["KUBECONFIG"] = kubernetes.config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION = admin
    assert runner.exception is None, runner.output
    assert runner.exit_code == 0, runner.output
    assert "Forbidden" not in runner.output, f"a call the chart's RBAC does not allow:\n{runner.output}"


@contextlib.contextmanager
def operator_process(kubeconfig: Path, namespace: str, workdir: Path) -> Iterator[int]:
    """`python -m distill_operator` as a process, as the chart's Deployment runs it, with ``kubeconfig``'s
    credentials, watching ``namespace``; yields its /metrics port once /healthz answers. On exit: SIGTERM, and
    (when the body did not fail) a check that it stopped cleanly; its output is in ``workdir/operator.log``."""
    metrics_port, liveness_port = free_port(), free_port()
    log_path = workdir / "operator.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "distill_operator", "--namespace", namespace, "--metrics-port", str(metrics_port),
             "--liveness-port", str(liveness_port), "--reconcile-interval", "0.5", "--readiness-port", "0",
             *leader_election_args(namespace)],
            env=dict(os.environ, KUBECONFIG=str(kubeconfig)), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_for(lambda: http_get(f"http://127.0.0.1:{liveness_port}/healthz")[0] == 200, timeout=30,
                     message="operator liveness endpoint")
            yield metrics_port
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    assert process.returncode in (0, -signal.SIGTERM), log_path.read_text()[-3000:]


def leader_election_args(namespace: str) -> list[str]:
    """Leader election as installed: the Lease in the chart's release namespace (its Role grants leases there
    only), one Lease per test namespace so that tests never wait for each other's."""
    return ["--leader-election-namespace", OPERATOR_SYSTEM_NAMESPACE, "--leader-election-lease-name",
            f"kd-{namespace}"[:63]]


@pytest.fixture
def operator(kubeconfig_env, distilljob_crd, kube_namespace):
    with running_operator(kube_namespace) as runner:
        yield runner


class Jobs:
    """Reads and writes of DistillJobs and RayJobs in one namespace, and KubeRay's part."""

    def __init__(self, kube, namespace: str):
        self.kube, self.ns = kube, namespace

    def create(self, body: dict) -> dict:
        return self.kube.create(body, self.ns)

    def get(self, name: str) -> dict | None:
        return self.kube.get(DJ_API, DJ_KIND, name, self.ns)

    def status(self, name: str) -> dict:
        return (self.get(name) or {}).get("status") or {}

    def condition(self, name: str, type_: str) -> dict:
        return next((c for c in self.status(name).get("conditions", []) if c["type"] == type_), {})

    def rayjobs(self) -> list[dict]:
        return self.kube.list(RAY_API, RAY_KIND, self.ns)

    def rayjob(self, name: str, timeout: float = 20) -> dict:
        return wait_for(lambda: self.kube.get(RAY_API, RAY_KIND, name, self.ns), timeout=timeout,
                        message=f"RayJob {name}")

    def play_kuberay(self, rayjob: str, deployment: str, job: str = "") -> None:
        """What KubeRay would write: the RayJob's status."""
        status = {"jobDeploymentStatus": deployment}
        if job:
            status["jobStatus"] = job
        self.kube.patch_status(RAY_API, RAY_KIND, rayjob, status, self.ns)

    def wait_state(self, name: str, state: str, timeout: float = 20) -> dict:
        return wait_for(lambda: self.status(name) if self.status(name).get("state") == state else None,
                        timeout=timeout, message=f"DistillJob {name} state {state} (now {self.status(name)})")

    def patch_spec(self, name: str, patch: dict) -> None:
        self.kube.patch(DJ_API, DJ_KIND, name, {"spec": patch}, self.ns)

    def events(self, name: str) -> list[tuple[str, str]]:
        items = self.kube.list("v1", "Event", self.ns)
        return [(e["type"], e["reason"]) for e in items if e["involvedObject"]["name"] == name]


@pytest.fixture
def jobs(kube, kube_namespace) -> Jobs:
    return Jobs(kube, kube_namespace)


def entrypoint(rayjob: dict) -> list[str]:
    return shlex.split(rayjob["spec"]["entrypoint"])
