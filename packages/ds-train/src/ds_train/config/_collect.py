"""Every problem of a DeepSpeed config at once, the root causes first.

pydantic stops a section at its first *key* error (ds-zero's ``StrictModel`` refuses an unknown or unbuilt key
in a ``mode="before"`` validator, which aborts the whole section) and runs a model's cross-field checks only
when its fields are valid, so one ``model_validate`` reports one problem per section at best. A user fixing a
config then needs one run per problem. Here the validation is repeated instead: each round records what
pydantic reports, removes the keys at fault from a private copy of the config, and validates again, until
the config validates or a round finds nothing new to remove. ds-zero's models are used as they are (their
messages, their defaults); only the driving is ds-train's.

What is decided here, before pydantic sees the config:

- top-level sections of features not built (:data:`UNSUPPORTED_KEYS`, :data:`ONLY_DEFAULT`) are refused
  whole: that is the root cause, so the keys inside them are not looked at;
- ``"auto"`` placeholders, each with its path;
- keys DeepSpeed itself reads and ignores (:data:`IGNORED_KEYS`) are dropped with a warning;
- the spellings DeepSpeed takes for "no offload" (``"device": "none"``, ``"None"``, ``null``) switch the offload
  section off (NVMe offload of the optimizer and of the params is built, and validated by ds-zero).

Cross-field checks (``fp16`` and ``bf16`` both enabled, a stage that does not fit a key, ...) are reported
unless they involve a section where a value had to be removed: they would then judge a default, not what
the file says.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from typing import Any, Mapping

from pydantic import BaseModel, ValidationError

__all__ = ["Problem", "IGNORED_KEYS", "UNSUPPORTED_KEYS", "ONLY_DEFAULT", "collect", "is_offload_off"]

#: DeepSpeed top-level keys of features not built in the ds-* suite yet -> what they are
UNSUPPORTED_KEYS: dict[str, str] = {
    # a PipelineModule's config goes to ds-pipe before these checks (ds_train._pipeline): here the model is not one
    "pipeline": "pipeline parallelism (ds-pipe) of a model that is not a ds_pipe.PipelineModule",
    "comet": "the Comet monitor",
    "autotuning": "autotuning",
    "elasticity": "elastic training",
    "compression_training": "compression training (quantization/pruning)",
    "quantize_training": "quantization-aware training",
    "data_efficiency": "data efficiency (curriculum learning, random layerwise token dropping)",
    "progressive_layer_drop": "progressive layer drop",
    "sparse_attention": "sparse attention",
    "amp": "NVIDIA Apex AMP (use fp16 or bf16)",
    "nebula": "the Nebula checkpoint engine",
    "eigenvalue": "the eigenvalue computation",
    "hybrid_engine": "the hybrid (RLHF) engine",
    "compile": "torch.compile / DeepCompile through the engine",
    "tensor_parallel": "tensor parallelism (AutoTP)",
    "sequence_parallel_size": "sequence parallelism (Ulysses)",
    "weight_quantization": "weight quantization",
    "timers": "the throughput timers",
    "data_types": "data_types (gradient accumulation dtype)",
    "torch_autocast": "torch autocast through the engine (use bf16/fp16)",
    "checkpoint": "checkpoint options (tag validation, universal checkpoints, node-local storage)",
    "graph_harvesting": "CUDA graph harvesting",
}
#: DeepSpeed top-level keys whose default is what the suite does; any other value is not built yet (ds-zero's
#: EngineConfig handles its own: prescale_gradients, gradient_predivide_factor, sparse_gradients, amp, ...)
ONLY_DEFAULT: dict[str, Any] = {
    "seq_parallel_communication_data_type": None,
    "disable_allgather": False,
    "dump_state": False,
    "memory_breakdown": False,
    "use_data_before_expert_parallelism": False,
}
#: top-level keys DeepSpeed accepts and does nothing with -> why; accepted here with a warning naming them
#: (refusing them would make a config that runs under DeepSpeed fail here, for nothing)
IGNORED_KEYS: dict[str, str] = {
    "cuda_visible_devices": "DeepSpeed never reads it; the GPUs are chosen by the launcher (--include, --num_gpus) "
                            "or the CUDA_VISIBLE_DEVICES environment variable",
    "vocabulary_size": "DeepSpeed only warns when it is not a multiple of 8 (tensor-core alignment)",
    # every DeepSpeed NVMe config carries it; refusing it would refuse NVMe offload itself
    "aio": "ds-zero's NVMe offload does its own file I/O (a thread pool over plain reads and writes, no libaio), so "
           "block_size, queue_depth, thread_count, single_submit and overlap_events have no effect",
}

_AUTO_HINT = "\"auto\" is a Hugging Face Trainer placeholder (the Trainer replaces it); give the value itself"
_OFFLOAD_SECTIONS = ("offload_optimizer", "offload_param")
#: the messages ds-zero's StrictModel gives a refused key: they start by naming it
_KEY_MESSAGE = re.compile(r"^(?:unknown key '([^']+)'|'([^']+)' = |both '([^']+)' and )")
_MAX_ROUNDS = 200  # a round removes at least one key, so this bounds any real config


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a config: ``path`` is the dotted key path (``""``: the config as a whole),
    ``message`` names it; ``root`` marks a feature that is not built, reported before everything else."""

    path: str
    message: str
    root: bool = False

    def __str__(self) -> str:
        named = not self.path or self.message.startswith(self.path) or f" {self.path}" in self.message
        return self.message if named else f"{self.path}: {self.message}"


def is_offload_off(device: Any) -> bool:
    """DeepSpeed's ``OffloadDeviceEnum`` spells "no offload" ``"none"``; configs in the wild also write
    ``"None"`` and ``null``, which DeepSpeed takes as off too."""
    return device is None or (isinstance(device, str) and device.strip().lower() == "none")


def _disabled(section: Any) -> bool:
    return isinstance(section, Mapping) and section.get("enabled") is False


#: keys whose value "auto" is ds-zero's own setting, not a Trainer placeholder (the offload planner)
AUTO_VALUED_KEYS = frozenset({"zero_optimization.offload_optimizer.ratio"})


def find_autos(value: Any, path: str = "") -> list[str]:
    """The paths of every Hugging Face Trainer ``"auto"`` placeholder in a config (``AUTO_VALUED_KEYS`` aside)."""
    if isinstance(value, str) and value == "auto":
        return [] if path in AUTO_VALUED_KEYS else [path]
    if isinstance(value, Mapping):
        return [p for k, v in value.items() for p in find_autos(v, f"{path}.{k}" if path else str(k))]
    return []


def _delete(data: dict, path: str) -> None:
    *parents, last = path.split(".")
    node: Any = data
    for p in parents:
        node = node.get(p) if isinstance(node, dict) else None
    if isinstance(node, dict):
        node.pop(last, None)


class _Collector:
    def __init__(self, data: dict[str, Any]) -> None:
        self.data = copy.deepcopy(data)  # keys are removed from this copy as they are reported
        self.order = {key: i for i, key in enumerate(data)}  # the file's order of the top-level keys
        self.problems: list[Problem] = []
        self.warnings: list[str] = []
        #: last names of the keys whose *value* was removed: a cross-field check naming one is not trusted
        self.tainted: set[str] = set()

    def add(self, path: str, message: str, root: bool | None = None) -> None:
        if root is None:
            root = "not supported yet" in message
        problem = Problem(path, message, root)
        if problem not in self.problems:
            self.problems.append(problem)

    # -- what ds-train decides before pydantic -------------------------------------------------------
    def pre_pass(self, model: type[BaseModel]) -> None:
        data = self.data
        for key in list(data):
            value = data[key]
            if key in model.model_fields:
                continue  # built by now (ds-zero may grow a section listed below)
            if key in IGNORED_KEYS:
                self.warnings.append(f"{key}: accepted and ignored, as DeepSpeed does ({IGNORED_KEYS[key]})")
                del data[key]
            elif key in UNSUPPORTED_KEYS:
                if not _disabled(value):  # a section that only switches its feature off changes nothing
                    self.add(key, f"{key}: {UNSUPPORTED_KEYS[key]} is not supported yet; remove the {key!r} "
                                  "section (or set \"enabled\": false where it has one)", root=True)
                del data[key]
            elif key in ONLY_DEFAULT:
                if value != ONLY_DEFAULT[key]:
                    self.add(key, f"{key}={json.dumps(value)} is not supported yet (only the default "
                                  f"{json.dumps(ONLY_DEFAULT[key])})", root=True)
                del data[key]
        self._offload()
        for path in find_autos(data):
            self.add(path, f"{path}: {_AUTO_HINT}", root=False)
            _delete(data, path)
            self._taint(path)

    def _offload(self) -> None:
        zero = self.data.get("zero_optimization")
        if not isinstance(zero, dict):
            return
        for name in _OFFLOAD_SECTIONS:
            section = zero.get(name)
            if not isinstance(section, dict):
                continue
            device = section.get("device", "none")
            if is_offload_off(device):
                # off, however DeepSpeed lets it be spelled: the section's other keys have no effect there either
                del zero[name]

    # -- the rounds of pydantic validation -----------------------------------------------------------
    def validate(self, model: type[BaseModel]) -> BaseModel | None:
        for _ in range(_MAX_ROUNDS):
            try:
                return model.model_validate(self.data)
            except ValidationError as exc:
                if not self._round(exc):
                    return None
        return None

    def _round(self, exc: ValidationError) -> bool:
        """Record this round's errors and remove what they name; False when nothing could be removed."""
        progressed = False
        for err in exc.errors():
            loc = tuple(err["loc"])
            message = err["msg"].removeprefix("Value error, ")
            parent, key, depth = self._resolve(loc)
            section = parent.get(key) if key is not None else self.data
            if depth == len(loc) and isinstance(section, dict):
                named = self._named_key(section, message)
                if named is not None:  # a refused key of this section (unknown, not built, twice spelled)
                    self.add(_join(loc + (named,)), message)
                    del section[named]
                    progressed = True
                    continue
                inner = self._named_path(message)
                if inner is not None:  # a section-level check naming a key inside it (optimizer.params.x)
                    self.add(inner, message)
                    _delete(self.data, inner)
                    self._taint(inner)
                    progressed = True
                    continue
                # a cross-field check of the section (of the whole config when loc is empty); not trusted when
                # it mentions a key whose value had to be removed (it would judge the default)
                for each in _each_problem(err, message):  # ds-zero's checks raise several at once
                    if not self.suspect(each):
                        self.add(_join(loc), each)
                if loc:
                    # remove the section so that the checks above it still run on the rest
                    del parent[key]
                    self._taint(_join(loc))
                    progressed = True
                continue
            if key is None:  # pragma: no cover - pydantic always locates a field error
                self.add(_join(loc), message)
                continue
            # a bad value, or a required key missing, at loc: report it and remove what holds it
            self.add(_join(loc), message)
            del parent[key]
            self._taint(_join(loc[:depth]))
            progressed = True
        return progressed

    def _resolve(self, loc: tuple) -> tuple[dict, Any, int]:
        """The dict holding the deepest key of ``loc`` present in the data, that key, and how many elements
        of ``loc`` it accounts for."""
        parent: dict = self.data
        node: Any = self.data
        key = None
        depth = 0
        for part in loc:
            if isinstance(node, dict) and part in node:
                parent, key, node = node, part, node[part]
                depth += 1
            else:
                break
        return parent, key, depth

    @staticmethod
    def _named_key(section: dict, message: str) -> str | None:
        match = _KEY_MESSAGE.match(message)
        if not match:
            return None
        name = next(g for g in match.groups() if g is not None)
        # ds-zero folds "stage3_x" onto "x" before it checks the keys, so the message may name the short form
        for candidate in (name, f"stage3_{name}"):
            if candidate in section:
                return candidate
        return None

    def _named_path(self, message: str) -> str | None:
        """A dotted key path the message starts with (``optimizer.params.betaz is not ...``) that exists in the
        data below its section; ``None`` otherwise."""
        match = re.match(r"^(?:unknown )?([A-Za-z_]\w*(?:\.[A-Za-z_]\w*){2,})\b", message)
        if not match:
            return None
        node: Any = self.data
        for part in match.group(1).split("."):
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return match.group(1)

    def _taint(self, path: str) -> None:
        self.tainted.add(path.rsplit(".", 1)[-1])

    def suspect(self, message: str) -> bool:
        """Whether a cross-field check (here, or over the whole config: batch sizes...) names a key whose value
        was removed, so that it judged a default instead of the file."""
        return any(re.search(rf"(?<![\w]){re.escape(t)}(?![\w])", message) for t in self.tainted)

    def ordered(self) -> list[Problem]:
        """Root causes first; nothing reported below a root cause's path (its section is not looked at); each
        group in the file's order of sections (checks over the whole config last)."""
        def place(p: Problem) -> int:
            return self.order.get(p.path.split(".")[0], len(self.order)) if p.path else len(self.order)

        roots = sorted((p for p in self.problems if p.root), key=place)
        rest = sorted((p for p in self.problems if not p.root
                       and not any(r.path and p.path.startswith(r.path + ".") for r in roots)), key=place)
        return roots + rest


def _each_problem(err: Any, message: str) -> list[str]:
    """The problems one pydantic error carries: a check that found several raises them as one error with a
    ``problems`` list (ds-zero's ``ConfigProblems``), each worth its own line; else the message."""
    error = (err.get("ctx") or {}).get("error")
    problems = getattr(error, "problems", None)
    if isinstance(problems, list) and problems and all(isinstance(p, str) for p in problems):
        return problems
    return [message]


def _join(loc: tuple) -> str:
    return ".".join(str(p) for p in loc)


def collect(data: Mapping[str, Any], model: type[BaseModel]) -> tuple[BaseModel | None, list[Problem], list[str],
                                                                       "_Collector"]:
    """Validate ``data`` against ``model`` reporting every problem: ``(config or None, problems in report order,
    warnings, the collector)``. The collector's :meth:`_Collector.suspect` tells later checks over the whole
    config which of their messages would judge a removed value."""
    collector = _Collector(dict(data))
    collector.pre_pass(model)
    config = collector.validate(model)
    return config, collector.ordered(), collector.warnings, collector
