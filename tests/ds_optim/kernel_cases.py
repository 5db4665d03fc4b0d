"""Cases and checks shared by the kernel conformance suite and the standalone GPU check (``gpu_kernel_check.py``).

A case is an update with hyper-parameters (``CASES``), a param dtype and a length. Inputs are built on the CPU
from a seed (random values plus edge values: +-0, subnormals, large, +-inf, NaN in params and grads) and copied
to the backend's device; the reference is ``TorchKernels`` on the CPU (float64 bias corrections, torch's CPU
ops), and every backend must agree with it (``check_close``):

- fp32 tensors: ``rtol=1e-6, atol=1e-7`` (~8 ulps). Kernels follow the reference's op order and its fused
  multiply-adds, so most elements agree to the bit; the slack covers torch's CPU ``Tensor.sqrt`` (MKL VML,
  not always correctly rounded, where kernels use IEEE sqrt), LAMB norms summed in a different order, and
  the torch reference run on CUDA gets 10x more (``LOOSE``): it computes bias corrections in fp32 from
  ``float32(beta2)`` (~1e-5 relative in ``1 - beta2**t``), where the reference on the CPU and the kernels use
  float64;
- bf16/fp16 tensors: at most one unit in the last place of the 16-bit type (an fp32 result a few ulps away
  can round the other way);
- NaN exactly where the reference has NaN, infinities equal.
"""

from __future__ import annotations

import dataclasses

import torch
from ds_optim.kernels import TorchKernels

RTOL, ATOL = 1e-6, 1e-7
LOOSE = {"rtol": 1e-5, "atol": 1e-6}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SIZES = (0, 1, 7, 1000, 4099)

_ADAM = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.1, "adam_w_mode": True,
         "bias_correction": True, "maximize": False}
_LAMB = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-6, "weight_decay": 0.01, "bias_correction": True,
         "max_coeff": 10.0, "min_coeff": 0.01, "maximize": False}
_LION = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.99, "weight_decay": 0.0, "maximize": False}
_ADAGRAD = {"lr": 1e-2, "lr_decay": 0.0, "eps": 1e-10, "weight_decay": 0.0, "maximize": False}

#: case name -> (update, hyper-parameters)
CASES = {
    "adamw": ("adam", _ADAM),
    "adam_l2": ("adam", {**_ADAM, "adam_w_mode": False}),
    "adam_nobc_max_wd0": ("adam", {**_ADAM, "weight_decay": 0.0, "bias_correction": False, "maximize": True}),
    "adam_beta1_low": ("adam", {**_ADAM, "beta1": 0.3, "adam_w_mode": False}),  # lerp weight >= 0.5 branch
    "lion": ("lion", _LION),
    "lion_wd_max": ("lion", {**_LION, "weight_decay": 0.1, "maximize": True}),
    "adagrad": ("adagrad", _ADAGRAD),
    "adagrad_decay_wd_max": ("adagrad", {**_ADAGRAD, "lr_decay": 0.05, "weight_decay": 0.1, "maximize": True}),
    "lamb": ("lamb", _LAMB),
    "lamb_nobc_wd0_max": ("lamb", {**_LAMB, "weight_decay": 0.0, "bias_correction": False, "maximize": True}),
}
STATES = {"adam": ("exp_avg", "exp_avg_sq"), "lion": ("exp_avg",), "adagrad": ("state_sum",),
          "lamb": ("exp_avg", "exp_avg_sq")}


def edge_values(dtype: torch.dtype) -> list[float]:
    """+-0, a subnormal of the dtype, large finite values, +-inf and NaN."""
    tiny = {torch.float32: 1e-40, torch.bfloat16: 1e-39, torch.float16: 3e-6}[dtype]
    large = {torch.float32: 1e30, torch.bfloat16: 1e30, torch.float16: 6e4}[dtype]
    return [0.0, -0.0, tiny, -tiny, large, -large, float("inf"), float("-inf"), float("nan")]


def lamb_offsets(n: int) -> list[int]:
    """Several tensors: [0, a) with the edge values, a zero tensor [a, b), an empty one, then [b, n)."""
    if n < 4:
        return [0, n]
    a, b = n // 3, n // 3 + n // 4
    return [0, a, b, b, n]


@dataclasses.dataclass
class Inputs:
    p: torch.Tensor
    states: dict[str, torch.Tensor]
    offsets: list[int] | None

    def clone(self, device="cpu") -> Inputs:
        return Inputs(self.p.to(device, copy=True), {k: v.to(device, copy=True) for k, v in self.states.items()},
                      self.offsets)


def make_inputs(update: str, n: int, dtype: torch.dtype, seed: int = 0, edges: bool = True) -> Inputs:
    gen = torch.Generator().manual_seed(seed)
    p = torch.randn(n, generator=gen)
    offsets = lamb_offsets(n) if update == "lamb" else None
    if edges:
        vals = torch.tensor(edge_values(dtype))
        limit = offsets[1] if offsets else n  # LAMB: edges in the first tensor only, the others stay finite
        k = min(len(vals), limit)
        p[:k] = vals[:k]
    if offsets and len(offsets) > 2:
        p[offsets[1]:offsets[2]] = 0.0  # a tensor of zeros: ||p|| = 0, trust ratio 1
    states = {}
    for name in STATES[update]:
        if name == "exp_avg":
            states[name] = torch.randn(n, generator=gen) * 0.1
        else:
            states[name] = torch.rand(n, generator=gen) * 0.01
    return Inputs(p.to(dtype), states, offsets)


def make_grad(n: int, dtype: torch.dtype, seed: int, edges: bool = True, limit: int | None = None) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 + seed)
    g = torch.randn(n, generator=gen)
    if edges:
        vals = torch.tensor(edge_values(dtype)).roll(3)
        lo = min(4, n)
        hi = min(lo + len(vals), n if limit is None else limit)
        if hi > lo:
            g[lo:hi] = vals[: hi - lo]
    return g.to(dtype)


def run_update(kernels, update: str, x: Inputs, g: torch.Tensor, step: torch.Tensor, hp: dict, *,
               grad_scale=None, found_inf=None, out=None, coeffs=None) -> None:
    extra = {"grad_scale": grad_scale, "found_inf": found_inf, "out": out}
    s = x.states
    if update == "adam":
        kernels.adam(x.p, g, s["exp_avg"], s["exp_avg_sq"], step, **hp, **extra)
    elif update == "lion":
        kernels.lion(x.p, g, s["exp_avg"], **hp, **extra)
    elif update == "adagrad":
        kernels.adagrad(x.p, g, s["state_sum"], step, **hp, **extra)
    elif update == "lamb":
        kernels.lamb(x.p, g, s["exp_avg"], s["exp_avg_sq"], step, x.offsets, **hp, **extra, coeffs=coeffs)
    else:
        raise ValueError(update)


# -- comparisons --------------------------------------------------------------------------------------------------


def _ordered(bits16: torch.Tensor) -> torch.Tensor:
    """16-bit float patterns -> integers whose differences count ulps (+0 and -0 both map to 0)."""
    b = bits16.to(torch.int32) & 0xFFFF
    mag = b & 0x7FFF
    return torch.where(b >= 0x8000, -mag, mag)


def mismatch(actual: torch.Tensor, expected: torch.Tensor, rtol: float | None = None,
             atol: float | None = None) -> str | None:
    """None if ``actual`` agrees with ``expected`` (see the module doc), else a description of the first bad element.

    ``rtol``/``atol`` (fp32 only) default to ``RTOL``/``ATOL``.
    """
    rtol = RTOL if rtol is None else rtol
    atol = ATOL if atol is None else atol
    actual, expected = actual.detach().cpu(), expected.detach().cpu()
    if actual.dtype != expected.dtype or actual.shape != expected.shape:
        return f"dtype/shape {actual.dtype}{tuple(actual.shape)} != {expected.dtype}{tuple(expected.shape)}"
    a, e = actual.float(), expected.float()
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    if not torch.equal(nan_a, nan_e):
        i = int((nan_a != nan_e).nonzero()[0])
        return f"NaN mismatch at {i}: got {a[i].item()!r}, expected {e[i].item()!r}"
    ok = ~nan_e
    if expected.dtype == torch.float32:
        inf_bad = (torch.isinf(e) | torch.isinf(a)) & (a != e) & ok
        tol = atol + rtol * e.abs()
        diff = (a - e).abs()
        bad = inf_bad | ((diff > tol) & ok & ~torch.isinf(e))
    else:
        dist = (_ordered(actual.view(torch.int16)) - _ordered(expected.view(torch.int16))).abs()
        bad = (dist > 1) & ok
    if bad.any():
        i = int(bad.nonzero()[0])
        return (f"{int(bad.sum())} of {a.numel()} elements differ; first at {i}: got {a[i].item()!r}, "
                f"expected {e[i].item()!r}")
    return None


def copy_mismatch(out: torch.Tensor, p_new: torch.Tensor) -> str | None:
    """``out`` must be ``p_new`` rounded to out's dtype, bit for bit (any NaN for NaN). Applies when the params
    are fp32 or of out's dtype; otherwise out is the fp32 result rounded, which p_new no longer holds."""
    out, p_new = out.detach().cpu(), p_new.detach().cpu()
    want = p_new.to(out.dtype)
    nan_o, nan_w = torch.isnan(out.float()), torch.isnan(want.float())
    bad = (out.view(torch.int16) != want.view(torch.int16)) & ~(nan_o & nan_w)
    if bad.any():
        i = int(bad.nonzero()[0])
        return f"out[{i}] = {out[i].item()!r}, p_new rounds to {want[i].item()!r} ({int(bad.sum())} differ)"
    return None


REFERENCE = TorchKernels()
