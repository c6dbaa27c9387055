"""Run nbtunnel.py with every process it starts timed, for the "where the time goes" table.

    python trace_nbtunnel.py NBTUNNEL_PY ARGS...     (writes JSON to $NBBENCH_TRACE)

nbtunnel starts every process through one function, subproc; this wraps it and records
each argv with its start and end (wall clock), plus when the program was loaded and when
main() returned.
"""

import json
import os
import runpy
import sys
import threading
import time


def main(path, args):
    """Load PATH as a module, time its subproc calls, run its main(ARGS); the exit code."""
    t0 = time.time()
    g = runpy.run_path(path, run_name="nbtunnel_traced")
    loaded = time.time()
    steps = []
    lock = threading.Lock()
    module = g["main"].__globals__
    real = module["subproc"]

    def subproc(argv, **kw):
        start = time.time()
        try:
            return real(argv, **kw)
        finally:
            with lock:
                steps.append(dict(argv=argv, start=start, end=time.time()))

    module["subproc"] = subproc
    try:
        return module["main"](args)
    finally:
        with open(os.environ["NBBENCH_TRACE"], "w") as f:
            json.dump(dict(start=t0, loaded=loaded, end=time.time(),
                           steps=sorted(steps, key=lambda s: s["start"])), f)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
