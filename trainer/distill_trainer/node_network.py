"""Which network interface carries this node's Ray address, so that the ranks' collectives use it too.

Gloo, left alone, binds the address the host name resolves to, and falls back to loopback when it resolves to
nothing: ranks on one host still meet, ranks on two hosts time out connecting to 127.0.0.1 (or to 127.0.1.1, which
Debian's /etc/hosts gives the host name). Ray already knows the address other nodes reach this one at; the gloo
group is bound to the interface holding it (GLOO_SOCKET_IFNAME), unless the user set that variable.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import struct

log = logging.getLogger(__name__)

GLOO_INTERFACE_ENV = "GLOO_SOCKET_IFNAME"
_SIOCGIFADDR = 0x8915  # Linux: an interface's (primary) IPv4 address


def interface_with_address(ip: str) -> str | None:
    """The name of the interface whose IPv4 address is ``ip``; None when none has it (or ``ip`` is IPv6)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(probe.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:  # no IPv4 address on this interface
                continue
            if socket.inet_ntoa(packed[20:24]) == ip:
                return name
    return None


def bind_gloo_to(ip: str) -> None:
    """Make this process's gloo groups use the interface that holds ``ip`` (the node's Ray address)."""
    if os.environ.get(GLOO_INTERFACE_ENV):
        return
    interface = interface_with_address(ip)
    if interface is None:
        log.warning("no network interface holds this node's Ray address %s; gloo binds the address the host name "
                    "resolves to. Set %s if ranks on other hosts cannot connect.", ip, GLOO_INTERFACE_ENV)
        return
    os.environ[GLOO_INTERFACE_ENV] = interface
