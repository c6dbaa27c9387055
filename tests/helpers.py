"""Helpers for the tests: HTTP, ports, processes and Jupyter kernels.

Process checks read /proc rather than trusting ``kill -0``: some sandboxed
kernels (gVisor) reap killed processes late, so a zombie still answers
``kill -0`` for a while. A process whose state is ``Z`` (or ``X``) is dead.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import pty
import re
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar
from urllib.parse import parse_qs, urlparse

T = TypeVar("T")

# Tests talk to 127.0.0.1 only: never let an http_proxy variable route that elsewhere.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# HTTP #########################################################################


def http_request(
    method: str,
    url: str,
    *,
    timeout: float = 10.0,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
) -> tuple[int, str]:
    """Send one HTTP request; return (status, body text), also for 4xx/5xx answers."""
    request = urllib.request.Request(
        url, data=body, method=method, headers=headers or {}
    )
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode("utf-8", "replace")


def http_get(
    url: str, timeout: float = 10.0, headers: dict[str, str] | None = None
) -> tuple[int, str]:
    """GET url; return (status, body text). Connection errors raise OSError."""
    return http_request("GET", url, timeout=timeout, headers=headers)


# Waiting and ports ############################################################


def wait_until(
    fn: Callable[[], T], timeout: float = 30.0, interval: float = 0.2, message: str = ""
) -> T:
    """Call fn until it returns something truthy and return that; raise TimeoutError after timeout.

    An OSError raised by fn counts as "not yet" (a port not open, a file not written).
    """
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = fn()
            if value:
                return value
            last = value
        except OSError as err:
            last = err
        if time.monotonic() >= deadline:
            what = message or getattr(fn, "__name__", "condition")
            raise TimeoutError(
                f"{what}: not true after {timeout:g}s (last result: {last!r})"
            )
        time.sleep(interval)


def local_port_open(port: int, host: str = "127.0.0.1", timeout: float = 1.0) -> bool:
    """True when something accepts TCP connections on host:port of this machine."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def free_local_port(host: str = "127.0.0.1") -> int:
    """A TCP port on host that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


# Processes ####################################################################


def _proc_status(pid: int) -> dict[str, str]:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def pid_alive(pid: int) -> bool:
    """True while pid is a live process; a zombie (State Z or X) counts as dead."""
    state = _proc_status(pid).get("State", "")
    return bool(state) and state[0] not in "ZX"


def proc_uid(pid: int) -> int | None:
    """Real uid of pid, or None when it is gone."""
    uid = _proc_status(pid).get("Uid")
    return int(uid.split()[0]) if uid else None


def proc_cmdline(pid: int) -> list[str]:
    """argv of pid ([] for a kernel thread or a process that is gone)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode("utf-8", "replace") for part in raw.split(b"\0")[:-1]]


def live_pids() -> list[int]:
    """Every live (non-zombie) process on this machine, except this one."""
    own = os.getpid()
    pids = (int(name) for name in os.listdir("/proc") if name.isdigit())
    return [pid for pid in pids if pid != own and pid_alive(pid)]


def find_pids(
    pattern: str, uid: int | None = None, program: str | None = None
) -> list[int]:
    """Live pids whose space-joined cmdline matches regex pattern, optionally of one uid / program name."""
    regex = re.compile(pattern)
    found = []
    for pid in live_pids():
        argv = proc_cmdline(pid)
        if not argv:
            continue
        if program is not None and os.path.basename(argv[0]) != program:
            continue
        if uid is not None and proc_uid(pid) != uid:
            continue
        if regex.search(" ".join(argv)):
            found.append(pid)
    return found


def local_ssh_pids(pattern: str) -> list[int]:
    """Live local ``ssh`` client processes whose cmdline matches regex pattern."""
    return find_pids(pattern, program="ssh")


def kill_pids(
    pids: Iterable[int], sig: int = signal.SIGKILL, timeout: float = 10.0
) -> list[int]:
    """Send sig to pids, wait for them to die; return those still alive after timeout."""
    pids = list(pids)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    deadline = time.monotonic() + timeout
    alive = [pid for pid in pids if pid_alive(pid)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [pid for pid in alive if pid_alive(pid)]
    return alive


def unix_sockets(directory: Path | str) -> list[Path]:
    """The Unix socket files under DIRECTORY (none when it does not exist)."""
    found = []
    for root, _dirs, files in os.walk(directory):
        for name in files:
            path = Path(root) / name
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(path.lstat().st_mode):
                    found.append(path)
    return sorted(found)


def socket_listening(path: Path | str) -> bool:
    """Does a process still accept connections on the Unix socket PATH?  A master killed
    with SIGKILL leaves its socket file behind, dead: connecting to it is refused."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2)
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


def run_in_pty(
    argv: list[str], env: dict[str, str], timeout: float, stop_on: str = "", password: str | None = None
) -> tuple[int | None, str]:
    """Run argv on a new pseudo-terminal (stdin, stdout, stderr); return (exit code, output).

    Answers every `password:` prompt with password, when given. Stops early, killing
    the process, when stop_on appears in the output or after timeout; the exit code
    is then None."""
    pid, fd = pty.fork()
    if pid == 0:  # child
        try:
            os.execve(argv[0], argv, env)
        finally:
            os._exit(127)
    output, pending = b"", b""
    deadline = time.monotonic() + timeout
    code = None
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(fd, 4096)
                except OSError:  # EIO: the child closed the terminal
                    chunk = b""
                if not chunk:
                    _, status = os.waitpid(pid, 0)
                    code, pid = os.waitstatus_to_exitcode(status), 0
                    break
                output += chunk
                pending += chunk
                if password is not None and b"password:" in pending.lower():
                    pending = b""
                    os.write(fd, password.encode() + b"\n")
                if stop_on and stop_on.encode() in output:
                    break
    finally:
        if pid:  # still running (or not yet reaped): kill and reap it
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)
    return code, output.decode("utf-8", "replace")


# Jupyter ######################################################################


def _kernel_message(msg_type: str, content: dict, session: str) -> dict:
    """A Jupyter messaging protocol v5.3 message for the shell channel."""
    return {
        "header": {
            "msg_id": uuid.uuid4().hex,
            "msg_type": msg_type,
            "username": "nbtunnel-test",
            "session": session,
            "date": datetime.datetime.now(datetime.UTC).isoformat(),
            "version": "5.3",
        },
        "parent_header": {},
        "metadata": {},
        "content": content,
        "channel": "shell",
        "buffers": [],
    }


def run_kernel_code(
    base_http_url: str, token: str, code: str, timeout: float = 60.0
) -> str:
    """Run code in a new kernel of the Jupyter server at base_http_url; return its text output.

    Creates the kernel over the REST API, executes code over the kernel's
    websocket, and deletes the kernel. Returns stream output followed by the
    ``text/plain`` of the execute_result, e.g. ``"2"`` for ``1+1``. A Python
    error in code raises RuntimeError.
    """
    import websocket  # websocket-client, installed by tests/run

    base = base_http_url.rstrip("/")
    headers = {"Authorization": f"token {token}", "Content-Type": "application/json"}
    status, body = http_request(
        "POST", f"{base}/api/kernels", timeout=timeout, headers=headers, body=b"{}"
    )
    if status != 201:
        raise RuntimeError(f"POST /api/kernels answered {status}: {body[:500]}")
    kernel_id = json.loads(body)["id"]
    session = uuid.uuid4().hex
    ws_url = (
        re.sub(r"^http", "ws", base)
        + f"/api/kernels/{kernel_id}/channels?session_id={session}"
    )
    deadline = time.monotonic() + timeout
    try:
        ws = websocket.create_connection(
            ws_url, timeout=timeout, header=[f"Authorization: token {token}"]
        )
        try:
            request = _kernel_message(
                "execute_request",
                {
                    "code": code,
                    "silent": False,
                    "store_history": False,
                    "user_expressions": {},
                    "allow_stdin": False,
                    "stop_on_error": True,
                },
                session,
            )
            msg_id = request["header"]["msg_id"]
            ws.send(json.dumps(request))
            streams: list[str] = []
            result = ""
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"kernel gave no idle status for {code!r} within {timeout:g}s"
                    )
                ws.settimeout(remaining)
                message = json.loads(ws.recv())
                if message.get("parent_header", {}).get("msg_id") != msg_id:
                    continue
                msg_type = message["header"]["msg_type"]
                content = message["content"]
                if msg_type == "stream":
                    streams.append(content["text"])
                elif msg_type == "execute_result":
                    result = content["data"].get("text/plain", "")
                elif msg_type == "error":
                    raise RuntimeError(f"{content['ename']}: {content['evalue']}")
                elif msg_type == "status" and content.get("execution_state") == "idle":
                    return "".join(streams) + result
        finally:
            ws.close()
    finally:
        http_request(
            "DELETE", f"{base}/api/kernels/{kernel_id}", timeout=10, headers=headers
        )


def token_of(url: str) -> str:
    """The token in a URL that nbtunnel printed."""
    return parse_qs(urlparse(url).query)["token"][0]


def api_status(url: str, timeout: float = 10.0) -> int:
    """HTTP status of /api/status through the URL's local port with its token (0: no answer)."""
    try:
        status, _ = http_get(
            f"http://127.0.0.1:{urlparse(url).port}/api/status",
            timeout=timeout,
            headers={"Authorization": f"token {token_of(url)}"},
        )
    except OSError:
        return 0
    return status


# nbtunnel's processes #########################################################

JUPYTER_RE = r"jupyter-(lab|notebook|server|nbclassic)|jupyter (lab|notebook|server|nbclassic)"


def jupyter_pids(remote) -> list[int]:
    """Live Jupyter servers of the remote user."""
    return remote.pids(JUPYTER_RE)


def kill_jupyter(remote) -> list[int]:
    """SIGKILL the remote user's Jupyter servers and wait until they are gone; return their pids."""
    pids = jupyter_pids(remote)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not jupyter_pids(remote), 15, message="jupyter killed")
    return pids


def masters(config: Path | str) -> list[int]:
    """Live local ssh master processes started with ssh config file CONFIG."""
    return [
        pid
        for pid in find_pids(re.escape(str(config)), program="ssh")
        if "-M" in proc_cmdline(pid)
    ]


def socket_inodes(pid: int) -> set[str]:
    """Inodes of the sockets process pid holds open (Linux /proc)."""
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:["):
                found.add(link[8:-1])
    return found


def listening_ports(pid: int) -> list[int]:
    """TCP ports process pid listens on (Linux /proc)."""
    inodes = socket_inodes(pid)
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                words = line.split()
                if words[3] == "0A" and words[9] in inodes:
                    ports.add(int(words[1].rsplit(":", 1)[1], 16))
    return sorted(ports)


def forwards(config: Path | str, *watching) -> list[int]:
    """Every local port that ssh masters of CONFIG listen on (one per tunnel), or the
    --watch processes WATCHING (Popen; each holds its tunnel's port itself)."""
    pids = masters(config) + [proc.pid for proc in watching]
    return sorted(port for pid in pids for port in listening_ports(pid))


def kill_masters(config: Path | str) -> list[int]:
    """SIGKILL the local ssh masters of CONFIG (the tunnel dies); return their pids."""
    pids = masters(config)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    return pids


# Running nbtunnel #############################################################


def start(nbt, *args: str) -> dict:
    """A plain start of the test remote with --json; asserts it succeeded, returns its output."""
    proc = nbt.run(nbt.remote.alias, "--json", *args)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def printed_commands(text: str) -> list[str]:
    """The commands that TEXT (a line nbtunnel printed) tells the user to run, in backquotes."""
    return re.findall(r"`([^`]+)`", text)


def pasted(nbt, command: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """COMMAND exactly as nbtunnel printed it, pasted into a shell where `nbtunnel` is this
    nbtunnel.py: no state directory or ssh config of the test's own, only what it says."""
    bin_dir = nbt.tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    program = bin_dir / "nbtunnel"
    repo = Path(__file__).resolve().parent.parent
    program.write_text(f'#!/bin/sh\nexec {sys.executable} {repo / "nbtunnel.py"} "$@"\n')
    program.chmod(0o755)
    env = dict(nbt.env, PATH=f"{bin_dir}:{os.environ['PATH']}")
    return subprocess.run(["sh", "-c", command], env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, check=False)


def pip_installed_command(tmp: Path) -> Path:
    """`pip install .` of a copy of this tree into a fresh venv under TMP (the copy is
    removed afterwards: the installed command must not need it); the `nbtunnel` it gives."""
    repo = Path(__file__).resolve().parent.parent
    source = tmp / "source"
    shutil.copytree(repo, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", ".ruff_cache", ".pytest_cache"))
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    pip = [str(venv / "bin/python"), "-m", "pip", "install", "-q", "--no-deps", str(source)]
    have = subprocess.run([str(venv / "bin/python"), "-c", "import setuptools, wheel"],
                          capture_output=True)
    if have.returncode == 0:  # no registry needed
        pip.insert(-1, "--no-build-isolation")
    proc = subprocess.run(pip, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    shutil.rmtree(source)
    return venv / "bin" / "nbtunnel"
