"""--manager gridengine on a real two-host Grid Engine cell (tests/gecell.py).

The same lifecycle as tests/test_slurm.py, with Grid Engine's own programs:
Jupyter runs as a job on the execution host, which this machine cannot reach;
the tunnel goes through the login node (the qmaster's host) to the node's
address. Every check is what a user sees (the URL answers, a kernel computes,
qstat shows no job left) or what the cell's own processes show (sge_shepherd is
Jupyter's parent on the execution host).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import signal
import stat
import subprocess
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import _REMOTES, NbtRunner
from helpers import api_status, local_port_open, run_kernel_code, wait_until
from unattended import finish, read_line, run_in_pty, wait_logged

pytestmark = pytest.mark.timeout(600)

GE = ("--manager", "gridengine")
SESSION_JOB = "nbtunnel-nbtunnel"


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


def start(nbt, *args: str, timeout: float = 180) -> dict:
    proc = nbt.run(nbt.remote.alias, "--json", *GE, *args, timeout=timeout)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def ours(cell, session: str = "nbtunnel") -> list[dict]:
    """The jobs nbtunnel submitted for SESSION that qstat lists."""
    return [r for r in cell.qstat_rows() if r["name"] == f"nbtunnel-{session}"]


def state_dir(cell) -> Path:
    return cell.home / ".local/state/nbtunnel"


def node_jupyters(cell) -> list[int]:
    """Jupyter processes of the cell user inside the execution host's namespace."""
    found = []
    for pid in cell.node_pids():
        try:
            if b"jupyter" in Path(f"/proc/{pid}/cmdline").read_bytes() and \
                    os.stat(f"/proc/{pid}").st_uid == cell.uid:
                found.append(pid)
        except OSError:
            pass
    return found


def netns_of(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/net")


def parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])


def comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def close_master(nbt) -> None:
    """Close the tunnel of an NbtRunner (its ssh master) and drop its files; the job stays."""
    import shutil

    for rec in nbt.state_dir.glob("*.json"):
        socket = json.loads(rec.read_text()).get("socket")
        if socket:
            subprocess.run(["ssh", "-F", str(nbt.ssh_config), "-S", socket, "-O", "exit",
                            nbt.remote.alias], capture_output=True, check=False, timeout=30)
    shutil.rmtree(nbt.tmp, ignore_errors=True)


def answers(url: str) -> bool:
    try:
        return api_status(url) == 200
    except OSError:  # reset or refused: the tunnel's far end is gone
        return False


@pytest.fixture
def holder(gecell):
    """A job of the test's own that holds every slot of the node; deleted afterwards."""
    proc = gecell.ssh(f"qsub -terse -b y -N holder -pe smp {gecell.slots} -l h_rt=600 sleep 600")
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip()
    wait_until(lambda: {"job_id": job, "name": "holder", "state": "r"} in gecell.qstat_rows(),
               60, interval=0.3, message="the holder job runs")
    yield job
    gecell.ge(["qdel", "-f", job])


def test_job_lifecycle(gecell, nbt_ge):
    cell, nbt = gecell, nbt_ge
    logins = cell.auth_count()
    began = time.monotonic()
    out = start(nbt, "--runtime", "1:00:00", "--memory", "8G")
    took = time.monotonic() - began
    assert cell.auth_count() == logins + 1, "one SSH authentication per command"
    assert out["reused"] is False and out["manager"] == "gridengine"
    assert out["node"] == cell.node_name and re.fullmatch(r"\d+", out["job_id"])
    assert out["remote_host"] == cell.node_addr
    job, url, token = out["job_id"], out["url"], out["token"]
    assert api_status(url) == 200
    base = f"http://127.0.0.1:{out['local_port']}"
    assert run_kernel_code(base, token, "1+1").strip() == "2"
    print(f"measured: start to URL with --manager gridengine {took:.1f}s")

    # Jupyter runs on the execution host, a child of sge_shepherd, never on the login node.
    pids = node_jupyters(cell)
    server = [p for p in pids if "ipykernel" not in " ".join(
        Path(f"/proc/{p}/cmdline").read_text().split("\0"))]
    assert len(server) == 1, pids
    pid = server[0]
    assert comm(parent(pid)) == "sge_shepherd", comm(parent(pid))
    login_ns = netns_of(cell.sshd.pid)
    assert netns_of(pid) != login_ns
    assert [p for p in cell.pids("jupyter") if netns_of(p) == login_ns] == []
    assert token not in Path(f"/proc/{pid}/cmdline").read_text()
    assert cell.port_open(out["remote_port"], cell.node_addr)
    d = state_dir(cell)
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    for name in ("nbtunnel.job.json", "nbtunnel.spec.json", "nbtunnel.json", "nbtunnel.log"):
        assert stat.S_IMODE((d / name).stat().st_mode) == 0o600, name
    published = json.loads((d / "nbtunnel.job.json").read_text())
    assert published["addr"] == cell.node_addr and str(published["job"]) == job

    # Run again: the same job, the same URL.
    again = start(nbt)
    assert again["reused"] is True and again["url"] == url and again["job_id"] == job

    # The local record deleted: still found.
    for rec in nbt.state_dir.glob("*.json"):
        rec.unlink()
    again = start(nbt)
    assert again["reused"] is True and again["token"] == token and again["job_id"] == job

    # Another machine, and no record on the cluster either: found by the job's name.
    (d / "nbtunnel.json").unlink()
    other = type(nbt)(cell)
    try:
        logins = cell.auth_count()
        there = start(other)
        assert cell.auth_count() == logins + 1
        assert there["reused"] is True and there["token"] == token and there["job_id"] == job
        assert api_status(there["url"]) == 200
    finally:
        close_master(other)
    assert [(r["job_id"], r["state"]) for r in ours(cell)] == [(job, "r")]

    # --status, from Grid Engine: job id, node, state, time left (of the hour asked).
    proc = nbt.run("--status", "--json", timeout=60)
    assert proc.returncode == 0, proc.stderr
    (row,) = json.loads(proc.stdout)
    assert row["server"] == "running"
    assert row["job_id"] == job and row["node"] == cell.node_name and row["job_state"] == "r"
    assert re.fullmatch(r"0:5\d:\d\d", row["time_left"]), row["time_left"]
    proc = nbt.run("--status", timeout=60)
    assert f"job={job} r node={cell.node_name}" in proc.stdout, proc.stdout

    # --terminate: Jupyter shut down through its API, then no job left.
    proc = nbt.run(cell.alias, "--terminate", "--json", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["how"] == "api"
    assert ours(cell) == []
    log = (d / "nbtunnel.log").read_text() if (d / "nbtunnel.log").exists() else ""
    assert "Shutting down on /api/shutdown request" in log, log[-2000:]
    wait_until(lambda: not node_jupyters(cell), 30, message="Jupyter gone from the node")


def wait_pending(cell, session: str = "nbtunnel") -> str:
    """Wait until nbtunnel's job waits in the queue (qw); its id."""
    rows = wait_until(lambda: [r for r in ours(cell, session) if r["state"] == "qw"], 60,
                      interval=0.3, message="nbtunnel's job waiting (qw)")
    return rows[0]["job_id"]


def test_busy_node_shows_pending_then_starts(gecell, nbt_ge, holder):
    cell, nbt = gecell, nbt_ge
    result = {}
    argv = nbt.argv(cell.alias, *GE)
    logins = cell.auth_count()
    runner = threading.Thread(target=lambda: result.update(
        zip(("code", "output"), run_in_pty(argv, nbt._env(None), timeout=120))))
    runner.start()
    job = wait_pending(cell)
    time.sleep(4)  # a few redraws of the line while it waits
    cell.ge(["qdel", "-f", holder])  # the node frees: the start goes on
    runner.join(150)
    output = result.get("output", "")
    assert result.get("code") == 0, output
    # Grid Engine's state and its scheduler's own reason (qstat -j's scheduling info).
    # (cut to the terminal's width)
    line = re.search(rf"\rnbtunnel: job {job} qw \(queue instance \"{cell.queue}@{cell.node_name}"
                     r"\" dropped because", output)
    assert line, output
    url = re.search(r"http://127\.0\.0\.1:\d+/lab\?token=\w+", output).group(0)
    assert api_status(url) == 200
    assert [(r["job_id"], r["state"]) for r in ours(cell)] == [(job, "r")]
    assert cell.auth_count() == logins + 1, "a long wait, still one SSH authentication"


def test_pending_start_hits_timeout_and_cancels_its_job(gecell, nbt_ge, holder):
    began = time.monotonic()
    proc = nbt_ge.run(gecell.alias, *GE, "--timeout", "6", timeout=120)
    took = time.monotonic() - began
    assert proc.returncode == 1
    assert re.search(r"job (\d+) on \S+ did not start within 6s \(still qw: queue instance "
                     r".* dropped because it is full\); nbtunnel cancelled it", proc.stderr), \
        proc.stderr
    assert "cancelled job" in proc.stderr
    assert "\r" not in proc.stderr and proc.stdout == ""
    assert ours(gecell) == []
    assert 6 <= took < 40, took


def test_ctrl_c_while_pending_cancels_the_job(gecell, nbt_ge, holder):
    proc = nbt_ge.popen(gecell.alias, *GE)
    job = wait_pending(gecell)
    time.sleep(2)  # qstat lists the job before qsub has returned: let the submission end
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert f"cancelled job {job}" in err
    assert ours(gecell) == []


@pytest.mark.parametrize("option, words", [
    (("--queue", "nope"), 'qsub refused the job: Unable to run job: Job was rejected because '
                          'job requests unknown queue "nope" / Exiting.'),
    (("--slots", "3"), "qsub refused the job: Unable to run job: error: no suitable queues / "
                       "Exiting."),
    (("--memory", "100G", "--mem-complex", "mem_req"),
     "qsub refused the job: Unable to run job: error: no suitable queues / Exiting."),
    (("--pe", "mpi"), 'qsub refused the job: Unable to run job: job rejected: the requested '
                      'parallel environment "mpi" does not exist / Exiting.'),
])
def test_impossible_requests_fail_with_grid_engines_words(gecell, nbt_ge, option, words):
    proc = nbt_ge.run(gecell.alias, *GE, *option, timeout=120)
    assert proc.returncode == 1
    assert words in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert gecell.jobs() == []
    assert not any(local_port_open(json.loads(r.read_text())["local_port"])
                   for r in nbt_ge.state_dir.glob("*.json"))


def test_a_job_in_error_state_is_cancelled_with_its_reason(gecell, nbt_ge):
    # A working directory that the job cannot enter on the node: Grid Engine holds the job
    # in Eqw, which never clears by itself.
    proc = nbt_ge.run(gecell.alias, *GE, "--qsub-arg=-wd", "--qsub-arg=/nonexistent/dir",
                      timeout=180)
    assert proc.returncode == 1
    assert re.search(r"job \d+ can never start, so it was cancelled: qstat says Eqw \(.*"
                     r"/nonexistent/dir", proc.stderr), proc.stderr
    assert gecell.jobs() == []


HOSTILE = "$(touch {canary})`touch {canary}`;touch {canary} x"


def test_hostile_grid_engine_values_are_data(gecell, nbt_ge):
    nbt = nbt_ge
    canary = gecell.home / "canary"
    value = HOSTILE.format(canary=canary)
    for flag in ("--queue", "--runtime", "--slots", "--memory", "--pe", "--project"):
        proc = nbt.run(gecell.alias, *GE, flag, value, timeout=120)
        assert proc.returncode == 1, (flag, proc.stderr)
        assert "qsub refused the job" in proc.stderr, (flag, proc.stderr)
        assert gecell.jobs() == [], flag
    # A value that looks like an option is still the option's value.
    proc = nbt.run(gecell.alias, *GE, "--queue=-b", timeout=120)
    assert proc.returncode == 1 and 'unknown queue "-b"' in proc.stderr, proc.stderr
    # Accepted: the job carries the value as it was typed (its context variable).
    out = start(nbt, "--qsub-arg=-ac", f"--qsub-arg=note={value}")
    job = out["job_id"]
    detail = gecell.ge(["qstat", "-j", job]).stdout
    assert re.search(r"context:\s+note=\$\(touch", detail), detail
    assert api_status(out["url"]) == 200
    proc = nbt.run(gecell.alias, "--terminate", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert not canary.exists()
    assert gecell.jobs() == []


def test_run_time_limit_job_is_resubmitted_by_ensure(gecell, nbt_ge):
    cell, nbt = gecell, nbt_ge
    out = start(nbt, "--runtime", "0:0:40")
    job = out["job_id"]
    began = time.monotonic()
    wait_until(lambda: not ours(cell), 150, interval=1, message=f"job {job} at its h_rt")
    ended = time.monotonic() - began
    assert not answers(out["url"])
    proc = nbt.run(cell.alias, "--ensure", "--json", timeout=300)
    assert proc.returncode == 0, proc.stderr
    again = json.loads(proc.stdout)
    assert again["job_id"] != job
    assert again["local_port"] == out["local_port"] and again["token"] == out["token"]
    assert again["url"] == out["url"]
    assert any("restarted Jupyter" in line for line in again["repairs"]), again
    assert api_status(out["url"]) == 200
    print(f"measured: h_rt=0:0:40 job ended {ended:.0f}s after the URL was printed")


def test_watch_resubmits_a_job_that_ended(gecell, nbt_ge):
    cell, nbt = gecell, nbt_ge
    watch = nbt.popen(cell.alias, "--json", *GE, "--watch", "--interval", "1", "--timeout", "60")
    first = json.loads(read_line(watch, 120))
    url = first["url"]
    assert answers(url)
    cell.ge(["qdel", first["job_id"]])  # as at a time limit, a node failure or a preemption
    wait_until(lambda: [r for r in ours(cell) if r["job_id"] != first["job_id"]
                        and r["state"] == "r"] and answers(url), 120, interval=0.5,
               message="--watch resubmitted the job")
    said = wait_logged(watch, f"restarted Jupyter on {cell.alias}", 60)
    code, _, err = finish(watch)
    assert code == 0, said + err


# Without the cell ###############################################################


def plugin():
    spec = importlib.util.spec_from_file_location(
        "gridengine_plugin", Path(__file__).parent.parent / "plugins" / "gridengine.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.noroot
def test_job_options_are_words_of_their_own():
    ge = plugin().GridEngine()
    blank = {o.dest: None for o in ge.options}

    def words(**given):
        return ge.job_options(argparse.Namespace(**dict(blank, **given)))

    assert words() == []
    assert words(queue="gpu.q", runtime="8:00:00", memory="4G", slots="4", project="p1") == [
        "-q", "gpu.q", "-l", "h_rt=8:00:00", "-l", "h_vmem=4G", "-pe", "smp", "4", "-P", "p1"]
    assert words(memory="4G", mem_complex="mem_free", pe="mpi") == [
        "-l", "mem_free=4G", "-pe", "mpi", "1"]
    assert words(queue="-b", qsub_arg=["-R", "y"]) == ["-q", "-b", "-R", "y"]


QSTAT_XML = """<?xml version='1.0'?>
<job_info  xmlns:xsd="http://arc.liv.ac.uk/repos/darcs/sge/source/dist/util/resources/schemas/qstat/qstat.xsd">
  <queue_info>
    <job_list state="running">
      <JB_job_number>2</JB_job_number>
      <JB_name>nbtunnel-nbtunnel</JB_name>
      <state>r</state>
      <JAT_start_time>{start}</JAT_start_time>
      <queue_name>all.q@node7</queue_name>
      <hard_request name="h_vmem" resource_contribution="0.000000">1G</hard_request>
      <hard_request name="h_rt" resource_contribution="0.000000">3600</hard_request>
    </job_list>
  </queue_info>
  <job_info>
    <job_list state="pending">
      <JB_job_number>3</JB_job_number>
      <JB_name>other</JB_name>
      <state>qw</state>
      <queue_name></queue_name>
    </job_list>
  </job_info>
</job_info>
"""


@pytest.mark.noroot
def test_qstat_xml_is_read_through_the_declared_format():
    import nbtunnel

    ge = plugin().GridEngine()
    mgr = ge.describe("nbtunnel")
    start = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time.time() - 600))
    rows = nbtunnel.r_job_rows(mgr, QSTAT_XML.format(start=start))
    assert [(r["job_id"], r["state"], r["phase"], r["node"]) for r in rows] == [
        ("2", "r", "running", "node7"), ("3", "qw", "waiting", None)]
    assert rows[0]["time_left"] in ("0:50:00", "0:49:59")
    assert rows[1].get("time_left") is None
    assert nbtunnel.r_job_rows(mgr, "") == []
    found = re.search(mgr["reason_re"], "job_number:  3\nscheduling info:            "
                      "queue instance \"all.q@n\" dropped because it is full\n", re.M)
    assert found.group(1) == 'queue instance "all.q@n" dropped because it is full'
