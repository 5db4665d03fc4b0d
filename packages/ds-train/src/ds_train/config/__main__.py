"""``python -m ds_train.config ds_config.json [--world-size N]``: validate a DeepSpeed config with every check
``initialize`` makes (:func:`ds_train.config.check_config`) and print it as it will run (JSON, defaults filled in,
batch sizes resolved). Exit status 2 and every problem on stderr when it is invalid; warnings (ignored DeepSpeed
keys) on stderr either way."""

from __future__ import annotations

import argparse
import json
import os
import sys

from . import ConfigError, _check


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ds_train.config",
                                     description="Validate a DeepSpeed JSON config and print it as it will run.")
    parser.add_argument("config", help="path to the DeepSpeed JSON config")
    parser.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", 1)),
                        help="data-parallel ranks, to resolve the batch sizes (default $WORLD_SIZE or 1)")
    args = parser.parse_args(argv)
    try:
        # the same function initialize calls (check_config), without its logging: the warnings go to stderr here
        cfg, warnings = _check(args.config, args.world_size)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(json.dumps(cfg.effective(args.world_size), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
