"""The fault suite: break one thing for real, then check that --ensure or --watch ends
with a working URL (the same one whenever the local port is still free) or a clear
error, and that nothing is duplicated: one Jupyter, one tmux session, one ssh master,
one forward."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

from helpers import kill_jupyter, local_port_open, run_kernel_code, wait_until
from unattended import (
    TcpProxy,
    api_status,
    ensure,
    finish,
    forwards,
    jupyter_pids,
    kill_masters,
    masters,
    proxy_config,
    read_line,
    start,
    wait_logged,
    wait_watched,
    watch,
)


def assert_single(nbt, remote, info: dict, watching=()) -> None:
    """Exactly one of everything, and the URL serves a kernel.  WATCHING: the --watch
    process, which holds the tunnel's local port itself."""
    assert len(jupyter_pids(remote)) == 1, jupyter_pids(remote)
    assert remote.tmux_sessions() == [info["session"]]
    assert len(masters(nbt.ssh_config)) == 1
    assert forwards(nbt.ssh_config, *watching) == [info["local_port"]]
    assert api_status(info["url"]) == 200
    assert run_kernel_code(f"http://127.0.0.1:{info['local_port']}", info["token"], "1+1") == "2"


def record_file(nbt):
    files = list(nbt.state_dir.glob("*.json"))
    assert len(files) == 1, files
    return files[0]


# The server ###################################################################


def test_jupyter_killed(nbt, remote):
    info = start(nbt)
    kill_jupyter(remote)
    proc = ensure(nbt)
    assert proc.returncode == 0, proc.stderr
    # Same local port and same token: the bookmarked URL works again.
    assert proc.stdout == (
        f"restarted Jupyter on {remote.alias} (session nbtunnel), which was not running, "
        f"as it last ran: {info['url']}\n"
    )
    assert_single(nbt, remote, info)


def test_tmux_server_killed(nbt, remote):
    info = start(nbt)
    remote.run(["tmux", "kill-server"], check=True)
    wait_until(lambda: not jupyter_pids(remote), 15, message="jupyter gone with tmux")
    proc = ensure(nbt)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("restarted Jupyter") and proc.stdout.endswith(info["url"] + "\n")
    assert_single(nbt, remote, info)


def test_jupyter_killed_ensure_from_cron_environment(nbt, remote):
    """The tunnel was opened from a desktop session (XDG_RUNTIME_DIR set), cron has none:
    --ensure still finds and reuses that tunnel's connection."""
    desktop = nbt.tmp / "rt"
    desktop.mkdir(mode=0o700)
    proc = nbt.run(remote.alias, "--json", env={"XDG_RUNTIME_DIR": str(desktop), "NBTUNNEL_RUNTIME_DIR": None})
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert os.path.dirname(json.loads(record_file(nbt).read_text())["socket"]) == str(desktop / "nbtunnel")
    master = masters(nbt.ssh_config)
    kill_jupyter(remote)
    before = remote.auth_count()
    proc = ensure(nbt)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("restarted Jupyter") and proc.stdout.endswith(info["url"] + "\n")
    assert masters(nbt.ssh_config) == master and remote.auth_count() == before
    assert_single(nbt, remote, info)


def test_remote_reboot(nbt, remote):
    """Every process of the remote user dies (server, tmux, the ssh session of the tunnel)."""
    info = start(nbt)
    remote.kill_user_processes()
    wait_until(lambda: not masters(nbt.ssh_config), 15, message="tunnel died with the remote")
    proc = ensure(nbt)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("restarted Jupyter") and proc.stdout.endswith(info["url"] + "\n")
    assert_single(nbt, remote, info)


def test_jupyter_killed_under_watch(nbt, remote):
    proc, url = watch(nbt)
    kill_jupyter(remote)
    wait_watched(proc, lambda: api_status(url, timeout=3) == 200, 90, "server back")
    info = nbt.status()[0]
    assert info["url"] == url
    assert_single(nbt, remote, info, [proc])
    said = wait_logged(proc, f"restarted Jupyter on {remote.alias} (session nbtunnel), which was not running, "
                       f"as it last ran: {url}", 30)
    code, _, err = finish(proc)
    assert code == 0, said + err


# The tunnel ###################################################################


def test_local_tunnel_killed(nbt, remote):
    info = start(nbt)
    pids = jupyter_pids(remote)
    kill_masters(nbt.ssh_config)
    wait_until(lambda: not local_port_open(info["local_port"]), 15, message="tunnel closed")
    before = remote.auth_count()
    proc = ensure(nbt)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == (
        f"reopened the tunnel to {remote.alias} (session nbtunnel) on local port {info['local_port']}: {info['url']}\n"
    )
    assert remote.auth_count() - before == 1  # one connection for the whole repair
    assert jupyter_pids(remote) == pids  # the server was not touched
    assert_single(nbt, remote, info)


def test_local_tunnel_killed_under_watch(nbt, remote):
    proc, url = watch(nbt)
    pids = jupyter_pids(remote)
    kill_masters(nbt.ssh_config)
    wait_watched(proc, lambda: api_status(url, timeout=3) == 200, 60, "tunnel back")
    assert jupyter_pids(remote) == pids
    assert_single(nbt, remote, nbt.status()[0], [proc])
    said = wait_logged(proc, f"reopened the tunnel to {remote.alias} (session nbtunnel) on local port", 30)
    code, _, err = finish(proc)
    assert code == 0, said + err
    assert url in said + err, said + err


def watch_through(nbt, proxy, config) -> tuple[subprocess.Popen, str]:
    """--watch through the proxy, with ssh's keep-alive tightened so a dead link shows in seconds.
    The server is started first with the default --timeout: a loaded machine may need more
    than the 8 s that bound each reconnection here."""
    alive = ("-o", "ServerAliveInterval=1", "-o", "ServerAliveCountMax=2")  # the master's, too
    first = nbt.run("nbproxy", "--ssh-config", str(config), *alive, timeout=180)
    assert first.returncode == 0, first.stderr
    proc = nbt.popen("nbproxy", "--watch", "--ssh-config", str(config), "--interval", "1", "--timeout", "8", *alive)
    url = read_line(proc, 90).strip()
    if not url.startswith("http://127.0.0.1:"):
        code, out, err = finish(proc, signal.SIGTERM)
        raise AssertionError(f"--watch printed no URL: exit {code}, stdout {url + out!r}, stderr:\n{err}")
    assert url == first.stdout.strip()
    assert api_status(url) == 200
    return proc, url


def link_test(nbt, remote, break_link, outage: float) -> str:
    """Watch through a proxy, break the link for OUTAGE seconds, restore it; return --watch's stderr."""
    proxy = TcpProxy((remote.ip, remote.port))
    config = proxy_config(nbt, remote, proxy)
    try:
        proc, url = watch_through(nbt, proxy, config)
        pids = jupyter_pids(remote)
        before = remote.auth_count()
        break_link(proxy)
        wait_until(lambda: api_status(url, timeout=2) != 200, 30, message="link down")
        time.sleep(outage)
        proxy.restore()
        wait_watched(proc, lambda: api_status(url, timeout=3) == 200, 90, "link back")
        # --watch says what it repaired once its own check through the new forward has
        # passed, a moment after the forward first answers: give it that moment.
        time.sleep(3)
        assert jupyter_pids(remote) == pids  # the server just kept running
        assert remote.auth_count() > before  # it reconnected
        assert len(masters(config)) == 1 and len(forwards(config, proc)) == 1
        assert proc.poll() is None
        code, _, err = finish(proc)
        assert code == 0, err
        done = nbt.run("nbproxy", "--terminate", "--ssh-config", str(config))
        assert done.returncode == 0, done.stderr
        wait_until(lambda: not jupyter_pids(remote), 30, message="terminated")
        assert not masters(config)
        return err
    finally:
        proxy.cut()


def test_link_dropped_and_restored_under_watch(nbt, remote):
    """The host vanishes (connections reset, nothing listening), then comes back."""
    err = link_test(nbt, remote, TcpProxy.cut, outage=6)
    assert "the connection to nbproxy is down; reconnecting" in err
    assert "cannot reach nbproxy" in err and "trying again in" in err


def test_link_stalled_and_restored_under_watch(nbt, remote):
    """Packets stop flowing but nothing is closed (a dead Wi-Fi, a suspended laptop)."""
    # Longer than one connection attempt may take (--timeout 8): the first attempts fail.
    err = link_test(nbt, remote, TcpProxy.stall, outage=20)
    assert "cannot reach nbproxy" in err and "trying again in" in err, err
    assert "reopened the tunnel to nbproxy (session nbtunnel)" in err, err


# Races ########################################################################

SQUATTER = """#!/usr/bin/python3
# Takes the port Jupyter was told to use just before Jupyter starts, LIMIT times.
import os, signal, socket, sys, time
limit, args = int(sys.argv[1]), sys.argv[2:]
port = [int(a.split("=", 1)[1]) for a in args if a.startswith("--port=")][0]
count = os.path.expanduser("~/squat-count")
done = int(open(count).read()) if os.path.exists(count) else 0
if done < limit:
    open(count, "w").write(str(done + 1))
    s = socket.socket()
    s.bind(("127.0.0.1", port))
    s.listen(1)
    if os.fork() == 0:
        os.setsid()
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        time.sleep(60)
        os._exit(0)
    s.close()
os.execv("{jupyter}", ["{jupyter}", "server"] + args)
"""


def squatter(remote):
    path = remote.home / "squatter"
    path.write_text(SQUATTER.replace("{jupyter}", str(remote.jupyter_venv / "bin" / "jupyter")))
    os.chown(path, remote.uid, remote.uid)
    path.chmod(0o755)
    (remote.home / "squat-count").unlink(missing_ok=True)
    return path


def kill_squatters(remote):
    for pid in remote.pids(r"squatter"):
        os.kill(pid, 9)


def test_remote_port_taken_between_discovery_and_launch(nbt, remote):
    path = squatter(remote)
    try:
        proc = ensure(nbt, "--jupyter", f"{path} 1", "--app", "server")
        assert proc.returncode == 0, proc.stderr
        assert (remote.home / "squat-count").read_text() == "1"  # the first port really was taken
        url = proc.stdout.strip().rsplit(": ", 1)[1]
        assert api_status(url) == 200
        info = nbt.status()[0]
        assert_single(nbt, remote, info)
    finally:
        kill_squatters(remote)


def test_remote_port_taken_every_time_is_a_clear_error(nbt, remote):
    path = squatter(remote)
    try:
        proc = ensure(nbt, "--jupyter", f"{path} 99", "--app", "server")
        assert proc.returncode == 1
        assert proc.stderr.splitlines() == [
            f"nbtunnel: error: {remote.alias}: the remote port was taken each time Jupyter started"
        ]
        assert not jupyter_pids(remote) and remote.tmux_sessions() == []
        assert not masters(nbt.ssh_config) and nbt.status() == []
    finally:
        kill_squatters(remote)


# What an exiting tmux server does to a client that connects in its last moments: its
# socket still listens, so connect() succeeds, but the server no longer answers and its
# exit closes the connection (tmux 3.3: "server exited unexpectedly"); after that the
# socket file stays, refusing connections, and the next client starts a new server.
# This listener, on the remote user's default tmux socket, does the same to every client
# until it has turned away a new-session, then stops listening: that start always meets
# the dying server. It prints the tmux command of each client it turned away.
DYING_TMUX = """
import os, socket, struct, sys
path = sys.argv[1]
os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
if os.path.exists(path):
    os.unlink(path)
s = socket.socket(socket.AF_UNIX)
s.bind(path)
s.listen(16)
print("listening", flush=True)
while True:
    conn = s.accept()[0]
    pid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
    argv = open("/proc/%d/cmdline" % pid, "rb").read().split(b"\\0")
    conn.close()
    print(argv[1].decode() if len(argv) > 1 else "?", flush=True)
    if b"new-session" in argv:
        break
s.close()
"""


def dying_tmux_server(remote) -> subprocess.Popen:
    """The listener above on the remote user's tmux socket, in the remote's namespace."""
    path = f"/tmp/tmux-{remote.uid}/default"
    argv = ["runuser", "-u", remote.user, "--", "/usr/bin/python3", "-c", DYING_TMUX, path]
    proc = subprocess.Popen(remote._in_netns(argv), stdout=subprocess.PIPE, text=True, cwd="/")
    assert read_line(proc, 30) == "listening\n"
    return proc


def test_start_meets_a_tmux_server_that_is_exiting(nbt, remote):
    """The tmux server of a session that just ended (Jupyter died, --terminate, the port
    taken) is still exiting when the next start runs: the start waits until it is gone and
    starts a new one, instead of failing with tmux's "server exited unexpectedly"."""
    fake = dying_tmux_server(remote)
    try:
        proc = nbt.run(remote.alias, "--json")
        turned_away = fake.communicate(timeout=30)[0].split()
        assert "new-session" in turned_away, turned_away  # the start did meet it
        assert proc.returncode == 0, proc.stderr
        assert_single(nbt, remote, json.loads(proc.stdout))
    finally:
        if fake.poll() is None:
            fake.kill()
            fake.wait()


def test_two_ensure_runs_at_once(nbt, remote):
    procs = [nbt.popen(remote.alias, "--ensure") for _ in range(2)]
    results = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    lines = sorted(out for out, _ in results)
    assert lines[0] == "" and lines[1].startswith("started Jupyter")  # one started it, the other found it well
    url = lines[1].strip().rsplit(": ", 1)[1]
    assert_single(nbt, remote, nbt.status()[0])
    assert nbt.status()[0]["url"] == url


def test_two_ensure_runs_at_once_from_two_machines(nbt, remote):
    """Two state directories (two laptops): one server, a tunnel each."""
    other = nbt.tmp / "other-state"
    procs = [
        nbt.popen(remote.alias, "--ensure", "--json"),
        nbt.popen(remote.alias, "--ensure", "--json", "--state-dir", str(other)),
    ]
    results = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    data = [json.loads(out) for out, _ in results]
    assert len(jupyter_pids(remote)) == 1 and remote.tmux_sessions() == ["nbtunnel"]
    assert data[0]["token"] == data[1]["token"] and data[0]["local_port"] != data[1]["local_port"]
    kinds = sorted(d["repairs"][0].split(" ")[0] for d in data)
    assert kinds == ["reattached", "started"], data
    for d in data:
        assert api_status(d["url"]) == 200
    assert len(masters(nbt.ssh_config)) == 2
    nbt.run(remote.alias, "--terminate", "--state-dir", str(other))


# Local state ##################################################################


def test_state_file_deleted(nbt, remote):
    info = start(nbt)
    record_file(nbt).unlink()
    proc = ensure(nbt)
    assert proc.returncode == 0, proc.stderr
    # The remote still runs the server and the tunnel still holds its forward: both are found again.
    assert proc.stdout == f"reattached to Jupyter already running on {remote.alias} (session nbtunnel): {info['url']}\n"
    assert_single(nbt, remote, info)
    assert ensure(nbt).stdout == ""  # recorded again: all is well


def test_state_file_corrupted(nbt, remote):
    info = start(nbt)
    kill_masters(nbt.ssh_config)
    wait_until(lambda: not local_port_open(info["local_port"]), 15, message="tunnel closed")
    record_file(nbt).write_text('{"host": "nbtest", "sess')
    proc = ensure(nbt, "--json")
    assert proc.returncode == 0, proc.stderr
    assert "ignoring unreadable record" in proc.stderr
    data = json.loads(proc.stdout)
    assert data["repairs"][0].startswith("reattached to Jupyter already running")
    assert data["token"] == info["token"]  # from what the remote says
    assert_single(nbt, remote, data)
    json.loads(record_file(nbt).read_text())  # rewritten whole
    again = ensure(nbt)
    assert again.returncode == 0 and again.stdout == "" and again.stderr == ""


def test_state_file_deleted_without_host_is_a_clear_error(nbt, remote):
    start(nbt)
    record_file(nbt).unlink()
    proc = nbt.run("--ensure")
    assert proc.returncode == 2
    assert "no HOST given" in proc.stderr and "nothing is recorded" in proc.stderr
    assert len(jupyter_pids(remote)) == 1  # nothing was touched
    assert nbt.run(remote.alias, "--terminate").returncode == 0


def test_sigterm_while_reconnecting_leaves_nothing(nbt, remote):
    """--watch stopped while the host is unreachable: it exits promptly and cleanly."""
    proxy = TcpProxy((remote.ip, remote.port))
    config = proxy_config(nbt, remote, proxy)
    try:
        proc, url = watch_through(nbt, proxy, config)
        proxy.cut()
        wait_until(lambda: not masters(config), 30, message="master gone")
        time.sleep(3)  # in its backoff now
        t0 = time.monotonic()
        code, _, err = finish(proc, signal.SIGTERM)
        assert code == 0, err
        assert time.monotonic() - t0 < 10
        assert not masters(config)
        assert len(jupyter_pids(remote)) == 1  # the server keeps running
        proxy.restore()
        done = nbt.run("nbproxy", "--terminate", "--ssh-config", str(config))
        assert done.returncode == 0, done.stderr
    finally:
        proxy.cut()
