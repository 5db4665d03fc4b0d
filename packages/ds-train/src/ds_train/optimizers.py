"""DeepSpeed's ``"optimizer": {"type": T, "params": {...}}`` -> a ds-optim, ds-comm or torch optimizer.

Types are matched case-insensitively, as DeepSpeed does:

============================  ==================================================================================
``Adam``                      :class:`ds_optim.FusedAdam`; ``adam_w_mode`` defaults to ``true`` as in DeepSpeed (so
                              DeepSpeed's "Adam" decouples weight decay unless told otherwise)
``AdamW``                     :class:`ds_optim.FusedAdamW` (``weight_decay`` defaults to 0 as DeepSpeed's, not torch's
                              0.01)
``Adam``/``AdamW`` with       ``torch.optim.AdamW`` (decoupled) or ``torch.optim.Adam``
``"torch_adam": true``
``Lamb``                      :class:`ds_optim.FusedLamb` (``max_grad_norm`` only 0: clip with ``gradient_clipping``)
``Lion``                      :class:`ds_optim.FusedLion`
``Adagrad``                   :class:`ds_optim.FusedAdagrad`
``OneBitAdam``, ``OneBitLamb``, ds-comm's :class:`~ds_comm.OnebitAdam`, :class:`~ds_comm.OnebitLamb`,
``ZeroOneAdam``               :class:`~ds_comm.ZeroOneAdam` (through ``ds_comm.optim.config``)
any ``torch.optim`` class     by its exact name (``SGD``, ``RMSprop``, ...): DeepSpeed's fallback too
============================  ==================================================================================

Parameter names are checked when the config is parsed (:func:`check_optimizer_params`), against the
signature of the class that will be built, so a typo fails before any model exists, naming
``optimizer.params.<key>`` and the closest accepted name; values are checked by the optimizer itself.
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any, Iterable, Mapping

import torch

import ds_optim

__all__ = ["KNOWN_OPTIMIZERS", "COMPRESSED_OPTIMIZERS", "canonical_optimizer_name", "check_optimizer_params",
           "build_optimizer", "effective_optimizer_params"]

#: DeepSpeed's names (lower-case key -> the spelling DeepSpeed documents)
KNOWN_OPTIMIZERS = {"adam": "Adam", "adamw": "AdamW", "lamb": "Lamb", "lion": "Lion", "adagrad": "Adagrad",
                    "onebitadam": "OneBitAdam", "onebitlamb": "OneBitLamb", "zerooneadam": "ZeroOneAdam"}
#: the communication-efficient ones (ds-comm): they communicate themselves, so they need ZeRO stage 0
COMPRESSED_OPTIMIZERS = {"onebitadam", "onebitlamb", "zerooneadam"}
# DeepSpeed names that exist there but not here yet
_NOT_BUILT = {"muadam": "MuAdam", "muadamw": "MuAdamW", "musgd": "MuSGD", "muon": "Muon"}
# keys DeepSpeed itself consumes before calling the class
_ADAM_KEYS = {"adam_w_mode", "torch_adam"}
# arguments that are not hyper-parameters
_NOT_PARAMS = {"self", "params", "process_group"}
# torch.optim's implementation switches, accepted for drop-in compatibility; left out of the printed config
_TORCH_COMPAT = {"foreach", "fused", "capturable", "differentiable"}


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    choices = list(choices)
    by_lower = {c.lower(): c for c in choices}
    close = difflib.get_close_matches(str(word).lower(), list(by_lower), n=1, cutoff=0.6)
    return f"; did you mean {by_lower[close[0]]!r}?" if close else ""


def _known_list() -> str:
    return ", ".join(KNOWN_OPTIMIZERS.values()) + ", or a torch.optim class by name (e.g. SGD)"


def _torch_optimizer(name: str):
    cls = getattr(torch.optim, str(name), None)
    if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer) and cls is not torch.optim.Optimizer:
        return cls
    return None


def canonical_optimizer_name(type_name: str) -> str:
    """The lower-case DeepSpeed name of ``type_name`` or the exact torch.optim class name; errors otherwise."""
    key = str(type_name).lower()
    if key in KNOWN_OPTIMIZERS:
        return key
    if key in _NOT_BUILT:
        raise ValueError(f"optimizer.type {type_name!r} ({_NOT_BUILT[key]}) is not supported yet; known: {_known_list()}")
    if _torch_optimizer(type_name) is not None:
        return str(type_name)
    raise ValueError(f"unknown optimizer.type {type_name!r}{_did_you_mean(type_name, KNOWN_OPTIMIZERS.values())} "
                     f"(known: {_known_list()})")


def _signature_params(cls) -> dict[str, inspect.Parameter]:
    return {n: p for n, p in inspect.signature(cls.__init__).parameters.items()
            if n not in _NOT_PARAMS and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def _compressed_class(key: str):
    from ds_comm.optim.config import DEEPSPEED_OPTIMIZERS

    return DEEPSPEED_OPTIMIZERS[KNOWN_OPTIMIZERS[key]]


def _accepted(key: str, params: Mapping[str, Any]) -> dict[str, inspect.Parameter] | set[str]:
    """Accepted parameter names for the class ``key`` will build with these params."""
    if key in ("adam", "adamw"):
        if params.get("torch_adam"):
            decoupled = key == "adamw" or params.get("adam_w_mode", True)
            # bias_correction: accepted as DeepSpeed configs spell it out; only true fits torch's Adam
            names = set(_signature_params(torch.optim.AdamW if decoupled else torch.optim.Adam)) | {"bias_correction"}
        else:
            names = set(_signature_params(ds_optim.FusedAdamW if key == "adamw" else ds_optim.FusedAdam))
        return names | _ADAM_KEYS
    if key == "lamb":
        return set(_signature_params(ds_optim.FusedLamb)) | {"max_grad_norm"}
    if key == "lion":
        return set(_signature_params(ds_optim.FusedLion))
    if key == "adagrad":
        return set(_signature_params(ds_optim.FusedAdagrad))
    if key in COMPRESSED_OPTIMIZERS:
        return (set(_signature_params(_compressed_class(key))) - {"kernel_backend"}) | {"comm_backend_name", "cuda_aware",
                                                                                        "kernel_backend"}
    return set(_signature_params(_torch_optimizer(key)))


def check_optimizer_params(type_name: str, params: Mapping[str, Any]) -> str:
    """Validate the names in ``params`` for ``type_name``; returns the canonical name. Errors name the key as
    ``optimizer.params.<key>`` with the closest accepted spelling."""
    key = canonical_optimizer_name(type_name)
    if not isinstance(params, Mapping):
        raise ValueError(f"optimizer.params must be a dict, got {type(params).__name__}")
    accepted = _accepted(key, params)
    for name in params:
        if name not in accepted:
            raise ValueError(f"optimizer.params.{name} is not a parameter of optimizer type {type_name!r}"
                             f"{_did_you_mean(name, accepted)} (accepted: {', '.join(sorted(accepted))})")
    if key == "adamw" and params.get("adam_w_mode") is False:
        raise ValueError("optimizer.params.adam_w_mode=false contradicts optimizer.type 'AdamW' (always decoupled "
                         "weight decay); use type 'Adam' with adam_w_mode=false for L2 regularisation")
    if key == "lamb" and params.get("max_grad_norm", 0.0):
        raise ValueError("optimizer.params.max_grad_norm is not supported for Lamb (ds-optim's FusedLamb does not "
                         "clip); use the top-level gradient_clipping")
    if key in ("adam", "adamw") and params.get("torch_adam") and params.get("bias_correction") is False:
        raise ValueError("optimizer.params.bias_correction=false is not available with torch_adam=true "
                         "(torch.optim.Adam/AdamW always correct the bias)")
    return key


def _hyper(params: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(params)
    if "betas" in out:  # JSON has lists; the optimizers (and their state_dicts) use tuples
        out["betas"] = tuple(out["betas"])
    return out


def build_optimizer(type_name: str, params: Mapping[str, Any] | None, model_parameters,
                    process_group: Any = None) -> torch.optim.Optimizer:
    """Build the optimizer a DeepSpeed ``optimizer`` section describes over ``model_parameters`` (params or
    param groups). ``process_group``: the data-parallel group, for the compressed optimizers."""
    params = {} if params is None else dict(params)
    key = check_optimizer_params(type_name, params)
    if key in COMPRESSED_OPTIMIZERS:
        from ds_comm.optim.config import from_deepspeed_config

        return from_deepspeed_config(KNOWN_OPTIMIZERS[key], params, model_parameters, process_group=process_group)
    hyper = _hyper(params)
    if key in ("adam", "adamw"):
        torch_adam = bool(hyper.pop("torch_adam", False))
        adam_w_mode = key == "adamw" or bool(hyper.pop("adam_w_mode", True))
        hyper.pop("adam_w_mode", None)
        if torch_adam:
            hyper.pop("bias_correction", None)
            cls = torch.optim.AdamW if adam_w_mode else torch.optim.Adam
            if cls is torch.optim.AdamW:
                hyper.setdefault("weight_decay", 0.0)  # DeepSpeed's default, not torch's 0.01
            return cls(model_parameters, **hyper)
        if key == "adamw":
            hyper.setdefault("weight_decay", 0.0)
            return ds_optim.FusedAdamW(model_parameters, **hyper)
        return ds_optim.FusedAdam(model_parameters, adam_w_mode=adam_w_mode, **hyper)
    if key == "lamb":
        hyper.pop("max_grad_norm", None)  # only 0 gets here
        return ds_optim.FusedLamb(model_parameters, **hyper)
    if key == "lion":
        return ds_optim.FusedLion(model_parameters, **hyper)
    if key == "adagrad":
        return ds_optim.FusedAdagrad(model_parameters, **hyper)
    return _torch_optimizer(key)(model_parameters, **hyper)


def effective_optimizer_params(type_name: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` with the class defaults filled in (for printing the effective config)."""
    key = check_optimizer_params(type_name, params)
    accepted = _accepted(key, params)
    if key in COMPRESSED_OPTIMIZERS:
        sig = _signature_params(_compressed_class(key))
    elif key in ("adam", "adamw"):
        if params.get("torch_adam"):
            decoupled = key == "adamw" or params.get("adam_w_mode", True)
            sig = _signature_params(torch.optim.AdamW if decoupled else torch.optim.Adam)
        else:
            sig = _signature_params(ds_optim.FusedAdamW if key == "adamw" else ds_optim.FusedAdam)
    else:
        sig = _signature_params({"lamb": ds_optim.FusedLamb, "lion": ds_optim.FusedLion,
                                 "adagrad": ds_optim.FusedAdagrad}.get(key) or _torch_optimizer(key))
    out: dict[str, Any] = {}
    for name, p in sig.items():
        if (name in accepted and name not in _TORCH_COMPAT and p.default is not inspect.Parameter.empty
                and _jsonable(p.default)):
            out[name] = list(p.default) if isinstance(p.default, tuple) else p.default
    if key in ("adam", "adamw"):  # DeepSpeed's defaults for the keys it consumes, and its weight decay of 0
        out.update(weight_decay=0.0, adam_w_mode=True, torch_adam=False)
    out.update(params)
    return out


def _jsonable(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str)) or (
        isinstance(value, tuple) and all(isinstance(v, (int, float)) for v in value))

