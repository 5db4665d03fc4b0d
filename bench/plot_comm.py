"""Bar chart of comm_bench.py results: time per call of each contender, NVLink and socket side by side.

    python bench/plot_comm.py results/nvlink.json results/socket.json -o comm.png     (needs matplotlib)
"""

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("results", nargs="+", help="comm_bench.py --out files")
    parser.add_argument("-o", "--out", required=True)
    parser.add_argument("--size-mib", type=int, default=512)
    args = parser.parse_args()
    runs = [json.load(open(path)) for path in args.results]
    fig, axes = plt.subplots(1, len(runs), figsize=(7 * len(runs), 5.5))
    axes = axes if len(runs) > 1 else [axes]
    for ax, run in zip(axes, runs):
        rows = [r for r in run["rows"] if r.get("size_mib") == args.size_mib and "ms" in r]
        names = [r["contender"] for r in rows]
        times = [r["ms"] for r in rows]
        colors = ["#d62728" if "deepspeed" in n else "#1f77b4" if "ds-comm" in n else "#7f7f7f" for n in names]
        bars = ax.barh(names, times, color=colors)
        ax.bar_label(bars, fmt="%.2f ms", padding=3, fontsize=8)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel("ms per call (log scale)")
        ax.set_title(f"{rows[0]['label']}: {args.size_mib} MiB fp32, {rows[0]['world']}× {run['device']}")
    fig.suptitle(f"ds-comm (blue) vs NCCL (grey) and DeepSpeed 0.19.6 (red), {runs[0]['date']}")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)


if __name__ == "__main__":
    main()
