"""DeepSpeed JSON optimizer entries -> ds-comm optimizers.

``{"type": "OneBitAdam", "params": {...}}`` in a DeepSpeed config maps to :class:`OnebitAdam` (``OneBitLamb`` to
:class:`OnebitLamb`, ``ZeroOneAdam`` to :class:`ZeroOneAdam`), with DeepSpeed's parameter names. The engine of
a later release builds its optimizer through :func:`from_deepspeed_config`; scripts may call it too.
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any

from ..transport import MPITransport
from ._base import CompressedOptimizer
from .onebit_adam import OnebitAdam
from .onebit_lamb import OnebitLamb
from .zero_one_adam import ZeroOneAdam

DEEPSPEED_OPTIMIZERS: dict[str, type[CompressedOptimizer]] = {
    "OneBitAdam": OnebitAdam, "OneBitLamb": OnebitLamb, "ZeroOneAdam": ZeroOneAdam,
}
# DeepSpeed keys that choose the transport rather than the algorithm
_TRANSPORT_KEYS = {"comm_backend_name", "cuda_aware"}


def _did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def from_deepspeed_config(type_name: str, params: dict[str, Any], model_parameters, process_group: Any = None):
    """Build the optimizer a DeepSpeed ``optimizer`` section describes (names matched case-insensitively,
    as DeepSpeed does). ``comm_backend_name``: ``"nccl"``/``"gloo"`` (torch.distributed, the default) or
    ``"mpi"`` (with ``cuda_aware``); DeepSpeed's ``"hccl"`` and ``"compressed"`` are not supported."""
    by_lower = {name.lower(): cls for name, cls in DEEPSPEED_OPTIMIZERS.items()}
    cls = by_lower.get(str(type_name).lower())
    if cls is None:
        raise ValueError(f"unknown ds-comm optimizer type {type_name!r}; known: {sorted(DEEPSPEED_OPTIMIZERS)}"
                         + _did_you_mean(type_name, DEEPSPEED_OPTIMIZERS))
    params = dict(params)
    backend = str(params.pop("comm_backend_name", "nccl")).lower()
    cuda_aware = bool(params.pop("cuda_aware", False))
    if backend == "mpi":
        if process_group is not None:
            raise ValueError("comm_backend_name 'mpi' uses MPI.COMM_WORLD; do not pass a process_group too")
        process_group = MPITransport(cuda_aware=cuda_aware)
    elif backend not in ("nccl", "gloo"):
        raise ValueError(f"optimizer.params.comm_backend_name={backend!r} is not supported by ds-comm; "
                         "use 'nccl' or 'gloo' (torch.distributed) or 'mpi'")
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "params", "process_group"}
    unknown = [k for k in params if k not in accepted]
    if unknown:
        raise ValueError(f"optimizer.params.{unknown[0]} is not a {type_name} parameter"
                         + _did_you_mean(unknown[0], accepted | _TRANSPORT_KEYS))
    if "betas" in params:
        params["betas"] = tuple(params["betas"])
    return cls(model_parameters, process_group=process_group, **params)
