"""
The main screen: N model panes side by side, the prompt editor, the inspector and the status bar.

It owns the panes (adding, loading, moving, removing), the dialogs and the UI timer; what a send, a
regenerate, a fork or a branch means is up to the mode on screen (`..modes`: compare or chat). A send
starts one engine request per pane (from a thread worker, since the first call may import torch), the
engine thread appends tokens to each pane's buffer, and one timer at 25 Hz moves whatever arrived onto
the screen -- never one UI call per token.
"""

from __future__ import annotations

import math
import random

from rich.text import Text
from textual import on, work
from textual.binding import Binding
from textual.containers import Container
from textual.screen import Screen
from textual.widgets import Header, Static

from ...commands.common import resolve_device, torch_dtype
from ..colors import MODES, legend
from ..cross_score import cross_score
from ..modes.base import Mode, one_line
from ..modes.chat import ChatMode
from ..modes.compare import CompareMode
from ..state import PaneState, Run, Tok
from ..widgets.footer import FittingFooter
from ..widgets.inspector import TokenInspector
from ..widgets.pane import ModelPane
from ..widgets.prompt import PromptEditor

REFRESH_HZ = 25
MAX_PANES = 6
MIN_PANE_WIDTH = 34
PANE_ROW_HEIGHT = 12  # rows a row of panes needs to show a few lines of tokens
OTHER_ROWS = 8  # the title, status bar, prompt and footer
SHORT_SCREEN = 32  # rows: below this the prompt and the inspector take less room, the panes keep theirs


class MainScreen(Screen):
    BINDINGS = [
        Binding("escape", "stop", "Stop"),
        Binding("ctrl+r", "regenerate", "Regenerate"),
        Binding("ctrl+n", "new_seed", "New seed"),
        Binding("ctrl+t", "colours", "Colours"),
        Binding("ctrl+o", "add_pane", "Add model"),
        Binding("ctrl+s", "settings", "Settings"),
        Binding("ctrl+g", "toggle_chat", "Chat/compare"),
        Binding("ctrl+f", "edit_last", "Edit last msg"),
        Binding("ctrl+l", "sessions", "Sessions"),
        Binding("ctrl+b", "export", "Export .md"),
        Binding("f1", "app.help", "Help"),
    ]

    def __init__(self, initial: list[PaneState] | None):
        super().__init__()
        self.initial = initial
        self.modes: dict[str, Mode] = {"compare": CompareMode(self), "chat": ChatMode(self)}
        self.drafts: dict[tuple, str] = {}  # (session, mode) -> the editor's text when the other mode came on

    def compose(self):
        yield Header()
        yield Container(id="panes")
        yield TokenInspector(id="inspector")
        yield Static(id="statusbar")
        yield PromptEditor(history=self.app.history, id="prompt")
        yield FittingFooter()

    def on_mount(self) -> None:
        self.query_one("#inspector").display = False
        self.query_one("#prompt", PromptEditor).load_text(self.app.prompt)
        self.query_one("#prompt").focus()
        self.set_interval(1 / REFRESH_HZ, self.tick)
        self.update_status()
        if self.initial is None:
            self.call_after_refresh(self.app.discover)
        else:
            for state in self.initial:
                self.add_pane(state)

    # ---- panes

    @property
    def panes(self) -> list[ModelPane]:
        return [p for p in self.query(ModelPane) if not p.removed]

    def room_for_a_pane(self) -> bool:
        if len(self.panes) < MAX_PANES:
            return True
        self.notify(f"at most {MAX_PANES} panes: remove one first (Delete on a pane)", severity="warning")
        return False

    def add_pane(self, state: PaneState) -> ModelPane | None:
        if not self.room_for_a_pane():
            return None
        pane = ModelPane(state)
        pane.chat_mode = self.app.mode == "chat"
        pane.colour_mode = self.app.colour_mode
        self.query_one("#panes").mount(pane)
        self.call_after_refresh(self.layout_panes)
        # after the first paint: importing torch in a worker would otherwise compete with it for the GIL
        self.call_after_refresh(self.load_pane, pane)
        return pane

    def layout_panes(self) -> None:
        """
        Side by side when wide; when narrow, a grid with rows as even as can be (six panes: 3+3, never 5+1),
        and no more rows than the window's height gives room for.
        """
        n = max(1, len(self.panes))
        grid = self.query_one("#panes")
        fit_cols = max(1, self.size.width // MIN_PANE_WIDTH)
        fit_rows = max(1, (self.size.height - OTHER_ROWS) // PANE_ROW_HEIGHT)
        rows = min(math.ceil(n / fit_cols), fit_rows)
        grid.styles.grid_size_columns = math.ceil(n / rows)
        grid.styles.grid_size_rows = rows

    def on_resize(self) -> None:
        short = self.size.height < SHORT_SCREEN
        self.set_class(short, "-short")
        self.query_one("#inspector", TokenInspector).compact = short
        self.layout_panes()
        self.show_inspector()

    @work(thread=True, group="load")
    def load_pane(self, pane: ModelPane) -> None:
        """Load the pane's model in a thread; its one-line error stays in the pane if it fails."""
        try:
            pane.status = "starting the engine…"
            pane.dirty = True
            engine = self.app.get_engine()
            pane.status = f"loading {pane.state.spec}…"
            pane.dirty = True
            device = resolve_device(self.app.device)
            pane.lm = engine.load(pane.state.spec, device=device, dtype=torch_dtype(self.app.dtype, device),
                                  progress=progress_class(pane))
            pane.status = "loaded"
        except Exception as e:  # any failure belongs to this pane only
            pane.error = one_line(e)
        pane.dirty = True
        self.app.call_from_thread(self.pane_loaded, pane)

    def pane_loaded(self, pane: ModelPane) -> None:
        if pane.removed:  # removed (or its session replaced) while it loaded: nothing left to update
            return
        if pane.lm is not None and pane.waiting_prompt is not None:
            waiting, pane.waiting_prompt = pane.waiting_prompt, None
            self.mode.resume(pane, waiting)
        pane.refresh_view()
        self.mark_divergence()  # a reopened session's panes get their markers once their models are in

    # ---- the UI timer: engine output onto the screen

    def tick(self) -> None:
        finished = False
        for pane in self.panes:
            changed = pane.dirty
            pane.dirty = False
            for run, infos in pane.drain():
                run.toks.extend(Tok.from_info(i) for i in infos)
                changed = True
            for run, req in list(pane.active):
                run.context_used = req.context_used
                run.tok_per_s = req.tokens_per_second or run.tok_per_s
                if req.done:
                    self.finalize(pane, run, req)
                    finished = changed = True
            if changed:
                pane.refresh_view(scroll=pane.cursor is None)
        if finished:
            self.mark_divergence()
            self.app.save_session()
            self.show_inspector()
            self.update_status()

    def finalize(self, pane: ModelPane, run: Run, req) -> None:
        with pane.lock:
            pane.active.remove((run, req))
        streamed = run.toks
        # the request is the authority: tokens inside a stop string were taken back
        run.toks = run.toks[:run.prefix_len] + [Tok.from_info(i) for i in req.tokens]
        run.finish_reason = req.finish_reason
        run.error = req.error
        run.slides = req.window_slides + (1 if req.prompt_truncated else 0)
        run.tok_per_s = req.tokens_per_second
        # the answer in the conversation is this run's, unless another version was chosen meanwhile
        if run.chat and pane.state.chat and pane.state.chat[-1].toks is streamed:
            answer = pane.state.chat[-1]
            answer.toks = run.toks
            answer.content = "".join(t.text for t in run.toks[:run.prefix_len]) + req.text  # a fork's kept prefix

    # ---- sending and generating: the mode on screen decides what a send means

    @property
    def mode(self) -> Mode:
        return self.modes[self.app.mode]

    @on(PromptEditor.Submitted)
    def submitted(self, message: PromptEditor.Submitted) -> None:
        self.send(message.text)

    def any_model(self) -> bool:
        """Some pane has its model or is still loading it; if none, say so (a send would do nothing)."""
        if any(p.error is None for p in self.panes):
            return True
        self.notify("no model is loaded: add one with Ctrl+O", severity="warning")
        return False

    def send(self, text: str) -> None:
        if self.any_model():  # else the text stays in the editor
            self.mode.send(text)

    def action_stop(self) -> None:
        """Esc: stop every pane's generation."""
        for pane in self.panes:
            pane.waiting_prompt = None
            with pane.lock:
                for _, req in pane.active:
                    req.cancel()

    def action_regenerate(self) -> None:
        if self.any_model():
            self.mode.regenerate()

    def action_new_seed(self) -> None:
        self.app.settings.seed = random.randrange(2**31)
        self.update_status()
        self.action_regenerate()

    def action_colours(self) -> None:
        self.app.colour_mode = MODES[(MODES.index(self.app.colour_mode) + 1) % len(MODES)]
        for pane in self.panes:
            pane.colour_mode = self.app.colour_mode
        self.update_status()

    def action_edit_last(self) -> None:
        self.modes["chat"].edit_last()

    def check_action(self, action: str, parameters) -> bool | None:
        if action == "edit_last":
            return self.app.mode == "chat"
        return True

    def action_toggle_chat(self) -> None:
        """
        Each mode keeps its own state: the branch each pane shows (so no compare figures in a chat header)
        and the text in the editor (the compare prompt is not a chat message); switching back restores them.
        """
        self.action_stop()
        leaving = self.app.mode
        self.app.mode = entering = "compare" if leaving == "chat" else "chat"
        editor = self.query_one("#prompt", PromptEditor)
        session = self.app.session_name  # a draft belongs to the session it was typed in
        self.drafts[session, leaving] = editor.text
        editor.load_text(self.drafts.pop((session, entering), self.app.prompt if entering == "compare" else ""))
        editor.focus()  # the next thing typed is for the mode just entered, not a pane's keys
        for pane in self.panes:
            pane.state.switch_mode(leaving, entering)
            pane.chat_mode = entering == "chat"
            pane.cursor = None
            pane.refresh_view()
        self.mark_divergence()
        self.show_inspector()
        self.refresh_bindings()
        self.update_status()
        self.app.save_session()

    def mark_divergence(self) -> None:
        self.mode.mark_divergence()

    # ---- pane actions (messages up from the panes)

    @on(ModelPane.CursorMoved)
    def cursor_moved(self, message: ModelPane.CursorMoved) -> None:
        self.show_inspector(message.pane)

    def show_inspector(self, pane: ModelPane | None = None) -> None:
        pane = pane or (self.focused if isinstance(self.focused, ModelPane) else None)
        self.query_one("#inspector", TokenInspector).show(pane)

    def on_descendant_focus(self, event) -> None:
        self.show_inspector()

    @on(ModelPane.Action)
    def pane_action(self, message: ModelPane.Action) -> None:
        # call_next: some pane actions are async (removing a pane awaits its removal)
        self.call_next(getattr(self, f"pane_{message.action}"), message.pane, message.arg)

    def pane_fork(self, pane: ModelPane, k: int | None) -> None:
        self.mode.fork_at_cursor(pane, k)

    def pane_branches(self, pane: ModelPane, _=None) -> None:
        self.mode.show_branches(pane)

    def pane_copy(self, pane: ModelPane, _=None) -> None:
        if pane.state.run is None:
            return
        text = self.mode.transcript(pane)
        self.app.copy_to_clipboard(text)  # OSC 52: works over SSH in terminals that allow it
        self.notify(f"copied {len(text)} characters from {pane.state.spec}")

    def pane_gen_command(self, pane: ModelPane, _=None) -> None:
        from ..sessions import gen_command
        from ..state import Settings

        run = pane.state.run
        settings = Settings.from_dict(run.settings) if run else self.app.settings.merged(pane.state.overrides)
        command = gen_command(pane.exact_spec, run.prompt if run else self.app.prompt, settings, pane.precision,
                              chat=self.app.mode == "chat")
        self.app.copy_to_clipboard(command)
        self.notify(command, title="copied the gen command line", timeout=8)

    def pane_move(self, pane: ModelPane, delta: int) -> None:
        panes = self.panes
        i = panes.index(pane)
        j = i + delta
        if 0 <= j < len(panes):
            container = self.query_one("#panes")
            if delta < 0:
                container.move_child(pane, before=panes[j])
            else:
                container.move_child(pane, after=panes[j])
            self.app.save_session()

    def pane_remove(self, pane: ModelPane, _=None) -> None:
        """Asks first: the removal is saved with the session, and no single key may do that by accident."""
        from .dialogs import ConfirmScreen

        async def confirmed(yes: bool | None) -> None:
            if yes and not pane.removed:
                await self.remove_panes([pane])
                self.app.save_session()

        self.app.push_screen(ConfirmScreen(f"Remove the pane {pane.state.spec} and its runs from the session?"),
                             confirmed)

    @on(ModelPane.Typed)
    def typed_on_pane(self, message: ModelPane.Typed) -> None:
        """Text typed while a pane had focus belongs in the prompt: it goes there, and so does the focus."""
        editor = self.query_one("#prompt", PromptEditor)
        editor.focus()
        editor.insert(message.text)

    async def remove_panes(self, panes: list[ModelPane]) -> None:
        """Stop their generation and take them off the screen; awaited, so they no longer count as panes."""
        for pane in panes:
            pane.removed = True  # its load or generation may still report: the pane must not redraw
            pane.waiting_prompt = None
            with pane.lock:
                for _, req in pane.active:
                    req.cancel()
        await self.query_one("#panes").remove_children(panes)
        self.layout_panes()

    def pane_pane_settings(self, pane: ModelPane, _=None) -> None:
        self.open_settings(pane)

    def pane_cross_score(self, pane: ModelPane, _=None) -> None:
        cross_score(self, pane)

    # ---- dialogs

    def action_add_pane(self) -> None:
        from .picker import ModelPicker

        def picked(spec: str | None) -> None:
            if spec:
                self.add_pane(PaneState(spec))
                self.app.save_session()

        if self.room_for_a_pane():  # before the picker, not after a pick that cannot be added
            self.app.push_screen(ModelPicker(), picked)

    def action_settings(self) -> None:
        pane = self.focused if isinstance(self.focused, ModelPane) else None
        self.open_settings(pane)

    def open_settings(self, pane: ModelPane | None) -> None:
        from .settings import SettingsScreen

        def done(result) -> None:
            if result is None or (pane is not None and pane.removed):
                return
            if pane is None:
                self.app.settings = result
            else:
                pane.state.overrides = result
                pane.refresh_view()
            self.update_status()
            self.app.save_session()

        self.app.push_screen(SettingsScreen(self.app.settings, pane.state if pane else None), done)

    def action_sessions(self) -> None:
        from .dialogs import SessionsScreen

        async def chosen(name: str | None) -> None:
            if name:
                await self.app.open_session(name)

        self.app.push_screen(SessionsScreen(), chosen)

    def action_export(self) -> None:
        try:
            path = self.app.export_markdown()
        except OSError as e:  # a read-only or full working directory
            self.notify(f"could not export the session: {e}", severity="error")
            return
        self.notify(f"exported to {path}", title="Markdown export")

    def update_status(self) -> None:
        app = self.app
        text = Text()
        text.append(f" {app.mode} ", "reverse bold")
        text.append(f"  seed {app.settings.seed}  ", "bold")
        text.append(app.settings.summary(), "dim")
        text.append("   ")
        text.append_text(legend(app.colour_mode))
        self.query_one("#statusbar", Static).update(text)
        self.sub_title = f"session {app.session_name}"


def progress_class(pane: ModelPane):
    """A tqdm class that writes a Hub download's progress (bytes, speed) into the pane's status line."""
    import io

    from tqdm import tqdm

    class PaneProgress(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs.pop("name", None)  # huggingface_hub passes a logger name tqdm does not know
            kwargs["file"] = io.StringIO()
            kwargs["disable"] = False
            super().__init__(*args, **kwargs)

        def display(self, msg=None, pos=None):
            pane.status = "downloading " + self.format_meter(**self.format_dict)
            pane.dirty = True
            return True

    return PaneProgress
