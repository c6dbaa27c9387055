"""The remote side of nbtunnel.py, unit by unit and as the remote host gets it.

The functions of the "Remote side" section are called directly here, in this process,
with a temporary HOME and real processes (sleep, a stand-in HTTP server, process groups,
a second user).  Then the sliced program runs alone, exactly as sent on ssh's stdin,
under this machine's python3 -I and under a real Python 3.6; and one end-to-end test
makes the test remote user's python3 a 3.6 for a real start, API call and terminate.
"""

from __future__ import annotations

import ast
import base64
import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

import nbtunnel
from helpers import api_status, pid_alive, wait_until

pytestmark = pytest.mark.fast  # in-process and quick: part of `bash tests/run -m fast`

REPO = Path(__file__).resolve().parent.parent
FAKE_JUPYTER = Path(__file__).resolve().parent / "fake_jupyter.py"
PY36_PREFIX = Path("/opt/nbtunnel-test/python3.6")  # made by tests/run from pyenv's 3.6
PY36_WRAPPER = PY36_PREFIX / "nbtunnel-bin" / "python3"


def pyenv_python36() -> tuple[str, dict] | None:
    """(pyenv's python3.6, the environment it needs) or None when pyenv has no 3.6."""
    root = os.environ.get("PYENV_ROOT")
    if not root:
        try:
            root = subprocess.run(["pyenv", "root"], capture_output=True, text=True,
                                  timeout=30).stdout.strip()
        except OSError:
            root = ""
    root = root or os.path.expanduser("~/.pyenv")
    found = sorted(glob.glob(os.path.join(root, "versions", "3.6.*", "bin", "python3.6")))
    if not found:
        return None
    prefix = os.path.dirname(os.path.dirname(found[-1]))
    return found[-1], dict(os.environ, LD_LIBRARY_PATH=os.path.join(prefix, "lib"))


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A private HOME for the remote functions (they find their state through it)."""
    path = tmp_path / "home"
    path.mkdir()
    monkeypatch.setenv("HOME", str(path))
    for key in ("XDG_STATE_HOME", "XDG_DATA_HOME", "XDG_RUNTIME_DIR", "JUPYTER_RUNTIME_DIR",
                "JUPYTER_DATA_DIR"):
        monkeypatch.delenv(key, raising=False)
    return path


@pytest.fixture
def procs():
    """Processes a test starts; killed (their whole group) and reaped at the end."""
    started: list[subprocess.Popen] = []
    yield started
    for p in started:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL) if os.getpgid(p.pid) == p.pid else p.kill()
            except OSError:
                pass
            p.wait(timeout=10)


def spawn(procs, argv: list[str], **kwargs) -> subprocess.Popen:
    """Start ARGV and wait until it has really exec'd (its cmdline is ARGV)."""
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, **kwargs)
    procs.append(p)
    want = "\0".join(argv[1:]).encode()
    wait_until(lambda: want in Path(f"/proc/{p.pid}/cmdline").read_bytes(), 20, message="exec")
    return p


def start_fake(procs, runtime: Path, status: int = 200) -> subprocess.Popen:
    """A stand-in Jupyter (tests/fake_jupyter.py) answering STATUS, once its runtime file exists."""
    runtime.mkdir(parents=True, exist_ok=True)
    p = subprocess.Popen([sys.executable, str(FAKE_JUPYTER), str(runtime), str(status), "jupyter"],
                         stdin=subprocess.DEVNULL)
    procs.append(p)
    wait_until(lambda: (runtime / f"jpserver-{p.pid}.json").exists(), 20, message="fake server")
    return p


def record(session: str, pid: int, runtime_file: str | None = None) -> None:
    """Write the remote state of SESSION as r_start_server does after a launch."""
    paths = nbtunnel.r_files(session)
    nbtunnel.r_write_json(paths["state"], dict(
        session=session, pid=pid, pid_start=nbtunnel.r_pid_start(pid), runtime_file=runtime_file,
        log=paths["log"], manager="tmux", app="lab", started=time.time()))


def requests_seen(runtime: Path) -> list[str]:
    path = runtime / "requests.log"
    return path.read_text().splitlines() if path.exists() else []


# The section itself ##########################################################


def test_section_is_python_36_and_self_contained():
    src = nbtunnel.remote_source()
    tree = ast.parse(src, feature_version=(3, 6))
    defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    assert defined and all(n.startswith(("r_", "Remote")) for n in defined)
    assert nbtunnel.R_RESULT_MARK == nbtunnel.RESULT_MARK
    # No program inside a string: the only strings of several lines are docstrings.
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and ast.get_docstring(n)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and id(node) not in docstrings:
            assert node.value.count("\n") < 3, node.value


def test_slice_keeps_the_line_numbers_of_the_file():
    text = (REPO / "nbtunnel.py").read_text().splitlines()
    src = nbtunnel.remote_source().splitlines()
    assert src[0] == "" and len(src) < len(text)
    first = next(i for i, line in enumerate(src) if line)
    assert text[first].startswith("# Remote side: begin")
    assert src[first:] == text[first:len(src)]
    code = compile(nbtunnel.remote_source(), "nbtunnel.py", "exec")
    funcs = {c.co_name: c.co_firstlineno for c in code.co_consts if hasattr(c, "co_name")}
    assert funcs["r_probe"] == nbtunnel.r_probe.__code__.co_firstlineno


def test_slice_refuses_missing_markers():
    with pytest.raises(ValueError):
        nbtunnel.r_slice("x = 1\n")


def run_sliced(argv: list[str], home: Path, stdin: bytes, env: dict | None = None):
    env = dict(env or os.environ, HOME=str(home))
    for key in ("XDG_STATE_HOME", "XDG_DATA_HOME", "XDG_RUNTIME_DIR"):
        env.pop(key, None)
    return subprocess.run(argv, input=stdin, capture_output=True, env=env, timeout=60,
                          cwd=str(home))


def test_sliced_program_runs_alone_under_python_isolated(home):
    program = nbtunnel.remote_program("status", {"sessions": ["nbtunnel", "other"]})
    # Sent on stdin once per command over the shared connection: small, not minimal (the
    # Unix-socket and batch-job functions brought it from 15.2 to about 21 kB; the manager
    # strategies, the retry of a start that met an exiting tmux server, the second
    # scheduler's XML state and remembering a session ended on purpose to about 26 kB; a
    # batch job's choice and check of its node's address to about 27.8 kB; login nodes
    # behind one name, sessions only the remote records and the relay of a scheduler's
    # warning signal to about 31 kB).
    assert len(program) < 32000 and b"\n" in program and program.count(b"\n") == 4
    r = run_sliced(["python3", "-I", "-"], home, program)
    assert r.returncode == 0, r.stderr
    result = nbtunnel.parse_result("h", r.stdout.decode(), r.stderr.decode(), r.returncode)
    assert result == [dict(session="nbtunnel", server="stopped", ended="none"),
                      dict(session="other", server="stopped", ended="none")]
    state = home / ".local/state/nbtunnel"
    assert state.is_dir() and state.stat().st_mode & 0o777 == 0o700


def test_remote_traceback_names_real_lines_of_nbtunnel_py(home):
    program = nbtunnel.remote_program("status", {})  # no "sessions": a KeyError inside
    r = run_sliced(["python3", "-I", "-"], home, program)
    line = next(x for x in r.stdout.decode().splitlines() if x.startswith(nbtunnel.RESULT_MARK))
    answer = json.loads(line[len(nbtunnel.RESULT_MARK):])
    assert (answer["ok"], answer["kind"]) == (False, "internal") and "KeyError" in answer["message"]
    where = re.findall(r'File "nbtunnel.py", line (\d+), in r_op_status', answer["log_tail"])
    assert where, answer["log_tail"]
    text = (REPO / "nbtunnel.py").read_text().splitlines()
    assert 'p["sessions"]' in text[int(where[0]) - 1]


def test_sliced_program_runs_under_python_36(home):
    py36 = pyenv_python36()
    if py36 is None:
        pytest.skip("pyenv has no Python 3.6 here (pyenv install 3.6.15 gives one)")
    exe, env = py36
    assert subprocess.run([exe, "-c", "import sys; assert sys.version_info[:2] == (3, 6)"],
                          env=env).returncode == 0
    r = run_sliced([exe, "-I", "-"], home, nbtunnel.remote_program("status", {"sessions": ["s"]}),
                   env)
    assert r.returncode == 0, r.stderr
    assert nbtunnel.parse_result("h", r.stdout.decode(), r.stderr.decode(), 0) == [
        dict(session="s", server="stopped", ended="none")]


def test_launcher_bootstrap_becomes_the_command(home, procs, tmp_path):
    """The manager's launcher argv, run as tmux would: it records its pid and execs argv."""
    for exe, env in [(sys.executable, None)] + ([pyenv_python36()] if pyenv_python36() else []):
        paths = nbtunnel.r_files("l")
        Path(paths["log"]).unlink(missing_ok=True)
        work = tmp_path / "work dir"
        work.mkdir(exist_ok=True)
        nbtunnel.r_write_json(paths["spec"], dict(
            argv=["/bin/sh", "-c", 'echo "in $(pwd) as $NBT_X"; exec sleep 60'],
            env=dict(PATH="/usr/bin:/bin", NBT_X="x y"), cwd=str(work), log=paths["log"],
            pidfile=paths["pid"], source=nbtunnel.remote_source()))
        desc = nbtunnel.Tmux().describe("l")
        assert desc["start"][-1].endswith(nbtunnel.shell_line(["-c", nbtunnel.R_LAUNCH_BOOT,
                                                               "@LAUNCH@"]))
        launch = base64.b64encode(paths["spec"].encode()).decode()
        p = subprocess.Popen([exe, "-c", nbtunnel.R_LAUNCH_BOOT, launch], env=env,
                             stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        procs.append(p)
        assert b"Jupyter runs in this session" in p.stdout.readline()
        log = Path(paths["log"])
        wait_until(lambda: "in " in log.read_text(), 20, message="launched")  # noqa: B023
        assert log.read_text() == f"in {work} as x y\n"
        assert nbtunnel.r_read_pidfile(paths["pid"]) == (p.pid, nbtunnel.r_pid_start(p.pid))
        assert not os.path.exists(paths["spec"])
        assert Path(f"/proc/{p.pid}/cmdline").read_bytes().startswith(b"sleep\0")
        p.kill()
        p.wait()


# Processes and files ##########################################################


def test_pid_checks_with_real_processes(procs):
    sleeper = spawn(procs, ["sleep", "60"])
    looks = spawn(procs, [sys.executable, "-c", "import time; time.sleep(60)", "jupyter"])
    assert nbtunnel.r_pid_alive(sleeper.pid) and nbtunnel.r_pid_alive(looks.pid)
    assert not nbtunnel.r_pid_is_jupyter(sleeper.pid)
    assert nbtunnel.r_pid_is_jupyter(looks.pid)
    assert not nbtunnel.r_pid_alive(None) and not nbtunnel.r_pid_alive(0)
    sleeper.kill()  # not reaped yet: a zombie, which is dead
    wait_until(lambda: not nbtunnel.r_pid_alive(sleeper.pid), 20, message="zombie is dead")
    sleeper.wait()
    assert not nbtunnel.r_pid_alive(sleeper.pid)
    assert nbtunnel.r_wait_dead(sleeper.pid, 0.1) and not nbtunnel.r_wait_dead(looks.pid, 0.3)


def test_free_port_is_free():
    port = nbtunnel.r_free_port()
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
    finally:
        s.close()


def test_runtime_file_lookup_skips_stale_files(home):
    a, b = home / "a", home / "b"
    a.mkdir()
    b.mkdir()
    stale = a / "jpserver-4242.json"
    stale.write_text(json.dumps(dict(port=1111, pid=4242)))
    os.utime(stale, (time.time() - 600, time.time() - 600))
    (a / "nbserver-4242.json").write_text(json.dumps(dict(port=2222, pid=999)))  # another pid
    (b / "jpserver-4242.json").write_text("{damaged")
    assert nbtunnel.r_find_runtime_file(4242, [str(a), str(b)], time.time() - 60) == (None, None)
    good = b / "nbserver-4242.json"
    good.write_text(json.dumps(dict(port=3333, pid=4242, token="t")))
    path, info = nbtunnel.r_find_runtime_file(4242, [str(a), str(b)], time.time() - 60)
    assert path == str(good) and info["port"] == 3333
    assert nbtunnel.r_find_runtime_file(4242, [str(a)], 0)[1]["port"] == 1111  # old but allowed


def test_lock_waits_then_gives_up(home):
    path = nbtunnel.r_files("s")["lock"]
    hold = ("import fcntl,os,sys,time;fd=os.open(sys.argv[1],os.O_RDWR|os.O_CREAT);"
            "fcntl.flock(fd,fcntl.LOCK_EX);print(1,flush=True);time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", hold, path], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"1"
        t0 = time.monotonic()
        with pytest.raises(nbtunnel.RemoteFail) as e, nbtunnel.RemoteLock(path, 0.5):
            pass
        assert e.value.kind == "locked" and time.monotonic() - t0 >= 0.5
    finally:
        holder.kill()
        holder.wait()
    with nbtunnel.RemoteLock(path, 5):
        pass


def test_write_json_is_private_and_atomic(home):
    path = nbtunnel.r_files("s")["state"]
    nbtunnel.r_write_json(path, {"a": 1})
    assert nbtunnel.r_read_json(path) == {"a": 1}
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert sorted(os.listdir(os.path.dirname(path))) == ["s.json"]
    Path(path).write_text("{broken")
    assert nbtunnel.r_read_json(path) is None


def test_home_path():
    home = os.path.expanduser("~")
    assert nbtunnel.r_home_path("~") == home
    assert nbtunnel.r_home_path("~/x") == home + "/x"
    assert nbtunnel.r_home_path("work") == home + "/work"
    assert nbtunnel.r_home_path("/abs") == "/abs"


@pytest.fixture(scope="module")
def sh_user():
    """A real second user whose login shell is /bin/sh, removed at the end."""
    if os.geteuid() != 0:
        pytest.skip("needs root to add a user")
    name = f"nbtr{os.getpid()}"
    top = Path(tempfile.mkdtemp(prefix=f"{name}-"))  # /tmp/...: reachable by that user
    top.chmod(0o755)
    home = top / name
    subprocess.run(["userdel", "-r", name], capture_output=True)
    subprocess.run(["useradd", "-m", "-d", str(home), "-s", "/bin/sh", name], check=True)
    try:
        import pwd

        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["pkill", "-KILL", "-u", name], capture_output=True)
        subprocess.run(["userdel", "-r", name], capture_output=True)
        shutil.rmtree(top, ignore_errors=True)


def run_as(user, code: str, *args: str) -> subprocess.CompletedProcess:
    """Run CODE in /usr/bin/python3 as USER, with nbtunnel importable, in USER's HOME."""
    env = dict(PATH="/usr/bin:/bin", HOME=user.pw_dir, NBT_REPO=str(REPO), LANG="C.UTF-8")
    boot = "import os,sys;sys.path.insert(0,os.environ['NBT_REPO']);import nbtunnel;"
    return subprocess.run(["/usr/bin/python3", "-c", boot + code, *args], user=user.pw_uid,
                          group=user.pw_gid, env=env, capture_output=True, text=True,
                          timeout=60, cwd="/")


def test_login_env_with_bin_sh(sh_user):
    (Path(sh_user.pw_dir) / ".profile").write_text("NBT_FROM_PROFILE=yes; export NBT_FROM_PROFILE\n"
                                                  "PROFILE_SEEN=yes; export PROFILE_SEEN\n")
    steps = [dict(vars={"NBT_A": "a 'b' $(c)"}, sh='export STEP_SAW="$NBT_A"', fish="", csh=""),
             dict(vars={"NBT_P": "sub/dir"}, paths=["NBT_P"], sh='export STEP_PATH="$NBT_P"',
                  fish="", csh="")]
    r = run_as(sh_user, "import json,sys;print(json.dumps(nbtunnel.r_login_env("
                        "json.loads(sys.argv[1]),20)))", json.dumps(steps))
    assert r.returncode == 0, r.stderr
    shell, env = json.loads(r.stdout)
    assert shell == "/bin/sh"
    assert env["PROFILE_SEEN"] == "yes" and env["STEP_SAW"] == "a 'b' $(c)"
    assert env["STEP_PATH"] == sh_user.pw_dir + "/sub/dir"
    assert not [k for k in env if k.startswith("NBT_")]
    failing = [dict(vars={}, sh='echo "nbtunnel: step failed" >&2; exit 1', fish="", csh="")]
    r = run_as(sh_user, "import json,sys\ntry:\n nbtunnel.r_login_env(json.loads(sys.argv[1]),20)"
                        "\nexcept nbtunnel.RemoteFail as e:\n print(json.dumps([e.kind,str(e),"
                        "e.extra]))", json.dumps(failing))
    kind, message, extra = json.loads(r.stdout)
    assert kind == "env" and "/bin/sh failed" in message and "step failed" in extra["log_tail"]


# The readiness wait ###########################################################


def test_wait_ready_answers_with_the_server(home, procs):
    runtime = home / ".local/share/jupyter/runtime"
    p = start_fake(procs, runtime, 200)
    record("s", p.pid, str(runtime / f"jpserver-{p.pid}.json"))
    info = nbtunnel.r_wait_ready("s", p.pid, time.time() + 20, "/nonexistent")
    assert info["pid"] == p.pid and info["token"] == "tok"
    assert requests_seen(runtime) == ["GET /api/status token tok"]


def test_wait_ready_reports_a_server_that_went_away(home, procs):
    """A probe that finds no server is said at once, not taken for a port taken at the deadline."""
    runtime = home / ".local/share/jupyter/runtime"
    p = start_fake(procs, runtime, 200)
    record("s", p.pid, str(runtime / f"jpserver-{p.pid}.json"))
    Path(nbtunnel.r_files("s")["log"]).write_text("Traceback: it broke\n")
    p.kill()
    p.wait()
    t0 = time.time()
    with pytest.raises(nbtunnel.RemoteFail) as e:
        nbtunnel.r_wait_ready("s", p.pid, time.time() + 30, nbtunnel.r_files("s")["log"])
    assert time.time() - t0 < 5
    assert e.value.kind == "launch" and "went away" in str(e.value) and "has ended" in str(e.value)
    assert e.value.extra["log_tail"] == "Traceback: it broke"

    q = start_fake(procs, runtime, 200)  # alive, but its runtime file disappears
    record("s", q.pid, str(runtime / f"jpserver-{q.pid}.json"))
    (runtime / f"jpserver-{q.pid}.json").unlink()
    with pytest.raises(nbtunnel.RemoteFail) as e:
        nbtunnel.r_wait_ready("s", q.pid, time.time() + 30, "/nonexistent")
    assert e.value.kind == "launch" and "runtime file" in str(e.value)


def test_wait_ready_reports_what_the_server_answered(home, procs):
    runtime = home / ".local/share/jupyter/runtime"
    p = start_fake(procs, runtime, 403)
    record("s", p.pid, str(runtime / f"jpserver-{p.pid}.json"))
    with pytest.raises(nbtunnel.RemoteFail) as e:
        nbtunnel.r_wait_ready("s", p.pid, time.time() + 1, "/nonexistent")
    assert e.value.kind == "timeout" and "403" in str(e.value)


def test_stop_server_uses_the_api_then_signals(home, procs):
    runtime = home / ".local/share/jupyter/runtime"
    p = start_fake(procs, runtime, 200)
    record("s", p.pid, str(runtime / f"jpserver-{p.pid}.json"))
    info = nbtunnel.r_probe("s")
    assert info and nbtunnel.r_busy_kernels(info) == []
    assert nbtunnel.r_stop_server(info, 10) == "api"
    assert "POST /api/shutdown token tok" in requests_seen(runtime)
    sleeper = spawn(procs, ["sleep", "60"])
    assert nbtunnel.r_kill(sleeper.pid, nbtunnel.r_pid_start(sleeper.pid)) == "sigterm"


# Pid-file managers ############################################################


def test_pidfile_manager_alive_and_stop_whole_group(home, procs):
    # A launcher that leads its own session (as nohup's start runs it) with a child.
    code = "import subprocess,time;subprocess.Popen(['sleep','60']);time.sleep(60)"
    leader = spawn(procs, [sys.executable, "-c", code, "jupyter"], start_new_session=True)
    pidfile = nbtunnel.r_files("n")["pid"]
    assert not nbtunnel.r_pidfile_alive(pidfile)  # no pid file yet
    nbtunnel.r_write_pidfile(pidfile, leader.pid)
    assert nbtunnel.r_pidfile_alive(pidfile)
    child = wait_until(lambda: [int(x) for x in subprocess.run(
        ["pgrep", "-g", str(leader.pid), "-x", "sleep"], capture_output=True, text=True
    ).stdout.split()], 10, message="child started")[0]
    desc = dict(name="p", alive=[nbtunnel.R_PIDFILE_ALIVE], stop=[nbtunnel.R_PIDFILE_STOP])
    assert nbtunnel.r_run_manager(desc, "alive", "n", None) == (0, "", "")
    assert nbtunnel.r_run_manager(desc, "stop", "n", None) == (0, "", "")
    assert not nbtunnel.r_pidfile_alive(pidfile)
    wait_until(lambda: not pid_alive(child), 15, message="the child of the group ended too")
    assert nbtunnel.r_run_manager(desc, "alive", "n", None) == (1, "", "")
    # A pid file whose pid was reused by another process (it started at another time) is
    # not alive, and stop leaves that process be; nor does a process of another user count.
    sleeper = spawn(procs, ["sleep", "60"])
    Path(pidfile).write_text("%d %d\n" % (sleeper.pid, nbtunnel.r_pid_start(sleeper.pid) - 1))
    assert not nbtunnel.r_pidfile_alive(pidfile) and nbtunnel.r_pidfile_stop(pidfile)
    assert pid_alive(sleeper.pid)
    nbtunnel.r_write_pidfile(pidfile, sleeper.pid)
    assert nbtunnel.r_pidfile_alive(pidfile)
    other = spawn(procs, ["sleep", "60"], user=65534, group=65534)
    nbtunnel.r_write_pidfile(pidfile, other.pid)
    assert not nbtunnel.r_pidfile_alive(pidfile) and nbtunnel.r_pidfile_stop(pidfile)
    assert pid_alive(other.pid)


def free_names(src: str) -> set[str]:
    """Names that SRC (one function) reads but neither binds, imports nor gets from builtins."""
    import builtins

    tree = ast.parse(src, feature_version=(3, 6))
    bound = set(dir(builtins))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            bound |= {a.asname or a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.FunctionDef):
            bound |= {node.name} | {a.arg for a in node.args.args}
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            bound.add(node.id)
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} - bound


def test_remote_call_runs_a_plugin_function_alone(tmp_path):
    def probe(word, code):
        """A plugin's function, as the remote gets it."""
        import sys

        sys.stdout.write(word)
        return int(code)

    argv = nbtunnel.remote_call(probe, "it's $HOME", "3")
    assert argv[:2] == ["@PYTHON@", "-c"] and argv[3:] == ["it's $HOME", "3"]
    assert free_names(argv[2]) == set()
    r = subprocess.run([sys.executable, "-I"] + argv[1:], capture_output=True, text=True, cwd=tmp_path)
    assert (r.returncode, r.stdout, r.stderr) == (3, "it's $HOME", "")


@pytest.fixture
def screens(tmp_path, monkeypatch):
    """A screen socket directory of the test's own; every session in it is quit at the end."""
    sockets = tmp_path / "screens"
    sockets.mkdir(mode=0o700)
    monkeypatch.setenv("SCREENDIR", str(sockets))
    yield sockets
    subprocess.run(["screen", "-wipe"], capture_output=True)
    for name in os.listdir(sockets):
        subprocess.run(["screen", "-S", name, "-X", "quit"], capture_output=True)


@pytest.mark.skipif(not shutil.which("screen"), reason="needs GNU screen")
def test_screen_matches_the_session_name_exactly(home, screens):
    """screen -S takes a name as a prefix: "nb" must find neither "nbtunnel" nor "nb.x"."""
    nbtunnel.load_plugins(nbtunnel.plugin_files())
    screen = nbtunnel.get("manager", "screen").describe("nb")
    for key in ("alive", "stop", "log"):
        assert screen[key][:2] == ["@PYTHON@", "-c"] and free_names(screen[key][2]) == set()
    env = dict(os.environ)

    def ours():
        return nbtunnel.r_run_manager(screen, "alive", "nb", env)[0] == 0

    def names():
        out = subprocess.run(["screen", "-ls"], capture_output=True, text=True).stdout
        return sorted(re.findall(r"^\s+\d+\.(\S+)\s", out, re.M))

    for name in ("nbtunnel", "nb.x"):
        subprocess.run(["screen", "-dmS", name, "sleep", "600"], check=True)
    wait_until(lambda: names() == ["nb.x", "nbtunnel"], 10, message="screens up")
    assert not ours()
    assert nbtunnel.r_run_manager(screen, "stop", "nb", env)[0] == 1  # none of that name
    subprocess.run(["screen", "-dmS", "nb", "sh", "-c", "echo shown-in-nb; sleep 600"], check=True)
    wait_until(ours, 10, message="screen nb up")
    wait_until(lambda: "shown-in-nb" in nbtunnel.r_manager_log(screen, "nb", env), 10,
               message="the window of nb")
    if os.access(PY36_WRAPPER, os.X_OK):  # the same program under a real Python 3.6
        argv = [str(PY36_WRAPPER)] + screen["alive"][1:]
        assert subprocess.run(argv, capture_output=True, env=env).returncode == 0
    assert nbtunnel.r_run_manager(screen, "stop", "nb", env)[0] == 0
    wait_until(lambda: names() == ["nb.x", "nbtunnel"], 10, message="nb gone, the others left")
    assert not ours()


def test_pidfile_manager_class_and_nohup():
    nbtunnel.load_plugins(nbtunnel.plugin_files())
    nohup = nbtunnel.get("manager", "nohup")
    assert isinstance(nohup, nbtunnel.PidFileManager) and nohup.detach
    desc = nohup.describe("s")
    assert desc["alive"] == [nbtunnel.R_PIDFILE_ALIVE] and desc["stop"] == [nbtunnel.R_PIDFILE_STOP]
    assert desc["start"] == ["nohup", "@PYTHON@", "-c", nbtunnel.R_LAUNCH_BOOT, "@LAUNCH@"]
    assert nbtunnel.check_plugin(nohup) == "manager"
    assert len((REPO / "plugins" / "nohup.py").read_text().splitlines()) < 30
    for name in ("tmux", "screen", "nohup"):
        start = nbtunnel.get("manager", name).describe("s")["start"]
        assert "@LAUNCH@" in " ".join(start) and "%r" not in " ".join(start)


# A manager's shared server ####################################################


def unix_listener(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    sock.listen(4)
    return sock


def test_start_is_tried_again_once_the_shared_server_has_gone(home, tmp_path):
    """The first start fails while a server listens on the manager's socket; that server
    stops listening (and leaves its socket file, as tmux does) a moment later: the start
    is tried again after it has, and only then."""
    path, tries = tmp_path / "server.sock", tmp_path / "tries"
    listener = unix_listener(path)
    fail_once = (f"echo x >> {tries}; test $(wc -l < {tries}) -gt 1 || "
                 "{ echo 'server exited unexpectedly' >&2; exit 1; }")
    mgr = dict(name="m", start=["sh", "-c", fail_once], server=["echo", str(path)])
    timer = threading.Timer(0.5, listener.close)
    t0 = time.monotonic()
    timer.start()
    try:
        assert nbtunnel.r_manager_start(mgr, "s", None, "") == (0, "", "")
    finally:
        timer.join()
    assert tries.read_text() == "x\nx\n" and time.monotonic() - t0 >= 0.5 and path.exists()
    # A start that fails for good is tried three times at most.
    mgr["start"] = ["sh", "-c", f"echo x >> {tries}; echo no >&2; exit 1"]
    tries.unlink()
    assert nbtunnel.r_manager_start(mgr, "s", None, "") == (1, "", "no\n")
    assert tries.read_text() == "x\nx\nx\n"


def test_a_shared_server_that_stays_or_was_never_there_is_not_gone(tmp_path):
    path = tmp_path / "server.sock"
    mgr = dict(name="m", server=["echo", str(path)])
    assert not nbtunnel.r_server_gone(mgr, "s", None, 0.3)  # no socket file: no server
    with unix_listener(path):
        t0 = time.monotonic()
        assert not nbtunnel.r_server_gone(mgr, "s", None, 0.3)  # it stays
        assert time.monotonic() - t0 >= 0.3
    assert nbtunnel.r_server_gone(mgr, "s", None, 0.3)  # its file is left, no one listens
    assert not nbtunnel.r_server_gone(dict(name="screen", server=None), "s", None, 0.3)


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
@pytest.mark.parametrize("tmpdir", [None, "with space"])
def test_tmux_server_socket_is_the_one_tmux_uses(tmp_path, tmpdir):
    env = dict(os.environ, TMUX_TMPDIR=str(tmp_path / tmpdir)) if tmpdir else dict(os.environ)
    env.pop("TMUX", None)
    if tmpdir:
        (tmp_path / tmpdir).mkdir()
    argv = nbtunnel.Tmux().describe("s")["server"]
    ours = subprocess.run([sys.executable if w == "@PYTHON@" else w for w in argv], env=env,
                          capture_output=True, text=True, check=True).stdout.strip()
    tmux = ["tmux", "-f", "/dev/null"]
    label = ["-L", f"nbt-socket-{os.getpid()}"]  # a private server: same directory, own name
    subprocess.run([*tmux, *label, "new-session", "-d", "sleep 60"], env=env, check=True)
    try:
        theirs = subprocess.run([*tmux, *label, "display", "-p", "#{socket_path}"], env=env,
                                capture_output=True, text=True, check=True).stdout.strip()
    finally:
        subprocess.run([*tmux, *label, "kill-server"], env=env)
    Path(theirs).unlink(missing_ok=True)  # the server leaves its socket file
    assert theirs == os.path.join(os.path.dirname(ours), label[1])


# A real remote user whose python3 is 3.6 ######################################


@pytest.fixture
def remote_python36(remote):
    """Make the test remote user's python3 (for commands sent over ssh) a real 3.6, then undo it."""
    if pyenv_python36() is None:
        pytest.skip("pyenv has no Python 3.6 here (pyenv install 3.6.15 gives one)")
    if not os.access(PY36_WRAPPER, os.X_OK):
        pytest.fail(f"{PY36_WRAPPER} is missing: bash tests/run makes it from pyenv's 3.6")
    bashrc = remote.home / ".bashrc"
    before = bashrc.read_bytes() if bashrc.exists() else None
    # At the top: Debian's .bashrc returns early for non-interactive shells.
    line = f'PATH="{PY36_WRAPPER.parent}:$PATH"; export PATH\n'.encode()
    bashrc.write_bytes(line + (before or b""))
    os.chown(bashrc, remote.uid, remote.uid)
    try:
        yield
    finally:
        if before is None:
            bashrc.unlink()
        else:
            bashrc.write_bytes(before)


def test_start_api_terminate_with_python_36_on_the_remote(nbt, remote, remote_python36):
    seen = subprocess.run(["ssh", "-F", str(nbt.ssh_config), remote.alias, "python3 -V"],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert seen.stdout.strip().startswith("Python 3.6."), (seen.stdout, seen.stderr)
    proc = nbt.run(remote.alias, "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert api_status(info["url"]) == 200
    status = nbt.status()
    assert [s["server"] for s in status] == ["running"]
    assert nbt.run("--terminate").returncode == 0
    wait_until(lambda: not remote.pids(r"jupyter-lab|jupyter lab"), 20, message="jupyter ended")
    assert [r["ended"] for r in nbt.status()] == ["terminated"] and remote.tmux_sessions() == []


# Trust nothing not proven ####################################################


@pytest.fixture
def other_uid_process(procs):
    """A real process of another user (nobody), the way a co-user's process looks."""
    p = spawn(procs, ["sleep", "60"], user=65534, group=65534)
    assert Path(f"/proc/{p.pid}").stat().st_uid == 65534
    return p


def test_another_users_process_is_never_ours(home, procs, other_uid_process, sh_user):
    pid = other_uid_process.pid
    assert not nbtunnel.r_pid_is_ours(pid, nbtunnel.r_pid_start(pid))  # we are root: uid decides
    # As an unprivileged user, signal 0 to it fails with EPERM: that is not alive-and-ours.
    r = run_as(sh_user, "import sys;print(nbtunnel.r_pid_alive(int(sys.argv[1])),"
                        "nbtunnel.r_pid_is_ours(int(sys.argv[1]),None))", str(pid))
    assert r.stdout.split() == ["False", "False"], r.stderr
    # Recorded as a session's server (a reused pid), it is not reattached to.
    runtime = home / "rt"
    runtime.mkdir()
    (runtime / f"jpserver-{pid}.json").write_text(json.dumps(dict(port=1, pid=pid, token="t")))
    record("s", pid, str(runtime / f"jpserver-{pid}.json"))
    info, why = nbtunnel.r_server("s")
    assert info is None and "has ended" in why
    assert nbtunnel.r_kill(pid, nbtunnel.r_pid_start(pid)) is None and pid_alive(pid)


def test_a_reused_pid_has_another_start_time(home, procs):
    runtime = home / ".local/share/jupyter/runtime"
    p = start_fake(procs, runtime, 200)
    path = str(runtime / f"jpserver-{p.pid}.json")
    record("s", p.pid, path)
    assert nbtunnel.r_probe("s")["pid"] == p.pid
    state = nbtunnel.r_files("s")["state"]
    st = nbtunnel.r_read_json(state)
    nbtunnel.r_write_json(state, dict(st, pid_start=st["pid_start"] - 100))  # an older process
    assert nbtunnel.r_probe("s") is None
    assert nbtunnel.r_kill(p.pid, st["pid_start"] - 100) is None and pid_alive(p.pid)
    assert requests_seen(runtime) == []


def test_runtime_file_must_be_ours_and_name_the_pid(home, procs):
    runtime = home / ".local/share/jupyter/runtime"
    p = start_fake(procs, runtime, 200)
    path = runtime / f"jpserver-{p.pid}.json"
    record("s", p.pid, str(path))
    assert nbtunnel.r_probe("s")
    good = json.loads(path.read_text())
    path.write_text(json.dumps(dict(good, pid=p.pid + 1)))  # names another pid
    assert nbtunnel.r_probe("s") is None
    path.write_text(json.dumps(good))
    os.chown(path, 65534, 65534)  # planted by another user
    assert nbtunnel.r_probe("s") is None
    os.chown(path, 0, 0)
    planted = home / "planted.json"
    planted.write_text(json.dumps(good))
    path.unlink()
    path.symlink_to(planted)  # a symlink is not followed
    assert nbtunnel.r_probe("s") is None
    assert requests_seen(runtime) == []


def test_token_goes_only_to_the_port_the_server_holds(home, procs):
    """The recorded port is held by someone else (a squatter): no request carries the token."""
    runtime = home / ".local/share/jupyter/runtime"
    server = start_fake(procs, runtime, 200)
    squat_dir = home / "squatter"
    squatter = start_fake(procs, squat_dir, 200)
    path = runtime / f"jpserver-{server.pid}.json"
    good = json.loads(path.read_text())
    assert nbtunnel.r_port_held_by(good["port"], server.pid)
    squat_port = json.loads((squat_dir / f"jpserver-{squatter.pid}.json").read_text())["port"]
    assert not nbtunnel.r_port_held_by(squat_port, server.pid)
    path.write_text(json.dumps(dict(good, port=squat_port)))
    record("s", server.pid, str(path))
    assert nbtunnel.r_probe("s") is None
    assert nbtunnel.r_op_status(dict(sessions=["s"]))[0]["server"] == "stopped"
    with pytest.raises(nbtunnel.RemoteFail) as e:
        nbtunnel.r_wait_ready("s", server.pid, time.time() + 1, "/nonexistent")
    assert e.value.kind == "timeout" and "not held by it" in str(e.value)
    mgr = dict(name="tmux", alive=None, stop=None)
    stopped = nbtunnel.r_op_stop(dict(session="s", timeout=2, manager=mgr, managers={}))
    assert stopped["stopped"] is False
    assert requests_seen(squat_dir) == [] and requests_seen(runtime) == []
    path.write_text(json.dumps(good))  # the real port again: proven, and the server is used
    record("s", server.pid, str(path))
    assert nbtunnel.r_probe("s")["port"] == good["port"]


def state_path(home: Path) -> Path:
    return home / ".local" / "state" / "nbtunnel"


def test_state_dir_is_made_private(home):
    assert nbtunnel.r_state_dir() == str(state_path(home))
    assert state_path(home).stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize("plant", ["symlink", "group-writable", "other-writable", "not-ours",
                                   "file"])
def test_unsafe_state_dir_is_refused_never_repaired(home, plant):
    path = state_path(home)
    path.parent.mkdir(parents=True)
    elsewhere = home / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    if plant == "symlink":
        path.symlink_to(elsewhere)
    elif plant == "file":
        path.write_text("")
    else:
        path.mkdir()
        os.chmod(path, {"group-writable": 0o770, "other-writable": 0o703, "not-ours": 0o700}[plant])
        if plant == "not-ours":
            os.chown(path, 65534, 65534)
    before = os.lstat(path)
    with pytest.raises(nbtunnel.RemoteFail) as e:
        nbtunnel.r_files("s")
    assert e.value.kind == "unsafe-state" and str(path) in str(e.value)
    assert ("chmod 700" if "writable" in plant else "mv ") in str(e.value)
    after = os.lstat(path)
    assert (after.st_mode, after.st_uid) == (before.st_mode, before.st_uid)  # never chmod-ed
    assert os.listdir(elsewhere) == []
    # As the remote gets it: a result line with that kind, no traceback.
    program = nbtunnel.remote_program("status", {"sessions": ["s"]})
    r = run_sliced(["python3", "-I", "-"], home, program)
    line = next(x for x in r.stdout.decode().splitlines() if x.startswith(nbtunnel.RESULT_MARK))
    answer = json.loads(line[len(nbtunnel.RESULT_MARK):])
    assert (answer["ok"], answer["kind"]) == (False, "unsafe-state") and not r.stderr


def test_planted_symlinks_in_the_state_dir_are_not_followed(home):
    paths = nbtunnel.r_files("s")
    secret = home / "secret.json"
    secret.write_text(json.dumps(dict(pid=1, runtime_file="/etc/passwd")))
    for role in ("state", "pid", "lock", "log"):
        Path(paths[role]).symlink_to(secret)
    assert nbtunnel.r_read_json(paths["state"]) is None
    assert nbtunnel.r_read_pidfile(paths["pid"]) == (None, None)
    assert nbtunnel.r_tail(paths["log"]) == ""
    with pytest.raises(nbtunnel.RemoteFail) as e:
        with nbtunnel.RemoteLock(paths["lock"], 1):
            pass
    assert e.value.kind == "unsafe-state"
    nbtunnel.r_write_json(paths["state"], {"a": 1})  # replaces the link, leaves its target be
    assert not os.path.islink(paths["state"]) and nbtunnel.r_read_json(paths["state"]) == {"a": 1}
    assert json.loads(secret.read_text())["pid"] == 1
    assert os.stat(paths["state"]).st_mode & 0o777 == 0o600
