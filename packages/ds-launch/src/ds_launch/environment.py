"""Environment for workers: torchrun's contract plus DeepSpeed's extras, and what travels to remote nodes.

Each worker gets what ``torchrun`` sets (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``,
``GROUP_RANK``, ``GROUP_WORLD_SIZE``, ``ROLE_RANK``, ``ROLE_WORLD_SIZE``, ``ROLE_NAME``, ``MASTER_ADDR``,
``MASTER_PORT``, ``TORCHELASTIC_RESTART_COUNT``, ``TORCHELASTIC_MAX_RESTARTS``, ``TORCHELASTIC_RUN_ID``,
``TORCHELASTIC_USE_AGENT_STORE``, ``PYTHON_EXEC``, ``OMP_NUM_THREADS=1`` when unset and several workers share
the node) and what DeepSpeed's per-node launcher adds (``LOCAL_SIZE``, ``CROSS_RANK`` = node rank,
``CROSS_SIZE`` = number of nodes, ``CUDA_VISIBLE_DEVICES`` = the node's selected GPUs).

Remote nodes get the launcher's variables whose names start with one of ``EXPORT_PREFIXES`` and the lines of
``.deepspeed_env`` files (``~`` then the current directory; ``$DS_ENV_FILE`` names another file). Values are
passed literally: they are quoted for the remote shell, never expanded there (DeepSpeed leaves ``$(...)``
and backticks to the remote shell).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping

from .errors import LaunchError

__all__ = [
    "EXPORT_PREFIXES",
    "ENV_FILE_NAME",
    "check_env_name",
    "parse_env_file_text",
    "read_env_files",
    "collect_exports",
    "worker_env",
]

ENV_FILE_NAME = ".deepspeed_env"
ENV_FILE_OVERRIDE = "DS_ENV_FILE"
# DeepSpeed: MLFLOW, PYTHON, MV2, UCX + NCCL for CUDA; we add the other libraries a training job is tuned with.
EXPORT_PREFIXES = ("NCCL_", "PYTHON", "UCX_", "CUDA_", "TORCH_", "OMP_", "MLFLOW", "MV2_", "FI_", "GLOO_", "HF_")
# Set per node or per worker by the launcher itself: never copied from the launching shell.
_NOT_EXPORTED = {"CUDA_VISIBLE_DEVICES", "PYTHONHOME", "PYTHON_EXEC"}
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def check_env_name(name: str, where: str = "environment variable") -> str:
    if not _NAME_RE.fullmatch(name):
        raise LaunchError(f"{where}: {name!r} is not a valid variable name ([A-Za-z_][A-Za-z0-9_]*)")
    return name


def check_env_value(name: str, value: str, where: str) -> str:
    if "\0" in value:
        raise LaunchError(f"{where}: the value of {name} contains a NUL byte")
    return value


def parse_env_file_text(text: str, source: str) -> dict[str, str]:
    """``KEY=VALUE`` lines (split at the first ``=``); blank lines and ``#`` comment lines skipped; an optional
    leading ``export ``; a value wholly in matching single or double quotes is unquoted. Nothing is expanded."""
    out: dict[str, str] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{source}:{lineno}"
        if line.startswith("export "):
            line = line[len("export "):].lstrip()
        name, sep, value = line.partition("=")
        if not sep:
            raise LaunchError(f"{where}: expected KEY=VALUE, got {raw.strip()!r}")
        name = name.strip()
        check_env_name(name, where)
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        out[name] = check_env_value(name, value, where)
    return out


def env_file_paths(environ: Mapping[str, str], cwd: str, home: str | None = None) -> list[str]:
    """The env files to read, later ones overriding earlier ones (DeepSpeed: ``~`` and ``.``)."""
    if environ.get(ENV_FILE_OVERRIDE):
        return [environ[ENV_FILE_OVERRIDE]]
    home = os.path.expanduser("~") if home is None else home
    paths = [os.path.join(home, ENV_FILE_NAME), os.path.join(cwd, ENV_FILE_NAME)]
    return list(dict.fromkeys(os.path.realpath(p) for p in paths))  # home == cwd: read once


def read_env_files(environ: Mapping[str, str], cwd: str, home: str | None = None) -> tuple[dict[str, str], list[str]]:
    """Variables from the env files that exist, and the files read. ``$DS_ENV_FILE`` must exist."""
    values: dict[str, str] = {}
    used = []
    for path in env_file_paths(environ, cwd, home):
        if not os.path.isfile(path):
            if environ.get(ENV_FILE_OVERRIDE):
                raise LaunchError(f"{ENV_FILE_OVERRIDE}={path!r}: no such file")
            continue
        try:
            with open(path, encoding="utf-8") as f:
                values.update(parse_env_file_text(f.read(), path))
        except OSError as e:
            raise LaunchError(f"cannot read env file {path!r}: {e.strerror}") from None
        used.append(path)
    return values, used


def collect_exports(environ: Mapping[str, str], cwd: str, file_values: dict[str, str]) -> dict[str, str]:
    """What the per-node agents set on remote nodes: prefixed variables, then env-file values (which win),
    with the launch directory first on ``PYTHONPATH`` (as DeepSpeed does)."""
    exports = {
        k: v for k, v in environ.items()
        if k.startswith(EXPORT_PREFIXES) and k not in _NOT_EXPORTED and not k.startswith("TORCHELASTIC_")
    }
    exports.update(file_values)
    for k, v in exports.items():
        check_env_name(k)
        check_env_value(k, v, "exported environment")
    exports["PYTHONPATH"] = os.pathsep.join([cwd] + ([exports["PYTHONPATH"]] if exports.get("PYTHONPATH") else []))
    return exports


def worker_env(
    base: Mapping[str, str],
    *,
    rank: int,
    local_rank: int,
    world_size: int,
    local_world_size: int,
    node_rank: int,
    num_nodes: int,
    master_addr: str,
    master_port: int,
    restart_count: int = 0,
    max_restarts: int = 0,
    run_id: str = "none",
    cuda_visible_devices: str | None = None,
) -> dict[str, str]:
    """The environment of one worker: ``base`` plus the launch variables (see the module docstring)."""
    env = dict(base)
    env.update({
        "RANK": str(rank),
        "LOCAL_RANK": str(local_rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(local_world_size),
        "GROUP_RANK": str(node_rank),
        "GROUP_WORLD_SIZE": str(num_nodes),
        "ROLE_RANK": str(rank),
        "ROLE_WORLD_SIZE": str(world_size),
        "ROLE_NAME": "default",
        "MASTER_ADDR": master_addr,
        "MASTER_PORT": str(master_port),
        "TORCHELASTIC_RESTART_COUNT": str(restart_count),
        "TORCHELASTIC_MAX_RESTARTS": str(max_restarts),
        "TORCHELASTIC_RUN_ID": run_id,
        # No agent-hosted TCPStore here: rank 0's init_process_group creates the store, as with env://.
        "TORCHELASTIC_USE_AGENT_STORE": "False",
        "PYTHON_EXEC": sys.executable,
        # DeepSpeed's per-node launcher
        "LOCAL_SIZE": str(local_world_size),
        "CROSS_RANK": str(node_rank),
        "CROSS_SIZE": str(num_nodes),
    })
    if local_world_size > 1 and "OMP_NUM_THREADS" not in base:
        env["OMP_NUM_THREADS"] = "1"  # torchrun's default: N workers x all cores would oversubscribe the node
    if cuda_visible_devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = cuda_visible_devices
    return env
