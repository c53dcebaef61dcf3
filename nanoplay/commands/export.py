"""`nanoplay export SPEC --hf DIR --gguf FILE`: a model for transformers and for llama.cpp."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from ..errors import NanoplayError

GGUF_TYPES = ("f32", "f16", "q8_0")  # nanoplay.gguf_format.FILE_TYPES, without importing it to parse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="write a model as a Hugging Face transformers directory and/or a llama.cpp GGUF file",
        description="Write a model for other tools: --hf for transformers (weights, config, tokenizer, generation "
                    "config), --gguf for llama.cpp. Give either or both; the model is loaded once.")
    p.add_argument("spec", help="model spec to export")
    p.add_argument("--hf", type=Path, metavar="DIR",
                   help="Hugging Face folder: new, empty, or an earlier export (replaced)")
    p.add_argument("--gguf", type=Path, metavar="FILE",
                   help="GGUF file for llama.cpp (name ending in .gguf): new, or an earlier GGUF file (replaced)")
    p.add_argument("--gguf-type", choices=GGUF_TYPES, default=None,
                   help="GGUF weight type: f32 (exact, the default), f16 (half the size), q8_0 (about a third)")
    p.set_defaults(run=run)


def run(args) -> int:
    if args.hf is None and args.gguf is None:
        raise NanoplayError("nothing to export: give --hf DIR, --gguf FILE, or both")
    if args.gguf_type is not None and args.gguf is None:
        raise NanoplayError("--gguf-type applies to a GGUF export: give --gguf FILE too")
    from ..export import export_hf, export_target
    from ..gguf_format import gguf_target, llama_cpp_note, write_gguf
    from ..loading import load_model

    # targets first: a refused folder or file should not cost a load
    if args.hf is not None:
        export_target(args.hf)
    if args.gguf is not None:
        gguf_target(args.gguf)
    try:
        loaded = load_model(args.spec)
    except NanoplayError:
        raise
    except Exception as e:  # whatever a loader raised (a damaged file, say): one line, exit 2
        reason = str(e).splitlines()[0] if str(e) else ""
        raise NanoplayError(f"cannot load model {args.spec!r}: {type(e).__name__}: {reason}") from e
    if args.hf is not None:
        directory = export_hf(loaded.model, args.hf, chat_template=loaded.chat_template)
        print(f"exported {loaded.name} to {directory} (transformers: from_pretrained, pipeline)")
    if args.gguf is not None:
        gguf_type = args.gguf_type or "f32"
        path = write_gguf(loaded.model, args.gguf, gguf_type, chat_template=loaded.chat_template, name=loaded.name)
        size = path.stat().st_size / 1e6
        print(f"exported {loaded.name} to {path} (GGUF {gguf_type.upper()}, {size:.1f} MB; llama.cpp: "
              f"llama-cli -m {shlex.quote(str(path))})")
        note = llama_cpp_note(loaded.config)
        if note:
            print(f"nanoplay: note: {note}", file=sys.stderr)
    return 0
