"""The error raised when a distributed test or job fails, and its message."""

from __future__ import annotations

import re
import signal
import textwrap


class DistributedTestError(AssertionError):
    """A rank (or a subprocess job) failed.

    Subclasses AssertionError so pytest reports the test as failed, not errored.

    ``failures`` maps rank -> its outcome in one line, without the "rank N " prefix, e.g.
    ``{1: "raised ValueError: boom", 0: "terminated after rank 1 failed"}``.
    ``first_failed_rank`` is the rank whose failure came first (None when ranks only hung).
    ``results`` holds the per-rank return values, None where a rank failed.
    All three are empty/None for ``run_subprocess_job`` errors.
    """

    def __init__(
        self,
        message: str,
        failures: dict[int, str] | None = None,
        results: list | None = None,
        first_failed_rank: int | None = None,
    ):
        super().__init__(message)
        self.failures = dict(failures or {})
        self.results = list(results or [])
        self.first_failed_rank = first_failed_rank


DistributedTestError.__module__ = "harness"  # where tests import it from; shorter in pytest's report


def format_rank_failures(
    title: str, failures: dict[int, str], details: dict[int, str], first: int | None, reported: set[int]
) -> str:
    """The message: the first failure with its traceback, then the other failed ranks.

    Exceptions raised after the first failure are nearly always its echo
    ("connection closed by peer" from a collective), so they get one line
    each; deaths and hangs keep their stack dumps. Ranks that were killed
    because another failed come last.
    """

    def order(rank):
        return (rank != first, failures[rank].startswith("terminated after"), rank)

    lines = [title]
    for rank in sorted(failures, key=order):
        echo = first is not None and rank != first and rank in reported
        lines.append(f"rank {rank} {failures[rank]}" + (f" (after rank {first} failed)" if echo else ""))
        if not echo and details.get(rank, "").strip():
            lines.append(textwrap.indent(details[rank].rstrip(), "    "))
    return "\n".join(lines)


# Frames every rank has below the test's own: the harness and multiprocessing bootstrap.
_BOOTSTRAP_FRAME = re.compile(
    r'^\s*File "(.*[/\\]harness[/\\]_child\.py|.*[/\\]multiprocessing[/\\](process|spawn|forkserver)\.py|<string>)"'
)


def trim_stack_dump(dump: str) -> str:
    """A faulthandler dump without the bootstrap frames that every rank has."""
    return "\n".join(line for line in dump.splitlines() if not _BOOTSTRAP_FRAME.match(line))


def died_from(exitcode: int) -> str:
    """'died from signal SIGKILL (-9)' for a negative exit code."""
    try:
        name = signal.Signals(-exitcode).name
    except ValueError:
        name = str(-exitcode)
    return f"died from signal {name} ({exitcode})"


def tail(text: str, limit: int = 4000) -> str:
    """The last `limit` characters of `text`, marked as cut when they are."""
    return text if len(text) <= limit else f"[... {len(text) - limit} characters cut ...]\n" + text[-limit:]
