"""The model picker: local checkpoints (every step), cached Hub models, the GPT-2 family, or any spec."""

from __future__ import annotations

from textual import on, work
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Label, OptionList
from textual.widgets.option_list import Option


class ModelPicker(ModalScreen[str | None]):
    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel")]

    def compose(self):
        with Vertical(classes="dialog", id="picker"):
            yield Label("Add a model pane", classes="dialog-title")
            yield Input(placeholder="any spec: owt-30m@2000, ./ckpt.pt, gpt2-medium, owner/repo", id="spec")
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
        models = self.query_one("#models", OptionList)
        models.clear_options()
        models.add_options([Option(label, id=spec) for spec, label in options])

    @on(Input.Submitted)
    def typed(self, event: Input.Submitted) -> None:
        if event.value.strip():
            self.dismiss(event.value.strip())
        else:
            self.query_one("#models").focus()

    @on(OptionList.OptionSelected)
    def picked(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option.id)
