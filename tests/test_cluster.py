"""The test cluster itself, as its user sees it: ssh to the login node, sbatch, squeue, scancel.

These check the ground the Slurm manager's tests stand on: jobs run on the
compute node under its own hostname, a busy node queues the next job with
reason Resources, the compute node is reachable from the login node only,
and a job's time limit and --signal behave as on a real cluster. Lines
starting with "measured:" report timings (shown with pytest -rA).
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest

from helpers import free_local_port, local_port_open, proc_cmdline, wait_until

LISTENER = Path(__file__).with_name("slurm_listener.py")
ACTIVE = "PENDING,RUNNING,SUSPENDED,COMPLETING,CONFIGURING"

pytestmark = pytest.mark.timeout(600)


def submit(cluster, *options: str, script: str | None = None) -> str:
    """sbatch --parsable OPTIONS over ssh, the script on stdin (or --wrap in options); the job id."""
    command = " ".join(["sbatch", "--parsable", *options])
    proc = cluster.ssh(command, input=script)
    assert proc.returncode == 0, f"{command}: {proc.stderr}"
    job = proc.stdout.strip()
    assert re.fullmatch(r"\d+", job), f"sbatch --parsable printed {proc.stdout!r}"
    return job


def squeue(cluster, job: str, fmt: str = "%T %r") -> str:
    """squeue -h -j JOB -o FMT over ssh ('' once the job has left the queue)."""
    proc = cluster.ssh(f"squeue -h -t all -j {job} -o '{fmt}'")
    return proc.stdout.strip() if proc.returncode == 0 else ""


def state(cluster, job: str) -> str:
    return squeue(cluster, job, "%T")


def wait_state(cluster, job: str, wanted: set[str], timeout: float = 120) -> str:
    return wait_until(lambda: state(cluster, job) in wanted and state(cluster, job),
                      timeout, interval=0.5, message=f"job {job} in {sorted(wanted)}")


def active_jobs(cluster) -> list[str]:
    proc = cluster.ssh(f"squeue -h -u $USER -t {ACTIVE} -o %i")
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


def job_file(cluster, name: str) -> Path:
    return cluster.home / name


@pytest.fixture
def jobs(cluster):
    """Jobs a test submits are cancelled after it; none may be left running."""
    yield
    left = cluster.cancel_all_jobs()
    assert not left, f"jobs still queued after scancel: {left}"


def test_login_node_is_a_host_of_its_own(cluster, jobs):
    proc = cluster.ssh("hostname; echo $SLURM_CONF; sinfo -h -N -p batch -o '%N %T %c'")
    assert proc.returncode == 0, proc.stderr
    hostname, conf, node = proc.stdout.splitlines()
    assert hostname == cluster.login_name
    assert conf == str(cluster.slurm_conf)
    assert node == f"{cluster.node_name} idle {cluster.cpus}"
    print(f"measured: cluster start-up {cluster.startup_seconds:.1f}s")


def test_job_runs_on_the_compute_node(cluster, jobs):
    began = time.monotonic()
    job = submit(cluster, "--wrap", "hostname")
    out = job_file(cluster, f"slurm-{job}.out")
    wait_until(lambda: out.exists() and out.read_text().strip(), 60, message=f"{out} written")
    finished = time.monotonic() - began
    assert out.read_text().strip() == cluster.node_name
    print(f"measured: sbatch --wrap hostname to its output {finished:.1f}s")


def test_job_start_latency(cluster, jobs):
    # Timed on the login node itself, so that ssh round trips do not count.
    script = (
        "t0=$(date +%s.%N); job=$(sbatch --parsable --time=2 --wrap 'sleep 300'); "
        "t1=$(date +%s.%N); "
        'while [ "$(squeue -h -j $job -o %T)" != RUNNING ]; do sleep 0.05; done; '
        't2=$(date +%s.%N); echo $job $t0 $t1 $t2'
    )
    proc = cluster.ssh(script, timeout=120)
    assert proc.returncode == 0, proc.stderr
    job, t0, t1, t2 = proc.stdout.split()
    assert squeue(cluster, job, "%N") == cluster.node_name
    print(f"measured: sbatch itself {float(t1) - float(t0):.2f}s, "
          f"sbatch to RUNNING in squeue {float(t2) - float(t0):.2f}s")


def test_busy_node_queues_the_next_job_then_scancel(cluster, jobs):
    holder = submit(cluster, "-c", str(cluster.cpus), "--time=5", "--wrap", "'sleep 600'")
    wait_state(cluster, holder, {"RUNNING"}, 60)
    waiting = submit(cluster, "--wrap", "hostname")
    reason = wait_until(lambda: squeue(cluster, waiting) == "PENDING Resources" and "ok",
                        60, interval=0.5, message="second job PENDING (Resources)")
    assert reason
    # With a time-limited holder, the backfill scheduler names an expected start.
    start = wait_until(lambda: re.fullmatch(r"\d{4}-\d\d-\d\dT[\d:]+",
                                            squeue(cluster, waiting, "%S")),
                       60, interval=1, message="expected start time of the pending job")
    assert start
    proc = cluster.ssh(f"scancel {holder}")
    assert proc.returncode == 0, proc.stderr
    assert wait_state(cluster, holder, {"CANCELLED"}, 60) == "CANCELLED"
    # The node is free again: the waiting job runs.
    wait_state(cluster, waiting, {"COMPLETED"}, 60)
    assert job_file(cluster, f"slurm-{waiting}.out").read_text().strip() == cluster.node_name
    assert not active_jobs(cluster)


def test_a_job_login_shell_finds_jupyter(cluster, jobs):
    job = submit(cluster, "--wrap", "'bash -lc \"command -v jupyter\"'")
    wait_state(cluster, job, {"COMPLETED"}, 60)
    found = job_file(cluster, f"slurm-{job}.out").read_text().strip()
    assert found == str(cluster.jupyter_venv / "bin" / "jupyter")


def _listener(cluster) -> tuple[str, dict]:
    job = submit(cluster, "--time=5", script=LISTENER.read_text())
    published = job_file(cluster, f"listener-{job}.json")
    wait_until(published.exists, 60, message=f"{published} written by job {job}")
    return job, json.loads(published.read_text())


def _read_line(host: str, port: int, timeout: float = 5) -> str:
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        return sock.makefile().readline().strip()


def test_compute_node_is_reachable_from_the_login_node_only(cluster, jobs):
    job, found = _listener(cluster)
    port, loopback = found["ports"]["cluster"], found["ports"]["loopback"]
    # The job found the node's cluster address through its own hostname.
    assert found["hostname"] == cluster.node_name
    assert found["gethostbyname"] == cluster.node_addr
    assert found["hostname_I"] == [cluster.node_addr]
    assert found["env"]["SLURMD_NODENAME"] == cluster.node_name
    assert found["env"]["SLURM_SUBMIT_HOST"] == cluster.login_name

    # The job runs on the compute node, under slurmstepd, not on the login node.
    pids = [pid for pid in cluster.node_pids()
            if "slurm_script" in " ".join(proc_cmdline(pid))]
    assert pids, "the job's process is not in the compute node's namespace"

    assert cluster.port_open(port, cluster.node_addr), "login node cannot reach the job"
    assert not local_port_open(port, cluster.node_addr, timeout=2), "laptop reaches the node"
    # The node's own 127.0.0.1 is not the login node's.
    assert not cluster.port_open(loopback, "127.0.0.1")
    assert not cluster.port_open(loopback, cluster.node_addr)

    # The laptop gets there through the login node only.
    good, wrong = free_local_port(), free_local_port()
    forward = subprocess.Popen(
        ["ssh", "-F", str(cluster.ssh_config), "-N", "-o", "ExitOnForwardFailure=yes",
         "-L", f"127.0.0.1:{good}:{cluster.node_addr}:{port}",
         "-L", f"127.0.0.1:{wrong}:127.0.0.1:{loopback}", cluster.alias],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_until(lambda: local_port_open(good) and local_port_open(wrong), 30,
                   message="ssh -L forwards open")
        assert _read_line("127.0.0.1", good) == cluster.node_name
        # A forward to 127.0.0.1 lands on the login node, where nothing listens.
        try:
            answer = _read_line("127.0.0.1", wrong)
        except OSError:
            answer = ""
        assert answer == ""
    finally:
        # SIGKILL, not SIGTERM: OpenSSH 9.2's client loop checks its quit flag and then
        # calls poll() with no signal mask and no timeout, so a SIGTERM landing between
        # the two is lost and ssh waits for traffic that never comes (seen once in CI).
        forward.kill()
        forward.wait(timeout=10)
    proc = cluster.ssh(f"scancel {job}")
    assert proc.returncode == 0, proc.stderr
    wait_state(cluster, job, {"CANCELLED"}, 60)
    wait_until(lambda: not [pid for pid in cluster.node_pids()
                            if "slurm_script" in " ".join(proc_cmdline(pid))],
               60, message="job processes gone after scancel")


@pytest.mark.parametrize(
    ("options", "words"),
    [
        (["-p", "no-such-partition"], "invalid partition specified: no-such-partition"),
        (["--mem=999999"], "Memory specification can not be satisfied"),
        (["--gres=gpu:1"], "Invalid generic resource (gres) specification"),
        (["--constraint=no-such-feature"], "Invalid feature specification"),
    ],
    ids=["partition", "mem", "gres", "constraint"],
)
def test_sbatch_refuses_what_the_cluster_lacks(cluster, jobs, options, words):
    proc = cluster.ssh(" ".join(["sbatch", "--parsable", *options, "--wrap", "true"]))
    assert proc.returncode != 0
    assert words in proc.stderr
    assert not active_jobs(cluster)


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        (["-c", "3"], "PartitionConfig"),
        (["--nodes=2"], "PartitionNodeLimit"),
        (["-p", "tiny", "--time=10"], "PartitionTimeLimit"),
    ],
    ids=["cpus", "nodes", "time"],
)
def test_sbatch_queues_what_can_never_start(cluster, jobs, options, reason):
    job = submit(cluster, *options, "--wrap", "true")
    wait_until(lambda: squeue(cluster, job) == f"PENDING {reason}", 60, interval=0.5,
               message=f"job {job} PENDING ({reason})")
    proc = cluster.ssh(f"scancel {job}")
    assert proc.returncode == 0, proc.stderr
    assert wait_state(cluster, job, {"CANCELLED"}, 60) == "CANCELLED"


SIGNALLED = """\
#!/bin/sh
echo start $(date +%s)
trap 'echo usr1 $(date +%s)' USR1
trap 'echo term $(date +%s)' TERM
while true; do sleep 1 & wait; done
"""


def test_time_limit_with_an_early_signal(cluster, jobs):
    job = submit(cluster, "--time=1", "--signal=B:USR1@30", script=SIGNALLED)
    wait_state(cluster, job, {"RUNNING"}, 60)
    began = time.time()
    final = wait_state(cluster, job, {"TIMEOUT", "COMPLETED", "FAILED", "CANCELLED"}, 240)
    ended = time.time()
    assert final == "TIMEOUT"
    out = job_file(cluster, f"slurm-{job}.out").read_text()
    stamps = dict(line.split() for line in out.splitlines() if len(line.split()) == 2)
    assert {"start", "usr1", "term"} <= stamps.keys(), out
    start = int(stamps["start"])
    usr1, term = int(stamps["usr1"]) - start, int(stamps["term"]) - start
    assert usr1 < term, out
    print(f"measured: --time=1 --signal=B:USR1@30: USR1 after {usr1}s, SIGTERM at the limit "
          f"after {term}s, squeue says TIMEOUT {ended - began:.0f}s after RUNNING was seen")
