#!/usr/bin/env python3
"""A batch job for the cluster tests, given to ``sbatch --parsable`` on stdin.

Listens on the compute node's cluster address (what its hostname resolves
to) and on the node's own 127.0.0.1, each on a port the kernel picks, and
answers every connection with the node's hostname. Writes the ports and the
ways of finding the address to ~/listener-JOBID.json (0600), then serves
until the job ends.
"""

import json
import os
import socket
import subprocess
import threading

host = socket.gethostname()
cluster_addr = socket.gethostbyname(host)
listeners = {}
for name, addr in (("cluster", cluster_addr), ("loopback", "127.0.0.1")):
    sock = socket.socket()
    sock.bind((addr, 0))
    sock.listen(8)
    listeners[name] = sock

found = {
    "hostname": host,
    "gethostbyname": cluster_addr,
    "hostname_I": subprocess.run(["hostname", "-I"], capture_output=True, text=True,
                                 check=False).stdout.split(),
    "env": {key: value for key, value in os.environ.items() if key.startswith("SLURM")},
    "ports": {name: sock.getsockname()[1] for name, sock in listeners.items()},
}
path = os.path.expanduser("~/listener-{}.json".format(os.environ["SLURM_JOB_ID"]))
fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
with os.fdopen(fd, "w") as handle:
    json.dump(found, handle)
os.rename(path + ".tmp", path)


def serve(sock):
    while True:
        conn, _ = sock.accept()
        with conn:
            try:  # a probe that connects and closes at once resets the connection
                conn.sendall(host.encode() + b"\n")
            except OSError:
                pass


for sock in listeners.values():
    threading.Thread(target=serve, args=(sock,), daemon=True).start()
threading.Event().wait()
