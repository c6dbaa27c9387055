"""Batch jobs on a shared cluster, the same for Slurm and Grid Engine (tests/cluster.py,
tests/gecell.py): whatever the compute node's /etc/hosts says, Jupyter listens on an
address the login node reaches, or the start fails within seconds and says where.

Each test runs once per scheduler. The node's /etc/hosts is a file of the test's own,
bind-mounted over /etc/hosts in the mount namespace of the node's scheduler daemon, so
that the jobs resolve names as each layout says; the login node keeps the machine's.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass

import pytest

from helpers import api_status, wait_until
from remotehost import _root

pytestmark = pytest.mark.timeout(900)

SLURM_ACTIVE = "PENDING,RUNNING,SUSPENDED,COMPLETING,CONFIGURING"


@dataclass
class Batch:
    """One scheduler's test host (its login node), an NbtRunner for it, its --manager."""

    name: str
    host: object
    nbt: object

    def start(self, *args: str, timeout: float = 240):
        return self.nbt.run(self.host.alias, "--json", "--manager", self.name, *args,
                            timeout=timeout)

    def live_jobs(self) -> list[str]:
        """The user's jobs that wait, run or end (not those already gone)."""
        if self.name == "slurm":
            proc = self.host.slurm(["squeue", "-h", "-u", self.host.user, "-t", SLURM_ACTIVE,
                                    "-o", "%i"])
            return proc.stdout.split()
        return self.host.jobs()


@pytest.fixture(params=["slurm", "gridengine"])
def batch(request):
    slurm = request.param == "slurm"
    host = request.getfixturevalue("cluster" if slurm else "gecell")
    nbt = request.getfixturevalue("nbt_cluster" if slurm else "nbt_ge")
    yield Batch(request.param, host, nbt)
    host.set_node_hosts()  # the machine's /etc/hosts again


def layout(host, name: str) -> str:
    """The compute node's /etc/hosts in the layout NAME."""
    local = "127.0.0.1 localhost\n"
    node = f"{host.node_addr} {host.node_name}\n"
    return {
        # one file for every host of a small cluster, the login node's name on loopback
        "login-loopback": f"127.0.0.1 localhost {host.login_name}\n{node}",
        # the login node's name is its address on a network the node is not on
        "login-other-network": f"{local}{host.ip} {host.login_name}\n{node}",
        "login-unknown": f"{local}{node}",
        # Debian's default for the node's own name, the login node's name unknown
        "node-debian": f"{local}127.0.1.1 {host.node_name}\n",
    }[name]


EXPECTED = {  # what the name in question resolves to on the node in each layout
    "login-loopback": ("login_name", "127.0.0.1"),
    "login-other-network": ("login_name", "ip"),
    "login-unknown": ("login_name", ""),
    "node-debian": ("node_name", "127.0.1.1"),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_node_address_whatever_the_names_say(batch, name):
    host = batch.host
    host.set_node_hosts(layout(host, name))
    which, value = EXPECTED[name]
    assert host.node_resolves(getattr(host, which)) == getattr(host, value, value)
    began = time.monotonic()
    proc = batch.start("--timeout", "240")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    print(f"measured: {batch.name} start in layout {name}: {time.monotonic() - began:.1f}s")
    assert out["remote_host"] == host.node_addr
    assert api_status(out["url"]) == 200
    proc = batch.nbt.run(host.alias, "--terminate", timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert not batch.live_jobs()


def test_unreachable_address_fails_fast(batch):
    """A site's name for the node's data network, an address the login node has no route
    to: the start fails as soon as Jupyter listens, naming node, address and port, and
    cancels the job; without the check it would wait for the whole --timeout."""
    host = batch.host
    index = 1 if batch.name == "slurm" else 2
    unreachable = f"10.217.{os.getpid() % 250}.{index}"
    dev = ["ip", "netns", "exec", host.node_netns, "ip", "addr"]
    _root([*dev, "add", f"{unreachable}/32", "dev", host.link_node])
    try:
        data_name = f"{host.node_name}-data"
        host.set_node_hosts(layout(host, "login-unknown") + f"{unreachable} {data_name}\n")
        began = time.monotonic()
        proc = batch.start("--node-address", data_name, "--timeout", "600", timeout=660)
        took = time.monotonic() - began
        print(f"measured: {batch.name} unreachable address reported after {took:.1f}s")
        assert proc.returncode != 0
        assert "Traceback" not in proc.stderr
        said = " ".join(proc.stderr.split())
        assert host.node_name in said and unreachable in said, said
        assert re.search(r"port \d+", said), said
        assert "cancelled" in said, said
        assert took < 120, "failed at once, not at --timeout"
        wait_until(lambda: not batch.live_jobs(), 60, interval=1, message="no job left")
    finally:
        _root([*dev, "del", f"{unreachable}/32", "dev", host.link_node], check=False)


def test_node_address_recorded_and_loopback_refused(batch):
    """--node-address is recorded like the other options; a loopback one is refused by
    the job (the login node could never reach it), quickly and with no job left."""
    host = batch.host
    began = time.monotonic()
    proc = batch.start("--node-address", "127.0.0.1", "--timeout", "600", timeout=660)
    took = time.monotonic() - began
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    said = " ".join(proc.stderr.split())
    assert "loopback" in said and host.node_name in said, said
    assert took < 120
    wait_until(lambda: not batch.live_jobs(), 60, interval=1, message="no job left")
    proc = batch.start("--node-address", host.node_addr)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["remote_host"] == host.node_addr
    records = [json.loads(p.read_text()) for p in batch.nbt.state_dir.glob("*.json")]
    assert [r["options"].get("node_address") for r in records] == [host.node_addr]
    proc = batch.nbt.run(host.alias, "--terminate", timeout=180)
    assert proc.returncode == 0, proc.stderr
