"""Real DeepSpeed 1-bit configs through ds_train.initialize: fp16 with dynamic loss scaling and
gradient_clipping (as DeepSpeed's BERT tutorials write them), and bf16. The optimizer keeps the config's
arguments, steps fp32 masters of the 16-bit model, the ranks stay identical, and the loss goes down (the
step-by-step parity with DeepSpeed's algorithm is tests/ds_zero/test_compressed_precision.py)."""

import pytest
import torch
import torch.distributed as dist
from harness import run_distributed

import ds_train


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def _train(kind, precision):
    import ds_comm

    params = {"lr": 1e-2, "weight_decay": 0.01}
    params.update({"var_freeze_step": 3} if kind == "ZeroOneAdam" else {"freeze_step": 3})
    cfg = {"train_batch_size": 8, "gradient_clipping": 1.0, "optimizer": {"type": kind, "params": params},
           precision: {"enabled": True, **({"loss_scale": 0, "initial_scale_power": 8} if precision == "fp16" else {})}}
    engine, optimizer, _, _ = ds_train.initialize(model=_model(), config=cfg)
    cls = {"OneBitAdam": ds_comm.OnebitAdam, "OneBitLamb": ds_comm.OnebitLamb, "ZeroOneAdam": ds_comm.ZeroOneAdam}[kind]
    assert isinstance(optimizer, cls), type(optimizer)
    if kind == "ZeroOneAdam":
        assert optimizer.var_freeze_step == 3
    else:
        assert optimizer.freeze_step == 3
    assert (engine.fp16_enabled(), engine.bfloat16_enabled()) == (precision == "fp16", precision == "bf16")
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    assert all(p.dtype == dtype for p in engine.module.parameters())
    assert all(p.dtype == torch.float32 for g in optimizer.param_groups for p in g["params"])
    g = torch.Generator().manual_seed(dist.get_rank())
    x = torch.randn(4, 4, generator=g).to(dtype)
    losses = []
    for _ in range(10):
        loss = (engine(x).float() - 1.0).pow(2).mean()
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    assert optimizer.comm_stats.as_dict(), "no compressed communication happened"
    assert engine.get_global_grad_norm() is not None
    if kind != "ZeroOneAdam":  # 0/1 Adam's local steps let the ranks differ between its syncs
        flat = torch.cat([p.detach().float().reshape(-1) for p in engine.module.parameters()])
        both = [torch.empty_like(flat) for _ in range(2)]
        dist.all_gather(both, flat)
        assert torch.equal(both[0], both[1]), "the ranks' params diverged"
    assert losses[-1] < losses[0], losses
    return True


@pytest.mark.parametrize("kind, precision", [("OneBitAdam", "fp16"), ("OneBitLamb", "fp16"), ("ZeroOneAdam", "bf16")])
def test_deepspeed_onebit_configs_train_through_initialize(kind, precision):
    assert run_distributed(_train, 2, kind, precision, timeout=150) == [True, True]
