"""--unix-socket end to end: Jupyter listens on a Unix socket in a private directory on
the remote (no TCP port there at all) and the local TCP port reaches it over OpenSSH's
stream-local forwarding on the shared master connection.

Besides the remote of conftest, these tests make what they need themselves, with
per-run names: a hostile second account on the remote, a second sshd in the remote's
network namespace that forbids stream-local forwarding, and wrapper scripts that act
as a Jupyter too old for --sock.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

import nbtunnel
from helpers import (
    free_local_port,
    http_get,
    kill_pids,
    local_port_open,
    run_kernel_code,
    socket_inodes,
    wait_until,
)
from intruders import SYSTEM_PYTHON, Account, reap_stale_accounts
from remotehost import SSHD
from test_remote import remote_python36  # noqa: F401 - a fixture: python3 on the remote is 3.6
from unattended import api_status, ensure, finish, jupyter_pids, masters, wait_logged, wait_watched, watch

SOCK = "--unix-socket"


def start(nbt, *args: str, host: str | None = None) -> dict:
    proc = nbt.run(host or nbt.remote.alias, "--json", SOCK, *args)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def no_traceback(proc) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr


def tcp_listen_ports(pid: int) -> list[int]:
    """TCP ports PID listens on, read in PID's own network namespace (/proc/PID/net)."""
    inodes = socket_inodes(pid)
    ports = []
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                w = line.split()
                if w[3] == "0A" and w[9] in inodes:
                    ports.append(int(w[1].rsplit(":", 1)[1], 16))
    return ports


def unix_listen_paths(pid: int) -> list[str]:
    """Paths of the Unix sockets PID listens on."""
    inodes = socket_inodes(pid)
    paths = []
    for line in Path(f"/proc/{pid}/net/unix").read_text().splitlines()[1:]:
        w = line.split(None, 7)
        if len(w) == 8 and w[6] in inodes and int(w[3], 16) & 0x10000:
            paths.append(w[7])
    return paths



def server_pid(remote) -> int:
    pids = jupyter_pids(remote)
    assert len(pids) == 1, pids
    return pids[0]


@pytest.fixture(scope="module")
def hostile(remote):
    """Another unprivileged user of the remote host."""
    reap_stale_accounts()
    account = Account("u")
    try:
        yield account
    finally:
        account.remove()


CONNECT = r"""
import socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
    s.sendall(b"GET /api/status HTTP/1.0\r\n\r\n")
    print("connected", s.recv(100))
except OSError as e:
    print(type(e).__name__, e.errno)
"""


# Socket mode end to end #######################################################


def test_socket_mode_serves_and_opens_no_tcp_port(nbt, remote, hostile):
    info = start(nbt)
    assert info["reused"] is False
    path = info["remote_socket"]
    assert path and path.endswith("/nbtunnel.sock"), info
    assert info["remote_port"] == 0
    url = info["url"]
    assert api_status(url) == 200
    port = info["local_port"]
    status, _ = http_get(f"http://127.0.0.1:{port}/api/status")  # no token: refused
    assert status == 403
    assert run_kernel_code(f"http://127.0.0.1:{port}", info["token"], "1+1") == "2"

    # The socket: 0600, the remote user's, in a directory of its own that is 0700.
    st, dst = os.lstat(path), os.lstat(os.path.dirname(path))
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == remote.uid and dst.st_uid == remote.uid
    assert stat.S_ISDIR(dst.st_mode) and stat.S_IMODE(dst.st_mode) == 0o700

    # The server listens on that socket and on no TCP port at all.
    pid = server_pid(remote)
    assert path in unix_listen_paths(pid)
    assert tcp_listen_ports(pid) == []

    # Another user of the remote cannot even connect to the socket.
    proc = hostile.run([SYSTEM_PYTHON, "-c", CONNECT, path], netns=remote.netns)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["PermissionError", str(errno.EACCES)], proc.stdout
    # ... while the owner can (the probe above could have succeeded).
    proc = remote.run([SYSTEM_PYTHON, "-c", CONNECT, path])
    assert proc.stdout.startswith("connected"), proc.stdout + proc.stderr

    # --status shows the socket; the JSON keeps every field of the contract.
    rows = nbt.status()
    assert len(rows) == 1
    row = rows[0]
    assert row["server"] == "running" and row["tunnel"] == "up"
    assert row["remote_socket"] == path and row["remote_port"] == 0
    for key in ("host", "session", "url", "local_port", "remote_port", "token", "manager"):
        assert key in row, key


def test_reattach_status_and_terminate(nbt, remote):
    first = start(nbt)
    pid = server_pid(remote)
    before = remote.auth_count()
    again = start(nbt)
    assert again["reused"] is True and again["url"] == first["url"]
    assert again["remote_socket"] == first["remote_socket"]
    assert server_pid(remote) == pid
    assert remote.auth_count() == before  # over the master that holds the forward

    # The option is recorded: a plain reattach (no --unix-socket) finds the same server.
    proc = nbt.run(remote.alias, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["url"] == first["url"]

    proc = nbt.run("--status")
    assert proc.returncode == 0, proc.stderr
    assert "server=running" in proc.stdout and "tunnel=up" in proc.stdout

    proc = nbt.run(remote.alias, "--terminate")
    assert proc.returncode == 0, proc.stderr
    wait_until(lambda: not jupyter_pids(remote), 30, message="Jupyter gone")
    assert not os.path.lexists(first["remote_socket"])
    assert remote.tmux_sessions() == []
    assert not local_port_open(first["local_port"])
    assert masters(nbt.ssh_config) == []
    assert [r["ended"] for r in nbt.status()] == ["terminated"]


def test_ensure_restarts_a_killed_server_on_a_new_socket(nbt, remote):
    first = start(nbt)
    old_pid = server_pid(remote)
    old_ino = os.lstat(first["remote_socket"]).st_ino
    os.kill(old_pid, signal.SIGKILL)
    wait_until(lambda: not jupyter_pids(remote), 30, message="server killed")
    assert api_status(first["url"]) != 200

    proc = ensure(nbt)
    assert proc.returncode == 0, proc.stderr
    assert "restarted Jupyter" in proc.stdout, proc.stdout + proc.stderr
    assert first["url"] in proc.stdout  # same token, same local port
    assert api_status(first["url"]) == 200
    new_pid = server_pid(remote)
    assert new_pid != old_pid
    assert first["remote_socket"] in unix_listen_paths(new_pid)
    assert os.lstat(first["remote_socket"]).st_ino != old_ino  # a new socket
    assert tcp_listen_ports(new_pid) == []

    quiet = ensure(nbt)  # healthy now: silent
    assert quiet.returncode == 0 and quiet.stdout == "", quiet.stdout + quiet.stderr


def test_watch_restarts_a_killed_server(nbt, remote):
    proc, url = watch(nbt, SOCK)
    old_pid = server_pid(remote)
    os.kill(old_pid, signal.SIGKILL)

    def back() -> bool:
        pids = jupyter_pids(remote)
        return bool(pids) and pids != [old_pid] and api_status(url) == 200

    wait_watched(proc, back, 90, "--watch restarted the server")
    said = wait_logged(proc, "restarted Jupyter", 30)
    code, _, err = finish(proc)
    assert code == 0, said + err


def test_socket_mode_with_python_36_on_the_remote(nbt, remote, remote_python36):  # noqa: F811
    seen = subprocess.run(["ssh", "-F", str(nbt.ssh_config), remote.alias, "python3 -V"],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert seen.stdout.strip().startswith("Python 3.6."), (seen.stdout, seen.stderr)
    info = start(nbt)
    assert api_status(info["url"]) == 200
    assert nbt.status()[0]["server"] == "running"
    proc = nbt.run(remote.alias, "--terminate")
    assert proc.returncode == 0, proc.stderr
    assert not os.path.lexists(info["remote_socket"])


# Clear failures ###############################################################


REFUSES_SOCK = """#!/bin/sh
# An old Jupyter (Notebook 6, jupyter_server 1): --sock is unknown to it.
for a in "$@"; do
    case "$a" in
        --sock*) echo "[C 12:00:00.000 NotebookApp] Unrecognized flag: '--sock'" >&2; exit 1;;
    esac
done
exec {jupyter} "$@"
"""

IGNORES_SOCK = """#!/bin/sh
# An old Jupyter that drops what it does not know and listens on a TCP port instead.
for a in "$@"; do
    shift
    case "$a" in --sock*) ;; *) set -- "$@" "$a";; esac
done
exec {jupyter} "$@" --port=0
"""


@pytest.fixture
def remote_script(remote):
    """Write an executable script of the remote user; removed afterwards."""
    made = []

    def write(name: str, text: str) -> Path:
        path = remote.home / f"{name}-{os.getpid()}"
        path.write_text(text.format(jupyter=remote.jupyter_venv / "bin" / "jupyter"))
        os.chown(path, remote.uid, remote.uid)
        path.chmod(0o755)
        made.append(path)
        return path

    yield write
    for path in made:
        path.unlink(missing_ok=True)


@pytest.mark.parametrize("script", [REFUSES_SOCK, IGNORES_SOCK], ids=["refuses", "ignores"])
def test_jupyter_too_old_for_sock_fails_clearly(nbt, remote, remote_script, script):
    wrapper = remote_script("old-jupyter", script)
    proc = nbt.run(remote.alias, SOCK, "--jupyter", f"{wrapper} lab", "--timeout", "60")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    no_traceback(proc)
    assert "too old for --unix-socket" in proc.stderr, proc.stderr
    assert "run without --unix-socket" in proc.stderr, proc.stderr
    assert proc.stdout == ""
    wait_until(lambda: not jupyter_pids(remote), 30, message="no Jupyter left")
    assert remote.tmux_sessions() == []
    assert masters(nbt.ssh_config) == []
    assert nbt.status() == []


@pytest.fixture
def strict_sshd(remote, nbt):
    """A second sshd in the remote's network namespace that forbids stream-local
    forwarding (TCP forwarding allowed); yields the ssh_config alias that reaches it."""
    work = Path(tempfile.mkdtemp(prefix=f"nbtstrict-{os.getpid()}-"))
    port = free_local_port() if remote.fallback else 20000 + os.getpid() % 20000
    text = remote.sshd_config.read_text()
    text = text.replace(f"Port {remote.port}\n", f"Port {port}\n", 1)
    text = text.replace("AllowStreamLocalForwarding yes", "AllowStreamLocalForwarding no")
    text = text.replace(f"PidFile {remote.workdir}/sshd.pid", f"PidFile {work}/sshd.pid")
    assert "AllowStreamLocalForwarding no" in text and f"Port {port}" in text
    (work / "sshd_config").write_text(text)
    log = work / "sshd.log"
    argv = remote._in_netns([SSHD, "-D", "-f", str(work / "sshd_config"), "-E", str(log)])
    sshd = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    try:
        wait_until(lambda: remote.port_open(port, remote.ip) or sshd.poll() is not None, 15,
                   message="second sshd listening")
        assert sshd.poll() is None, log.read_text()
        known = remote.write_known_hosts(nbt.tmp / "strict_known_hosts", remote.ip, port)
        nbt.ssh_config = remote.write_ssh_config(nbt.tmp / "strict_ssh_config", "nbstrict",
                                                 Port=port, UserKnownHostsFile=known)
        yield "nbstrict", log
    finally:
        kill_pids([sshd.pid], signal.SIGTERM, timeout=5)
        with contextlib.suppress(subprocess.TimeoutExpired):
            sshd.wait(timeout=10)
        if sshd.poll() is None:
            sshd.kill()
            sshd.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)


def test_sshd_without_stream_local_forwarding_fails_clearly(nbt, remote, strict_sshd):
    alias, log = strict_sshd
    proc = nbt.run(alias, SOCK, "--json")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    no_traceback(proc)
    assert nbtunnel.MSG_NO_STREAMLOCAL.format(host=alias) in proc.stderr, proc.stderr
    assert proc.stdout == ""
    assert "refused streamlocal port forward" in log.read_text()  # sshd really refused it
    wait_until(lambda: not jupyter_pids(remote), 30, message="the server started was stopped")
    assert remote.tmux_sessions() == []
    assert masters(nbt.ssh_config) == []
    assert nbt.status() == []

    # What the message says to do works through that same sshd.
    proc = nbt.run(alias, "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["remote_port"] > 0 and info["remote_socket"] is None
    assert api_status(info["url"]) == 200


def test_socket_path_too_long_fails_before_launching(nbt, remote):
    """A remote state directory so deep that no socket path fits: a clear error, and
    nothing started (the remote's ~/.bashrc sets XDG_STATE_HOME, as a site might)."""
    deep = remote.home / ("d" * 60) / ("e" * 60)
    bashrc = remote.home / ".bashrc"
    saved = bashrc.read_bytes() if bashrc.exists() else None
    bashrc.write_text(f"export XDG_STATE_HOME={deep}\n" + (saved or b"").decode())
    try:
        proc = nbt.run(remote.alias, SOCK)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        no_traceback(proc)
        assert "at most 107 bytes" in proc.stderr and "without --unix-socket" in proc.stderr, \
            proc.stderr
        assert (deep / "nbtunnel").is_dir()  # the remote did use that state directory
        assert jupyter_pids(remote) == [] and remote.tmux_sessions() == []
    finally:
        if saved is None:
            bashrc.unlink(missing_ok=True)
        else:
            bashrc.write_bytes(saved)
        shutil.rmtree(remote.home / ("d" * 60), ignore_errors=True)


def test_socket_mode_refused_where_it_cannot_work(nbt, remote, tmp_path):
    before = remote.auth_count()
    for args, words in [
        (["--manager", "slurm"],
         ["compute node", "run without --unix-socket"]),
        (["--tunnel", "sshtunnel"], ["cannot forward to a Unix socket", "without --unix-socket"]),
        (["--remote-port", "8899"], ["--remote-port cannot be combined with --unix-socket"]),
    ]:
        proc = nbt.run(remote.alias, SOCK, *args)
        assert proc.returncode == 2, (args, proc.stderr)
        no_traceback(proc)
        for word in words:
            assert word in proc.stderr, (args, proc.stderr)
    assert remote.auth_count() == before  # refused before connecting


# The remote functions, unit by unit ###########################################


@pytest.fixture
def private_tmp():
    path = Path(tempfile.mkdtemp(prefix="nbtsock"))
    path.chmod(0o700)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_socket_path_length_and_directory_choice(private_tmp, monkeypatch):
    short_state = private_tmp / "s"
    monkeypatch.setenv("XDG_STATE_HOME", str(short_state))
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    assert nbtunnel.r_socket_path("nb", 107) == f"{short_state}/nbtunnel/sock/nb.sock"
    assert stat.S_IMODE(os.stat(short_state / "nbtunnel" / "sock").st_mode) == 0o700

    # Never $XDG_RUNTIME_DIR: systemd removes it when the last login session ends.
    runtime = private_tmp / "rt"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    assert nbtunnel.r_socket_path("nb", 107) == f"{short_state}/nbtunnel/sock/nb.sock"
    assert not (runtime / "nbtunnel").exists()

    deep = private_tmp / ("x" * 100)
    monkeypatch.setenv("XDG_STATE_HOME", str(deep))
    with pytest.raises(nbtunnel.RemoteFail) as err:
        nbtunnel.r_socket_path("nb", 107)
    assert err.value.kind == "socket-path" and "at most 107 bytes" in str(err.value)
    # The limit given (103 on the BSDs and macOS) is the one applied, to the byte.
    monkeypatch.setenv("XDG_STATE_HOME", str(short_state))
    room = 103 - len(f"{short_state}/nbtunnel/sock/.sock")
    assert len(nbtunnel.r_socket_path("n" * room, 103)) == 103
    with pytest.raises(nbtunnel.RemoteFail):
        nbtunnel.r_socket_path("n" * (room + 1), 103)


def test_socket_planted_in_the_directory_is_refused(private_tmp):
    d = private_tmp / "sock"
    d.mkdir(mode=0o700)
    path = str(d / "s.sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(1)
    try:
        os.chmod(path, 0o600)
        assert nbtunnel.r_sock_held_by(path, os.getpid()) is True
        # another process (the parent here) does not hold it
        assert nbtunnel.r_sock_held_by(path, os.getppid()) is False
        os.chmod(path, 0o666)
        assert nbtunnel.r_sock_held_by(path, os.getpid()) is False
        os.chmod(path, 0o600)
        d.chmod(0o755)
        assert nbtunnel.r_sock_held_by(path, os.getpid()) is False
        d.chmod(0o700)
        os.chown(path, 12345, 12345)  # another user's socket
        assert nbtunnel.r_sock_held_by(path, os.getpid()) is False
        os.chown(path, 0, 0)
        # a symlink to our socket is not our socket
        link = str(d / "l.sock")
        os.symlink(path, link)
        assert nbtunnel.r_sock_held_by(link, os.getpid()) is False
    finally:
        server.close()
    assert nbtunnel.r_sock_held_by(path, os.getpid()) is False  # nobody listens any more
    nbtunnel.r_remove_socket(path)
    assert not os.path.lexists(path)


def test_sock_refused_recognises_old_jupyter_logs():
    assert nbtunnel.r_sock_refused("x\n[C 12:00 NotebookApp] Unrecognized flag: '--sock'\n")
    assert nbtunnel.r_sock_refused("[W NotebookApp] Unrecognized alias: 'sock', it will have "
                                   "no effect.")
    assert nbtunnel.r_sock_refused("[I ServerApp] websocket ping\nAddress in use") is None


def test_destination_strings():
    assert nbtunnel.destination(dict(port=8888, sock=None)) == "127.0.0.1:8888"
    assert nbtunnel.destination(dict(port=0, sock="/r/s.sock")) == "/r/s.sock"
    assert nbtunnel.recorded_destination(dict(remote_port=9, remote_socket=None)) == "127.0.0.1:9"
    assert nbtunnel.recorded_destination(dict(remote_port=0, remote_socket="/a")) == "/a"
    assert nbtunnel.forward_spec(5, "/a b/s.sock") == "127.0.0.1:5:/a b/s.sock"
    assert nbtunnel.forward_spec(5, 80) == "127.0.0.1:5:127.0.0.1:80"
