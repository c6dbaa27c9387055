"""nohup as the session manager: ``--manager nohup``, for hosts without tmux or screen.

Jupyter runs as a plain background process in a session of its own (setsid),
with SIGHUP ignored (nohup) and stdin from /dev/null, so it survives logout and
the ssh connection closing.  There is no terminal to reattach to: the session
is the pid in the launcher's pid file, and it is alive while that pid is still
that Jupyter.  Needs only coreutils' nohup (and Linux /proc or ps).
"""

import nbtunnel

# argv: ACTION PIDFILE, where ACTION is alive or stop.  Run by the remote
# Python (3.6-compatible).  A pid is only trusted while it is still a Jupyter
# process: after a reboot or a crash the file may name a reused pid.
PID = r"""
import os, signal, subprocess, sys, time
action, pidfile = sys.argv[1], sys.argv[2]

def jupyter(pid):
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:
        with open("/proc/%d/status" % pid) as f:
            if any(l.startswith("State:") and "Z" in l.split()[1] for l in f):
                return False
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return b"jupyter" in f.read()
    except (IOError, OSError):
        args = subprocess.Popen(["ps", "-p", str(pid), "-o", "args="], stdout=subprocess.PIPE,
                                stdin=subprocess.DEVNULL).communicate()[0]
        return b"jupyter" in args

try:
    pid = int(open(pidfile).read().strip())
except (IOError, OSError, ValueError):
    sys.exit(1)
if not jupyter(pid):
    sys.exit(1)
if action == "stop":
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(pid, sig)  # the launcher led its own session: its whole group
        except OSError:
            os.kill(pid, sig)
        deadline = time.time() + wait
        while time.time() < deadline and jupyter(pid):
            time.sleep(0.1)
        if not jupyter(pid):
            break
"""


class Nohup(nbtunnel.SessionManager):
    """nohup COMMAND..., started detached by the remote helper (detach = True)."""

    name = "nohup"
    program = "nohup"
    detach = True

    def start(self, session, command):
        """The helper adds setsid, stdin from /dev/null and the output file."""
        return ["nohup"] + command

    def alive(self, session):
        """Exit status 0 while the recorded pid is still that Jupyter."""
        return ["@PYTHON@", "-c", PID, "alive", "@PIDFILE@"]

    def stop(self, session):
        """SIGTERM, then SIGKILL, to the process group of that Jupyter."""
        return ["@PYTHON@", "-c", PID, "stop", "@PIDFILE@"]

    def log(self, session):
        """What the launcher printed before Jupyter's own log took over."""
        return ["cat", "@OUTPUT@"]


nbtunnel.register(Nohup())
