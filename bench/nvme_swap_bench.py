"""Issue 14's NVMe number: ds-zero's optimizer swap path against the disk's own bandwidth, same directory, same bytes.

    python bench/nvme_swap_bench.py --path DIR [--gib 8] [--threads T] [--out results.json] [--smoke]

raw: one file of ``--gib`` GiB under DIR, reserved with ``posix_fallocate`` (as the swap files are), written then
read in ``--block-mib`` blocks by ``--threads`` threads (default: the engine's swap I/O threads), each block one
``os.pwritev``/``os.preadv`` of a page-aligned (mmap) buffer with ``O_DIRECT``. Where the file system refuses
``O_DIRECT`` it says so and measures buffered I/O instead: the write's time includes ``fsync``, and the page
cache is dropped (``posix_fadvise(DONTNEED)``) before the read, so the disk is what is timed.

ds-zero: the same bytes as fp32 across the kinds the engine swaps (master, exp_avg, exp_avg_sq: one param group
of ``bytes / 12`` elements), through ``_swap.SwapDir``/``SwapFiles`` and the step's own I/O pattern
(``NVMeAdam._step_group``): sub-groups of ``sub_group_elements(--sub-group)``, two swap buffer sets from
``aligned_empty`` (pinned when CUDA is available, as the engine pins), one ``SwapFiles.write``/``read`` per kind
submitted to a pool of ``--threads`` threads, a set reused only once its writes landed, the reads of sub-group
``i + 1`` issued once those of ``i`` landed. Write phase: every sub-group out; read phase: every sub-group back
(the Adam kernel, which runs between them in the step, is left out: this measures the I/O). Run with
``direct=True`` (where the file system allows) and ``direct=False``; the buffered run is reported twice: as the
step sees it (writes land in the page cache, reads are served from it) and with the disk timed (``fsync``
counted in the write, the files' cache dropped before a second read).

Every byte read is checked: the timed reads check each block's (sub-group's) stamp (its index, written into its
last bytes), and an untimed pass reads everything back once more and compares each block's CRC32 with the CRC of
what was written; a difference raises :class:`BenchError`. The files are removed on the way out, error or not.
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import inspect
import json
import mmap
import os
import shutil
import tempfile
import time
import zlib

import numpy as np
import torch

from ds_zero._swap import (ALIGN, ALIGN_ELEMENTS, KINDS, NVMeAdam, SwapDir, SwapFiles, _round_up, _wait,
                           aligned_empty, file_bytes, sub_group_elements)

GiB, MiB = 2**30, 2**20
#: the engine's swap I/O threads (NVMeAdam's pool; build_nvme_adam passes no other count)
ENGINE_THREADS = inspect.signature(NVMeAdam.__init__).parameters["io_threads"].default
#: sub-group default (elements): the engine's default is DeepSpeed's 1e9, which at 8 GiB would be one sub-group
#: (17 GiB of swap buffers) and no pipeline; 1e8 gives 8 sub-groups and 2.4 GB of buffers
SUB_GROUP = 100_000_000
_O_DIRECT = getattr(os, "O_DIRECT", 0)


class BenchError(RuntimeError):
    """The data read back is not what was written, or the benchmark cannot run where it was asked to."""


def _gbps(nbytes: int, seconds: float) -> float:
    return round(nbytes / seconds / 1e9, 2)


def _fs_of(path: str) -> str:
    """The file system type and device under ``path`` (the longest mount point of /proc/mounts above it)."""
    real, best = os.path.realpath(path), ("", "?", "?")
    try:
        with open("/proc/mounts") as f:
            for line in f:
                dev, mount, kind = line.split()[:3]
                if (real == mount or real.startswith(mount.rstrip("/") + "/")) and len(mount) > len(best[0]):
                    best = (mount, kind, dev)
    except OSError:
        pass
    return f"{best[1]} ({best[2]} on {best[0] or '?'})"


def _refuses_direct(work: str) -> str | None:
    """None where a file under ``work`` takes an ``O_DIRECT`` open and an aligned write and read, else why not
    (the same probe SwapFiles makes)."""
    name = os.path.join(work, "probe")
    try:
        if not _O_DIRECT:
            return "this platform has no O_DIRECT"
        fd = os.open(name, os.O_RDWR | os.O_CREAT | _O_DIRECT, 0o600)
        try:
            probe = mmap.mmap(-1, ALIGN)
            os.pwritev(fd, [probe], 0)
            os.preadv(fd, [probe], 0)
        finally:
            os.close(fd)
    except OSError as exc:
        return str(exc)
    finally:
        if os.path.exists(name):
            os.remove(name)
    return None


def _full(op, fd: int, view: memoryview, offset: int) -> None:
    """One positional read or write of all of ``view`` (the kernel may move less per call)."""
    done = 0
    while done < len(view):
        moved = op(fd, [view[done:]], offset + done)
        if moved <= 0:
            raise BenchError(f"{op.__name__} moved nothing at offset {offset + done} (file shorter than written?)")
        done += moved


def _stamp(i: int) -> bytes:
    return int(i).to_bytes(8, "little")


def raw(work: str, total: int, block: int, threads: int, direct: bool) -> dict:
    """The disk's bandwidth: ``threads`` threads write then read ``total`` bytes in ``block``-byte blocks (thread
    ``t`` takes blocks ``t, t + threads, ...``). Each thread's buffer holds its own random bytes; a block carries
    its index in its last 8 bytes, so every block differs and its CRC is known without hashing it again:
    ``crc32(index, crc32(body))``."""
    nblocks = total // block
    name = os.path.join(work, "raw.bin")
    fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_TRUNC | (_O_DIRECT if direct else 0), 0o600)
    try:
        os.posix_fallocate(fd, 0, total)  # as SwapFiles reserves its files: both write into reserved extents
        rng = np.random.default_rng(0)
        bufs = [mmap.mmap(-1, block) for _ in range(threads)]  # anonymous mmap: page aligned, as O_DIRECT needs
        for buf in bufs:
            buf[:block - 8] = rng.bytes(block - 8)
        views = [memoryview(buf) for buf in bufs]
        body_crc = [zlib.crc32(v[:block - 8]) for v in views]
        expected = [zlib.crc32(_stamp(i), body_crc[i % threads]) for i in range(nblocks)]

        def write(t: int) -> None:
            for i in range(t, nblocks, threads):
                views[t][block - 8:] = _stamp(i)
                _full(os.pwritev, fd, views[t], i * block)

        def read(t: int, verify: bool) -> None:
            for i in range(t, nblocks, threads):
                _full(os.preadv, fd, views[t], i * block)
                got = zlib.crc32(views[t]) if verify else bytes(views[t][block - 8:])
                if got != (expected[i] if verify else _stamp(i)):
                    raise BenchError(f"raw: block {i} of {name!r} read back differs from what was written "
                                     f"({'CRC32' if verify else 'its index stamp'})")

        with futures.ThreadPoolExecutor(threads, thread_name_prefix="nvme_raw") as pool:
            t0 = time.perf_counter()
            list(pool.map(write, range(threads)))
            if not direct:
                os.fsync(fd)  # buffered: the write is done when the disk has it
            t_write = time.perf_counter() - t0
            if not direct:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # clean after fsync: dropped, read from disk
            t0 = time.perf_counter()
            list(pool.map(read, range(threads), [False] * threads))
            t_read = time.perf_counter() - t0
            list(pool.map(read, range(threads), [True] * threads))  # untimed: every block's CRC
        for view in views:
            view.release()
        return {"bytes": total, "threads": threads, "block_bytes": block, "write_gbps": _gbps(total, t_write),
                "read_gbps": _gbps(total, t_read), "verified": True}
    finally:
        os.close(fd)
        os.remove(name)


class _Sets:
    """The step's two swap buffer sets (one buffer per kind), random contents, and the CRC each sub-group's
    bytes must have: sub-group ``i`` goes out from set ``i % 2`` with ``i`` in its last element."""

    def __init__(self, sub: int, pin: bool) -> None:
        gen = torch.Generator().manual_seed(0)
        self.bufs = [[aligned_empty(sub, pin) for _ in KINDS] for _ in range(2)]
        for buf in (b for s in self.bufs for b in s):
            buf.view(torch.int32).random_(generator=gen)
        self._body: dict[tuple[int, int, int], int] = {}

    def expect(self, i: int, k: int, m: int) -> int:
        """The CRC32 of sub-group ``i``'s ``m`` elements of kind ``k`` (call before any stamping)."""
        key = (i % 2, k, m)
        if key not in self._body:
            self._body[key] = zlib.crc32(self.bufs[i % 2][k][:m - 1].numpy())
        return zlib.crc32(np.int32(i).tobytes(), self._body[key])

    def stamp(self, i: int, m: int) -> None:
        for buf in self.bufs[i % 2]:
            buf.view(torch.int32)[m - 1] = i

    def stamped(self, i: int, m: int) -> bool:
        return all(int(buf.view(torch.int32)[m - 1]) == i for buf in self.bufs[i % 2])

    def crcs(self, i: int, m: int) -> list[int]:
        return [zlib.crc32(buf[:m].numpy()) for buf in self.bufs[i % 2]]


def ds_zero(work: str, total: int, threads: int, sub_group: int, direct: bool, pin: bool) -> dict:
    """``total`` bytes through ds-zero's swap files: one param group of ``total / 12`` fp32 elements per kind,
    written and read sub-group by sub-group as the engine's step does (see the module docstring). Buffered:
    also the fsync, a read from the page cache and a read with the files' cache dropped."""
    n = total // (4 * len(KINDS))
    swap_dir = SwapDir(work, 0, len(KINDS) * file_bytes(n, direct))
    files = SwapFiles(swap_dir, [n], direct=direct)  # direct=True: a named NVMeSwapError where refused
    pool = futures.ThreadPoolExecutor(threads, thread_name_prefix="ds_zero_swap")
    try:
        sub = sub_group_elements(sub_group, n, files.direct)
        ranges = [(lo, min(lo + sub, n)) for lo in range(0, n, sub)]
        # O_DIRECT moves whole blocks: the last, partial sub-group's length rounded up, as _step_group does
        block = ALIGN_ELEMENTS if files.direct else 1
        sets = _Sets(sub, pin)
        expected = [[sets.expect(i, k, hi - lo) for k in range(len(KINDS))] for i, (lo, hi) in enumerate(ranges)]

        def submit(op, i):
            lo, hi = ranges[i]
            return [pool.submit(op, 0, kind, buf[:_round_up(hi - lo, block)], lo)
                    for kind, buf in zip(KINDS, sets.bufs[i % 2])]

        def write_all() -> None:
            writes: list = [None, None]
            for i, (lo, hi) in enumerate(ranges):
                _wait(writes[i % 2])  # a set is reused only once its writes landed
                sets.stamp(i, hi - lo)
                writes[i % 2] = submit(files.write, i)
            for pending in writes:
                _wait(pending)

        def read_all(verify: bool) -> None:
            reads = submit(files.read, 0)
            for i, (lo, hi) in enumerate(ranges):
                _wait(reads)
                # the next sub-group's reads run while this one is checked, as while the step's kernel runs
                reads = submit(files.read, i + 1) if i + 1 < len(ranges) else None
                ok = sets.crcs(i, hi - lo) == expected[i] if verify else sets.stamped(i, hi - lo)
                if not ok:
                    _wait(reads, raise_errors=False)
                    raise BenchError(f"ds-zero {'direct' if files.direct else 'buffered'}: sub-group {i} "
                                     f"(elements {lo}..{hi}) read back differs from what was written "
                                     f"({'CRC32' if verify else 'its index stamp'})")

        def fds():
            return list(files.fds.values())

        out = {"bytes": 4 * len(KINDS) * n, "threads": threads, "sub_group": sub, "sub_groups": len(ranges),
               "pinned": pin, "direct": files.direct}
        t0 = time.perf_counter()
        write_all()
        out["write_s"] = time.perf_counter() - t0
        if not files.direct:
            t0 = time.perf_counter()
            for fd in fds():
                os.fsync(fd)
            out["fsync_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        read_all(verify=False)
        out["read_s"] = time.perf_counter() - t0
        if not files.direct:
            for fd in fds():  # clean after the fsync: dropped, so the second read comes from the disk
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            t0 = time.perf_counter()
            read_all(verify=False)
            out["read_dropped_s"] = time.perf_counter() - t0
        read_all(verify=True)  # untimed: every sub-group's CRC
        out["verified"] = True
        return out
    finally:
        pool.shutdown(wait=True)
        files.close()


def _line(label: str, write: float, read: float, nbytes: int, threads: int, extra: str = "",
          base: dict | None = None) -> str:
    line = f"[nvme {label}] write {write:.2f} GB/s read {read:.2f} GB/s ({nbytes / GiB:.2f} GiB, {threads} threads"
    line += f"{extra})"
    if base:
        line += f" = {write / base['write_gbps']:.2f}x / {read / base['read_gbps']:.2f}x raw (write / read)"
    return line


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--path", required=True, help="directory on the disk to measure (created if missing)")
    p.add_argument("--gib", type=float, default=8.0, help="bytes moved each way, GiB")
    p.add_argument("--threads", type=int, default=ENGINE_THREADS, help="I/O threads (default: the engine's)")
    p.add_argument("--block-mib", type=float, default=64, help="raw block size, MiB")
    p.add_argument("--sub-group", type=lambda s: int(float(s)), default=SUB_GROUP,
                   help="ds-zero sub_group_size (elements)")
    p.add_argument("--out", default=None, help="JSON results")
    p.add_argument("--smoke", action="store_true", help="64 MiB, 4 MiB blocks, 1e6-element sub-groups (CPU test)")
    args = p.parse_args(argv)
    if args.smoke:  # 1e6: not a multiple of 1024, so O_DIRECT rounds the sub-groups and the last one is partial
        args.gib, args.block_mib, args.sub_group = 1 / 16, 4, 1_000_000
    if args.threads < 1 or args.gib <= 0 or args.block_mib <= 0 or args.sub_group < 1:
        raise BenchError("--threads, --gib, --block-mib and --sub-group must be positive")
    block = _round_up(int(min(args.block_mib * MiB, args.gib * GiB)), ALIGN)
    total = max(1, round(args.gib * GiB / block)) * block
    created = not os.path.exists(args.path)
    os.makedirs(args.path, exist_ok=True)
    free = shutil.disk_usage(args.path).free
    if free < total + 64 * MiB:
        raise BenchError(f"{args.path!r} has {free / GiB:.2f} GiB free, the benchmark needs {total / GiB:.2f} GiB")
    pin = torch.cuda.is_available()  # the engine pins its swap buffers beside CUDA (pin_memory)
    work = tempfile.mkdtemp(prefix="nvme_swap_bench.", dir=args.path)
    res: dict = {"path": os.path.abspath(args.path), "fs": _fs_of(args.path), "threads": args.threads,
                 "pinned": pin, "measurements": {}}
    runs = res["measurements"]
    try:
        refused = _refuses_direct(work)
        res["o_direct"] = refused is None
        if refused:
            print(f"[nvme] O_DIRECT refused by the file system of {args.path!r} ({res['fs']}): {refused}; raw is "
                  "measured buffered (fsync in the write, page cache dropped before the read), ds-zero direct is "
                  "skipped", flush=True)
        name = "raw-buffered" if refused else "raw-direct"
        base = runs[name] = raw(work, total, block, args.threads, direct=not refused)
        print(_line(name, base["write_gbps"], base["read_gbps"], total, args.threads,
                    f", {block / MiB:.0f} MiB blocks"), flush=True)
        for direct in ([False] if refused else [True, False]):
            r = ds_zero(work, total, args.threads, args.sub_group, direct, pin)
            extra = f", {r['sub_groups']} sub-groups of {r['sub_group']}, {'pinned' if pin else 'not pinned'}"
            nb = r["bytes"]
            if direct:
                r["write_gbps"], r["read_gbps"] = _gbps(nb, r["write_s"]), _gbps(nb, r["read_s"])
                runs["ds-zero-direct"] = r
                print(_line("ds-zero direct", r["write_gbps"], r["read_gbps"], nb, args.threads, extra, base),
                      flush=True)
                continue
            # the step's view: writes end in the page cache (written back later), reads served from it
            cached = {**r, "write_gbps": _gbps(nb, r["write_s"]), "read_gbps": _gbps(nb, r["read_s"])}
            # the disk's: the write counts its fsync, the read follows dropping the files' cached pages
            disk = {**r, "write_gbps": _gbps(nb, r["write_s"] + r["fsync_s"]),
                    "read_gbps": _gbps(nb, r["read_dropped_s"])}
            runs["ds-zero-buffered-cache"], runs["ds-zero-buffered-disk"] = cached, disk
            print(_line("ds-zero buffered, page cache", cached["write_gbps"], cached["read_gbps"], nb, args.threads,
                        extra + "; write without fsync, read from the page cache", base), flush=True)
            print(_line("ds-zero buffered, disk", disk["write_gbps"], disk["read_gbps"], nb, args.threads,
                        extra + "; write with fsync, read after dropping the page cache", base), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if created:
            try:
                os.rmdir(args.path)  # only the directory this run made, and only if nothing else was put there
            except OSError:
                pass
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
