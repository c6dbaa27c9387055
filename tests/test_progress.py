"""How nbtunnel feels while it waits: a progress line on a terminal and nowhere else,
and --status that asks several hosts at once, one connection each."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import http_get, local_ssh_pids, wait_until
from unattended import run_in_pty

REPO = Path(__file__).resolve().parent.parent
PROGRESS_TEXT = "waiting for Jupyter on"
DELAY = 0.2  # seconds the delay line holds each chunk, each way


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


@contextlib.contextmanager
def slow_hosts(nbt, remote) -> Iterator[list[str]]:
    """Three ssh_config aliases of the test host behind a delay line (bench/delayproxy.py,
    DELAY seconds each way per chunk), so that each connection lasts a few seconds."""
    proxy = subprocess.Popen(
        [sys.executable, str(REPO / "bench" / "delayproxy.py"), "--listen", "127.0.0.1:0",
         "--target", f"{remote.ip}:{remote.port}", "--delay", str(DELAY)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
    try:
        port = int(proxy.stdout.readline())
        aliases = [f"slow{i}-{os.getpid()}" for i in (1, 2, 3)]
        host_key = remote.known_hosts.read_text().split(None, 1)[1]
        known = nbt.tmp / "known_hosts"
        known.write_text(f"slow-hostkey {host_key}")
        config = nbt.tmp / "ssh_config"
        config.write_text(
            f"""Host {" ".join(aliases)}
    HostName 127.0.0.1
    Port {port}
    HostKeyAlias slow-hostkey
    User {remote.user}
    IdentityFile {remote.identity}
    IdentitiesOnly yes
    UserKnownHostsFile {known}
    GlobalKnownHostsFile /dev/null
    StrictHostKeyChecking yes
    BatchMode yes

{remote.ssh_config.read_text()}"""
        )
        nbt.ssh_config = config  # every later nbtunnel run (and the clean-up) uses it
        yield aliases
    finally:
        for path in nbt.state_dir.glob("*.json"):  # while the delay line still runs
            rec = json.loads(path.read_text())
            nbt.run(rec["host"], "--terminate", "--force", "--session", rec["session"])
        proxy.terminate()
        proxy.wait(10)


def most_at_once(pattern: str, stop: threading.Event, seen: list) -> None:
    """Until STOP: the most local ssh processes matching PATTERN alive at one time."""
    while not stop.wait(0.02):
        seen.append(len(local_ssh_pids(pattern)))


def close_masters(nbt) -> None:
    """End every master connection (and so every tunnel) of this test."""
    for path in nbt.state_dir.glob("*.json"):
        rec = json.loads(path.read_text())
        if rec.get("socket") and os.path.exists(rec["socket"]):
            os.system(f"ssh -F {nbt.ssh_config} -S {rec['socket']} -O exit {rec['host']} 2>/dev/null")
    wait_until(lambda: not local_ssh_pids(str(nbt.ssh_config)), 30, message="masters gone")


def test_status_asks_every_host_at_once(nbt, remote):
    with slow_hosts(nbt, remote) as aliases:
        for alias in aliases:  # one server (same remote user and session), three hosts
            proc = nbt.run(alias, timeout=180)
            assert proc.returncode == 0, proc.stderr
            assert api_ok(proc.stdout.strip())
        recorded = [json.loads(p.read_text())["host"]
                    for p in sorted(nbt.state_dir.glob("*.json"))]
        assert sorted(recorded) == sorted(aliases)
        close_masters(nbt)

        before = remote.auth_count()
        stop, seen = threading.Event(), []
        watcher = threading.Thread(target=most_at_once, args=(str(nbt.ssh_config), stop, seen))
        watcher.start()
        try:
            proc = nbt.run("--status", "--json", timeout=180)
        finally:
            stop.set()
            watcher.join()
        assert proc.returncode == 0, proc.stderr
        rows = json.loads(proc.stdout)
        # One row per session, in the order of the records, each answered by its host.
        assert [r["host"] for r in rows] == recorded, rows
        assert all(r["server"] == "running" and r["tunnel"] == "down" for r in rows), (
            [(r["server"], r["tunnel"]) for r in rows], proc.stderr)
        time.sleep(0.5)  # sshd logs the login as it accepts it
        assert remote.auth_count() - before == 3  # one connection per host
        assert not local_ssh_pids(str(nbt.ssh_config))  # and none left running
        # The three connections were under way at the same time (each lasts seconds
        # behind the delay line; one after the other, there would never be two).
        assert max(seen) == 3, seen

        # The text form: the same rows in the same order, on every run.
        text = nbt.run("--status", timeout=180)
        assert text.returncode == 0, text.stderr
        assert [line.split("\t")[0] for line in text.stdout.splitlines()] == recorded
        assert "\r" not in text.stderr and "\x1b" not in text.stderr


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


@pytest.mark.noroot
def test_a_long_line_is_cut_in_its_text_never_in_its_clock():
    import nbtunnel

    master, slave = os.openpty()
    try:
        import fcntl
        import struct
        import termios

        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 40, 0, 0))
        line = nbtunnel.Progress()
        line.out, line.started = os.fdopen(os.dup(slave), "w"), time.monotonic()
        line.texts = ["job 15 PENDING (Resources), expected start 2026-12-03T10:43:20"]
        text = line._line()
        line.out.close()
    finally:
        os.close(master)
        os.close(slave)
    assert len(text) == 39 and text.startswith("nbtunnel: job 15 PENDING")
    assert text.endswith(" s)") and " (0." in text, text
