"""Compare mode: one prompt, every pane generates from it with the same settings and seed."""

from __future__ import annotations

from ..state import Run, Tok
from ..widgets.pane import ModelPane
from .base import Mode


class CompareMode(Mode):
    name = "compare"
    fork_target = "a completion token"

    def send(self, text: str) -> None:
        self.screen.query_one("#prompt").remember(text)
        self.run_prompt(text)

    def run_prompt(self, prompt: str) -> None:
        self.screen.action_stop()
        self.app.prompt = prompt
        for pane in self.screen.panes:
            if pane.lm is not None:
                self.generate(pane, prompt)
            elif pane.error is None:
                pane.waiting_prompt = prompt  # runs as soon as its model is loaded
        self.screen.update_status()

    def resume(self, pane: ModelPane, waiting: str) -> None:
        self.generate(pane, waiting)

    def regenerate(self) -> None:
        self.run_prompt(self.app.prompt)

    def generate(self, pane: ModelPane, prompt: str) -> None:
        settings = self.settings_for(pane)
        self.start(pane, Run(prompt=prompt, settings=settings.to_dict()), settings)

    def branch_from(self, pane: ModelPane, at: int, chosen: Tok) -> None:
        """A new run: the parent's prompt and completion up to `at`, then `chosen`, then whatever comes."""
        settings = self.settings_for(pane)
        parent = pane.state.run
        run = Run(prompt=parent.prompt, settings=settings.to_dict(), prompt_ids=parent.prompt_ids,
                  prompt_toks=parent.prompt_toks, toks=parent.toks[:at] + [chosen], parent=pane.state.current,
                  fork_at=at, prefix_len=at + 1)
        self.start(pane, run, settings)

    def branches(self, pane: ModelPane) -> list[int]:
        return [i for i, r in enumerate(pane.state.runs) if not r.chat]

    def transcript(self, pane: ModelPane) -> str:
        return pane.state.run.prompt + pane.state.run.text

    def mark_divergence(self) -> None:
        """First completion position where each pane departs from the first pane (same vocabulary)."""
        super().mark_divergence()
        panes = [p for p in self.screen.panes if p.state.run is not None and p.lm is not None and not p.busy]
        if len(panes) < 2:
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


def shares_vocab(a, b) -> bool:
    """Both models use the GPT-2 BPE ids (50257, or nanoGPT's padded 50304)."""
    return a.config.vocab_size >= 50257 and b.config.vocab_size >= 50257
