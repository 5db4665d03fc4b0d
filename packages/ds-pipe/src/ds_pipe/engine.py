"""The pipeline engine: DeepSpeed's ``train_batch`` / ``eval_batch`` on torch.distributed.pipelining.

One ``train_batch(data_iter)``:

1. the first and the last stage each take ``micro_batches`` ``(inputs, labels)`` pairs from their own
   ``data_iter`` (DeepSpeed's data contract: the first stage uses the inputs, the last the labels), and every
   rank agrees that loading worked (one scalar all-reduce) -- a rank whose iterator ran dry raises its own
   error and the others raise naming it, instead of waiting forever in the schedule;
2. torch's schedule (``Schedule1F1B`` by default, or ``ScheduleGPipe``) runs the micro-batches over a
   ``PipelineStage`` of this rank's ``PipelineModule``, sending activations and gradients point to point
   within this data-parallel replica's pipe group; it averages the gradients over the micro-batches
   (DeepSpeed's loss / gradient_accumulation_steps);
3. the gradients go to the optimizer's tensors (fp32 masters with bf16/fp16, see ``_precision``); tied weights'
   gradients are summed over the stages sharing them, then gradients are averaged over the data-parallel group
   (one flat all-reduce per stage; with ZeRO 1/2 one reduce-scatter per param group into this rank's shard,
   ``_zero``; with ZeRO-3 FSDP2 reduce-scatters per unit after the last micro-batch, each chunk's with virtual
   stages, ``_zero3``); fp16 unscales
   and skips on an overflow anywhere, ``gradient_clipping`` clips by the global norm;
4. the optimizer steps this stage's parameters (and the LR scheduler, if any), masters are copied back into
   the 16-bit parameters, gradients are cleared;
5. the mean micro-batch loss, averaged over data-parallel replicas, is broadcast from the last stage and
   returned on every rank, as DeepSpeed's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator

import torch
import torch.distributed as dist
from torch.distributed.pipelining import (PipelineStage, Schedule1F1B, ScheduleDualPipeV, ScheduleGPipe,
                                          ScheduleInterleaved1F1B, ScheduleInterleavedZeroBubble, ScheduleLoopedBFS,
                                          ScheduleZBVZeroBubble)
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from . import checkpoint as _ckpt
from ._precision import Precision, grad_of, local
from ._zero import PipeZero
from ._zero3 import check_chunk_ties, shard_chunks, shard_stage
from .config import PipeConfig
from .module import PipelineModule

if TYPE_CHECKING:  # the multi-stage schedules' parameter type (torch annotates a list of the base class)
    from torch.distributed.pipelining.stage import _PipelineStageBase

__all__ = ["PipelineEngine", "PipelineError"]

_SCHEDULE_CLASSES = {"1f1b": Schedule1F1B, "gpipe": ScheduleGPipe, "interleaved": ScheduleInterleaved1F1B,
                     "looped_bfs": ScheduleLoopedBFS, "zero_bubble": ScheduleInterleavedZeroBubble,
                     "zbv": ScheduleZBVZeroBubble, "dualpipev": ScheduleDualPipeV}


class PipelineError(RuntimeError):
    """A pipeline step could not run; names the stage and rank at fault."""


class PipelineEngine:
    """Trains a :class:`PipelineModule` with DeepSpeed's pipeline-engine surface.

    - ``model``: the ``PipelineModule`` (made on every rank with the same arguments).
    - ``optimizer``: a ``torch.optim.Optimizer`` (or ds-optim's) over this stage's ``model.parameters()``, or a
      callable ``params -> optimizer``; a stage with no trainable parameters gets none.
    - ``config``: the DeepSpeed JSON keys of :class:`~ds_pipe.config.PipeConfig` (batch keys, ``pipeline``).
    - ``lr_scheduler``: stepped after every optimizer step, or a callable ``optimizer -> scheduler``.
    - ``mpu``: DeepSpeed's model-parallel unit (``get_model_parallel_*``, ``get_data_parallel_*``,
      ``get_pipe_parallel_*``), e.g. Megatron's or a :class:`~ds_pipe.PipelineParallelGrid`: it must describe
      the module's topology (same sizes, ranks and group members); the module's grid is what communicates.
    """

    def __init__(self, model: PipelineModule, optimizer: Any = None, config: dict[str, Any] | None = None,
                 lr_scheduler: Any = None, mpu: Any = None):
        if not isinstance(model, PipelineModule):
            raise TypeError(f"PipelineEngine needs a PipelineModule, got {type(model).__name__}")
        if not dist.is_initialized():
            raise RuntimeError("PipelineEngine needs torch.distributed initialised (it was not when the "
                               "PipelineModule was made, so the module has no process groups)")
        if model.loss_fn is None:
            raise ValueError("PipelineEngine: the PipelineModule has no loss_fn; train_batch needs one on the last "
                             "stage (PipelineModule(..., loss_fn=...))")
        self.module = model
        grid = model.mpu()
        if grid is None:
            raise RuntimeError("PipelineEngine: the PipelineModule was made before torch.distributed was "
                               "initialised, so it has no process groups; make it after init_process_group")
        if mpu is not None:
            _check_mpu(mpu, grid)
        self.grid = grid
        self.mpu = grid
        self.stage_id = model.stage_id
        self.num_stages = model.num_stages
        self.dp_world_size = self.grid.get_data_parallel_world_size()
        self._config = PipeConfig.from_dict(config, self.dp_world_size, model)
        self.micro_batches = self._config.micro_batches
        self.schedule_name = self._config.schedule
        self.global_steps = 0
        self.device = self._device()
        model.to(self.device)
        self._params = [p for p in model.parameters() if p.requires_grad]
        self._check_optimizer(optimizer)
        self.zero: PipeZero | None = None
        self._chunks: list[torch.nn.Module] | None = None  # ZeRO-3 with virtual stages: the FSDP-rooted chunks
        self.zero3 = self._config.zero_stage == 3
        if self.zero3:
            self._shard_zero3(optimizer, lr_scheduler)
            return
        # 16-bit: the module's parameters become 16-bit copies, the fp32 originals the optimizer's masters
        self.precision = Precision(model, self._config.dtype, self._config.fp16, self._config.gradient_clipping,
                                   self.grid, model.tied_comms, model.tied_modules, model.tied_weight_attrs)
        self._params = self.precision.opt_params
        if self._config.zero_stage in (1, 2) and self._params:
            # optimizer states, masters and reduced gradients partitioned over this stage's data-parallel group
            self.zero = PipeZero(self._config.zero_stage, self.precision, optimizer, lr_scheduler, self.grid,
                                 self.device)
            self.optimizer = self.zero.optimizer
            self.lr_scheduler = self.zero.lr_scheduler
        else:
            self.optimizer = self._make_optimizer(optimizer)
            self.lr_scheduler = lr_scheduler(self.optimizer) if callable(lr_scheduler) and not hasattr(
                lr_scheduler, "step") else lr_scheduler
        self._finish_init()

    def _finish_init(self) -> None:
        self._last_rank = self.grid.stage_to_global(self.module.last_stage_id)
        self._runners: dict[tuple[str, int], Any] = {}
        self.data_iterator: Iterator | None = None

    def _shard_zero3(self, optimizer: Any, lr_scheduler: Any) -> None:
        """ZeRO-3: the stage's module sharded over its data group by FSDP2 (``_zero3``); the optimizer rebuilt
        over the sharded fp32 parameters, which are the masters."""
        from ds_zero.components import bind_scheduler, materialize_optimizer, rebuild_optimizer

        model = self.module
        if model.virtual_stages > 1:
            check_chunk_ties(model, self.schedule_name)
        if self.grid.get_model_parallel_world_size() > 1:
            raise NotImplementedError("zero_optimization.stage=3 with tensor parallelism (a model axis > 1) is not "
                                      "built; use stage 1 or 2")
        name_of = {id(p): n for n, p in model.named_parameters()}
        template = materialize_optimizer(optimizer, self._params, template_only=True) if self._params else None
        if model.virtual_stages > 1:
            # each chunk its own FSDP root; the same chunk objects serve every runner (fully_shard changed them)
            self._chunks = [model.chunk_module(k) for k in range(len(model.chunk_ids))]
            shard_chunks(self._chunks, self.grid, self._config.dtype)
        else:
            shard_stage(model, self.grid, self._config.dtype)
        # the parameters are FSDP's DTensor shards now (new objects), fp32: the masters; the 16-bit compute
        # copies are FSDP's (MixedPrecisionPolicy)
        self.precision = Precision(model, torch.float32, self._config.fp16, self._config.gradient_clipping,
                                   self.grid, model.tied_comms, model.tied_modules, model.tied_weight_attrs,
                                   sharded=True)
        self._params = self.precision.opt_params
        self.optimizer = None
        self.lr_scheduler = lr_scheduler
        if template is not None:
            new = dict(model.named_parameters())
            groups = [[new[name_of[id(p)]] for p in g["params"]] for g in template.param_groups]
            self.optimizer = rebuild_optimizer(template, groups)
            self.lr_scheduler = bind_scheduler(lr_scheduler, template, self.optimizer) if lr_scheduler else None
        self._finish_init()

    # ----- set-up
    def _device(self) -> torch.device:
        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _check_optimizer(self, optimizer: Any) -> None:
        if optimizer is None:
            raise ValueError("PipelineEngine: pass optimizer= (a torch optimizer over this stage's parameters, or "
                             "a callable params -> optimizer)")
        if isinstance(optimizer, torch.optim.Optimizer):
            mine = {id(p) for p in self.module.parameters()}
            foreign = [i for g in optimizer.param_groups for i, p in enumerate(g["params"]) if id(p) not in mine]
            if foreign:
                raise ValueError(f"PipelineEngine: the optimizer holds {len(foreign)} tensor(s) that are not this "
                                 f"stage's ({self.stage_id}) parameters; build it over model.parameters() after "
                                 f"the PipelineModule is made")
        elif not callable(optimizer):
            raise TypeError(f"PipelineEngine: optimizer must be a torch.optim.Optimizer or a callable, got "
                            f"{type(optimizer).__name__}")

    def _make_optimizer(self, optimizer: Any):
        if isinstance(optimizer, torch.optim.Optimizer):
            return optimizer  # over the fp32 parameters, which are the masters in 16-bit
        return optimizer(self._params) if self._params else None

    def _runner(self, mode: str, n_micro: int):
        """The (stage, schedule) for a mode and micro-batch count, made once. A stage keeps per-count
        buffers, so training and evaluation (which may use another count) each get their own."""
        key = (mode, n_micro)
        if key not in self._runners:
            module, group = self.module, self.grid.get_pipe_parallel_group()
            loss_fn = {"train": self.precision.wrap_loss(module.loss_fn), "eval": module.loss_fn,
                       "logits": None}[mode]
            # the engine divides the gradients by the micro-batch count itself (Precision.grads_to_masters):
            # torch's stages would each divide their parameters', and a tie held by two chunks of one rank
            # would be divided twice
            if module.virtual_stages == 1:
                stage = PipelineStage(module, self.stage_id, self.num_stages, self.device, group=group)
                cls = _SCHEDULE_CLASSES[self.schedule_name] if mode == "train" else ScheduleGPipe
                self._runners[key] = cls(stage, n_microbatches=n_micro, loss_fn=loss_fn, scale_grads=False)
            else:
                chunks = self._chunks or [module.chunk_module(k) for k in range(len(module.chunk_ids))]
                stages: list[_PipelineStageBase] = [
                    PipelineStage(chunk, c, module.num_chunks, self.device, group=group)
                    for chunk, c in zip(chunks, module.chunk_ids)]
                if mode == "train":
                    cls = _SCHEDULE_CLASSES[self.schedule_name]
                    self._runners[key] = cls(stages, n_microbatches=n_micro, loss_fn=loss_fn, scale_grads=False)
                elif module.virtual_stage_style == "loop":  # evaluation: forwards only, in LoopedBFS's order
                    self._runners[key] = ScheduleLoopedBFS(stages, n_microbatches=n_micro, loss_fn=loss_fn,
                                                           scale_grads=False)
                else:
                    # torch's ZBV / DualPipeV keep their backward actions in eval() (they fail), and LoopedBFS
                    # assumes looped chunks; a forward-only V order needs torch's private schedule runtime
                    raise NotImplementedError(
                        f"eval_batch with V-shaped chunks (pipeline.schedule={self.schedule_name!r}) is not built; "
                        f"evaluate with a looped-chunk or one-chunk engine (checkpoints load into any layout)")
        return self._runners[key]

    # ----- data
    def set_dataiterator(self, iterator: Iterator) -> None:
        self.data_iterator = iterator

    def is_first_stage(self) -> bool:
        return self.stage_id == 0

    def is_last_stage(self) -> bool:
        """This rank computes the loss (the last rank; rank 0 with V-shaped chunks)."""
        return self.module.is_last_stage()

    def _load(self, data_iter: Iterator | None, n_micro: int):
        """This stage's whole-batch inputs and labels (``None`` where the stage does not use them), after every
        rank agreed that loading worked."""
        error: BaseException | None = None
        inputs = labels = None
        if self.is_first_stage() or self.is_last_stage():
            try:
                inputs, labels = self._take(data_iter, n_micro)
            except Exception as exc:  # noqa: BLE001 - re-raised below, after the other ranks are told
                error = exc
        failed = torch.tensor([dist.get_rank() + 1 if error else 0], dtype=torch.int64, device=self.device)
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)
        if error is not None:
            raise error
        if failed.item():
            raise PipelineError(f"rank {failed.item() - 1} could not load its micro-batches (its own error says "
                                f"why); rank {dist.get_rank()} (stage {self.stage_id}) stops too")
        return (inputs if self.is_first_stage() else None), (labels if self.is_last_stage() else None)

    def _take(self, data_iter: Iterator | None, n_micro: int):
        it = data_iter if data_iter is not None else self.data_iterator
        if it is None:
            raise ValueError(f"stage {self.stage_id}: no data iterator (pass train_batch(data_iter) or call "
                             f"set_dataiterator)")
        batches = []
        for i in range(n_micro):
            try:
                batch = next(it)
            except StopIteration:
                raise PipelineError(f"stage {self.stage_id}: the data iterator ran out after {i} of {n_micro} "
                                    f"micro-batches") from None
            if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                raise TypeError(f"stage {self.stage_id}: a micro-batch must be an (inputs, labels) pair, got "
                                f"{type(batch).__name__}")
            batches.append(batch)
        first_inputs = batches[0][0]
        as_tuple = isinstance(first_inputs, (tuple, list))
        columns = list(zip(*[tuple(b[0]) if as_tuple else (b[0],) for b in batches]))
        sizes = {int(t.shape[0]) for col in columns for t in col} | {int(b[1].shape[0]) for b in batches}
        if len(sizes) != 1:
            # torch's schedule re-splits the joined batch evenly, which only gives back the same micro-batches
            # when they are all one size
            raise ValueError(f"stage {self.stage_id}: micro-batches of different sizes {sorted(sizes)}; ds-pipe "
                             f"needs one micro-batch size per train_batch")
        # 16-bit stages take 16-bit activations: floating-point inputs are cast to the stage's dtype (token ids
        # and other integer inputs stay as they are); labels are the loss function's business
        dtype = self._config.dtype  # the compute dtype (ZeRO-3 keeps fp32 shards and computes in 16-bit)
        inputs = tuple(torch.cat(col).to(self.device, dtype=dtype if col[0].is_floating_point() else None)
                       for col in columns)
        labels = torch.cat([b[1] for b in batches]).to(self.device)
        return inputs, labels

    # ----- steps
    def train_batch(self, data_iter: Iterator | None = None) -> torch.Tensor:
        """Run ``micro_batches`` micro-batches forward and backward, reduce the gradients and step; returns
        the mean micro-batch loss on every rank."""
        self.module.train()
        inputs, labels = self._load(data_iter, self.micro_batches)
        schedule = self._runner("train", self.micro_batches)
        self.precision.zero_grad()
        losses: list[torch.Tensor] = []
        schedule.step(*(inputs or ()), target=labels, losses=losses if self.is_last_stage() else None,
                      return_outputs=False)
        scale = self.precision.loss_scale  # the scale these losses were multiplied by (the step may change it)
        losses = [loss.detach().float() / scale for loss in losses]
        if self.zero is not None:  # reduce-scatter, step the shards, all-gather (ds_pipe._zero)
            skip = self.zero.step(self.micro_batches)
        else:
            self.precision.grads_to_masters(self.micro_batches)
            self.precision.reduce_tied()  # fp32 sums: one weight over the stages that use it
            if not self.zero3:  # ZeRO-3: FSDP reduce-scattered them after the last micro-batch
                self._average_data_parallel_grads()
            skip = self.precision.unscale_clip_check()
            if not skip:
                if self.optimizer is not None:
                    self.optimizer.step()
                self.precision.masters_to_params()
        if not skip and self.lr_scheduler is not None:  # DeepSpeed: a skipped (overflow) step does not advance it
            self.lr_scheduler.step()
        self.precision.zero_grad()
        self.global_steps += 1
        return self._aggregate_loss(losses, broadcast=True)

    @torch.no_grad()
    def eval_batch(self, data_iter: Iterator | None = None, return_logits: bool = False, compute_loss: bool = True,
                   reduce_output: str | None = "avg", bcast_loss: bool = True,
                   num_micro_batches: int | None = None):
        """Forward only over ``num_micro_batches`` (default ``micro_batches``) micro-batches; returns the mean
        loss (``reduce_output=None``: the per-micro-batch losses), averaged over data-parallel replicas, on every
        rank with ``bcast_loss`` (else on the last stage); with ``return_logits`` also the joined outputs (last
        stage; ``None`` elsewhere)."""
        if reduce_output not in ("avg", None):
            raise NotImplementedError(f"eval_batch(reduce_output={reduce_output!r}): only 'avg' and None")
        if not compute_loss and not return_logits:
            raise ValueError("eval_batch: compute_loss=False without return_logits=True returns nothing")
        self.module.eval()
        n_micro = num_micro_batches or self.micro_batches
        inputs, labels = self._load(data_iter, n_micro)
        losses: list[torch.Tensor] = []
        schedule = self._runner("eval" if compute_loss else "logits", n_micro)
        outputs = schedule.eval(*(inputs or ()), target=labels if compute_loss else None,
                                losses=losses if compute_loss and self.is_last_stage() else None)
        loss = self._aggregate_loss(losses, broadcast=bcast_loss, per_micro_batch=reduce_output is None,
                                    n_micro=n_micro) if compute_loss else None
        if return_logits:
            return loss, (outputs if self.is_last_stage() else None)
        return loss

    def _average_data_parallel_grads(self) -> None:
        if self.dp_world_size == 1 or not self._params:
            return
        # every parameter has a gradient here (zeros where the step reached none): the flat buffers line up
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for p in self._params:
            g = local(grad_of(p, "PipelineEngine._average_data_parallel_grads"))  # a TP shard: this rank's
            by_dtype.setdefault(g.dtype, []).append(g)
        for grads in by_dtype.values():
            flat = _flatten_dense_tensors(grads)
            dist.all_reduce(flat, group=self.grid.get_data_parallel_group())
            flat.div_(self.dp_world_size)
            for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
                g.copy_(synced)

    def _aggregate_loss(self, losses: list[torch.Tensor], broadcast: bool, per_micro_batch: bool = False,
                        n_micro: int = 0):
        if self.is_last_stage():
            stacked = torch.stack([loss.detach().float() for loss in losses])
            loss = stacked if per_micro_batch else stacked.mean()
            if self.dp_world_size > 1:
                dist.all_reduce(loss, group=self.grid.get_data_parallel_group())
                loss /= self.dp_world_size
        else:  # the broadcast's receive buffer: the last stage's shape
            loss = torch.zeros((n_micro,) if per_micro_batch else (), dtype=torch.float32, device=self.device)
        if broadcast and self.num_stages > 1:
            dist.broadcast(loss, src=self._last_rank, group=self.grid.get_pipe_parallel_group())
        return loss if (broadcast or self.is_last_stage()) else None

    # ----- checkpoints
    def save_checkpoint(self, save_dir, tag: str | None = None, client_state: dict | None = None,
                        save_latest: bool = True) -> str:
        """DeepSpeed's per-layer pipeline checkpoint (see :mod:`ds_pipe.checkpoint`); every rank calls it.
        Returns the checkpoint directory."""
        if not save_latest:
            raise NotImplementedError("save_checkpoint(save_latest=False): 'latest' is always written")
        return _ckpt.save_checkpoint(self, save_dir, tag, client_state)

    def load_checkpoint(self, load_dir, tag: str | None = None, load_module_strict: bool = True,
                        load_optimizer_states: bool = True, load_lr_scheduler_states: bool = True):
        """``(load_path, client_state)``; ``(None, None)`` when there is no ``latest`` and no ``tag``. Works on
        another stage count or data-parallel size (weights by layer index, optimizer state by parameter name)."""
        if not load_module_strict:
            raise NotImplementedError("load_checkpoint(load_module_strict=False): layers load strictly")
        return _ckpt.load_checkpoint(self, load_dir, tag, load_optimizer_states, load_lr_scheduler_states)

    def precision_state(self) -> dict:
        return self.precision.state_dict()

    def load_precision_state(self, state: dict | None) -> None:
        self.precision.load_state_dict(state)

    def master_state(self):
        """The fp32 masters for the checkpoint: per name (replicated), or this rank's pieces (ZeRO)."""
        return self.zero.master_pieces() if self.zero is not None else self.precision.master_state()

    def load_master_state(self, masters) -> None:
        if self.zero is not None:
            self.zero.load_masters(masters)
        elif self.zero3:
            from ._zero3_ckpt import load_masters

            load_masters(self, masters)
        else:
            self.precision.load_master_state(masters)

    def optimizer_param_names(self) -> dict[int, str]:
        """``id(tensor the optimizer steps) -> module parameter name`` (the fp32 masters in 16-bit)."""
        return {id(p): n for p, n in zip(self.precision.opt_params, self.precision.names)}

    # ----- DeepSpeed's small accessors
    @property
    def skipped_steps(self) -> int:
        return self.precision.skipped_steps

    def get_loss_scale(self) -> float:
        return self.precision.loss_scale

    def get_global_grad_norm(self) -> float | None:
        """The last step's global gradient norm (computed with clipping or fp16 only)."""
        return getattr(self.precision, "norm", None)

    def get_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups] if self.optimizer is not None else []

    def parameters(self):
        return self.module.parameters()

    def train_micro_batch_size_per_gpu(self) -> int | None:
        """The config's micro-batch size (``None`` when the config gave only the accumulation steps)."""
        return self._config.micro_batch_size

    def gradient_accumulation_steps(self) -> int:
        """Micro-batches per ``train_batch`` (DeepSpeed's name for them)."""
        return self.micro_batches


def _check_mpu(mpu: Any, grid: Any) -> None:
    """An ``mpu`` passed in must describe the module's topology: each axis' size, this rank's coordinate and
    its group's members (else tensor-parallel layers and the engine would disagree on who holds what)."""
    for axis in ("model", "data", "pipe"):
        for what in ("rank", "world_size", "group"):
            name = f"get_{axis}_parallel_{what}"
            if not callable(getattr(mpu, name, None)):
                if axis == "pipe":  # Megatron's mpu has no pipeline getters: nothing to compare
                    continue
                raise TypeError(f"mpu has no {name}() (DeepSpeed's model-parallel unit interface)")
            theirs: Any
            ours: Any
            if what == "group":
                theirs = dist.get_process_group_ranks(getattr(mpu, name)())
                ours = dist.get_process_group_ranks(getattr(grid, name)())
            else:
                theirs, ours = int(getattr(mpu, name)()), int(getattr(grid, name)())
            if theirs != ours:
                raise ValueError(f"mpu.{name}() = {theirs} on rank {dist.get_rank()} but the PipelineModule's "
                                 f"topology gives {ours}; build the module with a topology matching the mpu (or "
                                 f"pass the mpu, a PipelineParallelGrid, as PipelineModule(topology=...))")


def initialize(model: PipelineModule, optimizer: Any = None, config: dict[str, Any] | None = None,
               lr_scheduler: Any = None, mpu: Any = None) -> tuple[PipelineEngine, Any, None, Any]:
    """ds-pipe on its own: ``engine, optimizer, _, scheduler = ds_pipe.initialize(model, optimizer, config)``,
    ``deepspeed.initialize``'s return shape (no data loader: ``train_batch`` takes the iterator)."""
    engine = PipelineEngine(model, optimizer=optimizer, config=config, lr_scheduler=lr_scheduler, mpu=mpu)
    return engine, engine.optimizer, None, engine.lr_scheduler
