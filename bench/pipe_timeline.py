"""Draw the schedules' timelines recorded by ``pipe_bench.py bubble``: one panel per schedule, a row per
pipeline rank, a box per layer sleep (F forward, B input backward, W weight backward), labelled with its
micro-batch; darker boxes are a rank's later chunk (virtual stage).

    PYTHONPATH=/tmp/mplsite python bench/pipe_timeline.py bench/results/<date>-cpu-pipe/bubble.json --p 4 --m 8
"""

from __future__ import annotations

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

COLORS = {"F": ("#9ecae1", "#3182bd"), "B": ("#a1d99b", "#31a354"), "W": ("#fdae6b", "#e6550d")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("json")
    ap.add_argument("--p", type=int, default=4)
    ap.add_argument("--m", type=int, default=8)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    data = json.load(open(args.json))
    runs = [r for r in data["runs"] if r["p"] == args.p and r["m"] == args.m and r["ok"]]
    fig, axes = plt.subplots(len(runs), 1, figsize=(14, 1.0 + 0.42 * args.p * len(runs)), sharex=True)
    for ax, run in zip(axes, runs):
        ranks = run["events"]
        t0 = min(r["t0"] for r in ranks)
        n_layers = len(ranks) * run["v"]
        for rank, rec in enumerate(ranks):
            for start, end, kind, mb, layer in rec["events"]:
                chunk = layer // len(ranks) if run["v"] > 1 else 0  # a rank's local chunk: lighter first
                ax.barh(rank, (end - start) * 1e3, left=(start - t0) * 1e3, height=0.8,
                        color=COLORS[kind][min(chunk, 1)], edgecolor="black", linewidth=0.3)
                ax.text((start + end - 2 * t0) * 5e2, rank, str(mb), ha="center", va="center", fontsize=5)
            ax.plot([(rec["t1"] - t0) * 1e3] * 2, [rank - 0.45, rank + 0.45], color="black", linewidth=1)
        idle = " ".join(f"{x:.2f}" for x in run["idle_per_rank"])
        replay = sum(run["replay_idle"]) / len(run["replay_idle"])
        ax.set_title(f"{run['schedule']} (p={run['p']}, m={run['m']}, v={run['v']}, {n_layers} chunks): measured idle "
                     f"per rank {idle}; the same order without overhead {replay:.2f}; formula {run['formula']:.2f} "
                     f"{run['formula_name']}", fontsize=8, loc="left")
        ax.set_yticks(range(len(ranks)))
        ax.set_yticklabels([f"rank {r}" for r in range(len(ranks))], fontsize=7)
        ax.invert_yaxis()
    axes[-1].set_xlabel("ms since the step started (black tick: train_batch returned on that rank)")
    fig.legend(handles=[Patch(color=COLORS[k][0], label=lbl) for k, lbl in
                        (("F", "forward"), ("B", "input backward"), ("W", "weight backward"))],
               loc="upper right", fontsize=7, ncol=3)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    out = args.out or os.path.join(os.path.dirname(args.json), "pipe_timelines.png")
    fig.savefig(out, dpi=130)
    print(out)


if __name__ == "__main__":
    main()
