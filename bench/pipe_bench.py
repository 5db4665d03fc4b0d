"""ds-pipe on the CPU (issue 15's evidence): pipeline bubbles per schedule, and the engine's overhead.

``bubble``: a ``PipelineModule`` of layers with a known, fixed cost. A ``SleepLayer``'s forward sleeps
``F``, its backward for the input sleeps ``B`` and its backward for the weight sleeps ``W`` -- two autograd
Functions on separate paths (``x -> out`` and ``w -> out``), so torch's zero-bubble schedules can run the
weight part later, as they would with a real linear layer. Sleeping, not computing, keeps the measurement
independent of the shared 2-core machine: a stage is busy while it sleeps in a layer and idle otherwise
(waiting for a neighbour, or in torch's / ds-pipe's Python). Each rank has the same cost per micro-batch
whatever the schedule (``f`` forward, ``b = f`` input backward, ``w = f`` weight backward, split over its
chunks), so the schedules compare directly. Every layer records ``(start, end, kind, micro-batch, chunk)``;
the idle fraction of a rank is ``1 - busy / wall`` of ``engine.train_batch``.

``overhead``: ``PipelineEngine.train_batch`` against raw ``torch.distributed.pipelining`` (``PipelineStage``
+ the same schedule + ``optimizer.step()``) on an MLP, 2 stages on 2 gloo ranks, data-parallel size 1,
interleaved rounds (A B A B ...), medians.

    python bench/pipe_bench.py bubble --out bench/results/<date>-cpu-pipe/bubble.json
    python bench/pipe_bench.py bubble --stages 1 --out bench/results/<date>-cpu-pipe/bubble_p1_floor.json
    python bench/pipe_bench.py table bench/results/<date>-cpu-pipe/bubble.json [.../bubble_p1_floor.json]
    python bench/pipe_bench.py overhead --rounds 60 --steps 1 --out bench/results/<date>-cpu-pipe/overhead.json
    PYTHONPATH=/tmp/mplsite python bench/pipe_timeline.py bench/results/<date>-cpu-pipe/bubble.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import ds_pipe
from ds_pipe import LayerSpec, PipelineModule

# ---------------------------------------------------------------- the fixed-cost layer

EVENTS: list[tuple[float, float, str, int, int]] = []  # (start, end, kind, micro-batch, layer) on this rank


def _sleep(seconds: float, kind: str, mb: int, layer: int) -> None:
    t0 = time.perf_counter()  # CLOCK_MONOTONIC: one clock for every process of the machine
    time.sleep(seconds)
    EVENTS.append((t0, time.perf_counter(), kind, mb, layer))


class _InputPath(torch.autograd.Function):
    """``x -> x``: forward sleeps F, backward (the input gradient) sleeps B."""

    @staticmethod
    def forward(ctx, x, info):
        ctx.info = info
        _sleep(info["f"], "F", info["mb"], info["layer"])
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        info = ctx.info
        _sleep(info["b"], "B", info["mb"], info["layer"])
        return g, None


class _WeightPath(torch.autograd.Function):
    """``w -> w``: no forward cost, backward (the weight gradient) sleeps W."""

    @staticmethod
    def forward(ctx, w, info):
        ctx.info = info
        return w.clone()

    @staticmethod
    def backward(ctx, g):
        info = ctx.info
        _sleep(info["w"], "W", info["mb"], info["layer"])
        return g, None


class SleepLayer(nn.Module):
    """``out = x + w`` at a fixed cost. ``w`` stays zero (lr 0) so the micro-batch id the inputs carry in
    ``x[0, 0]`` reaches every layer, which labels the events."""

    def __init__(self, layer: int, d: int, f: float, b: float, w: float):
        super().__init__()
        self.layer, self.costs = layer, {"f": f, "b": b, "w": w}
        self.weight = nn.Parameter(torch.zeros(d))

    def forward(self, x):
        info = dict(self.costs, mb=int(x[0, 0].item()), layer=self.layer)
        if torch.is_grad_enabled() and not x.requires_grad:
            # the first stage's input: autograd would skip this layer's input gradient (nobody needs it), leaving
            # the first rank with 2/3 of the others' work; the formulas assume equal stages
            x = x.detach().requires_grad_()
        return _InputPath.apply(x, info) + _WeightPath.apply(self.weight, info)


def _mean_loss(out, y):
    return (out - y).pow(2).mean()


# ---------------------------------------------------------------- formulas

def formula(schedule: str, p: int, m: int, v: int) -> tuple[float, str]:
    """The idle fraction of the step the literature predicts for this cost model (per rank and micro-batch:
    forward f, input backward b = f, weight backward w = f; a chunk has 1/v of it), and the formula's name.

    bubble time / (bubble time + busy time), busy = m (f + b + w) = 3 m f per rank."""
    if schedule in ("1f1b", "gpipe"):
        # Narayanan et al. 2021 (Megatron-LM, SC'21) sec. 2.2.1: bubble (p-1)(t_f + t_b), i.e. (p-1)/m of the ideal
        bubble, name = (p - 1) * 3.0, "(p-1)/(m+p-1)"
    elif schedule in ("interleaved", "looped_bfs"):
        # Narayanan et al. 2021 sec. 2.2.2: (1/v)(p-1)/m of the ideal; Lamy-Poirier 2023 (breadth-first) the same
        bubble, name = (p - 1) * 3.0 / v, "(p-1)/(vm+p-1)"
    elif schedule == "zero_bubble":
        # Qi et al. 2024 (Zero Bubble PP, ICLR) ZB-H1: (p-1)(T_F + T_B - T_W) per chunk -> (p-1) f / v
        bubble, name = (p - 1) * 1.0 / v, "(p-1)/(3vm+p-1)"
    elif schedule == "zbv":
        # Qi et al. 2024 (Pipeline Parallelism with Controllable Memory) ZB-V: the (T_F + T_B - 2 T_W) term is 0
        # when T_F = T_B = T_W (m >= 2p); what remains is the start-up no schedule avoids -- the last rank's
        # first forward starts (p-1) chunk forwards late and rank 0 (first and last chunk) finishes last: (p-1) f / v
        bubble, name = (p - 1) * 1.0 / v, "(p-1)/(3vm+p-1) start-up bound"
    elif schedule == "dualpipev":
        # DeepSeek's DualPipe README: DualPipeV on PP/2 devices, (PP/2-1)(F&B + B - 3W) with chunk times, B the
        # full backward; no compute/comm overlap here so F&B = F + B: (p-1)(f/2 + f + f - 3f/2) = (p-1) f
        bubble, name = (p - 1) * 1.0, "(p-1)/(3m+p-1)"
    else:
        raise ValueError(schedule)
    return bubble / (bubble + 3.0 * m), name


def _merged(evs: list, i: int) -> bool:
    """Event ``i`` is a weight backward right before the input backward of its (micro-batch, chunk): one full
    backward call (autograd runs the weight branch first here). A split schedule's input backward comes
    before its weight backward, as two actions, and sends its gradient in between."""
    kind, mb, c = evs[i]
    return kind == "W" and i + 1 < len(evs) and evs[i + 1] == ("B", mb, c)


def replay_idle(run: dict, f: float) -> list[float]:
    """Each rank's idle fraction had the recorded schedule run with no overhead: every rank executes its
    recorded actions in the recorded order at their nominal cost, an action starting when the rank is free and
    its input is ready (a forward after the previous chunk's forward of that micro-batch, an input backward
    after the next chunk's). Separates the schedule's own bubble (as torch orders it) from the runtime's cost.
    A layer is a chunk here (one layer per chunk); ``_merged`` tells a full backward call from split ones."""
    v, ranks = run["v"], run["events"]
    last = len(ranks) * v - 1
    cost = f / v
    actions = []  # per rank: [(kind, mb, chunk, ready_key)]
    for rec in ranks:
        evs = [(e[2], e[3], e[4]) for e in sorted(rec["events"], key=lambda e: e[0])]
        actions.append(evs)
    grad_after: dict[tuple[int, int], tuple[int, int]] = {}  # (chunk, mb) -> (rank, index of the event)
    for r, evs in enumerate(actions):
        for i, (kind, mb, c) in enumerate(evs):
            if kind == "B":
                grad_after[(c, mb)] = (r, i)  # after the weight part too where it ran first in one call
    fwd_at = {(c, mb): (r, i) for r, evs in enumerate(actions) for i, (k, mb, c) in enumerate(evs) if k == "F"}
    end: dict[tuple[int, int], float] = {}
    pos, free = [0] * len(actions), [0.0] * len(actions)
    progress = True
    while progress:
        progress = False
        for r, evs in enumerate(actions):
            while pos[r] < len(evs):
                kind, mb, c = evs[pos[r]]
                dep = None
                if kind == "F" and c > 0:
                    dep = fwd_at[(c - 1, mb)]
                elif c < last and (kind == "B" or _merged(evs, pos[r])):
                    # an input backward, or a weight backward in the same backward call as one, waits for the
                    # gradient of the next chunk
                    dep = grad_after.get((c + 1, mb))
                if dep is not None and dep not in end:
                    break
                start = max(free[r], end[dep] if dep is not None else 0.0)
                end[(r, pos[r])] = free[r] = start + cost
                pos[r] += 1
                progress = True
    if any(pos[r] < len(evs) for r, evs in enumerate(actions)):
        raise RuntimeError(f"replay of {run['schedule']} p={run['p']} m={run['m']} is stuck")
    span = max(free)
    return [1 - len(evs) * cost / span for evs in actions]


# ---------------------------------------------------------------- workers

def _init(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


SCHEDULES = [("1f1b", 1, "loop"), ("gpipe", 1, "loop"), ("interleaved", 2, "loop"), ("looped_bfs", 2, "loop"),
             ("zero_bubble", 2, "loop"), ("zbv", 2, "v"), ("dualpipev", 2, "v")]


def _bubble_worker(rank: int, world: int, port: int, args, queue) -> None:
    _init(rank, world, port)
    p, f, d, mbs = world, args.f_ms / 1000.0, 4, 2
    results = []
    for schedule, v, style in SCHEDULES:
        if args.schedules and schedule not in args.schedules:
            continue
        for m in args.micro:
            chunks = p * v
            layers = [LayerSpec(SleepLayer, i, d, f / v, f / v, f / v) for i in range(chunks)]
            row = {"schedule": schedule, "p": p, "m": m, "v": v}
            try:
                module = PipelineModule(layers, num_stages=p, loss_fn=_mean_loss, partition_method="uniform",
                                        virtual_stages=v, virtual_stage_style=style)
                engine = ds_pipe.PipelineEngine(
                    module, torch.optim.SGD(module.parameters(), lr=0.0),
                    {"train_micro_batch_size_per_gpu": mbs, "gradient_accumulation_steps": m,
                     "pipeline": {"schedule": schedule, **({"virtual_stages": v} if v > 1 else {})}})
                data = [(torch.full((mbs, d), float(i)), torch.zeros(mbs, d)) for i in range(m)]
                walls, busys, steps_events = [], [], []
                for step in range(args.warmup + args.steps):
                    dist.barrier()
                    EVENTS.clear()
                    t0 = time.perf_counter()
                    engine.train_batch(iter(data))
                    t1 = time.perf_counter()
                    if step >= args.warmup:
                        walls.append(t1 - t0)
                        busys.append(sum(e[1] - e[0] for e in EVENTS))
                        steps_events.append({"t0": t0, "t1": t1, "events": list(EVENTS)})
                row.update(wall=walls, busy=busys, events=steps_events[-1], ok=True)
            except Exception as exc:  # noqa: BLE001 - a schedule that does not run is a result too
                row.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:400])
            gathered = [None] * world
            dist.all_gather_object(gathered, row)
            if rank == 0:
                results.append(gathered)
                ok = all(r["ok"] for r in gathered)
                msg = " ".join(f"{1 - statistics.median(r['busy']) / statistics.median(r['wall']):.3f}"
                               for r in gathered) if ok else gathered[0].get("error", "")
                print(f"{schedule:12s} p={p} m={m:2d}  idle per rank: {msg}", flush=True)
            dist.barrier()
    if rank == 0:
        queue.put(results)
    dist.destroy_process_group()


def _mlp_layers(d: int, n_blocks: int):
    return [LayerSpec(_Block, d) for _ in range(n_blocks)]


class _Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(x)))


class _RawStage(nn.Module):
    """The same blocks, as a plain module for torch's ``PipelineStage``."""

    def __init__(self, blocks):
        super().__init__()
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x):
        return self.blocks(x)


def _overhead_worker(rank: int, world: int, port: int, args, queue) -> None:
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    _init(rank, world, port)
    d, n_blocks, mbs, m = args.d, args.blocks, args.mbs, args.m
    torch.manual_seed(0)
    data = [(torch.randn(mbs, d), torch.randn(mbs, d)) for _ in range(m)]
    # A: ds-pipe
    module = PipelineModule(_mlp_layers(d, n_blocks), num_stages=world, loss_fn=_mean_loss,
                            partition_method="uniform", seed_layers=True)
    engine = ds_pipe.PipelineEngine(module, torch.optim.SGD(module.parameters(), lr=1e-3),
                                    {"train_micro_batch_size_per_gpu": mbs, "gradient_accumulation_steps": m,
                                     "pipeline": {"schedule": args.schedule}})
    # B: raw torch.distributed.pipelining, the same layers (copied weights), schedule and micro-batches
    mine = [module._modules[str(i)] for i in module.stage_layers()]
    raw = _RawStage([_Block(d) for _ in mine])
    for dst, src in zip(raw.blocks, mine):
        dst.load_state_dict(src.state_dict())
    stage = PipelineStage(raw, rank, world, torch.device("cpu"))
    cls = {"1f1b": Schedule1F1B, "gpipe": ScheduleGPipe}[args.schedule]
    sched = cls(stage, n_microbatches=m, loss_fn=_mean_loss)  # scale_grads=True: torch divides by m
    raw_opt = torch.optim.SGD(raw.parameters(), lr=1e-3)
    x_all = torch.cat([x for x, _ in data])
    y_all = torch.cat([y for _, y in data])

    def step_ds():
        return engine.train_batch(iter(data))

    def step_raw():
        losses = [] if rank == world - 1 else None
        if rank == 0:
            sched.step(x_all, target=None, losses=None)
        else:
            sched.step(target=y_all, losses=losses)
        raw_opt.step()
        raw_opt.zero_grad(set_to_none=True)

    # the time inside each schedule's step(), so what each side does around it shows on its own
    in_sched = {"ds_pipe": 0.0, "raw": 0.0}

    def timed(schedule, name):
        inner = schedule.step

        def step(*a, **kw):
            t = time.perf_counter()
            try:
                return inner(*a, **kw)
            finally:
                in_sched[name] += time.perf_counter() - t
        schedule.step = step

    step_ds()  # builds ds-pipe's schedule
    timed(engine._runner("train", m), "ds_pipe")
    timed(sched, "raw")
    # wall time, and this process's CPU time (less sensitive to the other agents' load on the 2 cores)
    times = {"ds_pipe": [], "raw": [], "cpu_ds_pipe": [], "cpu_raw": [], "sched_ds_pipe": [], "sched_raw": []}
    for rnd in range(args.warmup + args.rounds):
        for name, fn in (("ds_pipe", step_ds), ("raw", step_raw)) if rnd % 2 == 0 else (
                ("raw", step_raw), ("ds_pipe", step_ds)):
            for _ in range(args.steps):
                dist.barrier()
                in_sched[name] = 0.0
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                dt, dc = time.perf_counter() - t0, time.process_time() - c0
                if rnd >= args.warmup:
                    times[name].append(dt)
                    times["cpu_" + name].append(dc)
                    times["sched_" + name].append(in_sched[name])
    # the step time of a pipeline is its slowest rank's
    gathered = [None] * world
    dist.all_gather_object(gathered, times)
    if rank == 0:
        queue.put(gathered)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(worker, world: int, args):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=worker, args=(r, world, port, args, queue)) for r in range(world)]
    for proc in procs:
        proc.start()
    result = queue.get()
    for proc in procs:
        proc.join()
        if proc.exitcode:
            raise RuntimeError(f"a rank exited with {proc.exitcode}")
    return result


def _machine() -> dict:
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "load_avg": os.getloadavg(),
            "cpus": os.cpu_count(), "torch": torch.__version__, "python": sys.version.split()[0],
            "command": "python " + " ".join(sys.argv)}


def bubble(args) -> dict:
    out = {"machine_start": _machine(), "f_ms": args.f_ms, "runs": []}
    for p in args.stages:
        for ranks in _spawn(_bubble_worker, p, args):
            r0 = ranks[0]
            row = {k: r0[k] for k in ("schedule", "p", "m", "v", "ok")}
            if r0["ok"]:
                row["idle_per_rank"] = [1 - statistics.median(r["busy"]) / statistics.median(r["wall"])
                                        for r in ranks]
                row["wall_s"] = statistics.median(max(ws) for ws in zip(*[r["wall"] for r in ranks]))
                row["formula"], row["formula_name"] = formula(r0["schedule"], p, r0["m"], r0["v"])
                row["events"] = [r["events"] for r in ranks]
                row["replay_idle"] = replay_idle(row, args.f_ms)
            else:
                row["error"] = r0["error"]
            out["runs"].append(row)
    out["machine_end"] = _machine()
    return out


def overhead(args) -> dict:
    out = {"machine_start": _machine(), "config": {k: getattr(args, k) for k in
                                                   ("d", "blocks", "mbs", "m", "schedule", "rounds", "steps")}}
    gathered = _spawn(_overhead_worker, 2, args)
    # per step: the slower rank
    per = {name: [max(ts) for ts in zip(*[g[name] for g in gathered])] for name in ("ds_pipe", "raw")}
    # CPU seconds per step, both ranks together
    cpu = {name: [sum(ts) for ts in zip(*[g["cpu_" + name] for g in gathered])] for name in ("ds_pipe", "raw")}
    out["step_s"], out["step_cpu_s"] = per, cpu
    out["median_cpu_s"] = {k: statistics.median(v) for k, v in cpu.items()}
    out["cpu_ratio"] = out["median_cpu_s"]["ds_pipe"] / out["median_cpu_s"]["raw"]
    # per rank: the step's time outside schedule.step() (ds-pipe: loading, the agreement all-reduce, gradient
    # averaging over micro-batches, the loss broadcast, the optimizer; raw: the optimizer and zero_grad)
    out["median_outside_schedule_s"] = {
        name: [statistics.median(w - s for w, s in zip(g[name], g["sched_" + name])) for g in gathered]
        for name in ("ds_pipe", "raw")}
    out["median_in_schedule_s"] = {name: [statistics.median(g["sched_" + name]) for g in gathered]
                                   for name in ("ds_pipe", "raw")}
    out["median_s"] = {k: statistics.median(v) for k, v in per.items()}
    out["ratio"] = out["median_s"]["ds_pipe"] / out["median_s"]["raw"]
    k = args.steps  # each round ran k steps of each; the ratio of a round's medians shows the spread
    rounds = [statistics.median(per["ds_pipe"][i:i + k]) / statistics.median(per["raw"][i:i + k])
              for i in range(0, len(per["raw"]), k)]
    out["round_ratios"] = rounds
    out["round_ratio_quartiles"] = statistics.quantiles(rounds, n=4)
    out["machine_end"] = _machine()
    return out


def table(path: str, floor_path: str | None) -> str:
    """The markdown table of a ``bubble`` JSON (and the one-stage floor, if given)."""
    data = json.load(open(path))
    floor = {}
    if floor_path:
        for run in json.load(open(floor_path))["runs"]:
            if run["ok"]:
                floor[(run["schedule"], run["m"])] = run["idle_per_rank"][0]
    lines = ["| schedule | p | m | v | measured idle per rank | mean | replay (no overhead) | formula | value | "
             "measured / formula | replay / formula | 1-stage floor | excess ms / action |", "|" + "---|" * 13]
    for run in data["runs"]:
        if not run["ok"]:
            lines.append(f"| {run['schedule']} | {run['p']} | {run['m']} | {run['v']} | refused: {run['error']} "
                         f"| | | | | | | | |")
            continue
        idle, rep = run["idle_per_rank"], replay_idle(run, data["f_ms"])
        mean, rmean = statistics.mean(idle), statistics.mean(rep)
        run["formula"], run["formula_name"] = formula(run["schedule"], run["p"], run["m"], run["v"])
        fl = floor.get((run["schedule"], run["m"]))
        # the step's wall time beyond the overhead-free replay, per action (layer sleep) of a rank
        n_act = len(run["events"][0]["events"])
        excess_ms = (run["wall_s"] - n_act * data["f_ms"] / run["v"] / 1e3 / (1 - rmean)) / n_act * 1e3
        lines.append(f"| {run['schedule']} | {run['p']} | {run['m']} | {run['v']} | "
                     f"{' '.join(f'{x:.3f}' for x in idle)} | {mean:.3f} | {rmean:.3f} | {run['formula_name']} | "
                     f"{run['formula']:.3f} | {mean / run['formula']:.2f} | {rmean / run['formula']:.2f} | "
                     f"{'' if fl is None else f'{fl:.3f}'} | {excess_ms:.1f} |")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "table":
        print(table(sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None))
        return
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="what", required=True)
    b = sub.add_parser("bubble")
    b.add_argument("--stages", type=int, nargs="+", default=[2, 4])
    b.add_argument("--micro", type=int, nargs="+", default=[4, 8, 16])
    b.add_argument("--schedules", nargs="*", default=None)
    b.add_argument("--f-ms", type=float, default=20.0, help="a rank's forward per micro-batch (B = W = F)")
    b.add_argument("--warmup", type=int, default=1)
    b.add_argument("--steps", type=int, default=3)
    o = sub.add_parser("overhead")
    o.add_argument("--d", type=int, default=256)
    o.add_argument("--blocks", type=int, default=4)
    o.add_argument("--mbs", type=int, default=32)
    o.add_argument("--m", type=int, default=8)
    o.add_argument("--schedule", default="1f1b")
    o.add_argument("--warmup", type=int, default=2)
    o.add_argument("--rounds", type=int, default=10)
    o.add_argument("--steps", type=int, default=3)
    for s in (b, o):
        s.add_argument("--out", required=True)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    result = bubble(args) if args.what == "bubble" else overhead(args)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, separators=(",", ":"))
    if args.what == "overhead":
        print(json.dumps({k: result[k] for k in ("median_s", "ratio", "round_ratio_quartiles",
                                                    "median_cpu_s", "cpu_ratio",
                                                    "median_outside_schedule_s", "median_in_schedule_s")}), "load",
              result["machine_end"]["load_avg"])


if __name__ == "__main__":
    main()
