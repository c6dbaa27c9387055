"""--manager slurm on the real two-host test cluster (tests/cluster.py).

Jupyter runs as a batch job on the compute node, which this machine cannot
reach; the tunnel goes through the login node's sshd to the node's address.
Every check is what a user sees (the URL answers, a kernel computes, squeue
shows no job left) or what the cluster's own processes show (slurmstepd is
Jupyter's parent on the compute node).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest

from helpers import api_status, local_port_open, run_kernel_code, wait_until
from unattended import finish, read_line, run_in_pty, wait_logged, wait_watched

pytestmark = pytest.mark.timeout(600)

SLURM = ("--manager", "slurm")
ACTIVE = "PENDING,RUNNING,SUSPENDED,COMPLETING,CONFIGURING"


def start(nbt, *args: str, timeout: float = 180) -> dict:
    proc = nbt.run(nbt.remote.alias, "--json", *SLURM, *args, timeout=timeout)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def squeue(cluster, *args: str) -> list[list[str]]:
    """squeue rows (as root, the admin's view) for the cluster user: id|state|reason|name."""
    proc = cluster.slurm(["squeue", "-h", "-u", cluster.user, *args, "-o", "%i|%T|%r|%j"])
    assert proc.returncode == 0, proc.stderr
    return [line.split("|") for line in proc.stdout.splitlines() if line.strip()]


def active(cluster) -> list[list[str]]:
    return squeue(cluster, "-t", ACTIVE)


def job_field(cluster, job: str, key: str) -> str:
    proc = cluster.scontrol("show", "job", "-o", job)
    match = re.search(rf"(?:^| ){key}=(.*?)(?= [A-Za-z/:]+=|$)", proc.stdout.strip())
    return match.group(1).rstrip() if match else ""  # the value never ends in a space


def state_dir(cluster) -> Path:
    return cluster.home / ".local/state/nbtunnel"


def node_jupyters(cluster) -> list[int]:
    """Jupyter processes of the cluster user inside the compute node's namespace."""
    return [pid for pid in cluster.node_pids()
            if b"jupyter" in Path(f"/proc/{pid}/cmdline").read_bytes()
            and os.stat(f"/proc/{pid}").st_uid == cluster.uid]


def netns_of(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/net")


def parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])


def comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def close_master(nbt) -> None:
    """Close the tunnel of an NbtRunner (its ssh master) and drop its files; the job stays."""
    for rec in nbt.state_dir.glob("*.json"):
        socket = json.loads(rec.read_text()).get("socket")
        if socket:
            subprocess.run(["ssh", "-F", str(nbt.ssh_config), "-S", socket, "-O", "exit",
                            nbt.remote.alias], capture_output=True, check=False, timeout=30)
    shutil.rmtree(nbt.tmp, ignore_errors=True)


@pytest.fixture
def holder(cluster):
    """A job of the test's own that holds every CPU of the node; cancelled afterwards."""
    proc = cluster.ssh(f"sbatch --parsable -c {cluster.cpus} --time=5 --job-name=holder "
                       "--wrap 'sleep 600'")
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip()
    wait_until(lambda: [job, "RUNNING"] in [r[:2] for r in squeue(cluster)], 60,
               interval=0.3, message="the holder job runs")
    yield job
    cluster.slurm(["scancel", job])


def test_job_lifecycle(cluster, nbt_cluster):
    nbt = nbt_cluster
    logins = cluster.auth_count()
    began = time.monotonic()
    out = start(nbt)
    took = time.monotonic() - began
    assert cluster.auth_count() == logins + 1, "one SSH authentication per command"
    assert out["reused"] is False and out["manager"] == "slurm"
    assert out["node"] == cluster.node_name and re.fullmatch(r"\d+", out["job_id"])
    assert out["remote_host"] == cluster.node_addr
    job, url, token = out["job_id"], out["url"], out["token"]
    assert api_status(url) == 200
    base = f"http://127.0.0.1:{out['local_port']}"
    assert run_kernel_code(base, token, "1+1").strip() == "2"
    print(f"measured: start to URL with --manager slurm {took:.1f}s")

    # Jupyter runs on the compute node, a child of slurmstepd, never on the login node.
    pids = node_jupyters(cluster)
    server = [p for p in pids if "ipykernel" not in " ".join(
        Path(f"/proc/{p}/cmdline").read_text().split("\0"))]
    assert len(server) == 1, pids
    pid = server[0]
    assert pid == out["pid"] or netns_of(pid) == netns_of(cluster.node_pids()[0])
    assert comm(parent(pid)) == "slurmstepd", comm(parent(pid))
    login_ns = netns_of(cluster.sshd.pid)
    assert netns_of(pid) != login_ns
    login_jupyters = [p for p in cluster.pids("jupyter") if netns_of(p) == login_ns]
    assert login_jupyters == []
    assert token not in Path(f"/proc/{pid}/cmdline").read_text()
    # Bound to the node's cluster address only: not its 127.0.0.1.
    assert cluster.port_open(out["remote_port"], cluster.node_addr)
    probe = cluster.node_run(["python3", "-c", "import socket,sys; socket.create_connection("
                              "('127.0.0.1', int(sys.argv[1])), timeout=2)",
                              str(out["remote_port"])])
    assert probe.returncode != 0, "Jupyter must not listen on the node's 127.0.0.1"
    # What the job published, and its spec: private files in a private directory.
    d = state_dir(cluster)
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    for name in ("nbtunnel.job.json", "nbtunnel.spec.json", "nbtunnel.json", "nbtunnel.log"):
        assert stat.S_IMODE((d / name).stat().st_mode) == 0o600, name
    published = json.loads((d / "nbtunnel.job.json").read_text())
    assert published["addr"] == cluster.node_addr and str(published["job"]) == job

    # Run again: the same job, the same URL.
    logins = cluster.auth_count()
    again = start(nbt)
    assert again["reused"] is True and again["url"] == url and again["job_id"] == job
    assert cluster.auth_count() - logins <= 1  # the master of the first run is still up

    # The local record deleted: still found (the job's published file and the record there).
    for rec in nbt.state_dir.glob("*.json"):
        rec.unlink()
    again = start(nbt)
    assert again["reused"] is True and again["token"] == token and again["job_id"] == job
    assert api_status(again["url"]) == 200

    # Another machine: no local record, no shared connection, and no record on the cluster
    # either: the job is found by its name, its address by what it published.
    (d / "nbtunnel.json").unlink()
    other = type(nbt)(cluster)
    try:
        logins = cluster.auth_count()
        there = start(other)
        assert cluster.auth_count() == logins + 1
        assert there["reused"] is True and there["token"] == token and there["job_id"] == job
        assert api_status(there["url"]) == 200
    finally:
        close_master(other)
    assert [job, "RUNNING"] in [r[:2] for r in active(cluster)]

    # --status, from Slurm: job id, node, state, time left.
    proc = nbt.run("--status", "--json", timeout=60)
    assert proc.returncode == 0, proc.stderr
    (row,) = json.loads(proc.stdout)
    assert row["server"] == "running" and row["tunnel"] == "up"
    assert row["job_id"] == job and row["node"] == cluster.node_name
    assert row["job_state"] == "RUNNING" and row["time_left"]
    proc = nbt.run("--status", timeout=60)
    assert f"job={job} RUNNING node={cluster.node_name}" in proc.stdout

    # --terminate: Jupyter shut down through its API, then no job left.
    proc = nbt.run(cluster.alias, "--terminate", "--json", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["how"] == "api"
    assert not [r for r in active(cluster) if r[0] == job]
    log = (d / "nbtunnel.log").read_text() if (d / "nbtunnel.log").exists() else ""
    assert "Shutting down on /api/shutdown request" in log, log[-2000:]
    wait_until(lambda: not node_jupyters(cluster), 30, message="Jupyter gone from the node")
    assert not local_port_open(out["local_port"])


def ours(cluster, session: str = "nbtunnel") -> list[list[str]]:
    """The active jobs nbtunnel submitted for SESSION."""
    return [r for r in active(cluster) if r[3] == f"nbtunnel-{session}"]


def wait_pending(cluster, session: str = "nbtunnel") -> str:
    """Wait until nbtunnel's job waits in the queue for Resources; its id."""
    rows = wait_until(lambda: [r for r in ours(cluster, session) if r[1:3] == [
        "PENDING", "Resources"]], 60, interval=0.3, message="nbtunnel's job PENDING (Resources)")
    return rows[0][0]


def test_busy_node_shows_pending_then_starts(cluster, nbt_cluster, holder):
    nbt = nbt_cluster
    result = {}
    argv = nbt.argv(cluster.alias, *SLURM)
    logins = cluster.auth_count()
    runner = threading.Thread(target=lambda: result.update(
        zip(("code", "output"), run_in_pty(argv, nbt._env(None), timeout=120))))
    runner.start()
    job = wait_pending(cluster)
    time.sleep(3)  # a few redraws of the line while it waits
    cluster.slurm(["scancel", holder])  # the node frees: the start goes on
    runner.join(150)
    output = result.get("output", "")
    assert result.get("code") == 0, output
    line = re.search(rf"\rnbtunnel: job {job} PENDING \(Resources\)[^\r]*\(\d+\.\d s\)", output)
    assert line, output
    url = re.search(r"http://127\.0\.0\.1:\d+/lab\?token=\w+", output).group(0)
    assert api_status(url) == 200
    assert [r[:2] for r in ours(cluster)] == [[job, "RUNNING"]]
    assert cluster.auth_count() == logins + 1, "a long wait, still one SSH authentication"


def test_pending_start_hits_timeout_and_cancels_its_job(cluster, nbt_cluster, holder):
    began = time.monotonic()
    proc = nbt_cluster.run(cluster.alias, *SLURM, "--timeout", "6", timeout=120)
    took = time.monotonic() - began
    assert proc.returncode == 1
    assert re.search(r"job (\d+) on \S+ did not start within 6s \(still PENDING: Resources\); "
                     r"nbtunnel cancelled it", proc.stderr), proc.stderr
    assert "cancelled job" in proc.stderr
    assert "\r" not in proc.stderr and "\x1b" not in proc.stderr  # no progress line in a pipe
    assert proc.stdout == ""
    assert ours(cluster) == []
    assert 6 <= took < 40, took


def test_ctrl_c_while_pending_cancels_the_job(cluster, nbt_cluster, holder):
    proc = nbt_cluster.popen(cluster.alias, *SLURM)
    job = wait_pending(cluster)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert f"cancelled job {job}" in err
    assert ours(cluster) == []


@pytest.mark.parametrize("option, words", [
    (("--cpus", "3"), "can never start, so it was cancelled: squeue says PENDING "
                      "(PartitionConfig)"),
    (("--partition", "nope"), "sbatch refused the job: sbatch: error: invalid partition "
                              "specified: nope"),
    (("--constraint", "nope"), "sbatch refused the job: sbatch: error: Batch job submission "
                               "failed: Invalid feature specification"),
])
def test_impossible_requests_fail_with_slurms_words(cluster, nbt_cluster, option, words):
    proc = nbt_cluster.run(cluster.alias, *SLURM, *option, timeout=120)
    assert proc.returncode == 1
    assert words in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert ours(cluster) == []
    assert not local_port_open_any(nbt_cluster)


def local_port_open_any(nbt) -> bool:
    """Is a tunnel of NBT still recorded (and open)?"""
    return any(local_port_open(json.loads(r.read_text())["local_port"])
               for r in nbt.state_dir.glob("*.json"))


HOSTILE = "$(touch {canary})`touch {canary}`;touch {canary} x"


def test_hostile_slurm_values_are_data(cluster, nbt_cluster):
    nbt = nbt_cluster
    canary = cluster.home / "canary"
    value = HOSTILE.format(canary=canary)
    # Refused by sbatch, with the value in its own words: it arrived literally.
    for flag in ("--partition", "--time", "--cpus", "--mem", "--gres", "--constraint",
                 "--signal"):
        proc = nbt.run(cluster.alias, *SLURM, flag, value, timeout=120)
        assert proc.returncode == 1, (flag, proc.stderr)
        assert "sbatch refused the job" in proc.stderr, (flag, proc.stderr)
        assert ours(cluster) == [], flag
    proc = nbt.run(cluster.alias, *SLURM, "--sbatch-arg", "--" + value, timeout=120)
    assert proc.returncode == 1 and "sbatch refused the job" in proc.stderr, proc.stderr
    # Accepted (no accounting here): the job carries the values as they were typed.
    out = start(nbt, "--account", value, "--qos", value, f"--sbatch-arg=--comment={value}")
    job = out["job_id"]
    assert job_field(cluster, job, "Comment") == value
    assert job_field(cluster, job, "Account") == value.lower()  # Slurm lowercases accounts
    assert api_status(out["url"]) == 200
    proc = nbt.run(cluster.alias, "--terminate", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert not canary.exists()
    assert ours(cluster) == []


def answers(url: str) -> bool:
    try:
        return api_status(url) == 200
    except OSError:  # reset or refused: the tunnel's far end is gone
        return False


def test_time_limit_job_is_resubmitted_by_ensure(cluster, nbt_cluster):
    nbt = nbt_cluster
    out = start(nbt, "--time", "1")
    job = out["job_id"]
    began = time.monotonic()
    wait_until(lambda: not ours(cluster), 150, interval=1, message=f"job {job} at its time limit")
    ended = time.monotonic() - began
    assert [r[1] for r in squeue(cluster, "-t", "all") if r[0] == job] == ["TIMEOUT"]
    assert not answers(out["url"])  # the forward leads nowhere now
    proc = nbt.run(cluster.alias, "--ensure", "--json", timeout=300)
    assert proc.returncode == 0, proc.stderr
    again = json.loads(proc.stdout)
    assert again["job_id"] != job
    assert again["local_port"] == out["local_port"] and again["token"] == out["token"]
    assert again["url"] == out["url"]
    assert any("restarted Jupyter" in line for line in again["repairs"]), again
    assert api_status(out["url"]) == 200
    print(f"measured: --time 1 job ended {ended:.0f}s after the URL was printed")


def signal_job(cluster, job: str) -> None:
    """What Slurm does at --signal time (B:TERM@120 by default), done now: SIGTERM to the
    batch shell, which is Jupyter itself; wait until the job has ended."""
    proc = cluster.ssh(f"scancel --batch --signal=TERM {job}")
    assert proc.returncode == 0, proc.stderr
    wait_until(lambda: not [r for r in ours(cluster) if r[0] == job], 60, interval=0.5,
               message=f"job {job} ended")
    assert [r[1] for r in squeue(cluster, "-t", "all") if r[0] == job] == ["COMPLETED"]


def test_the_jobs_signal_stops_jupyter_cleanly_and_watch_resubmits(cluster, nbt_cluster):
    nbt = nbt_cluster
    out = start(nbt)
    url = out["url"]
    signal_job(cluster, out["job_id"])  # Jupyter stops cleanly, not killed
    log = (state_dir(cluster) / "nbtunnel.log").read_text()
    assert "received signal 15, stopping" in log, log[-2000:]
    (row,) = json.loads(nbt.run("--status", "--json", timeout=60).stdout)
    assert row["server"] == "stopped" and row["job_state"] is None
    # --watch brings it back at the same URL, and again when that job ends (as at a time
    # limit, a node failure or a preemption).
    watch = nbt.popen(cluster.alias, "--json", *SLURM, "--watch", "--interval", "1",
                      "--timeout", "60")
    again = json.loads(read_line(watch, 120))
    assert again["url"] == url and again["reused"] is False and answers(url)
    signal_job(cluster, again["job_id"])
    wait_watched(watch, lambda: answers(url), 90, "--watch resubmitted the job")
    (row,) = ours(cluster)
    assert row[0] not in (out["job_id"], again["job_id"]) and row[1] == "RUNNING"
    said = wait_logged(watch, f"restarted Jupyter on {cluster.alias}", 60)
    code, _, err = finish(watch)
    assert code == 0, said + err


def test_job_options_are_one_word_each():
    import argparse
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "slurm_plugin", Path(__file__).parent.parent / "plugins" / "slurm.py")
    plugin = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plugin)
    slurm = plugin.Slurm()
    blank = {o.dest: None for o in slurm.options}

    def words(**given):
        return slurm.job_options(argparse.Namespace(**dict(blank, **given)))

    assert words() == ["--signal=B:TERM@120"]
    assert words(time="8:00:00") == ["--time=8:00:00", "--signal=B:TERM@120"]
    assert words(time="1") == ["--time=1"]  # a short job: a signal could come at once
    assert words(time="9:59") == ["--time=9:59"]
    assert words(signal="none") == []
    assert words(cpus="4", mem="16G", sbatch_arg=["--exclusive", "-x y"], signal="USR1@60") == [
        "--cpus-per-task=4", "--mem=16G", "--signal=USR1@60", "--exclusive", "-x y"]
    assert words(partition="-x", signal="none") == ["--partition=-x"]  # never an option
    assert [plugin.job_minutes(t) for t in ("30", "1:30", "2:00:00", "1-0", "1-2:30", "x")] == [
        30, 1.5, 120, 1440, 1590, None]
