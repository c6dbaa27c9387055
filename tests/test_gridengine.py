"""--manager gridengine on a real two-host Grid Engine cell (tests/gecell.py): what Grid
Engine alone does (a job in error state, its values, its s_rt warning, --watch after a
qdel, its options and XML).  What it does as Slurm does (lifecycle, waiting, time limit)
is tested for both in tests/test_schedulers.py.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from helpers import api_status, wait_until
from unattended import finish, read_line, wait_logged

pytestmark = pytest.mark.timeout(600)

GE = ("--manager", "gridengine")
SESSION_JOB = "nbtunnel-nbtunnel"


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


def wait_pending(cell, session: str = "nbtunnel") -> str:
    """Wait until nbtunnel's job waits in the queue (qw); its id."""
    rows = wait_until(lambda: [r for r in ours(cell, session) if r["state"] == "qw"], 60,
                      interval=0.3, message="nbtunnel's job waiting (qw)")
    return rows[0]["job_id"]


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


def test_warning_before_the_time_limit_stops_jupyter_cleanly(gecell, nbt_ge):
    """At s_rt Grid Engine sends SIGUSR1; the job passes it on as SIGTERM, so Jupyter
    shuts down cleanly well before h_rt, and --watch resubmits at the same URL."""
    cell, nbt = gecell, nbt_ge
    limits = ("--runtime", "0:5:00", "--soft-runtime", "0:1:00")
    out = start(nbt, *limits)
    job = out["job_id"]
    detail = cell.ge(["qstat", "-j", job]).stdout
    assert re.search(r"s_rt=(0:1:00|0:01:00|60)\b", detail), detail
    began = time.monotonic()
    wait_until(lambda: not ours(cell), 200, interval=1, message=f"job {job} at its s_rt")
    ended = time.monotonic() - began
    assert ended < 200, "ended by h_rt, not by the warning"
    log = (state_dir(cell) / "nbtunnel.log").read_text()
    assert "received signal 15, stopping" in log, log
    assert not answers(out["url"])

    # The resubmitted job is warned a minute after it starts too: --watch must bring it
    # back at the same URL within that minute.
    watch = nbt.popen(cell.alias, "--json", *GE, *limits, "--watch", "--interval", "1")
    wait_until(lambda: [r for r in ours(cell) if r["job_id"] != job and r["state"] == "r"]
               and answers(out["url"]), 120, interval=0.5,
               message="--watch resubmitted the job at the same URL")
    # The first start's forward may reach the new server before --watch has recorded it;
    # a Ctrl-C before that line cancels the job, as it should.
    said = wait_logged(watch, f"started Jupyter on {cell.alias}", 60)  # or restarted
    code, _, err = finish(watch)
    assert code == 0, said + err
    print(f"measured: s_rt=0:1:00 h_rt=0:5:00 job stopped {ended:.0f}s after the URL was printed")


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
        "-q", "gpu.q", "-l", "h_rt=8:00:00", "-l", "s_rt=7:58:00", "-l", "h_vmem=4G",
        "-pe", "smp", "4", "-P", "p1"]
    assert words(runtime="600") == ["-l", "h_rt=600", "-l", "s_rt=0:08:00"]
    assert words(runtime="0:9:59") == ["-l", "h_rt=0:9:59"]  # too short for a default warning
    assert words(runtime="1:00:00", soft_runtime="none") == ["-l", "h_rt=1:00:00"]
    assert words(runtime="0:2:00", soft_runtime="0:1:00") == [
        "-l", "h_rt=0:2:00", "-l", "s_rt=0:1:00"]
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
