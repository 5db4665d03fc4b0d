"""Checkpoints: atomic per-rank shards with a checksummed commit marker, reshard on load, consolidation.

- :mod:`._io`: atomic writes (temp name, fsync, rename, directory fsync), sha256, safe ``torch.load``;
- :mod:`.save` / :mod:`.load`: the engine's ``save_checkpoint`` / ``load_checkpoint``;
- :mod:`.reshard`: full (layout-independent) fp32 masters and optimizer states from all shards, and their
  re-partitioning for another data-parallel size;
- :mod:`.consolidate`: one plain state dict for the bare model.
"""

from ._io import CheckpointError
from .consolidate import consolidate_checkpoint

__all__ = ["CheckpointError", "consolidate_checkpoint"]
