"""The compute of the 1-bit allreduce, behind one interface with a pure-torch reference implementation.

The algorithm (see :func:`ds_comm.compressed_allreduce`) alternates compute and communication; these are the
three compute steps. ``divisor`` (optional, fp32, the tensor's size): compress ``buffer / divisor`` and decode
back times ``divisor`` -- the preconditioned compression of the compressed optimizers, fused into the kernels
so it costs two reads of ``divisor`` instead of two extra passes over ``buffer``; the rounding is exactly that
of dividing first and multiplying after. A kernel backend implements them; the torch one here is the reference
that every other backend (the CuPy one in ``_onebit_cupy``) must agree with, and it runs on any device.

Wire rows: ``send``/``recv`` tensors are ``(world_size, row_bytes)`` uint8; row ``j`` holds ``chunk // 8``
bytes of packed signs then a header whose first 4 bytes are the fp32 scale (see ``_layout``).
"""

from __future__ import annotations

import abc
import math

import torch

from ._layout import OnebitLayout
from ._packing import pack_signs, sign_pm1, signs_times


class OnebitKernels(abc.ABC):
    name: str

    @abc.abstractmethod
    def compress_worker(self, buffer: torch.Tensor, worker_error: torch.Tensor, layout: OnebitLayout,
                        send: torch.Tensor, divisor: torch.Tensor | None = None) -> None:
        """Pack the signs of ``x = buffer [/ divisor] + worker_error`` (zero-padded) into ``send``'s rows, and
        write the worker scale ``||x|| / sqrt(numel)`` into every row's header."""

    @abc.abstractmethod
    def compress_server(self, recv: torch.Tensor, server_error: torch.Tensor, layout: OnebitLayout,
                        send: torch.Tensor) -> None:
        """From every worker's signs and scale for this rank's chunk, form ``m = mean_j(scale_j * sign_j) +
        server_error`` (zero past the tensor's end), and pack its signs and scale ``||m|| / sqrt(valid)`` into
        the single row ``send``."""

    @abc.abstractmethod
    def finish(self, buffer: torch.Tensor, worker_error: torch.Tensor, server_error: torch.Tensor,
               recv: torch.Tensor, gathered: torch.Tensor, layout: OnebitLayout, average: bool,
               nonfinite_count: torch.Tensor, divisor: torch.Tensor | None = None) -> None:
        """Decode the gathered server rows into ``buffer`` (times ``divisor``) and commit both residuals
        (``buffer`` still holds the input: the worker residual is recomputed from it).

        If any worker or server scale is non-finite (NaN/inf in some rank's input), the residuals are left as
        they were, ``buffer`` is filled with NaN on every rank and ``nonfinite_count`` (0-d int64) is
        incremented, all without a host sync.
        """


def header_scales(rows: torch.Tensor, layout: OnebitLayout) -> torch.Tensor:
    """The fp32 scale in each row's header, shape ``(rows,)``."""
    cb = layout.chunk_bytes
    return rows[:, cb : cb + 4].contiguous().view(torch.float32).view(-1)


class TorchOnebitKernels(OnebitKernels):
    """Reference implementation in torch ops. Deterministic; any device."""

    name = "torch"

    def _compensated(self, buffer: torch.Tensor, worker_error: torch.Tensor, layout: OnebitLayout,
                     divisor: torch.Tensor | None) -> torch.Tensor:
        x = torch.zeros(layout.padded, dtype=torch.float32, device=buffer.device)
        if divisor is not None:
            buffer = buffer / divisor  # fp32 (divisor is), rounded as the kernels round it
        torch.add(buffer, worker_error, out=x[: layout.numel])
        return x

    def compress_worker(self, buffer, worker_error, layout, send, divisor=None):
        x = self._compensated(buffer, worker_error, layout, divisor)
        scale = torch.linalg.vector_norm(x) / math.sqrt(layout.numel)
        cb = layout.chunk_bytes
        send[:, :cb] = pack_signs(x).view(layout.world_size, cb)
        send[:, cb : cb + 4] = scale.reshape(1).view(torch.uint8)

    def _server_chunk(self, recv, server_error, layout):
        scales = header_scales(recv, layout)
        m = signs_times(recv[:, : layout.chunk_bytes], scales).sum(dim=0).div_(layout.world_size)
        m += server_error
        m[layout.my_valid :] = 0
        return m

    def compress_server(self, recv, server_error, layout, send):
        m = self._server_chunk(recv, server_error, layout)
        valid = layout.my_valid
        scale = torch.linalg.vector_norm(m) / math.sqrt(valid) if valid else m.new_zeros(())
        cb = layout.chunk_bytes
        send[:cb] = pack_signs(m)
        send[cb : cb + 4] = scale.reshape(1).view(torch.uint8)

    def finish(self, buffer, worker_error, server_error, recv, gathered, layout, average, nonfinite_count,
               divisor=None):
        worker_scales = header_scales(recv, layout)
        server_scales = header_scales(gathered, layout)
        all_finite = torch.isfinite(worker_scales).all() & torch.isfinite(server_scales).all()

        # On the CPU reading the flag costs nothing; on other devices select without a host sync.
        known = bool(all_finite) if all_finite.device.type == "cpu" else None

        def commit(state, new):
            if known is None:
                state.copy_(torch.where(all_finite, new, state))
            elif known:
                state.copy_(new)

        m = self._server_chunk(recv, server_error, layout)
        new_server = m.sub_(sign_pm1(m).mul_(server_scales[layout.rank]))
        new_server[layout.my_valid :] = 0
        commit(server_error, new_server)

        x = self._compensated(buffer, worker_error, layout, divisor)[: layout.numel]
        commit(worker_error, x.sub_(sign_pm1(x).mul_(worker_scales[layout.rank])))

        out = signs_times(gathered[:, : layout.chunk_bytes], server_scales).view(-1)[: layout.numel]
        if not average:
            out = out * layout.world_size
        if divisor is not None:
            out = out * divisor
        if known is None:
            out = torch.where(all_finite, out, torch.nan)
        elif not known:
            out.fill_(torch.nan)
        buffer.copy_(out)
        nonfinite_count += (~all_finite).to(torch.int64)
