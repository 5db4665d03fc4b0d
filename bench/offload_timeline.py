"""Draw the per-chunk timeline of ds-zero's overlapped offload step (``DS_ZERO_OFFLOAD_TIMELINE=path.json``).

    python bench/offload_timeline.py path.json out.png [--step N]

Three lanes -- D2H (grads device -> host), CPU (the Adam step), H2D (new 16-bit params host -> device) -- one bar
per chunk, and with ``offload_optimizer.stream_ratio`` two more (GPU: a streamed chunk's state in, its step, its
state out, one lane per side stream), in ms from the step's start (the compute stream's point where the step began; D2H copies started in
backward, at stage 2, lie left of 0). Default: the last recorded step. Prints each lane's busy time and the
step's span, which say how much of the copying the CPU step hid.
"""

from __future__ import annotations

import argparse
import json


def spans(step: dict) -> dict[str, list[tuple[float, float]]]:
    out = {lane: [tuple(c[lane]) for c in step["chunks"]] for lane in ("d2h", "cpu", "h2d")}
    out["gpu"] = [tuple(c["span"]) for c in step.get("streamed", [])]
    return out


def summary(step: dict) -> str:
    lanes = spans(step)
    busy = {k: sum(b - a for a, b in v) for k, v in lanes.items()}
    points = [x for v in lanes.values() for span in v for x in span] or [0.0]
    start, end = min(points), max(points)
    early = sum(bool(c.get("early")) for c in step["chunks"])
    streamed = f", GPU streamed {busy['gpu']:.1f} ms ({len(lanes['gpu'])} chunks)" if lanes["gpu"] else ""
    return (f"step {step['step']}: {len(step['chunks'])} chunks ({early} copied early), span {end - start:.1f} ms "
            f"(from {start:.1f} to {end:.1f}); busy: D2H {busy['d2h']:.1f} ms, CPU {busy['cpu']:.1f} ms, "
            f"H2D {busy['h2d']:.1f} ms{streamed}; serial sum {sum(busy.values()):.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("timeline")
    parser.add_argument("png")
    parser.add_argument("--step", type=int, default=None, help="the step to draw (default: the last recorded)")
    args = parser.parse_args()
    with open(args.timeline) as f:
        steps = json.load(f)["steps"]
    if not steps:
        raise SystemExit(f"{args.timeline}: no step recorded")
    step = steps[-1] if args.step is None else next((s for s in steps if s["step"] == args.step), None)
    if step is None:
        raise SystemExit(f"{args.timeline}: step {args.step} not recorded (have {[s['step'] for s in steps]})")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lanes = spans(step)
    # the streamed chunks were queued on two side streams in turn (the record keeps the queue order): one lane
    # each, so a stream's chunks follow each other and the two streams' overlap shows
    gpu = lanes.pop("gpu")
    lanes["gpu0"], lanes["gpu1"] = gpu[0::2], gpu[1::2]
    colors = {"d2h": "tab:blue", "cpu": "tab:orange", "h2d": "tab:green", "gpu0": "tab:purple", "gpu1": "tab:purple"}
    names = {"d2h": "D2H grads", "cpu": "CPU step", "h2d": "H2D params", "gpu0": "GPU streamed (stream A)",
             "gpu1": "GPU streamed (stream B)"}
    rows = ("h2d", "cpu", "d2h") + (("gpu1", "gpu0") if gpu else ())
    fig, ax = plt.subplots(figsize=(12, 3 + 0.6 * (len(rows) - 3)))
    for row, lane in enumerate(rows):
        bars = [(a, max(b - a, 1e-3)) for a, b in lanes[lane]]
        # alternate shades so neighbouring chunks stay apart
        ax.broken_barh(bars, (row - 0.4, 0.8), facecolors=[colors[lane] if i % 2 == 0 else "0.6"
                                                            for i in range(len(bars))])
    ax.set_yticks(list(range(len(rows))), [names[lane] for lane in rows])
    ax.set_xlabel("ms from the step's start")
    streamed = f", {len(gpu)} streamed" if gpu else ""
    ax.set_title(f"ds-zero offload step {step['step']} on {step.get('device', '?')}: {len(step['chunks'])} CPU "
                 f"chunks{streamed}")
    ax.axvline(0, color="k", linewidth=0.5)
    fig.tight_layout()
    fig.savefig(args.png, dpi=120)
    print(summary(step))
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
