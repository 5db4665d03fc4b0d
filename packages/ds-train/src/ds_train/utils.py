"""DeepSpeed's ``deepspeed.utils`` names scripts use: ``logger``, ``log_dist``, ``print_json_dist``,
``RepeatingLoader``.

DeepSpeed's logger prints INFO and above to stdout with a timestamp and the caller's file and line, and scripts
rely on seeing ``log_dist(...)`` lines without configuring logging. :data:`logger` does the same: it is the
``ds_train.script`` logger with its own stdout handler at INFO and ``propagate=False``, so what a script logs
through it shows up as it does under DeepSpeed, while the suite's own loggers (``ds_train``, ``ds_zero``) stay
quiet unless the application configures logging. ``DS_TRAIN_LOG_LEVEL`` (a level name, e.g. ``WARNING``) sets
its level at import.
"""

from __future__ import annotations

import logging
import os
import sys

import torch.distributed as dist

from .data import RepeatingLoader

__all__ = ["logger", "log_dist", "print_json_dist", "RepeatingLoader"]

_FORMAT = "[%(asctime)s] [%(levelname)s] [%(filename)s:%(lineno)d:%(funcName)s] %(message)s"


def _make_logger() -> logging.Logger:
    log = logging.getLogger("ds_train.script")
    if not any(getattr(h, "_ds_train_handler", False) for h in log.handlers):  # once, also on re-import
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter(_FORMAT))
        handler._ds_train_handler = True  # type: ignore[attr-defined]
        log.addHandler(handler)
    level = os.environ.get("DS_TRAIN_LOG_LEVEL", "INFO").upper()
    if not isinstance(logging.getLevelName(level), int):  # a known name maps to its number (3.10 has no mapping API)
        raise ValueError(f"DS_TRAIN_LOG_LEVEL={level!r} is not a logging level name "
                         "(DEBUG, INFO, WARNING, ERROR, CRITICAL)")
    log.setLevel(level)
    log.propagate = False
    return log


#: DeepSpeed's ``deepspeed.utils.logger``
logger = _make_logger()


def _should_log(ranks) -> tuple[bool, int]:
    """DeepSpeed's rule: without torch.distributed everything is logged; with it, only the ranks listed
    (``[-1]``: every rank). ``ranks=None`` therefore logs nothing once a process group exists -- DeepSpeed's
    behaviour, kept so that scripts print what they printed there."""
    if not (dist.is_available() and dist.is_initialized()):
        return True, -1
    rank = dist.get_rank()
    ranks = list(ranks or [])
    return bool(ranks) and (ranks[0] == -1 or rank in ranks), rank


def log_dist(message: str, ranks=None, level: int = logging.INFO) -> None:
    """Log ``message`` on the ranks in ``ranks`` (``[-1]``: all), prefixed ``[Rank r]``, as DeepSpeed's
    ``log_dist``. See :func:`_should_log` for ``ranks=None``."""
    should, rank = _should_log(ranks)
    if should:
        logger.log(level, f"[Rank {rank}] {message}", stacklevel=2)


def print_json_dist(message: dict, ranks=None, path: str | None = None) -> None:
    """DeepSpeed's ``print_json_dist``: write ``message`` (a dict, with ``"rank"`` added) as JSON to ``path``
    on the ranks in ``ranks`` (same rule as :func:`log_dist`)."""
    import json

    if path is None:
        raise ValueError("print_json_dist: path is required (the file to write the JSON to)")
    should, rank = _should_log(ranks)
    if should:
        message = dict(message, rank=rank)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(message, f)
            f.flush()
            os.fsync(f.fileno())
