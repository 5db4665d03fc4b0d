"""DeepSpeed's module-level names in ds-train: add_config_arguments, init_distributed (DeepSpeed's signature, MPI
discovery, init_method), get_accelerator (CUDA/CPU, DS_ACCELERATOR), utils.log_dist, the pipe/moe ImportErrors,
the names that are not supported, and the opt-in ``deepspeed`` alias."""

import argparse
import datetime
import importlib
import inspect
import logging
import os
import sys
import types

import pytest
import torch
import torch.distributed as dist
from harness import run_distributed

import ds_train
import ds_train.accelerator as accel_mod
from ds_train._optional import installed_sibling
from ds_train.accelerator import CPU_Accelerator, CUDA_Accelerator, get_accelerator


# -- add_config_arguments ----------------------------------------------------------------------------------
def test_add_config_arguments_has_deepspeeds_flags():
    parser = ds_train.add_config_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--deepspeed", "--deepspeed_config", "ds.json"])
    assert (args.deepspeed, args.deepspeed_config, args.deepscale, args.deepscale_config) == \
        (True, "ds.json", False, None)
    args = parser.parse_args(["--deepscale", "--deepscale_config", "old.json"])
    assert args.deepscale and args.deepscale_config == "old.json" and args.deepspeed_config is None
    with pytest.raises(TypeError, match="argparse.ArgumentParser"):
        ds_train.add_config_arguments(None)


def test_signatures_follow_deepspeed():
    params = inspect.signature(ds_train.init_distributed).parameters
    assert list(params) == ["dist_backend", "auto_mpi_discovery", "distributed_port", "verbose", "timeout",
                            "init_method", "dist_init_required", "config", "rank", "world_size"]
    assert params["distributed_port"].default == 29500 and params["timeout"].default == datetime.timedelta(minutes=30)
    assert list(inspect.signature(ds_train.initialize).parameters) == [
        "args", "model", "optimizer", "model_parameters", "training_data", "lr_scheduler", "distributed_port", "mpu",
        "dist_init_required", "collate_fn", "config", "mesh_param", "config_params"]
    assert list(inspect.signature(ds_train.utils.log_dist).parameters) == ["message", "ranks", "level"]


# -- init_distributed ----------------------------------------------------------------------------------------
def test_init_distributed_refuses_bad_arguments_before_joining(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE",
                 "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(TypeError, match="timeout must be a datetime.timedelta"):
        ds_train.init_distributed(timeout=30)
    with pytest.raises(ValueError, match="nothing to rendezvous with"):
        ds_train.init_distributed(rank=1, world_size=2)
    with pytest.raises(ValueError, match="needs rank and world_size"):
        ds_train.init_distributed(init_method="tcp://127.0.0.1:1")
    assert not dist.is_initialized()


def test_mpi_discovery_reads_the_mpi_launchers_variables(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "3")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "1")
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "2")
    # two nodes and no MASTER_ADDR: rank 0's address must come over MPI (mpi4py), here a stand-in
    sent = []
    comm = types.SimpleNamespace(bcast=lambda value, root: sent.append((value, root)) or "10.0.0.7")
    monkeypatch.setitem(sys.modules, "mpi4py", types.SimpleNamespace(MPI=types.SimpleNamespace(COMM_WORLD=comm)))
    monkeypatch.setitem(sys.modules, "mpi4py.MPI", sys.modules["mpi4py"].MPI)
    ds_train.dist.mpi_discovery(distributed_port=29611, verbose=False)
    env = {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                                      "MASTER_PORT")}
    assert env == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                   "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "29611"}
    assert sent == [(None, 0)]  # not rank 0: sends nothing of its own


def test_mpi_discovery_on_one_node_needs_no_mpi4py(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # importing it fails
    monkeypatch.setenv("PMI_RANK", "1")
    monkeypatch.setenv("PMI_SIZE", "2")
    monkeypatch.setenv("MPI_LOCALNRANKS", "2")
    ds_train.dist.mpi_discovery(verbose=False)
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"], os.environ["RANK"]) == ("127.0.0.1", "29500", "1")
    monkeypatch.delenv("MASTER_ADDR")
    monkeypatch.setenv("MPI_LOCALNRANKS", "1")  # ranks on several nodes
    with pytest.raises(RuntimeError, match="install mpi4py, or export MASTER_ADDR"):
        ds_train.dist.mpi_discovery(verbose=False)


def _rejoin_with_init_method(path):
    """Leave the harness's group and join again through DeepSpeed's init_method/rank/world_size arguments (a world
    of one: the point is the argument plumbing; the harness owns multi-rank rendezvous)."""
    dist.destroy_process_group()
    got = ds_train.init_distributed(dist_backend="gloo", init_method=f"file://{path}", rank=0, world_size=1,
                                    timeout=datetime.timedelta(seconds=60))
    t = torch.tensor([2.0])
    ds_train.comm.all_reduce(t)
    return got, t.item(), ds_train.init_distributed(), dist.get_backend()  # a second call keeps the group


def test_init_distributed_with_an_init_method(tmp_path):
    assert run_distributed(_rejoin_with_init_method, 1, str(tmp_path / "rendezvous")) == [((0, 1), 2.0, (0, 1), "gloo")]


# -- get_accelerator -------------------------------------------------------------------------------------------
@pytest.fixture
def fresh_accelerator(monkeypatch):
    monkeypatch.setattr(accel_mod, "_accelerator", None)
    yield
    accel_mod._accelerator = None


def test_cpu_accelerator_answers_what_scripts_ask(fresh_accelerator, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    acc = get_accelerator()
    assert isinstance(acc, CPU_Accelerator) and get_accelerator() is acc and ds_train.get_accelerator() is acc
    assert (acc.device_name(), acc.device_name(1), acc.current_device_name()) == ("cpu", "cpu", "cpu")
    assert acc.current_device() == 1 and acc.device_count() == 2 and acc.is_available()
    assert acc.communication_backend_name() == "gloo" and acc._name == "cpu"
    assert acc.is_bf16_supported() and acc.is_fp16_supported()
    assert acc.supported_dtypes() == [torch.float32, torch.float16, torch.bfloat16]
    acc.set_device(1)
    acc.synchronize()
    acc.empty_cache()
    acc.manual_seed(7)
    a = torch.rand(3)
    acc.manual_seed_all(7)
    assert torch.equal(a, torch.rand(3)) and acc.initial_seed() == 7
    state = acc.get_rng_state()
    b = torch.rand(2)
    acc.set_rng_state(state)
    assert torch.equal(b, torch.rand(2))
    assert acc.memory_allocated() > 0 and acc.max_memory_allocated() >= acc.memory_allocated()
    acc.reset_max_memory_allocated()
    assert acc.max_memory_allocated() > 0 and acc.total_memory() > acc.available_memory() > 0
    with acc.stream(acc.Stream()):  # torch's CPU stream stand-ins: the calls work, there is nothing to order
        assert acc.current_stream() is not None and acc.default_stream() is not None
    event = acc.Event()
    event.record()
    assert acc.on_accelerator(torch.zeros(1)) and acc.pin_memory(a) is a
    assert acc.FloatTensor([1, 2]).dtype == torch.float32 and acc.BFloat16Tensor([1]).dtype == torch.bfloat16
    with acc.device(0):
        pass
    with pytest.raises(NotImplementedError, match="create_op_builder.*not supported by ds-train"):
        acc.create_op_builder("FusedAdamBuilder")


def test_ds_accelerator_names_are_checked(fresh_accelerator, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "npu")
    with pytest.raises(ValueError, match="'npu' is a DeepSpeed accelerator that ds-train does not support yet"):
        get_accelerator()
    monkeypatch.setenv("DS_ACCELERATOR", "tpu")
    with pytest.raises(ValueError, match="DS_ACCELERATOR must be one of cuda, cpu; 'tpu' is not"):
        get_accelerator()
    if not torch.cuda.is_available():
        monkeypatch.setenv("DS_ACCELERATOR", "cuda")
        with pytest.raises(RuntimeError, match="DS_ACCELERATOR=cuda but torch.cuda sees no usable GPU"):
            get_accelerator()
    monkeypatch.delenv("DS_ACCELERATOR")
    expected = CUDA_Accelerator if torch.cuda.is_available() else CPU_Accelerator
    assert type(get_accelerator()) is expected
    with pytest.raises(TypeError, match="set_accelerator needs a DeepSpeedAccelerator"):
        accel_mod.set_accelerator("cpu")
    accel_mod.set_accelerator(CPU_Accelerator())
    assert get_accelerator().device_name(3) == "cpu" and accel_mod.is_current_accelerator_supported()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.gpu
def test_cuda_accelerator(fresh_accelerator):
    acc = CUDA_Accelerator()
    assert acc.device_name(0) == "cuda:0" and acc.current_device_name() == f"cuda:{torch.cuda.current_device()}"
    assert acc.communication_backend_name() == "nccl" and acc.device_count() == torch.cuda.device_count()
    x = torch.ones(1024, device=acc.current_device_name())
    assert acc.memory_allocated() >= x.numel() * 4 and acc.on_accelerator(x)
    acc.synchronize()
    s = acc.Stream()
    with acc.stream(s):
        y = x * 2
    s.synchronize()
    assert y.sum().item() == 2048 and acc.is_bf16_supported() == torch.cuda.is_bf16_supported()


# -- utils ---------------------------------------------------------------------------------------------------
def test_log_dist_prints_like_deepspeed():
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    ds_train.utils.logger.addHandler(handler)
    try:
        ds_train.log_dist("no process group: logged", ranks=[1])  # DeepSpeed logs everything without one
        ds_train.log_dist("a warning", level=logging.WARNING)
    finally:
        ds_train.utils.logger.removeHandler(handler)
    assert [r.getMessage() for r in records] == ["[Rank -1] no process group: logged", "[Rank -1] a warning"]
    assert records[1].levelno == logging.WARNING and records[0].funcName == "test_log_dist_prints_like_deepspeed"
    assert ds_train.logger is ds_train.utils.logger and ds_train.logger.level == logging.INFO
    # with a process group (ranks=[1], [-1], None): tests/ds_train/test_deepspeed_comm.py, on 2 ranks


# -- pipe / moe / not supported --------------------------------------------------------------------------------
@pytest.mark.skipif(installed_sibling("ds_pipe") is not None or installed_sibling("ds_moe") is not None,
                    reason="ds-pipe or ds-moe is installed here (tox's ds-train environment has neither)")
def test_pipe_and_moe_without_their_packages_say_what_to_install():
    # tests/ds_pipe on sys.path (tox.ini's pythonpath = tests) imports as an empty namespace package: not ds-pipe
    with pytest.raises(ImportError, match=r"needs the ds-pipe package, which is not installed: pip install "
                                          r"'ds-train\[pipe\]'"):
        from ds_train.pipe import PipelineModule  # noqa: F401
    with pytest.raises(ImportError, match="needs the ds-pipe package"):
        ds_train.PipelineModule  # noqa: B018 - deepspeed.PipelineModule
    with pytest.raises(ImportError, match="needs the ds-pipe package"):
        ds_train.PipelineEngine  # noqa: B018
    with pytest.raises(ImportError, match=r"needs the ds-moe package, which is not installed: pip install "
                                          r"'ds-train\[moe\]'"):
        importlib.import_module("ds_train.moe")
    with pytest.raises(ImportError, match="ds-moe"):
        ds_train.moe  # noqa: B018


def test_names_not_supported_say_so():
    with pytest.raises(AttributeError, match="deepspeed.init_inference is not supported by ds-train yet"):
        ds_train.init_inference  # noqa: B018
    assert not hasattr(ds_train, "InferenceEngine") and not hasattr(ds_train, "no_such_name")
    assert ds_train.DeepSpeedConfigError is ds_train.ConfigError


# -- the opt-in `deepspeed` name --------------------------------------------------------------------------------
def test_alias_maps_deepspeed_to_ds_train_in_this_process_only():
    from ds_train import alias

    assert "deepspeed" not in sys.modules
    alias.install()
    try:
        import deepspeed
        import deepspeed.comm as ds_comm
        from deepspeed.accelerator import get_accelerator as ga

        assert deepspeed is ds_train and ds_comm is ds_train.comm and ga is get_accelerator
        assert ds_train.__spec__.name == "ds_train"  # the alias leaves ds_train's own identity alone
        with pytest.raises(ModuleNotFoundError, match="ds-train has no ds_train.runtime"):
            import deepspeed.runtime.zero  # noqa: F401
        if installed_sibling("ds_pipe") is None:
            with pytest.raises(ImportError, match="ds-pipe"):
                import deepspeed.pipe  # noqa: F401
        else:
            import deepspeed.pipe

            assert deepspeed.pipe.PipelineModule is installed_sibling("ds_pipe").PipelineModule
    finally:
        alias.uninstall()
    assert "deepspeed" not in sys.modules and not alias.is_installed()
    sys.modules["deepspeed"] = types.ModuleType("deepspeed")  # a real DeepSpeed imported first
    try:
        with pytest.raises(RuntimeError, match="the real DeepSpeed is already imported"):
            alias.install()
    finally:
        del sys.modules["deepspeed"]
