"""A port forward as a bastion gives one: relay 127.0.0.1:PORT to TARGET:TARGET_PORT.

    python3 relay.py TARGET TARGET_PORT SOURCE

Listens on a free loopback port and prints it (one line), then relays each connection
to TARGET:TARGET_PORT from the address SOURCE, so that the far end's log tells these
connections apart from any other way in. Stdlib only, any Python 3: it runs as an
unprivileged user (tests/bastion.py), from a copy that user can read.
"""

import socket
import sys
import threading


def pump(src, dst):
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    for sock in (src, dst):
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def serve(client, target, source):
    try:
        upstream = socket.create_connection(target, timeout=10, source_address=(source, 0))
        upstream.settimeout(None)
    except OSError:
        client.close()
        return
    threading.Thread(target=pump, args=(upstream, client), daemon=True).start()
    pump(client, upstream)


def main():
    target, source = (sys.argv[1], int(sys.argv[2])), sys.argv[3]
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    print(listener.getsockname()[1], flush=True)
    while True:
        client, _ = listener.accept()
        threading.Thread(target=serve, args=(client, target, source), daemon=True).start()


if __name__ == "__main__":
    main()
