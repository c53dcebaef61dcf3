"""
A model pane: header (model and live statistics), the tokens (coloured on demand, with a cursor),
and a status line (load progress, errors, branch).

Attributes down: the app sets `colour_mode`, `diverge_at` and the state, then calls `refresh_view()`.
Messages up: cursor moves, forks, copy and the other pane actions are posted for the app to act on.
"""

from __future__ import annotations

import threading

from rich.style import Style
from rich.text import Text
from textual import events
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.geometry import Region
from textual.content import Content
from textual.message import Message
from textual.reactive import reactive
from textual.widgets import Static

from ..colors import token_style
from ..state import PaneState, Run, Tok, format_perplexity

SHORT_PANE = 12  # rows: a pane lower than this has a one-line header, so its tokens keep some room
CURSOR = Style(color="black", bgcolor="bright_white", bold=True, underline=True)
DIVERGE = Style(underline=True, bold=True, color="magenta")


def human_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def flow(parts: list[Text], width: int) -> Text:
    """
    Parts, each led by its separator (" · "), on as few lines as fit `width`: a line breaks before a part,
    never inside one (a wrap at any space would cut "ctx 107/128" in two), and starts without the separator.
    """
    lines = [Text()]
    for part in parts:
        if width and lines[-1].cell_len and lines[-1].cell_len + part.cell_len > width:
            lines.append(Text())
        if not lines[-1].cell_len:
            part = part[len(part.plain) - len(part.plain.lstrip(" ·")):]
        lines[-1].append_text(part)
    return Text("\n").join(lines)


def fit(parts: list[Text], width: int) -> Text:
    """Parts, each led by its separator, on one line: those that do not fit `width` are left out, from the
    first that does not on (they come in order of importance); the line never wraps a part in two."""
    line = Text()
    for part in parts:
        if not line.cell_len:
            part = part[len(part.plain) - len(part.plain.lstrip(" ·")):]
        if width and line.cell_len + part.cell_len > width:
            break
        line.append_text(part)
    return line


def visible(text: str) -> str:
    """Token text with newlines kept but shown, so a cursor on a newline token is visible."""
    return text.replace("\n", "↵\n") if text.strip("\n") == "" and text else text


class TokenView(Static):
    """The pane's tokens as one Text; every token span carries its index for mouse clicks."""

    class Clicked(Message):
        def __init__(self, index: int):
            super().__init__()
            self.index = index

    def on_click(self, event: events.Click) -> None:
        index = event.style.meta.get("tok") if event.style else None
        if index is not None:
            self.post_message(self.Clicked(index))


class ModelPane(Vertical, can_focus=True):
    """One model's view. `state` holds what is saved; the rest is live."""

    BINDINGS = [
        Binding("left", "cursor(-1)", "Prev token", show=False),
        Binding("right", "cursor(1)", "Next token", show=False),
        Binding("home", "cursor_to(0)", "First token", show=False),
        Binding("end", "cursor_to(-1)", "Last token", show=False),
        Binding("up", "scroll(-1)", "Scroll up", show=False),
        Binding("down", "scroll(1)", "Scroll down", show=False),
        Binding("pageup", "scroll(-10)", "Page up", show=False),
        Binding("pagedown", "scroll(10)", "Page down", show=False),
        # no printable key here: text typed on a pane goes to the prompt (on_key); its actions are a menu
        Binding("enter", "menu", "Pane actions"),
        Binding("shift+left", "move(-1)", "Move left", show=False),
        Binding("shift+right", "move(1)", "Move right", show=False),
        Binding("delete", "remove", "Remove pane"),
    ]

    colour_mode = reactive("off", init=False)
    cursor: int | None = None  # index into display_toks()
    cursor_end: int | None = None  # offset in body_text() where the cursor's token ends

    class Action(Message):
        """A pane asks the app to do something with it: fork, copy, branches, cross_score..."""

        def __init__(self, pane: "ModelPane", action: str, arg=None):
            super().__init__()
            self.pane = pane
            self.action = action
            self.arg = arg

    class Typed(Message):
        """Printable text typed while the pane had focus: it belongs in the prompt."""

        def __init__(self, pane: "ModelPane", text: str):
            super().__init__()
            self.pane = pane
            self.text = text

    class CursorMoved(Message):
        def __init__(self, pane: "ModelPane"):
            super().__init__()
            self.pane = pane

    def __init__(self, state: PaneState, **kwargs):
        super().__init__(**kwargs)
        self.state = state
        self.lm = None  # LoadedModel once loaded
        self.error: str | None = None
        self.status = "queued for loading…"
        self.chat_mode = False
        self.diverge_at: int | None = None  # completion index where this pane departs from the first pane
        self.waiting_prompt: str | None = None  # submitted while the model was still loading
        self.dirty = False  # set from any thread; the UI timer refreshes the pane
        self.removed = False  # set by the app as it removes the pane: its parts go first, then the pane
        self.lock = threading.Lock()
        self.active: list = []  # (run, engine request) pairs in flight
        self.pending: list = []  # (run, [TokenInfo]) from the engine thread, drained by the UI timer
        self.border_title = Content(state.spec)  # a str border title would be read as markup

    def compose(self):
        yield Static(id="pane-header", classes="pane-header")
        # the pane takes the keys and scrolls its body itself: one Tab stop per pane, not two
        with VerticalScroll(classes="pane-body", can_focus=False):
            yield TokenView(id="tokens")
        yield Static(id="pane-status", classes="pane-status")

    def on_mount(self) -> None:
        # the UI timer draws the pane: refresh_view() cannot yet (is_mounted turns true after on_mount),
        # and a timer tick may already have taken the dirty mark of a state set before mounting
        self.dirty = True

    # ---- engine side: called from the engine thread, touches only the lock-protected buffer

    def push(self, run: Run, infos: list) -> None:
        if infos:
            with self.lock:
                self.pending.append((run, infos))

    def drain(self) -> list:
        with self.lock:
            out, self.pending = self.pending, []
        return out

    # ---- what is shown

    @property
    def loaded(self) -> bool:
        return self.lm is not None

    @property
    def busy(self) -> bool:
        return bool(self.active)

    @property
    def exact_spec(self) -> str:
        """The spec that reloads this very model: a checkpoint run's step pinned (demo -> demo@300)."""
        if self.lm is not None and self.lm.name.startswith(self.state.spec + "@"):
            return self.lm.name
        return self.state.spec

    @property
    def precision(self) -> str:
        """Its model's precision as --dtype names it ("fp32", "bf16", "int8"), or before it loads the
        app's --dtype ("auto" too)."""
        return self.lm.precision if self.lm is not None else self.app.dtype

    def display_toks(self) -> list[Tok]:
        """The tokens the cursor moves over: prompt and completion, or in chat mode every answer."""
        if self.chat_mode:
            return [t for m in self.state.chat if m.role == "assistant" for t in m.toks]
        run = self.state.run
        if run is None:
            return []
        return run.prompt_toks + run.toks

    def cursor_tok(self) -> tuple[Tok, bool, int] | None:
        """(token, is_prompt, index in its completion or chat answer) under the cursor."""
        toks = self.display_toks()
        if self.cursor is None or not toks:
            return None
        i = min(self.cursor, len(toks) - 1)
        if self.chat_mode:
            for m in self.state.chat:
                if m.role == "assistant":
                    if i < len(m.toks):
                        return m.toks[i], False, i
                    i -= len(m.toks)
        n_prompt = len(toks) - len(self.state.run.toks)
        return toks[i], i < n_prompt, i - n_prompt

    def can_fork_at_cursor(self) -> bool:
        """A completion token is under the cursor; in chat mode, one of the latest answer."""
        found = self.cursor_tok()
        if found is None or found[1] or self.lm is None:
            return False
        if not self.chat_mode:
            return True
        last = self.state.chat[-1]
        return last.role == "assistant" and self.cursor >= len(self.display_toks()) - len(last.toks)

    def header_text(self, width: int = 0, short: bool = False) -> Text:
        """
        The model line and the statistics line, each broken between its items to fit `width` (0: no limit).
        `short` (a pane with few rows): one line, the model's name then as many statistics as fit.
        """
        lm, run = self.lm, self.state.run
        model = [Text(self.state.spec if lm is None else lm.name, "bold")]
        if lm is not None:
            dtype = lm.precision  # as --dtype, gen's JSON and the copied gen command name it
            model += [Text(f"  {human_count(lm.num_params)} params", "dim"), Text(f" · {lm.device.type}/{dtype}", "dim")]
        if lm is not None:  # what loading assumed (a nanoGPT checkpoint's GELU, say)
            model += [Text(f"  {note}", "italic yellow") for note in lm.notes]
        if self.state.overrides:
            model.append(Text("  overrides", "italic yellow"))
        if self.chat_mode and lm is not None and not lm.chat_template:
            model.append(Text("  plain-text chat (not chat-tuned)", "italic"))
        stats = []
        if run is not None:
            stats.append(Text(f"{len(run.toks)} tok"))
            if run.tok_per_s:
                stats.append(Text(f" · {run.tok_per_s:.0f} tok/s"))
            if run.perplexity is not None:
                stats.append(Text(f" · ppl {format_perplexity(run.perplexity)}"))
            if run.prompt_perplexity is not None and not run.chat:
                stats.append(Text(f" (prompt {format_perplexity(run.prompt_perplexity)})", "dim"))
            if lm is not None:
                used = run.context_used or len(run.prompt_ids) + len(run.toks)
                stats.append(Text(f" · ctx {min(used, lm.config.block_size)}/{lm.config.block_size}"))
            if run.slides:
                stats.append(Text(" ⟲slid", "bold yellow"))
            if self.diverge_at is not None:
                stats.append(Text(f" · diverges @{self.diverge_at}", "magenta"))
        elif lm is not None:
            stats.append(Text(f"ctx {lm.config.block_size}", "dim"))
        if short:
            return fit(model[:1] + [Text(" · ") + s if not s.plain.startswith(" ") else s for s in stats], width)
        return Text("\n").join([flow(model, width), flow(stats, width)])

    def body_text(self) -> Text:
        run = self.state.run
        text = Text()
        self.cursor_end = None  # where the cursor's token ends in the text, for scrolling it into view
        if self.error:  # whole and wrapped here, where the pane has room (and scrolls); the status line cuts it
            text.append("✗ " + self.error, "bold red")
            return text
        if self.chat_mode:
            self._chat_text(text)
            return text
        if run is None:
            if self.loaded:
                text.append("ready: type a prompt below and press Enter", "dim")
            return text
        toks = self.display_toks()
        if not run.prompt_toks:  # prompt not scored (yet): plain
            text.append(run.prompt, "bold")
        n_prompt = len(run.prompt_toks)
        for i, tok in enumerate(toks):
            is_prompt = i < n_prompt
            style = token_style(tok, self.colour_mode) or Style(bold=is_prompt)
            if not is_prompt and run.fork_at is not None and i - n_prompt == run.fork_at:
                style += Style(underline=True)
            if not is_prompt and self.diverge_at is not None and i - n_prompt == self.diverge_at:
                style += DIVERGE
            if i == self.cursor:
                style += CURSOR
            text.append(visible(tok.text), style + Style(meta={"tok": i}))
            if i == self.cursor:
                self.cursor_end = len(text)
        if self.busy:
            text.append("▌")
        if run.error:
            text.append("\n✗ " + run.error, "bold red")
        return text

    def _chat_text(self, text: Text) -> None:
        """The whole conversation; the turns it outgrew stay, dimmed, under an "outside the context" mark."""
        run = self.state.run
        chat, start = self.state.chat, self.state.context_start
        if start:
            text.append(f"⋯ outside the context: {self.state.turns_outside_context} earlier turn(s) "
                        "the model no longer sees\n", "italic yellow")
        index = 0  # of the token across all answers, as display_toks() counts
        for j, m in enumerate(chat):
            if start and j == start:
                text.append("⋯ in the context\n", "italic yellow")
            begin = len(text)
            if m.role == "user":
                text.append("you: ", "bold cyan")
                text.append(m.content + "\n")
            elif m.role == "assistant":
                live = j == len(chat) - 1 and run is not None and m.toks is run.toks
                text.append("model: ", "bold green")
                for tok in m.toks:
                    style = token_style(tok, self.colour_mode) or Style()
                    if index == self.cursor:
                        style += CURSOR
                    text.append(visible(tok.text), style + Style(meta={"tok": index}))
                    if index == self.cursor:
                        self.cursor_end = len(text)
                    index += 1
                if not m.toks:
                    text.append(m.content)
                if live and self.busy:
                    text.append("▌")
                text.append("\n")
            else:
                text.append(f"{m.role}: {m.content}\n", "dim italic")
            if j < start:
                text.stylize("dim", begin, len(text))
        if not chat and self.loaded:
            text.append("ready: say something below and press Enter", "dim")

    def status_text(self, width: int = 0) -> Text:
        """One line (an error is cut here: the body shows it whole); items that do not fit `width` are left out."""
        if self.error:
            return Text("✗ " + self.error, "bold red")
        if not self.loaded:
            return Text(self.status, "italic")
        run = self.state.run
        parts = []
        if run is not None:
            if run.error:
                return Text("✗ " + run.error, "bold red")
            state = "generating…" if self.busy or run.finish_reason is None else f"done: {run.finish_reason}"
            parts.append(Text(state, "italic"))
            if self.chat_mode:  # every turn is a run: count the versions of this answer only
                label = "answer"
                versions = [i for i, r in enumerate(self.state.runs)
                            if r.chat == run.chat and r.prompt_ids == run.prompt_ids]
            else:
                label, versions = "branch", [i for i, r in enumerate(self.state.runs) if not r.chat]
            if len(versions) > 1:
                parts.append(Text(f"  {label} {versions.index(self.state.current) + 1}/{len(versions)}", "cyan"))
            if run.settings:
                parts.append(Text(f"  seed {run.settings.get('seed')}", "dim"))
        return fit(parts, width)

    def refresh_view(self, scroll: bool = False) -> None:
        if not self.is_mounted or self.removed:  # on_mount has the UI timer draw whatever changed before
            return
        header = self.query_one("#pane-header", Static)
        header.update(self.header_text(header.content_size.width, short=0 < self.size.height < SHORT_PANE))
        self.query_one("#tokens", TokenView).update(self.body_text())
        status = self.query_one("#pane-status", Static)
        status.update(self.status_text(status.content_size.width))
        self.set_class(self.error is not None, "-error")
        if scroll:
            self.query_one(VerticalScroll).scroll_end(animate=False)

    def on_resize(self) -> None:
        self.refresh_view()  # the header breaks its lines for the pane's width
        if self.cursor is not None:  # the text re-wraps, and the inspector opening below shrinks the pane
            self.call_after_refresh(self.scroll_to_cursor)

    def watch_colour_mode(self) -> None:
        self.refresh_view()

    # ---- actions

    def on_token_view_clicked(self, message: TokenView.Clicked) -> None:
        self.focus()
        self.cursor = message.index
        self._cursor_changed()

    def action_cursor(self, delta: int) -> None:
        n = len(self.display_toks())
        if not n:
            return
        start = self.cursor if self.cursor is not None else (n if delta < 0 else -1)
        self.cursor = max(0, min(n - 1, start + delta))
        self._cursor_changed()

    def action_scroll(self, lines: int) -> None:
        self.query_one(VerticalScroll).scroll_relative(y=lines, animate=False)

    def action_cursor_to(self, index: int) -> None:
        n = len(self.display_toks())
        if n:
            self.cursor = index % n
            self._cursor_changed()

    def _cursor_changed(self) -> None:
        self.refresh_view()
        self.call_after_refresh(self.scroll_to_cursor)
        self.post_message(self.CursorMoved(self))

    def scroll_to_cursor(self) -> None:
        """Bring the line of the cursor's token into the body's view: a long text would hide it otherwise."""
        width = self.query_one("#tokens", TokenView).content_size.width
        if self.cursor_end is None or not width or not self.is_mounted:
            return
        body = self.body_text()
        line = len(Content(body.plain[:self.cursor_end]).wrap(width)) - 1
        self.query_one(VerticalScroll).scroll_to_region(Region(0, line, 1, 1), animate=False)

    def on_key(self, event: events.Key) -> None:
        """
        The rule for keys on a pane: while its token cursor is shown (the inspector with it), 1-9 fork
        with that alternative; every other printable key is text for the prompt. So a message typed
        while a pane has focus lands in the prompt, never in a pane action.
        """
        char = event.character
        if not event.is_printable or char is None:
            return
        event.stop()
        event.prevent_default()
        if len(char) == 1 and char in "123456789" and self.cursor is not None:
            self.post_message(self.Action(self, "fork", int(char)))
        else:
            self.post_message(self.Typed(self, char))

    def action_menu(self) -> None:
        """Enter: the pane's actions, each on a letter (the letters are safe there: it is a dialog)."""
        from ..screens.dialogs import PaneMenu

        def chosen(choice: str | None) -> None:
            if choice and self.is_attached and not self.removed:
                name, _, arg = choice.partition(":")
                self.post_message(self.Action(self, name, int(arg) if arg else None))

        self.app.push_screen(PaneMenu(self.state.spec), chosen)

    def action_move(self, delta: int) -> None:
        self.post_message(self.Action(self, "move", delta))

    def action_remove(self) -> None:
        self.post_message(self.Action(self, "remove"))

    def start_run(self, run: Run) -> None:
        """A new run becomes the current branch (the request is attached by the app)."""
        self.state.runs.append(run)
        self.state.current = len(self.state.runs) - 1
        self.cursor = None
        self.diverge_at = None
        self.drain()
        self.refresh_view(scroll=True)
