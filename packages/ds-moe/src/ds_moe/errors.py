"""The one error type of ds-moe: every bad argument or input raises ``MoEError`` naming what is at fault."""

from __future__ import annotations


class MoEError(ValueError):
    """A bad MoE argument, process-group layout or input; the message names the argument and its value."""
