"""Resuming the main job with other settings: the checkpoint gives the state, the command line the settings.

- ``--steps`` and the lr: the schedule is rebuilt for this run's settings at the checkpoint's step, and a line
  names every difference (the schedule is closed-form in the step, so the resumed run's final lr equals an
  uninterrupted run's with the same settings, exactly);
- another number of ranks: the data position is counted in samples, so no sample of the epoch is skipped or
  repeated (checked exactly on the loader here, without processes), and a line states the new global batch.
"""

from __future__ import annotations

import json
import sys

import pytest

pytest.importorskip("ds_train", reason="the main job needs ds-train (and ds-zero)")
pytest.importorskip("ds_launch", reason="the fault tests run the main job under ds-launch")

from faults.common import ROOT, TRAIN_GPT, launch  # noqa: E402

sys.path.insert(0, str(ROOT / "examples"))
import train_gpt  # noqa: E402


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("resume")


def _config(tmp, lr):
    cfg = json.loads((ROOT / "examples" / "ds_config_zero2.json").read_text())
    cfg["optimizer"]["params"]["lr"] = lr
    path = tmp / f"config-lr{lr}.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def _schedule_lr(tmp, lr, steps):
    import torch
    from ds_train.schedulers import build_lr_scheduler

    cfg = train_gpt.build_config(train_gpt.parse_args(["--config", _config(tmp, lr), "--steps", str(steps)]))
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg["optimizer"]["params"]["lr"])
    sched = build_lr_scheduler(cfg["scheduler"]["type"], cfg["scheduler"]["params"], opt)
    for _ in range(steps):
        opt.step()
        sched.step()
    return opt.param_groups[0]["lr"]


@pytest.fixture(scope="module")
def resumed(tmp):
    """8 steps on 2 ranks (checkpoints at 4 and 8), then resumed on 3 ranks with --steps 12 and lr 0.001."""
    save_dir = tmp / "resume"
    first = launch(tmp, "first", steps=8, save_dir=save_dir)
    assert first.returncode == 0, first
    second = launch(tmp, "second", nproc=3, steps=12, save_dir=save_dir, args=["--config", _config(tmp, 0.001)])
    assert second.returncode == 0, second
    return first, second


@pytest.mark.timeout(300)
def test_more_steps_and_a_new_lr_rebuild_the_schedule_at_the_checkpoints_step(tmp, resumed):
    first, second = resumed
    assert second.metrics["resumed_from"] == 8 and second.metrics["steps"] == 12
    line = next(l for l in second.stdout.splitlines() if "with settings that differ from the checkpoint's" in l)
    assert "scheduler total_num_steps 8 -> 12 (--steps)" in line, line
    assert "scheduler peak_lrs 0.002 -> 0.001 (the config's optimizer lr)" in line, line
    assert "lr at step 8 " in line
    # the final lr is the 12-step schedule's (with lr 0.001) at step 12, not the old schedule's floor: the same
    # closed-form schedule, built here from the same config and stepped 12 times, gives it bit for bit
    assert second.metrics["lr"] == _schedule_lr(tmp, 0.001, steps=12) != first.metrics["lr"]
    # the first 8 losses are the first run's (from the checkpoint), and training went on after them
    assert second.metrics["losses"][:8] == first.metrics["losses"] and len(second.metrics["losses"]) == 12


@pytest.mark.timeout(300)
def test_another_world_size_resumes_the_data_position_and_says_what_changed(resumed):
    _, second = resumed
    assert second.metrics["world_size"] == 3
    assert ("the checkpoint was written by 2 rank(s) with micro-batch 8 x 1 accumulation (global batch 16); this run "
            "has 3 rank(s) with 8 x 1 (global batch 24). The data position is kept in samples: epoch 0, 128 of "
            ) in second.stdout, second


class _Windows:
    """A map-style dataset whose items are their own indices."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return i


def _positions(loader_factory, world):
    return [train_gpt.DataPosition(loader_factory(world, r), world, r) for r in range(world)]


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("first,second", [((2, 8, 5), (3, 8)), ((2, 8, 4), (4, 4)), ((3, 5, 7), (2, 6)),
                                          ((2, 8, 4), (2, 8))])
def test_data_position_in_samples_loses_and_repeats_nothing(first, second, drop_last):
    """Epoch 1 consumed by ``first`` = (world, micro, steps) ranks, resumed by ``second`` = (world, micro): the
    samples seen in the epoch are every sample once (plus, without drop_last, the few the loader repeats to even
    out the last batch), and the next epoch is the loader's own (reshuffled) order."""
    import torch
    from ds_train import DeepSpeedDataLoader

    n = 203
    ds = _Windows(n)

    def factory(micro):
        return lambda world, rank: DeepSpeedDataLoader(ds, micro, num_replicas=world, rank=rank, drop_last=drop_last,
                                                       collate_fn=lambda b: torch.tensor(b))

    (w1, m1, steps), (w2, m2) = first, second
    positions = _positions(factory(m1), w1)
    seen = []
    gens = [p.batches() for p in positions]
    for _ in range(steps):
        for g in gens:
            seen += next(g).tolist()
    state = positions[0].state()
    assert state == {"epoch": 0, "samples": w1 * m1 * steps, "world_size": w1, "micro_batch": m1, "dataset_len": n}
    assert all(p.state() == state for p in positions)
    resumed = _positions(factory(m2), w2)
    for p in resumed:
        p.resume(state["epoch"], state["samples"])
    gens = [p.batches() for p in resumed]
    while resumed[0].state()["epoch"] == 0:
        for g in gens:
            seen += next(g).tolist()
    distinct = set(seen)
    if drop_last:
        assert len(seen) == len(distinct), "a sample was repeated within the epoch"
        assert n - len(distinct) < w2 * m2 + w1 * m1  # only the ragged tail is left out
    else:
        assert distinct == set(range(n)), "a sample of the epoch was skipped"
        assert len(seen) - n < w2 * m2  # the repeats that even out the last micro-batch
    # the next epoch comes from the loader itself, reshuffled, every rank in step
    nxt = [next(g).tolist() for g in gens]
    assert all(p.state()["epoch"] == 1 for p in resumed)
    assert len({x for b in nxt for x in b}) == sum(len(b) for b in nxt)
    # a layout that divides the position evenly goes through the loader's own (exact, bit-identical) path
    same = train_gpt.DataPosition(factory(m1)(w1, 0), w1, 0)
    same.resume(0, w1 * m1 * steps)
    assert same.skip == 0 and same.loader.batch == steps


def test_the_main_job_has_no_os_exit():
    """The examples end normally (the cause of the old exit-time abort is gone: the thread check in
    tests/faults/worker.py runs after every clean run of the fault tests)."""
    for name in ("train_gpt.py", "comm_demo.py", "ddp_swap_optimizer.py"):
        assert "os._exit" not in (ROOT / "examples" / name).read_text(), name
    assert "torch.distributed.nn.functional" in open(TRAIN_GPT).read()
