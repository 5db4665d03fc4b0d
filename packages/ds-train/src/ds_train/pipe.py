"""DeepSpeed's ``deepspeed.pipe`` (``PipelineModule``, ``LayerSpec``, ``TiedLayerSpec``, topologies,
``PipelineEngine``): re-exported from ds-pipe (``pip install 'ds-train[pipe]'``). ``ds_train.initialize`` given a
``PipelineModule`` returns ds-pipe's engine (``train_batch`` / ``eval_batch``). Without ds-pipe, importing this
module raises ImportError saying what to install -- never a stand-in class that would fail later, mid-training."""

from ._optional import installed_sibling

_ds_pipe = installed_sibling("ds_pipe")
if _ds_pipe is None:
    raise ImportError("ds_train.pipe (DeepSpeed's deepspeed.pipe: PipelineModule, LayerSpec, TiedLayerSpec) needs "
                      "the ds-pipe package, which is not installed: pip install 'ds-train[pipe]' (or "
                      "pip install ds-pipe)", name="ds_train.pipe")

__all__ = [name for name in _ds_pipe.__all__ if name != "initialize"]  # ds_train.initialize is the one call
globals().update({name: getattr(_ds_pipe, name) for name in __all__})
