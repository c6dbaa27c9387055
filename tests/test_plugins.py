"""Plugins end to end: session managers (tmux, screen, nohup), plugin discovery and errors."""

from __future__ import annotations

import json
import os
import re
import textwrap
from pathlib import Path
from urllib.parse import urlparse

import pytest

from helpers import (
    api_status,
    free_local_port,
    jupyter_pids,
    kill_jupyter,
    local_port_open,
    local_ssh_pids,
    run_kernel_code,
    start,
    token_of,
    wait_until,
)

REPO = Path(__file__).resolve().parent.parent
MANAGERS = ["tmux", "screen", "nohup"]


def sessions(remote, manager: str) -> list[str]:
    """The remote sessions MANAGER holds; for nohup, the running Jupyter pids."""
    if manager == "tmux":
        return remote.tmux_sessions()
    if manager == "screen":
        remote.run(["screen", "-wipe"])  # forget sockets of screens killed by earlier tests
        return remote.screen_sessions()
    return [str(p) for p in jupyter_pids(remote)]


def session_id(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[3])


def remote_state_files(remote) -> list[str]:
    state = remote.home / ".local/state/nbtunnel"
    return sorted(p.name for p in state.iterdir()) if state.exists() else []


@pytest.mark.parametrize("manager", MANAGERS)
def test_manager_start_reattach_status_terminate(nbt, remote, manager):
    remote.run(["rm", "-rf", str(remote.home / ".local/state/nbtunnel")], check=True)  # other tests' files
    # start
    before = remote.auth_count()
    info = start(nbt, "--manager", manager)
    assert remote.auth_count() - before == 1
    assert info["manager"] == manager and info["reused"] is False
    assert info["plugin"] == ("built-in" if manager == "tmux" else str(REPO / "plugins" / f"{manager}.py"))
    assert api_status(info["url"]) == 200
    port = info["local_port"]
    assert run_kernel_code(f"http://127.0.0.1:{port}", info["token"], "1+1") == "2"
    pids = jupyter_pids(remote)
    assert len(pids) == 1 and pids[0] == info["pid"]
    if manager != "nohup":
        assert sessions(remote, manager) == ["nbtunnel"]
    else:  # its own session (setsid), not a child of the ssh session that started it
        assert session_id(pids[0]) == pids[0]
        assert remote.tmux_sessions() == [] and sessions(remote, "screen") == []

    # reattach: same server, same URL, no new login
    before = remote.auth_count()
    again = start(nbt, "--manager", manager)
    assert again["reused"] is True and again["url"] == info["url"]
    assert remote.auth_count() == before
    assert jupyter_pids(remote) == pids

    # status names the manager and its plugin
    row = nbt.status()[0]
    assert row["server"] == "running" and row["tunnel"] == "up"
    assert row["manager"] == manager and row["plugin"] == info["plugin"]

    # the ssh connection closes (local master killed): the server survives; reattach works
    for pid in local_ssh_pids(str(nbt.ssh_config)):
        os.kill(pid, 9)
    wait_until(lambda: not local_port_open(port), 15, message="tunnel closed")
    wait_until(lambda: not remote.pids(r"^sshd: .*@notty"), 15, message="remote ssh session ended")
    assert jupyter_pids(remote) == pids
    assert nbt.status()[0]["tunnel"] == "down"
    third = start(nbt, "--manager", manager)
    assert third["reused"] is True and third["url"] == info["url"]
    assert api_status(third["url"]) == 200

    # terminate: nothing left behind, here or there
    proc = nbt.run("--terminate")
    assert proc.returncode == 0, proc.stderr
    wait_until(lambda: not jupyter_pids(remote), 15, message="no jupyter left")
    assert sessions(remote, manager) == []
    assert not remote.pids(r"ipykernel|SCREEN|tmux")
    wait_until(lambda: not local_ssh_pids(str(nbt.ssh_config)), 15, message="no local ssh left")
    assert not local_port_open(port) and not remote.port_open(info["remote_port"])
    assert [r["ended"] for r in nbt.status()] == ["terminated"]
    # Only the mark that it ended on purpose is left (the log, lock and output went with it).
    assert remote_state_files(remote) == ["nbtunnel.ended"]
    again = nbt.run(remote.alias, "--terminate", "--manager", manager)
    assert again.returncode == 0, again.stderr


@pytest.mark.parametrize("manager", MANAGERS)
def test_manager_notices_dead_server_and_log(nbt, remote, manager):
    info = start(nbt, "--manager", manager, "--session", "s.1")
    # log(): what the session itself shows, run as the manager describes it
    import nbtunnel

    nbtunnel.load_plugins(nbtunnel.plugin_files())
    desc = nbtunnel.get("manager", manager).describe("s.1")
    state = remote.home / ".local/state/nbtunnel"
    fill = {"@PYTHON@": "/usr/bin/python3", "@PIDFILE@": str(state / "s.1.pid"), "@OUTPUT@": str(state / "s.1.out")}
    argv = [fill.get(w, w) for w in desc["log"]]
    shown = remote.run(argv)
    assert "Jupyter runs in this session" in shown.stdout, (shown.stdout, shown.stderr)
    if desc["alive"] == [nbtunnel.R_PIDFILE_ALIVE]:  # judged by the remote side itself
        check = "\nsys.exit(0 if r_pidfile_alive(sys.argv[1]) else 1)\n"
        source = nbtunnel.remote_source() + check

        def alive_status():
            return remote.run(["/usr/bin/python3", "-", fill["@PIDFILE@"]], input=source).returncode
    else:
        alive = [fill.get(w, w) for w in desc["alive"]]

        def alive_status():
            return remote.run(alive).returncode
    assert alive_status() == 0

    kill_jupyter(remote)
    assert nbt.status()[0]["server"] == "stopped"
    if manager != "tmux":  # tmux's alive is about its session, which ends with the pane
        wait_until(lambda: alive_status() != 0, 15, message="alive() says dead")
    fresh = start(nbt, "--manager", manager, "--session", "s.1")
    assert fresh["reused"] is False and fresh["local_port"] == info["local_port"]
    assert api_status(fresh["url"]) == 200
    assert len(jupyter_pids(remote)) == 1
    assert nbt.run("--terminate", "--session", "s.1").returncode == 0
    wait_until(lambda: not jupyter_pids(remote), 15, message="no jupyter left")
    assert sessions(remote, manager) == []


@pytest.mark.parametrize("manager", ["tmux", "screen"])
def test_foreign_sessions_are_left_alone(nbt, remote, manager):
    """A session nbtunnel did not start, named like ours or with ours as a prefix."""
    if manager == "tmux":
        remote.run(["tmux", "new-session", "-d", "-s", "nbtunnelx", "sleep 600"], check=True)
        remote.run(["tmux", "new-session", "-d", "-s", "mine", "sleep 600"], check=True)
    else:
        remote.run(["screen", "-dmS", "nbtunnelx", "sleep", "600"], check=True)
        remote.run(["screen", "-dmS", "mine", "sleep", "600"], check=True)
    info = start(nbt, "--manager", manager)
    assert api_status(info["url"]) == 200
    assert sorted(sessions(remote, manager)) == ["mine", "nbtunnel", "nbtunnelx"]
    assert nbt.run("--terminate").returncode == 0
    assert sorted(sessions(remote, manager)) == ["mine", "nbtunnelx"]

    # a session called like ours that nbtunnel did not start is not taken over
    proc = nbt.run(remote.alias, "--manager", manager, "--session", "mine")
    assert proc.returncode == 1 and "already exists and was not started by nbtunnel" in proc.stderr
    assert sorted(sessions(remote, manager)) == ["mine", "nbtunnelx"]
    assert not jupyter_pids(remote)
    for name in ("mine", "nbtunnelx"):  # the foreign sessions are the test's own
        if manager == "tmux":
            remote.run(["tmux", "kill-session", "-t", "=" + name], check=True)
        else:
            remote.run(["screen", "-S", name, "-X", "quit"], check=True)
    wait_until(lambda: sessions(remote, manager) == [], 15, message="foreign sessions gone")


def test_verbose_names_the_plugins(nbt, remote):
    proc = nbt.run(remote.alias, "-v", "--manager", "screen")
    assert proc.returncode == 0, proc.stderr
    assert f"manager screen ({REPO / 'plugins' / 'screen.py'})" in proc.stderr
    assert "tunnel ssh (built-in)" in proc.stderr
    status = nbt.run("--status", "-v")
    assert f"served by manager screen ({REPO / 'plugins' / 'screen.py'})" in status.stderr


# Discovery and errors #########################################################

USER_MANAGER = '''
import nbtunnel

class PrivateTmux(nbtunnel.Tmux):
    """tmux on a socket of its own."""
    name = "privtmux"

    def start(self, session, command):
        return ["tmux", "-L", "nbt-private"] + super().start(session, command)[1:]

    def alive(self, session):
        return ["tmux", "-L", "nbt-private"] + super().alive(session)[1:]

    def stop(self, session):
        return ["tmux", "-L", "nbt-private"] + super().stop(session)[1:]

nbtunnel.register(PrivateTmux())
'''

USER_ENVIRONMENT = '''
import nbtunnel

class Greeting(nbtunnel.ShellEnvironment):
    name = "greeting"

    options = [nbtunnel.Option("--greeting", "what GREETING says")]

    def steps(self, args):
        if not args.greeting:
            return []
        return [dict(data={"NBT_GREETING": args.greeting},
                     sh='export GREETING="$NBT_GREETING"', fish="set -gx GREETING $NBT_GREETING",
                     csh="setenv GREETING $NBT_GREETING:q")]

nbtunnel.register(Greeting())
'''

BROKEN = {
    "raises.py": "raise RuntimeError('boom from plugin')\n",
    "syntax.py": "def oops(:\n",
    "klass.py": "import nbtunnel\nclass M(nbtunnel.SessionManager):\n    name = 'klass'\nnbtunnel.register(M)\n",
    "badargv.py": "import nbtunnel\nclass M(nbtunnel.SessionManager):\n    name = 'badargv'\n"
                  "    def start(self, session, command):\n        return 'tmux new ' + session\n"
                  "nbtunnel.register(M())\n",
    "nokind.py": "import nbtunnel\nclass X:\n    name = 'x'\nnbtunnel.register(X())\n",
    "duck.py": "import nbtunnel\nclass D:\n    kind = 'manager'\n    name = 'duck'\n"
               "    def start(self, s, c):\n        return ['true']\nnbtunnel.register(D())\n",
}


def known_managers(stderr: str) -> list[str]:
    match = re.search(r"unknown manager 'nosuch' \([^)]*\); known: (.*)", stderr)
    assert match, stderr
    return match.group(1).split(", ")


def test_plugin_locations_and_unknown_manager(nbt, remote, tmp_path):
    xdg = Path(nbt.env["XDG_CONFIG_HOME"]) / "nbtunnel" / "plugins"
    xdg.mkdir(parents=True)
    (xdg / "fromxdg.py").write_text(USER_MANAGER.replace("privtmux", "fromxdg"))
    envdirs = [tmp_path / "one", tmp_path / "two"]
    for i, d in enumerate(envdirs):
        d.mkdir()
        (d / f"env{i}.py").write_text(USER_MANAGER.replace("privtmux", f"fromenv{i}"))
    (envdirs[0] / "_private.py").write_text("raise SystemExit('files starting with _ are not plugins')\n")
    cli = tmp_path / "cli.py"
    cli.write_text(USER_MANAGER.replace("privtmux", "fromcli"))
    before = remote.auth_count()
    proc = nbt.run(remote.alias, "--manager", "nosuch", "--plugin", str(cli),
                   env={"NBTUNNEL_PLUGIN_PATH": os.pathsep.join(map(str, envdirs))})
    assert proc.returncode == 2
    assert known_managers(proc.stderr) == ["fromcli", "fromenv0", "fromenv1", "fromxdg",
                                           "gridengine", "nohup", "screen", "slurm", "tmux"]
    assert remote.auth_count() == before and "warning" not in proc.stderr


def test_broken_plugins_warn_and_the_rest_work(nbt, remote, tmp_path):
    d = tmp_path / "plugins"
    d.mkdir()
    for name, text in BROKEN.items():
        (d / name).write_text(text)
    (d / "good.py").write_text(USER_MANAGER)
    env = {"NBTUNNEL_PLUGIN_PATH": str(d)}
    proc = nbt.run(remote.alias, "--manager", "nosuch", env=env)
    assert proc.returncode == 2
    assert known_managers(proc.stderr) == ["gridengine", "nohup", "privtmux", "screen", "slurm",
                                           "tmux"]
    for name in BROKEN:
        assert f"warning: plugin {d / name} failed to load and is skipped" in proc.stderr, name
    assert "boom from plugin" in proc.stderr and "SyntaxError" in proc.stderr
    assert "register an instance, not the class" in proc.stderr
    assert "start() must return an argv list" in proc.stderr
    assert "has no valid kind" in proc.stderr and "lacks alive, stop, log" in proc.stderr

    # the good plugin, found next to the broken ones, serves a real session
    run = nbt.run(remote.alias, "--json", "--manager", "privtmux", env=env)
    assert run.returncode == 0, run.stderr
    info = json.loads(run.stdout)
    assert info["manager"] == "privtmux" and info["plugin"] == str(d / "good.py")
    assert api_status(info["url"]) == 200
    private = remote.run(["tmux", "-L", "nbt-private", "ls", "-F", "#{session_name}"])
    assert private.stdout.split() == ["nbtunnel"] and remote.tmux_sessions() == []
    row = nbt.run("--status", "--json", env=env)
    assert json.loads(row.stdout)[0]["plugin"] == str(d / "good.py")
    assert nbt.run("--terminate", env=env).returncode == 0
    wait_until(lambda: not jupyter_pids(remote), 15, message="no jupyter left")
    assert remote.run(["tmux", "-L", "nbt-private", "ls"]).returncode != 0


def test_plugin_option_from_plugin_file(nbt, remote, tmp_path):
    """A --plugin file adds its own option; its step reaches the kernel's environment."""
    plugin = tmp_path / "greeting.py"
    plugin.write_text(USER_ENVIRONMENT)
    value = "hi $(touch PWNED) `id` ; 'q' \"d\""
    info = start(nbt, "--plugin", str(plugin), "--greeting", value)
    assert info["environment"] == ["greeting"]
    out = run_kernel_code(f"http://127.0.0.1:{info['local_port']}", info["token"],
                          "import os; print(os.environ['GREETING'], end='')")
    assert out == value
    assert not list(remote.home.rglob("PWNED"))
    bad = nbt.run(remote.alias, "--greeting", "x")  # without the plugin: no such option
    assert bad.returncode == 2 and "--greeting" in bad.stderr


@pytest.mark.noroot
def test_import_nbtunnel_reaches_the_running_module(tmp_path):
    """Run as a script, `import nbtunnel` in a plugin must not load a second copy."""
    import subprocess
    import sys

    plugin = tmp_path / "probe.py"
    plugin.write_text(textwrap.dedent('''
        import sys, nbtunnel
        print("same" if nbtunnel is sys.modules["__main__"] else "copy", file=sys.stderr)
    '''))
    proc = subprocess.run([sys.executable, str(REPO / "nbtunnel.py"), "--plugin", str(plugin),
                           "--state-dir", str(tmp_path / "s"), "--status"],
                          capture_output=True, text=True, env=dict(os.environ, XDG_CONFIG_HOME=str(tmp_path)))
    assert proc.returncode == 0, proc.stderr
    assert "same" in proc.stderr and "copy" not in proc.stderr


# The sshtunnel backend ########################################################


def read_url(proc) -> str:
    line = proc.stdout.readline()
    assert line.startswith("http://127.0.0.1:"), (line, proc.stderr.read() if proc.poll() is not None else "")
    return line.strip()


@pytest.mark.parametrize("how", ["--tunnel", "no-ssh-binary"])
def test_sshtunnel_backend_in_the_foreground(nbt, remote, how):
    import signal
    import subprocess
    import sys

    env = {"PATH": "/nonexistent"} if how == "no-ssh-binary" else None
    args = ["--tunnel", "sshtunnel"] if how == "--tunnel" else []
    before = remote.auth_count()
    proc = nbt.popen(remote.alias, *args, env=env)
    url = read_url(proc)
    port = urlparse(url).port
    token = token_of(url)
    assert api_status(url) == 200
    assert run_kernel_code(f"http://127.0.0.1:{port}", token, "1+1") == "2"
    # OpenSSH's master (or paramiko, without ssh) for the helper, and sshtunnel's own login
    assert remote.auth_count() - before == 2
    if how == "no-ssh-binary":
        assert not local_ssh_pids(str(nbt.ssh_config))
    status = nbt.run("--status", "--json", env=env)
    assert status.returncode == 0, status.stderr
    rows = json.loads(status.stdout)
    assert rows[0]["tunnel"] == "up" and rows[0]["backend"] == "sshtunnel" and rows[0]["server"] == "running"

    proc.send_signal(signal.SIGINT if how == "--tunnel" else signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    err = proc.stderr.read()
    assert "press Ctrl-C to close it" in err and "tunnel closed" in err
    assert "Traceback" not in err
    wait_until(lambda: not local_port_open(port), 15, message="forward closed")
    assert jupyter_pids(remote)  # the server keeps running
    assert not [p for p in nbt.popens if p.poll() is None]

    done = nbt.run("--terminate", env=env)
    assert done.returncode == 0, done.stderr
    wait_until(lambda: not jupyter_pids(remote), 15, message="no jupyter left")
    assert remote.tmux_sessions() == []
    wait_until(lambda: not local_ssh_pids(str(nbt.ssh_config)), 15, message="no local ssh left")
    del sys, subprocess


def test_sshtunnel_refuses_unknown_host_key(nbt, remote):
    proc = nbt.run(remote.unknown_alias, env={"PATH": "/nonexistent"})
    assert proc.returncode == 1 and "host key" in proc.stderr and remote.ip in proc.stderr
    assert not jupyter_pids(remote)


def test_sshtunnel_missing_package_says_how_to_install(nbt, remote):
    import subprocess

    python = "/usr/bin/python3"
    if subprocess.run([python, "-c", "import sshtunnel"], capture_output=True).returncode == 0:
        pytest.skip(f"{python} has sshtunnel installed: no interpreter without it here")
    before = remote.auth_count()
    argv = [python] + nbt.argv(remote.alias, "--tunnel", "sshtunnel")[1:]
    proc = subprocess.run(argv, capture_output=True, text=True, env=nbt.env, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 1
    assert "pip install sshtunnel" in proc.stderr
    assert remote.auth_count() == before and not jupyter_pids(remote)


@pytest.mark.noroot
def test_remote_code_of_plugins_parses_as_python_36():
    import ast

    import nbtunnel

    nbtunnel.load_plugins(nbtunnel.plugin_files())
    nohup = nbtunnel.get("manager", "nohup").describe("x")
    assert (nohup["alive"], nohup["stop"]) == ([nbtunnel.R_PIDFILE_ALIVE], [nbtunnel.R_PIDFILE_STOP])
    programs = 0
    for name in MANAGERS:
        desc = nbtunnel.get("manager", name).describe("x")
        assert set(desc) >= {"name", "start", "alive", "stop", "log", "detach"}
        assert desc["detach"] is (name == "nohup")
        for argv in (desc[key] or [] for key in ("alive", "stop", "log")):
            if argv[:2] == ["@PYTHON@", "-c"]:  # a plugin's function (nbtunnel.remote_call)
                ast.parse(argv[2], feature_version=(3, 6))
                programs += 1
    assert programs == 3  # screen's alive, stop and log


@pytest.mark.noroot
def test_environment_snippets_hold_no_user_data():
    """Whatever the user passes, the snippets are the same text: the data is in vars only."""
    import argparse

    import nbtunnel

    nbtunnel.load_plugins(nbtunnel.plugin_files())
    def steps(value):
        args = argparse.Namespace(rc=value, setup=value, conda=value, module=[value, value])
        out, _ = nbtunnel.environment_steps(args)
        return out

    plain, hostile = steps("x"), steps("$(touch PWNED)`id`;'\"\n")
    assert [s["vars"] != h["vars"] for s, h in zip(plain, hostile)].count(False) == 1  # modules' init step
    for s, h in zip(plain, hostile):
        assert {k: s[k] for k in ("sh", "fish", "csh")} == {k: h[k] for k in ("sh", "fish", "csh")}


def test_manager_log_explains_a_launcher_that_never_ran(nbt, remote, tmp_path):
    """When Jupyter never starts, the error carries what the session itself showed (log())."""
    plugin = tmp_path / "brokenmgr.py"
    plugin.write_text(textwrap.dedent('''
        import nbtunnel

        class Broken(nbtunnel.Tmux):
            name = "broken"

            def start(self, session, command):
                return ["tmux", "new-session", "-d", "-s", session, "echo launcher-cannot-run-here; sleep 600"]

        nbtunnel.register(Broken())
    '''))
    proc = nbt.run(remote.alias, "--plugin", str(plugin), "--manager", "broken", "--timeout", "5")
    assert proc.returncode == 1
    assert "not ready within 5" in proc.stderr and "launcher-cannot-run-here" in proc.stderr
    assert remote.tmux_sessions() == [] and not remote.pids("sleep 600")
    assert not local_ssh_pids(str(nbt.ssh_config))


def test_sshtunnel_refuses_a_jump_host_before_connecting(nbt, remote):
    before = remote.auth_count()
    proc = nbt.run(remote.alias, "--tunnel", "sshtunnel", "-J", "nobody@192.0.2.1")
    assert proc.returncode == 1
    assert "cannot go through proxyjump" in proc.stderr and "--tunnel ssh" in proc.stderr
    assert remote.auth_count() == before and not jupyter_pids(remote)


# The plugin API and the transport contract ####################################


def plugin_section(readme: str) -> str:
    """docs/plugins.md: the "Plugins" section and "Writing a plugin" (the whole file)."""
    return readme.split("# Plugins\n", 1)[1]


@pytest.mark.noroot
def test_readme_plugin_section_names_exactly_the_plugin_api():
    import nbtunnel

    named = set(re.findall(r"\bnbtunnel\.([A-Za-z_]\w*)", plugin_section((REPO / "docs" / "plugins.md").read_text())))
    named -= {"py", "__all__"}  # the file's name; the list itself
    assert named == set(nbtunnel.__all__)
    assert all(hasattr(nbtunnel, name) for name in nbtunnel.__all__)


@pytest.mark.noroot
@pytest.mark.parametrize("path", sorted((REPO / "plugins").glob("[!_]*.py")), ids=lambda p: p.name)
def test_shipped_plugins_use_only_the_plugin_api(path):
    import ast

    import nbtunnel

    used = {node.attr for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
            and node.value.id == "nbtunnel"}
    assert used and used <= set(nbtunnel.__all__), used - set(nbtunnel.__all__)


def sshtunnel_plugin():
    import sys

    import nbtunnel

    nbtunnel.load_plugins([str(REPO / "plugins" / "sshtunnel_backend.py")])
    return sys.modules["nbtunnel_plugin_sshtunnel_backend"]


@pytest.mark.noroot
def test_the_sshtunnel_connection_implements_the_transport():
    import nbtunnel

    Transport = nbtunnel.Transport
    conn = sshtunnel_plugin().ParamikoConnection("h", ["-F", "/dev/null"], 5)
    assert isinstance(conn, Transport) and isinstance(nbtunnel.Connection("h", [], "k", 5), Transport)
    methods = {n for n, v in vars(Transport).items() if callable(v) and not n.startswith("_")}
    assert methods >= {"open", "alive", "pipe", "run_helper", "control", "close", "master_pid", "argv"}
    for name in methods:
        assert callable(getattr(conn, name)), name
    for name in ("open", "alive", "pipe", "close"):  # what the base class leaves to each transport
        assert getattr(type(conn), name) is not getattr(Transport, name), name
    assert (conn.host, conn.options, conn.timeout, conn.opened_here) == ("h", ["-F", "/dev/null"], 5, False)
    assert conn.alive() is False and conn.master_pid() is None and conn.socket is None
    assert conn.argv("-O", "check") == ["ssh", "-F", "/dev/null", "-O", "check"]
    with pytest.raises(nbtunnel.Error):
        conn.control("forward", "-L", "1:127.0.0.1:2")
    conn.close()  # nothing to close: no error


def test_sshtunnel_connection_failures_carry_ssh_kinds(remote, tmp_path, monkeypatch):
    """paramiko's failures are SshErrors of the kind OpenSSH's are, so that --watch can
    tell a refusal (stop) from a link that is down (retry): helper and forward alike."""
    import subprocess
    import types

    import nbtunnel

    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    plugin = sshtunnel_plugin()
    stranger = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
    config = remote.write_ssh_config(tmp_path / "config", "nbt-stranger", IdentityFile=stranger)
    known = remote.ip if remote.port == 22 else f"[{remote.ip}]:{remote.port}"  # the down port: no key of its own
    config.write_text(config.read_text() + remote.ssh_config_block(
        remote.down_alias, Port=remote.down_port, HostKeyAlias=known))
    cases = [("nbt-stranger", "auth", nbtunnel.SSH_REFUSALS),
             (remote.down_alias, "unreachable", nbtunnel.SSH_LINK)]
    for alias, kind, group in cases:
        conn = plugin.ParamikoConnection(alias, ["-F", str(config)], 10)
        with pytest.raises(nbtunnel.SshError) as failed:
            conn.run_helper("status", {"sessions": ["s"]}, 30)
        assert failed.value.kind == kind and kind in group, failed.value
        assert alias in str(failed.value) and not conn.alive()
        ssh_conn = types.SimpleNamespace(host=alias, options=["-F", str(config)], timeout=10)
        with pytest.raises(nbtunnel.SshError) as failed:
            plugin.SshtunnelBackend().open(ssh_conn, free_local_port(), "127.0.0.1:9")
        assert failed.value.kind == kind, failed.value
