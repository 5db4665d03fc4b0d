"""Checkpoints: bit-identical resume, resume on another world size, consolidation, and refusal of missing,
truncated, corrupted, half-written and malicious checkpoints (the file at fault named every time)."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from harness import run_distributed
from zero_cases import base_config, compare, full_state, make_model, micro_batch, param_groups, reference

import ds_optim
import ds_zero
from ds_zero import CheckpointError
from ds_zero.checkpoint._io import MARKER, model_file, optim_file


def _engine(stage, mb, ga, extra=None, seed=0, sched=True):
    model = make_model(seed=seed)
    opt = torch.optim.AdamW(param_groups(model), lr=1e-2)
    scheduler = (lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5)) if sched else None
    return ds_zero.ZeroEngine(model, opt, base_config(stage, mb, ga, **(extra or {})), lr_scheduler=scheduler)


def _train(engine, steps, start=0):
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
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


def _resume_same_world(ckpt, stage, extra):
    straight = _train(_engine(stage, 2, 2, extra), 6)
    first = _engine(stage, 2, 2, extra)
    part1 = _train(first, 3)
    first.save_checkpoint(ckpt, client_state={"epoch": 7, "note": "x"})
    fresh = _engine(stage, 2, 2, extra, seed=123)  # different init: everything must come from the checkpoint
    path, client = fresh.load_checkpoint(ckpt)
    assert client == {"epoch": 7, "note": "x"}
    assert os.path.basename(path) == "global_step3"
    assert fresh.global_steps == 3 and fresh.micro_steps == 6 and fresh.get_lr() == first.get_lr()
    part2 = _train(fresh, 3, start=3)
    for a, b in zip(straight, part1 + part2):
        for la, lb in zip(a["losses"], b["losses"]):
            assert torch.equal(la, lb), (la, lb)
        for name in a["params"]:
            assert torch.equal(a["params"][name], b["params"][name]), name
    return True


RESUME_CASES = {
    "stage1-fp32": (1, {}),
    "stage2-bf16-clip": (2, {"bf16": {"enabled": True, "auto_cast": True}, "gradient_clipping": 0.5}),
    "stage0-fp16": (0, {"fp16": {"enabled": True, "auto_cast": True, "initial_scale_power": 8}}),
    "stage0-onebit": (0, {"gradient_compression": {"type": "onebit", "backend": "torch"}}),
    "stage2-int8-overlap": (2, {"gradient_compression": {"type": "int8"}, "zero": {"overlap_comm": True}}),
}


def _resume_cases(root):
    out = {}
    for name, (stage, extra) in RESUME_CASES.items():
        try:
            out[name] = _resume_same_world(os.path.join(root, name), stage, extra)
        except AssertionError as exc:
            out[name] = f"{type(exc).__name__}: {exc}"
    return out


_cache = {}


def _resumed(root):
    if "same" not in _cache:  # all cases in one set of rank processes: start-up dominates on a busy machine
        _cache["same"] = run_distributed(_resume_cases, 2, root, timeout=240)
    return _cache["same"]


@pytest.mark.parametrize("name", list(RESUME_CASES))
def test_bit_identical_resume_same_world(tmp_path_factory, name):
    for rank, res in enumerate(_resumed(str(tmp_path_factory.mktemp("resume")))):
        assert res[name] is True, f"rank {rank}: {res[name]}"


OTHER_WORLD = {"stage2-to-1": (2, 1), "stage1-to-0": (1, 0)}


def _save_all(root, mb, steps):
    for name, (saved, _) in OTHER_WORLD.items():
        _save_after(os.path.join(root, name), saved, mb, steps)
    return True


def _resume_all(root, mb, steps):
    return {name: _resume_other_world(os.path.join(root, name), loaded, mb, steps)
            for name, (_, loaded) in OTHER_WORLD.items()}


def _other_world(root):
    if "other" not in _cache:
        run_distributed(_save_all, 4, root, 2, 3, timeout=240)  # global batch 4 x 2 = 8
        _cache["other"] = (root, run_distributed(_resume_all, 2, root, 4, 3, timeout=240))  # 2 x 4 = 8
    return _cache["other"]


def _save_after(ckpt, stage, mb, steps):
    engine = _engine(stage, mb, 1, sched=False)
    _train(engine, steps)
    engine.save_checkpoint(ckpt)
    return True


def _resume_other_world(ckpt, stage, mb, steps):
    engine = _engine(stage, mb, 1, sched=False, seed=99)
    engine.load_checkpoint(ckpt)
    assert engine.global_steps == 3
    return _train(engine, steps, start=3)


@pytest.mark.parametrize("name", list(OTHER_WORLD))
def test_resume_4_to_2_ranks_continues_the_curve(tmp_path_factory, name):
    root, got = _other_world(str(tmp_path_factory.mktemp("reshard")))
    ref = reference(6, batch=8)[3:]
    compare([g[name] for g in got], ref)
    # consolidation of the 4-rank checkpoint equals the reference after step 3, whatever the world size
    state = ds_zero.consolidate_checkpoint(os.path.join(root, name))
    expected = reference(3, batch=8)[-1]["params"]
    for key, value in expected.items():
        torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-6)


# -- refusals (one process, no process group) ------------------------------------------------------------
@pytest.fixture()
def saved(tmp_path):
    engine = _engine(1, 2, 1, sched=False)
    _train(engine, 2)
    engine.save_checkpoint(tmp_path / "ck")
    return tmp_path / "ck" / "global_step2"


def _load(root):
    return _engine(1, 2, 1, sched=False).load_checkpoint(root)


def test_flipped_byte_is_refused_naming_the_file(saved):
    path = saved / optim_file(0)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{optim_file(0)}.*corrupted"):
        _load(saved.parent)


def test_truncated_file_is_refused(saved):
    path = saved / model_file()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match=f"{model_file()}.*truncated"):
        _load(saved.parent)


def test_missing_file_is_refused(saved):
    (saved / optim_file(0)).unlink()
    with pytest.raises(CheckpointError, match=f"{optim_file(0)} is missing"):
        _load(saved.parent)


def test_tag_without_marker_is_refused(saved):
    (saved / MARKER).unlink()
    with pytest.raises(CheckpointError, match="no commit marker.*incomplete"):
        _load(saved.parent)


def test_crash_before_the_marker_leaves_latest_on_the_last_committed_tag(saved, monkeypatch):
    import ds_zero.checkpoint.save as save_mod

    engine = _engine(1, 2, 1, sched=False)
    engine.load_checkpoint(saved.parent)
    _train(engine, 2, start=2)

    def crash(*args, **kwargs):
        raise OSError("simulated crash after the shards were written")

    monkeypatch.setattr(save_mod, "write_marker", crash)
    with pytest.raises(OSError, match="simulated crash"):
        engine.save_checkpoint(saved.parent)
    assert (saved.parent / "global_step4" / optim_file(0)).exists()  # the shards are there, the marker not
    assert (saved.parent / "latest").read_text().strip() == "global_step2"
    resumed = _engine(1, 2, 1, sched=False)
    path, _ = resumed.load_checkpoint(saved.parent)
    assert path.endswith("global_step2") and resumed.global_steps == 2
    with pytest.raises(CheckpointError, match="global_step4 has no commit marker"):
        resumed.load_checkpoint(saved.parent, tag="global_step4")
    assert not list(saved.parent.rglob("*.tmp-*"))  # no temp files left behind


def test_missing_latest_is_an_error_not_a_fresh_start(tmp_path):
    with pytest.raises(CheckpointError, match="no 'latest' file"):
        _load(tmp_path)
    with pytest.raises(CheckpointError, match="invalid checkpoint tag"):
        _engine(1, 2, 1, sched=False).load_checkpoint(tmp_path, tag="../etc")


class _Payload:
    """What an attacker would put in a checkpoint: unpickling it creates a file."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_malicious_pickle_does_not_run(saved, tmp_path):
    pwned = tmp_path / "pwned"
    path = saved / model_file()
    torch.save({"module": _Payload(str(pwned))}, path)
    # the attacker also rewrites the marker so the checksums match
    marker = json.loads((saved / MARKER).read_text())
    marker["files"][model_file()]["size"] = path.stat().st_size
    import hashlib

    marker["files"][model_file()]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (saved / MARKER).write_text(json.dumps(marker))
    with pytest.raises(CheckpointError, match=f"{model_file()}.*weights_only=True"):
        _load(saved.parent)
    assert not pwned.exists()
    with pytest.raises(CheckpointError):
        ds_zero.consolidate_checkpoint(saved.parent)
    assert not pwned.exists()


def test_masters_from_16bit_weights_when_asked(tmp_path):
    engine = _engine(1, 2, 1, sched=False, extra={"bf16": {"enabled": True, "auto_cast": True}})
    _train(engine, 2)
    engine.save_checkpoint(tmp_path)
    exact = _engine(1, 2, 1, sched=False, extra={"bf16": {"enabled": True, "auto_cast": True}})
    exact.load_checkpoint(tmp_path)
    coarse = _engine(1, 2, 1, sched=False, extra={"bf16": {"enabled": True, "auto_cast": True},
                                                   "zero": {"load_from_fp32_weights": False}})
    coarse.load_checkpoint(tmp_path)
    for b_exact, b_coarse, b_saved in zip(exact.buckets, coarse.buckets, engine.buckets):
        assert torch.equal(exact.masters.shard(b_exact), engine.masters.shard(b_saved))
        assert torch.equal(coarse.masters.shard(b_coarse), b_saved.param_flat.float())
    assert not torch.equal(exact.masters.params[0].data, coarse.masters.params[0].data)
    assert torch.equal(exact.optimizer.state_dict()["state"][0]["exp_avg"],
                       coarse.optimizer.state_dict()["state"][0]["exp_avg"])


def test_checkpoint_of_another_optimizer_or_grouping_is_refused(tmp_path):
    model = make_model()
    lion = ds_zero.ZeroEngine(model, lambda ps: ds_optim.FusedLion(param_groups(model), lr=1e-3, backend="torch"),
                              base_config(1, 2, 1))
    _train(lion, 1)
    lion.save_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="saved by FusedLion, this run uses AdamW"):
        _engine(1, 2, 1, sched=False).load_checkpoint(tmp_path)
    _engine(1, 2, 1, sched=False).load_checkpoint(tmp_path, load_optimizer_states=False)  # weights only: fine
    one_group = make_model()
    engine = ds_zero.ZeroEngine(one_group, torch.optim.AdamW(one_group.parameters()), base_config(2, 2, 1))
    with pytest.raises(CheckpointError, match="saved with 2 optimizer param groups, this engine has 1"):
        engine.load_checkpoint(tmp_path)


def test_client_state_must_be_plain_data(tmp_path):
    engine = _engine(0, 2, 1, sched=False)
    with pytest.raises(TypeError, match="client_state must hold plain data"):
        engine.save_checkpoint(tmp_path, client_state={"obj": _Payload("x")})
    assert not (tmp_path / "latest").exists()


def test_consolidate_cli_loads_into_the_bare_model(saved, tmp_path):
    out = tmp_path / "model.pt"
    proc = subprocess.run([sys.executable, "-m", "ds_zero.consolidate", str(saved.parent), str(out), "--dtype", "fp32"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    state = torch.load(out, weights_only=True)
    model = make_model(seed=5)
    model.load_state_dict(state)
    expected = reference(2, batch=2)[-1]["params"]
    for name, value in expected.items():
        torch.testing.assert_close(state[name], value, rtol=1e-5, atol=1e-6)
    bad = subprocess.run([sys.executable, "-m", "ds_zero.consolidate", str(tmp_path / "nothing"), str(out)],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "latest" in bad.stderr
