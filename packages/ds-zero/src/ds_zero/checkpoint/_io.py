"""Checkpoint file I/O: atomic commits, checksums, and loading that cannot execute code."""

from __future__ import annotations


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupted or does not fit this run; the message names the file."""
