"""Repairs repeat how a session last ran; a session ended on purpose stays ended; options of
a plugin that does not serve the session are refused.  End to end against the test remote."""

from __future__ import annotations

import os

from helpers import http_get, http_request, local_port_open, wait_until
from unattended import (
    api_status,
    ensure,
    finish,
    jupyter_pids,
    kill_masters,
    start,
    wait_logged,
    watch,
)


def root_has(info: dict, name: str) -> bool:
    """Does the server of INFO serve NAME at the top of its notebook directory?"""
    port = info["local_port"]
    status, _ = http_get(f"http://127.0.0.1:{port}/api/contents/{name}",
                         headers={"Authorization": f"token {info['token']}"})
    return status == 200


def kill_servers(remote) -> None:
    for pid in jupyter_pids(remote):
        os.kill(pid, 9)
    wait_until(lambda: not jupyter_pids(remote), 15, message="jupyter killed")


def two_dirs(remote) -> None:
    for d in ("dirA", "dirB"):
        remote.run(["mkdir", "-p", str(remote.home / d)], check=True)
        remote.run(["touch", str(remote.home / d / f"in-{d}")], check=True)


def test_a_repair_restarts_as_it_ran_and_a_config_change_waits(nbt, remote):
    two_dirs(remote)
    info = start(nbt, "--notebook-dir", "dirA")
    assert root_has(info, "in-dirA")
    nbt.config_file.write_text(f"[host {remote.alias}]\nnotebook-dir = dirB\n")
    kill_servers(remote)
    # As cron runs it: stdin /dev/null, no terminal, output captured.
    proc = ensure(nbt)
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip()
    assert line.startswith(f"restarted Jupyter on {remote.alias} (session nbtunnel)"), line
    assert "as it last ran" in line and "notebook-dir dirB" in line, line
    row = nbt.status()[0]
    assert row["token"] == info["token"] and api_status(row["url"]) == 200
    assert root_has(row, "in-dirA") and not root_has(row, "in-dirB")
    assert row["pending"] == {"notebook-dir": {"value": "dirB", "source": f"config [host {remote.alias}]"}}
    text = nbt.run("--status")
    assert "pending: notebook-dir dirB (config" in text.stdout and "at next start" in text.stdout
    # --watch repairs the same way.
    kill_servers(remote)
    proc, url = watch(nbt)
    assert root_has(nbt.status()[0], "in-dirA")
    finish(proc)
    # A deliberate start (after --terminate) takes the config file.
    assert nbt.run("--terminate").returncode == 0
    again = start(nbt)
    assert root_has(again, "in-dirB")
    assert nbt.status()[0]["pending"] == {}


def test_reattach_warning_names_an_unset_option_plainly(nbt, remote):
    two_dirs(remote)
    start(nbt)
    proc = nbt.run(remote.alias, "--notebook-dir", "dirB")
    assert proc.returncode == 0, proc.stderr
    assert "--notebook-dir not set, asked \"dirB\"" in proc.stderr, proc.stderr
    assert "null" not in proc.stderr


def repairs_said(nbt, remote) -> dict[str, str]:
    """What the unattended repairs of the running session say on stderr: --ensure while
    all is well, --ensure once its tunnel died, --watch when its tunnel dies, then a plain
    reattach; each also checked to have done its work."""
    port = nbt.status()[0]["local_port"]
    said = {}
    healthy = ensure(nbt)
    assert healthy.returncode == 0 and healthy.stdout == "", healthy
    said["--ensure, all well"] = healthy.stderr
    kill_masters(nbt.ssh_config)
    wait_until(lambda: not local_port_open(port), 15, message="tunnel closed")
    repaired = ensure(nbt)
    assert repaired.returncode == 0, repaired.stderr
    assert repaired.stdout.startswith(f"reopened the tunnel to {remote.alias}"), repaired.stdout
    said["--ensure, tunnel died"] = repaired.stderr
    proc, url = watch(nbt)
    kill_masters(nbt.ssh_config)
    seen = wait_logged(proc, f"reopened the tunnel to {remote.alias} (session nbtunnel)", 60)
    code, _, err = finish(proc)
    assert code == 0, seen + err
    said["--watch, tunnel died"] = seen + err
    again = nbt.run(remote.alias)
    assert again.returncode == 0, again.stderr
    said["reattach"] = again.stderr
    return said


def test_repairs_of_a_plain_session_warn_of_nothing(nbt, remote):
    first = nbt.run(remote.alias)
    assert first.returncode == 0 and "warning" not in first.stderr, first.stderr
    said = repairs_said(nbt, remote)
    assert not {what: text for what, text in said.items() if "warning" in text}
    # Asked explicitly, the defaults it runs with are no difference either.
    same = nbt.run(remote.alias, "--app", "lab", "--manager", "tmux")
    assert same.returncode == 0 and "warning" not in same.stderr, same.stderr
    # A real difference still warns, and the server keeps its own.
    other = nbt.run(remote.alias, "--app", "notebook")
    assert other.returncode == 0, other.stderr
    assert "warning" in other.stderr and '--app "lab", asked "notebook"' in other.stderr, other.stderr
    assert nbt.status()[0]["app"] == "lab"
    # A repair that restarts it asks for nothing either: not even the manager it ran under.
    kill_servers(remote)
    restarted = ensure(nbt)
    assert restarted.returncode == 0 and restarted.stdout.startswith("restarted"), restarted
    assert "warning" not in restarted.stderr, restarted.stderr
    cron = nbt.run(remote.alias, "--print-service", "cron")
    assert cron.returncode == 0 and "--manager" not in cron.stdout, cron.stdout


def test_config_options_that_match_what_runs_warn_of_nothing(nbt, remote):
    two_dirs(remote)
    info = start(nbt, "--notebook-dir", "dirA")
    nbt.config_file.write_text(f"[host {remote.alias}]\nnotebook-dir = dirA\n")
    said = repairs_said(nbt, remote)
    assert not {what: text for what, text in said.items() if "warning" in text}
    assert root_has(nbt.status()[0], "in-dirA") and nbt.status()[0]["token"] == info["token"]
    # What the config file asks beside what runs is a difference.
    nbt.config_file.write_text(f"[host {remote.alias}]\nnotebook-dir = dirB\n")
    other = nbt.run(remote.alias)
    assert other.returncode == 0, other.stderr
    assert '--notebook-dir "dirA", asked "dirB"' in other.stderr, other.stderr


def test_an_option_of_another_manager_is_refused(nbt, remote):
    before = remote.auth_count()
    proc = nbt.run(remote.alias, "--time", "1:00")
    assert proc.returncode == 2, proc.stderr
    assert "--time" in proc.stderr and "slurm" in proc.stderr and "--manager tmux" in proc.stderr
    assert remote.auth_count() == before and not jupyter_pids(remote)
    assert nbt.run(remote.alias, "--print-service", "cron", "--partition", "gpu").returncode == 2


def test_config_keys_of_another_manager_are_ignored(nbt, remote):
    nbt.config_file.write_text("[DEFAULT]\ntime = 1:00\npartition = gpu\n")
    info = start(nbt)
    assert info["manager"] == "tmux"
    cron = nbt.run(remote.alias, "--print-service", "cron")
    assert cron.returncode == 0 and "--time" not in cron.stdout and "--partition" not in cron.stdout
    again = nbt.run(remote.alias)  # a reattach: nothing to warn about
    assert again.returncode == 0 and "warning" not in again.stderr, again.stderr
    assert nbt.status()[0]["pending"] == {}


# Ended on purpose #############################################################


def test_terminate_sticks_for_cron(nbt, remote):
    cron = nbt.run(remote.alias, "--print-service", "cron")
    assert cron.returncode == 0 and "Remove with" in cron.stdout, cron.stdout
    info = start(nbt)
    assert nbt.run("--terminate").returncode == 0
    assert not jupyter_pids(remote)
    # The remote keeps only what a later run needs: that the session ended on purpose.
    state = remote.home / ".local/state/nbtunnel"
    assert sorted(p.name for p in state.glob("nbtunnel.*")) == ["nbtunnel.ended"]
    before = remote.auth_count()
    proc = ensure(nbt)  # what the installed cron line runs
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == "", proc
    assert not jupyter_pids(remote) and remote.auth_count() == before
    row = nbt.status()[0]
    assert row["ended"] == "terminated" and row["server"] == "stopped" and row["url"] is None
    text = nbt.run("--status").stdout
    assert f"ended: terminated by you; start it again with: nbtunnel {remote.alias} --session nbtunnel" in text
    watched = nbt.run(remote.alias, "--watch", "--interval", "1")
    assert watched.returncode == 0 and "not starting it again" in watched.stderr
    assert not jupyter_pids(remote)
    # A deliberate start brings it back; then repairs work again.
    again = start(nbt)
    assert again["token"] != info["token"] and api_status(again["url"]) == 200
    assert nbt.status()[0]["ended"] is None


def test_terminate_from_another_laptop_sticks(nbt, remote, tmp_path):
    start(nbt)
    other = tmp_path / "other-state"
    other.mkdir(mode=0o700)
    for f in nbt.state_dir.glob("*.json"):
        (other / f.name).write_bytes(f.read_bytes())
        os.chmod(other / f.name, 0o600)
    assert nbt.run("--terminate").returncode == 0
    proc = ensure(nbt, "--state-dir", str(other))
    assert proc.returncode == 0, proc.stderr
    assert "terminated by you; not starting it again" in proc.stdout, proc.stdout
    assert not jupyter_pids(remote)


def test_shutdown_from_the_browser_sticks(nbt, remote):
    info = start(nbt)
    status, _ = http_request("POST", f"http://127.0.0.1:{info['local_port']}/api/shutdown",
                             headers={"Authorization": f"token {info['token']}"})
    assert status == 200
    wait_until(lambda: not jupyter_pids(remote), 30, message="server gone")
    row = nbt.status()[0]
    assert row["ended"] == "shutdown" and row["server"] == "stopped"
    proc = ensure(nbt)
    assert proc.returncode == 0, proc.stderr
    assert "shut down from Jupyter" in proc.stdout and "not starting it again" in proc.stdout
    assert not jupyter_pids(remote)
    quiet = ensure(nbt)
    assert quiet.returncode == 0 and quiet.stdout == "" and not jupyter_pids(remote)
    assert nbt.status()[0]["ended"] == "shutdown"


def test_a_crash_is_repaired(nbt, remote):
    info = start(nbt)
    kill_servers(remote)
    row = nbt.status()[0]
    assert row["ended"] is None and row["server"] == "stopped"
    proc = ensure(nbt)
    assert proc.returncode == 0 and proc.stdout.startswith("restarted"), proc
    assert api_status(info["url"]) == 200


# Small things #################################################################


def test_no_lock_files_pile_up_locally(nbt, remote):
    proc = ensure(nbt, "--timeout", "5", host=remote.down_alias)  # a host never reached
    assert proc.returncode == 1
    start(nbt)
    assert nbt.run("--terminate").returncode == 0
    assert not [p.name for p in nbt.state_dir.iterdir() if p.name.endswith(".lock")]


def test_watch_says_it_started_a_server(nbt, remote):
    proc, url = watch(nbt)
    code, _, err = finish(proc)
    assert code == 0, err
    assert f"started Jupyter on {remote.alias} (session nbtunnel, tmux, remote port" in err, err
    assert "watching" in err
