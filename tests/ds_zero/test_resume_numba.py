"""Resume in fresh processes is bit-exact with ds-optim's default Numba CPU kernels.

The regression: Numba's ``omp`` threading layer shares torch's OpenMP runtime and, when it starts its thread
pool (the first parallel kernel, i.e. the first ``optimizer.step()``), set that runtime's thread count to
``NUMBA_NUM_THREADS``. torch's intra-op thread count silently went from ``OMP_NUM_THREADS`` to the core count
from step 1 on, so a run resumed in a fresh process did its first forward/backward with a different thread
count than the uninterrupted run had at the same step, and thread-count dependent reductions (LayerNorm's
backward here) drifted by an ulp. Each phase below runs in its own fresh rank processes, as a real restart.
"""

import torch
import torch.distributed as dist
import torch.nn as nn
from harness import run_distributed

import ds_optim
import ds_zero

STEPS = 6
#: two Numba threads even on a one-core machine, so the regression cannot hide behind the core count
ENV = {"NUMBA_NUM_THREADS": "2", "OMP_NUM_THREADS": "1"}


class _Net(nn.Module):
    # wide enough that LayerNorm's backward reduces differently with 1 and 2 torch threads
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(16, 256)
        self.norm = nn.LayerNorm(256)
        self.out = nn.Linear(256, 4)

    def forward(self, x, y):
        return nn.functional.mse_loss(self.out(nn.functional.gelu(self.norm(self.inp(x)))), y)


def _engine(stage, seed=0):
    torch.manual_seed(seed)
    model = _Net()
    opt = ds_optim.FusedAdamW(model.parameters(), lr=1e-2)  # backend: the default (Numba on the CPU)
    config = {"train_micro_batch_size_per_gpu": 256, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": stage}, "steps_per_print": 10_000}
    return ds_zero.ZeroEngine(model, opt, config)


def _batch(step):
    g = torch.Generator().manual_seed(1000 * step + dist.get_rank())
    return torch.randn(256, 16, generator=g), torch.randn(256, 4, generator=g)


def _train(engine, start, stop):
    for step in range(start, stop):
        x, y = _batch(step)
        engine.backward(engine(x, y))
        engine.step()


def _params(engine):
    return {n: p.detach().clone() for n, p in engine.module.named_parameters()}


STAGES = (0, 2)  # direct mode (the user's optimizer over the params) and masters mode (rebuilt over shards)


def _straight():
    out = {}
    for stage in STAGES:
        engine = _engine(stage)
        _train(engine, 0, STEPS)
        out[stage] = _params(engine)
    return out, engine.optimizer.kernels_for(torch.device("cpu")).name, torch.get_num_threads()


def _first_half(ckpt):
    for stage in STAGES:
        engine = _engine(stage)
        _train(engine, 0, STEPS // 2)
        engine.save_checkpoint(f"{ckpt}/stage{stage}")


def _second_half(ckpt):
    out = {}
    for stage in STAGES:
        engine = _engine(stage, seed=7)  # another init: everything must come from the checkpoint
        engine.load_checkpoint(f"{ckpt}/stage{stage}")
        _train(engine, STEPS // 2, STEPS)
        out[stage] = _params(engine)
    return out


def test_resume_in_fresh_processes_is_bit_exact_with_numba(tmp_path):
    straight = run_distributed(_straight, 2, env=ENV, timeout=120)
    assert straight[0][1] == "numba", f"the default CPU backend is {straight[0][1]!r} here, not numba"
    run_distributed(_first_half, 2, str(tmp_path), env=ENV, timeout=120)
    resumed = run_distributed(_second_half, 2, str(tmp_path), env=ENV, timeout=120)
    for rank in range(2):
        for stage in STAGES:
            for name, value in straight[rank][0][stage].items():
                got = resumed[rank][stage][name]
                assert torch.equal(value, got), (
                    f"stage {stage}, rank {rank}: {name} differs after resume by {(value - got).abs().max().item():g}")
    # the cause of the drift this guards against (see the module docstring)
    assert straight[0][2] == 1, f"torch's thread count changed from 1 to {straight[0][2]} during training"
