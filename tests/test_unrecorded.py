"""A session that the remote records and this machine does not (a start cut short after
the server started, or a lost local state directory) is found by --status and
--terminate of that host, and ended by them, leaving nothing running."""

from __future__ import annotations

import json

import pytest

from helpers import jupyter_pids, masters, wait_until


def start(nbt, *args: str) -> dict:
    proc = nbt.run(nbt.remote.alias, "--json", *args, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def lose_records(nbt) -> None:
    """This machine forgets its sessions; the remote still runs them."""
    records = list(nbt.state_dir.glob("*.json"))
    assert records
    for path in records:
        path.unlink()


def host_status(nbt, *args: str) -> list[dict]:
    proc = nbt.run(nbt.remote.alias, "--status", "--json", *args, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def running(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["server"] == "running" or r.get("job_id") and not r["ended"]]


def test_status_and_terminate_all_find_a_session_only_the_remote_records(nbt, remote):
    rec = start(nbt, "--session", "lost")
    lose_records(nbt)
    assert nbt.status() == []  # all hosts: only what this machine records, as before

    rows = host_status(nbt)
    assert [(r["session"], r["server"], r["recorded"]) for r in rows] == [("lost", "running", False)]
    assert rows[0]["pid"] == rec["pid"] and rows[0]["tunnel"] == "down"
    assert rows[0]["token"] is None and rows[0]["url"] is None
    assert host_status(nbt, "--session", "other") == []
    text = nbt.run(remote.alias, "--status", timeout=120)
    assert text.returncode == 0, text.stderr
    assert "lost\tserver=running\ttunnel=down\tnot recorded here" in text.stdout
    assert f"nbtunnel {remote.alias} --session lost --terminate" in text.stdout

    proc = nbt.run(remote.alias, "--terminate", "--all", timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert "session lost stopped (it was not recorded here)" in proc.stderr
    wait_until(lambda: not jupyter_pids(remote), 30, message="no Jupyter on the remote")
    assert remote.tmux_sessions() == []
    assert host_status(nbt) == []
    wait_until(lambda: not masters(nbt.ssh_config), 20, message="no ssh master")


def test_terminate_of_one_session_only_the_remote_records(nbt, remote):
    start(nbt, "--session", "kept")
    start(nbt, "--session", "lost")
    next(nbt.state_dir.glob("*lost*.json")).unlink()
    rows = host_status(nbt)
    assert sorted((r["session"], r["recorded"]) for r in rows) == [
        ("kept", True), ("lost", False)]

    proc = nbt.run(remote.alias, "--session", "lost", "--terminate", "--json", timeout=180)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["stopped"] is True and out["recorded"] is False
    assert [(r["session"], r["server"]) for r in running(host_status(nbt))] == [
        ("kept", "running")]
    assert len(jupyter_pids(remote)) == 1


@pytest.mark.timeout(900)
def test_slurm_job_only_the_remote_records_is_found_and_cancelled(nbt_cluster, cluster):
    nbt = nbt_cluster
    rec = start(nbt, "--manager", "slurm", "--session", "lostjob")
    lose_records(nbt)
    rows = host_status(nbt)
    assert [(r["session"], r["recorded"], r["job_id"], r["server"]) for r in rows] == [
        ("lostjob", False, rec["job_id"], "running")]
    assert rows[0]["manager"] == "slurm"

    proc = nbt.run(cluster.alias, "--terminate", "--all", "--json", timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert [(r["session"], r["recorded"]) for r in json.loads(proc.stdout)] == [
        ("lostjob", False)]
    wait_until(lambda: not cluster.jobs(), 60, message="no Slurm job left")
    assert host_status(nbt) == []


def test_a_session_recorded_under_another_alias_of_the_same_account_is_recorded(nbt, remote):
    """Two ssh aliases for one account: a session started through one is, asked through
    the other, the recorded session it is (under which name said), not an unrecorded one
    to end."""
    config = nbt.tmp / "two_aliases"
    config.write_text(remote.ssh_config_block("nbremote") + remote.ssh_config_block("nbslow"))
    nbt.ssh_config = config
    rec = nbt.run("nbslow", "--session", "nb-slow", "--json", timeout=300)
    assert rec.returncode == 0, rec.stderr
    rec = json.loads(rec.stdout)

    text = nbt.run("nbremote", "--status", timeout=120)
    assert text.returncode == 0, text.stderr
    assert "not recorded here" not in text.stdout and "--terminate" not in text.stdout
    assert f"nbremote\tnb-slow\tserver=running\ttunnel=up\t{rec['url']}" in text.stdout
    assert "recorded as nbslow" in text.stdout
    rows = host_status_of(nbt, "nbremote")
    assert [(r["session"], r["recorded"], r["recorded_as"], r["url"]) for r in rows] == [
        ("nb-slow", True, "nbslow", rec["url"])]
    assert [r["recorded_as"] for r in host_status_of(nbt, "nbslow")] == [None]


def host_status_of(nbt, host: str) -> list[dict]:
    proc = nbt.run(host, "--status", "--json", timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)
