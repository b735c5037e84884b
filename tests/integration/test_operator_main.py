"""`python -m distill_operator` as a process: it reconciles, serves /healthz and Prometheus /metrics."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request

import pytest

from kube_cluster import free_port, wait_for
from tests.integration.operator_fixtures import distilljob, distilljob_crd, jobs, operator_credentials  # noqa: F401

pytestmark = pytest.mark.k8s


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except OSError:
        return 0, ""


def test_operator_process_serves_liveness_and_metrics(kube_cluster, distilljob_crd, jobs, kube_namespace, tmp_path):
    metrics_port, liveness_port = free_port(), free_port()
    # The chart's ServiceAccount token, as when installed (tests/integration/operator_fixtures.py).
    env = dict(os.environ, KUBECONFIG=str(operator_credentials(str(kube_cluster.kubeconfig))))
    log = open(tmp_path / "operator.log", "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "distill_operator", "--namespace", kube_namespace, "--metrics-port", str(metrics_port),
         "--liveness-port", str(liveness_port), "--reconcile-interval", "0.5"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        wait_for(lambda: _get(f"http://127.0.0.1:{liveness_port}/healthz")[0] == 200, timeout=30,
                 message="liveness endpoint")
        jobs.create(distilljob("proc", kube_namespace))
        jobs.rayjob("proc-0")
        jobs.wait_state("proc", "Pending")
        text = wait_for(lambda: (lambda t: t if 'kubedistill_distilljobs{condition="Created"} 1.0' in t else None)(
            _get(f"http://127.0.0.1:{metrics_port}/metrics")[1]), timeout=10, message="metrics")
        assert 'kubedistill_rayjobs_created_total{launcher="KubeRay"} 1.0' in text
        assert 'kubedistill_reconciles_total{handler="distilljob"}' in text
        assert "kubedistill_reconcile_duration_seconds_bucket" in text
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
    assert process.returncode in (0, -signal.SIGTERM), (tmp_path / "operator.log").read_text()[-3000:]

