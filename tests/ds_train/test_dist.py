"""ds_train.init_distributed's timeout (DeepSpeed's default_pg_timeout: 30 minutes, DEEPSPEED_TIMEOUT minutes)
reaches init_process_group and is what later groups should get; torch.distributed.nn.functional is imported
before the default group exists, so its default arguments never hold that group. Each case runs in a fresh
interpreter (the module-level default is read at import, and the import order is the point)."""

import os
import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent("""
    import datetime, json, sys
    import torch.distributed as dist
    seen = {}
    real = dist.init_process_group
    def spy(*args, **kwargs):
        seen["timeout_s"] = kwargs.get("timeout").total_seconds()
        return real(*args, **kwargs)
    dist.init_process_group = spy
    import ds_train.dist as d
    arg = json.loads(sys.argv[1])
    kwargs = {} if arg is None else {"timeout": datetime.timedelta(minutes=arg)}
    d.init_distributed(**kwargs)
    import torch.distributed.nn.functional as f  # after the group exists, as torch.optim's state_dict does
    held = [v for fn in (f.broadcast, f.all_reduce, f.all_gather) for v in (fn.__defaults__ or ())
            if isinstance(v, dist.ProcessGroup)]
    print(json.dumps({"default_min": d.default_pg_timeout.total_seconds() / 60, "init_s": seen["timeout_s"],
                      "groups_s": d.process_group_timeout().total_seconds(), "held": len(held)}))
    dist.destroy_process_group()
""")


def _probe(timeout_min=None, **env):
    import json

    full = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                                                              "DEEPSPEED_TIMEOUT", "LOCAL_RANK")}
    full.update(env)
    res = subprocess.run([sys.executable, "-c", PROBE, json.dumps(timeout_min)], env=full, capture_output=True,
                         text=True, timeout=120)
    return res, (json.loads(res.stdout.strip().splitlines()[-1]) if res.returncode == 0 else None)


@pytest.mark.timeout(150)
def test_default_timeout_is_deepspeeds_and_reaches_the_group():
    res, out = _probe()
    assert res.returncode == 0, res.stderr
    assert out["default_min"] == 30 and out["init_s"] == 30 * 60 and out["groups_s"] == 30 * 60
    assert out["held"] == 0, "torch.distributed.nn.functional's defaults hold the default group"


@pytest.mark.timeout(150)
def test_deepspeed_timeout_env_and_the_argument():
    res, out = _probe(DEEPSPEED_TIMEOUT="7", RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="0")
    assert res.returncode == 0, res.stderr
    assert out["default_min"] == 7 and out["init_s"] == 7 * 60 and out["groups_s"] == 7 * 60
    res, out = _probe(3, DEEPSPEED_TIMEOUT="7")
    assert res.returncode == 0, res.stderr
    assert out["init_s"] == 3 * 60 and out["groups_s"] == 3 * 60


@pytest.mark.timeout(150)
def test_bad_deepspeed_timeout_is_named():
    res, _ = _probe(DEEPSPEED_TIMEOUT="1.5h")
    assert res.returncode != 0 and "DEEPSPEED_TIMEOUT='1.5h' must be a whole number of minutes" in res.stderr
