"""
Token colouring: by probability under the pane's model (bins in log space) or by entropy.

Backgrounds with black text read the same on dark and light themes.
"""

from __future__ import annotations

import math

from rich.style import Style
from rich.text import Text

# probability bins, log10 spaced: p >= 0.5, >= 0.1, >= 0.01, >= 0.001, below
PROB_BINS = [(math.log(0.5), "#4caf50", "≥.5"), (math.log(0.1), "#cddc39", "≥.1"),
             (math.log(0.01), "#ffc107", "≥.01"), (math.log(0.001), "#ff7043", "≥.001"),
             (float("-inf"), "#e53935", "<.001")]
# entropy bins in nats: a confident model (low entropy) is cool, an unsure one warm
ENTROPY_BINS = [(0.5, "#42a5f5", "<0.5"), (1.5, "#80deea", "<1.5"), (3.0, "#fff59d", "<3"),
                (5.0, "#ffb74d", "<5"), (float("inf"), "#ef5350", "≥5")]
MODES = ("off", "probability", "entropy")


def token_color(tok, mode: str) -> str | None:
    if mode == "probability" and tok.logprob is not None:
        return next(color for edge, color, _ in PROB_BINS if tok.logprob >= edge)
    if mode == "entropy" and tok.entropy is not None:
        return next(color for edge, color, _ in ENTROPY_BINS if tok.entropy < edge)
    return None


def token_style(tok, mode: str) -> Style | None:
    color = token_color(tok, mode)
    return Style(color="black", bgcolor=color) if color else None


def legend(mode: str) -> Text:
    """The scale in use, for the status bar."""
    if mode == "off":
        return Text("colours off")
    bins = PROB_BINS if mode == "probability" else ENTROPY_BINS
    text = Text("p " if mode == "probability" else "entropy ")
    for _, color, label in bins:
        text.append(f" {label} ", Style(color="black", bgcolor=color))
    return text
