"""Byte-for-byte stream forwarders between TCP and UNIX sockets, to reach a service in another network namespace.

A UNIX socket is a file: processes in different network namespaces that share the filesystem reach each other
through it, with no address or route added anywhere. Each forwarder listens on one address and, for each
connection it accepts, opens one to its target and copies bytes both ways until both sides are done (half-closes
are passed on, so request/response protocols and TLS work unchanged; nothing is parsed).

Addresses are strings: ``tcp:HOST:PORT`` or ``unix:PATH``.

    # In the test (root namespace): 127.0.0.1:<port> -> a UNIX socket
    jobs = Forwarder("tcp:127.0.0.1:0", f"unix:{sock}").start()          # jobs.port: the port it got
    # On host A (its network namespace): that UNIX socket -> A's 127.0.0.1:8265
    hosts.a.popen([python, "-m", "tests.netforward", f"unix:{sock}", "tcp:127.0.0.1:8265", "--ready", ready])

Run as a process (``python -m tests.netforward LISTEN TARGET [--ready FILE]``) it forwards until SIGTERM/SIGINT;
``--ready FILE`` is created once it listens. UNIX socket paths are limited to 107 bytes: use a short directory
(``short_socket_dir``).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import tempfile
import threading
from pathlib import Path

CHUNK = 64 * 1024


def parse(address: str) -> tuple[int, object]:
    """``tcp:HOST:PORT`` -> (AF_INET, (host, port)); ``unix:PATH`` -> (AF_UNIX, path)."""
    kind, _, rest = address.partition(":")
    if kind == "unix" and rest:
        return socket.AF_UNIX, rest
    if kind == "tcp":
        host, _, port = rest.rpartition(":")
        if host and port.isdigit():
            return socket.AF_INET, (host, int(port))
    raise ValueError(f"not an address (tcp:HOST:PORT or unix:PATH): {address!r}")


def short_socket_dir(prefix: str = "kdfw") -> Path:
    """A new directory under /tmp, short enough for UNIX socket paths (the caller removes it)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def _connect(address: str, timeout: float = 10.0) -> socket.socket:
    family, target = parse(address)
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(target)
    except OSError:
        sock.close()
        raise
    sock.settimeout(None)
    if family == socket.AF_INET:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class _Pair:
    """One forwarded connection: two sockets, two copying threads; both sockets closed when both are done."""

    def __init__(self, left: socket.socket, right: socket.socket, on_done):
        self.left, self.right = left, right
        self._pending = 2
        self._lock = threading.Lock()
        self._on_done = on_done
        self.frozen = threading.Event()  # set: bytes are read and dropped, both ways (a stuck, silent stream)

    def start(self) -> None:
        for src, dst in ((self.left, self.right), (self.right, self.left)):
            threading.Thread(target=self._copy, args=(src, dst), daemon=True, name="netforward-copy").start()

    def _copy(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(CHUNK)
                if not data:  # EOF: pass the half-close on, the other direction may still be sending
                    dst.shutdown(socket.SHUT_WR)
                    break
                if not self.frozen.is_set():
                    dst.sendall(data)
        except OSError:
            # A reset (or a socket closed by close()): end both directions.
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        finally:
            with self._lock:
                self._pending -= 1
                last = self._pending == 0
            if last:
                self.close()

    def close(self) -> None:
        for sock in (self.left, self.right):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        self._on_done(self)


class Forwarder:
    """Listen on ``listen``; each accepted connection is forwarded to ``target`` (a new connection per client).

    ``start()`` binds and listens before it returns (``port`` is the TCP port bound, useful with port 0).
    ``close()`` stops listening and closes every open connection. A client whose target cannot be reached is
    closed at once.
    """

    def __init__(self, listen: str, target: str):
        parse(target)
        self.listen_address, self.target = listen, target
        self._server: socket.socket | None = None
        self._pairs: set[_Pair] = set()
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self.port: int | None = None
        self.connections = 0  # accepted so far

    def start(self) -> "Forwarder":
        family, address = parse(self.listen_address)
        server = socket.socket(family, socket.SOCK_STREAM)
        if family == socket.AF_UNIX:
            try:
                os.unlink(address)  # a stale socket file of an earlier run
            except FileNotFoundError:
                pass
        else:
            server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(address)
        server.listen(64)
        if family == socket.AF_INET:
            self.port = server.getsockname()[1]
        self._server = server
        self._thread = threading.Thread(target=self._accept_loop, daemon=True, name="netforward-accept")
        self._thread.start()
        return self

    @property
    def address(self) -> str:
        """The listening address, with the bound port."""
        family, address = parse(self.listen_address)
        return f"tcp:{address[0]}:{self.port}" if family == socket.AF_INET else self.listen_address

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                break  # closed
            self.connections += 1
            threading.Thread(target=self._open, args=(client,), daemon=True, name="netforward-open").start()

    def _open(self, client: socket.socket) -> None:
        try:
            upstream = _connect(self.target)
        except OSError:
            client.close()
            return
        pair = _Pair(client, upstream, self._forget)
        with self._lock:
            if self._closed.is_set():
                client.close()
                upstream.close()
                return
            self._pairs.add(pair)
        pair.start()

    def _forget(self, pair: _Pair) -> None:
        with self._lock:
            self._pairs.discard(pair)

    def freeze(self) -> int:
        """The connections open now go silent for good: neither side receives anything more, nothing is closed
        (a stuck stream, e.g. a watch through a broken proxy). New connections are forwarded as before. Returns
        how many were frozen."""
        with self._lock:
            pairs = list(self._pairs)
        for pair in pairs:
            pair.frozen.set()
        return len(pairs)

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._pairs)

    def close(self) -> None:
        self._closed.set()
        if self._server is not None:
            family, address = parse(self.listen_address)
            try:
                self._server.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._server.close()
            if family == socket.AF_UNIX:
                try:
                    os.unlink(address)
                except FileNotFoundError:
                    pass
        with self._lock:
            pairs = list(self._pairs)
        for pair in pairs:
            pair.close()
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> "Forwarder":
        return self.start() if self._server is None else self

    def __exit__(self, *exc) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.netforward", description=__doc__.split("\n\n")[0])
    parser.add_argument("listen", help="tcp:HOST:PORT or unix:PATH")
    parser.add_argument("target", help="tcp:HOST:PORT or unix:PATH")
    parser.add_argument("--ready", help="a file created once the forwarder listens")
    args = parser.parse_args(argv)
    forwarder = Forwarder(args.listen, args.target).start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(f"forwarding {forwarder.address} -> {args.target}", flush=True)
    if args.ready:
        Path(args.ready).write_text(forwarder.address)
    while not stop.wait(1):
        pass
    forwarder.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
