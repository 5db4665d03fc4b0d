"""A stand-in for pdsh in the tests: ``pdsh -S -f N -w h1,h2 [args] CMD`` runs CMD (with %h replaced by each
host) through ``sh -c`` in a new session per host, "remotely": our signals do not reach those processes, so
stopping them is up to the launcher's kill command. Exits with the largest exit code (-S)."""

import subprocess
import sys

args = sys.argv[1:]
hosts = []
while len(args) > 1:
    opt = args.pop(0)
    if opt in ("-f", "-R", "-l"):
        args.pop(0)
    elif opt == "-w":
        hosts = args.pop(0).split(",")
command = args[0]
procs = [subprocess.Popen(["sh", "-c", command.replace("%h", h)], stdin=subprocess.DEVNULL, start_new_session=True)
         for h in hosts]
sys.exit(max(p.wait() for p in procs))
