"""Curriculum learning (DeepSpeed's legacy ``curriculum_learning`` section): the difficulty per step equals
DeepSpeed's CurriculumScheduler formulas for every schedule type (the oracle below is written from the formulas,
independently of ds_train.curriculum), the engine passes it to the model as ``curriculum_seqlen=`` at each
training forward, and bad sections / the newer ``data_efficiency`` section are refused by name."""

import math

import pytest
import torch
from harness import run_distributed

from ds_train.curriculum import CurriculumScheduler, check_section


# -- the oracle: DeepSpeed's formulas -------------------------------------------------------------------------
def oracle_difficulty(cfg, step):
    low, high, sc = cfg["min_difficulty"], cfg["max_difficulty"], cfg["schedule_config"]
    if cfg["schedule_type"] == "fixed_discrete":
        for d, s in zip(sc["difficulty"], sc["max_step"]):
            if step <= s:
                return d
        return sc["difficulty"][-1]
    degree = 1 if cfg["schedule_type"] == "fixed_linear" else sc["root_degree"]
    d = math.floor((step / sc["total_curriculum_step"]) ** (1 / degree) * (high - low) + low)
    d = d - d % sc["difficulty_step"]
    first = math.ceil(low / sc["difficulty_step"]) * sc["difficulty_step"]
    return min(max(d, first), high)


def oracle_sequence(cfg, steps):
    """What the engine's forwards see: difficulty updated with global_steps + 1 while below max_difficulty."""
    current, out = cfg["min_difficulty"], []
    for global_steps in range(steps):
        if current < cfg["max_difficulty"]:
            current = oracle_difficulty(cfg, global_steps + 1)
        out.append(current)
    return out


LINEAR = {"curriculum_type": "seqlen", "min_difficulty": 8, "max_difficulty": 64, "schedule_type": "fixed_linear",
          "schedule_config": {"total_curriculum_step": 10, "difficulty_step": 8}}
ROOT = {"curriculum_type": "seqlen", "min_difficulty": 8, "max_difficulty": 64, "schedule_type": "fixed_root",
        "schedule_config": {"total_curriculum_step": 12, "difficulty_step": 8, "root_degree": 2}}
DISCRETE = {"curriculum_type": "seqlen", "min_difficulty": 16, "max_difficulty": 64,
            "schedule_type": "fixed_discrete", "schedule_config": {"difficulty": [16, 32, 64], "max_step": [3, 6]}}
#: min_difficulty below the first multiple of difficulty_step: DeepSpeed raises the floor to 16, not 0
ODD = {"curriculum_type": "seqlen", "min_difficulty": 5, "max_difficulty": 100, "schedule_type": "fixed_linear",
       "schedule_config": {"total_curriculum_step": 7, "difficulty_step": 16}}


@pytest.mark.parametrize("cfg", [LINEAR, ROOT, DISCRETE, ODD], ids=["linear", "root", "discrete", "odd_min"])
def test_difficulty_per_step_equals_deepspeeds_formulas(cfg):
    sched = CurriculumScheduler(cfg)
    for step in range(0, 40):
        assert sched.get_difficulty(step) == oracle_difficulty(cfg, step), step
    sched = CurriculumScheduler(cfg)
    seen = [sched.update_difficulty(s + 1) for s in range(30)]
    assert seen == oracle_sequence(cfg, 30)
    assert seen[-1] == cfg["max_difficulty"] and len(set(seen)) > 2  # it grew, in several steps
    state = sched.get_state()
    assert state["current_difficulty"] == cfg["max_difficulty"] and state["schedule_type"] == cfg["schedule_type"]


def test_hand_checked_values():
    # fixed_linear 8..64 over 10 steps, step 8: step 3 -> floor(0.3 * 56 + 8) = 24; step 5 -> 36 -> 32
    sched = CurriculumScheduler(LINEAR)
    assert [sched.get_difficulty(s) for s in (0, 1, 3, 5, 10, 11)] == [8, 8, 24, 32, 64, 64]
    # fixed_root degree 2 over 12 steps: step 3 -> sqrt(1/4) * 56 + 8 = 36 -> 32
    assert CurriculumScheduler(ROOT).get_difficulty(3) == 32
    assert [CurriculumScheduler(DISCRETE).get_difficulty(s) for s in (0, 3, 4, 6, 7)] == [16, 16, 32, 32, 64]
    assert CurriculumScheduler(ODD).get_difficulty(0) == 16


def test_custom_schedule_and_errors():
    sched = CurriculumScheduler({**LINEAR, "schedule_type": "custom", "schedule_config": {}})
    with pytest.raises(RuntimeError, match="set_custom_curriculum_learning_schedule"):
        sched.update_difficulty(1)
    sched.set_custom_get_difficulty(lambda step: 8 * (step + 1))
    assert sched.update_difficulty(3) == 32
    bad = [({**LINEAR, "schedule_type": "fixed_linearr"}, "did you mean 'fixed_linear'"),
           ({**LINEAR, "schedule_config": {"total_curriculum_step": 10}}, "difficulty_step is required"),
           ({**ROOT, "schedule_config": {"total_curriculum_step": 10, "difficulty_step": 8}}, "root_degree"),
           ({**DISCRETE, "schedule_config": {"difficulty": [1, 2], "max_step": [1, 2]}}, "one element more"),
           ({**LINEAR, "min_difficulty": 80}, "below min_difficulty"),
           ({**LINEAR, "max_difficulty": 0}, "max_difficulty must be an int >= 1"),
           ({**LINEAR, "schedule_config": {"total_curriculum_step": 10, "difficulty_step": 8, "max_steps": 1}},
            "did you mean 'max_step'")]
    for cfg, match in bad:
        with pytest.raises(ValueError, match=match):
            check_section({"enabled": True, **cfg})
    with pytest.raises(ValueError, match="curriculum_learning.min_difficulty is required"):
        check_section({"enabled": True, "curriculum_type": "seqlen"})
    assert check_section({"enabled": False}) == {"enabled": False}


def test_config_accepts_the_section_and_refuses_data_efficiency():
    from ds_train import ConfigError, load_config

    cfg = load_config({"train_batch_size": 8, "curriculum_learning": {"enabled": True, **LINEAR}})
    assert cfg.curriculum_learning["schedule_type"] == "fixed_linear"
    with pytest.raises(ConfigError, match="curriculum_learning.schedule_config.difficulty_step is required"):
        load_config({"train_batch_size": 8, "curriculum_learning": {
            "enabled": True, **LINEAR, "schedule_config": {"total_curriculum_step": 4}}})
    with pytest.raises(ConfigError, match="data_efficiency: data efficiency .* not supported yet"):
        load_config({"train_batch_size": 8, "data_efficiency": {"enabled": True}})


# -- through the engine ----------------------------------------------------------------------------------------
class SeqModel(torch.nn.Module):
    """Truncates its batch to curriculum_seqlen, as Megatron-DeepSpeed's GPT does, and records it."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(16, 8)
        self.out = torch.nn.Linear(8, 1)
        self.seen = []

    def forward(self, tokens, curriculum_seqlen=None):
        self.seen.append((curriculum_seqlen, self.training))
        if curriculum_seqlen is not None:
            tokens = tokens[:, :curriculum_seqlen]
        return self.out(self.emb(tokens)).mean()


def _train(section, steps, gas):
    import ds_train

    torch.manual_seed(0)
    model = SeqModel()
    engine, *_ = ds_train.initialize(model=model, config={
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": gas,
        "optimizer": {"type": "SGD", "params": {"lr": 0.1}}, "curriculum_learning": section})
    tokens = torch.randint(0, 16, (2, 64))
    lengths = []
    for _ in range(steps * gas):
        model.seen.clear()
        loss = engine(tokens)
        lengths.append(model.seen[-1][0])
        engine.backward(loss)
        engine.step()
    engine.eval()
    model.seen.clear()
    engine(tokens)
    scheduler_ok = engine.curriculum_scheduler is engine.curriculum_scheduler_legacy is not None
    return lengths, model.seen[-1], scheduler_ok, engine.curriculum_enabled_legacy()


def test_engine_passes_curriculum_seqlen_per_step():
    steps, gas = 12, 2
    lengths, evaluated, scheduler_ok, enabled = run_distributed(_train, 1, {"enabled": True, **LINEAR}, steps, gas,
                                                                timeout=120)[0]
    per_step = oracle_sequence(LINEAR, steps)
    assert lengths == [d for d in per_step for _ in range(gas)]  # every micro-batch of a step: that step's length
    assert evaluated == (None, False)  # evaluation forwards get no curriculum_seqlen (DeepSpeed's rule)
    assert scheduler_ok and enabled
    off = run_distributed(_train, 1, {"enabled": False}, 2, 1, timeout=120)[0]
    assert off[0] == [None, None] and off[3] is False
