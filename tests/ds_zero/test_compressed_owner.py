"""ds-zero's engine tells the 1-bit optimizers that it gates the full-precision gradient all-reduce itself
(``attach_engine``), so they do not warn that ``register_ddp`` was never called, in fp32 and fp16; 2 gloo ranks.
(The warning for a plain DDP script that forgot ``register_ddp``: tests/ds_comm/test_grad_allreduce_owner.py.)"""

import logging

import torch
import torch.distributed as dist
from harness import run_distributed

import ds_comm
import ds_zero

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


def _engine(cls, precision):
    cfg = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 0}, "steps_per_print": 10_000}
    if precision == "fp16":
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 8}
    engine = ds_zero.ZeroEngine(_model(), lambda ps: _opt(ps, cls), cfg)
    handler = _Collect()
    logging.getLogger("ds_comm").addHandler(handler)
    try:
        for t in range(STEPS):
            x, y = _batch(t)
            engine.backward(torch.nn.functional.mse_loss(engine(x.to(engine.precision.dtype)).float(), y))
            engine.step()
    finally:
        logging.getLogger("ds_comm").removeHandler(handler)
    warnings = sum(WARNING in m for m in handler.messages)
    return warnings, engine.optimizer.grad_allreduce_owner, engine.optimizer.comm_stats.calls


def _engines():
    return {(cls.__name__, precision): _engine(cls, precision) for cls in OPTIMIZERS for precision in ("fp32", "fp16")}


def test_ds_zero_engine_declares_itself_and_is_not_warned():
    for results in run_distributed(_engines, 2, timeout=180):
        for key, (warnings, owner, calls) in results.items():
            assert calls > 0, (key, "compression never started")
            assert (warnings, owner) == (0, "engine"), (key, warnings, owner)
