"""ds-launch: start a training script on every GPU (or N CPU workers) of one machine or many.

DeepSpeed's command line and hostfile, torchrun's worker environment, and a supervisor that fails fast
(first failing worker's exit code, every other worker on every node stopped), forwards signals, prefixes
output by rank and restarts the group (``--max_restarts``). Standard library only: no torch import.

- :func:`parse_hostfile`, :func:`filter_resources` (``--include``/``--exclude``), :func:`detect_local_gpus`;
- :func:`worker_env`: the environment a worker gets; :func:`collect_exports`: what reaches remote nodes;
- :class:`Supervisor`/:class:`ProcSpec`: the process-group supervisor; :data:`RUNNERS`: ssh, pdsh,
  openmpi, mpich/impi, slurm;
- :class:`Watchdog`: stopped or silent workers fail the job (exit :data:`HUNG_EXIT_CODE`); the worker side of
  the heartbeat protocol is :func:`beat` / :func:`done` (``$DS_LAUNCH_HEARTBEAT_FILE``).
"""

from ._version import __version__
from .environment import EXPORT_PREFIXES, collect_exports, parse_env_file_text, read_env_files, worker_env
from .errors import LaunchError
from .heartbeat import HEARTBEAT_ENV, beat, done
from .hostfile import check_hostname, parse_hostfile, parse_hostfile_text
from .resources import decode_world_info, detect_local_gpus, encode_world_info, filter_resources
from .runners import RUNNERS, LaunchPlan, make_runner
from .supervisor import ProcSpec, Supervisor
from .watchdog import HUNG_EXIT_CODE, Watchdog

__all__ = [
    "__version__",
    "LaunchError",
    "parse_hostfile",
    "parse_hostfile_text",
    "check_hostname",
    "filter_resources",
    "detect_local_gpus",
    "encode_world_info",
    "decode_world_info",
    "worker_env",
    "collect_exports",
    "parse_env_file_text",
    "read_env_files",
    "EXPORT_PREFIXES",
    "ProcSpec",
    "Supervisor",
    "RUNNERS",
    "LaunchPlan",
    "make_runner",
    "Watchdog",
    "HUNG_EXIT_CODE",
    "HEARTBEAT_ENV",
    "beat",
    "done",
]
