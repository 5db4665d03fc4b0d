"""DeepSpeed's process topologies and the grid (mpu) built from them.

A topology is a Cartesian grid of ranks: ``axes`` names its dimensions, ``dims`` their sizes, and rank numbers
run through the grid with the *last* axis varying fastest, exactly as DeepSpeed's ``ProcessTopology`` (so a
checkpoint or a launcher script that relies on DeepSpeed's rank layout sees the same one here). With
``PipeDataParallelTopology(num_pp=2, num_dp=2)`` ranks 0,1 are stage 0 (data 0,1) and ranks 2,3 stage 1.

:class:`PipelineParallelGrid` creates the process groups along each axis (every rank takes part in every
``new_group`` call, in one fixed order, as torch requires) and answers DeepSpeed's mpu getters.
"""

from __future__ import annotations

import itertools
from collections import namedtuple
from typing import Any, Callable

import torch.distributed as dist

__all__ = ["ProcessTopology", "PipeDataParallelTopology", "PipeModelDataParallelTopology", "PipelineParallelGrid"]


def _coord_class(axes: list[str]) -> Callable[..., Any]:
    """DeepSpeed's ``ProcessCoord``: a namedtuple with one field per axis. Made in a function because the fields
    come at run time, and mypy types a ``namedtuple`` call only where its fields are literals."""
    return namedtuple("ProcessCoord", axes)


class ProcessTopology:
    """Maps n-dimensional coordinates (``axes`` x ``dims``) to linear ranks and back."""

    def __init__(self, axes: list[str], dims: list[int]):
        if len(axes) != len(dims):
            raise ValueError(f"ProcessTopology: {len(axes)} axes {axes} but {len(dims)} dims {dims}")
        if len(set(axes)) != len(axes):
            raise ValueError(f"ProcessTopology: repeated axis name in {axes}")
        for axis, dim in zip(axes, dims):
            if not isinstance(dim, int) or dim < 1:
                raise ValueError(f"ProcessTopology: axis {axis!r} has size {dim!r}; sizes are positive integers")
        self.axes = list(axes)
        self.dims = list(dims)
        self.ProcessCoord = _coord_class(self.axes)
        self.mapping: dict[Any, int] = {}
        for rank, coord in enumerate(itertools.product(*[range(d) for d in self.dims])):
            self.mapping[self.ProcessCoord(*coord)] = rank

    def world_size(self) -> int:
        return len(self.mapping)

    def get_axis_names(self) -> list[str]:
        return list(self.axes)

    def get_dim(self, axis: str) -> int:
        """Size of ``axis``; 1 for an axis this topology does not have (DeepSpeed's convention: absent = 1)."""
        return self.dims[self.axes.index(axis)] if axis in self.axes else 1

    def get_rank(self, **coord_kwargs: int) -> int:
        if set(coord_kwargs) != set(self.axes):
            raise ValueError(f"get_rank needs a coordinate on every axis {self.axes}, got {sorted(coord_kwargs)}")
        key = self.ProcessCoord(**coord_kwargs)
        if key not in self.mapping:
            raise ValueError(f"get_rank: {coord_kwargs} is outside the topology {dict(zip(self.axes, self.dims))}")
        return self.mapping[key]

    def get_coord(self, rank: int):
        for coord, r in self.mapping.items():
            if r == rank:
                return coord
        raise ValueError(f"rank {rank} is not in the topology (world size {self.world_size()})")

    def get_rank_repr(self, rank: int, omit_axes: tuple[str, ...] = ("data", "pipe"), inner_sep: str = "_",
                      outer_sep: str = "-") -> str:
        """DeepSpeed's checkpoint-name fragment for ``rank``, e.g. ``model_01``."""
        coord = self.get_coord(rank)
        return outer_sep.join(f"{ax}{inner_sep}{getattr(coord, ax):02d}" for ax in self.axes if ax not in omit_axes)

    def get_axis_list(self, axis: str, idx: int) -> list[int]:
        """Ranks whose coordinate on ``axis`` is ``idx``."""
        if axis not in self.axes:
            return []
        pos = self.axes.index(axis)
        return sorted(r for c, r in self.mapping.items() if c[pos] == idx)

    def filter_match(self, **filter_kwargs: int) -> list[int]:
        """Ranks whose coordinates match every ``axis=value`` given."""
        return sorted(r for c, r in self.mapping.items()
                      if all(getattr(c, k) == v for k, v in filter_kwargs.items()))

    def get_axis_comm_lists(self, axis: str) -> list[list[int]]:
        """The rank lists that communicate along ``axis``: one per combination of the other coordinates."""
        if axis not in self.axes:
            return []
        others = [a for a in self.axes if a != axis]
        lists = []
        for ccoord in itertools.product(*[range(self.get_dim(a)) for a in others]):
            fixed = dict(zip(others, ccoord))
            lists.append([self.get_rank(**fixed, **{axis: i}) for i in range(self.get_dim(axis))])
        return lists

    def __str__(self) -> str:
        return str(self.mapping)


class PipeDataParallelTopology(ProcessTopology):
    """Pipeline x data parallelism; data-parallel peers are adjacent ranks (their gradient all-reduce is the
    heavier traffic, so it stays within a node)."""

    def __init__(self, num_pp: int, num_dp: int):
        super().__init__(axes=["pipe", "data"], dims=[num_pp, num_dp])


class PipeModelDataParallelTopology(ProcessTopology):
    """Pipeline x data x model (tensor) parallelism, DeepSpeed's 3D layout: axes ``pipe``, ``data``, ``model``,
    the model axis fastest (tensor-parallel peers are adjacent ranks: their per-layer collectives are the
    heaviest traffic and stay within a node), then data, then pipe."""

    def __init__(self, num_pp: int, num_mp: int, num_dp: int):
        super().__init__(axes=["pipe", "data", "model"], dims=[num_pp, num_dp, num_mp])


class PipelineParallelGrid:
    """Process groups along the topology's axes and DeepSpeed's mpu getters over them.

    Must be built on every rank of the world (it calls ``dist.new_group`` for every group)."""

    def __init__(self, topology: ProcessTopology, process_group: Any = None):
        if process_group is not None:
            raise NotImplementedError("PipelineParallelGrid(process_group=...): a grid over a sub-group of the "
                                      "world is not supported in ds-pipe 0.1.0")
        world = dist.get_world_size()
        if topology.world_size() != world:
            raise ValueError(f"topology {dict(zip(topology.axes, topology.dims))} has {topology.world_size()} "
                             f"ranks but the world has {world}")
        self._topo = topology
        self.global_rank = dist.get_rank()
        self.world_size = world
        coord = topology.get_coord(self.global_rank)
        self.pipe_parallel_size = topology.get_dim("pipe")
        self.data_parallel_size = topology.get_dim("data")
        self.model_parallel_size = topology.get_dim("model")
        self.stage_id = getattr(coord, "pipe", 0)
        self.data_parallel_id = getattr(coord, "data", 0)
        self.model_parallel_id = getattr(coord, "model", 0)
        self.pp_group, self.pipe_group_ranks = self._axis_group("pipe")
        self.dp_group, self.dp_group_ranks = self._axis_group("data")
        self.mp_group, self.mp_group_ranks = self._axis_group("model")

    def _axis_group(self, axis: str):
        """This rank's group along ``axis`` (every list is created on every rank, in one order)."""
        lists = self._topo.get_axis_comm_lists(axis) or [[r] for r in range(self.world_size)]
        mine = None
        for ranks in lists:
            # torch orders a group's ranks by global rank; along an axis that is the axis coordinate's order
            group = dist.new_group(ranks=ranks)
            if self.global_rank in ranks:
                mine = (group, list(ranks))
        return mine

    # DeepSpeed's mpu interface (engine.initialize(mpu=...) and Megatron-style layers call these)
    def get_stage_id(self) -> int:
        return self.stage_id

    def get_pipe_parallel_rank(self) -> int:
        return self.stage_id

    def get_pipe_parallel_world_size(self) -> int:
        return self.pipe_parallel_size

    def get_pipe_parallel_group(self):
        return self.pp_group

    def get_data_parallel_rank(self) -> int:
        return self.data_parallel_id

    def get_data_parallel_world_size(self) -> int:
        return self.data_parallel_size

    def get_data_parallel_group(self):
        return self.dp_group

    def get_model_parallel_rank(self) -> int:
        return self.model_parallel_id

    def get_model_parallel_world_size(self) -> int:
        return self.model_parallel_size

    def get_model_parallel_group(self):
        return self.mp_group

    def get_global_rank(self) -> int:
        return self.global_rank

    def get_model_parallel_mesh(self, device_type: str | None = None):
        """A one-dimensional ``DeviceMesh`` (dimension ``"model"``) over this rank's model-parallel group, for
        torch's tensor parallelism: ``parallelize_module(stage_layer, grid.get_model_parallel_mesh(),
        {"up": ColwiseParallel(), "down": RowwiseParallel()})``. Made once, from the existing group."""
        if getattr(self, "_model_mesh", None) is None:
            from torch.distributed.device_mesh import DeviceMesh

            if device_type is None:
                device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
            self._model_mesh = DeviceMesh.from_group(self.mp_group, device_type, mesh_dim_names=("model",))
        return self._model_mesh

    def topology(self) -> ProcessTopology:
        return self._topo

    def stage_to_global(self, stage_id: int, **kwargs: int) -> int:
        """Global rank of ``stage_id`` at this rank's other coordinates (or those given)."""
        coord = self._topo.get_coord(self.global_rank)._asdict()
        coord.update(kwargs, pipe=stage_id)
        return self._topo.get_rank(**coord)
