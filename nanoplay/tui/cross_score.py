"""
Cross-scoring (`x` on a pane): the pane's completion scored under every other loaded model, off the
UI thread, then shown in a dialog with each model's perplexity of it and where they disagree most.
"""

from __future__ import annotations

from functools import partial

from .state import Tok
from .widgets.pane import ModelPane


def cross_score(screen, pane: ModelPane) -> None:
    """Check there is something to score and someone to score it, then score in a thread worker."""
    run = pane.state.run
    others = [p for p in screen.panes if p is not pane and p.lm is not None]
    if run is None or not run.toks or pane.busy:
        screen.notify("generate something in this pane first", severity="warning")
        return
    if not others:
        screen.notify("cross-scoring needs a second loaded model", severity="warning")
        return
    screen.notify(f"scoring {pane.state.spec}'s completion under {len(others)} other model(s)…")
    screen.run_worker(partial(score_under_others, screen, pane, others), thread=True, group="score", exclusive=True)


def score_under_others(screen, pane: ModelPane, others: list[ModelPane]) -> None:
    from .screens.dialogs import CrossScore

    run = pane.state.run
    ids = run.prompt_ids + [t.id for t in run.toks]
    start = len(run.prompt_ids)
    results = []
    for other in others:
        if max(ids) >= other.lm.config.vocab_size:
            results.append(CrossScore(other.state.spec, None, [], "different vocabulary"))
            continue
        infos = screen.app.get_engine().score(other.lm, ids)[start:]
        results.append(CrossScore(other.state.spec, [Tok.from_info(i) for i in infos]))
    screen.app.call_from_thread(show_results, screen, pane, results)


def show_results(screen, pane: ModelPane, results) -> None:
    from .screens.dialogs import CrossScoreScreen

    if pane.removed:  # the pane went while its text was scored
        return

    screen.app.push_screen(CrossScoreScreen(pane.state.spec, pane.state.run.toks, results))
