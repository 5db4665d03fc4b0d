"""One DeepSpeed training script, run by real DeepSpeed and by ds-train: the same loss curve (issue 12's evidence).

The script is ``tests/ds_train/scripts/cifar_deepspeed.py`` (written for DeepSpeed, in the style of DeepSpeedExamples'
CIFAR example). Per config, two runs of 2 ranks each, launched the same way (``torchrun --nproc_per_node 2``), same
seed, same config file:

- ``deepspeed``: the script byte for byte, with real DeepSpeed on ``PYTHONPATH`` (``DS_ACCELERATOR=cpu``: its CPU
  accelerator falls back to gloo when oneccl_bindings_for_pytorch is absent);
- ``ds_train``: the script with its import lines changed as the README says (``import deepspeed`` ->
  ``import ds_train as deepspeed``, ``from deepspeed.X`` -> ``from ds_train.X``), nothing else;
- ``ds_train_alias`` (fp32 ZeRO 2 only): the unchanged file again, through ``python -m ds_train.alias``.

The optimizer is ``AdamW`` with ``"torch_adam": true`` in both (``torch.optim.AdamW``, explicit ``weight_decay``):
DeepSpeed's FusedAdam / CPUAdam are compiled ops and are not built. DeepSpeed on CPU still JIT-builds one C++ op,
its shared-memory ``deepspeed_shm_comm`` (``deepspeed.comm.torch.TorchBackend.__init__``), which serves only
``inference_all_reduce``; it is built into ``--extensions-dir`` (``TORCH_EXTENSIONS_DIR``), not the user cache.
Training collectives are torch.distributed's gloo in both.

Steps stay within one epoch (512 samples / batch 16 = 32 steps): DeepSpeed's loader leaves ``set_epoch`` to the user
(it repeats the epoch-0 order), ds-train's reshuffles per epoch, a documented difference that is not compared here.

fp16: DeepSpeed's CPU accelerator refuses it on a CPU without mkldnn fp16 (``is_fp16_supported()``); the run is
made and the refusal is recorded, not compared.

Usage (DeepSpeed 0.19.6 installed into a separate directory, not the venv)::

    pip install --no-deps --target /tmp/dsreal .whl/deepspeed-0.19.6-py3-none-any.whl .whl/hjson-*.whl \
        py-cpuinfo psutil msgpack einops ninja
    OMP_NUM_THREADS=1 python bench/deepspeed_same_script.py --dsreal /tmp/dsreal

Writes one JSON per run and ``summary.json`` under ``--out-dir``; exits 1 when a curve is outside its tolerance.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "ds_train" / "scripts" / "cifar_deepspeed.py"
DEFAULT_OUT = ROOT / "bench" / "results" / "2026-12-03-cpu-deepspeed-same-script"

# the README's rule: import lines change, nothing else (the same rule as tests/ds_train/test_deepspeed_script.py)
_IMPORT_RULES = [
    (re.compile(r"^(\s*)import deepspeed$", re.M), r"\1import ds_train as deepspeed"),
    (re.compile(r"^(\s*)from deepspeed import ", re.M), r"\1from ds_train import "),
    (re.compile(r"^(\s*)from deepspeed\.", re.M), r"\1from ds_train."),
]

# Per-step relative tolerance of the mean loss, ds-train vs DeepSpeed.
# fp32: the same torch.optim.AdamW, the same fp32 gradient average and clipping formula; only the order of a few
#   float operations differs (flattening, where 1/world_size and the clip coefficient are applied), a few ulps per
#   step that Adam's normalisation carries forward: 1e-5 is ~100 fp32 ulps.
# bf16: the forward and backward run in bf16 (8-bit mantissa, 2^-8 = 0.4% per rounding); where the two put the
#   fp32 master copy, the gradient accumulation and the reduction dtype may differ, so a per-step difference up to
#   a few bf16 roundings of the loss is allowed: 2e-2.
TOLERANCE = {"fp32": 1e-5, "bf16": 2e-2}

CONFIGS = {
    "fp32-z0": ("fp32", 0), "fp32-z1": ("fp32", 1), "fp32-z2": ("fp32", 2),
    "bf16-z0": ("bf16", 0), "bf16-z1": ("bf16", 1), "bf16-z2": ("bf16", 2),
    "fp16-z1": ("fp16", 1),
}


def swap_imports(source: str) -> str:
    for pattern, replacement in _IMPORT_RULES:
        source = pattern.sub(replacement, source)
    return source


def ds_config(precision: str, stage: int) -> dict:
    cfg = {"train_batch_size": 16, "gradient_accumulation_steps": 1, "steps_per_print": 1000,
           "gradient_clipping": 1.0, "zero_optimization": {"stage": stage},
           # torch_adam: torch.optim.AdamW in both (no compiled DeepSpeed op); weight_decay explicit, as DeepSpeed's
           # default (0) is not torch's (0.01)
           "optimizer": {"type": "AdamW", "params": {"lr": 5e-3, "betas": [0.9, 0.999], "eps": 1e-8,
                                                     "weight_decay": 0.01, "torch_adam": True}}}
    if precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif precision == "fp16":
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 8}
    return cfg


def run(impl: str, name: str, config: Path, args, out_dir: Path, port: int) -> dict:
    out = out_dir / f"{name}.{impl}.json"
    out.unlink(missing_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONUNBUFFERED="1")
    env.pop("PYTHONPATH", None)
    script_args = ["--deepspeed", "--deepspeed_config", str(config), "--steps", str(args.steps),
                   "--seed", str(args.seed), "--out", str(out)]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    if impl == "deepspeed":
        env.update(PYTHONPATH=str(args.dsreal), DS_ACCELERATOR="cpu", TORCH_EXTENSIONS_DIR=str(args.extensions_dir))
        cmd = launch + [str(SCRIPT), *script_args]
    elif impl == "ds_train":
        swapped = out_dir / "cifar_ds_train.py"
        swapped.write_text(swap_imports(SCRIPT.read_text()))
        cmd = launch + [str(swapped), *script_args]
    elif impl == "ds_train_alias":
        cmd = launch + ["-m", "ds_train.alias", str(SCRIPT), *script_args]
    else:
        raise ValueError(f"unknown implementation {impl!r}")
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, cwd=out_dir, capture_output=True, text=True, timeout=args.timeout)
    record = {"impl": impl, "config": name, "cmd": " ".join(cmd), "rc": proc.returncode,
              "wall_s": round(time.time() - t0, 1)}
    if proc.returncode == 0 and out.exists():
        record["facts"] = json.loads(out.read_text())
    else:
        lines = (proc.stdout + proc.stderr).splitlines()
        errors = [ln for ln in lines if re.search(r"(Error|Exception):", ln)]
        record["error"] = errors[0].strip() if errors else "no output file"
        record["log_tail"] = lines[-40:]
    (out_dir / f"{name}.{impl}.run.json").write_text(json.dumps(record, indent=1))
    return record


def compare(a: list, b: list) -> dict:
    n = min(len(a), len(b))
    rel = [abs(x - y) / abs(y) for x, y in zip(a[:n], b[:n])]
    worst = max(range(n), key=rel.__getitem__) if n else None
    return {"steps": n, "same_length": len(a) == len(b), "max_rel": max(rel) if rel else None,
            "worst_step": None if worst is None else worst + 1,
            "at_worst": None if worst is None else [a[worst], b[worst]], "rel_per_step": rel}


# ---- parameter probe: where two bf16 loss curves part, are the updates the same? ----------------------------------
# The loss curves of bf16 runs part after a few steps (the task is chaotic at this learning rate: even the fp32 curve
# spikes), so the curve alone cannot tell a rounding difference from an algorithm difference. The probe trains the
# script's own model and data (its module loaded, main() not run) for a few steps through the same initialize() and
# the engine's forward / backward / step, and rank 0 saves the model's params after every step; compare() then
# counts, per step, how many params differ and by how many units in the last place of their dtype.

def _probe_worker(impl: str, config_path: str, steps: int, seed: int, out: str, cast_first: bool) -> None:
    import importlib.util

    if impl == "deepspeed":
        import deepspeed as lib
        script = SCRIPT
    else:
        import ds_train as lib
        script = Path(out).with_name("cifar_ds_train.py")
    spec = importlib.util.spec_from_file_location("cifar_probe", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    lib.init_distributed()
    torch.manual_seed(seed)  # as the script: the model's init depends on this seed only
    net = mod.Net()
    config = json.loads(Path(config_path).read_text())
    if cast_first and config.get("bf16", {}).get("enabled"):
        # the model handed over already in bf16: both then start their fp32 masters from the bf16-rounded init
        net = net.to(torch.bfloat16)
    engine, _, loader, _ = lib.initialize(model=net, model_parameters=[p for p in net.parameters()],
                                          training_data=mod.SyntheticCIFAR(512, seed=0), config=config)
    dtype = torch.bfloat16 if engine.bfloat16_enabled() else None
    snaps = [{k: v.detach().clone() for k, v in engine.module.state_dict().items()}]
    losses = []
    for i, (x, y) in enumerate(loader):
        if i == steps:
            break
        out_ = engine(x.to(dtype) if dtype else x)
        loss = torch.nn.functional.cross_entropy(out_, y)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))  # this rank's loss
        snaps.append({k: v.detach().clone() for k, v in engine.module.state_dict().items()})
    if torch.distributed.get_rank() == 0:
        torch.save({"snaps": snaps, "losses": torch.tensor(losses)}, out)


def _ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in units of the last place of a's dtype at |a| (bf16: 2^-7 relative, fp32: 2^-23)."""
    mant = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}[a.dtype]
    a32, b32 = a.float(), b.float()
    exp = torch.floor(torch.log2(a32.abs().clamp_min(torch.finfo(a.dtype).tiny)))
    return (a32 - b32).abs() / torch.exp2(exp - mant)


def param_probe(args, configs: list[str], cast_first: bool) -> dict:
    result = {}
    for i, name in enumerate(configs):
        config = args.out_dir / f"{name}.config.json"
        precision, stage = CONFIGS[name]
        config.write_text(json.dumps(ds_config(precision, stage), indent=1))
        (args.out_dir / "cifar_ds_train.py").write_text(swap_imports(SCRIPT.read_text()))
        snaps = {}
        for j, impl in enumerate(("deepspeed", "ds_train")):
            out = args.out_dir / f"probe-{name}.{impl}.pt"
            i += 10 * cast_first
            env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
            env.pop("PYTHONPATH", None)
            if impl == "deepspeed":
                env.update(PYTHONPATH=str(args.dsreal), DS_ACCELERATOR="cpu",
                           TORCH_EXTENSIONS_DIR=str(args.extensions_dir))
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                   str(args.port + 40 + 2 * i + j), str(Path(__file__).resolve()), "--probe-worker", impl,
                   str(config), str(args.probe_steps), str(args.seed), str(out), "1" if cast_first else "0"]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
            if proc.returncode != 0:
                raise RuntimeError(f"probe {name} {impl} failed:\n" + "\n".join(
                    (proc.stdout + proc.stderr).splitlines()[-30:]))
            snaps[impl] = torch.load(out, weights_only=True)
            out.unlink()  # params are not kept: the counts below are the result
        per_step = []
        loss_a, loss_b = snaps["ds_train"]["losses"], snaps["deepspeed"]["losses"]
        for step, (a, b) in enumerate(zip(snaps["ds_train"]["snaps"], snaps["deepspeed"]["snaps"])):
            n = diff = 0
            worst_ulps = worst_rel = worst_abs = 0.0
            for key in b:
                ta, tb = a[key], b[key]
                n += tb.numel()
                diff += int((ta != tb).sum())
                worst_ulps = max(worst_ulps, float(_ulps(tb, ta).max()))
                worst_abs = max(worst_abs, float((ta.float() - tb.float()).abs().max()))
                worst_rel = max(worst_rel, float(((ta.float() - tb.float()).abs()
                                                  / tb.float().abs().clamp_min(1e-12)).max()))
            rank0_loss = [float(loss_a[step - 1]), float(loss_b[step - 1])] if step else None
            per_step.append({"step": step, "params": n, "differ": diff, "max_ulps": worst_ulps,
                             "max_rel": worst_rel, "max_abs": worst_abs, "rank0_loss_ds_train_deepspeed": rank0_loss})
            print(f"probe {name}{' cast-first' if cast_first else ''} after step {step}: {diff}/{n} params differ, "
                  f"max {worst_ulps:.3g} ulps, {worst_abs:.3g} abs ({worst_rel:.3g} rel); loss {rank0_loss}",
                  flush=True)
        result[name + (" cast-first" if cast_first else "")] = per_step
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dsreal", type=Path, default=Path(os.environ.get("DSREAL", "/tmp/dsreal")),
                   help="directory real DeepSpeed is installed in (pip --target)")
    p.add_argument("--extensions-dir", type=Path, default=Path("/tmp/dsreal_ext"),
                   help="TORCH_EXTENSIONS_DIR for DeepSpeed's JIT-built shm comm op")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--steps", type=int, default=24, help="optimizer steps (<= 32: one epoch)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    p.add_argument("--port", type=int, default=29640)
    p.add_argument("--timeout", type=int, default=900)
    p.add_argument("--probe", nargs="*", default=None, choices=list(CONFIGS),
                   help="also run the parameter probe on these configs (default with no names: bf16-z0 bf16-z1 "
                        "fp32-z0)")
    p.add_argument("--probe-only", action="store_true", help="run the parameter probe only")
    p.add_argument("--probe-steps", type=int, default=4)
    if len(sys.argv) > 1 and sys.argv[1] == "--probe-worker":  # inside torchrun, one rank of the probe
        impl, config, steps, seed, out, cast_first = sys.argv[2:8]
        _probe_worker(impl, config, int(steps), int(seed), out, cast_first == "1")
        return 0
    args = p.parse_args()
    if args.steps > 32:
        p.error("--steps > 32 crosses an epoch, where DeepSpeed's loader and ds-train's differ by design")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    args.extensions_dir.mkdir(parents=True, exist_ok=True)

    probe = subprocess.run([sys.executable, "-c", "import deepspeed; print(deepspeed.__version__, deepspeed.__file__)"],
                           env=dict(os.environ, PYTHONPATH=str(args.dsreal), DS_ACCELERATOR="cpu"),
                           capture_output=True, text=True)
    if probe.returncode != 0:
        sys.exit(f"real DeepSpeed does not import from {args.dsreal}: {probe.stderr.strip().splitlines()[-1:]}")
    import ds_train

    summary = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.node(),
               "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
               "deepspeed": probe.stdout.split()[0], "deepspeed_path": probe.stdout.split()[1],
               "ds_train": getattr(ds_train, "__version__", "?"), "script": str(SCRIPT.relative_to(ROOT)),
               "steps": args.steps, "seed": args.seed, "tolerance": TOLERANCE, "results": {}}
    failed = False
    if args.probe is not None:
        names = args.probe or ["fp32-z0", "bf16-z0", "bf16-z1"]
        probe = param_probe(args, names, cast_first=False)
        probe.update(param_probe(args, [n for n in names if n.startswith("bf16")], cast_first=True))
        (args.out_dir / "param_probe.json").write_text(json.dumps(probe, indent=1))
        if args.probe_only:
            return 0
    for i, name in enumerate(args.configs):
        precision, stage = CONFIGS[name]
        config = args.out_dir / f"{name}.config.json"
        config.write_text(json.dumps(ds_config(precision, stage), indent=1))
        impls = ["deepspeed"] if precision == "fp16" else ["deepspeed", "ds_train"]
        if name == "fp32-z2":
            impls.append("ds_train_alias")
        runs = {impl: run(impl, name, config, args, args.out_dir, args.port + 3 * i + j)
                for j, impl in enumerate(impls)}
        entry = {impl: {k: r[k] for k in ("rc", "wall_s", "error") if k in r} for impl, r in runs.items()}
        if precision == "fp16":
            entry["note"] = "DeepSpeed refuses fp16 on this CPU; not compared"
            print(f"{name}: deepspeed rc={runs['deepspeed']['rc']} {runs['deepspeed'].get('error', '')}", flush=True)
            summary["results"][name] = entry
            continue
        ref = runs["deepspeed"].get("facts")
        for impl in impls[1:]:
            got = runs[impl].get("facts")
            if ref is None or got is None:
                entry[f"{impl}_vs_deepspeed"] = {"ok": False, "why": "a run failed"}
                failed = True
                continue
            cmp = compare(got["losses"], ref["losses"])
            cmp["ok"] = cmp["same_length"] and cmp["max_rel"] <= TOLERANCE[precision]
            cmp["accuracy"] = [got["accuracy"], ref["accuracy"]]
            cmp["facts_equal"] = {k: got[k] == ref[k] for k in ("global_steps", "global_samples", "batch",
                                                                "zero_stage", "fp16", "bf16", "n_params",
                                                                "world_size", "dp_world_size", "backend")}
            entry[f"{impl}_vs_deepspeed"] = cmp
            failed |= not cmp["ok"]
            print(f"{name}: {impl} vs deepspeed max rel {cmp['max_rel']:.3g} at step {cmp['worst_step']} "
                  f"(tol {TOLERANCE[precision]:g}) {'ok' if cmp['ok'] else 'OUTSIDE'}; "
                  f"facts differ: {[k for k, v in cmp['facts_equal'].items() if not v]}", flush=True)
        entry["losses"] = {impl: r["facts"]["losses"] for impl, r in runs.items() if "facts" in r}
        summary["results"][name] = entry
        (args.out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    (args.out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
