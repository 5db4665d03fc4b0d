"""Single-process simulation of the 1-bit allreduce: ``W`` ranks' inputs in, ``W`` results out.

It runs the same compute as the distributed call with the communication replaced by indexing, so a
distributed run can be checked against it exactly, and it lets users explore compression error offline
(e.g. how fast error feedback catches up on their own gradients) without starting processes.
"""

from __future__ import annotations

import torch

from ._layout import OnebitLayout
from .error_feedback import OnebitErrorFeedback
from .onebit import select_onebit_kernels


def simulate_compressed_allreduce(
    inputs: list[torch.Tensor],
    error_feedbacks: list[OnebitErrorFeedback] | None = None,
    *,
    average: bool = True,
    backend: str = "torch",
    divisor: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """Results the ``len(inputs)`` ranks of :func:`~ds_comm.compressed_allreduce` would get (new tensors).

    ``error_feedbacks`` (one per simulated rank) are updated as the distributed call would update them;
    pass the same list again to simulate the next call. ``backend`` picks the kernels as in
    :func:`~ds_comm.compressed_allreduce` (``"torch"``, the reference, by default), which makes this the
    conformance check of a kernel backend: same inputs, same results as the torch kernels. ``divisor``: the
    preconditioner every rank passes (see :func:`~ds_comm.compressed_allreduce`).
    """
    world = len(inputs)
    if world == 0:
        raise ValueError("simulate_compressed_allreduce needs at least one input")
    numel = inputs[0].numel()
    if any(t.numel() != numel for t in inputs):
        raise ValueError(f"all simulated ranks must pass the same number of elements, got {[t.numel() for t in inputs]}")
    if error_feedbacks is None:
        error_feedbacks = [OnebitErrorFeedback() for _ in range(world)]
    if len(error_feedbacks) != world:
        raise ValueError(f"got {len(error_feedbacks)} error-feedback states for {world} ranks")
    kernels = select_onebit_kernels(inputs[0].device, backend)
    layouts = [OnebitLayout(numel, world, r) for r in range(world)]
    for ef, layout, t in zip(error_feedbacks, layouts, inputs):
        if not ef.is_bound:
            ef._allocate(layout, t.device)
    flats = [t.reshape(-1).clone() for t in inputs]
    if divisor is not None:
        divisor = divisor.reshape(-1).float()
    if numel == 0:
        return flats
    row = layouts[0].row_bytes
    sends = []
    for r in range(world):
        send = torch.empty((world, row), dtype=torch.uint8, device=flats[r].device)
        kernels.compress_worker(flats[r], error_feedbacks[r]._residuals()[0], layouts[r], send, divisor=divisor)
        sends.append(send)
    recvs = [torch.stack([sends[j][r] for j in range(world)]) for r in range(world)]
    server_rows = []
    for r in range(world):
        server_row = torch.empty(row, dtype=torch.uint8, device=flats[r].device)
        kernels.compress_server(recvs[r], error_feedbacks[r]._residuals()[1], layouts[r], server_row)
        server_rows.append(server_row)
    gathered = torch.stack(server_rows)
    outputs = []
    for r in range(world):
        worker_error, server_error, nonfinite_count = error_feedbacks[r]._residuals()
        kernels.finish(flats[r], worker_error, server_error, recvs[r], gathered.clone(), layouts[r], average,
                       nonfinite_count, divisor=divisor)
        outputs.append(flats[r].view_as(inputs[r]))
    return outputs
