"""--bind_cores_to_rank / --bind_core_list: DeepSpeed's split of the cores over the local workers, the worker
really pinned (its sched_getaffinity read back), OMP_NUM_THREADS set to the cores per worker, numactl used when
installed (a stand-in numactl on PATH records its arguments), and the set-ups that cannot be bound refused."""

import json
import os
import stat
import sys

import pytest
from launch_helpers import HERE, base_env, run_launcher

from ds_launch.binding import (cores_for_rank, format_core_list, numa_node_of, numactl_argv, parse_core_list,
                               plan_binding)
from ds_launch.errors import LaunchError
from ds_launch.runners import LaunchPlan, agent_argv

WORKER = str(HERE / "affinity_worker.py")
CORES = sorted(os.sched_getaffinity(0))


def _records(out, n):
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(n)]


def test_core_lists_parse_and_format():
    assert parse_core_list("0-3,8,10-12") == [0, 1, 2, 3, 8, 10, 11, 12]
    assert format_core_list([0, 1, 2, 3, 8, 10, 11, 12]) == "0-3,8,10-12"
    assert format_core_list([5]) == "5"
    for bad, why in [("0-", "not a core number"), ("3-1", "backwards"), ("1,1", "more than once"), ("a", "not a")]:
        with pytest.raises(LaunchError, match=why):
            parse_core_list(bad)


def test_deepspeeds_split_leaves_the_remainder_unused():
    cores = [0, 1, 2, 3, 4]
    assert [cores_for_rank(cores, 2, r, "--x") for r in range(2)] == [[0, 1], [2, 3]]
    with pytest.raises(LaunchError, match=r"--bind_core_list: 1 core\(s\) \(7\) for 2 local workers"):
        cores_for_rank([7], 2, 0, "--bind_core_list")


def test_numactl_binds_memory_only_when_the_cores_share_a_numa_node(tmp_path):
    for node, cpus in ((0, "0-3"), (1, "4-7"), (2, "")):  # node 2: memory only (HBM)
        (tmp_path / f"node{node}").mkdir()
        (tmp_path / f"node{node}" / "cpulist").write_text(cpus + "\n")
    assert numa_node_of([4, 5], str(tmp_path)) == 1
    assert numa_node_of([3, 4], str(tmp_path)) is None
    assert numactl_argv([4, 5], 1) == ["numactl", "-m", "1", "-C", "4-5"]
    assert numactl_argv([3, 4], None) == ["numactl", "-C", "3-4"]


def test_kmp_affinity_is_refused_as_deepspeed_does():
    with pytest.raises(LaunchError, match="KMP_AFFINITY"):
        plan_binding(1, None, {"KMP_AFFINITY": "compact"})
    bindings = plan_binding(1, str(CORES[0]), {}, use_numactl=False)
    assert bindings[0].affinity == (CORES[0],) and bindings[0].prefix == [] and bindings[0].omp_num_threads == "1"


@pytest.mark.skipif(len(CORES) < 2, reason="needs 2 cores")
@pytest.mark.timeout(60)
def test_two_workers_are_pinned_to_one_core_each(out):
    env = base_env(out, PATH=os.path.dirname(sys.executable))  # no numactl: sched_setaffinity in the child
    res = run_launcher(["--nproc_per_node", "2", "--bind_cores_to_rank", "--bind_core_list",
                        f"{CORES[0]},{CORES[1]}", WORKER], env)
    assert res.returncode == 0, res.stderr
    recs = _records(out, 2)
    assert [r["affinity"] for r in recs] == [[CORES[0]], [CORES[1]]]
    assert [r["omp"] for r in recs] == ["1", "1"]


@pytest.mark.skipif(len(CORES) < 2, reason="needs 2 cores")
@pytest.mark.timeout(60)
def test_the_nodes_cores_are_split_without_a_list(out):
    from ds_launch.binding import node_cores

    cores = node_cores()
    res = run_launcher(["--nproc_per_node", "2", "--bind_cores_to_rank", WORKER],
                       base_env(out, PATH=os.path.dirname(sys.executable)))
    assert res.returncode == 0, res.stderr
    per = len(cores) // 2
    recs = _records(out, 2)
    assert [r["affinity"] for r in recs] == [sorted(cores[:per]), sorted(cores[per:2 * per])]
    assert {r["omp"] for r in recs} == {str(per)}


FAKE_NUMACTL = """#!{python}
# a stand-in numactl: applies -C like the real one and records its arguments for the test
import os, sys
args = sys.argv[1:]
cut = args.index("-C") + 2
cores = []
for item in args[args.index("-C") + 1].split(","):
    lo, _, hi = item.partition("-")
    cores += range(int(lo), int(hi or lo) + 1)
os.sched_setaffinity(0, cores)
os.environ["FAKE_NUMACTL_ARGS"] = " ".join(args[:cut])
os.execvp(args[cut], args[cut:])
"""


@pytest.mark.timeout(60)
def test_numactl_runs_the_worker_when_installed(out, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "numactl"
    fake.write_text(FAKE_NUMACTL.format(python=sys.executable))
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = base_env(out, PATH=f"{bin_dir}:{os.path.dirname(sys.executable)}")
    res = run_launcher(["--nproc_per_node", "1", "--bind_cores_to_rank", "--bind_core_list", str(CORES[-1]),
                        WORKER], env)
    assert res.returncode == 0, res.stderr
    (rec,) = _records(out, 1)
    assert rec["affinity"] == [CORES[-1]] and rec["omp"] == "1"
    assert rec["numactl"].endswith(f"-C {CORES[-1]}"), rec["numactl"]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("args, message", [
    (["--nproc_per_node", "2", "--bind_cores_to_rank", "--bind_core_list", str(CORES[0])],
     f"--bind_core_list: 1 core(s) ({CORES[0]}) for 2 local workers; every worker needs at least one core"),
    (["--bind_cores_to_rank", "--bind_core_list", "9999"], "--bind_core_list '9999': core(s) 9999 are not available"),
    (["--bind_cores_to_rank", "--bind_core_list", "x"], "'x' is not a core number"),
    (["--bind_cores_to_rank", "--launcher", "openmpi", "--force_multi"],
     "--bind_cores_to_rank with --launcher openmpi is not supported yet: mpirun starts the workers"),
])
def test_bindings_that_cannot_be_served_exit_2(out, args, message):
    res = run_launcher([*args, WORKER], base_env(out))
    assert res.returncode == 2, res.stderr
    assert message in res.stderr, res.stderr
    assert not list(out.iterdir())


@pytest.mark.timeout(30)
def test_dry_run_shows_the_cores_and_threads(out):
    res = run_launcher(["--dry_run", "--nproc_per_node", "1", "--bind_cores_to_rank", "--bind_core_list",
                        str(CORES[0]), WORKER], base_env(out, PATH=os.path.dirname(sys.executable)))
    assert res.returncode == 0, res.stderr
    assert "OMP_NUM_THREADS=1" in res.stdout and f"(cores)={CORES[0]}" in res.stdout


def test_core_list_alone_warns_and_the_agents_get_the_flags(out):
    res = run_launcher(["--dry_run", "--nproc_per_node", "1", "--bind_core_list", "0", WORKER], base_env(out))
    assert res.returncode == 0 and "--bind_core_list has no effect without --bind_cores_to_rank" in res.stderr
    plan = LaunchPlan(resources={"a": [0], "b": [0]}, master_addr="a", master_port=1, user_command=["x.py"],
                      bind_cores_to_rank=True, bind_core_list="0-3")
    argv = agent_argv(plan, ["--node_rank=0"], 0)
    assert "--bind_cores_to_rank" in argv and "--bind_core_list=0-3" in argv
    assert argv.index("--bind_core_list=0-3") < argv.index("--")
