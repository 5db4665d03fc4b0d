"""Which slots (GPUs, or CPU workers) of which hosts a job uses.

- ``filter_resources``: DeepSpeed's ``--include``/``--exclude`` grammar, ``NODE_SPEC[@NODE_SPEC...]`` with
  ``NODE_SPEC = HOST[:SLOT[,SLOT...]]`` (``-i "worker-0@worker-1:0,2"``), and ``--num_nodes``/``--num_gpus``.
  The hostfile's host order is kept, because it decides node ranks and so global ranks.
- ``detect_local_gpus``: GPUs of this machine without importing torch (``CUDA_VISIBLE_DEVICES``, else
  ``nvidia-smi -L``), so the launcher starts instantly.
- ``encode_world_info``/``decode_world_info``: ``{host: [slots]}`` as base64 JSON for the per-node agents.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from collections.abc import Mapping

from .errors import LaunchError
from .hostfile import check_hostname

__all__ = [
    "Resources",
    "filter_resources",
    "parse_node_specs",
    "detect_local_gpus",
    "encode_world_info",
    "decode_world_info",
    "rank_offsets",
]

Resources = dict  # {host: [slot, ...]} in node-rank order


def parse_node_specs(text: str, flag: str) -> dict[str, list[int] | None]:
    """Parse ``host[:s,s]@host2`` into ``{host: [slots] or None (whole host)}``."""
    specs: dict[str, list[int] | None] = {}
    if not text or not text.strip():
        raise LaunchError(f"{flag} is empty")
    for part in text.split("@"):
        part = part.strip()
        if not part:
            raise LaunchError(f"{flag} {text!r}: empty node spec (two '@' in a row, or one at an end)")
        host, sep, slot_text = part.partition(":")
        check_hostname(host, where=f"{flag}: host")
        if not sep:
            if host in specs and specs[host] is not None:
                raise LaunchError(f"{flag}: host {host!r} is given both whole and with slots")
            specs[host] = None
            continue
        slots = []
        for s in slot_text.split(","):
            s = s.strip()
            if not s.isdigit():
                raise LaunchError(f"{flag}: slot {s!r} of host {host!r} is not a non-negative integer")
            slots.append(int(s))
        if host in specs and specs[host] is None:
            raise LaunchError(f"{flag}: host {host!r} is given both whole and with slots")
        specs[host] = sorted(set((specs.get(host) or []) + slots))
    return specs


def _check_known(pool: Resources, specs: dict, flag: str) -> None:
    for host, slots in specs.items():
        if host not in pool:
            raise LaunchError(f"{flag}: host {host!r} is not in the hostfile (hosts: {', '.join(pool)})")
        for s in slots or ():
            if s not in pool[host]:
                raise LaunchError(
                    f"{flag}: no slot {s} on host {host!r} (its slots: {','.join(map(str, pool[host]))})"
                )


def filter_resources(
    pool: Resources,
    include: str = "",
    exclude: str = "",
    num_nodes: int | None = None,
    num_gpus: int | None = None,
) -> Resources:
    """Apply include/exclude or num_nodes/num_gpus to ``pool`` (``{host: [slots]}``), keeping host order."""
    if include and exclude:
        raise LaunchError("--include and --exclude cannot be used together")
    if (include or exclude) and (num_nodes is not None or num_gpus is not None):
        raise LaunchError("--num_nodes/--num_gpus cannot be combined with --include/--exclude")
    if include:
        specs = parse_node_specs(include, "--include")
        _check_known(pool, specs, "--include")
        chosen = {h: (list(pool[h]) if s is None else s) for h, s in specs.items()}
    elif exclude:
        specs = parse_node_specs(exclude, "--exclude")
        _check_known(pool, specs, "--exclude")
        chosen = {}
        for h, slots in pool.items():
            if h in specs and specs[h] is None:
                continue
            keep = [s for s in slots if s not in (specs.get(h) or ())]
            if keep:
                chosen[h] = keep
    else:
        chosen = {h: list(s) for h, s in pool.items()}
    result = {h: chosen[h] for h in pool if chosen.get(h)}  # hostfile order, hosts without slots dropped

    if num_nodes is not None:
        if num_nodes < 1:
            raise LaunchError(f"--num_nodes must be >= 1, got {num_nodes}")
        if num_nodes > len(result):
            raise LaunchError(f"--num_nodes {num_nodes} asks for more nodes than the {len(result)} available")
        result = dict(list(result.items())[:num_nodes])
    if num_gpus is not None:
        if num_gpus < 1:
            raise LaunchError(f"--num_gpus must be >= 1, got {num_gpus}")
        for h, slots in result.items():
            if num_gpus > len(slots):
                raise LaunchError(f"--num_gpus {num_gpus} is more than the {len(slots)} slots of host {h!r}")
            result[h] = slots[:num_gpus]
    if not result:
        raise LaunchError("no slots left after --include/--exclude")
    return result


def detect_local_gpus(env: Mapping[str, str] | None = None) -> list[str]:
    """The CUDA devices this machine offers, as ``CUDA_VISIBLE_DEVICES`` tokens (ids, UUIDs, MIG names).

    ``CUDA_VISIBLE_DEVICES`` wins when set (empty or ``-1``: none), as CUDA itself would; otherwise one token per
    ``GPU n:`` line of ``nvidia-smi -L``; otherwise none (CPU). torch is never imported.
    """
    env = os.environ if env is None else env
    if "CUDA_VISIBLE_DEVICES" in env:
        tokens = [t.strip() for t in env["CUDA_VISIBLE_DEVICES"].split(",") if t.strip()]
        out = []
        for t in tokens:
            if t.lstrip("-").isdigit() and int(t) < 0:  # CUDA stops at the first invalid/negative id
                break
            out.append(t)
        return out
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        proc = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return []
    if proc.returncode != 0:
        return []
    return [str(i) for i, line in enumerate(l for l in proc.stdout.splitlines() if l.startswith("GPU "))]


def rank_offsets(resources: Resources) -> list[int]:
    """Global rank of the first worker of each node (node order = dict order)."""
    offsets, total = [], 0
    for slots in resources.values():
        offsets.append(total)
        total += len(slots)
    return offsets


def encode_world_info(resources: Resources) -> str:
    """``{host: [slots]}`` as base64 JSON (DeepSpeed's ``--world_info`` format; only [A-Za-z0-9+/=])."""
    return base64.b64encode(json.dumps(resources, separators=(",", ":")).encode()).decode()


def decode_world_info(text: str) -> Resources:
    try:
        data = json.loads(base64.b64decode(text.encode(), validate=True))
    except (ValueError, UnicodeDecodeError) as e:
        raise LaunchError(f"--world_info is not base64 JSON: {e}") from None
    if not isinstance(data, dict) or not data:
        raise LaunchError("--world_info must encode a non-empty {host: [slots]} object")
    for host, slots in data.items():
        check_hostname(host, where="--world_info: host")
        if not isinstance(slots, list) or not slots or not all(isinstance(s, int) and s >= 0 for s in slots):
            raise LaunchError(f"--world_info: host {host!r} needs a non-empty list of slot numbers")
    return data
