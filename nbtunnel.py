#!/usr/bin/env python3
"""nbtunnel: run Jupyter on a machine you reach over SSH and use it from this one.

    nbtunnel.py HOST                 start (or reattach to) Jupyter on HOST, tunnel it, print URL
    nbtunnel.py [HOST] --status      one line per recorded session
    nbtunnel.py [HOST] --terminate   stop the server and the local tunnel
    nbtunnel.py [HOST] --ensure      for cron: repair what is missing, silent when all is well
    nbtunnel.py [HOST] --watch       stay in the foreground keeping server and tunnel healthy
    nbtunnel.py [HOST] --print-service cron|systemd|launchd   a unit that keeps it running
    nbtunnel.py [HOST] --print-nginx   an nginx server block in front of the tunnel

How it works: every step of one command shares one OpenSSH connection (a private
ControlMaster socket), so you authenticate at most once per command.  The remote
work is done by the "Remote side" section of this file, sliced from it and sent on
ssh's stdin (nothing is uploaded): it finds a free port (or a private Unix socket),
starts Jupyter detached in tmux (or another session manager, or as a batch job on a
compute node) through your login environment, waits until the server is ready and
answers with where it listens and its token as JSON.  The tunnel is a forward added
to that same master connection, which stays in the background until ``--terminate``.
The token goes only to a listener proven to be the session's own.

Contents, top to bottom (each a "# Name ####" banner; the remote side's parts are
"# Name ----" banners):
    Constants, Pure helpers, Settings (options, config file, Session);
    Remote side: Files, Proofs: what is ours, Processes, Login environment,
        Jupyter servers, Unix sockets, Session managers, Batch jobs, Login nodes,
        Operations;
    Wire format, Plugins, Progress line, Running ssh, State,
    Proofs: what is ours (this machine's side), Actions,
    Unattended: ensure and watch, --watch's own port, Service files and nginx,
    Command line.
A reviewer of the security rules reads the two "Proofs: what is ours" sections.

Compatibility promise: this one file, with Python 3.8+ on Linux or macOS and the
system ``ssh``, is a complete install; the remote needs a POSIX system with Python
3.6+, Jupyter and the session manager.  The command line, output and exit codes
follow the documented interface; new options may be added, documented ones are not
renamed or dropped.

Plugins are Python files that ``import nbtunnel`` and call ``nbtunnel.register(obj)``
with an object whose ``kind`` is ``"manager"``, ``"environment"`` or ``"tunnel"``
(see the base classes ``SessionManager``, ``PidFileManager``, ``BatchManager``,
``ShellEnvironment``, ``TunnelBackend``, ``Transport``); a plugin declares its options once
as ``nbtunnel.Option`` objects.  They are loaded from ``plugins/`` beside this file,
``$XDG_CONFIG_HOME/nbtunnel/plugins``, ``$NBTUNNEL_PLUGIN_PATH`` and ``--plugin FILE``.
Plugins use only the names in ``__all__``.  Managers and environments describe remote
commands as argv lists and data and run nothing; a tunnel backend, which works on this
machine, starts local processes only through ``subproc``.
"""

import argparse
import base64
import contextlib
import copy
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
import threading
import time

# configparser, hashlib, http.client, importlib.util, socket, tempfile and urllib are
# imported where they are used: they are a good part of the start-up time of --help.

try:
    import fcntl
except ImportError:  # not POSIX: main() refuses to run, with a message that says why
    fcntl = None

__version__ = "0.1.0"
__all__ = [  # the plugin API: what plugins may use (docs/plugins.md, "Writing a plugin")
    "Error", "UsageError", "SshError", "SSH_REFUSALS", "SSH_LINK", "Option", "Session",
    "register", "SessionManager", "PidFileManager", "BatchManager", "ShellEnvironment",
    "TunnelBackend", "Transport", "shell_line", "forward_spec", "remote_call", "ssh_error",
    "subproc"]

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
LOOPBACK = "127.0.0.1"

# Messages that tests and users rely on.
MSG_NO_HOST = "no HOST given and {why}; recorded sessions: {sessions}"
MSG_ONE_RECORDED = ("using session {session}, the one recorded for {host}; --session NAME "
                    "for another")
MSG_WHICH_SESSION = ("several sessions are recorded for {host} and none is named {default}: "
                     "{sessions}; say which with --session NAME")
MSG_HOSTKEY = (
    "the host key of {host} is not known here: check it (with the administrator, "
    "or `ssh-keyscan HOST | ssh-keygen -lf -` from a network you trust) and connect once with "
    "plain ssh to record it, or pass --accept-new to accept it on first contact"
)
MSG_HOSTKEY_OFFERED = "; the host offered: {line}"
MSG_HOSTKEY_CHANGED = (
    "the host key of {host} has CHANGED since it was recorded (possible man-in-the-middle); "
    "nbtunnel will not connect to it, whatever StrictHostKeyChecking says. "
    "Check with the administrator and fix known_hosts"
)
MSG_AUTH = (
    "{host} refused authentication ({detail}). Without a terminal (cron), ssh needs a "
    "key without a passphrase or a running ssh-agent (SSH_AUTH_SOCK)"
)
MSG_NEEDS_PERSON = (
    "{host} asks for a one-time code or a password after the key ({detail}), which cron cannot "
    "type: run `{command}` on a terminal; cron can use that connection while it lives"
)
MSG_NEEDS_PERSON_TTY = (
    "{host} asked for a one-time code or a password after the key and did not accept what was "
    "typed ({detail}); run the command again and type a fresh code"
)
MSG_UNREACHABLE = "cannot reach {host}: {detail}"
MSG_NO_PYTHON = "no python3 or python on the PATH of {host}; nbtunnel needs Python 3.6+ there"
MSG_NO_STREAMLOCAL = (
    "the ssh server of {host} does not allow forwarding to a Unix socket "
    "(AllowStreamLocalForwarding): run without --unix-socket"
)
MSG_SOCKET_BATCH = (
    "--unix-socket cannot be used with --manager {manager}: the server runs as a job on a "
    "compute node, and a Unix socket there cannot be reached from the login node's ssh "
    "server; run without --unix-socket (the job's server then listens on the node's cluster "
    "address, with its token)"
)
MSG_SOCKET_TUNNEL = (
    "--unix-socket cannot be used with --tunnel {tunnel}: it cannot forward to a Unix "
    "socket; use --tunnel ssh (OpenSSH), or run without --unix-socket"
)
MSG_LOCAL_PORT = (
    "local port {port} is in use on this machine; choose another with --local-port or "
    "leave it out"
)
MSG_UNDONE = "the Jupyter this command started on {host} (session {session}) was stopped again"
MSG_NOTHING_LEFT = "nothing is left running on {host}"
MSG_REUSED_KEPT = "the server that already ran on {host} (session {session}) keeps running"
MSG_NO_ANSWER = ("{host} did not answer: session {session} there was left as it was (a server "
                 "it runs keeps running; --status shows it)")
MSG_KEPT = ("Jupyter on {host} (session {session}) had started and is recorded; it keeps "
            "running (--terminate stops it)")
MSG_BUSY = (
    "not terminating {session} on {host}: {n} kernel(s) busy ({names}); "
    "wait for them or pass --force"
)


class Error(Exception):
    """The one exception that reaches the user: a message, a kind and an exit code.

    ``kind`` says what went wrong in a word that code may test (retry decisions
    read it, never the message text); ``log_tail`` is the remote log, if any; FACTS are
    what a caller needs to act on that kind (``how`` a session "ended"), kept as
    attributes and in ``facts``."""

    code = 1
    kind = "error"

    def __init__(self, message: str, code=None, kind=None, log_tail: str = "", **facts):
        super().__init__(message)
        if code is not None:
            self.code = code
        if kind is not None:
            self.kind = kind
        self.log_tail = log_tail
        self.facts = facts
        vars(self).update(facts)

    def text(self) -> str:
        """The message with the remote log appended, as the user sees it."""
        if not self.log_tail:
            return str(self)
        return "%s\n--- last lines of the remote log ---\n%s" % (self, self.log_tail)


class UsageError(Error):
    """Bad usage or bad input: exit 2."""

    code = 2
    kind = "usage"

    def __init__(self, message: str):
        super().__init__(message)


class SshError(Error):
    """ssh itself failed; ``kind`` is one of SSH_REFUSALS or SSH_LINK."""


class RemoteError(Error):
    """The remote side answered with a failure of a kind it named (see ``Fail`` there)."""


# ssh failures that no retry can mend, and those a later try may (a link that is down).
SSH_REFUSALS = ("hostkey-unknown", "hostkey-changed", "auth", "no-ssh", "no-python",
                "needs-person")
SSH_LINK = ("unreachable", "no-answer")


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
    for what, dest in (("--ssh-config", "ssh_config"), ("-i", "identity")):
        value = None if args.source(dest) == "record" else getattr(args, dest)  # checked then
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
        raise UsageError("invalid --jupyter %r: %s" % (text, e)) from None


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


DEFAULT_IDLE = 60  # minutes: a batch job that nobody uses ends after that (--idle-timeout)


def idle_minutes(value, manager) -> float:
    """The idle timeout in minutes (0: never): VALUE asked or recorded, else the default
    of MANAGER (a plugin, or None when unknown): DEFAULT_IDLE for a batch manager."""
    if value is not None:
        return value
    return DEFAULT_IDLE if getattr(manager, "batch", False) else 0


def idle_args(minutes: float) -> list:
    """Jupyter Server's own settings that end it after MINUTES without activity: the
    server stops once it has had no kernel, no terminal and no activity that long; a
    kernel idle that long is shut down even with a browser connected, never while busy,
    and so is a terminal without input or output (docs/clusters.md, "Idle end")."""
    if minutes <= 0:
        return []
    secs = max(1, round(minutes * 60))
    # Kernels and terminals are looked at a few times within the timeout (Jupyter's
    # default, every 300 s, would let a short one run minutes over); the server itself
    # looks once a minute (fixed in Jupyter Server), so it ends up to a minute late.
    every = max(1, min(60, secs // 4))
    return ["--ServerApp.shutdown_no_activity_timeout=%d" % secs,
            "--MappingKernelManager.cull_idle_timeout=%d" % secs,
            "--MappingKernelManager.cull_interval=%d" % every,
            "--MappingKernelManager.cull_connected=True",
            "--MappingKernelManager.cull_busy=False",
            "--TerminalManager.cull_inactive_timeout=%d" % secs,
            "--TerminalManager.cull_interval=%d" % every]


def socket_server_args() -> list:
    """Arguments nbtunnel adds in socket mode (--sock and --sock-mode are added remotely):
    no --ip and no port, so that the server opens no TCP port at all."""
    return ["--no-browser"]


def destination(info: dict) -> str:
    """Where the tunnel leads on the remote, from the server's INFO (the remote's answer):
    the path of its Unix socket, or ADDRESS:PORT as the remote reaches it (127.0.0.1, or a
    batch job's compute node from the login node; an IPv6 address in brackets)."""
    if info.get("sock"):
        return info["sock"]
    address = info.get("address") or LOOPBACK
    return "%s:%d" % ("[%s]" % address if ":" in address else address, info["port"])


def recorded_destination(rec: dict) -> str:
    """The destination of the tunnel that the record REC describes."""
    if rec.get("destination"):
        return rec["destination"]
    return destination(dict(port=rec.get("remote_port"), sock=rec.get("remote_socket"),
                            address=rec.get("remote_host")))


def local_socket_max() -> int:
    """The longest Unix socket path (bytes) this machine's ssh accepts in a forward."""
    return 107 if sys.platform.startswith("linux") else 103


def make_url(port: int, base_url: str, app: str, token: str) -> str:
    """The browser URL for a server reached on local PORT."""
    base = "/" + (base_url or "/").strip("/")
    path = APPS.get(app, APPS[DEFAULT_APP])[1]
    path = (base.rstrip("/") + "/" + path) if path else base.rstrip("/") + "/"
    return "http://127.0.0.1:%d%s?token=%s" % (port, path, token)


def seconds(text) -> float:
    """TEXT as a number of seconds above 0 and at most 30 days, else ValueError."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0  # not a number: the message below says what is wanted
    if not 0 < value <= 30 * 86400:  # also refuses nan and inf
        raise ValueError("must be a number of seconds above 0 and at most 30 days")
    return value


def port(text) -> int:
    """TEXT as a port number, else UsageError (check_port's message)."""
    return check_port(text, "port")


DURATION_UNITS = {"s": 1 / 60, "m": 1, "min": 1, "h": 60, "": 1}  # in minutes
DURATION_WANTED = ("must be 0 (never) or a duration from 1s to 30 days: 45s, 30m, 2h, or a "
                   "bare number of minutes")


def minutes(text) -> float:
    """TEXT, a duration (45s, 30m or 30min, 2h; a bare number is minutes, as Slurm's
    --time), in minutes: 0 (never), or 1 s to 30 days; else ValueError."""
    match = re.fullmatch(r"\s*(\d+\.?\d*|\.\d+)\s*([A-Za-z]*)\s*", text)
    unit = match and DURATION_UNITS.get(match.group(2).lower())
    value = float(match.group(1)) * unit if unit else -1.0  # digits only: no nan, inf, 1e9
    if value != 0 and not 1 / 60 <= value <= 30 * 1440:
        raise ValueError(DURATION_WANTED)
    return value


def duration_text(minutes: float) -> str:
    """MINUTES as people read it, and as --idle-timeout takes it back: 45s, 30min, 2h."""
    secs = max(1, round(minutes * 60)) if minutes else 0
    if secs and secs % 3600 == 0:
        return "%dh" % (secs // 3600)
    return "%dmin" % (secs // 60) if secs % 60 == 0 else "%ds" % secs


def node_address(text) -> str:
    """TEXT as an address or host name (letters, digits, . : - _), else ValueError."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.:_-]{0,252}", text):
        raise ValueError("must be an address or a host name")
    return text


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


def ssh_values(words) -> dict:
    """The option values that ssh argv WORDS (as ssh_options makes them) stand for."""
    values, flags = {}, {"-F": "ssh_config", "-J": "jump", "-i": "identity"}
    for flag, word in zip(words[::2], words[1::2]):
        if flag == "-o" and word == "StrictHostKeyChecking=accept-new":
            values["accept_new"] = True
        elif flag == "-o":
            values.setdefault("ssh_option", []).append(word)
        elif flag in flags:
            values[flags[flag]] = word
    return values


def classify_ssh_error(host: str, stderr: str) -> SshError:
    """Turn ssh's stderr into an SshError of a kind, with a message that names HOST."""
    text = stderr.strip()
    last = text.splitlines()[-1] if text else "ssh failed without a message"
    if "IDENTIFICATION HAS CHANGED" in text:
        return ssh_error(host, "hostkey-changed")
    if "Host key verification failed" in text or re.search(r"No \S+ host key is known", text):
        found = re.search(r"^.*\bkey fingerprint is \S+", text, re.MULTILINE)
        offered = MSG_HOSTKEY_OFFERED.format(line=found.group(0).strip()) if found else ""
        return SshError(MSG_HOSTKEY.format(host=host) + offered, kind="hostkey-unknown")
    denied = re.search(r"Permission denied \(([^)]*)\)", text)
    methods = denied.group(1).split(",") if denied else []
    if methods and "publickey" not in methods and (
            "keyboard-interactive" in methods or "password" in methods):
        return ssh_error(host, "needs-person", last)  # the key was taken; a person must go on
    if "Permission denied" in text or "Too many authentication failures" in text:
        return ssh_error(host, "auth", last)
    return ssh_error(host, "unreachable", last)


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


# Settings ####################################################################
#
# Every setting of a session is decided once, by resolve(), into a Session that remembers
# where each came from; everything after it reads the Session, not the parser's Namespace.

BOOLEANS = {"1": True, "yes": True, "true": True, "on": True,
            "0": False, "no": False, "false": False, "off": False}


class Option:
    """One option of a session, declared once: the core wires it into the parser, the
    config file (key = FLAG without dashes), the record and the service units.

    ``type`` converts one value from text (raise ValueError or UsageError to refuse
    it); ``multiple`` makes it repeatable (one value per line in the config file);
    ``switch`` makes it a flag without a value; ``start`` says it shapes the server
    itself, so a reattach with another value warns that the running server keeps its own;
    ``sticky`` (the default) lets later runs of the session take it from the record;
    ``show`` turns one value back into the text ``type`` takes (default: str, %g for a float).
    """

    def __init__(self, flag: str, help: str, metavar=None, type=str, multiple=False,
                 short=None, choices=None, switch=False, start=True, sticky=True, show=None):
        if not re.match(r"--[a-z][a-z0-9-]{1,30}\Z", flag):
            raise Error("invalid option name %r: use --lowercase-words" % (flag,))
        self.flag, self.key, self.dest = flag, flag[2:], flag[2:].replace("-", "_")
        self.help, self.metavar, self.type, self.multiple = help, metavar, type, multiple
        self.short, self.choices, self.switch, self.start = short, choices, switch, start
        self.sticky = sticky  # a later run of the session takes it from the record
        self.show = show

    def add_to(self, parser) -> None:
        """Add it to PARSER (an argparse parser or group); values are converted later,
        by ``convert``, so that the command line and the config file are checked alike."""
        names = [self.short, self.flag] if self.short else [self.flag]
        if self.switch:
            parser.add_argument(*names, dest=self.dest, action="store_true", default=None,
                                help=self.help)
        else:
            metavar = self.metavar or ("{%s}" % ",".join(self.choices) if self.choices else "VALUE")
            parser.add_argument(*names, dest=self.dest, metavar=metavar,
                                action="append" if self.multiple else "store", help=self.help)

    def from_config(self, text: str):
        """The value of config-file TEXT, before ``convert``."""
        if self.switch:
            try:
                return BOOLEANS[text.strip().lower()]
            except KeyError:
                raise UsageError("config file: %s must be yes or no, not %r"
                                 % (self.key, text)) from None
        if self.multiple:
            return [line.strip() for line in text.splitlines() if line.strip()]
        return text.strip()

    def convert(self, value, where: str):
        """VALUE checked and converted (from WHERE, for the message), else UsageError."""
        if self.switch:
            return bool(value)
        values = list(value) if self.multiple else [value]
        out = []
        for one in values:
            try:
                one = self.type(one) if isinstance(one, str) else one
            except (ValueError, UsageError) as e:
                raise UsageError("invalid %s %r (%s): %s" % (self.flag, one, where, e)) from None
            if self.choices and one not in self.choices:
                raise UsageError("invalid choice for %s: %r (%s); choose from %s" % (
                    self.flag, one, where, ", ".join(self.choices)))
            out.append(one)
        return out if self.multiple else out[0]

    def words(self, value) -> list:
        """VALUE as command-line words (for a service unit)."""
        if self.switch:
            return [self.flag] if value else []
        values = value if self.multiple else [value]
        show = self.show or (lambda one: "%g" % one if isinstance(one, float) else str(one))
        return [w for one in values for w in (self.short or self.flag, show(one))]


# The options that make up a session, in the order --help lists them.  Plugins add
# their own (see Option); all of them are recorded and given to service units.
SERVER_OPTIONS = [
    Option("--app", "Jupyter front end (default lab)", choices=sorted(APPS)),
    Option("--jupyter", "remote command that starts Jupyter", metavar="CMD"),
    Option("--notebook-dir", "remote working directory (literal)", metavar="DIR"),
    Option("--manager", "session manager plugin (default tmux)", metavar="NAME"),
    Option("--remote-port", "remote port (default: a free one)", metavar="N", type=port),
    Option("--unix-socket", "listen on a Unix socket in a private directory, not a TCP "
           "port (no other user can connect)",
           switch=True),
    # how long without activity, then Jupyter ends (idle_args); 0: never.  Kept in
    # minutes (records, --json), a fraction for seconds: 0.75 is 45 s
    Option("--idle-timeout", "end after TIME idle: 45s, 30m, 2h (0: never; batch %s)"
           % duration_text(DEFAULT_IDLE), metavar="TIME",
           type=minutes, show=duration_text),
    # a batch job's address on its node, as the login node reaches it (r_node_address)
    Option("--node-address", "batch job: its node's address for Jupyter", metavar="ADDR",
           type=node_address),
]
TUNNEL_OPTIONS = [
    Option("--local-port", "local port (default: a free one)", metavar="N", type=port,
           start=False),
    Option("--tunnel", "tunnel backend (default ssh)", metavar="NAME", start=False,
           sticky=False),  # a foreground tunnel ends with its process: nothing to take over
    Option("--ssh-config", "ssh config file (ssh -F)", metavar="FILE", short="-F", start=False),
    Option("--ssh-option", "ssh option, as ssh -o; repeatable", metavar="OPTION", short="-o",
           multiple=True, start=False),
    Option("--jump", "jump host (ssh -J)", metavar="JUMP", short="-J", start=False),
    Option("--identity", "identity file (ssh -i)", metavar="FILE", short="-i", start=False),
    Option("--accept-new", "accept an unknown host key once (never the default)", switch=True,
           start=False),
    Option("--timeout", "bound on connecting and on server start-up (default %g)"
           % DEFAULT_TIMEOUT, metavar="SECONDS", type=seconds, start=False),
]
# Config keys that are not options of a session.
RUN_KEYS = ("session", "state-dir", "plugin", "nginx-listen")


def config_path(args):
    """The config file to read and whether it must exist (it must when named by --config)."""
    if args.config:
        return args.config, True
    return os.environ.get("NBTUNNEL_CONFIG") or os.path.join(
        os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config"),
        "nbtunnel", "config.ini"), False


def read_config(path, required: bool = False):
    """The INI config file as a ConfigParser (missing is fine unless REQUIRED; broken is
    an error)."""
    import configparser

    cfg = configparser.ConfigParser(interpolation=None)
    if required and not os.path.isfile(path):
        raise UsageError("config file %s not found" % path)
    if path and os.path.exists(path):
        try:
            cfg.read(path)
        except (configparser.Error, OSError, UnicodeDecodeError) as e:
            raise UsageError("config file %s: %s" % (path, e)) from None
    return cfg


def config_section(cfg, host) -> dict:
    """The config keys in effect for HOST, each as (text, where): its [host HOST] section
    over [DEFAULT]."""
    name, defaults = "host %s" % host, cfg.defaults()
    section = {k: (v, "config [DEFAULT]") for k, v in defaults.items()}
    if host and cfg.has_section(name):
        section.update((k, (v, "config [%s]" % name)) for k, v in cfg[name].items()
                       if defaults.get(k) != v)
    if section.get("plugin", ("", "config [DEFAULT]"))[1] != "config [DEFAULT]":
        raise UsageError("config file: plugin = ... belongs in [DEFAULT] (plugins are loaded "
                         "before the host is known)")
    known = {o.key for o in session_options()} | set(RUN_KEYS) | {"host"}
    unknown = sorted(set(section) - known)
    if unknown:
        raise UsageError("config file: unknown key %r (known: %s)"
                         % (unknown[0], ", ".join(sorted(known))))
    return section


class Session:
    """The settings of one session for one command, decided once by ``resolve``: ``host``
    (None: --status or --all without one), ``name``, ``values`` (each option's dest -> the
    value asked for, None when none was; also read as attributes, as plugins' ``steps(args)``
    and ``job_options(args)`` do), where each came from (``source``), the ``manager`` and
    ``tunnel`` plugins (``batch``: a batch manager), the ``state`` directory and its
    ``records``, ``timeout``, ``wait_timeout`` (for a job in a queue too), ``interval``
    (--watch) and ``no_prompt`` (ssh never prompts: --ensure, --watch)."""

    def __init__(self, host, name: str, values: dict, origin: dict, state: str, records: list,
                 nginx_listen=None):
        self.host, self.name, self.values, self.origin = host, name, values, origin
        self.state, self.records, self.nginx_listen = state, records, nginx_listen
        self.no_prompt = False
        self.manager = get("manager", values["manager"] or os.environ.get("NBTUNNEL_MANAGER")
                           or "tmux")
        self.batch = bool(getattr(self.manager, "batch", False))
        self.tunnel = get("tunnel", values["tunnel"] or (
            "ssh" if shutil.which("ssh") or "sshtunnel" not in TUNNELS else "sshtunnel"))
        self.timeout = values["timeout"] or DEFAULT_TIMEOUT
        # A batch manager waits longer for its queue; connecting keeps the usual bound.
        self.wait_timeout = values["timeout"] or getattr(
            self.manager, "default_timeout", None) or DEFAULT_TIMEOUT

    def __getattr__(self, name):  # an option's value: session.notebook_dir
        if name not in self.__dict__.get("values", {}):
            raise AttributeError(name)
        return self.values[name]

    def source(self, dest: str) -> str:
        """Where the value of DEST (an option's dest, "session" or "state_dir") came from:
        "command line", "config [host H]", "config [DEFAULT]", "record" or "default"."""
        return self.origin.get(dest, "default")

    def asked(self, start_only: bool = False) -> dict:
        """The options that were asked for (not defaults), as recorded; with START_ONLY,
        those that shape the server."""
        return {o.dest: self.values[o.dest] for o in session_options()
                if o.dest in self.origin and (o.start or not start_only)}

    def record(self):
        """The session's record as loaded, or None."""
        return find_record(self.records, self.host, self.name)

    def recorded(self, same_name=False) -> dict:
        """{host: its records} of the recorded sessions (of HOST; named NAME too with
        SAME_NAME), in record order."""
        by_host = {}
        for rec in self.records:
            if self.host in (None, rec["host"]) and (not same_name or rec["session"] == self.name):
                by_host.setdefault(rec["host"], []).append(rec)
        return by_host

    def params(self, session=None, **extra) -> dict:
        """What a remote operation on SESSION (default: this one) is told: this one place
        builds it."""
        managers = {n: m.describe(session or self.name, self) for n, m in MANAGERS.items()}
        return dict(session=session or self.name, timeout=self.timeout, managers=managers,
                    manager=managers[self.manager.name], **extra)

    def connection(self, rec=None, host=None) -> "Connection":
        """The shared connection to HOST (default: the session's), with the ssh options
        REC was recorded with unless others were asked for."""
        host = host or self.host
        options = ssh_options(self) or (rec or {}).get("ssh_options", [])
        conn = self.tunnel.connection(host, options, self.timeout)
        if conn is None:
            conn = Connection(host, options, os.path.realpath(self.state), self.timeout)
            node, route = login_node(rec or {}), (rec or {}).get("login_route")
            # The way its connection went, while the ssh config still leads that way (a
            # laptop on another network may resolve the name to other addresses); else
            # the name, wherever it lands, and on from there.
            if node and route == "jump" or route == "direct" and node and node_way(
                    options, host, node) == "direct":
                conn.point(node, route == "jump")
            if rec and rec.get("socket") and os.path.exists(rec["socket"]):
                conn.socket = rec["socket"]  # found even from cron, whose XDG_RUNTIME_DIR differs
        conn.no_prompt = getattr(conn, "no_prompt", False) or self.no_prompt
        return conn


def resolve_host(args, cfg, records):
    """(HOST, the session name when it comes from the record too) from the command line,
    the config default, or the only record."""
    if args.host:
        return args.host, None
    if cfg.defaults().get("host"):
        return cfg.defaults()["host"].strip(), None
    candidates = records
    if args.session is not None:
        candidates = [r for r in records if r["session"] == args.session]
    if len(candidates) == 1:
        return candidates[0]["host"], None if args.session else candidates[0]["session"]
    if args.terminate and not args.watch and not candidates:
        return None, None
    sessions = ", ".join("%s (session %s)" % (r["host"], r["session"]) for r in records) or "none"
    why = "several sessions are recorded" if candidates else "nothing is recorded"
    raise UsageError(MSG_NO_HOST.format(why=why, sessions=sessions))


def only_recorded(records, host: str):
    """The session that HOST alone means when no session name was asked for: the one
    recorded for HOST (ended sessions aside); None when none is, or the default name is
    one of them (it keeps meaning that one); a UsageError listing them when several are."""
    live = [r["session"] for r in records if r["host"] == host and not r.get("ended")]
    if not live or DEFAULT_SESSION in live:
        return None
    if len(live) > 1:
        raise UsageError(MSG_WHICH_SESSION.format(host=host, default=DEFAULT_SESSION,
                                                  sessions=", ".join(live)))
    return live[0]


def resolve(args, cfg, records=None, host=None, name=None, state=None) -> Session:
    """Decide every setting of a session once: HOST, then each option from the command
    line (ARGS), the config section of that HOST, the session's record, the default.  HOST
    stays None for --status or --all without one, or --terminate with nothing recorded;
    a session of --all comes with HOST, NAME, STATE and RECORDS decided."""
    values = {o.dest: getattr(args, o.dest, None) for o in session_options()}
    origin = {dest: "command line" for dest, value in values.items() if value is not None}
    fixed, loaded = state is not None, records is None
    state = state or state_dir(args.state_dir or cfg.defaults().get("state-dir", "").strip())
    records = load_records(state) if loaded else records
    if host is None and (args.host or not (args.status or args.all or args.forget)):
        host, name = resolve_host(args, cfg, records)
    if host is not None:
        check_host(host)
    section = config_section(cfg, host)
    text, where = section.get("state-dir", ("", ""))
    if args.state_dir or text.strip():
        origin["state_dir"] = "command line" if args.state_dir else where
    if not (fixed or args.state_dir) and where.startswith("config [host"):
        state = state_dir(text.strip())  # the host's own state directory: its records
        records = load_records(state) if loaded else records
    text, where = section.get("session", ("", ""))
    for value, came in ((name, "record"), (args.session, "command line"),
                        (text.strip() or None, where)):
        if value is not None:  # an empty --session= is refused, not taken as the default
            name, origin["session"] = value, came
            break
    if name is None and host is not None and not (args.status or args.all or args.forget):
        name = only_recorded(records, host)  # the session to take over, as --session NAME
        if name is not None:
            origin["session"] = "record"
            if not args.ensure:  # cron: silent when all is well
                log.info(MSG_ONE_RECORDED.format(session=name, host=host))
    name = check_session(DEFAULT_SESSION if name is None else name)
    rec = find_record(records, host, name) if host is not None and not args.status else None
    rec = None if rec and rec.get("ended") else rec  # ended on purpose: nothing to take over
    recorded = dict((rec or {}).get("options") or {})
    if rec and "options" not in rec:  # a record from before options were recorded
        recorded = dict(ssh_values(rec.get("ssh_options") or []), manager=rec.get("manager"),
                        app=rec.get("app"))
    for option in session_options():
        dest = option.dest
        if values[dest] is None and option.key in section:
            text, origin[dest] = section[option.key]
            values[dest] = option.from_config(text)
        elif values[dest] is None and option.sticky and recorded.get(dest) is not None:
            values[dest], origin[dest] = recorded[dest], "record"
        if values[dest] is not None:
            values[dest] = option.convert(values[dest], origin[dest])
    pending = {}
    if (args.ensure or args.watch) and rec and isinstance(rec.get("options"), dict):
        pending = repeat_recorded(values, origin, rec)
    nginx = args.nginx_listen or section.get("nginx-listen", ("",))[0].strip() or None
    session = Session(host, name, values, origin, state, records, nginx)
    session.pending, session.cfg = pending, cfg
    drop_other_plugins(session)
    check_ssh_args(session)
    session.interval = 0.0
    with contextlib.suppress(ValueError):
        session.interval = float(args.interval)
    if not 0 < session.interval <= 3600:  # also refuses nan and inf
        raise UsageError("invalid --interval %r: must be more than 0 and at most 3600"
                         % (args.interval,))
    return session


def recorded_start_options(rec: dict) -> dict:
    """The start options REC's server was started with (its manager included)."""
    start = {o.dest for o in session_options() if o.start}
    return dict({k: v for k, v in (rec.get("options") or {}).items() if k in start},
                manager=rec.get("manager"))


def repeat_recorded(values: dict, origin: dict, rec: dict) -> dict:
    """A repair (--ensure, --watch, the units) restarts a server exactly as it last ran:
    REC's start options replace those in VALUES (and ORIGIN).  Returns what a deliberate
    start would use instead, {dest: (value, where from)}: it applies at the next one."""
    recorded, pending = recorded_start_options(rec), {}
    asked = rec.get("options") or {}
    for option in session_options():
        dest, was = option.dest, recorded.get(option.dest)
        if not option.start or origin.get(dest) == "record" or values[dest] == was:
            continue
        if values[dest] is not None and (dest != "manager" or was is not None):
            pending[dest] = (values[dest], origin[dest])
        values[dest] = was
        if asked.get(dest) is None:  # its start did not ask for it (the manager it ran
            origin.pop(dest, None)   # under by default): repeating it is no asking either
        else:
            origin[dest] = "record"
    return pending


def option_owner(option):
    """The manager or tunnel plugin that OPTION belongs to, or None (the core's, or an
    environment plugin's: those apply to every session)."""
    for plugin, one in plugin_options():
        if one.dest == option.dest and plugin.kind in ("manager", "tunnel"):
            return plugin
    return None


def option_applies(option, names: dict) -> bool:
    """Does OPTION mean anything for a session run by NAMES (its manager and tunnel)?"""
    owner = option_owner(option)
    return owner is None or owner.name == names.get(owner.kind)


MSG_OTHER_PLUGIN = (
    "{flag} is an option of the {kind} plugin {plugin}, and this session runs with --{kind} "
    "{using}: leave {flag} out, or add --{kind} {plugin}"
)


def drop_other_plugins(session: Session) -> None:
    """Refuse an option of a manager or tunnel plugin that does not serve SESSION when it
    was given on the command line; ignore it from the config file (a [DEFAULT] may hold
    Slurm keys for several hosts) or from an older record."""
    names = dict(manager=session.manager.name, tunnel=session.tunnel.name)
    session.pending = {dest: value for dest, value in session.pending.items()
                       if all(option_applies(o, names) for o in session_options()
                              if o.dest == dest)}
    for option in session_options():
        dest = option.dest
        if session.values[dest] is None or option_applies(option, names):
            continue
        if session.source(dest) == "command line":
            owner = option_owner(option)
            raise UsageError(MSG_OTHER_PLUGIN.format(flag=option.flag, kind=owner.kind,
                                                     plugin=owner.name, using=names[owner.kind]))
        session.values[dest] = None
        session.origin.pop(dest, None)


def config_pending(cfg, rec: dict) -> dict:
    """What the config file would change at the next deliberate start of the session of
    REC: {dest: (value, where from)}; {} for an unreadable section."""
    try:
        section = config_section(cfg, rec["host"])
    except UsageError:
        return {}
    recorded, pending = recorded_start_options(rec), {}
    names = dict(manager=rec.get("manager") or "tmux", tunnel=rec.get("tunnel") or "ssh")
    for option in session_options():
        if option.start and option.key in section and option_applies(option, names):
            text, where = section[option.key]
            try:
                value = option.convert(option.from_config(text), where)
            except UsageError:
                continue
            if value != recorded.get(option.dest):
                pending[option.dest] = (value, where)
    return pending


def pending_text(pending: dict) -> str:
    """PENDING as a message shows it: notebook-dir B (config [host h]), ..."""
    flags = {o.dest: o for o in session_options()}
    return ", ".join("%s %s (%s)" % (flags[d].key, " ".join(flags[d].words(v)[1::2]) or "on",
                                    where) for d, (v, where) in sorted(pending.items()))


# Remote side: begin ##########################################################
#
# Everything from this banner to "Remote side: end" runs on the remote host.
# remote_program() slices it out of this file's own source, compresses it and
# sends it on ssh's stdin with the parameters of one operation and a call of
# r_main(); nothing is uploaded.  The launcher that the session manager starts
# (r_launch) is this same code again, handed over in the session's private spec
# file.  So the code here keeps its own rules: Python 3.6 grammar, standard
# library only, no name from outside the section; its functions are named r_*,
# its constants R_* and its classes Remote*, apart from the local side's names.
#
# Assumptions about the remote: a POSIX system with a login shell in
# /etc/passwd; Linux /proc is used when present to tell a live Jupyter from a
# zombie or a reused pid; everything else is the standard library.

if True:  # sent alone to the remote host, the section imports what it uses itself
    import json
    import os
    import shutil
    import signal
    import subprocess
    import sys
    import time

R_BEGIN = "# Remote side: begin "
R_END = "# Remote side: end "
R_RESULT_MARK = "NBTUNNEL-RESULT:"  # what parse_result() looks for
R_ENV_MARK = "NBTUNNEL-ENV-FOLLOWS"
R_DUMP_ENV = "import os,json,sys;sys.stdout.write(json.dumps(dict(os.environ)))"
# What the session manager runs (as @PYTHON@ -c R_LAUNCH_BOOT @LAUNCH@): @LAUNCH@ is
# the base64 of the spec file's path, whose JSON holds this section's source and
# what r_launch() needs.  Constant and free of $ \ ! and newlines, so any shell
# that a tmux or screen line goes through reads it the same.
R_LAUNCH_BOOT = ('import base64,json,sys;p=base64.b64decode(sys.argv[1]).decode();'
                 's=json.load(open(p));exec(compile(s["source"],"nbtunnel.py","exec"));'
                 'r_launch(p,s)')
# A pid-file manager's alive() and stop() (see PidFileManager): the remote side
# judges or stops the session by the pid in @PIDFILE@ itself.
R_PIDFILE_ALIVE = "@PIDFILE-ALIVE@"
R_PIDFILE_STOP = "@PIDFILE-STOP@"
R_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # records, pid files and locks: never a symlink


class RemoteFail(Exception):
    """A failure with a kind that the local side reports (and may act on)."""

    def __init__(self, kind, message, **extra):
        Exception.__init__(self, message)
        self.kind, self.extra = kind, extra


def r_slice(text):
    """The remote section of TEXT (this file's source), with the blank lines before it
    kept, so that line numbers in remote tracebacks are this file's own."""
    lines = text.splitlines(True)
    begin = [i for i, line in enumerate(lines) if line.startswith(R_BEGIN)]
    end = [i for i, line in enumerate(lines) if line.startswith(R_END)]
    if len(begin) != 1 or len(end) != 1 or end[0] < begin[0]:
        raise ValueError("the remote section markers are missing or repeated")
    return "\n" * begin[0] + "".join(lines[begin[0]:end[0]])


def r_own_source():
    """The source of this section: as sent (remote) or read from this file (local)."""
    sent = globals().get("R_SOURCE")
    if sent:
        return sent
    with open(__file__) as f:
        return r_slice(f.read())


# Files ----------------------------------------------------------------------

def r_state_dir():
    """The private directory of nbtunnel's remote files, made 0700 on first use.  One that
    is a symlink, not this user's or writable by others is refused, never repaired: what
    another user could plant there (records, pid files) is not to be trusted."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    path = os.path.join(base, "nbtunnel")
    try:
        os.makedirs(base, 0o700, exist_ok=True)
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as e:
        raise RemoteFail("state-dir", "cannot create the remote state directory %s: %s"
                         % (path, e)) from None
    problem = r_dir_problem(path, 0o022)
    if problem is None:
        return path
    if r_dir_problem(path, 0) is None:  # ours, but open to others: the mode can be mended
        fix = "check what is in it, then chmod 700 %s" % path
    else:
        fix = "move it away (mv %s %s.unsafe) and nbtunnel makes a new one" % (path, path)
    raise RemoteFail("unsafe-state", "the remote state directory %s %s; nbtunnel keeps its "
                     "records there and trusts only a private directory of yours: %s"
                     % (path, problem, fix))


def r_files(session):
    """The remote files of SESSION, by role."""
    d = r_state_dir()
    return {k: os.path.join(d, session + ext) for k, ext in (
        ("state", ".json"), ("log", ".log"), ("pid", ".pid"), ("spec", ".spec.json"),
        ("lock", ".lock"), ("output", ".out"), ("published", ".job.json"),
        ("ended", ".ended"))}


def r_read_json(path, owned=False):
    """The JSON in PATH, or None when it is missing, damaged or a symbolic link (or, with
    OWNED, not this user's file)."""
    try:
        fd = os.open(path, os.O_RDONLY | R_NOFOLLOW)
    except (OSError, TypeError):
        return None
    try:
        with os.fdopen(fd) as f:
            if owned and os.fstat(f.fileno()).st_uid != os.getuid():
                return None
            return json.load(f)
    except (OSError, ValueError):
        return None


def r_write_private(path, text):
    """Write TEXT to PATH through a private temporary file (0600, made by mkstemp in the
    same directory) renamed over PATH: a reader sees the old file or the new one, whole,
    and a symlink planted at PATH is replaced, never followed.  Returns PATH."""
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path)[:40] + ".", suffix=".tmp",
                               dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        r_remove(tmp)
        raise
    return path


def r_write_json(path, data):
    """Write DATA to PATH as JSON, privately and atomically."""
    r_write_private(path, json.dumps(data))


def r_remove(*paths):
    """Remove PATHS, those that exist."""
    for path in paths:
        try:
            os.remove(path)
        except OSError:
            pass


def r_tail(path, n=20):
    """The last N lines of the text file PATH ("" when unreadable)."""
    try:
        with os.fdopen(os.open(path, os.O_RDONLY | R_NOFOLLOW), "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 16384))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


class RemoteLock:
    """An exclusive lock on one session's lock file, given up after TIMEOUT seconds."""

    def __init__(self, path, timeout):
        self.path, self.timeout, self.fd = path, timeout, None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # not POSIX: no advisory locks, one run at a time is up to the user
            fcntl = None
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | R_NOFOLLOW, 0o600)
        except OSError as e:
            raise RemoteFail("unsafe-state", "cannot open the lock file %s (%s): if it is a "
                             "symbolic link, remove it" % (self.path, e)) from None
        deadline = time.time() + self.timeout
        while fcntl is not None:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if time.time() > deadline:
                    os.close(self.fd)
                    raise RemoteFail("locked",
                                     "another nbtunnel is busy with this session") from None
                time.sleep(0.1)
        if fcntl and not os.fstat(self.fd).st_nlink:  # removed by its holder
            os.close(self.fd)
            return self.__enter__()
        return self

    def __exit__(self, *exc):
        os.close(self.fd)


# Proofs: what is ours -------------------------------------------------------
#
# A login node is shared with users who can bind a port the moment it is freed,
# get a reused pid, plant a symlink or a socket, and read ps.  So nothing here is
# trusted by name: a directory or file is ours when lstat says so (no symlink, our
# uid, no access for others); a process when its pid, uid and start time all match
# what was recorded; a port or socket when the listening socket is one of that
# process's own open files.  Only a server proven by r_held is ever sent its token.
# The local side uses r_dir_problem, r_pid_start, r_tcp_listeners and r_pid_sockets
# for the same proofs on this machine (see "Proofs: what is ours" there).

def r_dir_problem(path, others=0o077):
    """Why PATH is not a directory of this user, without the mode bits OTHERS (by default:
    no one else may enter it), or None."""
    import stat

    try:
        st = os.lstat(path)
    except OSError as e:
        return "cannot be examined (%s)" % (e.strerror or e)
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link"
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    if st.st_uid != os.geteuid():
        return "belongs to uid %d, not to you (uid %d)" % (st.st_uid, os.geteuid())
    if st.st_mode & others:
        return "is %s by group or others (mode %04o)" % (
            "writable" if others == 0o022 else "open", stat.S_IMODE(st.st_mode))
    return None


def r_pid_alive(pid):
    """True while PID is a live process that this user may signal (a zombie is dead, and so
    is another user's process: EPERM never counts as ours)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("State:"):
                    return "Z" not in line.split()[1]
    except OSError:
        pass
    return True


def r_pid_start(pid):
    """When PID started: field 22 of /proc/PID/stat (clock ticks since boot), or None for a
    zombie or without /proc.  With the pid, it names one process: a reused pid has another."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            fields = f.read().rpartition(b")")[2].split()
        return int(fields[19]) if fields[0] not in (b"Z", b"X") else None
    except (OSError, ValueError, IndexError, TypeError):
        return None


def r_pid_is_ours(pid, start):
    """True while PID is the live process of this user that started at START (as
    r_pid_start said when it was recorded)."""
    if not r_pid_alive(pid):
        return False
    try:
        uid = os.stat("/proc/%d" % pid).st_uid
    except OSError:
        # No /proc (BSD, macOS): signal 0 reached it, so it is this user's (or this user is
        # root), and ps must show a Jupyter command line.  The start time is not compared
        # there: a reused pid of ours that runs another Jupyter is taken for it.
        return r_pid_is_jupyter(pid)
    if uid != os.getuid():
        return False
    if start is None:  # recorded by an older nbtunnel: the command line must name Jupyter
        return r_pid_is_jupyter(pid)
    return r_pid_start(pid) == start


def r_held(info):
    """Is the server INFO proven to be what listens where it says (port or socket)?"""
    if info.get("sock"):
        return r_sock_held_by(info["sock"], info["pid"])
    return r_port_held_by(info["port"], info["pid"])


def r_tcp_listeners():
    """The TCP sockets listening in this network namespace (IPv4 and IPv6), as {inode:
    port}, or None without /proc/net/tcp."""
    found, tables = {}, 0
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        tables += 1
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == "0A":  # 0A: LISTEN
                found[fields[9]] = int(fields[1].rpartition(":")[2], 16)
    return found if tables else None


def r_pid_sockets(pid):
    """Inodes of the sockets among the open files of PID (empty when they cannot be read)."""
    fds, found = "/proc/%s/fd" % pid, set()
    try:
        names = os.listdir(fds)
    except OSError:
        return found
    for name in names:
        try:
            target = os.readlink(os.path.join(fds, name))
        except OSError:
            continue
        if target.startswith("socket:["):
            found.add(target[8:-1])
    return found


def r_port_held_by(port, pid):
    """True when a socket listening on PORT is one of PID's open files: only then may a
    request to PORT carry that server's token.  Without /proc (not Linux) it cannot be
    proven and is taken as true: there only the pid checks protect the token."""
    listeners = r_tcp_listeners()
    if listeners is None:
        return True
    return any(listeners.get(inode) == port for inode in r_pid_sockets(pid))


def r_unix_listen_inodes(path):
    """Inodes of the Unix sockets listening on PATH in this network namespace, or None
    without /proc/net/unix."""
    try:
        with open("/proc/net/unix") as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return None
    found = set()
    for line in lines:
        fields = line.split(None, 7)
        # Flags 00010000: __SO_ACCEPTCON, a listening socket
        if len(fields) == 8 and fields[7] == path and int(fields[3], 16) & 0x10000:
            found.add(fields[6])
    return found


def r_sock_held_by(path, pid):
    """True when PATH is a Unix socket of ours, mode 0600, in a directory of ours that no
    one else may enter, and PID listens on it: only then may a request to it carry that
    server's token.  Without /proc the file checks decide alone (no one else can make a
    socket in that directory)."""
    import stat

    try:
        st, dst = os.lstat(path), os.lstat(os.path.dirname(path))
    except (OSError, TypeError):
        return False
    if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.getuid() or \
            stat.S_IMODE(st.st_mode) != 0o600:
        return False
    if not stat.S_ISDIR(dst.st_mode) or dst.st_uid != os.getuid() or dst.st_mode & 0o077:
        return False
    inodes = r_unix_listen_inodes(path)
    return True if inodes is None else bool(inodes and inodes & r_pid_sockets(pid))


# Processes ------------------------------------------------------------------

def r_pid_is_jupyter(pid):
    """True while PID is alive and its command line names Jupyter."""
    if not r_pid_alive(pid):
        return False
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return b"jupyter" in f.read()
    except OSError:  # no /proc: ask ps
        args = r_run(["ps", "-p", str(pid), "-o", "args="], timeout=10)[1]
        return "jupyter" in args


def r_wait_dead(pid, timeout):
    """Wait up to TIMEOUT seconds for PID to end; True when it did."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not r_pid_alive(pid):
            return True
        time.sleep(0.1)
    return not r_pid_alive(pid)


def r_free_port(addr="127.0.0.1"):
    """A TCP port on ADDR (this host's) that nothing listens on right now."""
    import socket

    s = socket.socket()
    try:
        s.bind((addr, 0))
        return s.getsockname()[1]
    finally:
        s.close()


def r_run(argv, timeout=30, env=None, input=None):
    """Run ARGV with INPUT (text) on stdin, else /dev/null: (exit status, stdout, stderr);
    127 if it cannot start."""
    try:
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL if input is None else subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    except OSError as e:
        return 127, "", str(e)
    try:
        out, err = p.communicate(None if input is None else input.encode(), timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
    return p.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")


def r_urllib():
    """urllib.request, imported on first use: it costs ~25 ms that status and reattach do
    not need, and a start pulls it in while Jupyter is still starting."""
    import urllib.request
    return urllib.request


def r_http(port, base_url, path, token, method="GET", timeout=5, sock=None, host=None):
    """(status, JSON body or None) of one request to the server on HOST:PORT (HOST is
    127.0.0.1 unless given), or on the Unix socket SOCK, with its TOKEN; OSError (HTTP
    errors included) or ValueError (a body that is not JSON) if it fails."""
    import http.client

    if sock:
        return r_http_unix(sock, (base_url or "/") + path, token, method, timeout)
    url = "http://%s:%d%s%s" % (host or "127.0.0.1", port, base_url or "/", path)
    ur = r_urllib()
    req = ur.Request(url, method=method, headers={"Authorization": "token " + token})
    opener = ur.build_opener(ur.ProxyHandler({}))
    try:
        with opener.open(req, timeout=timeout) as resp:
            body = resp.read()
            return resp.status, (json.loads(body.decode()) if body.strip() else None)
    except http.client.HTTPException as e:  # a broken answer: as good as none
        raise OSError("%s: %s" % (type(e).__name__, e)) from None


def r_http_unix(sock, target, token, method, timeout):
    """r_http over the Unix socket SOCK: http.client on a connected AF_UNIX socket."""
    import http.client
    import socket

    conn = http.client.HTTPConnection("localhost", timeout=timeout)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        s.connect(sock)
        conn.sock = s  # http.client sends on a socket it was given and connects no other
        conn.request(method, target, headers={"Authorization": "token " + token})
        resp = conn.getresponse()
        body = resp.read()
    except http.client.HTTPException as e:
        raise OSError("%s: %s" % (type(e).__name__, e)) from None
    finally:
        conn.close()
        s.close()
    if resp.status >= 400:
        raise OSError("HTTP Error %d: %s" % (resp.status, resp.reason))
    return resp.status, (json.loads(body.decode()) if body.strip() else None)


# Login environment ----------------------------------------------------------

def r_shell_family(shell):
    """sh, fish or csh: which snippet of an environment step SHELL runs."""
    name = os.path.basename(shell)
    if name == "fish":
        return "fish"
    if name in ("csh", "tcsh"):
        return "csh"
    return "sh"


def r_home_path(path):
    """PATH with a leading ~ or ~/ expanded; a relative path is taken from the home directory."""
    home = os.path.expanduser("~")
    if path == "~" or path.startswith("~/"):
        path = home + path[1:]
    return os.path.join(home, path)


def r_login_env(steps, timeout):
    """(shell, environment) of a login shell of this user, after STEPS ran in it."""
    import pwd

    shell = pwd.getpwuid(os.getuid()).pw_shell or os.environ.get("SHELL") or "/bin/sh"
    if not os.access(shell, os.X_OK):
        shell = "/bin/sh"
    family = r_shell_family(shell)
    env = dict(os.environ, NBT_PY=sys.executable, NBT_DUMP=R_DUMP_ENV)
    lines = []
    if family == "csh":  # csh takes -l only alone; source the login files ourselves
        lines.append("if ( -r /etc/csh.login ) source /etc/csh.login")
        lines.append("if ( -r ~/.login ) source ~/.login")
    for step in steps:
        env.update(step.get("vars", {}))
        for key in step.get("paths", ()):  # paths are relative to the home directory
            env[key] = r_home_path(env[key])
        lines.append(step[family])
    lines.append("echo " + R_ENV_MARK)
    lines.append({"sh": 'exec "$NBT_PY" -c "$NBT_DUMP"', "fish": "exec $NBT_PY -c $NBT_DUMP",
                  "csh": "exec $NBT_PY:q -c $NBT_DUMP:q"}[family])
    if family == "csh":
        # tcsh -c ignores `exit` and runs a foreach body once: csh gets a script
        # file (private, in the state directory, removed at once) instead.
        import tempfile

        fd, script = tempfile.mkstemp(prefix=".login-", suffix=".csh", dir=r_state_dir())
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(lines) + "\n")
        try:
            code, out, err = r_run([shell, script], timeout=timeout, env=env)
        finally:
            r_remove(script)
    else:
        code, out, err = r_run([shell, "-l", "-c", "\n".join(lines)], timeout=timeout, env=env)
    if R_ENV_MARK not in out:
        raise RemoteFail("env", "the login shell %s failed before Jupyter could start (exit %s)"
                         % (shell, code), log_tail="\n".join(err.splitlines()[-15:]))
    try:
        found = json.loads(out.rsplit(R_ENV_MARK, 1)[1].strip())
    except ValueError:
        raise RemoteFail("env", "could not read the environment of the login shell %s" % shell,
                         log_tail="\n".join(err.splitlines()[-15:])) from None
    for key in list(found):
        if key.startswith("NBT_"):
            del found[key]
    found.pop("TMUX", None)
    found.pop("STY", None)
    return shell, found


def r_which(program, env):
    """The path of PROGRAM on the PATH of ENV, or None."""
    return shutil.which(program, path=env.get("PATH", os.defpath))


# Jupyter servers ------------------------------------------------------------

def r_runtime_dirs(env):
    """Where Jupyter servers started with ENV write their runtime files, most likely first."""
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


def r_find_runtime_file(pid, dirs, newer_than=0):
    """(path, info) of the runtime file of the server PID in DIRS, or (None, None)."""
    for d in dirs:
        for prefix in ("jpserver-", "nbserver-"):
            path = os.path.join(d, "%s%d.json" % (prefix, pid))
            try:
                if os.path.getmtime(path) < newer_than:
                    continue  # left by an earlier server whose pid was reused
            except OSError:
                continue
            info = r_read_json(path, owned=True)
            if info and (info.get("port") or info.get("sock")) and info.get("pid") == pid:
                return path, info
    return None, None


def r_server(session):
    """(info, None) about the live server of SESSION, else (None, why there is none)."""
    st = r_read_json(r_files(session)["state"])
    if not st:
        return None, "nothing is recorded for session %s" % session
    if st.get("login_node") not in (None, r_this_node()[0]):
        return None, "it runs on login node %s" % st["login_node"]
    if not r_pid_is_ours(st.get("pid"), st.get("pid_start")):
        return None, "its process (pid %s) has ended" % st.get("pid")
    info = r_read_json(st.get("runtime_file") or "", owned=True) or {}
    if not (info.get("port") or info.get("sock")) or info.get("pid") != st["pid"]:
        return None, ("its runtime file %s is gone, not its own or names no port"
                      % st.get("runtime_file"))
    return dict(session=session, pid=st["pid"], port=info.get("port") or 0,
                sock=info.get("sock") or None, token=info.get("token", ""),
                base_url=info.get("base_url", "/"), log=st.get("log"),
                manager=st.get("manager"), app=st.get("app"), root_dir=info.get(
                    "root_dir", info.get("notebook_dir")), started=st.get("started"),
                options=st.get("options"), login_node=st.get("login_node"),
                login_address=st.get("login_address"), login_port=st.get("login_port")), None


def r_probe(session):
    """Info about the live server of SESSION, proven to hold its port (or socket), or None."""
    info = r_server(session)[0]
    if info and not r_held(info):
        return None  # something else listens there: it must never be sent the token
    return info


def r_where(info):
    """Where the server INFO listens, in words."""
    return "socket %s" % info["sock"] if info.get("sock") else "port %d" % info["port"]


def r_api(info, path, method="GET", timeout=5):
    """r_http to the server INFO, by its port (on its address, for a batch job's server on
    a compute node) or its socket."""
    return r_http(info["port"], info["base_url"], path, info["token"], method=method,
                  timeout=timeout, sock=info.get("sock"), host=info.get("address"))


# Unix sockets (--unix-socket) -----------------------------------------------
#
# The server listens on SESSION.sock in a private directory (0700, ours): other users
# cannot even reach the socket (EACCES), where on a TCP port they would get a 403.
# The directory is "sock" in the remote state directory, never $XDG_RUNTIME_DIR: systemd
# removes that when the user's last login session ends, and the socket with it, while
# the detached server goes on.  A socket path may hold at most 107 bytes on Linux and
# 103 on the BSDs and macOS.

R_SOCK_MAX = 107 if sys.platform.startswith("linux") else 103
R_SOCK_OLD = ("the Jupyter on this host is too old for --unix-socket (it needs Jupyter Server "
              "2, as Notebook 7 and JupyterLab 4 have; %s): upgrade it, or run without "
              "--unix-socket")


def r_socket_path(session, limit):
    """Where the server of SESSION listens in socket mode: SESSION.sock in the first private
    directory of ours whose path leaves it at most LIMIT bytes; RemoteFail when none does.
    A directory that is not private is passed over, never chmod-ed."""
    dirs = [os.path.join(r_state_dir(), "sock")]
    problems, long_ = [], False
    for d in dirs:
        path = os.path.join(d, session + ".sock")
        size = len(path.encode("utf-8", "surrogateescape"))
        if size > limit:
            problems.append("%s would be %d bytes long" % (path, size))
            long_ = True
            continue
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            pass
        except OSError as e:
            problems.append("cannot create %s (%s)" % (d, e))
            continue
        problem = r_dir_problem(d)
        if problem is None:
            return path
        problems.append("%s %s (move it away; nbtunnel never chmods it)" % (d, problem))
    if long_:
        raise RemoteFail("socket-path", "no Unix socket path short enough for session %s: %s, "
                         "and a socket path may have at most %d bytes; use a shorter "
                         "--session name, or run without --unix-socket"
                         % (session, "; ".join(problems), limit))
    raise RemoteFail("socket-path", "no private directory for the Unix socket of session %s: "
                     "%s; or run without --unix-socket" % (session, "; ".join(problems)))


def r_remove_socket(path):
    """Remove PATH if it is a Unix socket of ours (one a killed server left behind)."""
    import stat

    try:
        if path and stat.S_ISSOCK(os.lstat(path).st_mode) and \
                os.lstat(path).st_uid == os.getuid():
            os.remove(path)
    except OSError:
        pass


def r_sock_refused(text):
    """The line of a Jupyter log in TEXT that says it does not know --sock, or None."""
    for line in text.splitlines():
        if "sock" in line and ("Unrecognized" in line or "unrecognized" in line):
            return line.strip()
    return None


def r_busy_kernels(info):
    """The kernels of the server INFO that are busy, as NAME:ID ([] when it does not say)."""
    try:
        kernels = r_api(info, "api/kernels")[1]
    except (OSError, ValueError):
        return []
    return [k.get("name", "?") + ":" + k.get("id", "?")[:8] for k in kernels or ()
            if k.get("execution_state") == "busy"]


def r_stop_server(info, timeout):
    """Shut the server down through its own API, then by signals if it must; say how."""
    pid = info["pid"]
    if info.get("port") or info.get("sock"):
        try:
            r_api(info, "api/shutdown", method="POST")
        except (OSError, ValueError) as e:  # signals follow
            info["shutdown_error"] = str(e)
    if r_wait_dead(pid, timeout):
        return "api"
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.kill(pid, sig)
        except OSError:
            pass
        if r_wait_dead(pid, wait):
            return "sigterm" if sig == signal.SIGTERM else "sigkill"
    return "alive"


def r_kill(pid, start):
    """End PID if it is still ours (signals only: no token is sent anywhere)."""
    if not r_pid_is_ours(pid, start):
        return None
    return r_stop_server(dict(pid=pid, port=0, base_url="/", token=""), 0)


# Session managers -----------------------------------------------------------

def r_python_word():
    """This Python, as a word that needs no quoting even inside a shell line."""
    if all(c.isalnum() or c in "/._-+" for c in sys.executable):
        return sys.executable
    return "python3"


def r_fill(argv, words):
    """ARGV with the placeholders @PYTHON@, @LAUNCH@, @PIDFILE@, @OUTPUT@ filled in."""
    out = []
    for w in argv:
        for key, value in words.items():
            w = w.replace("@%s@" % key.upper(), value)
        out.append(w)
    return out


def r_read_pidfile(path):
    """(pid, start) from the pid file PATH (start None if it was not known), or (None, None)."""
    try:
        fd = os.open(path, os.O_RDONLY | R_NOFOLLOW)
        with os.fdopen(fd) as f:
            words = f.read().split()
        return int(words[0]), (int(words[1]) if len(words) > 1 else None)
    except (OSError, ValueError, IndexError):
        return None, None


def r_pidfile_alive(path):
    """A pid-file manager's session is alive while the pid in PATH is still that process."""
    return r_pid_is_ours(*r_read_pidfile(path))


def r_pidfile_stop(path):
    """End the session of a pid-file manager: SIGTERM, then SIGKILL, to its process group
    (the launcher led a session of its own); True when it has ended."""
    pid, start = r_read_pidfile(path)
    if not r_pid_is_ours(pid, start):
        return True
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(pid, sig)
        except OSError:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.time() + wait
        while time.time() < deadline and r_pid_is_ours(pid, start):
            time.sleep(0.1)
        if not r_pid_is_ours(pid, start):
            return True
    return False


def r_run_manager(mgr, what, session, env, launch=""):
    """Run the manager's argv for WHAT (start, alive, stop, log): (status, out, err), or
    None when it has none."""
    argv = mgr.get(what)
    if not argv:
        return None
    paths = r_files(session)
    if argv == [R_PIDFILE_ALIVE]:
        return (0 if r_pidfile_alive(paths["pid"]) else 1), "", ""
    if argv == [R_PIDFILE_STOP]:
        return (0 if r_pidfile_stop(paths["pid"]) else 1), "", ""
    argv = r_fill(argv, dict(python=r_python_word(), launch=launch, pidfile=paths["pid"],
                             output=paths["output"]))
    if what == "start" and mgr.get("detach"):
        # A manager without a terminal of its own (nohup): the launcher gets its own
        # session, stdin from /dev/null and a file for output, and is not waited for.
        r_remove(paths["output"])
        out = os.open(paths["output"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | R_NOFOLLOW,
                      0o600)
        try:
            subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env,
                             close_fds=True, start_new_session=True)
        except OSError as e:
            return 127, "", str(e)
        finally:
            os.close(out)
        return 0, "", ""
    return r_run(argv, env=env)


def r_manager_start(mgr, session, env, launch):
    """Run the manager's start, up to three times while it fails because the server that
    its sessions share was exiting (tmux's, its last session just ended: "server exited
    unexpectedly") and has gone since: (status, out, err)."""
    for attempt in range(3):
        got = r_run_manager(mgr, "start", session, env, launch)
        if got[0] == 0 or attempt == 2 or not r_server_gone(mgr, session, env, 5):
            return got


def r_server_gone(mgr, session, env, timeout):
    """True once nothing listens on the socket of the manager's shared server (tmux leaves
    the file), waiting up to TIMEOUT for the one there now to go (without /proc: True)."""
    got = r_run_manager(mgr, "server", session, env)
    path = got[1].strip() if got and got[0] == 0 else ""
    if not path or not os.path.exists(path):
        return False
    old, deadline = r_unix_listen_inodes(path), time.time() + timeout
    while old and time.time() < deadline:
        time.sleep(0.02)
        old &= r_unix_listen_inodes(path)
    return not old


def r_manager_log(mgr, session, env):
    """The last lines of what the session printed, as its manager shows them."""
    got = r_run_manager(mgr, "log", session, env)
    return "\n".join((got[1] + got[2]).strip().splitlines()[-15:]) if got else ""


def r_launch(path, spec):
    """The launcher, run by the session manager: record this pid, then become Jupyter.

    PATH is the spec file (removed at once), SPEC its content: argv, env, cwd, log, pidfile."""
    os.remove(path)
    r_write_pidfile(spec["pidfile"], os.getpid())
    sys.stdout.write("nbtunnel: Jupyter runs in this session; its log is %s\n" % spec["log"])
    sys.stdout.flush()
    fd = os.open(spec["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | R_NOFOLLOW, 0o600)
    # stdin stays the terminal: tmux and screen end a pane whose terminal nobody holds
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    if fd > 2:
        os.close(fd)
    try:
        os.chdir(spec["cwd"])
        os.execve(spec["argv"][0], spec["argv"], spec["env"])
    except OSError as e:
        os.write(2, ("nbtunnel: cannot start %s: %s\n" % (spec["argv"][0], e)).encode())
        os._exit(127)


def r_write_pidfile(path, pid):
    """Record PID and its start time in the pid file PATH."""
    start = r_pid_start(pid)
    r_write_private(path, "%d %s\n" % (pid, "" if start is None else start))


# Batch jobs -----------------------------------------------------------------
#
# A batch manager (Slurm, PBS, LSF) runs Jupyter as a job on a compute node.  The
# helper on the login node submits the constant script R_JOB_SCRIPT on the scheduler's
# stdin; the job finds its private spec file (argv, token, this code) through the
# environment that the scheduler hands on from the submission, and r_job, on the
# compute node, binds Jupyter to the node's own cluster address and publishes where it
# listens in the session's .job.json file.  The scheduler's commands are the plugin's
# argv lists, their output read through the format it declares.  Assumptions: the
# home directory (with the state directory and Jupyter's runtime directory) is shared
# by the login and compute nodes, as on NFS, and the login node reaches the compute
# node's address.

R_JOB_BOOT = ('import json,os;p=os.environ.pop("NBT_JOB_SPEC");s=json.load(open(p));'
              'exec(compile(s["source"],"nbtunnel.py","exec"));r_job(p,s)')
R_JOB_SCRIPT = "#!/bin/sh\nexec \"$NBT_JOB_PYTHON\" -c '" + R_JOB_BOOT + "'\n"
R_JOB_NONE = ("", "N/A", "n/a", "None", "NONE", "(null)", "Unknown")  # a field with no value


def r_user():
    """This user's login name."""
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


def r_batch_argv(argv, words):
    """ARGV with each word that is a placeholder (@JOB@, @NAME@, @USER@, @OUTPUT@) filled in."""
    return [words.get(w[1:-1].lower(), w) if w.startswith("@") and w.endswith("@") else w
            for w in argv]


def r_job_items(fmt, text):
    """The jobs in TEXT: lines, or XML elements (children by TAG or TAG@NAME)."""
    if fmt.get("xml"):
        import xml.etree.ElementTree as ET

        try:
            root = ET.fromstring(text) if text.strip() else None
        except ET.ParseError as e:
            raise RemoteFail("scheduler", "cannot read the scheduler's XML: %s" % e) from None
        return [dict((c.tag + ("@" + c.get("name") if c.get("name") else ""),
                      (c.text or "").strip()) for c in el)
                for el in (root.iter(fmt["xml"]) if root is not None else ())]
    items = []
    for line in text.splitlines():
        if line.strip():
            words = [w.strip() for w in line.split(fmt["sep"])]
            items.append(dict(w.partition("=")[::2] for w in words)
                         if isinstance(fmt["fields"], dict) else words)
    return items


def r_time_left(limit, start):
    """H:MM:SS left of LIMIT seconds from START (local ISO time), or None."""
    try:
        left = int(float(limit) - (time.time() - time.mktime(time.strptime(
            start[:19], "%Y-%m-%dT%H:%M:%S"))))
    except (TypeError, ValueError, OverflowError):
        return None
    return "%d:%02d:%02d" % (max(left, 0) // 3600, max(left, 0) // 60 % 60, max(left, 0) % 60)


def r_job_rows(mgr, text):
    """One dict per job in TEXT (state or find output): the fields its format names, and
    phase (waiting, running, ending or ended).  See BatchManager."""
    import re

    fields = mgr["format"]["fields"]
    rows = []
    for item in r_job_items(mgr["format"], text):
        if isinstance(fields, dict):  # named by the scheduler's keys
            row = {}
            for theirs, ours in fields.items():
                value = item.get(theirs, "")
                if isinstance(ours, list):
                    ours, found = ours[0], re.search(ours[1], value)
                    value = found.group(1) if found else ""
                row[ours] = value
        else:
            row = dict(zip(fields, item + [""] * len(fields)))
        row = dict((k, None if v in R_JOB_NONE else v) for k, v in row.items())
        if not row.get("time_left") and row.get("time_limit") and row.get("start_time"):
            row["time_left"] = r_time_left(row["time_limit"], row["start_time"])
        state = row.get("state")
        row["phase"] = ("waiting" if state in mgr["waiting"] else "running"
                        if state in mgr["running"] else "ending" if state in mgr["ending"]
                        else "ended")
        rows.append(row)
    return rows


def r_job_state(mgr, job_id, env):
    """The scheduler's row for JOB_ID (phase "ended" once it has left the queue)."""
    import re

    code, out, err = r_run(r_batch_argv(mgr["state"], dict(job=job_id, user=r_user())),
                           env=env)
    if code != 0 and not (mgr.get("gone_re") and re.search(mgr["gone_re"], err + out)):
        raise RemoteFail("scheduler", "%s failed (exit %s): %s" % (
            mgr["state"][0], code, (err or out).strip() or "no message"))
    for row in r_job_rows(mgr, out) if code == 0 else []:
        if row.get("job_id") == job_id:
            if row["phase"] == "waiting" and not row.get("reason") and mgr.get("reason"):
                out = r_run(r_batch_argv(mgr["reason"], dict(job=job_id)), env=env)[1]
                found = re.search(mgr["reason_re"], out, re.M)
                row["reason"] = found and found.group(1).strip()
            return row
    return dict(job_id=job_id, state=None, reason=None, phase="ended")


def r_find_jobs(mgr, env):
    """The session's jobs that the scheduler still lists, found by the job's name."""
    code, out, _ = r_run(r_batch_argv(mgr["find"], dict(name=mgr["job_name"], user=r_user())),
                         env=env)
    return [r for r in (r_job_rows(mgr, out) if code == 0 else [])
            if r.get("name") in (None, mgr["job_name"])]


def r_batch_job(mgr, st):
    """(the live job of a session, environment for the scheduler's commands): the job
    recorded in ST, else one that carries the session's job name (a record lost, or
    made elsewhere); the job is None when none waits or runs."""
    env = (st or {}).get("env") or dict(os.environ)
    if (st or {}).get("job_id"):
        row = r_job_state(mgr, st["job_id"], env)
        if row["phase"] in ("waiting", "running"):
            return row, env
    live = [r for r in r_find_jobs(mgr, env) if r["phase"] in ("waiting", "running")]
    return (live[0] if live else None), env


def r_batch_ready(session, mgr, row, st, env, strict=False):
    """The info of the job ROW's Jupyter once it answers from the login node, else None.
    What the job published names its address, port and pid; Jupyter's runtime file for
    that pid must name the same port and address, and gives the token.  STRICT: once
    Jupyter listens (its runtime file is written after it binds) and this login node
    cannot connect, or the job found no address, raise RemoteFail "unreachable"."""
    import socket

    paths = r_files(session)
    pub = r_read_json(paths["published"], owned=True)
    if not pub or str(pub.get("job")) != row["job_id"]:
        return None
    if not pub.get("port"):
        return None
    # (a minute's slack: the file's time comes from the file server's clock, not the node's)
    found = r_find_runtime_file(pub["pid"], r_runtime_dirs(env), pub.get("started", 0) - 60)[1]
    if not found or found.get("port") != pub["port"] or \
            found.get("hostname") not in (None, pub["addr"]):
        return None
    try:
        status = r_http(pub["port"], found.get("base_url", "/"), "api/status",
                        found.get("token", ""), host=pub["addr"])[0]
    except ValueError:
        return None
    except OSError as e:
        if strict:
            raise RemoteFail("unreachable", "%s: Jupyter listens on address %s port %d, which "
                             "the login node %s cannot connect to (%s); if the node has an "
                             "address that the login node reaches, pass it with --node-address"
                             % (r_job_where(row, pub), pub["addr"], pub["port"],
                                socket.gethostname(),
                                getattr(e, "strerror", None) or e)) from None
        return None
    if status != 200:
        return None
    st = st or {}
    return dict(session=session, pid=pub["pid"], port=pub["port"], address=pub["addr"],
                token=found.get("token", ""), base_url=found.get("base_url", "/"),
                log=paths["log"], manager=mgr["name"], app=st.get("app"),
                root_dir=found.get("root_dir"), started=st.get("started"),
                options=st.get("options"), node=pub.get("node"))


def r_job_fields(row):
    """What a job row tells the local side."""
    return dict(job_id=row.get("job_id"), job_state=row.get("state"),
                reason=row.get("reason"), node=row.get("node"),
                time_left=row.get("time_left"), expected_start=row.get("expected_start"),
                phase=row.get("phase"))


def r_batch_answer(session, mgr, row, st, env, strict=False):
    """The job ROW as the local side sees it: its fields, and its server's info once ready
    (STRICT: see r_batch_ready)."""
    out = r_job_fields(row)
    info = r_batch_ready(session, mgr, row, st, env, strict) \
        if row["phase"] == "running" else None
    if info:
        info.update(out)
    out["ready"] = info
    return out


def r_batch_start(p):
    """Reattach to the session's job, or submit one: the job's state (and its server's
    info when it already answers)."""
    import re

    session, mgr = p["session"], p["manager"]
    paths = r_files(session)
    with RemoteLock(paths["lock"], p["timeout"]):
        st = r_read_json(paths["state"])
        row, env = r_batch_job(mgr, st)
        job = dict(session=session, manager=mgr["name"], job_name=mgr["job_name"],
                   log=paths["log"], app=p.get("app"), started=time.time(), env=env)
        if row:
            if not st or st.get("job_id") != row["job_id"]:  # found by name: record it again
                st = dict(job, job_id=row["job_id"], options=None)
                r_write_json(paths["state"], st)
            out = r_batch_answer(session, mgr, row, st, env)
            out["reused"] = True
            return out
        shell, env = r_login_env(p["env_steps"], p["timeout"])
        if not r_which(mgr["program"], env):
            raise RemoteFail("no-manager", "%s is not installed on this host (not on the login "
                             "PATH); install it or choose another --manager" % mgr["program"])
        argv, cwd = r_jupyter_argv(p, shell, env)
        r_remove(paths["published"], paths["log"], paths["output"])
        import binascii
        import socket

        token = p.get("token") or binascii.hexlify(os.urandom(24)).decode()
        r_write_json(paths["spec"], dict(
            argv=argv, cwd=cwd, log=paths["log"], output=paths["output"],
            published=paths["published"], token=token, remote_port=p.get("remote_port"),
            job_env=mgr["job_env"], login_host=socket.gethostname(),
            login_addrs=r_own_addresses(), node_address=p.get("node_address"),
            source=r_own_source(), warning=mgr.get("warning")))
        output = paths["output"]
        for old, new in mgr.get("output_escapes", {}).items():
            output = output.replace(old, new)
        words = r_batch_argv(mgr["submit"], dict(name=mgr["job_name"], output=output))
        argv = words[:1] + list(mgr["options"]) + words[1:]  # the plugin's own words win
        sub_env = dict(env, NBT_JOB_SPEC=paths["spec"],
                       NBT_JOB_PYTHON=r_which("python3", env) or sys.executable)
        code, out, err = r_run(argv, env=sub_env, input=R_JOB_SCRIPT)
        found = re.search(mgr["job_id_re"], out) if code == 0 else None
        if not found:
            for row in r_find_jobs(mgr, env):  # refused, yet given an id (Slurm does that)
                r_run(r_batch_argv(mgr["cancel"], dict(job=row["job_id"])), env=env)
            r_remove(paths["spec"])
            raise RemoteFail("job-refused", "%s refused the job: %s" % (
                argv[0], " / ".join((err or out).strip().splitlines()) or "exit %d" % code))
        job_id = found.group(1)
        r_write_json(paths["state"], dict(job, job_id=job_id, options=p.get("options"),
                                          env=env, started=time.time()))
        try:  # the local side is still there to learn the id (else its ssh was cut off)
            sys.stdout.write("\n")
            sys.stdout.flush()
        except OSError:
            r_cancel_job(mgr, job_id, env, paths)
            raise
        return dict(r_job_fields(dict(job_id=job_id, phase="waiting")), ready=None,
                    reused=False)


def r_op_job(p):
    """The state of the job P names, with its server's info once that answers.  A job
    that waits for a reason that never clears, or whose Jupyter this login node cannot
    reach (or that found no address for it), is cancelled here and then."""
    session, mgr, job_id = p["session"], p["manager"], p["job_id"]
    paths = r_files(session)
    st = r_read_json(paths["state"]) or {}
    env = st.get("env") or dict(os.environ)
    row = r_job_state(mgr, job_id, env)
    reason = row.get("reason") or ""
    if row["phase"] == "waiting" and (reason in mgr["fatal"] or row["state"] in mgr["fatal"]):
        r_cancel_job(mgr, job_id, env, paths)
        text = mgr["reason_text"].get(reason) or mgr["reason_text"].get(row["state"])
        raise RemoteFail("job-refused", "job %s can never start, so it was cancelled: %s says "
                         "%s (%s)%s" % (job_id, mgr["state"][0], row.get("state"), reason,
                                        ": " + text if text else ""))
    pub = r_read_json(paths["published"], owned=True) or {}
    if pub.get("error") and str(pub.get("job")) == job_id:
        r_cancel_job(mgr, job_id, env, paths)
        raise RemoteFail("unreachable", "%s: %s; nbtunnel cancelled the job" % (
            r_job_where(row, pub), pub["error"]))
    if row["phase"] in ("ending", "ended"):
        raise RemoteFail("job-ended", "job %s ended (%s) before Jupyter answered" % (
            job_id, row.get("state") or "gone from the queue"),
            log_tail=r_tail(paths["log"]) or r_tail(paths["output"]))
    try:
        return r_batch_answer(session, mgr, row, st, env, strict=True)
    except RemoteFail as e:
        r_cancel_job(mgr, job_id, env, paths)
        e.args = (str(e) + "; nbtunnel cancelled the job",)
        raise


def r_job_where(row, pub):
    """"job ID on node NAME", from the job's row and what it published."""
    return "job %s on node %s" % (row["job_id"], pub.get("node") or row.get("node") or "?")


def r_cancel_job(mgr, job_id, env, paths):
    """Cancel JOB_ID, wait (a while) until it has left, forget the session's job."""
    r_run(r_batch_argv(mgr["cancel"], dict(job=job_id)), env=env)
    r_wait_job_gone(mgr, job_id, env, 30)
    r_remove(paths["spec"], paths["state"])


def r_wait_job_gone(mgr, job_id, env, timeout):
    """Wait up to TIMEOUT seconds until JOB_ID no longer waits, runs or ends; True if so."""
    deadline = time.time() + timeout
    while True:
        if r_job_state(mgr, job_id, env)["phase"] == "ended":
            return True
        if time.time() > deadline:
            return False
        time.sleep(0.3)


def r_batch_stop(p, mgr, st):
    """Stop the session's job: Jupyter through its API (from this login node), then the
    scheduler's cancel, waiting until the job has left; say how."""
    session, timeout = p["session"], p["timeout"]
    paths = r_files(session)
    row, env = r_batch_job(mgr, st)
    info = r_batch_ready(session, mgr, row, st, env) if row and row["phase"] == "running" \
        else None
    if info and not p.get("force"):
        busy = r_busy_kernels(info)
        if busy:
            return dict(busy=busy, stopped=False)
    how = None
    if info:
        try:
            r_http(info["port"], info["base_url"], "api/shutdown", info["token"],
                   method="POST", host=info["address"])
            if r_wait_job_gone(mgr, row["job_id"], env, timeout):
                how = "api"
        except (OSError, ValueError):
            pass
    if row and not how:
        r_run(r_batch_argv(mgr["cancel"], dict(job=row["job_id"])), env=env)
        how = "cancel" if r_wait_job_gone(mgr, row["job_id"], env, timeout) else "alive"
    r_remove(paths["state"], paths["spec"], paths["published"])
    return dict(stopped=bool(info), how=how, was_recorded=bool(st),
                job_id=row and row["job_id"])


def r_batch_status(session, mgr, st):
    """The job's fields, and its server's info while it answers."""
    row, env = r_batch_job(mgr, st)
    if not row:
        return dict(session=session, server="stopped", ended=r_how_ended(session),
                    job_id=(st or {}).get("job_id"), job_state=None, node=None,
                    time_left=None)
    out = r_batch_answer(session, mgr, row, st, env)
    if out["ready"]:
        return dict(out.pop("ready"), server="running", **out)
    return dict(out, session=session, server="stopped", ended="died")  # waiting: repairable


def r_job(path, spec):
    """The batch job on the compute node: find the node's address that the login node
    reaches (r_node_address; none: publish why and end) and a free port there, publish
    them (0600, in the private state directory), then become Jupyter,
    bound to that address, its token from the spec in its environment (never argv).
    Jupyter is then the job's own process, which the scheduler's signal reaches (with a
    manager's ``warning_signal``, its child, to which that signal comes as SIGTERM)."""
    fd = os.open(spec["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | R_NOFOLLOW, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    if fd > 2:
        os.close(fd)
    if os.path.exists(spec["output"]):
        os.chmod(spec["output"], 0o600)
    names = spec.get("job_env") or {}
    import socket

    node = os.environ.get(names.get("node", ""), "") or socket.gethostname()
    job = os.environ.get(names.get("job", ""), "")
    addr, why = r_node_address(spec, os.environ.get(names.get("submit_host", ""), ""))
    if not addr:
        sys.stdout.write("nbtunnel: %s\n" % why)
        r_write_json(spec["published"], dict(job=job, node=node, error=why,
                                              started=time.time()))
        sys.exit(1)
    port = spec.get("remote_port") or r_free_port(addr)
    env = dict(os.environ, JUPYTER_TOKEN=spec["token"])
    env.pop("NBT_JOB_PYTHON", None)
    argv = [w for w in spec["argv"] if not w.startswith(("--ip=", "--port="))]
    argv += ["--ip=" + addr, "--port=%d" % port]
    sys.stdout.flush()  # before a fork: nothing written twice
    child = r_relay_warning(spec["warning"]) if spec.get("warning") else None
    if child != 0:  # not the child that becomes Jupyter: this process publishes its pid
        r_write_json(spec["published"], dict(job=job, node=node, addr=addr, port=port,
                                              pid=child or os.getpid(), started=time.time()))
        sys.stdout.write("nbtunnel: Jupyter for job %s on %s:%d (%s)\n" % (job or "?", addr,
                                                                            port, why))
        sys.stdout.flush()
    if child:
        os._exit(r_wait_child(child))
    try:
        os.chdir(spec["cwd"])
        os.execve(argv[0], argv, env)
    except OSError as e:
        os.write(2, ("nbtunnel: cannot start %s: %s\n" % (argv[0], e)).encode())
        os._exit(127)


def r_relay_warning(name):
    """Fork for a scheduler whose warning before the time limit is signal NAME ("USR1"),
    on which Jupyter would not stop cleanly: the child (0 returned) goes on to become
    Jupyter; the parent (the child's pid returned) stays the job's own process and passes
    that signal, and SIGTERM, on to Jupyter as SIGTERM, so that it shuts down cleanly."""
    import signal

    child = [0]

    def relay(signum, frame):
        if child[0]:  # in the parent only; the child's exec drops this handler
            try:
                os.kill(child[0], signal.SIGTERM)
            except OSError:
                pass

    warning = getattr(signal, "SIG" + name)
    for number in {warning, signal.SIGTERM}:
        signal.signal(number, relay)
    child[0] = os.fork()
    if not child[0] and warning != signal.SIGTERM:  # should the warning reach the whole
        signal.signal(warning, signal.SIG_IGN)  # process group: it ends Jupyter only as SIGTERM
    return child[0]


def r_wait_child(pid):
    """Wait for the child PID; the exit status that says how it ended."""
    try:
        status = os.waitpid(pid, 0)[1]  # a relayed signal does not cut it short (PEP 475)
    except ChildProcessError:
        return 1
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def r_own_addresses():
    """This host's IPv4 addresses but loopback: the kernel's local ones (Linux), else what
    its name resolves to."""
    import socket

    try:
        with open("/proc/net/fib_trie") as f:
            lines = f.read().splitlines()
    except OSError:
        lines = []
    found = [a.strip().lstrip("|-+ ") for a, kind in zip(lines, lines[1:])
             if kind.strip() == "/32 host LOCAL"]
    if not found:
        try:
            found = socket.gethostbyname_ex(socket.gethostname())[2]
        except OSError:
            found = []
    return [a for i, a in enumerate(found) if r_routable(a) and a not in found[:i]]


def r_routable(addr):
    """Is ADDR an address another host could reach (not loopback, not unspecified)?"""
    return bool(addr) and not addr.startswith(("127.", "0.")) and addr not in ("::1", "::")


def r_on_link(addr):
    """Is IPv4 ADDR on a network this host is directly attached to (Linux's routes)?"""
    import socket
    import struct

    try:
        value = struct.unpack("<I", socket.inet_aton(addr))[0]
        with open("/proc/net/route") as f:
            routes = [line.split() for line in f.read().splitlines()[1:]]
    except (OSError, ValueError):
        return False
    for r in routes:
        if len(r) > 7 and r[0] != "lo" and r[2] == "00000000" and int(r[1], 16) and \
                value & int(r[7], 16) == int(r[1], 16):
            return True
    return False


def r_node_address(spec, submit_host):
    """(an address of this node that the login node reaches, how it was chosen), or (None,
    why there is none).  --node-address when given; else the source address of the route
    toward one of the login node's own addresses (SPEC's login_addrs), those on a network
    this node is attached to first; else toward what the submitting host's name resolves
    to here; else what this node's name resolves to.  Never a loopback address: names
    may resolve to one (one /etc/hosts for every host; Debian's 127.0.1.1)."""
    import socket

    def resolve(name):
        try:
            return socket.gethostbyname_ex(name)[2] if name else []
        except (OSError, UnicodeError):
            return []

    def source(toward):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.connect((toward, 9))  # no packet is sent
            return s.getsockname()[0]
        except OSError:
            return None
        finally:
            s.close()

    asked = spec.get("node_address")
    if asked:
        addr = asked if ":" in asked else (resolve(asked) or [None])[0]
        if not r_routable(addr):
            return None, "--node-address %s is %s, which the login node cannot reach" % (
                asked, "a loopback address" if addr else "not known on this node")
        return addr, "--node-address"
    mine = r_own_addresses()  # an address both hosts have (a container bridge) is no link
    login = [a for a in spec.get("login_addrs") or [] if r_routable(a) and a not in mine]
    names = [submit_host, spec.get("login_host")]
    for toward, how in ([(a, "shares a network with the login node") for a in login
                         if r_on_link(a)] +
                        [(a, "routes to the login node") for a in login] +
                        [(a, "routes to %s" % n) for n in names for a in resolve(n)]):
        addr = source(toward)
        if r_routable(addr):
            return addr, how
    for addr in resolve(socket.gethostname()):
        if r_routable(addr):
            return addr, "what the node's name resolves to"
    return None, ("found no address of this node that the login node reaches (login node's "
                  "addresses: %s; this node's name resolves to %s); pass one with "
                  "--node-address" % (", ".join(login) or "none known",
                                      ", ".join(resolve(socket.gethostname())) or "nothing"))


# Login nodes ----------------------------------------------------------------
#
# Several login nodes may stand behind one name, sharing homes (so this state directory)
# but not processes, /tmp or tmux servers.  A session's record says which node runs its
# server; a helper that lands on another node never touches it (its pid means nothing
# here) and answers where it lives, or that its node is gone.

def r_this_node():
    """(hostname, address, port) of this login node: its name, and where this helper's ssh
    connection reached it (the server end of SSH_CONNECTION; "" and 0 when unknown)."""
    import socket

    words = os.environ.get("SSH_CONNECTION", "").split()
    if len(words) == 4 and words[3].isdigit():
        return socket.gethostname(), words[2], int(words[3])
    return socket.gethostname(), "", 0


def r_node_answers(address, port, timeout=5):
    """Does the sshd of a login node at ADDRESS:PORT accept a connection from here?"""
    import socket

    try:
        socket.create_connection((address, int(port)), timeout).close()
        return True
    except (OSError, ValueError, TypeError):
        return False


def r_elsewhere(st):
    """None when the session recorded as ST (if any) belongs to this login node; else its
    node, address, port and whether that node's sshd answers (alive: the server may run
    there; not alive: the node is down or gone, and its server with it)."""
    node = (st or {}).get("login_node")
    if not node or node == r_this_node()[0]:
        return None
    address, port = st.get("login_address") or "", st.get("login_port") or 0
    return dict(login_node=node, login_address=address, login_port=port,
                alive=bool(address and port) and r_node_answers(address, port))


def r_node_gone(p, away):
    """Is the login node AWAY proven gone?  Its sshd answers neither this node nor the
    local side (which names it in P's "gone" after it failed to reach it): then, and only
    then, its session may be started elsewhere or forgotten."""
    return not away["alive"] and away["login_node"] in (p.get("gone") or ())


def r_away(session, away):
    """The RemoteFail that sends the local side to the node AWAY of SESSION."""
    return RemoteFail("elsewhere", "session %s runs on login node %s (%s)"
                      % (session, away["login_node"], away["login_address"]), **away)


def r_forget(paths):
    """Drop the remote record of a session whose login node is gone."""
    r_remove(paths["state"], paths["pid"], paths["spec"])


# Operations -----------------------------------------------------------------

def r_session_start(p):
    """Reattach to the live server of the session, or start one; its info."""
    session, mgr, timeout = p["session"], p["manager"], p["timeout"]
    paths = r_files(session)
    with RemoteLock(paths["lock"], timeout):
        away = r_elsewhere(r_read_json(paths["state"]))
        if away and not r_node_gone(p, away):
            raise r_away(session, away)
        if away:  # its node is gone: the server went with it, this node takes over
            r_forget(paths)
        info = r_probe(session)
        if info:
            info["reused"] = True
            return info
        info = r_session_launch(p, paths, session, mgr, timeout)
        if away:
            info["node_gone"] = away["login_node"]
        return info


def r_session_launch(p, paths, session, mgr, timeout):
    """With the lock held and no live server: start one on this node; its info."""
    if p.get("unix_socket"):  # checked before anything starts
        p = dict(p, sock=r_socket_path(session, min(R_SOCK_MAX, p.get("sock_max") or 999)))
    shell, env = r_login_env(p["env_steps"], timeout)
    for program in [mgr["program"]] if mgr.get("program") else []:
        if not r_which(program, env):
            raise RemoteFail("no-manager", "%s is not installed on this host (not on the "
                             "login PATH); install it or choose another --manager" % program)
    st = r_read_json(paths["state"])
    if st:  # ours, but unusable (no runtime file, or not holding its port): end it
        r_kill(st.get("pid"), st.get("pid_start"))
    alive = r_run_manager(mgr, "alive", session, env)
    if alive and alive[0] == 0:
        if not st:
            raise RemoteFail("session-exists", "a %s session named %s already exists and "
                             "was not started by nbtunnel; choose another --session"
                             % (mgr["name"], session))
        r_run_manager(mgr, "stop", session, env)  # ours, whose server is gone
    argv, cwd = r_jupyter_argv(p, shell, env)
    if p.get("sock"):
        r_remove_socket(p["sock"])  # left by a server that was killed (ours: r_kill above)
        info = r_start_server(p, paths, env, argv + ["--sock=" + p["sock"],
                                                     "--sock-mode=0600"], cwd)
        if info:
            info["reused"] = False
            return info
        raise RemoteFail("launch", "Jupyter could not listen on %s" % p["sock"],
                         log_tail=r_tail(paths["log"]))
    for _ in range(1 if p.get("remote_port") else 3):
        port = p.get("remote_port") or r_free_port()
        info = r_start_server(p, paths, env, argv + ["--port=%d" % port], cwd)
        if info:
            info["reused"] = False
            return info
    if p.get("remote_port"):
        raise RemoteFail("port", "remote port %d is already in use on this host; choose "
                         "another --remote-port or leave it out" % p["remote_port"])
    raise RemoteFail("launch", "the remote port was taken each time Jupyter started",
                     log_tail=r_tail(paths["log"]))


def r_jupyter_argv(p, shell, env):
    """(Jupyter's argv with its program found on the login PATH, the working directory),
    else RemoteFail saying what is missing."""
    argv = list(p["argv"])
    exe = r_which(argv[0], env) if "/" not in argv[0] else argv[0]
    if not exe or not os.access(exe, os.X_OK):
        raise RemoteFail("no-jupyter", "%s not found on this host in the login environment "
                         "of %s (PATH=%s); install Jupyter or pass --jupyter "
                         "/path/to/jupyter" % (argv[0], shell, env.get("PATH", "")))
    argv[0] = exe
    if os.path.basename(exe) == "jupyter" and len(argv) > 1 and not argv[1].startswith("-"):
        sub = "jupyter-" + argv[1]
        if not r_which(sub, env) and not os.path.exists(
                os.path.join(os.path.dirname(exe), sub)):
            raise RemoteFail("no-jupyter", "'jupyter %s' is not installed on this host (no "
                             "%s next to %s or on the login PATH)" % (argv[1], sub, exe))
    cwd = r_home_path(p.get("notebook_dir") or "~")
    if not os.path.isdir(cwd):
        raise RemoteFail("no-dir", "notebook directory %r does not exist on this host"
                         % (cwd,))
    return argv, cwd


def r_start_server(p, paths, env, argv, cwd):
    """Start Jupyter through the manager and wait until it answers: its info, or None when
    its port was taken; RemoteFail for anything else."""
    session, mgr, timeout = p["session"], p["manager"], p["timeout"]
    r_remove(paths["pid"], paths["log"])
    # A restarted server keeps its token, so bookmarked URLs keep working.  It goes to
    # Jupyter alone (not to tmux, whose other windows would inherit it).
    server_env = dict(env, JUPYTER_TOKEN=p["token"]) if p.get("token") else env
    r_write_json(paths["spec"], dict(argv=argv, env=server_env, cwd=cwd, log=paths["log"],
                                     pidfile=paths["pid"], source=r_own_source()))
    import base64

    started = time.time()
    rc, out, err = r_manager_start(mgr, session, env,
                                   base64.b64encode(paths["spec"].encode()).decode())
    if rc != 0:
        r_remove(paths["spec"])
        raise RemoteFail("launch", "%s could not start the session: %s"
                         % (mgr["name"], (err or out).strip()))
    r_urllib()  # while Jupyter starts, not after
    deadline = started + timeout
    pid, start, runtime = r_wait_runtime_file(p, paths, env, started, deadline)
    if pid is None:
        return None
    node, address, port = r_this_node()
    r_write_json(paths["state"], dict(session=session, pid=pid, pid_start=start,
                                      runtime_file=runtime, log=paths["log"],
                                      manager=mgr["name"], app=p.get("app"), started=started,
                                      options=p.get("options"), sock=p.get("sock"),
                                      login_node=node, login_address=address,
                                      login_port=port))
    try:
        if p.get("sock"):
            r_check_sock(p, runtime)
        return r_wait_ready(session, pid, deadline, paths["log"])
    except RemoteFail:
        r_kill(pid, start)
        r_run_manager(mgr, "stop", session, env)
        raise


def r_check_sock(p, runtime):
    """RemoteFail unless the server that wrote RUNTIME listens on the socket P asked for
    (an old Jupyter that ignores --sock listens on a TCP port instead)."""
    info = r_read_json(runtime, owned=True) or {}
    if info.get("sock") != p["sock"]:
        raise RemoteFail("no-sock", R_SOCK_OLD % ("it listened on port %s instead of the "
                                                  "socket" % info.get("port")))


def r_wait_runtime_file(p, paths, env, started, deadline):
    """(pid, its start time, runtime file) of the Jupyter just launched once it wrote that
    file; (None, None, None) when it exited because its port was taken; RemoteFail when it
    failed otherwise."""
    dirs = r_runtime_dirs(env)
    pid = start = None
    while time.time() < deadline:
        if pid is None:
            pid, start = r_read_pidfile(paths["pid"])
        if pid is not None:
            runtime = r_find_runtime_file(pid, dirs, started - 2)[0]
            if runtime:
                return pid, start, runtime
            if not r_pid_alive(pid):
                text = r_tail(paths["log"])
                refused = p.get("sock") and r_sock_refused(text)
                if refused:
                    r_run_manager(p["manager"], "stop", p["session"], env)
                    raise RemoteFail("no-sock", R_SOCK_OLD % ("it said: " + refused),
                                     log_tail=text)
                if "already in use" in text or "Address in use" in text:
                    # the manager may not have noticed: end the session, freeing its name
                    r_run_manager(p["manager"], "stop", p["session"], env)
                    return None, None, None
                raise RemoteFail("launch", "Jupyter exited before it was ready", log_tail=text)
        time.sleep(0.01)  # a few stat() calls: polling often costs nothing and saves waiting
    mgr = p["manager"]
    if pid:
        r_kill(pid, start)
        text = r_tail(paths["log"])
    else:  # the launcher never ran: what the session itself printed says why
        text = r_manager_log(mgr, p["session"], env)
    r_run_manager(mgr, "stop", p["session"], env)
    r_remove(paths["spec"])
    raise RemoteFail("timeout", "Jupyter was not ready within %ss" % p["timeout"], log_tail=text)


def r_wait_ready(session, pid, deadline, log):
    """Wait until the server of SESSION (pid PID) answers its API: its info.  A server that
    goes away, or no answer by DEADLINE, is a RemoteFail that says what happened."""
    last = "no answer"
    while True:
        info, why = r_server(session)
        if info is None:
            raise RemoteFail("launch", "Jupyter (pid %d) went away before it answered: %s"
                             % (pid, why), log_tail=r_tail(log))
        if not r_held(info):  # not listening yet, or someone else is
            last = "%s is not held by it" % r_where(info)
        else:
            try:
                status = r_api(info, "api/status")[0]
                if status == 200:
                    return info
                last = "HTTP status %s" % status
            except (OSError, ValueError) as e:  # refused while it starts, HTTP errors
                last = "%s: %s" % (type(e).__name__, e)
        if time.time() >= deadline:
            raise RemoteFail("timeout", "Jupyter (pid %d, %s) did not answer within the "
                             "timeout (last try: %s)" % (pid, r_where(info), last),
                             log_tail=r_tail(log))
        time.sleep(0.01)


def r_session_stop(p, mgr, st):
    """Stop the server of the session (unless kernels are busy) and end its session."""
    session, timeout = p["session"], p["timeout"]
    paths = r_files(session)
    info = r_probe(session)
    if info and not p.get("force"):
        busy = r_busy_kernels(info)
        if busy:
            return dict(busy=busy, stopped=False)
    how = r_stop_server(info, timeout) if info else None
    if how != "alive":  # Jupyter leaves its socket file behind
        r_remove_socket((info or {}).get("sock") or (st or {}).get("sock"))
    if st:
        alive = r_run_manager(mgr, "alive", session, None)
        if alive and alive[0] == 0:
            r_run_manager(mgr, "stop", session, None)
        r_remove(paths["state"], paths["pid"], paths["spec"])
    return dict(stopped=bool(info), how=how, was_recorded=bool(st))


def r_session_manager(p, st, session=None):
    """The description of the manager that started the session recorded as ST (else the
    one the local record names for SESSION, else the one asked for)."""
    name = (st or {}).get("manager") or p.get("session_managers", {}).get(session)
    return (p.get("managers") or {}).get(name) or p.get("manager") or {}


def r_how_ended(session):
    """Why SESSION has no live server: terminated, shutdown (through Jupyter's API, e.g.
    File > Shut Down), idle (it ended itself, --idle-timeout), died (killed, crashed or
    out of time: it may be restarted) or none."""
    import re

    paths = r_files(session)
    st, ended = r_read_json(paths["state"]), r_read_json(paths["ended"])
    if ended:
        return ended.get("how")
    if not st:
        return "none"
    tail = r_tail(st.get("log") or "", 40)
    if "Shutting down on /api/shutdown request" in tail:
        return "shutdown"
    if re.search(r"No kernels for \d+ seconds; shutting down", tail):
        return "idle"  # Jupyter's own idle end (ServerApp.shutdown_no_activity_timeout)
    return "died"


def r_session_status(session, mgr, st):
    """SESSION's server's info, or why it is stopped."""
    info = r_probe(session)
    if info:
        info["server"] = "running"
        return info
    away = r_elsewhere(st)
    if away:  # running there, or gone with its node
        return dict(away, session=session, server="elsewhere" if away["alive"] else "gone")
    return dict(session=session, server="stopped", ended=r_how_ended(session))


R_KINDS = {"session": dict(start=r_session_start, stop=r_session_stop, status=r_session_status),
           "batch": dict(start=r_batch_start, stop=r_batch_stop, status=r_batch_status)}


def r_op_start(p):
    """Reattach to the session's server (or job), or start one (a repair: not if it ended
    on purpose)."""
    how = r_how_ended(p["session"])
    if p.get("repair") and how in ("terminated", "shutdown", "idle"):
        raise RemoteFail("ended", how, how=how)
    r_remove(r_files(p["session"])["ended"])
    return R_KINDS[p["manager"].get("kind", "session")]["start"](p)


def r_op_stop(p):
    """Stop the session's server (or job) unless kernels are busy."""
    paths = r_files(p["session"])
    with RemoteLock(paths["lock"], p["timeout"]):
        st = r_read_json(paths["state"])
        mgr = r_session_manager(p, st)
        away = r_elsewhere(st)
        if away and not r_node_gone(p, away):
            raise r_away(p["session"], away)
        if away:  # gone with its node: nothing to stop, the record is forgotten
            r_forget(paths)
            r_write_json(paths["ended"], dict(how="terminated", at=time.time()))
            return dict(stopped=False, node_gone=away["login_node"], was_recorded=True)
        out = R_KINDS[mgr.get("kind", "session")]["stop"](p, mgr, st)
        if not out.get("busy"):
            r_write_json(paths["ended"], dict(how="terminated", at=time.time()))
            r_remove(paths["log"], paths["output"], paths["lock"])
        return out


def r_op_status(p):
    """One entry per session of P: its server's info, or why it is stopped; with
    "discover", also those of this user's live sessions that P does not name."""
    out = []
    for session in p["sessions"]:
        st = r_read_json(r_files(session)["state"])
        mgr = r_session_manager(p, st, session)
        out.append(R_KINDS[mgr.get("kind", "session")]["status"](session, mgr, st))
    return out + (r_unrecorded(p) if p.get("discover") else [])


def r_unrecorded(p):
    """The live sessions (a server that is proven ours, or a job that waits or runs) that
    the private state directory records and the local side does not (P's "sessions"; with
    "only", just that one), each marked "unrecorded".  A record whose file is not this
    user's, or whose manager the local side does not know, is passed over."""
    d = r_state_dir()
    out = []
    for name in sorted(os.listdir(d)):
        session = name[:-len(".json")]
        if not name.endswith(".json") or session in p.get("known", p["sessions"]) or \
                p.get("only") not in (None, session):
            continue
        st = r_read_json(os.path.join(d, name), owned=True)
        if not isinstance(st, dict) or st.get("session") != session:
            continue  # a session's other JSON files (spec, published job) name none
        mgr = (p.get("managers") or {}).get(st.get("manager"))
        if not mgr:
            continue
        if mgr.get("kind") == "batch":  # described for another session: its job name
            mgr = dict(mgr, job_name=st.get("job_name") or mgr["job_name"])
        a = R_KINDS[mgr.get("kind", "session")]["status"](session, mgr, st)
        if a.get("server") == "running" or a.get("job_state"):
            a.update(unrecorded=True, manager=st.get("manager"))
            out.append(a)
    return out


R_OPS = {"start": r_op_start, "stop": r_op_stop, "status": r_op_status, "job": r_op_job}


def r_main(data):
    """Run the operation that DATA (base64 of zlib-compressed JSON) asks for and print its
    result as one line after R_RESULT_MARK."""
    import base64
    import zlib

    try:
        p = json.loads(zlib.decompress(base64.b64decode(data)).decode())
        result = dict(ok=True, result=R_OPS[p["op"]](p))
    except RemoteFail as e:
        result = dict(ok=False, kind=e.kind, message=str(e), **e.extra)
    except Exception as e:  # noqa: BLE001 - any bug must still give an answer line
        import traceback

        result = dict(ok=False, kind="internal", message="%s: %s" % (type(e).__name__, e),
                      log_tail=traceback.format_exc())
    sys.stdout.write("\n" + R_RESULT_MARK + json.dumps(result) + "\n")
    sys.stdout.flush()


# Remote side: end ############################################################


# Wire format #################################################################
#
# What remote_program() sends on the stdin of REMOTE_COMMAND, four lines of Python:
#   import base64,zlib
#   R_SOURCE=zlib.decompress(base64.b64decode(b"<the section, padded>")).decode()
#   exec(compile(R_SOURCE,"nbtunnel.py","exec"))
#   r_main(b"<base64 of the zlib-compressed JSON parameters>")
# The section is read from this file (the installed module's file after `pip install`)
# and compressed once per run.  Transport.run_helper() sends it and calls parse_result().
_REMOTE_CACHE = {}


def remote_source() -> str:
    """The remote section of this file, padded to its own line numbers (cached)."""
    if "source" not in _REMOTE_CACHE:
        _REMOTE_CACHE["source"] = r_own_source()
    return _REMOTE_CACHE["source"]


def remote_program(op: str, params: dict) -> bytes:
    """The remote section plus the parameters and the call of r_main, as sent on ssh's stdin."""
    import zlib

    if "blob" not in _REMOTE_CACHE:
        _REMOTE_CACHE["blob"] = base64.b64encode(zlib.compress(remote_source().encode(), 9))
    data = base64.b64encode(zlib.compress(json.dumps(dict(params, op=op)).encode(), 9))
    return b"".join([b"import base64,zlib\nR_SOURCE=zlib.decompress(base64.b64decode(b\"",
                     _REMOTE_CACHE["blob"], b"\")).decode()\n",
                     b"exec(compile(R_SOURCE,\"nbtunnel.py\",\"exec\"))\n",
                     b"r_main(b\"", data, b"\")\n"])


def parse_result(host: str, stdout: str, stderr: str, code: int):
    """The helper's result, or the Error that says why there is none (kind kept)."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            try:
                answer = json.loads(line[len(RESULT_MARK):])
            except ValueError:
                break
            if answer.get("ok"):
                return answer["result"]
            facts = {k: v for k, v in answer.items()
                     if k not in ("ok", "kind", "message", "log_tail", "code")}
            err = RemoteError("%s: %s" % (host, answer.get("message")),
                              kind=answer.get("kind") or "internal",
                              log_tail=answer.get("log_tail") or "", **facts)
            err.answer = answer  # what else the remote said (where the session lives)
            raise err
    if code == 255:  # ssh's own failure: its words, not the remote shell's
        raise classify_ssh_error(host, stderr)
    if re.search(r"(?i)\bpython3?\b.{0,20}not found|unknown command:? \W?python", stderr):
        raise ssh_error(host, "no-python")
    if "SyntaxError" in stderr:
        raise SshError(MSG_NO_PYTHON.format(host=host) + " (its python3 is too old)",
                       kind="no-python")
    raise RemoteError("the nbtunnel helper on %s gave no answer (exit %s): %s"
                      % (host, code, stderr.strip()[-2000:] or "no message"), kind="no-answer")


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
    (nohup) rather than a program that detaches by itself (tmux, screen).  Work that no
    remote command does is a function of the plugin's own, run by ``remote_call``.
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

    def server(self, session: str):
        """argv that prints the path of the Unix socket of the one server that all sessions
        share (tmux has one; screen and nohup have none), or None."""
        return None

    def describe(self, session: str, args=None) -> dict:
        """What the remote side needs to know of this manager for SESSION, as plain data
        checked to be argv lists of strings (ARGS: the session's options)."""
        desc = dict(kind="session", name=self.name, program=getattr(self, "program", ""),
                    start=self.start(session, ["@PYTHON@", "-c", R_LAUNCH_BOOT, "@LAUNCH@"]),
                    alive=self.alive(session), stop=self.stop(session), log=self.log(session),
                    server=getattr(self, "server", lambda session: None)(session),
                    detach=bool(getattr(self, "detach", False)))
        for key in ("start", "alive", "stop", "log", "server"):
            check_argv(self, key + "()", desc[key], "return", optional=key != "start")
        return desc


def remote_call(func, *args: str) -> list:
    """A remote argv that runs FUNC, a plugin's own function, as `@PYTHON@ -c SOURCE ARGS`:
    its source (inspect.getsource) and a call FUNC(*ARGS), whose return value is the exit
    status.  FUNC keeps the remote section's rules: Python 3.6 grammar, standard library
    only, self-contained (its imports inside it), no @WORD@ placeholders in its text."""
    import inspect
    import textwrap

    call = "import sys\nsys.exit(%s(*sys.argv[1:]))\n" % func.__name__
    return ["@PYTHON@", "-c", textwrap.dedent(inspect.getsource(func)) + call] + list(args)


def check_argv(manager, what: str, argv, verb: str, optional=False, empty=False) -> None:
    """Raise Error unless ARGV, what WHAT of MANAGER gives, is an argv list of strings."""
    if not (optional and argv is None) and not (isinstance(argv, list) and (argv or empty)
                                                and all(isinstance(w, str) for w in argv)):
        raise Error("manager plugin %s: %s must %s an argv list of strings%s, not %r" % (
            manager.name, what, verb, " or None" if optional else "", argv))


class PidFileManager(SessionManager):
    """A manager whose session is the launcher's pid (nohup and the like): it is alive while
    the pid in @PIDFILE@ is still that Jupyter, and stopped by SIGTERM, then SIGKILL, to the
    process group of that pid.  The remote side does both itself; a subclass gives ``start``
    (run detached, see ``detach``) and may give ``log``."""

    detach = True

    def alive(self, session):
        """The marker that has the remote side judge the session by its pid file."""
        return [R_PIDFILE_ALIVE]

    def stop(self, session):
        """The marker that has the remote side stop the process group of that pid."""
        return [R_PIDFILE_STOP]

    def log(self, session):
        """What the launcher printed (in @OUTPUT@) before Jupyter's own log took over."""
        return ["cat", "@OUTPUT@"]


class BatchManager(SessionManager):
    """Runs Jupyter as a batch job on a compute node (Slurm, PBS, LSF): the tunnel goes
    through the login node to the node's address and the port the job published.

    Methods return remote argv lists and attributes are plain data; the remote side
    runs the commands (in the login environment) and reads their output.  Placeholders,
    filled in where a whole word is one: @NAME@ (the job's name, ``job_name``), @OUTPUT@
    (a private file for what the job prints before Jupyter's log takes over), @JOB@ (the
    job id), @USER@ (the login name).

    - ``submit()``: the command that takes the job script on its stdin and prints the job
      id (found with ``job_id_re``); ``job_options(args)``: the user's words for it,
      literal (never filled in), put right after its program so the plugin's own words win.
    - ``state()`` (with @JOB@) and ``find()`` (with @NAME@, @USER@: the session's jobs, for
      a reattach without a record) print one line per job in ``state_format``: ``sep``
      and ``fields``, a list of names for the columns, or a dict from the scheduler's
      keys to names for KEY=VALUE items; with ``xml``: the tag of each job's element
      (fields a dict from child tags, TAG@NAME for a child with that name attribute).
      A name may be [NAME, REGEX] (group 1 of REGEX in the value).  Names: job_id,
      state, reason, node, time_left (else from time_limit in seconds and start_time,
      local ISO), expected_start, name (then rows of other names are not the session's).
      state() may use @USER@.  ``gone_re`` matches state()'s error for a job it has
      forgotten.  ``reason()`` (with @JOB@, optional): argv whose output gives a waiting
      job's reason when its row has none, as group 1 of ``reason_re``.
    - ``waiting``, ``running``, ``ending``: the scheduler's states of each phase; any other
      means the job has ended.  ``fatal_reasons``: reasons (or states) of a waiting job that never
      clear (the job is cancelled and the start fails with the reason and its
      ``reason_text``).
    - ``cancel()`` (with @JOB@) ends the job.  ``job_env``: the job's environment
      variables that hold its id (``job``), the submitting host (``submit_host``) and the
      node's name (``node``).  ``output_escapes``: replacements that make a path literal
      for the submit command.  ``default_timeout``: the default of --timeout while the
      job waits in the queue (connecting keeps the usual default).
    - ``warning_signal``: the name of the signal (``"USR1"``) by which the scheduler warns
      the job before its time limit, when Jupyter would not stop cleanly on it: the job
      then runs Jupyter as its child and relays that signal to it as SIGTERM.  None (the
      default): the job becomes Jupyter, which gets the scheduler's signals itself.
    """

    batch = True
    default_timeout = 900.0
    waiting = running = ending = fatal_reasons = ()
    reason_text = {}
    job_id_re = r"\A\s*([0-9]+)"
    gone_re = ""
    job_env = {}
    output_escapes = {}
    state_format = {"sep": "|", "fields": ["job_id", "state"]}
    reason_re = ""
    warning_signal = None

    def job_name(self, session: str) -> str:
        """The job's name, by which a reattach finds it."""
        return "nbtunnel-" + session

    def submit(self) -> list:
        """argv that submits the job script read from stdin and prints the job id."""
        raise NotImplementedError

    def job_options(self, args) -> list:
        """The user's options for the submit command, as literal argv words."""
        return []

    def state(self) -> list:
        """argv that prints the line of job @JOB@ in ``state_format``."""
        raise NotImplementedError

    def find(self) -> list:
        """argv that prints the lines of @USER@'s live jobs named @NAME@."""
        raise NotImplementedError

    def cancel(self) -> list:
        """argv that cancels job @JOB@."""
        raise NotImplementedError

    def reason(self):
        """argv that tells why job @JOB@ waits (read with ``reason_re``), or None."""
        return None

    def start(self, session, command):
        """A batch manager starts nothing itself: see ``submit``."""
        return self.submit()

    def describe(self, session: str, args=None) -> dict:
        """What the remote side needs to know of this batch manager for SESSION, checked
        (with ARGS, the session's options: the job's options)."""
        desc = dict(kind="batch", name=self.name, program=getattr(self, "program", ""),
                    job_name=self.job_name(session),
                    options=list(self.job_options(args)) if args is not None else [],
                    format=dict(self.state_format), waiting=list(self.waiting),
                    running=list(self.running), ending=list(self.ending),
                    fatal=list(self.fatal_reasons), reason_text=dict(self.reason_text),
                    job_id_re=self.job_id_re, gone_re=self.gone_re,
                    job_env=dict(self.job_env), output_escapes=dict(self.output_escapes),
                    reason=self.reason(), reason_re=self.reason_re,
                    warning=self.warning_signal)
        if self.warning_signal is not None and not (
                isinstance(self.warning_signal, str) and self.warning_signal.isalnum()
                and isinstance(getattr(signal, "SIG" + self.warning_signal, None), int)):
            raise Error("manager plugin %s: warning_signal must be the name of a signal "
                        "without SIG (USR1), or None, not %r" % (self.name, self.warning_signal))
        for key in ("submit", "state", "find", "cancel"):
            desc[key] = getattr(self, key)()
            check_argv(self, key + "()", desc[key], "give")
        check_argv(self, "job_options()", desc["options"], "give", empty=True)
        check_argv(self, "reason()", desc["reason"], "give", optional=True)
        return desc


def tmux_socket():
    """Run on the remote (remote_call): print tmux's default socket, $TMUX_TMPDIR (else
    /tmp), then tmux-UID/default."""
    import os

    tmpdir = os.path.realpath(os.environ.get("TMUX_TMPDIR") or "/tmp")
    print(os.path.join(tmpdir, "tmux-%d" % os.getuid(), "default"))
    return 0


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

    def server(self, session):
        """tmux's default socket (see tmux_socket)."""
        return remote_call(tmux_socket)


class ShellEnvironment:
    """Prepares the shell Jupyter starts from.  ``steps`` returns what to run there.

    Jupyter starts from the user's login shell (bash -l, zsh -l, fish -l, tcsh
    with ~/.login); the steps of every environment plugin run in it first, in
    the order of their ``order``, when Jupyter starts (not on a reattach).  A step
    is a dict with one constant snippet per shell family (``sh``, ``fish``,
    ``csh``), ``data``: the user's values, which reach the snippet as environment
    variables named NBT_<PLUGIN NAME>[_<WORD>] (user data never becomes shell
    text), ``paths``: the data keys that are remote paths (``~/`` and relative
    paths start at the remote home), and ``fail``: what to say when the snippet's
    exit status is not 0 (the core adds the test and the ``exit 1``).  In csh, never
    put an NBT_* variable inside backquotes (csh parses what they hold) nor echo one.
    In csh the exit status that counts is the last simple command's (``if``/``endif``
    reset it).  ``options`` lists the plugin's Options; their values are attributes of ARGS.
    """

    kind = "environment"
    name = ""
    order = 50
    options = ()

    def steps(self, args) -> list:
        """Steps to run, in order, before Jupyter starts (none when not asked for)."""
        return []


FAIL_TEXT = re.compile(r"[A-Za-z0-9 .,:;_/=+@%()-]{1,200}\Z")


def data_prefix(plugin) -> str:
    """The one prefix the data variables of PLUGIN's steps may use."""
    return "NBT_" + re.sub(r"[^A-Z0-9]", "_", plugin.name.upper())


def shell_step(plugin, step: dict) -> dict:
    """STEP of PLUGIN checked and made ready for the remote login shell: the failure
    test added to each snippet, its data names checked against the plugin's prefix."""
    prefix = data_prefix(plugin)
    data = dict(step.get("data") or {})
    for key, value in data.items():
        if not (key == prefix or key.startswith(prefix + "_")) or not re.match(
                r"[A-Z0-9_]+\Z", key):
            raise Error("environment plugin %s: data variable %r must be named %s or %s_*"
                        % (plugin.name, key, prefix, prefix))
        if not isinstance(value, str):
            raise Error("environment plugin %s: data %s must be a string" % (plugin.name, key))
    for key in step.get("paths") or ():
        if key not in data:
            raise Error("environment plugin %s: path %s is not in its data" % (plugin.name, key))
    fail, show = step.get("fail"), step.get("show")
    if fail is not None and not FAIL_TEXT.match(fail):
        raise Error("environment plugin %s: fail message %r must be one line of plain words"
                    % (plugin.name, fail))
    if show is not None and (fail is None or show not in data):
        raise Error("environment plugin %s: show must name one of its data, with a fail message"
                    % plugin.name)
    out = dict(vars=data, paths=list(step.get("paths") or ()))
    for family in ("sh", "fish", "csh"):
        snippet = step.get(family)
        if not isinstance(snippet, str):
            raise Error("environment plugin %s: a step needs a %s snippet" % (plugin.name, family))
        if fail is not None:
            out[family] = failure_test(family, snippet, "nbtunnel: " + fail, show)
        else:
            out[family] = snippet
    return out


def failure_test(family: str, snippet: str, message: str, show=None) -> str:
    """SNIPPET followed, in the syntax of FAMILY, by: if it failed, print MESSAGE (and the
    value of the data variable SHOW) on stderr and exit 1.  MESSAGE is plain words."""
    said = "'%s'" % message
    if family == "sh":
        say = "printf '%%s: %%s\\n' %s \"$%s\"" % (said, show) if show else "echo " + said
        return "{ %s\n} || { %s >&2; exit 1; }" % (snippet, say)
    if family == "fish":
        say = "printf '%%s: %%s\\n' %s \"$%s\"" % (said, show) if show else "echo " + said
        return "begin\n%s\nend; or begin; %s >&2; exit 1; end" % (snippet, say)
    # csh: echo of an NBT_* variable is dropped by tcsh, printenv is not
    say = ("printf '%%s: ' %s >> /dev/stderr; printenv %s >> /dev/stderr" % (said, show)
           if show else "echo %s >> /dev/stderr" % said)
    return "%s\nif ( $status != 0 ) then\n%s\nexit 1\nendif" % (snippet, say)


class RcFile(ShellEnvironment):
    """--rc FILE: source a shell file first (the `source ~/.zshrc` habit)."""

    name = "rc"
    order = 10
    options = [Option("--rc", "shell file to source first", metavar="FILE")]

    def steps(self, args):
        """Source the file in the user's login shell; a missing file is an error."""
        if not args.rc:
            return []
        return [dict(data={"NBT_RC": args.rc}, paths=["NBT_RC"],
                     fail="cannot read the --rc file, or it failed", show="NBT_RC",
                     sh='[ -r "$NBT_RC" ] && . "$NBT_RC"',
                     fish='test -r "$NBT_RC"; and source "$NBT_RC"',
                     csh="test -r $NBT_RC:q && source $NBT_RC:q")]


class Setup(ShellEnvironment):
    """--setup CMD: run CMD, in the syntax of the remote login shell, last before Jupyter."""

    name = "setup"
    order = 90
    options = [Option("--setup", "command to run last, in your login shell's syntax (it is "
                      "code)", metavar="CMD")]

    def steps(self, args):
        """Evaluate the command; its failure fails the start."""
        if not args.setup:
            return []
        return [dict(data={"NBT_SETUP": args.setup}, fail="the --setup command failed",
                     sh='eval "$NBT_SETUP"', fish="eval $NBT_SETUP", csh="eval $NBT_SETUP:q")]


class TunnelBackend:
    """Makes local PORT reach the remote server.  The built-in one uses the ssh master.

    A backend with ``foreground = True`` holds the forward in this process: after
    printing the URL nbtunnel calls ``serve(conn)``, which returns when the user
    presses Ctrl-C (or on SIGTERM), and then ``close``.  ``connection(host,
    options, timeout)`` may return a ``Transport`` that replaces the OpenSSH
    ``Connection``, or None to use it.
    """

    kind = "tunnel"
    name = ""
    foreground = False
    unix_socket = False  # True: open() also takes a remote Unix socket path as DESTINATION

    def connection(self, host: str, options: list, timeout: float):
        """A Transport that replaces the OpenSSH Connection, or None."""
        return None

    def serve(self, conn) -> None:
        """Keep a foreground forward open until interrupted."""

    def open(self, conn, local_port: int, destination: str) -> None:
        """Forward 127.0.0.1:LOCAL_PORT here to DESTINATION there: "ADDR:PORT", or the path
        of a Unix socket (only for a backend with ``unix_socket = True``)."""
        raise NotImplementedError

    def close(self, conn, local_port: int, destination: str) -> None:
        """Remove that forward."""
        raise NotImplementedError


def forward_spec(local_port: int, destination) -> str:
    """The argument of ssh -L for LOCAL_PORT to DESTINATION (a port number means
    127.0.0.1:PORT, as backends were once given)."""
    if isinstance(destination, int):
        destination = "127.0.0.1:%d" % destination
    return "127.0.0.1:%d:%s" % (local_port, destination)


class SshForward(TunnelBackend):
    """A -L forward added to the shared OpenSSH master connection; to a Unix socket it is
    OpenSSH's stream-local forwarding (sshd's AllowStreamLocalForwarding)."""

    name = "ssh"
    unix_socket = True

    def open(self, conn, local_port, destination):
        """`ssh -O forward`: the master keeps it open after this command returns."""
        conn.control("forward", "-L", forward_spec(local_port, destination))

    def close(self, conn, local_port, destination):
        """`ssh -O cancel` of the same forward."""
        conn.control("cancel", "-L", forward_spec(local_port, destination))


MANAGERS = {}
ENVIRONMENTS = {}
TUNNELS = {}
REGISTRIES = {"manager": MANAGERS, "environment": ENVIRONMENTS, "tunnel": TUNNELS}
REQUIRED = {"manager": ("start", "alive", "stop", "log"),
            "environment": ("steps",), "tunnel": ("open", "close")}
PLUGIN_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}\Z")


def plugin_options() -> list:
    """(plugin, Option) for every option the registered plugins declare."""
    return [(p, o) for registry in REGISTRIES.values() for p in registry.values()
            for o in getattr(p, "options", ())]


def session_options() -> list:
    """Every Option of a session: the core's, then the plugins'."""
    return SERVER_OPTIONS + TUNNEL_OPTIONS + [o for _, o in plugin_options()]


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
    flags = {o.flag for o in SERVER_OPTIONS + TUNNEL_OPTIONS} | {"--session", "--plugin"}
    flags |= {o.flag for p, o in plugin_options() if p.name != name}
    for option in getattr(plugin, "options", ()):
        if not isinstance(option, Option):
            raise Error("%s plugin %s: options must be nbtunnel.Option(...), not %r"
                        % (kind, name, option))
        if option.flag in flags:
            raise Error("%s plugin %s: option %s is already taken" % (kind, name, option.flag))
    if kind == "manager" and not callable(getattr(plugin, "describe", None)):
        base = BatchManager if getattr(plugin, "batch", False) else SessionManager
        plugin.describe = lambda session, args=None: base.describe(plugin, session, args)
    if kind == "manager":  # duck-typed too: described as the base class it resembles
        plugin.describe("nbtunnel")  # plain data: raises if an argv is not a list of strings
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
        pass
    import difflib

    known = sorted(REGISTRIES[kind])
    close = difflib.get_close_matches(str(name), known, 1)
    raise UsageError("unknown %s %r (%s); known: %s" % (
        kind, name, "did you mean %s?" % close[0] if close else "no loaded plugin provides "
        "it: see --plugin FILE", ", ".join(known))) from None


register(Tmux())
register(RcFile())
register(Setup())
register(SshForward())


def shipped_plugins() -> str:
    """The directory of the plugins that come with nbtunnel: the ``nbtunnel_plugins``
    package that ``pip install`` puts beside this module, else ``plugins/`` beside this
    file (a checkout, or the file copied with its plugins).  Only one of the two, so that
    an unrelated ``plugins`` directory in site-packages is never loaded."""
    here = os.path.dirname(os.path.abspath(__file__))
    installed = os.path.join(here, "nbtunnel_plugins")
    return installed if os.path.isdir(installed) else os.path.join(here, "plugins")


def plugin_dirs() -> list:
    """Where plugin files are looked for, in order: shipped, user config, environment."""
    config = os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config")
    dirs = [shipped_plugins(), os.path.join(config, "nbtunnel", "plugins")]
    return dirs + [d for d in os.environ.get("NBTUNNEL_PLUGIN_PATH", "").split(os.pathsep) if d]


def plugin_files(extra=()) -> list:
    """Plugin files to load, in order: shipped, user config, environment, --plugin."""
    dirs = plugin_dirs()
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


# Progress line ###############################################################
#
# While nbtunnel waits (connecting, starting Jupyter, a job in a queue), a person at a
# terminal sees one line on stderr that says what it waits for and for how long,
# rewritten in place and erased when the wait is over.  With stderr not a terminal
# (cron, pipes, --json consumers) or with -q nothing at all is written.


class Progress:
    """One status line on a terminal's stderr, updated in place.

    ``with progress("connecting to %s" % host): ...`` shows TEXT and the seconds
    elapsed until the block ends (nested blocks show their own text, then the outer
    one again); ``progress.update(text)`` changes the words of the innermost block,
    e.g. ``progress.update("job %s %s (%s)" % (job_id, state, reason))``.  Log records
    emitted meanwhile clear the line first and it is drawn again after them."""

    interval = 0.1  # seconds between redraws

    def __init__(self, stream=None):
        self.stream = stream  # None: sys.stderr at the time the line starts
        self.lock = threading.RLock()
        self.texts = []  # one entry per open block, innermost last
        self.started = 0.0
        self.out = None  # the terminal written to; None when the line is off
        self.shown = False
        self.frozen = 0  # > 0: ssh may be prompting on the terminal, do not redraw
        self.stop = threading.Event()
        self.hooked = []  # (handler, its own emit) while the line runs

    def __call__(self, text: str):
        """A context manager that shows TEXT while its block runs."""
        return self._block(text)

    @contextlib.contextmanager
    def _block(self, text):
        with self.lock:
            self.texts.append(str(text))
            if len(self.texts) == 1:
                self._start()
            self._draw()
        try:
            yield self
        finally:
            with self.lock:
                self.texts.pop()
                if self.texts:
                    self._draw()
                else:
                    self._finish()

    def update(self, text: str) -> None:
        """Change the text of the innermost open block (nothing when none is open)."""
        with self.lock:
            if self.texts:
                self.texts[-1] = str(text)
                self._draw()

    @contextlib.contextmanager
    def frozen_while(self):
        """Stop redrawing while a program may prompt on the terminal (ssh asking for a
        password or a host key): its prompt follows the line, which stays as it is."""
        thaw = self.freeze()
        try:
            yield thaw
        finally:
            thaw()

    def freeze(self):
        """Stop redrawing until the function returned is called (once is enough)."""
        with self.lock:
            self._draw()
            self.frozen += 1
        done = []

        def thaw():
            with self.lock:
                if not done:
                    done.append(True)
                    self.frozen -= 1
                    self._draw()
        return thaw

    silent = False  # --ensure: for cron, no line even on a terminal

    def enabled(self) -> bool:
        """Only on a terminal, and not with -q or --ensure."""
        if self.silent:
            return False
        stream = self.stream or sys.stderr
        try:
            tty = stream is not None and stream.isatty()
        except (AttributeError, ValueError):
            tty = False
        return tty and os.environ.get("TERM") != "dumb" and log.isEnabledFor(logging.INFO)

    def _start(self):
        self.started = time.monotonic()
        self.shown = False
        self.out = (self.stream or sys.stderr) if self.enabled() else None
        if self.out is None:
            return
        for handler in log.handlers:  # clear the line before any message, redraw after
            self.hooked.append((handler, handler.emit))
            handler.emit = self._emitter(handler.emit)
        self.stop = threading.Event()  # one per line: an old thread never wakes a new one
        threading.Thread(target=self._tick, args=(self.stop,), name="nbtunnel-progress",
                         daemon=True).start()

    def _emitter(self, emit):
        def hooked(record):
            with self.lock:
                self._clear()
                emit(record)
                self._draw()
        return hooked

    def _finish(self):
        if self.out is None:
            return
        self.stop.set()  # the ticking thread ends at its next wake-up
        for handler, emit in self.hooked:
            if handler.emit is not emit:
                del handler.emit  # back to the class's own
        self.hooked = []
        self._clear()
        self.out = None

    def _tick(self, stop):
        while not stop.wait(self.interval):
            with self.lock:
                if not stop.is_set():
                    self._draw()

    def _line(self) -> str:
        """The line, cut to the terminal's width (never wrap: \r only returns to the last
        row), the text cut and never the time it has waited."""
        clock = " (%.1f s)" % (time.monotonic() - self.started)
        try:
            width = os.get_terminal_size(self.out.fileno()).columns
        except (OSError, AttributeError, ValueError):
            width = 0
        width = width or 80  # a terminal that tells no size says 0
        return ("nbtunnel: " + self.texts[-1])[:max(10, width - 1 - len(clock))] + clock

    def _draw(self):
        if self.out is None or not self.texts or self.frozen:
            return
        self._write("\r" + self._line() + "\x1b[K")
        self.shown = True

    def _clear(self):
        if self.out is not None and self.shown:
            self._write("\r\x1b[K")
            self.shown = False

    def _write(self, text):
        try:
            self.out.write(text)
            self.out.flush()
        except (OSError, ValueError):
            self.out = None  # the terminal went away: stay quiet


progress = Progress()


# Running ssh #################################################################


def subproc(argv, **kw) -> subprocess.CompletedProcess:
    """Run one local process; the only place nbtunnel starts one (logged with -v)."""
    log.debug("+ %s", shlex.join(argv))
    return subprocess.run(argv, **kw)


def spawn(argv, **kw) -> subprocess.Popen:
    """Start one local process and return at once; logged like subproc."""
    log.debug("+ %s", shlex.join(argv))
    return subprocess.Popen(argv, **kw)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def signals(handler):
    """Route Ctrl-C, SIGTERM and SIGHUP (the terminal closed) to HANDLER while the block
    runs; only the main thread may, elsewhere (--all's workers) it changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {n: signal.signal(n, handler) for n in STOP_SIGNALS}
    try:
        yield
    finally:
        for n, h in old.items():
            signal.signal(n, h)


SSH_MESSAGES = {"hostkey-unknown": MSG_HOSTKEY, "hostkey-changed": MSG_HOSTKEY_CHANGED,
                "auth": MSG_AUTH, "needs-person": MSG_NEEDS_PERSON,
                "unreachable": MSG_UNREACHABLE, "no-python": MSG_NO_PYTHON,
                "no-answer": "{host} did not answer within {detail}"}


def ssh_error(host: str, kind: str, detail="") -> SshError:
    """The SshError of KIND (one of SSH_REFUSALS or SSH_LINK) about HOST, in nbtunnel's words."""
    text = SSH_MESSAGES.get(kind, "{host}: {detail}")
    return SshError(text.format(host=host, detail=detail, command=suggested(host)), kind=kind)


CONTROL_DIR_MAX = 60  # + "/" + 16 hex + ssh's ".XXXXXXXXXXXXXXXX" while binding < 104 bytes


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


# What the progress line says while the helper works, by operation.
HELPER_WAIT = {"start": "waiting for Jupyter on %s", "stop": "stopping Jupyter on %s",
               "status": "asking %s", "job": None}  # None: the caller's line stays


class Transport:
    """How a command reaches HOST: one connection that all its steps share (the OpenSSH
    ``Connection``, or what a tunnel backend's ``connection()`` returns).  It has ``host``,
    ``options`` (ssh argv words), ``timeout``, ``socket`` (control socket or None) and
    ``opened_here`` (open() connected in this command); it implements open, alive, pipe
    and close, and run_helper sends the helper through pipe.  Connecting or carrying bytes
    fails with ``ssh_error(host, kind, detail)``: kind in SSH_REFUSALS or SSH_LINK."""

    socket = None
    opened_here = False
    unfinished = None  # (ssh process, timeout) of a helper whose wait was interrupted

    def argv(self, *extra) -> list:
        """The ssh command line of HOST with the user's options, EXTRA appended."""
        return ["ssh"] + self.options + list(extra)

    def open(self) -> None:
        """Connect and authenticate, unless connected already."""
        raise NotImplementedError

    def alive(self) -> bool:
        """Is the connection up (no new login needed)?"""
        raise NotImplementedError

    def pipe(self, command: str, data: bytes, timeout: float):
        """Run the constant COMMAND on HOST with DATA on its stdin, connecting if need be;
        (stdout bytes, stderr bytes, exit status); a timeout is kind "no-answer"."""
        raise NotImplementedError

    def run_helper(self, op: str, params: dict, timeout: float, wait=None):
        """Run the remote helper's operation OP with PARAMS; its result, or the Error it
        names.  WAIT is what the progress line says meanwhile (by default, as OP says)."""
        text = HELPER_WAIT.get(op, "waiting for %s")
        wait = wait or (text % self.host if text else None)
        for hop in range(3):  # the name, then the session's login node (directly or not)
            try:
                with progress(wait) if wait else contextlib.nullcontext():
                    out, err, code = self.pipe(REMOTE_COMMAND, remote_program(op, params),
                                               timeout)
                return parse_result(self.host, out.decode("utf-8", "replace"),
                                    err.decode("utf-8", "replace"), code)
            except SshError as e:  # the recorded node does not answer: land on the name
                if e.kind not in SSH_LINK or not self.node or hop == 2:
                    raise
                log.debug("login node %s does not answer (%s); asking %s", self.node["node"],
                          e, self.host)
                self.point(None)
            except RemoteError as e:
                if e.kind != "elsewhere" or hop == 2:
                    raise
                if self.follow(e.answer):  # gone from there and from here: it may say so
                    params = dict(params, gone=[e.answer["login_node"]])
        raise AssertionError("not reached")

    node = None  # the login node this connection reaches behind HOST, when it is told one

    def point(self, node, jump=False) -> None:
        """Reach login NODE (a dict: node, address, port) behind HOST from now on, through
        HOST with JUMP; None: HOST itself, wherever it lands."""
        self.node, self.jump = node, jump

    def follow(self, answer: dict) -> bool:
        """The session lives on another login node (ANSWER names it): reach that node; True
        when it cannot be reached from here either (it is gone), the connection unchanged."""
        raise Error("%s: session runs on login node %s (%s), which the %s tunnel cannot "
                    "reach directly; connect to that node by its own name"
                    % (self.host, answer.get("login_node"), answer.get("login_address"),
                       type(self).__name__), kind="elsewhere")

    def finish_helper(self):
        """After an interrupted run_helper: wait until the remote operation has ended and
        return its result (raise its Error); None when nothing is known of it."""
        (proc, timeout), self.unfinished = self.unfinished or (None, 0), None
        if proc is None:
            return None
        with contextlib.suppress(OSError):  # a program cut short runs nothing there
            proc.stdin.close()
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            return None
        return parse_result(self.host, out.decode("utf-8", "replace"),
                            err.decode("utf-8", "replace"), proc.returncode)

    def control(self, command: str, *extra) -> None:
        """Send a control command (forward, cancel, exit) to the master."""
        raise Error("the connection to %s has no master for ssh -O %s" % (self.host, command))

    def master_pid(self):
        """Pid of the local process that holds the connection and its forwards, or None."""
        return None

    def close(self) -> None:
        """Disconnect, ending every forward the connection holds."""
        raise NotImplementedError


class Connection(Transport):
    """One OpenSSH master connection to HOST, shared by every step of a command."""

    def __init__(self, host: str, options: list, key: str, timeout: float):
        self.host, self.options, self.timeout, self.key = host, list(options), timeout, key
        self.point(None)
        self.opened_here = False
        self.no_prompt = sys.stdin is None or not sys.stdin.isatty()  # cron: never prompt

    def point(self, node, jump=False) -> None:
        """Reach login NODE behind HOST from now on (None: HOST, wherever it lands): its
        address, with HOST's user, keys and options, and HOST's host key (login nodes
        behind one name share one); with JUMP, through HOST.  Each has its own master."""
        import hashlib

        self.node, self.jump, self.node_words = node, jump, []
        if node:
            self.node_words = ["-o", "HostName=%s" % node["address"], "-o",
                               "Port=%d" % node["port"], "-o", "HostKeyAlias=%s"
                               % host_key_name(self.options, self.host), "-o", "CheckHostIP=no"]
            self.node_words += ["-o", "ProxyJump=%s" % self.host] if jump else []
        where = "%s\0%s" % (self.key, self.host) + (
            "\0%s\0%d\0%s" % (node["address"], node["port"], jump) if node else "")
        self.socket = os.path.join(control_dir(), hashlib.sha1(where.encode()).hexdigest()[:16])

    def follow(self, answer: dict) -> bool:
        """The session lives on another login node (ANSWER names it): reach that node by its
        address, else through HOST; then the connection this command opened to HOST ends.
        A node that the node we landed on could not reach either is tried at its address
        only: when that fails too, it is gone (True), and the connection stays as it was."""
        node = login_node(answer)
        if node is None:
            raise Error("%s: session runs on login node %s, whose address is unknown"
                        % (self.host, answer.get("login_node")), kind="elsewhere")
        log.debug("%s: the session lives on login node %s (%s)", self.host, node["node"],
                  node["address"])
        landed, opened = self.socket, self.opened_here
        self.point(node, node_way(self.options, self.host, node) == "jump")
        self.opened_here = False
        try:
            self.open(fall_back=False, jump=answer.get("alive", True))
        except SshError as e:
            if e.kind not in SSH_LINK or answer.get("alive", True):
                self.exit_master(landed, opened)
                raise
            self.point(None)
            self.socket, self.opened_here = landed, opened
            return True
        self.exit_master(landed, opened)
        return False

    def exit_master(self, socket: str, opened: bool) -> None:
        """End the master at SOCKET when this command OPENED it."""
        if opened and os.path.exists(socket):
            subproc(["ssh"] + self.options + ["-S", socket, "-O", "exit", self.host],
                    stdin=subprocess.DEVNULL, capture_output=True)

    def argv(self, *extra) -> list:
        """ssh with the node's and the user's options and our control socket."""
        words = ["ssh"] + self.node_words + self.options + ["-S", self.socket]
        if self.no_prompt:
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

    def open(self, fall_back=True, jump=False) -> None:
        """Start the master unless one runs; this is the only authentication.  A login node
        is reached the way it was (at its address, or through HOST), with JUMP also through
        HOST after its address failed; one that does not answer is left for HOST
        (FALL_BACK), whose helper then tells where the session is now."""
        if self.alive():
            return
        node, tried = self.node, []
        ways = [True] if self.jump else [False, True] if jump else [False]
        for jump in ways if node else []:
            self.point(node, jump)
            try:
                return self.open_master()
            except SshError as e:
                if e.kind == "hostkey-changed":
                    raise SshError(MSG_NODE_HOSTKEY.format(host=self.host, key=host_key_name(
                        self.options, self.host), **node), kind=e.kind) from None
                if e.kind not in SSH_LINK:
                    raise SshError("%s (reaching its login node %s at %s)" % (
                        e, node["node"], node["address"]), kind=e.kind) from None
                tried.append(str(e))
        if node and not fall_back:
            raise SshError(MSG_NODE_UNREACHABLE.format(host=self.host, detail="; ".join(tried),
                                                       **node), kind="unreachable")
        if node:
            log.debug("login node %s does not answer (%s); connecting to %s", node["node"],
                      "; ".join(tried), self.host)
            self.point(None)
        self.open_master()

    def open_master(self) -> None:
        """Start the master unless one runs."""
        if self.alive():
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket)  # a socket left by a master that died
        argv = self.argv("-M", "-o", "ControlPersist=yes",  # it stays in the background
                         "-o", "ConnectTimeout=%d" % max(1, int(self.timeout)),
                         "-o", "ExitOnForwardFailure=yes", *SERVER_ALIVE, "-f", "-N", self.host)
        import tempfile

        # ssh -f keeps stderr open in the background: a file, not a pipe, collects it.
        with tempfile.TemporaryFile() as err, progress("connecting to %s" % self.host), \
                self.may_prompt():
            try:
                r = subproc(argv, stdin=None if not self.no_prompt else subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=err,
                            timeout=None if not self.no_prompt else self.timeout + 5)
                code = r.returncode
            except subprocess.TimeoutExpired:
                raise ssh_error(self.host, "unreachable",
                                "no answer within %gs" % self.timeout) from None
            except FileNotFoundError:
                raise SshError("no ssh program found on this machine; install OpenSSH",
                               kind="no-ssh") from None
            except BaseException:  # interrupted: a master that got going must not stay
                self.close()
                raise
            err.seek(0)
            text = err.read().decode("utf-8", "replace")
        refuse_changed_host_key(self, text)
        # ssh -f returns 0 only once it is authenticated and the master listens on its
        # socket: no `ssh -O check` needed to believe it.
        if code != 0 or not os.path.exists(self.socket):
            err = classify_ssh_error(self.host, text + offered_host_key(self, text))
            if err.kind == "needs-person" and not self.no_prompt:  # it asked, and was answered
                err = SshError(MSG_NEEDS_PERSON_TTY.format(
                    host=self.host, detail=text.strip().splitlines()[-1]), kind=err.kind)
            raise err
        self.opened_here = True

    def may_prompt(self):
        """Around an ssh that may ask the user something on the terminal: the progress
        line stops redrawing, so the prompt stays readable."""
        return contextlib.nullcontext() if self.no_prompt else progress.frozen_while()

    # Every command over the master, never a login of its own (--watch): ssh with
    # ControlMaster=no whose master has just ended (its socket gone or refusing) quietly
    # connects and authenticates by itself, which on a one-time-code login asks for a
    # code that is spent on one command; the repair's own login then asks again.
    shared_only = False

    def pipe(self, command: str, data: bytes, timeout: float):
        """COMMAND over the master (if none runs, ssh connects by itself for this one
        command, unless SHARED_ONLY), DATA on its stdin: (stdout, stderr, exit status)."""
        shared = os.path.exists(self.socket)
        if self.shared_only:
            try:
                mux_connect(self.socket).close()  # a master answers there, not a stale file
            except OSError:
                raise ssh_error(self.host, "unreachable", MSG_MASTER_ENDED) from None
        # BatchMode: should the master end between that look and ssh's, ssh's own login
        # cannot ask anything (over a master it asks nothing anyway).
        argv = self.argv("-T", "-o", "ControlMaster=no", *(
            ["-o", "BatchMode=yes"] if self.shared_only else []),
                         "-o", "ConnectTimeout=%d" % max(1, int(self.timeout)),
                         self.host, command)
        # Over a master, ssh cannot prompt: it runs in a session of its own, so a Ctrl-C at
        # the terminal reaches nbtunnel alone, which may then let the operation finish.
        with contextlib.nullcontext() if shared else self.may_prompt():
            proc = spawn(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, start_new_session=shared)
            try:
                out, err = proc.communicate(data, timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                raise ssh_error(self.host, "no-answer", "%gs" % timeout) from None
            except BaseException:
                self.unfinished = (proc, timeout)
                raise
        if self.shared_only and proc.returncode == 255 and not self.alive():
            raise ssh_error(self.host, "unreachable", MSG_MASTER_ENDED)  # not a refusal
        return out, err, proc.returncode

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


MSG_MASTER_ENDED = "its ssh connection has ended"
MSG_NODE_UNREACHABLE = (
    "session runs on login node {node} of {host} ({address} port {port}), which cannot be "
    "reached from here along the route your ssh config gives {host}: {detail}. Reach {node} "
    "with ssh yourself, or terminate the session from there")


MSG_NODE_HOSTKEY = (
    "session runs on login node {node} of {host} ({address}), which shows a host key that "
    "is not one known for {host} (possible man-in-the-middle); nbtunnel will not connect to "
    "it. Login nodes behind one name are checked against the keys known for the name: if "
    "the administrator confirms that {node} has a key of its own, add that key to "
    "known_hosts under the name {key}")


def login_node(answer: dict):
    """The login node (node, address, port) that ANSWER or a record names, or None when it
    names none that could be connected to."""
    import ipaddress

    address, port = answer.get("login_address"), answer.get("login_port")
    try:
        ipaddress.ip_address(address)
        if not (isinstance(port, int) and 0 < port < 65536 and answer.get("login_node")):
            return None
    except ValueError:
        return None
    return dict(node=str(answer["login_node"]), address=address, port=port)


def ssh_settings(options: list, host: str) -> dict:
    """What the ssh config makes of HOST with OPTIONS (`ssh -G`: lower-case keys, e.g.
    hostname, port, proxyjump, proxycommand); {} when ssh cannot say."""
    try:
        r = subproc(["ssh"] + list(options) + ["-G", host], stdin=subprocess.DEVNULL,
                    capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return dict(line.split(" ", 1) for line in r.stdout.splitlines()
                if " " in line) if r.returncode == 0 else {}


def node_way(options: list, host: str, node: dict) -> str:
    """How a new connection reaches login NODE behind HOST along the route the ssh config
    gives HOST: "direct" (HOST's own settings aimed at the node's address) when that is the
    configured path: the config's ProxyJump or ProxyCommand leads on to it, or HOST's
    HostName resolves to several addresses and the node's is one (round-robin DNS);
    otherwise "jump" (through HOST, ProxyJump).  Never a probe of an address the config
    does not name: a bastion that must not be bypassed is not."""
    seen = ssh_settings(options, host)
    if any(seen.get(key, "none") != "none" for key in ("proxyjump", "proxycommand")):
        return "direct"
    return "direct" if round_robin(seen, host, node) else "jump"


def round_robin(seen: dict, host: str, node: dict) -> bool:
    """Does HOST's HostName (SEEN: its ssh -G settings) resolve to several addresses, the
    address of login NODE among them (a name that DNS hands out round robin)?"""
    import socket

    try:
        found = {a[4][0] for a in socket.getaddrinfo(seen.get("hostname", host), None,
                                                      type=socket.SOCK_STREAM)}
    except (OSError, UnicodeError):
        return False
    return len(found) > 1 and node["address"] in found


def host_key_name(options: list, host: str) -> str:
    """The name HOST's host key is known under (what ssh -G says: its HostKeyAlias, else its
    HostName, with the port when not 22), so that a login node behind HOST is checked
    against the key the user trusts for HOST."""
    seen = ssh_settings(options, host)
    if seen.get("hostkeyalias", "none") != "none":
        return seen["hostkeyalias"]
    name, port = seen.get("hostname", host), seen.get("port", "22")
    return name if port == "22" else "[%s]:%s" % (name, port)


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
        raise ssh_error(conn.host, "hostkey-changed")


# State #######################################################################


MSG_STATE_DIR = (
    "state directory {path} {problem}: nbtunnel keeps tokens there and will not use (or "
    "chmod) a directory that someone else could have planted files in. Give --state-dir a "
    "directory of your own, or fix this one: chown $(id -u) {path} && chmod 700 {path} "
    "(after checking what is in it)"
)


def shown(path: str) -> str:
    """PATH as a message shows it: a path of thousands of characters is cut in the middle."""
    return path if len(path) <= 160 else "%s...%s" % (path[:80], path[-60:])


def state_dir(path=None) -> str:
    """The local state directory PATH (default: $NBTUNNEL_STATE_DIR, else in $XDG_STATE_HOME):
    created 0700 when missing; refused when it is not a private directory of ours (never
    chmod-ed: `--state-dir /tmp` must not change /tmp)."""
    path = path or os.environ.get("NBTUNNEL_STATE_DIR") or os.path.join(
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
                             % (shown(path), getattr(e, "strerror", None) or e)) from None
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


ENDED_SHOWN_DAYS = 7  # an ended session is listed this long, then only keeps it ended


def out_of_sight(rec: dict) -> bool:
    """Does REC say its session ended on purpose more than ENDED_SHOWN_DAYS ago, or was
    forgotten (--forget)?  Its file stays, so that a unit's --ensure still leaves the
    session ended (ended_record reads it by name); listings no longer show it."""
    if not rec.get("ended"):
        return False
    at = rec.get("ended_at")
    at = at if isinstance(at, (int, float)) else 0
    return bool(rec.get("forgotten")) or time.time() - at > ENDED_SHOWN_DAYS * 86400


def load_records(directory: str) -> list:
    """Every session recorded in DIRECTORY (unreadable files are skipped with a warning),
    but those ended out of sight."""
    records = []
    for name in sorted(os.listdir(directory)):
        if not name.endswith(".json"):
            continue
        try:
            rec = read_record(os.path.join(directory, name))
            if rec is None:
                continue
            rec["host"], rec["session"]  # noqa: B018 - both must be there
            if not out_of_sight(rec):
                records.append(rec)
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("warning: ignoring unreadable record %s (%s)", name, e)
    return records


def save_record(directory: str, rec: dict) -> None:
    """Write REC atomically, readable by the user only."""
    r_write_private(os.path.join(directory, record_name(rec["host"], rec["session"])),
                    json.dumps(rec, indent=1, sort_keys=True))


def drop_record(directory: str, host: str, session: str) -> None:
    """Forget HOST/SESSION (and its --open page)."""
    base = record_name(host, session)
    for name in (base, base[:-5] + "-open.html"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(directory, name))


ENDED = {"terminated": "terminated by you", "shutdown": "shut down from Jupyter (File > Shut Down)",
         "idle": "idle for {idle}"}


def ended_text(how: str, idle=None) -> str:
    """How a session ended on purpose (HOW, a key of ENDED; IDLE: its idle timeout in
    minutes), in words."""
    return ENDED.get(how, how).format(idle=duration_text(idle or 0))


def rec_idle(rec: dict) -> float:
    """The idle timeout (minutes) of the session recorded as REC: asked, else its default."""
    return idle_minutes((rec.get("options") or {}).get("idle_timeout"),
                        MANAGERS.get(rec.get("manager") or ""))


def save_ended(directory: str, host: str, session: str, how: str, idle=None) -> dict:
    """Remember that HOST/SESSION ended on purpose (HOW, a key of ENDED; IDLE, for "idle":
    its idle timeout), in place of its record: a repair must not start it again and
    --status says so.  Only that is kept (no token, no port): the next deliberate start
    begins afresh and replaces it."""
    drop_record(directory, host, session)
    rec = dict(host=host, session=session, ended=how, ended_at=int(time.time()))
    if how == "idle":
        rec["idle_timeout"] = idle
    save_record(directory, rec)
    return rec


def ended_record(session) -> dict:
    """The record of SESSION (a Session) when it says the session ended on purpose, else None."""
    with contextlib.suppress(OSError, ValueError, TypeError):
        rec = read_record(os.path.join(session.state, record_name(session.host, session.name)))
        if isinstance(rec, dict) and rec.get("ended"):
            return rec
    return None


def suggested(host, *words: str) -> str:
    """A command that nbtunnel tells the user to run: ``nbtunnel HOST WORDS`` with the
    options of this run that it needs to work as printed (``suggested.given``: -F,
    --state-dir, --config), every word quoted for the shell."""
    argv = ["nbtunnel"] + ([host] if host is not None else []) + list(words) + suggested.given
    return " ".join(shlex.quote(word) for word in argv)


suggested.given = []  # set by main() from the command line (given_options)


def given_options(args) -> list:
    """The words of ARGS that a suggested command needs again to reach the same host and
    the same records: -F, --state-dir, --config."""
    words = []
    for flag, value in (("-F", args.ssh_config), ("--state-dir", args.state_dir),
                        ("--config", args.config)):
        if value is not None:
            words += [flag, value]
    return words


def start_again(host: str, session: str) -> str:
    """The command that starts an ended session again."""
    return suggested(host, "--session", session)


@contextlib.contextmanager
def locked(directory: str, host: str, session: str, timeout=None):
    """Serialise nbtunnel runs on one host and session (start, terminate, ensure).

    With TIMEOUT, give up after that many seconds instead of waiting for ever
    (a cron job must not pile up behind a run that hangs)."""
    path = os.path.join(directory, "." + record_name(host, session)[:-5] + ".lock")
    deadline = time.monotonic() + (timeout or 0)
    while True:
        fd = open_private(path, os.O_RDWR | os.O_CREAT, "lock file")
        if fd is None:  # a planted symlink or file: remove it (unlink never follows) and retry
            os.unlink(path)
            fd = open_private(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, "lock file")
            if fd is None:
                raise Error("cannot make the lock file %s" % path)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | (fcntl.LOCK_NB if timeout else 0))
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise Error("another nbtunnel run for %s (session %s) has been busy "
                                    "for over %ds; try again later" % (host, session, timeout)
                                    ) from None
                    time.sleep(0.2)
        except BaseException:
            os.close(fd)
            raise
        if os.fstat(fd).st_nlink:
            break
        os.close(fd)  # its holder removed it when done: lock the file there now
    try:
        yield
    finally:
        with contextlib.suppress(OSError):  # no lock files pile up, one per host ever tried
            os.unlink(path)
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


# Proofs: what is ours #######################################################
#
# The local side of the same rule: the token goes only to a listener proven ours.
# Another local user may bind the tunnel's port the moment ssh lets go of it, so a
# listener is ours when its pid, start time and uid match the recorded one and the
# port is among that process's own sockets (the remote section's functions read
# /proc the same way on both sides).  Directories for control sockets are ours when
# r_dir_problem finds nothing wrong with them.

def private_dir_problem(path: str):
    """Why PATH is not a private directory of ours (None when it is: a real directory,
    not a symlink, owned by us, writable by nobody else); the remote side's own check."""
    return r_dir_problem(path, 0o022)


def tunnel_listener(conn, tunnel, port=None) -> dict:
    """Which local process holds the tunnel's PORT: the ssh master, or this process for a
    backend that forwards in the foreground or a port --watch holds; recorded so that a
    later run can prove that the listener on the port is still ours before it sends the
    token there."""
    if port in WATCHED:
        return dict(pid=os.getpid(), start=r_pid_start(os.getpid()), watch=True)
    pid = os.getpid() if getattr(tunnel, "foreground", False) else conn.master_pid()
    return dict(pid=pid, start=r_pid_start(pid) if pid else None)


def held_by_watch(rec) -> bool:
    """Is REC's local port held by a --watch of ours in another process (see WatchPort)?
    It forwards the port itself: a reattach leaves it there."""
    owner = (rec or {}).get("listener") or {}
    return isinstance(owner, dict) and owner.get("watch") is True \
        and owner.get("pid") != os.getpid() and listener_ours(rec)


def listener_ours(rec: dict) -> bool:
    """Is 127.0.0.1:local_port of REC held by our own process: the recorded listener
    (same pid, same start time, our uid) or, for a record without one, this process?

    Costs a few reads of /proc and no ssh, so the healthy --ensure stays cheap.  Where
    ports cannot be read (no /proc, no lsof), nothing is proven and the token is kept."""
    owner = rec.get("listener") or {}
    pid = owner.get("pid") if isinstance(owner, dict) else None
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        pid = os.getpid()  # a server of our own, as in the unit tests, or a record of old
    elif owner.get("start") is not None and r_pid_start(pid) != owner.get("start"):
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
    listeners = r_tcp_listeners() or {}
    return sorted({listeners[i] for i in r_pid_sockets(pid) if i in listeners})


def lsof_ports(pid: int) -> list:
    """TCP ports PID listens on, from lsof (macOS and the BSDs have no /proc)."""
    if not shutil.which("lsof"):
        return []
    try:
        r = subproc(["lsof", "-nP", "-a", "-p", str(pid), "-iTCP", "-sTCP:LISTEN", "-Fn"],
                    stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return sorted({int(m) for m in re.findall(r"^n.*:(\d+)$", r.stdout, re.MULTILINE)})


def find_forward(conn, info: dict):
    """The local port of a forward the master already holds to the server INFO, or None."""
    pid = conn.master_pid()
    listener = dict(pid=pid, start=r_pid_start(pid))
    for port in listening_ports(pid):
        if api_ok(dict(info, local_port=port, listener=listener), timeout=3):
            return port
    return None


# Actions #####################################################################


class Run:
    """One command: ARGS, what it was asked to do (the action and its flags), for SESSION."""

    def __init__(self, args, session: Session, plugins=()):
        self.args, self.session, self.plugins = args, session, list(plugins)


def start_params(run: Run) -> dict:
    """What the remote "start" operation is told for this session's options."""
    s = run.session
    app = s.app or (guess_app(s.jupyter) if s.jupyter is not None else DEFAULT_APP)
    steps, used = environment_steps(s)
    log.debug("plugins: manager %s (%s), tunnel %s (%s), environment: %s", s.manager.name,
              s.manager.source, s.tunnel.name, s.tunnel.source, ", ".join(
                  "%s (%s)" % (e.name, e.source) for e in used) or "login shell only")
    sock = bool(s.unix_socket)
    if sock:
        check_socket_mode(s)
    if s.node_address and not s.batch and s.source("node_address") == "command line":
        raise UsageError("--node-address is for batch managers (the address of a job's "
                         "node); %s runs Jupyter on %s itself" % (s.manager.name, s.host))
    return s.params(argv=jupyter_argv(app, s.jupyter) + (
                    socket_server_args() if sock else server_args()) + idle_args(
                    idle_minutes(s.idle_timeout, s.manager)),
                    app=app, notebook_dir=s.notebook_dir,
                    remote_port=None if sock else s.remote_port, unix_socket=sock,
                    node_address=s.node_address,
                    sock_max=local_socket_max(), env_steps=steps,
                    environment=[e.name for e in used], options=s.asked(start_only=True))


def check_socket_mode(session: Session) -> None:
    """Refuse --unix-socket where it cannot work: a batch manager (the socket would be on a
    compute node), a tunnel backend that cannot forward to a socket, a --remote-port."""
    if session.batch:
        raise UsageError(MSG_SOCKET_BATCH.format(manager=session.manager.name))
    if not getattr(session.tunnel, "unix_socket", False):
        raise UsageError(MSG_SOCKET_TUNNEL.format(tunnel=session.tunnel.name))
    if session.remote_port and session.source("remote_port") != "record":
        raise UsageError("--remote-port cannot be combined with --unix-socket (the server "
                         "listens on no port)")


def fresh_record(session: Session):
    """The record of SESSION as it is on disk now (another run may have changed it), or
    None when there is none or it is damaged (load_records has warned about that)."""
    host, name = session.host, session.name
    try:
        rec = read_record(os.path.join(session.state, record_name(host, name)))
        ok = (rec["host"], rec["session"]) == (host, name) and isinstance(rec["token"], str) \
            and all(isinstance(rec[k], int) for k in ("local_port", "remote_port"))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return rec if ok else None


def bring_up(run: Run, conn: Connection, old, params: dict):
    """With the lock held and CONN open: start or reattach, forward, record; (record, info).
    All of it or nothing: a server this run started is stopped when a later step fails.

    A server that has to be started again gets the token of OLD, and the tunnel
    OLD's local port when it is free, so the URL stays the same.
    """
    s = run.session
    if old and re.match(r"[A-Za-z0-9]{16,}\Z", str(old.get("token", ""))):
        params = dict(params, token=old["token"])
    info = started = local_port = None  # what this run started and has not recorded yet
    try:
        if s.batch:
            info = batch_start(run, conn, params)
        else:
            info = start_remote(conn, params, s.timeout * 2 + 30)
        started = None if info["reused"] else info
        dest = destination(info)
        if old is None and not conn.opened_here and not s.local_port:
            port = find_forward(conn, info)  # the record was lost, the forward was not
            old = dict(local_port=port, destination=dest) if port else None
        local_port = open_tunnel(conn, s.tunnel, old, dest, s.local_port)
        if info.get("sock"):
            check_socket_forward(s, conn, info, local_port)
        rec = new_record(s, conn, old, params, info, local_port)
        save_record(s.state, rec)
    except BaseException as e:
        raise undo_start(s, conn, params, e, info, getattr(e, "started", started),
                         local_port) from None
    return rec, info


def new_record(s: Session, conn: Connection, old, params: dict, info: dict, local_port: int):
    """The record of the server INFO, tunnelled from LOCAL_PORT."""
    host, session, tunnel, mgr = s.host, s.name, s.tunnel, s.manager
    app = info.get("app") or params["app"]
    rec = dict(host=host, session=session, manager=mgr.name, tunnel=tunnel.name,
               environment=params.get("environment", []), plugin=mgr.source, app=app,
               local_port=local_port, remote_port=info["port"], token=info["token"],
               remote_socket=info.get("sock"), destination=destination(info),
               base_url=info["base_url"], pid=info["pid"], log=info.get("log"),
               ssh_options=conn.options, socket=conn.socket, started=info.get("started"),
               options=s.asked())
    rec.update((k, info[k]) for k in JOB_FIELDS if info.get(k) is not None)
    if info.get("address"):  # where a batch job's server listens, as the login node sees it
        rec["remote_host"] = info["address"]
    if login_node(info):  # which of the login nodes behind HOST runs it
        rec.update((k, info[k]) for k in LOGIN_FIELDS)
        # How a new connection reaches the node: through HOST, wherever it lands ("name");
        # at the node's address along HOST's route ("direct": the way the command followed
        # it, or a round-robin name that lists it); through HOST to it ("jump").
        via = getattr(conn, "node", None)
        rec["login_route"] = "jump" if via and conn.jump else "direct" if via or round_robin(
            ssh_settings(conn.options, host), host, login_node(info)) else "name"
    was = server_options(old, info) if info["reused"] else None
    if was is not None:  # the record tells how the running server was started, not what was asked
        warn_options_differ(host, session, dict(was, **shown_options(info)), params["options"])
        start = {o.dest for o in session_options() if o.start}
        rec["options"] = dict({k: v for k, v in rec["options"].items() if k not in start}, **was)
    rec["url"] = make_url(local_port, rec["base_url"], rec["app"], rec["token"])
    kept = old and old.get("local_port") == local_port and held_by_watch(old)
    rec["listener"] = old["listener"] if kept else tunnel_listener(conn, tunnel, local_port)
    return rec


def start_remote(conn: Connection, params: dict, timeout: float) -> dict:
    """The remote "start"; interrupted, it is first let finish (a start cut off halfway
    would go on there unseen), and the KeyboardInterrupt carries its info as "started"
    when it started a server."""
    try:
        return conn.run_helper("start", params, timeout=timeout)
    except KeyboardInterrupt as e:
        with signals(signal.SIG_IGN), progress("interrupted: waiting for %s" % conn.host):
            with contextlib.suppress(Error):
                info = conn.finish_helper()
                # not known (no answer): a server may run that nobody else knows of
                e.started = {} if info is None and "token" not in params else \
                    info if info and not info.get("reused") else None
                e.reused = bool(info and info.get("reused"))
                e.unknown = info is None and e.started is None  # the recorded one, as it was
        raise


def undo_start(session: Session, conn: Connection, params: dict, err: BaseException,
               info, started, forward) -> BaseException:
    """After a start failed or was interrupted: stop the server STARTED by this run (its
    forward on local port FORWARD too) and the connection opened for it; ERR again, its
    message saying what is left.  Further signals wait until this is done.  INFO is
    the server found running, when the start got that far."""
    host = session.host
    kept = info.get("reused") if info else getattr(err, "reused", False)
    note = (MSG_REUSED_KEPT if kept else MSG_NO_ANSWER if getattr(err, "unknown", False)
            else MSG_NOTHING_LEFT).format(host=host, session=session.name)
    with signals(signal.SIG_IGN):
        if started is not None and forward:
            with contextlib.suppress(Error):
                session.tunnel.close(conn, forward, destination(started))
        if started is not None and session.batch:
            cancel_job(session, conn, params, started.get("job_id"))
            note = "job %s was cancelled" % started.get("job_id")
        elif started is not None:
            try:
                conn.run_helper("stop", dict(params, force=True),
                                timeout=session.timeout * 2 + 30)
                note = MSG_UNDONE.format(host=host, session=session.name)
            except Error as e:
                note = "the Jupyter it started on %s (session %s) could not be stopped: %s; " \
                    "stop it with: %s" % (host, session.name, e,
                                          terminate_command(host, session.name))
        if conn.opened_here:
            conn.close()  # leave nothing running after a failure
    if isinstance(err, KeyboardInterrupt):
        return KeyboardInterrupt(note)
    if started is None:
        return err
    if type(err) in (Error, SshError, RemoteError):
        return type(err)(str(err) + "; " + note, err.code, err.kind, err.log_tail, **err.facts)
    log.error("%s", note)  # beside the message of an error nobody foresaw
    return err


def forward_answers(port: int, timeout: float = 10.0) -> bool:
    """Does an HTTP request through local PORT get an HTTP answer?  It carries no token:
    it only shows whether the forward reaches a server at all."""
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            return s.recv(16).startswith(b"HTTP/")
    except OSError:
        return False


def check_socket_forward(session: Session, conn, info: dict, local_port: int):
    """After a forward to the server's Unix socket: fail clearly when it does not reach it.

    sshd refuses stream-local forwarding (AllowStreamLocalForwarding no) per connection,
    while `ssh -O forward` still succeeds; the remote has just proven the socket is the
    server's, so a forward that gets no answer is sshd's refusal.  A server started for
    this run is stopped again (undo_start): a run without --unix-socket must find none."""
    if forward_answers(local_port):
        return
    raise Error(MSG_NO_STREAMLOCAL.format(host=session.host) + (
        "" if not info.get("reused") else " (stop the running server first: --terminate)"),
        kind="no-streamlocal")


MSG_JOB_TIMEOUT = (
    "job {job} on {host} did not start within {timeout:g}s (still {state}{reason}); "
    "nbtunnel cancelled it. Ask for less (--time, --cpus, --mem, --partition) or wait longer "
    "(--timeout SECONDS)"
)


def job_line(answer: dict) -> str:
    """The progress line of a batch job: id, state, the scheduler's reason, expected start."""
    if answer.get("phase") == "running":
        return "job %s running on %s, waiting for Jupyter" % (answer["job_id"],
                                                              answer.get("node") or "its node")
    text = "job %s %s" % (answer["job_id"], answer.get("job_state") or "submitted")
    if answer.get("reason"):
        text += " (%s)" % answer["reason"]
    if answer.get("expected_start"):
        text += ", expected start %s" % answer["expected_start"]
    return text


def batch_start(run: Run, conn: Connection, params: dict) -> dict:
    """Submit (or find) the session's batch job and wait until its Jupyter answers; its info.

    One short remote operation a second over the shared connection tells how the job
    fares; a terminal shows it on the progress line.  A job that this run submitted
    is cancelled when the wait ends early: --timeout, Ctrl-C, or an error."""
    s, host = run.session, conn.host
    answer = start_remote(conn, params, s.timeout + 60)
    reused, job = answer["reused"], answer["job_id"]
    log.debug("%s job %s on %s", "found" if reused else "submitted", job, host)
    deadline = time.monotonic() + s.wait_timeout
    try:
        with progress(job_line(answer)):
            while not answer.get("ready"):
                if time.monotonic() > deadline:
                    raise Error(MSG_JOB_TIMEOUT.format(
                        job=job, host=host, timeout=s.wait_timeout,
                        state=answer.get("job_state") or "waiting", reason=": %s" % answer[
                            "reason"] if answer.get("reason") else ""), kind="timeout")
                time.sleep(1)
                answer = conn.run_helper("job", dict(params, job_id=job),
                                         timeout=s.timeout + 30)
                progress.update(job_line(answer))
    except (Error, KeyboardInterrupt) as e:
        if not reused and getattr(e, "kind", None) not in ("job-refused", "job-ended",
                                                            "unreachable"):
            cancel_job(s, conn, params, job)
        e.reused = reused  # for undo_start's message
        raise
    info = dict(answer["ready"], reused=reused)
    return info


def cancel_job(session: Session, conn: Connection, params: dict, job) -> None:
    """Cancel the job JOB this run submitted, and say so (on stderr, even with -q)."""
    with signals(signal.SIG_IGN):  # a second Ctrl-C must not stop it
        try:
            conn.run_helper("stop", dict(params, force=True), timeout=session.timeout * 2 + 30,
                            wait="cancelling job %s on %s" % (job, conn.host))
            log.error("cancelled job %s on %s", job, conn.host)
        except Error as e:
            log.error("could not cancel job %s on %s: %s", job, conn.host, e)


def server_options(old, info: dict) -> dict:
    """The start options the running server was started with, as far as anyone knows:
    what the remote recorded, else the local record."""
    if isinstance(info.get("options"), dict):
        return info["options"]
    if not old or "options" not in old:
        return None  # started by an nbtunnel that did not record them
    return {k: v for k, v in old["options"].items()
            if k in {o.dest for o in session_options() if o.start}}


def shown_options(info: dict) -> dict:
    """The start options that the running server of INFO shows it has, asked for or not."""
    shown = dict(manager=info.get("manager"), app=info.get("app"),
                 unix_socket=bool(info.get("sock")), remote_port=info.get("port") or None)
    return {k: v for k, v in shown.items() if v is not None}


def warn_options_differ(host: str, session: str, was: dict, now: dict) -> None:
    """Say so when a reattach asks (NOW: on the command line, in the config file, or
    recorded from its start) for other start options than the server runs with (WAS);
    an option nobody asked for is no difference."""
    flags = {o.dest: o.flag for o in session_options()}
    switches = {o.dest for o in session_options() if o.switch}  # not set: off
    if was is None:
        return
    changed = sorted(k for k in now if (bool(was.get(k)) != bool(now[k]) if k in switches
                                        else was.get(k) != now[k]))

    def value(v):
        return "not set" if v is None else json.dumps(v)

    if changed:
        log.warning("warning: the server on %s (session %s) runs with other options than asked "
                    "(%s); it keeps its own. To restart it with these, run: %s, then this "
                    "command again", host, session,
                    ", ".join("%s %s, asked %s" % (flags.get(k, k), value(was.get(k)),
                                                   value(now.get(k))) for k in changed),
                    terminate_command(host, session))


def attach(run: Run, params: dict):
    """Under the lock: connect, start or reattach, forward, record; (connection, record, info)."""
    s = run.session
    with locked(s.state, s.host, s.name):
        old = fresh_record(s)
        if s.local_port and not (old and old.get("local_port") == s.local_port):
            check_local_port(s.local_port)  # before anything starts over there
        conn = s.connection(old)
        try:
            conn.open()
        except KeyboardInterrupt:
            raise KeyboardInterrupt(MSG_NOTHING_LEFT.format(host=s.host)) from None
        rec, info = bring_up(run, conn, old, params)
    return conn, rec, info


def check_local_port(port: int) -> None:
    """Error unless 127.0.0.1:PORT can be bound here now, as ssh would bind it."""
    import socket

    with contextlib.closing(socket.socket()) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise Error(MSG_LOCAL_PORT.format(port=port), kind="local-port") from None
            raise Error("local port %d cannot be used here: %s; choose another with "
                        "--local-port or leave it out" % (port, e.strerror),
                        kind="local-port") from None


MSG_NODE_GONE = ("login node {node} of {host}, which ran session {session}, is gone (down or out "
                 "of the rotation); its server went with it")


def on_node(rec: dict) -> str:
    """" (login node X)" when REC names the login node behind its host that runs it."""
    return " (login node %s)" % rec["login_node"] if rec.get("login_node") else ""


def cmd_start(run: Run) -> int:
    """Start or reattach to the server of the session, tunnel it, print the URL.  SIGTERM
    and SIGHUP (the terminal closed) stop a start like Ctrl-C: all of it, or nothing."""
    args, s = run.args, run.session
    with signals(interrupt):
        conn, rec, info = attach(run, start_params(run))
        try:  # from here on, the session is recorded: an interrupt leaves it
            if info.get("node_gone"):
                log.warning(MSG_NODE_GONE.format(host=s.host, session=s.name,
                                                 node=info["node_gone"]))
            if not args.quiet:
                log.info("%s Jupyter on %s%s (session %s, %s, %s) at local port %d",
                         "reattached to" if info["reused"] else "started", s.host,
                         on_node(rec), s.name,
                         rec["manager"], "socket %s" % info["sock"] if info.get("sock")
                         else "remote port %d" % info["port"], rec["local_port"])
            out = dict(public(rec), reused=info["reused"])
            print(json.dumps(out) if args.json else rec["url"], flush=True)
            if args.open:
                open_browser(s.state, rec)
        except KeyboardInterrupt:
            raise KeyboardInterrupt(MSG_KEPT.format(host=s.host, session=s.name)) from None
    if s.tunnel.foreground:
        serve_foreground(conn, s.tunnel, rec["local_port"], recorded_destination(rec))
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
    return r_write_private(os.path.join(directory, name),
                           OPEN_PAGE.format(url=html.escape(rec["url"], quote=True)))


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
        got = [shell_step(env, step) for step in env.steps(args) or ()]
        if got:
            steps += got
            used.append(env)
    return steps, used


def interrupt(signum, frame):
    """SIGTERM handler: stop like Ctrl-C."""
    raise KeyboardInterrupt


def serve_foreground(conn, tunnel, local_port: int, destination: str) -> None:
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
        tunnel.close(conn, local_port, destination)
        conn.close()
        log.info("tunnel closed")


def open_tunnel(conn, tunnel, old, destination: str, wanted) -> int:
    """Forward a local port to DESTINATION, keeping the old local port when possible."""
    if old and recorded_destination(old) != destination:
        with contextlib.suppress(Error):  # the server moved: drop the stale forward
            tunnel.close(conn, old["local_port"], recorded_destination(old))
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
            if port in WATCHED:  # --watch holds it: the new master forwards its connections
                WATCHED[port].resume(conn.socket, destination)
            elif old and port == old["local_port"] and held_by_watch(old):
                pass  # and a running --watch forwards it (a repair there follows a move)
            else:
                tunnel.open(conn, port, destination)
            return port
        except Error as e:
            error = e
    if wanted:
        check_local_port(wanted)  # taken since it was checked (a race): say so plainly
    raise Error("could not open a local port for the tunnel to %s: %s" % (conn.host, error))


JOB_FIELDS = ("job_id", "node", "job_state", "time_left")  # of a batch manager's session
LOGIN_FIELDS = ("login_node", "login_address", "login_port")  # behind HOST, where it runs


def public(rec: dict) -> dict:
    """The fields of a record that --json shows (a batch job's too, when it has them)."""
    keys = ("host", "session", "url", "local_port", "remote_port", "remote_socket", "token",
            "manager", "app", "pid", "log", "tunnel", "plugin", "environment")
    out = {k: rec.get(k) for k in keys}
    # "tunnel" is the backend here but the state in --status (both documented): these
    # two say which.  A record is written once its tunnel is up; --status looks again.
    out.update(tunnel_backend=rec.get("tunnel"), tunnel_state="up")
    out.update({k: rec[k] for k in JOB_FIELDS + ("remote_host",) if k in rec})
    out["login_node"] = rec.get("login_node")
    out["ended"] = rec.get("ended")  # how a session ended on purpose (see ENDED), else None
    out["idle_timeout"] = rec.get("idle_timeout") if rec.get("ended") else rec_idle(rec)
    return out


def find_record(records, host, session):
    """The record of HOST/SESSION, or None."""
    for rec in records:
        if rec["host"] == host and rec["session"] == session:
            return rec
    return None


def ask_host(session: Session, host: str, recs: list, no_prompt: bool = False,
             discover: bool = False):
    """(master up, {session: answer}, None or the Error) for the sessions RECS of HOST;
    with DISCOVER, also the live sessions that HOST records and RECS do not (of the
    session's name only when one was asked for), their answers marked "unrecorded"."""
    first = recs[0] if recs else None
    conn = session.connection(first, host)
    conn.no_prompt = conn.no_prompt or no_prompt
    up = conn.alive()
    # Over the master when it runs; otherwise over a connection of its own that
    # ends with the command: one handshake either way, and nothing left running.
    named = session.source("session") != "default"
    params = session.params(first["session"] if first else None,
                            sessions=[r["session"] for r in recs],
                            session_managers={r["session"]: r.get("manager") for r in recs},
                            discover=discover, only=session.name if named else None)
    try:
        answers = conn.run_helper("status", params, timeout=session.timeout + 10)
        answers += follow_nodes(session, first or dict(host=host), answers, no_prompt)
    except Error as e:
        return up, {}, e
    finally:
        if conn.opened_here and not up:  # a master to a login node found on the way
            conn.close()
    return up, {a["session"]: a for a in answers}, None


def follow_nodes(session: Session, rec: dict, answers: list, no_prompt: bool) -> list:
    """The answers of the sessions in ANSWERS that live on other login nodes, asked there
    (at the node's address, else through HOST); a node reached neither way keeps its
    sessions' answers ("elsewhere"), with the reason as "unreached"."""
    by_node = {}
    for a in answers:
        if a.get("server") == "elsewhere" and login_node(a):
            by_node.setdefault(json.dumps(login_node(a), sort_keys=True), []).append(a)
    found = []
    for node, here in by_node.items():
        conn = session.connection(dict(rec, socket=None, login_node=None), rec["host"])
        conn.no_prompt = conn.no_prompt or no_prompt
        node = json.loads(node)
        conn.point(node, node_way(conn.options, conn.host, node) == "jump")
        params = session.params(here[0]["session"], sessions=[a["session"] for a in here],
                                session_managers={a["session"]: a.get("manager") for a in here})
        try:
            conn.open(fall_back=False, jump=True)
            found += conn.run_helper("status", params, timeout=session.timeout + 10)
        except SshError as e:
            if e.kind not in SSH_LINK:
                raise
            for a in here:
                a["unreached"] = str(e)
        finally:
            if conn.opened_here:  # a master this command opened
                conn.close()
    return found


def may_need_prompt(err: Error) -> bool:
    """Did a batch-mode ssh fail where a prompt (password, host key) could help?"""
    return err.kind in ("auth", "hostkey-unknown", "needs-person")


def per_host(hosts, fn) -> dict:
    """FN(host) for every host of HOSTS at once, one thread each: {host: what it returned,
    or the Error it raised}, in the order of HOSTS.  Any other exception (a bug) is raised
    here; Ctrl-C reaches the main thread, which waits for the others (their ssh got it too)."""
    import concurrent.futures

    def one(host):
        try:
            return fn(host)
        except Error as e:
            return e

    hosts = list(hosts)
    with concurrent.futures.ThreadPoolExecutor(max(1, len(hosts))) as pool:
        futures = [pool.submit(one, h) for h in hosts]
        return {h: f.result() for h, f in zip(hosts, futures)}


def ask_hosts(session: Session, by_host: dict) -> dict:
    """Ask every host at once (one thread and one connection each): {host: (up, answers)}
    in the order of BY_HOST.

    On a terminal several hosts must not prompt at the same time, so the parallel pass
    runs ssh in batch mode, and the hosts it could not log into without a prompt are
    asked again one after the other, with their prompts."""

    def one(host, no_prompt):
        try:
            return ask_host(session, host, by_host[host], no_prompt)
        except Error as e:
            return False, {}, e

    hosts = list(by_host)
    interactive = not session.no_prompt and sys.stdin is not None and sys.stdin.isatty()
    got = {}
    if len(hosts) == 1:
        got[hosts[0]] = one(hosts[0], False)
    elif hosts:
        with progress("asking %d hosts" % len(hosts)):
            got = per_host(hosts, lambda h: one(h, interactive))
    for host in hosts:
        err = got[host][2]
        if interactive and len(hosts) > 1 and err and may_need_prompt(err):
            got[host] = one(host, False)
            err = got[host][2]
        if err:
            log.warning("warning: %s", err)
    return {h: got[h][:2] for h in hosts}


MSG_NO_MANAGER = (
    "{host} (session {session}): its session manager {manager} is not available here "
    "(plugin {plugin} is not loaded), so its server state is unknown; reinstall nbtunnel "
    "with its plugins, or load that plugin with --plugin FILE"
)


def missing_manager(rec: dict):
    """The message for a record whose session manager plugin is not loaded, or None.
    Such a session is never reported as stopped: nothing here can ask about it."""
    name = rec.get("manager") or "tmux"
    if name in MANAGERS:
        return None
    return MSG_NO_MANAGER.format(host=rec["host"], session=rec["session"], manager=name,
                                 plugin=rec.get("plugin") or name)


def nothing_recorded(records: list, host, session) -> str:
    """What --status says when no record matches HOST (and SESSION): what is recorded,
    and the recorded host closest to a mistyped one."""
    import difflib

    if not records:
        return "no sessions recorded"
    what = "for %s" % host if host is not None else ""
    what += "%s session %s" % (" and" if what else "for", session) if session else ""
    hosts = sorted({r["host"] for r in records})
    close = difflib.get_close_matches(host, hosts, 1) if host is not None else []
    listed = ", ".join("%s (session %s)" % (r["host"], r["session"]) for r in records)
    return "nothing recorded %s%s; recorded sessions: %s" % (
        what, " (did you mean %s?)" % close[0] if close else "", listed)


def unrecorded_answers(answers) -> list:
    """The ANSWERS about sessions the remote found unrecorded here, those with a valid
    name (only such names are printed or acted on)."""
    return [a for a in answers if isinstance(a, dict) and a.get("unrecorded")
            and isinstance(a.get("session"), str) and SESSION_RE.match(a["session"])]


def unrecorded_row(host: str, answer: dict) -> dict:
    """The --status row of a live session that HOST records and this machine does not
    (a start cut short after the server started, or a lost state directory): no tunnel,
    no URL, no token."""
    row = {k: None for k in public({})}
    row.update(host=host, session=answer["session"], manager=answer.get("manager"),
               app=answer.get("app"), pid=answer.get("pid"), log=answer.get("log"),
               server=answer["server"], tunnel="down", tunnel_state="down",
               remote_port=answer.get("port") or None, remote_socket=answer.get("sock"),
               recorded=False, recorded_as=None, pending={}, pending_text="", environment=[])
    row.update({k: answer.get(k) for k in JOB_FIELDS if "job_id" in answer})
    return row


def ssh_account(session: Session, host: str, rec=None):
    """(user, hostname, port) that HOST logs into, as ``ssh -G`` says with the ssh options
    of this command, else those REC was recorded with; None when ssh cannot say."""
    seen = ssh_settings(ssh_options(session) or (rec or {}).get("ssh_options") or [], host)
    return (seen.get("user"), seen.get("hostname"), seen.get("port")) \
        if seen.get("hostname") else None


def recorded_as_other(session: Session, host: str, answers) -> dict:
    """{session name: its record} for the sessions in ANSWERS that HOST found unrecorded
    here but that are recorded under another name of the same account (another ssh alias
    with the same user, HostName and Port): the same remote state, so the same session."""
    names = {a["session"] for a in unrecorded_answers(answers)}
    others = [r for r in session.records if r["host"] != host and r["session"] in names
              and not r.get("ended")]
    if not others:
        return {}
    mine, found = ssh_account(session, host), {}
    for rec in others:
        if mine is not None and rec["session"] not in found and \
                ssh_account(session, rec["host"], rec) == mine:
            found[rec["session"]] = rec
    return found


def terminate_command(host: str, session: str) -> str:
    """The command that ends HOST's session SESSION."""
    return suggested(host, "--session", session, "--terminate")


MSG_NOT_RUNNING = ("jupyter is not running: `{ensure}` or `{start}` starts it again with "
                   "the same URL")


def status_asked(s: Session, by_host: dict):
    """Ask the hosts of BY_HOST about their sessions for --status: ({host: (up, answers)},
    None or the Error of a named host that nothing is recorded for).  Sessions whose
    manager plugin is missing are not asked about: state unknown."""
    def ask(rec):  # an ended session needs no question: nothing runs
        return not missing_manager(rec) and not rec.get("ended")

    wanted = {h: [r for r in recs if ask(r)] for h, recs in by_host.items()
              if any(ask(r) for r in recs)}
    if s.host is None:
        return ask_hosts(s, wanted), None
    # The host named: also what runs there unrecorded, in the same one question.
    try:
        up, answers, err = ask_host(s, s.host, wanted.get(s.host, []), discover=True)
    except Error as e:
        up, answers, err = False, {}, e
    if err and by_host.get(s.host):
        log.warning("warning: %s", err)
    return {s.host: (up, answers)}, err if err and not by_host.get(s.host) else None


def ended_row(rec: dict) -> dict:
    """The --status row of a session that ended on purpose: nothing runs, nothing asked."""
    return dict(public(rec), server="stopped", tunnel="down", recorded=True, recorded_as=None,
                tunnel_state="down", pending={}, pending_text="")


def answered_fields(a) -> dict:
    """The fields of a --status row that the host's answer A (None: no answer) decides."""
    out = {"login_node": a["login_node"]} if a and a.get("login_node") else {}
    out["unreached"] = a.get("unreached") if a else None
    if a and a.get("ended") in ENDED:  # File > Shut Down, or --terminate elsewhere
        out["ended"] = a["ended"]
    return out


def tunnel_state(s: Session, h: str, rec: dict, a, up, port_open: bool) -> str:
    """"up" or "down": the tunnel of REC as asked through host H, whose master is UP."""
    backend = TUNNELS.get(rec.get("tunnel", "ssh"))
    held_here = backend is not None and backend.foreground  # by a foreground nbtunnel
    mine = up if rec["host"] == h else port_open and s.connection(
        rec, host=rec["host"]).alive()  # its own name's master holds its tunnel
    if a and a["server"] == "running" and destination(a) != recorded_destination(rec):
        return "down"  # the forward points at an older server
    return "up" if (held_here or mine) and port_open else "down"


def record_fields(s: Session, rec: dict, tunnel: str) -> dict:
    """The fields of a --status row that the record REC and the config decide."""
    pending = config_pending(s.cfg, rec) if "options" in rec else {}
    keys = {o.dest: o.key for o in session_options()}
    return dict(
        plugin=rec.get("plugin") or (
            MANAGERS[rec["manager"]].source if rec.get("manager") in MANAGERS else None),
        backend=rec.get("tunnel"), tunnel_backend=rec.get("tunnel"), tunnel_state=tunnel,
        environment=rec.get("environment", []),
        pending={keys[d]: dict(value=v, source=where) for d, (v, where) in sorted(pending.items())},
        pending_text=pending_text(pending),
        last_failure=last_failure(s.state, rec["host"], rec["session"]))


def live_row(s: Session, h: str, rec: dict, a, up, port_open: bool, missing) -> dict:
    """The --status row of REC, a session not ended on purpose, as host H answered (A)."""
    row = dict(public(rec), server=a["server"] if a else "unknown", recorded=True,
               recorded_as=None)
    if rec["host"] != h:  # asked by another name of the same account
        row.update(host=h, recorded_as=rec["host"])
    row.update(answered_fields(a))
    row["tunnel"] = tunnel_state(s, h, rec, a, up, port_open)
    for key in JOB_FIELDS if a and "job_id" in a else ():
        row[key] = a.get(key)
    if missing:
        row["missing_plugin"] = rec.get("manager")
        row.update({k: None for k in ("job_state", "time_left") if k in row})  # stale
    row.update(record_fields(s, rec, row["tunnel"]))
    log.debug("%s %s: served by manager %s (%s), tunnel %s", h, rec["session"],
              rec.get("manager"), row["plugin"], row["backend"])
    return row


def host_rows(s: Session, h: str, recs: list, up, answers: dict) -> list:
    """The --status rows of host H: its records RECS (and, when H was named, those recorded
    under another name of the same account), then what it runs unrecorded here.  UP: is
    its master up (None: H was not asked); ANSWERS: {session: answer}."""
    aliased = recorded_as_other(s, h, answers.values()) if h == s.host else {}
    rows = []
    for rec in recs + list(aliased.values()):
        if rec.get("ended"):
            rows.append(ended_row(rec))
            continue
        missing = missing_manager(rec)
        if missing:
            log.warning("warning: %s", missing)
        port_open = local_port_open(rec["local_port"])
        if port_open and up is None and rec["host"] == h:  # not asked: master still up?
            up = s.connection(rec, host=h).alive()
        rows.append(live_row(s, h, rec, None if missing else answers.get(rec["session"]),
                             up, port_open, missing))
    return rows + [unrecorded_row(h, a) for a in unrecorded_answers(answers.values())
                   if a["session"] not in aliased]


def status_rows(s: Session):
    """(the --status rows, one per session, as --status --json prints them; None or the
    Error of a named host that nothing is recorded for and that could not be asked)."""
    by_host = s.recorded(same_name=s.source("session") != "default")
    asked, unasked = status_asked(s, by_host)
    if s.host is not None:
        by_host.setdefault(s.host, [])
    return [row for h, recs in by_host.items()
            for row in host_rows(s, h, recs, *asked.get(h, (None, {})))], unasked


def status_notes(r: dict) -> str:
    """The tab-separated notes at the end of the --status line of row R, a live session."""
    notes = "\tpending: %s at next start" % r["pending_text"] if r["pending_text"] else ""
    if r.get("last_failure"):
        notes += "\tlast --ensure failure: %s" % r["last_failure"]["message"]
    if r["server"] == "gone":
        notes = "\tlogin node %s is gone, and its server with it: --ensure starts " \
            "a new one on a node that answers, --terminate forgets it%s" % (
                r["login_node"], notes)
    elif r["unreached"]:
        notes = "\t%s%s" % (r["unreached"], notes)
    elif r["login_node"]:
        notes = "\tlogin node %s%s" % (r["login_node"], notes)
    if r["recorded_as"]:
        notes = "\trecorded as %s%s" % (r["recorded_as"], notes)
    if r["server"] == "stopped":  # crashed, killed or out of time: not on purpose
        name = r["recorded_as"] or r["host"]
        notes = "\t%s%s" % (MSG_NOT_RUNNING.format(
            ensure=suggested(name, "--session", r["session"], "--ensure"),
            start=suggested(name, "--session", r["session"])), notes)
    return notes


def status_line(r: dict) -> str:
    """The --status line of row R."""
    job = "\tjob=%s %s node=%s left=%s" % tuple(r.get(k) or "-" for k in (
        "job_id", "job_state", "node", "time_left")) if "job_id" in r else ""
    if not r["recorded"]:
        return "%s\t%s\tserver=%s\ttunnel=down\tnot recorded here%s; end it with: %s" % (
            r["host"], r["session"], r["server"], job,
            terminate_command(r["host"], r["session"]))
    if r["ended"]:
        return "%s\t%s\tserver=stopped\tended: %s; start it again with: %s" % (
            r["host"], r["session"], ended_text(r["ended"], r.get("idle_timeout")),
            start_again(r["host"], r["session"]))
    idle = "\tidle-timeout=%s" % (duration_text(r["idle_timeout"])
                                   if r["idle_timeout"] else "never")
    gone = "\tmanager plugin %s not loaded" % r["missing_plugin"] if "missing_plugin" in r else ""
    return "%s\t%s\tserver=%s\ttunnel=%s\t%s%s%s%s%s" % (
        r["host"], r["session"], r["server"], r["tunnel"],
        r["url"] if r["tunnel"] == "up" else "local port %s" % r["local_port"], job,
        idle, gone, status_notes(r))


def cmd_status(run: Run) -> int:
    """Ask each recorded host about its sessions; one line (or JSON object) each."""
    args, s = run.args, run.session
    rows, unasked = status_rows(s)
    if args.json:
        print(json.dumps(rows))
    else:
        for r in rows:
            print(status_line(r))
    if not rows and not args.quiet:
        log.info("%s%s", nothing_recorded(s.records, s.host,
                                          s.name if s.source("session") != "default" else None),
                 "; %s could not be asked: %s" % (s.host, unasked.text().splitlines()[0])
                 if unasked else "")
    return 0


def cmd_forget(run: Run) -> int:
    """--forget: the ended sessions (of HOST; named NAME when one was asked for) leave
    --status now (see out_of_sight); a live one is left alone."""
    s = run.session
    named = s.source("session") != "default"
    gone = [r for recs in s.recorded(same_name=named).values() for r in recs if r.get("ended")]
    for rec in gone:
        save_record(s.state, dict(rec, forgotten=True))
        if not run.args.quiet and not run.args.json:
            log.info("%s: session %s forgotten (it had ended: %s)", rec["host"], rec["session"],
                     ended_text(rec["ended"], rec.get("idle_timeout")))
    if run.args.json:
        print(json.dumps([dict(host=r["host"], session=r["session"], ended=r["ended"])
                          for r in gone]))
    elif not gone and not run.args.quiet:
        log.info("no ended session to forget%s", " for %s" % s.host if s.host else "")
    return 0


def close_tunnel(session: Session, conn: Connection, rec=None) -> None:
    """Remove the forward of SESSION (recorded as REC); end the master too unless another
    recorded session's tunnel uses it."""
    others = [r for r in load_records(session.state) if r.get("socket") == conn.socket
              and (r["host"], r["session"]) != (session.host, session.name)]
    if not others:
        conn.close()
    elif rec and "local_port" in rec:
        with contextlib.suppress(Error):
            get("tunnel", rec.get("tunnel", "ssh")).close(conn, rec["local_port"],
                                                           recorded_destination(rec))


def terminate_session(run: Run) -> dict:
    """Stop the server gracefully, end its session, close the tunnel, drop the record;
    the remote's answer (raises exit 3 while kernels are busy and --force is not given)."""
    s = run.session
    host, session, rec = s.host, s.name, s.record()
    with locked(s.state, host, session):
        conn = s.connection(rec)
        conn.open()
        try:
            result = conn.run_helper("stop", s.params(force=run.args.force),
                                     timeout=s.timeout * 2 + 30)
            if result.get("busy"):
                raise Error(MSG_BUSY.format(session=session, host=host, n=len(result["busy"]),
                                            names=", ".join(result["busy"])), 3)
        except BaseException:
            if conn.opened_here:
                conn.close()
            raise
        close_tunnel(s, conn, rec)
        if rec is not None:  # one this machine never recorded leaves no record behind
            save_ended(s.state, host, session, "terminated")
    return dict(host=host, session=session, stopped=result["stopped"], how=result.get("how"),
                recorded=rec is not None,
                login_node=result.get("node_gone") or (rec or {}).get("login_node"),
                node_gone=bool(result.get("node_gone")))


def unrecorded_sessions(s: Session, recs) -> list:
    """Records made up for the live sessions that the host of S records and RECS (this
    machine's records of it) do not, found over one connection; none when it cannot be
    asked (said as a warning: the recorded sessions are still ended)."""
    recs = recs or []
    conn = s.connection(recs[0] if recs else None)
    known = [r["session"] for r in recs]
    try:
        answers = conn.run_helper("status", s.params(sessions=[], known=known, discover=True),
                                  timeout=s.timeout + 10)
    except Error as e:
        log.warning("warning: cannot ask %s which sessions it records: %s", s.host,
                    e.text().splitlines()[0])
        return []
    return [dict(host=s.host, session=a["session"], manager=a.get("manager"), unrecorded=True)
            for a in unrecorded_answers(answers)]


def say_terminated(run: Run, results: list) -> None:
    """Tell what --terminate did: JSON (one object, or a list for --all) or one line each."""
    if run.args.json:
        print(json.dumps(results if run.args.all else results[0]))
    elif not run.args.quiet:
        for r in results:
            log.info("%s: session %s %s%s", r["host"], r["session"], "forgotten: its login node "
                     "%s is gone, and its server with it" % r["login_node"] if r["node_gone"]
                     else "stopped" if r["stopped"] else "was not running",
                     "" if r["recorded"] else " (it was not recorded here)")


def every_session(run: Run, cfg, action):
    """--all: ACTION (terminate_session or ensure_session) for every recorded session (of
    HOST), all hosts at once, one connection each: the sessions of one host go one after
    the other over its connection.  Results come in record order; the exit code is the
    worst one."""
    s = run.session
    by_host = s.recorded()
    if s.host is not None and action is terminate_session:
        by_host[s.host] = by_host.get(s.host, []) + unrecorded_sessions(s, by_host.get(s.host))

    def one_host(h):
        done = []
        for rec in by_host[h]:
            try:
                one = resolve(run.args, cfg, s.records, h, rec["session"], s.state)
                done.append((rec, action(Run(run.args, one, run.plugins)), None))
            except Error as e:
                done.append((rec, None, e))
        return done

    outcome = [item for done in per_host(by_host, one_host).values() for item in done]
    code = 0
    for rec, _, err in outcome:
        if err is not None and getattr(err, "said", False):
            code = max(code, err.code)
        elif err is not None:
            log.error("error: %s (session %s): %s", rec["host"], rec["session"],
                      err.text().splitlines()[0])
            code = max(code, err.code)
    return code, [result for _, result, err in outcome if err is None]


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


def repair_change(host: str, session: str, old, rec: dict, info: dict, tunnel_was_up):
    """What a repair changed, without the URL; None when nothing had to change."""
    where = "%s (session %s)" % (host, session)
    if not info["reused"]:
        if old:
            return "restarted Jupyter on %s, which was not running" % where
        return "started Jupyter on %s" % where
    if old is None:
        return "reattached to Jupyter already running on %s" % where
    if tunnel_was_up and rec["local_port"] == old["local_port"] \
            and recorded_destination(rec) == recorded_destination(old):
        return None
    moved = "" if rec["local_port"] == old["local_port"] else \
        " (local port %d was taken)" % old["local_port"]
    return "reopened the tunnel to %s on local port %d%s" % (where, rec["local_port"], moved)


def repair_lines(host: str, session: str, old, rec: dict, info: dict, tunnel_was_up) -> list:
    """One line for each thing a repair changed (nothing when nothing had to change)."""
    change = repair_change(host, session, old, rec, info, tunnel_was_up)
    return ["%s: %s" % (change, rec["url"])] if change else []


def repair(run: Run, conn: Connection, old, params: dict):
    """With the lock held: connect, start or reattach, forward again; (record, lines)."""
    host = run.session.host
    tunnel_was_up = bool(old) and conn.alive() and forwarded(old["local_port"])
    conn.open()
    try:
        rec, info = bring_up(run, conn, old, params)
    except Error as e:  # the remote knows it ended on purpose (shut down, or another laptop)
        if e.kind != "ended":
            raise
        return ended_on_purpose(run, conn, old, e.how)
    deadline = time.monotonic() + 10
    while not api_ok(rec):
        if time.monotonic() > deadline:
            raise Error(MSG_NOT_ANSWERING.format(host=host, session=rec["session"],
                                                 port=rec["local_port"], log=rec.get("log")),
                        kind="not-answering")
        time.sleep(0.3)
    change = repair_change(host, rec["session"], old, rec, info, tunnel_was_up)
    if info.get("node_gone"):
        change = "%s; started a new one on login node %s" % (MSG_NODE_GONE.format(
            host=host, session=rec["session"], node=info["node_gone"]), rec.get("login_node"))
    if old and not info["reused"]:  # started again as it last ran, whatever changed since
        pending = run.session.pending
        change += ", as it last ran%s" % (
            "; %s will apply when you start it yourself" % pending_text(pending)
            if pending else "")
    return rec, ["%s: %s" % (change, rec["url"])] if change else []


def ended_on_purpose(run: Run, conn: Connection, old, how: str):
    """Close what is left of a session that ended on purpose (HOW) and remember that;
    (its record, one line saying so)."""
    s = run.session
    with contextlib.suppress(Error):
        close_tunnel(s, conn, old)
    idle = idle_minutes(s.idle_timeout, s.manager)
    rec = save_ended(s.state, s.host, s.name, how, idle)
    return rec, ["Jupyter on %s (session %s) was %s; not starting it again (start it with: %s)"
                 % (s.host, s.name, ended_text(how, idle), start_again(s.host, s.name))]


def healthy(session: Session, rec, conn=None) -> bool:
    """Is the session of REC up and answering, both ends of its tunnel proven ours?

    The local end is proven by api_ok.  The remote end of a TCP tunnel could be anyone
    who bound the port after the server died, so the remote is asked first, over the
    running master (no new login), whether the recorded server still holds it.  A Unix
    socket in a private directory cannot be taken over, so it needs no such question."""
    if not rec or not forwarded(rec["local_port"], listening=False):
        return False
    if not rec.get("remote_socket"):
        conn = conn or session.connection(rec)
        if not conn.alive():
            return False  # no tunnel without its master
        try:
            state = conn.run_helper("status", session.params(rec["session"], sessions=[
                rec["session"]]), timeout=min(session.timeout, 15) + 10)[0]
        except Error:
            return False
        if state.get("server") != "running" or (state.get("port"), state.get("pid")) != (
                rec["remote_port"], rec.get("pid")):
            return False
    return api_ok(rec)


def ensure_session(run: Run):
    """Start or repair the server and tunnel of the session: (record, repair lines)."""
    s = run.session
    s.no_prompt = True  # never prompt, even on a terminal (and main() keeps the line off)
    rec = fresh_record(s)
    lines = []
    if ended_record(s):  # ended on purpose: it stays so, and nothing needs a login
        return ended_record(s), lines
    if not healthy(s, rec):  # no login: one question over the master, one request
        params = start_params(run)
        with locked(s.state, s.host, s.name, timeout=s.timeout * 3 + 60):
            rec = fresh_record(s)
            if ended_record(s):
                return ended_record(s), lines
            if not healthy(s, rec):  # else a run we waited for has repaired it
                # Only a session recorded here is repaired; a first run here starts it.
                params = dict(params, repair=rec is not None)
                rec, lines = repair(run, s.connection(rec), rec, params)
    return rec, lines


def failure_path(state: str, host: str, session: str) -> str:
    """Where the last failure of --ensure for HOST/SESSION is remembered."""
    return os.path.join(state, record_name(host, session)[:-len(".json")] + ".failure")


def last_failure(state: str, host: str, session: str):
    """The last failure of --ensure for HOST/SESSION ({message, at}), or None."""
    fd = None
    with contextlib.suppress(OSError):
        fd = open_private(failure_path(state, host, session), os.O_RDONLY, "failure note")
    if fd is None:
        return None
    with os.fdopen(fd) as f, contextlib.suppress(ValueError):
        found = json.load(f)
        return found if isinstance(found, dict) and isinstance(found.get("message"), str) \
            else None
    return None


def ensure_said_once(run: Run):
    """ensure_session; a failure already reported by the run before is not said again
    (cron mails every output: once per change, not 288 times a day).  It stays visible
    in --status until a run succeeds."""
    s = run.session
    path = failure_path(s.state, s.host, s.name)
    try:
        result = ensure_session(run)
    except Error as e:
        line = e.text().splitlines()[0]
        last = last_failure(s.state, s.host, s.name)
        e.said = bool(last) and last["message"] == line and not run.args.verbose  # -v: a person
        if not e.said:
            r_write_private(path, json.dumps(dict(message=line, at=int(time.time()))))
        raise
    with contextlib.suppress(OSError):
        os.remove(path)
    return result


def say_ensured(run: Run, results: list) -> None:
    """Tell what --ensure did: nothing when all was well, else one line per repair."""
    if run.args.json:
        rows = [dict(public(rec), repairs=lines) for rec, lines in results]
        print(json.dumps(rows if run.args.all else rows[0]))
    else:
        for _, lines in results:
            for line in lines:
                print(line)


def link_failure(conn: Connection, err: Error) -> bool:
    """Was ERR the link failing (worth retrying), not a refusal or a broken server?"""
    if err.kind in SSH_REFUSALS:
        return False
    if err.kind == "no-answer":
        conn.close()  # a hung link: drop the master so that the next try reconnects
    if err.kind in SSH_LINK + ("not-answering",):
        return True  # the link is down, or the server is there but slow: look again later
    return not conn.alive()


def watch_repair(run: Run, conn: Connection, rec: dict, params: dict):
    """With the lock held: find out what broke and repair it; (record, lines), or None
    when the server was shut down on purpose (File > Shut Down, or --terminate)."""
    s = run.session
    host, session = s.host, s.name
    if healthy(s, rec, conn):
        return rec, []  # another run repaired it meanwhile
    if not conn.alive():
        log.warning("the connection to %s is down; reconnecting", host)
    tunnel_was_up = conn.alive() and forwarded(rec["local_port"])
    conn.open()
    state = conn.run_helper("status", s.params(sessions=[session]),
                            timeout=min(s.timeout, 15))[0]
    if state["server"] == "stopped" and state.get("ended") != "died":  # not "gone"
        how = state.get("ended") if state.get("ended") in ("shutdown", "idle") else "terminated"
        idle = idle_minutes(s.idle_timeout, s.manager)
        log.info("Jupyter on %s (session %s) was %s; closing the tunnel", host, session,
                 ended_text(how, idle))
        close_tunnel(s, conn, rec)
        save_ended(s.state, host, session, how, idle)
        return None
    new, lines = repair(run, conn, rec, params)
    if new.get("ended"):
        log.info("%s", lines[0])
        return None
    if tunnel_was_up and not lines and state["server"] == "running":
        lines = ["the tunnel to %s (session %s) answers again" % (host, session)]
    return new, lines


def on_terminal() -> bool:
    """Is there a person at a terminal who could answer ssh's questions?"""
    return sys.stdin is not None and sys.stdin.isatty()


def watch_loop(run: Run, conn: Connection, rec: dict, params: dict) -> None:
    """Check every --interval seconds, repair with backoff; return once the server is shut down."""
    s = run.session
    failures, said = 0, None
    while True:
        if failures:
            wait_backoff(conn, min(BACKOFF_MAX, 2 ** (failures - 1)))
        else:
            wait_watching(rec, s.interval, conn)
        current = fresh_record(s)
        if current and current.get("socket") not in (None, conn.socket):
            conn = s.connection(current)  # another command made the session a new connection
            conn.no_prompt, conn.shared_only = not on_terminal(), True
        held = WATCHED.get((current or rec)["local_port"])
        if held is not None and not held.forwarded and current and current != rec \
                and conn.alive():  # a command on a terminal connected and proved it anew
            with contextlib.suppress(Error):
                held.resume(conn.socket, recorded_destination(current))
        if not forwarded((current or rec)["local_port"]):
            pass  # the master has ended: repair at once
        elif healthy(s, current, conn):
            rec, failures, said = current, 0, None
            continue
        try:
            with locked(s.state, s.host, s.name):
                result = watch_repair(run, conn, fresh_record(s) or rec, params)
        except Error as e:
            # A login that needs a person, without one: wait for a connection made on a
            # terminal (`nbtunnel HOST` shares the same one), retrying at the slowest pace.
            waits = e.kind == "needs-person" and conn.no_prompt
            if not (waits or link_failure(conn, e)):
                raise
            failures = BACKOFF_MAX if waits else failures + 1
            line = str(e).splitlines()[0]
            if line != said:  # one line when the state changes, not one per try
                log.warning("%s; trying again in %ds, and every %ds at most until it changes",
                            line, min(BACKOFF_MAX, 2 ** (failures - 1)), BACKOFF_MAX)
                said = line
            continue
        if result is None:
            return
        rec, lines = result
        for line in lines:
            log.info("%s", line)
        failures, said = 0, None


def cmd_watch(run: Run) -> int:
    """Start or reattach, then keep server and tunnel healthy until Ctrl-C, SIGTERM or shutdown."""
    args, s = run.args, run.session
    host, session = s.host, s.name
    ended = ended_record(s)
    if ended:
        log.info("Jupyter on %s (session %s) was %s; not starting it again (start it with: %s)",
                 host, session, ended_text(ended["ended"], ended.get("idle_timeout")),
                 start_again(host, session))
        return 0
    params = dict(start_params(run), repair=fresh_record(s) is not None)
    try:
        conn, rec, info = attach(run, params)  # may prompt on a terminal; reconnections never
    except Error as e:
        if e.kind != "ended":
            raise
        with locked(s.state, host, session):
            conn = s.connection(fresh_record(s))
            log.info("%s", ended_on_purpose(run, conn, fresh_record(s), e.how)[1][0])
        return 0
    with locked(s.state, host, session):
        watch_port(s, conn, rec)  # before the URL is out: from now on no connection is refused
    print(json.dumps(dict(public(rec), reused=info["reused"])) if args.json else rec["url"],
          flush=True)
    if not info["reused"]:
        log.info("started Jupyter on %s (session %s, %s, %s) at local port %d", host, session,
                 rec["manager"], "socket %s" % info["sock"] if info.get("sock")
                 else "remote port %d" % info["port"], rec["local_port"])
    log.info("watching Jupyter on %s (session %s) every %gs; Ctrl-C closes the tunnel%s", host,
             session, s.interval, " and stops the server" if args.terminate else "")
    # On a terminal a repair may ask again what the login asks (a one-time code): once per
    # new connection, with the progress line out of the way.  Without one, never.
    s.no_prompt = True
    conn.no_prompt, conn.shared_only = not on_terminal(), True
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        watch_loop(run, conn, rec, dict(params, repair=True))
        return 0  # the server was shut down: nothing left to watch
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        unwatch_ports()
    if args.terminate:
        s.records = load_records(s.state)
        say_terminated(run, [terminate_session(run)])
        return 0
    last = fresh_record(s) or rec
    close_tunnel(s, conn if last.get("socket") in (None, conn.socket) else s.connection(last),
                 last)
    log.info("closed the tunnel to %s (session %s); the server keeps running", host, session)
    return 0


# --watch's own port ###########################################################
#
# When the ssh master ends, its forward stops listening, and every connection to the
# port is refused until a new master forwards it again.  A browser tab counts each
# refusal against its own reconnection budget and waits longer before the next try
# (JupyterLab: up to 2**n - 1 seconds, and 10-30 s after a failed look at its kernel),
# so it stays broken long after the tunnel is back.  Holding the port only once the
# master has ended leaves a moment in which the tab's first retry is refused.  So
# --watch binds the local port itself for as long as it runs, and the port never
# refuses: each connection is handed to the master through its control socket (the
# request of `ssh -W`, with the connection itself passed as the stdio file
# descriptors), so ssh moves the bytes exactly as for `ssh -L`.  While no master
# runs, connections are accepted and wait, unanswered, until the repair is done.

MUX_HELLO, MUX_STDIO_FWD, MUX_OPENED = 0x00000001, 0x10000008, 0x80000006
MUX_VERSION = 4


def mux_packet(*fields) -> bytes:
    """One message of the ssh control protocol: u32 numbers and length-prefixed strings."""
    import struct

    body = b"".join(struct.pack(">I", f) if isinstance(f, int)
                    else struct.pack(">I", len(f)) + f for f in fields)
    return struct.pack(">I", len(body)) + body


def mux_read(sock) -> int:
    """The type of the next message on the control socket SOCK (its body is dropped)."""
    import struct

    def exactly(n):
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise OSError("the ssh master closed its control socket")
            data += chunk
        return data

    size = struct.unpack(">I", exactly(4))[0]
    if not 4 <= size <= 1 << 16:
        raise OSError("a malformed message on the ssh control socket")
    return struct.unpack(">I", exactly(size)[:4])[0]


def mux_connect(control_path: str):
    """A control connection to the master at CONTROL_PATH, past the greeting."""
    import socket

    ctl = socket.socket(socket.AF_UNIX)
    try:
        ctl.settimeout(5)
        ctl.connect(control_path)
        ctl.sendall(mux_packet(MUX_HELLO, MUX_VERSION))
        if mux_read(ctl) != MUX_HELLO:
            raise OSError("the ssh master did not greet")
    except OSError:
        ctl.close()
        raise
    return ctl


def mux_forward(control_path: str, destination: str, sock):
    """Ask the master at CONTROL_PATH to connect to DESTINATION ("ADDR:PORT") and carry
    the connection SOCK there and back; the control connection, which must stay open
    as long as the forwarded one does (the master closes it when that ends)."""
    import socket
    import struct

    host, _, port = destination.rpartition(":")
    ctl = mux_connect(control_path)
    try:
        ctl.sendall(mux_packet(MUX_STDIO_FWD, 1, b"", host.strip("[]").encode(), int(port)))
        for _ in range(2):  # as stdin and as stdout
            ctl.sendmsg([b"\0"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                   struct.pack("i", sock.fileno()))])
    except OSError:
        ctl.close()
        raise
    return ctl


class WatchPort:
    """The tunnel's local port, bound by --watch: see the banner above.

    Connections go through the master only to the destination the last repair proved to
    be the session's own server; the token is the browser's, nbtunnel never reads it."""

    LIMIT = 64  # connections waiting at most while no master runs; more are refused

    def __init__(self, port: int):
        import socket

        self.port, self.route, self.master, self.waiting = port, None, None, []
        self.lock, self.down = threading.Lock(), threading.Event()
        self.listener = socket.socket()
        # SO_REUSEADDR: the master's old connections may linger in TIME_WAIT on this port.
        # It never lets a bind succeed over another process's live listener.
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.listener.bind(("127.0.0.1", port))
            self.listener.listen(128)
        except OSError:
            self.listener.close()
            raise
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        """Hand each connection to the master, or keep it while none runs."""
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._forward, args=(sock, self.route), daemon=True).start()

    def _forward(self, sock, route) -> None:
        """Pass SOCK to the master of ROUTE and stay until the master is done with it."""
        if route is None:
            return self._keep(sock)
        try:
            ctl = mux_forward(route[0], route[1], sock)
        except OSError as e:  # the master has ended
            log.debug("no ssh master for a connection to local port %d: %s", self.port, e)
            with self.lock:
                if self.route is route:
                    self.route = None
            self.down.set()
            return self._keep(sock)
        sock.close()  # the master has it now
        with contextlib.suppress(OSError):
            ctl.settimeout(None)
            while ctl.recv(1 << 12):
                pass
        ctl.close()

    def _keep(self, sock) -> None:
        """Keep SOCK until a master forwards again (see resume)."""
        with self.lock:
            if self.route is None and len(self.waiting) < self.LIMIT:
                self.waiting.append(sock)
                return
            route = self.route
        if route is None:
            sock.close()
        else:
            self._forward(sock, route)

    def _sentinel(self, ctl) -> None:
        """Wait on CTL, an idle control connection: the master closes it as it ends."""
        with contextlib.suppress(OSError):
            while ctl.recv(1 << 12):
                pass
        ctl.close()
        self.lost(ctl)

    def lost(self, master) -> None:
        """The master (its idle control connection) has ended: keep new connections,
        let --watch repair."""
        with self.lock:
            if self.master is not master:
                return  # a newer master forwards already, or the port is closed
            self.route = self.master = None
        log.debug("the ssh master ended; local port %d keeps its connections", self.port)
        self.down.set()

    def resume(self, control_path: str, destination: str) -> None:
        """Forward through the master at CONTROL_PATH to DESTINATION from now on; the
        connections kept meanwhile go first."""
        try:
            master = mux_connect(control_path)
            master.settimeout(None)
        except OSError as e:
            raise Error("no ssh master at %s to forward local port %d: %s"
                        % (control_path, self.port, e)) from None
        route = (control_path, destination)
        with self.lock:
            waiting, self.waiting, self.route = self.waiting, [], route
            old, self.master = self.master, master
            self.down.clear()
        if old is not None:
            old.close()
        threading.Thread(target=self._sentinel, args=(master,), daemon=True).start()
        for sock in waiting:
            threading.Thread(target=self._forward, args=(sock, route), daemon=True).start()
        if waiting:
            log.debug("forwarding %d connection(s) kept on local port %d", len(waiting),
                      self.port)

    @property
    def forwarded(self) -> bool:
        """Does a master forward the port now?"""
        return self.route is not None

    def close(self) -> None:
        """Stop listening; close the connections still waiting."""
        self.listener.close()
        with self.lock:
            waiting, self.waiting, self.route = self.waiting, [], None
            master, self.master = self.master, None
        for sock in waiting + [master] * bool(master):
            sock.close()


WATCHED = {}  # local port -> WatchPort, in --watch


def watch_port(s: Session, conn, rec: dict):
    """Take REC's local port over from the master's forward for --watch (see WatchPort);
    None when it cannot be: another backend, a Unix socket there, or a port taken."""
    port, dest = rec.get("local_port"), recorded_destination(rec)
    if port in WATCHED:
        return WATCHED[port]
    if s.tunnel.name != "ssh" or not isinstance(conn, Connection) or dest.startswith("/") \
            or held_by_watch(rec) or not listener_ours(rec):
        return None
    with contextlib.suppress(Error):
        s.tunnel.close(conn, port, dest)
    for _ in range(50):  # the master has let go of it when `ssh -O cancel` returns
        try:
            WATCHED[port] = held = WatchPort(port)
            break
        except OSError as e:
            error = e
            time.sleep(0.02)
    else:
        log.debug("local port %d stays with the ssh master: %s", port, error)
        with contextlib.suppress(Error):
            s.tunnel.open(conn, port, dest)
        return None
    try:
        held.resume(conn.socket, dest)
    except Error as e:
        log.debug("%s", e)  # the master ended already: the first repair forwards it
    rec["listener"] = tunnel_listener(conn, s.tunnel, port)
    save_record(s.state, rec)
    return held


def unwatch_ports() -> None:
    """Let go of the ports --watch holds."""
    for port in list(WATCHED):
        WATCHED.pop(port).close()


def forwarded(port: int, listening: bool = True) -> bool:
    """Does a master forward PORT now (a port --watch holds also listens without one)?
    Not LISTENING: only a port held here is looked at."""
    if port in WATCHED:
        return WATCHED[port].forwarded
    return local_port_open(port) if listening else True


def wait_backoff(conn, seconds: float) -> None:
    """Sleep SECONDS between two repairs, or less: return as soon as a master runs at
    CONN's control socket where none ran (a command on a terminal has connected, e.g.
    with the one-time code --watch cannot type)."""
    def master_up() -> bool:
        try:
            mux_connect(conn.socket).close()
            return True
        except OSError:
            return False

    deadline = time.monotonic() + seconds
    absent = isinstance(conn, Connection) and not master_up()
    while time.monotonic() < deadline:
        time.sleep(max(0.0, min(1.0, deadline - time.monotonic())))
        if absent and master_up():
            return


def wait_watching(rec, seconds: float, conn) -> None:
    """Sleep SECONDS, or less: return as soon as the ssh master of REC's tunnel has ended.
    An idle connection to its control socket closes the moment it ends (its connection
    dropped, or stalled for as long as its ServerAlive settings allow)."""
    held = WATCHED.get(rec.get("local_port"))
    if held is not None:
        held.down.wait(seconds)
        return
    try:
        ctl = mux_connect(conn.socket) if isinstance(conn, Connection) else None
    except OSError:
        return  # no master: repair now
    if ctl is None:
        time.sleep(seconds)
        return
    with contextlib.suppress(OSError):  # the master closed it, or the time is up
        ctl.settimeout(seconds)
        ctl.recv(1)
    ctl.close()


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
    "first ({command}) or pass --local-port N"
)


def service_name(host: str, session: str) -> str:
    """A file-name-safe name for the unit of HOST/SESSION."""
    name = "nbtunnel-%s-%s" % (re.sub(r"[^A-Za-z0-9.]+", "-", host).strip("-.") or "host",
                               session)
    return re.sub(r"-{2,}", "-", name)


def program_argv() -> list:
    """This program as an absolute argv: the running Python and this file."""
    return [os.path.abspath(sys.executable), os.path.abspath(__file__)]


def service_argv(session: Session, action: str, plugins=()) -> list:
    """The nbtunnel command line a unit runs: ACTION (--ensure or --watch) with every option
    of SESSION in effect, and the recorded local port so that the URL stays the same."""
    rec = session.record() or {}
    argv = [session.host, action, "--session", session.name, "--state-dir",
            os.path.abspath(session.state)]
    values = session.asked()
    if rec.get("local_port") and not values.get("local_port"):
        values["local_port"] = rec["local_port"]
    for path_option in ("ssh_config", "identity"):  # relative or ~ means something else
        value = values.get(path_option)         # under cron
        if value and value != "none" and "%" not in value:
            values[path_option] = os.path.abspath(os.path.expanduser(value))
    for option in session_options():
        if values.get(option.dest) is not None:
            argv += option.words(values[option.dest])
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
        "# Remove with: crontab -e (delete that line). --terminate alone keeps the line, which "
        "then leaves the session ended until you start it yourself.",
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
        "# Remove with: systemctl --user disable --now %s && rm ~/.config/systemd/user/%s.service"
        % (name, name),
        "# After --terminate or File > Shut Down it leaves the session ended until you start it.",
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
        raise UsageError("cannot write a launchd plist for these options: %s" % e) from None
    comment = ("<!-- %s.\n     Save as ~/Library/LaunchAgents/%s.plist and run: launchctl load -w "
               "~/Library/LaunchAgents/%s.plist\n     Remove with: launchctl unload -w ~/Library/"
               "LaunchAgents/%s.plist, then delete that file.\n     ssh runs without a "
               "terminal: a key with a passphrase must be in your ssh-agent. -->\n"
               % (re.sub(r"-{2,}|[<>&]", "-", title), label, label, label))
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


def cmd_print_service(run: Run) -> int:
    """Print a crontab line, systemd unit or launchd plist that keeps the session up."""
    s, kind = run.session, run.args.print_service
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plugins")
    plugins = [p for p in plugin_files(run.plugins) if os.path.dirname(p) != here]
    action = "--ensure" if kind == "cron" else "--watch"
    argv = program_argv() + service_argv(s, action, plugins)
    title = "Jupyter on %s (session %s)" % (s.host, s.name)
    name = service_name(s.host, s.name)
    if kind == "cron":
        text = cron_entry(argv, service_env(), title)
    elif kind == "systemd":
        text = systemd_unit(argv, service_env(), title, name)
    else:
        label = "org.nbtunnel." + name[len("nbtunnel-"):]
        text = launchd_plist(argv, service_env(), title, label, os.path.expanduser("~"))
    sys.stdout.write(text)
    return 0


def cmd_print_nginx(run: Run) -> int:
    """Print an nginx server block in front of the recorded tunnel of the session."""
    s, rec = run.session, run.session.record()
    port = s.local_port or (rec or {}).get("local_port")
    if not port:
        raise UsageError(MSG_NGINX_NO_PORT.format(
            host=s.host, session=s.name,
            command=suggested(s.host, "--session", s.name, "--local-port", "N")))
    listen = check_listen(s.nginx_listen or NGINX_LISTEN)
    sys.stdout.write(nginx_server_block(port, listen, "Jupyter on %s (session %s)"
                                        % (s.host, s.name)))
    if rec and not run.args.quiet:
        address = listen if ":" in listen else "127.0.0.1:" + listen
        log.info("once nginx runs, open %s", rec["url"].replace(
            "127.0.0.1:%d" % rec["local_port"], address, 1))
    return 0


# Command line ################################################################

MSG_SEE_HELP = " (see nbtunnel --help)"
ARGPARSE_ERROR = re.compile(r"argument (\S+): (.*)\Z", re.S)


def close_option(word: str, known) -> str:
    """' did you mean --X?' for the option in KNOWN closest to WORD, or ''."""
    import difflib

    close = difflib.get_close_matches(word.split("=", 1)[0], sorted(known), 1, 0.6)
    return "; did you mean %s?" % close[0] if close else ""


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line, not the usage block: the library raises
    UsageError (exit 2) and main() prints it like any other error."""

    def parse_args(self, args=None, namespace=None):
        """Like argparse's, with unrecognized words reported by unrecognized()."""
        args, extra = self.parse_known_args(args, namespace)
        if extra:
            raise UsageError(self.unrecognized(extra))
        return args

    def unrecognized(self, extra: list) -> str:
        """The message for words the parser did not take: the first one is named."""
        word = extra[0]
        if word.startswith("-") and word != "-":
            return "unrecognized option %s%s%s" % (
                word.split("=", 1)[0], close_option(word, self._option_string_actions),
                MSG_SEE_HELP)
        return "unexpected argument %r: HOST was given already%s" % (word, MSG_SEE_HELP)

    def error(self, message: str):
        """Turn argparse's message into one line that says what to do, and raise it."""
        m = ARGPARSE_ERROR.match(message)
        action = m and self._option_string_actions.get(m.group(1).split("/")[-1])
        if not action:
            raise UsageError(message + MSG_SEE_HELP)
        flag, what = action.option_strings[-1], m.group(2)
        if what.startswith("expected one argument"):
            text = "option %s needs a value: %s %s, or %s=VALUE if it starts with -" % (
                flag, flag, action.metavar or "VALUE", flag)
        elif what.startswith("invalid choice") and action.choices:
            import difflib

            value = re.search(r"invalid choice: (.*?)(?: \(choose from|\Z)", what).group(1)
            close = difflib.get_close_matches(value.strip("'"), list(action.choices), 1)
            text = "invalid %s %s%s; choose from %s" % (
                flag, value, " (did you mean %s?)" % close[0] if close else "",
                ", ".join(action.choices))
        elif what.startswith("not allowed with argument"):
            other = what.rsplit(" ", 1)[-1].split("/")[-1]
            text = "%s cannot be combined with %s" % (flag, other)
        elif what.startswith("ignored explicit argument"):
            value = what.split(" ", 3)[-1].strip("'")
            text = "option %s takes no value (got %s=%s)" % (flag, flag, value)
        else:
            text = "%s: %s" % (flag, what)
        raise UsageError(text + MSG_SEE_HELP)


# What --help lists as the environment variables nbtunnel reads (this side only).
ENV_VARS = (("NBTUNNEL_CONFIG", "config file"), ("NBTUNNEL_STATE_DIR", "records"),
            ("NBTUNNEL_MANAGER", "default --manager"),
            ("NBTUNNEL_PLUGIN_PATH", "more plugin directories"),
            ("NBTUNNEL_RUNTIME_DIR", "ssh control sockets"), ("XDG_CONFIG_HOME", None),
            ("XDG_STATE_HOME", None), ("XDG_RUNTIME_DIR", None), ("TERM", "dumb: no progress"))
EXAMPLES = (
    ("nbtunnel myserver --open", "start or reattach, open the browser"),
    ("nbtunnel --status", "every recorded session and its state"),
    ("nbtunnel myserver --terminate", "stop Jupyter, its session, the tunnel"),
    ("nbtunnel hpc --conda analysis --module cuda/12.2 --notebook-dir ~/work", ""),
    ("nbtunnel hpc --manager slurm --partition gpu --gres gpu:1 --time 8:00:00", ""),
)
EXIT_CODES = ("0 done; 1 could not do it (unreachable, refused, Jupyter failed); "
              "2 bad usage; 3 --terminate refused: kernels busy (--force)")


def names(registry: dict, default=None) -> str:
    """The plugin names of REGISTRY for --help, DEFAULT marked."""
    return ", ".join(n + (" (default)" if n == default else "") for n in
                     sorted(registry, key=lambda n: (n != default, n)))


def help_epilog() -> str:
    """The end of --help: examples, plugins, files, environment, exit codes, the reference."""
    import textwrap

    def item(title, text):
        return textwrap.fill(text, 79, initial_indent="%-14s" % title, subsequent_indent=" " * 14,
                             break_on_hyphens=False, break_long_words=False)

    envs = sorted(ENVIRONMENTS.values(), key=lambda e: getattr(e, "order", 50))
    home = os.path.expanduser("~")
    tilde = lambda path: "~" + path[len(home):] if path.startswith(home + "/") else path  # noqa: E731
    lines = ["examples:"] + ["  %-30s %s" % e if e[1] else "  " + e[0] for e in EXAMPLES]
    lines += ["", "\n".join([
        item("managers:", names(MANAGERS, "tmux")),
        item("environments:", ", ".join(e.name for e in envs) + " (set up in this order)"),
        item("tunnels:", names(TUNNELS, "ssh")),
        item("config file:", "%s (INI: [DEFAULT] and [host ALIAS] sections, keys are the long "
             "options without dashes)" % tilde(config_path(argparse.Namespace(config=None))[0])),
        item("plugins from:", ", ".join(tilde(d) for d in plugin_dirs()[:2]) +
             ", $NBTUNNEL_PLUGIN_PATH, --plugin FILE"),
        item("environment:", ", ".join("%s (%s)" % (n, what) if what else n
                                       for n, what in ENV_VARS)),
        item("exit codes:", EXIT_CODES),
        item("reference:", "every option and config key: docs/reference.md in the source tree")])]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface; its errors are UsageError (see Parser)."""
    p = Parser(
        prog="nbtunnel", allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="%(prog)s [HOST] [--status | --terminate | --ensure | --watch |\n"
        "                --print-service KIND | --print-nginx] [options]", epilog=help_epilog(),
        description="Start or reattach to Jupyter on a host you reach over SSH, tunnel it to\n"
        "127.0.0.1 here, and print the URL.")
    p.add_argument("host", nargs="?", metavar="HOST",
                   help="user@host, ssh://user@host:port or an ssh alias")
    act = p.add_mutually_exclusive_group()
    act.add_argument("--terminate", action="store_true", help="stop the server and the tunnel")
    act.add_argument("--status", action="store_true", help="show recorded sessions")
    act.add_argument("--forget", action="store_true",
                     help="drop ended sessions (of HOST) from --status now")
    act.add_argument("--ensure", action="store_true",
                     help="for cron: repair what is missing; silent when all is well")
    p.add_argument("--watch", action="store_true",
                   help="stay in the foreground, keeping server and tunnel up")
    p.add_argument("--interval", metavar="SECONDS", default="5",
                   help="with --watch: seconds between checks (default 5)")
    act.add_argument("--print-service", choices=("cron", "systemd", "launchd"), metavar="KIND",
                     help="print a cron, systemd or launchd unit keeping it alive")
    act.add_argument("--print-nginx", action="store_true",
                     help="print an nginx server block in front of the tunnel")
    p.add_argument("--force", action="store_true",
                   help="with --terminate: even if kernels are busy")
    p.add_argument("--all", action="store_true",
                   help="with --terminate/--ensure: every session (of HOST)")
    g = p.add_argument_group("the server")
    g.add_argument("--session", metavar="NAME", help="remote session name (default nbtunnel)")
    for option in SERVER_OPTIONS:
        if option.dest == "manager":
            option = copy.copy(option)
            option.help = "session manager: %s" % names(MANAGERS, "tmux")
        option.add_to(g)
    g = p.add_argument_group("the tunnel and ssh")
    waits = {}  # default timeout: the managers that have it
    for n, m in sorted(MANAGERS.items()):
        if getattr(m, "default_timeout", None):
            waits.setdefault(m.default_timeout, []).append(n)
    longer = ", ".join("%g (%s)" % (t, ", ".join(ns)) for t, ns in sorted(waits.items()))
    for option in TUNNEL_OPTIONS:
        if option.dest == "timeout" and longer:
            option = copy.copy(option)
            option.help += "; waiting for a batch job: %s" % longer
        elif option.dest == "tunnel":
            option = copy.copy(option)
            option.help = "tunnel backend: %s" % names(TUNNELS, "ssh")
        option.add_to(g)
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
    # Plugins' options: one group per manager or tunnel backend, one for the environment
    # (whose plugins each add one option that its help already explains).
    env = p.add_argument_group("the remote environment (in your login shell, in this order)")
    groups = {}
    for plugin, option in sorted(plugin_options(), key=lambda po: getattr(po[0], "order", 50)):
        if plugin.kind == "environment":
            option.add_to(env)
            continue
        if plugin.name not in groups:
            groups[plugin.name] = p.add_argument_group("with --%s %s" % (plugin.kind,
                                                                        plugin.name))
        option.add_to(groups[plugin.name])
    return p


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


def early_options(argv):
    """What must be known before the parser can be built: -v/-q, --config, --plugin."""
    pre = Parser(add_help=False, allow_abbrev=False)
    pre.add_argument("--plugin", action="append", default=[])
    pre.add_argument("--config")
    pre.add_argument("-v", "--verbose", action="store_true")
    pre.add_argument("-q", "--quiet", action="store_true")
    try:
        known, _ = pre.parse_known_args(argv)
    except UsageError:  # e.g. --plugin without a value: the full parser will say so
        known, _ = pre.parse_known_args([])
    return known


def main(argv=None) -> int:
    """Run nbtunnel with ARGV; return the exit code.  The one place that turns errors
    into messages and exit codes."""
    argv = sys.argv[1:] if argv is None else list(argv)
    early = early_options(argv)
    configure_logging(early)
    args = None
    try:
        if os.name != "posix" or not hasattr(os, "getuid") or fcntl is None:
            raise Error("nbtunnel runs on Linux and macOS (it needs POSIX and OpenSSH); on "
                        "Windows, run it inside WSL")
        cfg = read_config(*config_path(early))
        # Plugins bring options of their own, so they are loaded before the parser is
        # built: those of --plugin, else those the config file's [DEFAULT] names.
        plugins = early.plugin or cfg.defaults().get("plugin", "").splitlines()
        plugins = [p.strip() for p in plugins if p.strip()]
        load_plugins(plugin_files(plugins))
        args = build_parser().parse_args(argv)
        progress.silent = args.ensure  # for cron: no line even on a terminal
        suggested.given = given_options(args)
        run = Run(args, resolve(args, cfg), plugins)
        if args.watch and (args.status or args.ensure or args.forget):
            raise UsageError("--watch cannot be combined with --%s" % (
                "status" if args.status else "ensure" if args.ensure else "forget"))
        if args.all and (not (args.terminate or args.ensure) or args.watch):
            raise UsageError("--all goes with --terminate or --ensure")
        for flag, cmd in (("status", cmd_status), ("forget", cmd_forget),
                          ("print_service", cmd_print_service),
                          ("print_nginx", cmd_print_nginx), ("watch", cmd_watch)):
            if getattr(args, flag):
                return cmd(run)
        if not (args.terminate or args.ensure):
            return cmd_start(run)
        if run.session.host is None and not args.all:
            if not args.quiet:
                log.info("nothing to terminate: no sessions recorded")
            return 0
        action, say = ((terminate_session, say_terminated) if args.terminate
                       else (ensure_said_once, say_ensured))
        code, results = every_session(run, cfg, action) if args.all else (0, [action(run)])
        say(run, results)
        return code
    except Error as e:
        if getattr(e, "said", False):  # --ensure: the run before said it already
            return e.code
        text = e.text()
        if args is not None and args.ensure and not args.verbose:  # cron mail: one line says why
            text = text.splitlines()[0]
        log.error("error: %s", text)
        return e.code
    except KeyboardInterrupt as e:
        log.error("interrupted%s", "; %s" % e if str(e) else "")
        return 130
    except Exception as e:  # a bug, or an OS error nobody foresaw: one line, not a traceback
        log.debug("traceback:", exc_info=True)
        log.error("error: %s: %s%s", type(e).__name__, e,
                  "" if early.verbose else " (run with -v for the traceback)")
        return 1


# A plugin's `import nbtunnel` must find this running module, not load a second copy.
sys.modules.setdefault("nbtunnel", sys.modules[__name__])

if __name__ == "__main__":
    code = main()
    for number in STOP_SIGNALS:  # done: a late Ctrl-C must not turn the exit into a traceback
        signal.signal(number, signal.SIG_IGN)
    sys.exit(code)
