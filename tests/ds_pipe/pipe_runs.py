"""Every ds-pipe distributed scenario of a world size, run in one spawn and cached (rank start-up dominates the
CI time on 2 cores): the parity cases, the bad inputs, checkpoints and mixed precision. Test modules read their
cases' per-rank results from :func:`results`."""

from __future__ import annotations

import shutil
import tempfile

import torch.distributed as dist
from harness import run_distributed

from pipe_cases import _errors, _train
from pipe_more_cases import ckpt_case, prec_case

STEPS = 3

WORLD2 = {
    "1f1b-params": dict(stages=2, schedule="1f1b", micro=4, steps=STEPS, eval=True),
    "gpipe-uniform-ckpt": dict(stages=2, schedule="gpipe", micro=4, steps=STEPS, partition="uniform", ckpt=1),
    "1f1b-type": dict(stages=2, schedule="1f1b", micro=3, steps=2, partition="type:block|layernorm"),
    # one stage x 2-way data parallel: torch's single-stage pipeline, gradients averaged over the replicas
    "1stage-2dp": dict(stages=1, schedule="1f1b", micro=2, steps=2),
    # 2 chunks per rank: 7 layers in 4 chunks, rank 0 holds chunks 0 and 2, rank 1 chunks 1 and 3
    "interleaved-v2": dict(stages=2, virtual=2, schedule="interleaved", micro=4, steps=2, blocks=3,
                           partition="uniform", eval=True),
    "looped-bfs-v2": dict(stages=2, virtual=2, schedule="looped_bfs", micro=2, steps=2, blocks=3),
    "zero-bubble-v2": dict(stages=2, virtual=2, schedule="zero_bubble", micro=4, steps=2, blocks=3,
                           partition="uniform"),
    # V-shaped: rank 0 holds chunks 0 and 3 (the embedding and the head: the tie is on one rank), rank 1 1 and 2
    "zbv-v2": dict(stages=2, virtual=2, style="v", schedule="zbv", micro=4, steps=2, blocks=3, partition="uniform"),
    "dualpipev-v2": dict(stages=2, virtual=2, style="v", schedule="dualpipev", micro=4, steps=2, blocks=3,
                         partition="uniform"),
}
BAD2 = {
    "stages-not-dividing": dict(kind="module", stages=3, layers="layers"),
    "empty-stage": dict(kind="module", stages=2, layers="one", partition="uniform"),
    "tie-once": dict(kind="module", stages=2, layers="tie_once"),
    "schedule-needs-chunks": dict(kind="schedule", stages=2, schedule="zbv"),
    "schedule-unknown": dict(kind="schedule", stages=2, schedule="1f1f"),
    "dry-iterator": dict(kind="dry_iterator", stages=2),
}
WORLD4 = {
    "2x2-1f1b": dict(stages=2, schedule="1f1b", micro=2, steps=2, eval=True),
    "2x2-gpipe": dict(stages=2, schedule="gpipe", micro=2, steps=2),
    "4stages-1f1b": dict(stages=4, schedule="1f1b", micro=4, steps=2, blocks=3, partition="uniform"),
    "2x2-interleaved-v2": dict(stages=2, virtual=2, schedule="interleaved", micro=2, steps=2, blocks=3,
                               partition="uniform"),
    "4stages-zero-bubble-v2": dict(stages=4, virtual=2, schedule="zero_bubble", micro=4, steps=2, blocks=6,
                                   partition="uniform"),
}
# mixed precision and clipping, against pipe_more_cases.reference_mixed
FP16 = {"initial_scale_power": 8, "hysteresis": 1, "loss_scale_window": 2}
PREC2 = {
    "bf16-clip": dict(kind="prec", stages=2, dtype="bf16", clip=0.05, micro=4, steps=3),
    # stage 0's Poison layer overflows in step 0 only: stage 1 (finite gradients) must skip too
    "fp16-overflow": dict(kind="prec", stages=2, dtype="fp16", fp16=FP16, poison=2, micro=2, steps=4),
    "fp32-clip-1stage-2dp": dict(kind="prec", stages=1, dtype="fp32", clip=0.05, micro=2, steps=2),
}
PREC4 = {
    "bf16-2x2-clip": dict(kind="prec", stages=2, dtype="bf16", clip=0.05, micro=2, steps=2),
    "fp16-4stages-overflow": dict(kind="prec", stages=4, dtype="fp16", fp16=FP16, poison=4, micro=4, steps=3,
                                  clip=0.05),
}
# checkpoints: save after 2 steps, resume on other layouts, compare with an uninterrupted run (the reference)
CKPT2 = {
    "ckpt-2to2-and-1x2dp": dict(kind="ckpt", save_stages=2, load_stages=[2, 1], micro=4, steps=4, save_at=2,
                                gamma=0.5, partition="parameters"),
    # saved from 2 ranks x 2 chunks (interleaved), resumed on one chunk per rank
    "ckpt-interleaved-to-1f1b": dict(kind="ckpt", save_stages=2, virtual=2, schedule="interleaved", load_stages=[2, 1],
                                     micro=4, steps=3, save_at=2, gamma=0.5, blocks=3, partition="uniform"),
    # V-shaped chunks (rank 0: chunks 0 and 3, the tie's both uses), resumed looped-free on 2 stages
    "ckpt-zbv-to-1f1b": dict(kind="ckpt", save_stages=2, virtual=2, style="v", schedule="zbv", load_stages=[2],
                             micro=4, steps=3, save_at=2, gamma=0.5, blocks=3, partition="uniform"),
    "ckpt-bf16-2to1x2dp": dict(kind="ckpt", save_stages=2, load_stages=[1], micro=2, steps=3, save_at=2,
                               dtype="bf16", partition="uniform"),
}
CKPT4 = {
    "ckpt-2x2-to-4-and-1x4dp": dict(kind="ckpt", save_stages=2, load_stages=[4, 1], micro=4, steps=4, save_at=2,
                                    gamma=0.5, blocks=3, partition="uniform"),
}

CASES = {2: {**WORLD2, **BAD2, **PREC2, **CKPT2}, 4: {**WORLD4, **PREC4, **CKPT4}}
_cache: dict = {}


def _run(cases):
    out = []
    for case in cases:
        kind = case.get("kind")
        out.append(prec_case(case) if kind == "prec" else ckpt_case(case) if kind == "ckpt"
                   else _errors(case) if kind else _train(case))
        dist.barrier()
    return out


def results(world):
    """``{case name: [rank 0's result, rank 1's, ...]}``; checkpoint cases' directories stay until exit."""
    if world not in _cache:
        root = tempfile.mkdtemp(prefix=f"ds_pipe_ckpt{world}_")
        names = list(CASES[world])
        payload = [dict(case, dir=f"{root}/{name}") if case.get("kind") == "ckpt" else case
                   for name, case in CASES[world].items()]
        per_rank = run_distributed(_run, world, payload, timeout=300)
        _cache[world] = {n: [per_rank[r][i] for r in range(world)] for i, n in enumerate(names)}
        _cache[world]["__dirs__"] = {n: c["dir"] for n, c in zip(names, payload) if "dir" in c}
        import atexit
        atexit.register(shutil.rmtree, root, True)
    return _cache[world]
