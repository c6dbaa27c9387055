"""nohup as the session manager: ``--manager nohup``, for hosts without tmux or screen.

Jupyter runs as a plain background process in a session of its own (setsid),
with SIGHUP ignored (nohup) and stdin from /dev/null, so it survives logout and
the ssh connection closing.  There is no terminal to reattach to: the session
is the pid in the launcher's pid file, judged and stopped by the core
(``nbtunnel.PidFileManager``).  Needs only coreutils' nohup.
"""

import nbtunnel


class Nohup(nbtunnel.PidFileManager):
    """nohup COMMAND..., started detached by the remote side."""

    name = "nohup"
    program = "nohup"

    def start(self, session, command):
        """The remote side adds setsid, stdin from /dev/null and the output file."""
        return ["nohup"] + command


nbtunnel.register(Nohup())
