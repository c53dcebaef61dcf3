"""The model picker: local checkpoints (every step), cached Hub models, the GPT-2 family, or any spec."""

from __future__ import annotations

import unicodedata

from textual import on, work
from textual.binding import Binding
from textual.containers import Vertical
from textual.content import Content
from textual.widgets import Input, Label
from textual.widgets.option_list import Option

from ..widgets.options import OptionList
from .base import Dialog


def spec_problem(spec: str) -> str | None:
    """Why a typed spec cannot be a model spec, in one line, or None. Control characters (a pasted tab,
    newline or escape sequence) would end up in the session, the pane title and the gen command line."""
    bad = next((c for c in spec if unicodedata.category(c).startswith("C")), None)
    if bad is not None:
        return f"a model spec cannot hold control characters ({bad!r} at position {spec.index(bad) + 1})"
    return None


class ModelPicker(Dialog[str | None]):
    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel")]

    def compose(self):
        with Vertical(classes="dialog", id="picker"):
            yield Label("Add a model pane", classes="dialog-title")
            yield Input(placeholder="any spec: owt-30m@2000, ./ckpt.pt, gpt2-medium, owner/repo", id="spec")
            yield Label("", id="spec-error", classes="error")
            yield OptionList(Option("looking for local models…", disabled=True), id="models")
            yield Label("Enter: add · Esc: cancel · GPT-2 models not cached download on pick", classes="dim")

    def on_mount(self) -> None:
        self.query_one("#spec").focus()
        self.list_models()

    @work(thread=True)
    def list_models(self) -> None:
        from ...loading import GPT2_FAMILY, list_local_models
        from ..discovery import model_options

        options = model_options(list_local_models(), GPT2_FAMILY)
        self.app.call_from_thread(self.show_models, options)

    def show_models(self, options: list[tuple[str, str]]) -> None:
        if self.gone:  # the picker was closed while the models were listed
            return
        models = self.query_one("#models", OptionList)
        models.clear_options()
        models.add_options([Option(label, id=spec) for spec, label in options])

    @on(Input.Submitted)
    def typed(self, event: Input.Submitted) -> None:
        spec = event.value.strip()
        problem = spec_problem(spec)
        if problem:
            self.query_one("#spec-error", Label).update(Content(problem))
        elif spec:
            self.dismiss(spec)
        else:
            self.query_one("#models").focus()

    @on(OptionList.OptionSelected)
    def picked(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option.id)
