"""The experts of one rank: DeepSpeed's ``Experts`` (deep copies of any module) and ``GroupedExperts``.

DeepSpeed copies the ``expert`` module once per local expert (every expert starts from the same weights; the
router breaks the symmetry) and marks each parameter ``allreduce = False`` and ``group_name =
'ep_size_<n>'``: those two attributes are how optimizers, ZeRO and ``is_moe_param`` tell expert parameters
from dense ones. Both classes here do the same.

When the expert is an ``FFNExpert`` (Linear -> activation -> Linear), the layer keeps the copies stacked in
``GroupedExperts``: one ``[local_experts, out, in]`` tensor per Linear, run by ``_gemm.GroupedFFN`` (two grouped
GEMMs for all local experts, a written-out backward) on both token paths, instead of a Python loop. Any other module runs
through ``Experts`` with a loop, as in DeepSpeed. ``expert_state_dict(i)`` / ``load_expert_state_dict(i, sd)``
give both the same per-expert view (the keys of the template module), which checkpoints use.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import _gemm
from .errors import MoEError

_aten = torch.ops.aten


# module-level functions, not lambdas: modules holding an Activation stay picklable (torch.save of a module)
def _gelu_tanh(h: Tensor) -> Tensor:
    return F.gelu(h, approximate="tanh")


def _gelu_grad(g: Tensor, h: Tensor) -> Tensor:
    return _aten.gelu_backward(g, h)


def _gelu_tanh_grad(g: Tensor, h: Tensor) -> Tensor:
    return _aten.gelu_backward(g, h, approximate="tanh")


def _relu_grad(g: Tensor, h: Tensor) -> Tensor:
    return _aten.threshold_backward(g, h, 0)


def _silu_grad(g: Tensor, h: Tensor) -> Tensor:
    return _aten.silu_backward(g, h)


# each with the backward op its autograd node runs, so GroupedFFN's backward is autograd's bit for bit
ACTIVATIONS = {
    "gelu": _gemm.Activation("gelu", F.gelu, _gelu_grad),
    "gelu_tanh": _gemm.Activation("gelu_tanh", _gelu_tanh, _gelu_tanh_grad),
    "relu": _gemm.Activation("relu", F.relu, _relu_grad),
    "silu": _gemm.Activation("silu", F.silu, _silu_grad),
}


def _activation(name: str) -> _gemm.Activation:
    if name not in ACTIVATIONS:
        raise MoEError(f"activation {name!r} is not one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class FFNExpert(nn.Module):
    """An expert ``out(act(fc(x)))`` with ``fc = Linear(hidden, ffn_hidden)``, ``out = Linear(ffn_hidden,
    hidden)``. Passed as ``MoE(expert=FFNExpert(...))`` it lets the layer use batched and grouped GEMMs."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int, activation: str = "gelu", bias: bool = True):
        super().__init__()
        self.activation = activation
        self._act = _activation(activation)
        self.fc = nn.Linear(hidden_size, ffn_hidden_size, bias=bias)
        self.out = nn.Linear(ffn_hidden_size, hidden_size, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self._act(self.fc(x)))


def _mark(params, group_name: Optional[str]) -> None:
    for p in params:
        p.allreduce = False
        p.group_name = group_name


class Experts(nn.Module):
    """DeepSpeed's ``Experts``: ``deepspeed_experts`` = a ModuleList of copies of ``expert``."""

    def __init__(self, expert: nn.Module, num_local_experts: int = 1, expert_group_name: Optional[str] = None):
        super().__init__()
        self.deepspeed_experts = nn.ModuleList([copy.deepcopy(expert) for _ in range(num_local_experts)])
        self.num_local_experts = num_local_experts
        _mark(self.deepspeed_experts.parameters(), expert_group_name)

    def forward(self, inputs: Tensor) -> Tensor:
        """DeepSpeed's call: ``[ep_size, local_experts, capacity, M]`` (or any ``[..., local, C, M]`` chunked
        on dim 1) -> the same shape."""
        chunks = inputs.chunk(self.num_local_experts, dim=1)
        outs = []
        for chunk, expert in zip(chunks, self.deepspeed_experts):
            out = expert(chunk)
            if isinstance(out, tuple):
                out = out[0]  # DeepSpeed ignores a returned bias the same way
            outs.append(out)
        return torch.cat(outs, dim=1)

    def forward_capacity(self, x: Tensor) -> Tensor:
        """``[local_experts, T, M]`` -> ``[local_experts, T, M]``."""
        return self(x.unsqueeze(0)).squeeze(0)

    def forward_sorted(self, x: Tensor, counts: Tensor, counts_host: Optional[list] = None,
                       backend: Optional[str] = None, trailing_rows: bool = False) -> Tensor:
        """Rows of x sorted by local expert, ``counts[i]`` rows for expert i -> outputs in the same order.
        Every expert runs, also on 0 rows (zero gradients, not none, whatever the routing). ``trailing_rows``:
        x may go on past the last group (dropped slots); those rows are not computed and come back as zeros."""
        sizes = list(counts_host if counts_host is not None else counts.tolist())
        tail = x.shape[0] - sum(sizes) if trailing_rows else 0
        parts = x.split(sizes + [tail] if tail else sizes, dim=0)
        outs = []
        for part, expert in zip(parts, self.deepspeed_experts):
            out = expert(part)
            outs.append(out[0] if isinstance(out, tuple) else out)
        if tail:
            outs.append(outs[0].new_zeros((tail,) + tuple(outs[0].shape[1:])))
        return torch.cat(outs, dim=0)

    def expert_state_dict(self, i: int) -> dict:
        return {k: v.detach() for k, v in self.deepspeed_experts[i].state_dict().items()}

    def load_expert_state_dict(self, i: int, sd: dict) -> None:
        self.deepspeed_experts[i].load_state_dict(sd)

    def expert_param_slots(self, i: int) -> list:
        """``[(key, parameter, index)]`` of expert i; index None: the whole parameter is expert i's."""
        return [(k, p, None) for k, p in self.deepspeed_experts[i].named_parameters()]


class GroupedExperts(nn.Module):
    """``num_local_experts`` copies of an ``FFNExpert`` stacked: ``weight1 [n, ffn, M]``, ``bias1 [n, ffn]``,
    ``weight2 [n, M, ffn]``, ``bias2 [n, M]`` (nn.Linear's layout per expert).

    ``keep_cast_weights`` (an attribute, default True): under autocast the backward reuses the forward's 16-bit
    casts of the weights (memory: one 16-bit copy of this layer's expert weights until its backward); False
    recasts them in the backward instead (``_gemm.GroupedFFN``), for a model whose peak is the weights.

    ``recompute_activation`` (an attribute, default False): False keeps the activation's output [tokens, ffn]
    (16-bit) until the layer's backward, as autograd and DeepSpeed's experts do; True recomputes it there from
    the pre-activation instead (one [tokens, ffn] tensor less per layer, one elementwise pass more)."""

    def __init__(self, expert: FFNExpert, num_local_experts: int = 1, expert_group_name: Optional[str] = None,
                 gemm_backend: Optional[str] = None, keep_cast_weights: bool = True,
                 recompute_activation: bool = False):
        super().__init__()
        self.keep_cast_weights = keep_cast_weights
        self.recompute_activation = recompute_activation
        if not isinstance(expert, FFNExpert):
            raise MoEError(f"GroupedExperts stacks FFNExpert modules, got {type(expert).__name__}")
        n = num_local_experts
        self.num_local_experts = n
        self.activation = expert.activation
        self._act = _activation(expert.activation)
        self.gemm_backend = gemm_backend
        self.weight1 = nn.Parameter(expert.fc.weight.detach().clone().unsqueeze(0).repeat(n, 1, 1))
        self.weight2 = nn.Parameter(expert.out.weight.detach().clone().unsqueeze(0).repeat(n, 1, 1))
        self.bias1 = (nn.Parameter(expert.fc.bias.detach().clone().unsqueeze(0).repeat(n, 1))
                      if expert.fc.bias is not None else None)
        self.bias2 = (nn.Parameter(expert.out.bias.detach().clone().unsqueeze(0).repeat(n, 1))
                      if expert.out.bias is not None else None)
        _mark(self.parameters(), expert_group_name)

    def forward_capacity(self, x: Tensor) -> Tensor:
        """``[n, T, M]`` -> ``[n, T, M]``: the sorted path with T rows for every expert."""
        n, T, M = x.shape
        counts = torch.full((n,), T, dtype=torch.int64, device=x.device)
        return self.forward_sorted(x.reshape(n * T, M), counts, [T] * n).reshape(n, T, M)

    def forward(self, inputs: Tensor) -> Tensor:
        """DeepSpeed's ``Experts`` call shape ``[ep, n, C, M]``."""
        ep, n, C, M = inputs.shape
        y = self.forward_capacity(inputs.transpose(0, 1).reshape(n, ep * C, M))
        return y.reshape(n, ep, C, M).transpose(0, 1)

    def forward_sorted(self, x: Tensor, counts: Tensor, counts_host: Optional[list] = None,
                       backend: Optional[str] = None, trailing_rows: bool = False) -> Tensor:
        """Rows sorted by local expert (``counts`` rows each) -> outputs in the same order, through
        ``GroupedFFN`` (grouped GEMM or a loop; see ``_gemm``).

        ``trailing_rows``: x may go on past the last group (the capacity path's dropped slots, sorted last).
        Their outputs and input gradients are zeros: the grouped GEMM runs them as one more group against zero
        weights (no host sync: the row count stays on the device), the loop slices them off (it needs the counts
        on the host anyway) and pads its output with zero rows. Callers rely on the zeros (``_dispatch``)."""
        H, M = self.weight1.shape[1], self.weight1.shape[2]
        b = _gemm.choose_backend(x, M, H, backend or self.gemm_backend)
        x = x.to(_gemm.compute_dtype(x))
        sizes = None
        if x.shape[0] == 0:  # an expert-parallel rank that received no token at all: nothing for a kernel
            b = "loop"
        if b == "loop":
            sizes = counts_host if counts_host is not None else counts.tolist()
            tail = x.shape[0] - sum(sizes) if trailing_rows else 0
            if tail:
                y = _gemm.GroupedFFN.apply(x[: x.shape[0] - tail], self.weight1, self.bias1, self.weight2,
                                           self.bias2, counts, self._act, b, sizes, self.keep_cast_weights, False,
                                           self.recompute_activation)
                return F.pad(y, (0, 0, 0, tail))
        return _gemm.GroupedFFN.apply(x, self.weight1, self.bias1, self.weight2, self.bias2, counts, self._act, b,
                                      sizes, self.keep_cast_weights, trailing_rows and b == "grouped_mm",
                                      self.recompute_activation)

    _KEYS = (("fc.weight", "weight1"), ("fc.bias", "bias1"), ("out.weight", "weight2"), ("out.bias", "bias2"))

    def expert_state_dict(self, i: int) -> dict:
        return {k: getattr(self, a)[i].detach() for k, a in self._KEYS if getattr(self, a) is not None}

    def expert_param_slots(self, i: int) -> list:
        """``[(key, parameter, index)]`` of expert i: row ``index`` of each stacked parameter."""
        return [(k, getattr(self, a), i) for k, a in self._KEYS if getattr(self, a) is not None]

    def load_expert_state_dict(self, i: int, sd: dict) -> None:
        want = {k for k, a in self._KEYS if getattr(self, a) is not None}
        if set(sd) != want:
            raise MoEError(f"expert state has keys {sorted(sd)}, this FFN expert has {sorted(want)}")
        with torch.no_grad():
            for k, a in self._KEYS:
                if k in sd:
                    dst = getattr(self, a)[i]
                    if sd[k].shape != dst.shape:
                        raise MoEError(f"expert state {k!r} has shape {tuple(sd[k].shape)}, expected "
                                       f"{tuple(dst.shape)}")
                    dst.copy_(sd[k])
