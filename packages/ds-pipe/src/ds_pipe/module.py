"""DeepSpeed's ``PipelineModule``: a layer list, cut into stages, built only where it runs.

The layer list holds ``LayerSpec`` (class + arguments, built later), ``TiedLayerSpec`` (the same, one module
shared by every position with its ``key``), ``nn.Module`` instances and plain callables (``torch.flatten``...).
The module is made on every rank with the same list; it partitions the list (by parameters, layer count or a
class-name regex), and builds only this rank's stage: a ``LayerSpec`` owned by another stage is never
constructed here (counting its parameters for the partition builds it on the ``meta`` device, which
allocates nothing). Local layers are registered under their global index (``"3.weight"``), tied modules
under ``tied_modules.<key>``, DeepSpeed's state-dict names.

Tied layers: a key used on several stages is built on each of them, its ``tied_weight_attr`` tensors are
copied from the lowest stage when the module is made, and the engine sums their gradients over the stages
of the key (one weight in effect, as DeepSpeed's ``ReduceTiedGrads``).
"""

from __future__ import annotations

import re
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from ._partition import check_parts, partition_balanced, partition_uniform
from .topology import PipeDataParallelTopology, PipelineParallelGrid, ProcessTopology

__all__ = ["LayerSpec", "TiedLayerSpec", "PipelineModule"]


class LayerSpec:
    """A layer to build later: ``LayerSpec(nn.Linear, 16, 32)`` builds ``nn.Linear(16, 32)`` on its stage."""

    def __init__(self, typename: type, *module_args: Any, **module_kwargs: Any):
        if not isinstance(typename, type) or not issubclass(typename, nn.Module):
            raise TypeError(f"LayerSpec needs an nn.Module subclass, got {typename!r}")
        self.typename = typename
        self.module_args = module_args
        self.module_kwargs = module_kwargs

    def build(self, log: bool = False) -> nn.Module:
        return self.typename(*self.module_args, **self.module_kwargs)

    def __repr__(self) -> str:
        return f"LayerSpec({self.typename.__name__})"


class TiedLayerSpec(LayerSpec):
    """A layer shared by every position with the same ``key`` (an embedding reused as the LM head).

    ``forward_fn(module, x)`` replaces ``module(x)`` at a position (the head: ``x @ module.weight.t()``);
    ``tied_weight_attr`` names the tensors that are one weight across stages."""

    def __init__(self, key: str, typename: type, *module_args: Any, forward_fn: Callable | None = None,
                 tied_weight_attr: str | list[str] = "weight", **module_kwargs: Any):
        super().__init__(typename, *module_args, **module_kwargs)
        self.key = key
        self.forward_fn = forward_fn
        self.tied_weight_attr = [tied_weight_attr] if isinstance(tied_weight_attr, str) else list(tied_weight_attr)

    def __repr__(self) -> str:
        return f"TiedLayerSpec({self.key!r}, {self.typename.__name__})"


def _layer_name(layer: Any) -> str:
    if isinstance(layer, LayerSpec):
        return layer.typename.__name__
    if isinstance(layer, nn.Module):
        return type(layer).__name__
    return getattr(layer, "__name__", type(layer).__name__)


def _count_params(layer: Any) -> int:
    if isinstance(layer, LayerSpec):
        with torch.device("meta"):  # counts without allocating: another stage's layer is not built here
            layer = layer.build()
    if isinstance(layer, nn.Module):
        return sum(p.numel() for p in layer.parameters() if p.requires_grad)
    return 0


class PipelineModule(nn.Module):
    """This rank's stage of a layer list. Arguments as DeepSpeed's:

    - ``layers``: the layer list (see the module docstring); a stage's output is the next stage's input.
    - ``num_stages`` or ``topology``: the number of stages (data parallelism fills the rest of the world), or
      a :class:`ProcessTopology` with a ``pipe`` axis (and, for tensor parallelism, a ``model`` axis:
      :class:`PipeModelDataParallelTopology`), or a :class:`PipelineParallelGrid` made from one, whose groups
      are then reused (the mpu the user's tensor-parallel layers were given). One of them is required.
    - ``loss_fn(outputs, labels)``: the last stage's loss.
    - ``partition_method``: ``'parameters'`` (balance trainable parameter counts, the default),
      ``'uniform'`` (layer counts) or ``'type:REGEX'`` (balance the layers whose class name matches, case
      insensitive, e.g. ``'type:transformer'``).
    - ``seed_layers``: seed torch's RNG with ``base_seed + layer index`` (or ``seed_fn(base_seed + index)``)
      before building each layer, so a layer's initial weights do not depend on the stage count.
    - ``activation_checkpoint_interval``: recompute each run of that many layers in the backward pass
      (``torch.utils.checkpoint``, non-reentrant) instead of keeping its activations; 0 = off.
    - ``virtual_stages`` (ds-pipe's; DeepSpeed has no such thing): ``V`` chunks per pipeline rank for the
      interleaved schedules. The layer list is cut into ``num_stages * V`` contiguous chunks by the
      ``partition_method``; chunk ``c`` (torch's stage index) runs on pipeline rank ``c % num_stages`` as its
      local chunk ``c // num_stages`` (torch's and Megatron's looped placement), so rank 0 holds chunks 0,
      ``num_stages``, ``2 * num_stages``... and the last rank the last chunk. ``parts`` then has
      ``num_stages * V + 1`` boundaries, and ``stage_layers()`` lists every layer of this rank's chunks.
    - ``virtual_stage_style``: ``"loop"`` (above; for ``interleaved``, ``looped_bfs``, ``zero_bubble``) or
      ``"v"`` (``V = 2``, for ``zbv`` / ``dualpipev``): chunk ``c < num_stages`` on rank ``c``, chunk
      ``c >= num_stages`` on rank ``2 * num_stages - 1 - c`` -- rank 0 holds the first and the last chunk.
    """

    def __init__(self, layers: list[Any], num_stages: int | None = None,
                 topology: ProcessTopology | PipelineParallelGrid | None = None,
                 loss_fn: Callable | None = None, seed_layers: bool = False, seed_fn: Callable | None = None,
                 base_seed: int = 1234, partition_method: str = "parameters",
                 activation_checkpoint_interval: int = 0, activation_checkpoint_func: Callable | None = None,
                 checkpointable_layers: list[str] | None = None, dynamic_shape: bool = False,
                 virtual_stages: int = 1, virtual_stage_style: str = "loop"):
        super().__init__()
        if virtual_stage_style not in ("loop", "v"):
            raise ValueError(f"PipelineModule: virtual_stage_style must be 'loop' or 'v', got {virtual_stage_style!r}")
        if virtual_stage_style == "v" and virtual_stages != 2:
            raise ValueError(f"PipelineModule: virtual_stage_style='v' places 2 chunks per rank (torch's ZBV and "
                             f"DualPipeV); got virtual_stages={virtual_stages}")
        self.virtual_stage_style = virtual_stage_style
        if isinstance(virtual_stages, bool) or not isinstance(virtual_stages, int) or virtual_stages < 1:
            raise ValueError(f"PipelineModule: virtual_stages must be an integer >= 1, got {virtual_stages!r}")
        self.virtual_stages = virtual_stages
        if checkpointable_layers is not None or dynamic_shape:
            raise NotImplementedError("PipelineModule: checkpointable_layers and dynamic_shape are not supported "
                                      "in ds-pipe 0.1.0")
        if not isinstance(activation_checkpoint_interval, int) or activation_checkpoint_interval < 0:
            raise ValueError(f"activation_checkpoint_interval must be an integer >= 0, got "
                             f"{activation_checkpoint_interval!r}")
        layers = list(layers)
        if not layers:
            raise ValueError("PipelineModule: layers is empty")
        for i, layer in enumerate(layers):
            if not (isinstance(layer, (LayerSpec, nn.Module)) or callable(layer)):
                raise TypeError(f"PipelineModule: layer {i} ({layer!r}) is not a LayerSpec, nn.Module or callable")
        self._layer_specs = layers
        self.loss_fn = loss_fn
        self.seed_layers, self.seed_fn, self.base_seed = seed_layers, seed_fn, base_seed
        self.activation_checkpoint_interval = activation_checkpoint_interval
        self.activation_checkpoint_func = activation_checkpoint_func or (
            lambda fn, *args: checkpoint(fn, *args, use_reentrant=False))

        world = dist.get_world_size() if dist.is_initialized() else 1
        # a PipelineParallelGrid given as the topology: its groups are reused (the mpu that the user's
        # Megatron-style layers already hold), none are made twice
        grid = topology if isinstance(topology, PipelineParallelGrid) else None
        self._topo = self._make_topology(num_stages, grid.topology() if grid else topology, world)
        self.num_stages = self._topo.get_dim("pipe")
        self._check_ties(layers)
        self.partition_method = partition_method
        self.num_chunks = self.num_stages * virtual_stages
        self.parts = self._partition(layers, partition_method)

        # collectives start here; everything above fails the same way on every rank, before any of them
        self._grid = grid or (PipelineParallelGrid(self._topo) if dist.is_initialized() else None)
        self.global_rank = dist.get_rank() if dist.is_initialized() else 0
        self.stage_id = self._grid.get_stage_id() if self._grid else 0
        # torch's stage indices of this rank's chunks, in local order
        self.chunk_ids = [c for c in range(self.num_chunks) if self.rank_of_chunk(c) == self.stage_id]
        self.tied_modules = nn.ModuleDict()
        self.tied_weight_attrs: dict[str, list[str]] = {}
        self.forward_funcs: list[Callable] = []
        self._chunk_funcs: list[list[Callable]] = []
        self._build()
        if dist.is_initialized() and dist.get_backend() == "nccl":
            # as DeepSpeed's PipelineModule: onto this rank's GPU before the tied weights are broadcast (NCCL
            # moves CUDA tensors only)
            self.to(torch.device("cuda", torch.cuda.current_device()))
        self.tied_comms = self._tie_groups() if self._grid else {}
        self._sync_tied_weights()

    # ----- construction
    @staticmethod
    def _make_topology(num_stages, topology, world) -> ProcessTopology:
        if topology is not None:
            if num_stages is not None and num_stages != topology.get_dim("pipe"):
                raise ValueError(f"PipelineModule: num_stages={num_stages} but the topology's pipe axis has "
                                 f"{topology.get_dim('pipe')}")
            if topology.world_size() != world:
                raise ValueError(f"PipelineModule: the topology has {topology.world_size()} ranks, the world "
                                 f"{world}")
            return topology
        if num_stages is None:
            raise ValueError("PipelineModule: give num_stages or topology")
        if not isinstance(num_stages, int) or num_stages < 1:
            raise ValueError(f"PipelineModule: num_stages must be a positive integer, got {num_stages!r}")
        if world % num_stages:
            raise ValueError(f"PipelineModule: num_stages={num_stages} does not divide the world size {world} "
                             f"(each data-parallel replica needs all {num_stages} stages)")
        return PipeDataParallelTopology(num_pp=num_stages, num_dp=world // num_stages)

    @staticmethod
    def _check_ties(layers) -> None:
        uses: dict[str, list[int]] = {}
        for i, layer in enumerate(layers):
            if isinstance(layer, TiedLayerSpec):
                uses.setdefault(layer.key, []).append(i)
                first = layers[uses[layer.key][0]]
                if first.typename is not layer.typename:
                    raise ValueError(f"TiedLayerSpec key {layer.key!r}: layer {i} builds {layer!r} but layer "
                                     f"{uses[layer.key][0]} builds {first!r}; a tie is one module")
        for key, idx in uses.items():
            if len(idx) < 2:
                raise ValueError(f"TiedLayerSpec key {key!r} is used once (layer {idx[0]}); a tie needs the key at "
                                 f"two or more positions, else use a LayerSpec")

    def _partition(self, layers, method: str) -> list[int]:
        names = [_layer_name(layer) for layer in layers]
        n, k = len(layers), self.num_chunks
        low = method.lower()
        if low == "uniform":
            parts = partition_uniform(n, k)
        elif low == "parameters":
            parts = partition_balanced([_count_params(layer) for layer in layers], k)
        elif low.startswith("type:"):
            regex = re.compile(method[len("type:"):], re.IGNORECASE)
            weights = [1 if regex.search(name) else 0 for name in names]
            if not any(weights):
                raise ValueError(f"partition_method={method!r} matches no layer class (layers: {names})")
            parts = partition_balanced(weights, k)
        elif low == "profile":
            raise NotImplementedError("partition_method='profile' is not implemented (neither is it in DeepSpeed)")
        else:
            raise ValueError(f"partition_method={method!r}: use 'parameters', 'uniform' or 'type:REGEX'")
        check_parts(parts, k, method, names, "pipeline stage" if self.virtual_stages == 1 else "virtual stage")
        return parts

    def _build(self) -> None:
        for c in self.chunk_ids:
            start = len(self.forward_funcs)
            self._build_range(range(self.parts[c], self.parts[c + 1]))
            self._chunk_funcs.append(self.forward_funcs[start:])

    def _build_range(self, indices: range) -> None:
        for idx in indices:
            layer = self._layer_specs[idx]
            if self.seed_layers:
                seed = self.base_seed + idx
                self.seed_fn(seed) if self.seed_fn else torch.manual_seed(seed)
            if isinstance(layer, TiedLayerSpec):
                if layer.key not in self.tied_modules:
                    self.tied_modules[layer.key] = layer.build()
                    self.tied_weight_attrs[layer.key] = layer.tied_weight_attr
                module = self.tied_modules[layer.key]
                fn = layer.forward_fn
                self.forward_funcs.append((lambda x, m=module, f=fn: f(m, x)) if fn else module)
            elif isinstance(layer, LayerSpec):
                module = layer.build()
                self.add_module(str(idx), module)
                self.forward_funcs.append(module)
            elif isinstance(layer, nn.Module):
                self.add_module(str(idx), layer)
                self.forward_funcs.append(layer)
            else:
                self.forward_funcs.append(layer)

    def _tie_groups(self) -> dict[str, dict[str, Any]]:
        """A process group per tie key and data-parallel replica: the ranks of the stages using the key.

        Every rank creates every group, in the sorted order of the keys, as ``new_group`` requires."""
        stages_of: dict[str, set[int]] = {}
        for i, layer in enumerate(self._layer_specs):
            if isinstance(layer, TiedLayerSpec):
                stages_of.setdefault(layer.key, set()).add(self.stage_of_layer(i))
        comms = {}
        for key in sorted(stages_of):
            stages = sorted(stages_of[key])
            if len(stages) < 2:
                continue  # every use on one stage: already one module, nothing to reduce
            for coord in self._topo.get_axis_comm_lists("pipe"):
                ranks = [coord[s] for s in stages]
                group = dist.new_group(ranks=ranks)
                if self.global_rank in ranks:
                    comms[key] = {"ranks": ranks, "group": group, "src": ranks[0]}
        return comms

    @torch.no_grad()
    def _sync_tied_weights(self) -> None:
        for key, comm in self.tied_comms.items():
            for attr in self.tied_weight_attrs[key]:
                dist.broadcast(getattr(self.tied_modules[key], attr), src=comm["src"], group=comm["group"])

    def allreduce_tied_weight_gradients(self) -> None:
        """Sum each tied weight's gradient over the stages that use it (DeepSpeed's name)."""
        for key, comm in self.tied_comms.items():
            for attr in self.tied_weight_attrs[key]:
                weight = getattr(self.tied_modules[key], attr)
                if weight.grad is None:  # this stage's uses took no gradient: contribute zeros
                    weight.grad = torch.zeros_like(weight)
                dist.all_reduce(weight.grad, group=comm["group"])

    # ----- running
    def forward(self, *inputs: Any) -> Any:
        if self.virtual_stages > 1:
            raise RuntimeError("PipelineModule with virtual_stages > 1: each chunk runs on its own "
                               "(chunk_module(k)); the module as a whole has no single forward")
        return self._run(self.forward_funcs, inputs)

    def _run(self, funcs: list[Callable], inputs: tuple) -> Any:
        # torch's stage passes a multi-tensor activation as several arguments; layers see it as one tuple,
        # DeepSpeed's convention
        x = inputs[0] if len(inputs) == 1 else inputs
        interval = self.activation_checkpoint_interval
        if interval == 0 or not torch.is_grad_enabled():
            for fn in funcs:
                x = fn(x)
            return x
        for start in range(0, len(funcs), interval):
            chunk = funcs[start:start + interval]

            def run(*args, chunk=chunk):
                y = args[0] if len(args) == 1 else args
                for fn in chunk:
                    y = fn(y)
                return y

            x = self.activation_checkpoint_func(run, *(x if isinstance(x, tuple) else (x,)))
        return x

    # ----- DeepSpeed's accessors
    def topology(self) -> ProcessTopology:
        return self._topo

    def mpu(self) -> PipelineParallelGrid | None:
        return self._grid

    def num_pipeline_stages(self) -> int:
        return self.num_stages

    def is_first_stage(self) -> bool:
        """This rank runs the first layer (it reads the inputs)."""
        return self.stage_id == 0

    def is_last_stage(self) -> bool:
        """This rank runs the last layer (it computes the loss): the last rank, or rank 0 with the 'v' style."""
        return self.stage_id == self.last_stage_id

    @property
    def last_stage_id(self) -> int:
        return self.rank_of_chunk(self.num_chunks - 1)

    def rank_of_chunk(self, c: int) -> int:
        """The pipeline rank that runs chunk ``c`` (torch's stage index)."""
        j, k = c % self.num_stages, c // self.num_stages
        if self.virtual_stage_style == "v" and k % 2:
            return self.num_stages - 1 - j
        return j

    def stage_layers(self, stage_id: int | None = None) -> list[int]:
        """Global indices of the layers of pipeline rank ``stage_id`` (default: this rank's), every chunk's."""
        s = self.stage_id if stage_id is None else stage_id
        return [i for c in range(self.num_chunks) if self.rank_of_chunk(c) == s
                for i in range(self.parts[c], self.parts[c + 1])]

    def stage_of_layer(self, idx: int) -> int:
        """The pipeline rank (stage id) that holds layer ``idx``."""
        chunk = next(c for c in range(self.num_chunks) if self.parts[c] <= idx < self.parts[c + 1])
        return self.rank_of_chunk(chunk)

    def chunk_module(self, k: int) -> nn.Module:
        """This rank's local chunk ``k`` as a module for torch's ``PipelineStage`` (its stage index is
        ``chunk_ids[k]``): runs that chunk's layers and holds their parameters (shared with this module)."""
        if self.virtual_stages == 1:
            return self
        return _Chunk(self, k)


class _Chunk(nn.Module):
    """One chunk of a ``PipelineModule``: its layers registered by global index (the same objects), its tied
    modules under ``tied_modules``, so ``parameters()`` is the chunk's."""

    def __init__(self, parent: PipelineModule, k: int):
        super().__init__()
        c = parent.chunk_ids[k]
        self._funcs = parent._chunk_funcs[k]
        self._run = parent._run
        self.tied_modules = nn.ModuleDict()
        for idx in range(parent.parts[c], parent.parts[c + 1]):
            spec = parent._layer_specs[idx]
            if isinstance(spec, TiedLayerSpec):
                self.tied_modules[spec.key] = parent.tied_modules[spec.key]
            elif str(idx) in parent._modules:
                self.add_module(str(idx), parent._modules[str(idx)])

    def forward(self, *inputs: Any) -> Any:
        return self._run(self._funcs, inputs)
