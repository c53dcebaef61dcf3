"""The token inspector: the token under a pane's cursor, its statistics and its alternatives."""

from __future__ import annotations

import math

from rich.table import Table
from rich.text import Text
from textual.widgets import Static

from ..colors import token_style


def prob(lp: float | None) -> str:
    if lp is None or math.isinf(lp):
        return "0" if lp is not None else "–"
    p = math.exp(lp)
    return f"{p:.1%}" if p >= 0.001 else f"{p:.1e}"


class TokenInspector(Static):
    """
    Shows one token; the app calls `show(pane)` whenever a cursor moves (attributes down). `compact` (a short
    screen): the alternatives share lines instead of a row each, so the panes keep room for the token itself.
    """

    compact = False

    def show(self, pane) -> None:
        found = pane.cursor_tok() if pane is not None else None
        if found is None:
            self.display = False
            return
        tok, is_prompt, index = found
        self.display = True
        self.update(self.render_tok(pane, tok, is_prompt, index))

    def render_tok(self, pane, tok, is_prompt: bool, index: int):
        head = Text()
        head.append(f"{pane.state.spec} ", "bold")
        kind = "prompt token" if is_prompt else f"answer token {index}" if pane.chat_mode else f"completion token {index}"
        head.append(kind, "dim")
        head.append("  ")
        head.append(repr(tok.text), token_style(tok, "probability") or "bold")
        head.append(f"  id {tok.id}")
        if tok.logprob is None:
            head.append("  (not scored)", "dim")
            return head
        head.append(f"  p {prob(tok.logprob)}  logp {tok.logprob:.3f}  rank {tok.rank}  entropy {tok.entropy:.2f} nats")
        if not is_prompt and tok.sampling_logprob is not None:
            head.append(f"  sampling p {prob(tok.sampling_logprob)}")
        if not tok.top:
            return head
        table = Table(box=None, padding=(0, 1), show_edge=False, expand=False)
        table.add_column("key", style="bold cyan")
        table.add_column("alternative")
        table.add_column("raw p", justify="right")
        table.add_column("sampling p", justify="right")
        for k, (tid, text, lp, slp) in enumerate(tok.top, 1):
            marker = "•" if tid == tok.id else ""
            # a token's text is model output: a Text cell, so Rich reads no markup in it
            table.add_row(f"{k}{marker}" if not is_prompt else marker, Text(repr(text)), prob(lp),
                          prob(slp) if not is_prompt else "")
        raw_mass = sum(math.exp(lp) for _, _, lp, _ in tok.top)
        samp_mass = sum(math.exp(slp) for _, _, _, slp in tok.top if not math.isinf(slp))
        cover = Text(f"top {len(tok.top)} cover {raw_mass:.1%} of the raw distribution", "dim")
        if not is_prompt:
            cover.append(f", {samp_mass:.1%} of the sampling one", "dim")
            if pane.can_fork_at_cursor():
                cover.append(f" · press 1-{len(tok.top)} to fork with one", "dim")
        grid = Table.grid()
        grid.add_row(head)
        grid.add_row(self.inline(tok, is_prompt) if self.compact else table)
        grid.add_row(cover)
        return grid

    def inline(self, tok, is_prompt: bool) -> Text:
        """The alternatives one after another: key, text, raw p (/ sampling p); a line breaks between two."""
        from .pane import flow

        parts = []
        for k, (tid, text, lp, slp) in enumerate(tok.top, 1):
            part = Text("   ")
            part.append(("" if is_prompt else str(k)) + ("•" if tid == tok.id else "") + " ", "bold cyan")
            part.append(repr(text))
            part.append(f" {prob(lp)}" + ("" if is_prompt else f"/{prob(slp)}"), "dim")
            parts.append(part)
        return flow(parts, self.content_size.width)
