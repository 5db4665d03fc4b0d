"""ds-moe's MoE layer trained through ds-zero's engine with expert parallelism, against one process running all
experts (ep_size 1) on every rank's tokens with the same routing: losses, the global grad norm (clipping active:
each expert counted once), dense params and every global expert's params after several AdamW steps, fp32 within
1e-5 relative. ZeRO stages 0, 1, 2; ep 2 on 4 gloo ranks (expert-data-parallel groups of 2) and on 2 ranks
(groups of 1). Also through ``ds_train.initialize`` (the config's optimizer, MoE param groups split and the
expert groups passed by initialize), and a stage-3 checkpoint loaded back bit for bit (resuming on another
``ep_size``: test_moe_checkpoint.py)."""

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from harness import run_distributed

M, H, E, TOKENS, STEPS, CLIP, AUX, LR = 8, 16, 4, 6, 3, 0.05, 0.1, 1e-2


class Net(nn.Module):
    def __init__(self, ep: int, starve: bool = False):
        super().__init__()
        from ds_moe import FFNExpert, MoE

        torch.manual_seed(0)
        self.pre = nn.Linear(M, M)
        self.moe = MoE(M, FFNExpert(M, H), num_experts=E, ep_size=ep, k=1 if starve else 2, min_capacity=1,
                       drop_tokens=False)
        torch.manual_seed(1)
        with torch.no_grad():
            self.pre.weight.copy_(torch.randn(M, M) * 0.5)
            w = self.moe.deepspeed_moe.gate.wg.weight
            w.copy_(torch.randn(E, M))
            if starve:
                # w1 = -w0, w2 = w3 = 0: top-1 picks expert 0 or 1 for every token (|x.w0| > 0), so with ep 2 the
                # ranks holding experts 2 and 3 receive no token at all: their experts still run (on zero rows)
                w[1] = -w[0]
                w[2:] = 0
        if starve:  # a frozen gate keeps starving them in every step
            w.requires_grad_(False)
        for i in range(self.moe.num_local_experts):
            g = torch.Generator().manual_seed(100 + self.moe.global_expert_index(i))
            sd = self.moe.deepspeed_moe.experts.expert_state_dict(i)
            self.moe.deepspeed_moe.experts.load_expert_state_dict(
                i, {k: torch.randn(v.shape, generator=g) * 0.5 for k, v in sd.items()})

    def forward(self, x, rank):
        torch.manual_seed(1000 + rank)  # the gate's sampling draws the same numbers as the reference's
        out, l_aux, _ = self.moe(torch.tanh(self.pre(x)))
        return (out ** 2).mean() + AUX * l_aux


def _data(step, rank):
    return torch.randn(TOKENS, M, generator=torch.Generator().manual_seed(10 * step + rank))


def _full(p):
    """Stage 3's DTensor shards gathered (collective over the param's mesh); others as they are."""
    return (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()


def _experts(model) -> dict:
    moe = model.moe
    ex = moe.deepspeed_moe.experts
    full = {attr: _full(getattr(ex, attr)) for _, attr in ex._KEYS}
    return {moe.global_expert_index(i): {k: full[attr][i] for k, attr in ex._KEYS}
            for i in range(moe.num_local_experts)}


def _dense(model) -> dict:
    return {n: _full(p) for n, p in model.named_parameters() if "deepspeed_experts" not in n
            and "experts.weight" not in n and "experts.bias" not in n}


def _reference(world, starve=False):
    model = Net(1, starve)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    losses, norms = [], []
    for step in range(STEPS):
        per_rank = [model(_data(step, r), r) for r in range(world)]
        torch.stack(per_rank).mean().backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)))
        opt.step()
        opt.zero_grad()
        losses.append([float(v.detach()) for v in per_rank])
    return _dense(model), _experts(model), losses, norms


def _config(stage):
    return {"train_micro_batch_size_per_gpu": TOKENS, "gradient_accumulation_steps": 1, "gradient_clipping": CLIP,
            "zero_optimization": {"stage": stage, "reduce_bucket_size": 200, "allgather_bucket_size": 300},
            "steps_per_print": 10**6}


def _close(problems, what, a, b, rel=1e-5):
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    if not torch.allclose(a, b, rtol=rel, atol=rel * max(1.0, float(b.abs().max()))):
        problems.append(f"{what}: max diff {float((a - b).abs().max()):.3g}")


def _train_and_compare(engine, model, ref, rank, what):
    ref_dense, ref_experts, ref_losses, ref_norms = ref
    problems = []
    for step in range(STEPS):
        loss = engine(_data(step, rank), rank)
        engine.backward(loss)
        engine.step()
        _close(problems, f"{what} loss {step}", float(loss), ref_losses[step][rank])
        _close(problems, f"{what} grad norm {step}", engine.global_grad_norm, ref_norms[step])
    for n, v in _dense(model).items():
        _close(problems, f"{what} {n}", v, ref_dense[n])
    for e, sd in _experts(model).items():
        for k, v in sd.items():
            _close(problems, f"{what} expert {e} {k}", v, ref_experts[e][k])
    return problems


def _worker(ep, stages, starve=False, root=None):
    import ds_zero
    from ds_moe import groups, split_params_into_different_moe_groups_for_optimizer

    rank = dist.get_rank()
    ref = _reference(dist.get_world_size(), starve)
    problems = []
    for stage in stages:
        model = Net(ep, starve)
        opt = torch.optim.AdamW(split_params_into_different_moe_groups_for_optimizer(
            {"params": list(model.parameters()), "name": "dense"}), lr=LR)
        engine = ds_zero.ZeroEngine(model, opt, _config(stage),
                                    expert_data_parallel_groups=groups.get_expert_data_parallel_group)
        problems += _train_and_compare(engine, model, ref, rank, f"stage {stage}")
        if root is not None and stage == 3:  # per-expert files; loaded back into a fresh engine bit for bit
            engine.save_checkpoint(root, tag="z3")
            want = {**_dense(model), **{(e, k): v for e, sd in _experts(model).items() for k, v in sd.items()}}
            model2 = Net(ep, starve)
            engine2 = ds_zero.ZeroEngine(model2, torch.optim.AdamW(split_params_into_different_moe_groups_for_optimizer(
                {"params": list(model2.parameters()), "name": "dense"}), lr=LR), _config(stage),
                expert_data_parallel_groups=groups.get_expert_data_parallel_group)
            engine2.load_checkpoint(root, tag="z3")
            got = {**_dense(model2), **{(e, k): v for e, sd in _experts(model2).items() for k, v in sd.items()}}
            problems += [f"stage 3 resume: {k} differs" for k in want if not torch.equal(got[k], want[k])]
        counts = model.moe.deepspeed_moe.exp_counts
        if starve and int(counts[2:].sum()) != 0:
            problems.append(f"the starving gate routed tokens to experts 2, 3: {counts.tolist()}")
    return problems


@pytest.mark.parametrize("world", [4, 2])
def test_moe_through_engine_matches_one_process(world):
    results = run_distributed(_worker, world, 2, (0, 1, 2), timeout=300)
    assert results == [[]] * world, results


@pytest.mark.parametrize("world", [4, 2])
def test_moe_stage3_matches_one_process(world, tmp_path):
    """Stage 3 (FSDP2): the MoE layer a unit sharded over the expert-data-parallel group, the gate kept whole;
    a checkpoint (per-expert files) loads back into a fresh engine bit for bit."""
    results = run_distributed(_worker, world, 2, (3,), False, str(tmp_path), timeout=300)
    assert results == [[]] * world, results


def test_moe_stage3_rank_without_tokens():
    """Stage 3 on 4 ranks, ep 2: the ranks holding experts 2 and 3 receive no token in any step. FSDP2 still
    gathers and reduces their unit (the layer runs its experts on zero rows): no hang, zero expert gradients
    (the experts' Adam steps stay those of the reference), everything else as the one-process run."""
    results = run_distributed(_worker, 4, 2, (3,), True, timeout=300)
    assert results == [[]] * 4, results


def _initialize_worker(stage):
    import ds_train

    rank = dist.get_rank()
    ref = _reference(dist.get_world_size())
    model = Net(2)
    cfg = {**_config(stage), "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.01}}}
    engine, _, _, _ = ds_train.initialize(model=model, config=cfg)
    moe_groups = [g for g in engine.optimizer.param_groups if g.get("moe")]
    problems = [] if moe_groups and {g["name"] for g in moe_groups} == {"ep_size_2"} else [f"no moe groups: {moe_groups}"]
    problems += _train_and_compare(engine, model, ref, rank, "initialize")
    return problems


def test_moe_through_initialize():
    """ds_train.initialize on a ds-moe model: param groups split for the config's optimizer, the expert groups
    passed to the engine (4 ranks, ep 2, stage 2). The reference uses AdamW(lr, weight_decay=0.01) too."""
    results = run_distributed(_initialize_worker, 4, 2, timeout=240)
    assert results == [[]] * 4, results
