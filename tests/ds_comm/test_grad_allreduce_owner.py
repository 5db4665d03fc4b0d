"""Who switches the full-precision gradient all-reduce on and off for the compressed optimizers.

A DDP script that forgot ``register_ddp`` gets one warning when compression starts (DDP still averages every
gradient in full precision: correct, no bandwidth saved). A script that registered DDP, and an engine that does
the gating itself and says so with ``attach_engine``, get none (ds-zero's ``ZeroEngine`` doing so:
tests/ds_zero/test_compressed_owner.py, since ds-comm's environment has no ds-zero). 2 gloo ranks.
"""

import logging

import torch
import torch.distributed as dist
from harness import run_distributed
from torch.nn.parallel import DistributedDataParallel as DDP

import ds_comm

FREEZE, STEPS = 2, 4
WARNING = "register_ddp(model) was not called"
OPTIMIZERS = [ds_comm.OnebitAdam, ds_comm.ZeroOneAdam, ds_comm.OnebitLamb]


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def _opt(params, cls):
    if cls is ds_comm.ZeroOneAdam:  # one variance step, then 1-bit gradient steps (compression starts at step 2)
        return cls(params, lr=1e-2, var_freeze_step=FREEZE, var_update_scaler=1)
    return cls(params, lr=1e-2, freeze_step=FREEZE)


def _batch(step):
    g = torch.Generator().manual_seed(10 * step + dist.get_rank())
    return torch.randn(4, 6, generator=g), torch.randn(4, 2, generator=g)


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _count_warnings(run) -> int:
    handler = _Collect()
    logger = logging.getLogger("ds_comm")
    logger.addHandler(handler)
    try:
        run()
    finally:
        logger.removeHandler(handler)
    return sum(WARNING in m for m in handler.messages)


def _script(cls, mode):
    """A DDP training loop: ``plain`` forgets register_ddp, ``ddp`` calls it, ``attached`` declares an engine."""
    model = DDP(_model())
    opt = _opt(model.parameters(), cls)
    if mode == "ddp":
        opt.register_ddp(model)
    elif mode == "attached":
        opt.attach_engine()

    def run():
        for t in range(STEPS):
            x, y = _batch(t)
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()

    warnings = _count_warnings(run)
    return warnings, opt.grad_allreduce_owner, opt.comm_stats.calls


def _scripts():
    return {(cls.__name__, mode): _script(cls, mode) for cls in OPTIMIZERS for mode in ("plain", "ddp", "attached")}


def test_only_a_script_without_an_owner_is_warned():
    for results in run_distributed(_scripts, 2):
        for (name, mode), (warnings, owner, calls) in results.items():
            assert calls > 0, (name, mode, "compression never started: the test would prove nothing")
            expected = {"plain": (1, None), "ddp": (0, "ddp"), "attached": (0, "engine")}[mode]
            assert (warnings, owner) == expected, (name, mode, warnings, owner)


def _conflicts():
    model = DDP(_model())
    errors = []
    a = _opt(model.parameters(), ds_comm.OnebitAdam)
    a.register_ddp(model)
    b = _opt(model.parameters(), ds_comm.OnebitAdam)
    b.attach_engine()
    for call in (lambda: a.attach_engine(), lambda: b.register_ddp(DDP(_model()))):
        try:
            call()
        except ValueError as exc:
            errors.append(str(exc))
    return errors


def test_ddp_and_an_engine_cannot_both_own_the_all_reduce():
    for errors in run_distributed(_conflicts, 2):
        assert len(errors) == 2
        assert "register_ddp was already called" in errors[0] and "twice" in errors[0]
        assert "attach_engine was called" in errors[1] and "twice" in errors[1]
