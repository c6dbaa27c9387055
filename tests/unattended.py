"""What the --ensure/--watch tests and the fault suite share: a TCP relay in front of
the remote sshd that a test can cut or stall, an ssh_config through it, a
passphrase-protected key for the never-prompts tests, and runs of --ensure and --watch.
URL checks and process counts live in helpers (and are importable from here too)."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

# Defined in helpers; importable from here too, as the fault and --watch tests do.
from helpers import (  # noqa: F401
    api_status,
    forwards,
    free_local_port,
    jupyter_pids,
    kill_masters,
    listening_ports,
    masters,
    pid_alive,
    run_in_pty,
    start,
    wait_until,
)


def read_line(proc: subprocess.Popen, timeout: float) -> str:
    """One line of proc's stdout, waiting at most timeout seconds ('' if none came)."""
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline() if ready else ""


# A link that a test can cut or stall ##########################################


class TcpProxy:
    """Relays 127.0.0.1:port to target; cut() drops every connection and stops
    listening (the host is gone), stall() stops passing bytes without closing anything
    (a dead link), restore() undoes either."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_local_port()
        self.stalled = threading.Event()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        """Pass bytes again; listen again if cut."""
        self.stalled.clear()
        if self._listener is None:
            listener = socket.socket()
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", self.port))
            listener.listen(16)
            self._listener = listener
            threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stall(self) -> None:
        """Hold every byte from now on (connections stay open, new ones are accepted)."""
        self.stalled.set()

    def cut(self) -> None:
        """Drop every connection and stop listening."""
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                while self.stalled.is_set() and src.fileno() != -1:
                    time.sleep(0.05)
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def proxy_config(nbt, remote, proxy: TcpProxy, alias: str = "nbproxy") -> Path:
    """An ssh_config (in the test's own directory) whose ALIAS reaches the remote through PROXY."""
    known = remote.write_known_hosts(nbt.tmp / "proxy_known_hosts", "127.0.0.1", proxy.port)
    return remote.write_ssh_config(
        nbt.tmp / "proxy_ssh_config",
        alias,
        HostName="127.0.0.1",
        Port=proxy.port,
        UserKnownHostsFile=known,
    )


# Prompts ######################################################################


@contextlib.contextmanager
def passphrase_key(nbt, remote):
    """A passphrase-protected key the remote accepts, and an ssh_config (without
    BatchMode) whose alias `nbkeyed` offers only that key; yields the config path."""
    key = nbt.tmp / "id_locked"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "correct horse", "-C", "locked", "-f", str(key)],
        check=True,
        capture_output=True,
    )
    authorized = remote.home / ".ssh" / "authorized_keys"
    before = authorized.read_text()
    authorized.write_text(before + Path(f"{key}.pub").read_text())
    config = remote.write_ssh_config(
        nbt.tmp / "keyed_ssh_config", "nbkeyed", IdentityFile=key, BatchMode=None, ConnectTimeout=10
    )
    try:
        yield config
    finally:
        authorized.write_text(before)


# Running nbtunnel ############################################################


def ensure(nbt, *args: str, host: str | None = None) -> subprocess.CompletedProcess:
    """Run --ensure to completion."""
    return nbt.run(host or nbt.remote.alias, "--ensure", *args, timeout=180)


def watch(nbt, *args: str, host: str | None = None) -> tuple[subprocess.Popen, str]:
    """Start --watch; return the process and the URL it printed."""
    proc = nbt.popen(host or nbt.remote.alias, "--watch", "--interval", "1", "--timeout", "10", *args)
    url = read_line(proc, 90).strip()
    assert url.startswith("http://127.0.0.1:"), (url, proc.poll())
    assert api_status(url) == 200
    return proc, url


def wait_watched(proc: subprocess.Popen, fn, timeout: float, message: str) -> None:
    """wait_until fn() while --watch runs; on failure, show what --watch said."""
    try:
        wait_until(fn, timeout, interval=0.5, message=message)
    except TimeoutError as err:
        proc.send_signal(signal.SIGINT)
        out, errors = proc.communicate(timeout=30)
        raise AssertionError(f"{err}\n--- --watch exit {proc.returncode}, stderr:\n{errors}") from None


def wait_logged(proc: subprocess.Popen, text: str, timeout: float) -> str:
    """Read proc's stderr until a line holds text; return what was read.  A repair
    says what it did only after the server answers, so a test that saw the URL answer
    waits here for the line rather than racing it."""
    seen, deadline = "", time.monotonic() + timeout
    while text not in seen:
        left = deadline - time.monotonic()
        ready, _, _ = select.select([proc.stderr], [], [], max(0, left))
        chunk = os.read(proc.stderr.fileno(), 65536) if ready else b""  # unbuffered
        if not chunk:
            raise AssertionError(f"--watch never said {text!r}; it said:\n{seen}")
        seen += chunk.decode()
    return seen


def finish(proc: subprocess.Popen, sig: int | None = signal.SIGINT, timeout: float = 30) -> tuple[int, str, str]:
    """Send sig (if any), wait; return (exit code, stdout rest, stderr)."""
    if sig is not None:
        proc.send_signal(sig)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()  # show what it was doing rather than only that it did not stop
        out, err = proc.communicate(timeout=30)
        raise AssertionError(f"nbtunnel did not exit within {timeout}s of signal {sig}; "
                             f"stdout:\n{out}\nstderr:\n{err}") from None
    return proc.returncode, out, err


