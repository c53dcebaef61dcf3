"""The welcome screen: shown when nothing can be opened (no checkpoints, no cached Hub model)."""

from __future__ import annotations

import math
import re
import threading

from textual import on, work
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.content import Content
from textual.widgets import Button, Footer, Label, Markdown, ProgressBar

from .base import FullScreen

DEMO_PRESET = "demo"

WELCOME = """\
# Welcome to nanoplay

There is no model here yet: no checkpoints under {root} and no GPT-2 in the Hugging Face cache.

What you can do from here:

- **Train the small `demo` preset** on the bundled offline corpus (Python's documentation topics):
  a 4-layer model that trains on a CPU in a few minutes, then opens here.
- **Open `gpt2`**: it downloads from the Hub, so it works only where there is network
  (elsewhere, `nanoplay pull gpt2` on a machine with network and copy the cache over).
"""


def code_span(text: str) -> str:
    """`text` as a Markdown code span it cannot end early: fenced by more backticks than any run in it
    (the spaces inside the fence are not shown)."""
    ticks = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    return f"{ticks} {text} {ticks}"


class WelcomeScreen(FullScreen[str | None]):
    """Dismissed with the spec to open (the trained demo run, or gpt2)."""

    BINDINGS = [Binding("t", "train", "Train demo"), Binding("g", "gpt2", "Open gpt2"),
                Binding("escape", "stop_training", "Stop training")]

    def __init__(self):
        super().__init__()
        self.stop_event = threading.Event()

    def compose(self):
        from ...loading import checkpoints_root

        with Vertical(id="welcome"):
            yield Markdown(WELCOME.format(root=code_span(f"{checkpoints_root()}/")))
            with Horizontal(classes="buttons"):
                yield Button("Train the demo preset", variant="primary", id="train")
                yield Button("Open gpt2 (download)", id="gpt2")
            yield ProgressBar(id="train-progress", show_eta=True)
            yield Label("", id="train-status")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#train-progress").display = False

    @on(Button.Pressed, "#gpt2")
    def action_gpt2(self) -> None:
        self.dismiss("gpt2")

    @on(Button.Pressed, "#train")
    def action_train(self) -> None:
        self.query_one("#train", Button).disabled = True
        self.query_one("#train-progress").display = True
        self.query_one("#train-status", Label).update("preparing the corpus and the model…")
        self.train_demo()

    def action_stop_training(self) -> None:
        self.stop_event.set()

    @work(thread=True, exclusive=True)
    def train_demo(self) -> None:
        from trainer.config import load_preset
        from trainer.train import train

        config = load_preset(DEMO_PRESET)

        def on_progress(p) -> None:
            self.app.call_from_thread(self.show_progress, p)

        try:
            result = train(config, on_progress=on_progress, stop_event=self.stop_event)
        except Exception as e:  # shown here; the user can retry or open gpt2
            self.app.call_from_thread(self.training_ended, f"training failed: {e}")
            return
        if result.checkpoint is None:
            self.app.call_from_thread(self.training_ended, "stopped before the first checkpoint was saved")
        else:
            self.app.call_from_thread(self.dismiss, config.name)

    def training_ended(self, message: str) -> None:
        if self.gone:  # the screen went while the trainer stopped
            return
        self.query_one("#train-status", Label).update(Content(message))  # an error's text: never markup
        self.query_one("#train", Button).disabled = False
        self.stop_event.clear()

    def show_progress(self, p) -> None:
        if self.gone:
            return
        self.query_one("#train-progress", ProgressBar).update(total=p.max_steps, progress=p.step)
        loss = f" · loss {p.loss:.3f}" if p.loss is not None else ""
        val = f" · val loss {p.val_loss:.3f}" if p.val_loss is not None else ""
        from trainer.monitor import format_duration

        left = f"{format_duration(p.eta_s)} left" if math.isfinite(p.eta_s) else "time left known after a step"
        self.query_one("#train-status", Label).update(Content(
            f"step {p.step}/{p.max_steps}{loss}{val} · {left} · Esc stops and keeps the last checkpoint"))
