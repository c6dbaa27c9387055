"""--ensure (for cron) and --watch (a foreground supervisor), end to end against the real
sshd, tmux and Jupyter of the test remote."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

from helpers import http_request, local_port_open, wait_until
from unattended import (
    api_status,
    ensure,
    finish,
    forwards,
    jupyter_pids,
    kill_masters,
    masters,
    passphrase_key,
    run_in_pty,
    start,
    watch,
)

NBTUNNEL = Path(__file__).resolve().parent.parent / "nbtunnel.py"


# --ensure #####################################################################


def test_ensure_starts_then_stays_silent_without_ssh(nbt, remote):
    first = ensure(nbt)
    assert first.returncode == 0, first.stderr
    lines = first.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"started Jupyter on {remote.alias} (session nbtunnel): http://127.0.0.1:")
    url = lines[0].rsplit(": ", 1)[1]
    assert api_status(url) == 200
    pids = jupyter_pids(remote)
    assert len(pids) == 1

    # All is well: no output at all, no login, nothing started. The only ssh run is one
    # question over the running master (is the recorded server still the one on its port?).
    before = remote.auth_count()
    quiet = ensure(nbt, "-v")
    assert quiet.returncode == 0 and quiet.stdout == ""
    ssh_lines = [line for line in quiet.stderr.splitlines() if "+ ssh " in line]
    assert ssh_lines and all("-M" not in line.split() and "ControlMaster=no" in line or "-O" in line
                             for line in ssh_lines), quiet.stderr
    silent = ensure(nbt)
    assert silent.returncode == 0 and silent.stdout == "" and silent.stderr == ""
    assert remote.auth_count() == before
    assert jupyter_pids(remote) == pids
    assert remote.tmux_sessions() == ["nbtunnel"]

    # --json reports the session with an empty list of repairs.
    as_json = ensure(nbt, "--json")
    data = json.loads(as_json.stdout)
    assert data["repairs"] == [] and data["url"] == url


def test_ensure_reopens_tunnel_elsewhere_when_its_port_was_taken(nbt, remote):
    info = start(nbt)
    kill_masters(nbt.ssh_config)
    wait_until(lambda: not local_port_open(info["local_port"]), 15, message="tunnel closed")
    import socket

    squatter = socket.socket()
    squatter.bind(("127.0.0.1", info["local_port"]))
    squatter.listen(1)
    try:
        proc = ensure(nbt, "--json")
        assert proc.returncode == 0, proc.stderr
        data = json.loads(proc.stdout)
        assert data["local_port"] != info["local_port"] and data["token"] == info["token"]
        assert data["repairs"] == [
            f"reopened the tunnel to {remote.alias} (session nbtunnel) on local port {data['local_port']} "
            f"(local port {info['local_port']} was taken): {data['url']}"
        ]
        assert api_status(data["url"]) == 200
    finally:
        squatter.close()


def test_ensure_never_prompts_even_on_a_terminal(nbt, remote):
    env = nbt._env({"SSH_AUTH_SOCK": None, "SSH_ASKPASS": None, "DISPLAY": None})
    with passphrase_key(nbt, remote) as config:
        base = [sys.executable, str(NBTUNNEL), "--ssh-config", str(config), "--state-dir", str(nbt.state_dir)]
        # The control: on a terminal a plain start lets ssh ask for the passphrase...
        code, out = run_in_pty([*base, "nbkeyed"], env, timeout=60, stop_on="Enter passphrase")
        assert "Enter passphrase" in out, out
        # ...but --ensure never asks: it fails at once and says what cron needs.
        t0 = time.monotonic()
        code, out = run_in_pty([*base, "nbkeyed", "--ensure"], env, timeout=60)
        assert time.monotonic() - t0 < 30
    assert code == 1, out
    assert "Enter passphrase" not in out
    assert "refused authentication" in out and "passphrase" in out and "ssh-agent" in out
    errors = [line for line in out.splitlines() if line.strip()]
    assert len(errors) == 1, out  # one line says why
    assert not jupyter_pids(remote) and not masters(config)


def test_ensure_unreachable_host_one_line_and_exit_1(nbt, remote):
    proc = ensure(nbt, "--timeout", "5", host=remote.down_alias)
    assert proc.returncode == 1
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and remote.down_alias in lines[0] and "cannot reach" in lines[0]


def test_ensure_broken_jupyter_is_one_line_and_exit_1(nbt, remote):
    proc = ensure(nbt, "--jupyter", "jupyter server --no-such-option-xyz=1")
    assert proc.returncode == 1
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "Jupyter exited before it was ready" in lines[0], proc.stderr
    assert remote.tmux_sessions() == [] and not masters(nbt.ssh_config)
    # -v keeps the remote log's tail.
    verbose = ensure(nbt, "-v", "--jupyter", "jupyter server --no-such-option-xyz=1")
    assert verbose.returncode == 1 and "last lines of the remote log" in verbose.stderr


def test_ensure_without_host_uses_the_only_record(nbt, remote):
    info = start(nbt)
    kill_masters(nbt.ssh_config)
    wait_until(lambda: not local_port_open(info["local_port"]), 15, message="tunnel closed")
    proc = nbt.run("--ensure")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("reopened the tunnel") and api_status(info["url"]) == 200


# --watch ######################################################################


def test_watch_ctrl_c_closes_tunnel_and_keeps_server(nbt, remote):
    proc, url = watch(nbt)
    pids = jupyter_pids(remote)
    port = int(url.split(":")[2].split("/")[0])
    time.sleep(3)  # a few health checks
    assert proc.poll() is None
    code, out, err = finish(proc, signal.SIGINT)
    assert code == 0, err
    assert out == ""  # the URL was the only line on stdout
    assert "closed the tunnel" in err
    wait_until(lambda: not masters(nbt.ssh_config), 15, message="master gone")
    assert not local_port_open(port)
    assert jupyter_pids(remote) == pids  # the server keeps running
    row = nbt.status()[0]
    assert row["server"] == "running" and row["tunnel"] == "down"


def test_watch_sigterm_with_terminate_stops_everything(nbt, remote):
    proc, url = watch(nbt, "--terminate")
    code, _, err = finish(proc, signal.SIGTERM)
    assert code == 0, err
    wait_until(lambda: not jupyter_pids(remote), 30, message="server stopped")
    # `ssh -O exit` and tmux's own exit return before those processes are gone: give them time.
    wait_until(lambda: remote.tmux_sessions() == [], 15, message="tmux session gone")
    wait_until(lambda: not masters(nbt.ssh_config), 15, message="ssh master gone")
    assert [r["ended"] for r in nbt.status()] == ["terminated"]
    assert api_status(url, timeout=3) == 0


def test_watch_exits_when_shut_down_from_the_browser(nbt, remote):
    proc, url = watch(nbt)
    port = int(url.split(":")[2].split("/")[0])
    token = url.split("token=")[1]
    # What File > Shut Down in JupyterLab sends.
    status, _ = http_request(
        "POST", f"http://127.0.0.1:{port}/api/shutdown", headers={"Authorization": f"token {token}"}
    )
    assert status == 200
    code, out, err = finish(proc, None, timeout=60)
    assert code == 0, err
    assert "was shut down" in err
    wait_until(lambda: not jupyter_pids(remote), 15, message="server gone")
    assert remote.tmux_sessions() == []
    assert not masters(nbt.ssh_config) and not local_port_open(port)
    assert [r["ended"] for r in nbt.status()] == ["shutdown"]


def test_watch_exits_when_the_server_ended_itself_idle(nbt, remote):
    """--idle-timeout under tmux: Jupyter ends itself (it looks once a minute), --watch
    says so and exits instead of restarting it, and --ensure leaves it ended."""
    proc, url = watch(nbt, "--idle-timeout", "0.5")
    port = int(url.split(":")[2].split("/")[0])
    code, out, err = finish(proc, None, timeout=240)
    assert code == 0, err
    assert "was idle for 30s" in err, err
    wait_until(lambda: not jupyter_pids(remote), 15, message="server gone")
    assert remote.tmux_sessions() == []
    assert not masters(nbt.ssh_config) and not local_port_open(port)
    [row] = nbt.status()
    assert row["ended"] == "idle" and row["idle_timeout"] == 0.5, row
    again = ensure(nbt)
    assert again.returncode == 0 and again.stdout == "", (again.stdout, again.stderr)
    assert not jupyter_pids(remote) and nbt.status()[0]["ended"] == "idle"


def test_idle_timeout_in_seconds_ends_a_tmux_session(nbt, remote):
    """--idle-timeout 15s is fifteen seconds, not fifteen minutes: with nobody using it,
    Jupyter under tmux ends itself at its first look (once a minute), and --status says
    how it ended, in seconds as asked (--json: minutes)."""
    info = start(nbt, "--idle-timeout", "15s")
    began = time.monotonic()
    assert api_status(info["url"]) == 200
    text = nbt.run("--status", timeout=60).stdout
    assert "\tidle-timeout=15s" in text, text
    assert nbt.status()[0]["idle_timeout"] == 0.25
    log = remote.home / ".local/state/nbtunnel/nbtunnel.log"
    assert "Will shut down after 15 seconds with no kernels" in log.read_text()
    wait_until(lambda: not jupyter_pids(remote), 150, interval=1, message="Jupyter ended itself")
    print(f"measured: idle session (15 s) ended {time.monotonic() - began:.0f}s after its start")
    assert remote.tmux_sessions() == []
    assert "No kernels for" in log.read_text()
    proc = nbt.run("--status", timeout=60)
    assert proc.returncode == 0 and "ended: idle for 15s" in proc.stdout, proc.stdout
    [row] = nbt.status()
    assert row["ended"] == "idle" and row["server"] == "stopped", row


def test_watch_ends_when_terminated_from_elsewhere(nbt, remote):
    proc, url = watch(nbt)
    done = nbt.run("--terminate")
    assert done.returncode == 0, done.stderr
    code, _, err = finish(proc, None, timeout=60)
    assert code == 0, err
    assert "was terminated" in err
    assert not masters(nbt.ssh_config) and not jupyter_pids(remote)
    assert [r["ended"] for r in nbt.status()] == ["terminated"]


def test_watch_port_never_refuses_while_the_link_is_repaired(nbt, remote):
    proc, url = watch(nbt)
    port = int(url.split(":")[2].split("/")[0])
    refused, stop = [], threading.Event()

    def knock():
        while not stop.is_set():
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5):
                    pass
            except ConnectionRefusedError:
                refused.append(time.monotonic())
            except OSError:
                pass
            time.sleep(0.002)

    knocker = threading.Thread(target=knock, daemon=True)
    knocker.start()
    for _ in range(3):
        kill_masters(nbt.ssh_config)
        # Made while no master runs: it waits, and is answered once the tunnel is back.
        assert api_status(url, timeout=60) == 200
        assert len(masters(nbt.ssh_config)) == 1
    stop.set()
    knocker.join(10)
    assert refused == []
    code, _, err = finish(proc)
    assert code == 0, err
    assert not local_port_open(port)  # Ctrl-C closes the tunnel, as before


def test_watch_and_ensure_share_the_session(nbt, remote):
    proc, url = watch(nbt)
    # cron's --ensure next to a running --watch: healthy, so silent, and nothing doubled.
    quiet = ensure(nbt)
    assert quiet.returncode == 0 and quiet.stdout == "" and quiet.stderr == ""
    assert len(jupyter_pids(remote)) == 1 and len(masters(nbt.ssh_config)) == 1
    # A plain run meanwhile reattaches at the same URL and leaves the port with --watch.
    again = start(nbt)
    assert again["url"] == url and again["reused"]
    port = int(url.split(":")[2].split("/")[0])
    assert forwards(nbt.ssh_config) == [] and forwards(nbt.ssh_config, proc) == [port]
    assert [r["tunnel"] for r in nbt.status()] == ["up"]
    code, _, err = finish(proc)
    assert code == 0, err


@pytest.mark.parametrize(
    "args",
    [
        ["--watch", "--status"],
        ["--watch", "--ensure"],
        ["--ensure", "--terminate"],
        ["--watch", "--interval", "0"],
        ["--watch", "--interval", "x"],
    ],
)
def test_bad_combinations_exit_2(nbt, remote, args):
    before = remote.auth_count()
    proc = nbt.run(remote.alias, *args)
    assert proc.returncode == 2, proc.stderr
    assert remote.auth_count() == before


# Pure parts ###################################################################


def _rec(local_port=5000, remote_port=6000, url="http://127.0.0.1:5000/lab?token=t"):
    return dict(local_port=local_port, remote_port=remote_port, url=url)


@pytest.mark.noroot
def test_repair_lines_say_what_changed():
    import nbtunnel

    lines = nbtunnel.repair_lines
    new = _rec()
    assert lines("h", "s", None, new, {"reused": False}, False) == [f"started Jupyter on h (session s): {new['url']}"]
    assert lines("h", "s", _rec(), new, {"reused": False}, True) == [
        f"restarted Jupyter on h (session s), which was not running: {new['url']}"
    ]
    assert lines("h", "s", None, new, {"reused": True}, False) == [
        f"reattached to Jupyter already running on h (session s): {new['url']}"
    ]
    assert lines("h", "s", _rec(), new, {"reused": True}, False) == [
        f"reopened the tunnel to h (session s) on local port 5000: {new['url']}"
    ]
    assert lines("h", "s", _rec(local_port=4000), new, {"reused": True}, True) == [
        f"reopened the tunnel to h (session s) on local port 5000 (local port 4000 was taken): {new['url']}"
    ]
    assert lines("h", "s", _rec(remote_port=7000), new, {"reused": True}, True)[0].startswith("reopened")
    assert lines("h", "s", _rec(), new, {"reused": True}, True) == []  # nothing changed


@pytest.mark.noroot
def test_local_lock_gives_up_after_its_timeout(tmp_path):
    import nbtunnel

    with nbtunnel.locked(str(tmp_path), "h", "s"):
        t0 = time.monotonic()
        with pytest.raises(nbtunnel.Error, match="has been busy"):
            with nbtunnel.locked(str(tmp_path), "h", "s", timeout=1):
                pass
        assert 0.9 < time.monotonic() - t0 < 5
    with nbtunnel.locked(str(tmp_path), "h", "s", timeout=1):  # free again
        pass


@pytest.mark.noroot
def test_listening_ports_of_a_process():
    import socket

    import nbtunnel

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        port = sock.getsockname()[1]
        assert port in nbtunnel.listening_ports(os.getpid())
    assert port not in nbtunnel.listening_ports(os.getpid())
    assert nbtunnel.listening_ports(None) == []


@pytest.mark.noroot
def test_api_ok_needs_the_token_and_a_200(tmp_path):
    import http.server
    import threading

    import nbtunnel

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            good = self.path == "/base/api/status" and self.headers.get("Authorization") == "token right"
            self.send_response(200 if good else 403)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        rec = dict(local_port=server.server_port, base_url="/base/", token="right")
        assert nbtunnel.api_ok(rec)
        assert not nbtunnel.api_ok(dict(rec, token="wrong"))
        assert not nbtunnel.api_ok(dict(rec, base_url="/"))
    finally:
        server.shutdown()
        server.server_close()
    assert not nbtunnel.api_ok(rec, timeout=1)  # nothing listens any more


@pytest.mark.noroot
def test_link_failures_are_told_from_refusals():
    import nbtunnel

    class Conn:
        host = "h"
        closed = False

        def alive(self):
            return True

        def close(self):
            self.closed = True

    conn = Conn()
    refusals = [  # what the link cannot mend: retry decisions read the kind, not the text
        nbtunnel.SshError(nbtunnel.MSG_AUTH.format(host="h", detail="Permission denied"), kind="auth"),
        nbtunnel.SshError(nbtunnel.MSG_HOSTKEY.format(host="h"), kind="hostkey-unknown"),
        nbtunnel.SshError(nbtunnel.MSG_HOSTKEY_CHANGED.format(host="h"), kind="hostkey-changed"),
        nbtunnel.RemoteError("h: Jupyter exited before it was ready", kind="launch"),
        # a message that merely looks like a link failure is still judged by its kind
        nbtunnel.SshError(nbtunnel.MSG_UNREACHABLE.format(host="h", detail="x"), kind="auth"),
    ]
    for err in refusals:
        assert not nbtunnel.link_failure(conn, err), (err, err.kind)
    link = nbtunnel.SshError(nbtunnel.MSG_UNREACHABLE.format(host="h", detail="x"), kind="unreachable")
    assert nbtunnel.link_failure(conn, link)
    assert not conn.closed
    assert nbtunnel.link_failure(conn, nbtunnel.SshError("h did not answer within 10s", kind="no-answer"))
    assert conn.closed  # a hung link: the master is dropped
    slow = nbtunnel.MSG_NOT_ANSWERING.format(host="h", session="s", port=1, log="x")
    assert nbtunnel.link_failure(conn, nbtunnel.Error(slow, kind="not-answering"))


@pytest.mark.noroot
def test_damaged_records_are_not_used(tmp_path):
    import argparse

    import nbtunnel

    session = argparse.Namespace(state=str(tmp_path), host="h", name="s")
    path = tmp_path / nbtunnel.record_name("h", "s")
    good = dict(host="h", session="s", token="t", local_port=1, remote_port=2)
    path.write_text(json.dumps(good))
    assert nbtunnel.fresh_record(session) == good
    for bad in ["{", "[]", json.dumps(dict(good, local_port="1")), json.dumps(dict(good, host="other")),
                json.dumps({k: v for k, v in good.items() if k != "token"})]:
        path.write_text(bad)
        assert nbtunnel.fresh_record(session) is None, bad
    path.unlink()
    assert nbtunnel.fresh_record(session) is None
