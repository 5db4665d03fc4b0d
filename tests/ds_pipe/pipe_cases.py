"""Shared pieces of the ds-pipe tests: a tiny tied-embedding language model as a layer list, its
single-process reference, and the rank worker that runs several pipeline scenarios in one spawn."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ds_pipe import LayerSpec, PipelineEngine, PipelineModule, TiedLayerSpec

VOCAB, HIDDEN, SEQ, MICRO = 32, 16, 4, 2
BASE_SEED = 1234


class Block(nn.Module):
    """A residual MLP block (a transformer layer's shape without attention)."""

    def __init__(self, hidden):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.up = nn.Linear(hidden, 2 * hidden)
        self.down = nn.Linear(2 * hidden, hidden)

    def forward(self, x):
        return x + self.down(torch.tanh(self.up(self.norm(x))))


def head(embedding, x):
    """The LM head: the embedding's weight, transposed (the tie)."""
    return x @ embedding.weight.t()


def lm_loss(logits, labels):
    return F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1))


def layers(n_blocks=2):
    return ([TiedLayerSpec("embed", nn.Embedding, VOCAB, HIDDEN)]
            + [LayerSpec(Block, HIDDEN) for _ in range(n_blocks)]
            + [torch.tanh, LayerSpec(nn.LayerNorm, HIDDEN),
               TiedLayerSpec("embed", nn.Embedding, VOCAB, HIDDEN, forward_fn=head)])


def batches(steps, n_micro, seed=0):
    """``steps`` lists of ``n_micro`` (tokens, next tokens) micro-batches."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        step = []
        for _ in range(n_micro):
            seq = torch.randint(0, VOCAB, (MICRO, SEQ + 1), generator=g)
            step.append((seq[:, :-1], seq[:, 1:]))
        out.append(step)
    return out


class RecordingSGD(torch.optim.SGD):
    """SGD that keeps a copy of every gradient it steps with (the pipeline engine clears them after)."""

    def __init__(self, params, **kw):
        super().__init__(params, **kw)
        self.seen = []

    def step(self, closure=None):
        self.seen.append({id(p): p.grad.clone() for g in self.param_groups for p in g["params"]
                          if p.grad is not None})
        return super().step(closure)


LR, MOMENTUM = 0.1, 0.9


def reference(n_blocks, data, n_micro_per_rank, dp):
    """The same layers in one process: each layer seeded as ``seed_layers=True`` does, the tie one module;
    per step the mean loss over all ``dp * n_micro`` micro-batches, the gradients and the params after SGD."""
    specs = layers(n_blocks)
    named, funcs, tied = {}, [], {}
    for i, spec in enumerate(specs):
        torch.manual_seed(BASE_SEED + i)
        if isinstance(spec, TiedLayerSpec):
            if spec.key not in tied:
                tied[spec.key] = spec.build()
                for n, p in tied[spec.key].named_parameters():
                    named[f"tied_modules.{spec.key}.{n}"] = p
            m = tied[spec.key]
            funcs.append((lambda x, m=m, f=spec.forward_fn: f(m, x)) if spec.forward_fn else m)
        elif isinstance(spec, LayerSpec):
            m = spec.build()
            for n, p in m.named_parameters():
                named[f"{i}.{n}"] = p
            funcs.append(m)
        else:
            funcs.append(spec)
    opt = torch.optim.SGD(list(named.values()), lr=LR, momentum=MOMENTUM)
    out = []
    total = dp * n_micro_per_rank
    for step in data:
        losses = []
        for x, y in step[:total]:
            h = x
            for f in funcs:
                h = f(h)
            loss = lm_loss(h, y)
            (loss / total).backward()
            losses.append(loss.detach())
        grads = {n: p.grad.clone() for n, p in named.items()}
        opt.step()
        opt.zero_grad()
        out.append({"loss": torch.stack(losses).mean().item(), "grads": grads,
                    "params": {n: p.detach().clone() for n, p in named.items()}})
    return out


def _train(case):
    module = PipelineModule(layers(case.get("blocks", 2)), num_stages=case["stages"], loss_fn=lm_loss,
                            seed_layers=True, base_seed=BASE_SEED,
                            partition_method=case.get("partition", "parameters"),
                            activation_checkpoint_interval=case.get("ckpt", 0),
                            virtual_stages=case.get("virtual", 1), virtual_stage_style=case.get("style", "loop"))
    opt = RecordingSGD(module.parameters(), lr=LR, momentum=MOMENTUM)
    n_micro = case["micro"]
    engine = PipelineEngine(module, opt, config={"train_micro_batch_size_per_gpu": MICRO,
                                                 "gradient_accumulation_steps": n_micro,
                                                 "pipeline": {"schedule": case["schedule"]}})
    dp_rank = engine.grid.get_data_parallel_rank()
    data = batches(case["steps"], n_micro * engine.dp_world_size)
    names = {id(p): n for n, p in module.named_parameters()}
    result = {"stage": engine.stage_id, "dp_rank": dp_rank, "parts": module.parts, "steps": [],
              "own": [str(i) for i in module.stage_layers()], "is_last": engine.is_last_stage(),
              "built": sorted({n.split(".")[0] for n, _ in module.named_parameters()})}
    for step in data:
        mine = step[dp_rank * n_micro:(dp_rank + 1) * n_micro]
        loss = engine.train_batch(iter(mine))
        result["steps"].append({
            "loss": loss.item(),
            "grads": {names[i]: g for i, g in opt.seen[-1].items()},
            "params": {n: p.detach().clone() for n, p in module.named_parameters()}})
    if case.get("eval"):
        x = batches(1, n_micro * engine.dp_world_size, seed=99)[0]
        mine = x[dp_rank * n_micro:(dp_rank + 1) * n_micro]
        result["eval"] = engine.eval_batch(iter(mine)).item()
        each, logits = engine.eval_batch(iter(mine), reduce_output=None, return_logits=True)
        result["eval_each"] = each.tolist()
        result["logits_shape"] = None if logits is None else tuple(logits.shape)
    return result


LAYER_LISTS = {
    "layers": layers,
    "one": lambda: [LayerSpec(nn.Linear, 4, 4)],
    "tie_once": lambda: [TiedLayerSpec("embed", nn.Embedding, VOCAB, HIDDEN), LayerSpec(nn.Linear, HIDDEN, HIDDEN),
                         LayerSpec(nn.Linear, HIDDEN, HIDDEN)],
}


def _errors(case):
    """Run a case that must fail; returns (exception type name, message) on this rank."""
    try:
        kind = case["kind"]
        if kind == "module":
            PipelineModule(LAYER_LISTS[case["layers"]](), num_stages=case["stages"], loss_fn=lm_loss,
                           partition_method=case.get("partition", "parameters"))
        elif kind == "schedule":
            module = PipelineModule(layers(), num_stages=case["stages"], loss_fn=lm_loss)
            PipelineEngine(module, lambda p: torch.optim.SGD(p, lr=0.1), config={"pipeline": {
                "schedule": case["schedule"]}})
        elif kind == "dry_iterator":
            module = PipelineModule(layers(), num_stages=case["stages"], loss_fn=lm_loss)
            engine = PipelineEngine(module, lambda p: torch.optim.SGD(p, lr=0.1),
                                    config={"gradient_accumulation_steps": 2})
            data = batches(1, 2)[0]
            # the first stage's iterator is one micro-batch short: both ranks must stop, neither wait
            engine.train_batch(iter(data[:1] if engine.is_first_stage() else data))
        return None
    except Exception as exc:  # noqa: BLE001 - the test reads the type and message
        return type(exc).__name__, str(exc)
