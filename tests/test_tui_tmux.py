"""The installed `nanoplay` command driven in tmux as a user would: start, prompt, colour, quit."""

import os
import shlex
import subprocess

from conftest import tiny_model
from tmux_driver import needs_tmux, tmux, wait_screen

from nanoplay.checkpoint import save_checkpoint, step_dir_name

pytestmark = needs_tmux("the playground end to end")


def test_playground_in_tmux(tmp_path):
    root = tmp_path / "checkpoints"
    for name, seed in (("alpha", 1), ("beta", 2)):
        save_checkpoint(tiny_model(seed), root / name / step_dir_name(100), step=100)
    env = {"NANOPLAY_CHECKPOINTS": str(root), "NANOPLAY_SESSIONS": str(tmp_path / "sessions"),
           "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "TERM": "xterm-256color"}
    command = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    command += " nanoplay --model alpha --model beta; echo EXITED-$?; sleep 60"
    session = f"nanoplay-test-{os.getpid()}"
    tmux("new-session", "-d", "-s", session, "-x", "140", "-y", "40", "-c", str(tmp_path), command)
    try:
        wait_screen(session, lambda s: s.count("ready: type a prompt") == 2)
        tmux("send-keys", "-t", session, "-l", "Hello world")
        tmux("send-keys", "-t", session, "Enter")
        screen = wait_screen(session, lambda s: s.count("done: length") == 2)
        assert "alpha@100" in screen and "beta@100" in screen
        # the default max new tokens, in both pane headers ("48 tok · 31 tok/s": not the speed, which can be 48 too)
        assert screen.count("48 tok ·") == 2
        assert "colours off" in screen
        tmux("send-keys", "-t", session, "C-t")
        screen = wait_screen(session, lambda s: "≥.001" in s)
        assert "<.001" in screen and "colours off" not in screen
        tmux("send-keys", "-t", session, "C-c")
        wait_screen(session, lambda s: "EXITED-0" in s, timeout=20)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
