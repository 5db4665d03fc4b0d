"""One plain state dict from a ds-zero checkpoint (DeepSpeed's ``zero_to_fp32``), on CPU, no process group.

Trainable params come from the fp32 masters (reassembled from every rank's shards, so the result does not
depend on the world size the checkpoint was saved with); frozen params and buffers from the module state
dict; tied weights appear under every name the module has. The result loads with plain
``torch.load(path, weights_only=True)`` + ``model.load_state_dict``.
"""

from __future__ import annotations

import os

import torch

from ._io import CheckpointError, model_file, read_marker, resolve_tag, safe_load
from .load import _saved_full
from .stage3 import module_state_from_stage3

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16}


def consolidate_checkpoint(ckpt_dir, tag: str | None = None, dtype: torch.dtype | str = torch.float32
                           ) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` for the bare model; floating-point tensors in ``dtype`` (fp32 by default)."""
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        dtype = _DTYPES[dtype]
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be torch.float32, torch.bfloat16 or torch.float16, got {dtype}")
    ckpt_dir = os.fspath(ckpt_dir)
    tag = resolve_tag(ckpt_dir, tag)
    path = os.path.join(ckpt_dir, tag)
    marker = read_marker(path)
    model = safe_load(path, model_file(), marker)
    if model.get("experts"):
        raise CheckpointError(
            f"{path}: consolidate_checkpoint does not assemble MoE checkpoints: the experts are saved per global "
            "expert (layer_<L>_expert_<E>_mp_rank_00_model_states.pt) and their parameter names depend on ep_size; "
            "load the weights into a model of any ep_size with engine.load_checkpoint(..., "
            "load_optimizer_states=False)")
    saved = _saved_full(path, marker, model)
    full = saved["params"]
    module = model["module"]
    if model["mode"] == "stage3":  # the sharded params are reassembled from every rank's rows
        module = module_state_from_stage3(model, saved, torch.float32)
    aliases = model.get("aliases", {})
    out = {}
    for name, value in module.items():
        src = full.get(name, full.get(aliases.get(name, ""), value))
        out[name] = src.to(dtype).clone() if src.is_floating_point() else src.clone()
    return out
