"""Quantized all-gather and reduce-scatter (ZeRO++'s qwZ and qgZ), over any ds-comm transport.

Both collectives send blockwise-quantized data (see :mod:`ds_comm.quantize`: int8 or int4 codes plus one fp32
scale per ``block_size`` elements) and dequantize on arrival. A shard travels as ONE uint8 message, a *row*::

    [ codes: payload_bytes(numel, bits) | zero pad to 4 bytes | fp32 scales: 4 * num_blocks ]

so codes and scales need a single collective, and a row is ``~numel`` bytes for int8 (``~numel / 2`` for int4)
instead of ``2 * numel`` (fp16/bf16) or ``4 * numel`` (fp32).

**All-gather** (qwZ, :func:`quantized_all_gather`): each rank quantizes its shard into a row; one all-gather of
the rows; every rank dequantizes all ``W`` rows, *its own included*. Its own shard therefore comes back
round-tripped (not exact), so the gathered tensor is bitwise identical on every rank -- what ZeRO-3 needs, as
every rank must run the forward pass with the same parameters.

**Reduce-scatter** (qgZ, :func:`quantized_reduce_scatter`): rank ``r`` ends with the mean (or sum) over ranks of
chunk ``r`` of their inputs. Dequantized pieces are always summed in fp32, in rank order, then divided by ``W``
when averaging, and rounded once to the output dtype.

- *Flat*: quantize each of the ``W`` destination chunks (blocks never cross a chunk); one all-to-all of rows;
  dequantize the ``W`` rows received and sum. Each rank sends ``(W - 1)`` rows.
- *Hierarchical* (``node_size=L`` with ``1 < L < W``; ``num_nodes = N = W / L``; rank ``r = node * L + local``):

  1. *Intra-node* all-to-all over ``transport.node_groups(L)[0]``: to local peer ``l'`` a rank sends the ``N``
     chunks destined for ranks ``(0, l'), (1, l'), ..., (N-1, l')``, quantized. The receiver dequantizes the
     ``L`` pieces for each of those chunks and sums them: the sum over its node of ``N`` chunks. Sent:
     ``(L - 1) * N`` rows, all within the node.
  2. *Inter-node* all-to-all over ``node_groups(L)[1]`` (the ranks with the same local index on every node): the
     partial sum for ``(n'', local)`` is re-quantized and sent to node ``n''``; the receiver dequantizes the
     ``N`` node sums of its own chunk and adds them. Sent: ``N - 1`` rows, all across nodes.

  The rank sends ``W - 1`` rows in all, like the flat version, but only ``N - 1`` of them cross nodes instead of
  ``W - L = (N - 1) * L``: inter-node volume is ``1/L`` of the flat version's. The price is a second
  quantization (of the node sums), so the error bound roughly doubles. ``node_size`` equal to 1 or to ``W``
  leaves one of the two steps a group of one rank, i.e. pure extra quantization error: both run the flat
  algorithm (bitwise identical to ``node_size=None``).

Non-finite input: a block holding NaN or inf on any rank becomes NaN in the result (that block only) on the
ranks that receive it -- never silently finite (see :mod:`ds_comm.quantize`). No host sync is spent detecting it,
so ``CommStats.nonfinite_calls`` is not updated.

Sizes and settings are cross-checked before any data moves (``check_sizes=True``): one all-reduce of 64-80 bytes
(a latency-bound round trip) compares the input and output sizes, ``bits``, ``block_size`` and ``node_size``
of every rank, so a mismatch raises ``ValueError`` on every rank instead of hanging or scrambling data.
``check_sizes=False`` skips that round trip for callers that guarantee agreement (e.g. a fixed bucket layout).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ._validation import check_float_tensor
from .quantize import check_quantization_args, dequantize_rows, num_blocks, payload_bytes, quantize_rows
from .stats import CommStats, global_stats, ring_allgather_bytes
from .transport import Transport, resolve_transport

_SCALE_ALIGN = 4  # fp32 scales start 4-byte aligned, so a row's scale bytes can be viewed as float32


@dataclasses.dataclass(frozen=True)
class _Row:
    """The wire layout of one quantized shard of ``numel`` elements."""

    numel: int
    bits: int
    block_size: int

    @property
    def num_blocks(self) -> int:
        return num_blocks(self.numel, self.block_size)

    @property
    def payload_bytes(self) -> int:
        return payload_bytes(self.numel, self.bits)

    @property
    def scales_offset(self) -> int:
        return -(-self.payload_bytes // _SCALE_ALIGN) * _SCALE_ALIGN

    @property
    def nbytes(self) -> int:
        return self.scales_offset + 4 * self.num_blocks

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Quantize each row of ``x`` ``(rows, numel)`` into a uint8 ``(rows, nbytes)`` wire row."""
        codes, scales = quantize_rows(x, self.bits, self.block_size)
        rows = torch.zeros(x.shape[0], self.nbytes, dtype=torch.uint8, device=x.device)
        rows[:, : self.payload_bytes] = codes.view(torch.uint8)
        rows[:, self.scales_offset :] = scales.view(torch.uint8)
        return rows

    def decode(self, rows: torch.Tensor) -> torch.Tensor:
        """fp32 ``(rows, numel)`` from wire rows ``(rows, nbytes)``."""
        codes = rows[:, : self.payload_bytes]
        scales = rows[:, self.scales_offset :].contiguous().view(torch.float32)
        return dequantize_rows(codes, scales, self.numel, self.bits, self.block_size)


def _sum_rows(values: torch.Tensor) -> torch.Tensor:
    """Sum fp32 ``(k, n)`` over ``k`` in index order: a fixed order keeps results reproducible on any device."""
    total = values[0].clone()
    for i in range(1, values.shape[0]):
        total += values[i]
    return total


def _check_pair(output: Any, input: Any, transport: Transport, op: str) -> None:
    check_float_tensor(input, "input", op, transport)
    check_float_tensor(output, "output", op, transport)
    if output.dtype != input.dtype:
        raise TypeError(f"{op}: output has dtype {output.dtype} but input has dtype {input.dtype}; they must match")
    if output.device != input.device:
        raise ValueError(f"{op}: output is on {output.device} but input is on {input.device}; they must match")


def _check_agreement(settings: dict[str, int], device: torch.device, transport: Transport, op: str) -> None:
    """One all-reduce (max of each value and of its negation) so every rank sees any disagreement and raises."""
    if transport.world_size == 1:
        return
    values = list(settings.values())
    probe = torch.tensor(values + [-v for v in values], dtype=torch.int64, device=device)
    transport.all_reduce(probe, "max")
    found = probe.tolist()
    k = len(values)
    differing = [
        f"{name} (this rank {transport.rank}: {mine}; smallest {-found[k + i]}, largest {found[i]})"
        for i, (name, mine) in enumerate(settings.items())
        if found[i] != -found[k + i]
    ]
    if differing:
        raise ValueError(
            f"{op}: ranks passed different values of {', '.join(differing)}. Every rank must pass tensors of the "
            "same sizes and the same bits, block_size and node_size."
        )


def _record(stats: CommStats | None, sent: int, baseline: int) -> None:
    for counter in (global_stats, stats) if stats is not None else (global_stats,):
        counter.record(sent, baseline)


def quantized_all_gather(
    output: torch.Tensor,
    input: torch.Tensor,
    group: Any = None,
    *,
    bits: int = 8,
    block_size: int = 2048,
    check_sizes: bool = True,
    stats: CommStats | None = None,
) -> torch.Tensor:
    """All-gather ``input`` from every rank into ``output`` through ``bits``-bit blockwise quantization.

    Like ``torch.distributed.all_gather_into_tensor``: ``output`` (same dtype and device as ``input``, any shape,
    ``world_size * input.numel()`` elements) receives rank ``j``'s shard, dequantized, at flat offset
    ``j * input.numel()``. Every shard, this rank's own included, is the dequantized quantization of the
    sender's ``input``, so ``output`` is bitwise identical on all ranks. One all-gather of ``(W - 1)`` rows per
    rank; see the module docstring for the wire format, NaN/inf and ``check_sizes``.

    Args:
        output, input: float32, float16 or bfloat16 dense tensors, on a device the group can send from.
        group: ``None`` (default process group, or one process), a ``ProcessGroup``, an mpi4py communicator or
            a :class:`~ds_comm.transport.Transport`.
        bits: 8 (int8) or 4 (int4). block_size: elements per fp32 scale (even for int4).
        stats: a :class:`CommStats` to record bytes into (``global_stats`` always is).
    """
    op = "quantized_all_gather"
    transport = resolve_transport(group)
    _check_pair(output, input, transport, op)
    check_quantization_args(bits, block_size, op)
    world, numel = transport.world_size, input.numel()
    if check_sizes:
        settings = {"input numel": numel, "output numel": output.numel(), "bits": bits, "block_size": block_size}
        _check_agreement(settings, input.device, transport, op)
    if output.numel() != world * numel:
        raise ValueError(
            f"{op}: output has {output.numel()} elements but must have world_size * input.numel() = "
            f"{world} * {numel} = {world * numel}"
        )
    if numel == 0:
        return output

    row = _Row(numel, bits, block_size)
    mine = row.encode(input.reshape(1, numel))
    gathered = torch.empty(world, row.nbytes, dtype=torch.uint8, device=input.device)
    transport.all_gather(gathered.view(-1), mine.view(-1))
    output.copy_(row.decode(gathered).reshape(output.shape))

    _record(stats, (world - 1) * row.nbytes, ring_allgather_bytes(numel * input.element_size(), world))
    return output




def quantized_reduce_scatter(
    output: torch.Tensor,
    input: torch.Tensor,
    group: Any = None,
    *,
    bits: int = 8,
    block_size: int = 2048,
    average: bool = True,
    node_size: int | None = None,
    check_sizes: bool = True,
    stats: CommStats | None = None,
) -> torch.Tensor:
    """Reduce-scatter ``input`` into ``output`` through ``bits``-bit blockwise quantization.

    Like ``torch.distributed.reduce_scatter_tensor``: ``input`` holds ``world_size`` chunks of
    ``output.numel()`` elements (flat order); rank ``r``'s ``output`` receives the mean over ranks (sum with
    ``average=False``) of their chunk ``r``, accumulated in fp32. ``node_size`` (ranks per node, dividing the
    world size) selects the hierarchical two-step algorithm that sends ``1/node_size`` of the flat version's
    bytes across nodes; see the module docstring for both algorithms, NaN/inf and ``check_sizes``.

    Args:
        output, input: float32, float16 or bfloat16 dense tensors of one dtype and device.
        group, bits, block_size, stats: as for :func:`quantized_all_gather`.
        average: divide the sum by the world size (default) or not.
        node_size: ``None`` for the flat algorithm; consecutive ranks ``[k * node_size, (k+1) * node_size)``
            form node ``k``.
    """
    op = "quantized_reduce_scatter"
    transport = resolve_transport(group)
    _check_pair(output, input, transport, op)
    check_quantization_args(bits, block_size, op)
    world, numel = transport.world_size, output.numel()
    if node_size is not None:
        if isinstance(node_size, bool) or not isinstance(node_size, int) or node_size < 1:
            raise ValueError(f"{op}: node_size must be a positive int or None, got {node_size!r}")
        if world % node_size:
            raise ValueError(
                f"{op}: node_size={node_size} does not divide the world size {world}: hierarchical "
                "reduce-scatter needs full, equal nodes"
            )
    if check_sizes:
        settings = {"input numel": input.numel(), "output numel": numel, "bits": bits, "block_size": block_size,
                    "node_size": node_size or 0}
        _check_agreement(settings, input.device, transport, op)
    if input.numel() != world * numel:
        raise ValueError(
            f"{op}: input has {input.numel()} elements but must have world_size * output.numel() = "
            f"{world} * {numel} = {world * numel}"
        )
    if numel == 0:
        return output

    row = _Row(numel, bits, block_size)
    chunks = input.reshape(world, numel)
    if node_size is None or node_size in (1, world):
        total = _flat(chunks, row, transport)
    else:
        total = _hierarchical(chunks, row, transport, node_size)
    if average:  # a true division (a 1-element tensor: CUDA would multiply by the reciprocal of a number)
        total /= torch.tensor([float(world)], device=total.device)
    output.copy_(total.view(output.shape))

    # Both algorithms send W - 1 rows from this rank (the hierarchical one sends fewer of them across nodes).
    _record(stats, (world - 1) * row.nbytes, ring_allgather_bytes(numel * input.element_size(), world))
    return output


def _flat(chunks: torch.Tensor, row: _Row, transport: Transport) -> torch.Tensor:
    send = row.encode(chunks)
    recv = torch.empty_like(send)
    transport.all_to_all(recv.view(-1), send.view(-1))
    return _sum_rows(row.decode(recv))


def _hierarchical(chunks: torch.Tensor, row: _Row, transport: Transport, node_size: int) -> torch.Tensor:
    intra, inter = transport.node_groups(node_size)
    num_nodes = transport.world_size // node_size
    if intra.world_size != node_size or inter.world_size != num_nodes:
        raise RuntimeError(
            f"node groups of sizes {intra.world_size} (intra) and {inter.world_size} (inter) do not match "
            f"node_size={node_size} and num_nodes={num_nodes}"
        )
    # Chunk of destination (node, local) sits at index node * L + local; regroup it by local index so the rows
    # for local peer l' -- chunks (0, l'), ..., (N-1, l') -- are consecutive.
    by_local = chunks.view(num_nodes, node_size, row.numel).transpose(0, 1).reshape(-1, row.numel)

    # Step 1, intra-node: recv[l, n''] is local peer l's chunk (n'', my local index).
    send = row.encode(by_local)
    recv = torch.empty_like(send)
    intra.all_to_all(recv.view(-1), send.view(-1))
    pieces = row.decode(recv).view(node_size, num_nodes, row.numel)
    node_sums = _sum_rows(pieces)  # node_sums[n''] = this node's sum of chunk (n'', my local index)

    # Step 2, inter-node: node n'' receives this node's sum of its chunk; recv[n] is node n's sum of mine.
    send = row.encode(node_sums)
    recv = torch.empty_like(send)
    inter.all_to_all(recv.view(-1), send.view(-1))
    return _sum_rows(row.decode(recv))
