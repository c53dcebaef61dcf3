"""`nanoplay score`: how surprising a text is to each model, token by token."""

from __future__ import annotations

import math
import sys
from pathlib import Path

from ..errors import NanoplayError
from ..textio import argument_text, read_text
from .common import (add_model_options, alternative_record, check_top_logprobs, json_line, load_models, read_stdin,
                     resolve_device, stdout_console, torch_dtype)


def register(subparsers) -> None:
    p = subparsers.add_parser("score", help="per-token log-probabilities, perplexity and bits per byte of a text")
    add_model_options(p)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--file", "-f", type=Path, help="text file to score (default: stdin)")
    src.add_argument("--text", "-t", help="text to score")
    p.add_argument("--top-logprobs", type=int, default=0, help="alternatives per token in --json output")
    p.add_argument("--json", action="store_true", help="one JSON object per model, with every token")
    p.add_argument("--no-eot-prefix", action="store_true",
                   help="do not predict the first token from <|endoftext|>: it goes unscored (see README: Sampling)")
    p.set_defaults(run=run)


def read_input(args) -> str:
    if args.text is not None:
        text = argument_text(args.text, "--text")
    elif args.file is not None:
        text = read_text(args.file)
    elif not sys.stdin.isatty():
        text = read_stdin()
    else:
        raise NanoplayError("nothing to score: give --file FILE, --text TEXT, or pipe text on stdin")
    if not text:
        raise NanoplayError("the text to score is empty")
    return text


def summarize(tokens) -> dict:
    """Totals over the scored tokens: all of the text's (the first predicted from <|endoftext|>), or all
    but the first with --no-eot-prefix; bytes are those of the scored tokens."""
    if not tokens:
        raise NanoplayError("nothing to score: the text is a single token, and with --no-eot-prefix "
                            "the first token is not scored")
    nll = -sum(t.logprob for t in tokens)
    n_bytes = sum(len(t.bytes) for t in tokens)
    return {
        "tokens": len(tokens),
        "bytes": n_bytes,
        "loss": nll / len(tokens),
        "perplexity": math.exp(nll / len(tokens)),
        "bits_per_byte": nll / math.log(2) / n_bytes,
    }


def score_record(model_name: str, precision: str, totals: dict, tokens, top_logprobs: int) -> dict:
    def entry(t) -> dict:
        e = {"token": t.text, "id": t.id, "bytes": list(t.bytes), "logprob": t.logprob,
             "surprisal_bits": -t.logprob / math.log(2), "rank": t.rank, "entropy": t.entropy}
        if top_logprobs:
            e["top_logprobs"] = [alternative_record(a) for a in t.top[:top_logprobs]]
        return e

    return {"model": model_name, "dtype": precision, **totals, "per_token": [entry(t) for t in tokens]}


def run(args) -> int:
    from rich.table import Table

    from ..engine import Engine

    text = read_input(args)
    check_top_logprobs(args.top_logprobs)
    device = resolve_device(args.device)
    dtype = torch_dtype(args.dtype, device)
    engine = Engine()
    first = "the first is not scored" if args.no_eot_prefix else "the first from <|endoftext|>"
    table = Table(title=f"Scores (every token predicted from the ones before; {first})")
    for col in ("model", "tokens", "loss (nats/token)", "perplexity", "bits/byte", "most surprising"):
        table.add_column(col, justify="right" if col not in ("model", "most surprising") else "left")
    for model in load_models(engine, args.model, device, dtype):
        tokens = engine.score(model, text, top_logprobs=max(args.top_logprobs, 1), eot_prefix=not args.no_eot_prefix)
        totals = summarize(tokens)
        if args.json:
            print(json_line(score_record(model.name, model.precision, totals, tokens, args.top_logprobs)))
            continue
        worst = sorted(tokens, key=lambda t: t.logprob)[:3]
        table.add_row(model.name, str(totals["tokens"]), f"{totals['loss']:.4f}", f"{totals['perplexity']:.2f}",
                      f"{totals['bits_per_byte']:.4f}",
                      ", ".join(f"{t.text!r} ({-t.logprob / math.log(2):.1f} bits)" for t in worst))
    if not args.json:
        stdout_console().print(table)
    return 0
