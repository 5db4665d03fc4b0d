"""DeepSpeed's ``deepspeed.moe`` (``deepspeed.moe.layer.MoE``, ``deepspeed.moe.utils``...): re-exported from ds-moe
when it is installed. ds-moe is not built yet, so importing this module (or ``ds_train.moe.layer``) raises
ImportError saying so -- never a stand-in class."""

try:
    import ds_moe as _ds_moe
except ImportError as _exc:
    if _exc.name != "ds_moe":  # ds-moe is there but broken: show its own error
        raise
    raise ImportError("ds_train.moe (DeepSpeed's deepspeed.moe: MoE layers, expert parallelism) needs the ds-moe "
                      "package, which is not built yet; install ds-moe once it is released. Mixture of experts is "
                      "not available in ds-train meanwhile.", name="ds_train.moe") from None

from ds_moe import *  # noqa: E402,F401,F403 - the re-export is the point of this module

__all__ = list(getattr(_ds_moe, "__all__", []))
