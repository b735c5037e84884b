"""Two Ray hosts on one machine (tests/multihost.py: network namespaces, each host its own hostname, /dev/shm and
processes): data parallelism across hosts, a teacher the user places on the other host, and a host lost mid-run.

The driver runs as a user runs it on a cluster: ``kubedistill train CONFIG`` on host A with RAY_ADDRESS set. The
references are the same configs run on one host (the machine itself, an embedded Ray). Needs root; skipped where
network namespaces cannot be made.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests import multihost
from tests.conftest import checkpoint_weights, logged_metrics, tiny_config_dict

why_not = multihost.available()
pytestmark = pytest.mark.skipif(why_not is not None, reason=f"two hosts cannot be made here: {why_not}")


def config(setup, out: Path, *, ranks: int, max_steps: int = 4, save_steps: int = 2, teacher_devices=None,
           **overrides) -> Path:
    data = tiny_config_dict(setup, out, max_steps=max_steps, save_steps=save_steps, eval_steps=max_steps,
                            **overrides)
    data["student"]["training_args"].update(per_device_train_batch_size=4, gradient_accumulation_steps=2)
    data["student"]["device_mapping"] = list(range(ranks))
    data["teacher"]["device_mapping"] = list(range(ranks)) if teacher_devices is None else teacher_devices
    out.mkdir(parents=True, exist_ok=True)
    path = out / "distill.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def driver_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, RAY_AUTH_MODE="disabled", KUBEDISTILL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    env.update(extra)
    return env


TRAIN = [sys.executable, "-m", "distill_trainer.cli", "train"]


def train_one_host(path: Path, *overrides: str) -> subprocess.CompletedProcess:
    """The reference: the same config on one host (an embedded Ray on the machine itself)."""
    done = subprocess.run([*TRAIN, str(path), *overrides], env=driver_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def start_on_a(hosts: multihost.TwoHosts, path: Path, *overrides: str, **env: str) -> tuple[subprocess.Popen, Path]:
    log = path.parent / f"driver-{time.monotonic_ns()}.log"
    proc = hosts.a.popen([*TRAIN, str(path), *overrides], env=driver_env(RAY_ADDRESS=hosts.ray_address, **env),
                         log=log)
    return proc, log


def train_on_a(hosts: multihost.TwoHosts, path: Path, *overrides: str) -> str:
    proc, log = start_on_a(hosts, path, *overrides)
    returncode = proc.wait(600)
    text = log.read_text(errors="replace")
    assert returncode == 0, text[-6000:] + hosts.logs()
    return text


def pairing_lines(log: str) -> list[str]:
    return [line.split("distill_trainer.workers: ", 1)[1] for line in log.splitlines()
            if "distill_trainer.workers: rank " in line]


def assert_same_weights(a: Path, b: Path, step: int) -> None:
    left, right = checkpoint_weights(a, step), checkpoint_weights(b, step)
    assert left.keys() == right.keys()
    for name in left:
        assert torch.equal(left[name], right[name]), name


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    """Ray head on host A, a worker on host B, one CPU each: a rank pair fills a host, as a GPU pair fills a GPU."""
    with multihost.TwoHosts(tmp_path_factory.mktemp("hosts")) as two:
        two.start_ray(num_cpus=1)
        yield two


def test_data_parallel_across_two_hosts_equals_one_host(hosts, tiny_setup, tmp_path):
    two_host = config(tiny_setup, tmp_path / "two", ranks=2)
    log = train_on_a(hosts, two_host)
    # Each pair on its own host, its hand-off over that host's shared memory; ranks 0 and 1 on different hosts.
    pairs = pairing_lines(log)
    assert len(pairs) == 2, log[-4000:]
    for rank, line in enumerate(pairs):
        assert line.startswith(f"rank {rank}: ") and line.endswith("targets by shared_memory"), line
    assert {hosts.a.ip, hosts.b.ip} == {ip for ip in (hosts.a.ip, hosts.b.ip) for line in pairs if ip in line}
    for line in pairs:
        teacher, student = line.split("teacher on ", 1)[1].split(", student on ")
        assert teacher.split(" ")[0] == student.split(" ")[0], line  # same host name

    one_host = config(tiny_setup, tmp_path / "one", ranks=2)
    train_one_host(one_host)
    # Same math (gloo's all-reduce of two ranks, the same order): bit for bit.
    assert_same_weights(tmp_path / "two", tmp_path / "one", 4)
    assert [r.get("train/loss") for r in logged_metrics(tmp_path / "two")] == \
        [r.get("train/loss") for r in logged_metrics(tmp_path / "one")]


def test_a_teacher_placed_on_the_other_host_uses_the_object_store_and_says_so(hosts, tiny_setup, tmp_path):
    # Student on device 0, teacher on device 1: two bundles of one CPU, so one on each host.
    crossed = config(tiny_setup, tmp_path / "crossed", ranks=1, teacher_devices=[1])
    log = train_on_a(hosts, crossed)
    (pair,) = pairing_lines(log)
    assert "different hosts, so the teacher's targets go through the Ray object store" in pair, pair
    assert hosts.a.ip in pair and hosts.b.ip in pair
    assert "WARNING" in next(line for line in log.splitlines() if "different hosts" in line)

    same = config(tiny_setup, tmp_path / "same", ranks=1)
    train_one_host(same)
    # The object store carries the same float32 targets: the same student, bit for bit.
    assert_same_weights(tmp_path / "crossed", tmp_path / "same", 4)


def newest_checkpoint_step(out: Path) -> int:
    steps = [int(p.name.split("-")[1]) for p in (out / "output").glob("checkpoint-*") if p.name.split("-")[1].isdigit()]
    return max(steps, default=0)


@pytest.mark.slow
def test_a_host_lost_mid_run_stops_the_driver_and_a_resumed_run_is_bit_identical(tiny_setup, tmp_path):
    steps = 24
    with multihost.TwoHosts(tmp_path / "hosts") as hosts:
        hosts.start_ray(num_cpus=1)
        path = config(tiny_setup, tmp_path / "run", ranks=2, max_steps=steps, save_steps=3)
        driver, log = start_on_a(hosts, path)
        multihost.wait_until(lambda: newest_checkpoint_step(tmp_path / "run") >= 6 or driver.poll() is not None, 300,
                             "checkpoint-6", lambda: log.read_text(errors="replace")[-3000:])
        assert driver.poll() is None, log.read_text(errors="replace")[-4000:]
        hosts.cut_link()
        cut = time.monotonic()
        returncode = driver.wait(120)
        stopped_after = time.monotonic() - cut
        text = log.read_text(errors="replace")
        # A clear message naming the lost node and the newest checkpoint, well within Ray's default ~65 s.
        assert returncode == 3, text[-5000:]
        (error,) = [line for line in text.splitlines() if line.startswith("error: ")]
        newest = newest_checkpoint_step(tmp_path / "run")
        assert error.startswith(f"error: lost Ray node {hosts.b.ip} (host-b, node "), error
        # Ray places the bundles: the ranks of host B are whichever pair the log put there.
        (on_b,) = [line.split(":")[0] for line in pairing_lines(text) if f"student on host-b ({hosts.b.ip})" in line]
        assert f"where student {on_b}, teacher {on_b} ran" in error, error
        assert f"newest checkpoint is {tmp_path / 'run' / 'output' / f'checkpoint-{newest}'}" in error, error
        assert 6 <= newest < steps
        assert stopped_after < 40, stopped_after
        print(f"driver stopped {stopped_after:.1f} s after the link was cut; newest checkpoint-{newest}")

        # A rerun before B is back: no room for rank 1; it says what is missing, trains nothing, exits 3.
        early, early_log = start_on_a(hosts, path, "resume_from_checkpoint=true",
                                      KUBEDISTILL_PLACEMENT_TIMEOUT_SECONDS="8")
        assert early.wait(120) == 3, early_log.read_text(errors="replace")[-4000:]
        # While it waits, it says so (after 5 s without room), then gives up at the timeout.
        assert "waiting up to 8 s for room for the run's ranks: 2 bundle(s) of {CPU 1}; the cluster has 1 live " \
            "node(s)" in early_log.read_text(), early_log.read_text(errors="replace")[-4000:]
        early_error = [line for line in early_log.read_text().splitlines() if line.startswith("error: ")]
        assert early_error and early_error[0].startswith(
            "error: the Ray cluster found no room for the run's ranks within 8 s: they need 2 bundle(s) of {CPU 1}"
        ), early_error
        assert "the cluster has 1 live node(s) with CPU 1 in all" in early_error[0]
        assert newest_checkpoint_step(tmp_path / "run") == newest  # nothing trained, nothing written

        # B comes back as a new node (its raylet exits once it learns the GCS declared it dead), then the rerun.
        hosts.kill_host("b")
        hosts.restore_link()
        hosts.wait_for_nodes(1)
        hosts.start_ray_worker(num_cpus=1)
        resumed = train_on_a(hosts, path, "resume_from_checkpoint=true")
        assert f"resuming from {tmp_path / 'run' / 'output' / f'checkpoint-{newest}'} at step {newest}" in resumed

    straight = config(tiny_setup, tmp_path / "straight", ranks=2, max_steps=steps, save_steps=3)
    train_one_host(straight)
    assert_same_weights(tmp_path / "run", tmp_path / "straight", steps)
