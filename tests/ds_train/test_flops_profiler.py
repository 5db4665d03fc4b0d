"""The FLOPs profiler (DeepSpeed's ``get_model_profile`` / ``FlopsProfiler`` on torch.utils.flop_counter): the total
FLOPs of the README's GPT within 5% of the analytic count (2 x matmul params x tokens + attention for the forward,
6 x ... for forward+backward through the engine at ``profile_step``), the per-module table summing to the total,
ignored module types, and the printed/written report."""

import pathlib
import sys

import pytest
import torch
from harness import requires_gpus, run_distributed

from ds_train.profiling import FlopsProfiler, get_model_profile

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))
from train_gpt import GPT  # noqa: E402

VOCAB, CONTEXT, DIM, HEADS, LAYERS, BATCH = 256, 32, 64, 4, 2, 2


def _gpt():
    torch.manual_seed(0)
    return GPT(vocab=VOCAB, context=CONTEXT, dim=DIM, heads=HEADS, layers=LAYERS)


def _analytic(model, passes):
    """``passes`` x 2 x (weights of the matrix multiplications) x tokens + attention (QK^T and AV: 2 x 2 x S^2 x D
    per layer and sample, times ``passes``). An embedding is a lookup, not a multiplication: not counted."""
    matmul_params = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and not n.startswith(("tok", "pos")))
    tokens = BATCH * CONTEXT
    return passes * 2 * matmul_params * tokens + passes * 4 * LAYERS * BATCH * CONTEXT ** 2 * DIM


def _tokens():
    return torch.randint(0, VOCAB, (BATCH, CONTEXT), generator=torch.Generator().manual_seed(1))


def test_forward_flops_of_the_gpt_match_the_analytic_count(tmp_path, capsys):
    model = _gpt()
    out = tmp_path / "profile.txt"
    flops, macs, params = get_model_profile(model, args=[_tokens()], module_depth=2, top_modules=2, as_string=False,
                                            output_file=str(out))
    expected = _analytic(model, 1)
    assert abs(flops - expected) / expected < 0.05, (flops, expected)
    assert macs == flops // 2 and params == sum(p.numel() for p in model.parameters())
    text = out.read_text()
    assert text in capsys.readouterr().out  # printed and written, the same text
    assert "fwd flops per GPU" in text and "Aggregated Profile per GPU" in text and "Detailed Profile" in text
    for row in ("(model)", "  blocks", "    0", "  head"):
        assert any(line.startswith(row) for line in text.splitlines()), row
    assert not any(line.startswith("      attn") for line in text.splitlines())  # depth 3 is below module_depth=2
    s_flops, s_macs, s_params = get_model_profile(model, args=[_tokens()], print_profile=False)
    assert s_flops.endswith(" M") and s_macs.endswith(" MMACs") and s_params.endswith(" K")


def test_the_per_module_table_sums_to_the_total():
    model = _gpt()
    prof = FlopsProfiler(model)
    prof.start_profile()
    model(_tokens())
    running = prof.get_total_flops()  # DeepSpeed's example reads the totals before stop_profile()
    prof.stop_profile()
    assert running == prof.get_total_flops()
    rows = {p.name: p for p in prof.module_profiles()}
    total = prof.get_total_flops()
    root = rows[""]
    assert root.flops == total > 0
    # the GPT does no multiplication of its own: its children's rows add up to the total exactly
    assert sum(c.flops for c in root.children) == total
    # a container that is never called (ModuleList) gets its children's sums; every parent covers its children
    assert rows["blocks"].calls == 0 and rows["blocks"].flops == sum(rows[f"blocks.{i}"].flops for i in range(LAYERS))
    for p in rows.values():
        assert p.flops >= sum(c.flops for c in p.children), p
    # inside attention: the two projections plus the attention kernel itself (4 x S^2 x D per sample)
    attn = rows["blocks.0.attn"]
    assert attn.flops - rows["blocks.0.attn.qkv"].flops - rows["blocks.0.attn.proj"].flops == 4 * BATCH * CONTEXT ** 2 * DIM
    assert rows["blocks.0.attn.qkv"].flops == 2 * BATCH * CONTEXT * DIM * 3 * DIM
    assert all(p.latency > 0 and p.calls == 1 for n, p in rows.items() if n and n != "blocks")
    assert root.params == prof.get_total_params() and prof.get_total_duration() > 0
    prof.end_profile()
    with pytest.raises(RuntimeError, match="nothing profiled yet"):
        prof.get_total_flops()


def test_ignored_module_types_are_left_out():
    model = _gpt()
    flops, _, _ = get_model_profile(model, args=[_tokens()], print_profile=False, as_string=False,
                                    ignore_modules=[torch.nn.Linear])
    assert flops == 4 * LAYERS * BATCH * CONTEXT ** 2 * DIM  # only the attention kernels remain
    with pytest.raises(ValueError, match="input_shape or args/kwargs, not both"):
        get_model_profile(model, input_shape=(2, 3), args=[_tokens()])
    with pytest.raises(ValueError, match="args and/or kwargs must be given"):
        get_model_profile(model)
    linear = torch.nn.Linear(8, 4)
    assert get_model_profile(linear, input_shape=(3, 8), print_profile=False, as_string=False)[0] == 2 * 3 * 8 * 4


def _profile_through_the_engine(output_file):
    import contextlib
    import io

    import ds_train

    model = _gpt()
    engine, *_ = ds_train.initialize(model=model, config={
        "train_micro_batch_size_per_gpu": BATCH, "gradient_accumulation_steps": 2,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
        "flops_profiler": {"enabled": True, "profile_step": 1, "module_depth": 1, "top_modules": 3,
                           "output_file": output_file}})
    tokens = _tokens()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        for _ in range(3 * 2):
            loss = engine(tokens, tokens)
            engine.backward(loss)
            engine.step()
    result = {k: v for k, v in engine._flops_hook.result.items() if k != "modules"}
    depth1 = sum(m.flops for m in engine._flops_hook.result["modules"] if m.depth == 1)
    return (result, depth1, printed.getvalue().count("DeepSpeed Flops Profiler"), engine.flops_profiler_enabled(),
            engine.flops_profiler_profile_step(), _analytic(model, 1), _analytic(model, 3))


def test_the_engine_profiles_profile_step(tmp_path):
    out = tmp_path / "flops.txt"
    result, depth1, reports, enabled, step, fwd_expected, fwd_bwd_expected = run_distributed(
        _profile_through_the_engine, 1, str(out), timeout=180)[0]
    assert reports == 1 and enabled and step == 1 and result["step"] == 1  # once, at global step 1
    # the model returns the loss, whose cross-entropy is no multiplication: the analytic count holds
    assert abs(result["fwd_flops"] - fwd_expected) / fwd_expected < 0.05
    fwd_bwd = result["fwd_flops"] + result["bwd_flops"]
    assert abs(fwd_bwd - fwd_bwd_expected) / fwd_bwd_expected < 0.05, (fwd_bwd, fwd_bwd_expected)
    assert depth1 == result["fwd_flops"]
    assert result["bwd_latency"] > 0 and result["step_latency"] > 0 and result["fwd_latency"] > 0
    text = out.read_text()
    assert "Profile Summary at step 1" in text and "bwd flops per GPU (measured)" in text and "iter latency" in text
    assert "batch size per GPU:" in text and "samples/second" in text


class _Checkpointed(torch.nn.Module):
    """Two Linear blocks, optionally each under ds_train.checkpointing.checkpoint (recomputed in backward; the
    reentrant one: torch runs the non-reentrant recomputation where dispatch modes do not see it)."""

    def __init__(self, ckpt):
        super().__init__()
        torch.manual_seed(0)
        self.ckpt = ckpt
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(16, 16) for _ in range(2))

    def forward(self, x):
        from ds_train import checkpointing

        for b in self.blocks:
            x = checkpointing.checkpoint(b, x) if self.ckpt else b(x)
        return x.square().mean()


@pytest.mark.parametrize("ckpt", [False, True], ids=["plain", "checkpointed"])
def test_the_engine_hook_counts_the_backward_including_recomputation(ckpt, capsys):
    """The engine's hooks (driven by hand on a stand-in engine): the backward's FLOPs are counted, so a
    checkpointed model's recomputed forward shows up (3 x fwd instead of 2 x fwd)."""
    import types

    from ds_train.profiling.engine_hook import EngineFlopsProfiler

    model = _Checkpointed(ckpt)
    engine = types.SimpleNamespace(module=model, global_rank=0, global_steps=0,
                                   is_gradient_accumulation_boundary=lambda: True)
    hook = EngineFlopsProfiler(engine, {"enabled": True, "profile_step": 1, "detailed": False})
    x = torch.randn(8, 16, requires_grad=True)
    for step in range(3):
        with hook.forward():
            loss = model(x)
        with hook.backward():
            loss.backward()
        with hook.step():
            engine.global_steps += 1
    result = hook.result
    assert result["step"] == 1 and capsys.readouterr().out.count("DeepSpeed Flops Profiler") == 1
    fwd = 2 * 2 * 8 * 16 * 16
    assert result["fwd_flops"] == fwd
    # backward: grad of the input and of the weight per Linear (2 x fwd), plus the recomputed forward
    assert result["bwd_flops"] == (3 if ckpt else 2) * fwd
    engine.global_rank = 1  # other ranks never profile
    other = EngineFlopsProfiler(engine, {"enabled": True, "profile_step": 3})
    with other.forward():
        model(x)
    assert not other.profiler.started and other._phase == "idle"


@pytest.mark.gpu
@requires_gpus(1)
def test_on_a_gpu_flash_attention_is_counted_and_latency_synchronized():
    model = _gpt().cuda()
    tokens = _tokens().cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):  # bf16 sends sdpa to the flash / efficient kernels
        flops, macs, _ = get_model_profile(model, args=[tokens], print_profile=False, as_string=False)
    expected = _analytic(model, 1)
    assert abs(flops - expected) / expected < 0.05, (flops, expected)
    prof = FlopsProfiler(model)
    prof.start_profile()
    model(tokens)
    prof.stop_profile()
    rows = {p.name: p for p in prof.module_profiles()}
    assert rows[""].latency >= rows["blocks"].latency > 0
