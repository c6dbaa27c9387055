"""GNU screen as the session manager: ``--manager screen``.

Like tmux, screen keeps Jupyter in a detached session that survives logout;
``screen -r NAME`` shows it.  Needs ``screen`` on the remote login PATH.
"""

import nbtunnel


def exact_session(name, action):
    """Run on the remote (nbtunnel.remote_call): find the screen session called exactly NAME
    and do ACTION to it: "check" (nothing), "quit" or "log" (print its window); exit status
    1 when there is none.

    `screen -S NAME` takes NAME as a prefix ("nb" also finds "nbtunnel"; only newer screens
    prefer an exact match), so the session is found in `screen -ls` and addressed as
    PID.NAME, which is unique.  Runs alone: Python 3.6 grammar, standard library only."""
    import os
    import re
    import subprocess
    import sys
    import tempfile
    import time

    listing = subprocess.run(["screen", "-ls"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL).stdout.decode("utf-8", "replace")
    found = re.findall(r"^\s+(\d+\." + re.escape(name) + r")\s", listing, re.M)
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
                with open(path, errors="replace") as f:
                    sys.stdout.write(f.read())
            finally:
                os.remove(path)
    return 0 if found else 1


class Screen(nbtunnel.SessionManager):
    """screen -dmS NAME COMMAND...: no shell in between, so no quoting at all."""

    name = "screen"
    program = "screen"

    def start(self, session, command):
        """screen detaches by itself and keeps a terminal for the launcher."""
        return ["screen", "-dmS", session] + command

    def alive(self, session):
        """Exit status 0 when exactly this session exists."""
        return nbtunnel.remote_call(exact_session, session, "check")

    def stop(self, session):
        """Quit the session and what runs in it."""
        return nbtunnel.remote_call(exact_session, session, "quit")

    def log(self, session):
        """The text of the session's window."""
        return nbtunnel.remote_call(exact_session, session, "log")


nbtunnel.register(Screen())
