"""The error raised when a distributed test or job fails, and its message."""

from __future__ import annotations

import textwrap


class DistributedTestError(AssertionError):
    """A rank (or a subprocess job) failed.

    Subclasses AssertionError so pytest reports the test as failed, not errored.

    ``failures`` maps rank -> one-line outcome without the "rank N " prefix,
    e.g. ``{1: "raised ValueError: boom", 0: "terminated after rank 1 failed"}``.
    ``results`` holds the per-rank return values, None where a rank failed.
    Both are empty for ``run_subprocess_job`` errors.
    """

    def __init__(self, message: str, failures: dict[int, str] | None = None, results: list | None = None):
        super().__init__(message)
        self.failures = dict(failures or {})
        self.results = list(results or [])


def format_rank_failures(title: str, failures: dict[int, str], details: dict[int, str]) -> str:
    """Message listing each failing rank, with its traceback or stack indented below it.

    Ranks that were merely terminated because another rank failed come last,
    one line each: they are collateral, not the cause.
    """
    collateral = {r for r, text in failures.items() if text.startswith("terminated after")}
    lines = [title]
    for rank in sorted(failures, key=lambda r: (r in collateral, r)):
        lines.append(f"rank {rank} {failures[rank]}")
        if details.get(rank, "").strip():
            lines.append(textwrap.indent(details[rank].rstrip(), "    "))
    return "\n".join(lines)


def tail(text: str, limit: int = 4000) -> str:
    """The last `limit` characters of `text`, marked as cut when they are."""
    return text if len(text) <= limit else f"[... {len(text) - limit} characters cut ...]\n" + text[-limit:]
