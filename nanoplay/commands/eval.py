"""`nanoplay eval`: several models on the same data, side by side, next to the published figures."""

from __future__ import annotations

import json

from ..errors import NanoplayError
from .common import add_model_options, print_notes, resolve_device, stdout_console, torch_dtype

DEFAULT_DATA = ["wikitext-2", "lambada"]


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="perplexity, bits per byte and LAMBADA of models on the same data, next to published figures")
    add_model_options(p, measures=True)
    p.add_argument("--data", "-d", action="append", metavar="SET",
                   help="wikitext-2, wikitext-103, lambada, openwebtext, pydoc-topics, NAME=PATH (a local copy "
                        "of a named set), a .txt/.jsonl/.parquet file or folder, or a Hub dataset id "
                        f"(repeatable; default: {' '.join(DEFAULT_DATA)})")
    p.add_argument("--rule", choices=("strided", "rolling"), default="strided",
                   help="perplexity rule: strided (the HF perplexity guide's sliding window, --stride) or rolling "
                        "(lm-evaluation-harness's loglikelihood_rolling: every token, the first from <|endoftext|>)")
    p.add_argument("--stride", type=int, help="sliding-window stride in tokens (default: half each model's context)")
    p.add_argument("--no-eot-prefix", action="store_true",
                   help="strided rule: leave the data's first token unscored, as the HF perplexity guide does, instead "
                        "of predicting it from <|endoftext|> (nanoplay's rule everywhere, as gen and score)")
    p.add_argument("--lambada-rule", choices=("word", "last-token"), default="word",
                   help="word: the whole last word must be the greedy continuation (lm-evaluation-harness); "
                        "last-token: only the final BPE token (OpenAI's easier GPT-2 rule)")
    p.add_argument("--limit", type=int, metavar="N", help="only the first N rows (documents, lines, examples) of each set")
    p.add_argument("--batch-size", type=int, help="sequences per forward (default: about 8k tokens' worth)")
    p.add_argument("--text-column", help="the text column of a local file or Hub data set (default: text)")
    p.add_argument("--split", choices=("train", "val", "all"),
                   help="which of the trainer's splits of a text source to score (default: val for openwebtext and "
                        "pydoc-topics, all of a file or Hub data set)")
    p.add_argument("--val-fraction", type=float, help="the --val-fraction the model was trained with, if not the default")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="results as one JSON object")
    out.add_argument("--markdown", action="store_true", help="results as a Markdown table, with notes")
    p.set_defaults(run=run)


def check_scoring_options(args) -> None:
    """The options eval and report share, checked before anything loads (NanoplayError: one line)."""
    for flag, value in (("--limit", args.limit), ("--stride", args.stride), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise NanoplayError(f"{flag} must be at least 1")
    if args.stride is not None and args.rule == "rolling":
        raise NanoplayError("--stride applies to the strided rule; the rolling rule's windows are the context")


def load_data_sets(args, default: list[str], err) -> list:
    """Every --data set (else `default`) as evaldata loads it, with a status line on `err` while it loads."""
    from ..evaldata import load_eval_data

    data = []
    for spec in args.data or default:
        with err.status(f"loading {spec}…"):
            data.append(load_eval_data(spec, limit=args.limit, text_column=args.text_column, split=args.split,
                                       val_fraction=args.val_fraction))
    return data


def run(args) -> int:
    import gc

    from rich.console import Console

    from ..loading import load_model

    check_scoring_options(args)
    device = resolve_device(args.device)
    dtype = torch_dtype(args.dtype, device)
    err = Console(stderr=True)
    data = load_data_sets(args, DEFAULT_DATA, err)
    rows = []
    for spec in args.model:
        try:
            with err.status(f"loading {spec}…"):
                loaded = load_model(spec, device=device, dtype=dtype)
        except NanoplayError as e:  # one bad model must not cost the others their results
            rows.append({"model": spec, "error": str(e)})
            continue
        print_notes(loaded)
        rows.append(evaluate_model(loaded, data, args, err))
        del loaded
        gc.collect()
    report = build_report(rows, data, args, device, dtype)
    if args.json:
        print(json.dumps(report, indent=2))
    elif args.markdown:
        print(render_markdown(report))
    else:
        render_table(report, stdout_console())
    return 2 if any("error" in r for r in rows) else 0  # 2: as for any other bad input; the rest still reported


def evaluate_model(loaded, data, args, console) -> dict:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from .. import evaluation as ev
    from ..engine import check_token_ids
    from ..tokenizer import get_tokenizer

    context = loaded.config.block_size
    stride = (args.stride or context // 2) if args.rule == "strided" else None
    row = {"model": loaded.name, "params": loaded.num_params, "context": context, "stride": stride, "results": {}}
    if stride is not None and stride > context:
        row["error"] = f"--stride {stride} is longer than {loaded.name}'s context of {context} tokens"
        return row
    try:  # the engine's one check of the tokens against the model's vocabulary
        for d in data:
            check_token_ids(loaded, d.ids if d.kind == "stream" else [], from_text=True)
    except NanoplayError as e:
        row["error"] = str(e)
        return row
    progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[rate]}"),
                        TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True,
                        disable=not console.is_terminal)
    with progress:
        for d in data:
            if d.kind == "stream":  # the bar counts scored tokens
                total = ev.scored_tokens(d.ids.numel(), context, rule=args.rule, stride=stride,
                                         doc_lengths=d.doc_lengths, eot_prefix=not args.no_eot_prefix)
            else:  # ... or LAMBADA examples
                total = len(d.texts)
            task = progress.add_task(f"{loaded.name} · {d.key}", total=total, rate="")
            on_progress = _progress_callback(progress, task)
            if d.kind == "stream":
                result = ev.perplexity(loaded.model, d.ids, context=context, stride=stride, rule=args.rule,
                                       doc_lengths=d.doc_lengths, n_bytes=d.n_bytes,
                                       n_words=d.n_words, batch_size=args.batch_size, on_progress=on_progress,
                                       eot_prefix=not args.no_eot_prefix)
            else:
                result = ev.lambada(loaded.model, d.texts, get_tokenizer(), context=context, rule=args.lambada_rule,
                                    batch_size=args.batch_size, on_progress=on_progress)
            row["results"][d.key] = result.to_dict()
            progress.remove_task(task)
    return row


def _progress_callback(progress, task):
    """Advance the bar by the units done (tokens or examples) and show the model's token rate."""
    import time

    start, tokens = time.perf_counter(), [0]

    def on_progress(units: int, n_tokens: int) -> None:
        tokens[0] += n_tokens
        rate = tokens[0] / max(time.perf_counter() - start, 1e-9)
        progress.update(task, advance=units, rate=f"{rate:,.0f} tok/s")

    return on_progress


# -----------------------------------------------------------------------------
# the report: JSON as it is, or rendered as a rich or Markdown table


def build_report(rows: list[dict], data, args, device: str, dtype) -> dict:
    from .. import evaluation as ev

    for row in rows:
        for key, result in row.get("results", {}).items():
            metrics = ("acc", "ppl") if key == "lambada" else ("loss", "ppl", "word_ppl", "byte_ppl", "bits_per_byte")
            rule = args.lambada_rule if key == "lambada" else args.rule
            result["references"] = ev.reference_records(row["model"], key, metrics, stride=row["stride"], rule=rule)
    return {
        "data": [{"key": d.key, "description": d.description, "rows": d.rows,
                  **({"tokens": d.ids.numel(), "bytes": d.n_bytes, "words": d.n_words} if d.kind == "stream" else {})}
                 for d in data],
        "method": {
            "context": "each model's own (block_size)",
            "rule": args.rule,
            "stride": (args.stride or "half of each model's context") if args.rule == "strided" else None,
            "lambada_rule": args.lambada_rule,
            "eot_prefix": not args.no_eot_prefix,  # the first token predicted from <|endoftext|>
            "dtype": str(dtype).removeprefix("torch."), "device": device, "limit": args.limit,
        },
        "models": rows,
    }


def columns(report: dict) -> list[tuple[str, str, str, str]]:
    """(header, data key, metric, format) for each metric column, in --data order."""
    cols = []
    for d in report["data"]:
        key = d["key"]
        if key == "lambada":
            rule = report["method"]["lambada_rule"]
            suffix = "" if rule == "word" else " (last token)"
            cols += [(f"lambada acc{suffix}", key, "acc", ".4f"), (f"lambada ppl{suffix}", key, "ppl", ".2f")]
            continue
        cols += [(f"{key} loss", key, "loss", ".4f"), (f"{key} ppl", key, "ppl", ".2f"),
                 (f"{key} bits/byte", key, "bits_per_byte", ".4f")]
        if key.startswith("wikitext"):
            cols.append((f"{key} word ppl", key, "word_ppl", ".2f"))
        if key == "wikitext":  # the harness's three
            cols.append((f"{key} byte ppl", key, "byte_ppl", ".4f"))
    return cols


def cell(row: dict, key: str, metric: str, fmt: str, sep: str = " ") -> str:
    result = row.get("results", {}).get(key)
    if result is None:
        return ""
    value = result[metric]
    text = f"{value:.3g}" if abs(value) >= 1e5 else format(value, fmt)  # an untrained model's ppl is huge
    refs = [r for r in result["references"] if r["metric"] == metric]
    if refs:
        ref = refs[0]
        text += f"{sep}(ref {ref['value']:g}" + ("" if ref["same_procedure"] else f" @ {ref['measured']}") + ")"
    return text


def plural(n: int, noun: str) -> str:
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


def human_params(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n < 100e6 else f"{n / 1e6:.0f}M"


def data_lines(report: dict) -> list[str]:
    """A line for each data set a report scored: its key, what it is, its rows and tokens."""
    return [f"{d['key']}: {d['description']}, {plural(d['rows'], 'row')}"
            + (f", {plural(d['tokens'], 'token')}" if "tokens" in d else "") for d in report["data"]]


def notes(report: dict) -> list[str]:
    method = report["method"]
    lines = data_lines(report)
    if method.get("rule", "strided") == "strided":
        lines.append(f"context: {method['context']}; stride: {method['stride']} (sliding window, each token scored "
                     f"once with at least context - stride tokens of history)")
    else:
        lines.append(f"context: {method['context']}; rolling windows (lm-evaluation-harness loglikelihood_rolling: "
                     f"every token scored, the first from <|endoftext|>, disjoint windows of the context)")
    lines.append("loss: nats per token; bits/byte: loss / ln 2 x tokens / UTF-8 bytes (fair across tokenizers); "
                 "word ppl: exp(loss x tokens / words); byte ppl: exp(loss x tokens / bytes)")
    if any(d["key"] == "lambada" for d in report["data"]):
        lines.append("lambada: " + ("context = text up to the last space, target = space + last word; acc = every "
                                    "target token greedy, ppl = exp(mean target nll) (lm-evaluation-harness)"
                                    if method["lambada_rule"] == "word" else
                                    "last-token rule (OpenAI's GPT-2 evaluation, easier): only the final BPE token "
                                    "is predicted; not comparable with whole-word figures"))
    sources = {}
    for row in report["models"]:
        for result in row.get("results", {}).values():
            for ref in result["references"]:
                sources.setdefault(ref["source"], ref["how"])
    lines += [f"ref: {how} -- {source}" for source, how in sources.items()]
    return lines


LONG_COLUMNS = (("loss", "loss", ".4f"), ("ppl", "ppl", ".2f"), ("bits/byte", "bits_per_byte", ".4f"),
                ("word ppl", "word_ppl", ".2f"), ("byte ppl", "byte_ppl", ".4f"), ("acc", "acc", ".4f"))


def render_table(report: dict, console) -> None:
    """The terminal table: a row per model and data set, so that it fits however many sets there are."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    keys = [d["key"] for d in report["data"]]
    shown_cols = [c for c in LONG_COLUMNS if (c[1] != "word_ppl" or any(k.startswith("wikitext") for k in keys))
                  and (c[1] != "byte_ppl" or "wikitext" in keys)
                  and (c[1] != "acc" or "lambada" in keys) and (c[1] not in ("loss", "bits_per_byte") or
                                                                 any(k != "lambada" for k in keys))]
    table = Table(title="nanoplay eval", box=box.SIMPLE_HEAD, padding=(0, 1), collapse_padding=True)
    table.add_column("model", overflow="fold", min_width=10)
    for name in ("params", "ctx/stride"):
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("data", overflow="fold", min_width=10)
    for name, _, _ in shown_cols:  # numbers fold rather than vanish in a narrow terminal
        table.add_column(name, justify="right", overflow="fold")
    failed = []
    for row in report["models"]:
        if "error" in row:
            failed.append(row)
            table.add_row(row["model"], "", "", "[red]error (below)[/red]")
            continue
        for i, d in enumerate(report["data"]):
            key = d["key"]
            shown = {"lambada": ("ppl", "acc")}.get(key, ("loss", "ppl", "bits_per_byte") +
                                                    (("word_ppl",) if key.startswith("wikitext") else ()) +
                                                    (("byte_ppl",) if key == "wikitext" else ()))
            label = key + (" (last token)" if key == "lambada" and report["method"]["lambada_rule"] != "word" else "")
            first = i == 0
            table.add_row(row["model"] if first else "", human_params(row["params"]) if first else "",
                          f"{row['context']}/{row['stride'] or 'rolling'}" if first else "", label,
                          *(cell(row, key, metric, fmt, sep="\n") if metric in shown else ""
                            for _, metric, fmt in shown_cols), end_section=i == len(report["data"]) - 1)
    console.print(table)
    for row in failed:
        console.print(Text(f"{row['model']}: {row['error']}", style="red"))  # never as markup
    for line in notes(report):  # below the table, not its caption: rich would crop a caption to the table's width
        console.print(line, highlight=False)


def render_markdown(report: dict) -> str:
    cols = columns(report)
    header = ["model", "params", "ctx", "stride", *(c[0] for c in cols)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in report["models"]:
        if "error" in row and not row.get("results"):
            cells = [row["model"], "", "", "", f"error: {row['error']}"] + [""] * (len(cols) - 1)
        else:
            cells = [row["model"], human_params(row["params"]), str(row["context"]), str(row["stride"] or "rolling"),
                     *(cell(row, key, metric, fmt) for _, key, metric, fmt in cols)]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    lines.append("")
    lines += [f"- {line}" for line in notes(report)]
    return "\n".join(lines)
