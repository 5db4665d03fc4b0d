"""NVMe offload of the optimizer (ZeRO-Infinity's optimizer-state swapping), stages 0-2 in the *masters* mode.

``offload_optimizer: {device: "nvme", nvme_path, pin_memory}``: this rank's fp32 masters and Adam's two moments
live in three files per param group under ``nvme_path/ds_zero_swap/rank<R>/``, not in host memory. What stays in
host memory: the 16-bit staging of the reduced grads and the 16-bit copy-out of the new params (2 + 2 bytes per
param of the shard, as CPU offload), and two sets of swap buffers of ``sub_group_size`` elements each (12 bytes
per element per set: master, exp_avg, exp_avg_sq), pinned when ``pin_memory`` and CUDA.

The step (:meth:`NVMeAdam.swap_step`) walks each group's master in sub-groups of ``sub_group_size`` elements
(DeepSpeed's key: the optimizer step's unit): a pool of I/O threads reads sub-group ``i + 1`` from the files into
one buffer set (``os.preadv``: positional reads, no seek, no shared file offset) while ds-optim's Numba Adam
kernel steps sub-group ``i`` in the other set, writing the 16-bit copy of the new params in the same pass; the
updated set is then written back (``os.pwritev``) by the pool while the next sub-group steps. A buffer set is
reused only once its write has landed. This is DeepSpeed's pipelined swapper without libaio: no compiler at
install time.

``O_DIRECT`` (``offload_optimizer.direct_io``, ds-zero's key: DeepSpeed's ``aio`` section has none -- its keys
are ``block_size``, ``queue_depth``, ``intra_op_parallelism``/``thread_count``, ``single_submit``,
``overlap_events``, ``use_gds`` -- and its libaio swapper always opens with ``O_DIRECT``): the step's reads and
writes bypass the page cache, so a host with much memory does not keep the files cached and the step is bound by
the disk it claims to use. ``"auto"`` (default) uses it where the file system of ``nvme_path`` accepts it and
falls back to buffered I/O otherwise (a warning, once, with the reason); ``true`` requires it (refused: a
:class:`NVMeSwapError` naming ``nvme_path`` and the OS error); ``false``: buffered. Support is probed at set-up on
the real file: an ``O_DIRECT`` open and one aligned 4096-byte ``pwrite``/``pread`` (:attr:`SwapFiles.direct` says
which mode runs). ``O_DIRECT`` needs the buffer address, the file offset and the length in multiples of the
logical block size (:data:`ALIGN`, 4096 bytes): the sub-groups are rounded up to multiples of 1024 fp32 elements,
each file's length is padded to a multiple of 4096 bytes, the swap buffers start on a 4096-byte boundary
(:func:`aligned_empty`), and the last, partial sub-group of a group moves a length rounded up to 4096 bytes (into
the file's padding, which no tensor maps). Each file then has a second descriptor opened with ``O_DIRECT``, used
only by the step's reads and writes.

The masters and states are also ``torch.from_file(..., shared=True)`` tensors over the same files: the engine,
checkpoints and ``state_dict`` read and write them as ordinary tensors (buffered I/O: the kernel's page cache is
the mapping's memory; ``O_DIRECT``: Linux keeps the two coherent, see :meth:`SwapFiles.read`), so checkpoints need
nothing new: an NVMe-offloaded run saves what a CPU offloaded run saves, resumes bit for bit, and loads into CPU
offload or no offload (Adam family).

Faults, each a named error before or instead of a wrong result: ``nvme_path`` missing, not a directory or not
writable, or with less free space than the three files need (how much is asked, how much is free); ``direct_io:
true`` where the file system refuses ``O_DIRECT``; swap buffers larger than the host's available memory; a
directory in use by a live process; a write that fails mid-step (``ENOSPC``: the disk filled) names the file and
offset. A setup error on one rank is raised on every rank (the others name that rank). Swap files of a killed run
are removed at the next start on the same ``nvme_path``; the engine's files are removed when it is garbage
collected or the interpreter exits, the directory with the last engine of the process using it (a second live
engine on the same directory, as ``engine = build()`` run again makes, gets its own file names: neither truncates
nor removes the other's files)."""

from __future__ import annotations

import concurrent.futures as futures
import errno
import gc
import itertools
import logging
import mmap
import os
import shutil
import socket
import weakref

import torch
import torch.distributed as dist

logger = logging.getLogger("ds_zero")

STATES = ("exp_avg", "exp_avg_sq")
#: files per param group: the fp32 master and Adam's two moments
KINDS = ("param", *STATES)
#: ``O_DIRECT``'s alignment (bytes) of buffer addresses, file offsets and lengths: the logical block size of
#: today's NVMe drives (4096, or 512: 4096 is a multiple of either) and the page size
ALIGN = 4096
#: fp32 elements per :data:`ALIGN` bytes: the sub-group boundaries' multiple under ``O_DIRECT``
ALIGN_ELEMENTS = ALIGN // 4
#: ``os.O_DIRECT`` (Linux only; 0: this platform has none, every file system "refuses" it)
_O_DIRECT = getattr(os, "O_DIRECT", 0)
#: (nvme_path, direct) choices of ``direct_io: "auto"`` already logged by this process
_AUTO_LOGGED: set[tuple[str, bool]] = set()


class NVMeSwapError(RuntimeError):
    """An NVMe offload failure: a bad ``nvme_path``, too little space or memory, a failed read or write."""


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def file_bytes(n: int, direct: bool | str) -> int:
    """The length of the swap file of ``n`` fp32 elements: padded to :data:`ALIGN` unless ``direct`` is False (a
    direct read or write of the last, partial sub-group moves whole blocks)."""
    return 4 * n if direct is False else _round_up(4 * n, ALIGN)


def aligned_empty(n: int, pin: bool) -> torch.Tensor:
    """An uninitialised fp32 tensor of ``n`` elements starting on an :data:`ALIGN`-byte boundary, pinned when
    ``pin``: ``O_DIRECT`` reads and writes it. torch's CPU allocator aligns to 64 bytes only and a pinned block's
    alignment is the caching host allocator's business, so a uint8 block one ``ALIGN`` longer is allocated and
    the aligned part viewed (the view keeps the block alive).

    Pinned, the exact size is tried first: torch's caching host allocator hands out whole ``cudaHostAlloc``
    blocks (page-aligned) rounded up to a power of two, so the extra ``ALIGN`` bytes would double the pinned
    memory of a buffer whose size is an exact power of two."""
    if pin:
        exact = torch.empty(4 * n, dtype=torch.uint8, pin_memory=True)
        if exact.data_ptr() % ALIGN == 0:
            return exact.view(torch.float32)
        del exact
    raw = torch.empty(4 * n + ALIGN, dtype=torch.uint8, pin_memory=pin)
    skip = -raw.data_ptr() % ALIGN
    out = raw[skip:skip + 4 * n].view(torch.float32)
    if out.data_ptr() % ALIGN:
        raise RuntimeError(f"aligned_empty: address {out.data_ptr():#x} is not a multiple of {ALIGN}")
    return out


def sub_group_elements(sub_group_size: int, biggest: int, direct: bool) -> int:
    """The step's sub-group (elements): ``sub_group_size``, at most the biggest group; under ``O_DIRECT`` rounded
    up to a multiple of :data:`ALIGN_ELEMENTS`, so every sub-group starts on a block boundary of its file."""
    sub = max(1, min(int(sub_group_size), biggest))
    return _round_up(sub, ALIGN_ELEMENTS) if direct else sub


class SwapDir:
    """This rank's swap directory ``nvme_path/ds_zero_swap/rank<R>``: checked, locked by a pid file, emptied of a
    dead run's files, removed at the end."""

    def __init__(self, nvme_path: str, rank: int, needed_bytes: int, section: str = "offload_optimizer") -> None:
        """``section``: the config section whose ``nvme_path`` this is, for the errors (``offload_param`` for the
        stage-3 parameter files, ``_swap_params``)."""
        key = f"zero_optimization.{section}"
        #: the config section's key, for errors about this directory
        self.key = key
        if not nvme_path:
            raise NVMeSwapError(f"{key}.device is 'nvme' but nvme_path is not set")
        root = os.fspath(nvme_path)
        #: ``nvme_path`` as configured
        self.root = root
        if not os.path.exists(root):
            raise NVMeSwapError(f"{key}.nvme_path {root!r} does not exist")
        if not os.path.isdir(root):
            raise NVMeSwapError(f"{key}.nvme_path {root!r} is not a directory")
        if not os.access(root, os.W_OK | os.X_OK):
            raise NVMeSwapError(f"{key}.nvme_path {root!r} is not writable")
        self.path = os.path.join(root, "ds_zero_swap", f"rank{rank}")
        if any(True for _ in _LIVE.get(self.path, ())):
            # an engine the caller dropped may only wait for the cycle collector: let it remove its files (and the
            # directory) now, before this one makes its own
            gc.collect()
        os.makedirs(self.path, exist_ok=True)
        self._claim()
        free = shutil.disk_usage(self.path).free
        if free < needed_bytes:
            raise NVMeSwapError(f"{key}.nvme_path {root!r}: the swap files need "
                                f"{_gib(needed_bytes)} on this rank, the file system has {_gib(free)} free")

    def _claim(self) -> None:
        # files of this process's engines that still use the directory (``engine = build()`` again while the
        # old engine lives): not stale; the new engine's files get their own names (SwapFiles)
        live = {os.path.basename(name) for files in _LIVE.get(self.path, ()) for name in files.names.values()}
        owner = os.path.join(self.path, "owner")
        host = socket.gethostname()
        try:
            with open(owner) as f:
                old_host, old_pid = f.read().split()
            alive = old_host == host and _pid_alive(int(old_pid)) and int(old_pid) != os.getpid()
        except (OSError, ValueError):
            old_pid, alive = None, False
        if alive:
            raise NVMeSwapError(f"the NVMe swap directory {self.path!r} is in use by process {old_pid} on this host; "
                                "give each run its own nvme_path")
        stale = [n for n in os.listdir(self.path) if n != "owner" and n not in live]
        if stale:  # a killed run's files: they would hold the disk space this run needs
            logger.warning("ds_zero: removing %d stale NVMe swap files of process %s in %s", len(stale), old_pid,
                           self.path)
            for name in stale:
                full = os.path.join(self.path, name)
                shutil.rmtree(full) if os.path.isdir(full) else os.remove(full)
        with open(owner, "w") as f:
            f.write(f"{host} {os.getpid()}\n")

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


#: swap directory -> this process's live SwapFiles in it (their files are not stale; the last one removes it)
_LIVE: dict[str, weakref.WeakSet] = {}
_INSTANCE = itertools.count(1)


def _remove_dir(path: str, fds: list[int], names: list[str]) -> None:
    """A SwapFiles is gone: close and remove its files; the directory too once no other engine of this process
    uses it (iterating the WeakSet skips the dead)."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
    for name in names:
        try:
            os.remove(name)
        except OSError:
            pass
    if not any(True for _ in _LIVE.get(path, ())):
        shutil.rmtree(path, ignore_errors=True)


def _np(t: torch.Tensor):
    return t.numpy().data.cast("B")  # ndarray.data: memoryview(array) (numpy's stubs give 3.10 no buffer protocol)


class SwapFiles:
    """One file per (param group, kind), opened once; positional reads and writes of element ranges, through a
    second, ``O_DIRECT`` descriptor per file when :attr:`direct`."""

    def __init__(self, swap_dir: SwapDir, sizes: list[int], kinds: tuple[str, ...] = KINDS,
                 stem: str = "group", direct: bool | str = False) -> None:
        """``kinds``: the files of each group (stage 3 swaps only the moments, ``STATES``: ``_swap_stage3``);
        ``stem``: the files are ``<stem><i>.<kind>`` (``_swap_params``: one per FSDP2 unit, ``unit<i>.param``);
        ``direct``: ``offload_optimizer.direct_io`` (True, False or ``"auto"``; see the module docstring): any
        but False pads the files to :data:`ALIGN` and probes ``O_DIRECT``."""
        self.dir = swap_dir
        self.fds: dict[tuple[int, str], int] = {}
        self.names: dict[tuple[int, str], str] = {}
        #: the ``O_DIRECT`` descriptors (empty when buffered): the swap step's reads and writes go through them
        self.direct_fds: dict[tuple[int, str], int] = {}
        #: whether the step's reads and writes bypass the page cache (``O_DIRECT``)
        self.direct = False
        opened: list[int] = []  # closed before the directory is removed
        self._opened = opened
        created: list[str] = []
        users = _LIVE.setdefault(swap_dir.path, weakref.WeakSet())
        # another live engine of this process in the directory: distinct names, so neither truncates the other's
        prefix = f"e{next(_INSTANCE)}." if any(True for _ in users) else ""
        users.add(self)
        self._finalizer = weakref.finalize(self, _remove_dir, swap_dir.path, opened, created)
        for gi, n in enumerate(sizes):
            if not n:
                continue
            for kind in kinds:
                name = swap_dir.file(f"{prefix}{stem}{gi}.{kind}")
                fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
                opened.append(fd)
                created.append(name)
                self.fds[gi, kind], self.names[gi, kind] = fd, name
                size = file_bytes(n, direct)
                try:
                    os.posix_fallocate(fd, 0, size)  # reserve the space now: a full disk fails here, not mid-step
                except OSError as exc:
                    raise NVMeSwapError(f"cannot reserve {_gib(size)} for the NVMe swap file {name!r}: {exc}") from None
        if direct is not False and self.names:
            self.direct = self._open_direct(direct is True)

    def _open_direct(self, required: bool) -> bool:
        """Open every file a second time with ``O_DIRECT`` and probe the first one (an aligned 4096-byte write of
        the zeros ``posix_fallocate`` left there, read back): a file system that refuses ``O_DIRECT`` fails the
        open (tmpfs before Linux 6.6: ``EINVAL``) or the first I/O. Refused: buffered I/O (``"auto"``, logged
        once per ``nvme_path``) or a :class:`NVMeSwapError` (``required``)."""
        try:
            if not _O_DIRECT:
                raise OSError(errno.EINVAL, "this platform has no O_DIRECT")
            for key, name in self.names.items():
                fd = os.open(name, os.O_RDWR | _O_DIRECT)
                self._opened.append(fd)
                self.direct_fds[key] = fd
            probe = mmap.mmap(-1, ALIGN)  # anonymous: page aligned, zeros
            try:
                fd = next(iter(self.direct_fds.values()))
                for moved in (os.pwritev(fd, [probe], 0), os.preadv(fd, [probe], 0)):
                    if moved != ALIGN:
                        raise OSError(errno.EIO, f"a {ALIGN}-byte probe moved {moved} bytes")
            finally:
                probe.close()
        except OSError as exc:
            for fd in self.direct_fds.values():
                os.close(fd)
                self._opened.remove(fd)
            self.direct_fds.clear()
            root = self.dir.root
            if required:
                raise NVMeSwapError(f"{self.dir.key}.direct_io is true but the file system of nvme_path {root!r} "
                                    f"refuses O_DIRECT: {exc}; set direct_io to \"auto\" or false for buffered "
                                    "I/O") from None
            if (root, False) not in _AUTO_LOGGED:
                _AUTO_LOGGED.add((root, False))
                logger.warning("ds_zero: NVMe swap under %r uses buffered I/O (direct_io \"auto\"): its file system "
                               "refuses O_DIRECT (%s); the page cache may serve the swap instead of the disk",
                               root, exc)
            return False
        if not required and (self.dir.root, True) not in _AUTO_LOGGED:
            _AUTO_LOGGED.add((self.dir.root, True))
            logger.warning("ds_zero: NVMe swap under %r uses O_DIRECT (direct_io \"auto\"): its file system accepts "
                           "it, so the swap step bypasses the page cache", self.dir.root)
        return True

    def mapped(self, gi: int, kind: str, n: int) -> torch.Tensor:
        """The file's first ``n`` elements as an fp32 tensor (shared mapping: writes go to the file)."""
        return torch.from_file(self.names[gi, kind], shared=True, size=n, dtype=torch.float32)

    def _fd(self, gi: int, kind: str, buf: torch.Tensor, offset: int) -> int:
        """The descriptor for a read or write of ``buf`` at element ``offset``: the ``O_DIRECT`` one when
        :attr:`direct`, whose rule (address, offset and length in multiples of :data:`ALIGN`) is checked here: the
        kernel's ``EINVAL`` would not say which."""
        if not self.direct:
            return self.fds[gi, kind]
        address, length = buf.data_ptr(), buf.numel() * 4
        if address % ALIGN or offset * 4 % ALIGN or length % ALIGN:
            raise NVMeSwapError(f"O_DIRECT I/O of {self.names[gi, kind]!r} needs {ALIGN}-byte alignment: buffer "
                                f"address {address:#x}, file offset {offset * 4}, length {length} bytes")
        return self.direct_fds[gi, kind]

    # Under O_DIRECT the mapping (``mapped``: the engine's masters and states, checkpoints, ``state_dict``) and the
    # direct descriptor see the same bytes because Linux keeps the page cache coherent with direct I/O: a direct
    # read first writes back the dirty cached pages of its range (a write through the mapping dirties them), and
    # a direct write first writes them back and then invalidates them (unmapping them from the mapping), so the
    # next access through the mapping faults the new bytes in from the file. Both hold while the two do not
    # touch one range at the same time, which the engine never does (the step owns the files while it runs).
    def read(self, gi: int, kind: str, out: torch.Tensor, offset: int) -> None:
        """Fill ``out`` from the file at element ``offset`` (positional: no shared file offset between threads)."""
        view, done, total = _np(out), 0, out.numel() * 4
        try:
            fd = self._fd(gi, kind, out, offset)
            while done < total:
                got = os.preadv(fd, [view[done:]], offset * 4 + done)
                if got <= 0:
                    raise OSError(f"unexpected end of file after {done} of {total} bytes")
                done += got
        except OSError as exc:
            raise NVMeSwapError(f"NVMe swap read of {self.names[gi, kind]!r} at element {offset} failed: {exc}") from None

    def write(self, gi: int, kind: str, src: torch.Tensor, offset: int) -> None:
        """Write ``src`` into the file at element ``offset``."""
        view, done, total = _np(src), 0, src.numel() * 4
        try:
            fd = self._fd(gi, kind, src, offset)
            while done < total:
                done += os.pwritev(fd, [view[done:]], offset * 4 + done)
        except OSError as exc:
            full = " (the disk under nvme_path is full)" if getattr(exc, "errno", None) == 28 else ""
            raise NVMeSwapError(f"NVMe swap write of {self.names[gi, kind]!r} at element {offset} failed{full}: "
                                f"{exc}") from None

    def close(self) -> None:
        self._finalizer()


def agree_on_setup(error: BaseException | None, group, error_class: type[Exception] = NVMeSwapError,
                   what: str = "NVMe offload set-up") -> None:
    """Every rank learns whether any rank failed to set up its swap files (or, ``what``, its offload), so that
    none goes on into a collective the failed one never joins: the failing rank raises its own error, the others
    name it (an ``error_class``)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        messages = [None] * dist.get_world_size(group)
        dist.all_gather_object(messages, None if error is None else f"{type(error).__name__}: {error}", group=group)
        if error is None:
            failed = [(r, m) for r, m in enumerate(messages) if m is not None]
            if failed:
                rank, message = failed[0]
                raise error_class(f"{what} failed on rank {rank}: {message}")
    if error is not None:
        raise error


class NVMeAdam(torch.optim.Optimizer):
    """Adam/AdamW over file-backed fp32 masters and states, stepped sub-group by sub-group through swap buffers
    (see the module docstring). One param (a group's flat master) per group; ``state_dict`` is torch's Adam
    layout (``step``, ``exp_avg``, ``exp_avg_sq``), so checkpoints load across CPUAdam, FusedAdam(W) and torch's
    Adam(W)."""

    def __init__(self, groups: list[dict], defaults: dict, files: SwapFiles, sub_group_size: int,
                 copy_dtype: torch.dtype | None, pin: bool, io_threads: int = 3) -> None:
        super().__init__(groups, defaults)
        self.files = files
        self.copy_dtype = copy_dtype
        self.pin = pin
        self.group_index: dict[torch.nn.Parameter, int] = {}
        for group in self.param_groups:
            (p,) = group["params"]
            gi = group.pop("_master_index")
            self.group_index[p] = gi
            st = self.state[p]
            st["step"] = torch.zeros((), dtype=torch.float32)
            for kind in STATES:
                st[kind] = files.mapped(gi, kind, p.numel())
        biggest = max(p.numel() for p in self.group_index)
        self.sub_group_size = sub_group_elements(sub_group_size, biggest, files.direct)
        #: two swap buffer sets, each a (master, exp_avg, exp_avg_sq) of sub_group_size elements, each buffer on
        #: an ALIGN boundary (O_DIRECT)
        self.buffers = [[aligned_empty(self.sub_group_size, pin) for _ in KINDS] for _ in range(2)]
        #: the 16-bit copy of each group's new params written by the kernel (None for an fp32 model)
        self.copies = {p: (torch.empty(p.numel(), dtype=copy_dtype, pin_memory=pin) if copy_dtype else None)
                       for p in self.group_index}
        self.pool = futures.ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="ds_zero_swap")
        weakref.finalize(self, self.pool.shutdown, wait=False)
        from ds_optim.kernels import select_backend

        self.kernels = select_backend(torch.device("cpu"))
        #: bytes moved by the last step (reads + writes), for bandwidth reports
        self.last_swap_bytes = 0

    def copy_of(self, p: torch.nn.Parameter) -> torch.Tensor:
        """The 16-bit copy of ``p``'s new values written by the last step's kernel."""
        copy = self.copies[p]
        if copy is None:
            raise RuntimeError("NVMeAdam.copy_of: an fp32 model gets no 16-bit copy (copy_dtype is None)")
        return copy

    def step(self, closure=None):
        raise RuntimeError("NVMeAdam steps inside the engine (swap_step with the reduced gradient shards)")

    @torch.no_grad()
    def swap_step(self, grads: list[torch.Tensor], scale: float) -> None:
        """One Adam step of every group's master from ``grads * scale`` (host 16-bit or fp32 flat grads, one per
        group in the masters' order), swapping sub-groups through the buffers."""
        moved = 0
        for group, g in zip(self.param_groups, grads):
            (p,) = group["params"]
            st = self.state[p]
            step = float(st["step"]) + 1
            moved += self._step_group(group, self.group_index[p], p.numel(), g.reshape(-1), step, scale,
                                      self.copies[p])
            st["step"].fill_(step)  # counted once every sub-group's write landed (a failed step is not counted)
        self.last_swap_bytes = moved

    def _step_group(self, group, gi, n, g, step, scale, copy) -> int:
        sub = self.sub_group_size
        ranges = [(lo, min(lo + sub, n)) for lo in range(0, n, sub)]
        writes: list[list | None] = [None, None]
        # O_DIRECT moves whole blocks: the last, partial sub-group's length is rounded up to ALIGN bytes (within
        # the buffer, sub_group_size being a multiple of ALIGN_ELEMENTS, and within the file's padding); the
        # kernel steps only the sub-group's own elements
        block = ALIGN_ELEMENTS if self.files.direct else 1

        def issue_reads(i):
            lo, hi = ranges[i]
            _wait(writes[i % 2])  # the set is reused only once its last write landed
            bufs = self.buffers[i % 2]
            return [self.pool.submit(self.files.read, gi, kind, buf[:_round_up(hi - lo, block)], lo)
                    for kind, buf in zip(KINDS, bufs)]

        beta1, beta2 = group["betas"]
        reads = issue_reads(0)
        try:
            for i, (lo, hi) in enumerate(ranges):
                _wait(reads)
                reads = issue_reads(i + 1) if i + 1 < len(ranges) else None
                bufs = self.buffers[i % 2]
                p, m, v = (buf[:hi - lo] for buf in bufs)
                self.kernels.adam(p, g[lo:hi], m, v, step, lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                                  weight_decay=group["weight_decay"], adam_w_mode=group["adam_w_mode"],
                                  bias_correction=group["bias_correction"], maximize=group["maximize"],
                                  grad_scale=1.0 / scale, out=None if copy is None else copy[lo:hi])
                writes[i % 2] = [self.pool.submit(self.files.write, gi, kind, buf[:_round_up(hi - lo, block)], lo)
                                 for kind, buf in zip(KINDS, bufs)]
        finally:
            for pending in (reads, *writes):  # never leave I/O running into buffers the next step reuses
                _wait(pending, raise_errors=False)
        for pending in writes:
            _wait(pending)
        return 2 * 12 * n

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's, then the loaded moments are copied into the files and the state points at them again."""
        mapped = {p: {k: self.state[p][k] for k in STATES} for p in self.group_index}
        super().load_state_dict(state_dict)
        for p, tensors in mapped.items():
            st = self.state[p]
            for kind, target in tensors.items():
                if kind in st and st[kind] is not target:
                    target.copy_(st[kind].reshape(-1))
                elif kind not in st:
                    target.zero_()
                st[kind] = target
            step = st.get("step", 0)
            st["step"] = torch.as_tensor(float(step), dtype=torch.float32).clone()


def _wait(pending, raise_errors: bool = True) -> None:
    if not pending:
        return
    first = None
    for f in pending:
        exc = f.exception()
        if exc is not None and first is None:
            first = exc
    if first is not None and raise_errors:
        raise first


def check_host_memory(what: str, needed: int, per_element: int = 12) -> None:
    """Refuse, before training starts, host buffers larger than the memory available now (``per_element``: bytes
    per sub-group element of one swap buffer set, for the hint)."""
    available = _mem_available()
    if available is not None and needed > available:
        raise NVMeSwapError(f"{what} needs {_gib(needed)} of host memory, {_gib(available)} is available; lower "
                            f"zero_optimization.sub_group_size (each of the two swap buffer sets holds {per_element} "
                            "bytes per element of a sub-group)")


def build_nvme_adam(offload, groups: list[tuple[int, dict]], defaults: dict, masters) -> NVMeAdam:
    """The NVMe optimizer over ``masters`` (file-backed): ``groups`` pairs each master's group index with its
    hyper-parameters. Host memory for the swap buffers and the 16-bit copy-out is checked on every rank first."""
    numels = [masters.params[gi].numel() for gi, _ in groups]
    sub = sub_group_elements(offload.sub_group_size, max(numels), masters.files.direct)
    copy_bytes = (sum(numels) * offload.copy_dtype.itemsize) if offload.copy_dtype is not None else 0
    error = None
    try:
        check_host_memory("NVMe offload's swap buffers and 16-bit copy-out", 2 * 12 * sub + copy_bytes)
    except NVMeSwapError as exc:
        error = exc
    agree_on_setup(error, offload.group)
    param_groups = [{**hyper, "params": [masters.params[gi]], "_master_index": gi} for gi, hyper in groups]
    return NVMeAdam(param_groups, defaults, masters.files, offload.sub_group_size, offload.copy_dtype, offload.pin)


def to_files(masters, offload) -> SwapFiles:
    """Move each fp32 master of ``masters`` (in host memory) into its swap file; the param becomes the mapping.
    ``offload.direct_io``: ``offload_optimizer.direct_io`` (the files are probed for ``O_DIRECT`` first, while
    they hold zeros)."""
    sizes = [0 if p is None else p.numel() for p in masters.params]
    direct = offload.direct_io
    files, error = None, None
    try:
        swap_dir = SwapDir(offload.nvme_path, offload.global_rank,
                           len(KINDS) * sum(file_bytes(n, direct) for n in sizes if n))
        files = SwapFiles(swap_dir, sizes, direct=direct)
    except NVMeSwapError as exc:
        error = exc
    agree_on_setup(error, offload.group)
    if files is None:  # agree_on_setup raised this rank's error
        raise RuntimeError("NVMe offload set-up failed") from error
    for gi, p in enumerate(masters.params):
        if p is not None:
            mapped = files.mapped(gi, "param", p.numel())
            mapped.copy_(p.data)
            p.data = mapped  # the in-memory master is freed here
    return files
