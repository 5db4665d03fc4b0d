"""DeepSpeed's ``deepspeed.pipe`` (``PipelineModule``, ``LayerSpec``, ``TiedLayerSpec``, ...): re-exported from
ds-pipe when it is installed. ds-pipe is not built yet, so importing this module raises ImportError saying so --
never a stand-in class that would fail later, mid-training."""

try:
    import ds_pipe as _ds_pipe
except ImportError as _exc:
    if _exc.name != "ds_pipe":  # ds-pipe is there but broken: show its own error
        raise
    raise ImportError("ds_train.pipe (DeepSpeed's deepspeed.pipe: PipelineModule, LayerSpec, TiedLayerSpec) needs "
                      "the ds-pipe package, which is not built yet; install ds-pipe once it is released. Pipeline "
                      "parallelism is not available in ds-train meanwhile.", name="ds_train.pipe") from None

from ds_pipe import *  # noqa: E402,F401,F403 - the re-export is the point of this module

__all__ = list(getattr(_ds_pipe, "__all__", []))
