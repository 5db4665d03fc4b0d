"""Shared pieces of the ds-zero tests: a tiny MLP, deterministic data, the engine loop run inside each rank,
and the single-process reference (plain torch model + torch.optim.AdamW over the full global batch)."""

from __future__ import annotations

import contextlib
import copy
import math

import torch
import torch.distributed as dist
import torch.nn as nn

IN, HID, OUT = 8, 24, 4


class MLP(nn.Module):
    """~1.1k params in 6 tensors, plus an optional frozen layer (requires_grad=False)."""

    def __init__(self, frozen: bool = False, tied: bool = False):
        super().__init__()
        self.fc1 = nn.Linear(IN, HID)
        self.fc2 = nn.Linear(HID, HID)
        self.fc3 = nn.Linear(HID, OUT)
        # tied: a second layer sharing fc2's weight (one param under two names, as tied embeddings)
        self.fc2b = None
        if tied:
            self.fc2b = nn.Linear(HID, HID)
            self.fc2b.weight = self.fc2.weight
        self.frozen = nn.Linear(OUT, OUT) if frozen else None
        if frozen:
            self.frozen.requires_grad_(False)

    def forward(self, x, y=None):
        h = torch.tanh(self.fc1(x))
        h = torch.tanh(self.fc2(h))
        if self.fc2b is not None:
            h = torch.tanh(self.fc2b(h))
        out = self.fc3(h)
        if self.frozen is not None:
            out = self.frozen(out)
        if y is None:
            return out
        return ((out.float() - y.float()) ** 2).mean()


def make_model(seed: int = 0, frozen: bool = False, tied: bool = False) -> MLP:
    torch.manual_seed(seed)
    return MLP(frozen, tied)


def global_batch(step: int, size: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed * 10_000 + step)
    x = torch.randn(size, IN, generator=g)
    y = torch.randn(size, OUT, generator=g)
    return x, y


def micro_batch(step: int, micro: int, rank: int, world: int, mb: int, ga: int):
    """Rank ``rank``'s ``micro``-th micro-batch of global step ``step`` (a slice of the global batch)."""
    x, y = global_batch(step, mb * ga * world)
    lo = (micro * world + rank) * mb
    return x[lo:lo + mb], y[lo:lo + mb]


def param_groups(model: nn.Module, lr: float = 1e-2, weight_decay: float = 0.1, one_group: bool = False):
    if one_group:  # every trainable param in one group (weights and biases mixed)
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    decay = [p for n, p in model.named_parameters() if p.requires_grad and n.endswith("weight")]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and not n.endswith("weight")]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0, "lr": lr * 0.5}]


def base_config(stage: int, mb: int = 2, ga: int = 1, **extra) -> dict:
    cfg = {"train_micro_batch_size_per_gpu": mb, "gradient_accumulation_steps": ga,
           "zero_optimization": {"stage": stage, "reduce_bucket_size": 300, "allgather_bucket_size": 500},
           "steps_per_print": 10**6}
    zero = extra.pop("zero", {})
    cfg["zero_optimization"].update(zero)
    cfg.update(extra)
    return cfg


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full tensors (stage 3's DTensor shards are gathered: collective, every rank calls it)."""
    out = {}
    for k, v in model.state_dict().items():
        if hasattr(v, "full_tensor"):
            v = v.full_tensor()
        out[k] = v.detach().float().clone()
    return out


def run_engine(stage: int, steps: int, mb: int = 2, ga: int = 1, frozen: bool = False, cfg_extra=None,
               inject_inf: dict | None = None, lr: float = 1e-2, tied: bool = False, no_sync: bool = False,
               one_group: bool = False, eval_forward: bool = False):
    """Inside a rank: train ``steps`` steps; return per-step (mean loss over this rank's micro-batches, full
    params, skipped flag, loss scale)."""
    import ds_zero

    rank, world = dist.get_rank(), dist.get_world_size()
    model = make_model(frozen=frozen, tied=tied)
    cfg = base_config(stage, mb, ga, **copy.deepcopy(cfg_extra or {}))
    opt = torch.optim.AdamW(param_groups(model, lr, one_group=one_group), lr=lr)
    engine = ds_zero.ZeroEngine(model, opt, cfg)
    history = []
    for step in range(steps):
        losses = []
        for micro in range(ga):
            x, y = micro_batch(step, micro, rank, world, mb, ga)
            if inject_inf and inject_inf.get("step") == step and inject_inf.get("rank") == rank:
                x = x.clone()
                x[0, 0] = float("inf")
            quiet = engine.no_sync() if no_sync and micro < ga - 1 else contextlib.nullcontext()
            with quiet:
                loss = engine(x, y)
                engine.backward(loss)
            if eval_forward:  # an evaluation forward between backward and step must not change anything
                with torch.no_grad():
                    engine(x)
            engine.step()
            losses.append(float(loss))
        # eval_forward: full params only after the last step (reading a state dict frees FSDP2's gathered units,
        # which would hide a step that forgot to)
        record = not eval_forward or step == steps - 1
        history.append({"loss": sum(losses) / len(losses), "params": full_state(engine.module) if record else None,
                        "skipped": engine.was_step_skipped, "scale": engine.loss_scale,
                        "lr": engine.get_lr()})
    return history


def run_scenarios(scenarios: list[dict]):
    """Several engines one after another in the same rank processes (process start-up dominates on a busy
    2-core machine); returns one history per scenario."""
    return [run_engine(**sc) for sc in scenarios]


def reference(steps: int, batch: int, frozen: bool = False, clip: float = 0.0, lr: float = 1e-2, tied: bool = False,
              one_group: bool = False,
              emulate_dtype: torch.dtype | None = None, skip_steps=(), device: str | torch.device = "cpu"):
    """Single process over the full global batch. ``emulate_dtype``: run forward/backward with params cast to
    that dtype from fp32 masters (what the engine does in bf16); ``skip_steps``: steps whose update is skipped;
    ``device``: where it runs (a GPU run's reference on the GPU rounds its bf16 matmuls as the run does).
    Params come back on the CPU."""
    model = make_model(frozen=frozen, tied=tied).to(device)
    opt = torch.optim.AdamW(param_groups(model, lr, one_group=one_group), lr=lr)
    history = []
    for step in range(steps):
        x, y = (t.to(device) for t in global_batch(step, batch))
        if emulate_dtype is None:
            loss = model(x, y)
            loss.backward()
            run = model
        else:
            run = copy.deepcopy(model).to(emulate_dtype)
            loss = run(x.to(emulate_dtype), y.to(emulate_dtype))
            loss.backward()
            for p, q in zip(model.parameters(), run.parameters()):
                p.grad = None if q.grad is None else q.grad.float()
        if step in skip_steps:
            opt.zero_grad()
        else:
            if clip > 0:
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], clip)
            opt.step()
            opt.zero_grad()
        state = {k: v.cpu() for k, v in full_state(model).items()}
        if emulate_dtype is not None:
            state = {k: v.to(emulate_dtype).float() for k, v in state.items()}
        history.append({"loss": float(loss.detach()), "params": state})
    return history


def compare(ranks_history, ref, rtol=1e-5, atol=1e-6, loss_rtol=1e-5):
    """Every rank's params equal the reference's at every step; the mean loss over ranks too."""
    world = len(ranks_history)
    for step, expected in enumerate(ref):
        got_loss = sum(h[step]["loss"] for h in ranks_history) / world
        assert math.isclose(got_loss, expected["loss"], rel_tol=loss_rtol, abs_tol=1e-7), (
            f"step {step}: loss {got_loss} vs reference {expected['loss']}")
        for rank, h in enumerate(ranks_history):
            if h[step]["params"] is None:
                continue
            for name, value in expected["params"].items():
                torch.testing.assert_close(h[step]["params"][name], value, rtol=rtol, atol=atol,
                                           msg=lambda m: f"step {step} rank {rank} {name}: {m}")
