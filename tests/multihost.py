"""Several hosts on one machine, for tests: each host a network namespace joined to the others by a veth pair, with
its own hostname (UTS namespace), its own ``/dev/shm`` and Ray temp dir (mount namespace) and its own processes (PID
namespace): what two Kubernetes pods on two nodes see of each other, minus the GPUs.

    with TwoHosts(tmp_path) as hosts:
        hosts.start_ray()                        # head on A (10.200.<n>.1), worker on B (10.200.<n>.2)
        driver = hosts.a.popen([python, "-m", "distill_trainer.cli", "train", ...], env={"RAY_ADDRESS": ...})
        hosts.cut_link()                         # B unreachable, as a node that lost its network
        hosts.kill_host("b")                     # every process of B dies (kill -9), as a node that went away

Needs root (``ip netns``, ``unshare``, ``nsenter``); ``available()`` says why not where it cannot run. Nothing
outside the namespaces it makes is changed: no route, address or firewall rule of the machine itself. The hosts share
the machine's filesystem (as pods share a ReadWriteMany volume) except /dev/shm and /tmp/ray.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from distill_operator.render import RAY_HEALTH_CHECK_ENV

VENV_BIN = Path(sys.executable).parent
_counter = itertools.count()


def available() -> str | None:
    """None where hosts can be made here, else why not (a test skips with it)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "unshare", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    probe = f"kdprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode:
        return f"ip netns add fails here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _sh(*args: str) -> None:
    subprocess.run(list(args), check=True, capture_output=True, text=True)


@dataclass
class Host:
    """One host: its namespace, address, hostname; ``popen`` runs a process on it."""

    name: str
    netns: str
    ip: str
    root: Path  # this host's private files (its Ray temp dir, logs)
    _init: subprocess.Popen | None = None
    _init_pid: int = 0
    procs: list[subprocess.Popen] = field(default_factory=list)

    def boot(self) -> None:
        """Start the host: a PID-1 process in new UTS, mount and PID namespaces inside the network namespace, with
        its hostname, a fresh tmpfs on /dev/shm and its own /tmp/ray."""
        ray_dir = self.root / "ray"
        ray_dir.mkdir(parents=True, exist_ok=True)
        Path("/tmp/ray").mkdir(exist_ok=True)
        script = (f"hostname {self.name} && mount -t tmpfs -o size=4g tmpfs /dev/shm && "
                  f"mount --bind {ray_dir} /tmp/ray && exec sleep infinity")
        self._init = subprocess.Popen(
            ["ip", "netns", "exec", self.netns, "unshare", "--uts", "--mount", "--pid", "--fork", "--mount-proc",
             "--kill-child", "--", "sh", "-c", script],
            start_new_session=True,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            children = subprocess.run(["pgrep", "-P", str(self._init.pid)], capture_output=True, text=True).stdout
            if children.strip():
                pid = int(children.split()[0])
                # /dev/shm and /tmp/ray are mounted before `exec sleep`: wait until PID 1 is the sleep.
                if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"sleep"):
                    self._init_pid = pid
                    return
            if self._init.poll() is not None:
                raise RuntimeError(f"host {self.name} did not start (exit {self._init.returncode})")
            time.sleep(0.05)
        raise RuntimeError(f"host {self.name} did not start in 10 s")

    def popen(self, args: list[str], env: dict[str, str] | None = None, log: Path | None = None,
              **kwargs) -> subprocess.Popen:
        """Run ``args`` on this host (in all of its namespaces), output to ``log``."""
        if not self._init_pid:
            raise RuntimeError(f"host {self.name} is not running")
        out = open(log, "ab") if log else subprocess.DEVNULL
        proc = subprocess.Popen(
            ["nsenter", "-t", str(self._init_pid), "-n", "-u", "-m", "-p", "--", *args],
            env=env, stdout=out, stderr=subprocess.STDOUT if log else subprocess.DEVNULL, **kwargs,
        )
        self.procs.append(proc)
        return proc

    def run(self, args: list[str], env: dict[str, str] | None = None, timeout: float = 120) -> str:
        proc = subprocess.run(["nsenter", "-t", str(self._init_pid), "-n", "-u", "-m", "-p", "--", *args],
                              env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode:
            raise RuntimeError(f"on {self.name}: {args} exited {proc.returncode}: {proc.stderr[-2000:]}")
        return proc.stdout

    def kill(self) -> None:
        """Every process of this host dies at once (PID 1 of its namespace is killed)."""
        if self._init is not None and self._init.poll() is None:
            os.killpg(self._init.pid, signal.SIGKILL)
            self._init.wait(10)
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.procs.clear()
        self._init, self._init_pid = None, 0

    @property
    def alive(self) -> bool:
        return self._init is not None and self._init.poll() is None


class TwoHosts:
    """Hosts A and B on one veth link; ``start_ray`` makes them one Ray cluster, head on A."""

    def __init__(self, root: Path, *, health_check: dict[str, str] | None = None):
        n = (os.getpid() + next(_counter)) % 200 + 20
        self.tag = f"kd{os.getpid() % 10000}x{n}"
        self.subnet = f"10.200.{n}"
        self.root = Path(root)
        self.a = Host("host-a", f"{self.tag}a", f"{self.subnet}.1", self.root / "host-a")
        self.b = Host("host-b", f"{self.tag}b", f"{self.subnet}.2", self.root / "host-b")
        # Ray's failure detection as the operator renders it for Ray pods (Ray's default takes ~65 s).
        self.health_check = dict(RAY_HEALTH_CHECK_ENV if health_check is None else health_check)
        self.ray_port = 6379
        self.dashboard_port = 8265
        self._made: list[str] = []

    # ------------------------------------------------------------------------------------------------ network

    def __enter__(self) -> "TwoHosts":
        try:
            self._make_network()
            self.a.boot()
            self.b.boot()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _make_network(self) -> None:
        a, b = self.a, self.b
        for host in (a, b):
            _sh("ip", "netns", "add", host.netns)
            self._made.append(host.netns)
            _sh("ip", "-n", host.netns, "link", "set", "lo", "up")
        self.veth_a, self.veth_b = f"{self.tag}A", f"{self.tag}B"
        _sh("ip", "link", "add", self.veth_a, "netns", a.netns, "type", "veth", "peer", "name", self.veth_b,
            "netns", b.netns)
        for host, dev in ((a, self.veth_a), (b, self.veth_b)):
            _sh("ip", "-n", host.netns, "addr", "add", f"{host.ip}/24", "dev", dev)
            _sh("ip", "-n", host.netns, "link", "set", dev, "up")

    def cut_link(self) -> None:
        """B loses its network (its processes live on, unreachable)."""
        _sh("ip", "-n", self.b.netns, "link", "set", self.veth_b, "down")

    def restore_link(self) -> None:
        _sh("ip", "-n", self.b.netns, "link", "set", self.veth_b, "up")

    def close(self) -> None:
        for host in (self.b, self.a):
            host.kill()
        for netns in reversed(self._made):
            subprocess.run(["ip", "netns", "del", netns], capture_output=True)
        self._made.clear()

    # ---------------------------------------------------------------------------------------------------- Ray

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of processes on the hosts: the test's venv first on PATH, Ray without auth."""
        env = dict(os.environ)
        for key in ("RAY_ADDRESS", "CUDA_VISIBLE_DEVICES"):
            env.pop(key, None)
        env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
                   PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}")
        env.update(extra)
        return env

    @property
    def ray_address(self) -> str:
        return f"{self.a.ip}:{self.ray_port}"

    def start_ray(self, *, num_cpus: int = 1, dashboard: bool = False, worker_env: dict[str, str] | None = None):
        """Head on A, worker on B, ``num_cpus`` each; waits until both nodes are alive."""
        self.start_ray_head(num_cpus=num_cpus, dashboard=dashboard, env=worker_env)
        self.start_ray_worker(num_cpus=num_cpus, env=worker_env)

    def start_ray_head(self, *, num_cpus: int = 1, dashboard: bool = False, env: dict[str, str] | None = None):
        args = ["ray", "start", "--head", "--block", f"--node-ip-address={self.a.ip}", f"--port={self.ray_port}",
                f"--num-cpus={num_cpus}", "--disable-usage-stats"]
        if dashboard:
            args += ["--include-dashboard=true", "--dashboard-host=0.0.0.0", f"--dashboard-port={self.dashboard_port}"]
        else:
            args += ["--include-dashboard=false"]
        self.a.popen(args, env=self.env(**self.health_check, **(env or {})), log=self.a.root / "ray.log")
        self.wait_for_nodes(1)

    def start_ray_worker(self, *, num_cpus: int = 1, env: dict[str, str] | None = None):
        """B joins A's cluster (again, after ``kill_host('b')`` and ``boot``: a new node)."""
        if not self.b.alive:
            self.b.boot()
        args = ["ray", "start", "--block", f"--address={self.ray_address}", f"--node-ip-address={self.b.ip}",
                f"--num-cpus={num_cpus}", "--disable-usage-stats"]
        self.b.popen(args, env=self.env(**self.health_check, **(env or {})), log=self.b.root / "ray.log")
        self.wait_for_nodes(2)

    def alive_nodes(self) -> list[str]:
        """Addresses of the Ray nodes the GCS holds alive, asked from host A."""
        script = "import ray; print(' '.join(sorted(n['NodeManagerAddress'] for n in ray.nodes() if n['Alive'])))"
        out = self.a.run([sys.executable, "-c", f"import ray; ray.init(address='{self.ray_address}', "
                          f"log_to_driver=False, configure_logging=False); {script.split('; ', 1)[1]}"],
                         env=self.env())
        return out.split()

    def wait_for_nodes(self, count: int, timeout: float = 120) -> None:
        wait_until(lambda: len(self._try_alive()) == count, timeout, f"{count} alive Ray node(s)",
                   lambda: self.logs())

    def _try_alive(self) -> list[str]:
        try:
            return self.alive_nodes()
        except (RuntimeError, subprocess.TimeoutExpired):
            return []

    def kill_host(self, name: str) -> None:
        getattr(self, name).kill()

    def logs(self) -> str:
        out = []
        for host in (self.a, self.b):
            log = host.root / "ray.log"
            if log.exists():
                out.append(f"--- {host.name} ray.log\n{log.read_text(errors='replace')[-3000:]}")
        return "\n".join(out)


def wait_until(predicate: Callable[[], bool], timeout: float, what: str,
               context: Callable[[], str] = lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise TimeoutError(f"not seen within {timeout:.0f} s: {what}\n{context()}")
