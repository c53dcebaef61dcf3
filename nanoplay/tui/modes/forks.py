"""Forking, in either mode: which alternative a key chooses, and which existing run a fork would repeat."""

from __future__ import annotations

from ..state import Tok


def alternative(tok: Tok, k: int | None) -> Tok | None:
    """
    The token a fork puts in `tok`'s place: its k-th most likely alternative (1-based), or with k None
    the most likely one that is not `tok`. Carries the statistics of `tok`'s position. None: no such one.
    """
    alts = [a for a in tok.top if a[0] != tok.id] if k is None else tok.top[k - 1:k]
    if not alts:
        return None
    tid, text, lp, slp = alts[0]
    rank = next(i for i, a in enumerate(tok.top, 1) if a[0] == tid)
    return Tok(tid, text, lp, slp, rank, tok.entropy, list(tok.top))


def existing_branch(runs: list, current: int, at: int, chosen: Tok, settings: dict) -> int | None:
    """
    The run that a fork of run `current` at completion position `at` with `chosen` would repeat, or None.
    When `chosen` is the token already there, the current run is that continuation. Otherwise a run with
    the same prompt, the same tokens up to and including `at` and the same settings is what the fork
    would generate (the newest such run).
    """
    run = runs[current]
    if run.toks[at].id == chosen.id:
        return current
    want = [t.id for t in run.toks[:at]] + [chosen.id]
    return next((i for i in reversed(range(len(runs)))
                 if runs[i].chat == run.chat and runs[i].prompt_ids == run.prompt_ids
                 and runs[i].settings == settings and [t.id for t in runs[i].toks[:at + 1]] == want), None)
