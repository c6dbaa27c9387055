"""The command line as a user meets it: usage errors, --help, --status of a host with
nothing recorded, a record whose manager plugin is missing, and `pip install .`.

None of these connect anywhere: they run as any user (`pytest -m noroot`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import pip_installed_command

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import nbtunnel  # noqa: E402

pytestmark = pytest.mark.noroot


def run(*args, program=REPO / "nbtunnel.py", env=None, tmp=None):
    """nbtunnel ARGS with private config, state and plugin directories (under TMP)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("NBTUNNEL_", "XDG_"))}
    if tmp is not None:
        base.update(XDG_CONFIG_HOME=str(tmp / "config"), XDG_STATE_HOME=str(tmp / "state"),
                    NBTUNNEL_STATE_DIR=str(tmp / "records"))
    base.update(COLUMNS="80", **(env or {}))
    argv = [str(program)] if not str(program).endswith(".py") else [sys.executable, str(program)]
    return subprocess.run(argv + list(args), capture_output=True, text=True, env=base, timeout=60)


def record(directory: Path, **fields) -> dict:
    """Write a session record by hand into DIRECTORY, as nbtunnel would."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    rec = dict(host="hpc.invalid", session="nbtunnel", manager="tmux", tunnel="ssh", app="lab",
               plugin="built-in", local_port=1, remote_port=40000, token="t" * 32, pid=4242,
               url="http://127.0.0.1:1/lab?token=" + "t" * 32, log="/x/nbtunnel.log",
               environment=[], options={})
    rec.update(fields)
    nbtunnel.save_record(str(directory), rec)
    return rec


# Usage errors: one line, exit 2, what to do ######################################


@pytest.mark.parametrize("args,words", [
    (["--sesion", "x"], ["unrecognized option --sesion; did you mean --session?"]),
    (["h", "--sesion=x"], ["unrecognized option --sesion;", "--session?"]),
    (["h", "--partiton", "gpu"], ["unrecognized option --partiton", "--partition?"]),  # a plugin's
    (["h", "--timeou", "5"], ["unrecognized option --timeou", "--timeout?"]),  # never abbreviated
    (["h", "-x"], ["unrecognized option -x"]),
    (["h1", "h2"], ["unexpected argument 'h2'", "HOST"]),
    (["h", "--session"], ["option --session needs a value", "--session NAME"]),
    (["h", "--sbatch-arg", "--exclusive"], ["--sbatch-arg needs a value", "--sbatch-arg=VALUE"]),
    (["h", "--print-service", "crn"], ["invalid --print-service 'crn'", "did you mean cron?",
                                       "cron, systemd, launchd"]),
    (["h", "--print-service", "x"], ["invalid --print-service 'x'; choose from cron"]),
    (["h", "--terminate", "--status"], ["cannot be combined with", "--terminate", "--status"]),
    (["h", "--status=yes"], ["option --status takes no value (got --status=yes)"]),
    (["h", "--manager", "slurmm"], ["unknown manager 'slurmm'", "did you mean slurm?",
                                    "gridengine, nohup, screen, slurm, tmux"]),
    (["h", "--manager", "pbs"], ["unknown manager 'pbs'", "--plugin", "tmux"]),
    (["h", "--tunnel", "sshtunel"], ["unknown tunnel 'sshtunel'", "did you mean sshtunnel?"]),
    (["h", "--app", "LAB"], ["invalid choice for --app", "lab, nbclassic, notebook, server"]),
    (["h", "--timeout", "soon"], ["invalid --timeout 'soon'", "number of seconds"]),
    (["h", "--local-port", "0"], ["invalid --local-port", "1 to 65535"]),
    (["h", "--plugin"], ["option --plugin needs a value"]),
])
def test_usage_errors_are_one_line_that_says_what_to_do(tmp_path, args, words):
    proc = run(*args, tmp=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("nbtunnel: "), proc.stderr
    assert "usage:" not in proc.stderr and "Traceback" not in proc.stderr
    for word in words:
        assert word in proc.stderr, (word, proc.stderr)


def test_the_parser_raises_usage_errors_main_prints_them():
    with pytest.raises(nbtunnel.UsageError) as e:
        nbtunnel.build_parser().parse_args(["h", "--sesion", "x"])
    assert e.value.code == 2 and "--session?" in str(e.value)
    assert nbtunnel.main(["h", "--sesion", "x"]) == 2


# --help ##########################################################################


def test_help_is_short_with_examples_plugins_paths_environment_and_exit_codes(tmp_path):
    proc = run("--help", tmp=tmp_path)
    out = proc.stdout
    assert proc.returncode == 0 and proc.stderr == ""
    lines = out.splitlines()
    assert len(lines) < 124, len(lines)
    assert all(len(line) <= 80 for line in lines if str(tmp_path) not in line), out
    assert len(out.split("\n\n")[0].splitlines()) <= 2  # the usage line is not the whole parser
    assert "examples:" in out and out.count("\n  nbtunnel ") >= 3
    assert "managers:     tmux (default), gridengine, nohup, screen, slurm" in out
    assert "tunnels:      ssh (default), sshtunnel" in out
    assert "rc, modules, conda, setup" in out
    assert "~/.config/nbtunnel/config.ini" not in out  # XDG_CONFIG_HOME is set: its real path
    assert str(tmp_path / "config" / "nbtunnel" / "config.ini") in out.replace("\n" + " " * 14, "")
    for name in ("NBTUNNEL_CONFIG", "NBTUNNEL_STATE_DIR", "NBTUNNEL_MANAGER", "NBTUNNEL_PLUGIN_PATH",
                 "NBTUNNEL_RUNTIME_DIR", "XDG_CONFIG_HOME", "XDG_STATE_HOME", "XDG_RUNTIME_DIR"):
        assert name in out, name
    assert "exit codes:   0 done; 1 could not do it" in out and "3 --terminate refused" in out
    # each environment option is explained once, not by its plugin's docstring again
    assert out.count("--rc FILE") == 1 and out.count("--conda ENV") == 1
    assert out.count("conda/mamba/micromamba") == 1
    assert "--time TIME" in out and "with --manager slurm" in out


def test_help_names_the_config_file_that_nbtunnel_config_picks(tmp_path):
    out = run("--help", tmp=tmp_path, env={"NBTUNNEL_CONFIG": "/etc/nbt.ini"}).stdout
    assert "config file:  /etc/nbt.ini" in out


# --status of a host with nothing recorded ########################################


def test_status_of_a_host_with_nothing_recorded_names_it_and_what_is_recorded(tmp_path):
    records = tmp_path / "records"
    record(records, host="nbremote")
    record(records, host="other", session="gpu")
    proc = run("nbremtoe", "--status", tmp=tmp_path)
    # exit 0: a host with no session is an answer (no rows), as --terminate of one is
    assert proc.returncode == 0 and proc.stdout == ""
    text = proc.stderr
    assert "nothing recorded for nbremtoe" in text and "did you mean nbremote?" in text
    assert "nbremote (session nbtunnel)" in text and "other (session gpu)" in text
    assert len(text.splitlines()) == 1

    as_json = run("nbremtoe", "--status", "--json", tmp=tmp_path)
    assert as_json.returncode == 0 and json.loads(as_json.stdout) == []
    assert run("nbremtoe", "--status", "-q", tmp=tmp_path).stderr == ""

    session = run("nbremote", "--status", "--session", "gpu", tmp=tmp_path)
    assert session.returncode == 0
    assert "nothing recorded for nbremote and session gpu" in session.stderr
    assert "other (session gpu)" in session.stderr

    empty = run("--status", tmp=tmp_path, env={"NBTUNNEL_STATE_DIR": str(tmp_path / "none")})
    assert empty.returncode == 0 and "no sessions recorded" in empty.stderr


# Ended sessions leave --status ##################################################


def test_ended_sessions_leave_status_after_a_week_or_at_forget_and_stay_ended(tmp_path):
    """Shown for 7 days after they ended, then out of sight; --forget at once.  The
    record stays on disk, so a unit's --ensure still leaves the session ended."""
    records, now = tmp_path / "records", nbtunnel.time.time()
    records.mkdir(mode=0o700)
    for name, days in (("old", 8), ("recent", 1), ("other", 2)):
        nbtunnel.save_record(str(records), dict(host="hpc.invalid" if name != "other" else "b.invalid",
                                                session=name, ended="terminated",
                                                ended_at=int(now - days * 86400)))
    rows = json.loads(run("--status", "--json", tmp=tmp_path).stdout)
    assert sorted(r["session"] for r in rows) == ["other", "recent"]
    text = run("--status", tmp=tmp_path)
    assert "old" not in text.stdout and "recent\tserver=stopped\tended" in text.stdout

    ensure = run("hpc.invalid", "--ensure", "--session", "old", tmp=tmp_path)
    assert ensure.returncode == 0 and ensure.stdout == "" and ensure.stderr == ""

    forget = run("hpc.invalid", "--forget", tmp=tmp_path)
    assert forget.returncode == 0, forget.stderr
    assert "hpc.invalid: session recent forgotten" in forget.stderr and "old" not in forget.stderr
    assert [r["session"] for r in json.loads(run("--status", "--json", tmp=tmp_path).stdout)] == [
        "other"]
    ensure = run("hpc.invalid", "--ensure", "--session", "recent", tmp=tmp_path)
    assert ensure.returncode == 0 and ensure.stdout == "" and ensure.stderr == ""
    forget = run("--forget", "--json", tmp=tmp_path)
    assert forget.returncode == 0 and json.loads(forget.stdout) == [
        dict(host="b.invalid", session="other", ended="terminated")]
    assert run("--status", "--json", tmp=tmp_path).stdout.strip() == "[]"
    assert len(list(records.glob("*.json"))) == 3


# A record whose session manager plugin is not available ###########################


def test_status_of_a_session_whose_manager_plugin_is_missing_says_so(tmp_path):
    """The file copied alone (no plugins/ beside it) reads a record of a Slurm job."""
    alone = tmp_path / "alone" / "nbtunnel.py"
    alone.parent.mkdir()
    shutil.copy(REPO / "nbtunnel.py", alone)
    plugin = "/somewhere/plugins/slurm.py"
    record(tmp_path / "records", manager="slurm", plugin=plugin, job_id="77", node="c1",
           job_state="RUNNING", time_left="1:00:00", options={"manager": "slurm"})
    proc = run("--status", program=alone, tmp=tmp_path)
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip()
    assert "server=unknown" in line and "stopped" not in line and "1:00:00" not in line
    assert "manager plugin slurm not loaded" in line and "job=77" in line
    assert "session manager slurm is not available" in proc.stderr and plugin in proc.stderr

    row = json.loads(run("--status", "--json", program=alone, tmp=tmp_path).stdout)[0]
    assert row["server"] == "unknown" and row["missing_plugin"] == "slurm"
    assert row["time_left"] is None and row["job_state"] is None and row["job_id"] == "77"
    assert row["tunnel_state"] == row["tunnel"] == "down"
    assert row["tunnel_backend"] == row["backend"] == "ssh"

    # every other command about that session names the missing plugin too, and stops
    for args in (["--terminate"], ["--ensure"], []):
        other = run("hpc.invalid", *args, program=alone, tmp=tmp_path)
        assert other.returncode == 2 and "unknown manager 'slurm'" in other.stderr, other.stderr


def test_json_names_the_tunnel_backend_and_state_without_ambiguity():
    out = nbtunnel.public(dict(host="h", session="s", tunnel="sshtunnel"))
    assert out["tunnel"] == out["tunnel_backend"] == "sshtunnel" and out["tunnel_state"] == "up"


# Installing ######################################################################


def test_the_file_copied_with_its_plugins_loads_them(tmp_path):
    shutil.copy(REPO / "nbtunnel.py", tmp_path / "nbtunnel.py")
    shutil.copytree(REPO / "plugins", tmp_path / "plugins")
    out = run("--manager", "slurm", "--help", program=tmp_path / "nbtunnel.py", tmp=tmp_path).stdout
    assert "--time TIME" in out and "plugins from: %s," % (tmp_path / "plugins") in out


def test_pip_install_ships_the_plugins(tmp_path):
    """`pip install .` gives a command that has the shipped plugins: Slurm's options,
    and a record of a Slurm session is not reported as missing its plugin."""
    command = pip_installed_command(tmp_path)

    help_ = run("--manager", "slurm", "--help", program=command, tmp=tmp_path)
    assert help_.returncode == 0, help_.stderr
    for flag in ("--time TIME", "--partition NAME", "--gres", "--conda ENV", "--module NAME"):
        assert flag in help_.stdout, flag
    assert "managers:     tmux (default), gridengine, nohup, screen, slurm" in help_.stdout
    assert "nbtunnel_plugins" in help_.stdout  # where they were found
    bad = run("h", "--manager", "slurm", "--time", "10:00", "--timeout", "x", program=command,
              tmp=tmp_path)
    assert bad.returncode == 2 and "invalid --timeout 'x'" in bad.stderr  # --time was taken

    record(tmp_path / "records", manager="slurm", plugin=str(tmp_path / "gone" / "slurm.py"),
           local_port=1)
    status = run("--status", "--json", program=command, tmp=tmp_path)  # hpc.invalid: no answer
    row = json.loads(status.stdout)[0]
    assert "missing_plugin" not in row and "not available" not in status.stderr
    assert row["plugin"].endswith("slurm.py") and row["server"] == "unknown"


# Batch jobs' options ##############################################################


@pytest.mark.parametrize("args, said", [
    (["--idle-timeout", "soon"], "0 (never) or a duration from 1s to 30 days"),
    (["--idle-timeout", "-1"], "0 (never) or a duration from 1s to 30 days"),
    (["--idle-timeout", "5x"], "0 (never) or a duration from 1s to 30 days"),
    (["--idle-timeout", "nan"], "0 (never) or a duration from 1s to 30 days"),
    (["--idle-timeout", "1e999"], "0 (never) or a duration from 1s to 30 days"),
    (["--idle-timeout", ""], "0 (never) or a duration from 1s to 30 days"),
    (["--node-address", "a b"], "an address or a host name"),
    (["--node-address=-x"], "an address or a host name"),
    (["--node-address", "10.0.0.5"], "is for batch managers"),  # tmux: no node
])
def test_batch_options_refused_without_traceback(tmp_path, args, said):
    proc = run("hpc.invalid", *args, tmp=tmp_path)
    assert proc.returncode == 2 and said in proc.stderr and "Traceback" not in proc.stderr


def test_idle_timeout_uses_jupyters_own_settings():
    assert nbtunnel.idle_args(0) == []
    words = nbtunnel.idle_args(1)
    assert "--ServerApp.shutdown_no_activity_timeout=60" in words
    assert "--MappingKernelManager.cull_idle_timeout=60" in words
    assert "--MappingKernelManager.cull_busy=False" in words
    assert nbtunnel.idle_minutes(None, nbtunnel.get("manager", "tmux")) == 0
    assert nbtunnel.idle_minutes(None, type("Batch", (), {"batch": True})()) == 60
    assert nbtunnel.idle_minutes(5, None) == 5
