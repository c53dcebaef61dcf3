"""Our GPT as a Hugging Face transformers GPT-2 directory (config.json + model.safetensors)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

from .checkpoint import write_dir_atomically
from .errors import NanoplayError
from .loading import CONV1D_WEIGHTS
from .model import GPT

HF_ACTIVATION = {"gelu_tanh": "gelu_new", "gelu": "gelu"}
EXPORTED_FILES = {"config.json", "generation_config.json", "model.safetensors"}  # what save_pretrained writes


def export_target(directory: Path) -> Path:
    """The folder to export into: new, empty, or an earlier export (replaced). Anything else is refused."""
    directory = Path(directory).expanduser().resolve()
    if directory.exists() and not directory.is_dir():
        raise NanoplayError(f"{directory} is a file, not a folder: give a new or empty folder to export into")
    if directory.is_dir():
        others = sorted(p.name for p in directory.iterdir() if p.name not in EXPORTED_FILES)
        if others:
            listed = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
            raise NanoplayError(f"{directory} already holds other files ({listed}): give a new or empty folder "
                                "to export into (only an earlier export is replaced)")
    return directory


def export_hf(model: GPT, directory: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    directory = export_target(directory)
    cfg = model.config
    hf_config = GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
        n_head=cfg.n_head, layer_norm_epsilon=cfg.layer_norm_epsilon,
        activation_function=HF_ACTIVATION[cfg.activation], tie_word_embeddings=True,
    )
    hf_model = GPT2LMHeadModel(hf_config)
    ours = model.state_dict()  # the same parameter names as transformers' GPT-2
    params = dict(hf_model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name, param in params.items():
            if name in ours:
                value = ours[name].detach().float().cpu()
                param.copy_(value.t() if name.endswith(CONV1D_WEIGHTS) else value)
            else:  # GPT-2 always has biases; those of a bias=False model are zero
                param.zero_()
    with transformers_quiet():
        write_dir_atomically(directory, lambda tmp: hf_model.save_pretrained(tmp))
    return directory


@contextmanager
def transformers_quiet():
    """No transformers progress bars meanwhile: saving or loading a local model is quick, and we report it."""
    from transformers.utils import logging

    enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            logging.enable_progress_bar()
