"""Every connection goes the way the ssh config says: a host reached only through a port
forward is never tried at the internal address its sshd sees, however the record of its
session was made (tests/bastion.py: that address is a silent black hole for the laptop)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest

from bastion import ForwardedHost, ForwardUnavailable
from conftest import _REMOTES, NbtRunner
from helpers import api_status, kill_masters


@pytest.fixture(scope="module")
def fwd() -> Iterator[ForwardedHost]:
    if os.geteuid() != 0:
        pytest.skip("the forwarded host needs root (useradd, ip netns, ip rule): run bash tests/run")
    host = ForwardedHost()
    _REMOTES.append(host)
    try:
        try:
            host.start()
        except ForwardUnavailable as err:
            pytest.skip(f"no host behind a silent port forward: {err}")
        yield host
    finally:
        host.stop()


@pytest.fixture(scope="module")
def laptops(fwd: ForwardedHost) -> Iterator[Callable[[], NbtRunner]]:
    """Makes laptops: each its own state, the same ssh config."""
    made: list[NbtRunner] = []

    def laptop() -> NbtRunner:
        made.append(NbtRunner(fwd))
        return made[-1]

    yield laptop
    for runner in made:
        runner.cleanup()


@pytest.fixture(scope="module")
def laptop(laptops) -> NbtRunner:
    """The laptop the tests share, so that the module starts Jupyter once."""
    return laptops()


def nothing_sunk(fwd: ForwardedHost, step: str) -> None:
    """Since the host was made, nothing from here went to its own address."""
    assert fwd.sunk() == fwd.sunk_at_start, (
        f"{step}: {fwd.sunk() - fwd.sunk_at_start} packet(s) sent to the host's own address "
        f"{fwd.ip}, which the ssh config never names (it says 127.0.0.1:{fwd.relay_port})")


def through_forward(fwd: ForwardedHost, since: int, step: str, logins: bool = True) -> None:
    """Every connection sshd saw since SINCE came through the forward, and (LOGINS) at
    least one login did."""
    came = fwd.connections_since(since)
    assert all(addr == fwd.relay_source for addr in came), (
        f"{step}: connections to sshd from {came}; only the forward ({fwd.relay_source}) "
        f"leads there, {fwd.host_ip} is a direct connection to {fwd.ip}")
    if logins:
        assert fwd.relay_source in fwd.logins_since(since), (
            f"{step}: no login through the forward; logins from {fwd.logins_since(since)}")


def attach(laptop: NbtRunner, *args: str) -> tuple[dict, float]:
    """Start or reattach the session; its --json output and how long it took."""
    began = time.monotonic()
    proc = laptop.run(laptop.remote.alias, "--json", "--timeout", "30", *args, timeout=180)
    took = time.monotonic() - began
    assert proc.returncode == 0, f"exit {proc.returncode} after {took:.1f}s: {proc.stderr}"
    info = json.loads(proc.stdout)
    assert api_status(info["url"]) == 200
    return info, took


def session_up(laptop: NbtRunner) -> None:
    """The shared session runs (a test run alone starts it)."""
    if not any(not rec.get("ended") for rec in laptop.status()):
        attach(laptop)


def test_cold_start_reaches_the_host_only_through_the_forward(fwd, laptop):
    assert fwd.dropping
    since = fwd.log_size()
    attach(laptop)
    nothing_sunk(fwd, "cold start")
    through_forward(fwd, since, "cold start")


def test_reattach_ensure_and_status_go_the_configured_way(fwd, laptop):
    session_up(laptop)
    nothing_sunk(fwd, "start")

    kill_masters(fwd.ssh_config)
    since = fwd.log_size()
    attach(laptop)
    nothing_sunk(fwd, "reattach with the master gone")
    through_forward(fwd, since, "reattach with the master gone")

    kill_masters(fwd.ssh_config)
    since = fwd.log_size()
    proc = laptop.run(fwd.alias, "--ensure", "--timeout", "30", timeout=180)
    assert proc.returncode == 0, proc.stderr
    [rec] = laptop.status()
    assert api_status(rec["url"]) == 200
    nothing_sunk(fwd, "--ensure with the master gone")
    through_forward(fwd, since, "--ensure with the master gone")

    kill_masters(fwd.ssh_config)
    since = fwd.log_size()
    for args in (["--status"], ["--status", "--json"]):
        proc = laptop.run(*args, timeout=180)
        assert proc.returncode == 0, proc.stderr
        nothing_sunk(fwd, f"{' '.join(args)} with the master gone")
    through_forward(fwd, since, "--status with the master gone", logins=False)


def test_a_record_made_where_the_address_answered_costs_no_wait_where_it_is_dropped(
        fwd, laptop, laptops):
    session_up(laptop)
    baseline = min(_ssh_true(fwd) for _ in range(2))
    elsewhere = laptops()  # a second laptop, recording the running session afresh
    try:
        # Made where the host's own address answers (another network, or before the
        # laptop moved behind the bastion): nothing must be learned from it...
        fwd.drop(False)
        since = fwd.log_size()
        attach(elsewhere)
        made_where_it_answered = fwd.connections_since(since)

        # ...that costs a wait once it no longer answers.
        kill_masters(fwd.ssh_config)
        fwd.drop(True)
        since = fwd.log_size()
        _, took = attach(elsewhere)
        print(f"reattach, address dropped: {took:.2f}s (ssh true: {baseline:.2f}s)")
        assert took < baseline + 5, (
            f"reattach took {took:.1f}s where `ssh {fwd.alias} true` takes {baseline:.1f}s: "
            "it waited for the host's own address, which no longer answers")
        nothing_sunk(fwd, "reattach of a record made where the address answered")
        through_forward(fwd, since, "reattach of a record made where the address answered")
        assert all(addr == fwd.relay_source for addr in made_where_it_answered), (
            f"while the host's own address answered, connections came from "
            f"{made_where_it_answered}, not only through the forward ({fwd.relay_source})")

        # A record of an older version that went straight to that address.
        [path] = elsewhere.state_dir.rglob("*@nbtunnel.json")
        rec = json.loads(path.read_text())
        rec.update(login_node=rec.get("login_node") or os.uname().nodename,
                   login_address=fwd.ip, login_port=22, login_direct=True, login_route="name")
        path.write_text(json.dumps(rec))
        kill_masters(fwd.ssh_config)
        since = fwd.log_size()
        _, took = attach(elsewhere)
        print(f"reattach, login_direct record: {took:.2f}s (ssh true: {baseline:.2f}s)")
        assert took < baseline + 5, (
            f"reattach of a record with login_direct took {took:.1f}s where `ssh {fwd.alias} "
            f"true` takes {baseline:.1f}s: it waited for {fwd.ip}, which the ssh config "
            "never names")
        nothing_sunk(fwd, "reattach of a record with login_direct")
        through_forward(fwd, since, "reattach of a record with login_direct")
    finally:
        fwd.drop(True)
        kill_masters(fwd.ssh_config)  # the shared laptop reattaches when it needs to


def _ssh_true(fwd: ForwardedHost) -> float:
    began = time.monotonic()
    proc = subprocess.run(["ssh", "-F", str(fwd.ssh_config), fwd.alias, "true"],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return time.monotonic() - began
