"""DeepSpeed's hostfile: one ``host slots=N`` line per node.

Blank lines and ``#`` comments (whole-line or trailing) are skipped. A duplicate host, a malformed line, a
host name that is not a plain name, or a file with no hosts is refused with the file name and line number.
Unlike DeepSpeed (whose host token is any non-space run), host names are checked here: a name reaches ssh,
pdsh and mpirun command lines, and one starting with ``-`` would become an option there.
"""

from __future__ import annotations

import os
import re

from .errors import LaunchError

__all__ = ["parse_hostfile", "parse_hostfile_text", "check_hostname", "DEFAULT_HOSTFILE"]

DEFAULT_HOSTFILE = "/job/hostfile"  # DeepSpeed's default path

# user@ is allowed (ssh/pdsh take it); the name itself: letters, digits, '.', '-', '_', not starting with '-'
# or '.'. No shell metacharacters, spaces, colons (they separate slots in --include) or '@' in the host part.
_HOST_RE = re.compile(r"(?:[A-Za-z0-9_][A-Za-z0-9._-]*@)?[A-Za-z0-9_][A-Za-z0-9._-]*")
_LINE_RE = re.compile(r"(\S+)\s+slots\s*=\s*(\S+)\s*")


def check_hostname(host: str, where: str = "host name") -> str:
    """Return ``host`` if it is a plain host name (optionally ``user@host``), else raise LaunchError."""
    if not isinstance(host, str) or not _HOST_RE.fullmatch(host) or len(host) > 255:
        raise LaunchError(
            f"{where} {host!r} is not a valid host name: use letters, digits, '.', '-' and '_' "
            f"(optionally user@host), not starting with '-' or '.'; shell syntax is refused"
        )
    return host


def parse_hostfile_text(text: str, source: str = "<hostfile>") -> dict[str, int]:
    """Parse hostfile text into ``{host: slots}`` in file order (the order decides the node ranks)."""
    hosts: dict[str, int] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{source}:{lineno}"
        m = _LINE_RE.fullmatch(line)
        if m is None:
            raise LaunchError(f"{where}: expected 'HOST slots=N', got {raw.strip()!r}")
        host, slots = m.group(1), m.group(2)
        check_hostname(host, where=f"{where}: host")
        if not slots.isdigit() or int(slots) < 1:
            raise LaunchError(f"{where}: slots must be a positive integer, got {slots!r}")
        if host in hosts:
            raise LaunchError(f"{where}: host {host!r} is listed twice (hosts must be unique)")
        hosts[host] = int(slots)
    if not hosts:
        raise LaunchError(f"{source}: the hostfile lists no hosts")
    return hosts


def parse_hostfile(path: str | os.PathLike) -> dict[str, int]:
    """Read and parse a hostfile; a missing or unreadable file is a LaunchError naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise LaunchError(f"cannot read hostfile {os.fspath(path)!r}: {e.strerror}") from None
    return parse_hostfile_text(text, source=os.fspath(path))
