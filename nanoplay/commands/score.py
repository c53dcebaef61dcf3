"""`nanoplay score`: how surprising a text is to each model, token by token."""

from __future__ import annotations

import math
import sys
from pathlib import Path

from ..errors import NanoplayError
from .common import (add_model_options, alternative_record, check_top_logprobs, json_line, load_models,
                     resolve_device, torch_dtype)


def register(subparsers) -> None:
    p = subparsers.add_parser("score", help="per-token log-probabilities, perplexity and bits per byte of a text")
    add_model_options(p)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--file", "-f", type=Path, help="text file to score (default: stdin)")
    src.add_argument("--text", "-t", help="text to score")
    p.add_argument("--top-logprobs", type=int, default=0, help="alternatives per token in --json output")
    p.add_argument("--json", action="store_true", help="one JSON object per model, with every token")
    p.set_defaults(run=run)


def read_text(args) -> str:
    if args.text is not None:
        text = args.text
    elif args.file is not None:
        try:
            text = args.file.read_text(encoding="utf-8-sig")  # a byte-order mark is not text to score
        except (OSError, UnicodeDecodeError) as e:
            raise NanoplayError(f"cannot read {args.file}: {e}") from e
    elif not sys.stdin.isatty():
        text = sys.stdin.read()
    else:
        raise NanoplayError("nothing to score: give --file FILE, --text TEXT, or pipe text on stdin")
    if not text:
        raise NanoplayError("the text to score is empty")
    return text


def summarize(tokens, text: str) -> dict:
    """Totals over a scored text: every token is predicted (the first from <|endoftext|>)."""
    nll = -sum(t.logprob for t in tokens)
    return {
        "tokens": len(tokens),
        "bytes": len(text.encode("utf-8")),
        "loss": nll / len(tokens),
        "perplexity": math.exp(nll / len(tokens)),
        "bits_per_byte": nll / math.log(2) / len(text.encode("utf-8")),
    }


def score_record(model_name: str, totals: dict, tokens, top_logprobs: int) -> dict:
    def entry(t) -> dict:
        e = {"token": t.text, "id": t.id, "bytes": list(t.bytes), "logprob": t.logprob,
             "surprisal_bits": -t.logprob / math.log(2), "rank": t.rank, "entropy": t.entropy}
        if top_logprobs:
            e["top_logprobs"] = [alternative_record(a) for a in t.top[:top_logprobs]]
        return e

    return {"model": model_name, **totals, "per_token": [entry(t) for t in tokens]}


def run(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from ..engine import Engine

    text = read_text(args)
    check_top_logprobs(args.top_logprobs)
    device = resolve_device(args.device)
    dtype = torch_dtype(args.dtype, device)
    engine = Engine()
    table = Table(title="Scores (every token predicted from the ones before; the first from <|endoftext|>)")
    for col in ("model", "tokens", "loss (nats/token)", "perplexity", "bits/byte", "most surprising"):
        table.add_column(col, justify="right" if col not in ("model", "most surprising") else "left")
    for model in load_models(engine, args.model, device, dtype):
        tokens = engine.score(model, text, top_logprobs=max(args.top_logprobs, 1))
        totals = summarize(tokens, text)
        if args.json:
            print(json_line(score_record(model.name, totals, tokens, args.top_logprobs)))
            continue
        worst = sorted(tokens, key=lambda t: t.logprob)[:3]
        table.add_row(model.name, str(totals["tokens"]), f"{totals['loss']:.4f}", f"{totals['perplexity']:.2f}",
                      f"{totals['bits_per_byte']:.4f}",
                      ", ".join(f"{t.text!r} ({-t.logprob / math.log(2):.1f} bits)" for t in worst))
    if not args.json:
        Console().print(table)
    return 0
