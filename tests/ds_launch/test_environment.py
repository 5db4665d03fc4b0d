"""Worker environment, env files, and what is exported to remote nodes."""

import os

import pytest

from ds_launch import LaunchError, collect_exports, parse_env_file_text, read_env_files, worker_env


def test_worker_env_torchrun_and_deepspeed_keys():
    env = worker_env({"PATH": "/bin"}, rank=5, local_rank=1, world_size=8, local_world_size=4, node_rank=1,
                     num_nodes=2, master_addr="h0", master_port=1234, restart_count=2, max_restarts=3, run_id="x",
                     cuda_visible_devices="4,5,6,7")
    expected = {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1",
                "GROUP_WORLD_SIZE": "2", "ROLE_RANK": "5", "ROLE_WORLD_SIZE": "8", "ROLE_NAME": "default",
                "MASTER_ADDR": "h0", "MASTER_PORT": "1234", "TORCHELASTIC_RESTART_COUNT": "2",
                "TORCHELASTIC_MAX_RESTARTS": "3", "TORCHELASTIC_RUN_ID": "x", "LOCAL_SIZE": "4", "CROSS_RANK": "1",
                "CROSS_SIZE": "2", "CUDA_VISIBLE_DEVICES": "4,5,6,7", "OMP_NUM_THREADS": "1", "PATH": "/bin"}
    assert {k: env[k] for k in expected} == expected
    assert "PYTHON_EXEC" in env and env["TORCHELASTIC_USE_AGENT_STORE"] == "False"
    # the caller's OMP_NUM_THREADS is kept; a single worker gets none forced
    assert worker_env({"OMP_NUM_THREADS": "8"}, rank=0, local_rank=0, world_size=2, local_world_size=2, node_rank=0,
                      num_nodes=1, master_addr="a", master_port=1)["OMP_NUM_THREADS"] == "8"
    assert "OMP_NUM_THREADS" not in worker_env({}, rank=0, local_rank=0, world_size=1, local_world_size=1,
                                               node_rank=0, num_nodes=1, master_addr="a", master_port=1)


def test_env_file_parsing():
    text = ("# comment\n\nNCCL_IB_DISABLE=1\nexport FOO=bar=baz\nQUOTED='a b'\nDQ=\"$(not expanded)\"\n"
            "EMPTY=\n  SPACED = x \n")
    assert parse_env_file_text(text, "f") == {"NCCL_IB_DISABLE": "1", "FOO": "bar=baz", "QUOTED": "a b",
                                              "DQ": "$(not expanded)", "EMPTY": "", "SPACED": " x"}


@pytest.mark.parametrize("line, what", [
    ("NOEQUALS", "expected KEY=VALUE"),
    ("1BAD=x", "not a valid variable name"),
    ("A;B=x", "not a valid variable name"),
    ("$(id)=x", "not a valid variable name"),
    ("A B=x", "not a valid variable name"),
])
def test_env_file_errors(line, what):
    with pytest.raises(LaunchError, match=rf"f:2: .*{what}"):
        parse_env_file_text("OK=1\n" + line + "\n", "f")


def test_env_files_home_then_cwd_and_override(tmp_path):
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    (home / ".deepspeed_env").write_text("A=home\nB=home\n")
    (cwd / ".deepspeed_env").write_text("B=cwd\n")
    values, used = read_env_files({}, str(cwd), str(home))
    assert values == {"A": "home", "B": "cwd"} and len(used) == 2
    other = tmp_path / "other.env"
    other.write_text("C=1\n")
    assert read_env_files({"DS_ENV_FILE": str(other)}, str(cwd), str(home))[0] == {"C": "1"}
    with pytest.raises(LaunchError, match="DS_ENV_FILE"):
        read_env_files({"DS_ENV_FILE": str(tmp_path / "missing")}, str(cwd), str(home))


def test_collect_exports():
    environ = {"NCCL_DEBUG": "INFO", "PYTHONPATH": "/lib", "HOME": "/root", "CUDA_VISIBLE_DEVICES": "0",
               "TORCHELASTIC_RUN_ID": "old", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "UCX_TLS": "rc",
               "OMP_NUM_THREADS": "4", "SECRET": "x"}
    ex = collect_exports(environ, "/work", {"MY_VAR": "1"})
    assert ex == {"NCCL_DEBUG": "INFO", "PYTHONPATH": f"/work{os.pathsep}/lib", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
                  "UCX_TLS": "rc", "OMP_NUM_THREADS": "4", "MY_VAR": "1"}
