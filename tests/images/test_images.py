"""Both images, built by scripts/images/build.sh and run the way Kubernetes would run them (tests/images/podman_pod.py
translates the pod specs the project renders into ``podman run`` arguments: user, read-only root, emptyDirs, env).

- the operator image, with the Helm chart's Deployment (``helm template``) and the chart's ServiceAccount token
  mounted as the kubelet mounts it, against the test API server: reconciles a DistillJob to a RayJob, serves
  /healthz and /metrics, stops cleanly on SIGTERM;
- the trainer image, with the RayJob's head pod template (``render.render_rayjob``) as KubeRay completes it (the
  ``ray start --head`` command from rayStartParams and the container's limits, /dev/shm, env): the RayJob's
  entrypoint runs in that container against the head and trains the tiny models on the DistillJob's claim;
- in both, anything that tries to write outside the writable mounts (the read-only root answers EROFS) fails the
  test with the path it tried.

Slow (a cold build takes minutes; the bases are cached). Needs root, podman, buildah, debootstrap and runc:

    bash scripts/test.sh -m slow tests/images
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
import yaml

from distill_operator import render
from distill_operator.render import JobRef
from distill_operator.resources import parse_spec
from kube_cluster import free_port, http_get, wait_for
from tests.images.podman_pod import apply_fs_group, kuberay_pod, translate, write_failures
from tests.integration.operator_fixtures import (  # noqa: F401  (fixture)
    DJ_KIND,
    RAY_API,
    RAY_KIND,
    distilljob,
    distilljob_crd,
    operator_credentials,
)

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "kubedistill"
pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]


def _assert_no_write_failures(**texts: str) -> None:
    found = write_failures(texts)
    assert not found, "writes outside the writable mounts (read-only root filesystem):\n" + "\n".join(found)


def _read_tree(root: Path, suffixes=(".log", ".out", ".err")) -> dict[str, str]:
    texts = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix in suffixes:
            texts[str(path.relative_to(root))] = path.read_text(errors="replace")
    return texts


# ---------------------------------------------------------------------------------------------------- operator
@pytest.fixture(scope="module")
def helm() -> str:
    done = subprocess.run(["bash", str(REPO / "scripts" / "helm" / "ensure.sh")], capture_output=True, text=True,
                          timeout=300)
    if done.returncode != 0:
        pytest.skip(f"no helm: {done.stderr.strip()}")
    return done.stdout.strip().splitlines()[-1]


def _chart_deployment(helm: str, namespace: str, metrics_port: int, liveness_port: int) -> dict:
    values = ["--set", f"operator.namespaces={{{namespace}}}", "--set", f"operator.metricsPort={metrics_port}",
              "--set", f"operator.livenessPort={liveness_port}", "--set", "operator.reconcileInterval=1"]
    done = subprocess.run([helm, "template", "kd-image-test", str(CHART), "--namespace", "kubedistill-system",
                           "--skip-crds", *values], capture_output=True, text=True, timeout=120, check=True)
    deployments = [d for d in yaml.safe_load_all(done.stdout) if d and d["kind"] == "Deployment"]
    assert len(deployments) == 1, [d["metadata"]["name"] for d in deployments]
    return deployments[0]


def _service_account_dir(path: Path, kubeconfig: Path, ca_file: Path, namespace: str) -> Path:
    """What the kubelet projects at /var/run/secrets/kubernetes.io/serviceaccount: token, ca.crt, namespace."""
    config = yaml.safe_load(kubeconfig.read_text())
    path.mkdir(parents=True)
    (path / "token").write_text(config["users"][0]["user"]["token"])
    shutil.copy(ca_file, path / "ca.crt")
    (path / "namespace").write_text(namespace)
    for item in path.iterdir():
        item.chmod(0o644)
    path.chmod(0o755)
    return path


# kopf's login_with_service_account (distill_operator.handlers.login) connects to https://kubernetes.default.svc
# whatever KUBERNETES_SERVICE_HOST/PORT say, while the operator's own client (runtime.api_client, the kubernetes
# package's in-cluster config) uses them: the two disagree wherever that DNS name does not reach the API server the
# kubelet names (here: a test API server on 127.0.0.1:<port>; in a cluster: custom pod DNS, hostNetwork).
@pytest.mark.parametrize("credentials", [
    # The chart's ServiceAccount token where the kubelet mounts it, and KUBERNETES_SERVICE_HOST/PORT. Regression:
    # kopf.login_with_service_account always dialled https://kubernetes.default.svc (distill_operator.handlers.login).
    "in-cluster",
    # The same token in a kubeconfig (KUBECONFIG): the operator run outside the cluster.
    "kubeconfig",
])
def test_operator_image_runs_the_charts_deployment_and_reconciles(credentials, images, podman, helm, kube_cluster,
                                                                   kube, kube_namespace, kubeconfig_env,
                                                                   distilljob_crd, tmp_path):
    from urllib.parse import urlparse

    metrics_port, liveness_port = free_port(), free_port()
    deployment = _chart_deployment(helm, kube_namespace, metrics_port, liveness_port)
    template = deployment["spec"]["template"]
    # The chart's ServiceAccount and RBAC, installed in the cluster; its token, mounted as a pod's.
    credentials_file = operator_credentials(str(kube_cluster.kubeconfig))
    os.chmod(credentials_file, 0o644)  # readable by the container's user
    server = urlparse(kube_cluster.server)
    token_dir = _service_account_dir(tmp_path / "serviceaccount", credentials_file, kube_cluster.ca_file,
                                     deployment["metadata"]["namespace"])
    extra: list[str] = []
    if credentials == "kubeconfig":
        template = {**template, "spec": {**template["spec"], "automountServiceAccountToken": False}}
        extra = ["--mount", f"type=bind,src={credentials_file},dst=/etc/kubedistill-test/kubeconfig,ro=true",
                 "-e", "KUBECONFIG=/etc/kubedistill-test/kubeconfig"]
    run = translate(template, images["operator"], container="operator", workdir=tmp_path / "pod",
                    fields={"metadata.namespace": deployment["metadata"]["namespace"]},
                    service_account=(token_dir, server.hostname, server.port))
    name = f"kd-operator-{uuid.uuid4().hex[:6]}"
    # Host network: the test API server listens on 127.0.0.1 (in a cluster, the kubernetes Service).
    podman("run", "--detach", "--name", name, "--network", "host", *run.options, *extra, run.image, *run.command)
    try:
        try:
            wait_for(lambda: http_get(f"http://127.0.0.1:{liveness_port}/healthz")[0] == 200, timeout=60,
                     message="the operator's /healthz")
        except TimeoutError as e:
            raise AssertionError(f"{e}\noperator's log:\n{podman.logs(name)[-4000:]}") from None
        kube.create(distilljob("image-test", kube_namespace))
        rayjobs = []

        def rayjob_created() -> bool:
            rayjobs[:] = kube.list(RAY_API, RAY_KIND, kube_namespace)
            return bool(rayjobs)

        try:
            wait_for(rayjob_created, timeout=90, message="a RayJob for the DistillJob")
        except TimeoutError as e:
            raise AssertionError(f"{e}\noperator's log:\n{podman.logs(name)[-4000:]}") from None
        assert rayjobs[0]["metadata"]["ownerReferences"][0]["kind"] == DJ_KIND
        status, body = http_get(f"http://127.0.0.1:{metrics_port}/metrics")
        assert status == 200 and "kubedistill_" in body, body[:2000]
    finally:
        stopped = podman("stop", "--time", "20", name, check=False)
        exit_code = podman("inspect", "--format", "{{.State.ExitCode}}", name, check=False).stdout.strip()
        logs = podman.logs(name)
        podman.remove(name)
    assert stopped.returncode == 0 and exit_code == "0", f"operator exit {exit_code} after SIGTERM:\n{logs[-4000:]}"
    assert "Forbidden" not in logs, f"a call the chart's RBAC does not allow:\n{logs[-4000:]}"
    assert "Traceback" not in logs, logs[-6000:]
    _assert_no_write_failures(operator=logs, **_read_tree(run.host_dirs["tmp"]))


# ----------------------------------------------------------------------------------------------------- trainer
JOB = JobRef(name="tiny-distill", namespace="ml", uid="0123456789abcdef")


def _distilljob_spec(fixture: str, **pod_security) -> dict:
    """A DistillJob's spec whose models and data lie on its storage claim, under ``fixture`` (the mount path's
    ``fixture/`` directory): the tiny models of tests/conftest.py."""
    spec = {
        "image": "kubedistill/trainer:test",
        "distill": {
            "max_steps": 4, "save_steps": 2, "eval_steps": 2, "logging_steps": 1, "metrics_linger_seconds": 0,
            "sequence_length": 32, "logits_topk": 16, "output_dir": "out",
            "student_pretrain": f"{fixture}/student", "teacher_pretrain": f"{fixture}/teacher",
            "student": {
                "training_args": {"learning_rate": 1e-2, "per_device_train_batch_size": 4,
                                  "gradient_accumulation_steps": 2, "warmup_steps": 1},
                "data_args": {"file_name": f"{fixture}/train.jsonl", "eval_file_name": f"{fixture}/eval.jsonl"},
            },
            "teacher": {"strategy_args": {"strategy_name": "torch_infer"}},
        },
        "workers": {"replicas": 1, "gpusPerWorker": 1},
        "storage": {"claimName": "checkpoints"},
    }
    if pod_security:
        spec["podSecurity"] = pod_security
    return spec


READ_ONLY_PROBES = ["/opt/kubedistill/probe", "/var/tmp/probe", "/run/probe", "/usr/local/lib/probe"]
PROBE_WRITES = """import sys
for path in sys.argv[1:]:
    try:
        open(path, "w").close()
        print("wrote", path)
    except OSError as e:
        print(e)
"""

CASES = {
    # The defaults: uid/gid 1000, the image's own user; the torch strategies.
    "default-user-torch": ({}, None),
    # A uid the image's /etc/passwd does not know (OpenShift-style), and the Megatron strategies (tp 2, gloo).
    "unknown-uid-megatron": ({"runAsUser": 4321, "runAsGroup": 4321, "fsGroup": 4321}, "megatron"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_trainer_image_runs_the_rayjobs_head_and_trains_on_the_claim(case, images, podman, tiny_setup, tmp_path):
    pod_security, strategy = CASES[case]
    mount_path = parse_spec(_distilljob_spec("/x")).storage.mount_path
    spec_dict = _distilljob_spec(f"{mount_path}/fixture", **pod_security)
    if strategy == "megatron":
        distill = spec_dict["distill"]
        distill["student"]["strategy_args"] = {"strategy_name": "megatron_train", "tp_size": 2}
        distill["teacher"]["strategy_args"] = {"strategy_name": "megatron_infer", "tp_size": 2}
        distill["student"]["device_mapping"] = distill["teacher"]["device_mapping"] = [0, 1]
    spec = parse_spec(spec_dict)

    # The claim: the tiny models and data, owned as the kubelet leaves a volume for the pod's fsGroup.
    claim = tmp_path / "claim"
    shutil.copytree(tiny_setup.root, claim / "fixture")
    apply_fs_group(claim, spec.pod_security.fs_group)
    # The ConfigMap volume: the trainer's config as the operator renders it.
    configmap = render.render_configmap(spec, JOB)
    configmap_dir = tmp_path / "configmap"
    configmap_dir.mkdir()
    for key, value in configmap["data"].items():
        (configmap_dir / key).write_text(value)
    configmap_dir.chmod(0o755)

    rayjob = render.render_rayjob(spec, JOB, attempt=0, resume=False)
    head = kuberay_pod(rayjob["spec"]["rayClusterSpec"]["headGroupSpec"], cluster_name=rayjob["metadata"]["name"])
    pod_name = f"{rayjob['metadata']['name']}-head-x7k2p"
    # No network but loopback (the pod IP is 127.0.0.1): nothing is downloaded, and no port is shared with the host.
    run = translate(head, images["trainer"], workdir=tmp_path / "pod", claims={spec.storage.claim_name: claim},
                    config_maps={configmap["metadata"]["name"]: configmap_dir},
                    fields={"status.podIP": "127.0.0.1", "metadata.name": pod_name})
    assert run.env["RAY_ADDRESS"] == "127.0.0.1:6379"
    name = f"kd-head-{uuid.uuid4().hex[:6]}"
    podman("run", "--detach", "--name", name, "--network", "none", "--hostname", pod_name, *run.options, run.image,
           *run.command)
    try:
        head_logs = podman.wait_for_log(name, "Ray runtime started", timeout=180)
        # The RayJob's entrypoint, as the job's driver on the head (KubeRay submits it to the head's job server).
        entrypoint = rayjob["spec"]["entrypoint"]
        assert shlex.split(entrypoint)[:2] == ["kubedistill", "train"]
        driver = podman("exec", name, "/bin/bash", "-c", entrypoint, check=False, timeout=900)
        # The harness sees a write to the read-only root, with its path (and podman left no writable tmpfs behind:
        # --read-only-tmpfs=false; a pod has none at /var/tmp or /run).
        probe = podman("exec", name, "python", "-c", PROBE_WRITES, *READ_ONLY_PROBES, check=False)
        head_logs = podman.logs(name)
        ray_logs = _read_tree(run.host_dirs["tmp"] / "ray") if (run.host_dirs["tmp"] / "ray").is_dir() else {}
    finally:
        podman.remove(name)
    output = driver.stdout + driver.stderr
    assert [f.split(": ")[1] for f in write_failures({"probe": probe.stdout})] == READ_ONLY_PROBES, probe.stdout
    assert driver.returncode == 0, f"kubedistill train exited {driver.returncode}:\n{output[-6000:]}"
    _assert_no_write_failures(head=head_logs, driver=output, **ray_logs)

    out = Path(str(claim) + render.trainer_config(spec, JOB)["output_dir"][len(mount_path):])
    assert (out / "checkpoint-4" / "student" / "model.safetensors").is_file(), sorted(out.rglob("*"))[:20]
    assert (out / "checkpoint-2").is_dir()
    # Written by the pod's user, in the fsGroup's group (set-gid directory), as on a real volume.
    checkpoint = out / "checkpoint-4" / "student" / "model.safetensors"
    assert (checkpoint.stat().st_uid, checkpoint.stat().st_gid) == (spec.pod_security.run_as_user,
                                                                    spec.pod_security.fs_group)
    assert "finished at step 4" in output
