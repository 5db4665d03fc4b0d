"""The DeepSpeed-style CIFAR script (tests/ds_train/scripts/cifar_deepspeed.py) launched as a user would:

- with its import lines changed, under ``ds-launch`` on 2 CPU workers (``--local_rank`` appended by the launcher,
  as DeepSpeed's launcher does, and the torchrun environment) with a config that has an ``activation_checkpointing``
  section: it trains 4 steps and logs through ``deepspeed.utils.log_dist`` on rank 0 only (its losses are checked
  against plain PyTorch in tests/ds_train/test_deepspeed_script.py);
- unchanged (``import deepspeed``), through the opt-in alias: ``ds-launch -m ds_train.alias SCRIPT ...``.
"""

import json
import os
import re
import sys

import pytest
from harness import run_subprocess_job

pytest.importorskip("ds_train", reason="ds-train is not installed in this environment")
pytest.importorskip("ds_launch", reason="the script runs under ds-launch")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "tests", "ds_train", "scripts", "cifar_deepspeed.py")
CONFIG = {"train_batch_size": 16, "gradient_accumulation_steps": 1, "steps_per_print": 1000, "gradient_clipping": 1.0,
          "zero_optimization": {"stage": 1}, "optimizer": {"type": "AdamW", "params": {"lr": 5e-3}},
          "activation_checkpointing": {"cpu_checkpointing": False}}


def _swap_imports(source: str) -> str:
    source = re.sub(r"^(\s*)import deepspeed$", r"\1import ds_train as deepspeed", source, flags=re.M)
    source = re.sub(r"^(\s*)from deepspeed import ", r"\1from ds_train import ", source, flags=re.M)
    return re.sub(r"^(\s*)from deepspeed\.", r"\1from ds_train.", source, flags=re.M)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ds_script")
    (tmp / "ds_config.json").write_text(json.dumps(CONFIG))
    with open(SCRIPT) as f:
        original = f.read()
    (tmp / "cifar_ds_train.py").write_text(_swap_imports(original))
    return tmp


def test_import_swapped_script_under_ds_launch(workdir):
    out = workdir / "launch.json"
    result = run_subprocess_job(
        [sys.executable, "-m", "ds_launch", "--num_gpus", "2", str(workdir / "cifar_ds_train.py"), "--deepspeed",
         "--deepspeed_config", str(workdir / "ds_config.json"), "--steps", "4", "--out", str(out)],
        timeout=300, env={"OMP_NUM_THREADS": "1"}, cwd=str(workdir))
    facts = json.loads(out.read_text())
    assert facts["world_size"] == 2 and facts["dp_world_size"] == 2 and facts["zero_stage"] == 1
    assert facts["global_steps"] == 4 and len(facts["losses"]) == 4 and facts["batch"] == [16, 8, 1]
    assert all(0 < loss < 3 for loss in facts["losses"])
    assert "[Rank 0] rank 0 of 2 (dp 2) on cpu" in result.stdout  # deepspeed.utils.log_dist, rank 0 only
    assert "[Rank 1]" not in result.stdout


def test_unchanged_script_through_the_alias(workdir):
    """``ds-launch -m ds_train.alias SCRIPT``: the launcher puts ``--local_rank=N`` before the script's name; the
    alias hands it to the script."""
    out = workdir / "alias.json"
    result = run_subprocess_job(
        [sys.executable, "-m", "ds_launch", "--num_gpus", "2", "-m", "ds_train.alias", SCRIPT, "--deepspeed_config",
         str(workdir / "ds_config.json"), "--steps", "2", "--out", str(out)],
        timeout=300, env={"OMP_NUM_THREADS": "1"}, cwd=str(workdir))
    facts = json.loads(out.read_text())
    assert facts["world_size"] == 2 and facts["global_steps"] == 2 and facts["batch"] == [16, 8, 1]
    assert "rank 0 of 2" in result.stdout
