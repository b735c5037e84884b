"""The operator's RayAddress launcher against a Ray cluster of two hosts (tests/multihost.py): submit, progress,
success; and a host lost mid-run -> the Ray job fails -> Restarting -> a new submission resumes from the newest
checkpoint -> Succeeded, with the same weights as a run never interrupted.

The operator (in-process, kopf) and the kube-apiserver stay on the machine's 127.0.0.1; the Ray hosts A and B are
network namespaces. Nothing is added to the machine's network: the two meet through UNIX sockets on the shared
filesystem (tests/netforward.py):
- the Jobs API: the test's 127.0.0.1:<port> -> UNIX socket -> a relay on host A -> A's 127.0.0.1:8265;
- the API server, for the trainer's progress reports: a relay on host A listening on A's 127.0.0.1:<the API
  server's port> -> UNIX socket -> the machine's 127.0.0.1:<port>. The same address, so the admin kubeconfig and
  the server's certificate (SAN 127.0.0.1) work unchanged; TLS passes through byte for byte.

Needs root (network namespaces) and the test API server. Slow (minutes): run with -m slow.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import pytest
import torch
import yaml

from kube_cluster import http_get
from tests import multihost, netforward
from tests.conftest import checkpoint_weights, tiny_config_dict
from tests.integration.operator_fixtures import DJ_API, DJ_KIND, REPO, distilljob_crd, jobs, running_operator  # noqa: F401

why_not = multihost.available()
pytestmark = [
    pytest.mark.k8s,
    pytest.mark.slow,
    pytest.mark.skipif(why_not is not None, reason=f"two hosts cannot be made here: {why_not}"),
]

TRAIN = [sys.executable, "-m", "distill_trainer.cli", "train"]


def _relay_on(host: multihost.Host, listen: str, target: str, sockdir: Path, name: str) -> None:
    """``python -m tests.netforward`` on ``host``, listening once this returns."""
    ready = sockdir / f"{name}.ready"
    # nsenter starts it in the target's working directory: the repository goes on PYTHONPATH instead.
    proc = host.popen([sys.executable, "-m", "tests.netforward", listen, target, "--ready", str(ready)],
                      env=dict(os.environ, PYTHONPATH=str(REPO)), log=sockdir / f"{name}.log")
    multihost.wait_until(lambda: ready.exists() or proc.poll() is not None, 30, f"relay {name} on {host.name}")
    assert proc.poll() is None, (sockdir / f"{name}.log").read_text()


class RayOnTwoHosts:
    """Ray head on host A (with the Jobs API), a worker on host B, one CPU each; ``jobs_url`` reaches A's Jobs API
    from the test's 127.0.0.1, and the trainer on A reaches the API server at the kubeconfig's address."""

    def __init__(self, hosts: multihost.TwoHosts, jobs_url: str, worker_env: dict[str, str]):
        self.hosts, self.jobs_url, self.worker_env = hosts, jobs_url, worker_env

    def client(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.jobs_url)

    def logs(self, submission: str) -> str:
        try:
            return self.client().get_job_logs(submission)
        except Exception as error:  # noqa: BLE001 - for failure messages only
            return f"(no logs of {submission}: {error})"


@pytest.fixture(scope="module")
def ray_two_hosts(kube_cluster, tmp_path_factory):
    if kube_cluster.external:
        pytest.skip("the API server is not this machine's 127.0.0.1")
    api = urllib.parse.urlsplit(kube_cluster.server)
    assert api.hostname == "127.0.0.1" and api.port, kube_cluster.server
    sockdir = netforward.short_socket_dir()
    api_sock, jobs_sock = sockdir / "api.sock", sockdir / "jobs.sock"
    forwarders: list[netforward.Forwarder] = []
    try:
        # API server: (host A) 127.0.0.1:<port> -> api.sock -> (here) 127.0.0.1:<port>.
        forwarders.append(netforward.Forwarder(f"unix:{api_sock}", f"tcp:127.0.0.1:{api.port}").start())
        with multihost.TwoHosts(tmp_path_factory.mktemp("hosts")) as hosts:
            _relay_on(hosts.a, f"tcp:127.0.0.1:{api.port}", f"unix:{api_sock}", sockdir, "api")
            worker_env = {
                "KUBECONFIG": str(kube_cluster.kubeconfig),  # the trainer's progress reports (driver on A)
                "KUBEDISTILL_NUM_THREADS": "1",
                "KUBEDISTILL_PROGRESS_INTERVAL_SECONDS": "0",
                "PYTHONUNBUFFERED": "1",
                "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
            }
            hosts.start_ray(num_cpus=1, dashboard=True, worker_env=worker_env)
            # Jobs API: (here) 127.0.0.1:<free> -> jobs.sock -> (host A) 127.0.0.1:8265.
            _relay_on(hosts.a, f"unix:{jobs_sock}", f"tcp:127.0.0.1:{hosts.dashboard_port}", sockdir, "jobs")
            jobs_in = netforward.Forwarder("tcp:127.0.0.1:0", f"unix:{jobs_sock}").start()
            forwarders.append(jobs_in)
            jobs_url = f"http://127.0.0.1:{jobs_in.port}"
            multihost.wait_until(lambda: http_get(f"{jobs_url}/api/version")[0] == 200, 120,
                                 f"the Jobs API at {jobs_url}",
                                 hosts.logs)
            yield RayOnTwoHosts(hosts, jobs_url, worker_env)
    finally:
        for forwarder in forwarders:
            forwarder.close()
        shutil.rmtree(sockdir, ignore_errors=True)


def distill_config(setup, out: Path, *, max_steps: int, save_steps: int) -> dict:
    """Two ranks, each a teacher and a student on one device: one CPU bundle per rank, so one rank per host."""
    data = tiny_config_dict(setup, out, max_steps=max_steps, save_steps=save_steps, eval_steps=max_steps)
    data["student"]["training_args"].update(per_device_train_batch_size=4, gradient_accumulation_steps=2)
    data["student"]["device_mapping"] = [0, 1]
    data["teacher"]["device_mapping"] = [0, 1]
    return data


def distilljob(name: str, namespace: str, jobs_url: str, distill: dict, backoff_limit: int) -> dict:
    return {
        "apiVersion": DJ_API,
        "kind": DJ_KIND,
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "image": "unused-by-the-ray-address-launcher",
            "launcher": {"type": "RayAddress", "rayAddress": jobs_url},
            "runPolicy": {"backoffLimit": backoff_limit},
            "distill": distill,
        },
    }


def pairing_lines(log: str) -> list[str]:
    return [line.split("distill_trainer.workers: ", 1)[1] for line in log.splitlines()
            if "distill_trainer.workers: rank " in line]


def newest_checkpoint_step(out: Path) -> int:
    steps = [int(p.name.split("-")[1]) for p in (out / "output").glob("checkpoint-*") if p.name.split("-")[1].isdigit()]
    return max(steps, default=0)


class Watch:
    """Polls a DistillJob; records each new (state, restarts, attempt) with the seconds since the watch began, and
    the distinct steps of status.progress."""

    def __init__(self, jobs, name: str):
        self.jobs, self.name = jobs, name
        self.start = time.monotonic()
        self.seen: list[tuple[float, str, int, int, str]] = []
        self.steps: list[int] = []
        self.status: dict = {}

    def poll(self) -> dict:
        self.status = self.jobs.status(self.name)
        key = (self.status.get("state"), self.status.get("restarts"), self.status.get("attempt"))
        if not self.seen or self.seen[-1][1:4] != key:
            self.seen.append((round(time.monotonic() - self.start, 1), *key, self.status.get("message") or ""))
        step = (self.status.get("progress") or {}).get("step")
        if step is not None and (not self.steps or self.steps[-1] != step):
            self.steps.append(step)
        return self.status

    def until(self, predicate, timeout: float, what: str, context=lambda: "") -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.poll()
            if predicate(status):
                return status
            time.sleep(0.2)
        raise TimeoutError(f"not seen within {timeout:.0f} s: {what}\nstates: {self.timeline()}\n{context()}")

    def timeline(self) -> str:
        return "\n".join(f"  +{t:6.1f}s {state} restarts={r} attempt={a}: {m[:300]}" for t, state, r, a, m in self.seen)


def test_a_distilljob_runs_on_two_hosts_through_the_forwarded_jobs_api(
    kubectl, kubeconfig_env, distilljob_crd, jobs, kube_namespace, ray_two_hosts, tiny_setup, tmp_path
):
    ray = ray_two_hosts
    distill = distill_config(tiny_setup, tmp_path / "run", max_steps=6, save_steps=3)
    manifest = distilljob("two-hosts", kube_namespace, ray.jobs_url, distill, backoff_limit=0)
    assert "created" in kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest)).stdout

    watch = Watch(jobs, "two-hosts")
    with running_operator(kube_namespace):
        status = watch.until(lambda s: s.get("state") in ("Succeeded", "Failed"), 300, "a terminal state",
                             lambda: ray.logs(watch.status.get("rayJobName", "")))
    submission = status["rayJobName"]
    log = ray.logs(submission)
    print(f"states:\n{watch.timeline()}\nprogress steps: {watch.steps}")
    assert status["state"] == "Succeeded", f"{status}\n--- driver log ---\n{log[-5000:]}"
    assert submission.startswith(f"kubedistill-{kube_namespace}-two-hosts-") and submission.endswith("-0")
    assert jobs.condition("two-hosts", "Succeeded")["status"] == "True"
    progress = status["progress"]
    assert progress["step"] == progress["maxSteps"] == 6
    assert len(watch.steps) >= 2 and watch.steps == sorted(watch.steps), f"progress did not advance: {watch.steps}"
    checkpoint = Path(progress["lastCheckpoint"])
    assert checkpoint == tmp_path / "run" / "output" / "checkpoint-6"
    assert (checkpoint / "student" / "model.safetensors").is_file()

    # One rank pair on each host, each pair's hand-off over its host's shared memory.
    hosts = ray.hosts
    pairs = pairing_lines(log)
    assert len(pairs) == 2, log[-5000:]
    for rank, line in enumerate(pairs):
        assert line.startswith(f"rank {rank}: teacher on host-"), line
        assert line.endswith("targets by shared_memory"), line
    assert sorted(line.split("teacher on ", 1)[1].split(" ")[0] for line in pairs) == ["host-a", "host-b"], pairs
    assert any(f"({hosts.a.ip})" in line for line in pairs) and any(f"({hosts.b.ip})" in line for line in pairs)


def test_a_host_lost_mid_run_restarts_the_distilljob_which_resumes_and_succeeds(
    kubectl, kubeconfig_env, distilljob_crd, jobs, kube_namespace, ray_two_hosts, tiny_setup, tmp_path
):
    ray, hosts = ray_two_hosts, ray_two_hosts.hosts
    steps = 24
    out = tmp_path / "run"
    distill = distill_config(tiny_setup, out, max_steps=steps, save_steps=3)
    # backoffLimit 1: the one retry must succeed (it waits for room for its ranks, up to the trainer's 300 s).
    manifest = distilljob("lost-host", kube_namespace, ray.jobs_url, distill, backoff_limit=1)
    assert "created" in kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest)).stdout

    watch = Watch(jobs, "lost-host")
    name = "lost-host"
    with running_operator(kube_namespace):
        watch.until(lambda s: newest_checkpoint_step(out) >= 6 or s.get("state") in ("Succeeded", "Failed"), 300,
                    "checkpoint-6", lambda: ray.logs(watch.status.get("rayJobName", "")))
        assert watch.status["state"] == "Running", watch.timeline()
        first = watch.status["rayJobName"]
        assert first.endswith("-0")
        hosts.cut_link()
        cut = time.monotonic()
        watch.seen.append((round(cut - watch.start, 1), "(link of host B cut)", None, None, ""))

        # The Ray job fails (the driver names the lost node, exit 3); the operator restarts the job.
        status = watch.until(lambda s: (s.get("restarts") or 0) >= 1 or s.get("state") in ("Succeeded", "Failed"),
                             120, "a restart", lambda: ray.logs(first))
        restarted_after = time.monotonic() - cut
        assert status.get("restarts") == 1 and status.get("state") in ("Restarting", "Running"), watch.timeline()
        newest = newest_checkpoint_step(out)
        assert 6 <= newest < steps
        info = ray.client().get_job_info(first)
        first_log = ray.logs(first)
        assert getattr(info.status, "value", str(info.status)) == "FAILED", info
        errors = [line for line in first_log.splitlines() if line.startswith("error: ")]
        assert errors and errors[0].startswith(f"error: lost Ray node {hosts.b.ip} (host-b, node "), first_log[-4000:]
        assert f"newest checkpoint is {out / 'output' / f'checkpoint-{newest}'}" in errors[0], errors[0]
        restart_events = [e for e in jobs.kube.list("v1", "Event", kube_namespace)
                          if e["involvedObject"]["name"] == name and e["reason"] == "Restarting"]
        assert len(restart_events) == 1 and restart_events[0]["type"] == "Warning", restart_events
        message = restart_events[0]["message"]
        assert message.startswith(f"Ray job {first} failed: ") and "restart 1 of 1" in message, message
        second = status["rayJobName"]
        assert second == first[:-1] + "1" and status["attempt"] == 1

        # Host B comes back as a new node (as the fixture of tests/integration/test_multihost.py does it).
        hosts.kill_host("b")
        hosts.restore_link()
        hosts.wait_for_nodes(1)
        hosts.start_ray_worker(num_cpus=1, env=ray.worker_env)
        back = time.monotonic()
        watch.seen.append((round(back - watch.start, 1), "(host B back)", None, None, ""))

        status = watch.until(lambda s: s.get("state") in ("Succeeded", "Failed"), 400, "a terminal state",
                             lambda: ray.logs(watch.status.get("rayJobName", "")))
    second_log = ray.logs(second)
    print(f"states:\n{watch.timeline()}\nprogress steps: {watch.steps}\n"
          f"restart {restarted_after:.1f} s after the cut; newest checkpoint-{newest}")
    assert status["state"] == "Succeeded", f"{watch.timeline()}\n--- {second} ---\n{second_log[-5000:]}"
    assert status["restarts"] == 1 and status["attempt"] == 1 and status["rayJobName"] == second
    assert jobs.condition(name, "Restarting")["status"] == "False"
    assert status["progress"]["step"] == steps
    assert Path(status["progress"]["lastCheckpoint"]) == out / "output" / f"checkpoint-{steps}"
    assert f"resuming from {out / 'output' / f'checkpoint-{newest}'} at step {newest}" in second_log, \
        second_log[-4000:]
    assert len(pairing_lines(second_log)) == 2, second_log[-4000:]
    states = [s for _, s, *_ in watch.seen]
    assert "Restarting" in states or "Running" in states[states.index("(link of host B cut)") + 1:], watch.timeline()

    # The same config never interrupted, on one host (an embedded Ray on the machine itself): the same weights.
    straight = tmp_path / "straight"
    straight.mkdir()
    config = straight / "distill.yaml"
    config.write_text(yaml.safe_dump(distill_config(tiny_setup, straight, max_steps=steps, save_steps=3)))
    env = hosts.env(KUBEDISTILL_NUM_THREADS="1")
    done = subprocess.run([*TRAIN, str(config)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    left, right = checkpoint_weights(out, steps), checkpoint_weights(straight, steps)
    assert left.keys() == right.keys()
    for key in left:
        assert torch.equal(left[key], right[key]), key
