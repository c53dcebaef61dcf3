"""Driving a real terminal for the end-to-end tests: tmux commands and waiting for what the screen shows."""

import shutil
import subprocess
import time

import pytest


def needs_tmux(what: str) -> list:
    """Skip marks for a test that drives the installed `nanoplay` in tmux."""
    return [
        pytest.mark.skipif(shutil.which("tmux") is None,
                           reason=f"tmux is not installed (apt-get install -y tmux): needed to drive {what}"),
        pytest.mark.skipif(shutil.which("nanoplay") is None, reason="the nanoplay command is not installed (pip install -e .)"),
    ]


def tmux(*args) -> str:
    return subprocess.run(["tmux", *args], check=True, capture_output=True, text=True).stdout


def wait_screen(session: str, condition, timeout: float = 60.0) -> str:
    """Poll the captured screen until `condition(screen)` holds; the timeout only guards against hangs."""
    deadline = time.monotonic() + timeout
    while True:
        screen = tmux("capture-pane", "-p", "-t", session)
        if condition(screen):
            return screen
        assert time.monotonic() < deadline, f"timed out; the screen was:\n{screen}"
        time.sleep(0.1)
