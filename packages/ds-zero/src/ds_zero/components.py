"""The pieces of ds-zero's engine that engines built on it use (ds-pipe's ZeRO-1/2 with a pipeline): a public
surface, so that they do not reach into ds-zero's private modules and a refactoring here does not break them.

- ``collectives``: the engine's async collectives (``all_reduce``, ``reduce_scatter``, ``all_gather``, ``wait``,
  ``active``) with a one-process fallback (``ds_zero._comm``).
- ``materialize_optimizer``: a DeepSpeed-style optimizer argument (an instance, a class, a callable or None) as an
  optimizer over the given params, or its template only.
- ``rebuild_optimizer``: the template's class and per-group hyper-parameters over other params (the fp32 master
  shards).
- ``bind_scheduler``: an LR scheduler built over the template re-pointed at the rebuilt optimizer.
"""

from . import _comm as collectives
from ._optim import bind_scheduler, materialize_optimizer, rebuild_optimizer

__all__ = ["bind_scheduler", "collectives", "materialize_optimizer", "rebuild_optimizer"]
