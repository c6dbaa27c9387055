"""One session, resolved once: what a start asked for is what every later step uses."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from helpers import kill_jupyter, pasted, printed_commands, run_kernel_code, wait_until
from unattended import api_status, ensure, jupyter_pids, kill_masters, start

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def server_cwd(info: dict) -> str:
    """The working directory of the kernel of the server INFO, through the tunnel."""
    return run_kernel_code(f"http://127.0.0.1:{info['local_port']}", info["token"],
                           "import os; print(os.getcwd(), end='')")


def test_ensure_restarts_a_dead_server_with_its_notebook_dir(nbt, remote):
    work = remote.home / "nbdir with space"
    remote.run(["mkdir", "-p", str(work)], check=True)
    info = start(nbt, "--notebook-dir", "nbdir with space")
    assert server_cwd(info) == str(work)
    for pid in jupyter_pids(remote):
        os.kill(pid, 9)
    wait_until(lambda: not jupyter_pids(remote), 15, message="jupyter killed")
    proc = ensure(nbt)  # no options at all: the record says where it ran
    assert proc.returncode == 0, proc.stderr
    assert "restarted Jupyter" in proc.stdout
    again = nbt.status()[0]
    assert api_status(again["url"]) == 200 and again["token"] == info["token"]
    assert server_cwd(again) == str(work)


def test_reattach_with_other_server_options_says_so(nbt, remote):
    remote.run(["mkdir", "-p", str(remote.home / "other")], check=True)
    info = start(nbt)
    proc = nbt.run(remote.alias, "--json", "--notebook-dir", "other", "--setup", "true")
    assert proc.returncode == 0, proc.stderr
    again = json.loads(proc.stdout)
    assert again["reused"] is True and again["url"] == info["url"]
    assert "runs with other options than asked" in proc.stderr
    assert "--notebook-dir" in proc.stderr and "--setup" in proc.stderr and "--terminate" in proc.stderr
    assert (f"run: nbtunnel {remote.alias} --session nbtunnel --terminate -F {nbt.ssh_config} "
            f"--state-dir {nbt.state_dir}, then this command again") in proc.stderr
    same = nbt.run(remote.alias, "--json")  # asking nothing new: nothing to say
    assert same.returncode == 0 and "other options" not in same.stderr, same.stderr


def test_host_section_of_the_host_from_the_only_record(nbt, remote, tmp_path):
    """`[host H] notebook-dir` applies to a bare run that finds H in the only record."""
    remote.run(["mkdir", "-p", str(remote.home / "fromcfg")], check=True)
    info = start(nbt)
    nbt.config_file.write_text(f"[host {remote.alias}]\nnotebook-dir = fromcfg\n")
    proc = nbt.run("--json")  # HOST from the record; the section of that HOST applies
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["reused"] is True
    assert "--notebook-dir" in proc.stderr and "fromcfg" in proc.stderr
    assert nbt.run("--terminate").returncode == 0
    proc = nbt.run(remote.alias, "--json")
    assert server_cwd(json.loads(proc.stdout)) == str(remote.home / "fromcfg")
    assert info["host"] == remote.alias


@pytest.mark.parametrize("kind", ["cron", "systemd"])
def test_print_service_keeps_every_option(nbt, remote, tmp_path, kind):
    plugin = tmp_path / "greet.py"
    plugin.write_text("import nbtunnel\n\nclass G(nbtunnel.ShellEnvironment):\n    name = 'greet'\n"
                      "    options = [nbtunnel.Option('--greet', 'greeting')]\n\nnbtunnel.register(G())\n")
    proc = nbt.run(remote.alias, "--print-service", kind, "--plugin", str(plugin), "--greet", "hi there",
                   "--conda", "my env", "--module", "gcc/12", "--module", "cuda", "--setup", "echo 'x'",
                   "--notebook-dir", "nb", "-o", "ServerAliveInterval=20", "--timeout", "45")
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    for word in ("--greet", "hi there", "--conda", "my env", "--module", "gcc/12", "cuda", "--setup",
                 "--notebook-dir", "ServerAliveInterval=20", "--timeout", "45", str(plugin)):
        assert word in text, (word, text)


def test_a_failing_proxy_command_is_not_a_missing_python(nbt, remote):
    """`nc: not found` from a ProxyCommand is the link failing, named as such."""
    proc = nbt.run(remote.alias, "-o", "ProxyCommand=/nonexistent/nc %h %p", timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert f"cannot reach {remote.alias}" in proc.stderr and "python" not in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("state_dir", ["/tmp/" + "x" * 5000, "/proc/nbtunnel-cannot-be-here"])
def test_unusable_state_dirs_are_one_clean_error(nbt, remote, state_dir):
    proc = nbt.run(remote.alias, "--state-dir", state_dir, timeout=60)
    assert proc.returncode in (1, 2) and "error:" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr) < 2000  # one message, not a dump


def test_ensure_and_terminate_all_sessions(nbt, remote):
    """--all: every recorded session, one connection per host, results in record order."""
    one, two = start(nbt, "--session", "s1"), start(nbt, "--session", "s2")
    for pid in jupyter_pids(remote):
        os.kill(pid, 9)
    wait_until(lambda: not jupyter_pids(remote), 15, message="jupyter killed")
    kill_masters(nbt.ssh_config)  # the link went too: each host needs a new connection
    before = remote.auth_count()
    proc = nbt.run("--ensure", "--all", "--json", timeout=240)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert [r["session"] for r in rows] == ["s1", "s2"]  # record order
    assert all(r["repairs"] and "restarted Jupyter" in r["repairs"][0] for r in rows)
    assert {r["token"] for r in rows} == {one["token"], two["token"]}
    assert all(api_status(r["url"]) == 200 for r in rows)
    assert remote.auth_count() - before == 1  # one host, one connection
    quiet = nbt.run("--ensure", "--all")
    assert quiet.returncode == 0 and quiet.stdout == "", quiet.stdout
    proc = nbt.run("--terminate", "--all")
    assert proc.returncode == 0, proc.stderr
    assert "s1 stopped" in proc.stderr and "s2 stopped" in proc.stderr
    assert [r["ended"] for r in nbt.status()] == ["terminated"] * 2 and not jupyter_pids(remote)
    assert nbt.run("--status", "--all").returncode == 2  # --all goes with --terminate or --ensure


def test_host_alone_means_the_one_session_recorded_for_it(nbt, remote):
    """`nbtunnel HOST` takes over the only session recorded for HOST, with its manager
    and options, as `--session NAME` would, instead of starting a second Jupyter."""
    info = start(nbt, "--session", "nb-slow", "--manager", "screen")
    proc = nbt.run(remote.alias, "--json")
    assert proc.returncode == 0, proc.stderr
    again = json.loads(proc.stdout)
    assert (again["session"], again["manager"], again["reused"]) == ("nb-slow", "screen", True)
    assert again["url"] == info["url"] and len(jupyter_pids(remote)) == 1
    assert f"using session nb-slow, the one recorded for {remote.alias}; --session NAME" \
        in proc.stderr
    assert remote.tmux_sessions() == [] and [r["session"] for r in nbt.status()] == ["nb-slow"]

    start(nbt, "--session", "other")  # two recorded, neither of the default name
    proc = nbt.run(remote.alias)
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    assert "nb-slow, other" in proc.stderr and "--session NAME" in proc.stderr
    assert len(jupyter_pids(remote)) == 2

    start(nbt, "--session", "nbtunnel")  # the default name, once recorded, means that one
    proc = nbt.run(remote.alias, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["session"] == "nbtunnel" and "using session" not in proc.stderr
    assert len(jupyter_pids(remote)) == 3


def test_crashed_server_status_says_how_to_start_it_and_ended_ones_can_be_forgotten(nbt, remote):
    """A crashed server's --status line carries the commands that start it again, which
    work as pasted (with this run's -F and --state-dir); an ended session is shown with
    the command that starts it until --forget, and a repair still leaves it ended."""
    info = start(nbt)
    kill_jupyter(remote)
    text = nbt.run(remote.alias, "--status")
    assert text.returncode == 0, text.stderr
    line = text.stdout.strip()
    assert "server=stopped" in line and "jupyter is not running:" in line, line
    again, plain = printed_commands(line)
    assert again == (f"nbtunnel {remote.alias} --session nbtunnel --ensure -F {nbt.ssh_config} "
                     f"--state-dir {nbt.state_dir}")
    proc = pasted(nbt, again)
    assert proc.returncode == 0 and "restarted Jupyter" in proc.stdout, proc.stderr
    assert api_status(info["url"]) == 200 and nbt.status()[0]["url"] == info["url"]
    kill_jupyter(remote)
    proc = pasted(nbt, plain)
    assert proc.returncode == 0 and proc.stdout.strip() == info["url"], proc.stderr
    assert api_status(info["url"]) == 200

    assert nbt.run(remote.alias, "--terminate").returncode == 0
    text = nbt.run("--status").stdout
    assert (f"ended: terminated by you; start it again with: nbtunnel {remote.alias} --session "
            f"nbtunnel -F {nbt.ssh_config} --state-dir {nbt.state_dir}\n") in text, text
    proc = nbt.run(remote.alias, "--forget")
    assert proc.returncode == 0 and "session nbtunnel forgotten" in proc.stderr, proc.stderr
    assert nbt.status() == []
    proc = ensure(nbt)  # a unit's --ensure line still leaves it ended
    assert proc.returncode == 0 and proc.stdout == "", proc.stderr
    assert not jupyter_pids(remote)
