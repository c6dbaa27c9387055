"""How nbtunnel feels while it waits: a progress line on a terminal and nowhere else,
and --status that asks several hosts at once, one connection each."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from helpers import http_get, local_ssh_pids, wait_until
from unattended import run_in_pty

PROGRESS_TEXT = "waiting for Jupyter on"
DELAY = 1.5  # seconds each connection to the "slow" hosts waits before it reaches sshd


def api_ok(url: str) -> bool:
    """Does the server behind URL (with its token) answer /api/status with 200?"""
    base, token = url.split("/lab?token=")
    status, _ = http_get(f"{base}/api/status", headers={"Authorization": f"token {token}"})
    return status == 200


def test_progress_line_on_a_terminal(nbt, remote):
    code, out = run_in_pty(nbt.argv(remote.alias), nbt._env(None), timeout=180)
    assert code == 0, out
    # The line is rewritten in place while the server starts, and erased before the URL.
    assert "\r" in out and "\x1b[K" in out, out
    assert PROGRESS_TEXT in out and f"connecting to {remote.alias}" in out, out
    last = out.replace("\r\n", "\n").rstrip("\n").split("\n")[-1]
    assert last.startswith("http://127.0.0.1:") and "\x1b" not in last and "\r" not in last, out
    assert api_ok(last)

    # -q silences it, on a terminal too (the server is running: this reattaches).
    code, out = run_in_pty(nbt.argv(remote.alias, "-q"), nbt._env(None), timeout=180)
    assert code == 0, out
    assert "\x1b" not in out and PROGRESS_TEXT not in out, out
    assert out.replace("\r\n", "\n").strip().startswith("http://127.0.0.1:"), out


def test_no_progress_line_when_piped(nbt, remote):
    for args in ((remote.alias,), (remote.alias, "--status"), (remote.alias, "--terminate")):
        proc = nbt.run(*args, timeout=180)
        assert proc.returncode == 0, proc.stderr
        for stream in (proc.stdout, proc.stderr):
            assert "\r" not in stream and "\x1b" not in stream, (args, stream)
        if args == (remote.alias,):
            lines = proc.stdout.splitlines()
            assert len(lines) == 1 and lines[0].startswith("http://127.0.0.1:"), proc.stdout
            assert PROGRESS_TEXT not in proc.stderr


def slow_hosts(nbt, remote) -> tuple[list[str], Path]:
    """Three ssh_config aliases of the test host whose connections each wait DELAY
    seconds in a ProxyCommand that logs when it starts; (aliases, that log)."""
    aliases = [f"slow{i}-{os.getpid()}" for i in (1, 2, 3)]
    started = nbt.tmp / "connections.log"
    relay = (
        f"/bin/bash -c 'echo \"%n $(date +%%s.%%N)\" >> {started}; sleep {DELAY}; "
        "exec 3<>/dev/tcp/%h/%p; cat <&3 & exec cat >&3'"
    )
    config = nbt.tmp / "ssh_config"
    config.write_text(
        f"""Host {" ".join(aliases)}
    HostName {remote.ip}
    Port {remote.port}
    User {remote.user}
    IdentityFile {remote.identity}
    IdentitiesOnly yes
    UserKnownHostsFile {remote.known_hosts}
    GlobalKnownHostsFile /dev/null
    StrictHostKeyChecking yes
    BatchMode yes
    ProxyCommand {relay}

{remote.ssh_config.read_text()}"""
    )
    nbt.ssh_config = config  # every later nbtunnel run (and the clean-up) uses it
    return aliases, started


def close_masters(nbt) -> None:
    """End every master connection (and so every tunnel) of this test."""
    for path in nbt.state_dir.glob("*.json"):
        rec = json.loads(path.read_text())
        if rec.get("socket") and os.path.exists(rec["socket"]):
            os.system(f"ssh -F {nbt.ssh_config} -S {rec['socket']} -O exit {rec['host']} 2>/dev/null")
    wait_until(lambda: not local_ssh_pids(str(nbt.ssh_config)), 30, message="masters gone")


def test_status_asks_every_host_at_once(nbt, remote):
    aliases, started = slow_hosts(nbt, remote)
    for alias in aliases:  # one server (same remote user and session), three hosts
        proc = nbt.run(alias, timeout=180)
        assert proc.returncode == 0, proc.stderr
        assert api_ok(proc.stdout.strip())
    recorded = [json.loads(p.read_text())["host"] for p in sorted(nbt.state_dir.glob("*.json"))]
    assert sorted(recorded) == sorted(aliases)
    close_masters(nbt)

    started.write_text("")
    before = remote.auth_count()
    t0 = time.monotonic()
    proc = nbt.run("--status", "--json", timeout=180)
    wall = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    # One row per session, in the order of the records, each answered by its host.
    assert [r["host"] for r in rows] == recorded, rows
    assert all(r["server"] == "running" and r["tunnel"] == "down" for r in rows), (
        [(r["server"], r["tunnel"]) for r in rows], proc.stderr)
    time.sleep(0.5)  # sshd logs the login as it accepts it
    assert remote.auth_count() - before == 3  # one connection per host
    assert not local_ssh_pids(str(nbt.ssh_config))  # and none left running
    # The three connections were under way at the same time: each waits DELAY seconds
    # before it reaches sshd, so one after the other they would start DELAY or more apart.
    starts = sorted(float(line.split()[1]) for line in started.read_text().splitlines())
    assert len(starts) == 3, started.read_text()
    assert starts[-1] - starts[0] < DELAY, (starts, wall)
    assert wall < 3 * DELAY + 60  # generous: a loaded machine is slow, not wrong

    # The text form: the same rows in the same order, on every run.
    text = nbt.run("--status", timeout=180)
    assert text.returncode == 0, text.stderr
    assert [line.split("\t")[0] for line in text.stdout.splitlines()] == recorded
    assert "\r" not in text.stderr and "\x1b" not in text.stderr

    for alias in aliases:
        proc = nbt.run(alias, "--terminate", timeout=180)
        assert proc.returncode == 0, proc.stderr
    wait_until(lambda: not remote.pids(r"jupyter"), 30, message="server stopped")


def test_status_of_one_host_among_several_on_a_terminal(nbt, remote):
    # On a terminal the hosts are asked at once too (ssh in batch mode, so that no two
    # prompts share the terminal), with the progress line saying so.
    proc = nbt.run(remote.alias, timeout=180)
    assert proc.returncode == 0, proc.stderr
    proc = nbt.run(remote.ip, timeout=180)
    assert proc.returncode == 0, proc.stderr
    close_masters(nbt)
    code, out = run_in_pty(nbt.argv("--status"), nbt._env(None), timeout=180)
    assert code == 0, out
    lines = [line for line in out.replace("\r\n", "\n").split("\n") if "\tserver=" in line]
    assert len(lines) == 2 and all("server=running" in line for line in lines), out
    assert "asking 2 hosts" in out, out
    for host in (remote.alias, remote.ip):
        assert nbt.run(host, "--terminate", timeout=180).returncode == 0
