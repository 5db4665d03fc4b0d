"""A DeepSpeed training script runs with only its import lines changed (issue 12's rule).

``scripts/cifar_deepspeed.py`` is written for DeepSpeed (argparse + add_config_arguments, init_distributed,
get_accelerator, initialize(args=..., model=..., model_parameters=..., training_data=...), engine.train(), the
engine(batch) / backward / step loop, deepspeed.comm all-reduce and barriers, save/load_checkpoint with
client_state, evaluation). The test rewrites its import lines only and runs it on 2 gloo ranks:

- fp32, ZeRO 2, stopped after 4 steps and resumed from its checkpoint up to 8: the 8 losses equal a plain
  single-process PyTorch loop (same init, same global batches, torch.optim.AdamW, clip_grad_norm_) within 1e-4
  relative -- the 2 ranks' micro-batches are exactly the reference's global batch;
- fp16 (ZeRO 1, activation checkpointing through deepspeed.checkpointing) and bf16 (ZeRO 0): within the stated
  tolerance of the same reference curve, and the loss drops.
"""

import importlib.util
import json
import re
import runpy
import sys
from pathlib import Path

import pytest
import torch
from harness import run_distributed

SCRIPT = Path(__file__).parent / "scripts" / "cifar_deepspeed.py"
SEED, STEPS, LR, WD, CLIP, BATCH = 1234, 8, 5e-3, 0.01, 1.0, 16

# the rule, as the README states it: import lines change, nothing else
_IMPORT_RULES = [
    (re.compile(r"^(\s*)import deepspeed$", re.M), r"\1import ds_train as deepspeed"),
    (re.compile(r"^(\s*)from deepspeed import ", re.M), r"\1from ds_train import "),
    (re.compile(r"^(\s*)from deepspeed\.", re.M), r"\1from ds_train."),
]


def swap_imports(source: str) -> str:
    for pattern, replacement in _IMPORT_RULES:
        source = pattern.sub(replacement, source)
    return source


def test_only_import_lines_change():
    original = SCRIPT.read_text()
    swapped = swap_imports(original)
    assert not re.search(r"^\s*(import|from) ds_train", original, re.M) and "\nimport deepspeed\n" in original
    changed = [(a, b) for a, b in zip(original.splitlines(), swapped.splitlines()) if a != b]
    assert len(original.splitlines()) == len(swapped.splitlines())
    assert len(changed) == 4, changed  # import deepspeed, from deepspeed import comm, .accelerator, .utils
    for before, after in changed:
        assert re.match(r"\s*(import|from) deepspeed\b", before) and re.match(r"\s*(import|from) ds_train\b", after)


@pytest.fixture(scope="module")
def swapped_script(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("script") / "cifar_ds_train.py"
    path.write_text(swap_imports(SCRIPT.read_text()))
    return path


def _config(tmp: Path, name: str, stage: int, **extra) -> str:
    cfg = {"train_batch_size": BATCH, "gradient_accumulation_steps": 1, "steps_per_print": 1000,
           "gradient_clipping": CLIP, "zero_optimization": {"stage": stage},
           "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": WD}}, **extra}
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def _run_script(path: str, argv: list) -> None:
    """In each rank: the script as ``python script.py argv`` would run it (the harness has already joined the
    process group, which the script's init_distributed keeps)."""
    saved = sys.argv
    sys.argv = [path, *argv]
    try:
        runpy.run_path(path, run_name="__main__")
    finally:
        sys.argv = saved


def _train(script: Path, tmp: Path, name: str, config: str, steps: int, *extra: str) -> dict:
    out = tmp / f"{name}.out.json"
    argv = ["--deepspeed", "--deepspeed_config", config, "--steps", str(steps), "--seed", str(SEED),
            "--out", str(out), *extra]
    run_distributed(_run_script, 2, str(script), argv, timeout=120)
    return json.loads(out.read_text())


def _reference_losses(script: Path, steps: int) -> list[float]:
    """Plain PyTorch, one process: the script's model and data, global batches of 16 in the order the two ranks'
    DistributedSampler shards make up, torch.optim.AdamW, clip_grad_norm_."""
    spec = importlib.util.spec_from_file_location("cifar_reference", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # defines the classes; main() is not run
    torch.manual_seed(SEED)
    net = mod.Net()
    data = mod.SyntheticCIFAR(512, seed=0)
    sampler = torch.utils.data.DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=0)
    loader = torch.utils.data.DataLoader(data, batch_size=BATCH, sampler=sampler)
    opt = torch.optim.AdamW(net.parameters(), lr=LR, weight_decay=WD)
    losses = []
    for images, labels in loader:
        loss = torch.nn.functional.cross_entropy(net(images), labels)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), CLIP)
        opt.step()
        losses.append(loss.item())
        if len(losses) == steps:
            return losses
    raise AssertionError("the reference ran out of data")


@pytest.fixture(scope="module")
def reference(swapped_script) -> list[float]:
    return _reference_losses(swapped_script, STEPS)


def test_fp32_zero2_matches_plain_pytorch_across_a_resume(swapped_script, reference, tmp_path):
    config = _config(tmp_path, "zero2", 2)
    save = str(tmp_path / "ckpt")
    first = _train(swapped_script, tmp_path, "first", config, 4, "--save_dir", save)
    assert first["resumed_from"] is None and first["global_steps"] == 4 and len(first["losses"]) == 4
    resumed = _train(swapped_script, tmp_path, "resumed", config, STEPS, "--save_dir", save)
    assert resumed["resumed_from"] == 4 and resumed["global_steps"] == STEPS
    assert resumed["losses"][:4] == first["losses"]  # from the checkpoint's client_state
    for step, (got, want) in enumerate(zip(resumed["losses"], reference), start=1):
        assert got == pytest.approx(want, rel=1e-4), f"step {step}: 2 ranks {got} vs plain PyTorch {want}"
    assert sum(resumed["losses"][-2:]) / 2 < resumed["losses"][0] - 0.3
    assert resumed["global_samples"] == STEPS * BATCH
    assert resumed["batch"] == [16, 8, 1] and resumed["world_size"] == 2 and resumed["dp_world_size"] == 2
    assert resumed["zero_stage"] == 2 and not resumed["fp16"] and not resumed["bf16"]
    assert resumed["local_device"] == "cpu" and resumed["backend"] == "gloo" and resumed["device"] == "cpu"
    assert resumed["state_dict_keys"] == ["module.conv1.bias", "module.conv1.weight", "module.conv2.bias"]
    assert resumed["n_params"] == sum(p.numel() for p in _net_params(swapped_script))


def _net_params(script):
    spec = importlib.util.spec_from_file_location("cifar_count", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return list(mod.Net().parameters())


@pytest.mark.parametrize("precision,stage,tolerance", [("fp16", 1, 0.02), ("bf16", 0, 0.05)])
def test_16bit_runs_follow_the_fp32_curve(swapped_script, reference, tmp_path, precision, stage, tolerance):
    extra = ({"fp16": {"enabled": True, "initial_scale_power": 8},  # read by deepspeed.checkpointing.configure:
              "activation_checkpointing": {"partition_activations": False, "synchronize_checkpoint_boundary": True}}
             if precision == "fp16" else {"bf16": {"enabled": True}})
    argv = ["--checkpoint_activations"] if precision == "fp16" else []
    facts = _train(swapped_script, tmp_path, precision, _config(tmp_path, precision, stage, **extra), 6, *argv)
    assert facts[precision] and facts["zero_stage"] == stage and facts["global_steps"] == 6
    assert len(facts["losses"]) == 6, "an fp16 step was skipped (loss scale overflow) where none should be"
    for step, (got, want) in enumerate(zip(facts["losses"], reference), start=1):
        assert got == pytest.approx(want, rel=tolerance), f"{precision} step {step}: {got} vs fp32 reference {want}"
    assert min(facts["losses"][3:]) < facts["losses"][0] - 0.2
