"""The FLOPs profiler's text: DeepSpeed's number formats, the summary, the top modules per depth and the
per-module table."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .flops_profiler import FlopsProfiler, ModuleProfile

_PREFIXES = ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K"))


def number_to_string(num: float, units: str | None = None, precision: int = 2) -> str:
    """``1234567 -> "1.23 M"`` (DeepSpeed's: T, G, M, K, or no prefix); ``units`` forces one."""
    if units is None:
        for scale, prefix in _PREFIXES:
            if abs(num) >= scale:
                return f"{round(num / scale, precision):g} {prefix}"
        return f"{round(num, precision):g} "
    scale = dict((p, s) for s, p in _PREFIXES).get(units, 1.0)
    return f"{round(num / scale, precision):g} {units}"


def macs_to_string(macs: float, units: str | None = None, precision: int = 2) -> str:
    return number_to_string(macs, units, precision) + "MACs"


def flops_to_string(flops: float, units: str | None = None, precision: int = 2) -> str:
    """A rate: ``"81.9 TFLOPS"``."""
    return number_to_string(flops, units, precision) + "FLOPS"


def params_to_string(params: float, units: str | None = None, precision: int = 2) -> str:
    return number_to_string(params, units, precision).rstrip()


def duration_to_string(seconds: float, units: str | None = None, precision: int = 2) -> str:
    if units == "s" or (units is None and seconds >= 1):
        return f"{round(seconds, precision):g} s"
    if units == "ms" or (units is None and seconds >= 1e-3):
        return f"{round(seconds * 1e3, precision):g} ms"
    return f"{round(seconds * 1e6, precision):g} us"


def _pct(part: float, whole: float) -> str:
    return f"{100.0 * part / whole:.2f}%" if whole else "0.00%"


def _walk(node: "ModuleProfile", out: list) -> list:
    out.append(node)
    for child in node.children:
        _walk(child, out)
    return out


def render_aggregated(root: "ModuleProfile", module_depth: int = -1, top_modules: int = 1) -> str:
    """The ``top_modules`` largest modules at each depth (params, MACs, forward latency), as DeepSpeed's
    "Aggregated Profile per GPU"; modules of one type at one depth are summed, as DeepSpeed does."""
    nodes = _walk(root, [])
    deepest = max(n.depth for n in nodes)
    last = deepest if module_depth < 0 else min(module_depth, deepest)
    lines = [f"Top {top_modules} modules in terms of params, MACs or fwd latency at different model depths:"]
    for depth in range(last + 1):
        by_type: dict[str, list[float]] = {}
        for n in nodes:
            if n.depth == depth:
                acc = by_type.setdefault(n.type, [0, 0, 0.0])
                acc[0] += n.params
                acc[1] += n.macs
                acc[2] += n.latency
        lines.append(f"depth {depth}:")
        for label, idx, fmt in (("params     ", 0, params_to_string), ("MACs       ", 1, macs_to_string),
                                ("fwd latency", 2, duration_to_string)):
            top = sorted(by_type.items(), key=lambda kv: kv[1][idx], reverse=True)[:max(top_modules, 0)]
            lines.append(f"    {label} - {{" + ", ".join(f"'{t}': '{fmt(v[idx])}'" for t, v in top) + "}")
    return "\n".join(lines)


def render_table(root: "ModuleProfile", module_depth: int = -1) -> str:
    """Every module down to ``module_depth`` (-1: all), indented by depth: params, MACs, fwd FLOPs, latency,
    each with its share of the model's, and FLOPS."""
    total = root
    header = ("module", "type", "params", "params %", "MACs", "MACs %", "fwd FLOPs", "FLOPs %", "fwd latency",
              "latency %", "FLOPS", "calls")
    rows = []
    for n in _walk(root, []):
        if module_depth >= 0 and n.depth > module_depth:
            continue
        label = "  " * n.depth + (n.name.rpartition(".")[2] if n.name else "(model)")
        rows.append((label, n.type, params_to_string(n.params), _pct(n.params, total.params),
                     macs_to_string(n.macs), _pct(n.macs, total.macs), number_to_string(n.flops),
                     _pct(n.flops, total.flops), duration_to_string(n.latency), _pct(n.latency, total.latency),
                     flops_to_string(n.flops_per_second), str(n.calls)))
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]

    def line(r) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()

    return "\n".join([line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


def _engine_facts(engine: Any) -> dict[str, Any]:
    facts = {"world": 1, "dp": 1, "mp": 1, "batch": None}
    if engine is None:
        return facts
    facts["world"] = getattr(engine, "world_size", 1)
    facts["dp"] = getattr(engine, "dp_world_size", 1)
    facts["mp"] = getattr(engine, "mp_world_size", 1)
    micro = getattr(engine, "train_micro_batch_size_per_gpu", None)
    facts["batch"] = micro() if callable(micro) else None
    return facts


def render_profile(prof: "FlopsProfiler", profile_step: int, module_depth: int, top_modules: int,
                   detailed: bool) -> str:
    """DeepSpeed's layout: the summary, the aggregated profile, the detailed table."""
    root = prof._need_tree("print_model_profile")
    facts = _engine_facts(prof.ds_engine)
    mp = facts["mp"] or 1
    fwd_flops, fwd_lat = root.flops, prof.get_total_duration()
    rows: list[tuple[str, str]] = [
        ("world size", str(facts["world"])), ("data parallel size", str(facts["dp"])),
        ("model parallel size", str(mp))]
    if facts["batch"] is not None:
        rows.append(("batch size per GPU", str(facts["batch"])))
    rows += [("params per GPU", params_to_string(root.params)),
             ("params of model = params per GPU * mp_size", params_to_string(root.params * mp)),
             ("fwd MACs per GPU", macs_to_string(root.macs)),
             ("fwd flops per GPU", number_to_string(fwd_flops)),
             ("fwd flops of model = fwd flops per GPU * mp_size", number_to_string(fwd_flops * mp)),
             ("fwd latency", duration_to_string(fwd_lat)),
             ("fwd FLOPS per GPU = fwd flops per GPU / fwd latency",
              flops_to_string(fwd_flops / fwd_lat if fwd_lat else 0.0))]
    if prof.backward_flops is not None:
        bwd_flops, how = prof.backward_flops, "measured"
    else:  # DeepSpeed's estimate: backward is twice the forward, plus any recomputed forward
        bwd_flops, how = int((2 + prof.recompute_fwd_factor) * fwd_flops), \
            f"estimated as {2 + prof.recompute_fwd_factor:g} x fwd flops"
    rows.append((f"bwd flops per GPU ({how})", number_to_string(bwd_flops)))
    rows.append(("fwd+bwd flops per GPU", number_to_string(fwd_flops + bwd_flops)))
    if prof.backward_latency is not None:
        bwd_lat = prof.backward_latency
        rows += [("bwd latency", duration_to_string(bwd_lat)),
                 ("bwd FLOPS per GPU = bwd flops per GPU / bwd latency",
                  flops_to_string(bwd_flops / bwd_lat if bwd_lat else 0.0)),
                 ("fwd+bwd FLOPS per GPU = fwd+bwd flops per GPU / (fwd+bwd latency)",
                  flops_to_string((fwd_flops + bwd_flops) / (fwd_lat + bwd_lat) if fwd_lat + bwd_lat else 0.0))]
        if prof.step_latency is not None:
            iter_lat = fwd_lat + bwd_lat + prof.step_latency
            rows += [("step latency", duration_to_string(prof.step_latency)),
                     ("iter latency", duration_to_string(iter_lat)),
                     ("FLOPS per GPU = fwd+bwd flops per GPU / iter latency",
                      flops_to_string((fwd_flops + bwd_flops) / iter_lat if iter_lat else 0.0))]
            if facts["batch"]:
                rows.append(("samples/second", f"{facts['batch'] * facts['dp'] / iter_lat:.2f}"))
    width = max(len(k) for k, _ in rows) + 2
    bar = "-" * 26
    parts = [f"\n{bar} DeepSpeed Flops Profiler {bar}", f"Profile Summary at step {profile_step}:",
             "Notations: data parallel size (dp_size), model parallel size (mp_size), number of parameters (params),",
             "number of multiply-accumulate operations (MACs), number of floating-point operations (flops),",
             "floating-point operations per second (FLOPS), fwd latency (forward latency), bwd latency (backward",
             "latency), step (weights update latency), iter latency (sum of fwd, bwd and step latency).",
             "Counted: matrix multiplications, convolutions and attention (torch.utils.flop_counter).", ""]
    parts += [f"{k + ':':<{width}}{v}" for k, v in rows]
    parts += ["", f"{bar} Aggregated Profile per GPU {bar}", render_aggregated(root, module_depth, top_modules)]
    if detailed:
        parts += ["", f"{bar} Detailed Profile per GPU {bar}",
                  "A module's numbers include its children's; percentages are of the whole model.",
                  render_table(root, module_depth)]
    parts.append("-" * (2 * len(bar) + 26))
    return "\n".join(parts) + "\n"
