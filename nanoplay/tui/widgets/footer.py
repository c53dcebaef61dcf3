"""
The key footer, fitted to the window: Textual's Footer shows every binding and lets the last ones run
under the command palette's key (docked right) when they do not fit. This one shows, in order, only the
keys that fit beside it; every action stays in the palette (Ctrl+P) and the help (F1).
"""

from __future__ import annotations

from rich.cells import cell_len
from textual.widgets import Footer
from textual.widgets._footer import FooterKey


def key_width(key: FooterKey) -> int:
    """Cells a FooterKey takes: its key with a space each side, its description and a space after it."""
    return cell_len(key.key_display) + 2 + (cell_len(key.description) + 1 if key.description else 0)


class FittingFooter(Footer):
    def compose(self):
        keys = list(super().compose())  # the bindings in Textual's order (focused widget's first), then the palette's
        palette = [k for k in keys if k.has_class("-command-palette")]
        room = self.size.width - sum(key_width(k) + 2 for k in palette)  # its left border and right padding
        for key in keys:
            if key in palette:
                continue
            if self.size.width and key_width(key) > room:
                break  # the rest are further down the list: less used
            room -= key_width(key)
            yield key
        yield from palette

    def on_resize(self) -> None:
        self.call_after_refresh(self.recompose)  # which keys fit depends on the width
