"""DeepSpeed's FLOPs profiler (``deepspeed.profiling.flops_profiler``) on ``torch.utils.flop_counter``.

How it counts: :class:`torch.utils.flop_counter.FlopCounterMode` sees every aten op the model runs and adds the
op's FLOPs to each module on the stack at that moment (its module tracker follows the hierarchy through forward
and backward), so a module's FLOPs include its children's. Module hooks time each module's forward (latency,
the device synchronized around it when the model is on an accelerator). Counted: matrix multiplications
(``mm``, ``addmm``, ``bmm``, ``baddbmm``, ``linear``), convolutions and attention (``scaled_dot_product_attention``
on every backend, the CPU kernel included, which torch's table lacks). These are multiply-accumulates, so
``MACs = FLOPs / 2``. Elementwise ops (norms, activations, softmax, residual adds) are not counted; DeepSpeed
counts some of them through patched ``torch.nn.functional`` calls -- on a transformer they are well under 1%.

Per module: params (trainable, as DeepSpeed), MACs, FLOPs, forward latency, FLOPS (= FLOPs / latency) and the
number of calls. A container that is never called itself (``nn.ModuleList``) gets the sums of its children.
The report (:meth:`FlopsProfiler.print_model_profile`): a summary, the top ``top_modules`` modules at each depth up
to ``module_depth`` by params, MACs and latency, and (``detailed``) the table of every module to
``module_depth``, printed and written to ``output_file``.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from ._report import (duration_to_string, flops_to_string, macs_to_string, number_to_string, params_to_string,
                      render_profile)

__all__ = ["FlopsProfiler", "get_model_profile", "ModuleProfile", "number_to_string", "macs_to_string",
           "flops_to_string", "params_to_string", "duration_to_string", "flop_counter_mapping"]


def _cpu_sdpa(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_sdpa_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


def flop_counter_mapping() -> dict[Any, Any]:
    """Formulas added to torch's table: the CPU flash-attention kernels (torch counts the CUDA ones only)."""
    aten = torch.ops.aten
    mapping: dict[Any, Any] = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_sdpa
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _cpu_sdpa_backward
    return mapping


_warmed = False


def counter_mode() -> FlopCounterMode:
    """A silent :class:`FlopCounterMode` with :func:`flop_counter_mapping`."""
    global _warmed
    if not _warmed:
        # the first op dispatched through a FlopCounterMode in a process pays a one-off setup (about a second:
        # torch's compile-disabled dispatch wrapper); pay it here, not inside the first module timed
        _warmed = True
        with FlopCounterMode(display=False):
            torch.mm(torch.ones(1, 1), torch.ones(1, 1))
    return FlopCounterMode(display=False, custom_mapping=flop_counter_mapping())


class ModuleProfile:
    """One module's numbers: ``name`` (dotted path, ``""`` for the root), ``type``, ``depth`` (root 0),
    ``params``, ``flops``, ``macs``, ``latency`` (seconds, summed over ``calls`` forward calls)."""

    __slots__ = ("name", "type", "depth", "params", "flops", "latency", "calls", "children")

    def __init__(self, name: str, type_name: str, depth: int, params: int) -> None:
        self.name, self.type, self.depth, self.params = name, type_name, depth, params
        self.flops, self.latency, self.calls = 0, 0.0, 0
        self.children: list[ModuleProfile] = []

    @property
    def macs(self) -> int:
        return self.flops // 2

    @property
    def flops_per_second(self) -> float:
        return self.flops / self.latency if self.latency > 0 else 0.0

    def __repr__(self) -> str:
        return (f"ModuleProfile({self.name or '<root>'}: {self.type}, params={self.params}, flops={self.flops}, "
                f"latency={self.latency:.6f}s, calls={self.calls})")


def _device_of(model: torch.nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


class FlopsProfiler:
    """DeepSpeed's ``FlopsProfiler(model, ds_engine=None, recompute_fwd_factor=0.0)``.

    ``start_profile()`` starts counting and timing every forward of ``model`` until ``stop_profile()``;
    ``get_total_flops/macs/params/duration()`` and :meth:`print_model_profile` read the result;
    ``end_profile()`` drops it. ``ds_engine`` (an engine) adds the world, data- and model-parallel sizes, the
    batch size and the engine's measured backward/step numbers to the summary. ``recompute_fwd_factor``: the
    share of the forward recomputed in backward (activation checkpointing), used by DeepSpeed's estimate of the
    backward FLOPs when no backward was measured (``bwd = (2 + factor) x fwd``).
    """

    def __init__(self, model: torch.nn.Module, ds_engine: Any = None, recompute_fwd_factor: float = 0.0) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"FlopsProfiler: model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(recompute_fwd_factor, (int, float)) or recompute_fwd_factor < 0:
            raise ValueError(f"FlopsProfiler: recompute_fwd_factor must be a number >= 0, got {recompute_fwd_factor!r}")
        self.model = model
        self.ds_engine = ds_engine
        self.recompute_fwd_factor = float(recompute_fwd_factor)
        self.started = False
        self.func_patched = False  # DeepSpeed's attribute: nothing is patched here (torch dispatch sees every op)
        self._mode: FlopCounterMode | None = None
        self._hooks: list[Any] = []
        self._open: dict[int, list[float]] = {}
        self._latency: dict[int, float] = {}
        self._calls: dict[int, int] = {}
        self._ignore: tuple[type, ...] = ()
        self._tree: ModuleProfile | None = None
        self._duration = 0.0
        self._t0 = 0.0
        self._device = _device_of(model)
        #: measured by the engine around backward and step, when it profiles a training step
        self.backward_flops: int | None = None
        self.backward_latency: float | None = None
        self.step_latency: float | None = None

    # -- timing ------------------------------------------------------------------------------------
    def _sync(self) -> None:
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)
        elif self._device.type not in ("cpu", "meta"):
            from ..accelerator import get_accelerator

            get_accelerator().synchronize()

    def _now(self) -> float:
        self._sync()
        return time.perf_counter()

    def _pre_hook(self, module, args) -> None:
        self._open.setdefault(id(module), []).append(self._now())

    def _post_hook(self, module, args, output) -> None:
        starts = self._open.get(id(module))
        if not starts:  # the hook was registered while this module was already running
            return
        elapsed = self._now() - starts.pop()
        self._latency[id(module)] = self._latency.get(id(module), 0.0) + elapsed
        self._calls[id(module)] = self._calls.get(id(module), 0) + 1

    # -- DeepSpeed's API ---------------------------------------------------------------------------
    def start_profile(self, ignore_list: Iterable[type] | None = None) -> None:
        """Start counting; ``ignore_list``: module types whose FLOPs are left out (of them and their parents)."""
        if self.started:
            self.stop_profile()
        self.reset_profile()
        ignore = tuple(ignore_list or ())
        for t in ignore:
            if not isinstance(t, type) or not issubclass(t, torch.nn.Module):
                raise TypeError(f"FlopsProfiler.start_profile: ignore_list takes nn.Module classes, got {t!r}")
        self._ignore = ignore
        self._device = _device_of(self.model)
        mode = counter_mode()
        for module in self.model.modules():
            self._hooks.append(module.register_forward_pre_hook(self._pre_hook))
            self._hooks.append(module.register_forward_hook(self._post_hook))
        self._mode = mode
        self._mode.__enter__()
        self._t0 = self._now()
        self.started = True

    def stop_profile(self) -> None:
        """Stop counting and timing; the results stay readable until :meth:`end_profile`."""
        if not self.started:
            return
        self._duration = self._now() - self._t0
        mode, self._mode = self._running_mode(), None
        mode.__exit__(None, None, None)
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._tree = self._build_tree(_counts(mode))
        self.started = False

    def reset_profile(self) -> None:
        self._open.clear()
        self._latency.clear()
        self._calls.clear()
        self._tree = None
        self._duration = 0.0
        self.backward_flops = self.backward_latency = self.step_latency = None

    def end_profile(self) -> None:
        """Stop (if running) and drop the results and every hook."""
        if self.started:
            self.stop_profile()
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self.reset_profile()

    def _running_mode(self) -> FlopCounterMode:
        # started is True exactly while a counting mode is entered (start_profile sets both, stop_profile clears both)
        if self._mode is None:
            raise RuntimeError("FlopsProfiler: started without a flop-counting mode (start_profile() not completed)")
        return self._mode

    def _need_tree(self, what: str) -> ModuleProfile:
        if self.started:
            # DeepSpeed's own example reads the totals and prints before stop_profile(): a snapshot so far
            self._duration = self._now() - self._t0
            return self._build_tree(_counts(self._running_mode()))
        if self._tree is None:
            raise RuntimeError(f"FlopsProfiler.{what}: nothing profiled yet (start_profile(), run the model, then "
                               "read the results)")
        return self._tree

    def get_total_flops(self, as_string: bool = False):
        flops = self._need_tree("get_total_flops").flops
        return number_to_string(flops) if as_string else flops

    def get_total_macs(self, as_string: bool = False):
        macs = self._need_tree("get_total_macs").macs
        return macs_to_string(macs) if as_string else macs

    def get_total_params(self, as_string: bool = False):
        params = _trainable(self.model)
        return params_to_string(params) if as_string else params

    def get_total_duration(self, as_string: bool = False):
        """Forward latency of the root module (its calls summed), else the time between start and stop."""
        tree = self._need_tree("get_total_duration")
        duration = tree.latency if tree.calls else self._duration
        return duration_to_string(duration) if as_string else duration

    def module_profiles(self) -> list[ModuleProfile]:
        """Every module's :class:`ModuleProfile`, in the model's order (root first)."""
        out: list[ModuleProfile] = []

        def walk(node: ModuleProfile) -> None:
            out.append(node)
            for child in node.children:
                walk(child)

        walk(self._need_tree("module_profiles"))
        return out

    def print_model_profile(self, profile_step: int = 1, module_depth: int = -1, top_modules: int = 1,
                            detailed: bool = True, output_file: str | None = None) -> str:
        """Print the profile (summary, top modules per depth, and with ``detailed`` the per-module table down to
        ``module_depth``, -1 for all) and write it to ``output_file`` when given; returns the text."""
        text = render_profile(self, profile_step, module_depth, top_modules, detailed)
        if output_file:
            with open(output_file, "w", encoding="utf-8") as f:
                f.write(text)
        print(text, flush=True)
        return text

    def print_model_aggregated_profile(self, module_depth: int = -1, top_modules: int = 1) -> str:
        from ._report import render_aggregated

        text = render_aggregated(self._need_tree("print_model_aggregated_profile"), module_depth, top_modules)
        print(text, flush=True)
        return text

    # -- the module tree ---------------------------------------------------------------------------
    def _build_tree(self, counts: dict[str, int]) -> ModuleProfile:
        """Each module's FLOPs from FlopCounterMode's per-module counts (names: the root's class name, then the
        dotted path); a module it did not see (never called) gets its children's sum; then the ignored types."""
        root_label = type(self.model).__name__
        nodes: dict[str, ModuleProfile] = {}
        modules = dict(self.model.named_modules())
        for name, module in modules.items():
            nodes[name] = ModuleProfile(name, type(module).__name__, 0 if not name else name.count(".") + 1,
                                        _trainable(module))
        for name in nodes:
            if name:
                nodes[name.rpartition(".")[0]].children.append(nodes[name])

        def fill(name: str) -> None:
            node, module = nodes[name], modules[name]
            for child in node.children:
                fill(child.name)
            key = root_label + ("." + name if name else "")
            seen = key in counts or id(module) in self._calls
            node.flops = counts.get(key, 0) if seen else sum(c.flops for c in node.children)
            node.calls = self._calls.get(id(module), 0)
            node.latency = self._latency[id(module)] if node.calls else sum(c.latency for c in node.children)

        fill("")
        if self._ignore:
            self._drop_ignored(nodes[""], modules)
        return nodes[""]

    def _drop_ignored(self, root: ModuleProfile, modules: dict[str, torch.nn.Module]) -> None:
        def zero(node: ModuleProfile) -> None:
            node.flops = 0
            for child in node.children:
                zero(child)

        def walk(node: ModuleProfile, ancestors: list[ModuleProfile]) -> None:
            if isinstance(modules[node.name], self._ignore):
                for a in ancestors:
                    a.flops -= node.flops
                zero(node)
                return
            for child in node.children:
                walk(child, ancestors + [node])

        walk(root, [])


def _counts(mode: FlopCounterMode) -> dict[str, int]:
    return {name: sum(ops.values()) for name, ops in mode.get_flop_counts().items()}


def _trainable(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def get_model_profile(model: torch.nn.Module, input_shape: tuple | None = None, args: list | tuple = (),
                      kwargs: dict | None = None, print_profile: bool = True, detailed: bool = True,
                      module_depth: int = -1, top_modules: int = 1, warm_up: int = 1, as_string: bool = True,
                      output_file: str | None = None, ignore_modules: list | None = None, mode: str = "forward"):
    """DeepSpeed's ``get_model_profile``: run ``model`` ``warm_up`` times, then once profiled; returns
    ``(flops, macs, params)``, as strings (``"1.2 G"``, ``"0.6 GMACs"``, ``"85 M"``) with ``as_string``.

    The input: ``input_shape`` (a tuple: one tensor of that shape in the model's dtype and device, as
    DeepSpeed builds it), else ``args``/``kwargs``. ``mode``: ``"forward"`` calls the model, ``"generate"`` its
    ``generate``. The model is put in eval mode, as DeepSpeed does.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"get_model_profile: model must be a torch.nn.Module, got {type(model).__name__}")
    if mode not in ("forward", "generate"):
        raise ValueError(f"get_model_profile: mode must be 'forward' or 'generate', got {mode!r}")
    if not isinstance(warm_up, int) or warm_up < 0:
        raise ValueError(f"get_model_profile: warm_up must be an int >= 0, got {warm_up!r}")
    kwargs = dict(kwargs or {})
    args = list(args)
    if input_shape is not None:
        if not isinstance(input_shape, tuple) or not input_shape:
            raise ValueError(f"get_model_profile: input_shape must be a non-empty tuple, got {input_shape!r}")
        if args or kwargs:
            raise ValueError("get_model_profile: give input_shape or args/kwargs, not both")
        param = next(model.parameters(), None)
        args = [torch.empty(input_shape, dtype=param.dtype if param is not None else torch.float32,
                            device=param.device if param is not None else "cpu").normal_()]
    if not args and not kwargs:
        raise ValueError("get_model_profile: args and/or kwargs must be given when input_shape is None")
    if mode == "generate" and not callable(getattr(model, "generate", None)):
        raise ValueError(f"get_model_profile(mode='generate'): {type(model).__name__} has no generate() method")
    # getattr: nn.Module types an unknown attribute as Tensor | Module, neither of them a generate() method
    run: Callable[..., Any] = getattr(model, "generate") if mode == "generate" else model
    prof = FlopsProfiler(model)
    model.eval()
    for _ in range(warm_up):
        run(*args, **kwargs)
    prof.start_profile(ignore_list=ignore_modules)
    try:
        run(*args, **kwargs)
    finally:
        prof.stop_profile()
    flops, macs, params = prof.get_total_flops(), prof.get_total_macs(), prof.get_total_params()
    if print_profile:
        prof.print_model_profile(profile_step=warm_up, module_depth=module_depth, top_modules=top_modules,
                                 detailed=detailed, output_file=output_file)
    prof.end_profile()
    if as_string:
        return number_to_string(flops), macs_to_string(macs), params_to_string(params)
    return flops, macs, params
