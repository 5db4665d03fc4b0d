"""The checks ``initialize`` (and the engine under it) makes of a config beyond its pydantic model, as one
function that both ``initialize`` and ``python -m ds_train.config`` call, so that the CLI never calls a config
valid that ``initialize`` then refuses.

They need what the model cannot know: the data-parallel world size (the batch-size triple, ZeRO++ hpZ groups),
and the optimizer the ``optimizer`` section builds (the 1-bit optimizers need stage 0 and refuse what their
compressed communication cannot do). Where the engine owns a rule (ds-zero's ``check_compressed``), the rule
is the engine's own function run on what the config says, not a copy of it, so the two cannot drift apart.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Callable

from ..optimizers import COMPRESSED_OPTIMIZERS, KNOWN_OPTIMIZERS, canonical_optimizer_name

__all__ = ["preflight_problems", "batch_problems"]


def batch_problems(cfg: Any, dp_world_size: int) -> list[str]:
    try:
        cfg.resolve_batch_sizes(dp_world_size)
    except ValueError as e:
        return [str(e)]
    return []


def _hpz(cfg: Any, dp_world_size: int) -> list[str]:
    # ds-zero's stage-3 set-up refuses this once the process group exists (same message)
    zero = cfg.zero_optimization
    hpz = zero.zero_hpz_partition_size
    if zero.stage == 3 and hpz > 1 and (dp_world_size % hpz or hpz > dp_world_size):
        return [f"zero_hpz_partition_size={hpz} must divide the data-parallel world size {dp_world_size}"]
    return []


def _compressed(cfg: Any, dp_world_size: int) -> list[str]:
    """1-bit Adam, 1-bit LAMB and 0/1 Adam from the ``optimizer`` section."""
    if cfg.optimizer is None:
        return []
    try:
        key = canonical_optimizer_name(cfg.optimizer.type)
    except ValueError:  # reported by the model already
        return []
    if key not in COMPRESSED_OPTIMIZERS:
        return []
    name = KNOWN_OPTIMIZERS[key]
    stage = cfg.zero_optimization.stage
    if stage != 0:
        # they communicate their own compressed momenta, which ZeRO cannot partition (DeepSpeed refuses it too);
        # the engine would say so too, in other words
        return [f"optimizer.type {name!r} needs zero_optimization.stage 0 (it communicates its own compressed "
                f"momenta and cannot be partitioned), got stage {stage}"]
    check = _engine_check()
    if check is None:
        return []
    from ds_comm.optim.config import DEEPSPEED_OPTIMIZERS

    import torch

    # the engine's rule reads the stage, the precision, the config and the optimizer's group: give it those,
    # as the engine will have them on this world size (the optimizer is built over the engine's group)
    engine = SimpleNamespace(stage=stage, config=cfg, dp_world_size=dp_world_size, dp_rank=0,
                             precision=SimpleNamespace(mixed=cfg.dtype != torch.float32))
    stand_in = type(DEEPSPEED_OPTIMIZERS[name].__name__, (), {})()
    stand_in.transport = SimpleNamespace(world_size=dp_world_size, rank=0)
    try:
        check(engine, stand_in)
    except ValueError as e:
        return [str(e)]
    except AttributeError:  # pragma: no cover - the engine's rule reads more than this stand-in has:
        return []  # the engine still checks it when it is built; test_config_errors pins the agreement
    return []


def _engine_check() -> Callable | None:
    try:
        from ds_zero.engine import check_compressed
    except ImportError:  # pragma: no cover - ds-zero renamed it; the engine still runs it itself
        return None
    return check_compressed


#: every check over the config as a whole, in report order
_CHECKS = (batch_problems, _hpz, _compressed)


def preflight_problems(cfg: Any, dp_world_size: int) -> list[str]:
    """The messages of every check ``initialize`` makes of ``cfg`` beyond its model, on ``dp_world_size``
    data-parallel ranks (empty: it passes them all)."""
    problems: list[str] = []
    for check in _CHECKS:
        problems.extend(check(cfg, dp_world_size))
    return problems
