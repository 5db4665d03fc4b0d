"""Engine checkpoints of ds-moe models resume on another ``ep_size`` (ds-zero's per-expert files).

2 gloo ranks, one MoE layer (4 experts, dropless top-2) behind a dense layer, fp32, AdamW. A run trains 2 steps
at ``ep_size`` a, saves, and a fresh engine at ``ep_size`` b loads and trains 2 more: its losses, every dense
param and every global expert's params, and Adam's moments of every param (read back from a checkpoint the
resumed run writes at the end: per-expert files and the dense shards) equal those of one process that trained
all 4 steps with all experts and never stopped (1e-5 relative; expert parallelism changes the summation order,
so equality across ``ep_size`` is not bitwise). Stages 0 (fp32: the optimizer steps the params), 1 and 2; ep 2
-> 1 and 1 -> 2. Stage 3 (each MoE layer an FSDP2 unit over its expert-data-parallel group): resumed on the same
layout bit for bit (ep 1: experts sharded over both ranks; ep 2), and on another ``ep_size``.
"""

import os

import torch
import torch.distributed as dist
import torch.nn as nn
from harness import run_distributed

M, H, E, TOKENS, CLIP, AUX, LR = 8, 16, 4, 6, 0.05, 0.1, 1e-2
SAVE_AT, STEPS = 2, 4


class Net(nn.Module):
    """``grouped``: ds-moe's stacked experts (one ``[local experts, ...]`` tensor per weight); otherwise
    DeepSpeed's ``Experts`` (a module per expert, ``deepspeed_experts.<i>.0.weight``...)."""

    def __init__(self, ep: int, grouped: bool = True, experts: int = E):
        super().__init__()
        from ds_moe import FFNExpert, MoE

        torch.manual_seed(0)
        self.pre = nn.Linear(M, M)
        expert = FFNExpert(M, H) if grouped else nn.Sequential(nn.Linear(M, H), nn.GELU(), nn.Linear(H, M))
        self.moe = MoE(M, expert, num_experts=experts, ep_size=ep, k=2, min_capacity=1, drop_tokens=False)
        torch.manual_seed(1)
        with torch.no_grad():
            self.pre.weight.copy_(torch.randn(M, M) * 0.5)
            self.moe.deepspeed_moe.gate.wg.weight.copy_(torch.randn(experts, M))
        ex = self.moe.deepspeed_moe.experts
        for i in range(self.moe.num_local_experts):
            g = torch.Generator().manual_seed(100 + self.moe.global_expert_index(i))
            ex.load_expert_state_dict(i, {k: torch.randn(v.shape, generator=g) * 0.5
                                          for k, v in ex.expert_state_dict(i).items()})

    def forward(self, x, rank):
        torch.manual_seed(1000 + rank)  # the gate's sampling draws the same numbers as the reference's
        out, l_aux, _ = self.moe(torch.tanh(self.pre(x)))
        return (out ** 2).mean() + AUX * l_aux


def _data(step, rank):
    return torch.randn(TOKENS, M, generator=torch.Generator().manual_seed(10 * step + rank))


def _full(p):
    return (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()


def _snapshot(model) -> dict:
    """Dense params by name, experts as ``expert<E>.<key>`` (every global expert this rank holds)."""
    out = {n: _full(p) for n, p in model.named_parameters() if ".experts." not in n}
    moe = model.moe
    ex = moe.deepspeed_moe.experts
    if not hasattr(ex, "_KEYS"):  # DeepSpeed's Experts: a module per expert
        for i in range(moe.num_local_experts):
            for k, p in ex.deepspeed_experts[i].named_parameters():
                out[f"expert{moe.global_expert_index(i)}.{k}"] = _full(p)
        return out
    stacked = {attr: _full(getattr(ex, attr)) for _, attr in ex._KEYS}
    for i in range(moe.num_local_experts):
        for k, attr in ex._KEYS:
            out[f"expert{moe.global_expert_index(i)}.{k}"] = stacked[attr][i]
    return out


def _reference(world, grouped=True, world_before=None, steps=STEPS):
    """One process, all experts, every rank's tokens, never stopped: losses, params and Adam moments.
    ``world_before``: the world size of the steps before ``SAVE_AT`` (a resume on another world size)."""
    model = Net(1, grouped)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    losses = []
    for step in range(steps):
        ranks = world if world_before is None or step >= SAVE_AT else world_before
        per_rank = [model(_data(step, r), r) for r in range(ranks)]
        torch.stack(per_rank).mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad()
        losses.append([float(v.detach()) for v in per_rank])
    states = {}
    ex = model.moe.deepspeed_moe.experts
    attr_of = {getattr(ex, attr): k for k, attr in ex._KEYS} if grouped else {}
    per_expert = {} if grouped else {p: (e, k) for e in range(E) for k, p in ex.deepspeed_experts[e].named_parameters()}
    for n, p in model.named_parameters():
        for key in ("exp_avg", "exp_avg_sq"):
            if p in per_expert:
                e, k = per_expert[p]
                states[(f"expert{e}.{k}", key)] = opt.state[p][key].clone()
            elif p in attr_of:
                for e in range(E):
                    states[(f"expert{e}.{attr_of[p]}", key)] = opt.state[p][key][e].clone()
            else:
                states[(n, key)] = opt.state[p][key].clone()
    return _snapshot(model), states, losses


def _config(stage):
    return {"train_micro_batch_size_per_gpu": TOKENS, "gradient_accumulation_steps": 1, "gradient_clipping": CLIP,
            "zero_optimization": {"stage": stage, "reduce_bucket_size": 200, "allgather_bucket_size": 300},
            "steps_per_print": 10**6}


def _engine(stage, ep, grouped=True, experts=E):
    import ds_zero
    from ds_moe import groups, split_params_into_different_moe_groups_for_optimizer

    model = Net(ep, grouped, experts)
    opt = torch.optim.AdamW(split_params_into_different_moe_groups_for_optimizer(
        {"params": list(model.parameters()), "name": "dense"}), lr=LR)
    return model, ds_zero.ZeroEngine(model, opt, _config(stage),
                                     expert_data_parallel_groups=groups.get_expert_data_parallel_group)


def _train(engine, start, stop):
    rank = dist.get_rank()
    losses = []
    for step in range(start, stop):
        loss = engine(_data(step, rank), rank)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    return losses


def _saved_states(ckpt: str) -> dict:
    """``{(name, key): tensor}`` of a checkpoint: dense from the shards (reshard's full form), each global
    expert from its own file."""
    from ds_zero.checkpoint._io import model_file, read_marker, safe_load
    from ds_zero.checkpoint.load import _saved_full

    marker = read_marker(ckpt)
    model = safe_load(ckpt, model_file(), marker)
    out = {(n, k): v for n, st in _saved_full(ckpt, marker, model)["states"].items() for k, v in st.items()}
    for e in range(E):
        rec = safe_load(ckpt, f"layer_0_expert_{e}_mp_rank_00_model_states.pt", marker)
        for key, st in rec["states"].items():
            out.update({(f"expert{e}.{key}", k): v for k, v in st.items()})
    return out


def _close(problems, what, a, b, rel=1e-5):
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    if a.shape != b.shape or not torch.allclose(a, b, rtol=rel, atol=rel * max(1.0, float(b.abs().max()))):
        problems.append(f"{what}: {tuple(a.shape)} vs {tuple(b.shape)}, "
                        f"max diff {float((a - b).abs().max()) if a.shape == b.shape else 'n/a'}")


def _reshard_worker(root, cases, grouped=True, world_before=None):
    """``world_before``: the checkpoints were saved by another run of that many ranks (``_save_worker``)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    ref_params, ref_states, ref_losses = _reference(world, grouped, world_before)
    problems = []
    for stage, ep_save, ep_load in cases:
        stage_save, stage = stage if isinstance(stage, tuple) else (stage, stage)  # (saved at, resumed at)
        what = f"stage {stage_save}->{stage} ep {ep_save}->{ep_load}"
        tag = f"s{stage_save}{stage}_ep{ep_save}_{ep_load}"
        if world_before is None:
            _, engine = _engine(stage_save, ep_save, grouped)
            _train(engine, 0, SAVE_AT)
            engine.save_checkpoint(root, tag=tag)
        model, engine = _engine(stage, ep_load, grouped)
        engine.load_checkpoint(root, tag=tag)
        if engine.global_steps != SAVE_AT:
            problems.append(f"{what}: global_steps {engine.global_steps}")
        for i, loss in enumerate(_train(engine, SAVE_AT, STEPS)):
            _close(problems, f"{what} loss step {SAVE_AT + i}", loss, ref_losses[SAVE_AT + i][rank])
        for n, v in _snapshot(model).items():
            _close(problems, f"{what} {n}", v, ref_params[n])
        engine.save_checkpoint(root, tag=tag + "_end")
        saved = _saved_states(os.path.join(root, tag + "_end"))
        if set(saved) != set(ref_states):
            problems.append(f"{what}: saved states {sorted(set(saved) ^ set(ref_states))[:4]}")
        for key, v in saved.items():
            if key in ref_states:
                _close(problems, f"{what} {key[1]} of {key[0]}", v, ref_states[key])
    return problems


def test_resume_on_another_ep_size(tmp_path):
    """Stages 1 and 2: saved at ep 2 (each rank 2 experts), resumed at ep 1 (every rank all 4, their masters and
    moments sharded over both ranks), and the other way; stage 0 fp32 (the optimizer steps the params
    themselves) ep 2 -> 1; stage 3 ep 1 -> 2 (FSDP2 shards over another expert-data-parallel mesh); across
    stages: 2 -> 3 and 3 -> 1 with another ep_size. The rest of each run is the uninterrupted one-process run's."""
    cases = [(1, 2, 1), (1, 1, 2), (2, 2, 1), (2, 1, 2), (0, 2, 1), (3, 1, 2), ((2, 3), 2, 1), ((3, 1), 1, 2)]
    results = run_distributed(_reshard_worker, 2, str(tmp_path), cases, timeout=300)
    assert results == [[]] * 2, results


def _save_worker(root, cases):
    for stage, ep_save, ep_load in cases:
        _, engine = _engine(stage, ep_save)
        _train(engine, 0, SAVE_AT)
        engine.save_checkpoint(root, tag=f"s{stage}{stage}_ep{ep_save}_{ep_load}")
    return []


def test_resume_on_another_world_size(tmp_path):
    """Saved on 2 ranks at ep 2, resumed on 4 ranks at ep 4 (stage 2: each expert on one rank) and at ep 2
    (stage 1: each expert's shards over an expert-data-parallel group of 2). The saved experts' weights also
    load into a one-process ds-moe model with ds-moe's own reader (the files are DeepSpeed's layout)."""
    from ds_moe import load_moe_checkpoint

    cases = [(2, 2, 4), (1, 2, 2)]
    assert run_distributed(_save_worker, 2, str(tmp_path), cases, timeout=240) == [[]] * 2
    results = run_distributed(_reshard_worker, 4, str(tmp_path), cases, True, 2, timeout=240)
    assert results == [[]] * 4, results
    model = Net(1)
    load_moe_checkpoint(model, str(tmp_path / "s22_ep2_4"))
    want = _reference(2, steps=SAVE_AT)[0]
    problems = []
    for n, v in _snapshot(model).items():
        _close(problems, n, v, want[n])
    assert not problems, problems


def test_resume_on_another_ep_size_deepspeed_experts(tmp_path):
    """DeepSpeed's ``Experts`` (a module per local expert: the parameter names change with ``ep_size``), stage 2
    ep 2 -> 1 and stage 3 ep 1 -> 2."""
    results = run_distributed(_reshard_worker, 2, str(tmp_path), [(2, 2, 1), (3, 1, 2)], False, timeout=240)
    assert results == [[]] * 2, results


def _stage3_worker(root):
    problems = []
    for ep in (1, 2):
        tag = f"z3_ep{ep}"
        model, engine = _engine(3, ep)
        _train(engine, 0, SAVE_AT)
        engine.save_checkpoint(root, tag=tag)
        want_losses = _train(engine, SAVE_AT, STEPS)
        want = _snapshot(model)
        model, engine = _engine(3, ep)
        engine.load_checkpoint(root, tag=tag)
        if _train(engine, SAVE_AT, STEPS) != want_losses:
            problems.append(f"ep {ep}: losses after resume differ")
        for n, v in _snapshot(model).items():
            if not torch.equal(v, want[n]):
                problems.append(f"ep {ep}: {n} differs by {float((v - want[n]).abs().max()):.3g}")
    from ds_zero import CheckpointError

    _, engine = _engine(2, 2, experts=2)  # another num_experts: refused by name, nothing half-loaded
    try:
        engine.load_checkpoint(root, tag="z3_ep2")
        problems.append("a checkpoint of 4 experts loaded into a layer of 2")
    except CheckpointError as exc:
        if "num_experts" not in str(exc):
            problems.append(f"unhelpful error: {exc}")
    # a damaged expert file (listed in the commit marker with its size and sha256) is refused, never loaded
    path = os.path.join(root, "z3_ep1", "layer_0_expert_3_mp_rank_00_model_states.pt")
    if dist.get_rank() == 0:
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) - 7)
    dist.barrier()
    _, engine = _engine(3, 1)
    try:
        engine.load_checkpoint(root, tag="z3_ep1")
        problems.append("a truncated expert file was loaded")
    except CheckpointError as exc:
        if "layer_0_expert_3" not in str(exc) or "truncated" not in str(exc):
            problems.append(f"unhelpful error: {exc}")
    return problems


def test_stage3_resume_bitwise(tmp_path):
    """Stage 3, same layout: the steps after the resume are bitwise those of the run that never stopped."""
    results = run_distributed(_stage3_worker, 2, str(tmp_path), timeout=240)
    assert results == [[]] * 2, results
