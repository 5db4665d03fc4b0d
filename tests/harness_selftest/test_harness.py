"""Self-tests for tests/harness: each failure mode must be reported as documented, fast, and leave no
process behind. Functions run inside ranks are module-level so they pickle by reference."""

from __future__ import annotations

import multiprocessing
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
import torch.distributed as dist

from harness import (
    DistributedTestError,
    find_mpiexec,
    requires_gpus,
    requires_mpiexec,
    run_distributed,
    run_subprocess_job,
)


def _gone(pid: int) -> bool:
    """True once pid has exited: no such process, or a zombie nobody has reaped yet
    (an orphan re-parented to a container's init that does not reap)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):  # it exited between the kill(0) and the read
        return True


def _wait_gone(pids, within=5.0) -> list[int]:
    """The pids still alive after `within` seconds (orphans are killed asynchronously)."""
    deadline = time.monotonic() + within
    while (alive := [p for p in pids if not _gone(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive


def _no_rank_children() -> bool:
    return not [p for p in multiprocessing.active_children() if p.name.startswith("harness-rank")]


# ---------------------------------------------------------------- functions run inside ranks


def _rank_info(scale):
    t = torch.tensor([float(dist.get_rank() + 1) * scale])
    dist.all_reduce(t)
    # Not a daemon: fn may start processes of its own (DataLoader workers).
    assert not multiprocessing.current_process().daemon
    return dist.get_rank(), dist.get_world_size(), t.item(), os.environ["RANK"], os.environ.get("HARNESS_SELFTEST")


def _raise_on_rank1_others_in_collective():
    if dist.get_rank() == 1:
        raise ValueError("boom from rank 1")
    t = torch.ones(1)
    dist.all_reduce(t)  # never completes: rank 1 does not take part


def _raise_on_rank1_others_sleep():
    if dist.get_rank() == 1:
        raise ValueError("boom from rank 1")
    time.sleep(1000)  # not in a collective, so only the harness can end it


def _assert_on_rank0():
    value = dist.get_rank() + 1
    assert value == 2, f"values differ: {value} != 2"
    return value


def _plain_assert_on_rank1():
    values = [dist.get_rank(), 0]
    assert values[0] == values[1]


def _nap_for_a_very_long_time():
    time.sleep(1000)


def _hang_on_rank1():
    if dist.get_rank() == 1:
        _nap_for_a_very_long_time()
    return "done"


def _signal_self_on_rank1(signum):
    if dist.get_rank() == 1:
        os.kill(os.getpid(), signum)
    dist.barrier()


def _exit3_on_rank0():
    if dist.get_rank() == 0:
        os._exit(3)
    dist.barrier()


def _return_unpicklable():
    return threading.Lock()


def _pid():
    return os.getpid()


def _leave_processes_then_fail(pid_dir):
    """Each rank records its own pid and that of a child it started, then rank 1 fails."""
    sleeper = subprocess.Popen(["sleep", "100"])
    with open(os.path.join(pid_dir, f"rank{dist.get_rank()}"), "w") as f:
        f.write(f"{os.getpid()} {sleeper.pid}")
    dist.barrier()
    if dist.get_rank() == 1:
        raise RuntimeError("failing on purpose")
    dist.barrier()  # fails once rank 1 is gone; rank 0 then exits, orphaning its `sleep`


def _nccl_all_reduce():
    t = torch.ones(1, device="cuda")
    dist.all_reduce(t)
    return t.item()


# ---------------------------------------------------------------- run_distributed


@pytest.mark.parametrize("world_size", [2, 4])
def test_returns_per_rank_values_and_all_reduce_sums(world_size):
    results = run_distributed(_rank_info, world_size, 10.0, env={"HARNESS_SELFTEST": "yes"})
    total = 10.0 * world_size * (world_size + 1) / 2
    assert results == [(r, world_size, total, str(r), "yes") for r in range(world_size)]


def test_raising_rank_is_named_and_the_others_do_not_wait_for_the_timeout():
    start = time.monotonic()
    with pytest.raises(DistributedTestError) as info:
        run_distributed(_raise_on_rank1_others_in_collective, 4, timeout=30)
    assert time.monotonic() - start < 15
    err = info.value
    assert err.first_failed_rank == 1
    assert err.failures[1] == "raised ValueError: boom from rank 1"
    assert "rank 1 raised ValueError: boom from rank 1" in str(err)
    assert "in _raise_on_rank1_others_in_collective" in str(err)  # the child's traceback
    # The others either saw the broken collective themselves or were killed.
    for rank in (0, 2, 3):
        assert err.failures[rank].startswith(("raised", "terminated after rank 1 failed")), err.failures
    assert _no_rank_children()


def test_ranks_stuck_after_another_fails_are_terminated_after_the_grace_period():
    start = time.monotonic()
    with pytest.raises(DistributedTestError) as info:
        run_distributed(_raise_on_rank1_others_sleep, 2, timeout=60)
    assert time.monotonic() - start < 15
    assert info.value.failures == {1: "raised ValueError: boom from rank 1", 0: "terminated after rank 1 failed"}
    assert "rank 0 terminated after rank 1 failed" in str(info.value)


def test_assertion_message_from_a_rank_is_reported():
    with pytest.raises(DistributedTestError) as info:
        run_distributed(_assert_on_rank0, 2)
    assert list(info.value.failures) == [0]
    assert info.value.failures[0].startswith("raised AssertionError: values differ: 1 != 2")
    assert info.value.results == [None, 2]


def test_plain_assert_in_a_rank_shows_the_values_like_pytest():
    with pytest.raises(DistributedTestError) as info:
        run_distributed(_plain_assert_on_rank1, 2)
    assert info.value.failures == {1: "raised AssertionError: assert 1 == 0"}


def test_hung_rank_is_reported_with_its_stack():
    start = time.monotonic()
    with pytest.raises(DistributedTestError) as info:
        run_distributed(_hang_on_rank1, 2, timeout=5)
    assert 5 <= time.monotonic() - start < 12
    assert info.value.failures == {1: "hung: not finished after 5.0 s"}
    message = str(info.value)
    assert "rank 1 hung: not finished after 5.0 s" in message
    assert re.search(r'File ".*test_harness\.py", line \d+ in _nap_for_a_very_long_time', message), message


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGSEGV], ids=lambda s: signal.Signals(s).name)
def test_rank_killed_by_a_signal(signum):
    with pytest.raises(DistributedTestError) as info:
        run_distributed(_signal_self_on_rank1, 2, signum)
    name = signal.Signals(signum).name
    assert info.value.failures[1] == f"died from signal {name} (-{int(signum)})"
    assert info.value.first_failed_rank == 1
    assert f"rank 1 died from signal {name}" in str(info.value)
    if signum == signal.SIGSEGV:  # faulthandler's dump of the crashing stack
        assert "in _signal_self_on_rank1" in str(info.value)


def test_rank_exiting_early_is_reported_with_its_code():
    with pytest.raises(DistributedTestError) as info:
        run_distributed(_exit3_on_rank0, 2)
    assert info.value.failures[0] == "exited with code 3 before reporting a result"
    assert "rank 0 exited with code 3 before reporting a result" in str(info.value)


def test_unpicklable_result_is_reported():
    with pytest.raises(DistributedTestError) as info:
        run_distributed(_return_unpicklable, 2)
    assert set(info.value.failures) == {0, 1}
    assert "returned a lock that cannot be pickled" in info.value.failures[0]


def test_unpicklable_function_is_refused_before_starting_anything():
    with pytest.raises(TypeError, match="module-level function"):
        run_distributed(lambda: 1, 2)


def test_consecutive_calls_use_fresh_processes_and_rendezvous():
    first = run_distributed(_pid, 2)
    second = run_distributed(_pid, 2)
    assert len(set(first + second)) == 4
    assert _wait_gone(first + second) == []


def test_no_process_survives_a_failing_call(tmp_path):
    with pytest.raises(DistributedTestError):
        run_distributed(_leave_processes_then_fail, 2, str(tmp_path), timeout=30)
    pids = [int(p) for f in tmp_path.iterdir() for p in f.read_text().split()]
    assert len(pids) == 4  # two ranks and the `sleep` each of them started
    assert _no_rank_children()
    assert _wait_gone(pids) == []


_KILLED_PARENT_SCRIPT = """
import os, subprocess, sys, time
sys.path.insert(0, {tests_dir!r})
import torch.distributed as dist
from harness import run_distributed

def record_pids_and_hang(pid_dir):
    sleeper = subprocess.Popen(["sleep", "100"])
    with open(os.path.join(pid_dir, f"rank{{dist.get_rank()}}"), "w") as f:
        f.write(f"{{os.getpid()}} {{sleeper.pid}}")
    time.sleep(1000)

if __name__ == "__main__":
    run_distributed(record_pids_and_hang, 2, {pid_dir!r}, timeout=300)
"""


def test_ranks_die_with_a_killed_test_process(tmp_path):
    """When the test process is SIGKILLed (no `finally` runs), its ranks and their children go too."""
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    script = tmp_path / "killed_parent.py"
    tests_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script.write_text(_KILLED_PARENT_SCRIPT.format(tests_dir=tests_dir, pid_dir=str(pid_dir)))
    # TMPDIR: the killed parent cannot remove its rendezvous directory; keep it in tmp_path.
    parent = subprocess.Popen([sys.executable, str(script)], env={**os.environ, "TMPDIR": str(tmp_path)})
    try:
        deadline = time.monotonic() + 30
        while len(list(pid_dir.iterdir())) < 2 and parent.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.1)  # let the second file be written out
        pids = [int(p) for f in pid_dir.iterdir() for p in f.read_text().split()]
        assert len(pids) == 4, "the ranks did not start"
    finally:
        parent.kill()
        parent.wait()
    assert _wait_gone(pids, within=10) == []


def test_requires_gpus_reason():
    found = torch.cuda.device_count() if torch.cuda.is_available() else 0
    mark = requires_gpus(found + 1).mark
    assert mark.args == (True,)
    assert mark.kwargs["reason"] == f"needs {found + 1} CUDA GPUs, found {found}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without GPUs")
def test_nccl_without_gpus_is_refused():
    with pytest.raises(RuntimeError, match="requires_gpus"):
        run_distributed(_pid, 2, backend="nccl")


@pytest.mark.gpu
@requires_gpus(2)
def test_nccl_all_reduce():
    assert run_distributed(_nccl_all_reduce, 2, backend="nccl") == [2.0, 2.0]


# ---------------------------------------------------------------- run_subprocess_job


def test_subprocess_job_returns_output():
    done = run_subprocess_job([sys.executable, "-c", "print('hello from the job')"], timeout=30)
    assert done.returncode == 0
    assert done.stdout == "hello from the job\n"


def test_subprocess_job_timeout_kills_the_whole_process_group():
    start = time.monotonic()
    with pytest.raises(DistributedTestError) as info:
        # Prints the background sleep's pid and its own, which `exec` hands to the second sleep.
        run_subprocess_job(["sh", "-c", "sleep 100 & echo pids $! $$; exec sleep 100"], timeout=2)
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert "timed out after 2.0 s" in message and "sleep 100" in message
    pids = [int(p) for p in re.search(r"pids (\d+) (\d+)", message).groups()]
    assert _wait_gone(pids) == []


def test_subprocess_job_nonzero_exit_is_reported_with_output():
    code = "import sys; print('some stdout'); print('some stderr', file=sys.stderr); sys.exit(4)"
    with pytest.raises(DistributedTestError) as info:
        run_subprocess_job([sys.executable, "-c", code], timeout=30)
    message = str(info.value)
    assert "exited with code 4" in message
    assert "some stdout" in message and "some stderr" in message


def test_find_mpiexec_prefers_the_one_beside_python():
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if os.access(beside, os.X_OK):
        assert find_mpiexec() == beside


@requires_mpiexec
def test_mpiexec_job():
    code = (
        "from mpi4py import MPI; c = MPI.COMM_WORLD; "
        "print(f'rank {c.Get_rank()} of {c.Get_size()} sum {c.allreduce(c.Get_rank() + 1)}', flush=True)"
    )
    done = run_subprocess_job([find_mpiexec(), "-n", "2", sys.executable, "-c", code], timeout=60)
    # mpiexec forwards each rank's output in chunks that may interleave mid-line.
    assert sorted(re.findall(r"rank (\d) of 2 sum 3", done.stdout)) == ["0", "1"], done.stdout
