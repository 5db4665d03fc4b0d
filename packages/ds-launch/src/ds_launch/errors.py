"""The one error type the launcher raises for bad input; the command line turns it into exit code 2."""

from __future__ import annotations

USAGE_EXIT_CODE = 2  # argparse's code for a usage error; ds-launch uses it for every bad input


class LaunchError(ValueError):
    """Bad input to the launcher (flags, hostfile, include/exclude, environment, script path).

    The message names the thing at fault; ``ds-launch`` prints it as ``ds-launch: error: ...`` and exits 2.
    """
