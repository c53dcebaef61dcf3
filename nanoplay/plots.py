"""
The report's plots: validation loss against step and against training tokens, with reference models
and the published GPT-2 losses as horizontal lines and the run's own training curve underneath.

Drawn in the terminal with plotext, and as PNG + SVG with matplotlib (the `report` extra); both take
the same series from `series(report)`, so the two always show the same numbers.
"""

from __future__ import annotations

from pathlib import Path

MATPLOTLIB_HINT = "pip install 'nanoplay[report]' (matplotlib) to get the plots as PNG and SVG too"


def series(report: dict) -> dict:
    """
    What the plots show, from a nanoplay.report dict: the scored steps (step, tokens, loss) on the
    trend's data set, horizontal lines (label, loss) for the other models and the published figures
    (the latter only for OpenWebText, where they were measured), the training curves, and the fitted
    trend with its extrapolated points.
    """
    key = report["trend"].get("data")
    steps = [(c["step"], c.get("training_tokens"), c["results"][key]["loss"]) for c in report["columns"]
             if c["kind"] == "step" and key in c.get("results", {})]
    lines = [(c["label"], c["results"][key]["loss"]) for c in report["columns"]
             if c["kind"] == "vs" and key in c.get("results", {})]
    if key == "openwebtext":
        lines += [(f"{p['model']} (published)", p["loss"]) for p in report["published"] if p["data"] == key]
    trend = report["trend"] if "error" not in report["trend"] else None
    return {"data": short_name(key), "steps": steps, "lines": lines, "train": report["curves"]["train"],
            "val": report["curves"]["val"], "trend": trend}


def short_name(key: str | None) -> str | None:
    """A data set's name for a title or a row: a file's name rather than its whole path."""
    return Path(key).name if key and ("/" in key or "\\" in key) and Path(key).exists() else key


def trend_curve(trend: dict, low: float, high: float, n: int = 60) -> tuple[list[float], list[float]]:
    """Points of the fitted L(D) = E + A * D^-alpha from `low` to `high` tokens, evenly on a log scale."""
    import numpy as np

    d = np.geomspace(low, high, n)
    return d.tolist(), (trend["E"] + trend["A"] * d ** -trend["alpha"]).tolist()


def terminal(report: dict, width: int = 100, height: int = 36, color: bool = True) -> str:
    """The two plots, one above the other, as text for the terminal (plotext); plain text when not color."""
    import plotext as plx

    s = series(report)
    fig = plx.figure
    fig.clear()
    fig.plot_size(width, height)
    fig.subplots(2, 1)

    def curve(ax, points, label, colour, marker="braille", lines=True):
        signal = ax.signal([p[0] for p in points], [p[1] for p in points], marker=plx.marker(marker, colour))
        ax.draw(signal.label(label).lines(lines))

    def reference_lines(ax):
        for i, (label, loss) in enumerate(s["lines"]):
            ax.line(loss, pixel=_COLORS[i % len(_COLORS)], style="dotted", label=f"{label} {loss:.2f}")

    by_step = fig.subplot(1, 1)
    by_step.title(f"validation loss on {s['data']} against step")
    if s["train"]:
        curve(by_step, _thin(s["train"], 2 * width), "train loss (metrics.jsonl)", "gray")
    if s["val"]:
        curve(by_step, s["val"], "trainer's val loss", "cyan")
    if s["steps"]:
        curve(by_step, [(p[0], p[2]) for p in s["steps"]], "scored steps", "red", marker="o", lines=False)
    reference_lines(by_step)
    by_step.label("step")

    by_tokens = fig.subplot(2, 1)
    by_tokens.title("against training tokens (log scale), with the fitted trend")
    with_tokens = [(p[1], p[2]) for p in s["steps"] if p[1]]
    if with_tokens:
        by_tokens.ruler("x").scale("log")
        if s["trend"]:
            low, last = min(d for d, _ in with_tokens), max(d for d, _ in with_tokens)
            curve(by_tokens, list(zip(*trend_curve(s["trend"], low, last * max(_multiples(s))))),
                  "fit, extrapolated past the last step", "green")
        curve(by_tokens, with_tokens, "scored steps", "red", marker="o", lines=False)
    reference_lines(by_tokens)
    by_tokens.label("training tokens")
    matrix = fig.build()
    return str(matrix) if color else plx.uncolorize(matrix)


_COLORS = ("blue", "magenta", "yellow", "green", "cyan", "white")


def _thin(points: list, most: int) -> list:
    """At most `most` points of a long curve (every k-th), so the terminal plot stays quick."""
    k = max(1, len(points) // most)
    return points[::k]


def _multiples(s: dict) -> list[int]:
    return [e["multiple"] for e in s["trend"]["extrapolation"]] if s["trend"] else [1]


def write_images(report: dict, stem: Path) -> list[Path]:
    """
    stem.png and stem.svg (matplotlib, written atomically): loss against step with the training curve
    underneath, and against training tokens with the fitted trend. Raises ImportError without matplotlib.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    from matplotlib.figure import Figure

    from .atomic import write_file_atomically

    s = series(report)
    fig = Figure(figsize=(13, 5.2), layout="constrained")
    by_step, by_tokens = fig.subplots(1, 2)
    if s["train"]:
        by_step.plot(*zip(*s["train"]), color="0.75", lw=0.8, label="train loss (metrics.jsonl)", zorder=1)
    if s["val"]:
        by_step.plot(*zip(*s["val"]), color="tab:cyan", lw=1.2, label="trainer's val loss (its own batches)", zorder=2)
    if s["steps"]:
        by_step.plot([p[0] for p in s["steps"]], [p[2] for p in s["steps"]], "o-", color="tab:red",
                     label=f"scored on {s['data']}", zorder=3)
    by_step.set(xlabel="step", ylabel="loss (nats per token)", title=f"validation loss on {s['data']} against step")

    with_tokens = [p for p in s["steps"] if p[1]]
    if with_tokens:
        by_tokens.plot([p[1] for p in with_tokens], [p[2] for p in with_tokens], "o", color="tab:red",
                       label="scored steps", zorder=3)
        if s["trend"]:
            t = s["trend"]
            low, last = min(p[1] for p in with_tokens), max(p[1] for p in with_tokens)
            by_tokens.plot(*trend_curve(t, low, last), color="tab:green", lw=1.5,
                           label=f"fit: {t['E']:.2f} + A·D^-{t['alpha']:.2f} (residual RMS {t['residual_rms']:.3f}"
                                 + (f", leave-one-out {t['loo_rms']:.3f})" if t.get("loo_rms") is not None else ")"))
            by_tokens.plot(*trend_curve(t, last, last * max(_multiples(s))), "--", color="tab:green", lw=1.2,
                           label="extrapolation (not a measurement)")
            for e in t["extrapolation"]:
                by_tokens.plot([e["training_tokens"]], [e["loss"]], "o", mfc="none", color="tab:green")
                by_tokens.annotate(f"{e['multiple']}x: {e['loss']:.2f}", (e["training_tokens"], e["loss"]),
                                   textcoords="offset points", xytext=(4, 6), fontsize=8)
        by_tokens.set_xscale("log")
    by_tokens.set(xlabel="training tokens", ylabel="loss (nats per token)",
                  title="against training tokens, with the fitted trend")
    for ax in (by_step, by_tokens):
        for i, (label, loss) in enumerate(s["lines"]):
            ax.axhline(loss, color=f"C{i % 10}", ls=":", lw=1.2, label=f"{label}: {loss:.2f}")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    written = []
    for suffix in (".png", ".svg"):
        path = stem.with_suffix(suffix)
        write_file_atomically(path, lambda tmp, fmt=suffix[1:]: fig.savefig(tmp, format=fmt, dpi=120))
        written.append(path)
    return written
