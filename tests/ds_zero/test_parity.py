"""Stages 0, 1, 2 on 2 and 4 gloo processes against the single-process reference (plain torch model +
torch.optim.AdamW over the whole global batch, same seed and data), step by step.

Tolerance in fp32: parameters rtol 1e-5 / atol 1e-6, losses rtol 1e-5 (the only differences are the order
of floating-point summation: gradients summed across ranks and micro-batches instead of over one batch)."""

import pytest
from harness import run_distributed
from zero_cases import compare, reference, run_engine

STEPS = 4


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("stage", [0, 1, 2])
def test_matches_reference(stage, world):
    got = run_distributed(run_engine, world, stage, STEPS, mb=2, ga=1)
    compare(got, reference(STEPS, batch=2 * world))
