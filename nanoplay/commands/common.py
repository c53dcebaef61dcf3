"""Options shared by the subcommands that load models."""

from __future__ import annotations

import argparse

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


def add_model_options(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--model", "-m", action="append", required=required, metavar="SPEC",
                        help="model spec (repeatable): checkpoint name[@step], path, or Hub id like gpt2")
    parser.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when there is a GPU, else cpu)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="weights and compute precision")


def torch_dtype(name: str):
    import torch

    return getattr(torch, DTYPES[name])


def resolve_device(name: str | None) -> str:
    """The device the command runs on: --device, or the GPU when there is one (else the CPU).
    A wrapper so that parsing the command line does not import torch."""
    from ..loading import resolve_device as resolve

    return str(resolve(name))
