"""`python -m distill_operator` as a process: it reconciles, serves /healthz and Prometheus /metrics."""

from __future__ import annotations

import re

import pytest

from kube_cluster import http_get, wait_for
from tests.integration.operator_fixtures import (  # noqa: F401  (fixtures)
    distilljob,
    distilljob_crd,
    jobs,
    operator_credentials,
    operator_process,
)

pytestmark = pytest.mark.k8s


def test_operator_process_serves_liveness_and_metrics(kube_cluster, distilljob_crd, jobs, kube_namespace, tmp_path):
    # The chart's ServiceAccount token, as when installed (tests/integration/operator_fixtures.py).
    with operator_process(operator_credentials(str(kube_cluster.kubeconfig)), kube_namespace, tmp_path) as metrics_port:
        jobs.create(distilljob("proc", kube_namespace))
        jobs.rayjob("proc-0")
        jobs.wait_state("proc", "Pending")
        text = wait_for(lambda: (lambda t: t if 'kubedistill_distilljobs{condition="Created"} 1.0' in t else None)(
            http_get(f"http://127.0.0.1:{metrics_port}/metrics")[1]), timeout=10, message="metrics")
        assert 'kubedistill_rayjobs_created_total{launcher="KubeRay"} 1.0' in text
        # The job's first reconcile: from its watch event, or from the pass over every job that a replica makes
        # when it takes the leader Lease (when the job was seen before the Lease was held).
        assert re.search(r'^kubedistill_reconciles_total\{handler="(distilljob|takeover)"\} [1-9]', text, re.M), text
        assert "kubedistill_reconcile_duration_seconds_bucket" in text
