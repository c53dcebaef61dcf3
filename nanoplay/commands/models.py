"""`nanoplay models` (what is available locally) and `nanoplay pull` (download ahead of time)."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser("models", help="list local checkpoints and cached Hub models, with sizes")
    p.set_defaults(run=run_models)
    p = subparsers.add_parser("pull", help="download a Hub model (config + safetensors) into the HF cache")
    p.add_argument("repo", nargs="+", help="Hub id, e.g. gpt2-medium or owner/repo[@revision]")
    p.set_defaults(run=run_pull)


def human_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def run_models(args) -> int:
    from rich.table import Table

    from ..loading import GPT2_FAMILY, checkpoints_root, list_local_models
    from .common import stdout_console

    models = list_local_models()
    table = Table(title=f"Local models (checkpoints: {checkpoints_root()}/, and the Hugging Face cache)")
    for col in ("spec", "kind", "size", "steps", "shape"):
        table.add_column(col)
    for m in models:
        steps = ", ".join(map(str, m.steps[-5:])) + (" …" if len(m.steps) > 5 else "")
        table.add_row(m.spec, m.kind, human_size(m.size_bytes), steps, m.detail)
    console = stdout_console()
    if models:
        console.print(table)
    else:
        console.print("No local models yet.")
    missing = [name for name in GPT2_FAMILY if name not in {m.spec for m in models}]
    if missing:
        console.print(f"Not downloaded: {', '.join(missing)} (`nanoplay pull NAME` where you have network)")
    return 0


def run_pull(args) -> int:
    from ..loading import hub_download

    for spec in args.repo:
        repo, _, revision = spec.partition("@")
        path = hub_download(repo, revision or None)
        print(f"{spec}: {path}")
    return 0
