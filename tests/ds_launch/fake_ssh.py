"""A stand-in for ssh in the tests: runs the remote command on this machine, as sshd would.

Skips ssh's options, takes the host (which it records in $FAKE_SSH_LOG with the --node_rank it was given), and runs the command string with
``sh -c`` in a new session (it is "on another machine": our signals do not reach it). Like a real connection,
the remote side's stdin is a pipe that closes when this process ends, so the agent sees EOF.
"""

import os
import subprocess
import sys

WITH_VALUE = set("BbcDEeFIiJLlmOoPpQRSWw")
args = sys.argv[1:]
while args and args[0].startswith("-") and args[0] != "--":
    opt = args.pop(0)
    if len(opt) == 2 and opt[1] in WITH_VALUE:
        args.pop(0)
if args and args[0] == "--":
    args.pop(0)
host, command = args[0], " ".join(args[1:])
node_rank = next((w.split("=", 1)[1] for w in command.split() if w.startswith("--node_rank=")), "?")
with open(os.environ["FAKE_SSH_LOG"], "a") as f:
    f.write(f"{host}:{node_rank}\n")
remote = subprocess.Popen(["sh", "-c", command], stdin=subprocess.PIPE, start_new_session=True)
try:
    sys.exit(remote.wait())
except KeyboardInterrupt:
    sys.exit(130)
