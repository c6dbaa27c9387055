"""The sshtunnel package opening a forward by hand, in a process of its own (so that
its threads do not share an interpreter with the download that measures it).

    python sshtunnel_forward.py SSH_CONFIG ALIAS LOCAL_PORT REMOTE_PORT

Prints "ready" once the forward listens; closes it when stdin ends.
"""

import sys

import paramiko
import sshtunnel


def main(config, alias, local_port, remote_port):
    """Forward 127.0.0.1:LOCAL_PORT to the remote's 127.0.0.1:REMOTE_PORT until stdin ends."""
    ssh = paramiko.SSHConfig.from_path(config).lookup(alias)
    forward = sshtunnel.SSHTunnelForwarder(
        (ssh["hostname"], int(ssh.get("port", 22))), ssh_username=ssh["user"],
        ssh_pkey=ssh["identityfile"][0], allow_agent=False, ssh_config_file=None,
        local_bind_address=("127.0.0.1", local_port),
        remote_bind_address=("127.0.0.1", remote_port))
    forward.start()
    print("ready", flush=True)
    sys.stdin.read()
    forward.stop()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
