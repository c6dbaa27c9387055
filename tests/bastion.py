"""A host reached only through a port forward, whose internal address is silently dropped.

``ForwardedHost`` is a ``RemoteHost`` (its own network namespace, sshd at its internal
address, port 22) that the laptop reaches through a port forward on a loopback port, as
through a bastion's ``-L``: its ssh config says ``HostName 127.0.0.1``, ``Port <forward>``.
The forward is a small relay (tests/relay.py) run as nobody, which connects from an
address of its own (``relay_source``), so sshd's log tells each way a login came.

``drop(True)`` makes the internal address a black hole for root, who runs the laptop's
side: a policy rule for uid 0 looks up a table of this run that routes the address
into a veth whose peer sits in an empty namespace (a permanent neighbour entry, so not
even ARP answers). A connection from root then hangs with no error and no answer, as to
an address of another network; the veth's tx_packets (``sunk()``) counts every packet
sent there. The relay (uid nobody) still gets through, and so does what the kernel
sends on behalf of its connections (a last ACK, a reset: the kernel sends those as
root): a rule before the drop sends every packet from the relay's address the usual way.

Names carry nbf<pid>; the rule's table is TABLE_BASE + pid. What a killed run left
(namespaces, veths, rule, table, relay, user, files) is removed at the next start.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import subprocess
from pathlib import Path

from helpers import find_pids, kill_pids, pid_alive, proc_cmdline
from remotehost import (
    USER_COMMENT,
    RemoteHost,
    _descendants,
    _link_exists,
    _netns_list,
    _pick_subnet,
    _remove_user,
    _root,
)

PREFIX = "nbf"
TABLE_BASE = 0x6E660000  # + pid (< 2**22): a routing table of each run
RULE_PRIORITY = 3271  # before main (32766); rules of several runs may share it
RELAY_RULE_PRIORITY = RULE_PRIORITY - 1  # from the relay's address: lookup main
RELAY = Path(__file__).with_name("relay.py")
RELAY_PYTHON = "/usr/bin/python3"  # readable by nobody, unlike a Python under /root
RUN_AS_NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]


class ForwardUnavailable(RuntimeError):
    """This machine cannot make the silent black hole (no netns, no policy routing)."""


def _stale(pid: int) -> bool:
    """An earlier run's: its process is gone, or it carries our own (reused) pid, which is
    only checked before this run's host exists."""
    return pid == os.getpid() or not pid_alive(pid)


def _run_of(name: str) -> int | None:
    match = re.fullmatch(PREFIX + r"(\d+)[a-z0-9]*", name)
    return int(match.group(1)) if match else None


def _rules() -> list[tuple[str, int]]:
    """(priority, table) of every rule that looks up a table of this module's range."""
    found = []
    for line in _root(["ip", "rule", "show"], check=False).stdout.splitlines():
        match = re.match(r"(\d+):.*\blookup (\d+)", line)
        if match and TABLE_BASE <= int(match.group(2)) < TABLE_BASE + 2**22:
            found.append((match.group(1), int(match.group(2))))
    return found


def _relay_rules() -> list[str]:
    """The source address of every rule at RELAY_RULE_PRIORITY."""
    return re.findall(rf"^{RELAY_RULE_PRIORITY}:\s+from (\S+) lookup main",
                      _root(["ip", "rule", "show"], check=False).stdout, re.MULTILINE)


def _reap_stale() -> None:
    """Remove what earlier, killed runs of this host left behind."""
    for pid in find_pids(rf"/var/tmp/{PREFIX}\d+-relay/"):
        match = re.search(rf"/var/tmp/{PREFIX}(\d+)-relay/", " ".join(proc_cmdline(pid)))
        if match and _stale(int(match.group(1))):
            kill_pids([pid, *_descendants(pid)], timeout=5)
    for priority, table in _rules():
        if _stale(table - TABLE_BASE):
            _root(["ip", "rule", "del", "priority", priority, "uidrange", "0-0",
                   "lookup", str(table)], check=False)
    tables = re.findall(r"\btable (\d+)",
                        _root(["ip", "route", "show", "table", "all"], check=False).stdout)
    for table in {int(t) for t in tables}:
        if TABLE_BASE <= table < TABLE_BASE + 2**22 and _stale(table - TABLE_BASE):
            _root(["ip", "route", "flush", "table", str(table)], check=False)
    for entry in pwd.getpwall():
        run = _run_of(entry.pw_name)
        if entry.pw_gecos == USER_COMMENT and run is not None and _stale(run):
            _remove_user(entry.pw_name)
    for ns in _netns_list():
        run = _run_of(ns)
        if run is not None and _stale(run):
            _root(["ip", "netns", "del", ns], check=False)
    for line in _root(["ip", "-o", "link", "show"], check=False).stdout.splitlines():
        link = line.split(":")[1].strip().split("@")[0] if line.count(":") >= 2 else ""
        run = _run_of(link)
        if run is not None and _stale(run):
            _root(["ip", "link", "del", link], check=False)
    local = _root(["ip", "-4", "-o", "addr"], check=False).stdout
    for source in _relay_rules():  # its address went with its veth
        if not re.search(rf"\binet {re.escape(source)}/", local):
            _root(["ip", "rule", "del", "priority", str(RELAY_RULE_PRIORITY), "from", source,
                   "lookup", "main"], check=False)
    for path in Path("/var/tmp").glob(f"{PREFIX}*-relay"):
        run = _run_of(path.name[: -len("-relay")])
        if run is not None and _stale(run):
            shutil.rmtree(path, ignore_errors=True)


class ForwardedHost(RemoteHost):
    """A host the laptop reaches only through a port forward (``alias``); its own address
    (``ip``, port 22) is what its sshd sees, and what root cannot reach once dropped."""

    alias = "nbfwd"

    def __init__(self) -> None:
        super().__init__()
        pid = os.getpid()
        self.user = self.netns = f"{PREFIX}{pid}"
        self.veth_host, self.veth_remote = f"{PREFIX}{pid}h", f"{PREFIX}{pid}r"
        self.sink_ns = f"{PREFIX}{pid}s"
        self.sink_link, self.sink_peer = f"{PREFIX}{pid}s0", f"{PREFIX}{pid}s1"
        self.table = TABLE_BASE + pid
        self.relay_dir = Path(f"/var/tmp/{PREFIX}{pid}-relay")
        self.relay: subprocess.Popen | None = None
        self.relay_port = 0
        self.relay_source = ""
        self.dropping = False
        self.sunk_at_start = 0

    # Set-up ###################################################################

    def start(self) -> None:
        """The host, its forward (ssh config and known_hosts through it) and the black
        hole, dropping from the start."""
        super().start()
        self._start_relay()
        self.write_known_hosts(self.known_hosts, "127.0.0.1", self.relay_port)
        self.ssh_config.write_text(self.ssh_config_block(
            self.alias, HostName="127.0.0.1", Port=self.relay_port))
        self.drop(True)
        self.sunk_at_start = self.sunk()

    def _make_network(self) -> None:
        """(Under the machine lock.) The host's network, an address for the relay to come
        from, and the black hole: a veth into an empty namespace, a route of the host's
        address into it in this run's table. The rule that uses the table is drop()'s."""
        _reap_stale()
        super()._make_network()
        if self.fallback:
            raise ForwardUnavailable(f"no network namespace: {self.fallback_reason}")
        self.relay_source = str(next(_pick_subnet().hosts()))
        in_ns, in_sink = f"ip netns exec {self.netns} ", f"ip netns exec {self.sink_ns} "
        for command in (
            f"ip addr add {self.relay_source}/32 dev {self.veth_host}",
            in_ns + f"ip route add {self.relay_source}/32 dev {self.veth_remote}",
            f"ip netns add {self.sink_ns}",
            f"ip link add {self.sink_link} type veth peer name {self.sink_peer}",
            f"ip link set {self.sink_peer} netns {self.sink_ns}",
            # No IPv6 chatter (router solicitations...) that tx_packets would count.
            f"sysctl -q -w net.ipv6.conf.{self.sink_link}.disable_ipv6=1",
            f"ip link set {self.sink_link} up",
            in_sink + f"ip link set {self.sink_peer} up",
        ):
            _root(command.split())
        peer_mac = _root([*in_sink.split(), "cat",
                          f"/sys/class/net/{self.sink_peer}/address"]).stdout.strip()
        # From the host-side address, so that a connection from root to the host's address
        # is the drop's from its first packet to its last.
        _root(["ip", "route", "add", f"{self.ip}/32", "dev", self.sink_link,
               "src", self.host_ip, "table", str(self.table)])
        _root(["ip", "neigh", "replace", self.ip, "lladdr", peer_mac, "dev", self.sink_link,
               "nud", "permanent"])
        rule = self._rule("add")
        if rule.returncode != 0:
            raise ForwardUnavailable(f"`ip rule add uidrange` is not permitted here: "
                                     f"{rule.stderr.strip()}")
        self._rule("del")
        _root(["ip", "rule", "add", "priority", str(RELAY_RULE_PRIORITY), "from",
               self.relay_source, "lookup", "main"])

    def _rule(self, verb: str) -> subprocess.CompletedProcess:
        return _root(["ip", "rule", verb, "priority", str(RULE_PRIORITY), "uidrange", "0-0",
                      "lookup", str(self.table)], check=False)

    def _start_relay(self) -> None:
        self.relay_dir.mkdir(mode=0o755)
        self.relay_dir.chmod(0o755)
        code = self.relay_dir / RELAY.name
        shutil.copy(RELAY, code)
        code.chmod(0o644)
        self.relay = subprocess.Popen(
            [*RUN_AS_NOBODY, RELAY_PYTHON, str(code), self.ip, str(self.port), self.relay_source],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
        line = self.relay.stdout.readline() if self.relay.stdout else ""
        if not line.strip().isdigit():
            raise RuntimeError(f"the relay did not start (exit {self.relay.poll()}): {line!r}")
        self.relay_port = int(line)

    # Use ######################################################################

    def drop(self, on: bool) -> None:
        """Make root's packets to the host's own address vanish (True), or pass (False)."""
        self._rule("del")
        if on:
            rule = self._rule("add")
            if rule.returncode != 0:
                raise RuntimeError(f"ip rule add: {rule.stderr.strip()}")
        self.dropping = on

    def sunk(self) -> int:
        """Packets sent into the black hole so far (each try to reach the host's address
        while dropping)."""
        return int(Path(f"/sys/class/net/{self.sink_link}/statistics/tx_packets").read_text())

    def log_size(self) -> int:
        """Where sshd's log ends now (for connections_since)."""
        try:
            return self.sshd_log.stat().st_size
        except FileNotFoundError:
            return 0

    def _log_since(self, offset: int) -> str:
        with open(self.sshd_log, "rb") as handle:
            handle.seek(offset)
            return handle.read().decode(errors="replace")

    def connections_since(self, offset: int) -> list[str]:
        """The address each TCP connection sshd accepted since OFFSET came from (any
        connection, even one that never logged in: sshd logs each at LogLevel VERBOSE)."""
        return re.findall(r"Connection from (\S+) port \d+", self._log_since(offset))

    def logins_since(self, offset: int) -> list[str]:
        """The address each login of the user since OFFSET came from."""
        return re.findall(rf"Accepted publickey for {self.user} from (\S+) port",
                          self._log_since(offset))

    # Tear-down ################################################################

    def stop(self) -> None:
        self._rule("del")
        if self.relay_source in _relay_rules():
            _root(["ip", "rule", "del", "priority", str(RELAY_RULE_PRIORITY), "from",
                   self.relay_source, "lookup", "main"], check=False)
        _root(["ip", "route", "flush", "table", str(self.table)], check=False)
        if self.relay is not None:
            kill_pids([self.relay.pid, *_descendants(self.relay.pid)], timeout=5)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.relay.wait(timeout=5)
        if self.sink_ns in _netns_list():
            _root(["ip", "netns", "del", self.sink_ns], check=False)
        if _link_exists(self.sink_link):
            _root(["ip", "link", "del", self.sink_link], check=False)
        shutil.rmtree(self.relay_dir, ignore_errors=True)
        super().stop()

    def leftovers(self) -> list[str]:
        found = super().leftovers()
        if any(table == self.table for _, table in _rules()):
            found.append(f"ip rule looking up table {self.table}")
        if self.relay_source and self.relay_source in _relay_rules():
            found.append(f"ip rule from {self.relay_source}")
        if _root(["ip", "route", "show", "table", str(self.table)], check=False).stdout.strip():
            found.append(f"routes in table {self.table}")
        if self.sink_ns in _netns_list():
            found.append(f"network namespace {self.sink_ns}")
        if _link_exists(self.sink_link):
            found.append(f"veth {self.sink_link}")
        if self.relay is not None and pid_alive(self.relay.pid):
            found.append(f"relay pid {self.relay.pid}")
        if self.relay_dir.exists():
            found.append(f"directory {self.relay_dir}")
        return found

    def describe(self) -> str:
        return (f"forwarded host: sshd in network namespace {self.netns} at {self.ip}:22 "
                f"(dropped for root), reached through a relay on 127.0.0.1:{self.relay_port} "
                f"from {self.relay_source}, user {self.user}")
