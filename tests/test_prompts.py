"""ssh's own prompts reach a user at a terminal, once per command; without a terminal nothing prompts."""

from __future__ import annotations

import json
import os
import time

from helpers import http_get, local_ssh_pids, run_in_pty, wait_until


def run_on_terminal(nbt, *args: str, password: str, timeout: float = 120) -> tuple[int, str, int]:
    """Run nbtunnel.py under a pseudo-terminal, answering password prompts; return (exit, output, prompts)."""
    code, output = run_in_pty(nbt.argv(*args), nbt._env(None), timeout, password=password)
    assert code is not None, f"still running after {timeout}s: {output}"
    return code, output, output.lower().count("password:")


def test_password_prompt_once_per_command(nbt, remote):
    before = remote.auth_count("password")
    code, out, prompts = run_on_terminal(nbt, remote.password_alias, "--json", password=remote.password)
    assert code == 0, out
    assert prompts == 1, out  # one prompt for the whole start: every step shared the connection
    assert remote.auth_count("password") - before == 1
    info = json.loads(out[out.index("{"):].splitlines()[0])
    status, _ = http_get(
        f"http://127.0.0.1:{info['local_port']}/api/status", headers={"Authorization": f"token {info['token']}"}
    )
    assert status == 200

    # While the tunnel's connection lives, later commands need no password at all.
    code, out, prompts = run_on_terminal(nbt, remote.password_alias, "--status", password=remote.password)
    assert code == 0 and prompts == 0 and "server=running" in out, out

    # Tunnel closed: reattaching asks once again, and only once.
    for pid in local_ssh_pids(str(nbt.ssh_config)):
        os.kill(pid, 9)
    wait_until(lambda: not local_ssh_pids(str(nbt.ssh_config)), 15, message="master gone")
    code, out, prompts = run_on_terminal(nbt, remote.password_alias, password=remote.password)
    assert code == 0 and prompts == 1, out
    code, out, prompts = run_on_terminal(nbt, remote.password_alias, "--terminate", password=remote.password)
    assert code == 0 and prompts == 0, out
    wait_until(lambda: not remote.pids(r"jupyter"), 15, message="server stopped")


def test_no_terminal_never_prompts(nbt, remote):
    t0 = time.monotonic()
    proc = nbt.run(remote.password_alias, timeout=60)
    assert time.monotonic() - t0 < 30
    assert proc.returncode == 1
    assert remote.password_alias in proc.stderr and "refused authentication" in proc.stderr
    assert "ssh-agent" in proc.stderr
    assert not local_ssh_pids(str(nbt.ssh_config))
