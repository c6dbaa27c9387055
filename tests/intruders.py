"""Hostile co-users for the security tests: real unprivileged accounts, made per run.

An ``Account`` is a local user (``nbx<pid><tag>``) who can run processes in the
root namespace (the laptop side) or, with ``netns``, inside the remote's network
namespace (the remote side: another user of the same login node).  A ``Captor``
is such a user's TCP listener that binds a port and writes every byte it receives
to a file, which the tests then search for the token.

Accounts are removed at the end of the session; accounts of earlier runs whose
pytest process is gone are removed when the first one is made.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from helpers import kill_pids, pid_alive, wait_until
from remotehost import _remove_user, _root, _user_uid

COMMENT = "nbtunnel security test user"
SYSTEM_PYTHON = "/usr/bin/python3"  # the venv's Python lives under /root, unreadable to others

# Listens on 127.0.0.1:PORT, answers every request with 200 {} and appends what it
# received to FILE (one line per connection).  argv: port file [name words...]
CAPTOR = r"""
import socket, sys
port, out = int(sys.argv[1]), sys.argv[2]
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # what an attacker would do
s.bind(("127.0.0.1", port))
s.listen(16)
open(out + ".ready", "w").close()
while True:
    c, _ = s.accept()
    c.settimeout(2)
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = c.recv(65536)
            if not chunk:
                break
            data += chunk
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
    except OSError:
        pass
    c.close()
    with open(out, "ab") as f:
        f.write(data + b"\n----\n")
"""


def _stale(name: str) -> bool:
    match = re.fullmatch(r"nbx(\d+)[a-z]", name)
    return bool(match) and (int(match.group(1)) == os.getpid() or not pid_alive(int(match.group(1))))


def reap_stale_accounts() -> None:
    """Remove accounts an earlier, killed run of this suite left behind."""
    for entry in pwd.getpwall():
        if entry.pw_gecos == COMMENT and _stale(entry.pw_name):
            _remove_user(entry.pw_name)


class Account:
    """A real unprivileged local account, removed by remove()."""

    def __init__(self, tag: str) -> None:
        self.name = f"nbx{os.getpid()}{tag}"
        _remove_user(self.name)
        _root(["useradd", "-m", "-s", "/bin/bash", "-c", COMMENT, self.name])
        entry = pwd.getpwnam(self.name)
        self.uid, self.gid, self.home = entry.pw_uid, entry.pw_gid, Path(entry.pw_dir)
        self.home.chmod(0o755)  # so that files it shares (captures) can be read by the tests
        self.procs: list[subprocess.Popen] = []

    def argv(self, argv: list[str], netns: str | None = None) -> list[str]:
        """argv run as this user, in the network namespace NETNS if given."""
        env = ["env", "-i", f"HOME={self.home}", f"USER={self.name}", "LOGNAME=" + self.name,
               "PATH=/usr/local/bin:/usr/bin:/bin", "LANG=C.UTF-8"]
        inner = ["runuser", "-u", self.name, "--", *env, *argv]
        return ["ip", "netns", "exec", netns, *inner] if netns else inner

    def run(self, argv: list[str], netns: str | None = None, timeout: float = 60,
            input: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
        """Run argv as this user to completion (text output captured)."""
        return subprocess.run(self.argv(argv, netns), capture_output=True, text=True,
                              timeout=timeout, input=input, cwd="/",
                              stdin=None if input is not None else subprocess.DEVNULL, env=env)

    def python(self, code: str, *args: str, netns: str | None = None, timeout: float = 60):
        """Run Python CODE as this user."""
        return self.run([SYSTEM_PYTHON, "-c", code, *args], netns=netns, timeout=timeout)

    def popen(self, argv: list[str], netns: str | None = None) -> subprocess.Popen:
        """Start argv as this user in the background (killed by remove())."""
        proc = subprocess.Popen(self.argv(argv, netns), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd="/")
        self.procs.append(proc)
        return proc

    def captor(self, port: int, netns: str | None = None, name: str = "listener") -> Captor:
        """Bind 127.0.0.1:PORT (here, or inside NETNS) and record what arrives."""
        return Captor(self, port, netns, name)

    def remove(self) -> None:
        """Kill its processes and delete the account with its files."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
        _remove_user(self.name)


class Captor:
    """A hostile user's listener on a port: what it received is in .received()."""

    def __init__(self, account: Account, port: int, netns: str | None, name: str) -> None:
        self.account, self.port = account, port
        self.dir = Path(tempfile.mkdtemp(prefix="nbxcap"))
        os.chown(self.dir, account.uid, account.gid)
        self.file = self.dir / "received"
        # The process name carries NAME (e.g. "jupyter-lab") as its argv[0] words.
        self.proc = account.popen([SYSTEM_PYTHON, "-c", CAPTOR, str(port), str(self.file), name],
                                  netns)

    def wait_ready(self, timeout: float = 15) -> bool:
        """True once it has bound the port; False if it exited (the port was taken)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if Path(str(self.file) + ".ready").exists():
                return True
            if self.proc.poll() is not None:
                return False
            time.sleep(0.02)
        return False

    def received(self) -> bytes:
        """Every byte received so far."""
        try:
            return self.file.read_bytes()
        except FileNotFoundError:
            return b""

    def stop(self) -> None:
        """Kill it and remove its files."""
        if self.proc.poll() is None:
            kill_pids([self.proc.pid])
            self.proc.kill()
        self.proc.wait(timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)


def uid_exists(name: str) -> bool:
    """Does account NAME still exist?"""
    return _user_uid(name) is not None


def wait_port_free(port: int, check, timeout: float = 15) -> None:
    """Wait until CHECK(port) (a port_open function) says nothing listens on PORT."""
    wait_until(lambda: not check(port), timeout, message=f"port {port} freed")

