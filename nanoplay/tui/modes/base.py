"""
What both modes share: starting a run in a pane and feeding it to the engine, and the fork and branch
flows (which alternative, which run), whose last step each mode does its own way.
"""

from __future__ import annotations

from functools import partial

from ..state import Run, Tok
from ..widgets.pane import ModelPane
from .forks import alternative, existing_branch


def one_line(e: Exception) -> str:
    """An unexpected error as one line (NanoplayErrors already are)."""
    from ...errors import NanoplayError

    if isinstance(e, NanoplayError):
        return str(e)
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


class Mode:
    """A mode of the main screen. Attributes down: it changes pane states and asks panes to redraw."""

    name = ""
    fork_target = ""  # where the cursor must be to fork, for the warning

    def __init__(self, screen):
        self.screen = screen

    @property
    def app(self):
        return self.screen.app

    def settings_for(self, pane: ModelPane):
        return self.app.settings.merged(pane.state.overrides)

    # ---- what each mode does its own way

    def send(self, text: str) -> None:
        """The prompt editor's text was submitted."""
        raise NotImplementedError

    def resume(self, pane: ModelPane, waiting: str) -> None:
        """`pane`'s model loaded after `waiting` was sent: generate for it now."""
        raise NotImplementedError

    def regenerate(self) -> None:
        raise NotImplementedError

    def branch_from(self, pane: ModelPane, at: int, chosen: Tok) -> None:
        """Continue `pane`'s run from completion position `at` with `chosen` instead."""
        raise NotImplementedError

    def branches(self, pane: ModelPane) -> list[int]:
        """The runs of `pane` the branch list offers in this mode (indices into its runs)."""
        raise NotImplementedError

    def select_branch(self, pane: ModelPane, index: int) -> None:
        """Run `index` of `pane`, one of `branches(pane)`, becomes the one on screen."""
        pane.state.current = index

    def transcript(self, pane: ModelPane) -> str:
        """The pane's text as `y` copies it."""
        raise NotImplementedError

    def mark_divergence(self) -> None:
        """Where panes part ways: only compare mode has a shared prompt to measure it from."""
        for pane in self.screen.panes:
            pane.diverge_at = None

    # ---- generation

    def start(self, pane: ModelPane, run: Run, settings, stop_ids=(), stop_strings=()) -> None:
        """`run` becomes the pane's current branch and goes to the engine (from a thread worker)."""
        pane.start_run(run)
        work = partial(submit, self.app.get_engine, pane, run, settings, stop_ids, stop_strings)
        self.screen.run_worker(work, thread=True, group="generate")

    # ---- forks and branches

    def fork_at_cursor(self, pane: ModelPane, k: int | None) -> None:
        """1-9 (k) or f (None, the best other alternative) on a pane."""
        if not pane.can_fork_at_cursor():
            self.screen.notify(f"put the cursor on {self.fork_target} first (←/→ or click)", severity="warning")
            return
        tok, _, at = pane.cursor_tok()
        chosen = alternative(tok, k)
        if chosen is None:
            self.screen.notify("no such alternative", severity="warning")
            return
        same = existing_branch(pane.state.runs, pane.state.current, at, chosen, self.settings_for(pane).to_dict())
        if same is not None:  # the fork would repeat it: show it instead of making a copy
            if same != pane.state.current:
                self.go_to_branch(pane, same)
            self.screen.notify(f"{chosen.text!r} at token {at} is already in branch {same + 1}: showing it",
                               markup=False)
            return
        self.screen.action_stop()
        self.branch_from(pane, at, chosen)

    def show_branches(self, pane: ModelPane) -> None:
        from ..screens.dialogs import BranchesScreen

        runs = self.branches(pane)
        if len(runs) < 2:
            self.screen.notify("one branch only: fork with 1-9 on a token to make more")
            return

        def chosen(index: int | None) -> None:
            if index is not None and pane.is_attached and not pane.removed:
                self.go_to_branch(pane, index)

        self.app.push_screen(BranchesScreen(pane.state, runs), chosen)

    def go_to_branch(self, pane: ModelPane, index: int) -> None:
        self.select_branch(pane, index)
        pane.cursor = None
        pane.refresh_view()
        self.screen.show_inspector(pane)  # the token it showed belongs to the other branch
        self.mark_divergence()


def submit(get_engine, pane: ModelPane, run: Run, settings, stop_ids=(), stop_strings=()) -> None:
    """Tokenize, submit to the engine, then score the prompt for colouring (all off the UI thread)."""
    from ...errors import NanoplayError
    from ...sampling import SamplingParams
    from ...tokenizer import get_tokenizer

    engine = get_engine()
    try:
        params = SamplingParams(**settings.sampling_kwargs(), stop_token_ids=list(stop_ids))
        params.stop += [s for s in stop_strings if s not in params.stop]
        if not run.prompt_ids:
            run.prompt_ids = run.chat_ids or get_tokenizer().encode(run.prompt) or [get_tokenizer().eot_id]
        ids = run.prompt_ids + [t.id for t in run.toks]

        def on_update(req, infos, new_text, run=run):
            pane.push(run, infos)

        draft = None
        if settings.draft:  # loaded once by the engine, then shared; an error shows in the pane
            try:
                draft = engine.load(settings.draft, device=pane.lm.device, dtype=pane.lm.weights_dtype)
            except Exception as e:
                raise NanoplayError(f"draft model: {one_line(e)}") from e  # the message names the model
        req = engine.submit(pane.lm, ids, params, on_update=on_update, draft=draft)
        with pane.lock:
            pane.active.append((run, req))
        if not run.prompt_toks and not run.chat:
            scored = engine.score(pane.lm, run.prompt_ids)
            run.prompt_toks = [Tok.from_info(i) for i in scored]
    except Exception as e:
        run.error = one_line(e)
        run.finish_reason = "error"
    pane.dirty = True
