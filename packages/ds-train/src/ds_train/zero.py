"""DeepSpeed's ``deepspeed.zero`` names: ``from ds_train.zero import Init, GatheredParameters`` (ds-zero's, for
stage 3). ``Init`` builds a model whose params are never materialised whole; the stage-3 engine that
``ds_train.initialize`` builds from a ``"stage": 3`` config shards and initialises it."""

from ds_zero import GatheredParameters, Init

__all__ = ["GatheredParameters", "Init"]
