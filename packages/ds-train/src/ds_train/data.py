"""The training data loader ``initialize(training_data=...)`` returns: one shard of the data per data-parallel
rank, in micro-batches, reshuffled every epoch, and resumable in the middle of an epoch.

Sharding is torch's :class:`~torch.utils.data.DistributedSampler` over the data-parallel group (as DeepSpeed's
``DeepSpeedDataLoader``): a permutation of the dataset seeded by ``seed + epoch``, dealt out rank by rank.
``drop_last`` follows DeepSpeed's ``dataloader_drop_last`` (default ``False``):

- ``False``: every sample is used each epoch. When the dataset does not divide by the number of ranks the
  sampler repeats the first few samples of the permutation so that all ranks get ``ceil(N / W)`` samples (so
  collectives stay matched), and the last micro-batch of a rank may be short.
- ``True``: the tail of the permutation is dropped so every rank gets ``floor(N / W)`` distinct samples, and a
  short last micro-batch is dropped too; ranks then see disjoint samples and only full batches.

The epoch: DeepSpeed's loader leaves ``sampler.set_epoch`` to the user, and forgetting it silently repeats the
same order every epoch. Here the loader keeps its position ``(epoch, batch)``: every ``iter()`` continues from
it, and a finished pass moves to the next epoch (calling ``set_epoch``), so ``for epoch in range(n): for batch
in loader:`` reshuffles. :meth:`state_dict`/:meth:`load_state_dict` carry that position through a checkpoint
(``client_state``): a resumed run skips the consumed batches by index, without loading their samples.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

from torch.utils.data import DataLoader, Dataset, DistributedSampler

__all__ = ["DeepSpeedDataLoader", "RepeatingLoader"]


class DeepSpeedDataLoader:
    """Micro-batches of this rank's shard of ``dataset`` (see the module docstring).

    Args: ``batch_size`` (DeepSpeed: ``train_micro_batch_size_per_gpu``), ``num_replicas``/``rank`` (the
    data-parallel world size and rank), ``collate_fn``, ``drop_last``, ``seed`` (the shuffle; the same on every
    rank), ``shuffle``, ``num_workers``, ``pin_memory`` (passed to torch's DataLoader).
    """

    def __init__(self, dataset: Dataset, batch_size: int, *, num_replicas: int = 1, rank: int = 0,
                 collate_fn: Callable | None = None, drop_last: bool = False, seed: int = 0, shuffle: bool = True,
                 num_workers: int = 0, pin_memory: bool = False) -> None:
        if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
            raise TypeError(f"training_data must be a map-style dataset (with __len__ and __getitem__), got "
                            f"{type(dataset).__name__}; an IterableDataset cannot be sharded by a sampler")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size (train_micro_batch_size_per_gpu) must be a positive int, got {batch_size!r}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, num_replicas={num_replicas})")
        if len(dataset) < num_replicas and drop_last:
            raise ValueError(f"dataset of {len(dataset)} samples has fewer samples than the {num_replicas} "
                             "data-parallel ranks; with drop_last every rank would get nothing")
        self.dataset = dataset
        self.batch_size = batch_size
        self.collate_fn = collate_fn
        self.drop_last = drop_last
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.sampler: DistributedSampler[Any] = DistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                                          drop_last=drop_last)
        #: the epoch of the next batch (the sampler's epoch)
        self.epoch = 0
        #: how many batches of this epoch have been handed out
        self.batch = 0

    def __len__(self) -> int:
        """Micro-batches per epoch on this rank."""
        n = self.sampler.num_samples
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first batch (as ``DistributedSampler.set_epoch``)."""
        self.epoch, self.batch = int(epoch), 0

    def state_dict(self) -> dict[str, int]:
        """The position of the next batch: put it in ``client_state`` of a checkpoint."""
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            epoch, batch = int(state["epoch"]), int(state["batch"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"not a DeepSpeedDataLoader state (needs int 'epoch' and 'batch'): {state!r}") from None
        if not 0 <= batch <= len(self) or epoch < 0:
            raise ValueError(f"loader state {state!r} is out of range: this loader has {len(self)} batches an epoch "
                             "(a different micro-batch size or number of ranks than the run that saved it?)")
        self.epoch, self.batch = epoch, batch

    def __iter__(self) -> Iterator[Any]:
        if self.batch >= len(self):  # a finished epoch that was not advanced yet (state saved at its very end)
            self.epoch, self.batch = self.epoch + 1, 0
        self.sampler.set_epoch(self.epoch)
        indices = list(self.sampler)[self.batch * self.batch_size:]
        # the remaining indices as a plain list sampler: the skipped batches are never loaded
        loader = DataLoader(self.dataset, batch_size=self.batch_size, sampler=indices, collate_fn=self.collate_fn,
                            drop_last=self.drop_last, num_workers=self.num_workers, pin_memory=self.pin_memory)
        for item in loader:
            self.batch += 1
            yield item
        self.epoch, self.batch = self.epoch + 1, 0


class RepeatingLoader:
    """Endless iteration over a loader (DeepSpeed's ``RepeatingLoader``): restarts it when it is exhausted, so a
    step-counted loop needs no epoch bookkeeping; with :class:`DeepSpeedDataLoader` each restart is a new epoch."""

    def __init__(self, loader) -> None:
        self.loader = loader
        self._it = iter(loader)

    def __iter__(self) -> "RepeatingLoader":
        return self

    def __next__(self):
        try:
            return next(self._it)
        except StopIteration:
            self._it = iter(self.loader)
            try:
                return next(self._it)
            except StopIteration:
                raise RuntimeError("RepeatingLoader: the wrapped loader is empty") from None

