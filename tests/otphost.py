"""A real login that asks for a one-time code after the key (PAM, libpam-oath).

``OtpHost`` is a ``RemoteHost`` whose sshd runs under a name of its own
(nbo<pid>, a symlink to sshd), so that PAM reads /etc/pam.d/nbo<pid> and leaves
every other sshd alone. It wants the key, then an HOTP code
(``AuthenticationMethods publickey,keyboard-interactive``). ``code()`` gives the
next code, as the user's token would; the sshd listens on 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import subprocess
from pathlib import Path

from helpers import free_local_port, pid_alive
from remotehost import RemoteHost

PAM_DIR = Path("/etc/pam.d")
OATHTOOL = shutil.which("oathtool") or "/usr/bin/oathtool"


def otp_missing() -> str:
    """Why this machine cannot run the one-time-code login ("" when it can)."""
    if not shutil.which("oathtool"):
        return "oathtool is not installed (bash tests/run installs it)"
    found = list(Path("/lib").glob("*/security/pam_oath.so")) + list(
        Path("/usr/lib").glob("*/security/pam_oath.so"))
    return "" if found else "libpam-oath is not installed (bash tests/run installs it)"


class OtpHost(RemoteHost):
    """A user whose login needs the key and then a one-time code."""

    alias = "nbotp"

    def __init__(self) -> None:
        super().__init__()
        pid = os.getpid()
        self.user = f"nbo{pid}"
        self.netns = None  # and no veth: the shared test remote's (nbt<pid>h) is not ours
        self.veth_host = f"nbo{pid}h"
        self.service = f"nbo{pid}"
        self.pam_file = PAM_DIR / self.service
        self.users_file = self.workdir / "users.oath"
        self.secret = secrets.token_hex(20)
        self.counter = 0
        self.typed = 0

    def _make_network(self) -> None:
        for stale in PAM_DIR.glob("nbo*"):  # of runs that were killed
            match = re.fullmatch(r"nbo(\d+)", stale.name)
            if match and not pid_alive(int(match.group(1))):
                stale.unlink(missing_ok=True)
        self.ip = self.host_ip = "127.0.0.1"
        self.port = free_local_port()

    def _write_configs(self) -> None:
        self.users_file.write_text(f"HOTP {self.user} - {self.secret}\n")
        self.users_file.chmod(0o600)
        self.pam_file.write_text(
            f"auth requisite pam_oath.so usersfile={self.users_file} window=50\n"
            "account required pam_permit.so\nsession required pam_permit.so\n")
        self.sshd_config.write_text(f"""\
Port {self.port}
ListenAddress 127.0.0.1
HostKey {self.host_key}
PidFile {self.workdir}/sshd.pid
UsePAM yes
PasswordAuthentication no
KbdInteractiveAuthentication yes
PubkeyAuthentication yes
AuthenticationMethods publickey,keyboard-interactive
AuthorizedKeysFile .ssh/authorized_keys
PermitRootLogin no
StrictModes no
AllowTcpForwarding yes
AllowStreamLocalForwarding yes
X11Forwarding no
PrintMotd no
PrintLastLog no
LogLevel VERBOSE
""")
        # No BatchMode: on a terminal, ssh asks for the code as it would for anyone.
        self.ssh_config.write_text(self.ssh_config_block(self.alias, BatchMode=None,
                                                         ConnectTimeout=10))

    def _start_sshd(self) -> None:
        named = self.workdir / self.service  # sshd takes its PAM service from its name
        named.symlink_to(os.path.realpath(shutil.which("sshd") or "/usr/sbin/sshd"))
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        self.sshd = subprocess.Popen([str(named), "-D", "-f", str(self.sshd_config),
                                      "-E", str(self.sshd_log)], stdin=subprocess.DEVNULL)
        from helpers import wait_until
        wait_until(lambda: self.port_open(self.port), 15, message="sshd with one-time codes")

    def code(self) -> str:
        """The next one-time code, as the user's token shows it."""
        self.counter += 1
        self.typed += 1
        return subprocess.run([OATHTOOL, "--hotp", "-c", str(self.counter), self.secret],
                              check=True, capture_output=True, text=True).stdout.strip()

    def stop(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.pam_file.unlink()
        super().stop()

    def describe(self) -> str:
        return f"one-time-code host: sshd {self.service} on 127.0.0.1:{self.port}, user {self.user}"
