"""--manager slurm on the real two-host test cluster (tests/cluster.py).

Jupyter runs as a batch job on the compute node, which this machine cannot
reach; the tunnel goes through the login node's sshd to the node's address.
Every check is what a user sees (the URL answers, a kernel computes, squeue
shows no job left) or what the cluster's own processes show (slurmstepd is
Jupyter's parent on the compute node).  What Slurm does as Grid Engine does
(lifecycle, waiting, time limit) is tested for both in tests/test_schedulers.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from helpers import api_status, local_port_open, pip_installed_command, wait_until
from unattended import finish, read_line, wait_logged, wait_watched

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


def ours(cluster, session: str = "nbtunnel") -> list[list[str]]:
    """The active jobs nbtunnel submitted for SESSION."""
    return [r for r in active(cluster) if r[3] == f"nbtunnel-{session}"]


def wait_pending(cluster, session: str = "nbtunnel") -> str:
    """Wait until nbtunnel's job waits in the queue for Resources; its id."""
    rows = wait_until(lambda: [r for r in ours(cluster, session) if r[1:3] == [
        "PENDING", "Resources"]], 60, interval=0.3, message="nbtunnel's job PENDING (Resources)")
    return rows[0][0]


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


def test_the_pip_installed_command_starts_and_reports_a_slurm_session(cluster, nbt_cluster, tmp_path):
    """`pip install .` ships the plugins: its `nbtunnel` takes Slurm's options, and its
    --status of the running job says running with the time left, never stopped."""
    nbt = nbt_cluster
    command = pip_installed_command(tmp_path)
    argv = [str(command), "--ssh-config", str(nbt.ssh_config), "--state-dir", str(nbt.state_dir)]
    proc = subprocess.run([*argv, cluster.alias, "--json", *SLURM, "--time", "10:00"],
                          capture_output=True, text=True, env=nbt.env, timeout=240,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert api_status(out["url"]) == 200
    proc = subprocess.run([*argv, "--status", "--json"], capture_output=True, text=True,
                          env=nbt.env, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    (row,) = json.loads(proc.stdout)
    assert (row["server"], row["job_id"], row["job_state"]) == ("running", out["job_id"], "RUNNING")
    assert row["time_left"] and "missing_plugin" not in row
    assert "nbtunnel_plugins" in row["plugin"], row["plugin"]
    done = nbt.run(cluster.alias, "--terminate")  # the copied file ends what the installed one began
    assert done.returncode == 0, done.stderr
    wait_until(lambda: not active(cluster), 60, message="no job left")
