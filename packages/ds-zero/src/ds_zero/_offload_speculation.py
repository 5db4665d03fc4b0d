"""The speculative offload step's kept copies (``offload_optimizer.speculative_step``; ``_offload_pipeline``'s
module doc says when chunks speculate and what ``step()`` does with them).

Before a speculative chunk's Adam kernel runs, what the kernel overwrites on the host -- the chunk's range of the
fp32 master, of both moments and of the 16-bit copy-out -- is copied into one host pool of at most
``speculation_gib`` bytes, made at the first speculative window and reused window after window. A chunk gets its
byte range of the pool when it is handed to the worker (the autograd thread, in backward); the worker writes the
copy before the kernel; :meth:`KeptCopies.restore` copies it back when the step changes or skips. The copies run
through ds-optim's ``OptimizerKernels.copy`` (Numba's threads; torch's copy would run on one thread under
torchrun's ``OMP_NUM_THREADS=1``, which made the speculative step slower than waiting on the H200).
"""

from __future__ import annotations

import torch

#: each kept range starts at a multiple of this many bytes in the pool (any dtype's view, whole cache lines)
ALIGN = 64


def aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def live_ranges(optimizer, fbucket, lo: int, hi: int) -> list[torch.Tensor]:
    """What the step of elements ``[lo, hi)`` of CPUAdam's flat bucket ``fbucket`` overwrites on the host: the
    master, each moment and the 16-bit copy-out."""
    out = optimizer._out_for(fbucket, lo, hi)
    live = [fbucket.param_flat[lo:hi]] + [flat[lo:hi] for _name, flat in sorted(fbucket.states.items())]
    return live + ([out] if out is not None else [])


def nbytes_kept(live: list[torch.Tensor]) -> int:
    return sum(aligned(t.numel() * t.element_size()) for t in live)


class KeptCopies:
    """The pool and this window's kept copies: one owner for both (see the module doc)."""

    def __init__(self) -> None:
        self.pool: torch.Tensor | None = None
        #: bytes of the pool handed out in this window (the autograd thread, at submit)
        self.used = 0
        #: chunk index -> ``[(live range, kept copy)]``, written by the worker before the chunk's kernel
        self.copies: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def reserve(self, nbytes: int, budget: int, pool_bytes: int) -> int | None:
        """A byte offset for a chunk's copy of ``nbytes``, or None when it does not fit ``budget`` (the chunk then
        waits for ``step()``). ``pool_bytes``: what every chunk would need, the pool's size if below the budget."""
        if self.used + nbytes > budget:
            return None
        if self.pool is None:
            self.pool = torch.empty(min(pool_bytes, budget), dtype=torch.uint8)
        at, self.used = self.used, self.used + nbytes
        return at

    def keep(self, index: int, kernels, live: list[torch.Tensor], at: int) -> None:
        """Copy ``live`` into the pool from byte ``at`` on (the worker, before chunk ``index``'s kernel)."""
        if self.pool is None:
            raise RuntimeError("ds_zero offload: a chunk's speculative copy was kept before the pool was made "
                               "(KeptCopies.reserve comes first)")
        pairs = []
        for t in live:
            n = t.numel() * t.element_size()
            kept = self.pool[at:at + n].view(t.dtype)
            kernels.copy(kept, t)
            pairs.append((t, kept))
            at += aligned(n)
        self.copies[index] = pairs

    def restore(self, index: int, kernels) -> bool:
        """Copy chunk ``index``'s kept values back; False when it has none (cancelled before it started)."""
        pairs = self.copies.get(index)
        for live, kept in pairs or ():
            kernels.copy(live, kept)
        return pairs is not None

    def end_window(self) -> None:
        self.used = 0
        self.copies.clear()
