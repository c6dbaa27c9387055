"""The person's open JupyterLab tab through --watch's repairs, in a real browser
(Playwright driving Debian's Chromium) against the real sshd, tmux and Jupyter of the
test remote: the same tab, never reloaded, runs cells again once the link or the server
is back. How fast is the benchmark's business (bench/bench.py); here, only that it does."""

from __future__ import annotations

import pytest

import labtab
from helpers import kill_jupyter, kill_masters, masters, wait_until
from unattended import api_status, finish, wait_watched, watch

pytestmark = pytest.mark.skipif(bool(labtab.missing()), reason=labtab.missing() or "-")


@pytest.fixture
def tab_of():
    """Open a LabTab on a URL; closed at the end of the test."""
    tabs = []

    def open_tab(url: str, name: str = "") -> labtab.LabTab:
        tabs.append(labtab.LabTab(url, name))
        return tabs[-1]

    yield open_tab
    for tab in tabs:
        tab.close()


def test_open_tab_runs_cells_again_after_the_link_was_cut(nbt, remote, tab_of):
    proc, url = watch(nbt)
    tab = tab_of(url)
    tab.run("x = 41; x + 1")
    tab.wait_output("42", 120)
    before = masters(nbt.ssh_config)
    assert len(before) == 1

    kill_masters(nbt.ssh_config)  # the connection ends: every forwarded socket with it
    tab.run("x + 2")  # right after the cut, in the same tab, no reload
    wait_watched(proc, lambda: api_status(url, timeout=3) == 200, 60, "tunnel back")
    assert masters(nbt.ssh_config) and masters(nbt.ssh_config) != before
    tab.wait_output("43", 60)  # the kernel kept its state: x is still 41
    assert tab.dialogs() == [] and tab.seen == []  # no "Server Connection Error"

    # And the cell after that, as usual.
    tab.run("x + 3")
    tab.wait_output("44", 60)
    code, _, err = finish(proc)
    assert code == 0, err


def test_open_tab_runs_cells_again_after_repeated_cuts(nbt, remote, tab_of):
    proc, url = watch(nbt)
    tab = tab_of(url)
    tab.run("x = 41; x + 1")
    tab.wait_output("42", 120)
    for n in range(3):
        kill_masters(nbt.ssh_config)
        wait_until(lambda: not masters(nbt.ssh_config), 15, message="master gone")
        wait_watched(proc, lambda: api_status(url, timeout=3) == 200, 60, "tunnel back")
        tab.run(f"x + {2 + n}")
        tab.wait_output(str(43 + n), 60)
    assert tab.dialogs() == [] and tab.seen == []
    finish(proc)


def test_open_tab_gets_a_new_kernel_after_the_server_restarted(nbt, remote, tab_of):
    proc, url = watch(nbt)
    tab = tab_of(url)
    tab.run("x = 41; x + 1")
    tab.wait_output("42", 120)
    old_kernel = tab.kernel_id()
    assert old_kernel

    kill_jupyter(remote)  # the server and its kernels are gone; --watch starts it again
    wait_watched(proc, lambda: api_status(url, timeout=3) == 200, 90, "server back")
    assert nbt.status()[0]["url"] == url  # same port, same token: the tab's own URL

    # The same tab, never reloaded, at the same URL: the old kernel is gone with its
    # server, and the tab says so ("No Kernel" on its toolbar). The person picks the
    # kernel again (one click and the dialog's Select) and runs cells on a new kernel.
    # A "Server Connection Error" shown while the server restarted is dismissed first.
    wait_until(lambda: tab.kernel_name() == "No Kernel", 60, message="the tab shows the kernel gone")
    tab.choose_kernel()
    tab.run("y = 5; y * 2")
    tab.wait_output("10", 60)
    new_kernel = tab.kernel_id()
    assert new_kernel and new_kernel != old_kernel
    assert tab.dialogs() == []
    code, _, err = finish(proc)
    assert code == 0, err
    assert "restarted Jupyter" in err
