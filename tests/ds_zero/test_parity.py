"""Stages 0, 1, 2 on 2 and 4 gloo processes against the single-process reference (plain torch model +
torch.optim.AdamW over the whole global batch, same seed and data), step by step.

Tolerances:
- fp32: parameters rtol 1e-5 / atol 1e-6, mean loss rtol 1e-5 (the only difference is the order of
  floating-point summation: gradients summed across ranks and micro-batches instead of over one batch);
- bf16: the reference emulates the engine (forward/backward with bf16 params cast from fp32 masters, AdamW on
  the fp32 masters); the engine reduces bf16 grads in bf16 across ranks and micro-batches, so gradients differ
  by bf16 rounding: parameters (bf16) rtol 1.6e-2 / atol 2e-3 (about two bf16 ulps), loss rtol 2e-2;
- fp16 overflow: exact facts (every rank skips the step, the scale halves, params unchanged by the skipped
  step, ranks identical) plus the fp32 reference with that step skipped, within fp16 rounding (rtol 5e-3).

All scenarios of one world size run in one set of rank processes (start-up dominates on a busy machine)."""

import pytest
import torch
from harness import run_distributed
from zero_cases import compare, reference, run_scenarios

STEPS = 4
Z = {"zero": {}}

# name -> (engine kwargs, reference kwargs)
SCENARIOS = {
    **{f"stage{s}": (dict(stage=s, steps=STEPS), {}) for s in (0, 1, 2)},
    **{f"stage{s}-accum3-clip": (dict(stage=s, steps=STEPS, mb=1, ga=3, cfg_extra={"gradient_clipping": 0.05}),
                                 dict(clip=0.05)) for s in (0, 1, 2)},
    **{f"stage{s}-frozen": (dict(stage=s, steps=3, frozen=True), dict(frozen=True)) for s in (0, 2)},
    "stage1-overlap": (dict(stage=1, steps=3, ga=2, cfg_extra={"zero": {"overlap_comm": True}}), {}),
    "stage2-overlap": (dict(stage=2, steps=3, ga=2, cfg_extra={"zero": {"overlap_comm": True}}), {}),
    "stage2-noncontiguous-allreduce": (dict(stage=2, steps=3, cfg_extra={
        "zero": {"contiguous_gradients": False, "reduce_scatter": False}}), {}),
    "stage1-allgather-in-pieces": (dict(stage=1, steps=3, cfg_extra={
        "zero": {"reduce_bucket_size": 10**6, "allgather_bucket_size": 100}}), {}),
    "stage2-broadcast-partitions": (dict(stage=2, steps=3, cfg_extra={"zero": {"allgather_partitions": False}}), {}),
    "stage1-fp32-comm-one-bucket": (dict(stage=1, steps=3, cfg_extra={
        "communication_data_type": "fp32", "zero": {"reduce_bucket_size": 10**6, "allgather_bucket_size": 10**6}}), {}),
}
BF16 = {f"stage{s}-bf16": (dict(stage=s, steps=3, cfg_extra={"bf16": {"enabled": True, "auto_cast": True}}),
                           dict(emulate_dtype=torch.bfloat16)) for s in (0, 1, 2)}
BF16.update({f"stage{s}-bf16-fp32-comm": (dict(stage=s, steps=3, cfg_extra={
    "bf16": {"enabled": True, "auto_cast": True}, "communication_data_type": "fp32"}),
    dict(emulate_dtype=torch.bfloat16)) for s in (0, 2)})
FP16_OVERFLOW = {f"stage{s}-fp16-overflow": (dict(
    stage=s, steps=4, inject_inf={"step": 1, "rank": 1},
    cfg_extra={"fp16": {"enabled": True, "auto_cast": True, "initial_scale_power": 10, "hysteresis": 1}}),
    dict(skip_steps={1})) for s in (0, 1, 2)}

WORLD_SCENARIOS = {2: {**SCENARIOS, **BF16, **FP16_OVERFLOW},
                   4: {k: v for k, v in SCENARIOS.items() if k in ("stage0", "stage1", "stage2", "stage2-accum3-clip",
                                                                     "stage1-accum3-clip", "stage2-frozen",
                                                                     "stage1-allgather-in-pieces")}}
_cache = {}


def _results(world):
    if world not in _cache:
        names = list(WORLD_SCENARIOS[world])
        per_rank = run_distributed(run_scenarios, world, [WORLD_SCENARIOS[world][n][0] for n in names], timeout=240)
        _cache[world] = {name: [per_rank[r][i] for r in range(world)] for i, name in enumerate(names)}
    return _cache[world]


def _ref(world, kwargs, ref_kwargs):
    mb, ga = kwargs.get("mb", 2), kwargs.get("ga", 1)
    return reference(kwargs["steps"], batch=mb * ga * world, **ref_kwargs)


CASES = [(w, n) for w in (2, 4) for n in WORLD_SCENARIOS[w] if n not in BF16 and n not in FP16_OVERFLOW]


@pytest.mark.parametrize("world,name", CASES, ids=[f"{w}ranks-{n}" for w, n in CASES])
def test_fp32_matches_reference(world, name):
    kwargs, ref_kwargs = WORLD_SCENARIOS[world][name]
    compare(_results(world)[name], _ref(world, kwargs, ref_kwargs))


@pytest.mark.parametrize("name", list(BF16))
def test_bf16_matches_emulated_reference(name):
    kwargs, ref_kwargs = BF16[name]
    compare(_results(2)[name], _ref(2, kwargs, ref_kwargs), rtol=1.6e-2, atol=2e-3, loss_rtol=2e-2)


@pytest.mark.parametrize("name", list(FP16_OVERFLOW))
def test_fp16_overflow_on_one_rank_skips_everywhere(name):
    kwargs, ref_kwargs = FP16_OVERFLOW[name]
    got = _results(2)[name]
    for rank, h in enumerate(got):
        assert [s["skipped"] for s in h] == [False, True, False, False], f"rank {rank}"
        assert h[0]["scale"] == 2.0 ** 10 and h[1]["scale"] == 2.0 ** 9, f"rank {rank}: {[s['scale'] for s in h]}"
        for k in h[0]["params"]:
            assert torch.equal(h[0]["params"][k], h[1]["params"][k]), f"skipped step changed {k} on rank {rank}"
            assert torch.equal(h[3]["params"][k], got[0][3]["params"][k]), f"ranks differ in {k}"
    ref = _ref(2, kwargs, ref_kwargs)
    for step in (0, 2, 3):
        for k, v in ref[step]["params"].items():
            torch.testing.assert_close(got[0][step]["params"][k], v, rtol=5e-3, atol=1e-3)
