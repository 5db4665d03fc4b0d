"""The 3D case: pipeline 2 x tensor 2 x data 2 on 8 gloo ranks (``PipeModelDataParallelTopology``, DeepSpeed's
rank layout), a tiny MLP model (4 residual blocks of width 16 and a head), 1F1B, 2 micro-batches per replica,
3 steps, against one process: the loss curve within 1e-5 relative (fp32), and every rank's parameter pieces
after the last step equal to their slice of the reference's parameters. Tensor parallelism through the user's
Megatron-style layers (groups from the mpu; with clipping, whose norm sums the split weights over the model
axis and counts the replicated ones once; with ZeRO-1; with ZeRO-2 saved and resumed on pipeline 1 x tensor 2
x data 4) and through torch's ``parallelize_module``
(ColwiseParallel / RowwiseParallel on the model axis' DeviceMesh; saved and resumed: DTensor pieces per model
rank). Data-parallel averaging runs over the data
axis only: averaging the split gradients over the model axis would fail the parameter comparison.

All cases run in one spawn (8 processes on a 2-core box: start-up dominates)."""

from __future__ import annotations

import shutil
import tempfile

import pytest
import torch
from harness import run_distributed
from pipe_3d_cases import batches, reference, run_3d_cases

WORLD = 8
CASES = {
    "megatron-clip": dict(kind="megatron", micro=2, steps=3, clip=0.5),
    "megatron-zero1": dict(kind="megatron", micro=2, steps=3, zero=1, schedule="gpipe"),
    "dtensor": dict(kind="dtensor", micro=2, steps=3),
    # saved on 2 x 2 x 2 after 2 steps, resumed on pipeline 1 x tensor 2 x data 4 (the pieces per model rank)
    "megatron-zero2-ckpt-to-1x2x4": dict(kind="megatron", micro=2, steps=3, zero=2, save_at=2, load=(1, 4)),
    "dtensor-ckpt-to-2x2x2": dict(kind="dtensor", micro=2, steps=3, save_at=2, load=(2, 2)),
}
TOL = dict(rtol=1e-5, atol=1e-6)
_cache: dict = {}


def _results():
    if not _cache:
        root = tempfile.mkdtemp(prefix="ds_pipe_3d_")
        payload = [dict(c, dir=f"{root}/{n}") if "save_at" in c else c for n, c in CASES.items()]
        per_rank = run_distributed(run_3d_cases, WORLD, payload, timeout=400)
        _cache.update({n: [per_rank[r][i] for r in range(WORLD)] for i, n in enumerate(CASES)})
        shutil.rmtree(root, ignore_errors=True)
    return _cache


def _slice(kind, name, full, model_rank, tp=2):
    """The piece of a reference parameter that model rank ``model_rank`` holds."""
    leaf = name.split(".", 1)[1]
    if kind == "megatron":
        rows = {"up_w": 0, "up_b": 0, "down_w": 1}.get(leaf)
    else:
        rows = {"up.weight": 0, "up.bias": 0, "down.weight": 1}.get(leaf)
    if rows is None:
        return full  # replicated over the model axis
    return full.chunk(tp, dim=rows)[model_rank]


@pytest.mark.timeout(420)
@pytest.mark.parametrize("name", list(CASES))
def test_3d_matches_one_process(name):
    case = CASES[name]
    got = _results()[name]
    ref = reference(case["kind"], batches(case["steps"], case["micro"] * 2), case.get("clip"))
    # DeepSpeed's layout: rank = pipe * 4 + data * 2 + model (the resumed run: data * 2 + model)
    pp, dp = case.get("load", (2, 2))
    assert [r["coord"] for r in got] == [(p, d, m) for p in range(pp) for d in range(dp) for m in range(2)]
    assert got[0]["groups"] == {"pipe": [0, 4], "data": [0, 2], "model": [0, 1]}
    want_losses = torch.tensor([s["loss"] for s in ref])
    for r in got:
        torch.testing.assert_close(torch.tensor(r["losses"]), want_losses, **TOL, msg=lambda m: f"{r['coord']}: {m}")
        if case.get("clip"):
            torch.testing.assert_close(torch.tensor(r["norms"]), torch.tensor([s["norm"] for s in ref]), **TOL)
            assert ref[0]["norm"] > case["clip"]  # the clipping acted
        _, _, model_rank = r["coord"]
        assert r["params"], r["coord"]
        for pname, value in r["params"].items():
            want = _slice(case["kind"], pname, ref[-1]["params"][pname], model_rank)
            assert value.shape == want.shape, (r["coord"], pname, value.shape, want.shape)
            torch.testing.assert_close(value, want, **TOL, msg=lambda m: f"{r['coord']} {pname}: {m}")
    # every reference parameter is held, and the split ones are split
    assert {n for r in got for n in r["params"]} == set(ref[0]["params"])
    up = "0.up_w" if case["kind"] == "megatron" else "0.up.weight"
    assert got[0]["params"][up].shape[0] == ref[0]["params"][up].shape[0] // 2
