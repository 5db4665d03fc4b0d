"""``log_summary(show_straggler=True)`` on 2 gloo ranks: rank 1 sleeps before one all-reduce, so rank 0's
latency for it is mostly waiting. DeepSpeed's breakdown (each call's latency all-reduced with MIN across ranks)
puts that wait in rank 0's straggler column and names rank 1 as the rank the others waited for; records only one
rank made (send / recv) get the totals and no per-call breakdown, and the breakdown's own collectives are not
logged."""

import contextlib
import io
import time

import torch
import torch.distributed as dist
from harness import run_distributed

from ds_train import comm
from ds_train.monitor.comms import comms_logger

SLEEP_S = 0.6
F32 = 4


def _late_rank():
    rank = dist.get_rank()
    comm.configure(enabled=True, prof_all=True)
    try:
        dist.barrier()  # the ranks start together
        comms_logger.reset()
        for _ in range(3):
            comm.all_reduce(torch.ones(100))
        if rank == 1:
            time.sleep(SLEEP_S)  # the straggler: rank 0 waits in the next all-reduce
        comm.all_reduce(torch.ones(1000))
        if rank == 0:  # point-to-point: a record on one side only
            comm.send(torch.ones(5), dst=1)
        else:
            comm.recv(torch.empty(5), src=0)
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            summary = comm.log_summary(show_straggler=True, return_dict=True)
        records = set(comms_logger.summary())
    finally:
        comm.configure(enabled=False)
    return summary, printed.getvalue(), records


def test_the_straggler_column_shows_the_rank_that_came_late():
    (s0, out0, rec0), (s1, out1, rec1) = run_distributed(_late_rank, 2, timeout=120)
    late0, late1 = s0["all_reduce"][1000 * F32], s1["all_reduce"][1000 * F32]
    ms = SLEEP_S * 1e3
    # rank 0 waited ~SLEEP_S: its straggler time; the communication itself (the fastest rank's time) is short
    assert late0["straggler_total"] > 0.7 * ms and late0["comm_latency_total"] < 0.5 * ms
    assert late0["total_latency"] > 0.7 * ms
    # rank 1 arrived last: its latency is the minimum, so it waited for nobody
    assert late1["straggler_total"] == 0.0 and late1["comm_latency_total"] == late0["comm_latency_total"]
    for row in (late0, late1):
        assert row["straggler_rank"] == 1
        assert row["max_total_latency"] == late0["total_latency"]
        assert row["min_total_latency"] == late1["total_latency"]
    # the calls that both made without anyone sleeping: a breakdown of 3 calls, the minima the same on both
    even0, even1 = s0["all_reduce"][100 * F32], s1["all_reduce"][100 * F32]
    assert even0["count"] == even1["count"] == 3
    assert even0["comm_latency_total"] == even1["comm_latency_total"] <= min(even0["total_latency"],
                                                                            even1["total_latency"])
    assert even0["straggler_total"] >= 0 and even1["straggler_total"] >= 0
    # send on rank 0, recv on rank 1: totals only
    send, recv = s0["send"][5 * F32], s1["recv"][5 * F32]
    assert "recv" not in s0 and "send" not in s1
    for row, rank in ((send, 0), (recv, 1)):
        assert row["straggler_total"] is None and row["comm_latency_total"] is None
        assert row["straggler_rank"] == rank and row["min_total_latency"] == row["max_total_latency"]
    # the breakdown's all_gather_object / all_reduce / all_gather are not the run's communication
    assert rec0 == {"all_reduce", "send"} and rec1 == {"all_reduce", "recv"}
    # rank 0 prints DeepSpeed's table and the breakdown; rank 1 prints nothing
    assert "Breakdown with straggler effect" in out0 and "Total straggler(ms)" in out0
    line = next(x for x in out0.splitlines() if x.strip().startswith("3.91 KB") and len(x.split()) > 8)
    assert line.split()[-1] == "1"  # the straggler rank column
    assert out1 == ""
