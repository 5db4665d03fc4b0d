"""What the communication-efficient optimizers share: flat buckets, the DDP hook that switches DDP's
full-precision gradient all-reduce on and off, one 1-bit collective per bucket, the automatic mask for
elements that never see a gradient, and per-rank checkpoints.

How an optimizer and DDP cooperate: DDP keeps running its backward hooks, but with
:meth:`CompressedOptimizer.register_ddp` it calls our comm hook, which all-reduces a bucket only when the
optimizer says this step needs averaged gradients (1-bit Adam's warm-up, 0/1 Adam's variance steps) and
otherwise returns the *local* gradients untouched; the optimizer then communicates compressed momenta (or
gradients) itself, one 1-bit allreduce per flat bucket. A training engine that reduces gradients itself (ds-zero's)
does the same gating without DDP: it asks :meth:`~CompressedOptimizer.needs_grad_allreduce` before each gradient
reduction and declares so with :meth:`~CompressedOptimizer.attach_engine`. An optimizer that has neither warns once
when compression starts on several ranks (a plain DDP script that forgot ``register_ddp`` still all-reduces every
gradient in full precision: correct, but no bandwidth saved).

Never-touched elements: an element whose gradient is exactly zero on every rank (an embedding row no batch
has used) has zero momentum, but 1 bit cannot send a zero, so its compressed momentum would be ``±scale`` and
its error feedback would churn forever. The optimizers keep a mask of elements whose momentum was exactly zero
when compression started (momenta are identical on all ranks then) and zero those elements' momenta and
residuals after every compressed call. An element that later gets a non-zero gradient on any rank is unmasked
for everyone (a 4-byte all-reduce per step detects it; a one-off all-reduce of the squared local values of the
masked elements follows, so the optimizer can seed the statistics the element never had -- 1-bit Adam's frozen
variance would otherwise be zero there and the first update enormous). Users do not pass DeepSpeed's
``exp_avg_mask``.

Preconditioned compression: 1-bit compression sends every element of a chunk as ``±scale``, one scale per
chunk. Adam then divides each element by its own ``sqrt(v_hat)``, so an element whose variance is small next to
the chunk's typical magnitude (a rarely seen embedding row beside dense weights) turns the compression error
into an enormous step: on a 2-rank character model such elements moved by 20-100 per step with ``lr = 2e-3``, and
0/1 Adam diverged. The optimizers therefore compress ``x / d`` with Adam's denominator ``d = sqrt(v_hat) + eps``
(the same on every rank, so the average is unchanged: ``mean(x_r / d) * d == mean(x_r)``) and multiply back;
the compression error is then in units of the update itself, about ``lr`` for every element. The residuals are
kept in those units (rescaled when ``d`` changes, see :meth:`OnebitErrorFeedback.rescale_`).
``preconditioned_compression=False`` gives DeepSpeed's compression of the raw momenta or gradients.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from ..error_feedback import OnebitErrorFeedback
from ..onebit import KernelBackendName, compressed_allreduce
from ..stats import CommStats
from ..transport import Transport, resolve_transport
from ._flat import FlatBucket

logger = logging.getLogger("ds_comm")

_STATE_VERSION = 1


class CompressedOptimizer(torch.optim.Optimizer):
    """Base of :class:`OnebitAdam`, :class:`ZeroOneAdam` and :class:`OnebitLamb`.

    Subclasses define ``state_names`` (fp32 flat states, torch key names), ``_validate_group`` additions,
    :meth:`needs_grad_allreduce` and ``_step_bucket``.
    """

    state_names: tuple[str, ...] = ()

    def __init__(self, params, defaults: dict[str, Any], *, process_group: Any = None,
                 kernel_backend: KernelBackendName = "auto"):
        self.process_group = process_group
        self.transport: Transport = resolve_transport(process_group)  # errors if this rank is not a member
        self.kernel_backend = kernel_backend
        self.comm_stats = CommStats()
        self._buckets: list[list[FlatBucket]] = []
        self._error_feedback: dict[tuple[int, int], OnebitErrorFeedback] = {}
        self._masks: dict[tuple[int, int], torch.Tensor] = {}
        #: who switches the full-precision gradient all-reduce on and off: "ddp" (register_ddp), "engine"
        #: (attach_engine), or None (nobody declared it; warned about once compression starts)
        self.grad_allreduce_owner: str | None = None
        self._warned_no_hook = False
        #: optimizer steps taken (all params of all groups step together: missing grads count as zero)
        self.global_step = 0
        super().__init__(params, defaults)

    # -- construction ----------------------------------------------------------------------------------
    def _validate_group(self, group: dict[str, Any]) -> None:
        name = type(self).__name__
        if not 0.0 <= group["lr"]:
            raise ValueError(f"{name}: invalid learning rate {group['lr']}")
        if "eps" in group and not 0.0 <= group["eps"]:
            raise ValueError(f"{name}: invalid eps {group['eps']}")
        if not 0.0 <= group.get("weight_decay", 0.0):
            raise ValueError(f"{name}: invalid weight_decay {group['weight_decay']}")
        b1, b2 = group["betas"]
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ValueError(f"{name}: betas must be in [0, 1), got {group['betas']}")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        self._validate_group(group)
        name = type(self).__name__
        for p in group["params"]:
            if not p.is_floating_point() or p.dtype not in (torch.float32, torch.float16, torch.bfloat16):
                raise ValueError(f"{name}: parameters must be float32, float16 or bfloat16, got {p.dtype}")
            problem = self.transport.device_error(p)
            if problem:
                raise ValueError(f"{name}: a parameter cannot be communicated: {problem}")
        trainable = [p for p in group["params"] if p.requires_grad]
        by_dtype: dict[tuple, list] = {}
        for p in trainable:
            by_dtype.setdefault((p.device, p.dtype), []).append(p)
        self._buckets.append([FlatBucket(ps, self.state_names) for ps in by_dtype.values()])

    # -- DDP ------------------------------------------------------------------------------------------
    def needs_grad_allreduce(self) -> bool:
        """Whether the coming step wants DDP's gradients averaged in full precision."""
        raise NotImplementedError

    def register_ddp(self, ddp_model: torch.nn.parallel.DistributedDataParallel) -> None:
        """Let DDP all-reduce gradients only on steps that need it (one call after wrapping the model)."""
        from ._ddp_hook import compression_aware_hook

        if self.grad_allreduce_owner == "engine":
            raise ValueError(f"{type(self).__name__}.register_ddp: a training engine already reduces this optimizer's "
                             "gradients (attach_engine was called); wrapping its model in DDP too would average "
                             "the gradients twice: use one or the other")
        ddp_model.register_comm_hook(self, compression_aware_hook)
        self.grad_allreduce_owner = "ddp"

    def attach_engine(self, engine: object = None) -> None:
        """Declare that a training engine, not DDP, reduces this optimizer's gradients.

        The engine must ask :meth:`needs_grad_allreduce` before each gradient reduction (at each accumulation
        boundary) and skip the full-precision all-reduce when it answers ``False``, exactly as the
        :meth:`register_ddp` hook does; the optimizer then averages its compressed momenta (or gradients)
        itself. The only effect here is the bookkeeping: :attr:`grad_allreduce_owner` becomes ``"engine"`` and
        the "register_ddp(model) was not called" warning, meant for DDP scripts, is not given. ``engine`` is
        only named in that attribute's log line (any object, or ``None``). Calling it after
        :meth:`register_ddp` is an error: two owners would average the gradients twice.
        """
        if self.grad_allreduce_owner == "ddp":
            raise ValueError(f"{type(self).__name__}.attach_engine: register_ddp was already called, so DDP's comm "
                             "hook reduces the gradients; an engine reducing them too would average them twice")
        self.grad_allreduce_owner = "engine"
        logger.debug("ds_comm %s: gradient all-reduce owned by the engine %s", type(self).__name__,
                     type(engine).__name__ if engine is not None else "(unnamed)")

    def _warn_if_ddp_still_averages(self) -> None:
        if self.transport.world_size > 1 and self.grad_allreduce_owner is None and not self._warned_no_hook:
            self._warned_no_hook = True
            logger.warning(
                "ds_comm %s: compression started but register_ddp(model) was not called; if DDP wraps the "
                "model it still all-reduces every gradient in full precision (correct, but no bandwidth saved). "
                "An engine that skips the all-reduce itself declares it with optimizer.attach_engine(engine)",
                type(self).__name__,
            )

    # -- the compressed collective ---------------------------------------------------------------------
    def _key(self, gi: int, bi: int) -> tuple[int, int]:
        return (gi, bi)

    @staticmethod
    def _parse_key(name: str) -> tuple[int, int]:
        """A bucket key from its checkpoint spelling ``"gi.bi"`` (``state_dict`` writes them so)."""
        gi, bi = name.split(".")
        return int(gi), int(bi)

    def compressed_average(self, key, flat: torch.Tensor, on_wake=None, divisor=None) -> torch.Tensor:
        """1-bit average of ``flat`` across ranks in place, with this bucket's error feedback and mask.

        ``on_wake(woken, mean_square)``: called when masked elements get a value on some rank, with a bool
        mask of those elements and the rank-average of ``flat**2`` there (to seed their statistics).
        ``divisor()``: called after ``on_wake``; returns the preconditioner ``d`` (positive, finite, identical
        on every rank) when ``flat / d`` is to be compressed instead of ``flat`` (the result is multiplied
        back by ``d``).
        """
        if self.transport.world_size == 1:
            return flat  # nothing to average: no compression error either
        ef = self._error_feedback.setdefault(key, OnebitErrorFeedback())
        self._update_mask(key, flat, on_wake)
        d = divisor() if divisor is not None else None  # divided and multiplied back inside the kernels
        compressed_allreduce(flat, ef, self.transport, backend=self.kernel_backend, stats=self.comm_stats,
                             divisor=d)
        mask = self._masks.get(key)
        if mask is not None:
            flat.mul_(mask)
            ef.rescale_(mask)  # masked elements keep no residual either
        return flat

    @staticmethod
    def adam_denominator(exp_avg_sq: torch.Tensor, bc2: float, eps: float) -> torch.Tensor:
        """``sqrt(v / bc2) + eps``, Adam's per-element denominator (a new tensor)."""
        return (exp_avg_sq.sqrt() / math.sqrt(bc2)).add_(eps)

    @staticmethod
    def compression_divisor(denom: torch.Tensor, exp_avg_sq: torch.Tensor) -> torch.Tensor:
        """``denom`` as the divisor of preconditioned compression, with 1 where the variance is zero: such an
        element has no statistics yet (masked, or at rest after the freeze), and ``x / eps`` would swamp the
        chunk's one scale."""
        return denom.masked_fill(exp_avg_sq == 0, 1.0)

    def rescale_error_feedback(self, key, factor: torch.Tensor) -> None:
        """Carry this bucket's residuals over to a new preconditioner: ``factor = d_old / d_new``."""
        ef = self._error_feedback.get(key)
        if ef is not None:
            ef.rescale_(factor)

    def start_mask(self, key, momentum: torch.Tensor) -> None:
        """Mask the elements whose (replicated) momentum is exactly zero when compression starts."""
        if self.transport.world_size == 1:
            return
        zero = momentum == 0
        if bool(zero.any()):
            self._masks[key] = (~zero).to(momentum.dtype)
            logger.info("ds_comm %s: %d of %d elements have never had a gradient; their momenta stay zero "
                        "until they get one", type(self).__name__, int(zero.sum()), zero.numel())

    def _update_mask(self, key, local: torch.Tensor, on_wake=None) -> None:
        mask = self._masks.get(key)
        if mask is None:
            return
        masked = mask == 0
        flag = ((local != 0) & masked).any().to(torch.int32).reshape(1)
        self.transport.all_reduce(flag, "max")  # 4 bytes: did any masked element get a gradient anywhere?
        if int(flag) == 0:
            return
        square = torch.where(masked, local.float() * local.float(), 0.0)
        self.transport.all_reduce(square, "sum")  # rare: once per batch of newly touched elements
        square /= self.transport.world_size
        woken = masked & (square > 0)
        mask.masked_fill_(woken, 1.0)
        if on_wake is not None:
            on_wake(woken, square)
        if bool((mask == 1).all()):
            del self._masks[key]

    # -- checkpoints -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """torch's layout (per-param ``step``/``exp_avg``/... copies) plus this rank's compression state under
        ``"ds_comm"``: error feedback per bucket, masks, the step and the algorithm's own counters. Save one
        file per rank for a bit-exact resume."""
        sd = super().state_dict()
        step = torch.tensor(float(self.global_step))
        sd["state"] = {i: {"step": step.clone(), **{k: v.clone() for k, v in st.items() if k != "step"}}
                       for i, st in sd["state"].items()}
        sd["ds_comm"] = {
            "version": _STATE_VERSION,
            "world_size": self.transport.world_size,
            "rank": self.transport.rank,
            "global_step": self.global_step,
            "error_feedback": {f"{g}.{b}": ef.state_dict() for (g, b), ef in self._error_feedback.items()},
            "masks": {f"{g}.{b}": m.clone() for (g, b), m in self._masks.items()},
            "extra": self._extra_state(),
        }
        return sd

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        pass

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output. Same world size: exact. Another world size: the error feedback
        is reset (logged; momenta and variances are replicated and load as they are)."""
        own = state_dict.get("ds_comm")
        if not isinstance(own, dict) or own.get("version") != _STATE_VERSION:
            raise ValueError(f"{type(self).__name__}.load_state_dict: not a ds_comm compressed-optimizer state dict "
                             "(missing its 'ds_comm' section)")
        originals = state_dict["state"]
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        index = 0
        for group, buckets in zip(self.param_groups, self._buckets):
            lookup = {p: (bucket, i) for bucket in buckets for i, p in enumerate(bucket.params)}
            for p in group["params"]:
                saved = originals.get(index)
                index += 1
                if saved is None or p not in lookup:
                    continue
                bucket, i = lookup[p]
                with torch.no_grad():
                    for name in self.state_names:
                        bucket.view(bucket.states[name], i).copy_(saved[name])
                self.state[p] = {}
                self.state[p].update({name: bucket.view(bucket.states[name], i) for name in self.state_names})
        self.global_step = int(own["global_step"])
        world, rank = self.transport.world_size, self.transport.rank
        self._error_feedback = {}
        for key, ef_state in own["error_feedback"].items():
            ef = OnebitErrorFeedback()
            ef.load_state_dict(ef_state, world_size=world, rank=rank)
            self._error_feedback[self._parse_key(key)] = ef
        self._masks = {self._parse_key(k): m.clone() for k, m in own["masks"].items()}
        if own["world_size"] != world:
            logger.warning("ds_comm %s: checkpoint from world size %d loaded on %d: compression error feedback "
                           "reset, momenta and variances kept", type(self).__name__, own["world_size"], world)
        self._load_extra_state(own["extra"])

    # -- the step --------------------------------------------------------------------------------------
    def _record_state(self, bucket: FlatBucket) -> None:
        if bucket.params and not self.state[bucket.params[0]]:  # once: torch-style per-param state views
            for i, p in enumerate(bucket.params):
                self.state[p].update({name: bucket.view(bucket.states[name], i) for name in self.state_names})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.global_step += 1
        for gi, (group, buckets) in enumerate(zip(self.param_groups, self._buckets)):
            for bi, bucket in enumerate(buckets):
                grad = bucket.gather_grads()
                self._step_bucket(self._key(gi, bi), group, bucket, grad)
                self._record_state(bucket)
        return loss

    def _step_bucket(self, key, group, bucket: FlatBucket, grad: torch.Tensor) -> None:
        raise NotImplementedError
