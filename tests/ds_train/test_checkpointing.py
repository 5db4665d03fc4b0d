"""ds_train.checkpointing (DeepSpeed's activation checkpointing API over torch.utils.checkpoint): the same outputs
and gradients as without checkpointing, dropout masks replayed (torch's generator and the model-parallel tracker),
configure() from a config section or arguments, and the options it refuses."""

import json
import types

import pytest
import torch

from ds_train import checkpointing


@pytest.fixture(autouse=True)
def _fresh_state():
    saved = (dict(checkpointing._options), checkpointing._configured, checkpointing._mpu,
             checkpointing.get_cuda_rng_tracker().get_states(), set(checkpointing.get_cuda_rng_tracker().seeds_))
    yield
    checkpointing._options.clear()
    checkpointing._options.update(saved[0])
    checkpointing._configured, checkpointing._mpu = saved[1], saved[2]
    checkpointing.get_cuda_rng_tracker().set_states(saved[3])
    checkpointing.get_cuda_rng_tracker().seeds_ = saved[4]


def _block():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Dropout(0.5), torch.nn.Linear(16, 8))


def _grads(run, reentrant_input=True):
    torch.manual_seed(1)
    block = _block()
    x = torch.randn(4, 8, requires_grad=reentrant_input)
    torch.manual_seed(2)  # the dropout mask
    out = run(block, x)
    out.square().sum().backward()
    return out.detach(), [p.grad.clone() for p in block.parameters()]


@pytest.mark.parametrize("api", ["checkpoint", "non_reentrant_checkpoint"])
def test_same_outputs_and_gradients_as_without(api):
    plain = _grads(lambda block, x: block(x))
    fn = getattr(checkpointing, api)
    ckpt = _grads(lambda block, x: fn(block, x))
    assert torch.equal(plain[0], ckpt[0])  # torch's generator replayed: the same dropout mask twice
    for a, b in zip(plain[1], ckpt[1]):
        torch.testing.assert_close(a, b)


def test_model_parallel_tracker_is_replayed_in_the_recomputation():
    checkpointing.model_parallel_cuda_manual_seed(123)
    tracker = checkpointing.get_cuda_rng_tracker()

    def region(block, x):
        with tracker.fork():  # a model-parallel dropout, as Megatron's layers do
            return torch.nn.functional.dropout(block(x), 0.5)

    start = tracker.get_states()
    plain = _grads(region)
    after_plain = tracker.get_states()
    tracker.set_states(start)
    ckpt = _grads(lambda block, x: checkpointing.checkpoint(region, block, x))
    assert torch.equal(plain[0], ckpt[0])
    for a, b in zip(plain[1], ckpt[1]):
        torch.testing.assert_close(a, b)
    # the tracker continues from where the real forward left it, not from the recomputation
    assert all(torch.equal(tracker.get_states()[k], v) for k, v in after_plain.items())
    with pytest.raises(ValueError, match="already exists"):
        tracker.add("model-parallel-rng", 99)
    with pytest.raises(KeyError, match="no state named 'other'"):
        with tracker.fork("other"):
            pass
    checkpointing.model_parallel_reconfigure_tp_seed(5)
    assert not torch.equal(tracker.get_states()["model-parallel-rng"], after_plain["model-parallel-rng"])


def test_configure_from_a_config_and_arguments(tmp_path):
    assert not checkpointing.is_configured()
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_batch_size": 8, "activation_checkpointing": {
        "partition_activations": True, "cpu_checkpointing": True, "contiguous_memory_optimization": True,
        "number_checkpoints": 4, "synchronize_checkpoint_boundary": True, "profile": False}}))
    checkpointing.configure(None, deepspeed_config=str(path), synchronize=False)
    assert checkpointing.is_configured()
    assert checkpointing._options == {"partition_activations": True, "contiguous_checkpointing": True,
                                      "num_checkpoints": 4, "checkpoint_in_cpu": True, "synchronize": False,
                                      "profile": False}
    # the options that work on the CPU run and change nothing numerically
    checkpointing.configure(None, checkpoint_in_cpu=True, synchronize=True)
    plain = _grads(lambda block, x: block(x))
    ckpt = _grads(lambda block, x: checkpointing.checkpoint(block, x))
    assert torch.equal(plain[0], ckpt[0])
    checkpointing.set_num_layers(3)
    checkpointing.partition_activations_in_checkpoint(False)
    checkpointing.reset()


def test_configure_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="unknown key 'cpu_checkpoint'; did you mean 'cpu_checkpointing'"):
        checkpointing.configure(None, deepspeed_config={"activation_checkpointing": {"cpu_checkpoint": True}})
    with pytest.raises(ValueError, match="needs num_checkpoints"):
        checkpointing.configure(None, contiguous_checkpointing=True)
    with pytest.raises(TypeError, match="synchronize must be true or false"):
        checkpointing.configure(None, synchronize="yes")
    mpu = types.SimpleNamespace(get_model_parallel_world_size=lambda: 2, get_model_parallel_rank=lambda: 1)
    with pytest.raises(ValueError, match="partition_activations: the mpu .* no get_model_parallel_group"):
        checkpointing.configure(mpu, partition_activations=True)
    checkpointing.configure(mpu)  # model parallel without partitioning: fine
    with pytest.raises(ValueError, match="partition_activations"):
        checkpointing.partition_activations_in_checkpoint(True)
    with pytest.raises(TypeError, match="must be callable"):
        checkpointing.checkpoint("not a function", torch.zeros(1))
    checkpointing.model_parallel_cuda_manual_seed(7)  # the tensor-parallel rank comes from the mpu: 7 + 2718 + 1
    probe = checkpointing.CudaRNGStatesTracker()
    probe.add("x", 7 + 2718 + 1)
    assert torch.equal(probe.get_states()["x"], checkpointing.get_cuda_rng_tracker().get_states()["model-parallel-rng"])


def test_the_config_section_is_validated_at_load_and_read_by_configure():
    from ds_train import ConfigError, load_config

    cfg = load_config({"train_batch_size": 8, "activation_checkpointing": {"cpu_checkpointing": True,
                                                                           "number_checkpoints": 2}})
    checkpointing.configure(None, deepspeed_config=cfg)  # a parsed DeepSpeedConfig works too
    assert checkpointing._options["checkpoint_in_cpu"] and checkpointing._options["num_checkpoints"] == 2
    with pytest.raises(ConfigError, match="activation_checkpointing.contiguous_memory_optimization needs "
                                          "activation_checkpointing.number_checkpoints"):
        load_config({"train_batch_size": 8, "activation_checkpointing": {"contiguous_memory_optimization": True}})
    with pytest.raises(ConfigError, match="unknown key 'profiles'; did you mean 'profile'"):
        load_config({"train_batch_size": 8, "activation_checkpointing": {"profiles": True}})


@pytest.mark.parametrize("api", ["checkpoint", "non_reentrant_checkpoint"])
def test_profile_times_each_forward_and_recomputation(api, caplog):
    checkpointing.configure(None, profile=True)
    checkpointing.reset_profile_stats()
    fn = getattr(checkpointing, api)
    with caplog.at_level("INFO", logger="ds_train"):
        plain = _grads(lambda block, x: block(x))
        ckpt = _grads(lambda block, x: fn(block, x))
    assert torch.equal(plain[0], ckpt[0])
    stats = checkpointing.profile_stats()
    assert stats["forwards"] == 1 and stats["recomputes"] == 1 and stats["forward_s"] > 0 and stats["recompute_s"] > 0
    messages = [r.getMessage() for r in caplog.records]
    assert any("checkpoint forward" in m for m in messages) and any("checkpoint recompute" in m for m in messages)
