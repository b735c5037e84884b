"""End to end, all real except KubeRay: kubectl apply of the tiny example -> the operator (RayAddress launcher)
submits `kubedistill train` through the Ray Jobs API to a local Ray -> the trainer reports status.progress ->
Succeeded, with the checkpoint on disk.

The API server is the test kube-apiserver; Ray runs on 127.0.0.1 with its dashboard (Jobs API) in a subprocess;
the trainer is the real pipeline on the CPU demo's tiny models. Slow (about a minute): run with -m slow.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from kube_cluster import free_port, http_get, wait_for
from tests.integration.operator_fixtures import REPO, distilljob_crd, jobs, running_operator  # noqa: F401

pytestmark = [pytest.mark.k8s, pytest.mark.slow]

RAY_HEAD = """
import signal, sys, time, ray
ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=int(sys.argv[1]),
         _node_ip_address="127.0.0.1", configure_logging=False)
def stop(*_):
    ray.shutdown()
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
print("ray ready", flush=True)
while True:
    time.sleep(3600)
"""


@pytest.fixture
def ray_address(kube_cluster, tmp_path):
    """A local Ray with the Jobs API on 127.0.0.1; its jobs inherit KUBECONFIG (to report progress) and PATH."""
    port = free_port()
    env = dict(
        os.environ,
        KUBECONFIG=str(kube_cluster.kubeconfig),
        RAY_AUTH_MODE="disabled",
        KUBEDISTILL_NUM_THREADS="1",
        KUBEDISTILL_PROGRESS_INTERVAL_SECONDS="0",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    env.pop("RAY_ADDRESS", None)
    log = open(tmp_path / "ray-head.log", "wb")
    head = subprocess.Popen([sys.executable, "-c", RAY_HEAD, str(port)], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: http_get(f"{address}/api/version")[0] == 200 or head.poll() is not None, timeout=120,
                 message="Ray dashboard")
        assert head.poll() is None, (tmp_path / "ray-head.log").read_text()[-3000:]
        yield address
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(30)
        except subprocess.TimeoutExpired:
            pass
        try:  # whatever Ray left in the head's own process group (started by this fixture only)
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if head.poll() is None:
            head.wait(10)
        log.close()


def test_tiny_example_runs_end_to_end_through_the_ray_jobs_api(
    kubectl, kubeconfig_env, distilljob_crd, jobs, kube_namespace, ray_address, tmp_path
):
    from distill_trainer.demo.run import build_artifacts

    checkout = tmp_path / "checkout"  # stands in for the repository: the example's relative paths resolve here
    build_artifacts(checkout / "examples" / "tiny" / "artifacts", seed=0)
    manifest = yaml.safe_load((REPO / "examples" / "manifests" / "distilljob-tiny-local.yaml").read_text())
    manifest["metadata"]["namespace"] = kube_namespace
    manifest["spec"]["launcher"].update(rayAddress=ray_address, workingDir=str(checkout))
    manifest["spec"]["distill"].update(
        max_steps=6, save_steps=3, logging_steps=1, eval_steps=6,
        teacher_pretrain="examples/tiny/artifacts/models/teacher_init",  # the demo's SFT teacher is not needed here
    )
    assert "created" in kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest)).stdout

    steps: list[int] = []
    with running_operator(kube_namespace):
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            status = jobs.status("tiny")
            step = (status.get("progress") or {}).get("step")
            if step is not None and (not steps or steps[-1] != step):
                steps.append(step)
            if status.get("state") in ("Succeeded", "Failed"):
                break
            time.sleep(0.3)
    if status.get("state") != "Succeeded":
        from ray.job_submission import JobSubmissionClient

        logs = JobSubmissionClient(ray_address).get_job_logs(status.get("rayJobName", ""))
        pytest.fail(f"DistillJob ended {status}\n--- trainer log ---\n{logs[-4000:]}")
    assert status["rayJobName"].startswith(f"kubedistill-{kube_namespace}-tiny-")
    assert jobs.condition("tiny", "Succeeded")["status"] == "True"
    progress = status["progress"]
    assert progress["step"] == progress["maxSteps"] == 6
    assert progress["loss"] > 0 and progress["tokensPerSecond"] > 0
    assert len(steps) >= 2 and steps == sorted(steps), f"progress did not advance: {steps}"
    checkpoint = Path(progress["lastCheckpoint"])
    assert checkpoint == checkout / "examples/tiny/artifacts/runs/distill-k8s/checkpoint-6"
    assert checkpoint.is_dir() and any(checkpoint.iterdir())
