"""Attacks by another user of the same machines, reproduced for real.

A second unprivileged account on the remote side (``nbx<pid>r``, run inside the
remote's network namespace, as another user of the same login node) and one on
the laptop side (``nbx<pid>l``) try what a co-user can: connect to 127.0.0.1
ports, bind a port the moment it is freed, read files, plant files and symlinks,
read ``ps``.  Each test asserts that no token reaches the attacker and that
nothing the attacker planted runs.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

from conftest import NBTUNNEL, RemoteHost
from helpers import api_status, kill_pids, local_port_open, pid_alive, wait_until
from intruders import SYSTEM_PYTHON, Account, reap_stale_accounts
from unattended import ensure, jupyter_pids, kill_masters, masters, start

CANARY = Path(tempfile.gettempdir()) / f"nbx-pwned-{os.getpid()}"


@pytest.fixture(scope="module")
def intruders(remote: RemoteHost):
    """(remote co-user, local co-user): real accounts, removed at the end."""
    reap_stale_accounts()
    made = []
    try:
        made.append(Account("r"))
        made.append(Account("l"))
        yield made[0], made[1]
    finally:
        for account in made:
            account.remove()


@pytest.fixture(autouse=True)
def no_canary():
    """Nothing a test planted may ever run: the canary file must never appear."""
    CANARY.unlink(missing_ok=True)
    yield
    assert not CANARY.exists(), f"{CANARY} was created: planted code ran"


def token_of(url: str) -> str:
    return parse_qs(urlparse(url).query)["token"][0]


def record_path(nbt, session: str = "nbtunnel") -> Path:
    import nbtunnel

    return nbt.state_dir / nbtunnel.record_name(nbt.remote.alias, session)


def no_traceback(proc) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr


# The remote co-user ###########################################################

READ_PROBE = r"""
import glob, json, os, socket, sys
home, rport = sys.argv[1], int(sys.argv[2])
token = sys.stdin.readline().strip()  # not on this probe's own argv
out = {}
for path in [home + "/.local/share/jupyter/runtime", home + "/.local/state/nbtunnel"] + \
        glob.glob(home + "/.local/share/jupyter/runtime/*") + glob.glob(home + "/.local/state/nbtunnel/*"):
    try:
        if os.path.isdir(path):
            os.listdir(path)
        else:
            open(path).read()
        out[path] = "read"
    except OSError as e:
        out[path] = type(e).__name__
uid = int(sys.argv[3])
for sock in glob.glob("/tmp/tmux-%d/*" % uid) + ["/tmp/tmux-%d/default" % uid]:
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(sock)
        out[sock] = "connected"
    except OSError as e:
        out[sock] = type(e).__name__
seen = []
for pid in os.listdir("/proc"):
    for what in ("cmdline", "environ"):
        try:
            data = open("/proc/%s/%s" % (pid, what), "rb").read()
        except OSError:
            continue
        if token.encode() in data:
            seen.append("%s/%s" % (pid, what))
out["token_in_proc"] = seen
import urllib.request, urllib.error
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
for path in ("/api/status", "/api/kernels", "/api/contents"):
    try:
        out[path] = opener.open("http://127.0.0.1:%d%s" % (rport, path), timeout=10).status
    except urllib.error.HTTPError as e:
        out[path] = e.code
    except OSError as e:
        out[path] = type(e).__name__
print(json.dumps(out))
"""


def test_remote_co_user_gets_403_and_reads_nothing(nbt, remote, intruders):
    hostile, _ = intruders
    info = start(nbt)
    token = info["token"]
    proc = hostile.run([SYSTEM_PYTHON, "-c", READ_PROBE, str(remote.home), str(info["remote_port"]),
                        str(remote.uid)], netns=remote.netns, input=token + "\n")
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout)
    # Jupyter is there (it answers) but without the token it refuses everything.
    assert seen["/api/status"] == 403 and seen["/api/kernels"] == 403 and seen["/api/contents"] == 403
    assert seen["token_in_proc"] == [], "the token is visible to another user in /proc"
    # (The home itself is listable: Debian makes homes 0755. What is inside is not.)
    files = {k: v for k, v in seen.items() if k.startswith("/")}
    assert any("tmux" in k for k in files)
    readable = [k for k, v in files.items() if v in ("read", "connected")]
    assert readable == [], f"another user can read or connect to {readable}"
    # The server still answers its owner: the probe changed nothing.
    assert api_status(info["url"]) == 200


# The local co-user ############################################################


def test_local_squatter_on_the_tunnel_port_gets_no_token(nbt, remote, intruders):
    _, local = intruders
    info = start(nbt)
    token = info["token"]
    kill_masters(nbt.ssh_config)
    wait_until(lambda: not local_port_open(info["local_port"]), 15, message="tunnel closed")
    captor = local.captor(info["local_port"])
    try:
        assert captor.wait_ready(), "the local co-user could not bind the freed port"
        proc = ensure(nbt, "--json")
        no_traceback(proc)
        assert token.encode() not in captor.received(), "the token was sent to the squatter"
        assert proc.returncode == 0, proc.stderr
        data = json.loads(proc.stdout)
        assert data["local_port"] != info["local_port"]
        assert len(data["repairs"]) == 1 and f"local port {info['local_port']} was taken" in data["repairs"][0]
        assert api_status(data["url"]) == 200
        # And again, now healthy: silent, and the squatter still got nothing.
        again = ensure(nbt)
        assert again.returncode == 0 and again.stdout == "", again.stderr
        assert token.encode() not in captor.received()
    finally:
        captor.stop()


def test_same_user_process_on_the_port_is_not_taken_for_the_tunnel(nbt, remote):
    """Even a process of ours that is not the recorded master does not count as the tunnel."""
    info = start(nbt)
    kill_masters(nbt.ssh_config)
    wait_until(lambda: not local_port_open(info["local_port"]), 15, message="tunnel closed")
    import socket
    import threading

    got = []
    server = socket.socket()
    server.bind(("127.0.0.1", info["local_port"]))
    server.listen(4)

    def serve():
        with contextlib.suppress(OSError):
            while True:
                conn, _ = server.accept()
                got.append(conn.recv(65536))
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
                conn.close()

    threading.Thread(target=serve, daemon=True).start()
    try:
        proc = ensure(nbt)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith("reopened the tunnel"), proc.stdout
        assert not any(info["token"].encode() in g for g in got)
    finally:
        server.close()


# Planted local state ##########################################################


def test_planted_symlinks_in_the_state_dir_are_not_followed(nbt, remote, intruders):
    _, local = intruders
    import nbtunnel

    nbt.state_dir.mkdir(mode=0o700)
    loot = local.home / "loot.json"
    loot.write_text("")
    os.chown(loot, local.uid, local.gid)
    loot.chmod(0o666)
    lock_target = local.home / "lock-target"
    record_path(nbt).symlink_to(loot)
    lock = nbt.state_dir / ("." + nbtunnel.record_name(remote.alias, "nbtunnel")[:-5] + ".lock")
    lock.symlink_to(lock_target)
    proc = nbt.run(remote.alias, "--json")
    assert proc.returncode == 0, proc.stderr
    token = json.loads(proc.stdout)["token"]
    assert "symbolic link" in proc.stderr
    assert loot.read_text() == "" and not lock_target.exists()
    assert not record_path(nbt).is_symlink() and not lock.is_symlink()
    mode = record_path(nbt).stat().st_mode
    assert stat.S_IMODE(mode) == 0o600 and token in record_path(nbt).read_text()
    for path in nbt.state_dir.iterdir():
        assert stat.S_IMODE(path.lstat().st_mode) & 0o077 == 0, path


@pytest.mark.parametrize("mode", [0o770, 0o707, 0o1777])
def test_state_dir_writable_by_others_is_refused_not_chmodded(nbt, remote, mode):
    nbt.state_dir.mkdir()
    nbt.state_dir.chmod(mode)
    evil = dict(host=remote.alias, session="nbtunnel", token="x" * 32, local_port=1, remote_port=2,
                ssh_options=["-o", f"ProxyCommand=touch {CANARY}"], socket="")
    record_path(nbt).write_text(json.dumps(evil))
    for args in (["--status"], [remote.alias, "--ensure"], ["--terminate"], [remote.alias]):
        proc = nbt.run(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert "writable by group or others" in proc.stderr and "chmod 700" in proc.stderr
        no_traceback(proc)
    assert stat.S_IMODE(nbt.state_dir.stat().st_mode) == mode


def test_state_dir_of_another_user_or_a_symlink_is_refused(nbt, remote, intruders):
    _, local = intruders
    theirs = local.home / "state"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, local.uid, local.gid)
    proc = nbt.run("--status", "--state-dir", str(theirs))
    assert proc.returncode == 2 and f"belongs to uid {local.uid}" in proc.stderr, proc.stderr
    link = nbt.tmp / "link"
    private = nbt.tmp / "private"
    private.mkdir(mode=0o700)
    link.symlink_to(private)
    proc = nbt.run("--status", "--state-dir", str(link))
    assert proc.returncode == 2 and "symbolic link" in proc.stderr, proc.stderr
    no_traceback(proc)


def test_state_dir_tmp_is_refused_and_tmp_keeps_its_mode(nbt):
    before = os.stat("/tmp")
    proc = nbt.run("--status", "--state-dir", "/tmp")
    assert proc.returncode == 2 and "writable by group or others" in proc.stderr, proc.stderr
    after = os.stat("/tmp")
    assert (after.st_mode, after.st_uid) == (before.st_mode, before.st_uid)
    assert stat.S_IMODE(after.st_mode) == 0o1777


def test_state_dir_that_cannot_be_created_is_a_clear_error(nbt):
    for bad in ("/proc/nbtunnel-state", "/dev/null/state"):
        proc = nbt.run("--status", "--state-dir", bad)
        assert proc.returncode == 2 and "cannot create state directory" in proc.stderr, proc.stderr
        no_traceback(proc)


def test_missing_state_dir_is_made_private_with_its_parents(nbt):
    deep = nbt.tmp / "a" / "b" / "state"
    proc = nbt.run("--status", "--state-dir", str(deep))
    assert proc.returncode == 0, proc.stderr
    assert stat.S_IMODE(deep.stat().st_mode) == 0o700


def test_record_planted_by_another_user_is_ignored(nbt, remote, intruders):
    _, local = intruders
    nbt.state_dir.mkdir(mode=0o700)
    evil = dict(host=remote.alias, session="nbtunnel", token="x" * 32, local_port=1, remote_port=2,
                url="http://127.0.0.1:1/", ssh_options=["-o", f"ProxyCommand=touch {CANARY}"],
                socket="", listener=dict(pid=1, start=None))
    path = record_path(nbt)
    path.write_text(json.dumps(evil))
    os.chown(path, local.uid, local.gid)
    path.chmod(0o600)
    proc = nbt.run("--status", "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout) == [], proc.stderr
    assert f"belongs to uid {local.uid}" in proc.stderr
    # Without HOST nothing is recorded: the planted record does not name one.
    proc = nbt.run("--ensure")
    assert proc.returncode == 2 and "nothing is recorded" in proc.stderr, proc.stderr
    # A real run replaces it with a record of our own, made with our options only.
    proc = nbt.run(remote.alias, "--json")
    assert proc.returncode == 0, proc.stderr
    assert path.stat().st_uid == os.geteuid()
    assert "ProxyCommand" not in path.read_text()


def test_control_dir_squatted_in_tmp_falls_back_to_a_private_one(nbt, remote, intruders):
    """Run nbtunnel as a local user whose /tmp/nbtunnel-UID another user made first (cron:
    no XDG_RUNTIME_DIR): it still works, and later runs find the same sockets."""
    _, local = intruders
    victim = Account("v")
    squatted = Path(f"/tmp/nbtunnel-{victim.uid}")
    try:
        squatted.mkdir(mode=0o777)
        squatted.chmod(0o777)
        os.chown(squatted, local.uid, local.gid)
        # The victim's own copy of the key and ssh config (ssh insists they are its own).
        keys = victim.home / ".ssh"
        keys.mkdir(mode=0o700)
        shutil.copy(remote.identity, keys / "id")
        shutil.copy(remote.known_hosts, keys / "known_hosts")
        config = remote.ssh_config.read_text().replace(str(remote.identity), str(keys / "id"))
        config = config.replace(str(remote.known_hosts), str(keys / "known_hosts"))
        (keys / "config").write_text(config)
        shutil.copy(NBTUNNEL, victim.home / "nbtunnel.py")
        subprocess.run(["chown", "-R", f"{victim.uid}:{victim.gid}", str(victim.home)], check=True)
        (keys / "id").chmod(0o600)
        base = [SYSTEM_PYTHON, str(victim.home / "nbtunnel.py"), "--ssh-config", str(keys / "config")]
        proc = victim.run([*base, remote.alias, "--json"], timeout=120)
        assert proc.returncode == 0, proc.stderr
        info = json.loads(proc.stdout)
        assert f"not using {squatted}" in proc.stderr
        assert api_status(info["url"]) == 200
        assert not any(squatted.iterdir())
        rec = json.loads(next((victim.home / ".local/state/nbtunnel").glob("*.json")).read_text())
        sockdir = Path(rec["socket"]).parent
        st = sockdir.lstat()
        assert st.st_uid == victim.uid and stat.S_IMODE(st.st_mode) == 0o700 and sockdir != squatted
        # A later run (cron) finds the same master: healthy, silent, no new connection.
        logins = remote.auth_count()
        proc = victim.run([*base, remote.alias, "--ensure"], timeout=120)
        assert proc.returncode == 0 and proc.stdout == "", proc.stderr
        proc = victim.run([*base, remote.alias, "--status", "--json"], timeout=120)
        assert proc.returncode == 0 and json.loads(proc.stdout)[0]["tunnel"] == "up", proc.stderr
        proc = victim.run([*base, remote.alias, "--terminate"], timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert not local_port_open(info["local_port"])
        assert remote.auth_count() - logins <= 2  # status and terminate, never a second master
    finally:
        victim.remove()
        shutil.rmtree(squatted, ignore_errors=True)


def test_control_dir_candidates_are_deterministic_and_short():
    import nbtunnel

    first, second = nbtunnel.control_dir_candidates(), nbtunnel.control_dir_candidates()
    assert first == second and first
    assert all(len(p) <= nbtunnel.CONTROL_DIR_MAX for p in first)
    # The socket ssh binds while it starts is longer still: "<dir>/<16 hex>.<16 random>".
    assert nbtunnel.CONTROL_DIR_MAX + 1 + 16 + 17 < 104


# --open and -v ################################################################


def test_open_gives_the_browser_a_private_file_not_the_token(nbt, remote):
    record = nbt.tmp / "browser"
    record.mkdir()
    script = nbt.tmp / "browser.py"
    script.write_text(
        f"#!{SYSTEM_PYTHON}\n"
        "import os, shutil, sys, urllib.parse\n"
        f"rec = {str(record)!r}\n"
        "open(rec + '/argv', 'w').write('\\n'.join(sys.argv[1:]))\n"
        "f = urllib.parse.unquote(urllib.parse.urlparse(sys.argv[1]).path)\n"
        "shutil.copy(f, rec + '/page')\n"
        "open(rec + '/mode', 'w').write('%o' % (os.stat(f).st_mode & 0o777))\n"
        "open(rec + '/dirmode', 'w').write('%o' % (os.stat(os.path.dirname(f)).st_mode & 0o777))\n"
    )
    script.chmod(0o755)
    proc = nbt.run(remote.alias, "--open", env={"BROWSER": str(script)})
    assert proc.returncode == 0, proc.stderr
    url = proc.stdout.strip()
    argv = (record / "argv").read_text()
    assert token_of(url) not in argv
    assert argv.startswith("file:///") and argv.strip().endswith(".html"), argv
    assert (record / "mode").read_text().strip() == "600"
    assert (record / "dirmode").read_text().strip() == "700"
    page = (record / "page").read_text()
    assert f'content="0;url={url}"' in page and f'href="{url}"' in page


def test_verbose_output_never_shows_the_token(nbt, remote):
    proc = nbt.run(remote.alias, "-v", "--json")
    assert proc.returncode == 0, proc.stderr
    token = json.loads(proc.stdout)["token"]
    assert "+ ssh" in proc.stderr  # -v does show the commands
    runs = [proc]
    runs.append(nbt.run(remote.alias, "-v"))
    kill_masters(nbt.ssh_config)
    runs.append(nbt.run(remote.alias, "-v", "--ensure"))
    runs.append(nbt.run(remote.alias, "-v", "--status"))
    runs.append(nbt.run(remote.alias, "-v", "--print-nginx"))
    runs.append(nbt.run(remote.alias, "-v", "--terminate"))
    for run in runs:
        assert run.returncode == 0, run.stderr
        assert token not in run.stderr, run.stderr


def test_token_is_on_no_local_argv(nbt, remote):
    """Sample every process's argv while a start and an ensure run."""
    info = start(nbt)
    kill_masters(nbt.ssh_config)
    seen: set[str] = set()
    proc = nbt.popen(remote.alias, "--ensure")
    while proc.poll() is None:
        for pid in os.listdir("/proc"):
            with contextlib.suppress(OSError):
                seen.add(Path(f"/proc/{pid}/cmdline").read_bytes().decode("utf-8", "replace"))
        time.sleep(0.005)
    assert proc.returncode == 0, proc.stderr.read()
    assert any("-O\0forward" in argv or "-M" in argv for argv in seen), "the sampling saw no ssh"
    assert not [a for a in seen if info["token"] in a]


# Host keys ####################################################################


def test_unknown_host_key_fails_with_its_fingerprint_and_the_fix(nbt, remote):
    proc = nbt.run(remote.unknown_alias)
    assert proc.returncode == 1, proc.stderr
    finger = subprocess.run(["ssh-keygen", "-lf", f"{remote.host_key}.pub"], capture_output=True,
                            text=True, check=True).stdout.split()[1]
    assert f"ED25519 key fingerprint is {finger}" in proc.stderr, proc.stderr
    assert "--accept-new" in proc.stderr and "ssh-keyscan" in proc.stderr
    assert not masters(nbt.ssh_config)


@pytest.fixture
def changed_key_config(nbt, remote):
    """An ssh config whose known_hosts holds ANOTHER key for the remote's address."""
    other = nbt.tmp / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    known = nbt.tmp / "known_hosts_changed"
    address = remote.ip if remote.port == 22 else f"[{remote.ip}]:{remote.port}"
    known.write_text(f"{address} {' '.join(Path(f'{other}.pub').read_text().split()[:2])}\n")
    text = remote.ssh_config.read_text().replace(str(remote.known_hosts), str(known))
    config = nbt.tmp / "ssh_config_changed"
    config.write_text(text)
    no_config = nbt.tmp / "ssh_config_changed_no"
    no_config.write_text(text.replace("StrictHostKeyChecking yes", "StrictHostKeyChecking no"))
    return config, no_config


@pytest.mark.parametrize("how", ["plain", "--accept-new", "-o no", "-o off", "config no"])
def test_changed_host_key_always_fails(nbt, remote, changed_key_config, how):
    config, no_config = changed_key_config
    extra = {"plain": [], "--accept-new": ["--accept-new"],
             "-o no": ["-o", "StrictHostKeyChecking=no"], "-o off": ["-o", "stricthostkeychecking off"],
             "config no": []}[how]
    before = remote.auth_count()
    proc = nbt.run(remote.alias, "--ssh-config", str(no_config if how == "config no" else config), *extra)
    assert proc.returncode == 1, proc.stderr
    assert "has CHANGED" in proc.stderr, proc.stderr
    assert remote.tmux_sessions() == [] and jupyter_pids(remote) == []
    assert not masters(config) and not masters(no_config)
    assert not list(nbt.state_dir.glob("*.json"))
    if how != "config no":  # "no" from a config file is caught only after ssh logged in
        assert remote.auth_count() == before


# Remote squat and a reused pid (the remote side checks pid and port) ##########


def test_remote_squatter_on_the_server_port_gets_no_token(nbt, remote, intruders):
    hostile, _ = intruders
    info = start(nbt)
    token = info["token"]
    pids = jupyter_pids(remote)
    kill_pids(pids)
    captor = None
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:  # bind the moment it is free
        captor = hostile.captor(info["remote_port"], netns=remote.netns)
        if captor.wait_ready():
            break
        captor.stop()
        captor = None
    assert captor is not None, "the remote co-user could not bind the freed port"
    try:
        proc = ensure(nbt, "--json")
        no_traceback(proc)
        assert token.encode() not in captor.received(), "the token was sent to the squatter"
        assert proc.returncode in (0, 1), proc.stderr
        if proc.returncode == 0:
            data = json.loads(proc.stdout)
            assert data["repairs"], "the squatted port was reported healthy"
            assert data["remote_port"] != info["remote_port"]
    finally:
        captor.stop()


def test_reused_pid_of_another_user_is_not_reattached(nbt, remote, intruders):
    hostile, _ = intruders
    info = start(nbt)
    token = info["token"]
    state = remote.home / ".local/state/nbtunnel/nbtunnel.json"
    recorded = json.loads(state.read_text())
    for pid in jupyter_pids(remote):  # the server dies hard: its runtime file stays
        os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not jupyter_pids(remote), 15, message="server gone")
    wait_until(lambda: not remote.port_open(info["remote_port"]), 15, message="port freed")
    # Another user's process, named like Jupyter, now has the old pid and the old port.
    captor = hostile.captor(info["remote_port"], netns=remote.netns, name="jupyter-lab")
    try:
        assert captor.wait_ready()
        child = [p for p in _children(captor.proc.pid) if "jupyter-lab" in _cmdline(p)]
        assert child, "no hostile process found"
        recorded["pid"] = child[0]
        state.write_text(json.dumps(recorded))
        proc = nbt.run(remote.alias, "--json")
        no_traceback(proc)
        assert token.encode() not in captor.received(), "the token was sent to the other user"
        if proc.returncode == 0:
            data = json.loads(proc.stdout)
            assert data["reused"] is False and api_status(data["url"]) == 200
        terminate = nbt.run(remote.alias, "--terminate", "--force")
        no_traceback(terminate)
        assert token.encode() not in captor.received()
        assert pid_alive(child[0]), "nbtunnel signalled another user's process"
    finally:
        captor.stop()


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _children(pid: int) -> list[int]:
    found = [pid]
    for p in os.listdir("/proc"):
        if p.isdigit():
            with contextlib.suppress(OSError, IndexError):
                if int(Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[1]) in found:
                    found.append(int(p))
    return found


# Fuzz #########################################################################

PAYLOADS = [
    f"$(touch {CANARY})",
    f"`touch {CANARY}`",
    f"x;touch {CANARY}",
    f"x' ; touch {CANARY} ; '",
    f'x" ; touch {CANARY} ; "',
    f"x\ntouch {CANARY}",
    f"x\rtouch {CANARY}\x1b[2K",
    f"x\x00touch {CANARY}",
    f"%d/%h/%r/$(touch {CANARY})",
    f"-oProxyCommand=touch {CANARY}",
    f"--rc=$(touch {CANARY})",
    "\x7f\x01\x02\t",
    "a" * 5000,
    "%" * 300,
    "",
    " ",
    "-",
    "..",
    "é\u202e\ufeff目录",
    "inf",
    "nan",
    "-1",
    "0",
    "65536",
    os.fsdecode(b"\xff\xfe-$(touch " + os.fsencode(str(CANARY)) + b")"),
]
OPTIONS = ["--session", "--notebook-dir", "--jupyter", "--rc", "--setup", "-o", "-J", "-i",
           "--ssh-config", "--state-dir", "--local-port", "--remote-port", "--timeout", "--manager",
           "--app", "--tunnel", "--plugin", "--nginx-listen", "--interval"]
CONFIG_KEYS = ["session", "notebook-dir", "jupyter", "rc", "setup", "ssh-option", "jump", "identity",
               "ssh-config", "state-dir", "local-port", "remote-port", "timeout", "manager", "tunnel",
               "app", "host", "accept-new", "nginx-listen"]


def _main(argv: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    """Run nbtunnel.main(argv) in this process with ENV; (code, stdout, stderr or traceback)."""
    import traceback

    import nbtunnel

    out, err = io.StringIO(), io.StringIO()
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = nbtunnel.main(argv)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 2
            except Exception:
                return -1, out.getvalue(), err.getvalue() + traceback.format_exc()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for h in list(nbtunnel.log.handlers):
            nbtunnel.log.removeHandler(h)
    return code, out.getvalue(), err.getvalue()


def test_fuzz_hostile_values_never_run_and_never_crash(nbt, remote, monkeypatch):
    """Every option and config key that reaches ssh or the remote, fed hostile values:
    a clean exit 0/1/2 each time, no traceback, and the canary never appears.  The host is
    the down alias (connection refused at once), so each run is quick; a last few values
    go to the real remote, where they must be used literally or refused."""
    cwd = nbt.tmp / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # a --state-dir value is made relative to here
    env = dict(XDG_STATE_HOME=str(nbt.tmp / "xdg-state"), XDG_CONFIG_HOME=str(nbt.tmp / "xdg-config"),
               NBTUNNEL_CONFIG=str(nbt.tmp / "none.ini"))
    base = ["--ssh-config", str(remote.ssh_config), "--state-dir", str(nbt.state_dir), "--timeout", "5"]
    problems, runs = [], 0
    t0 = time.monotonic()

    def check(what: str, code: int, err: str) -> None:
        nonlocal runs
        runs += 1
        if code not in (0, 1, 2) or "Traceback" in err:
            problems.append(f"{what[:80]}: exit {code}: {err.strip()}")
        assert not CANARY.exists(), f"{what} ran planted code"

    chosen = [(o, v) for i, o in enumerate(OPTIONS) for j, v in enumerate(PAYLOADS) if (i + j) % 4 == 0]
    chosen += [(o, v) for o in ("--timeout", "--interval", "--local-port", "--remote-port", "--state-dir")
               for v in ("inf", "nan", "0", PAYLOADS[19])]
    for option, value in dict.fromkeys(chosen):  # a deterministic quarter, and the numbers
        argv = [*base, remote.down_alias, option, value]
        if option == "--ssh-config":
            argv = [*base[2:], remote.down_alias, option, value]
        code, _, err = _main(argv, env)
        check(f"{option} {value[:40]!r}", code, err)
    config = nbt.tmp / "fuzz.ini"
    for i, key in enumerate(CONFIG_KEYS):
        for j, value in enumerate(PAYLOADS):
            if ((i + j) % 5 and value not in ("inf", "nan")) or "\x00" in value or "\r" in value:
                continue  # the INI file cannot hold a NUL; configparser splits on newlines
            config.write_text(f"[DEFAULT]\n{key} = {value.replace(chr(10), chr(10) + '  ')}\n",
                              errors="surrogateescape")
            code, _, err = _main([*base, "--config", str(config), remote.down_alias], env)
            check(f"config {key} = {value[:40]!r}", code, err)
    # A few through the real remote, in one process each (sent as data, used literally).
    # (--setup is code by contract, "run as you wrote it": it is fuzzed only up to ssh.)
    for option in ("--notebook-dir", "--rc", "--jupyter"):
        for value in (PAYLOADS[0], PAYLOADS[3]):
            proc = nbt.run(remote.alias, option, value, timeout=120)
            check(f"remote {option} {value!r}", proc.returncode, proc.stderr)
    elapsed = time.monotonic() - t0
    print(f"fuzz: {runs} runs in {elapsed:.1f}s")
    assert runs >= 100
    Path(os.environ.get("NBX_FUZZ_REPORT", os.devnull)).write_text("\n=====\n".join(problems))
    assert not problems, "\n".join(problems)
    assert remote.tmux_sessions() == []


def test_fuzz_state_dir_values_are_made_literally_or_refused(nbt, monkeypatch):
    cwd = nbt.tmp / "cwd2"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    env = dict(NBTUNNEL_CONFIG=str(nbt.tmp / "none.ini"))
    for value in PAYLOADS:
        code, _, err = _main(["--status", "--state-dir", value], env)
        assert code in (0, 2) and "Traceback" not in err, (value, code, err)
        if code == 0 and value.strip() not in ("", "-", ".."):
            made = Path(os.path.abspath(value))
            assert made.is_dir() and stat.S_IMODE(made.stat().st_mode) == 0o700, value

