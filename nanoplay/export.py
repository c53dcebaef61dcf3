"""Our GPT as a Hugging Face transformers GPT-2 directory (config.json + model.safetensors)."""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import write_dir_atomically
from .loading import CONV1D_WEIGHTS
from .model import GPT

HF_ACTIVATION = {"gelu_tanh": "gelu_new", "gelu": "gelu"}


def export_hf(model: GPT, directory: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

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
    write_dir_atomically(Path(directory), lambda tmp: hf_model.save_pretrained(tmp))
    return Path(directory)
