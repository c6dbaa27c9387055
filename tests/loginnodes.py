"""Several real login nodes behind one name, for the test suite.

``LoginNodes`` is a ``RemoteHost`` whose user is reached through a front on a
loopback port that hands each new connection to one of two login nodes, round
robin, or to the node a test chooses (``land_on``). Each node has its own network
namespace (and address), pid namespace (PID 1 is a tiny init that reaps orphans;
killing it ends the node and every process on it), mount namespace with its own
/tmp (so its own tmux server), and hostname. Homes are shared, as on NFS, and
both nodes have the same host key, known to the laptop under the front's name.

The nodes also reach each other over a link of their own, as the nodes of one
cluster do. Names carry nbl<pid>; addresses come from 10.218.0.0/16.
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
import sys
from pathlib import Path

from helpers import find_pids, kill_pids, pid_alive, proc_cmdline, wait_until
from remotehost import (
    SSHD,
    USER_COMMENT,
    RemoteHost,
    _descendants,
    _link_exists,
    _machine_lock,
    _netns_list,
    _remove_user,
    _root,
    _used_networks,
)
from unattended import TcpProxy

POOL = ipaddress.ip_network("10.218.0.0/16")
NODES = ("a", "b")
HOSTS_FILE = Path("/etc/hosts")
HOSTS_MARK = "# nbtunnel test login nodes"
# PID 1 of a node (tests/node_init.py), copied into the work directory: the node mounts
# a /tmp of its own, which hides a checkout or venv under /tmp, so the node runs Debian's
# own python3 on that copy.
NODE_PYTHON = "/usr/bin/python3"


def _stale(name: str) -> bool:
    match = re.fullmatch(r"nbl(\d+)[a-z0-9]*", name)
    return bool(match) and (int(match.group(1)) == os.getpid()
                            or not pid_alive(int(match.group(1))))


def _hosts_remove(predicate) -> None:
    """Drop the lines of /etc/hosts that carry HOSTS_MARK and satisfy predicate(line)."""
    lines = HOSTS_FILE.read_text().splitlines(keepends=True)
    kept = [line for line in lines if not (HOSTS_MARK in line and predicate(line))]
    if kept != lines:
        with open(HOSTS_FILE, "w") as handle:  # in place: it may be a bind mount
            handle.writelines(kept)


def _reap_stale_nodes() -> None:
    """Remove what an earlier, killed run of these nodes left behind."""
    _hosts_remove(lambda line: _stale("nbl" + line.split(HOSTS_MARK)[1].split()[0]))
    for pid in find_pids(r"/var/tmp/nbl\d+-nodes/"):
        match = re.search(r"/var/tmp/nbl(\d+)-nodes/", " ".join(proc_cmdline(pid)))
        if match and _stale(f"nbl{match.group(1)}"):
            kill_pids([pid, *_descendants(pid)], timeout=5)
    for entry in pwd.getpwall():
        if entry.pw_gecos == USER_COMMENT and _stale(entry.pw_name):
            _remove_user(entry.pw_name)
    for ns in _netns_list():
        if _stale(ns):
            _root(["ip", "netns", "del", ns], check=False)
    for line in _root(["ip", "-o", "link", "show"], check=False).stdout.splitlines():
        link = line.split(":")[1].strip().split("@")[0] if line.count(":") >= 2 else ""
        if _stale(link):
            _root(["ip", "link", "del", link], check=False)
    for path in Path("/var/tmp").glob("nbl*-nodes"):
        if _stale(path.name[: -len("-nodes")]):
            subprocess.run(["rm", "-rf", str(path)], check=False)


def _pick_subnets(count: int) -> list[ipaddress.IPv4Network]:
    used = _used_networks()
    subnets = list(POOL.subnets(new_prefix=30))
    start = (os.getpid() * 4) % len(subnets)
    free = [s for s in subnets[start:] + subnets[:start]
            if not any(s.overlaps(net) for net in used)]
    if len(free) < count:
        raise RuntimeError(f"no {count} free /30s left in {POOL}")
    return free[:count]


class Front(TcpProxy):
    """The one name: each new connection goes to the next node, or to the one chosen."""

    def __init__(self, nodes: list[tuple[str, int]]) -> None:
        self.nodes, self.chosen, self.turn, self.down = nodes, None, 0, set()
        super().__init__(nodes[0])

    @property
    def target(self) -> tuple[str, int]:
        if self.chosen is not None:
            return self.chosen
        up = [n for n in self.nodes if n not in self.down] or self.nodes  # as a balancer checks
        self.turn += 1
        return up[self.turn % len(up)]

    @target.setter
    def target(self, value) -> None:
        pass  # TcpProxy sets it once; the nodes decide


class LoginNodes(RemoteHost):
    """Two login nodes (``a`` and ``b``) behind one name (``alias``)."""

    alias = "nblogin"  # the front: a balancer on a loopback port
    rr_alias = "nblogin-rr"  # round-robin DNS: a name with both nodes' addresses

    def __init__(self) -> None:
        super().__init__()
        pid = os.getpid()
        Path(self.workdir).rmdir()  # made in /tmp, which the nodes hide
        self.workdir = Path(f"/var/tmp/nbl{pid}-nodes")
        for name in ("ssh_config", "sshd_config", "sshd_log", "known_hosts",
                     "unknown_known_hosts", "identity", "host_key"):
            setattr(self, name, self.workdir / getattr(self, name).name)
        self.user = f"nbl{pid}"
        self.netns = None
        self.node_ns = {n: f"nbl{pid}{n}" for n in NODES}
        self.hostnames = {n: f"nbl{pid}-login-{n}" for n in NODES}
        self.rr_name = f"nbl{pid}-rr"
        self.addresses: dict[str, str] = {}
        self.inits: dict[str, subprocess.Popen] = {}
        self.front: Front | None = None

    # Set-up ###################################################################

    def start(self) -> None:
        if os.environ.get("NBTUNNEL_TEST_NO_NETNS"):
            raise RuntimeError("login nodes need network namespaces")
        with _machine_lock():
            _reap_stale_nodes()
            self.workdir.mkdir(mode=0o755)
            self._make_nodes_network()
        shutil.copy(Path(__file__).with_name("node_init.py"), self.workdir / "init.py")
        self.front = Front([(self.addresses[n], 22) for n in NODES])
        self.ip, self.port = "127.0.0.1", self.front.port
        self._make_user()
        self._make_keys()
        self._write_configs()
        for node in NODES:
            self.start_node(node)

    def _make_nodes_network(self) -> None:
        subnets = _pick_subnets(len(NODES) + 1)
        pid = os.getpid()
        ends = []
        for node, subnet in zip(NODES, subnets):
            ns, outer, inner = self.node_ns[node], f"nbl{pid}{node}0", f"nbl{pid}{node}1"
            host_ip, node_ip = (str(a) for a in subnet.hosts())
            _root(["ip", "netns", "add", ns])
            for command in (f"ip link add {outer} type veth peer name {inner}",
                            f"ip link set {inner} netns {ns}",
                            f"ip addr add {host_ip}/30 dev {outer}", f"ip link set {outer} up",
                            f"ip netns exec {ns} ip addr add {node_ip}/30 dev {inner}",
                            f"ip netns exec {ns} ip link set {inner} up",
                            f"ip netns exec {ns} ip link set lo up"):
                _root(command.split())
            self.addresses[node] = node_ip
            ends.append((ns, f"nbl{pid}{node}2"))
        # The nodes' own link: each reaches the other's address through it.
        (ns_a, end_a), (ns_b, end_b) = ends
        ip_a, ip_b = (str(a) for a in subnets[-1].hosts())
        self.peer_via = {"a": ip_b, "b": ip_a}  # where each node sends packets for the other
        for command in (f"ip link add {end_a} type veth peer name {end_b}",
                        f"ip link set {end_a} netns {ns_a}", f"ip link set {end_b} netns {ns_b}",
                        f"ip netns exec {ns_a} ip addr add {ip_a}/30 dev {end_a}",
                        f"ip netns exec {ns_b} ip addr add {ip_b}/30 dev {end_b}",
                        f"ip netns exec {ns_a} ip link set {end_a} up",
                        f"ip netns exec {ns_b} ip link set {end_b} up",
                        f"ip netns exec {ns_a} ip route add {self.addresses['b']}/32 via {ip_b}",
                        f"ip netns exec {ns_b} ip route add {self.addresses['a']}/32 via {ip_a}"):
            _root(command.split())

    def _write_configs(self) -> None:
        self._hosts_lines(NODES)
        with open(self.known_hosts, "a") as handle:  # the name's key, as DNS names it
            public = " ".join(Path(f"{self.host_key}.pub").read_text().split()[:2])
            handle.write(f"{self.rr_name} {public}\n")
        for node in NODES:
            self.node_file(node, "sshd_config").write_text(f"""\
Port 22
ListenAddress {self.addresses[node]}
HostKey {self.host_key}
PidFile {self.workdir}/sshd-{node}.pid
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
AuthorizedKeysFile .ssh/authorized_keys
PermitRootLogin no
StrictModes no
AllowTcpForwarding yes
AllowStreamLocalForwarding yes
X11Forwarding no
PrintMotd no
PrintLastLog no
LogLevel VERBOSE
""")
        self.ssh_config.write_text(self.ssh_config_block(self.alias) + self.ssh_config_block(
            self.rr_alias, HostName=self.rr_name, Port=22))

    def _hosts_lines(self, order) -> None:
        """The round-robin name in /etc/hosts: one line per node address, in ORDER (ssh
        connects to the first address that answers)."""
        mark = f"{HOSTS_MARK} {os.getpid()}"
        with _machine_lock():
            lines = [line for line in HOSTS_FILE.read_text().splitlines(keepends=True)
                     if mark not in line]
            lines += [f"{self.addresses[n]} {self.rr_name} {mark}\n" for n in order]
            with open(HOSTS_FILE, "w") as handle:  # in place: it may be a bind mount
                handle.writelines(lines)

    def node_file(self, node: str, name: str) -> Path:
        return self.workdir / f"{name}-{node}"

    def start_node(self, node: str) -> None:
        """Boot NODE: its init as PID 1 of a pid namespace, its own /tmp and hostname, sshd."""
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        boot = (f"hostname {self.hostnames[node]} && mount -t tmpfs -o mode=1777 tmpfs /tmp "
                f"&& exec {NODE_PYTHON} {self.workdir}/init.py {SSHD} -D "
                f"-f {self.node_file(node, 'sshd_config')} -E {self.node_file(node, 'sshd_log')}")
        if self.front is not None:
            self.front.down.discard((self.addresses[node], 22))
        self.inits[node] = subprocess.Popen(
            ["ip", "netns", "exec", self.node_ns[node], "unshare", "--pid", "--fork", "--uts",
             "--mount", "--mount-proc", "--propagation", "private", "sh", "-c", boot],
            stdin=subprocess.DEVNULL)
        wait_until(lambda: self.node_port_open(node), 20, message=f"sshd of node {node}")

    def node_port_open(self, node: str) -> bool:
        probe = "import socket,sys; socket.create_connection((sys.argv[1], 22), timeout=1)"
        argv = ["ip", "netns", "exec", self.node_ns[node], sys.executable, "-c", probe,
                self.addresses[node]]
        return _root(argv, check=False).returncode == 0

    # Use ######################################################################

    def land_on(self, node: str | None) -> None:
        """Send every new connection to the name to NODE (None: round robin); the
        round-robin name then lists NODE's address first."""
        assert self.front is not None
        self.front.chosen = None if node is None else (self.addresses[node], 22)
        self._hosts_lines(sorted(NODES, key=lambda n: n != node))

    def reach_peer(self, node: str, reach: bool) -> None:
        """Let NODE reach the other node's address, or not (a firewall between them)."""
        other = next(n for n in NODES if n != node)
        verb = "replace" if reach else "del"
        _root(["ip", "netns", "exec", self.node_ns[node], "ip", "route", verb,
               f"{self.addresses[other]}/32", "via", self.peer_via[node]], check=reach)

    def reach_from_here(self, node: str, reach: bool) -> None:
        """Let this machine reach NODE's address, or not (no route: only the name leads
        there); the front, which leads to the nodes too, must then land elsewhere."""
        verb = "del" if reach else "replace"
        _root(["ip", "route", verb, "unreachable", f"{self.addresses[node]}/32"], check=False)

    def forwarding(self, node: str, allowed: bool) -> None:
        """Restart NODE's sshd with TCP forwarding allowed or not (its processes end)."""
        config = self.node_file(node, "sshd_config")
        text = config.read_text().replace("AllowTcpForwarding no", "AllowTcpForwarding yes")
        config.write_text(text if allowed else text.replace(
            "AllowTcpForwarding yes", "AllowTcpForwarding no"))
        self.take_down(node)
        self.start_node(node)

    def own_host_key(self, node: str, own: bool) -> None:
        """Restart NODE's sshd with a host key of its own (a node that is not the one the
        name's key vouches for), or with the shared key again (its processes end)."""
        key = self.node_file(node, "host_key")
        if own and not key.exists():
            _root(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "other", "-f", str(key)])
        config = self.node_file(node, "sshd_config")
        text = config.read_text().replace(f"HostKey {key}\n", f"HostKey {self.host_key}\n")
        config.write_text(text.replace(f"HostKey {self.host_key}\n", f"HostKey {key}\n")
                          if own else text)
        self.take_down(node)
        self.start_node(node)

    def node_of(self, pid: int) -> str | None:
        """The node whose pid namespace holds PID."""
        try:
            mine = os.readlink(f"/proc/{pid}/ns/pid")
        except OSError:
            return None
        for node, init in self.inits.items():
            for child in _descendants(init.pid)[:2]:
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{child}/ns/pid") == mine:
                        return node
        return None

    def jupyters(self) -> dict[str, list[int]]:
        """The live Jupyter servers of the user, by node."""
        from helpers import jupyter_pids

        found: dict[str, list[int]] = {n: [] for n in NODES}
        for pid in jupyter_pids(self):
            found.setdefault(self.node_of(pid) or "?", []).append(pid)
        return found

    def auth_count(self, method: str = "publickey", node: str | None = None) -> int:
        needle = f"Accepted {method} for {self.user} "
        total = 0
        for name in [node] if node else NODES:
            with contextlib.suppress(FileNotFoundError):
                total += self.node_file(name, "sshd_log").read_text(errors="replace").count(needle)
        return total

    def take_down(self, node: str) -> None:
        """The node goes down: its init, and with it every process of its pid namespace."""
        init = self.inits.pop(node, None)
        if init is None:
            return
        assert self.front is not None
        self.front.down.add((self.addresses[node], 22))
        inner = _descendants(init.pid)
        kill_pids([*inner, init.pid], signal.SIGKILL, timeout=15)
        with contextlib.suppress(subprocess.TimeoutExpired):
            init.wait(timeout=10)
        wait_until(lambda: not self.node_port_open(node), 15, message=f"node {node} down")

    def tmux_sessions(self) -> list[str]:
        return []  # each node has its own tmux server; see jupyters()

    def reload_sshd(self) -> None:
        raise NotImplementedError

    # Tear-down ################################################################

    def stop(self) -> None:
        self.kill_user_processes()
        for node in self.addresses:
            self.reach_from_here(node, True)
        for node in list(self.inits):
            self.take_down_quietly(node)
        if self.front is not None:
            self.front.cut()
        _remove_user(self.user)
        _hosts_remove(lambda line: f"{HOSTS_MARK} {os.getpid()}" in line)
        for ns in self.node_ns.values():
            if ns in _netns_list():
                _root(["ip", "netns", "del", ns], check=False)
        for node in NODES:
            link = f"nbl{os.getpid()}{node}0"
            if _link_exists(link):
                _root(["ip", "link", "del", link], check=False)
        subprocess.run(["rm", "-rf", str(self.workdir)], check=False)

    def take_down_quietly(self, node: str) -> None:
        init = self.inits.pop(node)
        kill_pids([*_descendants(init.pid), init.pid], signal.SIGKILL, timeout=15)
        with contextlib.suppress(subprocess.TimeoutExpired):
            init.wait(timeout=10)

    def leftovers(self) -> list[str]:
        found = [f"network namespace {ns}" for ns in self.node_ns.values()
                 if ns in _netns_list()]
        found += [f"node {n} pid {p.pid}" for n, p in self.inits.items() if pid_alive(p.pid)]
        if self.workdir.exists():
            found.append(f"directory {self.workdir}")
        return found

    def describe(self) -> str:
        return (f"login nodes: {', '.join(f'{self.hostnames[n]} at {self.addresses[n]}' for n in NODES)}"
                f" behind 127.0.0.1:{self.port}, user {self.user}")

