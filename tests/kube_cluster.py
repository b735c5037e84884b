"""A throwaway Kubernetes control plane for tests: etcd + kube-apiserver
(+ kube-controller-manager when built), on 127.0.0.1 only.

    from tests.kube_cluster import start_cluster

    with start_cluster(tmp_path) as cluster:
        api = kubernetes.client.CoreV1Api(cluster.api_client())
        ...

Binaries, in order of preference:
  * ``$KUBEBUILDER_ASSETS`` (envtest assets: kube-apiserver, etcd, optionally
    kube-controller-manager);
  * ``${KUBEDISTILL_CACHE:-~/.cache/kubedistill}/kube-1.20.2/bin`` as built by
    ``scripts/kube-apiserver/ensure.sh``, with Debian's etcd from ``PATH``.

With ``KUBEDISTILL_USE_KUBECONFIG=1`` and ``KUBECONFIG`` set, no processes are
started: the existing cluster of that kubeconfig is used (``stop()`` does
nothing to it).

Every process runs in its own process group and is stopped by PID (SIGTERM,
then SIGKILL) in ``stop()``; an ``atexit`` hook and, on Linux, a parent-death
signal make sure nothing outlives the Python process.

Only the standard library, ``kubernetes`` and PyYAML (a dependency of
``kubernetes``) are used; certificates are made with the ``openssl`` CLI.
"""

from __future__ import annotations

import atexit
import base64
import json
import os
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import yaml
from kubernetes.client.exceptions import ApiException

KUBE_VERSION = "1.20.2"
LOCALHOST = "127.0.0.1"
SERVICE_CLUSTER_IP_RANGE = "10.96.0.0/24"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
ADMIN_USER = "kubedistill-admin"
CONTEXT_NAME = "kubedistill-test"
ENSURE_SCRIPT = "scripts/kube-apiserver/ensure.sh"
DEFAULT_START_TIMEOUT = float(os.environ.get("KUBEDISTILL_KUBE_START_TIMEOUT", "120"))
KCM_CONTROLLERS = "garbagecollector,namespace,serviceaccount,serviceaccount-token"


class ClusterError(RuntimeError):
    """The control plane could not be started (the message says why)."""


class BinariesNotFound(ClusterError):
    """kube-apiserver or etcd is not available on this machine."""


# --------------------------------------------------------------------------- binaries


def cache_root() -> Path:
    return Path(os.environ.get("KUBEDISTILL_CACHE") or Path.home() / ".cache" / "kubedistill")


def default_bin_dir() -> Path:
    return cache_root() / f"kube-{KUBE_VERSION}" / "bin"


@dataclass(frozen=True)
class Binaries:
    kube_apiserver: Path
    etcd: Path
    kube_controller_manager: Optional[Path]
    source: str  # where they came from, for messages


def _executable(p: Path) -> bool:
    return p.is_file() and os.access(p, os.X_OK)


def find_binaries() -> Binaries:
    """Locate the binaries or raise BinariesNotFound with a how-to message."""
    assets = os.environ.get("KUBEBUILDER_ASSETS")
    if assets:
        d = Path(assets)
        apiserver, etcd, kcm = d / "kube-apiserver", d / "etcd", d / "kube-controller-manager"
        missing = [p.name for p in (apiserver, etcd) if not _executable(p)]
        if missing:
            raise BinariesNotFound(f"KUBEBUILDER_ASSETS={assets} lacks {', '.join(missing)}")
        return Binaries(apiserver, etcd, kcm if _executable(kcm) else None, f"KUBEBUILDER_ASSETS={assets}")

    d = default_bin_dir()
    apiserver, kcm = d / "kube-apiserver", d / "kube-controller-manager"
    if not _executable(apiserver):
        raise BinariesNotFound(
            f"kube-apiserver v{KUBE_VERSION} is not built ({apiserver} missing): "
            f"run {ENSURE_SCRIPT} (about 10 minutes cold), or set KUBEBUILDER_ASSETS, "
            "or KUBECONFIG with KUBEDISTILL_USE_KUBECONFIG=1"
        )
    etcd_path = shutil.which("etcd") or ("/usr/bin/etcd" if _executable(Path("/usr/bin/etcd")) else None)
    if not etcd_path:
        raise BinariesNotFound(f"etcd is not installed: run {ENSURE_SCRIPT} (apt-get install etcd-server)")
    return Binaries(apiserver, Path(etcd_path), kcm if _executable(kcm) else None, str(d))


def binaries_available() -> bool:
    if use_existing_kubeconfig():
        return True
    try:
        find_binaries()
        return True
    except BinariesNotFound:
        return False


def use_existing_kubeconfig() -> bool:
    return bool(os.environ.get("KUBECONFIG")) and os.environ.get("KUBEDISTILL_USE_KUBECONFIG") == "1"


def _minor_version(binary: Path, pattern: str) -> int:
    """Minor version from `<binary> --version` (e.g. 'Kubernetes v1.20.2' -> 20)."""
    try:
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    m = re.search(pattern, out)
    return int(m.group(1)) if m else 0


# --------------------------------------------------------------------------- processes

_LIVE: "set[KubeCluster]" = set()
_LIVE_LOCK = threading.Lock()


def _stop_all_at_exit() -> None:
    with _LIVE_LOCK:
        clusters = list(_LIVE)
    for c in clusters:
        try:
            c.stop()
        except Exception:  # pragma: no cover - best effort at interpreter exit
            pass


atexit.register(_stop_all_at_exit)


def _parent_death_preexec() -> Optional[Callable[[], None]]:
    """On Linux, make the child get SIGKILL when this (main) thread dies."""
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent already died
            os._exit(1)

    return preexec


class _Proc:
    """One server process, in its own process group, logging to a file."""

    def __init__(self, name: str, argv: list[str], log_path: Path, env: Optional[dict] = None):
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: pgid == pid
            preexec_fn=_parent_death_preexec(),
            env=env,
            close_fds=True,
        )
        self.pid = self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(text[-lines:])

    def stop(self, timeout: float = 15.0) -> None:
        # Signal only while the child is unreaped: its PID (= PGID) cannot
        # have been reused by anyone else then.
        try:
            if self.popen.poll() is None:
                self._killpg(signal.SIGTERM)
                try:
                    self.popen.wait(timeout)
                except subprocess.TimeoutExpired:
                    if self.popen.poll() is None:
                        self._killpg(signal.SIGKILL)
                    self.popen.wait(10)
        finally:
            self._log.close()

    def _killpg(self, sig: int) -> None:
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass


def _urlopen(url, context: Optional[ssl.SSLContext], timeout: float):
    """urlopen that ignores *_proxy environment variables (everything here is on 127.0.0.1)."""
    handlers: list = [urllib.request.ProxyHandler({})]
    if context is not None:
        handlers.append(urllib.request.HTTPSHandler(context=context))
    return urllib.request.build_opener(*handlers).open(url, timeout=timeout)


def http_get(url: str, timeout: float = 5) -> tuple[int, str]:
    """(status, body) of a GET on 127.0.0.1, or (0, "") when nothing answers yet."""
    try:
        with _urlopen(url, None, timeout) as response:
            return response.status, response.read().decode()
    except OSError:
        return 0, ""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOCALHOST, 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- certificates

_OPENSSL_CNF = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = kubedistill
[v3_ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign,digitalSignature
subjectKeyIdentifier = hash
[v3_server]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
subjectAltName = IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,IP:10.96.0.1
"""


def _make_pki(pki: Path) -> None:
    """CA, apiserver serving cert (SAN 127.0.0.1) and service-account RSA key."""
    openssl = shutil.which("openssl")
    if not openssl:
        raise ClusterError("the openssl command is needed to make the test certificates (apt-get install openssl)")
    pki.mkdir(parents=True, exist_ok=True)
    cnf = pki / "openssl.cnf"
    cnf.write_text(_OPENSSL_CNF)

    def run(*args: str) -> None:
        r = subprocess.run([openssl, *args], cwd=pki, capture_output=True, text=True)
        if r.returncode != 0:
            raise ClusterError(f"openssl {' '.join(args)} failed:\n{r.stderr}")

    run("req", "-x509", "-new", "-nodes", "-newkey", "rsa:2048", "-sha256", "-days", "3650",
        "-keyout", "ca.key", "-out", "ca.crt", "-config", str(cnf), "-extensions", "v3_ca",
        "-subj", "/CN=kubedistill-test-ca")
    run("req", "-new", "-nodes", "-newkey", "rsa:2048", "-sha256",
        "-keyout", "apiserver.key", "-out", "apiserver.csr", "-config", str(cnf), "-subj", "/CN=kube-apiserver")
    run("x509", "-req", "-in", "apiserver.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-sha256", "-days", "3650", "-out", "apiserver.crt", "-extfile", str(cnf), "-extensions", "v3_server")
    run("genrsa", "-out", "sa.key", "2048")
    for key in ("ca.key", "apiserver.key", "sa.key"):
        os.chmod(pki / key, 0o600)


def _write_kubeconfig(path: Path, server: str, token: str, ca_pem: bytes) -> None:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{
            "name": CONTEXT_NAME,
            "cluster": {"server": server, "certificate-authority-data": base64.b64encode(ca_pem).decode()},
        }],
        "users": [{"name": ADMIN_USER, "user": {"token": token}}],
        "contexts": [{"name": CONTEXT_NAME, "context": {"cluster": CONTEXT_NAME, "user": ADMIN_USER}}],
        "current-context": CONTEXT_NAME,
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    os.chmod(path, 0o600)


# --------------------------------------------------------------------------- the cluster


class KubeCluster:
    """A running (or borrowed) control plane.

    Attributes: ``kubeconfig`` (Path), ``server`` (https URL), ``token``
    (bearer token of a system:masters user; None for a borrowed cluster that
    uses another credential), ``ca_file`` (Path or None), ``workdir``,
    ``has_controller_manager`` (garbage collection and namespace deletion
    work), ``version`` (server gitVersion), ``external`` (borrowed cluster).
    """

    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        self.kubeconfig: Path = self.workdir / "kubeconfig"
        self.server: str = ""
        self.token: Optional[str] = None
        self.ca_file: Optional[Path] = None
        self.external = False
        self.has_controller_manager = False
        self.version = ""
        self.binaries: Optional[Binaries] = None
        self.timings: dict[str, float] = {}  # seconds each start phase took
        self._procs: list[_Proc] = []
        self._stopped = False

    # ---- public API

    def api_client(self):
        """A new ``kubernetes.client.ApiClient`` for this cluster (close it, or use ``with``)."""
        import kubernetes

        return kubernetes.client.ApiClient(self.configuration())

    def configuration(self):
        """A new ``kubernetes.client.Configuration`` for this cluster."""
        import kubernetes

        if self.external:
            cfg = kubernetes.client.Configuration()
            kubernetes.config.load_kube_config(
                config_file=str(self.kubeconfig), client_configuration=cfg, persist_config=False
            )
            return cfg
        cfg = kubernetes.client.Configuration(host=self.server)
        cfg.api_key = {"authorization": self.token}
        cfg.api_key_prefix = {"authorization": "Bearer"}
        cfg.ssl_ca_cert = str(self.ca_file)
        cfg.verify_ssl = True
        cfg.proxy = None  # 127.0.0.1: never through an *_proxy from the environment
        return cfg

    def env(self) -> dict:
        """Environment variables for a subprocess (kubectl, an operator) to use this cluster."""
        return {"KUBECONFIG": str(self.kubeconfig)}

    def logs(self, lines: int = 60) -> str:
        """Tails of the server logs, for failure messages."""
        return "\n".join(f"--- {p.name} ({p.log_path}) ---\n{p.log_tail(lines)}" for p in self._procs)

    def stop(self) -> None:
        """Stop every process (controller-manager, apiserver, etcd), by PID. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        errors = []
        for p in reversed(self._procs):
            try:
                p.stop()
            except Exception as e:  # keep stopping the others
                errors.append(f"{p.name}: {e!r}")
        with _LIVE_LOCK:
            _LIVE.discard(self)
        if errors:
            raise ClusterError("could not stop: " + "; ".join(errors))

    def __enter__(self) -> "KubeCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        kind = "external" if self.external else f"pids={[p.pid for p in self._procs]}"
        return f"<KubeCluster {self.server} {self.version} {kind}>"

    # ---- HTTP helpers (stdlib only, used while starting)

    def _ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    def _get(self, path: str, timeout: float = 5.0) -> tuple[int, str]:
        req = urllib.request.Request(self.server + path, headers={"Authorization": f"Bearer {self.token}"})
        try:
            with _urlopen(req, self._ssl_context(), timeout) as r:
                return r.status, r.read().decode(errors="replace")
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace")

    def _wait(self, what: str, check: Callable[[], bool], deadline: float, procs: Iterable[_Proc]) -> None:
        last_error = ""
        while True:
            for p in procs:
                if not p.alive():
                    raise ClusterError(
                        f"{p.name} exited with code {p.popen.returncode} while waiting for {what}; "
                        f"command: {' '.join(p.argv)}\n--- last lines of {p.log_path} ---\n{p.log_tail()}"
                    )
            try:
                if check():
                    return
            except (OSError, ValueError, ssl.SSLError) as e:
                last_error = repr(e)
            if time.monotonic() > deadline:
                tails = "\n".join(f"--- last lines of {p.log_path} ---\n{p.log_tail()}" for p in reversed(list(procs)))
                raise ClusterError(f"timed out waiting for {what} (last error: {last_error or 'none'})\n{tails}")
            time.sleep(0.25)

    # ---- start

    def _start(self, binaries: Binaries, timeout: float, with_controller_manager: bool,
               crds: Iterable[Any], optional_crds: Iterable[Any]) -> None:
        self.binaries = binaries
        t0 = time.monotonic()
        deadline = t0 + timeout

        def phase(name: str) -> None:
            self.timings[name] = round(time.monotonic() - t0 - sum(self.timings.values()), 2)
        pki = self.workdir / "pki"
        logs = self.workdir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        if not (pki / "sa.key").exists():
            _make_pki(pki)
        self.ca_file = pki / "ca.crt"

        api_minor = _minor_version(binaries.kube_apiserver, r"v1\.(\d+)")
        etcd_minor = _minor_version(binaries.etcd, r"etcd Version: 3\.(\d+)")

        # etcd: client and peer on 127.0.0.1, data in the workdir.
        etcd_port, peer_port = free_port(), free_port()
        etcd_url, peer_url = f"http://{LOCALHOST}:{etcd_port}", f"http://{LOCALHOST}:{peer_port}"
        etcd_args = [
            str(binaries.etcd),
            "--name=kubedistill",
            f"--data-dir={self.workdir / 'etcd'}",
            f"--listen-client-urls={etcd_url}",
            f"--advertise-client-urls={etcd_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=kubedistill={peer_url}",
            "--initial-cluster-state=new",
            "--logger=zap",
            "--log-outputs=stderr",
        ]
        if etcd_minor >= 5:
            etcd_args.append("--unsafe-no-fsync")  # test data; not in etcd 3.4
        # Loopback traffic must never go through a proxy.
        env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
        env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
        etcd = _Proc("etcd", etcd_args, logs / "etcd.log", env)
        self._procs.append(etcd)

        def etcd_healthy() -> bool:
            with _urlopen(f"{etcd_url}/health", None, 2) as r:
                return json.loads(r.read()).get("health") == "true"

        self._wait("etcd /health", etcd_healthy, deadline, [etcd])
        phase("etcd")

        # kube-apiserver
        self.token = secrets.token_hex(32)
        token_file = pki / "tokens.csv"
        token_file.write_text(f'{self.token},{ADMIN_USER},{ADMIN_USER},"system:masters"\n')
        os.chmod(token_file, 0o600)
        api_port = free_port()
        self.server = f"https://{LOCALHOST}:{api_port}"
        kcm_wanted = with_controller_manager and binaries.kube_controller_manager is not None
        api_args = [
            str(binaries.kube_apiserver),
            f"--bind-address={LOCALHOST}",
            f"--advertise-address={LOCALHOST}",
            # The "kubernetes" Service endpoints would be 127.0.0.1, which
            # Endpoints validation rejects (an error every 10 s): keep none.
            "--endpoint-reconciler-type=none",
            f"--secure-port={api_port}",
            f"--etcd-servers={etcd_url}",
            f"--cert-dir={pki}",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--token-auth-file={token_file}",
            "--authorization-mode=RBAC",
            f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
            f"--service-account-key-file={pki / 'sa.key'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            f"--api-audiences={SERVICE_ACCOUNT_ISSUER}",
            f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
            "--allow-privileged=true",
            "--profiling=false",
            "--v=1",
        ]
        if api_minor and api_minor < 24:
            api_args.append("--insecure-port=0")  # 1.20 serves plain HTTP on 127.0.0.1:8080 otherwise
        if not kcm_wanted:
            # Without the controller-manager no "default" ServiceAccount (and
            # token) is ever made, and the admission plugin would reject Pods.
            api_args.append("--disable-admission-plugins=ServiceAccount")
        api = _Proc("kube-apiserver", api_args, logs / "kube-apiserver.log", env)
        self._procs.append(api)
        self._wait("kube-apiserver /readyz", lambda: self._get("/readyz")[0] == 200, deadline, [etcd, api])
        status, body = self._get("/version")
        self.version = json.loads(body).get("gitVersion", "") if status == 200 else ""
        self._wait("the default namespace", lambda: self._get("/api/v1/namespaces/default")[0] == 200,
                   deadline, [etcd, api])

        _write_kubeconfig(self.kubeconfig, self.server, self.token, self.ca_file.read_bytes())
        phase("kube-apiserver")

        # CRDs before the controller-manager: its garbage collector watches the
        # kinds it finds at start and discovers new ones only every 30 s.
        crds, optional_crds = list(crds), list(optional_crds)
        if crds or optional_crds:
            with self.api_client() as client:
                kube = Kube(client, discovery_cache=self.workdir / "discovery-start.json")
                for source in crds:
                    try:
                        kube.apply(source)
                    except Exception as e:
                        raise ClusterError(f"installing CRDs from {source!s:.200} failed: {e}") from e
                for source in optional_crds:
                    try:
                        kube.apply(source)
                    except Exception as e:
                        warnings.warn(f"kube_cluster: could not install CRDs from {source!s:.200}: {e}")
            phase("crds")

        # kube-controller-manager: garbage collection, namespace deletion, service accounts.
        if kcm_wanted:
            kcm_bin = binaries.kube_controller_manager
            kcm_minor = _minor_version(kcm_bin, r"v1\.(\d+)")
            kcm_port = free_port()
            kcm_certs = self.workdir / "kcm-certs"
            kcm_certs.mkdir(exist_ok=True)
            kcm_args = [
                str(kcm_bin),
                f"--kubeconfig={self.kubeconfig}",
                f"--authentication-kubeconfig={self.kubeconfig}",
                f"--authorization-kubeconfig={self.kubeconfig}",
                "--authentication-skip-lookup=true",  # no request-header CA here: don't look for one
                f"--bind-address={LOCALHOST}",
                f"--secure-port={kcm_port}",
                f"--cert-dir={kcm_certs}",
                f"--controllers={KCM_CONTROLLERS}",
                f"--service-account-private-key-file={pki / 'sa.key'}",
                f"--root-ca-file={pki / 'ca.crt'}",
                "--leader-elect=false",
                "--use-service-account-credentials=false",
                "--profiling=false",
                "--v=1",
            ]
            if kcm_minor and kcm_minor < 24:
                kcm_args.append("--port=0")  # 1.20 serves plain HTTP on 0.0.0.0:10252 otherwise
            kcm = _Proc("kube-controller-manager", kcm_args, logs / "kube-controller-manager.log", env)
            self._procs.append(kcm)
            insecure = ssl.create_default_context()
            insecure.check_hostname = False
            insecure.verify_mode = ssl.CERT_NONE  # its own self-signed cert; loopback only

            def kcm_healthy() -> bool:
                with _urlopen(f"https://{LOCALHOST}:{kcm_port}/healthz", insecure, 2) as r:
                    return r.status == 200

            self._wait("kube-controller-manager /healthz", kcm_healthy, deadline, [etcd, api, kcm])
            # The serviceaccount controller has synced once the default SA exists.
            self._wait("the default ServiceAccount",
                       lambda: self._get("/api/v1/namespaces/default/serviceaccounts/default")[0] == 200,
                       deadline, [etcd, api, kcm])
            self.has_controller_manager = True
            phase("kube-controller-manager")


def start_cluster(
    workdir: os.PathLike | str,
    *,
    timeout: float = DEFAULT_START_TIMEOUT,
    with_controller_manager: bool = True,
    attempts: int = 3,
    crds: Iterable[Any] = (),
    optional_crds: Iterable[Any] = (),
) -> KubeCluster:
    """Start etcd + kube-apiserver (+ kube-controller-manager) under ``workdir``.

    Returns a ready KubeCluster (``/readyz`` answered, kubeconfig written).
    Raises BinariesNotFound when nothing is installed, ClusterError (with the
    tails of the server logs) when the servers do not come up in ``timeout``
    seconds. With ``KUBEDISTILL_USE_KUBECONFIG=1`` and ``KUBECONFIG`` set,
    returns that existing cluster instead and starts nothing.

    ``crds`` (anything ``Kube.apply`` takes: paths, YAML text, dicts) are
    applied and Established before the controller-manager starts, so that
    garbage collection of objects owned by those kinds is immediate (kinds
    added later are picked up by the garbage collector within ~30 s).
    ``optional_crds`` likewise, but a failure there is only a warning. For a
    borrowed cluster both are applied too.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if use_existing_kubeconfig():
        cluster = _existing_cluster(workdir)
        with cluster.api_client() as client:
            kube = Kube(client, discovery_cache=workdir / "discovery-start.json")
            for source in crds:
                kube.apply(source)
            for source in optional_crds:
                try:
                    kube.apply(source)
                except Exception as e:
                    warnings.warn(f"kube_cluster: could not install CRDs from {source!s:.200}: {e}")
        return cluster
    binaries = find_binaries()
    last: Optional[Exception] = None
    for attempt in range(1, attempts + 1):
        cluster = KubeCluster(workdir / f"run{attempt}")
        cluster.workdir.mkdir(parents=True, exist_ok=True)
        with _LIVE_LOCK:
            _LIVE.add(cluster)
        try:
            cluster._start(binaries, timeout, with_controller_manager, crds, optional_crds)
            return cluster
        except BaseException as e:
            logs = cluster.logs()
            cluster.stop()
            if isinstance(e, ClusterError) and "address already in use" in (str(e) + logs) and attempt < attempts:
                last = e  # a free port was taken between probing and binding: retry
                continue
            raise
    raise ClusterError(f"could not start the cluster after {attempts} attempts: {last}")


def _existing_cluster(workdir: Path) -> KubeCluster:
    import kubernetes

    path = os.environ["KUBECONFIG"].split(os.pathsep)[0]
    cluster = KubeCluster(workdir)
    cluster.external = True
    cluster.kubeconfig = Path(path)
    cfg = cluster.configuration()
    cluster.server = cfg.host
    auth = cfg.api_key.get("authorization") or cfg.api_key.get("BearerToken")
    cluster.token = auth.split(" ", 1)[-1] if auth else None
    cluster.ca_file = Path(cfg.ssl_ca_cert) if cfg.ssl_ca_cert else None
    with kubernetes.client.ApiClient(cfg) as client:
        info = kubernetes.client.VersionApi(client).get_code()
    cluster.version = info.git_version
    cluster.has_controller_manager = True  # a real cluster runs one
    cluster._stopped = True  # never stop a cluster we did not start
    return cluster


# --------------------------------------------------------------------------- object helpers


def load_manifests(source: Any) -> list[dict]:
    """Manifests from a path (str/Path to a YAML file), YAML text, a dict or a list of dicts."""
    if isinstance(source, dict):
        docs: list = [source]
    elif isinstance(source, (list, tuple)):
        docs = list(source)
    elif isinstance(source, Path) or (isinstance(source, str) and "\n" not in source and Path(source).is_file()):
        docs = list(yaml.safe_load_all(Path(source).read_text()))
    elif isinstance(source, str):
        docs = list(yaml.safe_load_all(source))
    else:
        raise TypeError(f"cannot load manifests from {type(source).__name__}")
    out: list[dict] = []
    for d in docs:
        if d is None:
            continue
        if d.get("kind", "").endswith("List") and "items" in d:
            out.extend(d["items"])
        else:
            out.append(d)
    return out


class Kube:
    """Small generic object helper over ``kubernetes.dynamic.DynamicClient``.

    Objects go in and come out as plain dicts.
    """

    def __init__(self, api_client, field_manager: str = "kubedistill-tests", discovery_cache: Optional[Path] = None):
        from kubernetes import dynamic

        self.api_client = api_client
        self.field_manager = field_manager
        if discovery_cache is None:
            discovery_cache = Path(tempfile.mkdtemp(prefix="kubedistill-discovery-")) / "discovery.json"
        self.dyn = dynamic.DynamicClient(api_client, cache_file=str(discovery_cache))

    def resource(self, api_version: str, kind: str, timeout: float = 15.0):
        """The discovered resource for (apiVersion, kind); waits a little for new CRDs."""
        from kubernetes.dynamic.exceptions import ResourceNotFoundError

        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.dyn.resources.get(api_version=api_version, kind=kind)
            except ResourceNotFoundError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
                self.dyn.resources.invalidate_cache()

    def _ns(self, res, namespace: Optional[str], obj: Optional[dict] = None) -> Optional[str]:
        if not res.namespaced:
            return None
        return ((obj or {}).get("metadata") or {}).get("namespace") or namespace or "default"

    def apply(self, source: Any, namespace: Optional[str] = None, *, wait: bool = True,
              field_manager: Optional[str] = None) -> list[dict]:
        """Server-side apply (force) of every manifest in ``source``; returns the objects.

        ``namespace`` is used for namespaced objects that name none. With
        ``wait``, CustomResourceDefinitions are waited for until Established.
        Where the server cannot server-side apply an object because it holds
        fields the server does not know (Kubernetes 1.20 and a CRD with CEL
        ``x-kubernetes-validations``), it is created or merge-patched instead,
        like ``kubectl apply`` does, and the server drops those fields.
        """
        results = []
        for obj in load_manifests(source):
            res = self.resource(obj["apiVersion"], obj["kind"])
            ns = self._ns(res, namespace, obj)
            body = json.loads(json.dumps(obj))
            if ns:
                body.setdefault("metadata", {})["namespace"] = ns
            try:
                out = self.dyn.server_side_apply(
                    res, body=body, name=obj["metadata"]["name"], namespace=ns,
                    field_manager=field_manager or self.field_manager, force_conflicts=True,
                ).to_dict()
            except ApiException as e:
                # Server-side apply on 1.20 rejects fields its schema does not
                # know (e.g. a CRD's x-kubernetes-validations, 1.25+) with a 500:
                # do what `kubectl apply` does there, create or merge-patch,
                # and let the server prune what it does not know.
                if e.status != 500 or "failed to create typed patch object" not in str(e.body):
                    raise
                out = self._create_or_merge(res, body, ns)
            if wait and obj["kind"] == "CustomResourceDefinition":
                out = self.wait_crd_established(obj["metadata"]["name"])
            results.append(out)
        return results

    def _create_or_merge(self, res, body: dict, ns: Optional[str]) -> dict:
        from kubernetes.dynamic.exceptions import ConflictError

        try:
            return self.dyn.create(res, body=body, namespace=ns).to_dict()
        except ConflictError:
            return self.dyn.patch(res, body=body, name=body["metadata"]["name"], namespace=ns,
                                  content_type="application/merge-patch+json").to_dict()

    def create(self, obj: dict, namespace: Optional[str] = None) -> dict:
        res = self.resource(obj["apiVersion"], obj["kind"])
        return self.dyn.create(res, body=obj, namespace=self._ns(res, namespace, obj)).to_dict()

    def get(self, api_version: str, kind: str, name: str, namespace: Optional[str] = None) -> Optional[dict]:
        """The object as a dict, or None when it does not exist."""
        from kubernetes.dynamic.exceptions import NotFoundError

        res = self.resource(api_version, kind)
        try:
            return self.dyn.get(res, name=name, namespace=self._ns(res, namespace)).to_dict()
        except NotFoundError:
            return None

    def list(self, api_version: str, kind: str, namespace: Optional[str] = None,
             label_selector: Optional[str] = None) -> list[dict]:
        res = self.resource(api_version, kind)
        ns = namespace if res.namespaced else None
        return self.dyn.get(res, namespace=ns, label_selector=label_selector).to_dict().get("items", [])

    def delete(self, api_version: str, kind: str, name: str, namespace: Optional[str] = None,
               propagation_policy: str = "Background") -> bool:
        """Delete; False when it was already gone."""
        from kubernetes.dynamic.exceptions import NotFoundError

        res = self.resource(api_version, kind)
        try:
            self.dyn.delete(res, name=name, namespace=self._ns(res, namespace),
                            body={"propagationPolicy": propagation_policy})
            return True
        except NotFoundError:
            return False

    def patch(self, api_version: str, kind: str, name: str, patch: dict, namespace: Optional[str] = None,
              subresource: Optional[str] = None, content_type: str = "application/merge-patch+json") -> dict:
        """A merge patch (default) of the object, or of a subresource such as ``status``."""
        res = self.resource(api_version, kind)
        path = res.path(name=name, namespace=self._ns(res, namespace))
        if subresource:
            path = f"{path}/{subresource}"
        out = self.dyn.request("patch", path, body=patch, content_type=content_type)
        return out.to_dict() if hasattr(out, "to_dict") else out

    def patch_status(self, api_version: str, kind: str, name: str, status: dict,
                     namespace: Optional[str] = None) -> dict:
        """Merge-patch ``status`` through the status subresource (what a controller does)."""
        return self.patch(api_version, kind, name, {"status": status}, namespace, subresource="status")

    def wait_crd_established(self, name: str, timeout: float = 30.0) -> dict:
        def established():
            crd = self.get("apiextensions.k8s.io/v1", "CustomResourceDefinition", name)
            conds = ((crd or {}).get("status") or {}).get("conditions") or []
            ok = any(c.get("type") == "Established" and c.get("status") == "True" for c in conds)
            return crd if ok else None

        crd = wait_for(established, timeout=timeout, message=f"CRD {name} to become Established")
        spec = crd["spec"]
        version = next(v["name"] for v in spec["versions"] if v.get("served", True))
        self.resource(f"{spec['group']}/{version}", spec["names"]["kind"], timeout=timeout)  # discoverable
        return crd


def wait_for(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.2,
             message: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; return that, or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = predicate()
        if last:
            return last
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {message} (last value: {last!r})")
        time.sleep(interval)
