"""DeepSpeed's ``deepspeed.moe``: ds-moe re-exported (``pip install 'ds-train[moe]'``), with DeepSpeed's submodules
``layer`` (``MoE``), ``sharded_moe`` (``TopKGate``, ``MOELayer``, ``top1gating``...), ``experts`` and ``utils``
(``is_moe_param``, ``split_params_into_different_moe_groups_for_optimizer``...). Without ds-moe, importing this
module (or ``ds_train.moe.layer``) raises ImportError saying what to install -- never a stand-in class."""

from .._optional import installed_sibling

_ds_moe = installed_sibling("ds_moe")
if _ds_moe is None:
    raise ImportError("ds_train.moe (DeepSpeed's deepspeed.moe: MoE layers, expert parallelism) needs the ds-moe "
                      "package, which is not installed: pip install 'ds-train[moe]' (or pip install ds-moe)",
                      name="ds_train.moe")

__all__ = list(getattr(_ds_moe, "__all__", []))
globals().update({name: getattr(_ds_moe, name) for name in __all__})
