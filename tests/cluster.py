"""A real two-host Slurm cluster on this machine, for the tests.

The login node is a network namespace with an sshd (reached from this
machine, "the laptop", over a veth pair, as RemoteHost does) and slurmctld.
The compute node is a second namespace joined to the login node only, by a
veth pair of its own, where slurmd runs under the node's own hostname
(``unshare --uts``). The laptop has no route to the compute node. Homes are
one file system, as on NFS. One munged serves both, on a socket of its own
(a socket is a file, which every namespace sees).

Every name carries the pytest pid (``nbc<pid>...``), so two suites can run
side by side, and what a killed earlier run left is reaped at start-up.
Slurm itself is configured entirely from a per-run directory: every Slurm
command finds it through SLURM_CONF, which the cluster user's login and
non-login shells export.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from helpers import find_pids, kill_pids, pid_alive, proc_cmdline, wait_until
from remotehost import (
    USER_COMMENT,
    RemoteHost,
    _descendants,
    _machine_lock,
    _netns_list,
    _remove_user,
    _root,
    _used_networks,
)

CLUSTER_POOL = ipaddress.ip_network("10.214.0.0/16")  # /30s for the login-compute link
HOSTS_FILE = Path("/etc/hosts")
HOSTS_MARK = "# nbtunnel test cluster"
WORKDIR_PREFIX = "nbtcluster-"
SLURM_PROGRAMS = ("slurmctld", "slurmd", "sbatch", "squeue", "scancel", "scontrol", "munged")


class ClusterUnavailable(RuntimeError):
    """This machine cannot host the cluster (no network namespaces)."""


def slurm_missing() -> str:
    """Why the cluster cannot be made here ('' when it can)."""
    missing = [name for name in SLURM_PROGRAMS if not shutil.which(name)]
    if missing:
        return f"{', '.join(missing)} not installed (apt-get install slurm-wlm munge; bash tests/run does)"
    if os.geteuid() != 0:
        return "the test cluster needs root (ip netns, useradd, slurmd): run bash tests/run"
    return ""


def _run_pid(name: str) -> int | None:
    """The pytest pid in a cluster name (user, namespace, veth, hostname), or None."""
    match = re.match(r"nbc(\d+)", name)
    return int(match.group(1)) if match else None


def _stale(pid: int | None) -> bool:
    return pid is not None and (pid == os.getpid() or not pid_alive(pid))


def _netns_pids(netns: str) -> list[int]:
    proc = _root(["ip", "netns", "pids", netns], check=False)
    return [int(word) for word in proc.stdout.split() if word.isdigit()]


def _kill_and_wait(pids: Sequence[int], timeout: float = 20.0) -> list[int]:
    """SIGTERM, then SIGKILL, until the processes are really gone (zombies count as gone)."""
    alive = kill_pids(pids, signal.SIGTERM, timeout=timeout / 2)
    return kill_pids(alive, signal.SIGKILL, timeout=timeout / 2) if alive else []


def _remove_netns(netns: str) -> None:
    """Kill every process inside netns, then delete it (its veth ends go with it)."""
    if netns not in _netns_list():
        return
    for _ in range(3):
        pids = _netns_pids(netns)
        if not pids:
            break
        _kill_and_wait(pids, timeout=10)
    _root(["ip", "netns", "del", netns], check=False)


def _hosts_remove(predicate) -> None:
    """Drop the lines of /etc/hosts that carry HOSTS_MARK and satisfy predicate(line)."""
    try:
        lines = HOSTS_FILE.read_text().splitlines(keepends=True)
    except OSError:
        return
    kept = [line for line in lines if not (HOSTS_MARK in line and predicate(line))]
    if kept != lines:
        # In place: /etc/hosts may be a bind mount that a rename would not replace.
        with open(HOSTS_FILE, "w") as handle:
            handle.writelines(kept)


def reap_stale_clusters(keep: Path | None = None) -> None:
    """Remove what earlier, killed runs of the cluster left (their pytest pid is gone)."""
    for pid in find_pids(WORKDIR_PREFIX + r"\d+-"):
        match = re.search(WORKDIR_PREFIX + r"(\d+)-", " ".join(proc_cmdline(pid)))
        if match and _stale(int(match.group(1))):
            _kill_and_wait([pid, *_descendants(pid)], timeout=10)
    for ns in _netns_list():
        if re.fullmatch(r"nbc\d+[ln]", ns) and _stale(_run_pid(ns)):
            _remove_netns(ns)
    for entry in pwd.getpwall():
        ours = entry.pw_gecos == USER_COMMENT and re.fullmatch(r"nbc\d+", entry.pw_name)
        if ours and _stale(_run_pid(entry.pw_name)):
            _remove_user(entry.pw_name)
    for line in _root(["ip", "-o", "link", "show"], check=False).stdout.splitlines():
        link = line.split(":")[1].strip().split("@")[0] if line.count(":") >= 2 else ""
        if re.fullmatch(r"nbc\d+[hr]", link) and _stale(_run_pid(link)):
            _root(["ip", "link", "del", link], check=False)
    _hosts_remove(lambda line: _stale(_run_pid(line.split(HOSTS_MARK)[1].strip())))
    for path in Path(tempfile.gettempdir()).glob(WORKDIR_PREFIX + "*-*"):
        match = re.match(WORKDIR_PREFIX + r"(\d+)-", path.name)
        if match and _stale(int(match.group(1))) and path != keep:
            shutil.rmtree(path, ignore_errors=True)


class SlurmCluster(RemoteHost):
    """RemoteHost whose host is the login node of a two-host Slurm cluster (see module doc)."""

    alias = "nbtlogin"
    unknown_alias = "nbtlogin-unknown"
    down_alias = "nbtlogin-down"
    password_alias = "nbtlogin-pw"
    cpus = 2
    real_memory = 2000  # MB; slurmd takes the configured values (config_overrides)
    partition = "batch"  # the default partition, all CPUs
    small_partition = "tiny"  # a second one, MaxTime=5 minutes

    def __init__(self) -> None:
        super().__init__()
        pid = os.getpid()
        # Names of our own: the ordinary test remote of this same run is nbt<pid>.
        shutil.rmtree(self.workdir, ignore_errors=True)
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{WORKDIR_PREFIX}{pid}-"))
        for name in ("ssh_config", "sshd_config", "sshd_log", "known_hosts",
                     "unknown_known_hosts", "identity", "host_key"):
            setattr(self, name, self.workdir / getattr(self, name).name)
        self.user = f"nbc{pid}"
        self.netns = f"nbc{pid}l"  # the login node
        self.veth_host = f"nbc{pid}h"
        self.veth_remote = f"nbc{pid}r"
        self.node_netns = f"nbc{pid}n"  # the compute node
        self.link_login = f"nbc{pid}a"  # login end of the cluster link
        self.link_node = f"nbc{pid}b"  # compute end
        self.login_name = f"nbc{pid}login"
        self.node_name = f"nbc{pid}node"
        self.login_addr = ""  # the login node's address on the cluster link
        self.node_addr = ""  # the compute node's (NodeAddr)
        self.ctld_port = 17000 + 2 * (pid % 4000)
        self.slurmd_port = self.ctld_port + 1
        self.slurm_dir = self.workdir / "slurm"
        self.slurm_conf = self.slurm_dir / "slurm.conf"
        self.munge_dir = self.workdir / "munge"
        self.munge_socket = self.munge_dir / "munge.socket"
        self.munged: subprocess.Popen | None = None
        self.slurmctld: subprocess.Popen | None = None
        self.slurmd: subprocess.Popen | None = None
        self.startup_seconds = 0.0
        self.node_hosts = self.workdir / "node-hosts"  # /etc/hosts as the compute node sees it

    # Set-up ###################################################################

    def start(self) -> None:
        """Network (both links), user, keys, sshd, /etc/hosts, munged, slurmctld, slurmd."""
        began = time.monotonic()
        with _machine_lock():
            reap_stale_clusters(keep=self.workdir)
            self._make_network()
            if self.fallback:
                raise ClusterUnavailable(
                    f"the test cluster needs network namespaces: {self.fallback_reason}"
                )
            self._make_cluster_link()
            self._add_hosts_lines()
        self.workdir.chmod(0o711)  # the cluster user reaches slurm/ and munge/ below it
        self._make_user()
        self._make_keys()
        self._write_configs()
        self._start_sshd()
        self._user_environment()
        self._start_munged()
        self._write_slurm_conf()
        self._start_slurm()
        self.startup_seconds = time.monotonic() - began

    def _in_netns(self, argv: Sequence[str]) -> list[str]:
        """Commands on the login node run in its namespace under its own hostname."""
        return self._in_host(self.netns, self.login_name, argv)

    @staticmethod
    def _in_host(netns: str | None, hostname: str, argv: Sequence[str]) -> list[str]:
        assert netns
        set_name = 'hostname "$0" && exec "$@"'
        return ["ip", "netns", "exec", netns, "unshare", "--uts", "sh", "-c", set_name,
                hostname, *argv]

    def in_node(self, argv: Sequence[str]) -> list[str]:
        """argv run as root on the compute node (its namespace, its hostname)."""
        return self._in_host(self.node_netns, self.node_name, argv)

    def node_daemon(self, argv: Sequence[str]) -> list[str]:
        """argv of the compute node's scheduler daemon: in_node, and in a mount namespace of
        its own where node_hosts is bind-mounted over /etc/hosts, so that the node's jobs
        (its children) resolve names as set_node_hosts says."""
        self.node_hosts.write_text(HOSTS_FILE.read_text())
        self.node_hosts.chmod(0o644)
        script = 'hostname "$0" && mount --bind "$1" /etc/hosts && shift && exec "$@"'
        return ["ip", "netns", "exec", self.node_netns, "unshare", "--uts", "--mount",
                "--propagation", "private", "sh", "-c", script, self.node_name,
                str(self.node_hosts), *argv]

    def set_node_hosts(self, text: str | None = None) -> None:
        """What /etc/hosts says on the compute node from now on (None: the machine's own),
        written in place: the bind mount holds the file, not its name."""
        with open(self.node_hosts, "w") as handle:
            handle.write(HOSTS_FILE.read_text() if text is None else text)

    def node_resolves(self, name: str) -> str:
        """What NAME resolves to on the compute node, as its jobs see it ('' if nothing)."""
        daemon = getattr(self, "slurmd", None) or getattr(self, "execd", None)
        proc = subprocess.run(["nsenter", "-t", str(daemon.pid), "-m", "-u", "-n",
                               "getent", "ahostsv4", name], capture_output=True, text=True,
                              timeout=30, check=False)
        return proc.stdout.split()[0] if proc.stdout.split() else ""

    def _make_cluster_link(self) -> None:
        used = _used_networks()
        subnets = list(CLUSTER_POOL.subnets(new_prefix=30))
        start = os.getpid() % len(subnets)
        subnet = next(
            (net for net in subnets[start:] + subnets[:start]
             if not any(net.overlaps(other) for other in used)),
            None,
        )
        if subnet is None:
            raise RuntimeError(f"no free /30 left in {CLUSTER_POOL}")
        self.login_addr, self.node_addr = (str(addr) for addr in subnet.hosts())
        login = f"ip netns exec {self.netns} "
        node = f"ip netns exec {self.node_netns} "
        for command in (
            f"ip netns add {self.node_netns}",
            login + f"ip link add {self.link_login} type veth peer name {self.link_node}",
            login + f"ip link set {self.link_node} netns {self.node_netns}",
            login + f"ip addr add {self.login_addr}/30 dev {self.link_login}",
            login + f"ip link set {self.link_login} up",
            node + f"ip addr add {self.node_addr}/30 dev {self.link_node}",
            node + f"ip link set {self.link_node} up",
            node + "ip link set lo up",
        ):
            _root(command.split())  # names and addresses hold no spaces

    def _add_hosts_lines(self) -> None:
        mark = f"{HOSTS_MARK} nbc{os.getpid()}"
        with open(HOSTS_FILE, "a") as handle:
            handle.write(f"{self.login_addr} {self.login_name} {mark}\n")
            handle.write(f"{self.node_addr} {self.node_name} {mark}\n")

    def _prepend_user_file(self, relative: str, text: str) -> None:
        path = self.home / relative
        old = path.read_text() if path.exists() else ""
        path.write_text(text + old)
        os.chown(path, self.uid, self.uid)

    def _user_environment(self) -> None:
        """SLURM_CONF for every shell of the user: login (~/.profile) and ssh commands (~/.bashrc top)."""
        line = f'SLURM_CONF="{self.slurm_conf}"\nexport SLURM_CONF\n'
        self._prepend_user_file(".profile", line)
        self._prepend_user_file(".bashrc", line)  # above Debian's early return
        self._append_user_file(".zshenv", f'export SLURM_CONF="{self.slurm_conf}"\n')
        self._append_user_file(".cshrc", f'setenv SLURM_CONF "{self.slurm_conf}"\n')

    def _start_munged(self) -> None:
        munge = pwd.getpwnam("munge")
        self.munge_dir.mkdir(mode=0o755)
        os.chown(self.munge_dir, munge.pw_uid, munge.pw_gid)
        key = self.munge_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chown(key, munge.pw_uid, munge.pw_gid)
        key.chmod(0o400)
        argv = [
            "runuser", "-u", "munge", "--", "munged", "--foreground",
            f"--socket={self.munge_socket}", f"--key-file={key}",
            f"--pid-file={self.munge_dir}/munged.pid",
            f"--log-file={self.munge_dir}/munged.log",
            f"--seed-file={self.munge_dir}/munged.seed",
        ]
        self.munged = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL)
        self._wait_started(self.munged, lambda: self.munge_socket.exists(), "munged",
                           self.munge_dir / "munged.log")

    def _write_slurm_conf(self) -> None:
        d = self.slurm_dir
        for sub in ("", "state", "spool", f"spool/{self.node_name}"):
            (d / sub).mkdir(mode=0o755, exist_ok=True)
        (d / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\nCgroupAutomount=no\n")
        node_line = (f"NodeName={self.node_name} NodeAddr={self.node_addr} "
                     f"NodeHostname={self.node_name} CPUs={self.cpus} RealMemory={self.real_memory} "
                     "State=UNKNOWN")
        self.slurm_conf.write_text(
            f"""\
ClusterName=nbc{os.getpid()}
SlurmctldHost={self.login_name}({self.login_addr})
SlurmctldPort={self.ctld_port}
SlurmdPort={self.slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd-%n.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU={self.real_memory // (2 * self.cpus)}
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=30
KillWait=5
OverTimeLimit=0
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
{node_line}
PartitionName={self.partition} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
PartitionName={self.small_partition} Nodes=ALL MaxTime=5 State=UP
"""
        )

    def _slurm_env(self) -> dict[str, str]:
        return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "SLURM_CONF": str(self.slurm_conf),
                "LANG": "C.UTF-8"}

    def _start_slurm(self) -> None:
        conf = str(self.slurm_conf)
        log = self.slurm_dir / "slurmctld.log"
        self.slurmctld = subprocess.Popen(
            self._in_netns(["slurmctld", "-D", "-f", conf]),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env=self._slurm_env(),
        )
        self._wait_started(self.slurmctld, lambda: self.scontrol("ping").returncode == 0,
                           "slurmctld", log)
        self.slurmd = subprocess.Popen(
            self.node_daemon(["slurmd", "-D", "-N", self.node_name, "-f", conf]),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env=self._slurm_env(),
        )
        self._wait_started(self.slurmd, lambda: self.node_state() == "idle", "slurmd",
                           self.slurm_dir / f"slurmd-{self.node_name}.log")

    def _wait_started(self, proc: subprocess.Popen, ready, what: str, log: Path,
                      timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                text = log.read_text(errors="replace")[-3000:] if log.exists() else ""
                raise RuntimeError(f"{what} did not start (exit {proc.poll()}):\n{text}")
            time.sleep(0.2)

    # Use ######################################################################

    def slurm(self, argv: Sequence[str], timeout: float = 30) -> subprocess.CompletedProcess:
        """A Slurm command run as root on the login node (the admin's view)."""
        return subprocess.run(
            self._in_netns(argv), capture_output=True, text=True, timeout=timeout,
            stdin=subprocess.DEVNULL, env=self._slurm_env(), check=False,
        )

    def ssh(self, command: str, timeout: float = 60, input: str | None = None,
            extra: Sequence[str] = ()) -> subprocess.CompletedProcess:
        """command run over a real ssh to the login node, as the cluster user sees it."""
        return subprocess.run(
            ["ssh", "-F", str(self.ssh_config), *extra, self.alias, command],
            capture_output=True, text=True, timeout=timeout, check=False,
            input=input, stdin=None if input is not None else subprocess.DEVNULL,
        )

    def scontrol(self, *args: str) -> subprocess.CompletedProcess:
        """scontrol ARGS as root on the login node."""
        return self.slurm(["scontrol", *args])

    def node_state(self) -> str:
        """The compute node's state as sinfo says it (idle, alloc, mix, down*, ...)."""
        proc = self.slurm(["sinfo", "-h", "-N", "-p", self.partition, "-o", "%T"])
        return proc.stdout.strip() if proc.returncode == 0 else ""

    def jobs(self) -> list[str]:
        """Ids of the cluster user's jobs that squeue still lists (any state)."""
        proc = self.slurm(["squeue", "-h", "-u", self.user, "-o", "%i"])
        return proc.stdout.split()

    def cancel_all_jobs(self, timeout: float = 60) -> list[str]:
        """scancel every job of the user, wait until none runs; return those left."""
        if not self.jobs():
            return []
        self.slurm(["scancel", "-u", self.user])

        def done() -> bool:
            proc = self.slurm(["squeue", "-h", "-u", self.user, "-t",
                               "PENDING,RUNNING,SUSPENDED,COMPLETING", "-o", "%i"])
            return proc.returncode == 0 and not proc.stdout.split()

        with contextlib.suppress(TimeoutError):
            wait_until(done, timeout, interval=0.5, message="jobs cancelled")
        return [] if done() else self.jobs()

    def node_run(self, argv: Sequence[str], timeout: float = 30,
                 user: bool = False) -> subprocess.CompletedProcess:
        """argv on the compute node, as root or (user=True) as the cluster user."""
        if user:
            argv = ["runuser", "-u", self.user, "--", *argv]
        return subprocess.run(self.in_node(argv), capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL, check=False)

    def node_pids(self) -> list[int]:
        """Live processes inside the compute node's namespace."""
        return [pid for pid in _netns_pids(self.node_netns) if pid_alive(pid)]

    # Tear-down ################################################################

    def stop(self) -> None:
        """Jobs, slurmd, slurmctld, munged, then what RemoteHost.stop removes, the node, /etc/hosts."""
        with contextlib.suppress(Exception):
            if self.slurmctld is not None and self.slurmctld.poll() is None:
                self.cancel_all_jobs(timeout=30)
        for proc in (self.slurmd, self.slurmctld):
            if proc is not None:
                _kill_and_wait([*_descendants(proc.pid), proc.pid])
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)
        _remove_netns(self.node_netns)  # slurmstepd and job processes left, if any
        for pid in _netns_pids(self.netns) if self.netns in _netns_list() else []:
            if self.sshd is None or pid != self.sshd.pid:
                _kill_and_wait([pid], timeout=5)
        if self.munged is not None:
            _kill_and_wait([self.munged.pid, *_descendants(self.munged.pid)])
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.munged.wait(timeout=5)
        super().stop()
        own = str(os.getpid())
        _hosts_remove(lambda line: line.split(HOSTS_MARK)[1].strip() == f"nbc{own}")

    def leftovers(self) -> list[str]:
        """What of the cluster still exists (nothing after stop())."""
        found = super().leftovers()
        if self.node_netns in _netns_list():
            found.append(f"network namespace {self.node_netns}")
        for what, proc in (("slurmctld", self.slurmctld), ("slurmd", self.slurmd),
                           ("munged", self.munged)):
            if proc is not None and pid_alive(proc.pid):
                found.append(f"{what} pid {proc.pid}")
        stray = find_pids(re.escape(str(self.workdir)))
        if stray:
            found.append(f"processes {stray}")
        if f"{HOSTS_MARK} nbc{os.getpid()}" in HOSTS_FILE.read_text():
            found.append("/etc/hosts lines")
        return found

    def describe(self) -> str:
        """One line saying what the cluster is."""
        return (
            f"test cluster: login node {self.login_name} (ns {self.netns}, ssh {self.ip}:22, "
            f"cluster address {self.login_addr}), compute node {self.node_name} (ns "
            f"{self.node_netns}, {self.node_addr}), user {self.user}, started in "
            f"{self.startup_seconds:.1f}s"
        )
