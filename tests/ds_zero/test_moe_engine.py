"""Expert (MoE) param groups through the engine, on the generic contract only (no ds-moe here: tests/integration
covers ds-moe's layer): param groups flagged ``moe`` are reduced over the expert-data-parallel group passed as
``expert_data_parallel_groups``, partitioned over it at stages 1/2, and the clipping norm counts each expert once.

The model stands in for expert parallelism without the all-to-all: rank r runs global expert ``r % ep`` on its
own tokens. The single-process reference holds every expert and averages the ranks' losses, so expert e's
gradient is ``(1/W) * sum over the ranks r with r % ep == e`` -- exactly what the sum over the strided
expert-data-parallel group ``[e, e+ep, ...]`` times the engine's ``1/W`` gives. fp32 within 1e-5 relative:
losses, every param, the global grad norm (clipping active) and Adam's states, several steps.
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from harness import run_distributed

D, B, STEPS, CLIP = 6, 3, 3, 0.05


def _expert_values(e: int) -> dict:
    g = torch.Generator().manual_seed(50 + e)
    return {"weight": torch.randn(D, D, generator=g) * 0.5, "bias": torch.randn(D, generator=g) * 0.1}


class Net(nn.Module):
    """Dense in/out layers around one expert per "global expert index" in ``experts``."""

    def __init__(self, experts: list[int], ep: int):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(D, D)
        self.out = nn.Linear(D, 1)
        self.experts = nn.ModuleList(nn.Linear(D, D) for _ in experts)
        with torch.no_grad():
            for lin, e in zip(self.experts, experts):
                for k, v in _expert_values(e).items():
                    getattr(lin, k).copy_(v)
        for p in self.experts.parameters():  # DeepSpeed's MoE markers
            p.allreduce = False
            p.group_name = f"ep_size_{ep}"

    def forward(self, x, local: int):
        return self.out(torch.tanh(self.experts[local](torch.tanh(self.inp(x)))))


def _batch(step: int, rank: int, micro: int = 0):
    g = torch.Generator().manual_seed(1000 * step + 100 * micro + rank)
    return torch.randn(B, D, generator=g), torch.randn(B, 1, generator=g)


def _groups(model):
    dense = [p for n, p in model.named_parameters() if not n.startswith("experts.")]
    experts = list(model.experts.parameters())
    return [{"params": dense, "name": "dense"},
            {"params": experts, "name": experts[0].group_name, "moe": True}]


def _config(stage: int, dtype: str = "fp32", ga: int = 1) -> dict:
    cfg = {"train_micro_batch_size_per_gpu": B, "gradient_accumulation_steps": ga, "gradient_clipping": CLIP,
           "zero_optimization": {"stage": stage, "reduce_bucket_size": 40, "allgather_bucket_size": 64},
           "steps_per_print": 10**6}
    if dtype == "fp16":
        cfg["fp16"] = {"enabled": True, "auto_cast": True, "loss_scale": 0, "initial_scale_power": 4}
    return cfg


def _edp_group(ep: int):
    """DeepSpeed's layout: the expert-data-parallel groups are the strided ranks [i, i+ep, ...]."""
    world, rank = dist.get_world_size(), dist.get_rank()
    mine = None
    for i in range(ep):
        ranks = list(range(i, world, ep))
        g = dist.new_group(ranks)
        if rank in ranks:
            mine = g
    return mine


def _reference(world: int, ep: int, steps: int, ga: int = 1):
    """losses[step][rank][micro]; the step's loss is the mean over ranks and micro-batches."""
    model = Net(list(range(ep)), ep)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses, norms = [], []
    for step in range(steps):
        per_rank = [[((model(x, r % ep) - y) ** 2).mean() for x, y in (_batch(step, r, m) for m in range(ga))]
                    for r in range(world)]
        loss = torch.stack([v for vs in per_rank for v in vs]).mean()
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)))
        opt.step()
        opt.zero_grad()
        losses.append([[float(v) for v in vs] for vs in per_rank])
    state = {n: {k: v.clone() for k, v in opt.state[p].items() if k != "step"} for n, p in model.named_parameters()}
    return {n: p.detach().clone() for n, p in model.named_parameters()}, state, losses, norms


def _param_states(engine) -> dict:
    """{param name: {state key: (this rank's flat piece of the param, (lo, hi) in the param's flat index)}}."""
    out = {}
    if engine.mode.name == "direct":
        for b in engine.buckets:
            for n, p in zip(b.names, b.params):
                st = engine.optimizer.state[p]
                out[n] = {k: (st[k].reshape(-1), (0, p.numel())) for k in ("exp_avg", "exp_avg_sq")}
        return out
    for b in engine.buckets:
        lo, hi = b.shard_range
        j = [gi for gi, p in enumerate(engine.masters.params) if p is not None].index(b.group_index)
        st = engine.optimizer.state[engine.optimizer.param_groups[j]["params"][0]]
        for n, p_lo, p_hi in zip(b.names, b.offsets, b.offsets[1:]):
            a, c = max(lo, p_lo), min(hi, p_hi)
            if a >= c:
                continue
            base = b.master_offset - lo
            out.setdefault(n, {})
            for k in ("exp_avg", "exp_avg_sq"):
                out[n].setdefault(k, []).append((st[k][base + a:base + c], (a - p_lo, c - p_lo)))
    return out


def _worker(ep: int, stages, ga: int = 1):
    import ds_zero

    world, rank = dist.get_world_size(), dist.get_rank()
    edp = _edp_group(ep)
    ref_params, ref_state, ref_losses, ref_norms = _reference(world, ep, STEPS, ga)
    local = "experts.0."
    mine = f"experts.{rank % ep}."  # this rank's expert in the reference's numbering
    problems = []

    def close(a, b, what, rel=1e-5):
        if not torch.allclose(a, b, rtol=rel, atol=rel * max(1.0, float(b.abs().max()) if b.numel() else 1.0)):
            problems.append(f"stage {stage} {what}: max diff {float((a - b).abs().max()):.3g}")

    for stage in stages:
        # each rank holds its own expert's values (as a MoE layer's construction sets them): the engine's
        # broadcast must not overwrite them with rank 0's
        model = Net([rank % ep], ep)
        opt = torch.optim.AdamW(_groups(model), lr=1e-2)
        engine = ds_zero.ZeroEngine(model, opt, _config(stage, ga=ga),
                                    expert_data_parallel_groups={f"ep_size_{ep}": edp})
        for step in range(STEPS):
            for micro in range(ga):
                x, y = _batch(step, rank, micro)
                loss = ((engine(x, 0) - y) ** 2).mean()
                engine.backward(loss)
                engine.step()
                close(torch.tensor(float(loss)), torch.tensor(ref_losses[step][rank][micro]),
                      f"loss step {step}.{micro}")
            close(torch.tensor(engine.global_grad_norm), torch.tensor(ref_norms[step]), f"grad norm step {step}")
        for n, p in model.named_parameters():
            ref = ref_params[n.replace(local, mine)]
            close(p.detach(), ref, f"param {n}")
        for n, states in _param_states(engine).items():
            ref_n = n.replace(local, mine)
            for k, pieces in states.items():
                for piece, (lo, hi) in (pieces if isinstance(pieces, list) else [pieces]):
                    close(piece, ref_state[ref_n][k].reshape(-1)[lo:hi], f"{k} of {n}[{lo}:{hi}]")
        if stage > 0:  # partitioned over the expert-data-parallel group, not the world
            eb = [b for b in engine.buckets if b.expert is not None]
            if not eb or any(b.shard_world != world // ep for b in eb):
                problems.append(f"stage {stage}: expert buckets sharded over {[b.shard_world for b in eb]}")
    return problems


@pytest.mark.parametrize("world", [4, 2])
def test_expert_groups_parity(world):
    """ep 2 on 4 ranks (expert-data-parallel groups of 2) and on 2 ranks (groups of 1: no expert reduction),
    stages 0, 1, 2 against one process holding both experts."""
    results = run_distributed(_worker, world, 2, (0, 1, 2), timeout=240)
    assert results == [[]] * world, results


def test_expert_groups_gradient_accumulation():
    """gradient_accumulation_steps 2 (stages 0/1 accumulate in place and reduce at the boundary, stage 2 reduces
    every micro-step into the shard) on 4 ranks, ep 2."""
    results = run_distributed(_worker, 4, 2, (0, 1, 2), 2, timeout=240)
    assert results == [[]] * 4, results


def _overflow_worker():
    import ds_zero

    rank = dist.get_rank()
    edp = _edp_group(2)  # two ranks, ep 2: each expert is reduced over a group of one
    out = []
    for stage in (0, 1):
        model = Net([rank % 2], 2)
        engine = ds_zero.ZeroEngine(model, torch.optim.AdamW(_groups(model), lr=1e-2), _config(stage, "fp16"),
                                    expert_data_parallel_groups={"ep_size_2": edp})
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        # an inf reaches only rank 1's expert grad, which no collective carries to rank 0: the skip must be
        # agreed over the world all the same
        handle = (model.experts[0].weight.register_hook(lambda g: g * float("inf")) if rank == 1 else None)
        x, y = _batch(0, rank)
        engine.backward(((engine(x, 0) - y) ** 2).mean())
        engine.step()
        if handle is not None:
            handle.remove()
        unchanged = all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())
        out.append((engine.was_step_skipped, unchanged, engine.loss_scale))
    return out


def test_expert_overflow_agreed_over_world():
    results = run_distributed(_overflow_worker, 2, timeout=120)
    for rank, per_stage in enumerate(results):
        for skipped, unchanged, scale in per_stage:
            assert skipped and unchanged, (rank, per_stage)
    assert results[0] == results[1]


def test_moe_group_refusals():
    import ds_zero

    model = Net([0], 2)
    bad = torch.optim.AdamW(model.parameters(), lr=1e-2)  # expert params in an unflagged group
    with pytest.raises(ValueError, match="not flagged 'moe'"):
        ds_zero.ZeroEngine(model, bad, _config(0))
    model = Net([0], 2)
    groups = _groups(model)
    del groups[1]["name"]
    with pytest.raises(ValueError, match="has no 'name'"):
        ds_zero.ZeroEngine(model, torch.optim.AdamW(groups, lr=1e-2), _config(1))
    model = Net([0], 2)
    with pytest.raises(ValueError, match="not under an MoE layer"):  # stage 3 shards DeepSpeed-shaped MoE layers only
        ds_zero.ZeroEngine(model, torch.optim.AdamW(_groups(model), lr=1e-2), _config(3))


def _resume_worker(root: str):
    import ds_zero
    from ds_zero.checkpoint import CheckpointError

    rank = dist.get_rank()
    edp = _edp_group(2)
    problems = []

    def build(stage, dtype, ep=2, group=None):
        model = Net([rank % ep], ep)
        engine = ds_zero.ZeroEngine(model, torch.optim.AdamW(_groups(model), lr=1e-2), _config(stage, dtype),
                                    expert_data_parallel_groups={f"ep_size_{ep}": group or edp})
        return model, engine

    def train(engine, steps, start):
        for step in range(start, start + steps):
            x, y = _batch(step, rank)
            engine.backward(((engine(x, 0) - y) ** 2).mean())
            engine.step()

    for stage, dtype in ((0, "fp32"), (0, "fp16"), (1, "fp32"), (2, "fp16")):
        tag = f"s{stage}{dtype}"
        model, engine = build(stage, dtype)
        train(engine, 2, 0)
        engine.save_checkpoint(root, tag=tag)
        train(engine, 2, 2)
        want = {n: p.detach().clone() for n, p in model.named_parameters()}
        model2, engine2 = build(stage, dtype)
        engine2.load_checkpoint(root, tag=tag)
        train(engine2, 2, 2)
        for n, p in model2.named_parameters():
            if not torch.equal(p.detach(), want[n]):
                problems.append(f"{tag}: {n} differs after resume by {float((p.detach() - want[n]).abs().max()):.3g}")
    # another ep_size: refused by name, not loaded with rank 0's experts
    world = dist.get_world_size()
    solo = [dist.new_group([r]) for r in range(world)][rank]
    _, other = build(0, "fp32", ep=world, group=solo)
    try:
        other.load_checkpoint(root, tag="s0fp32")
        problems.append("a checkpoint saved with ep 2 loaded on another ep_size")
    except CheckpointError as exc:
        if "same layout" not in str(exc):
            problems.append(f"unhelpful error: {exc}")
    return problems


def test_expert_checkpoint_resume_bitwise(tmp_path):
    """Each rank's experts, masters and optimizer state saved per rank; resumed on the same layout (4 ranks, ep 2;
    stage 0 fp32 and fp16, stage 1, stage 2 fp16) the next steps are bitwise those of the uninterrupted run."""
    results = run_distributed(_resume_worker, 4, str(tmp_path), timeout=240)
    assert results == [[]] * 4, results
