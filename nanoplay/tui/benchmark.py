"""
Playground responsiveness benchmark (not a test: timings depend on the machine).

    python -m nanoplay.tui.benchmark [--panes 4] [--keys 40]

1. Startup: seconds from launching `nanoplay` in tmux until its window shows (models still loading).
2. Keystroke latency while N panes stream: a key event is posted to the prompt editor every 50 ms
   while every pane generates; latency is the time until the editor holds the typed character.
Models are random tiny-to-small checkpoints written to a temporary directory.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path


def make_models(root: Path, n: int) -> list[str]:
    import torch

    from ..checkpoint import save_checkpoint, step_dir_name
    from ..model import GPT, GPTConfig

    specs = []
    for i in range(n):
        torch.manual_seed(i)
        model = GPT(GPTConfig(block_size=256, vocab_size=50304, n_layer=4, n_head=4, n_embd=128))
        save_checkpoint(model, root / f"bench{i}" / step_dir_name(1), step=1)
        specs.append(f"bench{i}")
    return specs


def startup_seconds(root: Path, specs: list[str], tries: int = 3) -> list[float]:
    if shutil.which("tmux") is None or shutil.which("nanoplay") is None:
        return []
    times = []
    for t in range(tries):
        session = f"nanoplay-bench-{os.getpid()}-{t}"
        command = f"NANOPLAY_CHECKPOINTS={shlex.quote(str(root))} NANOPLAY_SESSIONS={shlex.quote(str(root / 's'))} " \
                  f"HF_HUB_OFFLINE=1 nanoplay " + " ".join(f"--model {s}" for s in specs)
        start = time.perf_counter()
        subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "160", "-y", "45", command], check=True)
        try:
            while True:
                screen = subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True,
                                        text=True).stdout
                if "seed" in screen and "Stop" in screen:  # the status bar and the footer are drawn
                    times.append(time.perf_counter() - start)
                    break
                if time.perf_counter() - start > 30:
                    break
                time.sleep(0.005)
        finally:
            subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
    return times


async def keystroke_latency(specs: list[str], keys: int) -> tuple[list[float], int]:
    from textual import events

    from .app import NanoplayApp

    app = NanoplayApp(models=specs)
    latencies = []
    async with app.run_test(size=(160, 45)) as pilot:
        while not all(p.lm or p.error for p in app.main.panes):
            await asyncio.sleep(0.05)
        app.settings.max_new_tokens = 100_000
        editor = app.main.query_one("#prompt")
        editor.load_text("Once upon a time")
        await pilot.press("enter")
        while not all(p.state.run and len(p.state.run.toks) > 5 for p in app.main.panes):
            await asyncio.sleep(0.01)
        editor.load_text("")
        start_tokens = sum(len(p.state.run.toks) for p in app.main.panes)
        began = time.perf_counter()
        for i in range(keys):
            before = len(editor.text)
            sent = time.perf_counter()
            editor.post_message(events.Key("x", "x"))
            while len(editor.text) == before:
                await asyncio.sleep(0.0005)
            latencies.append(time.perf_counter() - sent)
            await asyncio.sleep(0.05)
        streamed = sum(len(p.state.run.toks) for p in app.main.panes) - start_tokens
        rate = streamed / (time.perf_counter() - began)
        assert all(p.busy for p in app.main.panes), "every pane must still be streaming"
        app.main.action_stop()
    return latencies, rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--panes", type=int, default=4)
    parser.add_argument("--keys", type=int, default=40)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "checkpoints"
        specs = make_models(root, args.panes)
        os.environ["NANOPLAY_CHECKPOINTS"] = str(root)
        os.environ["NANOPLAY_SESSIONS"] = str(Path(tmp) / "sessions")
        starts = startup_seconds(root, specs)
        if starts:
            print(f"startup to a usable window: median {statistics.median(starts):.2f} s over {len(starts)} runs "
                  f"(min {min(starts):.2f}, max {max(starts):.2f})")
        else:
            print("startup: skipped (needs tmux and the installed nanoplay command)")
        latencies, rate = asyncio.run(keystroke_latency(specs, args.keys))
        ms = sorted(x * 1000 for x in latencies)
        print(f"keystroke latency while {args.panes} panes stream ({rate:.0f} tok/s in all): "
              f"median {statistics.median(ms):.1f} ms, p95 {ms[int(0.95 * (len(ms) - 1))]:.1f} ms, max {ms[-1]:.1f} ms")


if __name__ == "__main__":
    main()
