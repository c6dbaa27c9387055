"""A session lives on its login node, whichever node behind the name a command lands on."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import _REMOTES, NbtRunner
from helpers import api_status, kill_masters, wait_until
from loginnodes import NODES, LoginNodes
from unattended import finish, wait_logged


@pytest.fixture(scope="module")
def nodes() -> Iterator[LoginNodes]:
    if os.geteuid() != 0:
        pytest.skip("login nodes need root (useradd, ip netns, sshd): run bash tests/run")
    host = LoginNodes()
    _REMOTES.append(host)
    try:
        host.start()
        yield host
    finally:
        host.stop()


def _runner(nodes: LoginNodes, made: list) -> NbtRunner:
    runner = NbtRunner(nodes)
    made.append(runner)
    return runner


@pytest.fixture
def laptops(nodes: LoginNodes) -> Iterator:
    """A function that makes a laptop: its own state directory, the same ssh config."""
    made: list[NbtRunner] = []
    nodes.land_on(None)
    yield lambda: _runner(nodes, made)
    nodes.land_on(None)
    for node in NODES:  # a test that took a node down or apart brings it back first
        config = nodes.node_file(node, "sshd_config").read_text()
        if "AllowTcpForwarding no" in config:
            nodes.forwarding(node, True)
        if f"HostKey {nodes.node_file(node, 'host_key')}\n" in config:
            nodes.own_host_key(node, False)
        if node not in nodes.inits:
            nodes.start_node(node)
        nodes.reach_peer(node, True)
        nodes.reach_from_here(node, True)
    for runner in made:
        runner.cleanup()
    subprocess.run(["rm", "-rf", str(nodes.home / ".local/state/nbtunnel")], check=False)


def start(laptop: NbtRunner, *args: str, alias: str | None = None) -> dict:
    proc = laptop.run(alias or laptop.remote.alias, "--json", *args, timeout=180)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def one_jupyter(nodes: LoginNodes, node: str) -> None:
    """Exactly one Jupyter across the nodes, on NODE."""
    found = nodes.jupyters()
    assert [n for n, pids in found.items() for _ in pids] == [node], found


def logins(nodes: LoginNodes, laptop: NbtRunner, *args: str, **kw):
    """Run nbtunnel ARGS; (the finished process, logins it cost on each node)."""
    before = {n: nodes.auth_count(node=n) for n in NODES}
    proc = laptop.run(*args, timeout=180, **kw)
    return proc, {n: nodes.auth_count(node=n) - before[n] for n in NODES}


# What each command below costs in logins per node, by layout, when the name lands on
# node b and the session lives on a.  A round-robin name lists a's address: a record goes
# straight there.  A balancer in front leaves one way to a, through the name: a command
# lands on b, then reaches a through b (ProxyJump: b again, then a), and the record keeps
# that way, so the next command goes through the name at once.
COSTS = {
    "round-robin": dict(status={"a": 1, "b": 0}, reattach={"a": 1, "b": 0},
                        learn={"a": 1, "b": 1}, ensure={"a": 1, "b": 0}),
    "balancer": dict(status={"a": 1, "b": 2}, reattach={"a": 1, "b": 2},
                     learn={"a": 1, "b": 2}, ensure={"a": 1, "b": 1}),
}


@pytest.mark.parametrize("layout", sorted(COSTS))
def test_every_command_reaches_the_node_of_the_session(nodes, laptops, layout):
    alias = nodes.rr_alias if layout == "round-robin" else nodes.alias
    costs = COSTS[layout]
    one, other = laptops(), laptops()
    nodes.land_on("a")
    info = start(one, alias=alias)
    assert info["login_node"] == nodes.hostnames["a"] and not info["reused"]
    one_jupyter(nodes, "a")
    kill_masters(nodes.ssh_config)  # the connection is gone; the next lands on b
    nodes.land_on("b")

    # This laptop has a record: to node a along the way the ssh config allows.
    proc, cost = logins(nodes, one, "--status", "--json")
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout)[0]
    assert row["server"] == "running" and row["login_node"] == nodes.hostnames["a"]
    assert cost == costs["status"]
    proc, cost = logins(nodes, one, alias, "--json")
    assert proc.returncode == 0, proc.stderr
    again = json.loads(proc.stdout)
    assert again["reused"] and again["url"] == info["url"] and cost == costs["reattach"]
    assert api_status(again["url"]) == 200
    one_jupyter(nodes, "a")
    text = one.run("--status", timeout=60)
    assert f"login node {nodes.hostnames['a']}" in text.stdout, text.stdout

    # Another laptop, nothing recorded: it lands on b, learns, moves on to a.
    proc, cost = logins(nodes, other, alias, "--json")
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout)
    assert seen["reused"] and seen["token"] == info["token"], seen
    assert seen["login_node"] == nodes.hostnames["a"] and cost == costs["learn"]
    assert api_status(seen["url"]) == 200
    one_jupyter(nodes, "a")

    # --ensure of a session this laptop has not recorded, landing on b: no second server.
    kill_masters(nodes.ssh_config)
    third = laptops()
    proc = third.run(alias, "--ensure", timeout=180)
    assert proc.returncode == 0 and "warning" not in proc.stderr, proc.stderr
    assert "reattached" in proc.stdout and "started" not in proc.stdout, proc.stdout
    one_jupyter(nodes, "a")

    # --ensure with a record, the connection gone: only the tunnel comes back.
    kill_masters(nodes.ssh_config)
    proc, cost = logins(nodes, one, alias, "--ensure")
    assert proc.returncode == 0 and "warning" not in proc.stderr, proc.stderr
    assert "reopened the tunnel" in proc.stdout and cost == costs["ensure"], (proc.stdout, cost)
    assert api_status(info["url"]) == 200
    one_jupyter(nodes, "a")

    # --terminate from the other laptop, landing on b, stops the one on a.
    kill_masters(nodes.ssh_config)
    proc = other.run(alias, "--terminate", timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert "stopped" in proc.stderr and "not running" not in proc.stderr, proc.stderr
    wait_until(lambda: not any(nodes.jupyters().values()), 30, message="jupyter stopped")
    assert one.status()[0]["ended"] == "terminated"


def test_a_start_on_the_other_node_never_starts_a_second_server(nodes, laptops):
    laptop = laptops()
    nodes.land_on("b")
    info = start(laptop)
    for _ in range(2):
        for land in ("a", "b", "a"):
            kill_masters(nodes.ssh_config)
            nodes.land_on(land)
            fresh = laptops()  # no record: lands where the name sends it
            again = start(fresh)
            assert again["reused"] and again["token"] == info["token"]
            one_jupyter(nodes, "b")
    assert info["login_node"] == nodes.hostnames["b"]
    proc = laptop.run(nodes.alias, "--terminate", timeout=180)
    assert proc.returncode == 0 and "stopped" in proc.stderr, proc.stderr


def test_a_node_taken_down(nodes, laptops):
    laptop, other = laptops(), laptops()
    nodes.land_on("a")
    info = start(laptop)
    one_jupyter(nodes, "a")
    start(laptop, "--session", "second")
    nodes.take_down("a")  # with its processes: both servers are gone
    assert not any(nodes.jupyters().values())
    nodes.land_on(None)  # the front's turn may name a; only b answers

    proc = laptop.run("--status", "--json", timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = {r["session"]: r for r in json.loads(proc.stdout)}
    assert rows["nbtunnel"]["server"] == "gone", rows
    assert rows["nbtunnel"]["login_node"] == nodes.hostnames["a"]
    text = laptop.run("--status", timeout=120).stdout
    assert f"login node {nodes.hostnames['a']} is gone" in text, text

    nodes.land_on("b")
    proc = laptop.run(nodes.alias, "--ensure", timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert f"login node {nodes.hostnames['a']}" in proc.stdout and "is gone" in proc.stdout
    assert nodes.hostnames["b"] in proc.stdout, proc.stdout
    rec = laptop.status()
    now = next(r for r in rec if r["session"] == "nbtunnel")
    assert now["url"] == info["url"] and now["login_node"] == nodes.hostnames["b"]
    assert api_status(now["url"]) == 200
    one_jupyter(nodes, "b")

    proc = other.run(nodes.alias, "--terminate", "--session", "second", timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert "is gone" in proc.stderr and nodes.hostnames["a"] in proc.stderr, proc.stderr
    one_jupyter(nodes, "b")  # the other session keeps running


def test_watch_moves_to_a_node_that_answers(nodes, laptops):
    laptop = laptops()
    nodes.land_on("a")
    proc = laptop.popen(nodes.alias, "--watch", "--interval", "1", "--timeout", "10")
    url = proc.stdout.readline().strip()
    assert url.startswith("http://127.0.0.1:"), (url, proc.poll())
    one_jupyter(nodes, "a")
    nodes.take_down("a")
    nodes.land_on(None)
    said = wait_logged(proc, "started a new one on login node", 180)
    assert f"login node {nodes.hostnames['a']}" in said and "is gone" in said, said
    assert api_status(url) == 200  # the same URL, served from the node that answers
    one_jupyter(nodes, "b")
    code, _, err = finish(proc)
    assert code == 0, err


def test_a_node_the_landing_node_cannot_reach_is_not_taken_for_gone(nodes, laptops):
    """Proof that a node is gone takes both ends: the node the name lands on, and this side
    along its own configured way (a round-robin name lists the node's address)."""
    laptop, other = laptops(), laptops()
    nodes.land_on("a")
    info = start(laptop, alias=nodes.rr_alias)
    nodes.reach_peer("b", False)
    kill_masters(nodes.ssh_config)
    nodes.land_on("b")
    seen = start(other, alias=nodes.rr_alias)  # b cannot reach a; this side can: a lives
    assert seen["reused"] and seen["token"] == info["token"], seen
    one_jupyter(nodes, "a")
    kill_masters(nodes.ssh_config)
    proc = other.run(nodes.rr_alias, "--terminate", timeout=180)
    assert proc.returncode == 0 and "stopped" in proc.stderr, proc.stderr
    wait_until(lambda: not any(nodes.jupyters().values()), 30, message="jupyter stopped")


def test_a_node_this_side_cannot_reach_is_reached_through_the_name(nodes, laptops):
    """Node a answers the node the name lands on but not this machine: a command goes to it
    through the name (ProxyJump); when that way is shut too, it says where the session is
    and starts nothing elsewhere."""
    laptop = laptops()
    nodes.land_on("a")
    info = start(laptop)
    kill_masters(nodes.ssh_config)
    nodes.land_on("b")
    nodes.reach_from_here("a", False)

    other = laptops()  # no record: lands on b, learns a, whose address does not answer
    seen = start(other)
    assert seen["reused"] and seen["token"] == info["token"], seen
    assert seen["login_node"] == nodes.hostnames["a"], seen
    [record] = other.state_dir.rglob("*@nbtunnel.json")
    assert json.loads(record.read_text())["login_route"] == "jump", record.read_text()
    assert api_status(seen["url"]) == 200
    proc = laptop.run("--status", "--json", timeout=120)  # its record says a, by the name
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)[0]["server"] == "running", proc.stdout
    one_jupyter(nodes, "a")

    kill_masters(nodes.ssh_config)
    nodes.forwarding("b", False)  # b answers, a lives, and b leads nowhere
    third = laptops()
    proc = third.run(nodes.alias, timeout=180)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    said = proc.stderr
    assert f"login node {nodes.hostnames['a']}" in said and nodes.addresses["a"] in said, said
    assert "cannot be reached from here along the route your ssh config gives" in said, said
    one_jupyter(nodes, "a")  # nothing was started on b
    proc = laptop.run("--status", "--json", timeout=120)  # says where, and why not reached
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    [row] = json.loads(proc.stdout)
    assert row["server"] == "elsewhere", row
    assert "along the route your ssh config gives" in row["unreached"], row
    assert nodes.addresses["a"] in row["unreached"], row
    proc = laptop.run("--status", timeout=120)
    assert proc.returncode == 0 and row["unreached"] in proc.stdout, proc.stdout


def test_a_node_whose_host_key_differs_is_refused(nodes, laptops):
    """Login nodes behind one name share its host key: a node that shows another key is
    refused (a man in the middle could be that node), with the node named, never skipped
    for a start on another node."""
    laptop = laptops()
    nodes.land_on("a")
    start(laptop)
    kill_masters(nodes.ssh_config)
    nodes.own_host_key("a", True)  # its processes end with its sshd: the server is gone
    nodes.land_on("b")
    for who in (laptop, laptops()):  # with the record (straight to a), and without (via b)
        proc = who.run(nodes.alias, timeout=180)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
        said = proc.stderr
        assert f"login node {nodes.hostnames['a']} of {nodes.alias}" in said, said
        assert "not one known for" in said and nodes.addresses["a"] in said, said
        assert not any(nodes.jupyters().values()), "nothing started on b"
    # The fix the message gives: a's own key under the name's, once checked.
    name = f"[{nodes.ip}]:{nodes.port}"
    assert f"known_hosts under the name {name}" in said, said
    public = " ".join(Path(f"{nodes.node_file('a', 'host_key')}.pub").read_text().split()[:2])
    kept = nodes.known_hosts.read_text()
    try:
        nodes.known_hosts.write_text(kept + f"{name} {public}\n")
        again = start(laptop)  # its server died with the node's processes: started there again
        assert again["login_node"] == nodes.hostnames["a"] and api_status(again["url"]) == 200
        one_jupyter(nodes, "a")
    finally:
        nodes.known_hosts.write_text(kept)
