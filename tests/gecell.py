"""A real two-host Grid Engine cell on this machine, for the tests.

Laid out like the Slurm cluster of tests/cluster.py, whose network and user set-up
it reuses: the login node is a network namespace with an sshd (reached from
this machine, "the laptop") and sge_qmaster; the execution host is a second
namespace joined to the login node only, where sge_execd runs under the node's
own hostname (``unshare --uts``). Homes are one file system, as on NFS.

The cell is made from scratch in a per-run directory, as Debian's
gridengine-master postinst does it for /var/lib/gridengine (spoolinit,
spooldefaults) but with classic (flat file) spooling, its own SGE_ROOT (links
to the installed binaries), SGE_CELL and ports, so that the packages' own cell
and services are never touched. Grid Engine insists that host names resolve
the same way everywhere: both nodes get /etc/hosts lines (marked, removed at
the end), act_qmaster names the login node, and ignore_fqdn is on.

Every name carries the pytest pid (``nbg<pid>...``), so this cell, the Slurm
cluster and the plain test remote of the same or other runs live side by
side; what a killed earlier run left is reaped at start-up.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import pwd
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from cluster import (
    HOSTS_FILE,
    SlurmCluster,
    _kill_and_wait,
    _netns_pids,
    _remove_netns,
    _stale,
)
from helpers import find_pids, pid_alive, proc_cmdline, wait_until
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

CELL_POOL = ipaddress.ip_network("10.216.0.0/16")  # /30s for the login-execution host link
HOSTS_MARK = "# nbtunnel test grid engine cell"
PREFIX = "nbg"
GE_PROGRAMS = ("sge_qmaster", "sge_execd", "qsub", "qstat", "qdel", "qconf")
GE_LIB = Path("/usr/lib/gridengine")  # spoolinit, spooldefaults (Debian)
GE_SHARE = Path("/usr/share/gridengine")
GE_ARCH_ROOT = Path("/var/lib/gridengine")  # bin/ARCH, lib/ARCH, utilbin/ARCH links
PORT_BASE = 26000  # sge_qmaster, sge_execd: PORT_BASE + 2 * (pid % 2000), and one more


def gridengine_missing() -> str:
    """Why the cell cannot be made here ('' when it can)."""
    missing = [name for name in GE_PROGRAMS if not shutil.which(name, path="/usr/sbin:/usr/bin")]
    if missing or not (GE_LIB / "spoolinit").exists():
        return (f"{', '.join(missing) or 'spoolinit'} not installed (apt-get install "
                "gridengine-master gridengine-exec gridengine-client; bash tests/run does)")
    if os.geteuid() != 0:
        return "the test cell needs root (ip netns, useradd, sge_execd): run bash tests/run"
    return ""


def _run_pid(name: str) -> int | None:
    """The pytest pid in a cell name (user, namespace, veth, hostname, directory), or None."""
    match = re.match(PREFIX + r"(\d+)", name)
    return int(match.group(1)) if match else None


def _hosts_remove(predicate) -> None:
    """Drop the lines of /etc/hosts that carry HOSTS_MARK and satisfy predicate(line)."""
    try:
        lines = HOSTS_FILE.read_text().splitlines(keepends=True)
    except OSError:
        return
    kept = [line for line in lines if not (HOSTS_MARK in line and predicate(line))]
    if kept != lines:
        with open(HOSTS_FILE, "w") as handle:  # in place: /etc/hosts may be a bind mount
            handle.writelines(kept)


def reap_stale_cells(keep: Path | None = None) -> None:
    """Remove what earlier, killed runs of the cell left (their pytest pid is gone)."""
    tmp = tempfile.gettempdir()
    for pid in find_pids(re.escape(tmp) + "/" + PREFIX + r"\d+-"):
        match = re.search(PREFIX + r"(\d+)-", " ".join(proc_cmdline(pid)))
        if match and _stale(int(match.group(1))):
            _kill_and_wait([pid, *_descendants(pid)], timeout=10)
    for ns in _netns_list():
        if re.fullmatch(PREFIX + r"\d+[ln]", ns) and _stale(_run_pid(ns)):
            _remove_netns(ns)
    for entry in pwd.getpwall():
        ours = entry.pw_gecos == USER_COMMENT and re.fullmatch(PREFIX + r"\d+", entry.pw_name)
        if ours and _stale(_run_pid(entry.pw_name)):
            _remove_user(entry.pw_name)
    for line in _root(["ip", "-o", "link", "show"], check=False).stdout.splitlines():
        link = line.split(":")[1].strip().split("@")[0] if line.count(":") >= 2 else ""
        if re.fullmatch(PREFIX + r"\d+[hr]", link) and _stale(_run_pid(link)):
            _root(["ip", "link", "del", link], check=False)
    _hosts_remove(lambda line: _stale(_run_pid(line.split(HOSTS_MARK)[1].strip())))
    for path in Path(tmp).glob(PREFIX + "*-*"):
        match = re.fullmatch(PREFIX + r"(\d+)-\w+", path.name)
        if match and _stale(int(match.group(1))) and path != keep:
            shutil.rmtree(path, ignore_errors=True)


class GridEngineCell(SlurmCluster):
    """RemoteHost whose host is the login node (qmaster, submit host) of a two-host cell."""

    slots = 2  # of the one queue, all.q, on the execution host
    memory = "2G"  # the host's mem_req, a consumable: more per job can never run
    queue = "all.q"
    pe = "smp"

    def __init__(self) -> None:  # noqa: D107 (names only; SlurmCluster's are replaced)
        RemoteHost.__init__(self)
        pid = os.getpid()
        tag = f"{PREFIX}{pid}"
        shutil.rmtree(self.workdir, ignore_errors=True)
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{tag}-"))
        for name in ("ssh_config", "sshd_config", "sshd_log", "known_hosts",
                     "unknown_known_hosts", "identity", "host_key"):
            setattr(self, name, self.workdir / getattr(self, name).name)
        self.user = tag
        self.netns = f"{tag}l"
        self.veth_host, self.veth_remote = f"{tag}h", f"{tag}r"
        self.node_netns = f"{tag}n"
        self.link_login, self.link_node = f"{tag}a", f"{tag}b"
        self.login_name, self.node_name = f"{tag}login", f"{tag}node"
        self.login_addr = self.node_addr = ""
        self.qmaster_port = PORT_BASE + 2 * (pid % 2000)
        self.execd_port = self.qmaster_port + 1
        self.sge_root = self.workdir / "sge"
        self.cell = "nbg"
        self.common = self.sge_root / self.cell / "common"
        self.spool = self.workdir / "spool"
        self.qmaster: subprocess.Popen | None = None
        self.execd: subprocess.Popen | None = None
        self.startup_seconds = 0.0

    # Set-up ###################################################################

    def start(self) -> None:
        """Network (both links), user, keys, sshd, /etc/hosts, the cell, qmaster, execd."""
        began = time.monotonic()
        with _machine_lock():
            reap_stale_cells(keep=self.workdir)
            self._make_network()
            if self.fallback:
                from cluster import ClusterUnavailable

                raise ClusterUnavailable(
                    f"the test cell needs network namespaces: {self.fallback_reason}")
            self._make_cell_link()
            self._add_hosts_lines()
        self.workdir.chmod(0o711)  # the user reaches sge/ below it
        self._make_user()
        self._make_keys()
        self._write_configs()
        self._start_sshd()
        self._make_cell()
        self._user_environment()
        self._start_daemons()
        self.startup_seconds = time.monotonic() - began

    def _make_cell_link(self) -> None:
        used = _used_networks()
        subnets = list(CELL_POOL.subnets(new_prefix=30))
        start = os.getpid() % len(subnets)
        subnet = next((net for net in subnets[start:] + subnets[:start]
                       if not any(net.overlaps(other) for other in used)), None)
        if subnet is None:
            raise RuntimeError(f"no free /30 left in {CELL_POOL}")
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
            _root(command.split())

    def _add_hosts_lines(self) -> None:
        mark = f"{HOSTS_MARK} {PREFIX}{os.getpid()}"
        with open(HOSTS_FILE, "a") as handle:
            handle.write(f"{self.login_addr} {self.login_name} {mark}\n")
            handle.write(f"{self.node_addr} {self.node_name} {mark}\n")

    def ge_env(self) -> dict[str, str]:
        """What every Grid Engine program of the cell needs (a site's settings.sh)."""
        return {"SGE_ROOT": str(self.sge_root), "SGE_CELL": self.cell,
                "SGE_QMASTER_PORT": str(self.qmaster_port),
                "SGE_EXECD_PORT": str(self.execd_port)}

    def _make_cell(self) -> None:
        """SGE_ROOT (links to the installed binaries), the cell's common directory, and
        the qmaster's spool, filled by Grid Engine's own spoolinit and spooldefaults."""
        self.common.mkdir(parents=True)
        for sub in ("bin", "lib", "utilbin"):
            (self.sge_root / sub).symlink_to(GE_ARCH_ROOT / sub)
        (self.sge_root / "util").symlink_to(GE_SHARE / "util")
        (self.spool / "qmaster").mkdir(parents=True)
        (self.spool / "execd").mkdir()
        (self.common / "bootstrap").write_text(f"""\
admin_user              none
default_domain          none
ignore_fqdn             true
spooling_method         classic
spooling_lib            libspoolc
spooling_params         {self.common};{self.spool}/qmaster
binary_path             /usr/sbin
qmaster_spool_dir       {self.spool}/qmaster
security_mode           none
listener_threads        2
worker_threads          2
scheduler_threads       1
""")
        (self.common / "act_qmaster").write_text(self.login_name + "\n")
        env = self.ge_env()
        (self.common / "settings.sh").write_text(
            "".join(f"{k}={v}; export {k}\n" for k, v in env.items()))
        conf = (GE_SHARE / "default-configuration").read_text()
        conf = conf.replace("/var/spool/gridengine/execd", str(self.spool / "execd"))
        conf = re.sub(r"(?m)^mailer .*", "mailer /bin/true", conf)
        conf = re.sub(r"(?m)^load_report_time .*", "load_report_time 00:00:05", conf)
        global_conf = self.workdir / "global.conf"
        global_conf.write_text(conf)
        full_env = dict(self._base_env(), **env)
        for argv in (
            ["spoolinit", "classic", "libspoolc", f"{self.common};{self.spool}/qmaster", "init"],
            ["spooldefaults", "configuration", str(global_conf)],
            ["spooldefaults", "complexes", str(GE_SHARE / "util/resources/centry")],
            ["spooldefaults", "usersets", str(GE_SHARE / "util/resources/usersets")],
            ["spooldefaults", "managers", "root"],
        ):
            argv[0] = str(GE_LIB / argv[0])
            proc = subprocess.run(argv, capture_output=True, text=True, env=full_env,
                                  check=False, stdin=subprocess.DEVNULL, timeout=60)
            if proc.returncode != 0:
                raise RuntimeError(f"{' '.join(argv)}: {proc.stdout}{proc.stderr}")
        for path in (self.sge_root, self.sge_root / self.cell, self.common):
            path.chmod(0o755)
        for path in self.common.iterdir():
            if path.is_file():
                path.chmod(0o644)

    @staticmethod
    def _base_env() -> dict[str, str]:
        return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}

    def _user_environment(self) -> None:
        """The cell's settings for every shell of the user, as sites source settings.sh."""
        line = f'. "{self.common}/settings.sh"\n'
        self._prepend_user_file(".profile", line)
        self._prepend_user_file(".bashrc", line)  # above Debian's early return
        self._append_user_file(".zshenv", line)
        self._append_user_file(".cshrc", "".join(
            f'setenv {k} "{v}"\n' for k, v in self.ge_env().items()))

    def _start_daemons(self) -> None:
        env = dict(self._base_env(), **self.ge_env(), SGE_ND="1")  # SGE_ND: no daemon fork
        messages = self.spool / "qmaster" / "messages"
        self.qmaster = subprocess.Popen(
            self._in_netns(["/usr/sbin/sge_qmaster"]), cwd=self.workdir, env=env,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._wait_started(self.qmaster, lambda: self.qconf("-sh").returncode == 0,
                           "sge_qmaster", messages)
        self._configure()
        self.execd = subprocess.Popen(
            self.in_node(["/usr/sbin/sge_execd"]), cwd=self.workdir, env=env,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._wait_started(self.execd, self.node_ready, "sge_execd",
                           self.spool / "execd" / self.node_name / "messages")

    def _conf_file(self, name: str, text: str) -> str:
        path = self.workdir / name
        path.write_text(text)
        return str(path)

    def _configure(self) -> None:
        """Hosts, a consumable h_vmem, the smp parallel environment, all.q, a fast scheduler."""
        def must(*args: str) -> str:
            proc = self.qconf(*args)
            if proc.returncode != 0:
                raise RuntimeError(f"qconf {' '.join(args)}: {proc.stdout}{proc.stderr}")
            return proc.stdout

        must("-ah", self.node_name)
        must("-as", self.login_name)
        # A site's memory complex (h_vmem stays a plain limit: it caps virtual memory, and
        # a consumable default would cap Jupyter's).
        complexes = must("-sc") + "mem_req mem_req MEMORY <= YES YES 0 0\n"
        must("-Mc", self._conf_file("complexes", complexes))
        must("-Ae", self._conf_file("exechost", f"""\
hostname {self.node_name}
load_scaling NONE
complex_values mem_req={self.memory}
user_lists NONE
xuser_lists NONE
projects NONE
xprojects NONE
usage_scaling NONE
report_variables NONE
"""))
        must("-Ahgrp", self._conf_file("allhosts", f"group_name @allhosts\nhostlist {self.node_name}\n"))
        must("-Ap", self._conf_file("pe", f"""\
pe_name {self.pe}
slots 99
user_lists NONE
xuser_lists NONE
start_proc_args NONE
stop_proc_args NONE
allocation_rule $pe_slots
control_slaves FALSE
job_is_first_task TRUE
urgency_slots min
accounting_summary FALSE
qsort_args NONE
"""))
        queue = must("-sq")  # the template
        for key, value in (("qname", self.queue), ("hostlist", "@allhosts"),
                           ("slots", str(self.slots)), ("pe_list", self.pe),
                           ("shell", "/bin/sh"), ("load_thresholds", "NONE")):
            queue = re.sub(rf"(?m)^{key}\s.*$", f"{key} {value}", queue)
        must("-Aq", self._conf_file("queue", queue))
        sched = must("-ssconf")
        for key, value in (("schedule_interval", "0:0:1"), ("flush_submit_sec", "1"),
                           ("flush_finish_sec", "1"), ("schedd_job_info", "true")):
            sched = re.sub(rf"(?m)^{key}\s.*$", f"{key} {value}", sched)
        must("-Msconf", self._conf_file("sched", sched))

    # Use ######################################################################

    def ge(self, argv: Sequence[str], timeout: float = 30) -> subprocess.CompletedProcess:
        """A Grid Engine command run as root (a manager) on the login node."""
        return subprocess.run(
            self._in_netns(argv), capture_output=True, text=True, timeout=timeout,
            stdin=subprocess.DEVNULL, env=dict(self._base_env(), **self.ge_env()), check=False,
            cwd=self.workdir)

    def qconf(self, *args: str) -> subprocess.CompletedProcess:
        """qconf ARGS as root on the login node."""
        return self.ge(["qconf", *args])

    def node_ready(self) -> bool:
        """The execution host reports load, and its queue instance is not in a bad state."""
        proc = self.ge(["qstat", "-f", "-q", self.queue])
        line = next((ln for ln in proc.stdout.splitlines()
                     if ln.startswith(f"{self.queue}@{self.node_name}")), "")
        return bool(line) and len(line.split()) == 5 and line.split()[3] != "-NA-"

    def qstat_rows(self) -> list[dict[str, str]]:
        """The user's jobs as qstat lists them: job_id, name, state."""
        import xml.etree.ElementTree as ET

        proc = self.ge(["qstat", "-xml", "-u", self.user])
        if proc.returncode != 0 or not proc.stdout.strip():
            return []
        return [{"job_id": el.findtext("JB_job_number") or "", "name": el.findtext("JB_name")
                 or "", "state": el.findtext("state") or ""}
                for el in ET.fromstring(proc.stdout).iter("job_list")]

    def jobs(self) -> list[str]:
        """Ids of the user's jobs that qstat still lists (any state)."""
        return [row["job_id"] for row in self.qstat_rows()]

    def cancel_all_jobs(self, timeout: float = 60) -> list[str]:
        """qdel every job of the user (forced), wait until none is left; return those left."""
        if not self.jobs():
            return []
        self.ge(["qdel", "-f", "-u", self.user])
        with contextlib.suppress(TimeoutError):
            wait_until(lambda: not self.jobs(), timeout, interval=0.5, message="jobs gone")
        return self.jobs()

    # Tear-down ################################################################

    def stop(self) -> None:
        """Jobs, execd, qmaster, then what RemoteHost.stop removes, the node, /etc/hosts."""
        with contextlib.suppress(Exception):
            if self.qmaster is not None and self.qmaster.poll() is None:
                self.cancel_all_jobs(timeout=30)
        for proc in (self.execd, self.qmaster):
            if proc is not None:
                _kill_and_wait([*_descendants(proc.pid), proc.pid])
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)
        _remove_netns(self.node_netns)  # shepherds and job processes left, if any
        for pid in _netns_pids(self.netns) if self.netns in _netns_list() else []:
            if self.sshd is None or pid != self.sshd.pid:
                _kill_and_wait([pid], timeout=5)
        RemoteHost.stop(self)
        own = f"{PREFIX}{os.getpid()}"
        _hosts_remove(lambda line: line.split(HOSTS_MARK)[1].strip() == own)

    def leftovers(self) -> list[str]:
        """What of the cell still exists (nothing after stop())."""
        found = RemoteHost.leftovers(self)
        if self.node_netns in _netns_list():
            found.append(f"network namespace {self.node_netns}")
        for what, proc in (("sge_qmaster", self.qmaster), ("sge_execd", self.execd)):
            if proc is not None and pid_alive(proc.pid):
                found.append(f"{what} pid {proc.pid}")
        stray = find_pids(re.escape(str(self.workdir)))
        if stray:
            found.append(f"processes {stray}")
        if f"{HOSTS_MARK} {PREFIX}{os.getpid()}" in HOSTS_FILE.read_text():
            found.append("/etc/hosts lines")
        return found

    def describe(self) -> str:
        """One line saying what the cell is."""
        return (
            f"test Grid Engine cell: login node {self.login_name} (ns {self.netns}, ssh "
            f"{self.ip}:22, qmaster port {self.qmaster_port}, cell address {self.login_addr}), "
            f"execution host {self.node_name} (ns {self.node_netns}, {self.node_addr}), user "
            f"{self.user}, started in {self.startup_seconds:.1f}s"
        )
