"""Activation checkpointing through ``initialize``: the config's ``activation_checkpointing`` section configures
``ds_train.checkpointing`` from the engine, and a model whose blocks run under ``checkpointing.checkpoint`` trains
with the same losses and gradients as without checkpointing (fp32, 2 gloo ranks, dropout in the blocks), with
``cpu_checkpointing`` too (its host-offload path forced on the CPU tensors here; on a GPU it moves the device
tensors, see the GPU test)."""

import pytest
import torch
from harness import requires_gpus, run_distributed

from ds_train import _ckpt_offload, checkpointing

STEPS = 3
_ON_DEVICE = checkpointing._on_device
LR = 0.5


class Net(torch.nn.Module):
    def __init__(self, ckpt, reentrant=True):
        super().__init__()
        torch.manual_seed(0)
        self.ckpt, self.reentrant = ckpt, reentrant
        self.inp = torch.nn.Linear(8, 32)
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.LayerNorm(32), torch.nn.Linear(32, 64), torch.nn.GELU(),
                                torch.nn.Dropout(0.2), torch.nn.Linear(64, 32)) for _ in range(3))
        self.head = torch.nn.Linear(32, 1)

    def forward(self, x):
        h = self.inp(x)
        run = checkpointing.checkpoint if self.reentrant else checkpointing.non_reentrant_checkpoint
        for block in self.blocks:
            h = h + (run(block, h) if self.ckpt else block(h))
        return self.head(h).pow(2).mean()


def _train(section, ckpt, reentrant=True, force_offload=False):
    import torch.distributed as dist

    import ds_train

    checkpointing._configured = False  # each run configures from its own config, as a fresh process would
    checkpointing._options.update(checkpointing._DEFAULTS)
    # force_offload: take the host-offload path with CPU tensors (nothing else to offload from on the CPU)
    checkpointing._on_device = (lambda t: isinstance(t, torch.Tensor)) if force_offload else _ON_DEVICE
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
              "optimizer": {"type": "SGD", "params": {"lr": LR}}}
    if section is not None:
        config["activation_checkpointing"] = section
    engine, *_ = ds_train.initialize(model=Net(ckpt, reentrant), config=config)
    gen = torch.Generator().manual_seed(10 + dist.get_rank())
    losses, grads = [], []
    for step in range(STEPS):
        x = torch.randn(4, 8, generator=gen)
        torch.manual_seed(100 + step)  # the dropout masks: the same in every run
        before = [p.detach().clone() for p in engine.module.parameters()]
        loss = engine(x)
        engine.backward(loss)
        engine.step()
        losses.append(loss.detach())
        # the averaged gradient the step applied (plain SGD: p -= lr * g); read from the params because .grad
        # right after backward may still be under the engine's asynchronous all-reduce
        grads.append([(b - p.detach()) / LR for b, p in zip(before, engine.module.parameters())])
    return losses, grads, dict(checkpointing._options), checkpointing.is_configured(), \
        dict(checkpointing._offload_stats)


def _same(a, b):
    for la, lb in zip(a[0], b[0]):
        torch.testing.assert_close(la, lb, rtol=1e-6, atol=1e-7)
    for ga, gb in zip(a[1], b[1]):
        for x, y in zip(ga, gb):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    assert any(g.abs().max() > 1e-3 for step in a[1] for g in step)  # the steps did move the params


def _three_runs(reentrant):
    section = {"partition_activations": False, "contiguous_memory_optimization": False,
               "synchronize_checkpoint_boundary": True, "number_checkpoints": 3}
    return (_train(None, False), _train(section, True, reentrant),
            _train({"cpu_checkpointing": True}, True, reentrant, True))


@pytest.mark.parametrize("reentrant", [True, False], ids=["checkpoint", "non_reentrant_checkpoint"])
def test_same_losses_and_grads_as_without_checkpointing_through_initialize(reentrant):
    plain, ckpt, offload = zip(*run_distributed(_three_runs, 2, reentrant, timeout=240))
    for rank in range(2):
        _same(plain[rank], ckpt[rank])
        _same(plain[rank], offload[rank])
        # the two ranks saw different data: the gradients were averaged, the losses differ
        assert not torch.equal(plain[0][0][0], plain[1][0][0])
    opts, configured = ckpt[0][2], ckpt[0][3]
    assert configured and opts["synchronize"] and opts["num_checkpoints"] == 3 and not opts["checkpoint_in_cpu"]
    opts, stats = offload[0][2], offload[0][4]
    assert opts["checkpoint_in_cpu"]
    assert stats["regions"] == 3 * STEPS and stats["bytes"] == 3 * STEPS * 4 * 32 * 4  # 3 blocks' inputs a step
    assert plain[0][3] is False  # no section: the engine leaves checkpointing unconfigured


def test_a_scripts_own_configure_wins():
    # configured before initialize (Megatron calls configure itself): the engine does not overwrite it
    result = run_distributed(_configured_first, 1, timeout=120)[0]
    assert result == (True, 7)


def _configured_first():
    import ds_train

    checkpointing.configure(None, num_checkpoints=7)
    ds_train.initialize(model=Net(True), config={
        "train_micro_batch_size_per_gpu": 4, "optimizer": {"type": "SGD", "params": {"lr": 0.05}},
        "activation_checkpointing": {"number_checkpoints": 2}})
    return checkpointing.is_configured(), checkpointing._options["num_checkpoints"]


class _TensorParallelUnit:
    """A Megatron-style mpu whose model-parallel group is the whole world (every rank holds the same
    activations, as between tensor-parallel layers)."""

    def get_model_parallel_world_size(self):
        import torch.distributed as dist

        return dist.get_world_size()

    def get_model_parallel_rank(self):
        import torch.distributed as dist

        return dist.get_rank()

    def get_model_parallel_group(self):
        import torch.distributed as dist

        return dist.group.WORLD


def _partition_runs(reentrant):
    checkpointing._on_device = lambda t: isinstance(t, torch.Tensor)  # count what cpu_checkpointing keeps
    mpu = _TensorParallelUnit()
    out = {}
    for name, ckpt, partition in (("plain", False, False), ("whole", True, False), ("sliced", True, True)):
        checkpointing.configure(mpu, partition_activations=partition, checkpoint_in_cpu=True)
        before = checkpointing._offload_stats["bytes"]
        model = Net(ckpt, reentrant)
        x = torch.randn(3, 8, generator=torch.Generator().manual_seed(3))  # the same on both ranks
        torch.manual_seed(100)
        loss = model(x)
        loss.backward()
        out[name] = (loss.detach(), [p.grad.clone() for p in model.parameters()],
                     checkpointing._offload_stats["bytes"] - before)
    # an odd number of elements (the slices are padded) and an input that needs its gradient
    checkpointing.configure(mpu, partition_activations=True)
    torch.manual_seed(0)
    lin = torch.nn.Linear(7, 7)
    grads = []
    for partition in (False, True):
        checkpointing.partition_activations_in_checkpoint(partition)
        x = torch.randn(3, 7, generator=torch.Generator().manual_seed(4), requires_grad=True)
        run = checkpointing.checkpoint if reentrant else checkpointing.non_reentrant_checkpoint
        run(lin, x).square().sum().backward()
        grads.append([x.grad.clone(), lin.weight.grad.clone()])
        lin.zero_grad()
    return out, grads


@pytest.mark.parametrize("reentrant", [True, False], ids=["checkpoint", "non_reentrant_checkpoint"])
def test_partition_activations_across_a_model_parallel_group(reentrant):
    for out, grads in run_distributed(_partition_runs, 2, reentrant, timeout=180):
        for name in ("whole", "sliced"):
            torch.testing.assert_close(out[name][0], out["plain"][0], rtol=0, atol=0)
            for a, b in zip(out[name][1], out["plain"][1]):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        # each rank kept half of every checkpointed input (3 blocks' 3 x 32 fp32 inputs)
        assert out["whole"][2] == 3 * 3 * 32 * 4 and out["sliced"][2] == out["whole"][2] // 2
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.gpu
@requires_gpus(1)
@pytest.mark.parametrize("reentrant", [True, False])
def test_cpu_checkpointing_moves_the_saved_inputs_off_the_gpu(reentrant):
    """On a GPU: the same gradients, and the peak memory of a deep stack drops when the checkpointed inputs live
    on the host."""
    width, depth, tokens = 1024, 16, 4096

    def run(ckpt, offload):
        checkpointing.configure(None, checkpoint_in_cpu=offload)
        torch.manual_seed(0)
        blocks = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.GELU(),
                                                         torch.nn.Dropout(0.1)) for _ in range(depth)).cuda()
        x = torch.randn(tokens, width, device="cuda", requires_grad=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        torch.manual_seed(1)
        h = x
        fn = checkpointing.checkpoint if reentrant else checkpointing.non_reentrant_checkpoint
        for b in blocks:
            h = fn(b, h) if ckpt else b(h)
        peak_fwd = torch.cuda.max_memory_allocated() - base
        h.square().mean().backward()
        return peak_fwd, [p.grad for p in blocks.parameters()] + [x.grad]

    saved = dict(checkpointing._options), checkpointing._configured
    try:
        plain_peak, plain = run(False, False)
        ckpt_peak, ckpt = run(True, False)
        off_peak, off = run(True, True)
    finally:  # leave the module as this process found it (other tests check is_configured())
        checkpointing._options.update(saved[0])
        checkpointing._configured = saved[1]
    for a, b, c in zip(plain, ckpt, off):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, c)
    activation = tokens * width * 4
    assert ckpt_peak < 0.75 * plain_peak
    assert off_peak < ckpt_peak - (depth // 2) * activation  # the block inputs are no longer on the GPU


# -- cpu_checkpointing's host buffers: pooled across steps, prefetched, results unchanged (in this process) ------
def _local_steps(ckpt, reentrant, offload, steps=3):
    checkpointing.configure(None, checkpoint_in_cpu=offload)
    model = Net(ckpt, reentrant)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(5)
    losses, grads = [], []
    for step in range(steps):
        x = torch.randn(4, 8, generator=gen)
        torch.manual_seed(100 + step)  # the dropout masks
        loss = model(x)
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in model.parameters()])
        opt.step()
        opt.zero_grad(set_to_none=True)
    return losses, grads


@pytest.fixture
def forced_offload():
    """The host-offload path taken with CPU tensors; the module's state put back afterwards."""
    saved = dict(checkpointing._options), checkpointing._configured
    checkpointing._on_device = lambda t: isinstance(t, torch.Tensor)
    checkpointing.reset()  # an empty pool: the allocation counts below start from zero
    try:
        yield
    finally:
        checkpointing._on_device = _ON_DEVICE
        checkpointing._options.update(saved[0])
        checkpointing._configured = saved[1]
        checkpointing.reset()


@pytest.mark.parametrize("reentrant", [True, False], ids=["checkpoint", "non_reentrant_checkpoint"])
def test_cpu_checkpointing_reuses_its_host_buffers_across_steps(forced_offload, reentrant):
    stats = checkpointing._offload_stats
    plain = _local_steps(False, reentrant, False)
    before = dict(stats)
    offload = _local_steps(True, reentrant, True)
    for a, b in zip(plain[0], offload[0]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for ga, gb in zip(plain[1], offload[1]):
        for x, y in zip(ga, gb):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
    delta = {k: stats[k] - before[k] for k in stats}
    # 3 blocks, each input (4, 32) fp32: 3 buffers live at once in a forward, allocated in the first step only;
    # the two later steps take all three from the pool
    assert delta["regions"] == 9 and delta["bytes"] == 9 * 4 * 32 * 4
    assert delta["host_buffers"] == 3 and delta["host_buffer_bytes"] == 3 * 4 * 32 * 4
    assert delta["host_buffer_reuses"] == 6
    # in each backward, blocks 2 and 1 bring the input of the block before them back while they recompute
    assert delta["prefetches"] == 6
    # reset() frees the pool: the next step allocates again
    checkpointing.reset()
    _local_steps(True, reentrant, True, steps=1)
    assert stats["host_buffers"] - before["host_buffers"] == 6


def _double_backward(ckpt, reentrant, offload, reuse_between=False, step_between=False):
    checkpointing.configure(None, checkpoint_in_cpu=offload)
    model = Net(ckpt, reentrant)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(6))
    torch.manual_seed(7)
    loss = model(x)
    loss.backward(retain_graph=True)
    held = []
    if reuse_between:  # another forward (kept alive) takes the pooled buffers the first backward gave back
        held.append(model(x))
    if step_between:  # another forward and backward: the buffers are taken, overwritten, and given back
        model(x * 2).backward()
    loss.backward()
    held.clear()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("reentrant", [True, False], ids=["checkpoint", "non_reentrant_checkpoint"])
def test_cpu_checkpointing_backward_twice(forced_offload, reentrant):
    plain = _double_backward(False, reentrant, False)
    twice = _double_backward(True, reentrant, True)
    for a, b in zip(plain, twice):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    with pytest.raises(RuntimeError, match="host copy of its inputs has been reused by a later region"):
        _double_backward(True, reentrant, True, reuse_between=True)
    # the buffers are back in the pool by then, but hold the other batch's inputs: refused, not recomputed from them
    with pytest.raises(RuntimeError, match="host copy of its inputs has been reused by a later region"):
        _double_backward(True, reentrant, True, step_between=True)


@pytest.mark.parametrize("reentrant", [True, False], ids=["checkpoint", "non_reentrant_checkpoint"])
def test_cpu_checkpointing_refuses_an_input_modified_in_place(forced_offload, reentrant):
    checkpointing.configure(None, checkpoint_in_cpu=True)
    run = checkpointing.checkpoint if reentrant else checkpointing.non_reentrant_checkpoint
    lin = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8, requires_grad=True)

    def block(h):
        return lin(h.mul_(2))  # in place on the region's input: its host copy may hold either value

    with pytest.raises(RuntimeError, match="modified one of its inputs in place"):
        run(block, x * 1)


def test_host_pool_keeps_idle_buffers_within_the_working_set():
    """Shapes that change from step to step (variable sequence lengths) do not pile up host buffers: the idle
    ones are capped at the most bytes ever in use at once, oldest evicted first."""
    pool = _ckpt_offload._HostPool()
    evicted = checkpointing._offload_stats["host_buffer_evictions"]
    for length in (16, 24, 32, 40):  # a step of 3 regions, each with a new sequence length
        like = torch.empty(4, length)
        held = [pool.acquire(like, pinned=False) for _ in range(3)]
        for buf in held:
            pool.release(*buf)
        assert pool._idle_bytes <= pool._peak_in_use
    assert pool._peak_in_use == 3 * 4 * 40 * 4  # the largest step
    assert checkpointing._offload_stats["host_buffer_evictions"] - evicted >= 6
    kept = [b for bufs in pool._free.values() for b in bufs]
    assert all(tuple(b.shape) == (4, 40) for b in kept) and len(kept) == 3


@pytest.mark.gpu
@requires_gpus(1)
@pytest.mark.parametrize("reentrant", [True, False])
def test_cpu_checkpointing_on_gpu_pinned_pool_and_same_grads(reentrant):
    """Several steps on a GPU: the host buffers are pinned and reused from the second step, and losses and
    gradients equal those without checkpointing (the copies on the side stream are ordered correctly)."""
    saved = dict(checkpointing._options), checkpointing._configured
    checkpointing.reset()

    def run(ckpt, offload):
        checkpointing.configure(None, checkpoint_in_cpu=offload)
        model = Net(ckpt, reentrant).cuda()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        out = []
        for step in range(3):
            x = torch.randn(4096, 8, device="cuda", generator=torch.Generator("cuda").manual_seed(step))
            torch.manual_seed(100 + step)
            loss = model(x)
            loss.backward()
            out.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
            opt.step()
            opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        return out

    try:
        plain = run(False, False)
        before = dict(checkpointing._offload_stats)
        offload = run(True, True)
        pool = [b for bufs in _ckpt_offload._POOL._free.values() for b in bufs]
    finally:
        checkpointing._options.update(saved[0])
        checkpointing._configured = saved[1]
        checkpointing.reset()
    for (la, ga), (lb, gb) in zip(plain, offload):
        torch.testing.assert_close(la, lb)
        for a, b in zip(ga, gb):
            torch.testing.assert_close(a, b)
    stats = checkpointing._offload_stats
    assert stats["host_buffers"] - before["host_buffers"] == 3
    assert stats["host_buffer_reuses"] - before["host_buffer_reuses"] == 6
    assert len(pool) == 3 and all(b.is_pinned() for b in pool)
