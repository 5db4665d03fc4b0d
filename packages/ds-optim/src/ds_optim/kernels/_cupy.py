"""The CuPy backend: NVRTC-compiled CUDA kernels, zero-copy, on torch's current stream, no host sync.

The fast GPU path. Tensors go to the kernels as raw device pointers (no CuPy arrays, no DLPack handshakes, no
CuPy allocations in a step); launches go on ``torch.cuda.current_stream()`` (a cached ``ExternalStream`` per
stream handle), so they are ordered with the surrounding torch work. ``step``, ``grad_scale`` and
``found_inf`` stay on the device: bias corrections are computed in the kernel and ``found_inf`` makes it exit
early, so a step never waits on the GPU. Absent optional tensors are null pointers.

Kernels (``_cuda_src``) are compiled per device and per (update, param, grad, out) dtype combination at first
use, then cached in memory and by CuPy on disk (``$CUPY_CACHE_DIR``). Grids are one full wave: SMs x the
kernel's occupancy (blocks of 256 threads), grid-stride loops inside; elementwise kernels use 16-byte (fp32) /
8-byte (16-bit) accesses when every pointer is aligned to 4 elements, element accesses otherwise.

LAMB: three launches (moments + per-chunk norm partials, per-tensor reduce, apply); the chunk table of a layout
is uploaded once (synchronously, the first time a layout is seen) and cached with its scratch buffers. Two
calls with the same layout on different streams at the same time would share that scratch: don't.
"""

from __future__ import annotations

import functools
import warnings

import torch

try:
    import cupy as cp
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "the cupy optimizer kernels need CuPy: pip install 'ds-optim[cupy]' (or the cupy-cudaXXx wheel matching "
        "your CUDA)"
    ) from exc

import numpy as np

from . import _bits
from ._base import OptimizerKernels
from ._cuda_src import KERNELS, SOURCE

_THREADS = 256
_FALLBACK_BLOCKS_PER_SM = 4
_LAMB_CHUNK = 8192
_CTYPE = {torch.float32: "float", torch.bfloat16: "bf16_t", torch.float16: "f16_t"}
_HALVES = (torch.bfloat16, torch.float16)
_NULL = np.uint64(0)


class _Kernel:
    """A compiled kernel on one device and the size of a grid that fills the device once."""

    def __init__(self, function, device_index: int):
        self.function = function
        sms = torch.cuda.get_device_properties(device_index).multi_processor_count
        try:
            per_sm = cp.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(function.ptr, _THREADS, 0)
        except Exception:  # noqa: BLE001 # pragma: no cover - older CuPy / driver without the occupancy API
            per_sm = 0
        self.max_grid = sms * (per_sm if per_sm > 0 else _FALLBACK_BLOCKS_PER_SM)

    def grid(self, work_items: int) -> int:
        return max(1, min(self.max_grid, work_items))


@functools.cache
def _kernels(device_index: int, update: str, pt: str, gt: str, ot: str | None) -> dict[str, _Kernel]:
    defines = (f"#define PT {pt}\n#define GT {gt}\n#define OT {ot or 'float'}\n#define HAS_OUT {int(ot is not None)}\n"
               f"#define BLOCK {_THREADS}\n#define K_{update.upper()} 1\n")
    with cp.cuda.Device(device_index):
        module = cp.RawModule(code=defines + SOURCE, options=("-std=c++17", "--fmad=false"))
        return {name: _Kernel(module.get_function(name).kernel, device_index) for name in KERNELS[update]}


@functools.lru_cache(maxsize=64)
def _cupy_stream(handle: int, device_index: int):
    with warnings.catch_warnings():  # ExternalStream is deprecated in CuPy 14 but still the portable spelling
        warnings.simplefilter("ignore", DeprecationWarning)
        return cp.cuda.ExternalStream(handle, device_index)


def _ptr(t: torch.Tensor | None) -> np.uint64:
    return _NULL if t is None else np.uint64(t.data_ptr())


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    """step / grad_scale / found_inf as fp32 (callers keep the result alive until the launch is queued)."""
    return t if t is None or t.dtype == torch.float32 else t.float()


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _check(p, others) -> int:
    n = p.numel()
    for t in (p, *others):
        if t is None:
            continue
        if t.numel() != n:
            raise ValueError(f"ds-optim cupy kernels: length mismatch ({t.numel()} vs {n})")
        if not t.is_contiguous():
            raise ValueError("ds-optim cupy kernels need contiguous tensors")
        if t.device != p.device:
            raise ValueError(f"ds-optim cupy kernels: {t.device} tensor with params on {p.device}")
        if t.dtype not in _CTYPE:
            raise TypeError(f"ds-optim cupy kernels: unsupported dtype {t.dtype}")
    return n


def _vectorizable(*tensors) -> int:
    """1 when every tensor starts on a 4-element boundary (16 bytes for fp32, 8 for 16-bit)."""
    return int(all(t is None or t.data_ptr() % (4 * t.element_size()) == 0 for t in tensors))


def _launch(kernel: _Kernel, device_index: int, work_items: int, args) -> None:
    stream = _cupy_stream(torch.cuda.current_stream(device_index).cuda_stream, device_index)
    grid = (kernel.grid(work_items), 1, 1)
    if cp.cuda.runtime.getDevice() == device_index:
        kernel.function(grid, (_THREADS, 1, 1), args, 0, stream)
    else:
        with cp.cuda.Device(device_index):
            kernel.function(grid, (_THREADS, 1, 1), args, 0, stream)


class _LambPlan:
    """One LAMB layout on one device: the chunk table (one int64 tensor) and the per-call scratch."""

    def __init__(self, offsets, device: torch.device):
        lo, hi, tensor, first = _bits.lamb_chunks(offsets, _LAMB_CHUNK)
        self.chunks, self.count = len(lo), len(first) - 1
        table = np.concatenate([lo, hi, tensor, first]).astype(np.int64)
        self.table = torch.from_numpy(table).to(device)  # synchronous, once per layout
        self.partial = torch.empty(max(1, 2 * self.chunks), dtype=torch.float64, device=device)
        self.scaled = torch.empty(max(1, self.count), dtype=torch.float32, device=device)


class CupyKernels(OptimizerKernels):
    """CuPy/NVRTC kernels for fp32/bf16/fp16 params (any of those grads, optional bf16/fp16 copy-out) on CUDA."""

    name = "cupy"
    device_types = frozenset({"cuda"})

    def __init__(self) -> None:
        self._plans: dict[tuple, _LambPlan] = {}

    def supports(self, p, out=None):
        return p.device.type == "cuda" and p.dtype in _CTYPE and (out is None or out.dtype in _HALVES)

    @staticmethod
    def _get(update, device_index, p, g, out) -> dict[str, _Kernel]:
        return _kernels(device_index, update, _CTYPE[p.dtype], _CTYPE[g.dtype], None if out is None else _CTYPE[out.dtype])

    def adam(self, p, g, exp_avg, exp_avg_sq, step, *, lr, beta1, beta2, eps, weight_decay, adam_w_mode,
             bias_correction, maximize, grad_scale=None, found_inf=None, out=None):
        n = _check(p, (g, exp_avg, exp_avg_sq, out))
        if n == 0:
            return
        index = _index(p.device)
        kernel = self._get("adam", index, p, g, out)["adam"]
        l2 = weight_decay != 0 and not adam_w_mode
        decay = 1.0 - lr * weight_decay if (weight_decay != 0 and adam_w_mode) else 1.0
        lerp_w = np.float32(1 - beta1)
        lerp_small = bool(abs(lerp_w) < np.float32(0.5))
        if not lerp_small:
            lerp_w = lerp_w - np.float32(1.0)
        vec = _vectorizable(p, g, exp_avg, exp_avg_sq, out)
        step, grad_scale, found_inf = _f32(step), _f32(grad_scale), _f32(found_inf)
        _launch(kernel, index, -(-(n >> 2 if vec else n) // _THREADS), (
            _ptr(p), _ptr(g), _ptr(exp_avg), _ptr(exp_avg_sq), _ptr(out), np.int64(n), np.int32(vec),
            _ptr(step), _ptr(grad_scale), _ptr(found_inf),
            np.float32(-1.0 if maximize else 1.0), np.int32(l2), np.float32(weight_decay), np.float32(decay),
            lerp_w, np.int32(lerp_small), np.float32(beta2), np.float32(1 - beta2), np.float32(eps),
            np.float64(lr), np.float64(beta1), np.float64(beta2), np.int32(bool(bias_correction))))

    def lion(self, p, g, exp_avg, *, lr, beta1, beta2, weight_decay, maximize, grad_scale=None, found_inf=None,
             out=None):
        n = _check(p, (g, exp_avg, out))
        if n == 0:
            return
        index = _index(p.device)
        kernel = self._get("lion", index, p, g, out)["lion"]
        decay = 1.0 - lr * weight_decay if weight_decay != 0 else 1.0
        vec = _vectorizable(p, g, exp_avg, out)
        grad_scale, found_inf = _f32(grad_scale), _f32(found_inf)
        _launch(kernel, index, -(-(n >> 2 if vec else n) // _THREADS), (
            _ptr(p), _ptr(g), _ptr(exp_avg), _ptr(out), np.int64(n), np.int32(vec), _ptr(grad_scale),
            _ptr(found_inf), np.float32(-1.0 if maximize else 1.0), np.float32(decay), np.float32(-lr),
            np.float32(beta1), np.float32(1 - beta1), np.float32(beta2), np.float32(1 - beta2)))

    def adagrad(self, p, g, state_sum, step, *, lr, lr_decay, eps, weight_decay, maximize, grad_scale=None,
                found_inf=None, out=None):
        n = _check(p, (g, state_sum, out))
        if n == 0:
            return
        index = _index(p.device)
        kernel = self._get("adagrad", index, p, g, out)["adagrad"]
        vec = _vectorizable(p, g, state_sum, out)
        step, grad_scale, found_inf = _f32(step), _f32(grad_scale), _f32(found_inf)
        _launch(kernel, index, -(-(n >> 2 if vec else n) // _THREADS), (
            _ptr(p), _ptr(g), _ptr(state_sum), _ptr(out), np.int64(n), np.int32(vec), _ptr(step),
            _ptr(grad_scale), _ptr(found_inf), np.float32(-1.0 if maximize else 1.0),
            np.int32(weight_decay != 0), np.float32(weight_decay), np.float32(eps), np.float64(lr),
            np.float64(lr_decay)))

    def _plan(self, offsets, device) -> _LambPlan:
        key = (tuple(offsets), device)
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= 64:
                self._plans.pop(next(iter(self._plans)))
            plan = self._plans[key] = _LambPlan(offsets, device)
        return plan

    def lamb(self, p, g, exp_avg, exp_avg_sq, step, offsets, *, lr, beta1, beta2, eps, weight_decay,
             bias_correction, max_coeff, min_coeff, maximize, grad_scale=None, found_inf=None, out=None,
             coeffs=None):
        n = _check(p, (g, exp_avg, exp_avg_sq, out))
        if len(offsets) < 2:
            return
        if offsets[-1] != n:
            raise ValueError(f"LAMB offsets end at {offsets[-1]}, the range has {n} elements")
        if coeffs is not None and (coeffs.dtype != torch.float32 or not coeffs.is_contiguous()
                                   or coeffs.numel() < len(offsets) - 1):
            raise ValueError("LAMB coeffs must be a contiguous fp32 tensor with one element per tensor")
        index = _index(p.device)
        kernels = self._get("lamb", index, p, g, out)
        plan = self._plan(offsets, p.device)
        step, grad_scale, found_inf = _f32(step), _f32(grad_scale), _f32(found_inf)
        found = _ptr(found_inf)
        l2, wd, eps32 = np.int32(weight_decay != 0), np.float32(weight_decay), np.float32(eps)
        table, chunks = _ptr(plan.table), np.int64(plan.chunks)
        if plan.chunks:
            _launch(kernels["lamb_moments"], index, plan.chunks, (
                _ptr(p), _ptr(g), _ptr(exp_avg), _ptr(exp_avg_sq), table, chunks, _ptr(plan.partial),
                _ptr(grad_scale), found, np.float32(-1.0 if maximize else 1.0), np.float32(beta1),
                np.float32(1 - beta1), np.float32(beta2), np.float32(1 - beta2), eps32, l2, wd))
        _launch(kernels["lamb_coeffs"], index, plan.count, (
            table, chunks, np.int64(plan.count), _ptr(plan.partial), _ptr(plan.scaled), _ptr(coeffs),
            _ptr(step), found, np.float64(lr), np.float64(beta1), np.float64(beta2),
            np.int32(bool(bias_correction)), np.float32(min_coeff), np.float32(max_coeff)))
        if plan.chunks:
            _launch(kernels["lamb_apply"], index, plan.chunks, (
                _ptr(p), _ptr(exp_avg), _ptr(exp_avg_sq), _ptr(out), table, chunks, _ptr(plan.scaled), found,
                eps32, l2, wd))
