"""`nanoplay train`'s live view in a real terminal (tmux): Ctrl+C leaves one panel, and --resume says where it starts."""

import os
import shlex
import subprocess

from tmux_driver import needs_tmux, tmux, wait_screen

pytestmark = needs_tmux("the live view")

TOP_BORDER = "╭"


def test_ctrl_c_leaves_one_live_panel_and_resume_names_its_step(tmp_path):
    env = {"NANOPLAY_CHECKPOINTS": str(tmp_path / "checkpoints"), "NANOPLAY_DATA_CACHE": str(tmp_path / "tokens"),
           "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "TERM": "xterm-256color", "OMP_NUM_THREADS": "1"}
    train = ("nanoplay train --preset demo --n-layer 1 --n-head 2 --n-embd 32 --block-size 16 --batch-size 1 "
             "--max-iters 100000 --eval-interval 0 --sample-tokens 0 --name cc")
    exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    session = f"nanoplay-train-test-{os.getpid()}"
    # 120 columns: the panel's border fills the line, where an echoed ^C used to wrap and shift the redraw
    tmux("new-session", "-d", "-s", session, "-x", "120", "-y", "40", "-c", str(tmp_path), "bash --norc --noprofile")
    try:
        tmux("send-keys", "-t", session, f"export {exports}; clear; {train}; echo EXITED-$?", "Enter")
        wait_screen(session, timeout=240.0, condition=lambda s: any(f"{n}/100000" in s for n in range(3, 10)))  # a few steps in
        tmux("send-keys", "-t", session, "C-c")
        screen = wait_screen(session, timeout=240.0, condition=lambda s: "EXITED-0" in s)
        assert screen.count(TOP_BORDER) == 1, screen  # one panel: no second top border left behind
        assert "^C" not in screen and "SIGINT: finishing this step" in screen
        stopped = next(line for line in screen.splitlines() if line.startswith("stopped at step "))
        step = int(stopped.split()[3].rstrip(";"))
        tmux("send-keys", "-t", session, f"clear; {train} --resume; echo RESUMED-$?", "Enter")
        resuming = f"resuming {tmp_path / 'checkpoints' / 'cc'} from step {step} (of 100000)"
        # the old screen may still be up, border and all: wait for the resumed run's own line
        wait_screen(session, timeout=240.0, condition=lambda s: resuming in s.replace("\n", "") and TOP_BORDER in s)
        tmux("send-keys", "-t", session, "C-c")
        wait_screen(session, timeout=240.0, condition=lambda s: "RESUMED-0" in s)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
