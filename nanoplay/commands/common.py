"""Options shared by the subcommands that load models."""

from __future__ import annotations

import argparse

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


def add_model_options(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--model", "-m", action="append", required=required, metavar="SPEC",
                        help="model spec (repeatable): checkpoint name[@step], path, or Hub id like gpt2")
    parser.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cpu)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="weights and compute precision")


def torch_dtype(name: str):
    import torch

    return getattr(torch, DTYPES[name])


def resolve_device(name: str | None) -> str:
    """CPU by default: the product's promise is that everything works there."""
    import torch

    from ..errors import NanoplayError

    if name is None or name == "cpu":
        return "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise NanoplayError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return name
