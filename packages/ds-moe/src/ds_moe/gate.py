"""The router: DeepSpeed's ``TopKGate`` (GShard top-2, Switch top-1, general top-k) in a compact form.

DeepSpeed's gates return dense ``[tokens, experts, capacity]`` combine weights and dispatch masks, and its layer
moves tokens with two einsums over them: O(S*E*C) memory and work for what is k rows per token. Here the same
decisions (same softmax, argmax, Gumbel and uniform draws in the same order from the same generator, same
capacity, same drops, same locations) are kept as ``[tokens, k]`` tensors in a ``Routing``: the global expert of
each slot, whether it survived the capacity, its row in the expert's capacity buffer and its combine weight.
``Routing.dense()`` rebuilds DeepSpeed's tensors when a caller wants them (``TopKGate.forward`` does).

Differences from DeepSpeed, on purpose:
- the router runs in fp32 even under autocast (DeepSpeed's ``F.linear`` is autocast to bf16 there); Switch's
  "selective precision": bf16 logits flip near-tied routing decisions from step to step.
- with ``drop_tokens=False`` no capacity is computed or all-reduced (the dropless path has no buffer to size);
  ``Routing.dense()`` then uses this rank's largest expert count, DeepSpeed's value at ``ep_size`` 1.
- ``used_token`` with k > 1 is an error (DeepSpeed ignores it silently for top-2 and top-k).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import MoEError

NOISY_GATE_POLICIES = (None, "None", "Jitter", "RSample")

# one sampler per device, as DeepSpeed caches them; the draws come from torch's default generator
_uniform: dict = {}
_gumbel: dict = {}
_jitter: dict = {}


def multiplicative_jitter(x: Tensor, device: torch.device, epsilon: float = 1e-2) -> Tensor:
    """Multiply by uniform noise in [1-eps, 1+eps] (Switch Transformer); DeepSpeed's 'Jitter' policy."""
    if epsilon == 0:
        return x
    key = (device, epsilon)
    if key not in _jitter:
        _jitter[key] = torch.distributions.uniform.Uniform(torch.tensor(1.0 - epsilon, device=device),
                                                           torch.tensor(1.0 + epsilon, device=device)).rsample
    return x * _jitter[key](x.shape)


def gumbel_rsample(shape, device: torch.device) -> Tensor:
    if device not in _gumbel:
        _gumbel[device] = torch.distributions.gumbel.Gumbel(torch.tensor(0.0, device=device),
                                                            torch.tensor(1.0, device=device)).rsample
    return _gumbel[device](shape)


def _uniform_rsample(shape, device: torch.device) -> Tensor:
    if device not in _uniform:
        _uniform[device] = torch.distributions.uniform.Uniform(torch.tensor(0.0, device=device),
                                                               torch.tensor(1.0, device=device)).rsample
    return _uniform[device](shape)


def capacity_for(num_tokens: int, num_experts: int, capacity_factor: float, min_capacity: int) -> int:
    """ceil(tokens / experts * capacity_factor), at least ``min_capacity``.

    Rounded as DeepSpeed's ``_capacity`` rounds: it multiplies ``torch.tensor(capacity_factor)`` (the default
    dtype, float32) by the Python float ``tokens / experts``, so both are rounded to float32 and so is their
    product, before the ceil. Done here in Python on the same float32 values (a product of two float32 values is
    exact in a double, rounding it to float32 once is the float32 product): the same integer without building
    a tensor and reading it back. Under another default dtype (float64 does it in doubles) torch computes it, as
    DeepSpeed would. Callers pass ``capacity_factor * k`` for k > 1, as DeepSpeed's top-2 and top-k do."""
    default = torch.get_default_dtype()
    if default == torch.float32:
        cap = math.ceil(_float32(_float32(num_tokens / num_experts) * _float32(capacity_factor)))
    elif default == torch.float64:
        cap = math.ceil((num_tokens / num_experts) * float(capacity_factor))
    else:  # a CPU tensor: costs microseconds, never waits for a GPU
        cap = int(torch.ceil((num_tokens / num_experts) * torch.tensor(capacity_factor)).item())
    return max(cap, int(min_capacity))


def _float32(v: float) -> float:
    """v rounded to the nearest float32 (ties to even), as torch converts a Python float to float32."""
    return struct.unpack("f", struct.pack("f", v))[0]


@dataclass
class Routing:
    """Where each token goes. Shapes are ``[S, k]`` (S tokens, k slots), sorted by slot (first choice first).

    expert:   global expert index of each slot (int64)
    kept:     the slot survived the capacity (always True on the dropless path)
    location: row of the slot in its expert's capacity buffer (meaningful where kept)
    weight:   combine weight (fp32, 0 where dropped); differentiable with respect to the gate
    capacity: rows per expert buffer, or None on the dropless path
    l_aux:    the load-balancing loss (plus ``router_z_loss_coef * z_loss`` when that is set)
    exp_counts: tokens routed to each expert before drops (int64, detached), DeepSpeed's ``exp_counts``
    z_loss:   ST-MoE's router z-loss, mean(logsumexp(logits)^2), for logging
    """

    expert: Tensor
    kept: Tensor
    location: Tensor
    weight: Tensor
    capacity: Optional[int]
    num_experts: int
    l_aux: Tensor
    exp_counts: Tensor
    z_loss: Tensor

    def dense(self) -> tuple[Tensor, Tensor]:
        """DeepSpeed's ``(combine_weights [S, E, C], dispatch_mask [S, E, C])``."""
        S, k = self.expert.shape
        cap = self.capacity
        if cap is None:
            cap = int(self.exp_counts.max().item()) if self.exp_counts.numel() else 0
        combine = self.weight.new_zeros(S, self.num_experts, cap)
        tok = torch.arange(S, device=self.expert.device).unsqueeze(1).expand(S, k)
        keep = self.kept
        combine = combine.index_put((tok[keep], self.expert[keep], self.location[keep]), self.weight[keep])
        return combine, combine.bool()


def token_cumsum(mask: Tensor) -> Tensor:
    """Running count over the tokens (dim 0) of an [S, E] mask, per expert: each slot's position in its expert's
    buffer. Scanned as the transposed [E, S] along its inner dim: CUDA's scan along the outer dim of a narrow
    [S, E] tensor runs at a fraction of the memory bandwidth (2.7 ms per call at S 16,384, E 8 on an H200,
    a quarter of a 4-layer MoE step). Integer sums, so the result is exactly ``torch.cumsum(mask, dim=0)``."""
    if mask.dtype == torch.bool:
        mask = mask.long()  # torch.cumsum of a bool tensor counts in int64 too
    return torch.cumsum(mask.t().contiguous(), dim=1).t()


def _z_loss(logits: Tensor) -> Tensor:
    return torch.logsumexp(logits, dim=-1).pow(2).mean()


def top1gating(logits: Tensor, capacity_factor: float, min_capacity: int, used_token: Optional[Tensor] = None,
               noisy_gate_policy: Optional[str] = None, drop_tokens: bool = True,
               use_rts: bool = True) -> Routing:
    """Switch top-1: argmax of the softmax (of Gumbel-noised logits under 'RSample'), capacity drops by random
    priority (RTS) or by topk of the 0/1 mask, combine weight = the chosen expert's probability.
    l_aux = E * sum_e(mean gate prob_e * fraction of tokens whose first choice is e)."""
    if noisy_gate_policy == "RSample":
        logits_w_noise = logits + gumbel_rsample(logits.shape, device=logits.device)
    gates = F.softmax(logits, dim=1)
    S, E = gates.shape
    indices1 = torch.argmax(logits_w_noise if noisy_gate_policy == "RSample" else gates, dim=1)
    mask1 = F.one_hot(indices1, num_classes=E)
    if used_token is not None:
        mask1 = mask1 * used_token.reshape(-1, 1).to(mask1.dtype)
    exp_counts = mask1.sum(dim=0).detach()
    me = gates.mean(dim=0)
    ce = mask1.float().mean(dim=0)
    l_aux = torch.sum(me * ce) * E
    # DeepSpeed draws the RTS priorities whether or not it drops: drawing them here too keeps every later
    # random draw (other layers' noise) on the same stream as a DeepSpeed run with the same seed
    mask1_rand = mask1 * _uniform_rsample(mask1.shape, logits.device) if use_rts else mask1
    if drop_tokens:
        capacity = capacity_for(S, E, capacity_factor, min_capacity)
        if S < min_capacity:
            raise MoEError(f"top-1 gating got {S} tokens, fewer than min_capacity={min_capacity}: lower "
                           "min_capacity or pass more tokens (DeepSpeed asserts the same)")
        top_idx = torch.topk(mask1_rand, k=min(capacity, S), dim=0)[1]
        mask1 = mask1 * torch.zeros_like(mask1).scatter_(0, top_idx, 1)
    else:
        capacity = None
    locations1 = token_cumsum(mask1) - 1
    loc1 = torch.sum(locations1 * mask1, dim=1)
    kept = mask1.sum(dim=1) > 0
    weight = gates.gather(1, indices1.unsqueeze(1)).squeeze(1) * kept
    return Routing(indices1.unsqueeze(1), kept.unsqueeze(1), loc1.unsqueeze(1), weight.unsqueeze(1), capacity, E,
                   l_aux, exp_counts, _z_loss(logits))


def top2gating(logits: Tensor, capacity_factor: float, min_capacity: int, drop_tokens: bool = True,
               top2_2nd_expert_sampling: bool = True) -> Routing:
    """GShard top-2: first choice = argmax; second = argmax of the other logits (Gumbel-noised when
    ``top2_2nd_expert_sampling``); buffers filled first choices first, in token order; slots past
    capacity = ceil(S/E * 2cf) dropped; the two weights renormalised over what survived.
    l_aux = E^2 * mean_e(mean gate prob_e * fraction of first choices on e)."""
    z_loss = _z_loss(logits)  # before the Gumbel noise
    gates = F.softmax(logits, dim=1)
    S, E = gates.shape
    indices1 = torch.argmax(gates, dim=1)
    mask1 = F.one_hot(indices1, num_classes=E)
    if top2_2nd_expert_sampling:
        logits = logits + gumbel_rsample(logits.shape, device=logits.device)
    indices2 = torch.argmax(logits.masked_fill(mask1.bool(), float("-inf")), dim=1)
    mask2 = F.one_hot(indices2, num_classes=E)
    locations1 = token_cumsum(mask1) - 1
    locations2 = token_cumsum(mask2) - 1 + torch.sum(mask1, dim=0, keepdim=True)
    me = gates.mean(dim=0)
    ce = mask1.float().mean(dim=0)
    l_aux = torch.mean(me * ce) * E * E
    exp_counts = torch.sum(mask1 + mask2, dim=0).detach()
    if drop_tokens:
        capacity = capacity_for(S, E, capacity_factor * 2, min_capacity)
        mask1 = mask1 * torch.lt(locations1, capacity)
        mask2 = mask2 * torch.lt(locations2, capacity)
    else:
        capacity = None
    loc1 = torch.sum(locations1 * mask1, dim=1)
    loc2 = torch.sum(locations2 * mask2, dim=1)
    g1 = torch.sum(gates * mask1.float(), dim=1)
    g2 = torch.sum(gates * mask2.float(), dim=1)
    denom = torch.clamp(g1 + g2, min=torch.finfo(g1.dtype).eps)
    weight = torch.stack([g1 / denom, g2 / denom], dim=1)
    kept = torch.stack([mask1.sum(dim=1) > 0, mask2.sum(dim=1) > 0], dim=1)
    return Routing(torch.stack([indices1, indices2], dim=1), kept, torch.stack([loc1, loc2], dim=1), weight,
                   capacity, E, l_aux, exp_counts, z_loss)


def topkgating(logits: Tensor, k: int, capacity_factor: float, min_capacity: int,
               drop_tokens: bool = True) -> Routing:
    """Top-k (k > 2), DeepSpeed's ``topkgating`` with drop_policy 'probs': each expert keeps the
    capacity = ceil(S/E * k*cf) tokens with the largest gate values; the weights of a token's surviving slots
    are its gate values renormalised over them. l_aux = E^2/k * mean_e(mean prob_e * fraction of slots on e)."""
    gates = F.softmax(logits, dim=1)
    S, E = gates.shape
    top_gate, top_idx = torch.topk(gates, k=k, dim=1)
    mask = torch.zeros_like(gates, dtype=torch.bool).scatter_(1, top_idx, True)
    exp_counts = torch.sum(mask, dim=0).detach()
    me = gates.mean(dim=0)
    ce = mask.float().mean(dim=0)
    l_aux = torch.mean(me * ce) * E * E / k
    if drop_tokens:
        capacity = capacity_for(S, E, capacity_factor * k, min_capacity)
        masked = torch.zeros_like(gates).scatter(1, top_idx, top_gate)
        _, cap_idx = torch.topk(masked, k=min(capacity, S), dim=0, sorted=False)
        mask = mask & torch.zeros_like(gates, dtype=torch.bool).scatter_(0, cap_idx, True)
    else:
        capacity = None
    locations = token_cumsum(mask) - 1
    gates_masked = gates * mask
    gates_masked = gates_masked / torch.clamp(gates_masked.sum(dim=-1, keepdim=True),
                                              min=torch.finfo(gates.dtype).eps)
    return Routing(top_idx, mask.gather(1, top_idx), locations.gather(1, top_idx), gates_masked.gather(1, top_idx),
                   capacity, E, l_aux, exp_counts, _z_loss(logits))


def check_gate_args(model_dim: int, num_experts: int, k: int, capacity_factor: float, eval_capacity_factor: float,
                    min_capacity: int, noisy_gate_policy) -> None:
    if not isinstance(model_dim, int) or model_dim < 1:
        raise MoEError(f"hidden_size must be a positive int, got {model_dim!r}")
    if not isinstance(num_experts, int) or num_experts < 1:
        raise MoEError(f"num_experts must be a positive int, got {num_experts!r}")
    if not isinstance(k, int) or k < 1:
        raise MoEError(f"k (experts per token) must be a positive int, got {k!r}")
    if k > num_experts:
        raise MoEError(f"k={k} experts per token is more than num_experts={num_experts}")
    for name, cf in (("capacity_factor", capacity_factor), ("eval_capacity_factor", eval_capacity_factor)):
        if not isinstance(cf, (int, float)) or not math.isfinite(cf) or cf <= 0:
            raise MoEError(f"{name} must be a finite number > 0, got {cf!r} (use drop_tokens=False for no "
                           "capacity at all)")
    if not isinstance(min_capacity, int) or min_capacity < 0:
        raise MoEError(f"min_capacity must be an int >= 0, got {min_capacity!r}")
    if noisy_gate_policy not in NOISY_GATE_POLICIES:
        raise MoEError(f"noisy_gate_policy must be one of None, 'Jitter', 'RSample', got {noisy_gate_policy!r}")


class TopKGate(torch.nn.Module):
    """DeepSpeed's gate: an fp32 ``wg = Linear(model_dim, num_experts, bias=False)``, then top-1 (k=1), top-2
    (k=2) or top-k gating. ``capacity_factor`` applies in training, ``eval_capacity_factor`` in eval; noise
    ('Jitter' on the input, 'RSample' Gumbel on top-1's logits) only in training.

    ``forward(input)`` returns DeepSpeed's ``(l_aux, combine_weights, dispatch_mask, exp_counts)``;
    ``route(input)`` the compact ``Routing`` the MoE layer uses. ``router_z_loss_coef`` > 0 adds ST-MoE's
    z-loss (times the coefficient) into ``l_aux``; the raw value is in ``Routing.z_loss``.
    """

    def __init__(self, model_dim: int, num_experts: int, k: int = 1, capacity_factor: float = 1.0,
                 eval_capacity_factor: float = 1.0, min_capacity: int = 8, noisy_gate_policy: Optional[str] = None,
                 drop_tokens: bool = True, use_rts: bool = True, ep_group=None,
                 top2_2nd_expert_sampling: bool = True, router_z_loss_coef: float = 0.0) -> None:
        super().__init__()
        check_gate_args(model_dim, num_experts, k, capacity_factor, eval_capacity_factor, min_capacity,
                        noisy_gate_policy)
        if not isinstance(router_z_loss_coef, (int, float)) or router_z_loss_coef < 0:
            raise MoEError(f"router_z_loss_coef must be a number >= 0, got {router_z_loss_coef!r}")
        self.wg = torch.nn.Linear(model_dim, num_experts, bias=False).float()
        self.model_dim = model_dim
        self.num_experts = num_experts
        self.ep_group = ep_group
        self.k = k
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.min_capacity = min_capacity
        self.noisy_gate_policy = None if noisy_gate_policy == "None" else noisy_gate_policy
        self.drop_tokens = drop_tokens
        self.use_rts = use_rts
        self.top2_2nd_expert_sampling = top2_2nd_expert_sampling
        self.router_z_loss_coef = float(router_z_loss_coef)

    def _set_ep_group(self, ep_group) -> None:
        self.ep_group = ep_group

    def route(self, input: Tensor, used_token: Optional[Tensor] = None) -> Routing:
        if input.shape[-1] != self.model_dim:
            raise MoEError(f"gate input has hidden size {input.shape[-1]}, the gate was built for "
                           f"model_dim={self.model_dim}")
        if used_token is not None and self.k != 1:
            raise MoEError(f"used_token is only defined for top-1 gating (k=1), this gate has k={self.k}")
        cf = self.capacity_factor if self.training else self.eval_capacity_factor
        with torch.autocast(device_type=input.device.type, enabled=False):
            x = input.reshape(-1, self.model_dim).float()
            if self.noisy_gate_policy == "Jitter" and self.training:
                x = multiplicative_jitter(x, device=input.device)
            logits = F.linear(x, self.wg.weight.float())
            if self.k == 1:
                r = top1gating(logits, cf, self.min_capacity, used_token,
                               self.noisy_gate_policy if self.training else None, self.drop_tokens, self.use_rts)
            elif self.k == 2:
                r = top2gating(logits, cf, self.min_capacity, self.drop_tokens, self.top2_2nd_expert_sampling)
            else:
                r = topkgating(logits, self.k, cf, self.min_capacity, self.drop_tokens)
            if self.router_z_loss_coef:
                r.l_aux = r.l_aux + self.router_z_loss_coef * r.z_loss
        return r

    def forward(self, input: Tensor, used_token: Optional[Tensor] = None, use_tutel: bool = False):
        """DeepSpeed's call; ``use_tutel`` is accepted for its signature and ignored (no Tutel layout here)."""
        r = self.route(input, used_token)
        combine, dispatch = r.dense()
        return r.l_aux, combine, dispatch, r.exp_counts
