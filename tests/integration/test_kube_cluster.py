"""The test control plane itself: it starts, serves CRDs with a status
subresource, and (with the controller-manager) garbage-collects owned objects."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import kubernetes
import pytest

import kube_cluster as kc

pytestmark = pytest.mark.k8s

RAYJOB_API = "ray.io/v1"


def test_cluster_is_up(kube_cluster, kube_api_client):
    assert kube_cluster.server.startswith("https://")
    assert kube_cluster.kubeconfig.is_file()
    if not kube_cluster.external:
        assert kube_cluster.server.startswith(f"https://{kc.LOCALHOST}:")
        assert kube_cluster.token
    version = kubernetes.client.VersionApi(kube_api_client).get_code()
    assert version.git_version.startswith("v1.")
    names = {ns.metadata.name for ns in kubernetes.client.CoreV1Api(kube_api_client).list_namespace().items}
    assert {"default", "kube-system"} <= names


def test_kubeconfig_file_works(kubeconfig_env, kube_cluster):
    assert kubeconfig_env == kube_cluster.kubeconfig
    with kubernetes.config.new_client_from_config() as client:  # from $KUBECONFIG
        ns = kubernetes.client.CoreV1Api(client).read_namespace("default")
    assert ns.metadata.name == "default"


def test_rayjob_crd_create_and_patch_status(kube, rayjob_crd, kube_namespace):
    conditions = {c["type"]: c["status"] for c in rayjob_crd["status"]["conditions"]}
    assert conditions.get("Established") == "True"
    assert rayjob_crd["spec"]["versions"][0]["subresources"] == {"status": {}}

    created = kube.create({
        "apiVersion": RAYJOB_API,
        "kind": "RayJob",
        "metadata": {"name": "rj", "namespace": kube_namespace},
        "spec": {
            "entrypoint": "python -m distill_trainer.cli",
            "shutdownAfterJobFinishes": True,
            "rayClusterSpec": {"headGroupSpec": {"rayStartParams": {}, "template": {"spec": {"containers": []}}}},
            "somethingKubeRayAddsLater": {"kept": True},
        },
    })
    assert created["spec"]["somethingKubeRayAddsLater"] == {"kept": True}  # unknown fields preserved
    assert "status" not in created or not created["status"]

    # A status in the main resource is ignored (status subresource) ...
    kube.patch(RAYJOB_API, "RayJob", "rj", {"status": {"jobStatus": "RUNNING"}}, kube_namespace)
    assert not (kube.get(RAYJOB_API, "RayJob", "rj", kube_namespace).get("status") or {}).get("jobStatus")

    # ... and only written through /status, as KubeRay does.
    patched = kube.patch_status(RAYJOB_API, "RayJob", "rj", {
        "jobStatus": "RUNNING",
        "jobDeploymentStatus": "Running",
        "rayClusterName": "rj-raycluster-abcde",
        "startTime": "2024-01-01T00:00:00Z",
    }, kube_namespace)
    assert patched["status"]["jobStatus"] == "RUNNING"
    assert patched["metadata"]["generation"] == created["metadata"]["generation"]  # status does not bump it

    kube.patch_status(RAYJOB_API, "RayJob", "rj", {"jobStatus": "SUCCEEDED", "jobDeploymentStatus": "Complete"},
                      kube_namespace)
    got = kube.get(RAYJOB_API, "RayJob", "rj", kube_namespace)
    assert got["status"]["jobStatus"] == "SUCCEEDED"
    assert got["status"]["rayClusterName"] == "rj-raycluster-abcde"  # merge patch keeps the rest

    # The schema still validates the typed fields.
    with pytest.raises(kubernetes.client.exceptions.ApiException) as err:
        kube.patch_status(RAYJOB_API, "RayJob", "rj", {"startTime": "yesterday"}, kube_namespace)
    assert err.value.status == 422


def test_apply_is_server_side_and_idempotent(kube, kube_apply, kube_namespace):
    manifest = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "cfg"},
        "data": {"a": "1"},
    }
    first = kube_apply(manifest, namespace=kube_namespace)[0]
    again = kube_apply([manifest], namespace=kube_namespace)[0]
    assert first["metadata"]["namespace"] == kube_namespace
    assert again["metadata"]["resourceVersion"] == first["metadata"]["resourceVersion"]  # no-op
    changed = kube_apply(f"apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: cfg}}\ndata: {{a: '2'}}\n",
                         namespace=kube_namespace)[0]
    assert changed["data"] == {"a": "2"}
    assert any(m["manager"] == "kubedistill-tests" and m["operation"] == "Apply"
               for m in changed["metadata"]["managedFields"])


def test_owned_configmap_is_garbage_collected(kube_cluster, kube, rayjob_crd, kube_namespace):
    if not kube_cluster.has_controller_manager:
        pytest.skip("kube-controller-manager is not running (not built, or envtest assets without it): no garbage collection")
    owner = kube.create({
        "apiVersion": RAYJOB_API,
        "kind": "RayJob",
        "metadata": {"name": "owner", "namespace": kube_namespace},
        "spec": {"entrypoint": "true"},
    })
    kube.create({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "owned",
            "namespace": kube_namespace,
            "ownerReferences": [{
                "apiVersion": RAYJOB_API,
                "kind": "RayJob",
                "name": "owner",
                "uid": owner["metadata"]["uid"],
                "controller": True,
                "blockOwnerDeletion": True,
            }],
        },
        "data": {"x": "y"},
    })
    assert kube.get("v1", "ConfigMap", "owned", kube_namespace) is not None
    assert kube.delete(RAYJOB_API, "RayJob", "owner", kube_namespace)
    kc.wait_for(lambda: kube.get("v1", "ConfigMap", "owned", kube_namespace) is None, timeout=60,
                message="the garbage collector to delete the owned ConfigMap")


def test_kubectl_sees_rayjob_printer_columns(kubectl, kube, rayjob_crd, kube_namespace):
    kubectl("apply", "-n", kube_namespace, "-f", "-",
            input="apiVersion: ray.io/v1\nkind: RayJob\nmetadata: {name: printed}\nspec: {entrypoint: 'true'}\n")
    kube.patch_status(RAYJOB_API, "RayJob", "printed", {"jobStatus": "RUNNING", "jobDeploymentStatus": "Running"},
                      kube_namespace)
    out = kubectl("get", "rayjobs", "-n", kube_namespace).stdout
    header, row = out.splitlines()[:2]
    assert "JOB STATUS" in header and "DEPLOYMENT STATUS" in header
    assert row.split()[:3] == ["printed", "RUNNING", "Running"]


def _listening_addresses(pid: int) -> list[str]:
    """Local addresses of the listening TCP sockets of a process (Linux /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    addresses = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                addresses.append(fields[1])
    return addresses


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_servers_listen_on_loopback_only(kube_cluster):
    if kube_cluster.external:
        pytest.skip("a borrowed cluster")
    loopback = "0100007F:"  # 127.0.0.1 in /proc/net/tcp's byte order
    for proc in kube_cluster._procs:
        addresses = _listening_addresses(proc.pid)
        assert addresses, f"{proc.name} listens on nothing?"
        assert all(a.startswith(loopback) for a in addresses), f"{proc.name} listens on {addresses}"
