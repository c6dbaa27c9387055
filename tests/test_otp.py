"""A login that asks for a one-time code after the key: asked once per new connection on a
terminal, never without one, and said so in words that fit."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import re
import select
import signal
import threading
import time
from collections.abc import Iterator

import pytest

from conftest import _REMOTES, NbtRunner
from helpers import api_status, kill_masters, wait_until
from otphost import OtpHost, otp_missing
from unattended import TcpProxy, finish, proxy_config, wait_logged

PROMPT = "One-time password (OATH) for"


@pytest.fixture(scope="module")
def otp() -> Iterator[OtpHost]:
    if os.geteuid() != 0:
        pytest.skip("the one-time-code host needs root: run bash tests/run")
    if otp_missing():
        pytest.skip(otp_missing())
    host = OtpHost()
    _REMOTES.append(host)
    try:
        host.start()
        yield host
    finally:
        host.stop()


@pytest.fixture
def onbt(otp: OtpHost) -> Iterator[NbtRunner]:
    runner = NbtRunner(otp)
    yield runner
    kill_masters(runner.ssh_config)
    runner.cleanup()


class OnTerminal:
    """nbtunnel on a pseudo-terminal whose user types a fresh code at each prompt."""

    def __init__(self, otp: OtpHost, argv: list[str], env: dict[str, str]) -> None:
        self.otp, self.output, self.codes, self.code = otp, "", 0, None
        self.pid, self.fd = pty.fork()
        if self.pid == 0:
            try:
                os.execve(argv[0], argv, env)
            finally:
                os._exit(127)
        self.lock = threading.Lock()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        pending = ""
        while True:
            with contextlib.suppress(OSError):
                ready, _, _ = select.select([self.fd], [], [], 0.2)
                if not ready:
                    continue
            try:
                chunk = os.read(self.fd, 4096).decode("utf-8", "replace")
            except OSError:
                chunk = ""
            if not chunk:
                break
            with self.lock:
                self.output += chunk
            pending += chunk
            if PROMPT in pending:
                pending = ""
                self.codes += 1
                os.write(self.fd, self.otp.code().encode() + b"\n")
        _, status = os.waitpid(self.pid, 0)
        self.code = os.waitstatus_to_exitcode(status)

    def wait_for(self, text: str, timeout: float = 120, after: int = 0) -> str:
        """Wait until TEXT is on the terminal (written after its first AFTER characters)."""
        wait_until(lambda: text in self.output[after:] or self.code is not None, timeout,
                   message=f"{text!r} on the terminal")
        assert text in self.output[after:], self.output
        return self.output

    def finish(self, timeout: float = 180) -> int:
        self.reader.join(timeout)
        assert self.code is not None, f"still running after {timeout}s: {self.output}"
        return self.code

    def interrupt(self) -> int:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGINT)
        return self.finish(60)


def on_terminal(nbt: NbtRunner, otp: OtpHost, *args: str) -> OnTerminal:
    return OnTerminal(otp, nbt.argv(*args), nbt._env(None))


def pending(proc) -> str:
    """What PROC has written on stderr and not been read yet."""
    seen = ""
    while select.select([proc.stderr], [], [], 0.5)[0]:
        chunk = os.read(proc.stderr.fileno(), 65536)
        if not chunk:
            break
        seen += chunk.decode()
    return seen


def url_in(text: str) -> str:
    return re.search(r"http://127\.0\.0\.1:\d+/\S+token=\w+", text).group(0)


def test_one_code_per_cold_command(onbt, otp):
    term = on_terminal(onbt, otp, otp.alias, "--json")
    assert term.finish() == 0, term.output
    assert term.codes == 1, term.output
    info = json.loads(term.output[term.output.index("{"):].splitlines()[0])
    assert api_status(info["url"]) == 200
    term = on_terminal(onbt, otp, "--status")  # over the living connection: no code
    assert term.finish() == 0 and term.codes == 0 and "server=running" in term.output, term.output
    kill_masters(onbt.ssh_config)
    term = on_terminal(onbt, otp, otp.alias)  # cold again: one code
    assert term.finish() == 0 and term.codes == 1, term.output
    term = on_terminal(onbt, otp, otp.alias, "--terminate")
    assert term.finish() == 0 and term.codes == 0, term.output


def test_ensure_without_terminal_says_why_once(onbt, otp):
    term = on_terminal(onbt, otp, otp.alias)
    assert term.finish() == 0 and term.codes == 1, term.output
    kill_masters(onbt.ssh_config)
    started = time.monotonic()
    proc = onbt.run(otp.alias, "--ensure", timeout=120)
    assert time.monotonic() - started < 60
    assert proc.returncode == 1, proc.stderr
    assert "one-time code" in proc.stderr and "cron cannot type" in proc.stderr, proc.stderr
    assert (f"run `nbtunnel {otp.alias} -F {onbt.ssh_config} --state-dir {onbt.state_dir}` on a "
            "terminal") in proc.stderr
    assert "ssh-agent" not in proc.stderr and "Traceback" not in proc.stderr
    again = onbt.run(otp.alias, "--ensure", timeout=120)  # cron's next run: no second mail
    assert again.returncode == 1 and again.stdout == "" and again.stderr == "", again.stderr
    status = onbt.run("--status", timeout=120)
    assert "last --ensure failure" in status.stdout and "cron cannot type" in status.stdout
    term = on_terminal(onbt, otp, otp.alias)  # the user types a code on a terminal...
    assert term.finish() == 0 and term.codes == 1, term.output
    fine = onbt.run(otp.alias, "--ensure", timeout=120)  # ...and cron uses that connection
    assert fine.returncode == 0 and fine.stderr == "", fine.stderr
    assert "last --ensure failure" not in onbt.run("--status", timeout=120).stdout


CUTS = 10


def test_watch_asks_once_per_cut_link(onbt, otp):
    """Each cut of the link costs one code (one phone unlock), however the repair's steps
    and the master's end and start interleave: the same --watch run cut CUTS times."""
    proxy = TcpProxy((otp.ip, otp.port))
    config = proxy_config(onbt, otp, proxy, "nbotpproxy")
    text = config.read_text().replace("    BatchMode yes\n", "")
    config.write_text(text)
    onbt.ssh_config = config
    before = otp.auth_count("keyboard-interactive/pam")  # the module's other tests logged in
    try:
        # --timeout 20: room for Jupyter's first start on a busy machine; a cut link
        # refuses at once, so no cut waits for it.
        term = on_terminal(onbt, otp, "nbotpproxy", "--watch", "--interval", "1",
                           "--timeout", "20", "-v")
        url = url_in(term.wait_for("watching Jupyter"))
        assert term.codes == 1 and api_status(url) == 200
        for cut in range(1, CUTS + 1):
            time.sleep((cut - 1) % 4 * 0.3)  # cuts at several points of the 1 s checks
            seen = len(term.output)
            proxy.cut()
            term.wait_for("is down; reconnecting", 60, after=seen)
            proxy.restore()
            term.wait_for("reopened the tunnel", 120, after=seen)
            logins = otp.auth_count("keyboard-interactive/pam") - before
            assert term.codes == cut + 1 == logins, (  # one code for the repair, not one per try
                f"cut {cut}: {term.codes} codes, {logins} logins\n{term.output[seen:]}\n"
                f"sshd:\n{otp.sshd_log.read_text(errors='replace')[-8000:]}")
            assert api_status(url) == 200  # the same URL answers again
        assert term.interrupt() == 0, term.output
    finally:
        proxy.cut()
        kill_masters(config)


def test_watch_without_terminal_waits_for_a_person(onbt, otp):
    """Under systemd: it cannot type the code, says so once, and picks up the connection
    that the user then opens on a terminal."""
    proxy = TcpProxy((otp.ip, otp.port))
    config = proxy_config(onbt, otp, proxy, "nbotpproxy")
    config.write_text(config.read_text().replace("    BatchMode yes\n", ""))
    onbt.ssh_config = config
    try:
        term = on_terminal(onbt, otp, "nbotpproxy")
        assert term.finish() == 0 and term.codes == 1, term.output
        url = url_in(term.output)
        proc = onbt.popen("nbotpproxy", "--watch", "--interval", "1", "--timeout", "10")
        line = proc.stdout.readline().strip()
        assert line == url, (line, proc.poll(), pending(proc))
        proxy.cut()
        proxy.restore()
        said = wait_logged(proc, "cron cannot type", 90)
        time.sleep(40)  # more than one try at the slowest pace: no second line
        said += pending(proc)
        assert said.count("one-time code") == 1, said
        term = on_terminal(onbt, otp, "nbotpproxy")  # the user types one code on a terminal
        assert term.finish() == 0 and term.codes == 1, term.output
        assert url_in(term.output) == url
        # --watch holds the port: it forwards through that connection within a second or so
        wait_until(lambda: api_status(url) == 200, 15, message="the URL answers again")
        time.sleep(35)  # the watch finds it healthy and keeps going
        assert proc.poll() is None
        code, _, err = finish(proc)
        assert code == 0 and "one-time code" not in err, err
    finally:
        proxy.cut()
        kill_masters(config)


def test_watch_commands_never_log_in_without_the_master(onbt, otp):
    """--watch's commands go over its master or nowhere: with the master ended (its
    socket gone, or left behind by a master that was killed) ssh must not log in by
    itself, which on a terminal asks a code for one command, and the repair's login
    right after asks another.  It is a link failure that the repair mends, not a refusal."""
    import socket as sockets

    import nbtunnel

    conn = nbtunnel.Connection(otp.alias, ["-F", str(otp.ssh_config)], str(onbt.tmp), 10)
    conn.shared_only = True
    stale = onbt.tmp / "stale"
    with contextlib.closing(sockets.socket(sockets.AF_UNIX)) as left:
        left.bind(str(stale))  # a socket file that nothing listens on any more
    for path in (onbt.tmp / "gone", stale):
        conn.socket = str(path)
        before = otp.sshd_log.read_text(errors="replace").count("Connection from")
        with pytest.raises(nbtunnel.SshError) as raised:
            conn.run_helper("status", dict(sessions=[]), timeout=30)
        assert raised.value.kind in nbtunnel.SSH_LINK, raised.value
        time.sleep(1)  # sshd logs a connection as it accepts it
        logged = otp.sshd_log.read_text(errors="replace").count("Connection from")
        assert logged == before, f"{path.name}: ssh logged in by itself"
