"""DeepSpeed's communication logger on 2 gloo ranks: per collective and message size, the counts and byte sizes
equal the collectives' real sizes (ds_train.comm, torch.distributed called directly, the engine's own gradient
all-reduce, ds-comm's compressed all-gather with its wire bytes from CommStats), DeepSpeed's bandwidth formulas,
prof_ops / prof=, log_summary, and the originals put back when the logger is switched off."""

import logging

import pytest
import torch
import torch.distributed as dist
from harness import run_distributed

import ds_train
from ds_train import comm
from ds_train.monitor.comms import calc_bw_log, comms_logger, convert_size

WORLD = 2
F32 = 4


def _sizes(summary, record):
    return {size: row["count"] for size, row in summary.get(record, {}).items()}


def _direct():
    original = dist.all_reduce
    comm.configure(enabled=True, prof_all=True)
    comms_logger.reset()
    try:
        for _ in range(3):
            comm.all_reduce(torch.ones(1000))
        lines = []
        handler = logging.Handler()
        handler.emit = lambda r: lines.append(r.getMessage())
        ds_train.utils.logger.addHandler(handler)
        comm.configure(verbose=True)  # every logged op printed as it completes (DeepSpeed's line)
        comm.all_reduce(torch.ones(10, dtype=torch.float64), log_name="my_all_reduce")
        comm.configure(verbose=False)
        ds_train.utils.logger.removeHandler(handler)
        out = torch.empty(2 * 250)
        comm.all_gather_into_tensor(out, torch.full((250,), float(dist.get_rank())))
        shard = torch.empty(100)
        comm.reduce_scatter_tensor(shard, torch.ones(200))
        comm.broadcast(torch.zeros(10, dtype=torch.int64), src=0)
        work = comm.all_reduce(torch.ones(6), async_op=True)
        work.wait()
        comm.all_reduce_coalesced([torch.ones(3), torch.ones(5)])
        # torch.distributed called directly (as ds-zero and ds-comm do) is timed too
        dist.all_reduce(torch.ones(7, dtype=torch.float64))
        patched = dist.all_reduce is not original
        summary = comm.log_summary(return_dict=True)
        table = comms_logger.format_summary()
        # prof_all off: only the ops named in prof_ops, or called with prof=True
        comms_logger.reset()
        comm.configure(prof_all=False, prof_ops=["all_gather_into_tensor"])
        comm.all_reduce(torch.ones(4))
        comm.all_reduce(torch.ones(5), prof=True)
        comm.all_gather_into_tensor(torch.empty(4), torch.ones(2))
        selective = comms_logger.summary()
    finally:
        comm.configure(enabled=False, prof_all=True, prof_ops=[])
    return {"summary": summary, "selective": selective, "patched": patched, "restored": dist.all_reduce is original,
            "table": table, "verbose": lines}


def test_byte_counts_equal_the_collectives_sizes():
    r0, r1 = run_distributed(_direct, WORLD, timeout=120)
    for got in (r0, r1):
        s = got["summary"]
        # all_reduce_coalesced records under its log_name, "all_reduce" (DeepSpeed's default): both tensors as one
        assert _sizes(s, "all_reduce") == {1000 * F32: 3, 6 * F32: 1, 7 * 8: 1, 8 * F32: 1}
        assert _sizes(s, "my_all_reduce") == {10 * 8: 1}
        assert _sizes(s, "all_gather_into_tensor") == {250 * F32: 1}  # one rank's shard
        assert _sizes(s, "reduce_scatter_tensor") == {100 * F32: 1}
        assert _sizes(s, "broadcast") == {10 * 8: 1}
        assert set(s) == {"all_reduce", "my_all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor",
                          "broadcast"}  # the summary's own barriers are not counted
        row = s["all_reduce"][4000]
        assert row["total_latency"] > 0 and row["avg_latency"] > 0
        assert got["selective"].keys() == {"all_reduce", "all_gather_into_tensor"}
        assert _sizes(got["selective"], "all_reduce") == {5 * F32: 1}  # only the prof=True call
        assert got["patched"] and got["restored"]
        assert "Comm. Op" in got["table"] and "3.91 KB" in got["table"]
        [line] = got["verbose"]
        assert line.startswith("rank=") and "| comm op: my_all_reduce | time (ms): " in line
        assert "| msg size: 80.0 B | algbw (Gbps): " in line and "| busbw (Gbps): " in line


def test_bandwidth_formulas_are_deepspeeds():
    # 1 MB in 1 ms on 4 ranks: bytes/ms * 8 / 1e6 = Gbps
    size, t, n = 10 ** 6, 1.0, 4
    assert calc_bw_log("all_reduce", size, t, n) == pytest.approx((16.0, 8 * 2 * 3 / 4))
    assert calc_bw_log("all_gather_into_tensor", size, t, n) == pytest.approx((32.0, 32.0 * 3 / 4))
    assert calc_bw_log("reduce_scatter_tensor", size, t, n) == pytest.approx((32.0, 24.0))
    assert calc_bw_log("all_to_all_single", size, t, n) == pytest.approx((8.0, 6.0))
    assert calc_bw_log("broadcast", size, t, n) == pytest.approx((8.0, 8.0))
    assert convert_size(0) == "0B" and convert_size(1536) == "1.5 KB" and convert_size(4000) == "3.91 KB"


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(16, 32), torch.nn.Linear(32, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _engine_collectives():
    records = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())
    log = logging.getLogger("ds_train")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    ds_train.utils.logger.addHandler(handler)  # DeepSpeed's logger (stdout): the lines the config asked for
    torch.manual_seed(0)
    model = _Net()
    config = {"train_micro_batch_size_per_gpu": 2, "steps_per_print": 2,
              "zero_optimization": {"stage": 0, "reduce_bucket_size": 10 ** 6},
              "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
              "comms_logger": {"enabled": True}}
    try:
        engine, *_ = ds_train.initialize(model=model, config=config)
        comms_logger.reset()
        for _ in range(2):
            loss = engine(torch.randn(2, 16)).sum()
            engine.backward(loss)
            engine.step()
        summary = comms_logger.summary()
        buckets = [b.padded_numel * F32 for b in engine.buckets]
        enabled = engine.comms_logger is comms_logger and engine.comms_logger_enabled()
        # ds-comm's compressed all-gather: one record, its size the bytes this rank really sent (CommStats)
        import ds_comm

        comms_logger.reset()
        stats = ds_comm.CommStats()
        out = torch.empty(2 * 4096)
        ds_comm.quantized_all_gather(out, torch.randn(4096), stats=stats)
        compressed = comms_logger.summary()
    finally:
        comm.configure(enabled=False)
        log.removeHandler(handler)
        ds_train.utils.logger.removeHandler(handler)
    params = sum(p.numel() for p in model.parameters())
    return {"summary": summary, "params": params, "buckets": buckets, "enabled": enabled, "compressed": compressed,
            "sent": stats.bytes_sent, "uncompressed": stats.uncompressed_bytes, "log": records}


def test_the_engines_gradient_all_reduce_and_ds_comms_wire_bytes_are_logged():
    r0, r1 = run_distributed(_engine_collectives, WORLD, timeout=120)
    for got in (r0, r1):
        assert got["enabled"]
        # stage 0, one bucket: one all-reduce of every gradient (padded bucket) per step, fp32, and the step's
        # one-element all-reduce (the agreed inf/NaN check, ds-optim's loss scaler)
        [bucket] = got["buckets"]
        assert got["params"] * F32 <= bucket < got["params"] * F32 + 1024
        assert _sizes(got["summary"], "all_reduce") == {bucket: 2, F32: 2}, got["summary"]
        [(size, row)] = got["compressed"]["quantized_all_gather"].items()
        assert size == got["sent"] > 0 and row["count"] == 1
        assert row["uncompressed_bytes"] == got["uncompressed"] and row["wire_bytes"] == got["sent"]
        assert got["uncompressed"] > 3 * got["sent"]  # int8 + scales vs fp32
        assert set(got["compressed"]) == {"quantized_all_gather"}  # its inner all-gather is not counted again
    summaries = [m for m in r0["log"] if "communication summary after step 2" in m]
    assert len(summaries) == 1 and "all_reduce" in summaries[0]
    assert not [m for m in r1["log"] if "communication summary" in m]
