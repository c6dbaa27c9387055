"""What every batch manager does alike, on the real Slurm cluster (tests/cluster.py) and
the real Grid Engine cell (tests/gecell.py): each test runs once per scheduler.

Jupyter runs as a job on the compute node, which this machine cannot reach; the tunnel
goes through the login node to the node's address.  Every check is what a user sees
(the URL answers, a kernel computes, the scheduler lists no job left) or what the
scheduler's own processes show.  What one scheduler alone does stays in
tests/test_slurm.py and tests/test_gridengine.py.
"""

from __future__ import annotations

import json
import re
import signal
import stat
import threading
import time
from pathlib import Path

import pytest

import test_gridengine as ge
import test_slurm as slurm
from helpers import api_status, local_port_open, run_kernel_code, wait_until
from unattended import run_in_pty

pytestmark = pytest.mark.timeout(600)


class Slurm:
    """--manager slurm on the test cluster, as the tests below ask about it."""

    name = "slurm"
    flags = slurm.SLURM
    job_parents = ("slurmstepd",)  # Jupyter's parent on the node
    running = "RUNNING"
    lifecycle = ()  # the options of the lifecycle's job
    time_left = r".+"
    still_waiting = r"still PENDING: Resources"
    short_limit = ("--time", "1")  # a job that ends at its time limit within a minute or so
    impossible = [
        (("--cpus", "3"), "can never start, so it was cancelled: squeue says PENDING "
                          "(PartitionConfig)"),
        (("--partition", "nope"), "sbatch refused the job: sbatch: error: invalid partition "
                                  "specified: nope"),
        (("--constraint", "nope"), "sbatch refused the job: sbatch: error: Batch job "
                                   "submission failed: Invalid feature specification"),
    ]

    def __init__(self, cell, nbt) -> None:
        self.cell, self.nbt = cell, nbt
        self.host = cell  # its login node, as tests/test_batch.py calls it

    def run_start(self, *args: str, timeout: float = 240):
        """A start of a session on the login node, as it ended (a CompletedProcess)."""
        return self.nbt.run(self.cell.alias, "--json", *self.flags, *args, timeout=timeout)

    def live_jobs(self) -> list[str]:
        """Ids of the user's jobs that wait, run or end (not those already gone)."""
        proc = self.cell.slurm(["squeue", "-h", "-u", self.cell.user, "-t", slurm.ACTIVE,
                                "-o", "%i"])
        return proc.stdout.split()

    def jobs(self, session: str = "nbtunnel") -> list[tuple[str, str]]:
        """(id, state) of the active jobs nbtunnel submitted for SESSION."""
        return [(r[0], r[1]) for r in slurm.ours(self.cell, session)]

    def wait_pending(self) -> str:
        return slurm.wait_pending(self.cell)

    def pending_line(self, job: str) -> str:
        return rf"\rnbtunnel: job {job} PENDING \(Resources\)[^\r]*\(\d+\.\d s\)"

    def hold(self) -> str:
        """A job of the test's own that holds every CPU of the node."""
        proc = self.cell.ssh(f"sbatch --parsable -c {self.cell.cpus} --time=5 "
                             "--job-name=holder --wrap 'sleep 600'")
        assert proc.returncode == 0, proc.stderr
        job = proc.stdout.strip()
        wait_until(lambda: [job, "RUNNING"] in [r[:2] for r in slurm.squeue(self.cell)], 60,
                   interval=0.3, message="the holder job runs")
        return job

    def release(self, job: str) -> None:
        self.cell.slurm(["scancel", job])

    def timed_out(self, job: str) -> None:
        """The scheduler says JOB ended at its time limit."""
        assert [r[1] for r in slurm.squeue(self.cell, "-t", "all") if r[0] == job] == [
            "TIMEOUT"]

    def node_jupyters(self) -> list[int]:
        return slurm.node_jupyters(self.cell)


class GridEngine(Slurm):
    """--manager gridengine on the test cell."""

    name = "gridengine"
    flags = ge.GE
    # The job's own process relays the s_rt warning to Jupyter, its child.
    job_parents = ("python", "sge_shepherd")
    running = "r"
    lifecycle = ("--runtime", "1:00:00", "--memory", "8G")
    time_left = r"0:5\d:\d\d"  # of the hour asked
    still_waiting = r"still qw: queue instance .* dropped because it is full"
    short_limit = ("--runtime", "0:0:40")
    impossible = [
        (("--queue", "nope"), 'qsub refused the job: Unable to run job: Job was rejected '
                              'because job requests unknown queue "nope" / Exiting.'),
        (("--slots", "3"), "qsub refused the job: Unable to run job: error: no suitable "
                           "queues / Exiting."),
        (("--memory", "100G", "--mem-complex", "mem_req"),
         "qsub refused the job: Unable to run job: error: no suitable queues / Exiting."),
        (("--pe", "mpi"), 'qsub refused the job: Unable to run job: job rejected: the '
                          'requested parallel environment "mpi" does not exist / Exiting.'),
    ]

    def jobs(self, session: str = "nbtunnel") -> list[tuple[str, str]]:
        return [(r["job_id"], r["state"]) for r in ge.ours(self.cell, session)]

    def live_jobs(self) -> list[str]:
        for _ in range(5):  # qstat fails now and then while the qmaster is busy: ask again
            if self.cell.ge(["qstat", "-u", self.cell.user]).returncode == 0:
                break
            time.sleep(1)
        return self.cell.jobs()

    def wait_pending(self) -> str:
        return ge.wait_pending(self.cell)

    def pending_line(self, job: str) -> str:
        # Grid Engine's state and its scheduler's own reason (qstat -j's scheduling
        # info), cut to the terminal's width: how much of it fits depends on the length
        # of the node's name (the run's pid is in it).
        return (rf"\rnbtunnel: job {job} qw \(queue instance \"{self.cell.queue}@"
                rf"{self.cell.node_name}\" dr")

    def hold(self) -> str:
        """A job of the test's own that holds every slot of the node."""
        proc = self.cell.ssh(f"qsub -terse -b y -N holder -pe smp {self.cell.slots} "
                             "-l h_rt=600 sleep 600")
        assert proc.returncode == 0, proc.stderr
        job = proc.stdout.strip()
        wait_until(lambda: {"job_id": job, "name": "holder", "state": "r"} in
                   self.cell.qstat_rows(), 60, interval=0.3, message="the holder job runs")
        return job

    def release(self, job: str) -> None:
        self.cell.ge(["qdel", "-f", job])

    def timed_out(self, job: str) -> None:
        """Grid Engine forgets a job once it ended: gone is all qstat says."""
        assert job not in self.cell.jobs()

    def node_jupyters(self) -> list[int]:
        return ge.node_jupyters(self.cell)


SCHEDULERS = {"slurm": (Slurm, "cluster", "nbt_cluster"),  # for conftest's `sched`
              "gridengine": (GridEngine, "gecell", "nbt_ge")}


@pytest.fixture
def holder(sched):
    """A job that holds the whole node; ended afterwards."""
    job = sched.hold()
    yield job
    sched.release(job)


def start(sched, *args: str, timeout: float = 180) -> dict:
    proc = sched.nbt.run(sched.cell.alias, "--json", *sched.flags, *args, timeout=timeout)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_job_lifecycle(sched):
    cell, nbt = sched.cell, sched.nbt
    logins = cell.auth_count()
    began = time.monotonic()
    out = start(sched, *sched.lifecycle)
    took = time.monotonic() - began
    assert cell.auth_count() == logins + 1, "one SSH authentication per command"
    assert out["reused"] is False and out["manager"] == sched.name
    assert out["node"] == cell.node_name and re.fullmatch(r"\d+", out["job_id"])
    assert out["remote_host"] == cell.node_addr
    job, url, token = out["job_id"], out["url"], out["token"]
    assert api_status(url) == 200
    base = f"http://127.0.0.1:{out['local_port']}"
    assert run_kernel_code(base, token, "1+1").strip() == "2"
    print(f"measured: start to URL with --manager {sched.name} {took:.1f}s")

    # Jupyter runs on the compute node, under the scheduler's own process, never on
    # the login node.
    pids = sched.node_jupyters()
    server = [p for p in pids if not any(word in Path(f"/proc/{p}/cmdline").read_text()
                                         for word in ("ipykernel", "NBT_JOB_SPEC"))]
    assert len(server) == 1, pids
    pid = server[0]
    assert pid == out["pid"] or slurm.netns_of(pid) == slurm.netns_of(cell.node_pids()[0])
    up, chain = pid, []
    for _ in sched.job_parents:
        up = slurm.parent(up)
        chain.append(slurm.comm(up))
    assert all(c.startswith(want) for c, want in zip(chain, sched.job_parents)), chain
    login_ns = slurm.netns_of(cell.sshd.pid)
    assert slurm.netns_of(pid) != login_ns
    assert [p for p in cell.pids("jupyter") if slurm.netns_of(p) == login_ns] == []
    assert token not in Path(f"/proc/{pid}/cmdline").read_text()
    # Bound to the node's cluster address only: not its 127.0.0.1.
    assert cell.port_open(out["remote_port"], cell.node_addr)
    probe = cell.node_run(["python3", "-c", "import socket,sys; socket.create_connection("
                           "('127.0.0.1', int(sys.argv[1])), timeout=2)",
                           str(out["remote_port"])])
    assert probe.returncode != 0, "Jupyter must not listen on the node's 127.0.0.1"
    # What the job published, and its spec: private files in a private directory.
    d = slurm.state_dir(cell)
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    for name in ("nbtunnel.job.json", "nbtunnel.spec.json", "nbtunnel.json", "nbtunnel.log"):
        assert stat.S_IMODE((d / name).stat().st_mode) == 0o600, name
    published = json.loads((d / "nbtunnel.job.json").read_text())
    assert published["addr"] == cell.node_addr and str(published["job"]) == job

    # Run again: the same job, the same URL.
    logins = cell.auth_count()
    again = start(sched)
    assert again["reused"] is True and again["url"] == url and again["job_id"] == job
    assert cell.auth_count() - logins <= 1  # the master of the first run is still up

    # The local record deleted: still found (the job's published file and the record there).
    for rec in nbt.state_dir.glob("*.json"):
        rec.unlink()
    again = start(sched)
    assert again["reused"] is True and again["token"] == token and again["job_id"] == job
    assert api_status(again["url"]) == 200

    # Another machine: no local record, no shared connection, and no record on the cluster
    # either: the job is found by its name, its address by what it published.
    (d / "nbtunnel.json").unlink()
    other = type(nbt)(cell)
    try:
        logins = cell.auth_count()
        there = start(type(sched)(cell, other))
        assert cell.auth_count() == logins + 1
        assert there["reused"] is True and there["token"] == token and there["job_id"] == job
        assert api_status(there["url"]) == 200
    finally:
        slurm.close_master(other)
    assert sched.jobs() == [(job, sched.running)]

    # --status, from the scheduler: job id, node, state, time left.
    proc = nbt.run("--status", "--json", timeout=60)
    assert proc.returncode == 0, proc.stderr
    (row,) = json.loads(proc.stdout)
    assert row["server"] == "running" and row["tunnel"] == "up"
    assert row["job_id"] == job and row["node"] == cell.node_name
    assert row["job_state"] == sched.running
    assert re.fullmatch(sched.time_left, row["time_left"] or ""), row["time_left"]
    proc = nbt.run("--status", timeout=60)
    assert f"job={job} {sched.running} node={cell.node_name}" in proc.stdout, proc.stdout

    # --terminate: Jupyter shut down through its API, then no job left.
    proc = nbt.run(cell.alias, "--terminate", "--json", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["how"] == "api"
    assert sched.jobs() == []
    # Of the session's files there, only the mark that it ended on purpose is left.
    assert sorted(p.name for p in d.glob("nbtunnel.*")) == ["nbtunnel.ended"]
    wait_until(lambda: not sched.node_jupyters(), 30, message="Jupyter gone from the node")
    assert not local_port_open(out["local_port"])


def test_busy_node_shows_pending_then_starts(sched, holder):
    cell, nbt = sched.cell, sched.nbt
    result = {}
    argv = nbt.argv(cell.alias, *sched.flags)
    logins = cell.auth_count()
    runner = threading.Thread(target=lambda: result.update(
        zip(("code", "output"), run_in_pty(argv, nbt._env(None), timeout=120))))
    runner.start()
    job = sched.wait_pending()
    time.sleep(4)  # a few redraws of the line while it waits
    sched.release(holder)  # the node frees: the start goes on
    runner.join(150)
    output = result.get("output", "")
    assert result.get("code") == 0, output
    assert re.search(sched.pending_line(job), output), output
    url = re.search(r"http://127\.0\.0\.1:\d+/lab\?token=\w+", output).group(0)
    assert api_status(url) == 200
    assert sched.jobs() == [(job, sched.running)]
    assert cell.auth_count() == logins + 1, "a long wait, still one SSH authentication"


def test_pending_start_hits_timeout_and_cancels_its_job(sched, holder):
    began = time.monotonic()
    proc = sched.nbt.run(sched.cell.alias, *sched.flags, "--timeout", "6", timeout=120)
    took = time.monotonic() - began
    assert proc.returncode == 1
    assert re.search(rf"job (\d+) on \S+ did not start within 6s \({sched.still_waiting}\); "
                     r"nbtunnel cancelled it", proc.stderr), proc.stderr
    assert "cancelled job" in proc.stderr
    assert "\r" not in proc.stderr and "\x1b" not in proc.stderr  # no progress line in a pipe
    assert proc.stdout == ""
    assert sched.jobs() == []
    assert 6 <= took < 40, took


def test_ctrl_c_while_pending_cancels_the_job(sched, holder):
    proc = sched.nbt.popen(sched.cell.alias, *sched.flags)
    job = sched.wait_pending()
    time.sleep(2)  # the scheduler may list the job before its submit command has returned
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert f"cancelled job {job}" in err
    assert sched.jobs() == []


@pytest.mark.parametrize("sched, option, words", [
    pytest.param(name, option, words, id=f"{name}{option[0]}")
    for name, (kind, _, _) in SCHEDULERS.items() for option, words in kind.impossible],
    indirect=["sched"])
def test_impossible_requests_fail_with_the_schedulers_words(sched, option, words):
    proc = sched.nbt.run(sched.cell.alias, *sched.flags, *option, timeout=120)
    assert proc.returncode == 1
    assert words in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert sched.cell.jobs() == []
    assert not slurm.local_port_open_any(sched.nbt)


def test_time_limit_job_is_resubmitted_by_ensure(sched):
    cell, nbt = sched.cell, sched.nbt
    out = start(sched, *sched.short_limit)
    job = out["job_id"]
    began = time.monotonic()
    wait_until(lambda: not sched.jobs(), 150, interval=1, message=f"job {job} at its time limit")
    ended = time.monotonic() - began
    sched.timed_out(job)
    assert not slurm.answers(out["url"])  # the forward leads nowhere now
    proc = nbt.run(cell.alias, "--ensure", "--json", timeout=300)
    assert proc.returncode == 0, proc.stderr
    again = json.loads(proc.stdout)
    assert again["job_id"] != job
    assert again["local_port"] == out["local_port"] and again["token"] == out["token"]
    assert again["url"] == out["url"]
    assert any("restarted Jupyter" in line for line in again["repairs"]), again
    assert api_status(out["url"]) == 200
    print(f"measured: {' '.join(sched.short_limit)} job ended {ended:.0f}s after the URL "
          "was printed")
