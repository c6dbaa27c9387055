"""End-to-end tests of the core: start, reattach, status, terminate against a real sshd, tmux and Jupyter."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

from helpers import (
    api_status,
    http_get,
    jupyter_pids,
    kill_jupyter,
    local_port_open,
    local_ssh_pids,
    run_kernel_code,
    start,
    token_of,
    wait_until,
)

HOSTILE_DIRS = [
    "with space",
    "quote'single",
    'quote"double',
    "$(touch PWNED)",
    "`touch PWNED`",
    "semi;touch PWNED",
    "new\nline",
    "ünïcødé-目录",
    "-dash-first",
    "back\\slash $HOME *",
]


@pytest.mark.fast
def test_start_serves_jupyter_through_tunnel(nbt, remote):
    before = remote.auth_count()
    proc = nbt.run(remote.alias)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, proc.stdout  # exactly one line: the URL
    url = lines[0]
    parts = urlparse(url)
    assert parts.hostname == "127.0.0.1" and parts.path == "/lab"
    token = token_of(url)
    assert len(token) >= 32
    assert remote.auth_count() - before == 1  # one authentication for the whole command

    assert api_status(url) == 200
    status, _ = http_get(f"http://127.0.0.1:{parts.port}/api/status")  # no token: refused
    assert status == 403
    assert run_kernel_code(f"http://127.0.0.1:{parts.port}", token, "1+1") == "2"

    # The server runs in a detached tmux session of the remote user and listens on its 127.0.0.1 only.
    assert remote.tmux_sessions() == ["nbtunnel"]
    record = nbt.status()[0]
    assert record["server"] == "running" and record["tunnel"] == "up"
    rport = record["remote_port"]
    assert remote.port_open(rport)
    if not remote.fallback:
        assert not remote.port_open(rport, remote.ip)
        assert not local_port_open(rport) or rport == parts.port


def test_json_output_and_state_files_are_private(nbt, remote):
    info = start(nbt)
    for key in ("host", "session", "url", "local_port", "remote_port", "token", "manager", "reused"):
        assert key in info, key
    assert info["host"] == remote.alias and info["session"] == "nbtunnel"
    assert info["manager"] == "tmux" and info["reused"] is False
    # "tunnel" is the backend here (documented); these two say what they are everywhere.
    assert info["tunnel_backend"] == info["tunnel"] == "ssh" and info["tunnel_state"] == "up"
    assert f":{info['local_port']}/" in info["url"] and info["token"] in info["url"]
    assert stat.S_IMODE(os.stat(nbt.state_dir).st_mode) == 0o700
    files = [p for p in nbt.state_dir.iterdir() if p.is_file()]
    assert files and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files)


@pytest.mark.fast
def test_reattach_reuses_server_and_reopens_tunnel(nbt, remote):
    first = start(nbt)
    pids = jupyter_pids(remote)
    assert len(pids) == 1

    before = remote.auth_count()
    again = start(nbt)
    assert again["reused"] is True and again["url"] == first["url"]
    assert jupyter_pids(remote) == pids
    assert remote.auth_count() == before  # the tunnel's master connection was reused: no new login

    # Kill the local tunnel (the ssh master): the next run reopens it on the same port.
    masters = local_ssh_pids(str(nbt.ssh_config))
    assert masters
    for pid in masters:
        os.kill(pid, 9)
    wait_until(lambda: not local_port_open(first["local_port"]), 15, message="tunnel closed")
    assert nbt.status()[0]["tunnel"] == "down"
    before = remote.auth_count()
    third = start(nbt)
    assert third["reused"] is True and third["url"] == first["url"]
    assert remote.auth_count() - before == 1
    assert api_status(third["url"]) == 200
    assert jupyter_pids(remote) == pids
    assert remote.tmux_sessions() == ["nbtunnel"]


@pytest.mark.fast
def test_status_asks_the_remote(nbt, remote):
    info = start(nbt)
    proc = nbt.run("--status")
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip()
    assert remote.alias in line and "server=running" in line and "tunnel=up" in line
    row = nbt.status()[0]  # "tunnel" is the state here (documented), "backend" the backend
    assert row["tunnel_state"] == row["tunnel"] == "up"
    assert row["tunnel_backend"] == row["backend"] == info["tunnel_backend"] == "ssh"

    # The server dies behind nbtunnel's back: --status must notice (it asks the remote).
    kill_jupyter(remote)
    rows = nbt.status()
    assert rows[0]["server"] == "stopped"
    # and a start brings it back, reattaching the same local port.
    again = start(nbt)
    assert again["reused"] is False and again["local_port"] == info["local_port"]
    assert api_status(again["url"]) == 200


@pytest.mark.fast
def test_terminate_leaves_nothing(nbt, remote):
    info = start(nbt)
    assert local_ssh_pids(str(nbt.ssh_config))
    before = remote.auth_count()
    proc = nbt.run("--terminate", "--json")
    assert proc.returncode == 0, proc.stderr
    assert remote.auth_count() == before  # reused the tunnel's connection
    assert remote.tmux_sessions() == []
    wait_until(lambda: not jupyter_pids(remote), 15, message="no jupyter left")
    wait_until(lambda: not local_ssh_pids(str(nbt.ssh_config)), 15, message="no local ssh left")
    assert not local_port_open(info["local_port"])
    assert not remote.port_open(info["remote_port"])
    assert [r["ended"] for r in nbt.status()] == ["terminated"]  # and stays so
    # The server shut down through its own API (kernels end cleanly), and its log went with it:
    # the remote keeps only the mark that the session ended on purpose.
    assert json.loads(proc.stdout)["how"] == "api"
    assert remote.run(["test", "-e", info["log"]]).returncode != 0
    assert remote.run(["test", "-e", info["log"][:-4] + ".ended"]).returncode == 0

    again = nbt.run("--terminate")
    assert again.returncode == 0, again.stderr
    named = nbt.run(remote.alias, "--terminate")  # asks the remote, which has nothing: still 0
    assert named.returncode == 0, named.stderr
    assert not local_ssh_pids(str(nbt.ssh_config))


def test_terminate_refuses_busy_kernels_unless_forced(nbt, remote):
    info = start(nbt)
    import threading

    base = f"http://127.0.0.1:{info['local_port']}"
    outcome: list[object] = []

    def sleep_in_kernel() -> None:
        try:
            outcome.append(run_kernel_code(base, info["token"], "import time; time.sleep(300)", timeout=400))
        except Exception as err:  # the kernel is interrupted by --force: expected, checked below
            outcome.append(err)

    worker = threading.Thread(target=sleep_in_kernel, daemon=True)
    worker.start()

    def busy() -> bool:
        status, body = http_get(f"{base}/api/kernels", headers={"Authorization": f"token {info['token']}"})
        return status == 200 and any(k["execution_state"] == "busy" for k in json.loads(body))

    wait_until(busy, 60, message="kernel busy")
    proc = nbt.run("--terminate")
    assert proc.returncode == 3, (proc.returncode, proc.stderr)
    assert "busy" in proc.stderr and "--force" in proc.stderr
    assert api_status(info["url"]) == 200  # nothing was stopped
    assert remote.tmux_sessions() == ["nbtunnel"]

    forced = nbt.run("--terminate", "--force")
    assert forced.returncode == 0, forced.stderr
    wait_until(lambda: not remote.pids(r"jupyter|ipykernel"), 30, message="server and kernel gone")
    assert remote.tmux_sessions() == []
    assert not local_port_open(info["local_port"])
    worker.join(timeout=60)  # the sleeping kernel was cut short, not left to finish
    assert not worker.is_alive() and len(outcome) == 1 and isinstance(outcome[0], Exception), outcome


def test_host_from_only_record_or_config(nbt, remote, tmp_path):
    start(nbt)
    proc = nbt.run("--json")  # HOST omitted: the only recorded session
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["reused"] is True

    other = start(nbt, "--session", "second", "--app", "server")
    assert other["url"].endswith("/?token=" + other["token"])
    assert sorted(remote.tmux_sessions()) == ["nbtunnel", "second"]
    ambiguous = nbt.run()
    assert ambiguous.returncode == 2
    assert "nbtunnel" in ambiguous.stderr and "second" in ambiguous.stderr
    assert nbt.run("--terminate").returncode == 2

    # Both sessions share one master connection; terminating one keeps the other's tunnel.
    assert nbt.run("--terminate", "--session", "second").returncode == 0
    rows = nbt.status()
    rows = [r for r in rows if not r["ended"]]  # "second" stays listed as terminated
    assert [r["session"] for r in rows] == ["nbtunnel"] and rows[0]["tunnel"] == "up"

    config = tmp_path / "config.ini"
    workdir = remote.home / "cfgdir"
    remote.run(["mkdir", "-p", str(workdir)], check=True)
    config.write_text(
        f"[DEFAULT]\nhost = {remote.alias}\n\n[host {remote.alias}]\nnotebook-dir = ~/cfgdir\napp = server\n"
    )
    proc = nbt.run("--json", "--session", "fromcfg", env={"NBTUNNEL_CONFIG": str(config)})
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["host"] == remote.alias and info["session"] == "fromcfg"
    token = info["token"]
    status, body = http_get(
        f"http://127.0.0.1:{info['local_port']}/api/contents", headers={"Authorization": f"token {token}"}
    )
    assert status == 200
    remote.run(["touch", str(workdir / "marker.txt")], check=True)
    status, body = http_get(
        f"http://127.0.0.1:{info['local_port']}/api/contents", headers={"Authorization": f"token {token}"}
    )
    assert "marker.txt" in body


@pytest.mark.parametrize("name", HOSTILE_DIRS)
def test_hostile_notebook_dir_is_used_literally(nbt, remote, name):
    target = remote.home / "nb" / name
    remote.run(["mkdir", "-p", str(target)], check=True)
    remote.run(["touch", str(target / "inside.txt")], check=True)
    info = start(nbt, "--notebook-dir", str(target))
    status, body = http_get(
        f"http://127.0.0.1:{info['local_port']}/api/contents", headers={"Authorization": f"token {info['token']}"}
    )
    assert status == 200 and "inside.txt" in body
    assert not list(remote.home.rglob("PWNED")) and not Path("PWNED").exists()


@pytest.mark.parametrize("name", ["$(touch PWNED)", "`touch PWNED`", "a;touch PWNED", "x\ny'z\""])
def test_missing_hostile_notebook_dir_fails_cleanly(nbt, remote, name):
    proc = nbt.run(remote.alias, "--notebook-dir", name)
    assert proc.returncode == 1
    assert "does not exist" in proc.stderr
    assert not list(remote.home.rglob("PWNED"))
    assert not (remote.home / name).exists()
    assert not jupyter_pids(remote) and remote.tmux_sessions() == []
    assert not local_ssh_pids(str(nbt.ssh_config))


@pytest.mark.parametrize(
    "args",
    [
        ["--session", "bad name"],
        ["--session=-x"],
        ["--session", "a/b"],
        ["--session", "$(id)"],
        ["--session", "x" * 65],
        ["--local-port", "0"],
        ["--local-port", "65536"],
        ["--remote-port", "abc"],
        ["--remote-port", "-1"],
    ],
)
def test_bad_input_exits_2(nbt, remote, args):
    before = remote.auth_count()
    proc = nbt.run(remote.alias, *args)
    assert proc.returncode == 2, proc.stderr
    assert "invalid" in proc.stderr
    assert remote.auth_count() == before  # rejected before connecting


def test_unknown_host_key_fails_clearly_unless_accept_new(nbt, remote):
    proc = nbt.run(remote.unknown_alias, timeout=60)
    assert proc.returncode == 1
    assert remote.unknown_alias in proc.stderr and "--accept-new" in proc.stderr
    assert not jupyter_pids(remote)
    assert not local_ssh_pids(str(nbt.ssh_config))
    ok = nbt.run(remote.unknown_alias, "--accept-new", "--json")
    assert ok.returncode == 0, ok.stderr
    assert api_status(json.loads(ok.stdout)["url"]) == 200


def test_unreachable_host_fails_fast_naming_it(nbt, remote):
    t0 = time.monotonic()
    proc = nbt.run(remote.down_alias, "--timeout", "5", timeout=60)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 1
    assert remote.down_alias in proc.stderr and "cannot reach" in proc.stderr
    assert elapsed < 15
    t0 = time.monotonic()
    proc = nbt.run("nbtunnel-no-such-host.invalid", "--timeout", "5", timeout=60)
    assert proc.returncode == 1 and "nbtunnel-no-such-host.invalid" in proc.stderr
    assert time.monotonic() - t0 < 15


def test_missing_jupyter_and_missing_tmux_have_own_messages(nbt, remote):
    proc = nbt.run(remote.alias, "--jupyter", "no-such-jupyter lab")
    assert proc.returncode == 1
    assert "no-such-jupyter not found" in proc.stderr
    proc = nbt.run(remote.alias, "--app", "nbclassic", "--jupyter", "jupyter no-such-app")
    assert proc.returncode == 1 and "jupyter no-such-app" in proc.stderr and "not installed" in proc.stderr

    rc = remote.home / "no-tmux.rc"
    remote.run(["sh", "-c", f'echo "PATH={remote.jupyter_venv}/bin; export PATH" > "$1"', "sh", str(rc)], check=True)
    proc = nbt.run(remote.alias, "--rc", str(rc))
    assert proc.returncode == 1
    assert "tmux is not installed" in proc.stderr
    assert not jupyter_pids(remote)
    assert not local_ssh_pids(str(nbt.ssh_config))


def test_missing_python_has_own_message(nbt, remote):
    shell = Path("/usr/local/bin/nbt-test-nopython-shell")
    shell.write_text('#!/bin/bash\nexport PATH=/nonexistent\nexec /bin/bash "$@"\n')
    shell.chmod(0o755)
    try:
        with remote.login_shell(str(shell)):
            proc = nbt.run(remote.alias)
    finally:
        shell.unlink()
    assert proc.returncode == 1
    assert "no python3 or python" in proc.stderr and remote.alias in proc.stderr


def test_jupyter_failure_carries_log_tail(nbt, remote):
    proc = nbt.run(remote.alias, "--jupyter", "jupyter server --no-such-option-xyz=1")
    assert proc.returncode == 1
    assert "last lines of the remote log" in proc.stderr
    assert "no-such-option-xyz" in proc.stderr or "Unrecognized" in proc.stderr
    assert remote.tmux_sessions() == []
    assert not local_ssh_pids(str(nbt.ssh_config))


def test_fixed_ports_and_taken_remote_port(nbt, remote):
    from helpers import free_local_port

    lport = free_local_port()
    info = start(nbt, "--local-port", str(lport), "--remote-port", "18888")
    assert info["local_port"] == lport and info["remote_port"] == 18888
    assert api_status(info["url"]) == 200
    proc = nbt.run(remote.alias, "--session", "clash", "--remote-port", "18888")
    assert proc.returncode == 1 and "18888" in proc.stderr and "in use" in proc.stderr
    assert remote.tmux_sessions() == ["nbtunnel"]


@pytest.mark.parametrize("app,path", [("notebook", "/tree"), ("server", "/"), ("nbclassic", "/tree")])
def test_other_apps(nbt, remote, app, path):
    info = start(nbt, "--app", app)
    assert urlparse(info["url"]).path == path
    status, body = http_get(info["url"])
    assert status == 200, body[:300]


def test_verbose_shows_ssh_commands_and_quiet_is_quiet(nbt, remote):
    proc = nbt.run(remote.alias, "-v")
    assert proc.returncode == 0
    assert "+ ssh " in proc.stderr and "-O forward" in proc.stderr
    quiet = nbt.run(remote.alias, "-q")
    assert quiet.returncode == 0 and quiet.stderr == ""
    assert len(quiet.stdout.splitlines()) == 1


def test_open_hands_the_url_to_the_browser(nbt, remote, tmp_path):
    opened = tmp_path / "opened.txt"
    browser = tmp_path / "browser.sh"
    browser.write_text(f'#!/bin/sh\nprintf "%s" "$1" > {opened}\n')
    browser.chmod(0o755)
    proc = nbt.run(remote.alias, "--open", env={"BROWSER": f"{browser} %s"})
    assert proc.returncode == 0, proc.stderr
    # The browser gets a private page that leads to the URL, never the token on its argv.
    given = opened.read_text()
    url = proc.stdout.strip()
    assert given.startswith("file:///") and parse_qs(urlparse(url).query)["token"][0] not in given
    from urllib.parse import unquote

    assert f'url={url}"' in Path(unquote(urlparse(given).path)).read_text()
