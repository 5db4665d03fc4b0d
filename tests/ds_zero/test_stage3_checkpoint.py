"""Stage-3 checkpoints: bit-identical resume on the same world size; resume on another world size and across
stages (stage 3 <-> stages 1/2) continuing the reference's curve; consolidation; a model that does not fit
the checkpoint refused by name with nothing applied."""

import contextlib
import os
import re

import pytest
import torch
import torch.distributed as dist
from harness import run_distributed
from zero_cases import base_config, compare, full_state, make_model, micro_batch, param_groups, reference

import ds_zero
from ds_zero import CheckpointError

Z3 = {"param_persistence_threshold": 30, "shard_units": ["Linear"]}  # biases persistent, weights sharded


def _engine(stage, mb, ga, extra=None, seed=0, sched=True, model=None):
    model = model if model is not None else make_model(seed=seed)
    opt = torch.optim.AdamW(param_groups(model), lr=1e-2)
    scheduler = (lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5)) if sched else None
    extra = dict(extra or {})
    if stage == 3:
        extra["zero"] = {**Z3, **extra.get("zero", {})}
    return ds_zero.ZeroEngine(model, opt, base_config(stage, mb, ga, **extra), lr_scheduler=scheduler)


def _train(engine, steps, start=0):
    rank, world = dist.get_rank(), dist.get_world_size()
    mb, ga = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()
    out = []
    for step in range(start, start + steps):
        losses = []
        for micro in range(ga):
            x, y = micro_batch(step, micro, rank, world, mb, ga)
            loss = engine(x, y)
            engine.backward(loss)
            engine.step()
            losses.append(loss.detach().clone())
        out.append({"loss": sum(float(v) for v in losses) / ga, "losses": losses,
                    "params": full_state(engine.module)})
    return out


@contextlib.contextmanager
def _files_read():
    """The checkpoint file names the loaders open inside the block."""
    from ds_zero.checkpoint import load as load_module, stage3 as stage3_module

    read, originals = [], (load_module.safe_load, stage3_module.safe_load)

    def tracking(ckpt_dir, name, marker):
        read.append(name)
        return originals[0](ckpt_dir, name, marker)

    load_module.safe_load = stage3_module.safe_load = tracking
    try:
        yield read
    finally:
        load_module.safe_load, stage3_module.safe_load = originals


def _resume_same_world(ckpt, extra):
    straight = _train(_engine(3, 2, 2, extra), 6)
    first = _engine(3, 2, 2, extra)
    part1 = _train(first, 3)
    first.save_checkpoint(ckpt, client_state={"epoch": 7})
    fresh = _engine(3, 2, 2, extra, seed=123)  # different init: everything must come from the checkpoint
    with _files_read() as read:
        _, client = fresh.load_checkpoint(ckpt)
    assert client == {"epoch": 7}
    # same world size and sharding: a rank reads its own shard file (and rank 0's, which holds the persistent
    # params' masters), never the whole model
    rank = dist.get_rank()
    assert {n for n in read if "optim_states" in n} <= {optim_file_name(rank), optim_file_name(0)}, read
    assert fresh.global_steps == 3 and fresh.get_lr() == first.get_lr()
    part2 = _train(fresh, 3, start=3)
    for a, b in zip(straight, part1 + part2):
        for la, lb in zip(a["losses"], b["losses"]):
            assert torch.equal(la, lb), (la, lb)
        for name in a["params"]:
            assert torch.equal(a["params"][name], b["params"][name]), name
    return True


SAME_WORLD = {
    "fp32": {},
    "bf16-clip": {"bf16": {"enabled": True, "auto_cast": True}, "gradient_clipping": 0.5},
    "fp16": {"fp16": {"enabled": True, "auto_cast": True, "initial_scale_power": 8}},
    # qgZ: bit-identical only if the error-feedback residuals are saved and restored
    "qgz": {"zero": {"zero_quantized_gradients": True}},
}


def _same_world_cases(root):
    out = {}
    for name, extra in SAME_WORLD.items():
        try:
            out[name] = _resume_same_world(os.path.join(root, name), extra)
        except AssertionError as exc:
            out[name] = f"AssertionError: {exc}"
    return out


_cache = {}


@pytest.mark.parametrize("name", list(SAME_WORLD))
def test_bit_identical_resume_same_world(tmp_path_factory, name):
    if "same" not in _cache:
        _cache["same"] = run_distributed(_same_world_cases, 2, str(tmp_path_factory.mktemp("s3")), timeout=240)
    for rank, res in enumerate(_cache["same"]):
        assert res[name] is True, f"rank {rank}: {res[name]}"


# saved stage on 4 ranks -> loaded stage on 2 ranks (global batch 8 both times)
OTHER = {"stage3-to-3": (3, 3), "stage2-to-3": (2, 3), "stage3-to-1": (3, 1), "stage3-to-0": (3, 0)}


def _save_all(root):
    for name, (saved, _) in OTHER.items():
        engine = _engine(saved, 2, 1, sched=False)
        _train(engine, 3)
        engine.save_checkpoint(os.path.join(root, name))
    return True


def _resume_all(root):
    out = {}
    for name, (_, loaded) in OTHER.items():
        engine = _engine(loaded, 4, 1, sched=False, seed=99)
        engine.load_checkpoint(os.path.join(root, name))
        assert engine.global_steps == 3
        out[name] = _train(engine, 3, start=3)
    return out


@pytest.mark.parametrize("name", list(OTHER))
def test_resume_4_to_2_ranks_across_stages(tmp_path_factory, name):
    if "other" not in _cache:
        root = str(tmp_path_factory.mktemp("s3other"))
        run_distributed(_save_all, 4, root, timeout=240)
        _cache["other"] = (root, run_distributed(_resume_all, 2, root, timeout=240))
    root, got = _cache["other"]
    compare([g[name] for g in got], reference(6, batch=8)[3:])
    state = ds_zero.consolidate_checkpoint(os.path.join(root, name))
    for key, value in reference(3, batch=8)[-1]["params"].items():
        torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-6)


def _mismatch(root):
    engine = _engine(3, 2, 1, sched=False)
    _train(engine, 1)
    engine.save_checkpoint(root)

    class Wider(torch.nn.Module):  # fc2 one row wider: the checkpoint cannot fit
        def __init__(self):
            super().__init__()
            base = make_model(seed=5)
            self.fc1, self.fc3 = base.fc1, base.fc3
            self.fc2 = torch.nn.Linear(base.fc2.in_features, base.fc2.out_features + 1)
            self.fc3 = torch.nn.Linear(base.fc2.out_features + 1, base.fc3.out_features)
            self.frozen = None
            self.fc2b = None

    other = _engine(3, 2, 1, sched=False, model=Wider())
    before = full_state(other.module)
    try:
        other.load_checkpoint(root)
    except CheckpointError as exc:
        after = full_state(other.module)
        unchanged = all(torch.equal(before[k], after[k]) for k in before)
        return str(exc), unchanged, other.global_steps
    return None, None, None


def test_shape_mismatch_is_refused_by_name_and_nothing_applied(tmp_path):
    for message, unchanged, steps in run_distributed(_mismatch, 2, str(tmp_path / "ck"), timeout=120):
        assert message is not None and re.search(r"'fc[23]\.weight' has shape", message), message
        assert unchanged and steps == 0


# -- a failure on one rank is named on every rank, promptly --------------------------------------------------------
def _one_rank_fails(root, stage):
    import errno

    import ds_zero.checkpoint.save as save_mod
    from ds_zero.checkpoint._io import MARKER, optim_file

    rank = dist.get_rank()
    engine = _engine(stage, 2, 1, sched=False)
    _train(engine, 1)
    # a temporary left by an earlier save of this tag that was killed mid-write
    os.makedirs(os.path.join(root, "global_step1"), exist_ok=True)
    open(os.path.join(root, "global_step1", optim_file(rank) + ".tmp-424242"), "wb").write(b"partial")
    engine.save_checkpoint(root)  # global_step1, committed
    dist.barrier()
    out = {"stale_left": sorted(n for n in os.listdir(os.path.join(root, "global_step1")) if ".tmp-" in n)}
    _train(engine, 1, start=1)
    real = save_mod.atomic_torch_save

    def disk_full(obj, path):
        raise OSError(errno.ENOSPC, "No space left on device", path)

    if rank == 1:
        save_mod.atomic_torch_save = disk_full
    try:
        engine.save_checkpoint(root)
    except Exception as exc:  # noqa: BLE001
        out["save"] = f"{type(exc).__name__}: {exc}"
    finally:
        save_mod.atomic_torch_save = real
    out["latest"] = open(os.path.join(root, "latest")).read().strip()
    out["marker2"] = os.path.exists(os.path.join(root, "global_step2", MARKER))
    dist.barrier()
    out["step2_dir"] = os.path.exists(os.path.join(root, "global_step2"))  # the failed save's files are freed
    if rank == 1:  # corrupt this rank's shard of the committed checkpoint
        path = os.path.join(root, "global_step1", optim_file(1))
        data = bytearray(open(path, "rb").read())
        data[len(data) // 2] ^= 0x01
        open(path, "wb").write(bytes(data))
    dist.barrier()
    try:
        _engine(stage, 2, 1, sched=False).load_checkpoint(root)
    except Exception as exc:  # noqa: BLE001
        out["load"] = f"{type(exc).__name__}: {exc}"
    bad = root + "-bad-latest"
    if rank == 0:
        os.makedirs(bad)
        open(os.path.join(bad, "latest"), "wb").write(b"global_step\xff\xfe\n")
    dist.barrier()
    try:
        engine.load_checkpoint(bad)
    except Exception as exc:  # noqa: BLE001
        out["bad_latest"] = f"{type(exc).__name__}: {exc}"
    return out


@pytest.mark.parametrize("stage", [2, 3])
def test_a_checkpoint_error_on_one_rank_is_raised_on_every_rank(tmp_path, stage):
    results = run_distributed(_one_rank_fails, 2, str(tmp_path / f"ck{stage}"), stage, timeout=60)
    r0, r1 = results
    assert r1["save"].startswith("OSError") and "No space left" in r1["save"]
    assert r0["save"].startswith("CheckpointError") and "failed on rank 1" in r0["save"]
    assert "No space left" in r0["save"]
    for r in results:
        assert r["latest"] == "global_step1" and not r["marker2"]  # nothing committed
        assert not r["step2_dir"]  # and nothing of it left on the disk
        assert r["stale_left"] == []  # a killed save's temporaries are removed by the next save of the tag
        assert r["bad_latest"].startswith("CheckpointError") and "not a UTF-8" in r["bad_latest"]
    assert r1["load"].startswith("CheckpointError") and "corrupted" in r1["load"]
    # rank 0 names rank 1's file, from rank 1: at the same world size each rank reads only its own file (and
    # rank 0's), at stage 3 too
    assert r0["load"].startswith("CheckpointError") and optim_file_name(1) in r0["load"]
    assert "failed on rank 1" in r0["load"]


def optim_file_name(rank):
    from ds_zero.checkpoint._io import optim_file

    return optim_file(rank)


class Sometimes(torch.nn.Module):
    """A layer used on some steps only (as an MoE expert or a task head): its Adam step count falls behind."""

    def __init__(self):
        super().__init__()
        self.body = make_model()
        self.extra = torch.nn.Linear(4, 4)

    def forward(self, x, y, use_extra: bool):
        out = self.body(x)
        if use_extra:
            out = self.extra(out)
        return (out - y).square().mean()


USES = [True, False, False, True, True, False]


def _sometimes_run(root, resume_at=None):
    rank, world = dist.get_rank(), dist.get_world_size()

    def build():
        torch.manual_seed(0)
        return ds_zero.ZeroEngine(Sometimes(), lambda ps: torch.optim.AdamW(ps, lr=1e-2), {
            # every param sharded (a persistent one shares its group's fp32 master, and so its step count)
            "train_micro_batch_size_per_gpu": 2,
            "zero_optimization": {"stage": 3, "param_persistence_threshold": 0, "shard_units": ["Linear"]}})

    engine = build()
    losses = []
    for step, use in enumerate(USES):
        if step == resume_at:
            engine.save_checkpoint(root)
            engine = build()
            engine.load_checkpoint(root)
        x, y = micro_batch(step, 0, rank, world, 2, 1)
        loss = engine(x, y, use)
        engine.backward(loss)
        engine.step()
        losses.append(loss.detach().clone())
    return losses, full_state(engine.module)


def _sometimes(root):
    straight = _sometimes_run(root)
    resumed = _sometimes_run(root, resume_at=3)
    return all(torch.equal(a, b) for a, b in zip(straight[0], resumed[0])) and all(
        torch.equal(straight[1][k], resumed[1][k]) for k in straight[1])


def test_resume_keeps_each_params_own_step_count(tmp_path):
    assert run_distributed(_sometimes, 2, str(tmp_path / "ck"), timeout=120) == [True, True]
