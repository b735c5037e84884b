"""Operator under load: N DistillJobs applied at once against a local API server.

    python bench/operator_load.py [--jobs 200] [--runs 1]

Starts the test control plane (tests/kube_cluster.py: etcd + kube-apiserver 1.20 on 127.0.0.1, or
KUBECONFIG with KUBEDISTILL_USE_KUBECONFIG=1), installs the DistillJob and RayJob CRDs, runs the operator as a
subprocess (`python -m distill_operator`), creates N DistillJobs from 16 client threads at once, and watches
RayJobs and DistillJobs. Prints the latency from each create call's return to (a) its RayJob being created and
(b) its first status condition, as p50/p99/max, and the operator's peak RSS (VmHWM). Figures, not pass/fail.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import kube_cluster as kc  # noqa: E402
import kubernetes  # noqa: E402
import yaml  # noqa: E402

GROUP, VERSION, PLURAL = "kubedistill.io", "v1alpha1", "distilljobs"


def distilljob(name: str) -> dict:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "DistillJob",
        "metadata": {"name": name},
        "spec": {
            "image": "kubedistill:bench",
            "distill": {"max_steps": 10, "student_pretrain": "/m/s", "teacher_pretrain": "/m/t",
                        "student": {"data_args": {"file_name": "/d/train.jsonl"}}},
            "storage": {"claimName": "ckpt"},
        },
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(q / 100 * len(ordered) + 0.5)) - 1))]


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def install_crds(api: kubernetes.client.ApiClient) -> None:
    ext = kubernetes.client.ApiextensionsV1Api(api)
    for path in (REPO / "crds" / "distilljob.yaml", REPO / "tests" / "fixtures" / "rayjob-crd.yaml"):
        crd = yaml.safe_load(path.read_text())
        try:
            ext.create_custom_resource_definition(crd)
        except kubernetes.client.exceptions.ApiException as error:
            if error.status != 409:
                raise
        kc.wait_for(
            lambda: any(c.type == "Established" and c.status == "True"
                        for c in (ext.read_custom_resource_definition(crd["metadata"]["name"]).status.conditions or [])),
            timeout=30, message="CRD established",
        )


def one_run(cluster: kc.KubeCluster, run: int, n_jobs: int) -> dict:
    api = cluster.api_client()
    api.configuration.connection_pool_maxsize = 32
    core, custom = kubernetes.client.CoreV1Api(api), kubernetes.client.CustomObjectsApi(api)
    namespace = f"bench-{run}-{int(time.time())}"
    core.create_namespace({"metadata": {"name": namespace}})

    created: dict[str, float] = {}
    rayjob_seen: dict[str, float] = {}
    condition_seen: dict[str, float] = {}
    stop = threading.Event()

    def watch(plural_group: tuple[str, str, str], sink: dict[str, float], key) -> None:
        group, version, plural = plural_group
        while not stop.is_set():
            w = kubernetes.watch.Watch()
            for event in w.stream(custom.list_namespaced_custom_object, group, version, namespace, plural,
                                  timeout_seconds=5):
                name = key(event["object"])
                if name and name not in sink:
                    sink[name] = time.monotonic()
                if stop.is_set():
                    w.stop()
                    break

    def rayjob_owner(obj: dict) -> str | None:
        refs = obj["metadata"].get("ownerReferences") or [{}]
        return refs[0].get("name")

    def has_condition(obj: dict) -> str | None:
        return obj["metadata"]["name"] if (obj.get("status") or {}).get("conditions") else None

    watchers = [
        threading.Thread(target=watch, args=(("ray.io", "v1", "rayjobs"), rayjob_seen, rayjob_owner), daemon=True),
        threading.Thread(target=watch, args=((GROUP, VERSION, PLURAL), condition_seen, has_condition), daemon=True),
    ]
    for t in watchers:
        t.start()

    metrics_port = kc.free_port()
    env = dict(os.environ, **cluster.env(), KUBEDISTILL_RECONCILE_INTERVAL_SECONDS="10")
    log = open(cluster.workdir / f"operator-{run}.log", "wb")
    operator = subprocess.Popen(
        [sys.executable, *(["-m", "cProfile", "-o", os.environ["BENCH_PROFILE"]] if os.environ.get("BENCH_PROFILE") else []), "-m", "distill_operator", "--namespace", namespace, "--metrics-port", str(metrics_port),
         "--liveness-port", "0"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        time.sleep(4)  # let the operator start and list the (empty) namespace
        baseline_rss = peak_rss_mb(operator.pid)
        cpu_before = cpu_seconds(operator.pid)

        def create(i: int) -> None:
            name = f"job-{i:04d}"
            custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, distilljob(name))
            created[name] = time.monotonic()

        start = time.monotonic()
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(create, range(n_jobs)))
        create_wall = time.monotonic() - start
        kc.wait_for(lambda: len(rayjob_seen) >= n_jobs and len(condition_seen) >= n_jobs, timeout=300,
                    interval=0.5, message=f"{n_jobs} RayJobs and conditions")
        all_done = time.monotonic() - start
        cpu = cpu_seconds(operator.pid) - cpu_before
        time.sleep(2)
        rss = peak_rss_mb(operator.pid)
        reconciles = scrape_reconciles(metrics_port)
    finally:
        stop.set()
        operator.terminate()
        try:
            operator.wait(20)
        except subprocess.TimeoutExpired:
            operator.kill()
            operator.wait()
        log.close()
        api.close()
    to_rayjob = [rayjob_seen[n] - created[n] for n in created]
    to_condition = [condition_seen[n] - created[n] for n in created]
    return {
        "create_wall": create_wall, "all_done": all_done, "rss": rss, "baseline_rss": baseline_rss,
        "rayjob": to_rayjob, "condition": to_condition, "reconciles": reconciles,
        "cpu": cpu,
    }


def api_floor(cluster: kc.KubeCluster, run: int, n_jobs: int) -> list[float]:
    """The same reconciles with no kopf and no watches: create N DistillJobs, then call ``reconcile`` on all of them
    from 16 threads. Returns each job's time from the start to its reconcile's end: what the API server alone allows."""
    from distill_operator.runtime import OperatorRuntime

    os.environ["KUBECONFIG"] = str(cluster.kubeconfig)
    runtime = OperatorRuntime.from_env()
    api = cluster.api_client()
    custom = kubernetes.client.CustomObjectsApi(api)
    namespace = f"floor-{run}-{int(time.time())}"
    kubernetes.client.CoreV1Api(api).create_namespace({"metadata": {"name": namespace}})
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda i: custom.create_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, distilljob(f"job-{i:04d}")), range(n_jobs)))
    api.close()
    start = time.monotonic()

    def one(i: int) -> float:
        runtime.reconcile(namespace, f"job-{i:04d}", "bench")
        return time.monotonic() - start

    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(one, range(n_jobs)))


def scrape_reconciles(port: int) -> dict[str, tuple[float, float]]:
    """{handler: (count, mean seconds)} from the operator's /metrics."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    sums, counts = {}, {}
    for family in text_string_to_metric_families(text):
        if family.name == "kubedistill_reconcile_duration_seconds":
            for sample in family.samples:
                if sample.name.endswith("_sum"):
                    sums[sample.labels["handler"]] = sample.value
                elif sample.name.endswith("_count"):
                    counts[sample.labels["handler"]] = sample.value
    return {h: (counts[h], sums[h] / counts[h] if counts[h] else 0.0) for h in counts}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3, help="repeat (fresh namespace and operator) and take medians")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="kubedistill-bench-") as workdir, kc.start_cluster(Path(workdir)) as cluster:
        with cluster.api_client() as api:
            install_crds(api)
        runs = [one_run(cluster, r, args.jobs) for r in range(args.runs)]
        floors = [api_floor(cluster, r, args.jobs) for r in range(args.runs)]
        version = cluster.version

    def med(key: str, fn) -> float:
        return statistics.median(fn(r[key]) for r in runs)

    print(f"operator load: {args.jobs} DistillJobs created at once (16 client threads), kube-apiserver {version} "
          f"on 127.0.0.1, {os.cpu_count()} CPUs shared with the API server; median of {args.runs} run(s)")
    print(f"{'latency from create returned':<34}{'p50 s':>8}{'p99 s':>8}{'max s':>8}   target p99")
    for key, label in (("rayjob", "-> RayJob created"), ("condition", "-> first condition (Created)")):
        print(f"{label:<34}{med(key, lambda v: percentile(v, 50)):>8.3f}{med(key, lambda v: percentile(v, 99)):>8.3f}"
              f"{med(key, max):>8.3f}   < 2 s")
    print(f"{'floor: reconcile without kopf':<34}{statistics.median(percentile(f, 50) for f in floors):>8.3f}"
          f"{statistics.median(percentile(f, 99) for f in floors):>8.3f}{statistics.median(max(f) for f in floors):>8.3f}"
          "   (same API calls, 16 threads, no operator)")
    print(f"{'creating all jobs took':<34}{statistics.median(r['create_wall'] for r in runs):>8.2f} s")
    print(f"{'all jobs reconciled after':<34}{statistics.median(r['all_done'] for r in runs):>8.2f} s")
    print(f"{'operator CPU during the burst':<34}{statistics.median(r['cpu'] for r in runs):>8.2f} s")
    print(f"{'operator peak RSS (VmHWM)':<34}{statistics.median(r['rss'] for r in runs):>8.1f} MB   "
          f"(idle after start {statistics.median(r['baseline_rss'] for r in runs):.1f} MB; target < 200 MB)")
    last = runs[-1]["reconciles"]
    print("reconciles (last run): " + ", ".join(f"{h} {int(c)} x {m * 1000:.0f} ms" for h, (c, m) in sorted(last.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
