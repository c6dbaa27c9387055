"""Unit tests of nbtunnel's pure functions: validation, quoting, URLs, parsing, grammar."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import nbtunnel  # noqa: E402

pytestmark = pytest.mark.noroot  # pure unit tests: no remote host, any user

HOSTILE = ["plain", "with space", "it's", 'say "hi"', "$(id)", "`id`", "a;b", "a&&b", "new\nline",
           "tab\tx", "ünï", "*", "~", "-n", "back\\slash", "", "!bang", "$HOME"]


@pytest.mark.parametrize("name", ["a", "nbtunnel", "A.b_c-9", "9" * 64])
def test_good_session_names(name):
    assert nbtunnel.check_session(name) == name


@pytest.mark.parametrize("name", ["", "-a", ".a", "a b", "a/b", "a\n", "$(id)", "x" * 65, "ü"])
def test_bad_session_names(name):
    with pytest.raises(nbtunnel.UsageError):
        nbtunnel.check_session(name)


@pytest.mark.parametrize("value,expected", [("1", 1), ("65535", 65535), (None, None), (8888, 8888)])
def test_good_ports(value, expected):
    assert nbtunnel.check_port(value, "--local-port") == expected


@pytest.mark.parametrize("value", ["0", "65536", "-1", "x", "1.5", "0x10", " 80 1"])
def test_bad_ports(value):
    with pytest.raises(nbtunnel.UsageError) as e:
        nbtunnel.check_port(value, "--local-port")
    assert e.value.code == 2


def test_shell_line_round_trips_hostile_words_through_sh():
    line = nbtunnel.shell_line(["printf", "%s\\0"] + HOSTILE)
    out = subprocess.run(["sh", "-c", line], capture_output=True, check=True).stdout
    assert out.decode().split("\0")[:-1] == HOSTILE


def test_tmux_start_line_is_safe_in_every_shell():
    """The tmux command line holds only placeholders and constant code: same meaning in any shell."""
    start = nbtunnel.Tmux().describe("s")["start"]
    line = start[-1].replace("@PYTHON@", "/usr/bin/python3").replace("@LAUNCH@", "QUJD+/=")
    assert "\\" not in line and "\n" not in line and "$" not in line and "!" not in line
    assert nbtunnel.REMOTE_COMMAND.count("'") == 0 and '"' not in nbtunnel.REMOTE_COMMAND


def test_make_url():
    assert nbtunnel.make_url(8000, "/", "lab", "t") == "http://127.0.0.1:8000/lab?token=t"
    assert nbtunnel.make_url(8000, "/", "server", "t") == "http://127.0.0.1:8000/?token=t"
    assert nbtunnel.make_url(8000, "/base/", "notebook", "t") == "http://127.0.0.1:8000/base/tree?token=t"


def test_guess_app_and_jupyter_argv():
    assert nbtunnel.guess_app("/opt/conda/bin/jupyter lab") == "lab"
    assert nbtunnel.guess_app("jupyter-notebook") == "notebook"
    assert nbtunnel.guess_app("python -m jupyter_server") == "server"
    assert nbtunnel.jupyter_argv("lab") == ["jupyter", "lab"]
    assert nbtunnel.jupyter_argv("lab", "'/opt/my env/jupyter' lab") == ["/opt/my env/jupyter", "lab"]


def test_record_names_are_safe_for_any_host():
    names = {nbtunnel.record_name(h, "s") for h in ["a", "ssh://u@h:22", "../../etc", "a/b", "a_b"]}
    assert len(names) == 5 and all("/" not in n for n in names)


def test_remote_helper_parses_as_python_36():
    ast.parse(nbtunnel.remote_source(), feature_version=(3, 6))


def test_nbtunnel_parses_as_python_38():
    ast.parse((REPO / "nbtunnel.py").read_text(), feature_version=(3, 8))


def test_ssh_errors_are_classified():
    def classify(text):
        err = nbtunnel.classify_ssh_error("myhost", text)
        return err.kind, str(err)

    kind, msg = classify("Host key verification failed.\n")
    assert kind == "hostkey-unknown" and "--accept-new" in msg
    kind, msg = classify("@ WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED! @")
    assert kind == "hostkey-changed" and "CHANGED" in msg
    kind, msg = classify("u@h: Permission denied (publickey).")
    assert kind == "auth" and "ssh-agent" in msg
    kind, msg = classify("ssh: connect to host x port 22: Connection refused")
    assert kind == "unreachable" and msg.startswith("cannot reach myhost") and "Connection refused" in msg


@pytest.mark.parametrize("code,stderr,kind", [
    (255, "/bin/sh: 1: exec: nc: not found\nkex_exchange_identification: Connection closed", "unreachable"),
    (127, "bash: line 1: python3: command not found\nbash: line 1: python: command not found", "no-python"),
    (127, "fish: Unknown command: python3\nfish: Unknown command: python", "no-python"),
    (1, "python3: Command not found.\npython: Command not found.", "no-python"),
    (255, "u@h: Permission denied (publickey).", "auth"),
    (1, "something else entirely", "no-answer"),
])
def test_helper_failures_keep_their_kind(code, stderr, kind):
    """A ProxyCommand's `nc: not found` is the link failing, not a missing python."""
    with pytest.raises(nbtunnel.Error) as e:
        nbtunnel.parse_result("myhost", "", stderr, code)
    assert e.value.kind == kind and "myhost" in str(e.value)


def test_remote_failure_kind_survives_the_wire():
    line = nbtunnel.RESULT_MARK + '{"ok": false, "kind": "no-dir", "message": "no such dir", "log_tail": "x"}'
    with pytest.raises(nbtunnel.RemoteError) as e:
        nbtunnel.parse_result("h", "banner\n" + line + "\n", "", 0)
    assert e.value.kind == "no-dir" and e.value.log_tail == "x" and "remote log" in e.value.text()


def test_remote_failure_facts_survive_the_wire():
    """What a caller acts on travels as data: the message may say anything."""
    line = nbtunnel.RESULT_MARK + '{"ok": false, "kind": "ended", "message": "it: ended", "how": "idle"}'
    with pytest.raises(nbtunnel.RemoteError) as e:
        nbtunnel.parse_result("h", line + "\n", "", 0)
    assert e.value.kind == "ended" and e.value.how == "idle" and e.value.facts == {"how": "idle"}
    plain = nbtunnel.Error("no facts", 3, "busy")
    assert (plain.code, plain.kind, plain.facts) == (3, "busy", {})


def test_per_host_answers_each_host_in_order():
    def ask(host):
        if host == "b":
            raise nbtunnel.Error("b is down", kind="unreachable")
        return host.upper()

    got = nbtunnel.per_host(["c", "b", "a"], ask)
    assert list(got) == ["c", "b", "a"] and got["c"] == "C" and got["a"] == "A"
    assert isinstance(got["b"], nbtunnel.Error) and got["b"].kind == "unreachable"
    assert nbtunnel.per_host([], ask) == {}


def test_copied_alone_the_file_works(tmp_path):
    copy = tmp_path / "nbtunnel.py"
    copy.write_bytes((REPO / "nbtunnel.py").read_bytes())
    proc = subprocess.run([sys.executable, str(copy), "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0 and "--terminate" in proc.stdout


def test_pip_install_gives_a_command(tmp_path):
    # From a copy: pip builds in the source tree (build/, *.egg-info), which may be read-only.
    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", ".ruff_cache", ".pytest_cache"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    pip = subprocess.run([str(venv / "bin/pip"), "install", "-q", "--no-deps", str(source)],
                         capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stderr
    proc = subprocess.run([str(venv / "bin/nbtunnel"), "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and nbtunnel.__version__ in proc.stdout


def resolved(argv, cfg_text="", records=()):
    """The settings of a run of ARGV with config CFG_TEXT and RECORDS: (host, args)."""
    import configparser

    cfg = configparser.ConfigParser(interpolation=None)
    cfg.read_string(cfg_text)
    args = nbtunnel.build_parser().parse_args(argv + ["--state-dir", tempfile.mkdtemp()])
    session = nbtunnel.resolve(args, cfg, list(records))
    return session.host, session


def test_config_file_values_and_command_line_precedence():
    text = "[DEFAULT]\nhost = h1\ntimeout = 7\n\n[host h1]\nnotebook-dir = ~/work\nsession = s1\n"
    host, args = resolved(["--session", "cli"], text)
    assert host == "h1" and args.name == "cli" and args.notebook_dir == "~/work" and args.timeout == 7.0
    with pytest.raises(nbtunnel.UsageError):
        resolved([], "[DEFAULT]\nno-such-key = 1\n")


def test_host_section_applies_when_host_comes_from_the_only_record():
    """`[host h1] notebook-dir` holds for a bare run that takes h1 from the only record."""
    rec = dict(host="h1", session="nbtunnel", options={})
    host, args = resolved([], "[host h1]\nnotebook-dir = ~/cfgdir\n", [rec])
    assert host == "h1" and args.notebook_dir == "~/cfgdir"


def test_a_foreground_tunnel_backend_is_not_taken_from_the_record():
    """--terminate of a session once served by --tunnel sshtunnel needs no sshtunnel package."""
    rec = dict(host="h1", session="nbtunnel", options={"tunnel": "sshtunnel", "app": "server"})
    host, args = resolved(["h1", "--terminate"], "", [rec])
    assert args.app == "server" and args.tunnel.name != "sshtunnel"


def test_record_fills_what_command_line_and_config_leave_open():
    rec = dict(host="h1", session="nbtunnel", options={"notebook_dir": "/data/nb", "app": "server"})
    host, args = resolved(["h1", "--ensure"], "", [rec])
    assert args.notebook_dir == "/data/nb" and args.app == "server"
    host, args = resolved(["h1", "--app", "lab"], "[host h1]\nnotebook-dir = /cfg\n", [rec])
    assert args.app == "lab" and args.notebook_dir == "/cfg"  # command line, then config, then record
    # A repair repeats the record instead; what differs waits for the next start.
    host, args = resolved(["h1", "--ensure", "--app", "lab"], "[host h1]\nnotebook-dir = /cfg\n", [rec])
    assert args.app == "server" and args.notebook_dir == "/data/nb"
    assert args.pending == {"app": ("lab", "command line"), "notebook_dir": ("/cfg", "config [host h1]")}


def test_each_option_says_where_it_came_from():
    """Command line, then the config section of THAT host (over [DEFAULT]), then the
    session's record, then the default; another host's section plays no part."""
    text = ("[DEFAULT]\napp = notebook\n[host h1]\nnotebook-dir = /cfg\njupyter = jcfg\n"
            "[host h2]\nrc = ~/.h2rc\n")
    rec = dict(host="h1", session="nbtunnel", options={
        "notebook_dir": "/rec", "jupyter": "jrec", "rc": "~/.rec", "remote_port": 9999, "app": "server"})
    host, s = resolved(["h1", "--jupyter", "jcli"], text, [rec])
    assert (s.jupyter, s.source("jupyter")) == ("jcli", "command line")
    assert (s.notebook_dir, s.source("notebook_dir")) == ("/cfg", "config [host h1]")
    assert (s.app, s.source("app")) == ("notebook", "config [DEFAULT]")
    assert (s.rc, s.source("rc")) == ("~/.rec", "record")
    assert (s.remote_port, s.source("remote_port")) == (9999, "record")
    assert (s.setup, s.source("setup")) == (None, "default")
    assert (s.name, s.source("session"), s.manager.name) == ("nbtunnel", "default", "tmux")
    assert s.asked(start_only=True) == dict(jupyter="jcli", notebook_dir="/cfg", app="notebook",
                                            rc="~/.rec", remote_port=9999)


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No config file, state and plugins of the user running the tests."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg-state"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    monkeypatch.setenv("NBTUNNEL_CONFIG", str(tmp_path / "config.ini"))
    for name in ("NBTUNNEL_STATE_DIR", "NBTUNNEL_MANAGER", "NBTUNNEL_PLUGIN_PATH"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def test_state_dir_of_a_host_section_holds_its_records(isolated, capsys):
    """`state-dir = D` in [host h1] is where h1's sessions are recorded and looked up."""
    own = isolated / "h1-state"
    own.mkdir(mode=0o700)
    nbtunnel.save_record(str(own), dict(
        host="h1", session="nbtunnel", local_port=4321, options={"notebook_dir": "/recorded"}))
    (isolated / "config.ini").write_text("[host h1]\nstate-dir = %s\n" % own)
    assert nbtunnel.main(["h1", "--print-service", "cron"]) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    assert "--state-dir %s " % own in line and "--notebook-dir /recorded" in line
    assert "--local-port 4321" in line


def test_ensure_leaves_later_runs_free_to_show_progress(isolated):
    """--ensure turns the progress line off for its own run only (library use, tests)."""
    state = str(isolated / "state")
    assert nbtunnel.main(["h", "--ensure", "--manager", "slurm", "--unix-socket",
                          "--state-dir", state]) == 2  # refused before any ssh
    assert nbtunnel.main(["h", "--print-nginx", "--local-port", "8080", "--state-dir", state]) == 0
    assert not nbtunnel.progress.silent


@pytest.mark.parametrize("argv,text,words", [
    (["h", "--timeout", "inf"], "", "--timeout"),
    (["h", "--timeout", "nan"], "", "--timeout"),
    (["h", "--timeout", "-5"], "", "--timeout"),
    (["h", "--timeout", "0"], "", "--timeout"),
    (["h"], "[DEFAULT]\ntimeout = inf\n", "--timeout"),
    (["h"], "[DEFAULT]\napp = evil\n", "--app"),
    (["h"], "[DEFAULT]\nremote-port = 99999\n", "--remote-port"),
    (["h"], "[DEFAULT]\naccept-new = maybe\n", "accept-new"),
    (["h", "--interval", "inf"], "", "--interval"),
])
def test_bad_values_are_usage_errors_wherever_they_come_from(argv, text, words):
    with pytest.raises(nbtunnel.UsageError) as e:
        resolved(argv, text)
    assert words in str(e.value)


def test_config_ssh_option_is_one_per_line():
    host, args = resolved(["h"], "[DEFAULT]\nssh-option = ServerAliveInterval 20\n    Compression yes\n")
    assert args.ssh_option == ["ServerAliveInterval 20", "Compression yes"]
    assert nbtunnel.ssh_options(args) == ["-o", "ServerAliveInterval 20", "-o", "Compression yes"]


def test_option_abbreviations_are_off():
    with pytest.raises(nbtunnel.UsageError):
        nbtunnel.build_parser().parse_args(["h", "--timeou", "5"])  # (--time is Slurm's)


def test_missing_config_file_given_by_option_is_an_error(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "nbtunnel.py"), "h", "--config", str(tmp_path / "no.ini")],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "no.ini not found" in proc.stderr and "Traceback" not in proc.stderr


def test_unexpected_errors_are_one_line_without_traceback(tmp_path):
    """A state dir that cannot be created: a message, no traceback (and -v gives it)."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    argv = [sys.executable, str(REPO / "nbtunnel.py"), "h", "--state-dir", str(blocker / "sub")]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and "error:" in proc.stderr


def test_windows_is_refused_clearly():
    """Not POSIX (there, os has no getuid): a clear message, no traceback."""
    code = ("import os, sys, runpy; del os.getuid; sys.argv = ['nbtunnel', 'h'];"
            "runpy.run_path(%r, run_name='__main__')" % str(REPO / "nbtunnel.py"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1 and "WSL" in proc.stderr and "Traceback" not in proc.stderr


def test_plugin_option_from_config_is_converted_and_checked():
    class Ports(nbtunnel.ShellEnvironment):
        name = "portsx"
        options = [nbtunnel.Option("--portsx", "a port", type=nbtunnel.port)]

    plugin = Ports()
    nbtunnel.register(plugin)
    try:
        host, args = resolved(["h"], "[DEFAULT]\nportsx = 8080\n")
        assert args.portsx == 8080
        with pytest.raises(nbtunnel.UsageError):
            resolved(["h"], "[DEFAULT]\nportsx = 80x\n")
    finally:
        del nbtunnel.ENVIRONMENTS["portsx"]


def test_environment_data_of_two_plugins_cannot_collide():
    class Thief(nbtunnel.ShellEnvironment):
        name = "thief"

    with pytest.raises(nbtunnel.Error) as e:
        nbtunnel.shell_step(Thief(), dict(data={"NBT_CONDA": "x"}, sh=":", fish=":", csh=":"))
    assert "NBT_THIEF" in str(e.value)
    step = nbtunnel.shell_step(Thief(), dict(data={"NBT_THIEF_A": "$(id)"}, fail="it failed",
                                             sh="true", fish="true", csh="true"))
    assert step["vars"] == {"NBT_THIEF_A": "$(id)"} and "nbtunnel: it failed" in step["sh"]


@pytest.mark.parametrize("host", ["h", "user@h.example.org", "ssh://u@h:2222", "10.0.0.1", "fe80::1%eth0",
                                  "[::1]", "ünï.example", "alias_with.dots-and-dash"])
def test_good_hosts(host):
    assert nbtunnel.check_host(host) == host


@pytest.mark.parametrize("host", ["", "-oProxyCommand=x", "a b", "a\nb", "$(id)", "`id`", "a;b", "a|b",
                                  "a&b", "a'b", 'a"b', "a\\b", "a>b", "a\tb", "a*", "a!b", "a#b"])
def test_bad_hosts(host):
    with pytest.raises(nbtunnel.UsageError) as e:
        nbtunnel.check_host(host)
    assert e.value.code == 2


def test_split_command_errors_are_usage_errors():
    assert nbtunnel.jupyter_argv("lab", "/opt/x y/jupyter 'lab'") == ["/opt/x", "y/jupyter", "lab"]
    for bad in ("jupyter 'lab", ""):
        with pytest.raises(nbtunnel.UsageError):
            nbtunnel.jupyter_argv("lab", bad)


@pytest.mark.parametrize("lines,way", [
    ("HostName 127.0.0.1\n    Port 2222", "jump"),  # a forward: only through the name
    ("HostName 10.1.2.3\n    ProxyJump bastion", "direct"),  # the config's own jump host
    ("HostName 10.1.2.3\n    ProxyCommand nc %h %p", "direct"),
    ("HostName localhost", "jump"),  # one name, one node: never its other addresses
])
def test_a_login_node_is_reached_along_the_configured_route(tmp_path, lines, way):
    config = tmp_path / "config"
    config.write_text("Host front\n    %s\n" % lines)
    node = dict(node="n2", address="10.9.9.9", port=22)
    assert nbtunnel.node_way(["-F", str(config)], "front", node) == way


def test_a_round_robin_name_lists_the_node():
    seen = {"hostname": "127.0.0.1"}
    assert not nbtunnel.round_robin(seen, "x", dict(node="n", address="127.0.0.1", port=22))
    assert not nbtunnel.round_robin({"hostname": "no-such-host.invalid"}, "x",
                                    dict(node="n", address="127.0.0.1", port=22))


# --idle-timeout: a duration, kept in minutes ###################################


@pytest.mark.parametrize("text, minutes, shown", [
    ("45s", 0.75, "45s"), ("30m", 30, "30min"), ("30min", 30, "30min"), ("2h", 120, "2h"),
    ("90", 90, "90min"), ("0.5", 0.5, "30s"), ("1.5h", 90, "90min"), (" 20 S ", 1 / 3, "20s"),
    ("1s", 1 / 60, "1s"), ("720h", 43200, "720h"), ("0", 0, None), ("0s", 0, None),
])
def test_idle_timeout_takes_units_and_reads_back(text, minutes, shown):
    value = nbtunnel.minutes(text)
    assert value == pytest.approx(minutes)
    if shown:  # what --status shows is what the option takes back
        assert nbtunnel.duration_text(value) == shown
        assert nbtunnel.minutes(shown) == pytest.approx(value)


@pytest.mark.parametrize("text", ["-1", "5x", "nan", "inf", "1e999", "1e3", "", " ", "s", "0.5s",
                                  "721h", "43201", "1h30m", "5 5", "0x10"])
def test_idle_timeout_refuses_bad_durations(text):
    with pytest.raises(ValueError) as e:
        nbtunnel.minutes(text)
    assert str(e.value) == nbtunnel.DURATION_WANTED


def test_idle_timeout_old_records_and_service_units_read_right():
    option = next(o for o in nbtunnel.session_options() if o.dest == "idle_timeout")
    assert option.convert(0.75, "record") == 0.75  # a recorded number is minutes, as before
    assert option.convert("45s", "config [DEFAULT]") == 0.75
    assert option.words(0.75) == ["--idle-timeout", "45s"]  # a unit's command line
    assert option.words(60.0) == ["--idle-timeout", "1h"]
    assert nbtunnel.ended_text("idle", 0.75) == "idle for 45s"
    assert nbtunnel.ended_text("idle", 1) == "idle for 1min"


@pytest.mark.parametrize("minutes, secs, every", [(0.25, 15, 3), (1 / 3, 20, 5), (1 / 60, 1, 1),
                                                  (1, 60, 15), (60, 3600, 60)])
def test_idle_args_look_often_enough_for_the_timeout(minutes, secs, every):
    words = nbtunnel.idle_args(minutes)
    assert "--ServerApp.shutdown_no_activity_timeout=%d" % secs in words
    assert "--MappingKernelManager.cull_idle_timeout=%d" % secs in words
    assert "--MappingKernelManager.cull_interval=%d" % every in words
    assert "--TerminalManager.cull_inactive_timeout=%d" % secs in words
    assert "--TerminalManager.cull_interval=%d" % every in words
    assert nbtunnel.idle_args(0) == []
