"""Small modal screens: branches, cross-scoring results, the session picker, help, a pane's actions.

Text the code did not write (specs, token texts, paths, session names) goes in as plain text:
`Content(...)` for labels, `Text(...)` for Rich table cells, plain-text option lists.
"""

from __future__ import annotations

from dataclasses import dataclass

from rich.table import Table
from rich.text import Text
from textual import on
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.content import Content
from textual.widgets import Label, Markdown, Static
from textual.widgets.option_list import Option

from ..state import PaneState, Tok, format_perplexity, perplexity
from ..widgets.inspector import prob
from ..widgets.options import OptionList
from .base import Dialog


class BranchesScreen(Dialog[int | None]):
    """The runs of a pane the mode on screen can show (`runs`: indices), main and forks as a tree by indentation."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Close")]

    def __init__(self, pane: PaneState, runs: list[int]):
        super().__init__()
        self.pane = pane
        self.runs = set(runs)

    def compose(self):
        with Vertical(classes="dialog", id="branches"):
            yield Label(Content(f"Branches of {self.pane.spec}"), classes="dialog-title")
            yield OptionList(*[Option(self.label(i), id=str(i)) for i in self.order()], id="branch-list")
            yield Label("Enter: show that branch · Esc: close", classes="dim")

    def order(self) -> list[int]:
        """Runs depth-first, children after their parent."""
        children: dict[int | None, list[int]] = {}
        for i in sorted(self.runs):
            parent = self.pane.runs[i].parent
            children.setdefault(parent if parent in self.runs else None, []).append(i)
        out: list[int] = []

        def visit(i: int) -> None:
            out.append(i)
            for c in children.get(i, []):
                visit(c)

        for root in children.get(None, []):
            visit(root)
        return out

    def depth(self, i: int) -> int:
        d, run = 0, self.pane.runs[i]
        while run.parent in self.runs:
            d, run = d + 1, self.pane.runs[run.parent]
        return d

    def label(self, i: int) -> Text:
        run = self.pane.runs[i]
        text = Text("  " * self.depth(i) + ("● " if i == self.pane.current else "○ "))
        if run.parent is None:
            text.append(f"{i + 1}: {run.prompt[:24]!r} ", "bold")
        else:
            chosen = run.toks[run.fork_at].text if run.fork_at is not None and run.fork_at < len(run.toks) else "?"
            text.append(f"{i + 1}: fork at token {run.fork_at} → {chosen!r} ", "bold")
        text.append(repr(run.text[-40:]), "dim")
        return text

    def on_mount(self) -> None:
        options = self.query_one(OptionList)
        options.highlighted = self.order().index(self.pane.current)
        options.focus()

    @on(OptionList.OptionSelected)
    def picked(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(int(event.option.id))


@dataclass
class CrossScore:
    model: str
    toks: list[Tok] | None  # the completion scored by this model
    skipped: str = ""


class CrossScoreScreen(Dialog[None]):
    """One pane's completion scored under every other model: perplexities and the biggest disagreements."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Close")]

    def __init__(self, source: str, toks: list[Tok], results: list[CrossScore], top: int = 5):
        super().__init__()
        self.source, self.toks, self.results, self.top = source, toks, results, top

    def compose(self):
        with Vertical(classes="dialog", id="cross"):
            yield Label(Content(f"{self.source}'s completion under every model"), classes="dialog-title")
            with VerticalScroll():
                yield Static(self.table())
            yield Label("Esc: close", classes="dim")

    def table(self):
        ppl = Table(title="perplexity of the completion", title_justify="left")
        ppl.add_column("model")
        ppl.add_column("perplexity", justify="right")
        ppl.add_row(Text(f"{self.source} (its own)"), format_perplexity(perplexity(self.toks)))
        grid = Table.grid(padding=(1, 0))
        grid.add_row(ppl)
        for r in self.results:
            if r.toks is None:
                ppl.add_row(Text(r.model), Text(r.skipped))
                continue
            ppl.add_row(Text(r.model), format_perplexity(perplexity(r.toks)))
            grid.add_row(self.disagreements(r))
        return grid

    def disagreements(self, r: CrossScore) -> Table:
        """Positions where the two models' log-probabilities of the token differ most."""
        gaps = sorted(range(len(self.toks)), key=lambda i: -abs(self.toks[i].logprob - r.toks[i].logprob))
        t = Table(title=Text(f"where {r.model} disagrees most with {self.source}"), title_justify="left")
        t.add_column("pos", justify="right")
        t.add_column("token")
        for model in (self.source, r.model):
            t.add_column(Text(f"p {model}"), justify="right")
        for i in gaps[:self.top]:
            t.add_row(str(i), Text(repr(self.toks[i].text)), prob(self.toks[i].logprob), prob(r.toks[i].logprob))
        return t


class SessionsScreen(Dialog[str | None]):
    BINDINGS = [Binding("escape", "dismiss(None)", "Close")]

    def compose(self):
        from ..sessions import session_summaries, sessions_dir

        sessions = session_summaries()  # each: age · mode · models · first prompt, as plain text
        with Vertical(classes="dialog", id="sessions"):
            yield Label(Content(f"Saved sessions in {sessions_dir()}"), classes="dialog-title")
            if sessions:
                yield OptionList(*[Option(s.label(), id=s.name) for s in sessions], id="session-list")
            else:
                yield Label("no saved sessions yet: they save themselves after every generation")
            yield Label("Enter: open · Esc: close", classes="dim")

    @on(OptionList.OptionSelected)
    def picked(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option.id)


HELP = """\
# nanoplay playground

Type a prompt and press **Enter**: every pane generates from it at once, with the same seed and
settings (the panes differ only by model). **Ctrl+J** inserts a newline; **↑/↓** walk the prompt history.

| key | action |
| --- | --- |
| Enter | send the prompt (compare) / the message (chat) |
| Esc | stop all generation |
| Ctrl+R | regenerate with the same seed |
| Ctrl+N | new seed, then regenerate |
| Ctrl+T | token colours: off → probability → entropy |
| Ctrl+O | add a model pane (picker) |
| Ctrl+S | sampling settings (on a focused pane: its overrides) |
| Ctrl+G | switch compare / chat mode |
| Ctrl+F | chat: edit and resend the last message |
| Ctrl+L | open a saved session |
| Ctrl+B | export the session to Markdown |
| Ctrl+P | command palette (every action) |
| Tab | move focus between the prompt and the panes |
| Ctrl+C / Ctrl+Q | quit |

On a focused pane (text typed there goes to the prompt; no letter acts on the pane by itself):

| key | action |
| --- | --- |
| ← → Home End, click | move the token cursor; the inspector shows the token |
| ↑ ↓ PgUp PgDn | scroll the pane |
| 1-9 | while the cursor is shown: fork from it with that alternative |
| Enter | the pane's menu: f fork with the next best, b branches, x cross-score, y copy its text, g copy the `nanoplay gen` command, s its overrides, [ ] move it, d remove it |
| Shift+← Shift+→ | move the pane left / right |
| Delete | remove the pane (asks first) |

Colours: probability bins are log-spaced (≥.5, ≥.1, ≥.01, ≥.001, below); entropy is in nats.
The pane header shows tokens, decode tok/s, perplexity of the completion (and of the prompt),
context used / context length, and ⟲slid when the context window slid.
"""


class HelpScreen(Dialog[None]):
    BINDINGS = [Binding("escape,f1,q", "dismiss(None)", "Close")]

    def compose(self):
        with VerticalScroll(classes="dialog", id="help"):
            yield Markdown(HELP)


# (key, pane action[:argument], what it does): Enter on a pane lists them; letters typed on the pane itself
# go to the prompt, so a pane's actions are a deliberate second key here, never a stray letter of a message
PANE_ACTIONS = [
    ("f", "fork", "fork at the cursor with the most likely alternative"),
    ("b", "branches", "branches of this pane"),
    ("x", "cross_score", "cross-score its completion under every other model"),
    ("y", "copy", "copy its text (terminal clipboard)"),
    ("g", "gen_command", "copy the equivalent `nanoplay gen` command line"),
    ("s", "pane_settings", "its sampling overrides"),
    ("[", "move:-1", "move it left"),
    ("]", "move:1", "move it right"),
    ("d", "remove", "remove it (asks first)"),
]


class PaneMenu(Dialog[str | None]):
    """A pane's actions (Enter on a pane): a letter or Enter on the highlighted one picks; Esc closes."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Close")] + [
        Binding(key, f"dismiss({action!r})", show=False) for key, action, _ in PANE_ACTIONS]

    def __init__(self, spec: str):
        super().__init__()
        self.spec = spec

    def compose(self):
        with Vertical(classes="dialog", id="pane-menu"):
            yield Label(Content(f"Pane {self.spec}"), classes="dialog-title")
            yield OptionList(*[Option(Text.assemble((f" {key} ", "bold reverse"), f"  {label}"), id=action)
                               for key, action, label in PANE_ACTIONS], id="pane-actions")
            yield Label("a letter or Enter: do it · Esc: close", classes="dim")

    def on_mount(self) -> None:
        self.query_one(OptionList).focus()

    @on(OptionList.OptionSelected)
    def picked(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option.id)


class ConfirmScreen(Dialog[bool]):
    """A yes/no question about something that cannot be taken back: Enter or y confirms, Esc or n keeps."""

    BINDINGS = [Binding("escape,n", "dismiss(False)", "Keep"), Binding("enter,y", "dismiss(True)", "Confirm")]

    def __init__(self, question: str):
        super().__init__()
        self.question = question

    def compose(self):
        with Vertical(classes="dialog", id="confirm"):
            yield Label(Content(self.question), classes="dialog-title")
            yield Label("Enter or y: yes · Esc or n: no", classes="dim")
