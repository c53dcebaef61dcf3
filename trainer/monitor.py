"""
What a training run shows and records: a live terminal view, metrics.jsonl, optional TensorBoard.

Displays: `live` (rich) shows step, loss, learning rate, tokens/s, MFU against the detected GPU's
peak, ETA and a loss curve drawn with braille characters; `plain` prints one line per log interval (what
`auto` picks when stdout is not a terminal: a log file, CI); `none` prints nothing (a caller such as the
TUI follows `on_progress` instead). metrics.jsonl gets every step, evaluation and sample in any case.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from nanoplay.errors import NanoplayError

# Dense bf16 tensor-core peaks (TFLOPS) from the vendors' data sheets; more specific names first.
PEAK_BF16_TFLOPS = [
    ("B200", 2250.0),
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM, and the HBM3 names torch reports for it
    ("GH200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("RTX 4090", 165.2),
    ("RTX 3090", 71.0),
]


def peak_flops(device_name: str | None) -> float | None:
    """Peak bf16 FLOP/s of a GPU named as torch.cuda.get_device_name reports it; None if unknown or CPU."""
    if not device_name:
        return None
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in device_name:
            return tflops * 1e12
    return None


BRAILLE_BASE = 0x2800
# dot bit for (row 0..3 from the top, column 0..1) inside one braille cell
BRAILLE_DOTS = [[0x01, 0x08], [0x02, 0x10], [0x04, 0x20], [0x40, 0x80]]


def braille_plot(values: list[float], width: int = 60, height: int = 8) -> list[str]:
    """A line chart of `values` in width x height braille cells (2 x 4 dots each), oldest on the left."""
    if not values:
        return []
    cols = width * 2
    if len(values) > cols:  # average consecutive values into one column each
        per = len(values) / cols
        values = [sum(values[int(i * per):int((i + 1) * per)]) / len(values[int(i * per):int((i + 1) * per)])
                  for i in range(cols)]
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    rows = height * 4
    cells = [[0] * width for _ in range(height)]
    for x, v in enumerate(values):
        y = rows - 1 - round((v - lo) / span * (rows - 1))  # dot row, 0 at the top
        cells[y // 4][x // 2] |= BRAILLE_DOTS[y % 4][x % 2]
    return ["".join(chr(BRAILLE_BASE + c) for c in line) for line in cells]


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


ETA_WINDOW = 50  # recent steps whose median time is the typical step


def eta_seconds(step_seconds: list[float], overhead_seconds: float, steps_left: int) -> float:
    """
    Seconds until the run ends: `steps_left` x (the median time of the last ETA_WINDOW steps, the lower
    middle one of an even count, + the evaluation/checkpoint time so far spread over the steps so far);
    NaN until a step after the first.

    `step_seconds` are the optimizer steps' own times, oldest first. The first is left out (it compiles
    and warms up caches), and a median ignores the odd slow step (a recompilation for a new batch shape,
    another process taking the CPU) that would move a mean or a moving average several-fold; the
    evaluations, samples and checkpoints between steps (`overhead_seconds` in all) come in at their
    average cost per step, so the estimate neither leaves them out nor jumps when one happens.
    """
    times = step_seconds[1:]
    if not times:
        return float("nan")
    return steps_left * (statistics.median_low(times[-ETA_WINDOW:]) + overhead_seconds / len(times))


@dataclass
class Progress:
    """What `on_progress` receives after every step."""

    step: int
    max_steps: int
    loss: float | None
    lr: float
    tokens_per_s: float
    mfu: float | None
    eta_s: float
    val_loss: float | None


class Monitor:
    """Receives step/eval/sample events from the loop (rank 0 only) and shows and records them."""

    def __init__(self, *, run_dir: Path, title: str, max_iters: int, start_step: int, log_interval: int,
                 flops_per_token: float, device_name: str | None, tensorboard: bool, display: str = "auto",
                 on_progress=None):
        self.title, self.max_iters, self.log_interval = title, max_iters, log_interval
        self.flops_per_token = flops_per_token
        self.peak = peak_flops(device_name)
        self.device_name = device_name or "cpu"
        run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = run_dir / "metrics.jsonl"
        _truncate_metrics(self.metrics_path, start_step)
        self.metrics = open(self.metrics_path, "a")
        self.writer = _tensorboard_writer(run_dir / "tensorboard") if tensorboard else None
        self.losses: list[float] = []
        self.last: dict = {}
        self.val_loss = self.best_val = None
        self.sample = ""
        self.step_seconds: list[float] = []  # this process's steps, for the ETA
        self.overhead_seconds = 0.0  # time between steps: evaluations, samples, checkpoints
        self.last_step_end: float | None = None
        self.start_step = start_step
        self.on_progress = on_progress
        if display == "auto":
            display = "live" if sys.stdout.isatty() else "plain"
        self.display = display
        self.live = None
        self.restore_terminal = None
        if display == "live":
            from rich.live import Live

            self.live = Live(self._render(), refresh_per_second=4, transient=False)
            self.restore_terminal = _quiet_control_echo()
            self.live.start()

    def _record(self, entry: dict):
        self.metrics.write(json.dumps(entry) + "\n")
        self.metrics.flush()

    def step(self, step: int, loss: float, lr: float, tokens: int, seconds: float):
        """One optimizer step done: `tokens` processed (all ranks) in `seconds`."""
        tokens_per_s = tokens / seconds if seconds > 0 else 0.0
        mfu = self.flops_per_token * tokens_per_s / self.peak if self.peak else None
        now = time.perf_counter()
        if self.last_step_end is not None:  # what ran since the previous step, besides this step itself
            self.overhead_seconds += max(0.0, now - self.last_step_end - seconds)
        self.last_step_end = now
        self.step_seconds.append(seconds)
        eta = eta_seconds(self.step_seconds, self.overhead_seconds, self.max_iters - step)
        self.last = dict(step=step, loss=loss, lr=lr, tokens_per_s=tokens_per_s, mfu=mfu, eta=eta)
        self.losses.append(loss)
        self._record({"step": step, "loss": loss, "lr": lr, "tokens": tokens, "seconds": round(seconds, 4),
                      "tokens_per_s": round(tokens_per_s, 1), "mfu": mfu, "time": time.time()})
        if self.writer:
            self.writer.add_scalar("train/loss", loss, step)
            self.writer.add_scalar("train/lr", lr, step)
            self.writer.add_scalar("train/tokens_per_s", tokens_per_s, step)
        if self.on_progress:
            self.on_progress(Progress(step, self.max_iters, loss, lr, tokens_per_s, mfu, eta, self.val_loss))
        if self.live:
            self.live.update(self._render())
        elif self.display == "plain" and (step % self.log_interval == 0 or step == self.max_iters):
            mfu_text = f" | mfu {mfu:.1%}" if mfu is not None else ""
            print(f"step {step}/{self.max_iters} | loss {loss:.4f} | lr {lr:.2e} | {tokens_per_s:,.0f} tok/s"
                  f"{mfu_text} | eta {format_duration(eta)}", flush=True)

    def evaluation(self, step: int, val_loss: float, best: float):
        self.val_loss, self.best_val = val_loss, best
        self._record({"step": step, "val_loss": val_loss})
        if self.writer:
            self.writer.add_scalar("val/loss", val_loss, step)
        self.message(f"step {step}: val loss {val_loss:.4f} (best {best:.4f})")

    def sample_text(self, step: int, text: str):
        self.sample = text
        self._record({"step": step, "sample": text})
        self.message(f"sample at step {step}: {text!r}")

    def message(self, text: str):
        if self.live:
            self.live.console.print(text)
            self.live.update(self._render())
        elif self.display == "plain":
            print(text, flush=True)

    def _render(self):
        from rich.console import Group
        from rich.panel import Panel
        from rich.table import Table
        from rich.text import Text

        table = Table.grid(padding=(0, 2))
        s = self.last
        mfu = s.get("mfu")
        cells = [
            ("step", f"{s.get('step', self.start_step)}/{self.max_iters}"),
            ("loss", f"{s['loss']:.4f}" if s else "-"),
            ("val", f"{self.val_loss:.4f} (best {self.best_val:.4f})" if self.val_loss is not None else "-"),
            ("lr", f"{s['lr']:.2e}" if s else "-"),
            ("tok/s", f"{s['tokens_per_s']:,.0f}" if s else "-"),
            ("MFU", f"{mfu:.1%}" if mfu is not None else "-"),
            ("ETA", format_duration(s["eta"]) if s else "-"),
        ]
        for _ in cells:
            table.add_column()
        table.add_row(*[Text(k, style="dim") for k, _ in cells])
        table.add_row(*[v for _, v in cells])
        parts = [table]
        if len(self.losses) > 1:
            lo, hi = min(self.losses), max(self.losses)
            parts.append(Text(f"loss {hi:.3f} (top) .. {lo:.3f} (bottom)", style="dim"))
            parts.append(Text("\n".join(braille_plot(self.losses, width=60, height=8)), style="cyan"))
        if self.sample:
            parts.append(Text("sample: " + self.sample.replace("\n", " ")[:200], style="italic"))
        return Panel(Group(*parts), title=f"{self.title} on {self.device_name}")

    def close(self):
        if self.live:
            self.live.stop()
        if self.restore_terminal:
            self.restore_terminal()
        if self.writer:
            self.writer.close()
        self.metrics.close()


def _quiet_control_echo():
    """
    Stop the terminal echoing Ctrl+C as `^C` while the live view is drawn; returns the function that
    restores the terminal (None when stdin is not a terminal). The view leaves the cursor at the end of
    its full-width bottom border, so an echoed `^C` wraps onto a new line and the next redraw starts one
    line low, leaving a second top border behind.
    """
    try:
        import termios
    except ImportError:  # Windows
        return None
    try:
        fd = sys.stdin.fileno()
        if not os.isatty(fd):
            return None
        saved = termios.tcgetattr(fd)
        quiet = termios.tcgetattr(fd)
        quiet[3] &= ~termios.ECHOCTL  # [3]: the local modes
        termios.tcsetattr(fd, termios.TCSANOW, quiet)
    except (AttributeError, ValueError, OSError, termios.error):  # no stdin, or not a real one (a test's capture)
        return None
    return lambda: termios.tcsetattr(fd, termios.TCSANOW, saved)


def _tensorboard_writer(directory: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise NanoplayError("--tensorboard needs the tensorboard package: pip install tensorboard") from e
    return SummaryWriter(str(directory))


def _truncate_metrics(path: Path, start_step: int):
    """On resume, drop what the interrupted run logged after its checkpoint: the log matches the state."""
    if not path.exists():
        return
    if start_step == 0:
        path.unlink()
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= start_step]
    path.write_text("".join(line + "\n" for line in kept))


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
