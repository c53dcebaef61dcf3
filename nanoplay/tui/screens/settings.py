"""The sampling settings panel: global settings, or one pane's overrides (blank = use the global value)."""

from __future__ import annotations

from textual import on
from textual.binding import Binding
from textual.containers import Grid, Horizontal, Vertical
from textual.content import Content
from textual.widgets import Button, Input, Label

from ...errors import NanoplayError
from ..state import PaneState, Settings
from .base import Dialog

# field, label, parser; parsers raise ValueError on bad input
FIELDS = [
    ("temperature", "temperature (0 = greedy)", float),
    ("top_k", "top-k (blank = off)", int),
    ("top_p", "top-p (blank = off)", float),
    ("min_p", "min-p (blank = off)", float),
    ("repetition_penalty", "repetition penalty (1 = off)", float),
    ("max_new_tokens", "max new tokens", int),
    ("seed", "seed", int),
    ("stop", "stop strings (comma-separated, \\n for newline)", None),
    ("draft", "draft model (a spec; blank = none)", str),
]
OPTIONAL = {"top_k", "top_p", "min_p", "draft"}


def show(name: str, value) -> str:
    if value is None:
        return ""
    if name == "stop":
        from ...sampling import format_stop_string  # imports torch: only once a dialog opens

        return ", ".join(format_stop_string(s) for s in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def parse_stop(text: str) -> list[str]:
    """The field's stop strings, read by the rule `gen --stop` uses (nanoplay.sampling)."""
    from ...sampling import parse_stop_list

    return parse_stop_list(text)


class SettingsScreen(Dialog[Settings | dict | None]):
    """Returns new global Settings, or a pane's overrides dict; None when cancelled."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel"), Binding("ctrl+s", "apply", "Apply")]

    def __init__(self, settings: Settings, pane: PaneState | None = None):
        super().__init__()
        self.settings = settings
        self.pane = pane

    def compose(self):
        title = f"Overrides for {self.pane.spec} (blank = global value)" if self.pane else "Sampling settings (all panes)"
        with Vertical(classes="dialog", id="settings"):
            yield Label(Content(title), classes="dialog-title")
            with Grid(id="settings-grid"):
                for name, label, _ in FIELDS:
                    yield Label(label)
                    if self.pane is not None:
                        value = show(name, self.pane.overrides[name]) if name in self.pane.overrides else ""
                        placeholder = show(name, getattr(self.settings, name)) or "off"
                    else:
                        value, placeholder = show(name, getattr(self.settings, name)), "off"
                    yield Input(value, placeholder=placeholder, id=f"set-{name}", compact=True)
            yield Label("", id="settings-error", classes="error")
            with Horizontal(classes="buttons"):
                yield Button("Apply (next run)", variant="primary", id="apply")
                yield Button("Cancel", id="cancel")

    @on(Button.Pressed, "#cancel")
    def cancel(self) -> None:
        self.dismiss(None)

    @on(Button.Pressed, "#apply")
    @on(Input.Submitted)
    def action_apply(self) -> None:
        try:
            result = self.read()
        except (ValueError, NanoplayError) as e:
            self.query_one("#settings-error", Label).update(Content(str(e)))  # it quotes what was typed
            return
        self.dismiss(result)

    def read(self):
        values = {}
        for name, label, parse in FIELDS:
            text = self.query_one(f"#set-{name}", Input).value.strip()
            if not text:
                if self.pane is None and name in OPTIONAL:
                    values[name] = None
                elif self.pane is None and name == "stop":
                    values[name] = []
                elif self.pane is None:
                    raise ValueError(f"{label}: needs a value")
                continue
            if parse is None:
                values[name] = parse_stop(text)
                continue
            if parse is str:  # a model spec
                from .picker import spec_problem

                if spec_problem(text):
                    raise ValueError(f"{label}: {spec_problem(text)}")
                values[name] = text
                continue
            try:
                values[name] = parse(text)
            except ValueError:
                raise ValueError(f"{label}: {text!r} is not a {'whole number' if parse is int else 'number'}") from None
        merged = self.settings.merged(values)
        from ...sampling import SamplingParams

        SamplingParams(**merged.sampling_kwargs())  # raises NanoplayError on a bad value
        return merged if self.pane is None else values
