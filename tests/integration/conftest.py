"""Fixtures for tests against a real Kubernetes API server (see tests/kube_cluster.py).

Fixtures:
  kube_cluster    (session) a started KubeCluster: .kubeconfig, .server, .token,
                  .api_client(), .configuration(), .env(), .has_controller_manager.
                  Skipped when the binaries are not built, unless
                  KUBEDISTILL_REQUIRE_K8S=1 (CI), which turns that into a failure.
                  The RayJob CRD (tests/fixtures/rayjob-crd.yaml) and crds/*.yaml
                  are installed before the controller-manager starts, so garbage
                  collection of objects owned by RayJobs/DistillJobs is immediate
                  (a kind added later is noticed by the GC within ~30 s).
  kube_api_client (session) a kubernetes.client.ApiClient for it.
  kube            (session) a kube_cluster.Kube helper: apply/create/get/list/
                  patch/patch_status/delete/wait_crd_established, dicts in and out.
  kube_apply      (function) kube.apply: server-side apply of a YAML path, YAML
                  text, a dict or a list of dicts; returns the applied objects.
  kube_namespace  (function) name of a fresh namespace, deleted after the test.
  kubeconfig_env  (function) sets KUBECONFIG to the cluster's kubeconfig (and adds
                  127.0.0.1 to NO_PROXY) for the test, e.g. for
                  kopf.testing.KopfRunner; returns the kubeconfig path.
  kubectl         (function) run(*args, check=True, input=None) -> CompletedProcess,
                  kubectl with --kubeconfig of the cluster (skipped if no kubectl).
  rayjob_crd      (session) installs tests/fixtures/rayjob-crd.yaml (Established).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parents[1]
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

import kube_cluster as kc  # noqa: E402

RAYJOB_CRD = TESTS_DIR / "fixtures" / "rayjob-crd.yaml"
PROJECT_CRDS = TESTS_DIR.parent / "crds"
TEST_NAMESPACE_LABEL = "kubedistill.io/test"


def _required() -> bool:
    return os.environ.get("KUBEDISTILL_REQUIRE_K8S") == "1"


@pytest.fixture(scope="session")
def kube_cluster(tmp_path_factory):
    if not kc.use_existing_kubeconfig():
        try:
            kc.find_binaries()
        except kc.BinariesNotFound as e:
            if _required():
                pytest.fail(f"KUBEDISTILL_REQUIRE_K8S=1 but no Kubernetes API server is available: {e}",
                            pytrace=False)
            pytest.skip(f"no Kubernetes API server: {e}")
    # The RayJob CRD and the project's CRDs go in before the controller-manager
    # starts, so that its garbage collector watches them from the first second.
    cluster = kc.start_cluster(
        tmp_path_factory.mktemp("kube-cluster"),
        crds=[RAYJOB_CRD],
        optional_crds=sorted(PROJECT_CRDS.glob("*.yaml")),
    )
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def kube_api_client(kube_cluster):
    client = kube_cluster.api_client()
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(scope="session")
def kube(kube_cluster, kube_api_client):
    return kc.Kube(kube_api_client, discovery_cache=kube_cluster.workdir / "discovery.json")


@pytest.fixture
def kube_apply(kube):
    return kube.apply


@pytest.fixture
def kube_namespace(request, kube):
    base = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:40].strip("-") or "test"
    name = f"{base}-{uuid.uuid4().hex[:6]}"
    kube.create({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": name, "labels": {TEST_NAMESPACE_LABEL: "true"}},
    })
    yield name
    # With the controller-manager the namespace and its contents are removed;
    # without it the namespace stays Terminating (harmless: the cluster is thrown away).
    kube.delete("v1", "Namespace", name)


@pytest.fixture
def kubeconfig_env(kube_cluster, monkeypatch):
    import kubernetes.config.kube_config

    monkeypatch.setenv("KUBECONFIG", str(kube_cluster.kubeconfig))
    # The kubernetes package reads $KUBECONFIG once, at import: point its default there too.
    monkeypatch.setattr(kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(kube_cluster.kubeconfig))
    if not kube_cluster.external:  # the local server is on 127.0.0.1: bypass any proxy
        for var in ("NO_PROXY", "no_proxy"):
            monkeypatch.setenv(var, ",".join(filter(None, [os.environ.get(var), "127.0.0.1", "localhost"])))
    return kube_cluster.kubeconfig


def _find_kubectl() -> str | None:
    return os.environ.get("KUBEDISTILL_KUBECTL") or shutil.which("kubectl")


@pytest.fixture
def kubectl(kube_cluster):
    binary = _find_kubectl()
    if not binary:
        msg = "kubectl is not installed (scripts/kube-apiserver/ensure.sh installs Debian's kubernetes-client)"
        if _required():
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)

    def run(*args: str, check: bool = True, input: str | None = None, timeout: float = 60):
        cmd = [binary, f"--kubeconfig={kube_cluster.kubeconfig}", *args]
        env = dict(os.environ, KUBECONFIG=str(kube_cluster.kubeconfig))
        env["NO_PROXY"] = env["no_proxy"] = ",".join(filter(None, [env.get("NO_PROXY"), "127.0.0.1,localhost"]))
        result = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout, env=env)
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(cmd)} exited {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
            )
        return result

    run.binary = binary
    return run


@pytest.fixture(scope="session")
def rayjob_crd(kube):
    """The KubeRay RayJob CRD (ray.io/v1), installed and Established."""
    return kube.apply(RAYJOB_CRD)[0]
