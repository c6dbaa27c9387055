"""A start is all or nothing: interrupted (Ctrl-C, SIGTERM, the terminal's SIGHUP) or
failed at any moment, it either completes and is recorded, or leaves nothing running on
the remote, and it says which.  nbtunnel runs as a subprocess with -v, so a test can
see each ssh command as it starts and pick its moment by it."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import threading
import time

import pytest

import nbtunnel
from helpers import api_status, free_local_port, jupyter_pids, masters, wait_until
from unattended import TcpProxy, proxy_config, read_line

HELPER = "ControlMaster=no"  # in the -v line of each remote operation over the master
MASTER = " -M "  # in the -v line of the ssh that connects


class Stderr:
    """Collects a process's stderr lines as they come, from a thread."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.lines: list[str] = []
        self.thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self.thread.start()

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stderr:
            self.lines.append(line)

    def wait_for(self, needle: str, timeout: float = 60) -> None:
        """Until a line with NEEDLE has come."""
        wait_until(lambda: any(needle in line for line in self.lines), timeout,
                   message=f"{needle!r} on stderr")

    @property
    def text(self) -> str:
        self.thread.join(30)
        return "".join(self.lines)


def started(nbt, *args: str) -> tuple[subprocess.Popen, Stderr]:
    proc = nbt.popen(nbt.remote.alias, "-v", "--session", "s", *args)
    return proc, Stderr(proc)


def ended(proc: subprocess.Popen, err: Stderr) -> tuple[int, str]:
    code = proc.wait(timeout=90)
    return code, err.text


def assert_nothing_left(nbt, remote) -> None:
    """No Jupyter, no tmux session, no record, no ssh master."""
    wait_until(lambda: not jupyter_pids(remote), 20, message="no Jupyter on the remote")
    assert remote.tmux_sessions() == []
    assert nbt.status() == []
    assert list(nbt.state_dir.glob("*.json")) == []
    wait_until(lambda: not masters(nbt.ssh_config), 10, message="no ssh master")


def test_ctrl_c_while_connecting_to_a_host_that_does_not_answer(nbt, remote):
    proxy = TcpProxy((remote.ip, remote.port))
    proxy.stall()  # TCP connects, no ssh banner ever comes
    config = proxy_config(nbt, remote, proxy)
    proc = nbt.popen("nbproxy", "--ssh-config", str(config), "--session", "s")
    time.sleep(1.5)
    began = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert time.monotonic() - began < 10
    assert "nbtunnel: interrupted; nothing is left running on nbproxy" in err, err
    assert "Traceback" not in err
    assert_nothing_left(nbt, remote)


def test_ctrl_c_while_the_master_connects(nbt, remote):
    proc, err = started(nbt)
    err.wait_for(MASTER)
    proc.send_signal(signal.SIGINT)
    code, text = ended(proc, err)
    assert code == 130, text
    assert nbtunnel.MSG_NOTHING_LEFT.format(host=remote.alias) in text, text
    assert "Traceback" not in text
    assert_nothing_left(nbt, remote)


@pytest.mark.parametrize("sig, delay", [
    (signal.SIGINT, 0.0),   # the moment the remote start is sent
    (signal.SIGINT, 0.5),   # while the session manager launches Jupyter
    (signal.SIGINT, 2.0),   # while nbtunnel waits for the server to answer
    (signal.SIGTERM, 1.0),
    (signal.SIGHUP, 1.0),   # the terminal was closed
])
def test_interrupted_remote_start_stops_its_server(nbt, remote, sig, delay):
    # Jupyter starts 5 s late, so that every signal lands before the server answers.
    proc, err = started(nbt, "--jupyter", "sh -c 'sleep 5; exec jupyter lab \"$@\"' sh")
    err.wait_for(HELPER)
    time.sleep(delay)
    proc.send_signal(sig)
    time.sleep(0.3)
    proc.send_signal(sig)  # a second one while it cleans up changes nothing
    code, text = ended(proc, err)
    assert code == 130, text
    undone = nbtunnel.MSG_UNDONE.format(host=remote.alias, session="s")
    assert f"nbtunnel: interrupted; {undone}" in text, text
    assert "Traceback" not in text
    assert_nothing_left(nbt, remote)


def test_ctrl_c_after_the_url_leaves_a_recorded_session(nbt, remote):
    proc, err = started(nbt, "--json")
    line = read_line(proc, 90)
    proc.send_signal(signal.SIGINT)
    code, text = ended(proc, err)
    assert code in (0, 130), text
    info = json.loads(line)
    assert "Traceback" not in text
    (row,) = nbt.status()
    assert (row["session"], row["server"], row["url"]) == ("s", "running", info["url"])
    assert api_status(info["url"]) == 200
    assert len(jupyter_pids(remote)) == 1


@pytest.mark.parametrize("answers", [True, False], ids=["answer-comes", "no-answer"])
def test_reattach_interrupted_keeps_the_running_server(nbt, remote, answers):
    """The link stalls under a reattach (its question is on the way), then Ctrl-C.  The
    stall holds the reattach at that moment, however fast the machine; without it a
    reattach may finish before the Ctrl-C.  Either the link comes back (the answer says
    the server ran already: it keeps running), or it never does within --timeout (nothing
    is known: the session is left as it was, and the message says no more than that)."""
    proxy = TcpProxy((remote.ip, remote.port))
    config = proxy_config(nbt, remote, proxy)
    try:
        first = nbt.run("nbproxy", "--ssh-config", str(config), "--session", "s", "--json")
        assert first.returncode == 0, first.stderr
        pids = jupyter_pids(remote)
        proxy.stall()  # the master stays up here; what it sends gets no answer
        proc = nbt.popen("nbproxy", "--ssh-config", str(config), "-v", "--session", "s",
                         "--timeout", "5")
        err = Stderr(proc)
        err.wait_for(HELPER)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        if answers:
            time.sleep(1)
            proxy.restore()  # the answer comes: it found the server running, and keeps it
        code, text = ended(proc, err)
    finally:
        proxy.restore()
    assert code == 130, text
    said = nbtunnel.MSG_REUSED_KEPT if answers else nbtunnel.MSG_NO_ANSWER
    assert said.format(host="nbproxy", session="s") in text, text
    assert nbtunnel.MSG_NOTHING_LEFT.format(host="nbproxy") not in text
    assert "Traceback" not in text
    assert jupyter_pids(remote) == pids
    (row,) = nbt.status()
    assert row["url"] == json.loads(first.stdout)["url"]  # the record is kept as it was
    if answers:  # (without: the stalled master may be past asking; a new command reconnects)
        assert row["server"] == "running"
    done = nbt.run("nbproxy", "--ssh-config", str(config), "--session", "s", "--terminate")
    assert done.returncode == 0, done.stderr
    wait_until(lambda: not jupyter_pids(remote), 30, message="terminated")


def test_terminate_finds_a_session_known_only_to_the_remote(nbt, remote):
    """A start killed outright (SIGKILL: no cleanup can run) after the remote start:
    the remote's own record lets --terminate of that session stop it all the same."""
    proc, err = started(nbt)
    err.wait_for(HELPER)
    wait_until(lambda: remote.tmux_sessions() == ["s"], 30, message="tmux session s")
    proc.kill()
    proc.wait(timeout=30)
    wait_until(lambda: jupyter_pids(remote), 60, message="the server finished starting")
    assert nbt.status() == []  # nothing recorded here
    done = nbt.run(remote.alias, "--session", "s", "--terminate", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["stopped"] is True
    assert_nothing_left(nbt, remote)  # not even an ended mark: it was never recorded here


# A local port that is taken ###################################################


def listener_on(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(1)
    return sock


def test_taken_local_port_is_refused_before_anything_starts(nbt, remote):
    port = free_local_port()
    logins = remote.auth_count()
    with listener_on(port):
        began = time.monotonic()
        proc = nbt.run(remote.alias, "--local-port", str(port))
        took = time.monotonic() - began
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr == "nbtunnel: error: " + nbtunnel.MSG_LOCAL_PORT.format(port=port) + "\n"
    assert proc.stdout == ""
    assert took < 5, took  # no ssh, no Jupyter
    assert remote.auth_count() == logins
    assert_nothing_left(nbt, remote)


def test_local_port_taken_during_the_start_stops_the_server(nbt, remote):
    port = free_local_port()
    proc, err = started(nbt, "--local-port", str(port))
    err.wait_for(HELPER)
    with listener_on(port):  # taken after nbtunnel checked it (a race)
        code, text = ended(proc, err)
    assert code == 1, text
    assert nbtunnel.MSG_LOCAL_PORT.format(port=port) in text, text
    assert nbtunnel.MSG_UNDONE.format(host=remote.alias, session="s") in text, text
    assert "mux_client_forward" not in text
    assert "Traceback" not in text
    assert_nothing_left(nbt, remote)


# What the progress line says ##################################################


@pytest.mark.noroot
def test_cancelling_a_job_says_so_not_stopping_jupyter():
    """A pending job that is cancelled ran no Jupyter: the line names the job."""
    seen = []

    class Recorder(nbtunnel.Transport):
        host, options, timeout = "hpc", [], 5

        def pipe(self, command, data, timeout):
            seen.append(list(nbtunnel.progress.texts))
            answer = json.dumps(dict(ok=True, result=dict(stopped=False)))
            return ("\n" + nbtunnel.RESULT_MARK + answer + "\n").encode(), b"", 0

    session = type("S", (), {"timeout": 5})()
    nbtunnel.cancel_job(session, Recorder(), {}, "42")
    assert seen == [["cancelling job 42 on hpc"]]
