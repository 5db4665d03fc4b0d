"""DeepSpeedDataLoader: sharding over data-parallel ranks (drop_last rules), per-epoch reshuffle, determinism,
mid-epoch resume, collate_fn. The sampler needs no process group (ranks are given), so W ranks run in one
process here; the engine-level version with real ranks is in test_initialize.py."""

import pytest
import torch

from ds_train import DeepSpeedDataLoader, RepeatingLoader


class Numbers(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.tensor(i)


def _epoch(loader):
    return [int(x) for batch in loader for x in batch]


@pytest.mark.parametrize("n, world, batch", [(20, 2, 4), (23, 2, 4), (23, 3, 5), (7, 4, 2)])
def test_keep_last_every_sample_used_ranks_padded_equally(n, world, batch):
    loaders = [DeepSpeedDataLoader(Numbers(n), batch, num_replicas=world, rank=r) for r in range(world)]
    seen = [_epoch(loader) for loader in loaders]
    per_rank = -(-n // world)
    assert all(len(s) == per_rank for s in seen)  # equal shares keep the ranks' collectives matched
    everything = [x for s in seen for x in s]
    assert set(everything) == set(range(n))
    assert len(everything) - n == per_rank * world - n  # only the padding repeats samples
    assert len(loaders[0]) == -(-per_rank // batch)


@pytest.mark.parametrize("n, world, batch", [(20, 2, 4), (23, 2, 4), (23, 3, 5)])
def test_drop_last_disjoint_full_batches(n, world, batch):
    loaders = [DeepSpeedDataLoader(Numbers(n), batch, num_replicas=world, rank=r, drop_last=True)
               for r in range(world)]
    seen = [_epoch(loader) for loader in loaders]
    per_rank = n // world
    for s in seen:
        assert len(s) == per_rank // batch * batch
    flat = [x for s in seen for x in s]
    assert len(flat) == len(set(flat))  # disjoint
    assert all(len(b) == batch for b in loaders[0])


def test_batches_are_micro_batches_and_collate_fn_is_used():
    calls = []

    def collate(items):
        calls.append(len(items))
        return {"x": torch.stack(items)}

    loader = DeepSpeedDataLoader(Numbers(10), 3, collate_fn=collate)
    batches = list(loader)
    assert [len(b["x"]) for b in batches] == [3, 3, 3, 1] and calls == [3, 3, 3, 1]


def test_epochs_reshuffle_and_the_order_is_deterministic():
    a = DeepSpeedDataLoader(Numbers(64), 8, num_replicas=2, rank=0, seed=3)
    b = DeepSpeedDataLoader(Numbers(64), 8, num_replicas=2, rank=0, seed=3)
    first, second = _epoch(a), _epoch(a)
    assert a.epoch == 2
    assert first != second and len(first) == len(second) == 32  # set_epoch happened between the passes
    assert _epoch(b) == first and _epoch(b) == second  # same seed, same orders
    c = DeepSpeedDataLoader(Numbers(64), 8, num_replicas=2, rank=0, seed=4)
    assert _epoch(c) != first
    d = DeepSpeedDataLoader(Numbers(64), 8, shuffle=False)
    assert _epoch(d) == list(range(64))


def test_resume_mid_epoch_continues_the_same_batches():
    reference = DeepSpeedDataLoader(Numbers(50), 4, num_replicas=2, rank=1, seed=1)
    expected = [b.tolist() for b in reference] + [b.tolist() for b in reference]  # two epochs

    run = DeepSpeedDataLoader(Numbers(50), 4, num_replicas=2, rank=1, seed=1)
    got = []
    for i, b in enumerate(run):
        got.append(b.tolist())
        if i == 3:
            break
    state = run.state_dict()
    assert state == {"epoch": 0, "batch": 4}

    resumed = DeepSpeedDataLoader(Numbers(50), 4, num_replicas=2, rank=1, seed=1)
    resumed.load_state_dict(state)
    got += [b.tolist() for b in resumed] + [b.tolist() for b in resumed]
    assert got == expected

    # a new iter() after a break continues too (it does not restart the epoch)
    again = [b.tolist() for b in run]
    assert again == expected[4:len(reference)]


def test_state_saved_at_the_end_of_an_epoch_starts_the_next():
    loader = DeepSpeedDataLoader(Numbers(8), 2, seed=0)
    it = iter(loader)
    for _ in range(len(loader)):
        next(it)
    state = loader.state_dict()  # the generator has not noticed the end yet
    fresh = DeepSpeedDataLoader(Numbers(8), 2, seed=0)
    fresh.load_state_dict(state)
    expected = DeepSpeedDataLoader(Numbers(8), 2, seed=0)
    expected.set_epoch(1)
    assert _epoch(fresh) == _epoch(expected)


def test_bad_state_and_arguments_are_named():
    loader = DeepSpeedDataLoader(Numbers(8), 2)
    with pytest.raises(ValueError, match="out of range"):
        loader.load_state_dict({"epoch": 0, "batch": 99})
    with pytest.raises(ValueError, match="needs int 'epoch' and 'batch'"):
        loader.load_state_dict({"position": 3})
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu"):
        DeepSpeedDataLoader(Numbers(8), 0)
    with pytest.raises(TypeError, match="map-style dataset"):
        DeepSpeedDataLoader(iter(range(3)), 2)


def test_repeating_loader_crosses_epochs():
    loader = DeepSpeedDataLoader(Numbers(6), 4, seed=0)
    it = RepeatingLoader(loader)
    sizes = [len(next(it)) for _ in range(5)]
    assert sizes == [4, 2, 4, 2, 4] and loader.epoch == 2
