"""The local runner: 2 and 4 CPU workers doing a real gloo all-reduce from the launcher's environment."""

import json

import pytest

from launch_helpers import ALLREDUCE, base_env, run_launcher


@pytest.mark.timeout(120)
@pytest.mark.parametrize("nproc", [2, 4])
def test_local_gloo_allreduce(out, nproc):
    res = run_launcher(["--nproc_per_node", str(nproc), ALLREDUCE, "--lr", "0.1"], base_env(out))
    assert res.returncode == 0, res.stderr
    seen = [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]
    for r, s in enumerate(seen):
        assert s["sum"] == nproc * (nproc + 1) / 2
        assert s["argv"] == [f"--local_rank={r}", "--lr", "0.1"]  # DeepSpeed's order: --local_rank first
        env = s["env"]
        assert env["RANK"] == env["LOCAL_RANK"] == env["ROLE_RANK"] == str(r)
        assert env["WORLD_SIZE"] == env["LOCAL_WORLD_SIZE"] == env["LOCAL_SIZE"] == env["ROLE_WORLD_SIZE"] == str(nproc)
        assert env["GROUP_RANK"] == env["CROSS_RANK"] == "0" and env["CROSS_SIZE"] == env["GROUP_WORLD_SIZE"] == "1"
        assert env["MASTER_ADDR"] == "127.0.0.1" and env["TORCHELASTIC_RESTART_COUNT"] == "0"
        assert env["CUDA_VISIBLE_DEVICES"] == ""  # CPU run: left as the caller set it, not replaced by slots
    assert len({s["env"]["MASTER_PORT"] for s in seen}) == 1
    assert len({s["pid"] for s in seen}) == nproc
    # each line of worker output carries its rank
    for r in range(nproc):
        assert f"[rank{r}]: rank {r} of {nproc}: all_reduce ok" in res.stdout


@pytest.mark.timeout(60)
def test_num_gpus_means_cpu_workers_and_no_local_rank(out):
    res = run_launcher(["--num_gpus", "2", "--no_local_rank", ALLREDUCE, "x"], base_env(out))
    assert res.returncode == 0, res.stderr
    assert json.loads((out / "rank1.json").read_text())["argv"] == ["x"]


@pytest.mark.timeout(60)
def test_module_mode(out, tmp_path):
    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "job.py").write_text("import os, sys\nopen(os.path.join(os.environ['DS_LAUNCH_TEST_OUT'], "
                                "'m' + os.environ['RANK']), 'w').write(' '.join(sys.argv[1:]))\n")
    res = run_launcher(["--nproc_per_node", "2", "-m", "mypkg.job", "a"], base_env(out), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert (out / "m0").read_text() == "--local_rank=0 a" and (out / "m1").read_text() == "--local_rank=1 a"
