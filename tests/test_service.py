"""--print-service and --print-nginx: what is printed parses in its own format, carries every
option with absolute paths, and works for real (cron's environment, a real nginx, Chromium)."""

from __future__ import annotations

import json
import os
import plistlib
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from helpers import (
    free_local_port,
    http_get,
    local_port_open,
    run_kernel_code,
    start,
    token_of,
    wait_until,
)

REPO = Path(__file__).resolve().parent.parent
NBTUNNEL = REPO / "nbtunnel.py"
sys.path.insert(0, str(REPO))
import nbtunnel  # noqa: E402

HOSTILE = ["plain", "with space", "it's", 'say "hi"', "$(touch /tmp/nbt-svc-PWNED)",
           "`touch /tmp/nbt-svc-PWNED`", "a;b", ";", "a&&b", "tab\tx", "ünï 目录", "*", "~",
           "-n", "back\\slash", "", "!bang", "$HOME", "${HOME}", "100%", "%h:%p", "a\\%b",
           "%%", "\\", "$$", "#not-a-comment"]
CRON_PATH = "/usr/bin:/bin"  # what Debian's cron gives a job


def printer_argv(words: list[str]) -> list[str]:
    """An argv that prints its own arguments (after the program) as JSON."""
    return [sys.executable, "-c", "import json,sys; print(json.dumps(sys.argv[1:]))", *words]


# Parsers of each format, written from its documentation ##########################


def crontab_command(line: str) -> str:
    """The command cron runs for LINE: after five time fields, with Debian cron's % rules."""
    fields = line.split(None, 5)
    assert len(fields) == 6, line
    out, escaped = [], False
    for ch in fields[5]:  # cron: an unescaped % ends the command (the rest is stdin), \% is %
        if escaped:
            if ch != "%":
                out.append("\\")
            out.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == "%":
            raise AssertionError("unescaped % in crontab line: " + line)
        else:
            out.append(ch)
    if escaped:
        out.append("\\")
    return "".join(out)


def systemd_exec_argv(value: str) -> list[str]:
    """Split an ExecStart= value as systemd.service(5) and systemd.syntax(7) describe it."""
    expanded = []
    i = 0
    while i < len(value):  # specifiers first: %% is %, any other % is a specifier
        if value[i] == "%":
            assert value[i + 1 : i + 2] == "%", "unescaped specifier in " + value
            expanded.append("%")
            i += 2
        else:
            expanded.append(value[i])
            i += 1
    text = "".join(expanded)
    words, i = [], 0
    escapes = {"n": "\n", "t": "\t", "\\": "\\", '"': '"', "'": "'", "a": "\a", "r": "\r"}
    while True:
        while i < len(text) and text[i] in " \t":
            i += 1
        if i >= len(text):
            break
        assert not (text[i] == ";" and (i + 1 == len(text) or text[i + 1] in " \t")), \
            "unquoted ; would end the command: " + text
        word, quote = [], None
        while i < len(text):
            c = text[i]
            if quote is None and c in " \t":
                break
            if quote is None and c in "\"'" and not word:
                quote = c
            elif quote is not None and c == quote:
                quote = None
            elif c == "\\":
                nxt = text[i + 1]
                if nxt == "x":
                    word.append(chr(int(text[i + 2 : i + 4], 16)))
                    i += 2
                else:
                    word.append(escapes[nxt])
                i += 1
            else:
                word.append(c)
            i += 1
        assert quote is None, "unterminated quote in " + text
        words.append("".join(word))
    result = []
    for w in words:  # then environment variables: $$ is $, $NAME / ${NAME} would be replaced
        assert not re.search(r"(?<!\$)(\$\$)*\$(?!\$)", w), "unescaped $ in " + repr(w)
        result.append(w.replace("$$", "$"))
    return result


def unit_sections(text: str) -> dict[str, dict[str, list[str]]]:
    """An INI-like parse of a unit file: section -> key -> values (keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip()[1:-1], {})
            continue
        assert current is not None, "line outside a section: " + line
        key, sep, value = line.partition("=")
        assert sep, "not key=value: " + line
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


# Unit tests of the pure functions #################################################


@pytest.mark.noroot
def test_cron_line_round_trips_hostile_words_through_cron_and_sh():
    marker = Path("/tmp/nbt-svc-PWNED")
    marker.unlink(missing_ok=True)
    text = nbtunnel.cron_entry(printer_argv(HOSTILE), {}, "Jupyter on h (session s)")
    lines = text.splitlines()
    assert all(line.startswith("#") for line in lines[:-1])
    assert any("passphrase" in line and "SSH_AUTH_SOCK" in line for line in lines)
    assert lines[-1].startswith("*/5 * * * * ")
    command = crontab_command(lines[-1])
    out = subprocess.run(["env", "-i", "PATH=" + CRON_PATH, "sh", "-c", command],
                         capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == HOSTILE
    assert not marker.exists()


@pytest.mark.noroot
def test_cron_refuses_line_breaks():
    with pytest.raises(nbtunnel.UsageError) as e:
        nbtunnel.cron_entry(printer_argv(["a\nb"]), {}, "t")
    assert e.value.code == 2 and "line break" in str(e.value)


@pytest.mark.noroot
def test_cron_sets_path_when_ssh_is_elsewhere():
    text = nbtunnel.cron_entry(printer_argv(["x"]), {"PATH": "/opt/my ssh/bin:/usr/bin:/bin"}, "t")
    command = crontab_command(text.splitlines()[-1])
    probe = command.replace("print(json.dumps(sys.argv[1:]))", "print(__import__(\"os\").environ[\"PATH\"])")
    out = subprocess.run(["env", "-i", "PATH=" + CRON_PATH, "sh", "-c", probe],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "/opt/my ssh/bin:/usr/bin:/bin"


@pytest.mark.noroot
def test_systemd_unit_parses_and_round_trips_hostile_words():
    words = HOSTILE + ["new\nline", "bell\x07"]
    text = nbtunnel.systemd_unit(
        printer_argv(words), {"PATH": "/a b/%x:$y"}, "Jupyter on h%1 (session s)", "nbtunnel-h-s"
    )
    units = unit_sections(text)
    service = units["Service"]
    assert systemd_exec_argv(service["ExecStart"][0]) == printer_argv(words)
    assert service["Restart"] == ["always"] and int(service["RestartSec"][0]) > 0
    assert service["KillSignal"] == ["SIGINT"]
    assert systemd_exec_argv(service["Environment"][0]) == ["PATH=/a b/%x:$y"]
    assert units["Install"]["WantedBy"] == ["default.target"]
    assert units["Unit"]["Description"] == ["nbtunnel: Jupyter on h%%1 (session s)"]
    # the real ExecStart runs the printer: the parsed argv is what systemd would exec
    out = subprocess.run(systemd_exec_argv(service["ExecStart"][0]), capture_output=True, text=True,
                         check=True).stdout
    assert json.loads(out) == words


@pytest.mark.noroot
def test_systemd_analyze_verify_accepts_the_unit(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if not analyze:
        pytest.skip("systemd-analyze is not installed: only the unit-file parse ran")
    text = nbtunnel.systemd_unit(printer_argv(HOSTILE + ["x\ny"]), {}, "Jupyter on h (session s)", "nbtunnel-h-s")
    unit = tmp_path / "nbtunnel-h-s.service"
    unit.write_text(text)
    proc = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    complaints = [line for line in proc.stderr.splitlines() if unit.name in line]
    assert proc.returncode == 0 and not complaints, proc.stderr
    # the check is real: a broken line is reported
    unit.write_text(text.replace("Restart=always", "Restart=bogus"))
    proc = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert unit.name in proc.stderr and "bogus" in proc.stderr


@pytest.mark.noroot
def test_launchd_plist_parses_with_plistlib():
    words = HOSTILE + ["new\nline"]
    text = nbtunnel.launchd_plist(
        printer_argv(words), {}, "Jupyter on a--b (session s)", "org.nbtunnel.a-b-s", "/home/u"
    )
    job = plistlib.loads(text.encode())
    assert job["ProgramArguments"] == printer_argv(words)
    assert job["KeepAlive"] is True and job["RunAtLoad"] is True
    assert job["WorkingDirectory"] == "/home/u" and job["Label"] == "org.nbtunnel.a-b-s"
    assert job["StandardErrorPath"].startswith("/home/u/")
    assert "<!--" in text and "LaunchAgents/org.nbtunnel.a-b-s.plist" in text
    with pytest.raises(nbtunnel.UsageError):  # XML cannot hold it: a clear error, not a traceback
        nbtunnel.launchd_plist(printer_argv(["bell\x07"]), {}, "t", "org.nbtunnel.x", "/home/u")


@pytest.mark.noroot
@pytest.mark.parametrize("value", ["8080", "127.0.0.1:8080", "[::1]:8080", "localhost:9000"])
def test_nginx_listen_good(value):
    assert nbtunnel.check_listen(value) == value


@pytest.mark.parametrize("value", ["", "0", "70000", "8080;", "8080; include /etc/passwd",
                                   "1.2.3.4:80 ssl", "a b:80", "8080\n}", "unix:/x", "$x:80"])
@pytest.mark.noroot
def test_nginx_listen_bad(value):
    with pytest.raises(nbtunnel.UsageError):
        nbtunnel.check_listen(value)


@pytest.mark.noroot
def test_nginx_block_has_websocket_headers():
    text = nbtunnel.nginx_server_block(4321, "127.0.0.1:8080", "Jupyter on h (session s)")
    assert re.search(r"map \$http_upgrade \$(\w+) \{", text)
    var = re.search(r"map \$http_upgrade (\$\w+)", text).group(1)
    assert "proxy_set_header Upgrade $http_upgrade;" in text
    assert f"proxy_set_header Connection {var};" in text
    assert "proxy_http_version 1.1;" in text and "proxy_read_timeout 1d;" in text
    assert "proxy_pass http://127.0.0.1:4321;" in text and "listen 127.0.0.1:8080;" in text
    assert "proxy_set_header Host $http_host;" in text
    assert "allow_origin" not in text.replace("# ", "")  # Jupyter's checks are not loosened


# The command line ##################################################################


def run_cli(*args: str, state: Path, cwd: Path | None = None, env: dict | None = None):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("NBTUNNEL_", "XDG_"))}
    full_env.update(NBTUNNEL_CONFIG=str(state / "no-config.ini"), XDG_CONFIG_HOME=str(state / "cfg"))
    full_env.update(env or {})
    return subprocess.run([sys.executable, str(NBTUNNEL), *args], capture_output=True, text=True,
                          timeout=60, cwd=cwd, env=full_env, stdin=subprocess.DEVNULL)


@pytest.mark.noroot
def test_print_service_carries_every_option_with_absolute_paths(tmp_path):
    (tmp_path / "my_ssh_config").write_text("")
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys/id_ed25519").write_text("")
    options = ["--session", "exp1", "--app", "notebook", "--notebook-dir", "~/it's here",
               "--rc", "~/.zshrc", "--local-port", "18888", "--remote-port", "19999",
               "--timeout", "45", "--ssh-config", "my_ssh_config", "-o", "ServerAliveInterval=20",
               "-J", "gw.example.org", "-i", "keys/id_ed25519", "--state-dir", "st"]
    for kind in ("cron", "systemd", "launchd"):
        proc = run_cli("me@hpc.example.org", "--print-service", kind, *options, state=tmp_path, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        if kind == "cron":
            line = proc.stdout.splitlines()[-1]
            import shlex

            argv = shlex.split(crontab_command(line))
            action = "--ensure"
        elif kind == "systemd":
            argv = systemd_exec_argv(unit_sections(proc.stdout)["Service"]["ExecStart"][0])
            action = "--watch"
        else:
            argv = plistlib.loads(proc.stdout.encode())["ProgramArguments"]
            action = "--watch"
        assert argv[0] == os.path.abspath(sys.executable) and os.access(argv[0], os.X_OK)
        assert argv[1] == str(NBTUNNEL)
        assert argv[2:4] == ["me@hpc.example.org", action]
        pairs = dict(zip(argv[4::2], argv[5::2]))
        assert pairs["--session"] == "exp1" and pairs["--app"] == "notebook"
        assert pairs["--notebook-dir"] == "~/it's here" and pairs["--rc"] == "~/.zshrc"
        assert pairs["--local-port"] == "18888" and pairs["--remote-port"] == "19999"
        assert pairs["--timeout"] == "45" and pairs["-o"] == "ServerAliveInterval=20"
        assert pairs["-J"] == "gw.example.org"
        assert pairs["-F"] == str(tmp_path / "my_ssh_config")  # resolved: cron starts elsewhere
        assert pairs["-i"] == str(tmp_path / "keys/id_ed25519")
        assert pairs["--state-dir"] == str(tmp_path / "st")
        # what is printed is a valid nbtunnel command line
        parsed = nbtunnel.build_parser().parse_args([a for a in argv[2:] if a not in ("--ensure", "--watch")])
        assert parsed.session == "exp1" and parsed.ssh_config == str(tmp_path / "my_ssh_config")


@pytest.mark.noroot
def test_print_service_fills_in_the_recorded_session(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    nbtunnel.save_record(str(state), dict(host="hpc", session="nbtunnel", local_port=34567, manager="screen",
                                          app="server", ssh_options=["-F", "/etc/x config", "-J", "gw"],
                                          url="http://127.0.0.1:34567/?token=abc"))
    proc = run_cli("--print-service", "launchd", "--state-dir", str(state), state=tmp_path)  # HOST: the record
    assert proc.returncode == 0, proc.stderr
    argv = plistlib.loads(proc.stdout.encode())["ProgramArguments"]
    assert argv[2] == "hpc"
    assert argv[argv.index("--local-port") + 1] == "34567"
    assert argv[argv.index("--manager") + 1] == "screen" and argv[argv.index("--app") + 1] == "server"
    assert argv[argv.index("-F") + 1] == "/etc/x config" and argv[argv.index("-J") + 1] == "gw"


@pytest.mark.noroot
@pytest.mark.parametrize("host", ["-oProxyCommand=touch /tmp/nbt-svc-PWNED", "a b", "$(touch /tmp/nbt-svc-PWNED)"])
def test_print_service_refuses_hostile_hosts(tmp_path, host):
    proc = run_cli("--print-service", "cron", "--state-dir", str(tmp_path), "--", host, state=tmp_path)
    assert proc.returncode == 2 and "invalid HOST" in proc.stderr and proc.stdout == ""


@pytest.mark.noroot
def test_print_nginx_needs_a_port(tmp_path):
    proc = run_cli("hpc", "--print-nginx", "--state-dir", str(tmp_path), state=tmp_path)
    assert proc.returncode == 2 and "start it first" in proc.stderr and proc.stdout == ""
    proc = run_cli("hpc", "--print-nginx", "--local-port", "4000", "--state-dir", str(tmp_path), state=tmp_path)
    assert proc.returncode == 0 and "proxy_pass http://127.0.0.1:4000;" in proc.stdout
    proc = run_cli("hpc", "--print-nginx", "--local-port", "4000", "--nginx-listen", "80; root /",
                   "--state-dir", str(tmp_path), state=tmp_path)
    assert proc.returncode == 2 and "--nginx-listen" in proc.stderr and proc.stdout == ""


# For real ##########################################################################


def test_cron_line_runs_in_crons_environment(nbt, remote, tmp_path):
    port = free_local_port()
    proc = nbt.run(remote.alias, "--print-service", "cron", "--local-port", str(port))
    assert proc.returncode == 0, proc.stderr
    command = crontab_command(proc.stdout.splitlines()[-1])
    home = tmp_path / "home"
    home.mkdir()
    cron_env = ["env", "-i", "PATH=" + CRON_PATH, f"HOME={home}", "LOGNAME=root", "SHELL=/bin/sh"]
    first = subprocess.run([*cron_env, "sh", "-c", command], capture_output=True, text=True,
                           timeout=180, stdin=subprocess.DEVNULL)
    assert first.returncode == 0, first.stderr
    rows = nbt.status()
    assert len(rows) == 1 and rows[0]["server"] == "running" and rows[0]["tunnel"] == "up"
    assert rows[0]["local_port"] == port
    url = rows[0]["url"]
    auth = {"Authorization": f"token {token_of(url)}"}
    assert http_get(f"http://127.0.0.1:{port}/api/status", headers=auth)[0] == 200
    again = subprocess.run([*cron_env, "sh", "-c", command], capture_output=True, text=True,
                           timeout=180, stdin=subprocess.DEVNULL)
    assert again.returncode == 0 and again.stdout == "" and again.stderr == ""  # silent when all is well


@pytest.mark.parametrize("kind", ["systemd", "launchd"])
def test_unit_command_keeps_the_tunnel_up(nbt, remote, kind):
    port = free_local_port()
    proc = nbt.run(remote.alias, "--print-service", kind, "--local-port", str(port))
    assert proc.returncode == 0, proc.stderr
    if kind == "systemd":
        argv = systemd_exec_argv(unit_sections(proc.stdout)["Service"]["ExecStart"][0])
    else:
        argv = plistlib.loads(proc.stdout.encode())["ProgramArguments"]
    env = {"PATH": "/usr/bin:/bin", "HOME": str(nbt.tmp)}
    watch = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    nbt.popens.append(watch)
    wait_until(lambda: local_port_open(port), 120, message="--watch opened the tunnel")
    rows = wait_until(lambda: [r for r in nbt.status() if r["server"] == "running"], 60)
    assert http_get(f"http://127.0.0.1:{port}/api/status",
                    headers={"Authorization": f"token {token_of(rows[0]['url'])}"})[0] == 200
    watch.send_signal(signal.SIGINT)  # what systemd's KillSignal=SIGINT sends on stop
    watch.wait(timeout=60)
    wait_until(lambda: not local_port_open(port), 30, message="tunnel closed after SIGINT")


NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class Nginx:
    """A real nginx with a config of the test's own around the printed server block."""

    def __init__(self, block: str) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="nbt-nginx-"))
        (self.dir / "nbtunnel.conf").write_text(block)
        temp = "\n".join(f"    {kind}_temp_path {self.dir / kind};"
                         for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        (self.dir / "nginx.conf").write_text(f"""\
daemon off;
master_process off;
pid {self.dir / 'nginx.pid'};
error_log {self.dir / 'error.log'} info;
events {{ worker_connections 128; }}
http {{
    access_log {self.dir / 'access.log'};
{temp}
    include {self.dir / 'nbtunnel.conf'};
}}
""")
        test = subprocess.run([NGINX, "-t", "-c", str(self.dir / "nginx.conf"), "-p", str(self.dir)],
                              capture_output=True, text=True)
        assert test.returncode == 0, test.stderr
        self.proc = subprocess.Popen([NGINX, "-c", str(self.dir / "nginx.conf"), "-p", str(self.dir)],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=15)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def nginx_front(nbt, remote):
    """A started session and a real nginx in front of it, configured by --print-nginx."""
    if not NGINX:
        pytest.skip("nginx is not installed (tests/run installs nginx-light)")
    info = start(nbt)
    listen = free_local_port()
    proc = nbt.run(remote.alias, "--print-nginx", "--nginx-listen", f"127.0.0.1:{listen}")
    assert proc.returncode == 0, proc.stderr
    assert f"proxy_pass http://127.0.0.1:{info['local_port']};" in proc.stdout  # the recorded port
    assert f"127.0.0.1:{listen}/lab?token=" in proc.stderr  # tells where to go
    server = Nginx(proc.stdout)
    try:
        wait_until(lambda: local_port_open(listen) or server.proc.poll() is not None, 20, message="nginx listening")
        assert server.proc.poll() is None, server.proc.stderr.read()
        yield info, listen
    finally:
        server.stop()


def test_nginx_in_front_of_the_tunnel_runs_a_kernel(nginx_front):
    info, listen = nginx_front
    base = f"http://127.0.0.1:{listen}"
    token = info["token"]
    assert http_get(f"{base}/api/status", headers={"Authorization": f"token {token}"})[0] == 200
    assert http_get(f"{base}/api/status")[0] == 403  # token auth is still on
    assert http_get(f"{base}/lab?token={token}")[0] == 200
    # and so is Jupyter's Host check (DNS rebinding): nginx passes the Host it was given
    rebound = {"Authorization": f"token {token}", "Host": f"evil.example.com:{listen}"}
    assert http_get(f"{base}/api/status", headers=rebound)[0] == 403
    # the kernel's websocket through nginx (websocket-client sends Origin: http://127.0.0.1:LISTEN)
    assert run_kernel_code(base, token, "1+1") == "2"
    import websocket

    from helpers import http_request

    # Jupyter's origin check still works through nginx. A token in the request skips it (a
    # foreign site cannot know the token), so log in as a browser does, with the cookie.
    cookie = login_cookie(f"{base}/lab?token={token}")
    status, body = http_request("POST", f"{base}/api/kernels", headers={
        "Authorization": f"token {token}", "Content-Type": "application/json"}, body=b"{}")
    kernel = json.loads(body)["id"]
    channels = f"ws://127.0.0.1:{listen}/api/kernels/{kernel}/channels"
    try:
        ws = websocket.create_connection(channels, cookie=cookie, timeout=20)  # Origin: this site
        ws.close()
        with pytest.raises(websocket.WebSocketBadStatusException) as refused:
            websocket.create_connection(channels, cookie=cookie, origin="http://evil.example.com", timeout=20)
        assert refused.value.status_code == 403
    finally:
        http_request("DELETE", f"{base}/api/kernels/{kernel}", headers={"Authorization": f"token {token}"})


def login_cookie(url: str) -> str:
    """Open URL (with ?token=) as a browser does; return the Cookie header it was given."""
    import http.cookiejar
    import urllib.request

    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                         urllib.request.HTTPCookieProcessor(jar))
    with opener.open(url, timeout=30) as response:
        assert response.status == 200
    cookies = "; ".join(f"{c.name}={c.value}" for c in jar)
    assert cookies, "Jupyter set no login cookie"
    return cookies


def chromium_dom(url: str) -> str:
    profile = tempfile.mkdtemp(prefix="nbt-chromium-")
    try:
        proc = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--no-first-run", f"--user-data-dir={profile}", "--virtual-time-budget=20000",
             "--dump-dom", url],
            capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    return proc.stdout


def rendered_lab(dom: str, filename: str) -> bool:
    """True when JupyterLab's JavaScript built its shell and its file browser listed FILENAME
    (fetched from the server's contents API): neither is in the static page."""
    shell = re.search(r'<div[^>]* class="[^"]*\bjp-LabShell\b', dom)
    listed = re.search(r'class="[^"]*\bjp-DirListing-itemText\b[^"]*"[^>]*>(<span>)?' + re.escape(filename), dom)
    return bool(shell and listed)


def lab_dom(nbt, remote, url: str) -> str:
    """Chromium's rendered DOM of URL, after a marker file was put in the remote's notebook dir."""
    name = f"nbt-rendered-{os.getpid()}.txt"
    remote.run(["touch", str(remote.home / name)], check=True)
    static = http_get(url)[1]
    assert not rendered_lab(static, name)  # the check needs the app's JavaScript to have run
    dom = chromium_dom(url)
    assert rendered_lab(dom, name), dom[:3000]
    assert not rendered_lab(dom, "nbt-no-such-file.txt")
    return dom


@pytest.mark.skipif(not CHROMIUM, reason="chromium is not installed (tests/run installs it)")
def test_chromium_renders_jupyterlab_through_the_tunnel(nbt, remote):
    info = start(nbt)
    lab_dom(nbt, remote, info["url"])


@pytest.mark.skipif(not CHROMIUM, reason="chromium is not installed (tests/run installs it)")
def test_chromium_renders_jupyterlab_through_nginx(nbt, remote, nginx_front):
    info, listen = nginx_front
    lab_dom(nbt, remote, f"http://127.0.0.1:{listen}/lab?token={info['token']}")
