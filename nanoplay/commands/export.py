"""`nanoplay export SPEC --hf DIR`: a directory transformers' GPT2LMHeadModel loads with the same logits."""

from __future__ import annotations

from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="write a model as a Hugging Face transformers directory")
    p.add_argument("spec", help="model spec to export")
    p.add_argument("--hf", required=True, type=Path, metavar="DIR", help="output folder: new, empty, or an earlier export (replaced)")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..export import export_hf, export_target
    from ..loading import load_model

    export_target(args.hf)  # before loading: a refused folder should not cost a load
    loaded = load_model(args.spec)
    directory = export_hf(loaded.model, args.hf)
    print(f"exported {loaded.name} to {directory} (load with GPT2LMHeadModel.from_pretrained)")
    return 0
