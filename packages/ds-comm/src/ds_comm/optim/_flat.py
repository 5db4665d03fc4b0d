"""Flat buckets for the compressed optimizers: one contiguous buffer per (param group, dtype).

The compressed optimizers send one 1-bit collective per bucket (not one per parameter, DeepSpeed's 1-bit Adam
pattern), so each bucket keeps its params, grads and fp32 states contiguous: params are copied in and
re-pointed at construction (``p.data`` becomes a view), grads are copied in each step unless they already are
views of the flat grad buffer (they are re-pointed so the next backward accumulates there).
"""

from __future__ import annotations

import torch


class FlatBucket:
    def __init__(self, params: list[torch.nn.Parameter], state_names: tuple[str, ...]):
        self.params = params
        self.device, self.dtype = params[0].device, params[0].dtype
        self.offsets = [0]
        for p in params:
            self.offsets.append(self.offsets[-1] + p.numel())
        total = self.offsets[-1]
        self.param_flat = torch.empty(total, dtype=self.dtype, device=self.device)
        self.grad_flat = torch.zeros(total, dtype=self.dtype, device=self.device)
        self.grad_views = []
        with torch.no_grad():
            for p, lo, hi in zip(params, self.offsets, self.offsets[1:]):
                view = self.param_flat[lo:hi].view_as(p)
                view.copy_(p)
                p.data = view
                self.grad_views.append(self.grad_flat[lo:hi].view_as(p))
        self.states = {name: torch.zeros(total, dtype=torch.float32, device=self.device) for name in state_names}

    @property
    def numel(self) -> int:
        return self.offsets[-1]

    def view(self, flat: torch.Tensor, i: int) -> torch.Tensor:
        return flat[self.offsets[i] : self.offsets[i + 1]].view_as(self.params[i])

    def gather_grads(self) -> torch.Tensor:
        """The flat grad buffer holding this step's grads; a missing grad counts as zero (every rank must
        send the same bucket in the compressed collective, whatever its local grads)."""
        dst, src = [], []
        for i, p in enumerate(self.params):
            g = p.grad
            if g is self.grad_views[i]:
                continue
            if g is None:
                self.grad_views[i].zero_()
                continue
            if g.is_sparse:
                raise RuntimeError("ds_comm compressed optimizers do not support sparse gradients")
            dst.append(self.grad_views[i])
            src.append(g)
            if g._base is None and not g.requires_grad:
                p.grad = self.grad_views[i]
        if src:
            torch._foreach_copy_(dst, src)
        return self.grad_flat
