"""An open JupyterLab tab in a real browser (Playwright driving Debian's Chromium), as
the person at the laptop has it: a notebook opened at its URL, cells typed and run with
Shift+Enter, outputs read from the page. Shared by tests/test_tab.py and the benchmark."""

from __future__ import annotations

import contextlib
import json
import shutil
import time
import urllib.request
from urllib.parse import parse_qs, urlparse

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# The status bar's kernel item: "Python 3 (ipykernel) | Idle", from the session's real kernel.
KERNEL_STATUS = '.jp-StatusBar-TextItem[title^="Change kernel"]'


def missing() -> str:
    """Why a real browser cannot run here ('' when it can)."""
    if not CHROMIUM:
        return "chromium is not installed (tests/run installs it)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed in the test venv (tests/run installs it)"
    return ""


def put_notebook(url: str, name: str) -> None:
    """Create notebook NAME on the server of URL, with a Python kernelspec in its metadata
    (so that opening it starts its kernel without a dialog)."""
    parts = urlparse(url)
    token = parse_qs(parts.query)["token"][0]
    body = {
        "type": "notebook",
        "format": "json",
        "content": {
            "nbformat": 4,
            "nbformat_minor": 5,
            "metadata": {
                "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}
            },
            "cells": [],
        },
    }
    request = urllib.request.Request(
        f"http://127.0.0.1:{parts.port}/api/contents/{name}",
        data=json.dumps(body).encode(),
        method="PUT",
        headers={"Authorization": f"token {token}", "Content-Type": "application/json"},
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=30) as response:
        assert response.status in (200, 201), response.status


class LabTab:
    """One browser with one JupyterLab tab on notebook NAME at the server of URL."""

    def __init__(self, url: str, name: str = "") -> None:
        from playwright.sync_api import sync_playwright

        name = name or "tab-%d.ipynb" % time.time_ns()
        put_notebook(url, name)
        parts = urlparse(url)
        token = parse_qs(parts.query)["token"][0]
        # reset: start from an empty workspace, not the layout an earlier test left
        # (whose restored session would ask for a kernel in a dialog).
        self.address = f"http://127.0.0.1:{parts.port}/lab/tree/{name}?reset&token={token}"
        self.console: list[str] = []
        self.runs = 0
        self.seen: list[str] = []  # dialogs that were dismissed
        self._pw = sync_playwright().start()
        try:
            self.browser = self._pw.chromium.launch(
                executable_path=CHROMIUM,
                args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
            )
            self.page = self.browser.new_page()
            self.page.on("console", lambda m: self.console.append(f"{time.time():.3f} {m.type}: {m.text}"))
            self.page.on("pageerror", lambda e: self.console.append(f"{time.time():.3f} error: {e}"))
            self.page.goto(self.address, timeout=90_000)
            self.page.wait_for_selector(".jp-Notebook .jp-Cell .cm-content", timeout=90_000)
            self.wait_idle(120)  # a cell run before the kernel is there would not run at all
            # A dialog at start-up (a kernel to pick on a slow start) is answered as a
            # person would, with its default button; what it said is kept.
            self.startup_dialogs = self.dialogs()
            for _ in self.startup_dialogs:
                self.page.locator(".jp-Dialog .jp-mod-accept").first.click()
                self.page.wait_for_selector(".jp-Dialog", state="detached", timeout=30_000)
            if self.startup_dialogs:
                self.wait_idle(120)
        except BaseException:
            self.close()
            raise

    def wait_idle(self, timeout: float) -> None:
        """Wait until the notebook's kernel is connected and idle, as the status bar says
        ("Python 3 (ipykernel) | Idle"). Not the toolbar's execution indicator: it says
        "idle" from the start, before any kernel, and a cell run then finds no kernel
        (JupyterLab drops the run, or asks for a kernel in a dialog)."""
        self.page.wait_for_function(
            """selector => {
                const item = document.querySelector(selector);
                return item !== null && / [|] Idle$/.test(item.textContent.trim());
            }""",
            arg=KERNEL_STATUS,
            timeout=timeout * 1000,
        )

    def run(self, code: str) -> None:
        """Type CODE into the last cell and run it (Shift+Enter), without waiting."""
        self.dismiss_dialogs()
        cell = self.page.locator(".jp-Notebook .jp-Cell").nth(self.runs)
        editor = cell.locator(".cm-content")
        editor.click()
        editor.press("ControlOrMeta+a")
        editor.press_sequentially(code)
        editor.press("Shift+Enter")
        # A run JupyterLab did not take (the prompt stays "[ ]:", nothing sent) is run again
        # in place until it is taken ("[*]:" while queued or running, then its number). A
        # dialog instead is a failure, and says what it is.
        prompt = cell.locator(".jp-InputPrompt")
        for _ in range(20):
            time.sleep(0.5)
            if prompt.inner_text().strip() not in ("[ ]:", ""):
                break
            if self.dialogs():
                raise AssertionError(
                    f"running {code!r} opened a dialog: {self.dialogs()!r}; kernel"
                    f" {self.kernel_status()!r}\nconsole:\n" + "\n".join(self.console[-30:])
                )
            editor.click()
            editor.press("Control+Enter")
        self.runs += 1

    def output(self, index: int | None = None) -> str:
        """Text of the output of the INDEX-th run cell (the last by default); '' if none yet."""
        index = self.runs - 1 if index is None else index
        area = self.page.locator(".jp-Notebook .jp-Cell").nth(index).locator(".jp-OutputArea-output")
        return area.first.inner_text(timeout=2_000) if area.count() else ""

    def wait_output(self, expected: str, timeout: float) -> float:
        """Wait until the last run cell shows EXPECTED; the time.monotonic() when it did."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.output().strip() == expected:
                    return time.monotonic()
            except Exception:  # the page redraws under us: look again
                pass
            time.sleep(0.05)
        with contextlib.suppress(Exception):
            self.page.screenshot(path="/tmp/nbt-tab-failed.png")
        cells = self.page.locator(".jp-Notebook .jp-Cell .cm-content").all_inner_texts()
        status = self.kernel_status()
        raise TimeoutError(
            f"the tab did not show {expected!r} within {timeout}s (it shows {self.output()!r});"
            f" cells {cells!r}, kernel {status!r}, dialogs: {self.dialogs()!r}\nconsole:\n"
            + "\n".join(self.console[-30:])
        )

    def kernel_status(self) -> str:
        """What the status bar says of the kernel ("Python 3 (ipykernel) | Idle")."""
        item = self.page.locator(KERNEL_STATUS)
        return item.first.inner_text().strip() if item.count() else ""

    def kernel_name(self) -> str:
        """What the notebook's toolbar says of its kernel ("Python 3 (ipykernel)", "No Kernel")."""
        return self.page.locator(".jp-Toolbar-kernelName").first.inner_text().strip()

    def choose_kernel(self) -> None:
        """What the person does when the toolbar says "No Kernel": click it, take the
        preferred kernel in the dialog, wait until it is idle."""
        self.dismiss_dialogs()
        self.page.locator(".jp-Toolbar-kernelName").first.click()
        self.page.locator(".jp-Dialog .jp-mod-accept").click()
        self.page.wait_for_selector(".jp-Dialog", state="detached", timeout=30_000)
        self.wait_idle(120)

    def dismiss_dialogs(self) -> None:
        """Close any dialog (Escape, as a person would), keeping its first line in self.seen."""
        for text in self.dialogs():
            self.seen.append(text.strip().splitlines()[0] if text.strip() else "?")
            self.page.keyboard.press("Escape")
            with contextlib.suppress(Exception):
                self.page.wait_for_selector(".jp-Dialog", state="detached", timeout=5_000)

    def dialogs(self) -> list[str]:
        """Text of the modal dialogs open in the tab (a 'Server Connection Error', ...)."""
        return [d.inner_text() for d in self.page.locator(".jp-Dialog").all()]

    def kernel_id(self) -> str:
        """The id of the kernel the tab's notebook runs on, as the server lists it."""
        return self.page.evaluate(
            """async () => {
                const r = await fetch(location.pathname.replace(/\\/lab\\/tree\\/.*$/, '')
                                      + '/api/sessions' + location.search);
                return (await r.json()).map(s => s.kernel.id).join(',');
            }"""
        )

    def close(self) -> None:
        """Close the browser (Playwright removes its temporary profile)."""
        try:
            if getattr(self, "browser", None):
                self.browser.close()
        finally:
            self._pw.stop()
