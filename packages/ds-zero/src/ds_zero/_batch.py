"""The batch-size triple: ``train_batch_size = micro_batch * gradient_accumulation_steps * dp_world_size``.

DeepSpeed's rules (``runtime/config.py``): any two of the three determine the third; only
``train_batch_size`` gives ``gradient_accumulation_steps = 1``; only the micro batch gives
``gradient_accumulation_steps = 1`` too; with neither the batch size is unknown. An inconsistent triple is an
error here (DeepSpeed uses a bare ``assert``, which ``python -O`` removes).
"""

from __future__ import annotations


def _check_positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def resolve_batch_sizes(
    train_batch_size: int | None,
    micro_batch: int | None,
    grad_accum: int | None,
    dp_world_size: int,
) -> tuple[int, int, int]:
    """Return ``(train_batch_size, train_micro_batch_size_per_gpu, gradient_accumulation_steps)``."""
    _check_positive_int(dp_world_size, "dp_world_size")
    for value, name in ((train_batch_size, "train_batch_size"), (micro_batch, "train_micro_batch_size_per_gpu"),
                        (grad_accum, "gradient_accumulation_steps")):
        if value is not None:
            _check_positive_int(value, name)
    given = (f"train_batch_size={train_batch_size}, train_micro_batch_size_per_gpu={micro_batch}, "
             f"gradient_accumulation_steps={grad_accum}, data-parallel world size={dp_world_size}")

    def divide(total: int, by: int, what: str) -> int:
        if total % by:
            raise ValueError(
                f"inconsistent batch sizes ({given}): train_batch_size={total} is not divisible by {by}, so "
                f"{what} would not be a whole number; train_batch_size must equal micro batch * "
                "gradient_accumulation_steps * data-parallel world size"
            )
        return total // by

    tb, mb, ga = train_batch_size, micro_batch, grad_accum
    if tb is not None and mb is not None and ga is not None:
        if tb != mb * ga * dp_world_size:
            raise ValueError(
                f"inconsistent batch sizes: train_batch_size={tb} != train_micro_batch_size_per_gpu={mb} * "
                f"gradient_accumulation_steps={ga} * data-parallel world size={dp_world_size} "
                f"(= {mb * ga * dp_world_size})"
            )
    elif tb is not None and mb is not None:
        ga = divide(tb, mb * dp_world_size, "gradient_accumulation_steps")
    elif tb is not None and ga is not None:
        mb = divide(tb, ga * dp_world_size, "train_micro_batch_size_per_gpu")
    elif mb is not None and ga is not None:
        tb = mb * ga * dp_world_size
    elif tb is not None:
        ga = 1
        mb = divide(tb, dp_world_size, "train_micro_batch_size_per_gpu")
    elif mb is not None:
        ga = 1
        tb = mb * dp_world_size
    else:
        raise ValueError(
            f"cannot determine the batch size ({given}): set train_batch_size or "
            "train_micro_batch_size_per_gpu (gradient_accumulation_steps alone is not enough)"
        )
    return tb, mb, ga
