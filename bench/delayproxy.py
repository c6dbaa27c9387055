#!/usr/bin/env python3
"""A TCP delay line: accept on LISTEN, connect each client to TARGET, and hold every
chunk for DELAY seconds in each direction before passing it on.

    python3 delayproxy.py --listen 127.0.0.1:0 --target 10.0.0.2:22 --delay 0.025 --source 10.0.0.5

With --source (optional), each connection to TARGET comes from that address, so
TARGET's own log tells the connections that crossed the delay line from any other way
in. Prints the port it listens on, then serves until SIGTERM/SIGINT.

It is a delay line, not stop-and-wait: a reader keeps reading while earlier chunks
wait for their time, so any number of bytes can be in flight and throughput is not
capped by the delay (up to MAX_IN_FLIGHT per direction, far above the
bandwidth-delay product of anything measured here). Order is kept: chunks leave in
the order they came, each at its arrival time + DELAY.  There is no netem on these
machines; this stands in for a link with a fixed latency.
"""

import argparse
import asyncio
import collections
import contextlib
import signal
import socket
import sys

CHUNK = 256 * 1024
MAX_IN_FLIGHT = 64 * 1024 * 1024


class Line:
    """One direction: chunks stamped with the time they may leave."""

    def __init__(self, delay: float):
        self.delay = delay
        self.items = collections.deque()
        self.bytes = 0
        self.data = asyncio.Event()
        self.space = asyncio.Event()
        self.space.set()


async def read_side(reader: asyncio.StreamReader, line: Line) -> None:
    """Read as fast as the sender sends; stamp each chunk; b'' marks EOF."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            chunk = await reader.read(CHUNK)
        except (ConnectionError, OSError):
            chunk = b""
        line.items.append((loop.time() + line.delay, chunk))
        line.bytes += len(chunk)
        line.data.set()
        if not chunk:
            return
        if line.bytes > MAX_IN_FLIGHT:
            line.space.clear()
            await line.space.wait()


async def write_side(writer: asyncio.StreamWriter, line: Line) -> None:
    """Pass each chunk on at its time, in order; half-close on EOF."""
    loop = asyncio.get_running_loop()
    while True:
        while not line.items:
            line.data.clear()
            await line.data.wait()
        due, chunk = line.items.popleft()
        wait = due - loop.time()
        if wait > 0:
            await asyncio.sleep(wait)
        if not chunk:
            with contextlib.suppress(OSError, RuntimeError):
                if writer.can_write_eof():
                    writer.write_eof()
            return
        writer.write(chunk)
        await writer.drain()
        line.bytes -= len(chunk)
        if line.bytes <= MAX_IN_FLIGHT:
            line.space.set()


async def pump(reader, writer, delay: float) -> None:
    """One direction of one connection."""
    line = Line(delay)
    reading = asyncio.ensure_future(read_side(reader, line))
    try:
        await write_side(writer, line)
    finally:
        reading.cancel()
        await asyncio.gather(reading, return_exceptions=True)


CONNECTIONS = set()


async def handle(client_r, client_w, target, delay: float, source) -> None:
    """One client connection: connect to TARGET and run both directions."""
    CONNECTIONS.add(asyncio.current_task())
    try:
        await connect(client_r, client_w, target, delay, source)
    finally:
        CONNECTIONS.discard(asyncio.current_task())


async def connect(client_r, client_w, target, delay: float, source=None) -> None:
    """Open the TARGET side (from SOURCE, when given), then pass data both ways until
    both end (or one fails)."""
    try:
        server_r, server_w = await asyncio.open_connection(
            *target, local_addr=(source, 0) if source else None)
    except OSError:
        client_w.close()
        return
    for w in (client_w, server_w):
        sock = w.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    up = asyncio.ensure_future(pump(client_r, server_w, delay))
    down = asyncio.ensure_future(pump(server_r, client_w, delay))
    try:
        # Both directions end on EOF (half-closes are passed on); an error in
        # either one ends the connection.
        await asyncio.wait([up, down], return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for task in (up, down):
            task.cancel()
        await asyncio.gather(up, down, return_exceptions=True)
        for w in (client_w, server_w):
            with contextlib.suppress(Exception):
                w.close()


def address(text: str):
    """HOST:PORT -> (host, port)."""
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


async def serve(listen, target, delay: float, source=None) -> None:
    """Accept until told to stop."""
    server = await asyncio.start_server(
        lambda r, w: handle(r, w, target, delay, source), *listen, limit=CHUNK * 4)
    print(server.sockets[0].getsockname()[1], flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()
        for task in list(CONNECTIONS):
            task.cancel()
        await asyncio.gather(*CONNECTIONS, return_exceptions=True)


def main(argv=None) -> int:
    """Parse arguments and serve."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT to accept on")
    p.add_argument("--target", required=True, help="HOST:PORT to connect to")
    p.add_argument("--delay", type=float, default=0.025, help="seconds, each direction")
    p.add_argument("--source", help="address to connect to TARGET from")
    args = p.parse_args(argv)
    asyncio.run(serve(address(args.listen), address(args.target), args.delay, args.source))
    return 0


if __name__ == "__main__":
    sys.exit(main())
