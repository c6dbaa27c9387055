"""The sshtunnel backend: ``--tunnel sshtunnel`` makes the forward in this process.

For machines where OpenSSH's client cannot hold the forward (no ``ssh`` binary,
or ControlMaster is unavailable): the ``sshtunnel``
package (paramiko) opens the forward itself, so nbtunnel stays in the
foreground until Ctrl-C (or SIGTERM) and then closes it; the server keeps
running.  It is chosen by ``--tunnel sshtunnel``, and by default when no ``ssh``
binary exists.  paramiko does not use OpenSSH's master connection, so it
authenticates on its own (key files or ssh-agent; no passwords or prompts).
The host alias is honoured: with ``ssh`` present its effective configuration
comes from ``ssh -G`` (HostName, User, Port, IdentityFile, known_hosts files),
otherwise from the ssh_config file through paramiko.  Host keys are checked
against known_hosts; an unknown host is refused, and so are ProxyJump and
ProxyCommand (with ``ssh`` present, where it can tell).  Without ``ssh``, the remote
helper also runs over paramiko (a second authentication), through ``ParamikoConnection``,
an ``nbtunnel.Transport``.  Failures to connect are ``nbtunnel.SshError`` of the kind
OpenSSH's would be ("auth", "hostkey-unknown", "hostkey-changed", "unreachable"), so
``--watch`` retries a dropped link and stops at a refusal.
"""

import os
import shutil
import subprocess
import time

import nbtunnel

MISSING = ("the sshtunnel tunnel backend needs the sshtunnel package, which is not installed "
           "for %s: pip install sshtunnel")


def need_sshtunnel():
    """The sshtunnel module, or an Error that says how to install it."""
    try:
        import sshtunnel
    except ImportError:
        import sys

        raise nbtunnel.Error(MISSING % sys.executable) from None
    return sshtunnel


def option_words(options):
    """-F FILE and -o KEY=VALUE pairs from ssh argv words."""
    config, pairs, words = None, [], list(options)
    for i, word in enumerate(words[:-1]):
        if word == "-F":
            config = words[i + 1]
        elif word == "-o" and "=" in words[i + 1]:
            pairs.append(words[i + 1].split("=", 1))
        elif word == "-i":
            pairs.append(["identityfile", words[i + 1]])
    return config, pairs


def settings(host, options):
    """Effective HostName, User, Port, IdentityFile and known_hosts files for HOST."""
    if shutil.which("ssh"):  # ssh -G: exactly what ssh itself would use
        r = nbtunnel.subproc(["ssh", "-G"] + list(options) + [host], stdin=subprocess.DEVNULL,
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise nbtunnel.Error("ssh -G %s failed: %s" % (host, r.stderr.strip()))
        conf = {}
        for line in r.stdout.splitlines():
            key, _, value = line.partition(" ")
            conf.setdefault(key.lower(), []).append(value)
        get = lambda k, d=None: (conf.get(k) or [d])[0]  # noqa: E731
        for key in ("proxyjump", "proxycommand"):
            if get(key, "none") != "none":
                raise nbtunnel.Error("the sshtunnel backend cannot go through %s (%s is set for "
                                     "%s); use --tunnel ssh" % (key, get(key), host))
        known = " ".join(conf.get("userknownhostsfile", []) + conf.get("globalknownhostsfile", []))
        return dict(hostname=get("hostname", host), user=get("user"), port=int(get("port", 22)),
                    identities=conf.get("identityfile", []), known_hosts=known.split(),
                    hostkeyalias=get("hostkeyalias"))
    import paramiko

    config_file, pairs = option_words(options)
    bare = host.split("://", 1)[1] if "://" in host else host
    user, _, name = bare.rpartition("@")
    port = None
    if "://" in host and ":" in name:
        name, port = name.rsplit(":", 1)
    cfg = paramiko.SSHConfig()
    path = config_file or os.path.expanduser("~/.ssh/config")
    if os.path.exists(path):
        cfg = paramiko.SSHConfig.from_path(path)
    found = cfg.lookup(name)
    for key, value in pairs:
        found.setdefault(key.lower(), value)
    known = found.get("userknownhostsfile", "~/.ssh/known_hosts ~/.ssh/known_hosts2")
    return dict(hostname=found.get("hostname", name), user=user or found.get("user"),
                port=int(port or found.get("port", 22)), identities=found.get("identityfile", []),
                known_hosts=known.split() + found.get("globalknownhostsfile", "").split(),
                hostkeyalias=found.get("hostkeyalias"))


def known_name(conf):
    """The host's name in known_hosts: HOSTNAME, or [HOSTNAME]:PORT off port 22."""
    return conf["hostname"] if conf["port"] == 22 else "[%s]:%d" % (conf["hostname"], conf["port"])


def host_key(conf):
    """The recorded key of the host (paramiko PKey); an unknown host is an error."""
    import paramiko

    keys = paramiko.HostKeys()
    for path in conf["known_hosts"]:
        path = os.path.expanduser(path)
        if os.path.isfile(path):
            keys.load(path)
    name = conf.get("hostkeyalias") or known_name(conf)
    found = keys.lookup(name)
    if not found:
        raise nbtunnel.ssh_error(name, "hostkey-unknown")
    for kind in ("ssh-ed25519", "ecdsa-sha2-nistp256", "rsa-sha2-512", "ssh-rsa"):
        if kind in found:
            return found[kind]
    return list(found.values())[0]


def auth(conf):
    """Key files that exist (the agent is asked too)."""
    paths = [os.path.expanduser(p) for p in conf["identities"]]
    return [p for p in paths if os.path.isfile(p)]


class ParamikoConnection(nbtunnel.Transport):
    """The remote helper over paramiko, for machines without an ssh binary: no master
    process (master_pid is None) and no ``ssh -O`` control."""

    def __init__(self, host, options, timeout):
        self.host, self.options, self.timeout = host, list(options), timeout
        self.client = None

    def alive(self):
        """Is the paramiko connection up?"""
        return bool(self.client and self.client.get_transport() and
                    self.client.get_transport().is_active())

    def open(self):
        """Connect and authenticate with keys; the host key must be known."""
        import paramiko

        if self.alive():
            return
        conf = settings(self.host, self.options)
        key = host_key(conf)
        client = paramiko.SSHClient()
        client.get_host_keys().add(known_name(conf), key.get_name(), key)
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        try:
            client.connect(conf["hostname"], conf["port"], username=conf["user"],
                           key_filename=auth(conf) or None, timeout=self.timeout,
                           look_for_keys=not conf["identities"])
        except paramiko.AuthenticationException as e:
            raise nbtunnel.ssh_error(self.host, "auth", e) from None
        except paramiko.BadHostKeyException:
            raise nbtunnel.ssh_error(self.host, "hostkey-changed") from None
        except (OSError, paramiko.SSHException) as e:
            raise nbtunnel.ssh_error(self.host, "unreachable", e) from None
        self.client, self.opened_here = client, True

    def pipe(self, command, data, timeout):
        """COMMAND with DATA on its stdin over paramiko (connecting first for a one-off
        command such as --status): (stdout, stderr, exit status)."""
        import socket

        import paramiko

        if self.client is None:
            self.open()
        try:
            stdin, stdout, stderr = self.client.exec_command(command, timeout=timeout)
            stdin.write(data)
            stdin.channel.shutdown_write()
            return stdout.read(), stderr.read(), stdout.channel.recv_exit_status()
        except socket.timeout:
            raise nbtunnel.ssh_error(self.host, "no-answer", "%gs" % timeout) from None
        except (OSError, paramiko.SSHException) as e:
            raise nbtunnel.ssh_error(self.host, "unreachable", e) from None

    def close(self):
        """Disconnect."""
        if self.client:
            self.client.close()
            self.client = None


def remote_address(destination):
    """(address, port) of DESTINATION ("ADDR:PORT", or a port number).  A Unix socket path
    is refused: paramiko has no stream-local forwarding (direct-streamlocal@openssh.com),
    and sshtunnel allows Unix sockets only on the local end."""
    if isinstance(destination, int):
        return ("127.0.0.1", destination)
    addr, sep, port = str(destination).rpartition(":")
    if not sep or not port.isdigit() or destination.startswith("/"):
        raise nbtunnel.Error("the sshtunnel backend cannot forward to a Unix socket (%s): "
                             "use --tunnel ssh" % destination)
    return (addr, int(port))


class SshtunnelBackend(nbtunnel.TunnelBackend):
    """A forward held by sshtunnel in this process, in the foreground."""

    name = "sshtunnel"
    foreground = True

    def __init__(self):
        self.forwarder = None

    def connection(self, host, options, timeout):
        """Fail early without the package; replace OpenSSH only where there is no ssh."""
        need_sshtunnel()
        settings(host, options)  # refuse what it cannot do before anything starts
        return None if shutil.which("ssh") else ParamikoConnection(host, options, timeout)

    def open(self, conn, local_port, destination):
        """Connect (its own authentication) and listen on 127.0.0.1:LOCAL_PORT."""
        sshtunnel = need_sshtunnel()
        remote = remote_address(destination)
        conf = settings(conn.host, conn.options)
        try:
            fwd = sshtunnel.SSHTunnelForwarder(
                (conf["hostname"], conf["port"]), ssh_username=conf["user"],
                ssh_pkey=(auth(conf) or [None])[0], ssh_host_key=host_key(conf),
                ssh_config_file=None, allow_agent=True, host_pkey_directories=[],
                local_bind_address=("127.0.0.1", local_port),
                remote_bind_address=remote)
            fwd.start()
        except (sshtunnel.HandlerSSHTunnelForwarderError, ValueError) as e:
            raise nbtunnel.Error("sshtunnel could not forward port %d to %s: %s"
                                 % (local_port, conn.host, e)) from None
        except sshtunnel.BaseSSHTunnelForwarderError as e:
            # No session with the host; sshtunnel only logs why.  Connecting once more
            # (this failure path only) raises the SshError of the reason's kind.
            probe = ParamikoConnection(conn.host, conn.options, conn.timeout)
            probe.open()
            probe.close()
            raise nbtunnel.ssh_error(conn.host, "unreachable", e) from None
        self.forwarder = fwd

    def serve(self, conn):
        """Wait while the forward lives; Ctrl-C (KeyboardInterrupt) ends the wait."""
        while self.forwarder and self.forwarder.is_active:
            time.sleep(0.5)
        raise nbtunnel.SshError("the sshtunnel connection to %s closed" % conn.host,
                                kind="unreachable")

    def close(self, conn, local_port, destination):
        """Stop the forward held by this process, if any."""
        if self.forwarder:
            self.forwarder.stop(force=True)
            self.forwarder = None


nbtunnel.register(SshtunnelBackend())
