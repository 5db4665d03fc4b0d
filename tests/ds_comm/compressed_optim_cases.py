"""Scaffolding shared by the compressed-optimizer tests (test_zero_one_adam, test_onebit_lamb): the small
regression model and its batches, single-process training, the DDP train-with-checkpoint driver and its
straight-vs-resumed runner (with the module fixture that runs it), the never-touched-embedding-rows worker, the
character corpus and model for the convergence tests, and the not-a-member worker.

An optimizer factory here is called as ``make_optimizer(params, **overrides)``: the tests pass the optimizer class
or a functools.partial of it with their settings. The per-rank functions that run_distributed starts
(``straight_and_resumed``, ``embedding_rows_never_seen``, ``not_a_member``) are module level, so they pickle by
reference, and so do such factories; ``train_chars`` runs inside a rank, called from a test module's own per-rank
function.
"""

import collections
import pathlib

import pytest
import torch
import torch.distributed as dist
from harness import run_distributed
from torch.nn.parallel import DistributedDataParallel as DDP

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONTEXT = 8


# -- the small regression task ----------------------------------------------------------------------------------
def small_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(12, 24), torch.nn.Tanh(), torch.nn.Linear(24, 3))


def batch(step, rank):
    g = torch.Generator().manual_seed(100 * step + rank)
    x = torch.randn(8, 12, generator=g)
    return x, x[:, :3] * 2 - x[:, 3:6] + 0.1 * torch.randn(8, 3, generator=g)


def local_grad(model, flat, step, rank):
    """The gradient of ``rank``'s batch at ``step`` with the params set to ``flat``, flattened."""
    torch.nn.utils.vector_to_parameters(flat, model.parameters())
    model.zero_grad()
    x, y = batch(step, rank)
    torch.nn.functional.mse_loss(model(x), y).backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def train_alone(make_optimizer, steps, dtype=None, **overrides):
    """``small_model`` (cast to ``dtype`` if given) and ``make_optimizer(params, **overrides)`` trained in this
    process, no process group, on rank 0's batches (cast likewise) for steps 1..steps. Returns the model, the
    optimizer and the flat params."""
    model = small_model() if dtype is None else small_model().to(dtype)
    opt = make_optimizer(model.parameters(), **overrides)
    for t in range(1, steps + 1):
        opt.zero_grad()
        x, y = batch(t, 0)
        if dtype is not None:
            x, y = x.to(dtype), y.to(dtype)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return model, opt, torch.nn.utils.parameters_to_vector(model.parameters()).detach()


def train_ddp(make_optimizer, final, rank, steps, start=1, checkpoint=None, save_before=None):
    """DDP training of ``small_model`` with ``make_optimizer(params)`` (registered with DDP) from step ``start``
    (loading ``checkpoint`` when > 1) to ``steps``, saving the checkpoint just before step ``save_before``.
    Returns the flat params, the comm stats, whether each step's backward all-reduced in full precision, and
    ``final(opt)``."""
    model = DDP(small_model())
    opt = make_optimizer(model.parameters())
    opt.register_ddp(model)
    if start > 1:
        saved = torch.load(checkpoint, weights_only=True)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
    full_precision = []
    for t in range(start, steps + 1):
        if t == save_before:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, checkpoint)
        full_precision.append(opt.needs_grad_allreduce())  # what the DDP hook will do in this backward
        x, y = batch(t, rank)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    flat = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    return flat, opt.comm_stats.as_dict(), full_precision, final(opt)


def straight_and_resumed(make_optimizer, final, directory, steps, save_before):
    """In a rank: ``train_ddp`` uninterrupted (saving a checkpoint before ``save_before``), then resumed from that
    checkpoint with a fresh model and optimizer. Returns both runs' results."""
    rank = dist.get_rank()
    checkpoint = f"{directory}/rank{rank}.pt"
    straight = train_ddp(make_optimizer, final, rank, steps, checkpoint=checkpoint, save_before=save_before)
    resumed = train_ddp(make_optimizer, final, rank, steps, start=save_before, checkpoint=checkpoint)
    return straight, resumed


def ddp_runs_fixture(name, make_optimizer, final, steps, save_before):
    """A module-scoped fixture: ``straight_and_resumed`` in 2 ranks, with the checkpoints in a fresh directory.
    Spawning ranks that build a DDP model costs seconds, so the module's tests share this one call."""

    @pytest.fixture(scope="module")
    def ddp_runs(tmp_path_factory):
        directory = str(tmp_path_factory.mktemp(name))
        return run_distributed(straight_and_resumed, 2, make_optimizer, final, directory, steps, save_before)

    return ddp_runs


# -- an embedding whose rows >= 5 no rank touches until one does ----------------------------------------------
def embedding_rows_never_seen(make_optimizer, steps, touch_step, check_step):
    """Each rank uses rows ``rank``, ``2 + rank`` and 4 of a 20x4 embedding, except that rank 1 uses 1, 3 and 15 at
    ``touch_step``; no DDP: the gradients are averaged by hand on the steps where the optimizer wants that
    (``needs_grad_allreduce``). Returns whether, after ``check_step``, rows >= 5
    were untouched, their error feedback zero and their momentum zero; then the final and the initial weight."""
    rank = dist.get_rank()
    torch.manual_seed(0)
    emb = torch.nn.Embedding(20, 4)
    opt = make_optimizer(emb.parameters())
    before = emb.weight.detach().clone()
    for t in range(1, steps + 1):
        ids = torch.tensor([1, 3, 15]) if (t == touch_step and rank == 1) else torch.tensor([rank, 2 + rank, 4])
        opt.zero_grad()
        emb(ids).square().sum().backward()
        if opt.needs_grad_allreduce():
            dist.all_reduce(emb.weight.grad)
            emb.weight.grad /= dist.get_world_size()
        opt.step()
        if t == check_step:
            untouched = torch.equal(emb.weight[5:], before[5:])
            clean = bool((opt._error_feedback[(0, 0)].worker_error.view(20, 4)[5:] == 0).all())
            momentum_zero = bool((opt.state[emb.weight]["exp_avg"][5:] == 0).all())
    return untouched, clean, momentum_zero, emb.weight.detach().clone(), before


# -- two tensors whose gradients differ by 10^4 in scale ---------------------------------------------------------
def step_sizes_with_mixed_scales(make_optimizer, steps, compressed_from):
    """Each rank: a 64-element tensor with gradients of order 1 and one with gradients of order 1e-4 (a rarely
    used embedding beside dense weights), the same random gradients at every step on every rank but with the
    ranks' noise; averaged by hand when the optimizer wants that. Returns the largest step of the small tensor,
    in units of lr, over steps ``compressed_from``..``steps`` (Adam's steps are about lr for every element)."""
    rank = dist.get_rank()
    big = torch.nn.Parameter(torch.zeros(64))
    small = torch.nn.Parameter(torch.zeros(64))
    opt = make_optimizer([big, small])
    lr = opt.param_groups[0]["lr"]
    largest = 0.0
    for t in range(1, steps + 1):
        shared = torch.Generator().manual_seed(t)
        noise = torch.Generator().manual_seed(1000 * t + rank)
        big.grad = torch.randn(64, generator=shared) + 0.5 * torch.randn(64, generator=noise)
        small.grad = 1e-4 * (torch.randn(64, generator=shared) + 0.5 * torch.randn(64, generator=noise))
        if opt.needs_grad_allreduce():
            for p in (big, small):
                dist.all_reduce(p.grad)
                p.grad /= dist.get_world_size()
        before = small.detach().clone()
        opt.step()
        if t >= compressed_from:
            largest = max(largest, (small.detach() - before).abs().max().item() / lr)
    return largest


# -- convergence on a real task ----------------------------------------------------------------------------------
def corpus():
    """A fixed text (tests/data: the repository's Markdown as of commit ba5e2ce, so that the tolerances below do
    not drift as the docs change) as character ids (characters of at least 0.5% frequency get their own id, the
    rest share one). Returns the ids and the vocabulary size."""
    text = (ROOT / "tests" / "data" / "markdown_corpus.txt").read_text()
    counts = collections.Counter(text)
    vocab = {c: i + 1 for i, c in enumerate(sorted(c for c, n in counts.items() if n >= 0.005 * len(text)))}
    return torch.tensor([vocab.get(c, 0) for c in text], dtype=torch.long), len(vocab) + 1


def char_model(vocab):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Embedding(vocab, 16), torch.nn.Flatten(),
                               torch.nn.Linear(CONTEXT * 16, 128), torch.nn.GELU(), torch.nn.Linear(128, vocab))


def train_chars(make_optimizer, steps):
    """In a rank: next-character prediction with DDP and ``make_optimizer(model)``, batches of 64 per rank.
    Returns the mean over the last 30 steps of the loss averaged over the ranks."""
    rank, world = dist.get_rank(), dist.get_world_size()
    data, vocab = corpus()
    model = DDP(char_model(vocab))
    opt = make_optimizer(model)
    gen = torch.Generator().manual_seed(1000 + rank)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(data) - CONTEXT - 1, (64,), generator=gen)
        x = torch.stack([data[i : i + CONTEXT] for i in idx])
        loss = torch.nn.functional.cross_entropy(model(x), data[idx + CONTEXT])
        opt.zero_grad()
        loss.backward()
        opt.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world)
    return sum(losses[-30:]) / 30


# -- bad input ---------------------------------------------------------------------------------------------------
def not_a_member(optimizer_class):
    """Rank 1 builds an ``optimizer_class`` on a process group that only holds rank 0 (which should raise)."""
    group = dist.new_group([0])
    if dist.get_rank() == 1:
        optimizer_class(small_model().parameters(), process_group=group)
