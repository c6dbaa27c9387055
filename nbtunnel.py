#!/usr/bin/env python3
"""nbtunnel: run Jupyter on a machine you reach over SSH and use it from this one.

    nbtunnel.py HOST                 start (or reattach to) Jupyter on HOST, tunnel it, print the URL
    nbtunnel.py [HOST] --status      one line per recorded session
    nbtunnel.py [HOST] --terminate   stop the server and the local tunnel
    nbtunnel.py [HOST] --ensure      for cron: repair what is missing, silent when all is well
    nbtunnel.py [HOST] --watch       stay in the foreground keeping server and tunnel healthy
    nbtunnel.py [HOST] --print-service cron|systemd|launchd   a unit that keeps it running
    nbtunnel.py [HOST] --print-nginx   an nginx server block in front of the tunnel

How it works: every step of one command shares one OpenSSH connection (a private
ControlMaster socket), so you authenticate at most once per command.  The remote
work is done by a small Python program sent on ssh's stdin (nothing is uploaded);
it finds a free port, starts Jupyter detached in tmux (or another session manager)
through your login environment, waits until the server is ready and answers with
its port and token as JSON.  The tunnel is a forward added to that same master
connection, which stays in the background until ``--terminate``.

Compatibility promise: this one file, with Python 3.8+ and the system ``ssh``, is a
complete install; the remote needs Python 3.6+, Jupyter and the session manager.
The command line, output and exit codes follow the documented interface; new
options may be added, documented ones are not renamed or dropped.

Plugins are Python files that ``import nbtunnel`` and call ``nbtunnel.register(obj)``
with an object whose ``kind`` is ``"manager"``, ``"environment"`` or ``"tunnel"``
(see the base classes ``SessionManager``, ``ShellEnvironment``, ``TunnelBackend``).
They are loaded from ``plugins/`` beside this file, ``$XDG_CONFIG_HOME/nbtunnel/plugins``,
``$NBTUNNEL_PLUGIN_PATH`` and ``--plugin FILE``.  Plugins describe commands as argv
lists; they never run processes themselves.
"""

import argparse
import base64
import contextlib
import errno
import json
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

# configparser, hashlib, http.client, importlib.util, socket, tempfile and urllib are
# imported where they are used: they are a good part of the start-up time of --help.

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, one run at a time is up to the user
    fcntl = None

__version__ = "0.1.0"

log = logging.getLogger("nbtunnel")

# Constants ###################################################################

SESSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
DEFAULT_SESSION = "nbtunnel"
DEFAULT_APP = "lab"
DEFAULT_TIMEOUT = 30.0
APPS = {  # app -> (jupyter subcommand, path of the landing page under base_url)
    "lab": ("lab", "lab"),
    "notebook": ("notebook", "tree"),
    "nbclassic": ("nbclassic", "tree"),
    "server": ("server", ""),
}
RESULT_MARK = "NBTUNNEL-RESULT:"
# The one command line the remote login shell ever sees: constant and quote-free,
# so it means the same under sh, bash, zsh, tcsh and fish.
REMOTE_COMMAND = "python3 - || python -"
# Characters no ssh destination needs; ssh would hand them to a ProxyCommand's %h.
HOST_BAD = re.compile(r"[\s\x00-\x1f\x7f'\"`$;&|<>(){}\\*?!#]")
SERVER_ALIVE = ["-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=3"]

# Messages that tests and users rely on.
MSG_NO_HOST = "no HOST given and {why}; recorded sessions: {sessions}"
MSG_HOSTKEY = (
    "the host key of {host} is not known here: check it (with the administrator, "
    "or `ssh-keyscan HOST | ssh-keygen -lf -` from a network you trust) and connect once with "
    "plain ssh to record it, or pass --accept-new to accept it on first contact"
)
MSG_HOSTKEY_OFFERED = "; the host offered: {line}"
MSG_HOSTKEY_CHANGED = (
    "the host key of {host} has CHANGED since it was recorded (possible man-in-the-middle); "
    "nbtunnel will not connect, not even with --accept-new or StrictHostKeyChecking=no. "
    "Check with the administrator and fix known_hosts"
)
MSG_AUTH = (
    "{host} refused authentication ({detail}). Without a terminal (cron), ssh needs a "
    "key without a passphrase or a running ssh-agent (SSH_AUTH_SOCK)"
)
MSG_UNREACHABLE = "cannot reach {host}: {detail}"
MSG_NO_PYTHON = "no python3 or python on the PATH of {host}; nbtunnel needs Python 3.6+ there"
MSG_BUSY = (
    "not terminating {session} on {host}: {n} kernel(s) busy ({names}); "
    "wait for them or pass --force"
)


class Error(Exception):
    """The one exception that reaches the user: a message and an exit code."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


class UsageError(Error):
    """Bad usage or bad input: exit 2."""

    def __init__(self, message: str):
        super().__init__(message, 2)


# Pure helpers ################################################################


def check_session(name: str) -> str:
    """Return NAME if it is an allowed session name, else raise UsageError."""
    if not isinstance(name, str) or not SESSION_RE.match(name):
        raise UsageError(
            "invalid session name %r: use 1-64 characters from A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit" % (name,)
        )
    return name


def check_port(value, what: str):
    """Return VALUE as a port number (None stays None), else raise UsageError."""
    if value is None:
        return None
    port = int(str(value), 10) if re.match(r"[0-9]{1,5}\Z", str(value)) else -1
    if not 1 <= port <= 65535:
        raise UsageError("invalid %s %r: must be a number from 1 to 65535" % (what, value))
    return port


def check_host(host: str, what: str = "HOST") -> str:
    """Return HOST if ssh can read it only as a destination, else raise UsageError."""
    if not host or host.startswith("-") or HOST_BAD.search(host):
        raise UsageError(
            "invalid %s %r: give an ssh destination (host, user@host, ssh://user@host:port or "
            "an ssh_config alias) without spaces, quotes or shell characters, not starting "
            "with '-'" % (what, host))
    return host


def check_ssh_args(args) -> None:
    """Reject ssh options that are not one ssh argument (control characters, -J -x) and
    local files that do not exist (ssh would go on without an -i it cannot read)."""
    for jump in (args.jump or "").split(",") if args.jump else ():
        check_host(jump, "-J")
    for what, value in [("--ssh-config", args.ssh_config), ("-i", args.identity)] + [
            ("-o", o) for o in args.ssh_option or ()]:
        if value is not None and (not value or re.search(r"[\x00-\x1f\x7f]", value)):
            raise UsageError("invalid %s %r: empty or holds control characters" % (what, value))
    for what, value in (("--ssh-config", args.ssh_config), ("-i", args.identity)):
        if value and value != "none" and "%" not in value and not os.path.exists(
                os.path.expanduser(value)):
            raise UsageError("%s file %r not found on this machine" % (what, value))


def shell_line(words) -> str:
    """Join WORDS into one POSIX shell line, every word quoted."""
    return " ".join(shlex.quote(str(w)) for w in words)


def split_command(text: str) -> list:
    """Split a --jupyter command line into words, as a POSIX shell would (no expansions)."""
    try:
        return shlex.split(text)
    except ValueError as e:
        raise UsageError("invalid --jupyter %r: %s" % (text, e))


def jupyter_argv(app, jupyter=None) -> list:
    """The remote argv that starts Jupyter, before nbtunnel's own arguments."""
    if jupyter is not None:
        argv = split_command(jupyter)
        if not argv:
            raise UsageError("--jupyter is empty")
        return argv
    return ["jupyter", APPS[app][0]]


def guess_app(jupyter) -> str:
    """Which front end a --jupyter command line starts, for the landing page."""
    words = [os.path.basename(w) for w in split_command(jupyter or "")]
    for word in words:
        for app in APPS:
            if word in (app, "jupyter-" + app):
                return app
    return "server" if words else DEFAULT_APP


def server_args() -> list:
    """Arguments nbtunnel adds to every Jupyter command (the port is added remotely)."""
    return ["--no-browser", "--ip=127.0.0.1", "--port-retries=0"]


def make_url(port: int, base_url: str, app: str, token: str) -> str:
    """The browser URL for a server reached on local PORT."""
    base = "/" + (base_url or "/").strip("/")
    path = APPS.get(app, APPS[DEFAULT_APP])[1]
    path = (base.rstrip("/") + "/" + path) if path else base.rstrip("/") + "/"
    return "http://127.0.0.1:%d%s?token=%s" % (port, path, token)


def record_name(host: str, session: str) -> str:
    """File name of the local record for HOST and SESSION (any HOST is safe)."""
    import hashlib

    safe = re.sub(r"[^A-Za-z0-9._-]", "_", host)[:60]
    digest = hashlib.sha1(host.encode()).hexdigest()[:8]
    return "%s-%s@%s.json" % (safe, digest, session)


def ssh_options(args) -> list:
    """The user's ssh options as argv words, in ssh's own syntax."""
    words = []
    if args.ssh_config:
        words += ["-F", args.ssh_config]
    for opt in args.ssh_option or ():
        words += ["-o", opt]
    if args.jump:
        words += ["-J", args.jump]
    if args.identity:
        words += ["-i", args.identity]
    if args.accept_new:
        words += ["-o", "StrictHostKeyChecking=accept-new"]
    return strict_host_keys(words)


def classify_ssh_error(host: str, stderr: str) -> str:
    """Turn ssh's stderr into a message a user understands, naming HOST."""
    text = stderr.strip()
    last = text.splitlines()[-1] if text else "ssh failed without a message"
    if "IDENTIFICATION HAS CHANGED" in text:
        return MSG_HOSTKEY_CHANGED.format(host=host)
    if "Host key verification failed" in text or re.search(r"No \S+ host key is known", text):
        found = re.search(r"^.*\bkey fingerprint is \S+", text, re.MULTILINE)
        offered = MSG_HOSTKEY_OFFERED.format(line=found.group(0).strip()) if found else ""
        return MSG_HOSTKEY.format(host=host) + offered
    if "Permission denied" in text or "Too many authentication failures" in text:
        return MSG_AUTH.format(host=host, detail=last)
    return MSG_UNREACHABLE.format(host=host, detail=last)


def strict_host_keys(words: list) -> list:
    """ssh option words with StrictHostKeyChecking=no (or off, false) turned into accept-new.

    With "no", OpenSSH still connects to a host whose key has CHANGED (it only turns
    off forwarding and passwords), and nbtunnel would hand that host its token:
    accept-new keeps the convenience for unknown hosts and refuses changed keys."""
    out = list(words)
    for i in range(1, len(out)):
        if out[i - 1] == "-o" and re.match(r"\s*stricthostkeychecking\s*[=\s]\s*\"?(no|off|false)"
                                           r"\"?\s*\Z", out[i], re.IGNORECASE):
            log.warning("warning: -o %s is used as StrictHostKeyChecking=accept-new: nbtunnel "
                        "never connects to a host whose key has changed", out[i])
            out[i] = "StrictHostKeyChecking=accept-new"
    return out


def offered_host_key(conn, stderr: str) -> str:
    """After ssh refused an unknown host key: the fingerprint line of the key the host
    offers, as ssh's own prompt would show it ("" when not that failure).

    In batch mode ssh does not print it, so ask ssh once more, at debug level, with
    the same options (jump hosts and aliases included); this is the failure path only."""
    if "IDENTIFICATION HAS CHANGED" in stderr or not (
            "Host key verification failed" in stderr or "host key is known" in stderr):
        return ""
    argv = ["ssh"] + list(conn.options) + [
        "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes", "-o", "ControlMaster=no",
        "-o", "ControlPath=none", "-o", "LogLevel=DEBUG1",
        "-o", "ConnectTimeout=%d" % max(1, int(conn.timeout)), conn.host, "true"]
    try:
        r = subproc(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                    timeout=conn.timeout + 5)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    m = re.search(r"Server host key: (\S+) (\S+)", r.stderr)
    if not m:
        return ""
    kind = m.group(1).replace("ssh-", "").split("-")[0].upper()
    return "\n%s key fingerprint is %s" % (kind, m.group(2))


def refuse_changed_host_key(conn, stderr: str) -> None:
    """End a master that connected although the host key has changed (the user's
    ssh_config said StrictHostKeyChecking no): nothing may be sent to that host."""
    if "IDENTIFICATION HAS CHANGED" in stderr:
        conn.close()
        raise Error(MSG_HOSTKEY_CHANGED.format(host=conn.host))


# The remote helper ###########################################################
#
# Plain Python sent on ssh's stdin and run by the remote python3.  It must run on
# the oldest Pythons found on HPC login nodes (3.6: no walrus, no f-string "=").
# Assumptions about the remote: a POSIX system with a login shell in /etc/passwd;
# Linux /proc is used when present to tell a live Jupyter from a zombie or a
# reused pid; everything else is the standard library.

REMOTE_HELPER = r'''
import base64, errno, json, os, pwd, shutil, signal, socket, subprocess, sys, tempfile, time
try:
    import fcntl
except ImportError:
    fcntl = None

MARK = "NBTUNNEL-RESULT:"
ENV_MARK = "NBTUNNEL-ENV-FOLLOWS"
DUMP = "import os,json,sys;sys.stdout.write(json.dumps(dict(os.environ)))"
LAUNCHER = """
import json, os, sys
spec = json.load(open(SPEC))
os.remove(SPEC)
with open(spec["pidfile"], "w") as f:
    f.write(str(os.getpid()))
sys.stdout.write("nbtunnel: Jupyter runs in this session; its log is %s\\n" % spec["log"])
sys.stdout.flush()
fd = os.open(spec["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 384)
# stdin stays the terminal: tmux and screen end a pane whose terminal nobody holds
os.dup2(fd, 1)
os.dup2(fd, 2)
try:
    os.chdir(spec["cwd"])
    os.execve(spec["argv"][0], spec["argv"], spec["env"])
except OSError as e:
    os.write(2, ("nbtunnel: cannot start %s: %s\\n" % (spec["argv"][0], e)).encode())
    os._exit(127)
"""
BOOT = "import base64,sys;exec(base64.b64decode(sys.argv[1]))"


class Fail(Exception):
    def __init__(self, kind, message, **extra):
        Exception.__init__(self, message)
        self.kind, self.extra = kind, extra


def state_dir():
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    path = os.path.join(base, "nbtunnel")
    if not os.path.isdir(path):
        os.makedirs(path, 0o700)
    return path


def files(session):
    d = state_dir()
    return dict((k, os.path.join(d, session + ext)) for k, ext in (
        ("state", ".json"), ("log", ".log"), ("pid", ".pid"), ("spec", ".spec.json"),
        ("lock", ".lock"), ("output", ".out")))


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_json(path, data):
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    os.rename(tmp, path)


def remove(*paths):
    for path in paths:
        try:
            os.remove(path)
        except OSError:
            pass


class Lock(object):
    def __init__(self, path, timeout):
        self.path, self.timeout, self.fd = path, timeout, None

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.time() + self.timeout
        while fcntl is not None:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if time.time() > deadline:
                    raise Fail("locked", "another nbtunnel is busy with this session")
                time.sleep(0.1)
        return self

    def __exit__(self, *exc):
        os.close(self.fd)


def pid_alive(pid):
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except OSError as e:
        if e.errno != errno.EPERM:  # EPERM: exists, but not ours
            return False
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("State:"):
                    return "Z" not in line.split()[1]
    except (IOError, OSError):
        pass
    return True


def pid_is_jupyter(pid):
    if not pid_alive(pid):
        return False
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return b"jupyter" in f.read()
    except (IOError, OSError):
        return True  # no /proc here: a live pid is the best we can tell


def free_port():
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
    finally:
        s.close()


def tail(path, n=20):
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 16384))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except (IOError, OSError):
        return ""
    return "\n".join(lines[-n:])


def urlrequest():
    # Imported on first use: it costs ~25 ms that status and reattach do not need,
    # and launch() pulls it in while Jupyter is still starting.
    import urllib.request
    return urllib.request


def http(port, base_url, path, token, method="GET", timeout=5):
    url = "http://127.0.0.1:%d%s%s" % (port, base_url or "/", path)
    ur = urlrequest()
    req = ur.Request(url, method=method, headers={"Authorization": "token " + token})
    opener = ur.build_opener(ur.ProxyHandler({}))
    with opener.open(req, timeout=timeout) as resp:
        body = resp.read()
        return resp.status, (json.loads(body.decode()) if body.strip() else None)


def run(argv, timeout=30, env=None):
    try:
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=env)
    except OSError as e:
        return 127, "", str(e)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
    return p.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")


# Login environment ----------------------------------------------------------

def shell_family(shell):
    name = os.path.basename(shell)
    if name == "fish":
        return "fish"
    if name in ("csh", "tcsh"):
        return "csh"
    return "sh"


def login_env(steps, timeout):
    """The environment a login shell of this user has, after STEPS ran in it."""
    shell = pwd.getpwuid(os.getuid()).pw_shell or os.environ.get("SHELL") or "/bin/sh"
    if not os.access(shell, os.X_OK):
        shell = "/bin/sh"
    family = shell_family(shell)
    env = dict(os.environ, NBT_PY=sys.executable, NBT_DUMP=DUMP)
    lines = []
    if family == "csh":  # csh takes -l only alone; source the login files ourselves
        lines.append("if ( -r /etc/csh.login ) source /etc/csh.login")
        lines.append("if ( -r ~/.login ) source ~/.login")
    for step in steps:
        env.update(step.get("vars", {}))
        for key in step.get("paths", ()):  # paths are relative to the home directory
            env[key] = home_path(env[key])
        lines.append(step[family])
    lines.append("echo " + ENV_MARK)
    lines.append({"sh": 'exec "$NBT_PY" -c "$NBT_DUMP"', "fish": "exec $NBT_PY -c $NBT_DUMP",
                  "csh": "exec $NBT_PY:q -c $NBT_DUMP:q"}[family])
    if family == "csh":
        # tcsh -c ignores `exit` and runs a foreach body once: csh gets a script
        # file (private, in the state directory, removed at once) instead.
        fd, script = tempfile.mkstemp(prefix=".login-", suffix=".csh", dir=state_dir())
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(lines) + "\n")
        try:
            code, out, err = run([shell, script], timeout=timeout, env=env)
        finally:
            remove(script)
    else:
        code, out, err = run([shell, "-l", "-c", "\n".join(lines)], timeout=timeout, env=env)
    if ENV_MARK not in out:
        raise Fail("env", "the login shell %s failed before Jupyter could start (exit %s)"
                   % (shell, code), log_tail="\n".join(err.splitlines()[-15:]))
    try:
        found = json.loads(out.rsplit(ENV_MARK, 1)[1].strip())
    except ValueError:
        raise Fail("env", "could not read the environment of the login shell %s" % shell,
                   log_tail="\n".join(err.splitlines()[-15:]))
    for key in list(found):
        if key.startswith("NBT_"):
            del found[key]
    found.pop("TMUX", None)
    found.pop("STY", None)
    return shell, found


def home_path(path):
    """PATH with a leading ~ or ~/ expanded; a relative path is taken from the home directory."""
    home = os.path.expanduser("~")
    if path == "~" or path.startswith("~/"):
        path = home + path[1:]
    return os.path.join(home, path)


def which(program, env):
    return shutil.which(program, path=env.get("PATH", os.defpath))


# Jupyter servers ------------------------------------------------------------

def runtime_dirs(env):
    home = os.path.expanduser("~")
    dirs = []
    if env.get("JUPYTER_RUNTIME_DIR"):
        dirs.append(env["JUPYTER_RUNTIME_DIR"])
    if env.get("JUPYTER_DATA_DIR"):
        dirs.append(os.path.join(env["JUPYTER_DATA_DIR"], "runtime"))
    data = env.get("XDG_DATA_HOME") or os.path.join(home, ".local", "share")
    dirs.append(os.path.join(data, "jupyter", "runtime"))
    dirs.append(os.path.join(home, "Library", "Jupyter", "runtime"))
    if env.get("XDG_RUNTIME_DIR"):
        dirs.append(os.path.join(env["XDG_RUNTIME_DIR"], "jupyter"))
    return dirs


def find_runtime_file(pid, dirs, newer_than=0):
    for d in dirs:
        for prefix in ("jpserver-", "nbserver-"):
            path = os.path.join(d, "%s%d.json" % (prefix, pid))
            try:
                if os.path.getmtime(path) < newer_than:
                    continue  # left by an earlier server whose pid was reused
            except OSError:
                continue
            info = read_json(path)
            if info and info.get("port") and info.get("pid", pid) == pid:
                return path, info
    return None, None


def probe(session):
    """Info about the live server of SESSION, or None."""
    st = read_json(files(session)["state"])
    if not st or not pid_is_jupyter(st.get("pid")):
        return None
    info = read_json(st.get("runtime_file", "")) or {}
    if not info.get("port"):
        return None
    return dict(session=session, pid=st["pid"], port=info["port"], token=info.get("token", ""),
                base_url=info.get("base_url", "/"), log=st.get("log"),
                manager=st.get("manager"), app=st.get("app"), root_dir=info.get(
                    "root_dir", info.get("notebook_dir")), started=st.get("started"))


def busy_kernels(info):
    try:
        code, kernels = http(info["port"], info["base_url"], "api/kernels", info["token"])
    except Exception:
        return []
    return [k.get("name", "?") + ":" + k.get("id", "?")[:8] for k in kernels or ()
            if k.get("execution_state") == "busy"]


def wait_dead(pid, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.1)
    return not pid_alive(pid)


def stop_server(info, timeout):
    """Shut the server down through its own API, then by signals if it must."""
    pid = info["pid"]
    try:
        http(info["port"], info["base_url"], "api/shutdown", info["token"], method="POST")
    except Exception:
        pass
    if wait_dead(pid, timeout):
        return "api"
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.kill(pid, sig)
        except OSError:
            pass
        if wait_dead(pid, wait):
            return sig == signal.SIGTERM and "sigterm" or "sigkill"
    return "alive"


def helper_python():
    """This Python, as a word that needs no quoting even inside a shell line."""
    if all(c.isalnum() or c in "/._-+" for c in sys.executable):
        return sys.executable
    return "python3"


def fill(argv, words):
    """ARGV with the placeholders @PYTHON@, @LAUNCH@, @PIDFILE@, @OUTPUT@ filled in."""
    out = []
    for w in argv:
        for key, value in words.items():
            w = w.replace("@%s@" % key.upper(), value)
        out.append(w)
    return out


def run_manager(mgr, what, session, env, launch=""):
    """Run the manager's argv for WHAT (start, alive, stop, log); None if it has none."""
    argv = mgr.get(what)
    if not argv:
        return None
    paths = files(session)
    argv = fill(argv, dict(python=helper_python(), launch=launch, pidfile=paths["pid"],
                           output=paths["output"]))
    if what == "start" and mgr.get("detach"):
        # A manager without a terminal of its own (nohup): the launcher gets its own
        # session, stdin from /dev/null and a file for output, and is not waited for.
        remove(paths["output"])
        out = os.open(paths["output"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env,
                             close_fds=True, start_new_session=True)
        except OSError as e:
            return 127, "", str(e)
        finally:
            os.close(out)
        return 0, "", ""
    return run(argv, env=env)


def manager_log(mgr, session, env):
    """The last lines of what the session printed, as its manager shows them."""
    got = run_manager(mgr, "log", session, env)
    return "\n".join((got[1] + got[2]).strip().splitlines()[-15:]) if got else ""


# Operations -----------------------------------------------------------------

def op_start(p):
    session, mgr, timeout = p["session"], p["manager"], p["timeout"]
    paths = files(session)
    with Lock(paths["lock"], timeout):
        info = probe(session)
        if info:
            info["reused"] = True
            return info
        shell, env = login_env(p["env_steps"], timeout)
        for program in [mgr["program"]] if mgr.get("program") else []:
            if not which(program, env):
                raise Fail("no-manager", "%s is not installed on this host (not on the login "
                           "PATH); install it or choose another --manager" % program)
        st = read_json(paths["state"])
        if st and pid_alive(st.get("pid")):  # ours, but unusable (no runtime file)
            stop_server(dict(pid=st["pid"], port=0, base_url="/", token=""), 0)
        alive = run_manager(mgr, "alive", session, env)
        if alive and alive[0] == 0:
            if not st:
                raise Fail("session-exists", "a %s session named %s already exists and was not "
                           "started by nbtunnel; choose another --session"
                           % (mgr["name"], session))
            run_manager(mgr, "stop", session, env)  # ours, whose server is gone
        argv = list(p["argv"])
        exe = which(argv[0], env) if "/" not in argv[0] else argv[0]
        if not exe or not os.access(exe, os.X_OK):
            raise Fail("no-jupyter", "%s not found on this host in the login environment of %s "
                       "(PATH=%s); install Jupyter or pass --jupyter /path/to/jupyter"
                       % (argv[0], shell, env.get("PATH", "")))
        argv[0] = exe
        if os.path.basename(exe) == "jupyter" and len(argv) > 1 and not argv[1].startswith("-"):
            sub = "jupyter-" + argv[1]
            if not which(sub, env) and not os.path.exists(os.path.join(os.path.dirname(exe), sub)):
                raise Fail("no-jupyter", "'jupyter %s' is not installed on this host (no %s "
                           "next to %s or on the login PATH)" % (argv[1], sub, exe))
        cwd = home_path(p.get("notebook_dir") or "~")
        if not os.path.isdir(cwd):
            raise Fail("no-dir", "notebook directory %r does not exist on this host" % (cwd,))
        tries = 1 if p.get("remote_port") else 3
        for attempt in range(tries):
            port = p.get("remote_port") or free_port()
            info = launch(p, paths, env, argv + ["--port=%d" % port], cwd)
            if info:
                info["reused"] = False
                return info
        if p.get("remote_port"):
            raise Fail("port", "remote port %d is already in use on this host; choose another "
                       "--remote-port or leave it out" % p["remote_port"])
        raise Fail("launch", "the remote port was taken each time Jupyter started",
                   log_tail=tail(paths["log"]))


def launch(p, paths, env, argv, cwd):
    """Start Jupyter through the manager and wait until it answers; None if the port was taken."""
    session, mgr, timeout = p["session"], p["manager"], p["timeout"]
    remove(paths["pid"], paths["log"])
    # A restarted server keeps its token, so bookmarked URLs keep working.  It goes to
    # Jupyter alone (not to tmux, whose other windows would inherit it).
    server_env = dict(env, JUPYTER_TOKEN=p["token"]) if p.get("token") else env
    write_json(paths["spec"], dict(argv=argv, env=server_env, cwd=cwd, log=paths["log"],
                                   pidfile=paths["pid"]))
    code = ("SPEC = %r\n" % paths["spec"]) + LAUNCHER
    started = time.time()
    rc, out, err = run_manager(mgr, "start", session, env,
                               base64.b64encode(code.encode()).decode())
    if rc != 0:
        remove(paths["spec"])
        raise Fail("launch", "%s could not start the session: %s" % (mgr["name"], (err or out).strip()))
    urlrequest()  # while Jupyter starts, not after
    dirs = runtime_dirs(env)
    deadline = started + timeout
    pid = None
    while time.time() < deadline:
        if pid is None:
            try:
                with open(paths["pid"]) as f:
                    pid = int(f.read().strip() or 0) or None
            except (IOError, OSError, ValueError):
                pid = None
        if pid is not None:
            runtime, info = find_runtime_file(pid, dirs, started - 2)
            if info:
                break
            if not pid_alive(pid):
                text = tail(paths["log"])
                if "already in use" in text or "Address in use" in text:
                    return None
                raise Fail("launch", "Jupyter exited before it was ready", log_tail=text)
        time.sleep(0.01)  # a few stat() calls: polling often costs nothing and saves waiting
    else:
        if pid:
            stop_server(dict(pid=pid, port=0, base_url="/", token=""), 0)
            text = tail(paths["log"])
        else:  # the launcher never ran: what the session itself printed says why
            text = manager_log(mgr, session, env)
        run_manager(mgr, "stop", session, env)
        remove(paths["spec"])
        raise Fail("timeout", "Jupyter was not ready within %ss" % timeout, log_tail=text)
    write_json(paths["state"], dict(session=session, pid=pid, runtime_file=runtime,
                                    log=paths["log"], manager=mgr["name"], app=p.get("app"),
                                    started=started))
    result = probe(session)
    while time.time() < deadline:  # listening is not answering: wait for the API
        try:
            if http(result["port"], result["base_url"], "api/status", result["token"])[0] == 200:
                break
        except Exception:
            time.sleep(0.01)
    return result


def op_stop(p):
    session, timeout = p["session"], p["timeout"]
    paths = files(session)
    with Lock(paths["lock"], timeout):
        st = read_json(paths["state"])
        info = probe(session)
        if info and not p.get("force"):
            busy = busy_kernels(info)
            if busy:
                return dict(busy=busy, stopped=False)
        how = stop_server(info, timeout) if info else None
        if st:
            mgr = p["manager"] if p["manager"]["name"] == st.get("manager") else \
                p["managers"].get(st.get("manager"), p["manager"])
            alive = run_manager(mgr, "alive", session, None)
            if alive and alive[0] == 0:
                run_manager(mgr, "stop", session, None)
            remove(paths["state"], paths["pid"], paths["spec"])
        return dict(stopped=bool(info), how=how, was_recorded=bool(st))


def how_ended(session):
    """Why SESSION has no live server: shutdown (asked through Jupyter's API, e.g. File >
    Shut Down), died (killed or crashed: it may be restarted) or none (nothing recorded)."""
    st = read_json(files(session)["state"])
    if not st:
        return "none"
    if "Shutting down on /api/shutdown request" in tail(st.get("log") or "", 40):
        return "shutdown"
    return "died"


def op_status(p):
    out = []
    for session in p["sessions"]:
        info = probe(session)
        if info:
            info["server"] = "running"
            out.append(info)
        else:
            out.append(dict(session=session, server="stopped", ended=how_ended(session)))
    return out


def main(b64):
    p = json.loads(base64.b64decode(b64).decode())
    try:
        result = dict(ok=True, result={"start": op_start, "stop": op_stop,
                                       "status": op_status}[p["op"]](p))
    except Fail as e:
        result = dict(ok=False, kind=e.kind, message=str(e), **e.extra)
    except Exception as e:
        import traceback
        result = dict(ok=False, kind="internal", message="%s: %s" % (type(e).__name__, e),
                      log_tail=traceback.format_exc())
    sys.stdout.write("\n" + MARK + json.dumps(result) + "\n")
    sys.stdout.flush()
'''


def remote_program(op: str, params: dict) -> bytes:
    """The helper source plus its call, as sent on ssh's stdin."""
    payload = base64.b64encode(json.dumps(dict(params, op=op)).encode()).decode()
    return (REMOTE_HELPER + "\nmain(%r)\n" % payload).encode()


def parse_result(host: str, stdout: str, stderr: str, code: int):
    """The helper's result, or an Error that says why there is none (with the remote log)."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            answer = json.loads(line[len(RESULT_MARK):])
            if answer.get("ok"):
                return answer["result"]
            message = "%s: %s" % (host, answer.get("message"))
            if answer.get("log_tail"):
                message += "\n--- last lines of the remote log ---\n" + answer["log_tail"]
            raise Error(message)
    if code == 127 or "command not found" in stderr.lower() or "not found" in stderr:
        raise Error(MSG_NO_PYTHON.format(host=host))
    if "SyntaxError" in stderr:
        raise Error(MSG_NO_PYTHON.format(host=host) + " (its python3 is too old)")
    if code == 255:
        raise Error(classify_ssh_error(host, stderr))
    raise Error("the nbtunnel helper on %s gave no answer (exit %s): %s"
                % (host, code, stderr.strip()[-2000:] or "no message"))


# Plugins #####################################################################


class SessionManager:
    """Runs Jupyter detached on the remote.  Methods return remote argv lists.

    ``command`` is the argv of the launcher; its words may contain the
    placeholders ``@PYTHON@`` and ``@LAUNCH@``, which the remote helper fills
    in with safe text (no quoting needed, also inside a shell line).  Any argv
    may also use ``@PYTHON@`` and the session's remote files ``@PIDFILE@`` (the
    pid of Jupyter, written by the launcher) and ``@OUTPUT@`` (what a ``detach``
    manager's command prints); these two are paths: use them as whole words,
    never inside a shell line.  With ``detach = True`` the helper runs ``start``
    in a new session (setsid) with stdin from /dev/null and output to
    ``@OUTPUT@``, and does not wait for it: for managers that are a plain command
    (nohup) rather than a program that detaches by itself (tmux, screen).
    """

    kind = "manager"
    name = ""
    program = ""  # must be on the remote login PATH
    detach = False

    def start(self, session: str, command: list) -> list:
        """argv that starts COMMAND detached, in a session named SESSION."""
        raise NotImplementedError

    def alive(self, session: str):
        """argv whose exit status 0 means the session exists, or None."""
        return None

    def stop(self, session: str):
        """argv that ends the session, or None."""
        return None

    def log(self, session: str):
        """argv that prints what the session itself shows (not Jupyter's log), or None."""
        return None

    def describe(self, session: str) -> dict:
        """What the remote helper needs, as plain data."""
        launcher = ["@PYTHON@", "-c", "import base64,sys;exec(base64.b64decode(sys.argv[1]))",
                    "@LAUNCH@"]
        return dict(name=self.name, program=self.program, start=self.start(session, launcher),
                    alive=self.alive(session), stop=self.stop(session), log=self.log(session),
                    detach=bool(getattr(self, "detach", False)))


class Tmux(SessionManager):
    """tmux: the session survives logout; `tmux attach -t NAME` shows it."""

    name = "tmux"
    program = "tmux"

    @staticmethod
    def target(session: str) -> str:
        """tmux turns '.' and ':' into '_' in session names."""
        return session.replace(".", "_")

    def start(self, session, command):
        """tmux runs its command through the user's shell: quote every word."""
        return ["tmux", "new-session", "-d", "-s", self.target(session), shell_line(command)]

    def alive(self, session):
        """'=' asks for this exact name, not a prefix."""
        return ["tmux", "has-session", "-t", "=" + self.target(session)]

    def stop(self, session):
        """End the session and whatever still runs in it."""
        return ["tmux", "kill-session", "-t", "=" + self.target(session)]

    def log(self, session):
        """The text of the session's pane."""
        return ["tmux", "capture-pane", "-p", "-J", "-t", "=" + self.target(session) + ":"]


class ShellEnvironment:
    """Prepares the shell Jupyter starts from.  ``steps`` returns shell snippets.

    Jupyter starts from the user's login shell (bash -l, zsh -l, fish -l, tcsh
    with ~/.login); the steps of every environment plugin run in it first, in
    the order of their ``order``.  Each step is a dict with one constant snippet
    per shell family (``sh``, ``fish``, ``csh``) and ``vars``, the data it
    reads from environment variables named NBT_*: user data never becomes shell
    text.  ``paths`` lists the vars that are remote paths (``~/`` and relative
    paths are taken from the remote home).  A snippet that fails should print
    why on stderr and ``exit 1``: the start then fails with that message.  In
    csh, never put an NBT_* variable inside backquotes (csh parses what they
    hold) nor echo one (tcsh silently drops such a line).
    """

    kind = "environment"
    name = ""
    order = 50

    def add_arguments(self, parser) -> None:
        """Add this plugin's command-line options."""

    def steps(self, args) -> list:
        """Snippets to run, in order, before Jupyter starts."""
        return []


class RcFile(ShellEnvironment):
    """--rc FILE: source a shell file first (the `source ~/.zshrc` habit)."""

    name = "rc"
    order = 10

    def steps(self, args):
        """Source the file in the user's login shell; a missing file is an error."""
        if not getattr(args, "rc", None):
            return []
        fail = "nbtunnel: cannot read the --rc file $NBT_RC"
        return [dict(vars={"NBT_RC": args.rc}, paths=["NBT_RC"],
                     sh='if [ -r "$NBT_RC" ]; then . "$NBT_RC"; else echo "%s" >&2; exit 1; fi'
                     % fail,
                     fish='if test -r "$NBT_RC"; source "$NBT_RC"; else; echo "%s" >&2; exit 1;'
                     ' end' % fail,
                     csh='if ( -r $NBT_RC:q ) then\nsource $NBT_RC:q\nelse\n'
                     'echo "%s" > /dev/stderr\nexit 1\nendif' % fail.replace(" $NBT_RC", ""))]


class Setup(ShellEnvironment):
    """--setup CMD: run CMD, in the syntax of the remote login shell, last before Jupyter."""

    name = "setup"
    order = 90

    def add_arguments(self, parser):
        """--setup is the escape hatch: what no plugin does yet."""
        parser.add_argument("--setup", metavar="CMD", help="remote shell command to run before "
                            "Jupyter starts, in the syntax of your login shell (raw: it is code)")

    def steps(self, args):
        """Evaluate the command; its failure fails the start."""
        if not getattr(args, "setup", None):
            return []
        fail = "nbtunnel: the --setup command failed"
        return [dict(vars={"NBT_SETUP": args.setup},
                     sh='eval "$NBT_SETUP" || { echo "%s" >&2; exit 1; }' % fail,
                     fish='eval $NBT_SETUP; or begin; echo "%s" >&2; exit 1; end' % fail,
                     csh='eval $NBT_SETUP:q\nif ( $status != 0 ) then\necho "%s" > /dev/stderr'
                     '\nexit 1\nendif' % fail)]


class TunnelBackend:
    """Makes local PORT reach the remote server.  The built-in one uses the ssh master.

    A backend with ``foreground = True`` holds the forward in this process: after
    printing the URL nbtunnel calls ``serve(conn)``, which returns when the user
    presses Ctrl-C (or on SIGTERM), and then ``close``.  ``connection(host,
    options, timeout)`` may return an object that replaces the OpenSSH
    ``Connection`` (same methods), or None to use it.
    """

    kind = "tunnel"
    name = ""
    foreground = False

    def connection(self, host: str, options: list, timeout: float):
        """A replacement for the OpenSSH Connection, or None."""
        return None

    def serve(self, conn) -> None:
        """Keep a foreground forward open until interrupted."""

    def open(self, conn, local_port: int, remote_port: int) -> None:
        """Forward 127.0.0.1:LOCAL_PORT here to 127.0.0.1:REMOTE_PORT there."""
        raise NotImplementedError

    def close(self, conn, local_port: int, remote_port: int) -> None:
        """Remove that forward."""
        raise NotImplementedError


class SshForward(TunnelBackend):
    """A -L forward added to the shared OpenSSH master connection."""

    name = "ssh"

    def open(self, conn, local_port, remote_port):
        """`ssh -O forward`: the master keeps it open after this command returns."""
        conn.control("forward", "-L", "127.0.0.1:%d:127.0.0.1:%d" % (local_port, remote_port))

    def close(self, conn, local_port, remote_port):
        """`ssh -O cancel` of the same forward."""
        conn.control("cancel", "-L", "127.0.0.1:%d:127.0.0.1:%d" % (local_port, remote_port))


MANAGERS = {}
ENVIRONMENTS = {}
TUNNELS = {}
REGISTRIES = {"manager": MANAGERS, "environment": ENVIRONMENTS, "tunnel": TUNNELS}
REQUIRED = {"manager": ("start", "alive", "stop", "log", "describe"),
            "environment": ("steps", "add_arguments"), "tunnel": ("open", "close")}
PLUGIN_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}\Z")


def check_plugin(plugin) -> str:
    """The kind of PLUGIN, after checking it keeps its contract; else raise Error."""
    if isinstance(plugin, type):
        raise Error("register an instance, not the class: nbtunnel.register(%s())"
                    % plugin.__name__)
    kind = getattr(plugin, "kind", None)
    if kind not in REGISTRIES:
        raise Error("plugin %r has no valid kind (manager, environment or tunnel)" % (plugin,))
    missing = [m for m in REQUIRED[kind] if not callable(getattr(plugin, m, None))]
    name = getattr(plugin, "name", "")
    if missing or not isinstance(name, str) or not PLUGIN_NAME_RE.match(name):
        raise Error("%s plugin %r lacks %s" % (kind, plugin, ", ".join(missing) or
                                               "a name (letters, digits, . _ -)"))
    if kind == "manager":  # its description is plain data: argv lists of strings
        desc = plugin.describe("nbtunnel")
        for key in ("start", "alive", "stop", "log"):
            argv = desc.get(key)
            if (key == "start" or argv is not None) and not (
                    isinstance(argv, list) and argv and all(isinstance(w, str) for w in argv)):
                raise Error("manager plugin %s: %s() must return an argv list of strings%s, "
                            "not %r" % (name, key, "" if key == "start" else " or None", argv))
    return kind


def register(plugin) -> None:
    """Add PLUGIN (an instance of one of the base classes, or duck-typed alike)."""
    kind = check_plugin(plugin)
    plugin.source = getattr(plugin, "source", None) or getattr(
        sys.modules.get(type(plugin).__module__), "__file__", None) or "built-in"
    if plugin.source == globals().get("__file__"):
        plugin.source = "built-in"
    REGISTRIES[kind][plugin.name] = plugin


def get(kind: str, name: str):
    """The registered plugin of KIND called NAME, or an error listing the known ones."""
    try:
        return REGISTRIES[kind][name]
    except KeyError:
        raise UsageError("unknown %s %r; known: %s" % (kind, name, ", ".join(sorted(REGISTRIES[kind]))))


register(Tmux())
register(RcFile())
register(Setup())
register(SshForward())


def plugin_files(extra=()) -> list:
    """Plugin files to load, in order: beside this file, user config, env, --plugin."""
    dirs = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "plugins")]
    config = os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config")
    dirs.append(os.path.join(config, "nbtunnel", "plugins"))
    dirs += [d for d in os.environ.get("NBTUNNEL_PLUGIN_PATH", "").split(os.pathsep) if d]
    found = []
    for d in dirs:
        if os.path.isdir(d):
            found += sorted(os.path.join(d, f) for f in os.listdir(d)
                            if f.endswith(".py") and not f.startswith("_"))
    return found + list(extra)


def load_plugins(paths) -> list:
    """Import each plugin file; one that fails is reported and skipped."""
    import importlib.util

    loaded = []
    for path in paths:
        name = "nbtunnel_plugin_" + re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
        try:
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
            loaded.append(path)
        except Exception as e:  # a broken plugin must not break the others
            sys.modules.pop(name, None)
            log.warning("warning: plugin %s failed to load and is skipped: %s: %s",
                        path, type(e).__name__, e)
    return loaded


# Running ssh #################################################################


def subproc(argv, **kw) -> subprocess.CompletedProcess:
    """Run one local process; the only place nbtunnel starts one (logged with -v)."""
    log.debug("+ %s", shlex.join(argv))
    return subprocess.run(argv, **kw)


CONTROL_DIR_MAX = 60  # + "/" + 16 hex + ssh's ".XXXXXXXXXXXXXXXX" while binding < 104 bytes


def private_dir_problem(path: str, st=None):
    """Why PATH is not a private directory of ours (None when it is: a real directory,
    not a symlink, owned by us, writable by nobody else)."""
    try:
        st = st or os.lstat(path)
    except OSError as e:
        return "cannot be examined (%s)" % (e.strerror or e)
    import stat as stat_

    if stat_.S_ISLNK(st.st_mode):
        return "is a symbolic link"
    if not stat_.S_ISDIR(st.st_mode):
        return "is not a directory"
    if st.st_uid != os.geteuid():
        return "belongs to uid %d, not to you (uid %d)" % (st.st_uid, os.geteuid())
    if st.st_mode & 0o022:
        return "is writable by group or others (mode %04o)" % stat_.S_IMODE(st.st_mode)
    return None


def control_dir_candidates() -> list:
    """Where control sockets may live, in order: the runtime dir, then names in the
    temporary directory derived from the uid, so later runs (cron too) find the same one."""
    import tempfile

    uid = os.geteuid()
    found = []
    base = os.environ.get("NBTUNNEL_RUNTIME_DIR") or os.environ.get("XDG_RUNTIME_DIR")
    if base:
        found.append(os.path.join(base, "nbtunnel"))
    for tmp in dict.fromkeys([tempfile.gettempdir(), "/tmp"]):
        found += [os.path.join(tmp, "nbtunnel-%d" % uid)] + [
            os.path.join(tmp, "nbtunnel-%d-%d" % (uid, n)) for n in range(1, 8)]
    return [p for p in found if len(p) <= CONTROL_DIR_MAX]


def control_dir() -> str:
    """A private directory for control sockets, short enough for a socket path.

    Another user can pre-create a name in /tmp; such a directory is passed over, never
    used or chmod-ed: the next candidate that is ours (or that we can create) is taken."""
    import tempfile

    refused = []
    for path in control_dir_candidates():
        with contextlib.suppress(OSError):
            os.mkdir(path, 0o700)
        if not os.path.lexists(path):
            continue  # e.g. an XDG_RUNTIME_DIR that does not exist
        problem = private_dir_problem(path)
        if problem is None and os.lstat(path).st_mode & 0o077 == 0:
            break
        refused.append("%s %s" % (path, problem or "is not mode 0700"))
    else:
        path = tempfile.mkdtemp(prefix="nbtunnel-%d-" % os.geteuid(),
                                dir="/tmp" if os.path.isdir("/tmp") else None)
    if refused:
        log.warning("warning: not using %s; control sockets go to %s", "; ".join(refused), path)
    return path


class Connection:
    """One OpenSSH master connection to HOST, shared by every step of a command."""

    def __init__(self, host: str, options: list, key: str, timeout: float):
        import hashlib

        self.host, self.options, self.timeout = host, list(options), timeout
        digest = hashlib.sha1(("%s\0%s" % (key, host)).encode()).hexdigest()[:16]
        self.socket = os.path.join(control_dir(), digest)
        self.opened_here = False
        self.batch = sys.stdin is None or not sys.stdin.isatty()  # cron: never prompt

    def argv(self, *extra) -> list:
        """ssh with the user's options and our control socket."""
        words = ["ssh"] + self.options + ["-S", self.socket]
        if self.batch:
            words += ["-o", "BatchMode=yes"]
        return words + list(extra)

    def check(self):
        """`ssh -O check`: the finished process when a master answers, else None."""
        if not os.path.exists(self.socket):
            return None
        r = subproc(self.argv("-O", "check", self.host), stdin=subprocess.DEVNULL,
                    capture_output=True, text=True)
        return r if r.returncode == 0 else None

    def alive(self) -> bool:
        """Is the master running?"""
        return self.check() is not None

    def master_pid(self):
        """Pid of the master process, or None."""
        r = self.check()
        m = r and re.search(r"pid=(\d+)", r.stderr)
        return int(m.group(1)) if m else None

    def open(self) -> None:
        """Start the master unless one runs; this is the only authentication."""
        if self.alive():
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket)  # a socket left by a master that died
        argv = self.argv("-f", "-N", "-M", "-o", "ControlPersist=yes",
                         "-o", "ConnectTimeout=%d" % max(1, int(self.timeout)),
                         "-o", "ExitOnForwardFailure=yes", *SERVER_ALIVE, self.host)
        import tempfile

        # ssh -f keeps stderr open in the background: a file, not a pipe, collects it.
        with tempfile.TemporaryFile() as err:
            try:
                r = subproc(argv, stdin=None if not self.batch else subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=err,
                            timeout=None if not self.batch else self.timeout + 5)
                code = r.returncode
            except subprocess.TimeoutExpired:
                raise Error(MSG_UNREACHABLE.format(
                    host=self.host, detail="no answer within %gs" % self.timeout))
            except FileNotFoundError:
                raise Error("no ssh program found on this machine; install OpenSSH")
            err.seek(0)
            text = err.read().decode("utf-8", "replace")
        refuse_changed_host_key(self, text)
        if code != 0 or not self.alive():
            raise Error(classify_ssh_error(self.host, text + offered_host_key(self, text)))
        self.opened_here = True

    def run_helper(self, op: str, params: dict, timeout: float) -> dict:
        """Run the remote helper for OP over the master (if none runs, ssh connects
        by itself for this one command); return its result."""
        argv = self.argv("-T", "-o", "ControlMaster=no",
                         "-o", "ConnectTimeout=%d" % max(1, int(self.timeout)),
                         self.host, REMOTE_COMMAND)
        try:
            r = subproc(argv, input=remote_program(op, params), capture_output=True,
                        timeout=timeout)
        except subprocess.TimeoutExpired:
            raise Error("%s did not answer within %gs" % (self.host, timeout))
        out, err = (r.stdout.decode("utf-8", "replace"), r.stderr.decode("utf-8", "replace"))
        return parse_result(self.host, out, err, r.returncode)

    def control(self, command: str, *extra) -> None:
        """Send a control command (forward, cancel, exit) to the master."""
        r = subproc(self.argv("-O", command, *extra, self.host), stdin=subprocess.DEVNULL,
                    capture_output=True, text=True)
        if r.returncode != 0:
            raise Error("ssh -O %s %s failed for %s: %s"
                        % (command, " ".join(extra), self.host, r.stderr.strip()))

    def close(self) -> None:
        """End the master and every forward it holds."""
        if os.path.exists(self.socket):
            subproc(self.argv("-O", "exit", self.host), stdin=subprocess.DEVNULL,
                    capture_output=True)


# State #######################################################################


MSG_STATE_DIR = (
    "state directory {path} {problem}: nbtunnel keeps tokens there and will not use (or "
    "chmod) a directory that someone else could have planted files in. Give --state-dir a "
    "directory of your own, or fix this one: chown $(id -u) {path} && chmod 700 {path} "
    "(after checking what is in it)"
)


def state_dir(args) -> str:
    """The local state directory: created 0700 when missing; refused when it is not a
    private directory of ours (never chmod-ed: `--state-dir /tmp` must not change /tmp)."""
    path = args.state_dir or os.environ.get("NBTUNNEL_STATE_DIR") or os.path.join(
        os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state"), "nbtunnel")
    path = os.path.abspath(os.path.expanduser(path))
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError("state directory %r: its name is not valid UTF-8; choose another"
                         % (path,)) from None
    if not os.path.lexists(path):
        try:
            os.makedirs(path, mode=0o700)
        except FileExistsError:
            pass  # made by a run started at the same moment; checked below
        except (OSError, ValueError) as e:
            raise UsageError("cannot create state directory %s: %s"
                             % (path, getattr(e, "strerror", None) or e)) from None
    problem = private_dir_problem(path)
    if problem:
        raise UsageError(MSG_STATE_DIR.format(path=path, problem=problem))
    return path


def open_private(path: str, flags: int, what: str):
    """os.open PATH without following a symlink; the fd, or None (with a warning) when
    PATH is a symlink or a file that is not ours."""
    import stat as stat_

    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o600)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.EMLINK):  # EMLINK: FreeBSD's answer
            log.warning("warning: ignoring %s %s: it is a symbolic link", what, path)
            return None
        raise
    st = os.fstat(fd)
    if not stat_.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
        os.close(fd)
        log.warning("warning: ignoring %s %s: %s", what, path, "not a regular file"
                    if not stat_.S_ISREG(st.st_mode) else "it belongs to uid %d" % st.st_uid)
        return None
    return fd


def read_record(path: str):
    """The JSON in record file PATH, or None for a symlink or a file that is not ours
    (warned about: someone planted it; its ssh options must never reach ssh)."""
    fd = open_private(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0), "record")
    if fd is None:
        return None
    with os.fdopen(fd) as f:
        return json.load(f)


def load_records(directory: str) -> list:
    """Every session recorded in DIRECTORY (unreadable files are skipped with a warning)."""
    records = []
    for name in sorted(os.listdir(directory)):
        if not name.endswith(".json"):
            continue
        try:
            rec = read_record(os.path.join(directory, name))
            if rec is None:
                continue
            rec["host"], rec["session"]  # noqa: B018 - both must be there
            records.append(rec)
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("warning: ignoring unreadable record %s (%s)", name, e)
    return records


def write_private(directory: str, name: str, text: str) -> str:
    """Write TEXT to DIRECTORY/NAME through a private temporary file (0600, made by
    mkstemp in the same directory) renamed over it: a planted symlink is replaced,
    never followed, and a reader sees the old file or the new one, whole."""
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix="." + name[:40] + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(directory, name))
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return os.path.join(directory, name)


def save_record(directory: str, rec: dict) -> None:
    """Write REC atomically, readable by the user only."""
    write_private(directory, record_name(rec["host"], rec["session"]),
                  json.dumps(rec, indent=1, sort_keys=True))


def drop_record(directory: str, host: str, session: str) -> None:
    """Forget HOST/SESSION (and its --open page)."""
    base = record_name(host, session)
    for name in (base, base[:-5] + "-open.html"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(directory, name))


@contextlib.contextmanager
def locked(directory: str, host: str, session: str, timeout=None):
    """Serialise nbtunnel runs on one host and session (start, terminate, ensure).

    With TIMEOUT, give up after that many seconds instead of waiting for ever
    (a cron job must not pile up behind a run that hangs)."""
    path = os.path.join(directory, "." + record_name(host, session)[:-5] + ".lock")
    fd = open_private(path, os.O_RDWR | os.O_CREAT, "lock file")
    if fd is None:  # a planted symlink or file: remove it (unlink never follows) and retry
        os.unlink(path)
        fd = open_private(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, "lock file")
        if fd is None:
            raise Error("cannot make the lock file %s" % path)
    try:
        deadline = time.monotonic() + (timeout or 0)
        while fcntl:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (fcntl.LOCK_NB if timeout else 0))
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise Error("another nbtunnel run for %s (session %s) has been busy for "
                                "over %ds; try again later" % (host, session, timeout)) from None
                time.sleep(0.2)
        yield
    finally:
        os.close(fd)


def local_port_open(port: int) -> bool:
    """Does something accept connections on 127.0.0.1:PORT here?"""
    import socket

    with contextlib.closing(socket.socket()) as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def free_local_port() -> int:
    """A port free on 127.0.0.1 right now."""
    import socket

    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_start(pid):
    """When process PID started (Linux: clock ticks since boot, from /proc), or None.

    Together with the pid it names one process: a pid reused later has another start."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, TypeError, ValueError, IndexError):
        return None
    return int(fields[19]) if len(fields) > 19 and fields[0] not in ("Z", "X") else None


def tunnel_listener(conn, tunnel) -> dict:
    """Which local process holds the tunnel's port: the ssh master, or this process for a
    backend that forwards in the foreground; recorded so that a later run can prove that
    the listener on the port is still ours before it sends the token there."""
    pid = os.getpid() if getattr(tunnel, "foreground", False) else conn.master_pid()
    return dict(pid=pid, start=process_start(pid) if pid else None)


def listener_ours(rec: dict) -> bool:
    """Is 127.0.0.1:local_port of REC held by our own process: the recorded listener
    (same pid, same start time, our uid) or, for a record without one, this process?

    Costs a few reads of /proc and no ssh, so the healthy --ensure stays cheap.  Where
    ports cannot be read (no /proc, no lsof), nothing is proven and the token is kept."""
    owner = rec.get("listener") or {}
    pid = owner.get("pid") if isinstance(owner, dict) else None
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        pid = os.getpid()  # a server of our own, as in the unit tests, or a record of old
    elif owner.get("start") is not None and process_start(pid) != owner.get("start"):
        return False  # that process is gone; the pid may be someone else's now
    if pid != os.getpid() and os.path.isdir("/proc/%d" % pid) \
            and os.stat("/proc/%d" % pid).st_uid != os.geteuid():
        return False
    return rec.get("local_port") in listening_ports(pid)


def api_ok(rec: dict, timeout: float = 5.0) -> bool:
    """Does the server of REC answer /api/status with its token through the local port?

    This one HTTP request proves the tunnel and the server healthy without any ssh.
    The token is sent only after the listener on the port is proven ours: another
    local user may have bound the port the moment our tunnel let go of it."""
    import http.client
    import urllib.request

    if not listener_ours(rec):
        log.debug("local port %s is not held by our tunnel: no request sent there",
                  rec.get("local_port"))
        return False
    base = (rec.get("base_url") or "/").strip("/")
    url = "http://127.0.0.1:%d/%sapi/status" % (rec["local_port"], base + "/" if base else "")
    request = urllib.request.Request(url, headers={"Authorization": "token " + rec["token"]})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=timeout) as response:
            return response.status == 200
    except (OSError, ValueError, http.client.HTTPException):
        return False


def listening_ports(pid) -> list:
    """TCP ports process PID listens on (Linux /proc; elsewhere lsof; [] when unknown)."""
    if not isinstance(pid, int) or pid <= 0:
        return []
    if not os.path.isdir("/proc/self/fd"):
        return lsof_ports(pid)
    try:
        inodes = set()
        for fd in os.listdir("/proc/%d/fd" % pid):
            with contextlib.suppress(OSError):
                link = os.readlink("/proc/%d/fd/%s" % (pid, fd))
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
    except (OSError, TypeError):
        return []
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for line in f.readlines()[1:]:
                w = line.split()
                if len(w) > 9 and w[3] == "0A" and w[9] in inodes:  # 0A: LISTEN
                    ports.add(int(w[1].rsplit(":", 1)[1], 16))
    return sorted(ports)


def lsof_ports(pid: int) -> list:
    """TCP ports PID listens on, from lsof (macOS and the BSDs have no /proc)."""
    if not shutil.which("lsof"):
        return []
    try:
        r = subprocess.run(["lsof", "-nP", "-a", "-p", str(pid), "-iTCP", "-sTCP:LISTEN", "-Fn"],
                           stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return sorted({int(m) for m in re.findall(r"^n.*:(\d+)$", r.stdout, re.MULTILINE)})


def find_forward(conn, info: dict):
    """The local port of a forward the master already holds to the server INFO, or None."""
    pid = conn.master_pid()
    listener = dict(pid=pid, start=process_start(pid))
    for port in listening_ports(pid):
        if api_ok(dict(info, local_port=port, listener=listener), timeout=3):
            return port
    return None


# Actions #####################################################################


class Run:
    """Everything one command needs: options, state directory, plugins."""

    def __init__(self, args):
        self.args = args
        self.batch = False  # True: ssh never prompts, even on a terminal (--ensure, --watch)
        self.state = state_dir(args)
        self.records = load_records(self.state)

    def connection(self, host: str, rec=None, tunnel=None) -> Connection:
        """The shared connection for HOST, with the options it was recorded with."""
        options = ssh_options(self.args) or (rec or {}).get("ssh_options", [])
        tunnel = tunnel or get("tunnel", self.args.tunnel)
        conn = tunnel.connection(host, options, self.args.timeout)
        if conn is None:
            conn = Connection(host, options, os.path.realpath(self.state), self.args.timeout)
            if rec and rec.get("socket") and os.path.exists(rec["socket"]):
                conn.socket = rec["socket"]  # found even from cron, whose XDG_RUNTIME_DIR differs
        conn.batch = getattr(conn, "batch", False) or self.batch
        return conn

    def manager(self, name=None) -> SessionManager:
        """The session manager plugin chosen for this run."""
        return get("manager", name or self.args.manager)

    def params(self, session: str) -> dict:
        """What every remote operation is told."""
        managers = {n: m.describe(session) for n, m in MANAGERS.items()}
        return dict(session=session, timeout=self.args.timeout, manager=managers[self.args.manager],
                    managers=managers)


def start_params(run: Run) -> dict:
    """What the remote "start" operation is told for this run's options."""
    args = run.args
    app = args.app or (guess_app(args.jupyter) if args.jupyter is not None else DEFAULT_APP)
    steps, used = environment_steps(args)
    mgr, tunnel = run.manager(), get("tunnel", args.tunnel)
    log.debug("plugins: manager %s (%s), tunnel %s (%s), environment: %s", mgr.name,
              mgr.source, tunnel.name, tunnel.source, ", ".join(
                  "%s (%s)" % (e.name, e.source) for e in used) or "login shell only")
    return dict(run.params(args.session), argv=jupyter_argv(app, args.jupyter) + server_args(),
                app=app, notebook_dir=args.notebook_dir, remote_port=args.remote_port,
                env_steps=steps, environment=[e.name for e in used])


def fresh_record(run: Run, host: str, session: str):
    """The record of HOST/SESSION as it is on disk now (another run may have changed it),
    or None when there is none or it is damaged (load_records has warned about that)."""
    try:
        rec = read_record(os.path.join(run.state, record_name(host, session)))
        ok = (rec["host"], rec["session"]) == (host, session) and isinstance(rec["token"], str) \
            and all(isinstance(rec[k], int) for k in ("local_port", "remote_port"))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return rec if ok else None


def bring_up(run: Run, host: str, conn: Connection, old, params: dict):
    """With the lock held and CONN open: start or reattach, forward, record; (record, info).

    A server that has to be started again gets the token of OLD, and the tunnel
    OLD's local port when it is free, so the URL stays the same.
    """
    args = run.args
    session = args.session
    tunnel = get("tunnel", args.tunnel)
    if old and re.match(r"[A-Za-z0-9]{16,}\Z", str(old.get("token", ""))):
        params = dict(params, token=old["token"])
    try:
        info = conn.run_helper("start", params, timeout=args.timeout * 2 + 30)
        if old is None and not conn.opened_here and not args.local_port:
            port = find_forward(conn, info)  # the record was lost, the forward was not
            old = dict(local_port=port, remote_port=info["port"]) if port else None
        local_port = open_tunnel(conn, tunnel, old, info["port"], args.local_port)
    except BaseException:
        if conn.opened_here:
            conn.close()  # leave nothing running after a failure
        raise
    app = info.get("app") or params["app"]
    mgr = run.manager()
    rec = dict(host=host, session=session, manager=mgr.name, tunnel=tunnel.name,
               environment=params.get("environment", []), plugin=mgr.source, app=app, local_port=local_port, remote_port=info["port"],
               token=info["token"], base_url=info["base_url"], pid=info["pid"],
               log=info.get("log"), ssh_options=conn.options, socket=conn.socket,
               started=info.get("started"))
    rec["url"] = make_url(local_port, rec["base_url"], rec["app"], rec["token"])
    rec["listener"] = tunnel_listener(conn, tunnel)
    save_record(run.state, rec)
    return rec, info


def attach(run: Run, host: str, params: dict):
    """Under the lock: connect, start or reattach, forward, record; (connection, record, info)."""
    with locked(run.state, host, run.args.session):
        old = fresh_record(run, host, run.args.session)
        conn = run.connection(host, old)
        conn.open()
        rec, info = bring_up(run, host, conn, old, params)
    return conn, rec, info


def cmd_start(run: Run, host: str) -> int:
    """Start or reattach to the server of HOST/SESSION, tunnel it, print the URL."""
    args = run.args
    session = args.session
    conn, rec, info = attach(run, host, start_params(run))
    if not args.quiet:
        log.info("%s Jupyter on %s (session %s, %s, remote port %d) at local port %d",
                 "reattached to" if info["reused"] else "started", host, session,
                 rec["manager"], info["port"], rec["local_port"])
    out = dict(public(rec), reused=info["reused"])
    print(json.dumps(out) if args.json else rec["url"], flush=True)
    if args.open:
        open_browser(run.state, rec)
    tunnel = get("tunnel", args.tunnel)
    if tunnel.foreground:
        serve_foreground(conn, tunnel, rec["local_port"], rec["remote_port"])
    return 0


OPEN_PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><meta http-equiv="refresh" content="0;url={url}">
<title>Opening Jupyter</title></head>
<body><p>Opening Jupyter. If nothing happens, <a href="{url}">click here</a>.</p></body></html>
"""


def open_page(directory: str, rec: dict) -> str:
    """A page (0600, in the private state directory) that sends the browser on to the URL
    with its token, as Jupyter's own jpserver-*-open.html does: the browser is given
    this file's name, so the token is never on its command line, where ps shows it."""
    import html

    name = record_name(rec["host"], rec["session"])[:-5] + "-open.html"
    return write_private(directory, name, OPEN_PAGE.format(url=html.escape(rec["url"], quote=True)))


def open_browser(directory: str, rec: dict) -> None:
    """--open: show the session in the local browser (through the private page)."""
    import pathlib
    import webbrowser

    page = pathlib.Path(open_page(directory, rec)).as_uri()
    log.debug("opening %s in the browser", page)
    if not webbrowser.open(page):
        log.warning("warning: could not start a browser; open the URL yourself")


def environment_steps(args):
    """The shell steps of every environment plugin, in order, and the plugins that gave some."""
    steps, used = [], []
    for env in sorted(ENVIRONMENTS.values(), key=lambda e: getattr(e, "order", 50)):
        got = env.steps(args)
        if got:
            steps += got
            used.append(env)
    return steps, used


def interrupt(signum, frame):
    """SIGTERM handler: stop like Ctrl-C."""
    raise KeyboardInterrupt


def serve_foreground(conn, tunnel, local_port: int, remote_port: int) -> None:
    """Hold a tunnel that lives in this process until Ctrl-C or SIGTERM, then close it."""
    old = signal.signal(signal.SIGTERM, interrupt)
    log.info("the tunnel (%s) runs in this process: keep it open, press Ctrl-C to close it "
             "(the server keeps running)", tunnel.name)
    try:
        tunnel.serve(conn)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, old)
        tunnel.close(conn, local_port, remote_port)
        conn.close()
        log.info("tunnel closed")


def open_tunnel(conn, tunnel, old, remote_port: int, wanted) -> int:
    """Forward a local port to REMOTE_PORT, keeping the old local port when possible."""
    if old and old.get("remote_port") != remote_port:
        with contextlib.suppress(Error):  # the server moved: drop the stale forward
            tunnel.close(conn, old["local_port"], old["remote_port"])
    if wanted:
        candidates = [wanted]
    elif old:
        candidates = [old["local_port"]] + [None] * 3
    else:
        candidates = [None] * 3
    error = None
    for port in candidates:
        port = port or free_local_port()
        try:
            tunnel.open(conn, port, remote_port)
            return port
        except Error as e:
            error = e
    raise Error("could not open a local port for the tunnel to %s: %s" % (conn.host, error))


def public(rec: dict) -> dict:
    """The fields of a record that --json shows."""
    keys = ("host", "session", "url", "local_port", "remote_port", "token", "manager", "app",
            "pid", "log", "tunnel", "plugin", "environment")
    return {k: rec.get(k) for k in keys}


def find_record(records, host, session):
    """The record of HOST/SESSION, or None."""
    for rec in records:
        if rec["host"] == host and rec["session"] == session:
            return rec
    return None


def cmd_status(run: Run, host) -> int:
    """Ask each recorded host about its sessions; one line (or JSON object) each."""
    args = run.args
    records = [r for r in run.records if host is None or r["host"] == host]
    if args.session_given:
        records = [r for r in records if r["session"] == args.session]
    by_host = {}
    for rec in records:
        by_host.setdefault(rec["host"], []).append(rec)
    rows = []
    for h, recs in by_host.items():
        conn = run.connection(h, recs[0])
        answers = {}
        up = False
        try:
            up = conn.alive()
            # Over the master when it runs; otherwise over a connection of its own that
            # ends with the command: one handshake either way, and nothing left running.
            params = dict(run.params(recs[0]["session"]), sessions=[r["session"] for r in recs])
            for a in conn.run_helper("status", params, timeout=args.timeout + 10):
                answers[a["session"]] = a
        except Error as e:
            log.warning("warning: %s", e)
        for rec in recs:
            a = answers.get(rec["session"])
            row = dict(public(rec), server=a["server"] if a else "unknown")
            backend = TUNNELS.get(rec.get("tunnel", "ssh"))
            held_here = backend is not None and backend.foreground  # by a foreground nbtunnel
            row["tunnel"] = "up" if (held_here or up) and local_port_open(
                rec["local_port"]) else "down"
            if a and a["server"] == "running" and a["port"] != rec["remote_port"]:
                row["tunnel"] = "down"  # the forward points at an older server
            row["plugin"] = rec.get("plugin") or (
                MANAGERS[rec["manager"]].source if rec.get("manager") in MANAGERS else None)
            row["backend"] = rec.get("tunnel")
            row["environment"] = rec.get("environment", [])
            log.debug("%s %s: served by manager %s (%s), tunnel %s", h, rec["session"],
                      rec.get("manager"), row["plugin"], row["backend"])
            rows.append(row)
    if args.json:
        print(json.dumps(rows))
    else:
        for r in rows:
            print("%s\t%s\tserver=%s\ttunnel=%s\t%s" % (
                r["host"], r["session"], r["server"], r["tunnel"],
                r["url"] if r["tunnel"] == "up" else "local port %s" % r["local_port"]))
        if not rows and not args.quiet:
            log.info("no sessions recorded")
    return 0


def close_tunnel(run: Run, conn: Connection, host: str, session: str, rec=None) -> None:
    """Remove the forward of HOST/SESSION (recorded as REC); end the master too unless
    another recorded session's tunnel uses it."""
    others = [r for r in load_records(run.state) if r.get("socket") == conn.socket
              and (r["host"], r["session"]) != (host, session)]
    if not others:
        conn.close()
    elif rec:
        with contextlib.suppress(Error):
            get("tunnel", rec.get("tunnel", "ssh")).close(conn, rec["local_port"],
                                                           rec["remote_port"])


def cmd_terminate(run: Run, host: str) -> int:
    """Stop the server gracefully, end its session, close the tunnel, drop the record."""
    args = run.args
    session = args.session
    rec = find_record(run.records, host, session)
    with locked(run.state, host, session):
        conn = run.connection(host, rec)
        conn.open()
        try:
            params = dict(run.params(session), force=args.force)
            if rec and rec.get("manager") in MANAGERS:
                params["manager"] = params["managers"][rec["manager"]]
            result = conn.run_helper("stop", params, timeout=args.timeout * 2 + 30)
        except BaseException:
            if conn.opened_here:
                conn.close()
            raise
        if result.get("busy"):
            if conn.opened_here:
                conn.close()
            raise Error(MSG_BUSY.format(session=session, host=host, n=len(result["busy"]),
                                        names=", ".join(result["busy"])), 3)
        close_tunnel(run, conn, host, session, rec)
        drop_record(run.state, host, session)
    if args.json:
        print(json.dumps(dict(host=host, session=session, stopped=result["stopped"],
                              how=result.get("how"))))
    elif not args.quiet:
        log.info("%s: session %s %s", host, session,
                 "stopped" if result["stopped"] else "was not running")
    return 0


# Unattended: ensure and watch ################################################
#
# --ensure is for cron: it repairs what is missing and says nothing otherwise.
# --watch stays in the foreground and does the same every few seconds.  Both
# judge health as a user would, by an HTTP request to Jupyter's API through the
# local port, and neither ever prompts: nobody would see the question.

BACKOFF_MAX = 30  # seconds between reconnection attempts, at most
MSG_NOT_ANSWERING = (
    "Jupyter on {host} (session {session}) runs but does not answer through local port {port}; "
    "its log is {log} there"
)


def repair_lines(host: str, session: str, old, rec: dict, info: dict, tunnel_was_up) -> list:
    """One line for each thing a repair changed (nothing when nothing had to change)."""
    where = "%s (session %s)" % (host, session)
    if not info["reused"]:
        if old:
            return ["restarted Jupyter on %s, which was not running: %s" % (where, rec["url"])]
        return ["started Jupyter on %s: %s" % (where, rec["url"])]
    if old is None:
        return ["reattached to Jupyter already running on %s: %s" % (where, rec["url"])]
    if tunnel_was_up and rec["local_port"] == old["local_port"] \
            and rec["remote_port"] == old["remote_port"]:
        return []
    moved = "" if rec["local_port"] == old["local_port"] else \
        " (local port %d was taken)" % old["local_port"]
    return ["reopened the tunnel to %s on local port %d%s: %s"
            % (where, rec["local_port"], moved, rec["url"])]


def repair(run: Run, host: str, conn: Connection, old, params: dict):
    """With the lock held: connect, start or reattach, forward again; (record, lines)."""
    tunnel_was_up = bool(old) and conn.alive() and local_port_open(old["local_port"])
    conn.open()
    rec, info = bring_up(run, host, conn, old, params)
    deadline = time.monotonic() + 10
    while not api_ok(rec):
        if time.monotonic() > deadline:
            raise Error(MSG_NOT_ANSWERING.format(host=host, session=rec["session"],
                                                 port=rec["local_port"], log=rec.get("log")))
        time.sleep(0.3)
    return rec, repair_lines(host, rec["session"], old, rec, info, tunnel_was_up)


def cmd_ensure(run: Run, host: str) -> int:
    """For cron: start or repair the server and tunnel of HOST/SESSION; silent when healthy."""
    args = run.args
    session = args.session
    run.batch = True  # never prompt, even on a terminal
    rec = fresh_record(run, host, session)
    lines = []
    if not (rec and api_ok(rec)):  # healthy costs one HTTP request and no ssh at all
        params = start_params(run)
        with locked(run.state, host, session, timeout=args.timeout * 3 + 60):
            rec = fresh_record(run, host, session)
            if not (rec and api_ok(rec)):  # else a run we waited for has repaired it
                rec, lines = repair(run, host, run.connection(host, rec), rec, params)
    if args.json:
        print(json.dumps(dict(public(rec), repairs=lines)))
    else:
        for line in lines:
            print(line)
    return 0


def link_failure(conn: Connection, err: Error) -> bool:
    """Was ERR the link failing (worth retrying), not a refusal or a broken server?"""
    text = str(err)
    refusals = (MSG_AUTH.split("(")[0], MSG_HOSTKEY.split(":")[0],
                MSG_HOSTKEY_CHANGED.split(" (")[0])
    if any(text.startswith(m.format(host=conn.host)) for m in refusals):
        return False
    if text.startswith(MSG_UNREACHABLE.split(":")[0].format(host=conn.host)):
        return True
    if " runs but does not answer through local port " in text:
        return True  # the server is there but slow: look again later
    if " did not answer within " in text:
        conn.close()  # a hung link: drop the master so that the next try reconnects
        return True
    return not conn.alive()


def watch_repair(run: Run, host: str, conn: Connection, rec: dict, params: dict):
    """With the lock held: find out what broke and repair it; (record, lines), or None
    when the server was shut down on purpose (File > Shut Down, or --terminate)."""
    args = run.args
    session = args.session
    if api_ok(rec):
        return rec, []  # another run repaired it meanwhile
    if not conn.alive():
        log.warning("the connection to %s is down; reconnecting", host)
    tunnel_was_up = conn.alive() and local_port_open(rec["local_port"])
    conn.open()
    state = conn.run_helper("status", dict(run.params(session), sessions=[session]),
                            timeout=min(args.timeout, 15))[0]
    if state["server"] != "running" and state.get("ended") != "died":
        log.info("Jupyter on %s (session %s) was %s; closing the tunnel", host, session,
                 "shut down" if state.get("ended") == "shutdown" else "terminated")
        close_tunnel(run, conn, host, session, rec)
        drop_record(run.state, host, session)
        return None
    new, lines = repair(run, host, conn, rec, params)
    if tunnel_was_up and not lines and state["server"] == "running":
        lines = ["the tunnel to %s (session %s) answers again" % (host, session)]
    return new, lines


def watch_loop(run: Run, host: str, conn: Connection, rec: dict, params: dict) -> None:
    """Check every --interval seconds, repair with backoff; return once the server is shut down."""
    args = run.args
    session = args.session
    failures = 0
    while True:
        time.sleep(min(BACKOFF_MAX, 2 ** (failures - 1)) if failures else args.interval)
        current = fresh_record(run, host, session)
        if current and api_ok(current, timeout=max(3.0, min(10.0, 2 * args.interval))):
            rec, failures = current, 0
            continue
        try:
            with locked(run.state, host, session):
                result = watch_repair(run, host, conn, fresh_record(run, host, session) or rec,
                                      params)
        except Error as e:
            if not link_failure(conn, e):
                raise
            failures += 1
            log.warning("%s; trying again in %ds", str(e).splitlines()[0],
                        min(BACKOFF_MAX, 2 ** (failures - 1)))
            continue
        if result is None:
            return
        rec, lines = result
        for line in lines:
            log.info("%s", line)
        failures = 0


def cmd_watch(run: Run, host: str) -> int:
    """Start or reattach, then keep server and tunnel healthy until Ctrl-C, SIGTERM or shutdown."""
    args = run.args
    session = args.session
    params = start_params(run)
    conn, rec, info = attach(run, host, params)  # may prompt on a terminal; reconnections never do
    print(json.dumps(dict(public(rec), reused=info["reused"])) if args.json else rec["url"],
          flush=True)
    log.info("watching Jupyter on %s (session %s) every %gs; Ctrl-C closes the tunnel%s", host,
             session, args.interval, " and stops the server" if args.terminate else "")
    run.batch = conn.batch = True
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        watch_loop(run, host, conn, rec, params)
        return 0  # the server was shut down: nothing left to watch
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
    if args.terminate:
        run.records = load_records(run.state)
        return cmd_terminate(run, host)
    close_tunnel(run, conn, host, session, fresh_record(run, host, session) or rec)
    log.info("closed the tunnel to %s (session %s); the server keeps running", host, session)
    return 0


# Service files and nginx #####################################################
#
# Printed, never installed: the user reads the unit, saves it and enables it.  Each
# unit runs this same file with the same Python, every option spelled out, so it
# does not depend on the environment cron, systemd or launchd give it.

SERVICE_INTERVAL = 5  # minutes between two cron runs of --ensure
RESTART_SECONDS = 30  # systemd and launchd: pause before restarting a --watch that ended
NGINX_LISTEN = "127.0.0.1:8080"
MSG_NGINX_NO_PORT = (
    "no session {session} is recorded for {host}, so its local port is unknown: start it "
    "first (nbtunnel.py {host} --session {session} --local-port N) or pass --local-port N"
)


def service_name(host: str, session: str) -> str:
    """A file-name-safe name for the unit of HOST/SESSION."""
    name = "nbtunnel-%s-%s" % (re.sub(r"[^A-Za-z0-9.]+", "-", host).strip("-.") or "host",
                               session)
    return re.sub(r"-{2,}", "-", name)


def program_argv() -> list:
    """This program as an absolute argv: the running Python and this file."""
    return [os.path.abspath(sys.executable), os.path.abspath(__file__)]


def service_argv(args, host: str, action: str, state: str, rec=None, plugins=()) -> list:
    """The nbtunnel command line a unit runs: ACTION (--ensure or --watch) with every option
    in effect; the recorded session fills in ssh options, local port, app and manager."""
    rec = rec or {}
    argv = [host, action, "--session", args.session, "--state-dir", os.path.abspath(state)]
    app = args.app or (None if args.jupyter else rec.get("app"))
    manager = args.manager if args.manager != "tmux" else rec.get("manager", args.manager)
    for option, value in (("--app", app), ("--jupyter", args.jupyter),
                          ("--notebook-dir", args.notebook_dir), ("--manager", manager),
                          ("--rc", args.rc), ("--remote-port", args.remote_port),
                          ("--local-port", args.local_port or rec.get("local_port")),
                          ("--tunnel", None if args.tunnel == "ssh" else args.tunnel)):
        if value is not None:
            argv += [option, str(value)]
    if args.timeout != DEFAULT_TIMEOUT:
        argv += ["--timeout", "%g" % args.timeout]
    ssh = ssh_options(args)
    if args.ssh_config:  # a relative path or ~ would mean something else under cron
        ssh[ssh.index("-F") + 1] = os.path.abspath(os.path.expanduser(args.ssh_config))
    if args.identity and "%" not in args.identity:
        ssh[ssh.index("-i") + 1] = os.path.abspath(os.path.expanduser(args.identity))
    argv += ssh or list(rec.get("ssh_options", []))  # same letters as ssh: -F -o -J -i
    for path in plugins:
        argv += ["--plugin", os.path.abspath(path)]
    return argv


def service_env() -> dict:
    """Environment a unit must set: PATH, when ssh lives outside /usr/bin and /bin."""
    ssh = shutil.which("ssh")
    where = os.path.dirname(os.path.abspath(ssh)) if ssh else "/usr/bin"
    return {} if where in ("/usr/bin", "/bin") else {"PATH": where + ":/usr/bin:/bin"}


def cron_word(word: str) -> str:
    """WORD quoted for a crontab command: sh quoting, and each % outside quotes as \\%."""
    if "\n" in word or "\r" in word:
        raise UsageError("%r holds a line break, which a crontab line cannot carry; use "
                         "--print-service systemd or launchd" % (word,))
    return "\\%".join(shlex.quote(part) for part in word.split("%"))


def cron_entry(argv: list, env: dict, title: str) -> str:
    """A commented crontab line that runs ARGV every SERVICE_INTERVAL minutes."""
    words = ["%s=%s" % (k, cron_word(v)) for k, v in sorted(env.items())]
    words += [cron_word(w) for w in argv]
    return "\n".join([
        "# %s: start or repair it every %d minutes; quiet while all is well." % (
            title, SERVICE_INTERVAL),
        "# Install with: crontab -e (paste the last line), then check: crontab -l",
        "# cron has no ssh-agent: ssh needs a key without a passphrase (-i) or SSH_AUTH_SOCK "
        "set to a running agent's socket.",
        "*/%d * * * * %s" % (SERVICE_INTERVAL, " ".join(words)), ""])


def systemd_word(word: str) -> str:
    """WORD quoted for a systemd ExecStart= line (C escapes, %% and $$)."""
    if word and re.match(r"[A-Za-z0-9_@+=:,./-]+\Z", word):
        return word
    out = []
    for c in word:
        if c in '\\"':
            out.append("\\" + c)
        elif c in "%$":
            out.append(c + c)
        elif c == "\n":
            out.append("\\n")
        elif c == "\t":
            out.append("\\t")
        elif ord(c) < 32 or ord(c) == 127:
            out.append("\\x%02x" % ord(c))
        else:
            out.append(c)
    return '"%s"' % "".join(out)


def systemd_unit(argv: list, env: dict, title: str, name: str) -> str:
    """A systemd user service that keeps ARGV (a --watch) running, restarting it."""
    lines = [
        "# %s: keep it reachable with nbtunnel --watch, restarted whenever it stops." % title,
        "# Save as ~/.config/systemd/user/%s.service, then run:" % name,
        "#   systemctl --user daemon-reload && systemctl --user enable --now %s" % name,
        "#   loginctl enable-linger \"$USER\"   # keep it running while you are logged out",
        "# Without a terminal ssh cannot ask for a passphrase: use a key without one, or an",
        "# ssh-agent and Environment=SSH_AUTH_SOCK=... below.",
        "[Unit]",
        "Description=nbtunnel: %s" % title.replace("%", "%%"),
        "StartLimitIntervalSec=0",
        "",
        "[Service]",
        "Type=simple",
        "ExecStart=" + " ".join(systemd_word(w) for w in argv),
    ]
    lines += ["Environment=" + systemd_word("%s=%s" % kv) for kv in sorted(env.items())]
    lines += [
        "Restart=always",
        "RestartSec=%d" % RESTART_SECONDS,
        "# Stopping is Ctrl-C for --watch: it closes the tunnel; the remote Jupyter keeps running.",
        "KillSignal=SIGINT",
        "TimeoutStopSec=30",
        "",
        "[Install]",
        "WantedBy=default.target",
        "",
    ]
    return "\n".join(lines)


def launchd_plist(argv: list, env: dict, title: str, label: str, home: str) -> str:
    """A launchd agent that keeps ARGV (a --watch) running: RunAtLoad and KeepAlive."""
    import plistlib

    job = dict(Label=label, ProgramArguments=argv, RunAtLoad=True, KeepAlive=True,
               WorkingDirectory=home, ThrottleInterval=RESTART_SECONDS, ProcessType="Background",
               StandardOutPath=os.path.join(home, "Library", "Logs", label + ".log"),
               StandardErrorPath=os.path.join(home, "Library", "Logs", label + ".log"))
    if env:
        job["EnvironmentVariables"] = env
    try:
        text = plistlib.dumps(job).decode()
    except (TypeError, ValueError) as e:  # XML cannot hold most control characters
        raise UsageError("cannot write a launchd plist for these options: %s" % e)
    comment = ("<!-- %s.\n     Save as ~/Library/LaunchAgents/%s.plist and run: launchctl load -w "
               "~/Library/LaunchAgents/%s.plist\n     ssh runs without a terminal: a key with "
               "a passphrase must be in your ssh-agent. -->\n"
               % (re.sub(r"-{2,}|[<>&]", "-", title), label, label))
    head, sep, body = text.partition("<plist")
    return head + comment + sep + body


def nginx_server_block(local_port: int, listen: str, title: str) -> str:
    """An nginx server block in front of 127.0.0.1:LOCAL_PORT, websockets included."""
    upgrade = "$nbtunnel_connection_%d" % local_port
    return "\n".join([
        "# %s: nginx in front of the tunnel at 127.0.0.1:%d." % (title, local_port),
        "# Put this inside the http {} block (e.g. /etc/nginx/conf.d/), nginx -t, reload.",
        "# Host and Origin pass unchanged, so Jupyter's own checks still apply: its token is",
        "# required, websockets (kernels, terminals, events) from other sites are refused and",
        "# names other than localhost/127.0.0.1 are refused unless Jupyter lists them in",
        "# ServerApp.local_hostnames. Keep the tunnel's port fixed (--local-port %d)." % local_port,
        "map $http_upgrade %s {" % upgrade,
        "    default upgrade;",
        "    ''      close;",
        "}",
        "server {",
        "    listen %s;" % listen,
        "    location / {",
        "        proxy_pass http://127.0.0.1:%d;" % local_port,
        "        proxy_http_version 1.1;",
        "        proxy_set_header Host $http_host;",
        "        proxy_set_header Upgrade $http_upgrade;",
        "        proxy_set_header Connection %s;" % upgrade,
        "        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
        "        proxy_set_header X-Forwarded-Proto $scheme;",
        "        proxy_read_timeout 1d;",
        "        proxy_send_timeout 1d;",
        "        proxy_buffering off;",
        "        client_max_body_size 0;",
        "    }",
        "}",
        ""])


def check_listen(value: str) -> str:
    """Return VALUE if it is a safe nginx listen address ([ADDR:]PORT), else UsageError."""
    m = re.match(r"(?:([0-9.]+|\[[0-9A-Fa-f:.]+\]|localhost):)?([0-9]+)\Z", value or "")
    if not m:
        raise UsageError("invalid --nginx-listen %r: give PORT or ADDRESS:PORT, e.g. %s"
                         % (value, NGINX_LISTEN))
    check_port(m.group(2), "--nginx-listen port")
    return value


def cmd_print_service(run: Run, host: str) -> int:
    """Print a crontab line, systemd unit or launchd plist that keeps HOST/SESSION up."""
    args, kind = run.args, run.args.print_service
    rec = find_record(run.records, host, args.session)
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plugins")
    plugins = [p for p in plugin_files(args.plugin or ()) if os.path.dirname(p) != here]
    action = "--ensure" if kind == "cron" else "--watch"
    argv = program_argv() + service_argv(args, host, action, run.state, rec, plugins)
    title = "Jupyter on %s (session %s)" % (host, args.session)
    name = service_name(host, args.session)
    if kind == "cron":
        text = cron_entry(argv, service_env(), title)
    elif kind == "systemd":
        text = systemd_unit(argv, service_env(), title, name)
    else:
        label = "org.nbtunnel." + name[len("nbtunnel-"):]
        text = launchd_plist(argv, service_env(), title, label, os.path.expanduser("~"))
    sys.stdout.write(text)
    return 0


def cmd_print_nginx(run: Run, host: str) -> int:
    """Print an nginx server block in front of the recorded tunnel of HOST/SESSION."""
    args = run.args
    rec = find_record(run.records, host, args.session)
    port = args.local_port or (rec or {}).get("local_port")
    if not port:
        raise UsageError(MSG_NGINX_NO_PORT.format(host=host, session=args.session))
    listen = check_listen(args.nginx_listen or NGINX_LISTEN)
    sys.stdout.write(nginx_server_block(port, listen, "Jupyter on %s (session %s)"
                                        % (host, args.session)))
    if rec and not args.quiet:
        address = listen if ":" in listen else "127.0.0.1:" + listen
        log.info("once nginx runs, open %s", rec["url"].replace(
            "127.0.0.1:%d" % rec["local_port"], address, 1))
    return 0


# Command line ################################################################

CONFIG_KEYS = {  # config-file key -> (argparse dest, type)
    "session": ("session", str), "app": ("app", str), "jupyter": ("jupyter", str),
    "notebook-dir": ("notebook_dir", str), "manager": ("manager", str), "rc": ("rc", str),
    "local-port": ("local_port", str), "remote-port": ("remote_port", str),
    "ssh-config": ("ssh_config", str), "ssh-option": ("ssh_option", list),
    "jump": ("jump", str), "identity": ("identity", str), "accept-new": ("accept_new", bool),
    "timeout": ("timeout", float), "tunnel": ("tunnel", str), "plugin": ("plugin", list),
    "state-dir": ("state_dir", str), "nginx-listen": ("nginx_listen", str),
    "setup": ("setup", str),
}


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    p = argparse.ArgumentParser(
        prog="nbtunnel", description="Start or reattach to Jupyter on a host you reach over "
        "SSH, tunnel it to 127.0.0.1 here, and print the URL.")
    p.add_argument("host", nargs="?", metavar="HOST",
                   help="ssh destination: host, user@host, ssh://user@host:port or an alias")
    act = p.add_mutually_exclusive_group()
    act.add_argument("--terminate", action="store_true", help="stop the server and the tunnel")
    act.add_argument("--status", action="store_true", help="show recorded sessions")
    act.add_argument("--ensure", action="store_true",
                     help="for cron: start or repair whatever is missing; silent when all is well")
    p.add_argument("--watch", action="store_true",
                   help="stay in the foreground and keep the tunnel healthy; Ctrl-C closes the "
                   "tunnel (with --terminate: also stops the server)")
    p.add_argument("--interval", metavar="SECONDS", type=float, default=5.0,
                   help="with --watch: seconds between health checks (default 5)")
    act.add_argument("--print-service", choices=("cron", "systemd", "launchd"),
                     help="print a crontab line, systemd unit or launchd plist that keeps "
                     "the session alive")
    act.add_argument("--print-nginx", action="store_true",
                     help="print an nginx server block in front of the tunnel")
    p.add_argument("--force", action="store_true", help="with --terminate: even if kernels are busy")
    g = p.add_argument_group("the server")
    g.add_argument("--session", metavar="NAME", help="remote session name (default nbtunnel)")
    g.add_argument("--app", choices=sorted(APPS), help="Jupyter front end (default lab)")
    g.add_argument("--jupyter", metavar="CMD", help="remote command that starts Jupyter")
    g.add_argument("--notebook-dir", metavar="DIR", help="remote working directory (literal)")
    g.add_argument("--manager", metavar="NAME", help="session manager plugin (default tmux)")
    g.add_argument("--rc", metavar="FILE", help="remote shell file to source before launching")
    g.add_argument("--remote-port", metavar="N", help="remote port (default: a free one)")
    g = p.add_argument_group("the tunnel and ssh")
    g.add_argument("--local-port", metavar="N", help="local port (default: a free one)")
    g.add_argument("--tunnel", metavar="NAME", help="tunnel backend (default ssh)")
    g.add_argument("-F", "--ssh-config", metavar="FILE", help="ssh config file (ssh -F)")
    g.add_argument("-o", "--ssh-option", metavar="OPTION", action="append",
                   help="ssh option, as ssh -o; repeatable")
    g.add_argument("-J", "--jump", metavar="JUMP", help="jump host (ssh -J)")
    g.add_argument("-i", "--identity", metavar="FILE", help="identity file (ssh -i)")
    g.add_argument("--accept-new", action="store_true", default=None,
                   help="accept an unknown host key once (never the default)")
    g.add_argument("--timeout", metavar="SECONDS", type=float,
                   help="bound on connecting and on server start-up (default %g)" % DEFAULT_TIMEOUT)
    g = p.add_argument_group("nbtunnel")
    g.add_argument("--plugin", metavar="FILE", action="append", help="load a plugin file")
    g.add_argument("--config", metavar="FILE", help="config file (INI)")
    g.add_argument("--state-dir", metavar="DIR", help="where sessions are recorded")
    g.add_argument("--json", action="store_true", help="machine-readable output")
    g.add_argument("--open", action="store_true", help="open the URL in the local browser")
    g.add_argument("--nginx-listen", metavar="[ADDR:]PORT",
                   help="with --print-nginx: where nginx listens (default %s)" % NGINX_LISTEN)
    g.add_argument("-q", "--quiet", action="store_true", help="only errors on stderr")
    g.add_argument("-v", "--verbose", action="store_true", help="show every ssh command run")
    g.add_argument("--version", action="version", version="nbtunnel " + __version__)
    for env in ENVIRONMENTS.values():
        env.add_arguments(p)
    return p


def read_config(path):
    """The INI config file as a ConfigParser (missing is fine, broken is an error)."""
    import configparser

    cfg = configparser.ConfigParser(interpolation=None)
    if path and os.path.exists(path):
        try:
            cfg.read(path)
        except configparser.Error as e:
            raise UsageError("config file %s: %s" % (path, e))
    return cfg


def apply_config(args, cfg, host) -> None:
    """Fill options not given on the command line from [host HOST] or [DEFAULT]."""
    section = cfg["host " + host] if host and cfg.has_section("host " + host) else cfg.defaults()
    for key, value in section.items():
        if key == "host":
            continue
        if key not in CONFIG_KEYS:
            raise UsageError("config file: unknown key %r" % key)
        dest, kind = CONFIG_KEYS[key]
        if getattr(args, dest, None) not in (None, []):
            continue
        if kind is bool:
            value = value.strip().lower() in ("1", "yes", "true", "on")
        elif kind is list:
            value = value.split()
        elif kind is float:
            try:
                value = float(value)
            except ValueError:
                raise UsageError("config file: %s must be a number, not %r" % (key, value))
        setattr(args, dest, value)


def resolve_host(args, cfg, records):
    """HOST from the command line, the config default, or the only record."""
    if args.host:
        return args.host
    if cfg.defaults().get("host"):
        return cfg.defaults()["host"]
    candidates = records
    if args.session_given:
        candidates = [r for r in records if r["session"] == args.session]
    if len(candidates) == 1:
        args.session = candidates[0]["session"]
        return candidates[0]["host"]
    if args.terminate and not args.watch and not candidates:
        return None
    sessions = ", ".join("%s (session %s)" % (r["host"], r["session"]) for r in records) or "none"
    why = "several sessions are recorded" if candidates else "nothing is recorded"
    raise UsageError(MSG_NO_HOST.format(why=why, sessions=sessions))


TOKEN_WORDS = re.compile(
    r"((?:[?&]|\b)token=|\btoken[\"']?\s*[:=]\s*[\"']?|\btoken\s+)([^\s&\"',;]+)", re.IGNORECASE)
LONG_HEX = re.compile(r"\b[0-9a-f]{32,}\b")


class MaskTokens(logging.Filter):
    """Replace tokens in every logged line with "…" (-v output gets pasted into bug reports)."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite the finished message; never drop a line."""
        text = record.getMessage()
        masked = LONG_HEX.sub("…", TOKEN_WORDS.sub(lambda m: m.group(1) + "…", text))
        if masked != text:
            record.msg, record.args = masked, ()
        return True


def configure_logging(args) -> None:
    """stderr messages: -q errors only, -v every ssh command (tokens masked)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("nbtunnel: %(message)s"))
    if args.verbose:
        handler.addFilter(MaskTokens())
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.DEBUG if args.verbose else logging.ERROR if args.quiet else logging.INFO)


def main(argv=None) -> int:
    """Run nbtunnel with ARGV; return the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--plugin", action="append", default=[])
    pre.add_argument("-v", "--verbose", action="store_true")
    pre.add_argument("-q", "--quiet", action="store_true")
    known, _ = pre.parse_known_args(argv)
    configure_logging(known)
    load_plugins(plugin_files(known.plugin))
    parser = build_parser()
    args = parser.parse_args(argv)
    args.session_given = args.session is not None
    try:
        cfg = read_config(args.config or os.environ.get("NBTUNNEL_CONFIG") or os.path.join(
            os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config"),
            "nbtunnel", "config.ini"))
        apply_config(args, cfg, args.host or cfg.defaults().get("host"))
        args.session = check_session(DEFAULT_SESSION if args.session is None else args.session)
        args.local_port = check_port(args.local_port, "--local-port")
        args.remote_port = check_port(args.remote_port, "--remote-port")
        check_ssh_args(args)
        args.manager = args.manager or os.environ.get("NBTUNNEL_MANAGER") or "tmux"
        args.tunnel = args.tunnel or ("ssh" if shutil.which("ssh") or "sshtunnel" not in TUNNELS
                                      else "sshtunnel")
        args.timeout = args.timeout if args.timeout and args.timeout > 0 else DEFAULT_TIMEOUT
        get("manager", args.manager)
        get("tunnel", args.tunnel)
        if args.watch and (args.status or args.ensure):
            raise UsageError("--watch cannot be combined with --%s"
                             % ("status" if args.status else "ensure"))
        if not 0 < args.interval <= 3600:
            raise UsageError("invalid --interval %g: must be more than 0 and at most 3600"
                             % args.interval)
        run = Run(args)
        if args.status:
            return cmd_status(run, args.host)
        host = resolve_host(args, cfg, run.records)
        if host is not None:
            check_host(host)
        if args.print_service:
            return cmd_print_service(run, host)
        if args.print_nginx:
            return cmd_print_nginx(run, host)
        if args.ensure:
            return cmd_ensure(run, host)
        if args.watch:
            return cmd_watch(run, host)
        if args.terminate:
            if host is None:
                if not args.quiet:
                    log.info("nothing to terminate: no sessions recorded")
                return 0
            return cmd_terminate(run, host)
        return cmd_start(run, host)
    except Error as e:
        text = str(e)
        if args.ensure and not args.verbose:  # cron mail: one line says why
            text = text.splitlines()[0]
        log.error("error: %s", text)
        return e.code
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130


# A plugin's `import nbtunnel` must find this running module, not load a second copy.
sys.modules.setdefault("nbtunnel", sys.modules[__name__])

if __name__ == "__main__":
    sys.exit(main())
