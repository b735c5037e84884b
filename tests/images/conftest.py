"""Fixtures for the image tests: the images (scripts/images/build.sh), podman with the project's configuration, and
the test API server's fixtures (tests/integration/conftest.py, shared here)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.conftest import (  # noqa: F401  (fixtures, shared)
    kube,
    kube_api_client,
    kube_cluster,
    kube_namespace,
    kubeconfig_env,
    rayjob_crd,
)

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "scripts" / "images" / "build.sh"
IMAGE_TAG = os.environ.get("IMAGE_TAG", "dev")
OPERATOR_IMAGE = f"localhost/kubedistill/operator:{IMAGE_TAG}"
TRAINER_IMAGE = f"localhost/kubedistill/trainer:{IMAGE_TAG}"


def podman_env() -> dict[str, str]:
    """The environment scripts/images/env.sh makes: podman with the project's containers.conf and storage."""
    done = subprocess.run(["bash", "-c", f"source {REPO}/scripts/images/env.sh && env -0"], capture_output=True,
                          check=True)
    return dict(item.split("=", 1) for item in done.stdout.decode().split("\0") if "=" in item)


def podman_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (debootstrap, buildah --isolation chroot, podman with runc)"
    missing = [tool for tool in ("podman", "buildah", "debootstrap", "runc") if not shutil.which(tool)]
    if missing:
        return f"not installed: {', '.join(missing)} (apt-get install podman buildah debootstrap runc)"
    return None


class Podman:
    def __init__(self, env: dict[str, str]):
        self.env = env

    def __call__(self, *args: str, check: bool = True, timeout: float = 600,
                 input: str | None = None) -> subprocess.CompletedProcess:
        done = subprocess.run(["podman", *args], capture_output=True, text=True, env=self.env, timeout=timeout,
                              input=input)
        if check and done.returncode != 0:
            raise AssertionError(f"podman {' '.join(args[:3])} ... exited {done.returncode}:\n{done.stderr[-3000:]}")
        return done

    def logs(self, name: str) -> str:
        done = self("logs", name, check=False)
        return done.stdout + done.stderr

    def remove(self, name: str) -> None:
        self("rm", "--force", "--time", "5", name, check=False)

    def wait_for_log(self, name: str, text: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            logs = self.logs(name)
            if text in logs:
                return logs
            state = self("inspect", "--format", "{{.State.Status}}", name, check=False).stdout.strip()
            if state not in ("running", "created", "configured"):
                raise AssertionError(f"container {name} is {state or 'gone'} before logging {text!r}:\n{logs[-5000:]}")
            time.sleep(1)
        raise AssertionError(f"container {name} did not log {text!r} in {timeout:.0f} s:\n{self.logs(name)[-5000:]}")


@pytest.fixture(scope="session")
def podman() -> Podman:
    reason = podman_unavailable()
    if reason:
        pytest.skip(reason)
    return Podman(podman_env())


@pytest.fixture(scope="session")
def images(podman, tmp_path_factory) -> dict[str, str]:
    """Both images, built by scripts/images/build.sh (bases and layers cached between runs)."""
    log = tmp_path_factory.mktemp("images") / "build.log"
    with open(log, "w") as out:
        done = subprocess.run(["bash", str(BUILD)], stdout=out, stderr=subprocess.STDOUT, timeout=3600,
                              env=dict(podman.env, IMAGE_TAG=IMAGE_TAG))
    text = log.read_text()
    assert done.returncode == 0, f"scripts/images/build.sh failed:\n{text[-6000:]}"
    print("\n".join(line for line in text.splitlines() if line.startswith("build.sh:")))
    return {"operator": OPERATOR_IMAGE, "trainer": TRAINER_IMAGE}
