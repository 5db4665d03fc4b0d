"""Hostfile parsing, include/exclude truth tables, --num_nodes/--num_gpus, GPU detection, world info."""


import pytest

from ds_launch import (LaunchError, decode_world_info, detect_local_gpus, encode_world_info, filter_resources,
                       parse_hostfile, parse_hostfile_text)
from ds_launch.node import resolve_node_rank


def test_hostfile_good():
    text = "# cluster\n\nworker-0 slots=4\nworker-1   slots=8   # big one\n  \nme@worker-2 slots = 2\n"
    assert parse_hostfile_text(text) == {"worker-0": 4, "worker-1": 8, "me@worker-2": 2}
    assert list(parse_hostfile_text(text)) == ["worker-0", "worker-1", "me@worker-2"]  # file order


@pytest.mark.parametrize("text, line, what", [
    ("worker-0 slots=4\nworker-0 slots=2\n", 2, "listed twice"),
    ("worker-0 slots=4\nworker-1\n", 2, "expected 'HOST slots=N'"),
    ("worker-0 slots=4\n\nworker-1 slots=four\n", 3, "positive integer"),
    ("worker-0 slots=0\n", 1, "positive integer"),
    ("worker-0 slot=4\n", 1, "expected 'HOST slots=N'"),
    ("bad;touch_x slots=2\n", 1, "not a valid host name"),
    ("-oProxyCommand=x slots=2\n", 1, "not a valid host name"),
    ("$(reboot) slots=2\n", 1, "not a valid host name"),
    ("`id` slots=2\n", 1, "not a valid host name"),
])
def test_hostfile_bad(text, line, what):
    with pytest.raises(LaunchError, match=rf"hf:{line}: .*{what}"):
        parse_hostfile_text(text, source="hf")


def test_hostfile_empty_and_missing(tmp_path):
    with pytest.raises(LaunchError, match="lists no hosts"):
        parse_hostfile_text("# nothing\n\n")
    with pytest.raises(LaunchError, match="cannot read hostfile"):
        parse_hostfile(tmp_path / "nope")


POOL = {"worker-0": [0, 1, 2, 3], "worker-1": [0, 1, 2, 3], "worker-2": [0, 1], "worker-3": [0, 1]}


@pytest.mark.parametrize("include, exclude, expected", [
    ("", "", POOL),
    ("worker-1", "", {"worker-1": [0, 1, 2, 3]}),
    ("worker-0@worker-1:0,2", "", {"worker-0": [0, 1, 2, 3], "worker-1": [0, 2]}),
    ("worker-1:2,0@worker-0:3", "", {"worker-0": [3], "worker-1": [0, 2]}),  # hostfile order, sorted slots
    ("worker-0:1,1,1", "", {"worker-0": [1]}),  # duplicates removed
    ("worker-0:1@worker-0:3", "", {"worker-0": [1, 3]}),
    ("", "worker-2:0@worker-3:0,1", {"worker-0": [0, 1, 2, 3], "worker-1": [0, 1, 2, 3], "worker-2": [1]}),
    ("", "worker-1", {"worker-0": [0, 1, 2, 3], "worker-2": [0, 1], "worker-3": [0, 1]}),
    ("", "worker-0:0,1,2,3", {"worker-1": [0, 1, 2, 3], "worker-2": [0, 1], "worker-3": [0, 1]}),
])
def test_include_exclude_truth_table(include, exclude, expected):
    got = filter_resources(POOL, include, exclude)
    assert got == expected and list(got) == list(expected)


@pytest.mark.parametrize("include, exclude, what", [
    ("worker-9", "", "not in the hostfile"),
    ("worker-2:5", "", "no slot 5 on host 'worker-2'"),
    ("", "worker-2:7", "no slot 7"),
    ("worker-0", "worker-1", "cannot be used together"),
    ("worker-0:a", "", "not a non-negative integer"),
    ("worker-0@", "", "empty node spec"),
    ("worker-0@@worker-1", "", "empty node spec"),
    ("worker-0@worker-0:1", "", "both whole and with slots"),
    ("$(touch x)", "", "not a valid host name"),
    ("-oProxyCommand=x", "", "not a valid host name"),
    ("", "worker-0@worker-1@worker-2@worker-3", "no slots left"),
])
def test_include_exclude_errors(include, exclude, what):
    with pytest.raises(LaunchError, match=what.replace("(", r"\(").replace(")", r"\)").replace("$", r"\$")):
        filter_resources(POOL, include, exclude)


def test_num_nodes_and_num_gpus():
    assert filter_resources(POOL, num_nodes=2) == {"worker-0": [0, 1, 2, 3], "worker-1": [0, 1, 2, 3]}
    assert filter_resources(POOL, num_gpus=2) == {h: [0, 1] for h in POOL}
    assert filter_resources(POOL, num_nodes=1, num_gpus=3) == {"worker-0": [0, 1, 2]}
    with pytest.raises(LaunchError, match="more nodes than the 4"):
        filter_resources(POOL, num_nodes=5)
    with pytest.raises(LaunchError, match="more than the 2 slots of host 'worker-2'"):
        filter_resources(POOL, num_gpus=3)
    with pytest.raises(LaunchError, match="cannot be combined"):
        filter_resources(POOL, include="worker-0", num_gpus=1)


@pytest.mark.parametrize("cvd, expected", [
    ("", []), ("-1", []), ("0,1", ["0", "1"]), ("4, 5", ["4", "5"]), ("2,-1,3", ["2"]),
    ("GPU-aaaa,GPU-bbbb", ["GPU-aaaa", "GPU-bbbb"]),
])
def test_detect_gpus_from_cuda_visible_devices(cvd, expected):
    assert detect_local_gpus({"CUDA_VISIBLE_DEVICES": cvd}) == expected


def test_detect_gpus_from_nvidia_smi(tmp_path, monkeypatch):
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: H200 (UUID: GPU-a)'\necho '  MIG 1g.18gb Device 0: (UUID: MIG-x)'\n"
                   "echo 'GPU 1: H200 (UUID: GPU-b)'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert detect_local_gpus({}) == ["0", "1"]
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert detect_local_gpus({}) == []


def test_world_info_roundtrip_and_errors():
    res = {"a": [0, 1], "b": [3]}
    assert decode_world_info(encode_world_info(res)) == res
    assert set(encode_world_info(res)) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=")
    with pytest.raises(LaunchError, match="not base64 JSON"):
        decode_world_info("not base64!")
    with pytest.raises(LaunchError, match="not a valid host name"):
        decode_world_info(encode_world_info({"a;b": [0]}))
    with pytest.raises(LaunchError, match="list of slot numbers"):
        decode_world_info(encode_world_info({"a": []}))


def test_node_rank_auto_by_slurm_name():
    res = {"n1": [0], "n2": [0], "me@n3": [0]}
    assert resolve_node_rank("2", res) == 2
    assert resolve_node_rank("auto", res, {"SLURMD_NODENAME": "n2"}) == 1
    assert resolve_node_rank("auto", res, {"SLURMD_NODENAME": "n3"}) == 2
    with pytest.raises(LaunchError, match="is none of the hosts"):
        resolve_node_rank("auto", {"nowhere-1": [0]}, {"SLURMD_NODENAME": "elsewhere"})
    with pytest.raises(LaunchError, match="integer or 'auto'"):
        resolve_node_rank("x", res)
