"""The DDP comm hook of the compressed optimizers (its own module: DDP checks the hook's annotations at
runtime, which ``from __future__ import annotations`` would turn into strings)."""

import torch
import torch.distributed as dist


def compression_aware_hook(optimizer, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: average in full precision when the optimizer needs it, else pass local grads through."""
    buffer = bucket.buffer()
    if optimizer.needs_grad_allreduce():
        transport = optimizer.transport
        transport.all_reduce(buffer, "sum")
        buffer.div_(transport.world_size)
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future(devices=[buffer.device] if buffer.is_cuda else None)
    fut.set_result(buffer)
    return fut
