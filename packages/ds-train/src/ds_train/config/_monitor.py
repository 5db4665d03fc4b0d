"""The monitor sections (``tensorboard``, ``csv_monitor``, ``wandb``) and ``comms_logger``, with DeepSpeed's keys
and defaults (``deepspeed.monitor.config`` and ``deepspeed.comm.config``).

Each is a :class:`ds_zero.config.StrictModel`, so an unknown key is an error with the closest known spelling, as
in every other section. ``comet`` stays refused by name (the Comet monitor is not built).
"""

from __future__ import annotations

from pydantic import field_validator

from ds_zero.config import StrictModel

__all__ = ["TensorBoardConfig", "CSVConfig", "WandbConfig", "CommsLoggerConfig", "DEFAULT_JOB_NAME"]

DEFAULT_JOB_NAME = "DeepSpeedJobName"

#: the collectives the comms logger knows by name (DeepSpeed's ``log_name`` defaults; ``prof_ops`` lists these)
COMMS_OPS = ("all_reduce", "inference_all_reduce", "all_reduce_coalesced", "all_gather", "all_gather_into_tensor",
             "reduce_scatter", "reduce_scatter_tensor", "all_to_all_single", "all_to_all", "broadcast", "reduce",
             "gather", "scatter", "send", "recv", "isend", "irecv", "barrier", "compressed_allreduce",
             "quantized_all_gather", "quantized_reduce_scatter")


class _OutputMonitor(StrictModel):
    enabled: bool = False
    #: DeepSpeed writes under the launching directory when empty; so does this (``os.path.join("", job_name)``)
    output_path: str = ""
    job_name: str = DEFAULT_JOB_NAME

    @field_validator("job_name")
    @classmethod
    def _job_name(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("job_name must not be empty (it is the directory the files go to)")
        return value


class TensorBoardConfig(_OutputMonitor):
    """``"tensorboard": {"enabled", "output_path", "job_name"}``: event files in ``output_path/job_name``."""


class CSVConfig(_OutputMonitor):
    """``"csv_monitor": {"enabled", "output_path", "job_name"}``: one CSV file per metric in
    ``output_path/job_name``."""


class WandbConfig(StrictModel):
    """``"wandb": {"enabled", "team", "group", "project"}`` (``wandb.init(project, group, entity=team)``; offline
    runs through wandb's own ``WANDB_MODE=offline``)."""

    enabled: bool = False
    team: str | None = None
    group: str | None = None
    project: str = "deepspeed"


class CommsLoggerConfig(StrictModel):
    """``"comms_logger": {"enabled", "verbose", "prof_all", "prof_ops", "debug"}`` (DeepSpeed's defaults)."""

    enabled: bool = False
    #: print every logged collective as it completes
    verbose: bool = False
    #: log every collective; else only those whose log name is in ``prof_ops`` (or called with ``prof=True``)
    prof_all: bool = True
    prof_ops: list[str] = []
    #: append the calling function's name to each record's name
    debug: bool = False

    @field_validator("prof_ops")
    @classmethod
    def _known_ops(cls, value: list[str]) -> list[str]:
        import difflib

        # a log name is free-form in DeepSpeed (``log_name=`` of any call), so only a near miss of a collective's
        # own name is taken as a typo
        for name in value:
            close = difflib.get_close_matches(name, COMMS_OPS, n=1, cutoff=0.8)
            if name not in COMMS_OPS and close:
                raise ValueError(f"{name!r} is not a collective's log name; did you mean {close[0]!r}?")
        return value
