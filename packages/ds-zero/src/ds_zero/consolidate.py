"""``python -m ds_zero.consolidate CKPT_DIR OUT.pt [--tag T] [--dtype fp32|bf16|fp16]``: write one plain state
dict (trainable params from the fp32 masters) that ``torch.load(..., weights_only=True)`` +
``model.load_state_dict`` loads into the bare model. CPU only, no process group."""

from __future__ import annotations

import argparse
import os
import sys


from .checkpoint import CheckpointError, consolidate_checkpoint
from .checkpoint._io import atomic_torch_save


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ds_zero.consolidate", description=__doc__.split("\n\n")[0])
    parser.add_argument("ckpt_dir", help="the save_dir given to engine.save_checkpoint (holds 'latest')")
    parser.add_argument("out", help="output .pt file")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: the one named in 'latest')")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    args = parser.parse_args(argv)
    try:
        state = consolidate_checkpoint(args.ckpt_dir, tag=args.tag, dtype=args.dtype)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    atomic_torch_save(state, args.out)
    n = sum(v.numel() for v in state.values())
    print(f"wrote {args.out}: {len(state)} tensors, {n:,} elements ({args.dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
