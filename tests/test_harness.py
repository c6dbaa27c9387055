"""The test remote is real: a separate host reached over real ssh, with Jupyter for login shells."""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import subprocess
from pathlib import Path

import pytest

from conftest import RemoteHost
from helpers import (
    free_local_port,
    http_get,
    kill_pids,
    local_port_open,
    pid_alive,
    run_kernel_code,
    wait_until,
)


def ssh(
    remote: RemoteHost, alias: str, *command: str, timeout: float = 30
) -> subprocess.CompletedProcess:
    """Run the system ssh with the test ssh_config."""
    return subprocess.run(
        ["ssh", "-F", str(remote.ssh_config), alias, *command],
        check=False,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_ssh_alias_logs_in_with_one_authentication(remote: RemoteHost) -> None:
    before = remote.auth_count()
    proc = ssh(remote, remote.alias, "id", "-un")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == remote.user
    assert remote.auth_count() == before + 1


def test_jupyter_found_by_login_shell_only(remote: RemoteHost) -> None:
    plain = ssh(remote, remote.alias, "command -v jupyter")
    assert plain.returncode != 0
    assert plain.stdout.strip() == ""
    login = ssh(remote, remote.alias, 'bash -lc "command -v jupyter"')
    assert login.returncode == 0, login.stderr
    assert login.stdout.strip() == str(remote.jupyter_venv / "bin" / "jupyter")


def test_unknown_host_key_is_refused(remote: RemoteHost) -> None:
    before = remote.auth_count()
    proc = ssh(remote, remote.unknown_alias, "true")
    assert proc.returncode == 255
    assert "Host key verification failed" in proc.stderr
    assert remote.auth_count() == before


def test_down_alias_is_unreachable(remote: RemoteHost) -> None:
    proc = ssh(remote, remote.down_alias, "true")
    assert proc.returncode == 255
    assert "Connection refused" in proc.stderr or "timed out" in proc.stderr


def test_remote_has_its_own_loopback(remote: RemoteHost) -> None:
    if remote.fallback:
        pytest.skip(
            f"fallback remote on this machine's 127.0.0.1 ({remote.fallback_reason})"
        )
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert local_port_open(port)
        assert not remote.port_open(port)
        probe = remote.run(
            [
                "python3",
                "-c",
                f"import socket; socket.create_connection(('127.0.0.1', {port}), 1)",
            ]
        )
        assert probe.returncode != 0
        assert "ConnectionRefusedError" in probe.stderr


def test_run_is_the_remote_user_with_a_login_shell(remote: RemoteHost) -> None:
    proc = remote.run("id -un; echo $HOME; jupyter --version", check=True)
    user, home, *versions = proc.stdout.splitlines()
    assert (user, home) == (remote.user, str(remote.home))
    assert re.search(r"^jupyter_server\s*:\s*2\.", "\n".join(versions), re.MULTILINE), (
        proc.stdout
    )
    plain = remote.run(["bash", "-c", "command -v jupyter"])
    assert plain.returncode != 0


def test_pids_and_tmux_sessions_follow_the_remote(remote: RemoteHost) -> None:
    assert remote.tmux_sessions() == []
    remote.run(["tmux", "new-session", "-d", "-s", "probe", "sleep 4242"], check=True)
    try:
        assert remote.tmux_sessions() == ["probe"]
        (pid,) = wait_until(lambda: remote.pids(r"^sleep 4242$"), 10)
        assert pid_alive(pid)
    finally:
        remote.run(["tmux", "kill-server"])
    wait_until(
        lambda: not pid_alive(pid), 10, message="sleep ended with its tmux session"
    )
    assert remote.pids(r"sleep 4242|tmux") == []
    assert remote.tmux_sessions() == []


def test_kernel_runs_code_through_an_ssh_forward(remote: RemoteHost) -> None:
    """A Jupyter server on the remote, reached through `ssh -L`, runs 1+1 in a kernel."""
    token = secrets.token_hex(16)
    launch = (
        "jupyter server --no-browser --ip=127.0.0.1 --port=0 "
        f"--ServerApp.token={token} --ServerApp.root_dir=$HOME >$HOME/probe.log 2>&1"
    )
    remote.run(
        ["tmux", "new-session", "-d", "-s", "probe", "bash", "-lc", launch], check=True
    )
    forward = None
    try:

        def server_info() -> dict | None:
            listing = remote.run(
                "cat $(jupyter --runtime-dir)/jpserver-*.json 2>/dev/null"
            )
            for chunk in re.findall(r"\{.*?\}", listing.stdout, re.DOTALL):
                info = json.loads(chunk)
                if info.get("token") == token and pid_alive(info["pid"]):
                    return info
            return None

        info = wait_until(server_info, 60, message="jupyter runtime file")
        if not remote.fallback:
            assert not local_port_open(
                info["port"]
            )  # it listens on the remote's loopback only
        local_port = free_local_port()
        forward = subprocess.Popen(
            [
                "ssh",
                "-F",
                str(remote.ssh_config),
                "-N",
                "-o",
                "ExitOnForwardFailure=yes",
                "-L",
                f"127.0.0.1:{local_port}:127.0.0.1:{info['port']}",
                remote.alias,
            ],
            stdin=subprocess.DEVNULL,
        )
        wait_until(lambda: local_port_open(local_port), 20, message="ssh forward")
        base = f"http://127.0.0.1:{local_port}"
        wait_until(lambda: http_get(f"{base}/api/status?token={token}")[0] == 200, 30)
        assert http_get(f"{base}/api/status")[0] == 403  # no token, no access
        assert run_kernel_code(base, token, "1+1") == "2"
        assert run_kernel_code(base, token, "print('hi')") == "hi\n"
    finally:
        if forward is not None:
            kill_pids([forward.pid])
            forward.wait(timeout=10)
        remote.run(["tmux", "kill-server"])
        wait_until(
            lambda: not remote.pids("jupyter|ipykernel"), 30, message="jupyter gone"
        )
        remote.clean_jupyter_runtime()


def test_nbt_runs_the_cli_with_private_state(nbt) -> None:
    proc = nbt.run("--help", timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert "--terminate" in proc.stdout
    assert "XDG_RUNTIME_DIR" not in nbt.env
    assert not os.path.exists(nbt.env["NBTUNNEL_CONFIG"])
    # Every directory nbtunnel may write to is inside the test's own fresh directory,
    # which is not under this user's home...
    private = [nbt.state_dir, *(Path(nbt.env[k]) for k in ("XDG_STATE_HOME", "XDG_CONFIG_HOME"))]
    assert all(path.parent == nbt.tmp for path in private), (nbt.tmp, private)
    assert not nbt.tmp.is_relative_to(Path.home())
    assert nbt.argv()[-2:] == ["--state-dir", str(nbt.state_dir)]
    # ...so a fresh runner has no records, whatever this machine's user has recorded.
    assert nbt.status() == []
