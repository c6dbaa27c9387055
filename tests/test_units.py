"""Unit tests of nbtunnel's pure functions: validation, quoting, URLs, parsing, grammar."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
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
    ast.parse(nbtunnel.REMOTE_HELPER, feature_version=(3, 6))


def test_nbtunnel_parses_as_python_38():
    ast.parse((REPO / "nbtunnel.py").read_text(), feature_version=(3, 8))


def test_ssh_errors_are_classified():
    assert "--accept-new" in nbtunnel.classify_ssh_error("h", "Host key verification failed.\n")
    assert "CHANGED" in nbtunnel.classify_ssh_error("h", "@ WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED! @")
    assert "ssh-agent" in nbtunnel.classify_ssh_error("h", "u@h: Permission denied (publickey).")
    msg = nbtunnel.classify_ssh_error("myhost", "ssh: connect to host x port 22: Connection refused")
    assert msg.startswith("cannot reach myhost") and "Connection refused" in msg


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


def test_config_file_values_and_command_line_precedence(tmp_path):
    cfg = tmp_path / "c.ini"
    cfg.write_text("[DEFAULT]\nhost = h1\ntimeout = 7\n\n[host h1]\nnotebook-dir = ~/work\nsession = s1\n")
    parser = nbtunnel.build_parser()
    args = parser.parse_args(["--session", "cli"])
    nbtunnel.apply_config(args, nbtunnel.read_config(str(cfg)), "h1")
    assert args.session == "cli" and args.notebook_dir == "~/work" and args.timeout == 7.0
    bad = tmp_path / "bad.ini"
    bad.write_text("[DEFAULT]\nno-such-key = 1\n")
    with pytest.raises(nbtunnel.UsageError):
        nbtunnel.apply_config(parser.parse_args([]), nbtunnel.read_config(str(bad)), None)


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
