"""Shell syntax in host names, include/exclude, env values, script arguments and paths: refused or quoted.

Every payload would create a marker file if any shell ran it; the tests assert that no marker exists. The
fake ssh hands the remote command to a real ``sh -c``, as sshd does, so quoting is tested for real.
"""

import json
import os
import sys

import pytest

from launch_helpers import FAKE_SSH, base_env, run_launcher

ECHO = """import json, os, sys
out = os.environ['DS_LAUNCH_TEST_OUT']
with open(os.path.join(out, 'echo' + os.environ['RANK'] + '.json'), 'w') as f:
    json.dump({'argv': sys.argv[1:], 'cwd': os.getcwd(),
               'env': {k: v for k, v in os.environ.items() if k.startswith(('INJ', 'PYTHON_INJ'))}}, f)
"""


@pytest.fixture
def setup(tmp_path, out):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "ssh").write_text(f"#!/bin/sh\nexec {sys.executable} {FAKE_SSH} \"$@\"\n")
    (bindir / "ssh").chmod(0o755)
    markers = tmp_path / "markers"
    markers.mkdir()
    # a working directory whose very name is a payload (no '/' possible: a relative marker, searched for below)
    work = tmp_path / "work $(touch MARKER_CWD) `touch MARKER_CWD2`; touch MARKER_CWD3"
    work.mkdir()
    (work / "echo.py").write_text(ECHO)
    (tmp_path / "home").mkdir()
    env = base_env(out, PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}", HOME=str(tmp_path / "home"),
                   FAKE_SSH_LOG=str(tmp_path / "ssh.log"))
    return env, work, markers


def _payloads(markers, tag):
    return [f"$(touch {markers}/{tag}1)", f"`touch {markers}/{tag}2`", f"x; touch {markers}/{tag}3",
            f"x\ntouch {markers}/{tag}4", f"' ; touch {markers}/{tag}5 ; '", f"-oProxyCommand=touch {markers}/{tag}6",
            f"x && touch {markers}/{tag}7 | cat > {markers}/{tag}8"]


@pytest.mark.timeout(120)
def test_payloads_reach_workers_literally_over_ssh(out, setup):
    env, work, markers = setup
    payloads = _payloads(markers, "p")
    # environment: a propagated prefix variable and .deepspeed_env lines (no newline possible there)
    env["PYTHON_INJECT"] = payloads[3]
    (work / ".deepspeed_env").write_text("".join(f"INJ{i}={p}\n" for i, p in enumerate(payloads) if "\n" not in p))
    (work / "hostfile").write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    res = run_launcher(["-H", "hostfile", "--no_local_rank", "echo.py", *payloads], env, cwd=work)
    assert res.returncode == 0, res.stderr
    for rank in range(2):
        seen = json.loads((out / f"echo{rank}.json").read_text())
        assert seen["argv"] == payloads
        assert seen["cwd"] == str(work)
        assert seen["env"]["PYTHON_INJECT"] == payloads[3]
        # the env file unquotes a value wholly in matching quotes (payload 5), and expands nothing
        unquoted = lambda p: p[1:-1] if p[0] == p[-1] == "'" else p  # noqa: E731
        assert [seen["env"][f"INJ{i}"] for i in range(len(payloads)) if i != 3] == \
            [unquoted(p) for p in payloads if "\n" not in p]
    assert sorted(os.listdir(markers)) == [], "an injected command ran"
    assert not [p for p in work.parent.rglob("MARKER_CWD*")] and not os.path.exists("MARKER_CWD")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("where", ["hostfile", "include", "exclude", "master_addr"])
def test_shell_syntax_in_hosts_refused(out, setup, where):
    env, work, markers = setup
    bad = f"localhost;touch${{IFS}}{markers}/h"  # no space: the line is well-formed, the name is not
    hostfile = work / "hostfile"
    if where == "hostfile":
        hostfile.write_text(f"localhost slots=1\n{bad} slots=1\n")
        extra = []
    else:
        hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
        flag = {"include": "-i", "exclude": "-e", "master_addr": "--master_addr"}[where]
        extra = [flag, f"localhost@$(touch {markers}/h)" if where != "master_addr" else f"$(touch {markers}/h)"]
    res = run_launcher(["-H", str(hostfile), *extra, "echo.py"], env, cwd=work)
    assert res.returncode == 2
    assert "not a valid host name" in res.stderr
    assert not list(out.iterdir()) and not os.listdir(markers)


@pytest.mark.timeout(60)
def test_leading_dash_host_refused(out, setup):
    env, work, markers = setup
    (work / "hostfile").write_text(f"-oProxyCommand=touch_{markers.name} slots=1\nlocalhost slots=1\n")
    res = run_launcher(["-H", "hostfile", "echo.py"], env, cwd=work)
    assert res.returncode == 2 and "hostfile:1" in res.stderr and "not starting with '-'" in res.stderr


@pytest.mark.timeout(60)
def test_bad_env_file_name_refused(out, setup):
    env, work, markers = setup
    (work / ".deepspeed_env").write_text(f"GOOD=1\n$(touch {markers}/e)=x\n")
    (work / "hostfile").write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    res = run_launcher(["-H", "hostfile", "echo.py"], env, cwd=work)
    assert res.returncode == 2 and ".deepspeed_env:2" in res.stderr and "not a valid variable name" in res.stderr
    assert not os.listdir(markers)
