"""The prompt editor: multi-line, Enter sends, history on up/down at the first/last line."""

from __future__ import annotations

from textual import events
from textual.binding import Binding
from textual.message import Message
from textual.widgets import TextArea


class PromptEditor(TextArea):
    BINDINGS = [Binding("ctrl+j,shift+enter", "newline", "Newline", show=False)]

    class Submitted(Message):
        def __init__(self, text: str):
            super().__init__()
            self.text = text

    def __init__(self, history: list[str] | None = None, **kwargs):
        super().__init__(soft_wrap=True, show_line_numbers=False, tab_behavior="focus", **kwargs)
        self.prompt_history: list[str] = history if history is not None else []
        self.history_pos: int | None = None  # None: editing a new prompt

    async def _on_key(self, event: events.Key) -> None:
        if event.key == "enter":
            event.prevent_default()
            event.stop()
            self.post_message(self.Submitted(self.text))
            return
        if event.key == "up" and self.cursor_location[0] == 0 and self.prompt_history:
            event.prevent_default()
            event.stop()
            self.history_pos = len(self.prompt_history) - 1 if self.history_pos is None else max(0, self.history_pos - 1)
            self._show_history()
            return
        if event.key == "down" and self.history_pos is not None and \
                self.cursor_location[0] == self.document.line_count - 1:
            event.prevent_default()
            event.stop()
            self.history_pos += 1
            if self.history_pos >= len(self.prompt_history):
                self.history_pos = None
                self.load_text("")
            else:
                self._show_history()
            return
        await super()._on_key(event)

    def _show_history(self) -> None:
        self.show_text(self.prompt_history[self.history_pos])

    def show_text(self, text: str) -> None:
        """Replace the text, with the cursor at its end (ready to edit on)."""
        self.load_text(text)
        self.move_cursor(self.document.end)

    def action_newline(self) -> None:
        self.insert("\n")

    def remember(self, text: str) -> None:
        if text and (not self.prompt_history or self.prompt_history[-1] != text):
            self.prompt_history.append(text)
        self.history_pos = None
