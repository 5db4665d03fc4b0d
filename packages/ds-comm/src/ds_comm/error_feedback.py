"""Error-feedback state of the 1-bit compressed allreduce, checkpointable.

1-bit compression keeps what it could not send and adds it to the next call's input, which is what makes
sign compression converge like full precision (the "error feedback" of 1-bit SGD / 1-bit Adam). There are two
residuals: the *worker error* (each rank's own compression residual, one fp32 value per element) and the
*server error* (the residual of re-compressing the averaged chunk this rank serves, one value per element of
that chunk). Both must survive a checkpoint for a resumed run to continue exactly where it stopped.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ._layout import OnebitLayout
from ._validation import check_same_numel_across_ranks
from .transport import Transport

logger = logging.getLogger("ds_comm")

_STATE_VERSION = 1


class OnebitErrorFeedback:
    """Worker and server residuals for one tensor (or one DDP bucket) of the 1-bit allreduce.

    Created empty; the first :func:`~ds_comm.compressed_allreduce` call binds it to that tensor's size, device
    and the group's world size (checking, with one tiny collective, that every rank passed the same size).
    Later calls must pass a tensor of the same size: use one state per tensor or bucket.

    Checkpoints:

    - :meth:`state_dict` / :meth:`load_state_dict`: this rank's residuals, for resuming bit-for-bit on the same
      world size (save one file per rank). Loaded on a *different* world size, the residuals are **reset** to
      zero with a logged warning: a rank's own residual has no counterpart in another layout.
    - :meth:`full_state_dict` (collective): a world-size-independent form, the mean worker residual and the
      whole server residual. Loaded on any world size it is **resharded** (logged): every rank starts from
      the mean worker residual, which keeps the pending correction of the average exact, and serves its
      slice of the server residual.
    """

    # layout, worker_error, server_error and nonfinite_count are None together (unbound) or set together (by
    # _allocate or load_state_dict); _residuals() gives the three tensors of a bound state, typed as set.
    worker_error: torch.Tensor | None
    server_error: torch.Tensor | None
    layout: OnebitLayout | None
    nonfinite_count: torch.Tensor | None

    def __init__(self) -> None:
        self._clear()

    def _clear(self) -> None:
        """The unbound state (what ``__init__`` makes; ``load_state_dict`` starts from it)."""
        self.worker_error = None
        self.server_error = None
        self.layout = None
        #: calls whose input held NaN/inf on some rank (the residuals were left untouched); a device tensor,
        #: updated without a host sync
        self.nonfinite_count = None
        self._full_state: dict[str, Any] | None = None
        # set by load_state_dict: the loaded residuals may follow the first tensor to its device
        self._relocatable = False

    # -- binding ----------------------------------------------------------------------------------------
    def bind(self, tensor: torch.Tensor, transport: Transport, op: str) -> OnebitLayout:
        """Attach to ``tensor`` (first call) or check that ``tensor`` matches what this state was made for."""
        numel, world, rank = tensor.numel(), transport.world_size, transport.rank
        layout = self.layout
        if layout is not None and (layout.world_size, layout.rank) != (world, rank):
            raise ValueError(
                f"{op}: this error-feedback state belongs to rank {layout.rank} of {layout.world_size}, but it is "
                f"used on rank {rank} of {world}; load_state_dict() a checkpoint to move it to another group"
            )
        if layout is not None and layout.numel != numel:
            raise ValueError(
                f"{op}: this error-feedback state was created for a tensor of {layout.numel} elements but got "
                f"{numel}; use one OnebitErrorFeedback per tensor (or per DDP bucket)"
            )
        if layout is None:
            check_same_numel_across_ranks(numel, tensor.device, transport, op)
            layout = OnebitLayout(numel, world, rank)
            self._allocate(layout, tensor.device)
        if self._residuals()[0].device != tensor.device and self._relocatable:
            self.to(tensor.device)
        self._relocatable = False
        worker_error = self._residuals()[0]
        if worker_error.device != tensor.device:
            raise ValueError(
                f"{op}: the tensor is on {tensor.device} but its error-feedback state lives on "
                f"{worker_error.device}; keep one state per device"
            )
        return layout

    def _residuals(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(worker_error, server_error, nonfinite_count)`` of a bound state."""
        worker, server, count = self.worker_error, self.server_error, self.nonfinite_count
        if worker is None or server is None or count is None:
            raise RuntimeError("this OnebitErrorFeedback is not bound to a tensor yet (the first "
                               "compressed_allreduce or load_state_dict binds it)")
        return worker, server, count

    def _allocate(self, layout: OnebitLayout, device: torch.device) -> None:
        self.layout = layout
        self.worker_error = torch.zeros(layout.numel, dtype=torch.float32, device=device)
        self.server_error = torch.zeros(layout.chunk, dtype=torch.float32, device=device)
        self.nonfinite_count = torch.zeros((), dtype=torch.int64, device=device)
        if self._full_state is not None:
            self._reshard_from_full(layout, self._full_state)
            self._full_state = None

    @property
    def is_bound(self) -> bool:
        return self.layout is not None

    def reset(self) -> None:
        """Zero both residuals (keeps the binding)."""
        if self.worker_error is not None:
            worker, server, _ = self._residuals()
            worker.zero_()
            server.zero_()

    def rescale_(self, factor: torch.Tensor) -> None:
        """Multiply both residuals elementwise by ``factor`` (one value per element of the whole tensor).

        For callers that compress ``x / d`` with a divisor ``d`` that changes between calls: the residuals are
        in units of the old ``d``, and ``factor = d_old / d_new`` carries them over to the new one unchanged
        in the original units."""
        if self.layout is None:
            return
        layout = self.layout
        if factor.shape != (layout.numel,):
            raise ValueError(f"OnebitErrorFeedback.rescale_: factor has shape {tuple(factor.shape)}, expected "
                             f"({layout.numel},)")
        worker, server, _ = self._residuals()
        worker.mul_(factor)
        lo, valid = layout.rank * layout.chunk, layout.my_valid
        server[:valid].mul_(factor[lo : lo + valid])

    # -- checkpoints ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """This rank's residuals (references, as ``torch.optim`` does; ``torch.save`` copies them)."""
        if self.layout is None:
            return {"version": _STATE_VERSION, "format": "rank", "bound": False}
        return {
            "version": _STATE_VERSION,
            "format": "rank",
            "bound": True,
            "numel": self.layout.numel,
            "world_size": self.layout.world_size,
            "rank": self.layout.rank,
            "worker_error": self.worker_error,
            "server_error": self.server_error,
        }

    def full_state_dict(self, transport: Transport) -> dict[str, Any]:
        """Collective: a world-size-independent state (mean worker residual, whole server residual)."""
        if self.layout is None:
            return {"version": _STATE_VERSION, "format": "full", "bound": False}
        layout = self.layout
        worker_error, server_error, _ = self._residuals()
        mean_worker = worker_error.clone()
        transport.all_reduce(mean_worker, "sum")
        mean_worker /= layout.world_size
        server = torch.empty(layout.padded, dtype=torch.float32, device=server_error.device)
        transport.all_gather(server, server_error)
        return {
            "version": _STATE_VERSION,
            "format": "full",
            "bound": True,
            "numel": layout.numel,
            "world_size": layout.world_size,
            "mean_worker_error": mean_worker,
            "server_error": server[: layout.numel].clone(),
        }

    def load_state_dict(self, state: dict[str, Any], *, world_size: int, rank: int) -> None:
        """Load :meth:`state_dict` or :meth:`full_state_dict` output for rank ``rank`` of ``world_size``.

        Same world size and a per-rank state: exact. Different world size: reset (per-rank state) or
        resharded (full state), each with a logged warning.
        """
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise ValueError(
                f"not a ds_comm OnebitErrorFeedback state dict (version {state.get('version') if isinstance(state, dict) else None!r}, "
                f"expected {_STATE_VERSION})"
            )
        self._clear()
        if not state.get("bound"):
            return
        numel = int(state["numel"])
        saved_world = int(state["world_size"])
        if state["format"] == "full":
            if saved_world != world_size:
                logger.warning(
                    "ds_comm: 1-bit error feedback resharded from world size %d to %d (every rank starts from "
                    "the saved mean worker residual and its slice of the server residual)",
                    saved_world, world_size,
                )
            self._full_state = state
            self._allocate(OnebitLayout(numel, world_size, rank), torch.device("cpu"))
            self._relocatable = True
            return
        if state["format"] != "rank":
            raise ValueError(f"unknown OnebitErrorFeedback state format {state['format']!r}")
        if saved_world != world_size:
            logger.warning(
                "ds_comm: 1-bit error feedback RESET to zero: the checkpoint was saved with world size %d, this "
                "run has %d, and per-rank residuals cannot be resharded (save full_state_dict() to reshard)",
                saved_world, world_size,
            )
            self._allocate(OnebitLayout(numel, world_size, rank), torch.device("cpu"))
            self._relocatable = True
            return
        if int(state["rank"]) != rank:
            raise ValueError(
                f"this error-feedback state dict was saved by rank {state['rank']}, but is loaded on rank {rank}; "
                "load each rank's own file"
            )
        layout = OnebitLayout(numel, world_size, rank)
        worker, server = state["worker_error"], state["server_error"]
        if worker.shape != (numel,) or server.shape != (layout.chunk,):
            raise ValueError(
                f"corrupt OnebitErrorFeedback state: worker_error {tuple(worker.shape)} / server_error "
                f"{tuple(server.shape)}, expected ({numel},) / ({layout.chunk},)"
            )
        self.layout = layout
        self.worker_error = worker_error = worker.detach().to(torch.float32).clone()
        self.server_error = server.detach().to(torch.float32).clone()
        self.nonfinite_count = torch.zeros((), dtype=torch.int64, device=worker_error.device)
        self._relocatable = True

    def _reshard_from_full(self, layout: OnebitLayout, state: dict[str, Any]) -> None:
        worker_error, server_error, _ = self._residuals()
        device = worker_error.device
        worker_error.copy_(state["mean_worker_error"].to(device, torch.float32))
        full_server = state["server_error"].to(device, torch.float32)
        start = layout.rank * layout.chunk
        piece = full_server[start : start + layout.chunk]
        server_error[: piece.numel()].copy_(piece)

    def to(self, device: torch.device | str) -> OnebitErrorFeedback:
        """Move the residuals (e.g. after loading a checkpoint on the CPU)."""
        if self.worker_error is not None:
            worker, server, count = self._residuals()
            self.worker_error = worker.to(device)
            self.server_error = server.to(device)
            self.nonfinite_count = count.to(device)
        return self
