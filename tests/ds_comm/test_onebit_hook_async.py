"""The asynchronous 1-bit DDP hook (``OnebitHookState(async_op=True)``, opt-in) against the synchronous
one, on real DDP over 2 gloo ranks: the same losses and parameters bit for bit at every step (warm-up and 1-bit
iterations, several buckets, with and without ``find_unused_parameters``), a hook call that returns before the
peer has even started its backward, and a failure in the worker raised from backward on every rank."""

import time

import pytest
import torch
import torch.distributed as dist
from harness import run_distributed
from torch.nn.parallel import DistributedDataParallel as DDP

import ds_comm

WARMUP, STEPS, DELAY = 2, 6, 1.0  # DELAY: generous, so a loaded machine cannot blur sync and async


class _Net(torch.nn.Module):
    def __init__(self, unused: bool):
        super().__init__()
        torch.manual_seed(0)
        # each 64x64 weight (16 kB) closes a bucket of bucket_cap_mb=0.001: 4 buckets once DDP has rebuilt them
        self.body = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64),
                                        torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(),
                                        torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
        # a layer no forward uses: DDP's find_unused_parameters all-reduces its bitmap on DDP's group mid-backward
        self.spare = torch.nn.Linear(3, 3) if unused else None

    def forward(self, x):
        return self.body(x)


def _train(async_op, find_unused, steps=STEPS, hook=ds_comm.onebit_hook, delay_rank=None):
    rank = dist.get_rank()
    model = DDP(_Net(find_unused), bucket_cap_mb=0.001, find_unused_parameters=find_unused)  # several buckets
    state = ds_comm.OnebitHookState(warmup_steps=WARMUP, async_op=async_op)
    model.register_comm_hook(state, hook)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    target = torch.randn(16, 1, generator=torch.Generator().manual_seed(7))
    losses, params = [], []
    for step in range(steps):
        g = torch.Generator().manual_seed(step * 10 + rank)
        x = torch.randn(32, 16, generator=g)
        loss = torch.nn.functional.mse_loss(model(x), torch.sin(x @ target))
        opt.zero_grad()
        if delay_rank == rank and step == steps - 1:
            time.sleep(DELAY)
        loss.backward()
        opt.step()
        losses.append(loss.detach().clone())
        params.append(torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()]))
    calls = state.stats.calls
    state.close()
    return losses, params, calls, state.iteration


def _both(find_unused):
    return _train(False, find_unused), _train(True, find_unused)


@pytest.mark.parametrize("find_unused", [False, True], ids=["plain", "find_unused_parameters"])
def test_async_hook_trains_bitwise_like_the_synchronous_one(find_unused):
    for (s_losses, s_params, s_calls, s_iter), (a_losses, a_params, a_calls, a_iter) in run_distributed(
            _both, 2, find_unused, timeout=180):
        assert s_calls == a_calls >= 3 * (STEPS - WARMUP), (s_calls, a_calls)  # several 1-bit buckets per step
        assert s_iter == a_iter == STEPS
        for step, (a, b, pa, pb) in enumerate(zip(s_losses, a_losses, s_params, a_params)):
            assert torch.equal(a, b), (step, a, b)
            assert torch.equal(pa, pb), (step, (pa - pb).abs().max().item())
        assert not torch.equal(s_params[0], s_params[-1])  # it trained


def _timed_hook(record):
    def hook(state, bucket):
        iteration, start = state.iteration, time.perf_counter()
        fut = ds_comm.onebit_hook(state, bucket)
        record.append((iteration, time.perf_counter() - start, fut.done()))
        return fut
    return hook


def _returns_early(async_op):
    record: list = []
    # rank 1 starts the last step's backward DELAY seconds late; rank 0's hook calls of that step
    losses, params, _, _ = _train(async_op, False, steps=WARMUP + 2, hook=_timed_hook(record), delay_rank=1)
    last = [(seconds, done) for it, seconds, done in record if it >= WARMUP + 1]  # the last (1-bit) step's calls
    return last, params[-1]


def test_async_hook_returns_before_the_peers_communicate():
    sync, asynchronous = run_distributed(_returns_early, 2, False), run_distributed(_returns_early, 2, True)
    sync_calls, async_calls = sync[0][0], asynchronous[0][0]  # rank 0, the one that waits for its peer
    assert len(sync_calls) == len(async_calls) >= 3
    # synchronous: the first bucket's call blocks until rank 1 arrives, and every future comes back completed
    assert sync_calls[0][0] > DELAY / 2 and all(done for _, done in sync_calls)
    # asynchronous: no call waits for the peer, and the first bucket's future is still pending when it returns
    assert max(seconds for seconds, _ in async_calls) < DELAY / 2, async_calls
    assert not async_calls[0][1]
    for rank in (0, 1):
        assert torch.equal(sync[rank][1], asynchronous[rank][1])


def _failing_worker():
    model = DDP(_Net(False), bucket_cap_mb=0.001)
    state = ds_comm.OnebitHookState(backend="cupy", async_op=True)  # CPU buckets: the worker's compressed_allreduce refuses it
    model.register_comm_hook(state, ds_comm.onebit_hook)
    try:
        model(torch.randn(4, 16)).sum().backward()
    except Exception as exc:  # noqa: BLE001 - the test inspects what DDP raised
        return str(exc)
    finally:
        state.close()
    return None


def test_an_error_in_the_worker_is_raised_from_backward_on_every_rank():
    for message in run_distributed(_failing_worker, 2):
        assert message is not None and "cupy 1-bit backend needs CUDA tensors" in message, message
