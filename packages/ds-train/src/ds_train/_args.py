"""DeepSpeed's command-line arguments: ``parser = ds_train.add_config_arguments(parser)``.

Adds an argument group "DeepSpeed" with ``--deepspeed`` (a flag for the script's own use; it changes nothing
here or in DeepSpeed), ``--deepspeed_config PATH`` (what ``initialize(args=args)`` reads), and DeepSpeed's
deprecated aliases ``--deepscale`` / ``--deepscale_config`` (``initialize`` takes ``args.deepscale_config`` when
``--deepspeed_config`` is not given, with a warning, as DeepSpeed does).
"""

from __future__ import annotations

import argparse

__all__ = ["add_config_arguments"]


def add_config_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add DeepSpeed's ``--deepspeed``, ``--deepspeed_config``, ``--deepscale``, ``--deepscale_config`` to
    ``parser`` and return it."""
    if not isinstance(parser, argparse.ArgumentParser):
        raise TypeError(f"add_config_arguments needs an argparse.ArgumentParser, got {type(parser).__name__}")
    group = parser.add_argument_group("DeepSpeed", "DeepSpeed configurations")
    group.add_argument("--deepspeed", default=False, action="store_true",
                       help="enable DeepSpeed (a flag for the script itself; no effect on the engine)")
    group.add_argument("--deepspeed_config", default=None, type=str, help="DeepSpeed JSON configuration file")
    group.add_argument("--deepscale", default=False, action="store_true",
                       help="deprecated alias of --deepspeed")
    group.add_argument("--deepscale_config", default=None, type=str,
                       help="deprecated alias of --deepspeed_config")
    return parser
