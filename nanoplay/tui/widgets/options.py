"""
Option lists as the playground uses them: prompts are plain text, and paging never crashes.

Textual 8.2.8's OptionList pages with a line map it builds only once the list has been laid out, so
PageUp/PageDown arriving earlier (Ctrl+P, a letter and PageDown at once) raised KeyError inside
Textual and closed the app. Paging waits for the layout here; the command palette gets the same guard.
"""

from __future__ import annotations

from textual.command import CommandList, CommandPalette
from textual.widgets import OptionList as TextualOptionList

from ..screens.base import DismissOnce


def can_page(options: TextualOptionList) -> bool:
    """Whether `options` has been laid out, so that its paging can find lines (an empty region has none)."""
    return bool(options.scrollable_content_region)


class OptionList(TextualOptionList):
    """An OptionList whose string prompts are plain text (specs, session names, paths: never markup)."""

    def __init__(self, *content, **kwargs):
        kwargs.setdefault("markup", False)
        super().__init__(*content, **kwargs)

    def action_page_up(self) -> None:
        if can_page(self):
            super().action_page_up()

    def action_page_down(self) -> None:
        if can_page(self):
            super().action_page_down()


class Palette(DismissOnce, CommandPalette):
    """Textual's command palette, with its list's paging guarded the same way, dismissed once (Ctrl+P
    and Enter at once closed it twice: the main screen went with it, NoMatches on its next update)."""

    def _action_command_list(self, action: str) -> None:
        if action in ("page_up", "page_down") and not can_page(self.query_one(CommandList)):
            return
        super()._action_command_list(action)
