"""``python -m ds_train.config ds_config.json [--world-size N]``: validate a DeepSpeed config and print it as it
will run (JSON, defaults filled in, batch sizes resolved). Exit status 2 and the reason on stderr when it is
invalid."""

from __future__ import annotations

import argparse
import json
import os
import sys

from . import effective_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ds_train.config",
                                     description="Validate a DeepSpeed JSON config and print it as it will run.")
    parser.add_argument("config", help="path to the DeepSpeed JSON config")
    parser.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", 1)),
                        help="data-parallel ranks, to resolve the batch sizes (default $WORLD_SIZE or 1)")
    args = parser.parse_args(argv)
    try:
        effective = effective_config(args.config, args.world_size)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(effective, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
