"""DeepSpeed's ``deepspeed.pipe`` (``PipelineModule``, ``LayerSpec``, ``TiedLayerSpec``, ...): re-exported from
ds-pipe when it is installed (``pip install ds-train[pipe]`` or ``pip install ds-pipe``). Without it, importing
this module raises ImportError saying so -- never a stand-in class that would fail later, mid-training."""

try:
    import ds_pipe as _ds_pipe
except ImportError as _exc:
    if _exc.name != "ds_pipe":  # ds-pipe is there but broken: show its own error
        raise
    # the wording is pinned by tests/ds_train/test_deepspeed_api.py (not ds-pipe's to edit): it should become
    # "... which is not installed: pip install 'ds-train[pipe]'" together with that test
    raise ImportError("ds_train.pipe (DeepSpeed's deepspeed.pipe: PipelineModule, LayerSpec, TiedLayerSpec) needs "
                      "the ds-pipe package, which is not built yet; install ds-pipe once it is released. Pipeline "
                      "parallelism is not available in ds-train meanwhile.", name="ds_train.pipe") from None

from ds_pipe import *  # noqa: E402,F401,F403 - the re-export is the point of this module

__all__ = list(getattr(_ds_pipe, "__all__", []))
