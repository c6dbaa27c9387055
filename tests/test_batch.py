"""Batch jobs on a shared cluster, the same for Slurm and Grid Engine (tests/cluster.py,
tests/gecell.py): whatever the compute node's /etc/hosts says, Jupyter listens on an
address the login node reaches, or the start fails within seconds and says where.

Each test runs once per scheduler. The node's /etc/hosts is a file of the test's own,
bind-mounted over /etc/hosts in the mount namespace of the node's scheduler daemon, so
that the jobs resolve names as each layout says; the login node keeps the machine's.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
import uuid
from urllib.parse import urlparse

import pytest

from helpers import api_status, wait_until
from remotehost import _root

pytestmark = pytest.mark.timeout(900)


@pytest.fixture
def batch(sched):
    """The scheduler of conftest's `sched` (each test runs once per scheduler); the
    node's own /etc/hosts is the machine's again afterwards."""
    yield sched
    sched.cell.set_node_hosts()


def layout(host, name: str) -> str:
    """The compute node's /etc/hosts in the layout NAME."""
    local = "127.0.0.1 localhost\n"
    node = f"{host.node_addr} {host.node_name}\n"
    return {
        # one file for every host of a small cluster, the login node's name on loopback
        "login-loopback": f"127.0.0.1 localhost {host.login_name}\n{node}",
        # the login node's name is its address on a network the node is not on
        "login-other-network": f"{local}{host.ip} {host.login_name}\n{node}",
        "login-unknown": f"{local}{node}",
        # Debian's default for the node's own name, the login node's name unknown
        "node-debian": f"{local}127.0.1.1 {host.node_name}\n",
    }[name]


EXPECTED = {  # what the name in question resolves to on the node in each layout
    "login-loopback": ("login_name", "127.0.0.1"),
    "login-other-network": ("login_name", "ip"),
    "login-unknown": ("login_name", ""),
    "node-debian": ("node_name", "127.0.1.1"),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_node_address_whatever_the_names_say(batch, name):
    host = batch.host
    host.set_node_hosts(layout(host, name))
    which, value = EXPECTED[name]
    assert host.node_resolves(getattr(host, which)) == getattr(host, value, value)
    began = time.monotonic()
    proc = batch.run_start("--timeout", "240")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    print(f"measured: {batch.name} start in layout {name}: {time.monotonic() - began:.1f}s")
    assert out["remote_host"] == host.node_addr
    assert api_status(out["url"]) == 200
    host.set_node_hosts()  # the scheduler's own daemons need not cope with the layout
    proc = batch.nbt.run(host.alias, "--terminate", timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert not batch.live_jobs()


def test_unreachable_address_fails_fast(batch):
    """A site's name for the node's data network, an address the login node has no route
    to: the start fails as soon as Jupyter listens, naming node, address and port, and
    cancels the job; without the check it would wait for the whole --timeout."""
    host = batch.host
    index = 1 if batch.name == "slurm" else 2
    unreachable = f"10.217.{os.getpid() % 250}.{index}"
    dev = ["ip", "netns", "exec", host.node_netns, "ip", "addr"]
    _root([*dev, "add", f"{unreachable}/32", "dev", host.link_node])
    try:
        data_name = f"{host.node_name}-data"
        host.set_node_hosts(layout(host, "login-unknown") + f"{unreachable} {data_name}\n")
        began = time.monotonic()
        proc = batch.run_start("--node-address", data_name, "--timeout", "600", timeout=660)
        took = time.monotonic() - began
        print(f"measured: {batch.name} unreachable address reported after {took:.1f}s")
        assert proc.returncode != 0
        assert "Traceback" not in proc.stderr
        said = " ".join(proc.stderr.split())
        assert host.node_name in said and unreachable in said, said
        assert re.search(r"port \d+", said), said
        assert "cancelled" in said, said
        assert took < 120, "failed at once, not at --timeout"
        wait_until(lambda: not batch.live_jobs(), 60, interval=1, message="no job left")
    finally:
        _root([*dev, "del", f"{unreachable}/32", "dev", host.link_node], check=False)


def test_node_address_recorded_and_loopback_refused(batch):
    """--node-address is recorded like the other options; a loopback one is refused by
    the job (the login node could never reach it), quickly and with no job left."""
    host = batch.host
    began = time.monotonic()
    proc = batch.run_start("--node-address", "127.0.0.1", "--timeout", "600", timeout=660)
    took = time.monotonic() - began
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    said = " ".join(proc.stderr.split())
    assert "loopback" in said and host.node_name in said, said
    assert took < 120
    wait_until(lambda: not batch.live_jobs(), 60, interval=1, message="no job left")
    proc = batch.run_start("--node-address", host.node_addr)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["remote_host"] == host.node_addr
    records = [json.loads(p.read_text()) for p in batch.nbt.state_dir.glob("*.json")]
    assert [r["options"].get("node_address") for r in records] == [host.node_addr]
    proc = batch.nbt.run(host.alias, "--terminate", timeout=180)
    assert proc.returncode == 0, proc.stderr


# Idle end #####################################################################


def start_json(batch, *args: str) -> dict:
    proc = batch.run_start(*args)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def time_limit(batch, minutes: int) -> list[str]:
    return ["--time", str(minutes)] if batch.name == "slurm" else \
        ["--runtime", "0:%02d:00" % minutes]


def busy_kernel(url: str, seconds: int) -> str:
    """A kernel of the server at URL (through the tunnel) that stays busy SECONDS; its id.
    Its websocket is closed once it says busy: only its being busy keeps it alive."""
    import websocket  # websocket-client, installed by tests/run

    from helpers import _kernel_message, http_request, token_of

    base = f"http://127.0.0.1:{urlparse(url).port}"
    token = token_of(url)
    headers = {"Authorization": f"token {token}", "Content-Type": "application/json"}
    status, body = http_request("POST", f"{base}/api/kernels", timeout=60, headers=headers,
                                body=b"{}")
    assert status == 201, body
    kernel = json.loads(body)["id"]
    session = uuid.uuid4().hex
    ws = websocket.create_connection(
        f"ws://127.0.0.1:{urlparse(url).port}/api/kernels/{kernel}/channels?session_id="
        f"{session}", timeout=60, header=[f"Authorization: token {token}"])
    try:
        request = _kernel_message("execute_request", {
            "code": f"import time; time.sleep({seconds})", "silent": False,
            "store_history": False, "user_expressions": {}, "allow_stdin": False,
            "stop_on_error": True}, session)
        ws.send(json.dumps(request))
        while True:
            message = json.loads(ws.recv())
            if message.get("parent_header", {}).get("msg_id") == request["header"]["msg_id"] \
                    and message["header"]["msg_type"] == "execute_input":
                break
    finally:
        ws.close()
    return kernel


def status_row(batch) -> dict:
    proc = batch.nbt.run("--status", "--json", timeout=120)
    assert proc.returncode == 0, proc.stderr
    (row,) = json.loads(proc.stdout)
    return row


def test_idle_session_ends_and_stays_ended(batch):
    host, nbt = batch.host, batch.nbt
    out = start_json(batch, "--idle-timeout", "15s")
    job = out["job_id"]
    assert status_row(batch)["idle_timeout"] == 0.25  # minutes in JSON
    log = host.home / ".local/state/nbtunnel/nbtunnel.log"
    assert "Will shut down after 15 seconds with no kernels" in log.read_text()
    began = time.monotonic()
    # Jupyter looks once a minute: it ends at its first look after 15 s without activity.
    wait_until(lambda: job not in batch.live_jobs(), 180, interval=2,
               message=f"job {job} ended by itself")
    print(f"measured: {batch.name} idle session (15 s) ended {time.monotonic() - began:.0f}s "
          "after the URL was printed")
    text = log.read_text()
    assert "No kernels for" in text and "shutting down" in text, text[-2000:]
    proc = nbt.run(host.alias, "--ensure", "--json", timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["ended"] == "idle"
    time.sleep(3)
    assert batch.live_jobs() == [], "--ensure submitted nothing"
    row = status_row(batch)
    assert row["ended"] == "idle" and row["server"] == "stopped", row
    text = nbt.run("--status", timeout=120).stdout
    assert "ended: idle for 15s" in text, text
    proc = nbt.run(host.alias, "--ensure", timeout=300)  # still nothing, a second time
    assert proc.returncode == 0 and batch.live_jobs() == [], proc.stderr
    again = start_json(batch, "--idle-timeout", "0")  # a start command starts it again
    assert again["job_id"] != job and api_status(again["url"]) == 200
    assert status_row(batch)["idle_timeout"] == 0
    proc = nbt.run(host.alias, "--terminate", timeout=180)
    assert proc.returncode == 0, proc.stderr


def server_clock(url: str) -> tuple[float, float]:
    """(when the server at URL started, its clock now), in seconds since the epoch, from
    its /api/status, which is no activity (Jupyter does not count it)."""
    from datetime import datetime

    from helpers import http_get, token_of

    status, body = http_get(f"http://127.0.0.1:{urlparse(url).port}/api/status", timeout=10,
                            headers={"Authorization": f"token {token_of(url)}"})
    assert status == 200, body
    started = datetime.fromisoformat(json.loads(body)["started"].replace("Z", "+00:00"))
    return started.timestamp(), time.time()


def test_busy_kernel_keeps_it_and_time_limit_is_resubmitted(batch):
    host, nbt = batch.host, batch.nbt
    out = start_json(batch, "--idle-timeout", "15s", *time_limit(batch, 2))
    job = out["job_id"]
    busy_kernel(out["url"], 3600)
    log = host.home / ".local/state/nbtunnel/nbtunnel.log"
    assert "Will shut down after 15 seconds with no kernels" in log.read_text()
    # Jupyter looks at its kernels every 3 s and at itself once a minute from its start;
    # the job must outlive the idle timeout and that first look, answering, until its
    # time limit ends it (two minutes: the shortest that Slurm can ask).
    answered = []

    def ended():
        if job not in batch.live_jobs():
            return True
        with contextlib.suppress(OSError, AssertionError):
            started, now = server_clock(out["url"])
            answered.append(now - started)
        return False

    wait_until(ended, 420, interval=2, message=f"job {job} at its time limit")
    assert answered and max(answered) > 60 + 15, (answered, log.read_text()[-3000:])
    text = log.read_text()
    assert "No kernels for" not in text and "Culling '" not in text, text[-3000:]
    proc = nbt.run(host.alias, "--ensure", "--json", timeout=300)
    assert proc.returncode == 0, proc.stderr
    again = json.loads(proc.stdout)
    assert again["job_id"] != job and again["ended"] is None, again
    assert any("restarted Jupyter" in line for line in again["repairs"]), again
    assert api_status(out["url"]) == 200
    proc = nbt.run(host.alias, "--terminate", "--force", timeout=180)
    assert proc.returncode == 0, proc.stderr


# Interrupted submission ##########################################################


@contextlib.contextmanager
def slow_submit(batch):
    """The scheduler's submit command, on the login PATH, made to start 4 s late; yields
    (a file that exists once it runs, a file that then holds what it printed)."""
    host = batch.host
    program = "sbatch" if batch.name == "slurm" else "qsub"
    real = host.run(f"command -v {program}").stdout.strip()
    assert real.startswith("/"), real
    slow = host.home / "slow-submit"
    slow.mkdir(exist_ok=True)
    marker, printed = slow / "running", slow / "printed"
    marker.unlink(missing_ok=True)
    printed.unlink(missing_ok=True)
    wrapper = slow / program
    wrapper.write_text(f'#!/bin/sh\ntouch "{marker}"\nsleep 4\nout=$({real} "$@")\n'
                       f'code=$?\nprintf "%s\\n" "$out" | tee "{printed}"\nexit $code\n')
    wrapper.chmod(0o755)
    for path in (slow, wrapper):
        os.chown(path, host.uid, host.uid)
    profile = host.home / ".profile"
    kept = profile.read_text()
    profile.write_text(f'PATH="{slow}:$PATH"\nexport PATH\n' + kept)
    try:
        yield marker, printed
    finally:
        profile.write_text(kept)


def test_interrupt_while_submitting_leaves_no_job(batch):
    """Ctrl-C while the scheduler's submit command runs (its job id not known yet)."""
    with slow_submit(batch) as (marker, _):
        proc = batch.nbt.popen(batch.host.alias, "--manager", batch.name, "--timeout", "120",
                               start_new_session=True)
        wait_until(marker.exists, 120, interval=0.1, message="the submit command runs")
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C at a terminal: its process group
        _, err = proc.communicate(timeout=180)
        assert proc.returncode != 0 and "Traceback" not in err, err
        time.sleep(8)  # the submit command had 4 s to go: a job would be there by now
        wait_until(lambda: not batch.live_jobs(), 60, interval=1, message="no job left")


@pytest.mark.parametrize("killed", ["everything", "nbtunnel"])
def test_killed_while_submitting_leaves_no_job_unseen(batch, killed):
    """nbtunnel killed outright (SIGKILL: nothing on this side can cancel) while the submit
    command runs.  With everything it runs here (its ssh client and the master too, as when
    a logout kills the session's processes), the remote side can no longer tell anyone the
    id and cancels the job itself.  With nbtunnel alone, its ssh client still takes the
    answer: the job runs unrecorded, --status shows it and --terminate ends it."""
    host, nbt = batch.host, batch.nbt
    with slow_submit(batch) as (marker, printed):
        proc = nbt.popen(host.alias, "--manager", batch.name, "--timeout", "120",
                         start_new_session=True)
        wait_until(marker.exists, 120, interval=0.1, message="the submit command runs")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
        if killed == "everything":  # its ssh processes run in sessions of their own
            ssh = subprocess.run(["pkill", "-KILL", "-f", "^ssh -F %s " % re.escape(
                str(nbt.ssh_config))], check=False)
            assert ssh.returncode == 0, "no ssh process of nbtunnel was found"
        wait_until(lambda: printed.exists() and re.search(r"[0-9]", printed.read_text()), 60,
                   interval=0.2, message="the job was submitted and given an id")
        if killed == "nbtunnel":
            wait_until(batch.live_jobs, 60, interval=1, message="the job is there")
            proc = nbt.run(host.alias, "--status", timeout=120)
            assert proc.returncode == 0 and "not recorded here" in proc.stdout, proc
            assert "--terminate" in proc.stdout, proc.stdout
            proc = nbt.run(host.alias, "--terminate", timeout=180)
            assert proc.returncode == 0, proc.stderr
        wait_until(lambda: not batch.live_jobs(), 60, interval=1, message="no job left")
