"""
The main screen: N model panes side by side, the prompt editor, the inspector and the status bar.

It drives generation: a submit starts one engine request per pane (from a thread worker, since the
first call may import torch), the engine thread appends tokens to each pane's buffer, and one timer at
25 Hz moves whatever arrived onto the screen -- never one UI call per token.
"""

from __future__ import annotations

import math
import random

from rich.text import Text
from textual import on, work
from textual.binding import Binding
from textual.containers import Container
from textual.screen import Screen
from textual.widgets import Footer, Header, Static

from ..colors import MODES, legend
from ..state import Message, PaneState, Run, Tok
from ..widgets.inspector import TokenInspector
from ..widgets.pane import ModelPane
from ..widgets.prompt import PromptEditor

REFRESH_HZ = 25
MAX_PANES = 6
MIN_PANE_WIDTH = 34


def one_line(e: Exception) -> str:
    """An unexpected error as one line (NanoplayErrors already are)."""
    from ...errors import NanoplayError

    if isinstance(e, NanoplayError):
        return str(e)
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


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

    def compose(self):
        yield Header()
        yield Container(id="panes")
        yield TokenInspector(id="inspector")
        yield Static(id="statusbar")
        yield PromptEditor(history=self.app.history, id="prompt")
        yield Footer()

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
        self.notify(f"at most {MAX_PANES} panes: remove one first (d on a pane)", severity="warning")
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
        """Side by side when wide, wrapped into a grid when narrow."""
        n = max(1, len(self.panes))
        grid = self.query_one("#panes")
        cols = max(1, min(n, self.size.width // MIN_PANE_WIDTH))
        grid.styles.grid_size_columns = cols
        grid.styles.grid_size_rows = math.ceil(n / cols)

    def on_resize(self) -> None:
        self.layout_panes()

    @work(thread=True, group="load")
    def load_pane(self, pane: ModelPane) -> None:
        """Load the pane's model in a thread; its one-line error stays in the pane if it fails."""
        try:
            pane.status = "starting the engine…"
            pane.dirty = True
            engine = self.app.get_engine()
            pane.status = f"loading {pane.state.spec}…"
            pane.dirty = True
            pane.lm = engine.load(pane.state.spec, device=self.app.device, progress=progress_class(pane))
            pane.status = "loaded"
        except Exception as e:  # any failure belongs to this pane only
            pane.error = one_line(e)
        pane.dirty = True
        self.app.call_from_thread(self.pane_loaded, pane)

    def pane_loaded(self, pane: ModelPane) -> None:
        if pane.lm is not None and pane.waiting_prompt is not None:
            prompt, pane.waiting_prompt = pane.waiting_prompt, None
            if self.app.mode == "chat":
                self.start_chat_turn(pane)
            else:
                self.start_generation(pane, prompt)
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
        # the request is the authority: tokens inside a stop string were taken back
        run.toks = run.toks[:run.prefix_len] + [Tok.from_info(i) for i in req.tokens]
        run.finish_reason = req.finish_reason
        run.error = req.error
        run.slides = req.window_slides + (1 if req.prompt_truncated else 0)
        run.tok_per_s = req.tokens_per_second
        if run.chat and pane.state.chat and pane.state.chat[-1].role == "assistant":
            answer = pane.state.chat[-1]
            answer.toks = run.toks
            answer.content = "".join(t.text for t in run.toks[:run.prefix_len]) + req.text  # a fork's kept prefix

    def mark_divergence(self) -> None:
        """First completion position where each pane departs from the first pane (same vocabulary)."""
        panes = [p for p in self.panes if p.state.run is not None and p.lm is not None and not p.busy]
        for p in self.panes:
            p.diverge_at = None
        if len(panes) < 2 or self.app.mode == "chat":
            return
        ref = panes[0]
        for p in panes[1:]:
            if p.state.run.prompt_ids != ref.state.run.prompt_ids or not shares_vocab(p.lm, ref.lm):
                continue
            a = [t.id for t in ref.state.run.toks]
            b = [t.id for t in p.state.run.toks]
            at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
            if at is None and len(a) != len(b):
                at = min(len(a), len(b))
            p.diverge_at = at
            if at is not None:
                ref.diverge_at = at if ref.diverge_at is None else min(ref.diverge_at, at)
        for p in panes:
            p.refresh_view()

    # ---- generating

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
        if not self.any_model():
            return  # the text stays in the editor
        editor = self.query_one("#prompt", PromptEditor)
        if self.app.mode == "chat":
            if not text.strip():
                return
            editor.remember(text)
            editor.load_text("")
            self.send_chat(text)
        else:
            editor.remember(text)
            self.run_prompt(text)

    def run_prompt(self, prompt: str) -> None:
        self.action_stop()
        self.app.prompt = prompt
        for pane in self.panes:
            if pane.lm is not None:
                self.start_generation(pane, prompt)
            elif pane.error is None:
                pane.waiting_prompt = prompt  # runs as soon as its model is loaded
        self.update_status()

    def start_generation(self, pane: ModelPane, prompt: str, fork: tuple | None = None) -> None:
        """A new run in `pane`; `fork` = (parent index, position, chosen Tok) continues a branch."""
        settings = self.app.settings.merged(pane.state.overrides)
        run = Run(prompt=prompt, settings=settings.to_dict())
        if fork is not None:
            parent_index, at, chosen = fork
            parent = pane.state.runs[parent_index]
            run.prompt_ids, run.prompt_toks = parent.prompt_ids, parent.prompt_toks
            run.toks = parent.toks[:at] + [chosen]
            run.parent, run.fork_at, run.prefix_len = parent_index, at, at + 1
        pane.start_run(run)
        self.submit_worker(pane, run, settings)

    @work(thread=True, group="generate")
    def submit_worker(self, pane: ModelPane, run: Run, settings, stop_ids=(), stop_strings=()) -> None:
        """Tokenize, submit to the engine, then score the prompt for colouring (all off the UI thread)."""
        from ...sampling import SamplingParams
        from ...tokenizer import get_tokenizer

        engine = self.app.get_engine()
        try:
            params = SamplingParams(**settings.sampling_kwargs(), stop_token_ids=list(stop_ids))
            params.stop += [s for s in stop_strings if s not in params.stop]
            if not run.prompt_ids:
                run.prompt_ids = run.chat_ids or get_tokenizer().encode(run.prompt) or [get_tokenizer().eot_id]
            ids = run.prompt_ids + [t.id for t in run.toks]

            def on_update(req, infos, new_text, run=run):
                pane.push(run, infos)

            req = engine.submit(pane.lm, ids, params, on_update=on_update)
            with pane.lock:
                pane.active.append((run, req))
            if not run.prompt_toks and not run.chat:
                scored = engine.score(pane.lm, run.prompt_ids)
                run.prompt_toks = [Tok.from_info(i) for i in scored]
        except Exception as e:
            run.error = one_line(e)
            run.finish_reason = "error"
        pane.dirty = True

    def action_stop(self) -> None:
        """Esc: stop every pane's generation."""
        for pane in self.panes:
            pane.waiting_prompt = None
            with pane.lock:
                for _, req in pane.active:
                    req.cancel()

    def action_regenerate(self) -> None:
        if not self.any_model():
            return
        if self.app.mode == "chat":
            self.regenerate_chat()
        else:
            self.run_prompt(self.app.prompt)

    def action_new_seed(self) -> None:
        self.app.settings.seed = random.randrange(2**31)
        self.update_status()
        self.action_regenerate()

    def action_colours(self) -> None:
        self.app.colour_mode = MODES[(MODES.index(self.app.colour_mode) + 1) % len(MODES)]
        for pane in self.panes:
            pane.colour_mode = self.app.colour_mode
        self.update_status()

    # ---- chat

    def send_chat(self, text: str) -> None:
        self.action_stop()
        for pane in self.panes:
            if pane.error is not None:  # a model that failed to load takes no part in the conversation
                continue
            pane.state.chat.append(Message("user", text))
            if pane.lm is not None:
                self.start_chat_turn(pane)
            else:
                pane.waiting_prompt = text
            pane.refresh_view(scroll=True)

    def start_chat_turn(self, pane: ModelPane) -> None:
        """Render the conversation with the model's template (dropping the oldest turns that no longer fit)."""
        from ...chat import render_prompt
        from ...tokenizer import get_tokenizer

        settings = self.app.settings.merged(pane.state.overrides)
        template = pane.lm.chat_template
        budget = pane.lm.config.block_size - min(settings.max_new_tokens, pane.lm.config.block_size // 2)
        tokenizer = get_tokenizer()
        while True:
            messages = [{"role": m.role, "content": m.content} for m in pane.state.chat]
            rendered = render_prompt(messages, template)  # ids with a chat template, text without
            ids = tokenizer.encode(rendered) if isinstance(rendered, str) else rendered
            users = [i for i, m in enumerate(pane.state.chat) if m.role == "user"]
            if len(ids) <= budget or len(users) < 2:
                break
            # drop the oldest user turn and everything up to the next one
            del pane.state.chat[users[0]:users[1]]
            pane.state.dropped_turns += 1
        run = Run(prompt=pane.state.chat[-1].content, settings=settings.to_dict())
        run.chat, run.chat_ids, run.prompt_ids = True, ids, ids
        pane.state.chat.append(Message("assistant", "", toks=run.toks))
        self.start_chat_run(pane, run, settings)

    def start_chat_run(self, pane: ModelPane, run: Run, settings) -> None:
        """Generate `run`, whose message is the conversation's last, with the template's stops."""
        from ...chat import stop_strings, stop_token_ids

        template = pane.lm.chat_template
        pane.start_run(run)
        self.submit_worker(pane, run, settings, stop_token_ids(template), stop_strings(template))

    def regenerate_chat(self) -> None:
        self.action_stop()
        for pane in self.panes:
            if pane.state.chat and pane.state.chat[-1].role == "assistant":
                pane.state.chat.pop()
            if pane.state.chat and pane.state.chat[-1].role == "user" and pane.lm is not None:
                self.start_chat_turn(pane)

    def action_edit_last(self) -> None:
        """Chat: take the last user message back into the editor and remove that turn everywhere."""
        last = None
        self.action_stop()
        for pane in self.panes:
            users = [i for i, m in enumerate(pane.state.chat) if m.role == "user"]
            if users:
                last = pane.state.chat[users[-1]].content
                del pane.state.chat[users[-1]:]
                pane.refresh_view()
        if last is not None:
            editor = self.query_one("#prompt", PromptEditor)
            editor.show_text(last)
            editor.focus()

    def check_action(self, action: str, parameters) -> bool | None:
        if action == "edit_last":
            return self.app.mode == "chat"
        return True

    def action_toggle_chat(self) -> None:
        self.action_stop()
        self.app.mode = "compare" if self.app.mode == "chat" else "chat"
        for pane in self.panes:
            pane.chat_mode = self.app.mode == "chat"
            pane.cursor = None
            pane.refresh_view()
        self.refresh_bindings()
        self.update_status()

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
        chat = self.app.mode == "chat"
        if not pane.can_fork_at_cursor():
            where = "a token of the latest answer" if chat else "a completion token"
            self.notify(f"put the cursor on {where} first (←/→ or click)", severity="warning")
            return
        tok, _, at = pane.cursor_tok()
        alts = [a for a in tok.top if a[0] != tok.id] if k is None else tok.top[k - 1:k]
        if not alts:
            self.notify("no such alternative", severity="warning")
            return
        tid, text, lp, slp = alts[0]
        rank = next(i for i, a in enumerate(tok.top, 1) if a[0] == tid)
        chosen = Tok(tid, text, lp, slp, rank, tok.entropy, list(tok.top))
        self.action_stop()
        if not chat:
            self.start_generation(pane, pane.state.run.prompt, fork=(pane.state.current, at, chosen))
            return
        # chat: the answer is rewritten from that token on; the old one stays a branch
        parent = pane.state.run
        settings = self.app.settings.merged(pane.state.overrides)
        run = Run(prompt=parent.prompt, settings=settings.to_dict(), chat=True, chat_ids=parent.chat_ids,
                  prompt_ids=parent.prompt_ids, toks=parent.toks[:at] + [chosen], parent=pane.state.current,
                  fork_at=at, prefix_len=at + 1)
        pane.state.chat[-1] = Message("assistant", "", toks=run.toks)
        self.start_chat_run(pane, run, settings)

    def pane_branches(self, pane: ModelPane, _=None) -> None:
        from .dialogs import BranchesScreen

        if len(pane.state.runs) < 2:
            self.notify("one branch only: fork with 1-9 on a token to make more")
            return

        def chosen(index: int | None) -> None:
            if index is None:
                return
            if self.app.mode == "chat":
                run, chat = pane.state.runs[index], pane.state.chat
                latest = chat and chat[-1].role == "assistant" and run.chat and run.prompt_ids == pane.state.run.prompt_ids
                if not latest:
                    self.notify("in chat mode, pick a branch of the latest answer", severity="warning")
                    return
                chat[-1] = Message("assistant", run.text, toks=run.toks)
            pane.state.current = index
            pane.cursor = None
            pane.refresh_view()
            self.show_inspector(pane)  # the token it showed belongs to the other branch
            self.mark_divergence()

        self.app.push_screen(BranchesScreen(pane.state), chosen)

    def pane_copy(self, pane: ModelPane, _=None) -> None:
        run = pane.state.run
        if run is None:
            return
        text = "\n\n".join(f"{m.role}: {m.content}" for m in pane.state.chat) if self.app.mode == "chat" \
            else run.prompt + run.text
        self.app.copy_to_clipboard(text)  # OSC 52: works over SSH in terminals that allow it
        self.notify(f"copied {len(text)} characters from {pane.state.spec}")

    def pane_gen_command(self, pane: ModelPane, _=None) -> None:
        from ..sessions import gen_command
        from ..state import Settings

        run = pane.state.run
        settings = Settings.from_dict(run.settings) if run else self.app.settings.merged(pane.state.overrides)
        command = gen_command(pane.exact_spec, run.prompt if run else self.app.prompt, settings,
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

    async def pane_remove(self, pane: ModelPane, _=None) -> None:
        await self.remove_panes([pane])
        self.app.save_session()

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
        run = pane.state.run
        others = [p for p in self.panes if p is not pane and p.lm is not None]
        if run is None or not run.toks or pane.busy:
            self.notify("generate something in this pane first", severity="warning")
            return
        if not others:
            self.notify("cross-scoring needs a second loaded model", severity="warning")
            return
        self.notify(f"scoring {pane.state.spec}'s completion under {len(others)} other model(s)…")
        self.cross_score_worker(pane, others)

    @work(thread=True, group="score", exclusive=True)
    def cross_score_worker(self, pane: ModelPane, others: list[ModelPane]) -> None:
        from .dialogs import CrossScore

        run = pane.state.run
        ids = run.prompt_ids + [t.id for t in run.toks]
        start = len(run.prompt_ids)
        results = []
        for other in others:
            if max(ids) >= other.lm.config.vocab_size:
                results.append(CrossScore(other.state.spec, None, [], "different vocabulary"))
                continue
            infos = self.app.get_engine().score(other.lm, ids)[start:]
            results.append(CrossScore(other.state.spec, [Tok.from_info(i) for i in infos]))
        self.app.call_from_thread(self.show_cross_score, pane, results)

    def show_cross_score(self, pane: ModelPane, results) -> None:
        from .dialogs import CrossScoreScreen

        self.app.push_screen(CrossScoreScreen(pane.state.spec, pane.state.run.toks, results))

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
            if result is None:
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
        path = self.app.export_markdown()
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


def shares_vocab(a, b) -> bool:
    """Both models use the GPT-2 BPE ids (50257, or nanoGPT's padded 50304)."""
    return a.config.vocab_size >= 50257 and b.config.vocab_size >= 50257


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
