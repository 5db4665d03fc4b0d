"""ds-pipe in one process: DeepSpeed's topology rank layout, the partition methods, building only the own
stage's layers, the forward with activation checkpointing, and config validation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ds_pipe import (LayerSpec, PipeConfig, PipeDataParallelTopology, PipeModelDataParallelTopology,
                     PipelineModule, ProcessTopology, TiedLayerSpec)
from ds_pipe._partition import partition_balanced, partition_uniform
from pipe_cases import BASE_SEED, layers, lm_loss


def test_topology_matches_deepspeed_layout():
    topo = PipeDataParallelTopology(num_pp=2, num_dp=2)
    assert topo.get_axis_names() == ["pipe", "data"]
    # last axis fastest: data-parallel peers are adjacent ranks
    assert [topo.get_rank(pipe=p, data=d) for p in range(2) for d in range(2)] == [0, 1, 2, 3]
    assert topo.get_axis_comm_lists("pipe") == [[0, 2], [1, 3]]
    assert topo.get_axis_comm_lists("data") == [[0, 1], [2, 3]]
    assert topo.get_axis_comm_lists("model") == []
    assert topo.get_coord(3) == topo.ProcessCoord(pipe=1, data=1)
    assert topo.filter_match(pipe=1) == [2, 3]
    assert topo.get_dim("model") == 1
    t3 = PipeModelDataParallelTopology(num_pp=2, num_mp=2, num_dp=3)
    assert t3.get_axis_names() == ["pipe", "data", "model"] and t3.world_size() == 12
    assert t3.get_rank(pipe=1, data=2, model=1) == 1 * 6 + 2 * 2 + 1
    assert t3.get_rank_repr(5) == "model_01"
    with pytest.raises(ValueError, match="axis 'x' has size 0"):
        ProcessTopology(["x"], [0])
    with pytest.raises(ValueError, match="needs a coordinate on every axis"):
        topo.get_rank(pipe=0)


def test_partition_methods():
    assert partition_uniform(7, 3) == [0, 3, 5, 7]
    assert partition_uniform(6, 3) == [0, 2, 4, 6]
    # the heavy layer alone, and no stage empty although most layers weigh nothing
    assert partition_balanced([1, 100, 1, 1], 2) == [0, 2, 4]
    parts = partition_balanced([0, 0, 0, 0, 5], 3)
    assert all(parts[s + 1] > parts[s] for s in range(3)), parts
    assert partition_balanced([3, 3, 3, 3], 2) == [0, 2, 4]


def test_one_stage_module_builds_and_runs():
    module = PipelineModule(layers(), num_stages=1, loss_fn=lm_loss, seed_layers=True, base_seed=BASE_SEED)
    assert module.parts == [0, 6] and module.stage_id == 0 and module.is_first_stage() and module.is_last_stage()
    # the tie is one module; layers are registered under their global index (DeepSpeed's state-dict names)
    names = {n for n, _ in module.named_parameters()}
    assert "tied_modules.embed.weight" in names and "1.up.weight" in names and "4.weight" in names
    x = torch.randint(0, 32, (2, 4))
    torch.manual_seed(BASE_SEED + 1)
    want = nn.Linear(16, 32).weight  # Block(16).norm has no random init; its up layer is the first draw
    assert torch.equal(module.get_submodule("1").up.weight, want)
    out = module(x)
    assert out.shape == (2, 4, 32)


def test_activation_checkpointing_gives_the_same_gradients():
    grads = []
    for interval in (0, 2):
        module = PipelineModule(layers(), num_stages=1, loss_fn=lm_loss, seed_layers=True,
                                activation_checkpoint_interval=interval)
        torch.manual_seed(0)
        x, y = torch.randint(0, 32, (2, 4)), torch.randint(0, 32, (2, 4))
        lm_loss(module(x), y).backward()
        grads.append({n: p.grad for n, p in module.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=0, atol=0)


def test_partition_by_type_and_errors():
    spec = [LayerSpec(nn.Linear, 4, 4), torch.relu, LayerSpec(nn.Linear, 4, 4), torch.relu]
    with pytest.raises(ValueError, match="matches no layer class"):
        PipelineModule(spec, num_stages=1, partition_method="type:conv")
    with pytest.raises(ValueError, match="use 'parameters', 'uniform' or 'type:REGEX'"):
        PipelineModule(spec, num_stages=1, partition_method="best-effort")
    with pytest.raises(NotImplementedError, match="profile"):
        PipelineModule(spec, num_stages=1, partition_method="profile")
    with pytest.raises(ValueError, match="give num_stages or topology"):
        PipelineModule(spec)
    with pytest.raises(ValueError, match="num_stages=2 does not divide the world size 1"):
        PipelineModule(spec, num_stages=2)
    with pytest.raises(TypeError, match="layer 1 .* is not a LayerSpec"):
        PipelineModule([spec[0], 3], num_stages=1)
    with pytest.raises(ValueError, match="builds TiedLayerSpec\\('t', Linear\\) but layer 0 builds"):
        PipelineModule([TiedLayerSpec("t", nn.Embedding, 4, 4), TiedLayerSpec("t", nn.Linear, 4, 4)], num_stages=1)
    with pytest.raises(TypeError, match="nn.Module subclass"):
        LayerSpec(torch.relu)


def test_layer_spec_counts_parameters_without_building_on_this_device():
    built = []

    class Big(nn.Linear):
        def __init__(self):
            super().__init__(1000, 1000)
            built.append(self.weight.device.type)

    PipelineModule([LayerSpec(Big), LayerSpec(nn.Linear, 1, 1)], num_stages=1)
    # counted on meta for the partition, then built once for real (this stage owns it)
    assert built == ["meta", "cpu"]


class _Stub:
    num_stages, seed_layers, activation_checkpoint_interval, virtual_stages = 2, False, 0, 1


class _Stub2(_Stub):
    virtual_stages = 2


@pytest.mark.parametrize("config,err,text", [
    ({"pipeline": {"schedule": "dualpipev"}}, ValueError, "'dualpipev' runs several chunks per rank"),
    ({"pipeline": {"schedul": "1f1b"}}, ValueError, "did you mean 'schedule'"),
    ({"zero_optimization": {"stage": 4}}, ValueError, "zero_optimization.stage must be 0, 1, 2 or 3"),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {}}}, ValueError,
     "zero_optimization.offload_optimizer is not supported with a pipeline"),
    ({"optimizer": {"type": "Adam"}}, ValueError, "'optimizer' given to ds-pipe directly is not built"),
    ({"gradient_accumulation_step": 2}, ValueError, "did you mean 'gradient_accumulation_steps'"),
    ({"train_batch_size": 10, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2},
     ValueError, "train_batch_size=10 != "),
    ({"pipeline": {"stages": 4}}, ValueError, "pipeline.stages=4 but the PipelineModule has 2"),
    ({"pipeline": {"seed_layers": True}}, ValueError, "pipeline.seed_layers=True but the PipelineModule"),
    ({"pipeline": {"schedule": "interleaved"}}, ValueError, "runs several chunks per rank: build the "
                                                            "PipelineModule with virtual_stages >= 2"),
    ({"pipeline": {"schedule": "zero_bubble", "virtual_stages": 2}}, ValueError,
     r"pipeline.virtual_stages=2 but the PipelineModule was built with virtual_stages=1"),
    ({"fp16": {"enabled": True}, "bf16": {"enabled": True}}, ValueError, "fp16 and bf16 are both enabled"),
    ({"fp16": {"enabled": True, "auto_cast": True}}, ValueError, "fp16.auto_cast is not supported with a pipeline"),
    ({"bf16": True}, ValueError, "'bf16' must be a dict"),
    ({"gradient_clipping": -1}, ValueError, "gradient_clipping must be a finite number >= 0"),
])
def test_config_errors(config, err, text):
    with pytest.raises(err, match=text):
        PipeConfig.from_dict(config, dp_size=2, module=_Stub())


class _StubV(_Stub2):
    virtual_stage_style = "v"


def test_config_chunk_placement_must_fit_the_schedule():
    with pytest.raises(ValueError, match="'zbv' needs the chunks placed 'v': build the PipelineModule with "
                                         "virtual_stage_style='v'"):
        PipeConfig.from_dict({"pipeline": {"schedule": "zbv"}}, 1, _Stub2())
    with pytest.raises(ValueError, match="'interleaved' needs the chunks placed 'loop'"):
        PipeConfig.from_dict({"pipeline": {"schedule": "interleaved"}}, 1, _StubV())
    assert PipeConfig.from_dict({"pipeline": {"schedule": "dualpipev"}}, 1, _StubV()).schedule == "dualpipev"


def test_config_virtual_stages_need_a_multi_chunk_schedule():
    with pytest.raises(ValueError, match="virtual_stages=2; pipeline.schedule='1f1b' runs one chunk per rank"):
        PipeConfig.from_dict({}, dp_size=1, module=_Stub2())
    assert PipeConfig.from_dict({"pipeline": {"schedule": "looped_bfs", "virtual_stages": 2}}, 1,
                                _Stub2()).schedule == "looped_bfs"


def test_config_precision_sections():
    cfg = PipeConfig.from_dict({"fp16": {"enabled": True, "initial_scale_power": 12}, "gradient_clipping": 1.0},
                               1, _Stub())
    assert cfg.dtype == torch.float16 and cfg.fp16 == {"initial_scale_power": 12} and cfg.gradient_clipping == 1.0
    assert PipeConfig.from_dict({"bf16": {"enabled": True}}, 1, _Stub()).dtype == torch.bfloat16
    assert PipeConfig.from_dict({"bf16": {"enabled": False}, "fp16": {"enabled": False}}, 1, _Stub()).dtype \
        == torch.float32


def test_config_batch_arithmetic():
    assert PipeConfig.from_dict({"train_batch_size": 16, "train_micro_batch_size_per_gpu": 2}, 2, _Stub()) \
        == PipeConfig(micro_batches=4, micro_batch_size=2, schedule="1f1b")
    assert PipeConfig.from_dict({"train_batch_size": 16, "gradient_accumulation_steps": 4,
                                 "pipeline": {"schedule": "GPipe"}}, 2, _Stub()).micro_batch_size == 2
    assert PipeConfig.from_dict(None, 1, _Stub()).micro_batches == 1


def test_ds_train_pipe_reexports_ds_pipe():
    pipe = pytest.importorskip("ds_train.pipe", reason="ds-train is not installed in this environment")
    import ds_pipe
    assert pipe.PipelineModule is ds_pipe.PipelineModule and pipe.LayerSpec is ds_pipe.LayerSpec
