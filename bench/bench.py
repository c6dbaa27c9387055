#!/usr/bin/env python3
"""Benchmark nbtunnel against the physical floor and plain ssh, over a slow link.

    sudo bash bench/run [--runs N] [--delay SECONDS] [--size-mib N] [--readme]

Sets up the same real test host as the test suite (an unprivileged user behind a
real sshd in its own network namespace, see tests/conftest.py), puts a delay line
(bench/delayproxy.py, default 25 ms each way = 50 ms round trip) in front of its
sshd, and measures what a user waits for:

- cold start: from invocation to the first HTTP 200 from /api/status through the
  printed URL, no server running; and its floor, measured in the same run: one
  plain `ssh HOST true` + Jupyter's own start-up timed on the remote + one round trip;
- reattach (server running, tunnel closed), --status, --ensure when healthy,
  --terminate; SSH authentications per command from the sshd log; each reattach's
  login must come from the delay line's own address (sshd's log says), else the bench
  stops: a reattach that went around the link measures nothing; its floor is one
  plain `ssh HOST true` + 2 round trips;
- cold start on a second host reached only through a port forward, whose own address
  is silently dropped for the laptop (tests/bastion.py), and how many packets went to
  that address (none should);
- throughput of a file downloaded through Jupyter's /files/ endpoint via nbtunnel's
  tunnel, a plain `ssh -N -L` and the sshtunnel package, with and without the delay;
- `python3 nbtunnel.py --help` wall time.

Prints a markdown table and writes bench/results.json.  Not part of the test suite.
Needs root (it creates a user, a network namespace and an sshd) and the test
dependencies (bench/run installs them through tests/run).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
NBTUNNEL = REPO / "nbtunnel.py"
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

import nbtunnel  # noqa: E402  (for the exact Jupyter arguments it uses)
from bastion import ForwardedHost, ForwardUnavailable  # noqa: E402
from helpers import find_pids, free_local_port, kill_pids, local_port_open  # noqa: E402
from remotehost import RemoteHost, _machine_lock, _pick_subnet, _root  # noqa: E402

ALIAS = "nbbench"  # the test host behind the delay line
HOSTKEY_ALIAS = "nbbench-hostkey"
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))

HOSTS3 = (ALIAS, ALIAS + "2", ALIAS + "3")  # three ssh_config aliases of the test host
MULTI_SESSION = "multi"  # the session the three-host --status looks at
# jupyter-forward from PyPI, in a venv of the bench's own (bench/run makes it).
JUPYTER_FORWARD = BENCH / ".venv-peers" / "bin" / "jupyter-forward"
# Its options in this bench.  --conda-env is needed: without it this release always
# stops with "Could not activate environment" (its check falls through to sys.exit(1)).
# `source activate NAME` in the remote login shell then finds the Jupyter venv's own
# bin/activate on the login PATH (bash's source searches PATH), which is honest: it is
# the venv the login shell already gives Jupyter.
JUPYTER_FORWARD_ARGS = ("--conda-env", "nbbench")


class BenchError(Exception):
    """Something the benchmark needs did not work."""


def say(msg: str) -> None:
    """Progress on stderr."""
    print("bench: " + msg, file=sys.stderr, flush=True)


def summary(values: list) -> dict | None:
    """median, min, max and the samples (None when there are none)."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return dict(median=statistics.median(values), min=min(values), max=max(values),
                n=len(values), samples=values)


class Bench:
    """One benchmark run: the test host, the delay line, and the measurements."""

    def __init__(self, args):
        self.args = args
        self.python = args.python
        self.nbtunnel = args.nbtunnel
        self.rtt = 2 * args.delay
        self.remote = RemoteHost()
        self.tmp = Path(tempfile.mkdtemp(prefix="nbb"))  # short: control socket paths
        self.ssh_config = self.tmp / "ssh_config"
        self.proxy = None
        self.link_source = ""  # the address the delay line connects to the host from
        self.fwd: ForwardedHost | None = None  # the host behind a silently dropping forward
        self.fwd_missing = ""
        self.procs: list[subprocess.Popen] = []
        self.states: set[Path] = set()
        self.env = {k: v for k, v in os.environ.items()
                    if k not in {"XDG_RUNTIME_DIR", "NBTUNNEL_STATE_DIR", "SSH_AUTH_SOCK",
                                 "BROWSER", "NBTUNNEL_CONFIG", "NBTUNNEL_MANAGER"}}
        self.env.update(XDG_STATE_HOME=str(self.tmp / "xdg-state"),
                        XDG_CONFIG_HOME=str(self.tmp / "xdg-config"),
                        NBTUNNEL_CONFIG=str(self.tmp / "no-config.ini"))
        self.help_text = ""
        self.results: dict = {}

    # Set-up and tear-down ####################################################

    def setup(self) -> None:
        """Start the test host, the delay line, and write the ssh config."""
        say("starting the test host (sshd in a network namespace, unprivileged user)")
        self.remote.start()
        say(self.remote.describe())
        self.link_source = self.line_address()
        self.proxy = subprocess.Popen(
            [self.python, str(BENCH / "delayproxy.py"), "--listen", "127.0.0.1:0",
             "--target", "%s:%d" % (self.remote.ip, self.remote.port),
             "--delay", str(self.args.delay), "--source", self.link_source],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
        port = int(self.proxy.stdout.readline())
        host_key = " ".join(Path("%s.pub" % self.remote.host_key).read_text().split()[:2])
        known = self.tmp / "known_hosts"
        known.write_text("%s %s\n" % (HOSTKEY_ALIAS, host_key))
        base = self.remote.ssh_config.read_text()
        # The test alias's own options (user, key, strict host keys), minus where it goes.
        block = base.split("Host %s\n" % self.remote.alias, 1)[1].split("\nHost ", 1)[0]
        common = "\n".join(line for line in block.splitlines() if line.strip() and
                           line.split()[0] not in ("HostName", "Port", "UserKnownHostsFile"))
        self.ssh_config.write_text(
            "Host %s\n    HostName 127.0.0.1\n    Port %d\n    HostKeyAlias %s\n"
            "    UserKnownHostsFile %s\n%s\n\n%s"
            % (" ".join(HOSTS3), port, HOSTKEY_ALIAS, known, common, base))
        self.help_text = self.nbt("--help").stdout
        since = self.log_offset()
        if self.ssh(ALIAS, "true").returncode != 0:
            raise BenchError("ssh through the delay line does not work")
        self.crossed_link(since, "plain ssh %s true" % ALIAS)
        say("starting the host behind a port forward whose own address is dropped")
        self.fwd = ForwardedHost()  # teardown stops it, whatever happens
        try:
            self.fwd.start()
        except ForwardUnavailable as e:
            self.fwd.stop()
            self.fwd, self.fwd_missing = None, str(e)
            return
        say(self.fwd.describe())
        with open(self.ssh_config, "a") as config:
            config.write("\n" + self.fwd.ssh_config.read_text())

    def line_address(self) -> str:
        """An address of the delay line's own, from which it connects to the host: sshd's
        log then tells a login that crossed the line from a direct one (from host_ip)."""
        if self.remote.fallback:  # sshd on 127.0.0.1: a direct connection comes from there
            return "127.0.0.2"
        with _machine_lock():
            addr = str(next(_pick_subnet().hosts()))
            _root(["ip", "addr", "add", addr + "/32", "dev", self.remote.veth_host])
        _root(["ip", "netns", "exec", str(self.remote.netns), "ip", "route", "add",
               addr + "/32", "dev", self.remote.veth_remote])
        return addr

    def log_offset(self) -> int:
        """Where the host's sshd log ends now."""
        return self.remote.sshd_log.stat().st_size

    def crossed_link(self, since: int, what: str) -> None:
        """WHAT logged in (since offset SINCE of sshd's log), and only through the delay
        line: else its figure is not one over the slow link, and the bench stops."""
        with open(self.remote.sshd_log, "rb") as log:
            log.seek(since)
            text = log.read().decode(errors="replace")
        came = re.findall(r"Accepted publickey for %s from (\S+) port"
                          % re.escape(self.remote.user), text)
        if not came or any(addr != self.link_source for addr in came):
            raise BenchError(
                "%s: logins from %s, not only through the delay line (from %s): it did not "
                "cross the %g ms link (%s is the host's own address, reached directly)"
                % (what, ", ".join(came) or "nowhere", self.link_source, self.rtt * 1000,
                   self.remote.ip))

    def teardown(self) -> None:
        """Leave nothing behind: sessions, tunnels, ssh, the proxy, the test host."""
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # finish cleaning up whatever comes
        say("tearing down")
        for state in self.states:
            with contextlib.suppress(Exception):
                for rec in self.records(state):
                    self.nbt(rec["host"], "--terminate", "--force", "--session",
                             rec["session"], state=state, timeout=60)
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        kill_pids(find_pids(re.escape(str(self.tmp)), program="ssh"), timeout=5)
        if self.proxy and self.proxy.poll() is None:
            self.proxy.terminate()
            try:
                self.proxy.wait(10)
            except subprocess.TimeoutExpired:
                self.proxy.kill()
                self.proxy.wait(10)
        self.remote.stop()
        left = self.remote.leftovers()
        if self.fwd is not None:
            self.fwd.stop()
            left += self.fwd.leftovers()
        if left:
            say("WARNING: left behind: " + "; ".join(left))
        shutil.rmtree(self.tmp, ignore_errors=True)

    # Running things ##########################################################

    def nbt(self, *args: str, state: Path | None = None, timeout: float = 180,
            check: bool = True) -> subprocess.CompletedProcess:
        """Run `python3 nbtunnel.py ARGS` as a user would (no terminal: batch mode)."""
        state = state or self.tmp / "state"
        self.states.add(state)
        argv = [self.python, self.nbtunnel, "--ssh-config", str(self.ssh_config),
                "--state-dir", str(state), *args]
        r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           timeout=timeout, env=self.env)
        if check and r.returncode != 0:
            raise BenchError("nbtunnel %s failed (exit %d): %s"
                             % (" ".join(args), r.returncode, r.stderr.strip()[-3000:]))
        return r

    def ssh(self, alias: str, *command: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """Plain ssh with the bench config, no connection sharing."""
        return subprocess.run(
            ["ssh", "-F", str(self.ssh_config), "-o", "ControlMaster=no",
             "-o", "ControlPath=none", alias, *command],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)

    def records(self, state: Path) -> list:
        """Sessions recorded in STATE."""
        out = []
        for path in sorted(state.glob("*.json")) if state.is_dir() else ():
            with contextlib.suppress(OSError, ValueError):
                out.append(json.loads(path.read_text()))
        return out

    def auths(self) -> int:
        """Authentications sshd accepted so far."""
        return self.remote.auth_count()

    def wait_api(self, url: str, timeout: float = 60) -> int:
        """GET /api/status through the URL's port until 200; return the number of tries."""
        parts = urllib.parse.urlsplit(url)
        token = urllib.parse.parse_qs(parts.query)["token"][0]
        api = "http://%s/api/status?token=%s" % (parts.netloc, token)
        deadline = time.monotonic() + timeout
        tries = 0
        while True:
            tries += 1
            try:
                with OPENER.open(api, timeout=10) as resp:
                    if resp.status == 200:
                        resp.read()
                        return tries
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                raise BenchError("no HTTP 200 from %s within %ss" % (api, timeout))
            time.sleep(0.005)

    def close_tunnel(self, state: Path) -> None:
        """End the master connection of every session in STATE (the tunnel goes with it)."""
        for rec in self.records(state):
            sock = rec.get("socket")
            if sock and os.path.exists(sock):
                subprocess.run(["ssh", "-F", str(self.ssh_config), "-S", sock, "-O", "exit",
                                rec["host"]], stdin=subprocess.DEVNULL, capture_output=True,
                               timeout=30)
                deadline = time.monotonic() + 10
                while os.path.exists(sock) and time.monotonic() < deadline:
                    time.sleep(0.01)
                if local_port_open(rec["local_port"]):
                    raise BenchError("the tunnel is still open after ssh -O exit")

    # Measurements ############################################################

    def timed(self, fn, *args, **kw):
        """(seconds, authentications, result) of FN(*ARGS)."""
        a0 = self.auths()
        t0 = time.perf_counter()
        result = fn(*args, **kw)
        seconds = time.perf_counter() - t0
        time.sleep(0.05)  # sshd writes its log line as it accepts; let it land
        return seconds, self.auths() - a0, result

    def start_to_200(self, alias: str, state: Path | None = None, *extra: str) -> str:
        """`nbtunnel.py ALIAS`, then the first 200 from /api/status through its URL."""
        r = self.nbt(alias, *extra, state=state)
        url = r.stdout.strip().splitlines()[-1]
        self.wait_api(url)
        return url

    def start_foreground_to_200(self, alias: str, state: Path, *extra: str) -> str:
        """nbtunnel with a foreground tunnel (sshtunnel backend, this interpreter, which has
        the package): its URL once /api/status answers; it runs until the bench ends."""
        self.states.add(state)
        proc = subprocess.Popen(
            [sys.executable, self.nbtunnel, "--ssh-config", str(self.ssh_config),
             "--state-dir", str(state), alias, *extra],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env=self.env)
        self.procs.append(proc)
        url = proc.stdout.readline().strip()
        if not url.startswith("http"):
            raise BenchError("nbtunnel %s gave no URL: %s" % (" ".join(extra),
                                                              proc.stderr.read()[-2000:]))
        self.wait_api(url)
        return url

    def plain_forward_to_200(self, url: str) -> None:
        """By hand: `ssh -N -L` to the running server's port, until the first 200 through it."""
        rec = self.records(self.tmp / "state")[0]
        port = free_local_port()
        proc = subprocess.Popen(
            ["ssh", "-F", str(self.ssh_config), "-o", "ControlMaster=no", "-o",
             "ControlPath=none", "-o", "ExitOnForwardFailure=yes", "-N", "-L",
             "127.0.0.1:%d:127.0.0.1:%d" % (port, rec["remote_port"]), ALIAS],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(proc)
        try:
            parts = urllib.parse.urlsplit(url)
            self.wait_api(parts._replace(netloc="127.0.0.1:%d" % port).geturl())
        finally:
            proc.terminate()
            proc.wait(10)

    def handshake(self) -> float:
        """One plain `ssh HOST true` through the delay line."""
        t0 = time.perf_counter()
        r = self.ssh(ALIAS, "true")
        if r.returncode != 0:
            raise BenchError("ssh %s true failed: %s" % (ALIAS, r.stderr.strip()))
        return time.perf_counter() - t0

    def jupyter_on_remote(self) -> dict:
        """Jupyter's own start-up, timed on the remote with nbtunnel's arguments."""
        venv = self.remote.jupyter_venv / "bin"
        argv = [str(venv / "jupyter"), nbtunnel.APPS["lab"][0]] + nbtunnel.server_args()
        r = self.remote.run(["env", "PATH=%s:/usr/local/bin:/usr/bin:/bin" % venv,
                             "/usr/bin/python3", "-", json.dumps(argv)], timeout=180,
                            input=(BENCH / "remote_jupyter_start.py").read_text())
        try:
            out = json.loads(r.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise BenchError("timing Jupyter on the remote failed: %s %s"
                             % (r.stdout, r.stderr)) from None
        if out.get("ready") is None:
            log = self.remote.run("tail -20 ~/nbbench-jupyter.log").stdout
            raise BenchError("Jupyter did not start on the remote:\n" + log)
        return out

    def over_master(self, n: int) -> list:
        """`ssh -S SOCKET HOST true` over an open master: one command, no handshake."""
        sock = str(self.tmp / "m")
        base = ["ssh", "-F", str(self.ssh_config), "-S", sock]
        subprocess.run(base + ["-fNM", "-o", "ControlPersist=yes", ALIAS],
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=60, check=True)
        times = []
        try:
            for _ in range(n):
                t0 = time.perf_counter()
                subprocess.run(base + [ALIAS, "true"], stdin=subprocess.DEVNULL,
                               capture_output=True, timeout=60, check=True)
                times.append(time.perf_counter() - t0)
        finally:
            subprocess.run(base + ["-O", "exit", ALIAS], stdin=subprocess.DEVNULL,
                           capture_output=True, timeout=30)
        return times

    def help_time(self, n: int) -> tuple:
        """Wall time of `python3 nbtunnel.py --help`, and of `python3 -c pass` for scale."""
        def wall(argv):
            t0 = time.perf_counter()
            subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           check=True, env=self.env)
            return time.perf_counter() - t0
        wall([self.python, self.nbtunnel, "--help"])  # warm the page cache
        helps, bare = [], []
        for _ in range(n):
            helps.append(wall([self.python, self.nbtunnel, "--help"]))
            bare.append(wall([self.python, "-c", "pass"]))
        return helps, bare

    def jupyter_forward_to_200(self) -> float:
        """jupyter-forward ALIAS, from invocation to the first 200 from /api/status on its
        local port (the token is read from the server's runtime file on the remote's disk,
        which this machine shares; jupyter-forward itself prints the URL 3 s later, after a
        fixed sleep).  Then it is stopped, and the server it started with it."""
        home = self.tmp / "jf-home"  # paramiko (fabric) reads ~/.ssh/config: ours
        (home / ".ssh").mkdir(parents=True, exist_ok=True, mode=0o700)
        (home / ".ssh" / "config").write_text(self.ssh_config.read_text())
        runtime = self.remote.home / ".local" / "share" / "jupyter" / "runtime"
        before = set(runtime.glob("jpserver-*.json"))
        port = free_local_port()
        out = (self.tmp / "jf.log").open("w")
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [str(JUPYTER_FORWARD), ALIAS, "--port", str(port), *JUPYTER_FORWARD_ARGS],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=home,
            env=dict(self.env, HOME=str(home), TERM="dumb", COLUMNS="100"))
        self.procs.append(proc)
        info = None
        try:
            deadline = time.monotonic() + 120
            while info is None:
                for path in set(runtime.glob("jpserver-*.json")) - before:
                    with contextlib.suppress(OSError, ValueError):
                        info = json.loads(path.read_text())
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise BenchError("jupyter-forward started no server:\n"
                                     + (self.tmp / "jf.log").read_text()[-3000:])
                time.sleep(0.005)
            self.wait_api("http://127.0.0.1:%d/lab?token=%s" % (port, info["token"]))
            return time.perf_counter() - t0
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
            out.close()
            if info:
                kill_pids([info["pid"]], timeout=15)
                for path in set(runtime.glob("jpserver-*.json")) - before:
                    with contextlib.suppress(OSError):
                        path.unlink()

    def status_hosts(self, state: Path, hosts: tuple) -> float:
        """`--status` (of HOSTS when one, else of every host in STATE), masters closed;
        the seconds it took. Checks one row per recorded session, server running."""
        self.close_tunnel(state)
        args = ("--status",) if len(hosts) > 1 else (hosts[0], "--status")
        t0 = time.perf_counter()
        r = self.nbt(*args, "--json", state=state)
        sec = time.perf_counter() - t0
        rows = json.loads(r.stdout)
        if sorted(row["host"] for row in rows) != sorted(hosts) or \
                any(row["server"] != "running" or row["tunnel"] != "down" for row in rows):
            raise BenchError("--status of %s: %s" % (" ".join(hosts), r.stdout))
        return sec

    def lifecycle(self) -> dict:
        """Cold start, its floor, status, ensure, reattach and terminate, run by run."""
        has_ensure = "--ensure" in self.help_text
        state = self.tmp / "state"
        keys = ("handshake", "jupyter_file", "jupyter_ready", "floor", "cold", "status_up",
                "ensure", "status_down", "reattach", "plain_forward", "terminate",
                "status_1host", "status_3hosts", "jupyter_forward", "fwd_handshake",
                "fwd_cold", "fwd_sunk")
        samples = {k: [] for k in keys}
        auths = {k: [] for k in keys}

        def add(key, sec, n):
            samples[key].append(sec)
            auths[key].append(n)

        say("warm-up: one Jupyter start on the remote and one nbtunnel cold start")
        self.jupyter_on_remote()
        self.start_to_200(ALIAS)
        self.nbt(ALIAS, "--terminate")
        if self.fwd:
            say("warm-up: one cold start behind the port forward")
            self.forwarded_cold()
        has_jf = JUPYTER_FORWARD.exists()
        if has_jf:
            say("warm-up: one jupyter-forward start")
            self.jupyter_forward_to_200()
        multi = self.tmp / "state-multi"  # three hosts (aliases), one session each
        for host in HOSTS3:
            self.nbt(host, "--session", MULTI_SESSION, state=multi)
        for i in range(self.args.runs):
            say("lifecycle run %d/%d" % (i + 1, self.args.runs))
            sec, n, _ = self.timed(self.handshake)
            add("handshake", sec, n)
            jup = self.jupyter_on_remote()
            samples["jupyter_file"].append(jup["file"])
            samples["jupyter_ready"].append(jup["ready"])
            samples["floor"].append(sec + jup["ready"] + self.rtt)
            sec, n, _ = self.timed(self.start_to_200, ALIAS)
            add("cold", sec, n)
            sec, n, r = self.timed(self.nbt, ALIAS, "--status")
            if "server=running" not in r.stdout or "tunnel=up" not in r.stdout:
                raise BenchError("--status after a start: " + r.stdout)
            add("status_up", sec, n)
            if has_ensure:
                sec, n, r = self.timed(self.nbt, ALIAS, "--ensure")
                if r.stdout.strip():
                    raise BenchError("--ensure repaired a healthy session: " + r.stdout)
                add("ensure", sec, n)
            self.close_tunnel(state)
            sec, n, r = self.timed(self.nbt, ALIAS, "--status")
            if "server=running" not in r.stdout or "tunnel=down" not in r.stdout:
                raise BenchError("--status with the tunnel closed: " + r.stdout)
            add("status_down", sec, n)
            since = self.log_offset()
            sec, n, url = self.timed(self.start_to_200, ALIAS)
            self.crossed_link(since, "reattach (master gone)")
            add("reattach", sec, n)
            sec, n, _ = self.timed(self.plain_forward_to_200, url)
            add("plain_forward", sec, n)
            pid = self.records(state)[0]["pid"]
            sec, n, _ = self.timed(self.nbt, ALIAS, "--terminate")
            add("terminate", sec, n)
            if pid in self.remote.pids(r"jupyter"):
                raise BenchError("Jupyter still runs after --terminate")
            for which in ((HOSTS3[:1], HOSTS3), (HOSTS3, HOSTS3[:1]))[i % 2]:  # alternate
                _, n, sec = self.timed(self.status_hosts, multi, which)
                add("status_%dhost%s" % (len(which), "s" if len(which) > 1 else ""), sec, n)
            if has_jf:
                sec, n, _ = self.timed(self.jupyter_forward_to_200)
                add("jupyter_forward", sec, n)
            if self.fwd:
                for key, value in zip(("fwd_handshake", "fwd_cold", "fwd_sunk"),
                                      self.forwarded_cold()):
                    samples[key].append(value)
        for host in HOSTS3:
            self.nbt(host, "--terminate", "--session", MULTI_SESSION, state=multi)
        if self.remote.pids(r"jupyter"):
            raise BenchError("Jupyter still runs after --terminate")
        return dict(samples=samples, auths=auths, has_ensure=has_ensure, has_jf=has_jf)

    def forwarded_cold(self) -> tuple:
        """On the host behind the silently dropping port forward (no delay line): one plain
        `ssh HOST true`, one nbtunnel cold start to its first 200, then --terminate; (their
        seconds, packets sent to the host's own address meanwhile)."""
        fwd, state = self.fwd, self.tmp / "state-fwd"
        sunk = fwd.sunk()
        t0 = time.perf_counter()
        r = self.ssh(fwd.alias, "true")
        handshake = time.perf_counter() - t0
        if r.returncode != 0:
            raise BenchError("ssh %s true failed: %s" % (fwd.alias, r.stderr.strip()))
        t0 = time.perf_counter()
        self.start_to_200(fwd.alias, state, "--timeout", "30")
        cold = time.perf_counter() - t0
        self.nbt(fwd.alias, "--terminate", state=state)
        return handshake, cold, fwd.sunk() - sunk

    def traced(self, *args: str) -> list:
        """Run nbtunnel ARGS once with its ssh steps timed, to the first 200; the steps."""
        trace = self.tmp / "trace.json"
        t0 = time.time()
        r = subprocess.run(
            [self.python, str(BENCH / "trace_nbtunnel.py"), self.nbtunnel, "--ssh-config",
             str(self.ssh_config), "--state-dir", str(self.tmp / "state"), *args],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=180,
            env=dict(self.env, NBBENCH_TRACE=str(trace)))
        if r.returncode != 0:
            raise BenchError("traced nbtunnel %s failed: %s" % (" ".join(args), r.stderr))
        t_exit = time.time()
        self.wait_api(r.stdout.strip().splitlines()[-1])
        t_200 = time.time()
        data = json.loads(trace.read_text())

        def ms(t):
            return round((t - t0) * 1000)

        steps = [dict(step="python start-up, imports, options, records", start=0,
                      end=ms(data["steps"][0]["start"] if data["steps"] else data["end"]))]
        for st in data["steps"]:
            steps.append(dict(step=describe_ssh(st["argv"]), start=ms(st["start"]),
                              end=ms(st["end"])))
        steps.append(dict(step="exit", start=ms(data["end"]), end=ms(t_exit)))
        steps.append(dict(step="first HTTP 200 through the printed URL", start=ms(t_exit),
                          end=ms(t_200)))
        return steps

    def breakdown(self) -> dict:
        """One traced cold start and one traced reattach (the server is not running)."""
        say("traced cold start and reattach")
        cold = self.traced(ALIAS)
        self.close_tunnel(self.tmp / "state")
        since = self.log_offset()
        reattach = self.traced(ALIAS)
        self.crossed_link(since, "traced reattach (master gone)")
        self.nbt(ALIAS, "--terminate")
        return dict(cold=cold, reattach=reattach)

    # Throughput ##############################################################

    def download(self, url_base: str, token: str, name: str) -> dict:
        """GET /files/NAME; seconds to the first byte and to the last, and the size."""
        url = "%s/files/%s?token=%s" % (url_base, name, token)
        buf = bytearray(1 << 20)
        t0 = time.perf_counter()
        size = 0
        first = None
        with OPENER.open(url, timeout=120) as resp:
            while True:
                n = resp.readinto(buf)
                if not n:
                    break
                if first is None:
                    first = time.perf_counter() - t0
                size += n
        total = time.perf_counter() - t0
        return dict(seconds=total, first_byte=first, bytes=size)

    def open_plain_forward(self, alias: str, remote_port: int) -> tuple:
        """`ssh -N -L` opened by hand; (local port, process)."""
        port = free_local_port()
        proc = subprocess.Popen(
            ["ssh", "-F", str(self.ssh_config), "-o", "ControlMaster=no", "-o",
             "ControlPath=none", "-o", "ExitOnForwardFailure=yes", "-N", "-L",
             "127.0.0.1:%d:127.0.0.1:%d" % (port, remote_port), alias],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.procs.append(proc)
        deadline = time.monotonic() + 60
        while not local_port_open(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError("ssh -N -L did not open: %s" % proc.stderr.read())
            time.sleep(0.02)
        return port, proc

    def open_sshtunnel(self, alias: str, remote_port: int) -> tuple:
        """A forward by the sshtunnel package, in its own process; (local port, process)."""
        port = free_local_port()
        proc = subprocess.Popen(
            [sys.executable, str(BENCH / "sshtunnel_forward.py"), str(self.ssh_config), alias,
             str(port),
             str(remote_port)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        self.procs.append(proc)
        if proc.stdout.readline().strip() != "ready":
            raise BenchError("sshtunnel did not open: %s" % proc.stderr.read()[-2000:])
        return port, proc

    def throughput(self) -> dict:
        """The same file through every tunnel, with and without the delay line."""
        size = self.args.size_mib << 20
        name = "nbbench-%dM.bin" % self.args.size_mib
        say("writing a %d MiB random file on the remote" % self.args.size_mib)
        self.remote.run("head -c %d /dev/urandom > ~/%s" % (size, name), check=True, timeout=300)
        try:
            import sshtunnel  # noqa: F401
            has_package = True
        except ImportError:
            has_package = False
        # The backend runs in nbtunnel's process: it needs an interpreter with the package.
        has_plugin = has_package and (REPO / "plugins" / "sshtunnel_backend.py").exists()
        links = [("delay", ALIAS), ("direct", self.remote.alias)]
        tunnels = {}  # (link, kind) -> (url base, token) or None
        main = self.start_to_200(ALIAS)
        parts = urllib.parse.urlsplit(main)
        token = urllib.parse.parse_qs(parts.query)["token"][0]
        remote_port = self.records(self.tmp / "state")[0]["remote_port"]
        for link, alias in links:
            if link == "delay":
                url = main
            else:
                url = self.start_to_200(alias, self.tmp / "state-direct")
            tunnels[(link, "nbtunnel")] = "http://" + urllib.parse.urlsplit(url).netloc
            port, _ = self.open_plain_forward(alias, remote_port)
            tunnels[(link, "ssh -L")] = "http://127.0.0.1:%d" % port
            url = self.start_foreground_to_200(alias, self.tmp / ("state-watch-" + link),
                                               "--watch")  # it holds its own local port
            tunnels[(link, "nbtunnel --watch")] = "http://" + urllib.parse.urlsplit(url).netloc
            if has_plugin:
                url = self.start_foreground_to_200(alias, self.tmp / ("state-st-" + link),
                                                   "--tunnel", "sshtunnel")
                tunnels[(link, "nbtunnel --tunnel sshtunnel")] = \
                    "http://" + urllib.parse.urlsplit(url).netloc
            if has_package:
                port, _ = self.open_sshtunnel(alias, remote_port)
                tunnels[(link, "sshtunnel package")] = "http://127.0.0.1:%d" % port
        samples = {key: [] for key in tunnels}
        first = {key: [] for key in tunnels}
        order = list(tunnels)
        for i in range(self.args.runs):
            say("throughput run %d/%d" % (i + 1, self.args.runs))
            for key in order[i % len(order):] + order[:i % len(order)]:  # no fixed order
                d = self.download(tunnels[key], token, name)
                if d["bytes"] != size:
                    raise BenchError("%s: got %d bytes, expected %d" % (key, d["bytes"], size))
                samples[key].append(size / d["seconds"] / (1 << 20))
                first[key].append(d["first_byte"])
                say("  %-6s %-30s %7.1f MiB/s" % (key[0], key[1], samples[key][-1]))
        for proc in self.procs:
            if proc.poll() is None:
                if proc.stdin:
                    proc.stdin.close()
                proc.terminate()
                proc.wait(10)
        self.remote.run(["rm", "-f", str(self.remote.home / name)])
        for state in sorted(self.states):
            for rec in self.records(state):
                self.nbt(rec["host"], "--terminate", "--force", state=state)
        return dict(size_mib=self.args.size_mib, has_plugin=has_plugin,
                    has_package=has_package,
                    mib_per_s={"%s|%s" % k: v for k, v in samples.items()},
                    first_byte={"%s|%s" % k: v for k, v in first.items()})

    # An open JupyterLab tab through a cut link ###############################

    def tab_reconnect(self, nbtunnel_file: str, label: str) -> dict:
        """Under `--watch --interval 2` of NBTUNNEL_FILE, with a JupyterLab tab open in a
        real browser (Playwright, Debian's Chromium): end nbtunnel's ssh master and time
        the tunnel answering again (a request with the token through the local port,
        every 50 ms).  Every other cut a cell is run in the same tab at once, while the
        link is down; the others run it the moment the tunnel answers again.  Either way
        the figure is the time from the tunnel answering again to the cell's output."""
        import threading

        import labtab

        state = self.tmp / ("tab-state-" + label)
        self.states.add(state)
        argv = [self.python, nbtunnel_file, "--ssh-config", str(self.ssh_config),
                "--state-dir", str(state), ALIAS, "--watch", "--interval", "2"]
        watch = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.DEVNULL, text=True, env=self.env)
        self.procs.append(watch)
        url = watch.stdout.readline().strip()
        if not url.startswith("http://"):
            raise BenchError("--watch of %s printed no URL" % nbtunnel_file)
        parts = urllib.parse.urlparse(url)
        token = urllib.parse.parse_qs(parts.query)["token"][0]
        status = "http://127.0.0.1:%d/api/status" % parts.port

        def answers() -> bool:
            req = urllib.request.Request(status, headers={"Authorization": "token " + token})
            try:
                with OPENER.open(req, timeout=10) as r:
                    return r.status == 200
            except (OSError, ValueError):
                return False

        samples = dict(back=[], cell_after_back=[], cell_after_cut=[], cell_run_when_back=[])
        tab = labtab.LabTab(url)
        try:
            tab.run("x = 41; x + 1")
            tab.wait_output("42", 120)
            for i in range(self.args.runs):
                old = [p for p in find_pids(re.escape(str(self.ssh_config)), program="ssh")
                       if b"-M" in Path("/proc/%d/cmdline" % p).read_bytes().split(b"\0")]
                cut = time.monotonic()
                for pid in old:
                    os.kill(pid, signal.SIGKILL)
                back: list = []

                def poll(back=back):
                    while not back:
                        if answers():
                            back.append(time.monotonic())
                        else:
                            time.sleep(0.05)

                poller = threading.Thread(target=poll, daemon=True)
                poller.start()
                during = i % 2 == 0  # the cell is run while the link is down
                if not during:
                    poller.join(60)
                tab.run("x + %d" % (2 + i))
                done = tab.wait_output(str(43 + i), 120)
                poller.join(60)
                if not back:
                    raise BenchError("the tunnel of %s did not answer again" % nbtunnel_file)
                samples["back"].append(back[0] - cut)
                if during:
                    samples["cell_after_back"].append(max(0.0, done - back[0]))
                    samples["cell_after_cut"].append(done - cut)
                else:
                    samples["cell_run_when_back"].append(done - back[0])
                say("  %s: tunnel back %.2f s after the cut, cell (run %s) answered %.2f s "
                    "after that" % (label, back[0] - cut, "during the cut" if during
                                    else "once back", done - back[0]))
                time.sleep(3)  # let --watch settle before the next cut
            tab.dismiss_dialogs()
            samples["dialogs"] = sorted(set(tab.seen))
        finally:
            tab.close()
            watch.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                watch.wait(60)
            for rec in self.records(state):
                self.nbt(rec["host"], "--terminate", "--force", state=state, check=False)
        return samples

    def tab(self) -> dict | None:
        """The open tab through a cut link, with main's nbtunnel.py and with this one."""
        import labtab

        if labtab.missing():
            say("open-tab figures skipped: " + labtab.missing())
            return None
        before = self.args.tab_before
        if before == "none":
            before = None
        elif not before:
            text = subprocess.run(["git", "-C", str(REPO), "show", "main:nbtunnel.py"],
                                  capture_output=True, text=True)
            if text.returncode != 0:
                say("open-tab figures of main skipped: no branch main (--tab-before FILE)")
            else:
                before = str(self.tmp / "nbtunnel_main.py")
                Path(before).write_text(text.stdout)
        out = {}
        for label, path in (("main", before), ("this", self.nbtunnel)):
            if path:
                say("open tab through a cut link: %s (%s)" % (label, path))
                got = self.tab_reconnect(path, label)
                out[label] = dict({k: summary(v) for k, v in got.items() if k != "dialogs"},
                                  dialogs=got["dialogs"], file=path)
        return out

    # The whole run ###########################################################

    def run(self) -> dict:
        """Every measurement, in an order that keeps the slow downloads last."""
        t_start = time.perf_counter()
        load_before = os.getloadavg()
        tab = self.tab() if self.args.tab else None
        if self.args.only_tab:
            return dict(tab=tab)
        if self.args.only_throughput:
            thr = self.throughput()
            return dict(throughput=dict(
                thr, mib_per_s={k: summary(v) for k, v in thr["mib_per_s"].items()},
                first_byte={k: summary(v) for k, v in thr["first_byte"].items()}))
        helps, bare = self.help_time(max(10, self.args.runs))
        master = self.over_master(max(5, self.args.runs))
        t_life = time.perf_counter()
        life = self.lifecycle()
        trace = self.breakdown()
        t_thr = time.perf_counter()
        thr = self.throughput() if self.args.size_mib > 0 else None
        t_end = time.perf_counter()
        return dict(
            meta=dict(
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                command="sudo bash bench/run " + " ".join(self.args.argv),
                runs=self.args.runs, delay_each_way_s=self.args.delay, rtt_s=self.rtt,
                python=self.python, python_version=subprocess.run(
                    [self.python, "-V"], capture_output=True, text=True).stdout.strip(),
                ssh=subprocess.run(["ssh", "-V"], capture_output=True, text=True).stderr.strip(),
                machine="%s %s, %d cores" % (platform.system(), platform.release(),
                                             os.cpu_count() or 0),
                remote=self.remote.describe(), nbtunnel=self.nbtunnel,
                delay_line_source=self.link_source,
                forwarded=self.fwd.describe() if self.fwd else "none: " + self.fwd_missing,
                git=git_describe(),
                loadavg_before=load_before, loadavg_after=os.getloadavg()),
            help=summary(helps), python_bare=summary(bare), over_master=summary(master),
            lifecycle={k: summary(v) for k, v in life["samples"].items()},
            auths={k: v for k, v in life["auths"].items()},
            has_ensure=life["has_ensure"], breakdown=trace,
            throughput=None if thr is None else dict(
                thr, mib_per_s={k: summary(v) for k, v in thr["mib_per_s"].items()},
                first_byte={k: summary(v) for k, v in thr["first_byte"].items()}),
            tab=tab, total_seconds=t_end - t_start,
            phase_seconds=dict(before=t_life - t_start, lifecycle=t_thr - t_life,
                               throughput=t_end - t_thr),
        )


def describe_ssh(argv: list) -> str:
    """What one ssh command run by nbtunnel does, in a few words."""
    if "-O" in argv:
        return "ssh -O %s (local, to the master)" % argv[argv.index("-O") + 1]
    if "-M" in argv:
        return "ssh -f -N -M: the master connection (the one handshake)"
    if nbtunnel.REMOTE_COMMAND in argv:
        return "remote helper over the master (one session)"
    return " ".join(argv[:1] + [a for a in argv[1:] if a.startswith("-")])


def git_describe() -> str:
    """The commit measured (with '+changes' when the work tree differs)."""
    r = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty=+changes"],
                       capture_output=True, text=True)
    return r.stdout.strip()


# Report ######################################################################


def ms(x) -> str:
    """Seconds as milliseconds."""
    return "%.0f ms" % (x * 1000)


def verdict(ok) -> str:
    """The "holds" cell."""
    return "yes" if ok else "**no**"


def table(res: dict) -> str:
    """The markdown table."""
    rows = []
    life = res["lifecycle"]
    rtt = res["meta"]["rtt_s"]
    hs = life["handshake"]["median"]

    def timing(label, s, target="", ratio="", holds=""):
        if s is None:
            rows.append((label, "n/a (not implemented)", "", "", target, ratio, holds))
        else:
            rows.append((label, ms(s["median"]), ms(s["min"]), ms(s["max"]), target, ratio,
                         holds))


    timing("plain `ssh HOST true` (one handshake)", life["handshake"])
    timing("command over an open master (`ssh -S … true`)", res["over_master"])
    timing("Jupyter start-up on the remote itself (to 200)", life["jupyter_ready"])
    floor = life["floor"]
    timing("floor: ssh + Jupyter start-up + 1 RTT", floor)
    cold = life["cold"]
    r = cold["median"] / floor["median"]
    timing("**cold start** to first 200 through the URL", cold, "≤ 1.05 × floor",
           "%.2f ×" % r, verdict(r <= 1.05))
    jf = life.get("jupyter_forward")
    if jf:
        r = jf["median"] / floor["median"]
        timing("jupyter-forward %s, cold start to first 200 on its port (cannot reattach: "
               "it holds the server in its own ssh session)" % " ".join(JUPYTER_FORWARD_ARGS),
               jf, "(peer)", "%.2f × floor" % r, "")
    else:
        rows.append(("jupyter-forward cold start", "n/a (not installed: bench/run installs it)",
                     "", "", "", "", ""))
    fwd = life.get("fwd_cold")
    if fwd:
        floor_fwd = life["fwd_handshake"]["median"] + life["jupyter_ready"]["median"]
        sunk = max(life["fwd_sunk"]["samples"])
        r = fwd["median"] / floor_fwd
        timing("**cold start**, host reached only through a port forward, its own address "
               "silently dropped (no delay line); packets to that address: %d" % sunk, fwd,
               "≤ 1.05 × (`ssh HOST true` + Jupyter start-up = %s), 0 packets"
               % ms(floor_fwd), "%.2f ×" % r, verdict(r <= 1.05 and sunk == 0))
    else:
        rows.append(("cold start behind a silently dropping port forward",
                     "n/a (%s)" % res["meta"].get("forwarded", "not measured"),
                     "", "", "", "", ""))
    bound = hs + 2 * rtt
    rows.append(("floor of a reattach: `ssh HOST true` + 2 RTT (one handshake, then the "
                 "helper's round trips)", ms(bound), "", "", "", "", ""))
    s = life["reattach"]
    r = s["median"] / bound
    timing("**reattach** (tunnel closed) to first 200, its login through the %g ms link "
           "(sshd's log: from the delay line's address)" % (rtt * 1000), s,
           "≤ 1.10 × reattach floor (%s)" % ms(bound), "%.2f ×" % r, verdict(r <= 1.10))
    rows.append(("jupyter-forward reattach", "cannot reattach (a new server each time)", "", "",
                 "", "", ""))
    for key, label in (("status_up", "**`--status`**, tunnel up"),
                       ("status_down", "**`--status`**, tunnel closed"),
                       ("ensure", "**`--ensure`**, healthy")):
        s = life[key]
        if s is None:
            timing(label, None, "≤ %s" % ms(bound))
            continue
        r = s["median"] / bound
        timing(label, s, "≤ handshake + 2 RTT = %s" % ms(bound), "%.2f ×" % r, verdict(r <= 1.0))
    one, three = life.get("status_1host"), life.get("status_3hosts")
    if one and three:
        timing("`--status` of 1 host, connection closed", one)
        r = three["median"] / one["median"]
        timing("**`--status` of 3 hosts**, connections closed", three,
               "≤ 1.5 × 1 host", "%.2f ×" % r, verdict(r <= 1.5))
    timing("plain `ssh -N -L` by hand to first 200 (server running)", life["plain_forward"])
    timing("`--terminate` (server running, tunnel up)", life["terminate"])
    auth_parts = []
    ok = True
    for key, label, most in (("cold", "cold", 1), ("reattach", "reattach", 1),
                             ("status_up", "status up", 1), ("status_down", "status down", 1),
                             ("ensure", "ensure", 1), ("terminate", "terminate", 1),
                             ("status_3hosts", "status of 3 hosts", 3),
                             ("jupyter_forward", "jupyter-forward", None)):
        values = res["auths"].get(key) or []
        if values:
            auth_parts.append("%s %d" % (label, max(values)))
            ok = ok and (most is None or max(values) <= most)
    rows.append(("SSH authentications per command (max over runs)", ", ".join(auth_parts), "",
                 "", "≤ 1 (per host)", "", verdict(ok)))
    rows += throughput_rows(res)
    h = res["help"]
    rows.append(("`python3 nbtunnel.py --help`", ms(h["median"]), ms(h["min"]), ms(h["max"]),
                 "< 60 ms", "", verdict(h["median"] < 0.060)))
    timing("`python3 -c pass` (interpreter alone)", res["python_bare"])
    rows += tab_rows(res)
    head = ("figure", "median", "min", "max", "target", "ratio", "holds")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += breakdown_table(res)
    m = res["meta"]
    lines.append("")
    lines.append("%d runs each (median, min, max); link: %g ms each way (RTT %g ms) through "
                 "bench/delayproxy.py; %s, load average %.2f before, %.2f after; %s; %s; %s; "
                 "total %.0f s (downloads %.0f s)." % (
                     m["runs"], m["delay_each_way_s"] * 1000, m["rtt_s"] * 1000, m["machine"],
                     m["loadavg_before"][0], m["loadavg_after"][0], m["ssh"],
                     m["python_version"] + " (" + m["python"] + ")", m["date"],
                     res["total_seconds"], res["phase_seconds"]["throughput"]))
    return "\n".join(lines)


def throughput_rows(res: dict) -> list:
    """Rows of the downloads through each tunnel."""
    rows = []
    thr = res.get("throughput")
    if thr:
        for link in ("delay", "direct"):
            plain = thr["mib_per_s"].get("%s|ssh -L" % link)
            for kind in ("nbtunnel", "nbtunnel --watch", "ssh -L", "nbtunnel --tunnel sshtunnel",
                         "sshtunnel package"):
                s = thr["mib_per_s"].get("%s|%s" % (link, kind))
                label = "throughput %d MiB, %s, %s" % (
                    thr["size_mib"], "50 ms link" if link == "delay" else "no delay", kind)
                if s is None:
                    if kind == "nbtunnel --tunnel sshtunnel":
                        rows.append((label, "n/a (not implemented)", "", "", "", "", ""))
                    continue
                cells = ("%.1f MiB/s" % s["median"], "%.1f" % s["min"], "%.1f" % s["max"])
                if kind == "ssh -L":
                    rows.append((label, *cells, "", "", ""))
                elif kind not in ("nbtunnel", "nbtunnel --watch"):  # paramiko: no target
                    r = s["median"] / plain["median"]
                    rows.append((label, *cells, "(reference)", "%.2f ×" % r, ""))
                else:
                    r = s["median"] / plain["median"]
                    rows.append((label, *cells, "≥ 0.95 × ssh -L", "%.2f ×" % r,
                                 verdict(r >= 0.95)))
    return rows


def tab_rows(res: dict) -> list:
    """Rows of the open-tab figures: main's code against this one."""
    rows = []
    for label, what in (("main", "main's nbtunnel.py"), ("this", "this nbtunnel.py")):
        t = (res.get("tab") or {}).get(label)
        if not t:
            continue
        for key, figure, target in (
                ("back", "cut (ssh master killed) → tunnel answers again", ""),
                ("cell_run_when_back", "tunnel back → output of a cell run then", "≤ 3 s"),
                ("cell_after_back", "tunnel back → output of a cell run during the cut "
                 "(JupyterLab sends it after its kernelInfoTimeout, 3 s)", ""),
                ("cell_after_cut", "cut → output of a cell run during the cut", "")):
            s = t.get(key)
            if not s:
                continue
            holds = ("yes" if s["max"] <= 3.0 else "**no**") if target and label == "this" else ""
            rows.append(("open JupyterLab tab, `--watch --interval 2`, %s: %s%s"
                         % (what, figure, "; dialogs: %s" % "; ".join(
                             d.splitlines()[0] for d in t["dialogs"])
                            if key == "cell_after_back" and t["dialogs"] else ""),
                         ms(s["median"]), ms(s["min"]), ms(s["max"]),
                         target if label == "this" else "", "", holds))
    return rows


def breakdown_table(res: dict) -> list:
    """Where the time of one cold start and one reattach goes, step by step."""
    trace = res.get("breakdown")
    if not trace:
        return []
    keyed = {}
    order = []
    for kind in ("cold", "reattach"):
        seen = {}
        for st in trace[kind]:
            n = seen[st["step"]] = seen.get(st["step"], 0) + 1
            key = (st["step"], n)
            if key not in keyed:
                keyed[key] = {}
                order.append(key)
            keyed[key][kind] = "%d–%d (%d)" % (st["start"], st["end"], st["end"] - st["start"])
    lines = ["", "Where the time goes, one traced run each (ms from invocation: start–end "
             "(duration)); the helper's start includes Jupyter's own start-up:", "",
             "| step | cold start | reattach |", "|---|---|---|"]
    for key in order:
        lines.append("| %s | %s | %s |" % (key[0], keyed[key].get("cold", ""),
                                            keyed[key].get("reattach", "")))
    return lines


def update_readme(text: str, command: str) -> None:
    """Put the table between the benchmark markers of bench/README.md."""
    readme = BENCH / "README.md"
    content = readme.read_text()
    begin, end = "<!-- bench:begin -->", "<!-- bench:end -->"
    if begin not in content or end not in content:
        raise BenchError("bench/README.md has no %s ... %s markers" % (begin, end))
    head, rest = content.split(begin, 1)
    tail = rest.split(end, 1)[1]
    block = "%s\n```sh\n%s\n```\n\n%s\n%s" % (begin, command, text, end)
    readme.write_text(head + block + tail)


def main(argv=None) -> int:
    """Run the benchmark; print the table; write the JSON."""
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description="Benchmark nbtunnel over a slow link.")
    p.add_argument("--runs", type=int, default=5, help="runs per figure (default 5)")
    p.add_argument("--delay", type=float, default=0.025,
                   help="seconds added each way (default 0.025: 50 ms round trip)")
    p.add_argument("--size-mib", type=int, default=256,
                   help="size of the downloaded file (default 256; 0 skips throughput)")
    p.add_argument("--python", default="/usr/bin/python3" if os.path.exists("/usr/bin/python3")
                   else shutil.which("python3"), help="interpreter that runs nbtunnel.py")
    p.add_argument("--nbtunnel", default=str(NBTUNNEL), metavar="FILE",
                   help="the nbtunnel.py to measure (default: the one in this repository)")
    p.add_argument("--out", default=str(BENCH / "results.json"), help="JSON output file")
    p.add_argument("--readme", action="store_true", help="also put the table into bench/README.md")
    p.add_argument("--no-tab", dest="tab", action="store_false",
                   help="skip the open JupyterLab tab through a cut link")
    p.add_argument("--tab-before", metavar="FILE",
                   help="the nbtunnel.py to compare with there (default: branch main's; "
                        "none: no comparison)")
    p.add_argument("--only-tab", action="store_true", help="measure only the open tab")
    p.add_argument("--only-throughput", action="store_true",
                   help="measure only the downloads through each tunnel")
    args = p.parse_args(argv)
    args.argv = argv
    if os.geteuid() != 0:
        print("bench: needs root (a user, a network namespace, an sshd): sudo bash bench/run",
              file=sys.stderr)
        return 2

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started in background
    bench = Bench(args)
    try:
        bench.setup()
        res = bench.run()
    except BenchError as e:
        say("error: %s" % e)
        return 1
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    finally:
        bench.teardown()
    if args.only_tab or args.only_throughput:
        head = ("figure", "median", "min", "max", "target", "ratio", "holds")
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        rows = tab_rows(res) if args.only_tab else throughput_rows(res)
        print("\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]))
        return 0
    text = table(res)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print(text)
    if args.readme:
        update_readme(text, res["meta"]["command"].strip())
    say("wrote %s" % args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
