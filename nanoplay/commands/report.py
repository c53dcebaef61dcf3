"""`nanoplay report`: every step of a run beside reference models, as a table, plots, Markdown and JSON."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from ..errors import NanoplayError
from .common import DTYPES, MEASURED_DTYPE_HELP, resolve_device, stdout_console, torch_dtype
from .eval import check_scoring_options, data_lines, human_params, load_data_sets

DEFAULT_DATA = ["openwebtext", "lambada"]


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "report", help="how a run got where it is: every step (and --vs models) on the same data, a table, plots, "
                       "a fitted trend")
    p.add_argument("target", metavar="RUN[@STEPS]",
                   help="a local run (every saved step), RUN@all, RUN@1000,2000, RUN@1000-5000 (every saved step in "
                        "the range), or any model spec")
    p.add_argument("--vs", action="append", default=[], metavar="SPEC",
                   help="a model to compare with (repeatable), e.g. gpt2, gpt2-medium")
    p.add_argument("--data", "-d", action="append", metavar="SET",
                   help=f"as for nanoplay eval (repeatable; default: {' '.join(DEFAULT_DATA)})")
    p.add_argument("--rule", choices=("strided", "rolling"), default="strided",
                   help="perplexity rule: strided sliding window (--stride) or lm-evaluation-harness's rolling windows")
    p.add_argument("--stride", type=int, help="strided rule's stride in tokens (default: half each model's context)")
    p.add_argument("--no-eot-prefix", action="store_true",
                   help="strided rule: leave the data's first token unscored (the HF perplexity guide) instead of "
                        "predicting it from <|endoftext|>, as eval's flag")
    p.add_argument("--lambada-rule", choices=("word", "last-token"), default="word")
    p.add_argument("--limit", type=int, metavar="N", help="only the first N rows (documents, examples) of each set")
    p.add_argument("--batch-size", type=int, help="sequences per forward (default: about 8k tokens' worth)")
    p.add_argument("--text-column", help="the text column of a local file or Hub data set (default: text)")
    p.add_argument("--split", choices=("train", "val", "all"), help="as for nanoplay eval")
    p.add_argument("--val-fraction", type=float, help="the --val-fraction the run was trained with, if not the default")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when there is a GPU, else cpu)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help=MEASURED_DTYPE_HELP)
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="where report.md, report.png/.svg and report.json go (default: checkpoints/RUN/report, "
                        "or ./nanoplay-report for a single model)")
    p.add_argument("--no-cache", action="store_true", help="score everything again (and do not store the scores)")
    p.add_argument("--json", action="store_true", help="the whole report as one JSON object on stdout")
    p.add_argument("--no-plot", action="store_true", help="no plots in the terminal")
    p.set_defaults(run=run)


def run(args) -> int:
    from rich.console import Console

    from .. import report as rp

    check_scoring_options(args)
    subjects, run_dir = rp.resolve_subjects(args.target, args.vs)
    device = resolve_device(args.device)
    dtype = torch_dtype(args.dtype, device)
    err = Console(stderr=True)
    data = load_data_sets(args, DEFAULT_DATA, err)
    out = report_folder(args.out or (run_dir / "report" if run_dir else Path("nanoplay-report")))
    settings = rp.Settings(rule=args.rule, stride=args.stride, lambada_rule=args.lambada_rule,
                           eot_prefix=not args.no_eot_prefix,
                           dtype=str(dtype).removeprefix("torch."),
                           batch_size=args.batch_size)
    with ScoringProgress(err, len(subjects)) as progress:
        report = rp.build(subjects, data, settings, device=device, dtype=dtype, run_dir=run_dir,
                          cache=rp.ScoreCache(enabled=not args.no_cache), on_start=progress.start,
                          on_progress=progress.advance, on_model_done=progress.model_done)
    report["files"] = write_files(report, out, err)
    if args.json:
        print(json.dumps(_finite(report), indent=2))
    else:
        console = stdout_console()
        render_table(report, console)
        if not args.no_plot and report["trend"].get("data"):
            from ..plots import terminal

            console.print(terminal(report, width=min(console.width, 120), color=console.is_terminal),
                          markup=False, highlight=False)
        for line in summary(report):
            console.print(line, markup=False, highlight=False)
    return 2 if any("error" in c for c in report["columns"]) else 0


class ScoringProgress:
    """A bar over every token still to score (cached results cost nothing), with its ETA; in a log, a line per model."""

    def __init__(self, console, n_models: int):
        from rich.progress import (
            BarColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.console, self.n_models, self.done_models = console, n_models, 0
        self.progress = Progress(TextColumn("scoring"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                                 TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"),
                                 TimeRemainingColumn(), console=console, transient=True,
                                 disable=not console.is_terminal)
        self.task, self.units, self.total, self.seconds = None, 0, 0, 0.0

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def start(self, total: int) -> None:
        self.total = total
        self.task = self.progress.add_task("scoring", total=max(total, 1), rate="")

    def advance(self, units: int, tokens: int) -> None:
        self.units += units
        self.progress.update(self.task, advance=units)

    def model_done(self, subject, seconds: float, scored: list[str]) -> None:
        self.done_models += 1
        if scored and subject.kind == "step":
            self.seconds += seconds
        if not self.console.is_terminal and scored:  # no bar in a log: a line with the ETA instead
            left = (self.total - self.units) * self.seconds / self.units if self.units else float("nan")
            eta = f", about {left:.0f} s of scoring left" if math.isfinite(left) else ""
            self.console.print(f"[{self.done_models}/{self.n_models}] {subject.label}: scored {', '.join(scored)} in "
                               f"{seconds:.1f} s{eta}", markup=False, highlight=False)


def report_folder(out: Path) -> Path:
    """The folder the report goes into, made before anything is scored: a file in its place, or a
    folder that cannot be made or written, is one line naming it, not a traceback after the scoring."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise NanoplayError(f"--out {out} is a file, not a folder: give a folder for report.md, report.json "
                            f"and the images") from None
    except OSError as e:
        raise NanoplayError(f"--out {out}: cannot make the folder ({e.strerror}); give another") from e
    if not os.access(out, os.W_OK | os.X_OK):
        raise NanoplayError(f"--out {out}: the folder is not writable; give another")
    return out


def write_files(report: dict, out: Path, console) -> dict:
    """report.json, report.md and the images (when matplotlib is there) in `out`, each written atomically."""
    from ..atomic import write_file_atomically

    files = {}
    try:
        from ..plots import write_images

        files["images"] = [str(p) for p in write_images(report, out / "report")] if report["trend"].get("data") else []
    except ImportError:
        from ..plots import MATPLOTLIB_HINT

        files["images"] = []
        console.print(f"no images: {MATPLOTLIB_HINT}", markup=False, highlight=False)
    files["markdown"] = str(write_file_atomically(out / "report.md", render_markdown(report, bool(files["images"]))))
    files["json"] = str(out / "report.json")
    write_file_atomically(out / "report.json", json.dumps(_finite({**report, "files": files}), indent=2) + "\n")
    return files


# -----------------------------------------------------------------------------
# the table: a row per figure, a column per step and per --vs model, the published figures last


def table_rows(report: dict) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """(headers, [(row label, cells)]): what both the terminal table and the Markdown show."""
    from ..plots import short_name

    cols = report["columns"]
    headers = ["", *(c["label"] for c in cols), "published"]

    def row(label, fn, published=""):
        return label, [("error" if "error" in c and not c.get("results") else fn(c)) for c in cols] + [published]

    rows = [
        row("parameters (non-embedding)", lambda c: _params(c.get("params_non_embedding"))),
        row("parameters (all)", lambda c: _params(c.get("params")), "gpt2 124M · medium 355M · large 774M · xl 1.56B"),
        row("context", lambda c: str(c.get("context", "")), "1024"),
        row("training tokens", lambda c: _tokens(c.get("training_tokens"))),
    ]
    for d in report["data"]:
        key = d["key"]
        if "tokens" not in d:
            metrics = (("acc", ".4f"), ("ppl", ".2f"))
        else:
            metrics = (("loss", ".4f"), ("ppl", ".2f"), ("bits_per_byte", ".4f"))
            metrics += (("word_ppl", ".2f"),) if key.startswith("wikitext") else ()
            metrics += (("byte_ppl", ".4f"),) if key == "wikitext" else ()
        for metric, fmt in metrics:
            rows.append(row(f"{short_name(key)} {metric.replace('_', ' ')}", lambda c, k=key, m=metric, f=fmt: _value(c, k, m, f),
                            _published(report, key, metric)))
    return headers, rows


def _params(n) -> str:
    return human_params(n) if n else ""


def _tokens(n) -> str:
    if not n:
        return ""
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"


def _value(column: dict, key: str, metric: str, fmt: str) -> str:
    result = column.get("results", {}).get(key)
    if result is None or metric not in result:
        return ""
    value = result[metric]
    return f"{value:.3g}" if abs(value) >= 1e5 else format(value, fmt)


def _published(report: dict, key: str, metric: str) -> str:
    """The published figures for a row, for whichever model, each with how it was measured."""
    from .. import evaluation as ev

    lambada_rule = report["method"]["lambada_rule"]
    return " · ".join(f"{ref.models[0]} {ref.value:g} ({ref.label()})" for ref in ev.REFERENCES
                      if ref.data == key and ref.metric == metric and (key != "lambada" or ref.rule == lambada_rule))


def render_table(report: dict, console) -> None:
    from rich import box
    from rich.table import Table
    from rich.text import Text

    headers, rows = table_rows(report)
    title = f"nanoplay report: {report['run']}" if report["run"] else "nanoplay report"
    table = Table(title=title, box=box.SIMPLE_HEAD, padding=(0, 1), collapse_padding=True)
    table.add_column("", overflow="fold", min_width=12)
    for h in headers[1:-1]:
        table.add_column(Text(h), justify="right", overflow="fold")
    table.add_column("published", overflow="fold", style="dim")
    for label, cells in rows:
        table.add_row(Text(label), *(Text(c) for c in cells))
    console.print(table)
    for c in report["columns"]:
        if "error" in c:
            console.print(Text(f"{c['label']}: {c['error']}", style="red"))


def summary(report: dict) -> list[str]:
    """The lines under the table: the data, how it was scored, the trend, and where the files went."""
    method = report["method"]
    lines = data_lines(report)
    if method["rule"] == "strided":
        lines.append(f"every column scored alike: each model's own context, stride {method['stride']} (sliding window)")
    else:
        lines.append("every column scored alike: each model's own context, lm-evaluation-harness rolling windows "
                     "(every token, the first from <|endoftext|>)")
    lines.append("parameters: all counts the tied embedding once; non-embedding leaves out the position embeddings "
                 "(nanoGPT's count). training tokens: the trainer's own count")
    lines += trend_lines(report["trend"])
    files = report.get("files", {})
    if files:
        lines.append("written: " + ", ".join([files["markdown"], *files.get("images", []), files["json"]]))
    return lines


def trend_lines(trend: dict) -> list[str]:
    if trend.get("data") is None:
        return []
    if "error" in trend:
        return [f"trend: not fitted: {trend['error']}"]
    loo = f", leave-one-out RMS {trend['loo_rms']:.4f}" if trend.get("loo_rms") is not None else ""
    from ..plots import short_name

    lines = [(f"trend (an extrapolation, not a promise): {short_name(trend['data'])} loss L(D) = {trend['E']:.3f} + "
              f"{trend['A']:.4g} x D^-{trend['alpha']:.3f} over D training tokens, fitted to {trend['points']} steps; "
              f"residual RMS {trend['residual_rms']:.4f}{loo}")]
    for e in trend["extrapolation"]:
        lines.append(f"  {e['multiple']}x the iterations (step {e['step']:,}, {_tokens(e['training_tokens'])} tokens): "
                     f"loss about {e['loss']:.3f}")
    return lines


def render_markdown(report: dict, with_image: bool) -> str:
    headers, rows = table_rows(report)
    esc = lambda text: text.replace("|", "\\|")
    lines = [f"# nanoplay report: {report['run'] or report['columns'][0]['label']}", ""]
    lines += ["| " + " | ".join(esc(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(esc(x) for x in [label, *cells]) + " |" for label, cells in rows]
    lines.append("")
    if with_image:
        lines += ["![validation loss against step and training tokens](report.png)", ""]
    lines += [f"- {esc(line.strip())}" for line in summary({**report, "files": {}})]
    lines += [f"- {c['label']}: error: {esc(c['error'])}" for c in report["columns"] if "error" in c]
    return "\n".join(lines) + "\n"


def _finite(value):
    """Strict JSON: non-finite numbers (an untrained model's overflowing perplexity) become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
