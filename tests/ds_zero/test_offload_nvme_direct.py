"""``O_DIRECT`` for the NVMe optimizer swap (``offload_optimizer.direct_io``, ``ds_zero._swap``).

Direct I/O changes how the bytes move, never which: a run with ``direct_io: true`` equals a buffered run bit for
bit (masters, Adam's states, the 16-bit params) on a model whose groups are not multiples of 1024 elements, so
the last sub-group of each is partial and moves a length rounded up into the file's padding; its sub-groups are
rounded up to 1024 elements (the buffered run keeps ``sub_group_size``). The file mappings (checkpoints,
``state_dict``) and the direct descriptors see the same bytes both ways. A file system that refuses
``O_DIRECT`` (injected: ``EINVAL`` at the open, as tmpfs before Linux 6.6 answers; and /dev/shm itself where
the kernel refuses) falls back to buffered I/O under ``"auto"`` with one warning, and is a named error under
``true``. Config values other than true, false and "auto" are refused.

Needs a directory that accepts ``O_DIRECT`` (pytest's tmp_path: ext4 or xfs on most hosts); skipped, saying so,
where it does not."""

from __future__ import annotations

import errno
import fcntl
import gc
import logging
import mmap
import os
import re

import pytest
import torch
import torch.nn as nn
from pydantic import ValidationError
from zero_cases import IN, OUT, base_config, micro_batch, param_groups

import ds_zero
from ds_zero import EngineConfig
from ds_zero import _swap

STEPS, SUB = 3, 1000  # SUB: not a multiple of 1024, rounded up to it under O_DIRECT


class Wide(nn.Module):
    """2,604 params: a weight group of 2,400 elements (three 1,024-element sub-groups, the last one partial) and a
    bias group of 204 (one partial sub-group; its master is padded to 224 by the bucket layout)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(IN, 200)
        self.fc2 = nn.Linear(200, OUT)

    def forward(self, x, y):
        return ((self.fc2(torch.tanh(self.fc1(x))).float() - y.float()) ** 2).mean()


def _accepts_o_direct(path) -> str | None:
    """None where a file under ``path`` takes an aligned O_DIRECT write, else why not."""
    name = os.path.join(path, "probe")
    try:
        fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
    except (OSError, AttributeError) as exc:
        return f"{path} refuses O_DIRECT: {exc}"
    try:
        buf = mmap.mmap(-1, 4096)
        os.pwritev(fd, [buf], 0)
    except OSError as exc:
        return f"{path} refuses O_DIRECT I/O: {exc}"
    finally:
        os.close(fd)
        os.remove(name)
    return None


@pytest.fixture
def direct_dir(tmp_path):
    why = _accepts_o_direct(tmp_path)
    if why:
        pytest.skip(f"needs a file system that accepts O_DIRECT: {why}")
    return tmp_path


@pytest.fixture
def refusing(monkeypatch):
    """Every O_DIRECT open fails with EINVAL (a file system without direct I/O), other opens go through; the
    'logged once' memory starts empty."""
    real = os.open

    def open_(path, flags, *args, **kwargs):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument", path)
        return real(path, flags, *args, **kwargs)

    monkeypatch.setattr(_swap.os, "open", open_)
    monkeypatch.setattr(_swap, "_AUTO_LOGGED", set())


def _nvme(path, direct_io):
    return {"offload_optimizer": {"device": "nvme", "nvme_path": str(path), "direct_io": direct_io},
            "sub_group_size": SUB}


def _engine(path, direct_io, model=None):
    model = model or Wide()
    cfg = base_config(1, 2, 1, bf16={"enabled": True, "auto_cast": True}, zero=_nvme(path, direct_io))
    return ds_zero.ZeroEngine(model, torch.optim.AdamW(param_groups(model), lr=1e-2), cfg)


def _train(engine, steps):
    out = []
    for step in range(steps):
        x, y = micro_batch(step, 0, 0, 1, 2, 1)
        engine.backward(engine(x, y))
        engine.step()
        state = engine.optimizer.state_dict()["state"]
        out.append({"masters": [p.detach().clone() for p in engine.masters.params if p is not None],
                    "states": [state[i][k].clone() for i in sorted(state) for k in ("exp_avg", "exp_avg_sq")],
                    "params": [p.detach().float().clone() for p in engine.module.parameters()]})
    return out


# -- direct equals buffered ------------------------------------------------------------------------------------
def test_direct_equals_buffered_bit_for_bit(direct_dir, monkeypatch):
    used: set[int] = set()  # the descriptors the steps read and write through
    for name in ("preadv", "pwritev"):
        real = getattr(os, name)
        monkeypatch.setattr(_swap.os, name, lambda fd, bufs, offset, real=real: used.add(fd) or real(fd, bufs, offset))
    runs, seen = {}, {}
    for direct in (True, False):
        engine = _engine(direct_dir, direct)
        opt = engine.optimizer
        sizes = [p.numel() for p in engine.masters.params if p is not None]
        used.clear()
        runs[direct] = _train(engine, STEPS)
        flags = [fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT for fd in used]
        seen[direct] = {"direct": opt.files.direct, "sub": opt.sub_group_size, "sizes": sizes,
                        "file_bytes": sorted({os.path.getsize(n) for n in opt.files.names.values()}),
                        "aligned": all(b.data_ptr() % _swap.ALIGN == 0 for s in opt.buffers for b in s),
                        "as_configured": len(used) == 6 and all(flags) if direct else not any(flags)}
        del engine, opt
        gc.collect()
    assert seen[True]["as_configured"] and seen[False]["as_configured"]  # the steps moved the bytes as configured
    sizes = seen[True]["sizes"]  # the bias group's master is padded by the bucket layout: 224
    assert sizes[0] == 2400 and sizes[1] < 1024 and all(n % 1024 for n in sizes)  # partial last sub-groups
    assert seen[True]["direct"] is True and seen[True]["sub"] == 1024 and seen[True]["aligned"]
    assert seen[True]["file_bytes"] == [4096, 12288]  # padded to whole blocks
    assert seen[False]["direct"] is False and seen[False]["sub"] == SUB
    assert seen[False]["file_bytes"] == [4 * sizes[1], 4 * 2400]
    for a, b in zip(runs[True], runs[False]):
        for key in ("masters", "states", "params"):
            assert all(torch.equal(x, y) for x, y in zip(a[key], b[key])), key
    assert not torch.equal(runs[True][-1]["masters"][0], runs[True][0]["masters"][0])  # it trained


# -- the mapping and the direct descriptor see the same bytes ------------------------------------------------------
def _direct_files(path, n):
    files = _swap.SwapFiles(_swap.SwapDir(str(path), 0, 1 << 20), [n], direct=True)
    assert files.direct
    return files


def test_direct_writes_are_seen_through_the_mapping(direct_dir):
    n = 2000  # two blocks and a partial third
    files = _direct_files(direct_dir, n)
    mapped = files.mapped(0, "exp_avg", n)
    assert mapped.abs().sum() == 0  # the zeros are now cached pages of the mapping: a stale copy to invalidate
    new = _swap.aligned_empty(2048, pin=False)
    new.copy_(torch.arange(2048, dtype=torch.float32) + 0.5)
    files.write(0, "exp_avg", new, 0)
    assert torch.equal(mapped, new[:n])  # a checkpoint reads the mapping: the direct write's bytes
    assert torch.equal(mapped.clone(), new[:n])
    files.close()


def test_writes_through_the_mapping_are_seen_by_a_direct_read(direct_dir):
    n = 2000
    files = _direct_files(direct_dir, n)
    mapped = files.mapped(0, "param", n)
    mapped.copy_(torch.linspace(-1, 1, n))  # dirty pages of the mapping, not written back yet
    out = _swap.aligned_empty(2048, pin=False)
    out.fill_(7.0)
    files.read(0, "param", out, 0)
    assert torch.equal(out[:n], mapped) and out[:n].ne(0).any()
    assert out[n:].abs().sum() == 0  # the file's padding, which no tensor maps
    with pytest.raises(_swap.NVMeSwapError, match="needs 4096-byte alignment: .* length 8000 bytes"):
        files.read(0, "param", out[:n], 0)  # unrounded length: named, not the kernel's bare EINVAL
    files.close()


# -- a file system that refuses O_DIRECT ---------------------------------------------------------------------------
def test_auto_falls_back_to_buffered_with_one_warning(tmp_path, refusing, caplog):
    with caplog.at_level(logging.WARNING, logger="ds_zero"):
        engines = [_engine(tmp_path, "auto") for _ in range(2)]  # the second: already said
    files = engines[0].optimizer.files
    assert files.direct is False and not files.direct_fds
    assert engines[0].optimizer.sub_group_size == SUB  # buffered: not rounded
    said = [r.getMessage() for r in caplog.records if "O_DIRECT" in r.getMessage()]
    assert len(said) == 1 and "buffered I/O" in said[0] and str(tmp_path) in said[0] and "Invalid argument" in said[0]
    _train(engines[0], 1)


def test_required_direct_io_on_a_refusing_file_system_is_named(tmp_path, refusing):
    path = re.escape(str(tmp_path))
    with pytest.raises(_swap.NVMeSwapError, match=r"offload_optimizer.direct_io is true but the file system of "
                                                  rf"nvme_path '{path}' refuses O_DIRECT: .*Invalid argument"):
        _engine(tmp_path, True)


def test_dev_shm_where_the_kernel_refuses_o_direct(caplog, monkeypatch):
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    if _accepts_o_direct("/dev/shm") is None:
        pytest.skip("this kernel's tmpfs accepts O_DIRECT (Linux 6.6 and later); the refusal is injected above")
    monkeypatch.setattr(_swap, "_AUTO_LOGGED", set())
    with caplog.at_level(logging.WARNING, logger="ds_zero"):
        engine = _engine("/dev/shm", "auto")
    assert engine.optimizer.files.direct is False and "refuses O_DIRECT" in caplog.text
    del engine
    gc.collect()
    with pytest.raises(_swap.NVMeSwapError, match="nvme_path '/dev/shm' refuses O_DIRECT"):
        _engine("/dev/shm", True)


# -- config --------------------------------------------------------------------------------------------------------
def test_direct_io_config():
    def off(**kw):
        zero = {"stage": 2, "offload_optimizer": {"device": "nvme", "nvme_path": "/tmp", **kw}}
        return EngineConfig.model_validate({"zero_optimization": zero}).zero_optimization.offload_optimizer

    assert off().direct_io == "auto"
    assert off(direct_io=True).direct_io is True and off(direct_io=False).direct_io is False
    for bad in ("true", 1, "yes", None, "Auto"):
        with pytest.raises(ValidationError, match="direct_io must be true, false or \"auto\""):
            off(direct_io=bad)
    with pytest.raises(ValidationError, match="direct_io true is for device \"nvme\""):
        EngineConfig.model_validate({"zero_optimization": {"stage": 2, "offload_optimizer": {
            "device": "cpu", "direct_io": True}}})


@pytest.mark.parametrize("aligned", [True, False])
def test_pinned_aligned_empty_asks_for_the_exact_size_first(aligned, monkeypatch):
    """Pinned buffers: torch's caching host allocator rounds a block up to a power of two, so the unpinned path's
    ALIGN extra bytes would double a power-of-two buffer. The pinned path asks for exactly 4 n bytes and keeps
    them when they come page-aligned (cudaHostAlloc's blocks do), and only else over-allocates. Stands in for the
    pinned allocator (CI has no CUDA) with one that returns aligned or misaligned blocks."""
    real_empty = torch.empty
    asked = []

    def fake_empty(size, dtype=None, pin_memory=False):
        asked.append((size, pin_memory))
        block = real_empty(size + 2 * _swap.ALIGN, dtype=dtype)
        skip = -block.data_ptr() % _swap.ALIGN + (0 if aligned else 64)
        return block[skip:skip + size]

    monkeypatch.setattr(_swap.torch, "empty", fake_empty)
    n = 1 << 20  # 4 MiB: a power of two
    out = _swap.aligned_empty(n, pin=True)
    assert out.numel() == n and out.dtype == torch.float32 and out.data_ptr() % _swap.ALIGN == 0
    assert asked[0] == (4 * n, True)
    assert asked == [(4 * n, True)] if aligned else asked == [(4 * n, True), (4 * n + _swap.ALIGN, True)]
