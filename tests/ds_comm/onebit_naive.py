"""An independent, unpacked statement of the 1-bit allreduce math, for checking ds_comm against.

Written from the algorithm's definition with plain float tensors (no bit packing, no wire rows), so a bug in
ds_comm's packing or layout cannot hide by being repeated here.
"""

from __future__ import annotations

import math

import torch


def chunk_size(numel: int, world: int) -> int:
    per_rank = math.ceil(numel / world)
    return max(128, math.ceil(per_rank / 128) * 128)


def sgn(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 0, 1.0, -1.0)


def naive_onebit_allreduce(inputs, worker_errors, server_errors):
    """Returns (outputs, new_worker_errors, new_server_errors), all fp32; no state is modified."""
    world = len(inputs)
    numel = inputs[0].numel()
    chunk = chunk_size(numel, world)
    xs = [inp.reshape(-1).double() + we.double() for inp, we in zip(inputs, worker_errors)]
    scales = [x.norm() / math.sqrt(numel) for x in xs]
    compressed = [s * sgn(x) for s, x in zip(scales, xs)]
    new_worker = [(x - c).float() for x, c in zip(xs, compressed)]
    average = sum(compressed) / world
    out = torch.empty(numel, dtype=torch.float64)
    new_server = []
    for r in range(world):
        lo, hi = r * chunk, min((r + 1) * chunk, numel)
        se = server_errors[r].double().clone()
        if hi > lo:
            m = average[lo:hi] + se[: hi - lo]
            ss = m.norm() / math.sqrt(hi - lo)
            out[lo:hi] = ss * sgn(m)
            se[: hi - lo] = m - ss * sgn(m)
        new_server.append(se.float())
    return [out.float() for _ in range(world)], new_worker, new_server
