"""Master port: a free one when none is given; a given one checked on this machine."""

from __future__ import annotations

import errno
import socket

from .errors import LaunchError

__all__ = ["free_port", "check_port_free", "is_local_address"]


def free_port() -> int:
    """A port nobody listens on now (the OS picks it; the rank-0 store binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def check_port_free(port: int) -> None:
    """Raise LaunchError if something on this machine already listens on ``port``.

    SO_REUSEADDR is set as torch's TCPStore sets it, so a port held only by TIME_WAIT sockets counts as free.
    """
    if not 1 <= port <= 65535:
        raise LaunchError(f"--master_port {port} is not a port number (1-65535)")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise LaunchError(f"--master_port {port} is already in use on this machine: "
                                  "choose another port, or leave --master_port out to get a free one") from None
            if e.errno == errno.EACCES:
                raise LaunchError(f"--master_port {port}: permission denied (ports below 1024 need root)") from None
            raise


def is_local_address(addr: str) -> bool:
    """Whether ``addr`` names this machine (loopback, our host name, or one of our addresses)."""
    if addr in ("localhost", "127.0.0.1", "::1", "0.0.0.0"):
        return True
    names = {socket.gethostname(), socket.getfqdn()}
    if addr in names or addr.split(".")[0] in {n.split(".")[0] for n in names}:
        return True
    try:
        # sockaddr[0] is the address string for the AF_INET/AF_INET6 results a host name gives; typeshed also
        # allows (int, bytes) sockaddrs of other families, which getaddrinfo does not return for a host name
        target = {info[4][0] for info in socket.getaddrinfo(addr, None) if isinstance(info[4][0], str)}
    except OSError:
        return False
    if any(a.startswith("127.") or a == "::1" for a in target):
        return True
    for a in target:
        if ":" in a:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.bind((a, 0))  # binding works only for an address of one of our interfaces
                return True
            except OSError:
                continue
    return False
