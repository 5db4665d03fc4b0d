"""DeepSpeed's monitors (``deepspeed.monitor``): TensorBoard, CSV and Weights & Biases, behind one
:class:`MonitorMaster` that the engine writes its metrics to.

The engine writes DeepSpeed's metric names, on global rank 0 only, at every optimizer step (DeepSpeed's cadence;
``steps_per_print`` only paces the log lines), with the number of samples trained so far as the step:

- ``Train/Samples/train_loss``: the mean loss of the step's micro-batches, at the samples *before* the step (DeepSpeed
  writes it in the boundary ``backward``);
- ``Train/Samples/lr`` (first param group) and, with fp16, ``Train/Samples/loss_scale``, at the samples after it;
- with ``wall_clock_breakdown``: ``Train/Samples/elapsed_time_ms_forward``, ``..._backward``,
  ``..._backward_allreduce``, ``..._step`` (ms of that step);
- ``Train/Samples/samples_per_sec`` (ds-train's addition: the step's throughput, which DeepSpeed only logs).

Layouts: TensorBoard event files in ``output_path/job_name`` (``torch.utils.tensorboard``); CSV as DeepSpeed's
``csvMonitor``: one file per metric, ``output_path/job_name/<name with / -> _>.csv``, header ``step,<last part of
the name>``, one ``step,value`` row per write; wandb ``wandb.log({name: value}, step=samples)``.

A monitor whose package is missing is an ImportError naming what to install, raised on every rank (so that no
rank waits for one that failed).
"""

from __future__ import annotations

import csv
import logging
import os
from typing import Any, Iterable

logger = logging.getLogger("ds_train")

__all__ = ["Monitor", "TensorBoardMonitor", "csvMonitor", "WandbMonitor", "MonitorMaster", "Event"]

#: (name, value, step): DeepSpeed's event tuple
Event = tuple[str, float, int]


def _section(config: Any, name: str) -> Any:
    return getattr(config, name, None)


class Monitor:
    """A destination for events; ``write_events`` is called on rank 0 only."""

    enabled = False

    def write_events(self, event_list: Iterable[Event]) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:
        return None


def _log_dir(section: Any) -> str:
    return os.path.join(section.output_path, section.job_name)


class TensorBoardMonitor(Monitor):
    """``tensorboard`` section: a ``torch.utils.tensorboard.SummaryWriter`` in ``output_path/job_name``."""

    def __init__(self, section: Any, rank: int) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # torch's module imports the tensorboard package
            raise ImportError("the DeepSpeed config enables \"tensorboard\", which needs the tensorboard package: "
                              "pip install tensorboard (or pip install 'ds-train[tensorboard]')") from e
        self.enabled = bool(section.enabled)
        self.log_dir = _log_dir(section)
        self.summary_writer = None
        if self.enabled and rank == 0:
            os.makedirs(self.log_dir, exist_ok=True)
            self.summary_writer = SummaryWriter(log_dir=self.log_dir)

    def write_events(self, event_list: Iterable[Event], flush: bool = True) -> None:
        if self.summary_writer is None:
            return
        for name, value, step in event_list:
            self.summary_writer.add_scalar(name, value, step)
        if flush:
            self.summary_writer.flush()

    def close(self) -> None:
        if self.summary_writer is not None:
            self.summary_writer.close()
            self.summary_writer = None


class csvMonitor(Monitor):  # noqa: N801 - DeepSpeed's class name
    """``csv_monitor`` section: one CSV file per metric (DeepSpeed's layout, see the module docstring)."""

    def __init__(self, section: Any, rank: int) -> None:
        self.enabled = bool(section.enabled)
        self.log_dir = _log_dir(section)
        self.rank = rank
        self.filenames: set[str] = set()  # files this process has written its header to
        if self.enabled and rank == 0:
            os.makedirs(self.log_dir, exist_ok=True)

    @staticmethod
    def filename(name: str) -> str:
        return name.replace("/", "_").replace(" ", "_") + ".csv"

    def write_events(self, event_list: Iterable[Event]) -> None:
        if not self.enabled or self.rank != 0:
            return
        for name, value, step in event_list:
            header = name.rsplit("/", 1)[-1]
            filename = self.filename(name)
            with open(os.path.join(self.log_dir, filename), "a", newline="", encoding="utf-8") as f:
                writer = csv.writer(f)
                if filename not in self.filenames:
                    self.filenames.add(filename)
                    writer.writerow(["step", header])
                writer.writerow([step, value])


class WandbMonitor(Monitor):
    """``wandb`` section: ``wandb.init(project, group, entity=team)`` on rank 0; offline with wandb's own
    ``WANDB_MODE=offline`` (no account or network needed)."""

    def __init__(self, section: Any, rank: int) -> None:
        try:
            import wandb
        except ImportError as e:
            raise ImportError("the DeepSpeed config enables \"wandb\", which needs the wandb package: pip install "
                              "wandb (set WANDB_MODE=offline to log without an account)") from e
        self.enabled = bool(section.enabled)
        self.rank = rank
        self._wandb = wandb
        self.run = None
        if self.enabled and rank == 0:
            self.run = wandb.init(project=section.project, group=section.group, entity=section.team)

    def write_events(self, event_list: Iterable[Event]) -> None:
        if self.run is None:
            return
        for name, value, step in event_list:
            self._wandb.log({name: value}, step=step)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


class MonitorMaster(Monitor):
    """DeepSpeed's ``MonitorMaster``: every enabled monitor of the config; ``enabled`` when one is."""

    def __init__(self, config: Any, rank: int = 0) -> None:
        self.monitors: list[Monitor] = []
        for name, cls in (("tensorboard", TensorBoardMonitor), ("wandb", WandbMonitor), ("csv_monitor", csvMonitor)):
            section = _section(config, name)
            if section is not None and section.enabled:
                self.monitors.append(cls(section, rank))
        self.enabled = bool(self.monitors)
        self.rank = rank

    def write_events(self, event_list: Iterable[Event]) -> None:
        if self.rank != 0 or not self.monitors:
            return
        events = [(name, float(value), int(step)) for name, value, step in event_list]
        for monitor in self.monitors:
            monitor.write_events(events)

    def close(self) -> None:
        for monitor in self.monitors:
            monitor.close()
