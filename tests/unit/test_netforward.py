"""tests/netforward.py: TCP <-> UNIX socket forwarders, byte for byte, against a plain echo server."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests import netforward

REPO = Path(__file__).resolve().parents[2]


class EchoServer:
    """TCP on 127.0.0.1: sends back what it reads; on the client's half-close, sends what is left and closes."""

    def __init__(self):
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(16)
        self.port = self.server.getsockname()[1]
        self.closed_by_peer = 0
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self):
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn):
        with conn:
            try:
                while data := conn.recv(65536):
                    conn.sendall(data)
                self.closed_by_peer += 1
            except OSError:
                pass

    def close(self):
        self.server.close()


@pytest.fixture
def echo():
    server = EchoServer()
    yield server
    server.close()


@pytest.fixture
def sockdir():
    path = netforward.short_socket_dir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


def chain(echo_port: int, sockdir: Path):
    """127.0.0.1:<port> -> unix socket -> the echo server: both kinds of forwarder, as the two-host tests use them."""
    inner = netforward.Forwarder(f"unix:{sockdir / 's'}", f"tcp:127.0.0.1:{echo_port}").start()
    outer = netforward.Forwarder("tcp:127.0.0.1:0", f"unix:{sockdir / 's'}").start()
    return outer, inner


def roundtrip(port: int, payload: bytes) -> bytes:
    """Send everything, half-close, read to EOF."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sender = threading.Thread(target=lambda: (sock.sendall(payload), sock.shutdown(socket.SHUT_WR)))
        sender.start()
        got = bytearray()
        while data := sock.recv(65536):
            got += data
        sender.join()
        return bytes(got)


def test_addresses_are_parsed_or_refused():
    assert netforward.parse("tcp:127.0.0.1:8265") == (socket.AF_INET, ("127.0.0.1", 8265))
    assert netforward.parse("unix:/tmp/x/s") == (socket.AF_UNIX, "/tmp/x/s")
    for bad in ("127.0.0.1:80", "tcp:127.0.0.1", "unix:", "udp:1.2.3.4:5"):
        with pytest.raises(ValueError):
            netforward.parse(bad)


def test_bytes_pass_unchanged_both_ways_and_a_half_close_is_passed_on(echo, sockdir):
    outer, inner = chain(echo.port, sockdir)
    try:
        payload = os.urandom(3 * 1024 * 1024 + 17)  # not a multiple of the copy chunk
        assert roundtrip(outer.port, payload) == payload
        assert roundtrip(outer.port, b"") == b""
        # The echo server saw the client's half-close through both forwarders, and both closed their pair.
        netforward_wait(lambda: echo.closed_by_peer == 2 and outer.open_connections == inner.open_connections == 0)
    finally:
        outer.close()
        inner.close()


def test_many_connections_at_once(echo, sockdir):
    outer, inner = chain(echo.port, sockdir)
    try:
        payloads = [os.urandom(100_000 + i) for i in range(16)]
        results: list[bytes | None] = [None] * len(payloads)

        def one(i):
            results[i] = roundtrip(outer.port, payloads[i])

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(payloads))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert results == payloads
        assert outer.connections == inner.connections == 16
        netforward_wait(lambda: outer.open_connections == inner.open_connections == 0)
    finally:
        outer.close()
        inner.close()


def test_an_unreachable_target_closes_the_client_and_close_stops_everything(echo, sockdir):
    outer, inner = chain(echo.port, sockdir)
    inner.close()  # the far end is gone: the socket file too
    assert not (sockdir / "s").exists()
    with socket.create_connection(("127.0.0.1", outer.port), timeout=10) as sock:
        sock.settimeout(10)
        assert sock.recv(10) == b""  # closed at once, no hang
    # An open connection is cut by close(), and nothing listens afterwards.
    inner = netforward.Forwarder(f"unix:{sockdir / 's'}", f"tcp:127.0.0.1:{echo.port}").start()
    sock = socket.create_connection(("127.0.0.1", outer.port), timeout=10)
    sock.sendall(b"ping")
    assert sock.recv(10) == b"ping"
    outer.close()
    inner.close()
    sock.settimeout(10)
    assert sock.recv(10) == b""
    sock.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", outer.port), timeout=5).close()


def test_the_process_form_listens_after_ready_and_stops_on_sigterm(echo, sockdir):
    ready = sockdir / "ready"
    proc = subprocess.Popen([sys.executable, "-m", "tests.netforward", f"unix:{sockdir / 's'}",
                             f"tcp:127.0.0.1:{echo.port}", "--ready", str(ready)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        netforward_wait(lambda: ready.exists() or proc.poll() is not None)
        assert proc.poll() is None, proc.stdout.read()
        with netforward.Forwarder("tcp:127.0.0.1:0", f"unix:{sockdir / 's'}") as outer:
            assert roundtrip(outer.port, b"hello" * 1000) == b"hello" * 1000
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
    assert not (sockdir / "s").exists()


def netforward_wait(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def test_freeze_silences_open_connections_and_forwards_new_ones(echo):
    forwarder = netforward.Forwarder("tcp:127.0.0.1:0", f"tcp:127.0.0.1:{echo.port}").start()
    try:
        with socket.create_connection(("127.0.0.1", forwarder.port), timeout=10) as old:
            old.sendall(b"ping")
            assert old.recv(16) == b"ping"
            assert forwarder.freeze() == 1
            old.sendall(b"lost")
            old.settimeout(0.5)
            with pytest.raises(socket.timeout):  # nothing arrives, nothing is closed
                old.recv(16)
            assert roundtrip(forwarder.port, b"new") == b"new"
    finally:
        forwarder.close()
