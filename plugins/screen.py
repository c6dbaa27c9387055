"""GNU screen as the session manager: ``--manager screen``.

Like tmux, screen keeps Jupyter in a detached session that survives logout;
``screen -r NAME`` shows it.  Needs ``screen`` on the remote login PATH.
"""

import nbtunnel

# `screen -S NAME` takes NAME as a prefix ("nb" also finds "nbtunnel"), so
# alive/stop/log run these lines in the remote Python: they find the exact
# session in `screen -ls` and address it as PID.NAME, which is unique.
# argv: NAME ACTION, where ACTION is check, quit or log.  Python 3.6-compatible.
EXACT = r"""
import os, re, subprocess, sys, tempfile, time
name, action = sys.argv[1], sys.argv[2]
out = subprocess.Popen(["screen", "-ls"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       stdin=subprocess.DEVNULL).communicate()[0].decode("utf-8", "replace")
found = re.findall(r"^\s+(\d+\." + re.escape(name) + r")\s", out, re.M)
if not found:
    sys.exit(1)
for ident in found:
    if action == "quit":
        subprocess.call(["screen", "-S", ident, "-X", "quit"])
    elif action == "log":
        fd, path = tempfile.mkstemp()
        os.close(fd)
        try:
            subprocess.call(["screen", "-S", ident, "-X", "hardcopy", path])
            for _ in range(50):  # -X returns before the screen server has written the file
                if os.path.getsize(path):
                    break
                time.sleep(0.05)
            sys.stdout.write(open(path, errors="replace").read())
        finally:
            os.remove(path)
"""


class Screen(nbtunnel.SessionManager):
    """screen -dmS NAME COMMAND...: no shell in between, so no quoting at all."""

    name = "screen"
    program = "screen"

    def start(self, session, command):
        """screen detaches by itself and keeps a terminal for the launcher."""
        return ["screen", "-dmS", session] + command

    def alive(self, session):
        """Exit status 0 when exactly this session exists."""
        return ["@PYTHON@", "-c", EXACT, session, "check"]

    def stop(self, session):
        """Quit the session and what runs in it."""
        return ["@PYTHON@", "-c", EXACT, session, "quit"]

    def log(self, session):
        """The text of the session's window."""
        return ["@PYTHON@", "-c", EXACT, session, "log"]


nbtunnel.register(Screen())
