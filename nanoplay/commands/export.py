"""`nanoplay export SPEC --hf DIR`: a directory transformers' GPT2LMHeadModel loads with the same logits."""

from __future__ import annotations

from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="write a model as a Hugging Face transformers directory")
    p.add_argument("spec", help="model spec to export")
    p.add_argument("--hf", required=True, type=Path, metavar="DIR", help="output directory")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..export import export_hf
    from ..loading import load_model

    loaded = load_model(args.spec)
    export_hf(loaded.model, args.hf)
    print(f"exported {loaded.name} to {args.hf} (load with GPT2LMHeadModel.from_pretrained)")
    return 0
