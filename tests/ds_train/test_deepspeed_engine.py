"""The engine initialize returns behaves as DeepSpeed's: an nn.Module (parameters, state_dict, train/eval, to),
DeepSpeed's attributes and getters, backward/step/checkpoint signatures, the pass-through to the wrapped model,
and a NotImplementedError naming every DeepSpeed method that is not built."""

import argparse
import inspect
import json
import logging

import pytest
import torch
import torch.distributed as dist
from harness import run_distributed

import ds_train
from ds_train import ConfigError, DeepSpeedEngine
from ds_train.engine import NOT_SUPPORTED


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(4, 8), torch.nn.Linear(8, 1)
        self.greeting = "hello"

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))

    def describe(self):
        return f"{self.greeting} from the model"


def _config(stage, **extra):
    return {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
            "zero_optimization": {"stage": stage},
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
            "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 4}}, **extra}


def _surface(save_dir):
    torch.manual_seed(0)
    model = Model()
    engine, optimizer, loader, scheduler = ds_train.initialize(model=model, config=_config(1))
    r = dist.get_rank()
    out = {}
    # nn.Module behaviour
    assert isinstance(engine, torch.nn.Module) and isinstance(engine, DeepSpeedEngine) and engine.module is model
    assert [p for p in engine.parameters()] == [p for p in model.parameters()]
    assert [n for n, _ in engine.named_parameters()] == ["module.fc1.weight", "module.fc1.bias", "module.fc2.weight",
                                                         "module.fc2.bias"]
    assert list(engine.state_dict()) == [n for n, _ in engine.named_parameters()]
    assert list(engine.module_state_dict()) == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    assert engine.eval() is engine and not engine.training and not model.training
    assert engine.train() is engine and engine.training and model.training
    assert engine.to("cpu") is engine and engine.to(torch.float32) is engine and engine.cpu() is engine
    assert engine.float() is engine and "(module): Model" in repr(engine)
    for call, match in [(lambda: engine.half(), "trains in torch.float32"),
                        (lambda: engine.to("meta"), "live on cpu; moving them to meta"),
                        (lambda: engine.to(torch.float64), "casting it to torch.float64"),
                        (lambda: engine.type(torch.float64), "moving or converting"),
                        (lambda: engine.load_state_dict(engine.state_dict(), assign=True), "assign=True")]:
        with pytest.raises(NotImplementedError, match=match):
            call()
    # pass-through to the wrapped model, as DeepSpeed's engine
    assert engine.describe() == "hello from the model" and engine.greeting == "hello"
    with pytest.raises(AttributeError, match="'DeepSpeedEngine' object has no attribute 'nothing_here'"):
        engine.nothing_here  # noqa: B018
    # DeepSpeed's attributes and getters
    assert (engine.local_rank, engine.global_rank, engine.world_size, engine.dp_world_size, engine.mp_world_size) == \
        (r, r, 2, 2, 1)
    assert engine.device == torch.device("cpu") and engine.training_dataloader is None and loader is None
    assert engine.data_parallel_group is dist.group.WORLD and engine.mpu is None
    assert (engine.train_batch_size(), engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()) \
        == (8, 2, 2) == engine.get_batch_info()
    assert not engine.fp16_enabled() and not engine.bfloat16_enabled() and not engine.amp_enabled()
    assert engine.zero_optimization() and engine.zero_optimization_stage() == 1
    assert not engine.zero_optimization_partition_gradients() and not engine.zero_optimization_partition_weights()
    assert engine.zero_reduce_bucket_size() == 500_000_000 and not engine.zero_overlap_comm()
    assert engine.zero_offload_optimizer() is None and not engine.zero_cpu_offload()
    assert engine.gradient_clipping() == 0.0 and not engine.dynamic_loss_scale()
    assert engine.dynamic_loss_scale_args() is None and engine.communication_data_type == torch.float32
    assert engine.optimizer_name() == "adamw" and engine.optimizer_params() == {"lr": 1e-2}
    assert engine.scheduler_name() == "WarmupLR" and engine.scheduler_params() == {"warmup_num_steps": 4}
    assert engine.steps_per_print() == 10 and not engine.wall_clock_breakdown() and not engine.tensorboard_enabled()
    assert engine.get_data_types() == (torch.float32, torch.float32) and not engine.is_compiled
    assert engine.get_pld_theta() is None and engine.postscale_gradients()
    # the loop: two micro-steps make one optimizer step
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(r))
    losses = []
    for micro in range(4):
        loss = engine(x).pow(2).mean()
        assert engine.backward(loss) is loss
        engine.step()
        out.setdefault("applied", []).append(engine.was_step_applied())
        losses.append(loss.item())
    assert engine.global_steps == 2 and engine.global_samples == 16 and engine.micro_steps == 4
    assert engine.get_mom() == [(0.9, 0.999)] and len(engine.get_lr()) == 1
    with pytest.raises(NotImplementedError, match=r"step\(lr_kwargs=...\) is not supported yet"):
        engine.step(lr_kwargs={"x": 1})
    for name in NOT_SUPPORTED:
        with pytest.raises(NotImplementedError, match=rf"DeepSpeedEngine.{name}\(\) is not supported yet"):
            getattr(engine, name)()
    # weights into a running engine whose optimizer steps fp32 masters: only with ds-zero's refresh hook
    if callable(getattr(type(engine), "refresh_fp32_params", None)):
        sd = {k: torch.zeros_like(v) for k, v in engine.state_dict().items()}
        engine.load_state_dict(sd)
        out["loaded_zero"] = all(float(p.abs().sum()) == 0 for p in engine.parameters())
    else:
        with pytest.raises(NotImplementedError, match="fp32 master copy would not follow"):
            engine.load_state_dict(engine.state_dict())
        out["loaded_zero"] = None
    # checkpoints with DeepSpeed's signatures
    assert engine.load_checkpoint(save_dir) == (None, None)  # nothing saved yet: DeepSpeed's (None, None)
    path = engine.save_checkpoint(save_dir, client_state={"note": r})
    assert path and path.endswith("global_step2")
    with pytest.raises(NotImplementedError, match="save_latest=False"):
        engine.save_checkpoint(save_dir, save_latest=False)
    with pytest.raises(NotImplementedError, match="load_module_strict=False"):
        engine.load_checkpoint(save_dir, load_module_strict=False)
    weights = [p.detach().clone() for p in engine.parameters()]
    for _ in range(2):
        engine.backward(engine(x).pow(2).mean())
        engine.step()
    assert engine.global_steps == 3
    rng = torch.get_rng_state()
    load_path, client = engine.load_checkpoint(save_dir, load_module_only=True)
    assert load_path == path and client == {"note": 0}  # rank 0 writes the model file with its client_state
    assert engine.global_steps == 3 and torch.equal(torch.get_rng_state(), rng)  # only the weights changed
    assert all(torch.equal(a, b) for a, b in zip(engine.parameters(), weights))
    load_path, client = engine.load_checkpoint(save_dir, tag="global_step2")
    assert engine.global_steps == 2 and engine.micro_steps == 4
    out["losses"] = losses
    return out


def test_engine_surface_on_two_ranks(tmp_path):
    results = run_distributed(_surface, 2, str(tmp_path / "ckpt"), timeout=120)
    for got in results:
        assert got["applied"] == [False, True, False, True]
        assert got["loaded_zero"] in (None, True)


def test_the_names_table_is_complete():
    """Every DeepSpeed engine name the README lists is a callable of the engine (not shadowed by an attribute
    ds-zero's engine might set with the same name: that would surface here as a missing method)."""
    for name in ["fp16_enabled", "bfloat16_enabled", "zero_optimization_stage", "train_batch_size",
                 "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "is_gradient_accumulation_boundary",
                 "get_global_grad_norm", "was_step_applied", "get_lr", "get_mom", "save_16bit_model", "save_fp16_model",
                 "load_checkpoint", "save_checkpoint", "module_state_dict", "load_module_state_dict", "deepspeed_io",
                 "backward", "step", "forward", "zero_grad", "no_sync", "train", "eval", "destroy",
                 "empty_partition_cache", "get_batch_info", "get_data_types", *NOT_SUPPORTED]:
        assert callable(getattr(DeepSpeedEngine, name)), name
    params = inspect.signature(DeepSpeedEngine.load_checkpoint).parameters
    assert list(params)[1:] == ["load_dir", "tag", "load_module_strict", "load_optimizer_states",
                                "load_lr_scheduler_states", "load_module_only", "custom_load_fn"]
    assert list(inspect.signature(DeepSpeedEngine.save_checkpoint).parameters)[1:] == [
        "save_dir", "tag", "client_state", "save_latest", "exclude_frozen_parameters"]
    assert list(inspect.signature(DeepSpeedEngine.backward).parameters)[1:] == ["loss", "retain_graph", "scale_wrt_gas"]


class Numbers(torch.utils.data.Dataset):
    def __len__(self):
        return 12

    def __getitem__(self, i):
        return torch.tensor([float(i)] * 4)


def _single_process(config_path):
    """Stage 0 fp32 (the optimizer steps the model's own params) and fp16, and initialize's DeepSpeed arguments, in
    one process (one spawn for all)."""
    _initialize_arguments(config_path)
    torch.manual_seed(0)
    # load_state_dict works where the optimizer holds the model's params
    cfg = {"train_batch_size": 4, "optimizer": {"type": "SGD", "params": {"lr": 1.0}}}
    engine, _, loader, _ = ds_train.initialize(model=Model(), config=cfg, training_data=Numbers())
    assert engine.training_dataloader is loader and len(loader) == 3
    io = engine.deepspeed_io(Numbers(), batch_size=6)
    assert len(io) == 2 and next(iter(io)).shape == (6, 4)
    with pytest.raises(NotImplementedError, match="data_sampler"):
        engine.deepspeed_io(Numbers(), data_sampler=object())
    sd = {k: torch.full_like(v, 0.5) for k, v in engine.state_dict().items()}
    sd.pop("module.fc2.bias")
    result = engine.load_state_dict(sd, strict=False)
    assert result.missing_keys == ["module.fc2.bias"] and float(engine.module.fc1.weight[0, 0]) == 0.5
    engine.load_module_state_dict({"module": {k[len("module."):]: v for k, v in sd.items()}}, strict=False)
    with pytest.raises(ValueError, match="'module'"):
        engine.load_module_state_dict({"fc1.weight": 1})

    # ZeRO-2 in bf16: load_state_dict reaches the fp32 masters (the next step starts from the loaded weights),
    # and get_global_grad_norm() is the norm of the step's gradient before clipping
    cfg = {"train_batch_size": 2, "bf16": {"enabled": True, "auto_cast": True}, "gradient_clipping": 1e-4,
           "zero_optimization": {"stage": 2}, "optimizer": {"type": "SGD", "params": {"lr": 0.0}}}
    engine, *_ = ds_train.initialize(model=Model(), config=cfg)
    engine.backward(engine(torch.ones(2, 4)).sum())
    engine.step()
    assert engine.get_global_grad_norm() > 1e-4
    engine.load_state_dict({k: torch.full_like(v, 0.25) for k, v in engine.state_dict().items()})
    engine.backward(engine(torch.ones(2, 4)).sum())
    engine.step()  # lr 0: the params are the masters cast back, so they show what the masters hold
    assert torch.equal(engine.module.fc1.weight, torch.full_like(engine.module.fc1.weight, 0.25))

    # scale_wrt_gas=False: the loss's own gradient accumulates (here twice the default's update)
    def update(scale_wrt_gas):
        torch.manual_seed(1)
        model = Model()
        eng, *_ = ds_train.initialize(model=model, config={"train_micro_batch_size_per_gpu": 2,
                                                           "gradient_accumulation_steps": 2,
                                                           "optimizer": {"type": "SGD", "params": {"lr": 0.1}}})
        before = model.fc1.weight.detach().clone()
        for _ in range(2):
            eng.backward(eng(torch.ones(2, 4)).sum(), scale_wrt_gas=scale_wrt_gas)
            eng.step()
        return model.fc1.weight.detach() - before

    assert torch.allclose(update(False), 2 * update(True), rtol=1e-5, atol=1e-7)

    # fp16 getters
    cfg = {"train_batch_size": 4, "fp16": {"enabled": True, "loss_scale_window": 50},
           "optimizer": {"type": "Adam", "params": {"lr": 1e-3}}}
    engine, *_ = ds_train.initialize(model=Model(), config=cfg)
    assert engine.fp16_enabled() and engine.dynamic_loss_scale() and engine.communication_data_type == torch.float16
    assert engine.dynamic_loss_scale_args() == {"init_scale": 65536.0, "scale_window": 50, "delayed_shift": 2,
                                                "consecutive_hysteresis": False, "min_scale": 1.0}
    assert engine.half() is engine and engine.initial_dynamic_scale() == 65536.0
    with pytest.raises(NotImplementedError, match="trains in torch.float16"):
        engine.float()
    return True


def test_stage0_load_state_dict_scale_wrt_gas_fp16_getters_and_initialize_arguments(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(_config(0)))
    assert run_distributed(_single_process, 1, str(path)) == [True]


def _initialize_arguments(config_path):
    model = Model()
    with pytest.raises(NotImplementedError, match="mesh_param"):
        ds_train.initialize(model=model, config=_config(0), mesh_param=(1, 1))
    both = argparse.Namespace(deepspeed_config=config_path, deepscale_config=config_path)
    with pytest.raises(ConfigError, match="both args.deepscale_config and args.deepspeed_config"):
        ds_train.initialize(args=both, model=model)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("ds_train").addHandler(handler)
    try:
        old = argparse.Namespace(deepspeed_config=None, deepscale_config=config_path, local_rank=0)
        engine, *_ = ds_train.initialize(args=old, model=model)
    finally:
        logging.getLogger("ds_train").removeHandler(handler)
    assert engine.zero_optimization_stage() == 0 and any("deprecated" in r.getMessage() for r in records)
    with pytest.raises(ValueError, match="args.local_rank=3 but the launcher set LOCAL_RANK=0"):
        ds_train.initialize(args=argparse.Namespace(deepspeed_config=config_path, local_rank=3), model=Model())
    return True


def _offload_accessors(nvme_dir):
    """DeepSpeed's offload getters read the config's sections; an NVMe config with its `aio` section (which every
    DeepSpeed NVMe config carries) is accepted, the aio keys with a warning that they have no effect."""
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("ds_train").addHandler(handler)
    out = {}
    for name, offload in (("cpu", {"device": "cpu"}), ("nvme", {"device": "nvme", "nvme_path": nvme_dir})):
        config = {**_config(2, bf16={"enabled": True}),
                  "zero_optimization": {"stage": 2, "offload_optimizer": offload}}
        if name == "nvme":
            config["aio"] = {"block_size": 1048576, "queue_depth": 8, "thread_count": 1}
        engine, *_ = ds_train.initialize(model=Model(), config=config)
        section = engine.zero_offload_optimizer()
        out[name] = (section.device, engine.zero_cpu_offload(), engine.zero_offload_param())
    out["warned"] = [r.getMessage() for r in records if "aio" in r.getMessage()]
    return out


def test_offload_getters_follow_the_config_and_nvme_configs_carry_aio(tmp_path):
    out, = run_distributed(_offload_accessors, 1, str(tmp_path), timeout=120)
    assert out["cpu"] == ("cpu", True, None) and out["nvme"] == ("nvme", False, None)
    assert len(out["warned"]) == 1 and "aio: accepted and ignored" in out["warned"][0], out["warned"]
    assert "no libaio" in out["warned"][0]
