"""Bad input and hostile remotes: every case exits with the documented code and a message that
names the problem, runs nothing it was given as data, and leaves nothing running.

Complements tests/test_core.py (which covers the hostile --notebook-dir that exists, the basic
session/port checks and each missing-program message) with the rest of the options that reach
the remote, hosts and ssh options, host keys, silent hosts and talkative login shells.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from helpers import http_get, jupyter_pids, local_ssh_pids, token_of, wait_until

MARK = Path("/tmp/nbt-bad-input-PWNED")  # what a hostile string would create if it ran
HOSTILE = [
    f"$(touch {MARK})",
    f"`touch {MARK}`",
    f"x;touch {MARK}",
    f"x' ; touch {MARK} ; '",
    f'x" ; touch {MARK} ; "',
    f"x\ntouch {MARK}",
    f"x|touch {MARK}",
    "ünïcødé ✓ 目录",
    "-x",
    f"--rc=$(touch {MARK})",
]


@pytest.fixture(autouse=True)
def no_marker():
    """Fail any test after which a hostile string turned out to have been run."""
    MARK.unlink(missing_ok=True)
    yield
    assert not MARK.exists(), "a hostile string was executed"


def assert_nothing_left(nbt, remote, config: Path | None = None) -> None:
    """No local ssh master, no remote Jupyter or tmux, no recorded session."""
    wait_until(lambda: not local_ssh_pids(str(config or nbt.ssh_config)), 15, message="no local ssh left")
    wait_until(lambda: not jupyter_pids(remote), 15, message="no remote jupyter left")
    assert remote.tmux_sessions() == []
    assert [r for r in nbt.status() if not r["ended"]] == []  # ended on purpose: listed as such


def failed(proc, code: int, *words: str) -> None:
    """PROC exited CODE, said WORDS on stderr, printed nothing on stdout, no traceback."""
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr, proc.stderr
    for word in words:
        assert word in proc.stderr, (word, proc.stderr)


# Options refused before any connection: exit 2, no login ###########################


@pytest.mark.parametrize("value", HOSTILE + ["", ".hidden", "a/b", "x" * 65])
def test_hostile_session_names_exit_2(nbt, remote, value):
    before = remote.auth_count()
    failed(nbt.run(remote.alias, f"--session={value}"), 2, "invalid session name")
    assert remote.auth_count() == before


@pytest.mark.parametrize("value", HOSTILE + ["0", "65536", "1;2", "８０８０", " 80", "80\n", "1e3", "0x50"])
@pytest.mark.parametrize("option", ["--local-port", "--remote-port"])
def test_hostile_ports_exit_2(nbt, remote, option, value):
    before = remote.auth_count()
    failed(nbt.run(remote.alias, f"{option}={value}"), 2, "invalid " + option)
    assert remote.auth_count() == before


@pytest.mark.parametrize("value", HOSTILE[:3] + ["LAB", "lab "])
def test_hostile_app_exits_2(nbt, remote, value):
    failed(nbt.run(remote.alias, f"--app={value}"), 2, "invalid choice")


@pytest.mark.parametrize("host", [
    f"-oProxyCommand=touch {MARK}",
    f"-oLocalCommand=touch {MARK}",
    f"$(touch {MARK})",
    f"x;touch {MARK}",
    "two words",
    "new\nline",
    "back`tick`",
    "",
])
def test_hostile_hosts_exit_2(nbt, remote, host, tmp_path):
    before = remote.auth_count()
    failed(nbt.run("--", host), 2, "invalid HOST" if host else "no HOST given")
    # the same host from a config file's default, and with every other command
    config = tmp_path / "config.ini"
    config.write_text("[DEFAULT]\nhost = %s\n" % host.replace("\n", "\\n"))
    if "\n" not in host and host:
        failed(nbt.run(env={"NBTUNNEL_CONFIG": str(config)}), 2, "invalid HOST")
    actions = (["--terminate"], ["--print-nginx", "--local-port", "8000"], ["--print-service", "cron"])
    for extra in () if not host else actions:
        failed(nbt.run(*extra, "--", host), 2, "invalid HOST" if host else "HOST")
    assert remote.auth_count() == before
    assert not local_ssh_pids(str(nbt.ssh_config))


@pytest.mark.parametrize("args,words", [
    (["--jump=-oProxyCommand=touch %s" % MARK], ["invalid -J"]),
    (["--jump=gw,-oProxyCommand=touch %s" % MARK], ["invalid -J"]),
    (["--jump=$(touch %s)" % MARK], ["invalid -J"]),
    (["--ssh-option=StrictHostKeyChecking=no\nProxyCommand=touch %s" % MARK], ["invalid -o", "control characters"]),
    (["--ssh-option="], ["invalid -o"]),
    (["--identity=$(touch %s)" % MARK], ["-i", "not found"]),
    (["--identity=-oProxyCommand=touch %s" % MARK], ["-i", "not found"]),
    (["--ssh-config=x;touch %s" % MARK], ["--ssh-config", "not found"]),
    (["--jupyter=jupyter lab 'unbalanced"], ["invalid --jupyter", "quotation"]),
    (["--jupyter="], ["--jupyter"]),
])
def test_hostile_ssh_and_command_options_exit_2(nbt, remote, args, words):
    before = remote.auth_count()
    failed(nbt.run(remote.alias, *args), 2, *words)
    assert remote.auth_count() == before
    assert not local_ssh_pids(str(nbt.ssh_config))


# Options that reach the remote as data: refused there, nothing run, nothing left #####


@pytest.mark.parametrize("value,words", [
    (f"$(touch {MARK})", ["not found"]),
    (f"`touch {MARK}`", ["not found"]),
    (f"jupyter lab;touch {MARK}", ["jupyter lab;", "not installed"]),
    (f"jupyter lab `touch {MARK}`", []),
    (f"jupyter server --ServerApp.root_dir=$(touch {MARK})", ["last lines of the remote log"]),
    ("ünïcødé-jupyter lab", ["ünïcødé-jupyter not found"]),
])
def test_hostile_jupyter_command_runs_nothing(nbt, remote, value, words):
    proc = nbt.run(remote.alias, f"--jupyter={value}")
    failed(proc, 1, remote.alias, *words)
    assert_nothing_left(nbt, remote)


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_rc_file_runs_nothing(nbt, remote, value):
    proc = nbt.run(remote.alias, f"--rc={value}")
    failed(proc, 1, remote.alias, "--rc", "cannot read")
    assert_nothing_left(nbt, remote)


def test_rc_file_with_hostile_name_is_sourced(nbt, remote):
    name = "rc $(touch nbt-PWNED) ;`touch nbt-PWNED` 'q\" ü"
    rc = remote.home / name
    remote.run(["sh", "-c", 'printf "export RC_WAS_SOURCED=yes\\n" > "$1"', "sh", str(rc)], check=True)
    proc = nbt.run(remote.alias, "--json", "--rc", str(rc), "--app", "server")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    pid = jupyter_pids(remote)[0]
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    assert b"RC_WAS_SOURCED=yes" in environ
    assert info["reused"] is False
    assert nbt.run("--terminate").returncode == 0
    assert not (remote.home / "nbt-PWNED").exists()


@pytest.mark.parametrize("shell", ["/bin/bash", "/usr/bin/zsh", "/usr/bin/fish", "/usr/bin/tcsh"])
@pytest.mark.parametrize("rc", ["~/nbt-test.rc", "nbt-test.rc"])
def test_rc_file_paths_are_relative_to_the_remote_home(nbt, remote, tmp_path, rc, shell):
    if not Path(shell).exists():
        pytest.skip(f"{shell} is not installed (tests/run installs zsh, fish and tcsh)")
    line = "setenv RC_WAS_SOURCED yes" if shell.endswith("csh") else "export RC_WAS_SOURCED=yes"
    remote.run(["sh", "-c", 'echo "$1" > ~/nbt-test.rc', "sh", line], check=True)
    config = tmp_path / "config.ini"  # in a config file ~ is not expanded by the local shell
    config.write_text(f"[host {remote.alias}]\nrc = {rc}\n")
    try:
        with remote.login_shell(shell):
            proc = nbt.run(remote.alias, "--app", "server", env={"NBTUNNEL_CONFIG": str(config)})
            assert proc.returncode == 0, proc.stderr
            pid = jupyter_pids(remote)[0]
            assert b"RC_WAS_SOURCED=yes" in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            assert nbt.run("--terminate").returncode == 0
            missing = nbt.run(remote.alias, "--rc", "~/nbt-no-such.rc")
            failed(missing, 1, "cannot read the --rc file")
            assert_nothing_left(nbt, remote)
    finally:
        remote.run(["rm", "-f", str(remote.home / "nbt-test.rc")])


@pytest.mark.parametrize("value", ["-x", "--help", f"ünï\n$(touch {MARK})", f"--rc=$(touch {MARK})"])
def test_missing_hostile_notebook_dir_names_it(nbt, remote, value):
    proc = nbt.run(remote.alias, f"--notebook-dir={value}")
    failed(proc, 1, "does not exist")
    assert_nothing_left(nbt, remote)


# Hosts that cannot be used ###########################################################


def test_changed_host_key_is_refused_with_its_own_message(nbt, remote, tmp_path):
    key = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    known = tmp_path / "known_hosts"
    target = remote.ip if remote.port == 22 else f"[{remote.ip}]:{remote.port}"
    known.write_text(f"{target} {key.with_suffix('.pub').read_text().split(' ', 2)[0]} "
                     f"{key.with_suffix('.pub').read_text().split(' ', 2)[1]}\n")
    config = remote.write_ssh_config(tmp_path / "ssh_config", "nbtest-changed", UserKnownHostsFile=known)
    before = remote.auth_count()
    proc = nbt.run("nbtest-changed", "--ssh-config", str(config), timeout=60)
    failed(proc, 1, "nbtest-changed", "CHANGED")
    assert "--accept-new" not in proc.stderr  # accepting would be wrong here
    proc = nbt.run("nbtest-changed", "--ssh-config", str(config), "--accept-new", timeout=60)
    failed(proc, 1, "CHANGED")  # accept-new accepts new keys, never changed ones
    assert remote.auth_count() == before
    assert_nothing_left(nbt, remote, config)


@contextlib.contextmanager
def silent_listener():
    """A TCP port that accepts connections and never says anything (a hung host)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    try:
        yield server.getsockname()[1]
    finally:
        server.close()


def test_silent_host_times_out_naming_it(nbt, remote, tmp_path):
    with silent_listener() as port:
        config = remote.write_ssh_config(tmp_path / "ssh_config", "nbtest-silent", HostName="127.0.0.1", Port=port)
        t0 = time.monotonic()
        proc = nbt.run("nbtest-silent", "--ssh-config", str(config), "--timeout", "3", timeout=90)
        elapsed = time.monotonic() - t0
    failed(proc, 1, "nbtest-silent", "cannot reach")
    assert elapsed < 30
    assert_nothing_left(nbt, remote, config)


def test_refused_and_unknown_hosts_leave_nothing(nbt, remote):
    failed(nbt.run(remote.down_alias, "--timeout", "5", timeout=60), 1, remote.down_alias, "cannot reach")
    failed(nbt.run("ünïcødé.invalid", "--timeout", "5", timeout=60), 1, "ünïcødé.invalid")
    failed(nbt.run(remote.unknown_alias, timeout=60), 1, remote.unknown_alias, "not known")
    assert_nothing_left(nbt, remote)


# Remotes without what nbtunnel needs ##################################################


@pytest.fixture
def wrapper_shell():
    """Install a login shell wrapper (bash with a changed PATH) for the remote user."""
    made = []

    def make(path_value: str) -> str:
        shell = Path(f"/usr/local/bin/nbt-bad-input-shell-{os.getpid()}-{len(made)}")
        shell.write_text(f'#!/bin/bash\nexport PATH={path_value}\nexec /bin/bash --noprofile --norc "$@"\n')
        shell.chmod(0o755)
        made.append(shell)
        return str(shell)

    yield make
    for shell in made:
        shell.unlink(missing_ok=True)


@pytest.mark.parametrize("missing", ["python", "tmux", "jupyter"])
def test_remote_without_a_program(nbt, remote, wrapper_shell, missing):
    only = remote.home / "nbt-only-bin"  # a PATH directory holding just python3 and jupyter, no tmux
    remote.run(["mkdir", "-p", str(only)], check=True)
    remote.run(["ln", "-sf", "/usr/bin/python3", str(remote.jupyter_venv / "bin/jupyter"), str(only)], check=True)
    path = {"python": "/nonexistent", "tmux": str(only), "jupyter": "/usr/bin:/bin"}[missing]
    words = {"python": ["no python3 or python"], "tmux": ["tmux is not installed"],
             "jupyter": ["jupyter not found", "--jupyter"]}[missing]
    try:
        with remote.login_shell(wrapper_shell(path)):
            proc = nbt.run(remote.alias, timeout=120)
    finally:
        remote.run(["rm", "-rf", str(only)])
    failed(proc, 1, remote.alias, *words)
    assert_nothing_left(nbt, remote)
    assert not list((remote.home / ".local/state/nbtunnel").glob("*.pid"))


# Login shells that talk ################################################################

WELCOME = {  # shell -> files it reads for an ssh command or a login shell
    "/bin/bash": [".bashrc", ".profile"],
    "/usr/bin/zsh": [".zshenv", ".zshrc", ".zprofile"],
    "/usr/bin/fish": [".config/fish/config.fish"],
    "/usr/bin/tcsh": [".cshrc", ".login"],
}


@pytest.mark.parametrize("shell", list(WELCOME))
def test_login_shell_that_prints_a_banner(nbt, remote, shell):
    if not Path(shell).exists():
        pytest.skip(f"{shell} is not installed (tests/run installs zsh, fish and tcsh)")
    saved = {}
    for name in WELCOME[shell]:
        path = remote.home / name
        saved[path] = path.read_bytes() if path.exists() else None
        banner = {"fish": 'echo "Welcome to fish"; echo "motd on stderr" >&2\n',
                  "tcsh": 'echo "Welcome to tcsh"\n'}.get(Path(shell).name,
                                                         'echo "Welcome, $USER"; echo "motd on stderr" >&2\n')
        text = banner + (saved[path] or b"").decode()  # first thing in the file
        remote.run(["sh", "-c", 'cat > "$1"', "sh", str(path)], input=text, check=True)
    try:
        with remote.login_shell(shell):
            proc = nbt.run(remote.alias, "--json", timeout=120)
            assert proc.returncode == 0, proc.stderr
            info = json.loads(proc.stdout)  # stdout is exactly the JSON: no banner in it
            token = token_of(info["url"])
            status, _ = http_get(f"http://127.0.0.1:{info['local_port']}/api/status",
                                 headers={"Authorization": f"token {token}"})
            assert status == 200
            again = nbt.run(remote.alias, "--json", timeout=120)
            assert again.returncode == 0 and json.loads(again.stdout)["reused"] is True
            rows = nbt.status()
            assert rows and rows[0]["server"] == "running"
            stop = nbt.run("--terminate", timeout=120)
            assert stop.returncode == 0, stop.stderr
            assert_nothing_left(nbt, remote)
    finally:
        for path, data in saved.items():
            if data is None:
                path.unlink(missing_ok=True)
            else:
                remote.run(["sh", "-c", 'cat > "$1"', "sh", str(path)], input=data.decode(), check=True)
