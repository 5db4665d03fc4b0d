"""Checkpoint file I/O: atomic commits, checksums, and loading that cannot execute code.

Durability protocol (each step's guarantee in brackets):

1. every file is written to ``NAME.tmp-<pid>``, flushed, ``fsync``-ed and ``os.replace``-d onto its name
   [a file under its final name is complete], then the directory is fsynced [the rename survives a crash];
2. after all ranks wrote (a collective), rank 0 writes the commit marker :data:`MARKER` the same way: world
   size, stage, and every file's size and sha256 [a tag directory is a checkpoint iff it has a marker];
3. only then ``latest`` is replaced, again write-temp-then-rename [``latest`` never names a half-written tag].

Loading verifies the marker and each file's size and sha256 before deserializing it, and deserializes with
``torch.load(weights_only=True)`` only: a checkpoint file is data, never code (a pickle with a ``__reduce__``
payload is refused by the unpickler, not executed).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any

import torch

MARKER = "ds_zero_commit.json"
LATEST = "latest"
FORMAT = "ds_zero"
VERSION = 1

_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupted or does not fit this run; the message names the file."""


def check_tag(tag: object, where: str = "tag") -> str:
    """Tags name a directory under the checkpoint root: no separators, no ``..``, nothing hidden."""
    if not isinstance(tag, str) or not _TAG_RE.match(tag) or ".." in tag:
        raise CheckpointError(
            f"invalid checkpoint {where} {tag!r}: use letters, digits, '_', '-' and '.', not starting with '.' "
            "or containing '..' or a path separator"
        )
    return tag


def model_file() -> str:
    return "mp_rank_00_model_states.pt"


def optim_file(rank: int) -> str:
    return f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"


def fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _atomic_write(path: str, write) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(os.path.dirname(path) or ".")


def atomic_torch_save(obj: Any, path: str) -> dict[str, Any]:
    """Write ``obj`` with ``torch.save`` atomically; return ``{"size", "sha256"}`` of the file."""
    _atomic_write(path, lambda f: torch.save(obj, f))
    return file_digest(path)


def atomic_write_text(path: str, text: str) -> None:
    _atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def file_digest(path: str) -> dict[str, Any]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
            size += len(block)
    return {"size": size, "sha256": h.hexdigest()}


def read_marker(ckpt_dir: str) -> dict[str, Any]:
    path = os.path.join(ckpt_dir, MARKER)
    if not os.path.isdir(ckpt_dir):
        raise CheckpointError(f"checkpoint directory {ckpt_dir} does not exist")
    if not os.path.exists(path):
        raise CheckpointError(
            f"{ckpt_dir} has no commit marker {MARKER}: the checkpoint is incomplete (a save that did not "
            "finish, or not a ds-zero checkpoint); refusing to load it"
        )
    try:
        with open(path, encoding="utf-8") as f:
            marker = json.load(f)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"commit marker {path} is unreadable or corrupted: {exc}") from None
    if not isinstance(marker, dict) or marker.get("format") != FORMAT or not isinstance(marker.get("files"), dict):
        raise CheckpointError(f"commit marker {path} is not a ds-zero marker (format {FORMAT!r} expected)")
    if marker.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {marker.get('version')!r}, this ds-zero reads "
                              f"version {VERSION}")
    return marker


def safe_load(ckpt_dir: str, name: str, marker: dict[str, Any]) -> Any:
    """Verify ``name`` against the marker (present, size, sha256), then ``torch.load(weights_only=True)``."""
    path = os.path.join(ckpt_dir, name)
    expected = marker["files"].get(name)
    if expected is None:
        raise CheckpointError(f"{path} is not listed in the commit marker {MARKER} (was the checkpoint saved with "
                              f"another world size? it has {marker.get('dp_world_size')} ranks)")
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint file {path} is missing")
    size = os.path.getsize(path)
    if size != expected["size"]:
        raise CheckpointError(f"checkpoint file {path} is truncated or was modified: {size} bytes, the marker "
                              f"recorded {expected['size']}")
    digest = file_digest(path)["sha256"]
    if digest != expected["sha256"]:
        raise CheckpointError(f"checkpoint file {path} is corrupted: sha256 {digest} does not match the marker's "
                              f"{expected['sha256']}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for code, RuntimeError for a damaged zip, ...
        raise CheckpointError(
            f"checkpoint file {path} cannot be loaded as plain data with torch.load(weights_only=True) "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); ds-zero never unpickles code"
        ) from None


def resolve_tag(load_dir: str, tag: str | None) -> str:
    if tag is not None:
        return check_tag(tag)
    path = os.path.join(load_dir, LATEST)
    if not os.path.exists(path):
        raise CheckpointError(
            f"no {LATEST!r} file in {load_dir}: nothing says which checkpoint to load (pass tag=..., or check "
            "the directory); refusing to start from scratch silently"
        )
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read().strip()
    except UnicodeDecodeError:
        raise CheckpointError(f"{path} is not a UTF-8 text file naming a checkpoint tag (corrupted?); pass "
                              "tag=... or rewrite the file") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None
    return check_tag(text, where=f"tag in {path}")


def remove_stale_temporaries(directory: str, names: list[str]) -> None:
    """Delete ``NAME.tmp-*`` leftovers of ``names`` in ``directory`` (a process killed inside ``_atomic_write``
    leaves its temporary behind; nothing ever reads one). Each rank removes only its own files' temporaries, so
    ranks never race on one."""
    try:
        entries = os.listdir(directory)
    except OSError:
        return
    prefixes = tuple(f"{name}.tmp-" for name in names)
    for entry in entries:
        if entry.startswith(prefixes):
            try:
                os.unlink(os.path.join(directory, entry))
            except OSError:
                pass


def remove_files(directory: str, names: list[str]) -> None:
    """Best-effort removal of files (a failed save's uncommitted output, so it does not keep filling a disk)."""
    for name in names:
        try:
            os.unlink(os.path.join(directory, name))
        except OSError:
            pass


def write_marker(ckpt_dir: str, marker: dict[str, Any]) -> None:
    atomic_write_text(os.path.join(ckpt_dir, MARKER), json.dumps(marker, indent=1, sort_keys=True))
