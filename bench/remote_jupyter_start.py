"""Runs on the remote, as the remote user (sent on python3's stdin by bench.py).

Starts Jupyter exactly as nbtunnel asks it to (the argv given as JSON in argv[1], a
free port found the same way), times until its runtime file is there and /api/status
answers 200, stops it, and prints {"file": s, "ready": s, "exit": code} as JSON.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request


def free_port():
    """A port free on the remote's 127.0.0.1 right now."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def read_runtime(path, proc, t0):
    """The server's runtime file once it is there (None if the server died or 120 s passed)."""
    while time.monotonic() - t0 < 120 and proc.poll() is None:
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, ValueError):
            time.sleep(0.01)
    return None


def wait_ready(info, t0):
    """Seconds from T0 to the first 200 from /api/status (None after 120 s)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    req = urllib.request.Request(
        "http://127.0.0.1:%d%sapi/status" % (info["port"], info.get("base_url", "/")),
        headers={"Authorization": "token " + info["token"]})
    while time.monotonic() - t0 < 120:
        try:
            if opener.open(req, timeout=5).status == 200:
                return time.monotonic() - t0
        except Exception:
            time.sleep(0.01)
    return None


def main(argv):
    """Time one start of ARGV; print the result."""
    runtime = os.path.expanduser("~/.local/share/jupyter/runtime")
    log = open(os.path.expanduser("~/nbbench-jupyter.log"), "wb")
    t0 = time.monotonic()
    proc = subprocess.Popen(argv + ["--port=%d" % free_port()], stdin=subprocess.DEVNULL,
                            stdout=log, stderr=subprocess.STDOUT, cwd=os.path.expanduser("~"))
    path = os.path.join(runtime, "jpserver-%d.json" % proc.pid)
    info = read_runtime(path, proc, t0)
    t_file = time.monotonic() - t0
    t_ready = wait_ready(info, t0) if info else None
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    try:
        os.remove(path)
    except OSError:
        pass
    print(json.dumps(dict(file=t_file, ready=t_ready, exit=proc.returncode)))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
