"""Fixtures that give the tests a real remote host on this machine.

``remote`` (one per session) is a ``RemoteHost`` (tests/remotehost.py): an
unprivileged user reached through a real sshd in its own network namespace.

``nbt`` (one per test) runs nbtunnel.py against that host with private state
and config directories, and cleans up after the test whatever it left.

Tests marked ``noroot`` use neither: ``pytest -m noroot`` runs them as any user.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import (
    find_pids,
    kill_pids,
    local_port_open,
    pid_alive,
    proc_cmdline,
    socket_listening,
    unix_sockets,
)

# Re-exported: test modules and older code import these from conftest.
from remotehost import (  # noqa: F401
    ALIAS,
    JUPYTER_VENV,
    RemoteHost,
    _remove_user,
    _root,
)

REPO = Path(__file__).resolve().parent.parent
NBTUNNEL = REPO / "nbtunnel.py"

sys.path.insert(0, str(REPO))  # lets unit tests `import nbtunnel`

# Hosts made this session, checked once more after teardown (pytest_sessionfinish).
_REMOTES: list[RemoteHost] = []
_LEFTOVERS: list[str] = []

# nbtunnel's ssh control sockets: every runner of this session sets NBTUNNEL_RUNTIME_DIR to
# one directory of the session's own, instead of the user's /tmp/nbtunnel-UID that other
# runs share. A master killed with SIGKILL (a fault test, or the forced cleanup) leaves its
# socket file: each test's cleanup removes the dead ones, and the session ends by checking
# that none is left there, nor where the tests' records named one (cron's environment has
# no NBTUNNEL_RUNTIME_DIR), then removes the directory.
_RUNTIME_DIR: list[Path] = []
_RECORDED_SOCKETS: set[Path] = set()


def runtime_dir() -> Path:
    """This session's NBTUNNEL_RUNTIME_DIR, made on first use."""
    if not _RUNTIME_DIR:
        _RUNTIME_DIR.append(Path(tempfile.mkdtemp(prefix="nbtrt")))
    return _RUNTIME_DIR[0]


def socket_leftovers() -> list[str]:
    """The control sockets this session left; then its runtime directory is removed."""
    found = {p for p in _RECORDED_SOCKETS if p.is_socket()}
    for directory in _RUNTIME_DIR:
        found.update(unix_sockets(directory))
    left = [f"control socket {p}{'' if socket_listening(p) else ' (dead)'}" for p in sorted(found)]
    for directory in _RUNTIME_DIR:
        shutil.rmtree(directory, ignore_errors=True)
    return left


@pytest.fixture(scope="session")
def remote() -> Iterator[RemoteHost]:
    """The real remote host for this session (see RemoteHost)."""
    if os.geteuid() != 0:
        pytest.skip(
            "the test remote needs root (useradd, ip netns, sshd): run bash tests/run"
        )
    if not (JUPYTER_VENV / "bin" / "jupyter").exists():
        warnings.warn(
            f"{JUPYTER_VENV} has no jupyter: run bash tests/run to install it",
            stacklevel=1,
        )
    host = RemoteHost()
    _REMOTES.append(host)
    try:
        host.start()
        yield host
    finally:
        host.stop()


# nbtunnel runs ################################################################


class NbtRunner:
    """Runs nbtunnel.py against the test remote with private state and config."""

    def __init__(self, remote: RemoteHost) -> None:
        self.remote = remote
        self.ssh_config = remote.ssh_config
        # Short path: ssh control sockets live under it and must fit in 108 bytes.
        self.tmp = Path(tempfile.mkdtemp(prefix="nbt"))
        self.state_dir = self.tmp / "state"
        self.config_file = self.tmp / "no-config.ini"  # never created
        self.env = {
            key: value
            for key, value in os.environ.items()
            if key
            not in {"XDG_RUNTIME_DIR", "NBTUNNEL_STATE_DIR", "SSH_AUTH_SOCK", "BROWSER"}
        }
        self.env.update(
            XDG_STATE_HOME=str(self.tmp / "xdg-state"),
            XDG_CONFIG_HOME=str(self.tmp / "xdg-config"),
            XDG_CACHE_HOME=str(self.tmp / "xdg-cache"),
            NBTUNNEL_CONFIG=str(self.config_file),
            NBTUNNEL_RUNTIME_DIR=str(runtime_dir()),
        )
        self.popens: list[subprocess.Popen] = []

    def argv(self, *args: str) -> list[str]:
        """The full command line for nbtunnel.py args."""
        return [
            sys.executable,
            str(NBTUNNEL),
            "--ssh-config",
            str(self.ssh_config),
            "--state-dir",
            str(self.state_dir),
            *args,
        ]

    def _env(self, extra: dict[str, str | None] | None) -> dict[str, str]:
        env = dict(self.env)
        for key, value in (extra or {}).items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        return env

    def run(
        self,
        *args: str,
        timeout: float = 120,
        input: str | None = None,
        env: dict[str, str | None] | None = None,
    ) -> subprocess.CompletedProcess:
        """Run nbtunnel.py args to completion; env entries are added (None removes one)."""
        return subprocess.run(
            self.argv(*args),
            check=False,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self._env(env),
        )

    def popen(
        self, *args: str, env: dict[str, str | None] | None = None, **kwargs
    ) -> subprocess.Popen:
        """Start nbtunnel.py args in the background (e.g. --watch); killed at teardown if still running."""
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
        kwargs.setdefault("text", True)
        proc = subprocess.Popen(self.argv(*args), env=self._env(env), **kwargs)
        self.popens.append(proc)
        return proc

    def status(self) -> list[dict]:
        """Recorded sessions from `--status --json`; a --status that fails fails the test."""
        proc = self.run("--status", "--json", timeout=60)
        assert proc.returncode == 0, f"--status --json exited {proc.returncode}: {proc.stderr}"
        data = json.loads(proc.stdout)
        assert isinstance(data, list), proc.stdout
        return data

    def cleanup(self) -> list[str]:
        """Terminate what the test started, then force-clean; return what had to be forced."""
        forced = []
        for proc in self.popens:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
                    forced.append(f"nbtunnel.py pid {proc.pid} ignored SIGINT")
        named = self.recorded_sockets()  # before --terminate, which may drop records
        sessions = []
        if self.state_dir.exists():
            # Clean up whatever the test left, even when it broke --status itself.
            with contextlib.suppress(Exception):
                sessions = self.status()
        for session in sessions:
            host, name = session.get("host"), session.get("session")
            if host and name:
                with contextlib.suppress(Exception):
                    self.run(
                        str(host),
                        "--terminate",
                        "--force",
                        "--session",
                        str(name),
                        timeout=60,
                    )
        ports = [
            int(s["local_port"])
            for s in sessions
            if str(s.get("local_port", "")).isdigit()
        ]

        mine = re.escape(str(self.tmp)) + r"(?:/|\s|$)"
        local = [pid for pid in find_pids(mine) if pid_alive(pid)]
        local += find_pids(re.escape(str(self.ssh_config)), program="ssh")
        if local:
            forced.append(
                f"local processes {[' '.join(proc_cmdline(p)) for p in sorted(set(local))]}"
            )
            kill_pids(set(local))
        remote_jobs = self.remote.pids(r"jupyter|tmux|SCREEN|screen|ipykernel")
        if remote_jobs:
            forced.append(
                f"remote processes {[' '.join(proc_cmdline(p)) for p in remote_jobs]}"
            )
        self.remote.kill_user_processes()
        self.remote.clean_jupyter_runtime()
        self.remote.reset_unknown_known_hosts()
        open_ports = [port for port in ports if local_port_open(port)]
        if open_ports:
            forced.append(f"local ports still open {open_ports}")
        self.remove_dead_sockets(named)
        shutil.rmtree(self.tmp, ignore_errors=True)
        return forced

    def recorded_sockets(self) -> set[Path]:
        """The control sockets the test's records name."""
        named: set[Path] = set()
        for record in self.state_dir.glob("**/*.json") if self.state_dir.exists() else ():
            with contextlib.suppress(OSError, ValueError, AttributeError, TypeError):
                sock = json.loads(record.read_text()).get("socket")
                if sock:
                    named.add(Path(sock))
        return named

    def remove_dead_sockets(self, named: set[Path]) -> None:
        """Remove the control sockets of masters that are gone: those in the session's
        runtime directory and those the test's records name (with ssh's temporary names
        beside them). A socket still listening stays, for the session's leftovers check."""
        found = set(unix_sockets(runtime_dir()))
        for path in named:
            found.update(p for p in path.parent.glob(glob.escape(path.name) + "*") if p.is_socket())
        _RECORDED_SOCKETS.update(p for p in found if not p.is_relative_to(self.tmp))
        for path in found:
            if not socket_listening(path):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()


@pytest.fixture
def nbt(remote: RemoteHost) -> Iterator[NbtRunner]:
    """Runs nbtunnel.py against the test remote; cleans up after the test."""
    runner = NbtRunner(remote)
    remote.reset_unknown_known_hosts()
    yield runner
    forced = runner.cleanup()
    if forced:
        warnings.warn(
            "left after --terminate --force, removed by force: " + "; ".join(forced),
            stacklevel=1,
        )


# Markers ######################################################################


@pytest.hookimpl(tryfirst=True)  # before -m selects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test marked noroot must not reach the test remote (it needs root to exist).
    Every noroot test is also in the fast tier (marker ``fast``)."""
    for item in items:
        if item.get_closest_marker("noroot"):
            item.add_marker(pytest.mark.fast)
    wrong = [
        item.nodeid
        for item in items
        if item.get_closest_marker("noroot") and "remote" in getattr(item, "fixturenames", ())
    ]
    if wrong:
        raise pytest.UsageError(
            "marked noroot but use the test remote (root only): " + ", ".join(wrong)
        )


# Reporting ####################################################################


def pytest_report_header(config: pytest.Config) -> list[str]:
    jupyter = JUPYTER_VENV / "bin" / "jupyter"
    return [
        f"nbtunnel.py: {NBTUNNEL} ({'present' if NBTUNNEL.exists() else 'MISSING'})",
        f"remote jupyter venv: {JUPYTER_VENV} ({'present' if jupyter.exists() else 'MISSING: run bash tests/run'})",
    ]


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # trylast: after pytest's own session teardown, so the remote fixture is gone.
    for host in _REMOTES:
        _LEFTOVERS.extend(f"{host.user}: {item}" for item in host.leftovers())
    _LEFTOVERS.extend(socket_leftovers())
    if _LEFTOVERS and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(
    terminalreporter, exitstatus: int, config: pytest.Config
) -> None:
    for host in _REMOTES:
        terminalreporter.write_line(host.describe(), yellow=host.fallback)
    for item in _LEFTOVERS:
        terminalreporter.write_line(f"LEFT BEHIND by the test remote: {item}", red=True)


# Slurm ########################################################################


@pytest.fixture(scope="session")
def cluster() -> Iterator:
    """A real two-host Slurm cluster for this session (see tests/cluster.py)."""
    from cluster import ClusterUnavailable, SlurmCluster, slurm_missing

    reason = slurm_missing()
    if reason:
        pytest.skip(f"no test cluster: {reason}")
    host = SlurmCluster()
    _REMOTES.append(host)
    try:
        try:
            host.start()
        except ClusterUnavailable as err:
            pytest.skip(f"no test cluster: {err}")
        yield host
    finally:
        host.stop()


@pytest.fixture
def nbt_cluster(cluster) -> Iterator[NbtRunner]:
    """Runs nbtunnel.py against the cluster's login node; after the test, no job of the user is left."""
    runner = NbtRunner(cluster)
    cluster.reset_unknown_known_hosts()
    yield runner
    forced = runner.cleanup()
    jobs = cluster.jobs()
    if jobs:
        forced.append(f"Slurm jobs {jobs}")
        cluster.cancel_all_jobs()
    if forced:
        warnings.warn(
            "left after --terminate --force, removed by force: " + "; ".join(forced),
            stacklevel=1,
        )


# Grid Engine ##################################################################


@pytest.fixture(scope="session")
def gecell() -> Iterator:
    """A real two-host Grid Engine cell for this session (see tests/gecell.py)."""
    from cluster import ClusterUnavailable
    from gecell import GridEngineCell, gridengine_missing

    reason = gridengine_missing()
    if reason:
        pytest.skip(f"no test Grid Engine cell: {reason}")
    host = GridEngineCell()
    _REMOTES.append(host)
    try:
        try:
            host.start()
        except ClusterUnavailable as err:
            pytest.skip(f"no test Grid Engine cell: {err}")
        print(host.describe())
        yield host
    finally:
        host.stop()


@pytest.fixture
def nbt_ge(gecell) -> Iterator[NbtRunner]:
    """Runs nbtunnel.py against the cell's login node; after the test, no job of the user is left."""
    runner = NbtRunner(gecell)
    gecell.reset_unknown_known_hosts()
    yield runner
    forced = runner.cleanup()
    jobs = gecell.jobs()
    if jobs:
        forced.append(f"Grid Engine jobs {jobs}")
        gecell.cancel_all_jobs()
    if forced:
        warnings.warn("left after --terminate --force, removed by force: " + "; ".join(forced),
                      stacklevel=1)


@pytest.fixture(params=["slurm", "gridengine"])
def sched(request):
    """One scheduler (tests/test_schedulers.py's SCHEDULERS), its cluster and an nbtunnel
    runner against its login node: a test that takes it runs once per scheduler."""
    from test_schedulers import SCHEDULERS

    kind, cell, runner = SCHEDULERS[request.param]
    return kind(request.getfixturevalue(cell), request.getfixturevalue(runner))
