"""DeepSpeed's learning-rate schedules as ``torch.optim.lr_scheduler.LRScheduler`` subclasses.

Every schedule here is a closed-form function of one integer, the step index ``k`` (torch's ``last_epoch``,
also readable as ``last_batch_iteration``): ``get_lr()`` evaluates the formula at ``k`` and nothing else, so
the lrs depend only on the hyper-parameters and the step count. That is what makes resuming exact: a
``state_dict()`` holds ``k`` and the hyper-parameters, and ``load_state_dict()`` re-applies the lrs (and the
momentum of :class:`OneCycle`) for that ``k`` to the optimizer.

Step convention (torch's): constructing a scheduler sets every group's lr to ``f(0)``; each
``scheduler.step()``, called once after each ``optimizer.step()``, advances ``k`` by one and sets ``f(k)``.
So optimizer step ``k`` (0-based) runs with ``f(k)``. Relative to DeepSpeed:

- ``WarmupLR``, ``WarmupDecayLR``, ``WarmupCosineLR``: ``f(k)`` is DeepSpeed's formula at
  ``last_batch_iteration = k``. (DeepSpeed's own classes leave the optimizer's lr untouched until their first
  ``step()``, so DeepSpeed runs this same sequence one optimizer step later.)
- ``OneCycle``, ``LRRangeTest``: DeepSpeed sets the starting lr at construction and its formulas read
  ``last_batch_iteration + 1``; ``f(k)`` is exactly the lr DeepSpeed uses for optimizer step ``k``.

The schedules work with any ``torch.optim.Optimizer`` and any number of parameter groups. Learning-rate
arguments take one number (every group) or a list with one number per group. JSON configs of the form
``"scheduler": {"type": T, "params": {...}}`` go through :func:`build_scheduler`, which rejects unknown types
and parameter names with a "did you mean".
"""

from __future__ import annotations

import difflib
import inspect
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, TypeGuard

from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

__all__ = [
    "SCHEDULERS",
    "LRRangeTest",
    "OneCycle",
    "WarmupCosineLR",
    "WarmupDecayLR",
    "WarmupLR",
    "build_scheduler",
]

WARMUP_TYPES = ("log", "linear")


# ---------------------------------------------------------------------------------------------------------
# argument checks: every error names the parameter and says what it got


def _is_number(value: object) -> TypeGuard[int | float]:
    # bool is an int subclass; True as a learning rate is a config mistake, not 1.0
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_number(value: object, name: str, *, low: float | None = None, high: float | None = None) -> float:
    if not _is_number(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value!r}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value!r}")
    return float(value)


def _check_int(value: object, name: str, *, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < low:
        what = "a positive int" if low == 1 else f"an int >= {low}"
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return value


def _check_bool(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def _per_group(
    value: object, optimizer: Optimizer, name: str, *, low: float | None = 0.0, high: float | None = None
) -> list[float]:
    """One number for every group, or a list/tuple with exactly one number per group."""
    n = len(optimizer.param_groups)
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} values but the optimizer has {n} param groups")
        return [_check_number(v, f"{name}[{i}]", low=low, high=high) for i, v in enumerate(value)]
    return [_check_number(value, name, low=low, high=high)] * n


def _initial_lrs(optimizer: Optimizer) -> list[float]:
    """Each group's starting lr, recorded as torch does (``initial_lr``) so that torch's base class accepts a
    resumed ``last_epoch`` and ``base_lrs`` means the same as for torch's own schedulers."""
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    lrs = []
    for group in optimizer.param_groups:
        lr = group["lr"]
        group.setdefault("initial_lr", lr.clone() if isinstance(lr, Tensor) else lr)
        lrs.append(float(group["initial_lr"]))
    return lrs


def _start_index(last_batch_iteration: int, last_epoch: int | None) -> int:
    """DeepSpeed's ``last_batch_iteration`` and torch's ``last_epoch`` name the same thing; accept either."""
    if last_epoch is not None and last_batch_iteration != -1 and last_epoch != last_batch_iteration:
        raise ValueError(
            f"last_batch_iteration={last_batch_iteration!r} and last_epoch={last_epoch!r} disagree; "
            "they are aliases, pass one of them"
        )
    start = last_batch_iteration if last_epoch is None else last_epoch
    return _check_int(start, "last_batch_iteration", low=-1)


def _warmup_fraction(step: int, warmup_num_steps: int, warmup_type: str) -> float:
    """0 at step 0 rising to 1 at the end of warmup: log(step+1)/log(n) ("log", reaching 1 at step n-1) or
    step/n ("linear", reaching 1 at step n); 1 from step n on.

    DeepSpeed clamps n to at least 2 (so that log(n) > 0); here n = 1 simply means one step at the minimum,
    and step 0 returns 0 directly, which avoids the 0/0 the log form would give.
    """
    if step >= warmup_num_steps:
        return 1.0
    if step <= 0:
        return 0.0
    if warmup_type == "log":
        return math.log(step + 1) / math.log(warmup_num_steps)
    return step / warmup_num_steps


def _set_group_lr(group: dict, lr: float) -> None:
    # a Tensor lr (capturable / fused optimizers) is updated in place, as torch's schedulers do
    if isinstance(group["lr"], Tensor):
        group["lr"].fill_(lr)
    else:
        group["lr"] = lr


def _momentum_kind(group: Mapping) -> str | None:
    """Which knob is "momentum" for this group: Adam-style ``betas[0]`` or SGD/RMSprop-style ``momentum``."""
    if "betas" in group:
        return "betas"
    if "momentum" in group:
        return "momentum"
    return None


def _set_group_momentum(group: dict, value: float) -> None:
    if _momentum_kind(group) == "betas":
        beta1, *rest = group["betas"]
        if isinstance(beta1, Tensor):
            beta1.fill_(value)
        else:
            group["betas"] = (value, *rest)  # keeps the group's own beta2
    else:
        group["momentum"] = value


# ---------------------------------------------------------------------------------------------------------


class _ClosedFormSchedule(LRScheduler):
    """Base: subclasses set their hyper-parameters, then call this ``__init__``, and implement ``_lrs_at(k)``
    (and ``_momenta_at(k)`` if they drive momentum)."""

    def __init__(self, optimizer: Optimizer, last_batch_iteration: int, last_epoch: int | None) -> None:
        start = _start_index(last_batch_iteration, last_epoch)
        super().__init__(optimizer, last_epoch=start)  # runs step() once: k becomes start + 1

    @property
    def last_batch_iteration(self) -> int:
        """DeepSpeed's name for the step index (torch's ``last_epoch``)."""
        return self.last_epoch

    def _lrs_at(self, step: int) -> list[float]:
        raise NotImplementedError

    def _momenta_at(self, step: int) -> list[float] | None:
        return None

    def get_lr(self) -> list[float | Tensor]:
        """The lrs at the current step index (a pure function of it; safe to call any time)."""
        # a new list of the element type torch's base class declares (list is invariant: list[float] is not one)
        return list(self._lrs_at(self.last_epoch))

    def step(self, last_batch_iteration: int | None = None) -> None:
        """Advance one step, or jump to step ``last_batch_iteration`` (DeepSpeed's optional argument)."""
        if last_batch_iteration is not None:
            # torch's step(epoch) path is deprecated and warns; the formulas are closed-form, so jumping is
            # just setting the index one short and taking an ordinary step
            self.last_epoch = _check_int(last_batch_iteration, "last_batch_iteration", low=0) - 1
        super().step()
        self._apply_momenta()

    def _apply_momenta(self) -> None:
        momenta = self._momenta_at(self.last_epoch)
        if momenta is not None:
            for group, value in zip(self.optimizer.param_groups, momenta):
                _set_group_momentum(group, value)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the step index and hyper-parameters, and put the matching lrs (and momenta) into the
        optimizer, so resuming gives the same values whether or not the optimizer's own state is loaded."""
        super().load_state_dict(state_dict)
        lrs = self._lrs_at(self.last_epoch)
        for group, lr in zip(self.optimizer.param_groups, lrs):
            _set_group_lr(group, lr)
        self._last_lr = [
            g["lr"].clone() if isinstance(g["lr"], Tensor) else g["lr"] for g in self.optimizer.param_groups
        ]
        self._apply_momenta()


class WarmupLR(_ClosedFormSchedule):
    """Warm each group's lr up from ``warmup_min_lr`` to ``warmup_max_lr`` over ``warmup_num_steps`` steps,
    then hold it.

    ``lr(k) = min + (max - min) * w(k)`` with ``w(k) = log(k + 1) / log(warmup_num_steps)`` for
    ``warmup_type="log"`` (a fast start) or ``k / warmup_num_steps`` for ``"linear"``, and ``w(k) = 1`` from
    ``k = warmup_num_steps`` on. ``warmup_max_lr=None`` warms each group up to its own lr (the one it had when
    the scheduler was created). Both bounds take one number or one per param group.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_min_lr: float | Sequence[float] = 0.0,
        warmup_max_lr: float | Sequence[float] | None = None,
        warmup_num_steps: int = 1000,
        warmup_type: str = "log",
        last_batch_iteration: int = -1,
        *,
        last_epoch: int | None = None,
    ) -> None:
        bases = _initial_lrs(optimizer)
        self.min_lrs = _per_group(warmup_min_lr, optimizer, "warmup_min_lr")
        self.max_lrs = bases if warmup_max_lr is None else _per_group(warmup_max_lr, optimizer, "warmup_max_lr")
        self.warmup_num_steps = _check_int(warmup_num_steps, "warmup_num_steps", low=1)
        if warmup_type not in WARMUP_TYPES:
            raise ValueError(f"warmup_type must be one of {WARMUP_TYPES}, got {warmup_type!r}")
        self.warmup_type = warmup_type
        super().__init__(optimizer, last_batch_iteration, last_epoch)

    def _gamma(self, step: int) -> float:
        return _warmup_fraction(step, self.warmup_num_steps, self.warmup_type)

    def _lrs_at(self, step: int) -> list[float]:
        gamma = self._gamma(step)
        return [lo + (hi - lo) * gamma for lo, hi in zip(self.min_lrs, self.max_lrs)]


class WarmupDecayLR(WarmupLR):
    """:class:`WarmupLR`, then a linear decay that reaches ``warmup_min_lr`` (0 by default) at
    ``total_num_steps`` and stays there.

    After warmup ``lr(k) = min + (max - min) * max(0, (total_num_steps - k) / (total_num_steps -
    warmup_num_steps))``: the full ``max`` at ``k = warmup_num_steps``, ``min`` at ``k = total_num_steps``.
    ``warmup_max_lr`` defaults to 0.001 as in DeepSpeed; pass ``None`` to use each group's own lr.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        total_num_steps: int,
        warmup_min_lr: float | Sequence[float] = 0.0,
        warmup_max_lr: float | Sequence[float] | None = 0.001,
        warmup_num_steps: int = 1000,
        warmup_type: str = "log",
        last_batch_iteration: int = -1,
        *,
        last_epoch: int | None = None,
    ) -> None:
        self.total_num_steps = _check_int(total_num_steps, "total_num_steps", low=1)
        _check_total_after_warmup(total_num_steps, warmup_num_steps)
        super().__init__(
            optimizer,
            warmup_min_lr,
            warmup_max_lr,
            warmup_num_steps,
            warmup_type,
            last_batch_iteration,
            last_epoch=last_epoch,
        )

    def _gamma(self, step: int) -> float:
        if step < self.warmup_num_steps:
            return super()._gamma(step)
        return max(0.0, (self.total_num_steps - step) / (self.total_num_steps - self.warmup_num_steps))


def _check_total_after_warmup(total_num_steps: int, warmup_num_steps: object) -> None:
    # DeepSpeed only warns here; a decay phase of length <= 0 is always a config mistake
    if (
        isinstance(warmup_num_steps, int)
        and not isinstance(warmup_num_steps, bool)
        and total_num_steps <= warmup_num_steps
    ):
        raise ValueError(
            f"total_num_steps ({total_num_steps}) must be greater than warmup_num_steps ({warmup_num_steps})"
        )


class WarmupCosineLR(_ClosedFormSchedule):
    """Scale each group's own lr by a ratio that warms up from ``warmup_min_ratio`` to 1 over
    ``warmup_num_steps`` steps (log or linear, as :class:`WarmupLR`), then follows a half cosine down to
    ``cos_min_ratio`` at step ``total_num_steps - 1`` and stays there.

    After warmup, with ``p = min(1, (k - warmup_num_steps + 1) / (total_num_steps - warmup_num_steps))``:
    ``ratio = cos_min_ratio + (1 - cos_min_ratio) * (1 + cos(pi * p)) / 2``. The ``+ 1`` is DeepSpeed's (its
    first post-warmup step is already one step into the cosine); the clamp of ``p`` at 1 is ours: DeepSpeed's
    cosine turns back up after ``total_num_steps``.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        total_num_steps: int,
        warmup_min_ratio: float = 0.0,
        warmup_num_steps: int = 1000,
        cos_min_ratio: float = 0.0001,
        warmup_type: str = "log",
        last_batch_iteration: int = -1,
        *,
        last_epoch: int | None = None,
    ) -> None:
        self.peak_lrs = _initial_lrs(optimizer)
        self.total_num_steps = _check_int(total_num_steps, "total_num_steps", low=1)
        self.warmup_num_steps = _check_int(warmup_num_steps, "warmup_num_steps", low=1)
        _check_total_after_warmup(total_num_steps, warmup_num_steps)
        self.warmup_min_ratio = _check_number(warmup_min_ratio, "warmup_min_ratio", low=0.0, high=1.0)
        self.cos_min_ratio = _check_number(cos_min_ratio, "cos_min_ratio", low=0.0, high=1.0)
        if warmup_type not in WARMUP_TYPES:
            raise ValueError(f"warmup_type must be one of {WARMUP_TYPES}, got {warmup_type!r}")
        self.warmup_type = warmup_type
        super().__init__(optimizer, last_batch_iteration, last_epoch)

    def lr_ratio(self, step: int | None = None) -> float:
        """The multiplier applied to every group's lr at ``step`` (default: the current step)."""
        step = self.last_epoch if step is None else step
        if step < self.warmup_num_steps:
            w = _warmup_fraction(step, self.warmup_num_steps, self.warmup_type)
            return self.warmup_min_ratio + (1.0 - self.warmup_min_ratio) * w
        progress = min(1.0, (step - self.warmup_num_steps + 1) / (self.total_num_steps - self.warmup_num_steps))
        return self.cos_min_ratio + (1.0 - self.cos_min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def _lrs_at(self, step: int) -> list[float]:
        ratio = self.lr_ratio(step)
        return [peak * ratio for peak in self.peak_lrs]


class OneCycle(_ClosedFormSchedule):
    """One triangular lr cycle (Smith's 1cycle policy), then an optional decay; momentum moves the other way.

    Cycle (``k <= first + second``, with ``first = cycle_first_step_size``, ``second =
    cycle_second_step_size``, which defaults to ``first``): a scale ``s`` rises linearly 0 -> 1 over the first
    ``first`` steps and falls 1 -> 0 over the next ``second``; ``lr = cycle_min_lr + (cycle_max_lr -
    cycle_min_lr) * s`` and, with ``cycle_momentum``, ``momentum = cycle_max_mom - (cycle_max_mom -
    cycle_min_mom) * s`` (high momentum while the lr is low).

    Staircase: ``cycle_first_stair_count = c > 0`` quantises the rising half into ``c`` equal stairs
    (``s = floor(c * k / first) / c``, so ``s`` still reaches 1 at the peak); ``cycle_second_stair_count`` does
    the same for the falling half and defaults to the first count. (DeepSpeed accepts both counts but ignores
    them; 0 keeps the continuous ramp there and here.)

    Decay (``k > first + second``, ``i = k - first - second``): ``lr = cycle_min_lr / (1 + decay_lr_rate * i /
    decay_step_size)`` and ``momentum = cycle_max_mom * (1 + decay_mom_rate * i / decay_step_size)``, as in
    DeepSpeed (continuous in ``i``; note the momentum formula *grows* for a positive rate). With
    ``decay_step_size == 0`` or a zero rate, lr stays at ``cycle_min_lr`` and momentum at ``cycle_max_mom``.

    Momentum is ``betas[0]`` for Adam-style groups (beta2 kept) and ``momentum`` for SGD/RMSprop-style
    groups. With an optimizer that has neither, ``cycle_momentum`` is turned off with a warning, as DeepSpeed
    does.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        cycle_min_lr: float | Sequence[float],
        cycle_max_lr: float | Sequence[float],
        decay_lr_rate: float = 0.0,
        cycle_first_step_size: int = 2000,
        cycle_second_step_size: int | None = None,
        cycle_first_stair_count: int = 0,
        cycle_second_stair_count: int | None = None,
        decay_step_size: int = 0,
        cycle_momentum: bool = True,
        cycle_min_mom: float | Sequence[float] = 0.8,
        cycle_max_mom: float | Sequence[float] = 0.9,
        decay_mom_rate: float = 0.0,
        last_batch_iteration: int = -1,
        *,
        last_epoch: int | None = None,
    ) -> None:
        _initial_lrs(optimizer)
        self.min_lrs = _per_group(cycle_min_lr, optimizer, "cycle_min_lr")
        self.max_lrs = _per_group(cycle_max_lr, optimizer, "cycle_max_lr")
        self.decay_lr_rate = _check_number(decay_lr_rate, "decay_lr_rate", low=0.0)
        self.first_step_size = _check_int(cycle_first_step_size, "cycle_first_step_size", low=1)
        self.second_step_size = (
            self.first_step_size
            if cycle_second_step_size is None
            else _check_int(cycle_second_step_size, "cycle_second_step_size", low=1)
        )
        self.total_size = self.first_step_size + self.second_step_size
        self.first_stair_count = _check_int(cycle_first_stair_count, "cycle_first_stair_count", low=0)
        self.second_stair_count = (
            self.first_stair_count
            if cycle_second_stair_count is None
            else _check_int(cycle_second_stair_count, "cycle_second_stair_count", low=0)
        )
        self.decay_step_size = _check_int(decay_step_size, "decay_step_size", low=0)
        self.cycle_momentum = _check_bool(cycle_momentum, "cycle_momentum")
        self.min_moms = _per_group(cycle_min_mom, optimizer, "cycle_min_mom", high=1.0)
        self.max_moms = _per_group(cycle_max_mom, optimizer, "cycle_max_mom", high=1.0)
        self.decay_mom_rate = _check_number(decay_mom_rate, "decay_mom_rate", low=0.0)
        if self.cycle_momentum:
            lacking = [i for i, g in enumerate(optimizer.param_groups) if _momentum_kind(g) is None]
            if lacking:
                warnings.warn(
                    f"OneCycle: cycle_momentum turned off: {type(optimizer).__name__} param groups {lacking} have "
                    "neither 'betas' nor 'momentum'",
                    stacklevel=2,
                )
                self.cycle_momentum = False
        super().__init__(optimizer, last_batch_iteration, last_epoch)

    def _scale(self, step: int) -> float:
        """0 -> 1 -> 0 over the cycle (integer arithmetic for the stairs, so boundaries are exact)."""
        if step <= self.first_step_size:
            if self.first_stair_count:
                return (step * self.first_stair_count // self.first_step_size) / self.first_stair_count
            return step / self.first_step_size
        down = step - self.first_step_size
        if self.second_stair_count:
            return 1.0 - (down * self.second_stair_count // self.second_step_size) / self.second_stair_count
        return 1.0 - down / self.second_step_size

    def _decay_interval(self, step: int) -> float:
        return (step - self.total_size) / self.decay_step_size

    def _lrs_at(self, step: int) -> list[float]:
        if step <= self.total_size:
            s = self._scale(step)
            return [lo + (hi - lo) * s for lo, hi in zip(self.min_lrs, self.max_lrs)]
        if self.decay_step_size == 0 or self.decay_lr_rate == 0:
            return list(self.min_lrs)
        factor = 1.0 + self.decay_lr_rate * self._decay_interval(step)
        return [lo / factor for lo in self.min_lrs]

    def _momenta_at(self, step: int) -> list[float] | None:
        if not self.cycle_momentum:
            return None
        if step <= self.total_size:
            s = self._scale(step)
            return [hi - (hi - lo) * s for lo, hi in zip(self.min_moms, self.max_moms)]
        if self.decay_step_size == 0 or self.decay_mom_rate == 0:
            return list(self.max_moms)
        factor = 1.0 + self.decay_mom_rate * self._decay_interval(step)
        return [hi * factor for hi in self.max_moms]


class LRRangeTest(_ClosedFormSchedule):
    """The lr range test: grow the lr from ``lr_range_test_min_lr`` to find where training diverges.

    ``lr(k) = lr_range_test_min_lr * (1 + lr_range_test_step_rate * x)`` with ``x = k /
    lr_range_test_step_size`` (continuous) or ``floor(k / lr_range_test_step_size)`` (staircase).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        lr_range_test_min_lr: float | Sequence[float] = 1e-3,
        lr_range_test_step_size: int = 2000,
        lr_range_test_step_rate: float = 1.0,
        lr_range_test_staircase: bool = False,
        last_batch_iteration: int = -1,
        *,
        last_epoch: int | None = None,
    ) -> None:
        _initial_lrs(optimizer)
        self.min_lrs = _per_group(lr_range_test_min_lr, optimizer, "lr_range_test_min_lr")
        self.step_size = _check_int(lr_range_test_step_size, "lr_range_test_step_size", low=1)
        self.step_rate = _check_number(lr_range_test_step_rate, "lr_range_test_step_rate", low=0.0)
        self.staircase = _check_bool(lr_range_test_staircase, "lr_range_test_staircase")
        super().__init__(optimizer, last_batch_iteration, last_epoch)

    def _lrs_at(self, step: int) -> list[float]:
        interval = step // self.step_size if self.staircase else step / self.step_size
        growth = 1.0 + self.step_rate * interval
        return [lo * growth for lo in self.min_lrs]


# ---------------------------------------------------------------------------------------------------------
# registry: DeepSpeed JSON "scheduler": {"type": name, "params": {...}}

SCHEDULERS: dict[str, type[LRScheduler]] = {
    "LRRangeTest": LRRangeTest,
    "OneCycle": OneCycle,
    "WarmupLR": WarmupLR,
    "WarmupDecayLR": WarmupDecayLR,
    "WarmupCosineLR": WarmupCosineLR,
}


def _did_you_mean(word: str, choices: Sequence[str]) -> str:
    # compare case-insensitively ("warmuplr" should find "WarmupLR"), report the real spelling
    by_lower = {c.lower(): c for c in choices}
    close = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=0.6)
    return f"; did you mean {by_lower[close[0]]!r}?" if close else ""


def build_scheduler(name: str, optimizer: Optimizer, params: Mapping[str, Any] | None = None) -> LRScheduler:
    """Create the scheduler DeepSpeed's config names: ``SCHEDULERS[name](optimizer, **params)``.

    Unknown names and unknown or missing parameter keys raise ``ValueError`` before anything is built,
    suggesting the closest known spelling; hyper-parameter values are then checked by the class itself.
    """
    if name not in SCHEDULERS:
        raise ValueError(
            f"unknown scheduler type {name!r}{_did_you_mean(str(name), list(SCHEDULERS))} "
            f"(known: {', '.join(SCHEDULERS)})"
        )
    cls = SCHEDULERS[name]
    params = {} if params is None else params
    if not isinstance(params, Mapping):
        raise ValueError(f"scheduler params must be a dict, got {type(params).__name__}")
    signature = inspect.signature(cls.__init__).parameters
    accepted = [p for p in signature if p not in ("self", "optimizer")]
    for key in params:
        if key not in accepted:
            raise ValueError(
                f"unknown parameter {key!r} for scheduler {name}{_did_you_mean(str(key), accepted)} "
                f"(accepted: {', '.join(accepted)})"
            )
    missing = [p for p in accepted if signature[p].default is inspect.Parameter.empty and p not in params]
    if missing:
        raise ValueError(f"scheduler {name} needs parameter(s) {', '.join(map(repr, missing))}")
    return cls(optimizer, **params)
