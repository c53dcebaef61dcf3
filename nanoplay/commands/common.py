"""Options shared by the subcommands that load models."""

from __future__ import annotations

import argparse
import json
import math
import sys
import weakref

from ..errors import NanoplayError

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16", "int8": "int8", "auto": "auto"}


MEASURED_DTYPE_HELP = "weights and compute precision (default float32, as the published figures)"
AUTO_DTYPE_HELP = "default auto: bfloat16 on CPUs with native bf16 products, else float32; int8: 8-bit weights, CPU only"


def add_model_options(parser: argparse.ArgumentParser, required: bool = True, dtypes: bool = False,
                      measures: bool = False) -> None:
    """--model, --device and --dtype; dtypes=True makes --dtype repeatable (a list, None when not given);
    measures=True (eval, report) defaults to float32 on every machine: a perplexity must not move with
    the CPU it was measured on."""
    parser.add_argument("--model", "-m", action="append", required=required, metavar="SPEC",
                        help="model spec (repeatable): checkpoint name[@step], path, or Hub id like gpt2")
    parser.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when there is a GPU, else cpu)")
    if dtypes:
        parser.add_argument("--dtype", choices=sorted(DTYPES), action="append",
                            help=f"weights and compute precision, repeatable ({AUTO_DTYPE_HELP})")
    else:
        parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32" if measures else "auto",
                            help=MEASURED_DTYPE_HELP if measures else f"weights and compute precision ({AUTO_DTYPE_HELP})")


def read_stdin() -> str:
    """Standard input as text, under nanoplay.textio's policy: UTF-8 or a one-line error naming the byte."""
    from ..textio import decode_text

    binary = getattr(sys.stdin, "buffer", None)
    return decode_text(binary.read(), "stdin") if binary is not None else sys.stdin.read()


def check_top_logprobs(count: int) -> None:
    """gen and score take the same --top-logprobs, checked before any model loads."""
    from ..sampling import MAX_TOP_LOGPROBS

    if not 0 <= count <= MAX_TOP_LOGPROBS:
        raise NanoplayError(f"--top-logprobs must be between 0 and {MAX_TOP_LOGPROBS}")


def torch_dtype(name: str, device: str = "cpu"):
    """The torch dtype a --dtype names; auto: the one `device` decodes fastest (nanoplay.precision)."""
    import torch

    if DTYPES[name] == "auto":
        from ..precision import default_dtype

        return default_dtype(device)
    return getattr(torch, DTYPES[name])


def resolve_device(name: str | None) -> str:
    """The device the command runs on: --device, or the GPU when there is one (else the CPU).
    A wrapper so that parsing the command line does not import torch."""
    from ..loading import resolve_device as resolve

    return str(resolve(name))


def stdout_console():
    """A rich console for results on stdout; piped into a file it is wide, so tables never fold or crop."""
    from rich.console import Console

    class StdoutConsole(Console):
        def on_broken_pipe(self) -> None:
            """rich exits 1 here; the command ends as any other closed pipe does (cli.closed_pipe: 141)."""
            self.quiet = True
            raise BrokenPipeError

    console = StdoutConsole()
    return console if console.is_terminal else StdoutConsole(width=1000)


def load_models(engine, specs: list[str], device: str, dtype) -> list:
    """Every model a command names, loaded before it starts. A model that fails to load is bad input,
    whatever the loader raised (a corrupt config.json, an HTTP error from the Hub): one line, exit 2."""
    models = []
    for spec in specs:
        try:
            models.append(engine.load(spec, device=device, dtype=dtype))
        except NanoplayError:
            raise
        except Exception as e:
            reason = str(e).splitlines()[0] if str(e) else ""
            raise NanoplayError(f"cannot load model {spec!r}: {type(e).__name__}: {reason}") from e
        print_notes(models[-1], _notes_shown.setdefault(engine, set()))
    return models


# the notes each engine's command has printed: bench loads a model at every precision it measures
_notes_shown: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def print_notes(loaded, shown: set | None = None) -> None:
    """What loading assumed because the file could not prove it (a nanoGPT checkpoint's GELU), on
    stderr; each line once, where `shown` holds the lines already printed."""
    for note in loaded.notes:
        line = f"note: {loaded.name}: {note}"
        if shown is None or line not in shown:
            print(line, file=sys.stderr)
        if shown is not None:
            shown.add(line)


def alternative_record(alternative) -> dict:
    """An entry of top_logprobs, shaped like the tokens themselves (as OpenAI's are): bytes too, since
    a token that is part of a UTF-8 character has no text of its own."""
    from ..tokenizer import get_tokenizer

    a = alternative
    return {"token": a.text, "id": a.id, "bytes": list(get_tokenizer().token_bytes(a.id)), "logprob": a.logprob}


def json_line(record: dict) -> str:
    """One JSONL record in strict JSON, which every parser reads: non-finite numbers (the -inf
    sampling log-probability of a token the sampling filters removed, say) are written as null."""
    return json.dumps(_finite(record), ensure_ascii=False, allow_nan=False)


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
