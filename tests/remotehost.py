"""A real remote host on this machine, for the test suite and the benchmark.

``RemoteHost`` is an unprivileged user reached through a real sshd running
inside its own network namespace, so it has its own 127.0.0.1 and its own
ports, as a different machine would. Where network namespaces are not
permitted it falls back to an sshd on 127.0.0.1 and says so.

Every name carries this process's pid, so two suites can run side by side;
what an earlier, killed run left behind is removed at start-up. Needs root.
NBTUNNEL_TEST_NO_NETNS=1 forces the loopback fallback. Imports no pytest:
bench/bench.py uses it too.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

from helpers import (
    find_pids,
    free_local_port,
    kill_pids,
    live_pids,
    local_port_open,
    pid_alive,
    proc_cmdline,
    proc_uid,
    wait_until,
)

JUPYTER_VENV = Path("/opt/nbtunnel-test/jupyter")
SUBNET_POOL = ipaddress.ip_network("10.213.0.0/16")  # carved into /30s, one per run
LOCK_FILE = Path("/run/lock/nbtunnel-test.lock")
USER_COMMENT = "nbtunnel test remote user"
ALIAS = "nbtest"
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def _root(
    argv: Sequence[str], check: bool = True, timeout: float = 60
) -> subprocess.CompletedProcess:
    """Run a setup command as root (this process), capturing text output."""
    proc = subprocess.run(
        list(argv),
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}"
        )
    return proc


def _netns_list() -> list[str]:
    proc = _root(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]


def _link_exists(name: str) -> bool:
    return _root(["ip", "link", "show", name], check=False).returncode == 0


def _user_uid(name: str) -> int | None:
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        return None


def _user_pids(uid: int) -> list[int]:
    return [pid for pid in live_pids() if proc_uid(pid) == uid]


def _kill_user(name: str, timeout: float = 15.0) -> list[int]:
    """SIGKILL every process of user name until none is left; return survivors."""
    uid = _user_uid(name)
    if uid is None:
        return []
    deadline = time.monotonic() + timeout
    while True:
        pids = _user_pids(uid)
        if not pids or time.monotonic() > deadline:
            return pids
        # pkill, then our own kill: pkill may skip a process that is just forking.
        _root(["pkill", "-KILL", "-u", name], check=False)
        kill_pids(pids, timeout=1.0)


def _descendants(root_pid: int) -> list[int]:
    """Live descendants of root_pid, found through /proc/PID/stat."""
    children: dict[int, list[int]] = {}
    for pid in live_pids():
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        children.setdefault(ppid, []).append(pid)
    found, todo = [], [root_pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _remove_user(name: str) -> None:
    """Kill the processes of name, delete its files in shared temp dirs, and userdel -r it."""
    uid = _user_uid(name)
    if uid is None:
        return
    _kill_user(name)
    for top in ("/tmp", "/var/tmp", "/dev/shm", "/run/screen"):
        if os.path.isdir(top):
            _root(
                ["find", top, "-xdev", "-mindepth", "1", "-uid", str(uid), "-delete"],
                check=False,
            )
    if _root(["userdel", "-r", name], check=False).returncode != 0:
        _root(["userdel", "-r", "-f", name], check=False)


def _run_pid(name: str) -> int | None:
    match = re.fullmatch(r"nbt(\d+)[hr]?", name)
    return int(match.group(1)) if match else None


_STARTED_HERE: list[Path] = []  # work directories of the hosts this process started


def _reap_stale_runs(keep: Path) -> None:
    """Remove what earlier runs of this suite left behind (their pytest pid is gone), except
    keep.  What carries this process's own pid is an earlier run's (the pid was reused)
    only until a host of this process has started: after that it is that live host's,
    e.g. the shared test remote when a second host (OtpHost) starts."""
    own = os.getpid()

    def stale(pid: int | None) -> bool:
        if pid == own:
            return not _STARTED_HERE
        return pid is not None and not pid_alive(pid)

    for pid in find_pids(r"nbtremote-\d+-"):
        match = re.search(r"nbtremote-(\d+)-", " ".join(proc_cmdline(pid)))
        if match and stale(int(match.group(1))):
            kill_pids([pid, *_descendants(pid)], timeout=5)
    for entry in pwd.getpwall():
        if entry.pw_gecos == USER_COMMENT and stale(_run_pid(entry.pw_name)):
            _remove_user(entry.pw_name)
    for ns in _netns_list():
        if stale(_run_pid(ns)):
            _root(["ip", "netns", "del", ns], check=False)
    for line in _root(["ip", "-o", "link", "show"], check=False).stdout.splitlines():
        link = line.split(":")[1].strip().split("@")[0] if line.count(":") >= 2 else ""
        if stale(_run_pid(link)):
            _root(["ip", "link", "del", link], check=False)
    for path in Path(tempfile.gettempdir()).glob("nbtremote-*-*"):
        match = re.match(r"nbtremote-(\d+)-", path.name)
        if match and stale(int(match.group(1))) and path != keep:
            shutil.rmtree(path, ignore_errors=True)


def _used_networks() -> list[ipaddress.IPv4Network]:
    """Networks of every IPv4 address and route on this machine."""
    nets = []
    for line in _root(["ip", "-4", "-o", "addr"], check=False).stdout.splitlines():
        match = re.search(r"\binet (\S+)", line)
        if match:
            nets.append(ipaddress.ip_interface(match.group(1)).network)
    for line in _root(["ip", "-4", "route"], check=False).stdout.splitlines():
        dest = line.split()[0] if line.strip() else ""
        if dest != "default":
            with contextlib.suppress(ValueError):
                nets.append(ipaddress.ip_network(dest, strict=False))
    return nets


def _pick_subnet() -> ipaddress.IPv4Network:
    """A /30 of SUBNET_POOL that overlaps no address or route on this machine."""
    used = _used_networks()
    subnets = list(SUBNET_POOL.subnets(new_prefix=30))
    start = os.getpid() % len(subnets)
    for subnet in subnets[start:] + subnets[:start]:
        if not any(subnet.overlaps(net) for net in used):
            return subnet
    raise RuntimeError(f"no free /30 left in {SUBNET_POOL}")


@contextlib.contextmanager
def _machine_lock() -> Iterator[None]:
    """Serialise subnet choice and stale-run cleanup between suites running at once."""
    LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
    with open(LOCK_FILE, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class RemoteHost:
    """A real remote host: an unprivileged user behind its own sshd, in its own network namespace."""

    alias = ALIAS
    unknown_alias = f"{ALIAS}-unknown"
    down_alias = f"{ALIAS}-down"
    password_alias = f"{ALIAS}-pw"
    password = "nbt-Pass-7391"
    jupyter_venv = JUPYTER_VENV

    def __init__(self) -> None:
        pid = os.getpid()
        self.user = f"nbt{pid}"
        self.netns: str | None = f"nbt{pid}"
        self.veth_host = f"nbt{pid}h"  # <= 15 characters for any pid up to 2**22
        self.veth_remote = f"nbt{pid}r"
        self.fallback = False
        self.fallback_reason = ""
        self.workdir = Path(tempfile.mkdtemp(prefix=f"nbtremote-{pid}-"))
        self.ssh_config = self.workdir / "ssh_config"
        self.sshd_config = self.workdir / "sshd_config"
        self.sshd_log = self.workdir / "sshd.log"
        self.known_hosts = self.workdir / "known_hosts"
        self.unknown_known_hosts = self.workdir / "known_hosts_empty"
        self.identity = self.workdir / "id_ed25519"
        self.host_key = self.workdir / "ssh_host_ed25519_key"
        self.ip = ""
        self.host_ip = ""  # this machine's address as the remote sees it
        self.port = 22
        self.down_port = 9
        self.home = Path()
        self.uid = -1
        self.sshd: subprocess.Popen | None = None

    # Set-up ###################################################################

    def start(self) -> None:
        """Create network, user, keys and configs, and start sshd."""
        with _machine_lock():
            _reap_stale_runs(keep=self.workdir)
            _STARTED_HERE.append(self.workdir)
            self._make_network()
        self._make_user()
        self._make_keys()
        self._write_configs()
        self._start_sshd()

    def _make_network(self) -> None:
        assert self.netns is not None
        if os.environ.get("NBTUNNEL_TEST_NO_NETNS"):
            self._use_loopback("NBTUNNEL_TEST_NO_NETNS is set")
            return
        if _root(["ip", "netns", "add", self.netns], check=False).returncode != 0:
            self._use_loopback("`ip netns add` is not permitted here")
            return
        try:
            subnet = _pick_subnet()
            host_ip, remote_ip = (str(addr) for addr in subnet.hosts())
            in_ns = f"ip netns exec {self.netns} "
            for command in (
                f"ip link add {self.veth_host} type veth peer name {self.veth_remote}",
                f"ip link set {self.veth_remote} netns {self.netns}",
                f"ip addr add {host_ip}/30 dev {self.veth_host}",
                f"ip link set {self.veth_host} up",
                in_ns + f"ip addr add {remote_ip}/30 dev {self.veth_remote}",
                in_ns + f"ip link set {self.veth_remote} up",
                in_ns + "ip link set lo up",
            ):
                _root(command.split())  # names and addresses hold no spaces
        except RuntimeError as err:
            self._remove_network()
            self._use_loopback(str(err))
            return
        self.ip, self.host_ip = remote_ip, host_ip

    def _use_loopback(self, reason: str) -> None:
        self.netns = None
        self.fallback = True
        self.fallback_reason = reason
        self.ip = self.host_ip = "127.0.0.1"
        self.port = free_local_port()
        self.down_port = free_local_port()
        warnings.warn(
            f"no network namespace ({reason}): the test remote is an sshd on 127.0.0.1:{self.port}, "
            "so it shares this machine's ports and tests of port handling prove less",
            stacklevel=2,
        )

    def _make_user(self) -> None:
        _remove_user(self.user)  # a user of an earlier run that had this same pid
        _root(["useradd", "-m", "-s", "/bin/bash", "-c", USER_COMMENT, self.user])
        # '*': no password, but not locked ('!'), which sshd would refuse even for keys.
        _root(["usermod", "-p", "*", self.user])
        entry = pwd.getpwnam(self.user)
        self.uid, self.home = entry.pw_uid, Path(entry.pw_dir)
        venv_bin = self.jupyter_venv / "bin"
        # Jupyter is on PATH for login shells only, as on real servers: a plain
        # `ssh host jupyter` does not find it.
        self._append_user_file(".profile", f'\nPATH="{venv_bin}:$PATH"\nexport PATH\n')
        self._append_user_file(".zprofile", f'export PATH="{venv_bin}:$PATH"\n')
        self._append_user_file(".login", f'setenv PATH "{venv_bin}:$PATH"\n')
        self._append_user_file(
            ".config/fish/config.fish",
            f"if status is-login\n    set -gx PATH {venv_bin} $PATH\nend\n",
        )

    def _append_user_file(self, relative: str, text: str, mode: int = 0o644) -> Path:
        path = self.home / relative
        for parent in reversed(path.relative_to(self.home).parents[:-1]):
            directory = self.home / parent
            if not directory.exists():
                directory.mkdir(mode=0o700)
                os.chown(directory, self.uid, self.uid)
        with open(path, "a") as handle:
            handle.write(text)
        os.chown(path, self.uid, self.uid)
        path.chmod(mode)
        return path

    def _make_keys(self) -> None:
        keygen = ["ssh-keygen", "-q", "-t", "ed25519", "-N", ""]
        _root([*keygen, "-C", self.user, "-f", str(self.identity)])
        _root([*keygen, "-C", "nbtest-host", "-f", str(self.host_key)])
        public = self.identity.with_suffix(".pub").read_text()
        self._append_user_file(".ssh/authorized_keys", public, mode=0o600)
        self.write_known_hosts(self.known_hosts)
        self.unknown_known_hosts.write_text("")

    def _write_configs(self) -> None:
        self.sshd_config.write_text(
            f"""\
Port {self.port}
ListenAddress {self.ip}
HostKey {self.host_key}
PidFile {self.workdir}/sshd.pid
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
AuthorizedKeysFile .ssh/authorized_keys
PermitRootLogin no
StrictModes no
AllowTcpForwarding yes
AllowStreamLocalForwarding yes
PermitUserEnvironment no
X11Forwarding no
PrintMotd no
PrintLastLog no
LogLevel VERBOSE
Subsystem sftp /usr/lib/openssh/sftp-server
# The user also has a password, accepted only as a password (for tests of prompts).
Match User {self.user}
    PasswordAuthentication yes
"""
        )
        subprocess.run(["chpasswd"], input=f"{self.user}:{self.password}\n", text=True, check=True)
        password_only = dict(
            IdentityFile=None,
            IdentitiesOnly=None,
            BatchMode=None,
            PubkeyAuthentication="no",
            PreferredAuthentications="password",
            NumberOfPasswordPrompts="1",
        )
        self.ssh_config.write_text(
            "\n".join(
                [
                    self.ssh_config_block(self.alias),
                    self.ssh_config_block(
                        self.unknown_alias, UserKnownHostsFile=self.unknown_known_hosts
                    ),
                    self.ssh_config_block(self.password_alias, **password_only),
                    self.ssh_config_block(
                        self.down_alias, Port=self.down_port, ConnectTimeout=10
                    ),
                    # The address itself, for destinations written as user@ip or ssh://user@ip:port.
                    self.ssh_config_block(self.ip, HostName=None, Port=None),
                ]
            )
        )

    def _in_netns(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *argv] if self.netns else list(argv)

    def _start_sshd(self) -> None:
        # sshd's privilege separation directory.
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        argv = self._in_netns(
            [SSHD, "-D", "-f", str(self.sshd_config), "-E", str(self.sshd_log)]
        )
        self.sshd = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while not self.port_open(self.port, self.ip):
            if self.sshd.poll() is not None or time.monotonic() > deadline:
                log = self.sshd_log.read_text() if self.sshd_log.exists() else ""
                raise RuntimeError(
                    f"test sshd did not start (exit {self.sshd.poll()}):\n{log}"
                )
            time.sleep(0.05)

    # Use ######################################################################

    def client_settings(self) -> dict[str, str]:
        """ssh_config settings that reach this host as its user, with the test key and a
        strictly checked host key; the base of every test alias."""
        return {
            "HostName": self.ip,
            "Port": str(self.port),
            "User": self.user,
            "IdentityFile": str(self.identity),
            "IdentitiesOnly": "yes",
            "UserKnownHostsFile": str(self.known_hosts),
            "GlobalKnownHostsFile": "/dev/null",
            "StrictHostKeyChecking": "yes",
            "BatchMode": "yes",
        }

    def ssh_config_block(self, alias: str, **overrides: object) -> str:
        """A `Host ALIAS` block of client_settings(); overrides replace or add settings, None drops one."""
        settings: dict[str, object] = dict(self.client_settings())
        settings.update(overrides)
        lines = [f"Host {alias}"]
        lines += [f"    {key} {value}" for key, value in settings.items() if value is not None]
        return "\n".join(lines) + "\n"

    def write_ssh_config(self, path: Path, alias: str, **overrides: object) -> Path:
        """Write an ssh_config at path whose one alias reaches this host (see ssh_config_block)."""
        path.write_text(self.ssh_config_block(alias, **overrides))
        return path

    def write_known_hosts(
        self, path: Path, host: str | None = None, port: int | None = None
    ) -> Path:
        """Write a known_hosts at path holding this host's key for host:port (default: its own)."""
        host = self.ip if host is None else host
        port = self.port if port is None else port
        public = " ".join(Path(f"{self.host_key}.pub").read_text().split()[:2])
        name = host if port == 22 else f"[{host}]:{port}"
        path.write_text(f"{name} {public}\n")
        return path

    def auth_count(self, method: str = "publickey") -> int:
        """How many logins of the remote user sshd has accepted so far (one line each in its log)."""
        needle = f"Accepted {method} for {self.user} "
        try:
            return self.sshd_log.read_text(errors="replace").count(needle)
        except FileNotFoundError:
            return 0

    def user_env(self) -> dict[str, str]:
        """The environment a fresh ssh session of the remote user starts with."""
        return {
            "HOME": str(self.home),
            "USER": self.user,
            "LOGNAME": self.user,
            "SHELL": "/bin/bash",
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "LANG": "C.UTF-8",
        }

    def run(
        self,
        cmd: str | Sequence[str],
        check: bool = False,
        timeout: float = 60,
        input: str | None = None,
    ) -> subprocess.CompletedProcess:
        """Run cmd as the remote user on the remote host; a str goes through `bash -lc` (a login shell)."""
        argv = ["bash", "-lc", cmd] if isinstance(cmd, str) else list(cmd)
        env = [f"{key}={value}" for key, value in self.user_env().items()]
        full = self._in_netns(
            ["runuser", "-u", self.user, "--", "env", "-i", *env, *argv]
        )
        return subprocess.run(
            full,
            check=check,
            timeout=timeout,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            cwd=self.home,
        )

    def pids(self, pattern: str) -> list[int]:
        """Live pids of the remote user whose cmdline matches regex pattern."""
        return find_pids(pattern, uid=self.uid)

    def tmux_sessions(self) -> list[str]:
        """Names of the remote user's tmux sessions ([] when no tmux server runs)."""
        proc = self.run(["tmux", "ls", "-F", "#{session_name}"])
        return proc.stdout.split() if proc.returncode == 0 else []

    def screen_sessions(self) -> list[str]:
        """Names of the remote user's screen sessions (the part after PID.)."""
        proc = self.run(["screen", "-ls"])
        return re.findall(r"^\s+\d+\.(\S+)\s", proc.stdout, re.MULTILINE)

    def port_open(self, port: int, host: str = "127.0.0.1") -> bool:
        """True when something accepts TCP connections on host:port seen from the remote host."""
        if not self.netns:
            return local_port_open(port, host)
        probe = "import socket,sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1)"
        argv = self._in_netns([sys.executable, "-c", probe, host, str(port)])
        return _root(argv, check=False).returncode == 0

    def kill_user_processes(self) -> list[int]:
        """SIGKILL every process of the remote user and wait until they are gone; return survivors."""
        return _kill_user(self.user)

    def clean_jupyter_runtime(self) -> None:
        """Remove Jupyter server/kernel runtime files (stale once their processes were killed)."""
        runtime = self.home / ".local/share/jupyter/runtime"
        for pattern in ("jpserver-*", "kernel-*", "nbserver-*"):
            for path in runtime.glob(pattern):
                path.unlink(missing_ok=True)

    def reset_unknown_known_hosts(self) -> None:
        """Empty the known_hosts of the unknown alias again (an accept-new test fills it)."""
        self.unknown_known_hosts.write_text("")

    @contextlib.contextmanager
    def login_shell(self, shell: str) -> Iterator[None]:
        """Make shell (e.g. /usr/bin/zsh) the remote user's login shell for the duration."""
        _root(["usermod", "-s", shell, self.user])
        try:
            yield
        finally:
            _root(["usermod", "-s", "/bin/bash", self.user], check=False)

    def reload_sshd(self) -> None:
        """Make sshd read sshd_config again (after a test changed it)."""
        assert self.sshd is not None
        self.sshd.send_signal(signal.SIGHUP)
        wait_until(
            lambda: self.port_open(self.port, self.ip),
            15,
            message="sshd back after SIGHUP",
        )

    # Tear-down ################################################################

    def stop(self) -> None:
        """Remove everything start() made: processes, sshd, user, namespace, veth, files."""
        self.kill_user_processes()
        if self.sshd is not None:
            kill_pids(
                [*_descendants(self.sshd.pid), self.sshd.pid], signal.SIGTERM, timeout=5
            )
            kill_pids([*_descendants(self.sshd.pid), self.sshd.pid], timeout=5)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.sshd.wait(timeout=5)
        _remove_user(self.user)
        self._remove_network()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def _remove_network(self) -> None:
        if self.netns and self.netns in _netns_list():
            _root(["ip", "netns", "del", self.netns], check=False)
        if _link_exists(self.veth_host):
            _root(["ip", "link", "del", self.veth_host], check=False)

    def leftovers(self) -> list[str]:
        """What of this host still exists (should be nothing after stop())."""
        found = []
        if self.netns and self.netns in _netns_list():
            found.append(f"network namespace {self.netns}")
        if _link_exists(self.veth_host):
            found.append(f"veth {self.veth_host}")
        if _user_uid(self.user) is not None:
            found.append(f"user {self.user}")
        if self.uid >= 0 and _user_pids(self.uid):
            found.append(f"processes of uid {self.uid}: {_user_pids(self.uid)}")
        if self.sshd is not None and pid_alive(self.sshd.pid):
            found.append(f"sshd pid {self.sshd.pid}")
        if self.workdir.exists():
            found.append(f"directory {self.workdir}")
        return found

    def describe(self) -> str:
        """One line saying where the remote lives."""
        if self.fallback:
            return (
                f"test remote: sshd on 127.0.0.1:{self.port} (FALLBACK, no network namespace: "
                f"{self.fallback_reason}), user {self.user}"
            )
        return f"test remote: sshd in network namespace {self.netns} at {self.ip}:22, user {self.user}"
