"""Forking, in either mode: which alternative a key chooses."""

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
