"""State at a glance and a liveness probe that tells the truth, on a real API server.

- ``kubectl get dj`` shows STATE, REASON, STEP, MAX, LOSS, AGE; a failed job's message carries the trainer's last
  ``error:`` line and what to do next.
- ``python -m distill_operator --liveness-api-timeout 3`` talks to the API server through a TCP forwarder
  (tests/netforward.py): closing it is an API server outage as the operator sees it (connections reset, new ones
  refused), freezing it leaves the watch streams open and silent while new requests are answered. /healthz fails
  after the limit in both cases and is healthy again once the API server is back. (kopf's /healthz caches a
  successful probe for 10 s, so failing takes up to limit + 10 s.)
"""

from __future__ import annotations

import json
import re
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from kube_cluster import free_port, http_get, wait_for
from tests import netforward
from tests.integration.operator_fixtures import (  # noqa: F401  (fixtures)
    distilljob,
    distilljob_crd,
    jobs,
    operator,
    operator_credentials,
)

pytestmark = pytest.mark.k8s

LIMIT = 3


def test_kubectl_get_shows_state_reason_progress_and_what_to_do_next(operator, jobs, kube, kubectl, kube_namespace):
    from distill_trainer.k8s_progress import K8sProgressReporter

    jobs.create(distilljob("glance", kube_namespace))
    jobs.rayjob("glance-0")
    jobs.play_kuberay("glance-0", "Running", "RUNNING")
    jobs.wait_state("glance", "Running")
    reporter = K8sProgressReporter("glance", kube_namespace, max_steps=10, min_interval_seconds=0)
    reporter.log(4, {"train/loss": 2.5, "train/tokens_per_second": 100.0})
    wait_for(lambda: (jobs.status("glance").get("progress") or {}).get("step") == 4, message="progress mirrored")
    header, row = kubectl("get", "dj", "-n", kube_namespace).stdout.splitlines()
    assert header.split() == ["NAME", "STATE", "REASON", "STEP", "MAX", "LOSS", "AGE"]
    assert row.split()[:6] == ["glance", "Running", "RayJobRunning", "4", "10", "2.5"]

    # KubeRay copies the Ray Jobs API's message, log tail included; backoffLimit 0: the job fails.
    log_tail = ("Job entrypoint command failed with exit code 2, last available logs (truncated to 20,000 chars):\n"
                "step 4/10 loss 2.5\nerror: step 5: the loss or gradient norm is NaN/inf; the newest checkpoint is "
                "/checkpoints/glance/output/checkpoint-4\n")
    kube.patch_status("ray.io/v1", "RayJob", "glance-0",
                      {"jobDeploymentStatus": "Failed", "jobStatus": "FAILED", "message": log_tail}, kube_namespace)
    status = jobs.wait_state("glance", "Failed")
    row = kubectl("get", "dj", "glance", "-n", kube_namespace, "--no-headers").stdout.split()
    assert row[:3] == ["glance", "Failed", "BackoffLimitExceeded"]
    message = kubectl("get", "dj", "glance", "-n", kube_namespace, "-o", "jsonpath={.status.message}").stdout
    assert message == status["message"] == jobs.condition("glance", "Failed")["message"]
    assert "(error: step 5: the loss or gradient norm is NaN/inf; the newest checkpoint is" in message
    assert message.endswith("then delete and re-create the DistillJob") and "step 4/10" not in message

    # A name taken by someone else's object: Conflict, and the message says what to do.
    kube.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "taken-config"}}, kube_namespace)
    jobs.create(distilljob("taken", kube_namespace))
    wait_for(lambda: jobs.status("taken").get("reason") == "NameConflict", message="Conflict")
    row = kubectl("get", "dj", "taken", "-n", kube_namespace, "--no-headers").stdout.split()
    assert row[:3] == ["taken", "Pending", "NameConflict"]
    assert jobs.status("taken")["message"].endswith("Delete or rename it and the job proceeds")


def _kubeconfig_via(credentials: Path, port: int, path: Path) -> Path:
    """``credentials`` (a kubeconfig) with its server moved to 127.0.0.1:``port`` (the forwarder)."""
    config = yaml.safe_load(credentials.read_text())
    config["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{port}"
    path.write_text(yaml.safe_dump(config))
    return path


def _healthz(port: int) -> int:
    """The status code of GET /healthz (0: nothing answers)."""
    import urllib.error
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return 0


def test_healthz_fails_when_the_api_server_is_unreachable_or_the_watch_silent_and_recovers(
    kube_cluster, distilljob_crd, jobs, kube_namespace, tmp_path
):
    from distill_operator.__main__ import build_parser

    api_port = int(kube_cluster.server.rsplit(":", 1)[1])
    target = f"tcp:127.0.0.1:{api_port}"
    forwarder = netforward.Forwarder("tcp:127.0.0.1:0", target).start()
    port = forwarder.port
    kubeconfig = _kubeconfig_via(operator_credentials(str(kube_cluster.kubeconfig)), port, tmp_path / "fwd.kubeconfig")
    liveness_port = free_port()
    known = {a for action in build_parser()._actions for a in action.option_strings}
    extra = [a for a in ("--no-leader-election",) if a in known] + (
        ["--readiness-port", "0"] if "--readiness-port" in known else [])
    log_path = tmp_path / "operator.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "distill_operator", "--namespace", kube_namespace, "--metrics-port", "0",
             "--liveness-port", str(liveness_port), "--reconcile-interval", "0.5",
             "--liveness-api-timeout", str(LIMIT), *extra],
            env=dict(os.environ, KUBECONFIG=str(kubeconfig)), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for(lambda: _healthz(liveness_port) == 200, timeout=30, message="/healthz")
        body = json.loads(http_get(f"http://127.0.0.1:{liveness_port}/healthz")[1])
        assert body["apiContactSecondsAgo"] <= LIMIT, body
        jobs.create(distilljob("before", kube_namespace))
        jobs.wait_state("before", "Pending")

        # Outage: every connection reset, new ones refused.
        forwarder.close()
        cut = time.monotonic()
        wait_for(lambda: _healthz(liveness_port) == 500, timeout=LIMIT + 20, interval=0.25,
                 message="/healthz failing during the outage")
        failed_after = time.monotonic() - cut
        assert failed_after >= LIMIT - 1.5, failed_after  # the last contact was at most a heartbeat before the cut
        assert "not live: no answer from the API server" in log_path.read_text()
        jobs.create(distilljob("during", kube_namespace))  # created while the operator cannot see it

        forwarder = netforward.Forwarder(f"tcp:127.0.0.1:{port}", target).start()  # the API server is back
        back = time.monotonic()
        wait_for(lambda: _healthz(liveness_port) == 200, timeout=20, interval=0.25, message="/healthz again")
        healthy_after = time.monotonic() - back
        jobs.rayjob("during-0", timeout=40)  # the watch resumed: the job created during the outage runs
        assert "live again" in log_path.read_text()

        # A silent watch: its stream stays open and delivers nothing, while new requests are answered.
        assert forwarder.freeze() >= 1
        frozen = time.monotonic()
        jobs.create(distilljob("unseen", kube_namespace))
        wait_for(lambda: _healthz(liveness_port) == 500, timeout=LIMIT + 30, interval=0.25,
                 message="/healthz failing with a silent watch")
        silent_after = time.monotonic() - frozen
        # The first failure may name only an older change the watch also missed (the operator's own status patch
        # of "during"); "unseen" joins the list once it too is late. Each probe logs the reason.
        named = re.compile(rf"the DistillJob watch has not delivered the changes? of [^\n]*{kube_namespace}/unseen\b")
        wait_for(lambda: _healthz(liveness_port) == 500 and named.search(log_path.read_text()), timeout=LIMIT + 10,
                 interval=0.25, message=f"the liveness reason naming {kube_namespace}/unseen")
        print(f"\n/healthz failed {failed_after:.1f} s after the outage began, healthy {healthy_after:.1f} s after "
              f"the API server returned, failed {silent_after:.1f} s after the watch went silent (limit {LIMIT} s)")
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        forwarder.close()
