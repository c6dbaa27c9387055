"""PID 1 of a test login node (tests/loginnodes.py): runs ARGV as its one child and
reaps every orphan the node's processes leave, until that child ends; then the node's
pid namespace, and everything in it, ends too."""

import os
import sys

child = os.fork()
if child == 0:
    os.execv(sys.argv[1], sys.argv[1:])
while True:
    try:
        pid, _ = os.wait()
    except ChildProcessError:
        break
    except InterruptedError:
        continue
    if pid == child:
        break
