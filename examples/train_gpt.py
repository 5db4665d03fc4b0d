"""Train a small GPT with ds-train: the README's main job.

    torchrun --standalone --nproc_per_node 2 examples/train_gpt.py                 # ZeRO-2, 2 CPU processes
    torchrun --standalone --nproc_per_node 2 examples/train_gpt.py --zero-stage 1 --steps 100

A byte-level GPT (4 transformer blocks, d=128, 4 heads, context 64, vocabulary of the 256 byte values) learns
to continue Python source code: the standard library's own ``*.py`` files, which every Python installation has
(the first ``--data-bytes`` of them in sorted order; the last 10% held out for validation). Everything goes
through ``ds_train.initialize`` with a DeepSpeed JSON config (``examples/ds_config_zero2.json``: AdamW, a
warm-up + cosine schedule, gradient clipping 1.0, ZeRO stage 2): the engine, the optimizer, the LR schedule and
the sharded data loader come from there.

Checkpoints: every ``--save-interval`` steps into ``--save-dir`` (``engine.save_checkpoint``, with the data
position and the loss history in ``client_state``); a run started with a ``--save-dir`` that holds a
checkpoint resumes from its latest one and continues the same loss curve. At the end: the final train and
validation loss, the checkpoint path, the loss curve as a PNG (``--plot``; skipped with a message when
matplotlib is missing) and, with ``--out``, the metrics as JSON. ``--tensorboard DIR`` adds the config's
``tensorboard`` section: the engine writes DeepSpeed's ``Train/Samples/*`` scalars (loss, lr, samples/s) into
``DIR/train_gpt`` on every optimizer step.

Resuming, the rule: the checkpoint gives the *state* (weights, optimizer moments and step counts, the step
number, the data position, the loss history); this command line and its config give the *settings*
(``--steps`` and so the schedule's length and warm-up, the peak lr and the optimizer's other hyper-parameters,
batch sizes, the number of ranks). A setting that differs from the checkpoint's is applied and named in one log
line; the LR schedule is rebuilt for the new settings at the checkpoint's step (``--steps 400`` after a 200-step
run continues on a 400-step cosine from its step 200). The data position is counted in samples of each epoch's
shuffled order, so a different number of ranks or micro-batch size resumes exactly where the last run stopped,
no sample skipped or repeated; the global batch then changes with them, and a line says so.

Faults: the process group gets a timeout (``--comms-timeout``, default 300 s, or DeepSpeed's
``DEEPSPEED_TIMEOUT`` in minutes), so a rank that stops or hangs becomes an error on the others within minutes,
not torch's 30; under ``ds-launch`` every rank also writes its heartbeat file (the step or phase it is in), so
the launcher names a stopped or silent rank sooner. A non-finite loss that the engine did not refuse stops the
run before the next checkpoint, so the latest checkpoint is always a finite one.

It runs under torchrun, ``ds-launch``, DeepSpeed's launcher (``--local_rank`` is accepted and ignored: the
environment's ``LOCAL_RANK`` is used) or any launcher that sets ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/
``MASTER_PORT``; with plain ``python`` it trains as a single process. NCCL on GPUs, gloo on the CPU.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import errno
import gc
import glob
import json
import math
import os
import pathlib
import sysconfig
import time

import torch
import torch.distributed as dist
# Imported before the process group exists, on purpose. Its functions take `group=group.WORLD` as a default
# argument, evaluated at import: imported later (torch.optim's state_dict pulls it in through torch._dynamo),
# they hold the default group forever, so destroy_process_group() cannot free it and gloo's threads (and rank
# 0's TCPStore thread) are still running when the interpreter exits -- which then aborts ("terminate called
# without an active exception") about one run in ten on a busy machine. Imported first, the defaults are None.
import torch.distributed.nn.functional  # noqa: F401,E402
import torch.nn.functional as F
from torch import nn

import ds_train

DEFAULT_COMMS_TIMEOUT_S = 300.0
# sysexits' EX_IOERR: a checkpoint found no space left on the disk. ds-launch does not restart a job that exits
# with it (--fatal_exit_codes): a restart would replay the same steps into the same full disk.
DISK_FULL_EXIT_CODE = 74

HERE = pathlib.Path(__file__).resolve().parent


# -- data ----------------------------------------------------------------------------------------------
def stdlib_text(max_bytes: int) -> bytes:
    """The first ``max_bytes`` of the standard library's top-level ``*.py`` files, in sorted order."""
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    if not files:
        raise SystemExit(f"no *.py files under {sysconfig.get_paths()['stdlib']!r} to train on")
    parts, size = [], 0
    for path in files:
        data = pathlib.Path(path).read_bytes()
        parts.append(data[: max_bytes - size])
        size += len(parts[-1])
        if size >= max_bytes:
            break
    return b"".join(parts)


class ByteWindows(torch.utils.data.Dataset):
    """Non-overlapping windows of ``context + 1`` bytes (input and its next-byte targets)."""

    def __init__(self, data: bytes, context: int) -> None:
        self.tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
        self.context = context

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.context

    def __getitem__(self, i: int) -> torch.Tensor:
        start = i * self.context
        return self.tokens[start : start + self.context + 1]


# -- model ---------------------------------------------------------------------------------------------
class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Pre-LayerNorm decoder: token + learned position embeddings, ``layers`` blocks, a linear head."""

    def __init__(self, vocab: int = 256, context: int = 64, dim: int = 128, heads: int = 4, layers: int = 4) -> None:
        super().__init__()
        self.context = context
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(context, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        for name, p in self.named_parameters():  # GPT-2's initialisation, residual projections scaled down
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith(("proj.weight", "mlp.2.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            # the config's activation_checkpointing section switches this on (initialize configures it), as
            # Megatron-style models call deepspeed.checkpointing.checkpoint around each layer
            x = ds_train.checkpointing.checkpoint(block, x) if ds_train.checkpointing.is_configured() else block(x)
        logits = self.head(self.ln_f(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


# -- the run -------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(HERE / "ds_config_zero2.json"), help="DeepSpeed JSON config")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps (the schedule's total_num_steps)")
    p.add_argument("--zero-stage", type=int, default=None, help="override zero_optimization.stage")
    p.add_argument("--micro-batch", type=int, default=None, help="override train_micro_batch_size_per_gpu")
    p.add_argument("--data-bytes", type=int, default=3_000_000, help="bytes of stdlib source to use")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-batches", type=int, default=16, help="validation micro-batches per rank")
    p.add_argument("--eval-interval", type=int, default=50, help="steps between validation losses (and the last)")
    p.add_argument("--save-dir", default="out/checkpoints", help="checkpoints; the latest is resumed from")
    p.add_argument("--save-interval", type=int, default=100, help="steps between checkpoints (0: only at the end)")
    p.add_argument("--stop-at", type=int, default=None,
                   help="stop after this step as if interrupted (after its checkpoint, if one is due): for resume tests")
    p.add_argument("--plot", default="out/loss.png", help="loss-curve PNG ('' to skip)")
    p.add_argument("--tensorboard", default=None, metavar="DIR",
                   help="TensorBoard event files into DIR/train_gpt (the config's tensorboard section; needs the "
                        "tensorboard package), e.g. --tensorboard out/tensorboard beside the plot")
    p.add_argument("--out", default=None, help="write the metrics (loss per step, tokens/s, val loss) as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (a line every 50 steps instead)")
    p.add_argument("--comms-timeout", type=float, default=None, metavar="S",
                   help="seconds a collective may wait for the other ranks before it fails (default "
                        f"{DEFAULT_COMMS_TIMEOUT_S:g}, or $DEEPSPEED_TIMEOUT minutes when set)")
    # DeepSpeed's launcher appends --local_rank=N; the environment's LOCAL_RANK says the same
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def build_config(args: argparse.Namespace) -> dict:
    cfg = json.loads(pathlib.Path(args.config).read_text())
    if args.zero_stage is not None:
        cfg.setdefault("zero_optimization", {})["stage"] = args.zero_stage
    if args.micro_batch is not None:
        cfg["train_micro_batch_size_per_gpu"] = args.micro_batch
        cfg.pop("train_batch_size", None)
    sched = cfg.get("scheduler")
    if sched and sched.get("type") in ("WarmupCosineLR", "WarmupDecayLR"):
        # the schedule ends with the run: --steps decides its length, and warm-up stays shorter than the run
        params = sched.setdefault("params", {})
        params["total_num_steps"] = args.steps
        params["warmup_num_steps"] = max(1, min(params.get("warmup_num_steps", 1000), args.steps // 2))
    if args.tensorboard:
        # DeepSpeed's monitor section: train_loss, lr, samples/s per step as Train/Samples/*, written by rank 0
        cfg["tensorboard"] = {"enabled": True, "output_path": args.tensorboard, "job_name": "train_gpt"}
    return cfg


def mean_over_ranks(value: float, device: torch.device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


@torch.no_grad()
def evaluate(engine, dataset: ByteWindows, batch: int, batches: int) -> float:
    # the first `batches` micro-batches of each rank's shard, in order: the same windows every time
    loader = ds_train.DeepSpeedDataLoader(dataset, batch, num_replicas=dist.get_world_size(), rank=dist.get_rank(),
                                          shuffle=False)
    engine.eval()
    total, n = 0.0, 0
    for i, chunk in enumerate(loader):
        if i == batches:
            break
        chunk = chunk.to(engine.device)
        total += engine(chunk[:, :-1], chunk[:, 1:]).item()
        n += 1
    engine.train()
    return mean_over_ranks(total / max(n, 1), engine.device)


def plot_losses(path: str, losses: list[float], val: list[tuple[int, float]], title: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the loss plot (pip install matplotlib)", flush=True)
        return None
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(range(1, len(losses) + 1), losses, lw=1, label="train (mean over ranks)")
    if val:
        ax.plot([s for s, _ in val], [v for _, v in val], "o-", label="validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/byte)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# -- faults: timeouts and heartbeats ---------------------------------------------------------------------
def comms_timeout(args: argparse.Namespace) -> datetime.timedelta:
    """``--comms-timeout`` seconds, else DeepSpeed's ``DEEPSPEED_TIMEOUT`` (minutes), else 300 s. Every collective
    (and the rendezvous) fails after it instead of waiting for a stopped rank for torch's 30 minutes."""
    if args.comms_timeout is not None:
        seconds, source = args.comms_timeout, "--comms-timeout"
    elif os.environ.get("DEEPSPEED_TIMEOUT", "").strip():
        raw = os.environ["DEEPSPEED_TIMEOUT"]
        try:  # whole minutes, as DeepSpeed reads it
            seconds, source = int(raw) * 60.0, "DEEPSPEED_TIMEOUT"
        except ValueError:
            raise SystemExit(f"train_gpt: DEEPSPEED_TIMEOUT={raw!r} is not a whole number of minutes") from None
    else:
        seconds, source = DEFAULT_COMMS_TIMEOUT_S, "default"
    if not (seconds > 0 and math.isfinite(seconds)):
        raise SystemExit(f"train_gpt: the process-group timeout must be a positive number of seconds, got {seconds} "
                         f"({source})")
    return datetime.timedelta(seconds=seconds)


class Heartbeat:
    """ds-launch's heartbeat protocol (see ds_launch.heartbeat), written out so that the script runs under any
    launcher: replace ``$DS_LAUNCH_HEARTBEAT_FILE`` with where we are (``step 40``, ``save 40``) at every step and
    phase, and with ``done`` once everything is written. Without the variable it only remembers the phase, for
    the timeout message."""

    def __init__(self) -> None:
        self.path = os.environ.get("DS_LAUNCH_HEARTBEAT_FILE") or None
        self.phase = "start-up"

    def __call__(self, phase: str) -> None:
        self.phase = phase
        if self.path is None:
            return
        tmp = f"{self.path}.tmp-{os.getpid()}"
        try:
            with open(tmp, "w") as f:
                f.write(phase + "\n")
            os.replace(tmp, self.path)
        except OSError:  # a full disk must not stop training; the launcher then sees an old beat and names it
            pass


# -- the data position ---------------------------------------------------------------------------------
class DataPosition:
    """Where the run is in its data: ``(epoch, samples of that epoch's order consumed by all ranks together)``.

    The loader deals each epoch's shuffled order out rank by rank (``DistributedSampler``): after ``b``
    micro-batches per rank, ranks have consumed exactly the first ``b * micro * world`` samples of the order,
    whatever the world size. Counting the position in samples (not in per-rank batches) is what lets a run with
    another number of ranks or micro-batch size resume it: when the count is a whole number of the new run's
    global micro-batches, the loader just skips that many batches; otherwise the rest of that epoch's order is
    dealt out to the new ranks here (no sample skipped or repeated; as the loader does at every epoch end, the
    last few are repeated to give every rank the same number), and the next epochs come from the loader again.
    """

    def __init__(self, loader, world: int, rank: int) -> None:
        self.loader, self.world, self.rank = loader, world, rank
        self.micro = loader.batch_size
        self.epoch = 0
        self.skip = 0  # > 0: the current epoch resumes at this sample, from our own dealing (see above)
        self.taken = 0  # micro-batches of this rank handed out since `skip`

    def _epoch_samples(self) -> int:
        """Distinct positions an epoch has with this run's layout (drop_last trims the ragged tail)."""
        n = len(self.loader.dataset)
        if not self.loader.drop_last:
            return n
        return (n // self.world) // self.micro * self.micro * self.world

    def state(self) -> dict:
        if self.skip:
            epoch, samples = self.epoch, self.skip + self.taken * self.micro * self.world
            if self.taken >= self._rest_batches:
                epoch, samples = epoch + 1, 0
        else:
            epoch, samples = self.loader.epoch, self.loader.batch * self.micro * self.world
            if samples >= self._epoch_samples():
                epoch, samples = epoch + 1, 0
        return {"epoch": epoch, "samples": samples, "world_size": self.world, "micro_batch": self.micro,
                "dataset_len": len(self.loader.dataset)}

    def resume(self, epoch: int, samples: int) -> None:
        if samples >= self._epoch_samples():
            epoch, samples = epoch + 1, 0
        per_batch = self.micro * self.world
        if samples % per_batch == 0:
            self.loader.load_state_dict({"epoch": epoch, "batch": samples // per_batch})
            self.skip = 0
        else:
            self.epoch, self.skip, self.taken = epoch, samples, 0
            rest = len(self.loader.dataset) - samples
            per_rank = rest // self.world if self.loader.drop_last else -(-rest // self.world)
            self._rest_batches = per_rank // self.micro if self.loader.drop_last else -(-per_rank // self.micro)

    def _rest_of_epoch(self):
        sampler = self.loader.sampler
        # the epoch's whole order, from the same torch sampler with one replica (no padding)
        whole = torch.utils.data.DistributedSampler(self.loader.dataset, num_replicas=1, rank=0,
                                                    shuffle=sampler.shuffle, seed=sampler.seed, drop_last=False)
        whole.set_epoch(self.epoch)
        rest = list(whole)[self.skip:]
        if self.loader.drop_last:
            rest = rest[: len(rest) // self.world * self.world]
        elif len(rest) % self.world:
            pad = self.world - len(rest) % self.world
            rest += (rest * pad)[:pad]
        mine = rest[self.rank::self.world][self.taken * self.micro:]
        batches = torch.utils.data.DataLoader(self.loader.dataset, batch_size=self.micro, sampler=mine,
                                              collate_fn=self.loader.collate_fn, drop_last=self.loader.drop_last)
        for batch in batches:
            self.taken += 1
            yield batch

    def batches(self):
        """Micro-batches from the position on, epoch after epoch, without end."""
        while True:
            if self.skip:
                yield from self._rest_of_epoch()
                self.loader.set_epoch(self.epoch + 1)
                self.skip = self.taken = 0
            yield from self.loader


def restore_position(position: DataPosition, client: dict, engine, rank: int) -> None:
    """Put the data position of the checkpoint's ``client_state`` into ``position``; say what changed."""
    data = client.get("data")
    if data is None:  # written before positions were counted in samples: only the same layout can resume it
        position.loader.load_state_dict(client["loader"])
        return
    try:
        epoch, samples = int(data["epoch"]), int(data["samples"])
        saved_world, saved_micro = int(data["world_size"]), int(data["micro_batch"])
        saved_accum, saved_len = int(data.get("accumulation", 1)), int(data["dataset_len"])
    except (KeyError, TypeError, ValueError):
        raise SystemExit(f"train_gpt: the checkpoint's client_state['data'] is not a data position: {data!r}") from None
    if epoch < 0 or samples < 0:
        raise SystemExit(f"train_gpt: the checkpoint's data position {data!r} is negative")
    n = len(position.loader.dataset)
    accum = engine.gradient_accumulation_steps()
    if rank == 0 and saved_len != n:
        print(f"train_gpt: warning: the checkpoint's data set had {saved_len:,} training windows, this one has {n:,} "
              f"(--data-bytes or --context changed?): its position ({samples:,} samples into epoch {epoch}) is "
              "applied to this data set's order", flush=True)
    position.resume(epoch, samples)
    saved_global = saved_world * saved_micro * saved_accum
    if rank == 0 and (saved_world, saved_micro, saved_accum) != (position.world, position.micro, accum):
        print(f"train_gpt: the checkpoint was written by {saved_world} rank(s) with micro-batch {saved_micro} x "
              f"{saved_accum} accumulation (global batch {saved_global}); this run has {position.world} rank(s) with "
              f"{position.micro} x {accum} (global batch {engine.train_batch_size()}). The data position is kept in "
              f"samples: epoch {epoch}, {samples:,} of {n:,} windows consumed, continuing with the next one; each step "
              f"now takes {engine.train_batch_size()} sequences (the LR schedule still counts steps)", flush=True)


# -- resuming: the checkpoint's state, this run's settings ---------------------------------------------
# scheduler entries that are its position, not its settings
_SCHEDULE_POSITION = {"last_epoch", "_step_count", "_last_lr", "_get_lr_called_within_step", "_is_initial"}
_WHERE = {"total_num_steps": " (--steps)", "warmup_num_steps": " (--steps and the config)",
          "peak_lrs": " (the config's optimizer lr)", "base_lrs": " (the config's optimizer lr)"}
# param-group entries that are not hyper-parameters
_GROUP_STATE = {"params", "step"}


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, float) for v in value):
        return _short(value[0]) if len(set(value)) == 1 else "[" + ", ".join(_short(v) for v in value) + "]"
    return repr(value)


def run_settings(engine) -> dict:
    """The settings this run was built with, captured before a checkpoint overwrites them."""
    # copies: loading the checkpoint replaces (and may mutate) what the scheduler and the groups hold
    return copy.deepcopy({
        "scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None,
        "groups": [{k: v for k, v in g.items() if k not in _GROUP_STATE} for g in engine.optimizer.param_groups]})


def apply_run_settings(engine, fresh: dict, rank: int) -> None:
    """After ``load_checkpoint``: put this run's settings back over the checkpoint's, keeping its position.

    The scheduler is rebuilt from this run's state dict with the checkpoint's step index: ds-optim's schedules
    are closed-form in the step, so loading that gives this run's lrs at the checkpoint's step. The optimizer's
    hyper-parameters (betas, eps, weight decay; the lr when there is no schedule) are this run's too. Each
    difference is named in one line; a schedule that cannot be moved (not closed-form) is kept, with a warning."""
    changes, kept = [], []
    sched = engine.lr_scheduler
    if sched is not None and fresh["scheduler"] is not None:
        loaded = sched.state_dict()
        keys = sorted(k for k in set(fresh["scheduler"]) | set(loaded) if k not in _SCHEDULE_POSITION)
        differ = [k for k in keys if fresh["scheduler"].get(k) != loaded.get(k)]
        if "peak_lrs" in differ and "base_lrs" in differ:
            differ.remove("base_lrs")  # the same peak lr, as torch records it
        if differ:
            named = [f"scheduler {k} {_short(loaded.get(k))} -> {_short(fresh['scheduler'].get(k))}"
                     + _WHERE.get(k, "") for k in differ]
            if hasattr(sched, "_lrs_at"):
                lr_before = engine.get_lr()[0]
                merged = {**fresh["scheduler"], **{k: loaded[k] for k in _SCHEDULE_POSITION if k in loaded}}
                sched.load_state_dict(merged)
                changes += named
                changes.append(f"lr at step {loaded.get('last_epoch')} {lr_before:.3g} -> {engine.get_lr()[0]:.3g}")
            else:
                kept += named
    for i, (group, want) in enumerate(zip(engine.optimizer.param_groups, fresh["groups"])):
        for key, value in want.items():
            if key in ("lr", "initial_lr") and sched is not None:
                continue  # the schedule's, handled above
            if key in group and group[key] != value:
                changes.append(f"optimizer group {i} {key} {_short(group[key])} -> {_short(value)}")
                group[key] = value
    if rank == 0 and changes:
        print(f"train_gpt: resumed at step {engine.global_steps} with settings that differ from the checkpoint's; "
              f"this run's win (the schedule keeps its position): {'; '.join(changes)}", flush=True)
    if rank == 0 and kept:
        print(f"train_gpt: warning: the checkpoint's schedule is kept, this run's differs but a "
              f"{type(sched).__name__} cannot be rebuilt at a step: {'; '.join(kept)}", flush=True)


# -- the run -------------------------------------------------------------------------------------------
def main(argv=None) -> None:
    args = parse_args(argv)
    cfg = build_config(args)
    beat = Heartbeat()
    # our own group, with the timeout; initialize() keeps a group that exists
    timeout = comms_timeout(args)
    ds_train.init_distributed(timeout=timeout)
    beat("init")
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = GPT(context=args.context, dim=args.dim, heads=args.heads, layers=args.layers)

    text = stdlib_text(args.data_bytes)
    split = int(len(text) * 0.9)
    train_set, val_set = ByteWindows(text[:split], args.context), ByteWindows(text[split:], args.context)

    # --local_rank is accepted and ignored (the environment's LOCAL_RANK decides): not handed to initialize()
    engine, _, loader, _ = ds_train.initialize(args=argparse.Namespace(**{**vars(args), "local_rank": None}),
                                               model=model, training_data=train_set, config=cfg)
    del model, _  # the engine holds what it needs; nothing else may keep the process group alive at exit
    rank, world = dist.get_rank(), dist.get_world_size()
    position = DataPosition(loader, world, rank)
    try:
        run(args, cfg, engine, position, val_set, beat, rank, world, len(train_set))
    except RuntimeError as exc:
        if "timed out" in str(exc).lower() or "timeout" in str(exc).lower():
            print(f"train_gpt: rank {rank}: a collective did not complete within the {timeout.total_seconds():g} s "
                  f"process-group timeout during {beat.phase!r}: another rank stopped, hung or died (its launcher "
                  "names it)", flush=True)
        raise
    # all ranks leave together; every reference to the engine (which holds the process group) goes first, so
    # that destroy_process_group() really frees gloo and its threads before the interpreter exits
    dist.barrier()
    del engine, loader, position
    gc.collect()
    dist.destroy_process_group()
    beat("done")


def check_update(engine, step: int, loss: float, skipped: bool, rank: int, save_dir: str) -> None:
    """A non-finite loss (the same all-reduced value on every rank, so every rank decides alike): fine if the engine
    refused the step, or if the update it made is finite (a loss that is inf only in its value, e.g. ``+ inf``,
    has finite gradients); else the weights are poisoned: stop before a checkpoint can hold them."""
    if skipped:
        if rank == 0:
            print(f"train_gpt: step {step}: the loss is {loss} on at least one rank; the engine refused the update "
                  "(skipped step)", flush=True)
        return
    finite = all(bool(torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all())
                 for p in engine.module.parameters())
    flag = torch.tensor([1.0 if finite else 0.0], device=engine.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    if flag.item() == 1.0:
        if rank == 0:
            print(f"train_gpt: step {step}: the loss is {loss} on at least one rank, but the update the engine made "
                  "is finite (finite gradients); going on", flush=True)
        return
    raise RuntimeError(
        f"train_gpt: the loss at step {step} is {loss} (non-finite on at least one rank) and the engine applied "
        f"a non-finite update: stopping before any checkpoint holds it (the latest in {save_dir} is still a "
        "finite one; a restart resumes from it)")


def save(engine, save_dir: str, client: dict, rank: int) -> None:
    """``engine.save_checkpoint``; a full disk (on any rank: the engine reports one rank's failure on every rank)
    ends the run with :data:`DISK_FULL_EXIT_CODE` and says so, instead of an error a launcher would restart into."""
    try:
        engine.save_checkpoint(save_dir, client_state=client)
    except (OSError, RuntimeError) as exc:
        full = (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or "No space left on device" in str(exc)
        if not full:
            raise
        print(f"train_gpt: rank {rank}: the checkpoint of step {engine.global_steps} could not be written to "
              f"{save_dir}: no space left on device ({exc}). Free space or pass another --save-dir; the latest "
              f"complete checkpoint there is still the one to resume from. Exit code {DISK_FULL_EXIT_CODE}: "
              "ds-launch does not restart into the same full disk", flush=True)
        raise SystemExit(DISK_FULL_EXIT_CODE) from None


def run(args, cfg, engine, position: DataPosition, val_set, beat, rank: int, world: int, n_train: int) -> None:
    micro = engine.train_micro_batch_size_per_gpu()
    accum = engine.gradient_accumulation_steps()
    tokens_per_step = engine.train_batch_size() * args.context

    def client_state() -> dict:
        data = {**position.state(), "accumulation": accum}
        return {"loader": position.loader.state_dict(), "data": data, "losses": losses, "val": val_history}

    losses: list[float] = []
    val_history: list[tuple[int, float]] = []
    resumed_from = None
    if os.path.exists(os.path.join(args.save_dir, "latest")):
        beat("load")
        fresh = run_settings(engine)
        path, client = engine.load_checkpoint(args.save_dir)
        if path is not None:
            restore_position(position, client, engine, rank)
            losses = list(client["losses"])
            val_history = [tuple(v) for v in client.get("val", [])]
            resumed_from = engine.global_steps
            apply_run_settings(engine, fresh, rank)
    if rank == 0:
        print(f"train_gpt: {sum(p.numel() for p in engine.module.parameters()):,} params, {world} rank(s), ZeRO stage "
              f"{engine_stage(cfg)}, micro-batch {micro} x {accum} accumulation x {world} = {engine.train_batch_size()} "
              f"sequences of {args.context} bytes per step, {n_train:,} training windows"
              + (f"; resumed from step {resumed_from} ({args.save_dir})" if resumed_from is not None else ""),
              flush=True)

    bar = None
    if rank == 0 and not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=args.steps, initial=engine.global_steps, desc="train", unit="step", dynamic_ncols=True)
    last_ckpt = None
    step_loss, micro_steps = 0.0, 0
    start, start_step = time.perf_counter(), engine.global_steps
    done = engine.global_steps >= args.steps
    if done:  # the checkpoint is already at the end of this run: report it instead of training further
        last_ckpt = os.path.join(args.save_dir, f"global_step{engine.global_steps}")
        if rank == 0:
            print(f"train_gpt: {args.save_dir} already holds step {engine.global_steps} (--steps {args.steps}); "
                  "nothing to train (remove it or pass another --save-dir to train again)", flush=True)
        if not val_history or val_history[-1][0] != engine.global_steps:
            beat(f"eval {engine.global_steps}")
            val_history.append((engine.global_steps, evaluate(engine, val_set, micro, args.eval_batches)))
    batches = position.batches()
    while not done:
        beat(f"step {engine.global_steps + 1}")
        chunk = next(batches).to(engine.device)
        loss = engine(chunk[:, :-1], chunk[:, 1:])
        engine.backward(loss)
        boundary = engine.is_gradient_accumulation_boundary()
        skipped_before = getattr(engine, "skipped_steps", 0)
        engine.step()
        step_loss += loss.item()
        micro_steps += 1
        if not boundary:
            continue
        losses.append(mean_over_ranks(step_loss / micro_steps, engine.device))
        step_loss, micro_steps = 0.0, 0
        step = engine.global_steps
        if not math.isfinite(losses[-1]):
            check_update(engine, step, losses[-1], getattr(engine, "skipped_steps", 0) > skipped_before, rank,
                         args.save_dir)
        elapsed = time.perf_counter() - start
        tok_s = (step - start_step) * tokens_per_step / max(elapsed, 1e-9)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{engine.get_lr()[0]:.2e}", tok_s=f"{tok_s:,.0f}")
        elif rank == 0 and (step % 50 == 0 or step == 1):
            print(f"step {step:5d}  loss {losses[-1]:.4f}  {tok_s:,.0f} tokens/s", flush=True)
        final = step >= args.steps
        if final or (args.eval_interval and step % args.eval_interval == 0):
            beat(f"eval {step}")
            val_history.append((step, evaluate(engine, val_set, micro, args.eval_batches)))
        if final or (args.save_interval and step % args.save_interval == 0):
            beat(f"save {step}")
            save(engine, args.save_dir, client_state(), rank)
            last_ckpt = os.path.join(args.save_dir, f"global_step{step}")
        if final or (args.stop_at is not None and step >= args.stop_at):
            done = True
    batches.close()
    if bar is not None:
        bar.close()
    engine.destroy()  # closes the monitors (the TensorBoard event file)
    beat("report")
    elapsed = time.perf_counter() - start
    steps_run = engine.global_steps - start_step
    tokens_per_s = steps_run * tokens_per_step / elapsed if steps_run else 0.0

    if rank == 0:
        train_loss = sum(losses[-10:]) / max(len(losses[-10:]), 1)
        val_loss = val_history[-1][1] if val_history and val_history[-1][0] == engine.global_steps else None
        plot = None
        if args.plot and engine.global_steps >= args.steps and losses:
            plot = plot_losses(args.plot, losses, val_history,
                               f"byte-level GPT on the Python stdlib, {world} ranks, ZeRO-{engine_stage(cfg)}")
        print(f"train_gpt: step {engine.global_steps}/{args.steps} in {elapsed:.1f} s ({tokens_per_s:,.0f} tokens/s); "
              f"train loss (last 10 steps) {train_loss:.4f}"
              + (f", validation loss {val_loss:.4f}" if val_loss is not None else "")
              + (f"; checkpoint {last_ckpt}" if last_ckpt else "") + (f"; plot {plot}" if plot else ""), flush=True)
        if args.out:
            pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            pathlib.Path(args.out).write_text(json.dumps({
                "steps": engine.global_steps, "world_size": world, "zero_stage": engine_stage(cfg),
                "losses": losses, "tokens_per_s": tokens_per_s, "seconds": elapsed,
                "final_train_loss": train_loss, "final_val_loss": val_loss, "val": val_history,
                "checkpoint": last_ckpt, "resumed_from": resumed_from, "plot": plot,
                "lr": engine.get_lr()[0],
            }, indent=1))


def engine_stage(cfg: dict) -> int:
    return int(cfg.get("zero_optimization", {}).get("stage", 0))


if __name__ == "__main__":
    main()
