"""
nanoplay's checkpoint format: a directory holding `config.json` and `model.safetensors`.

A training run lives in `checkpoints/NAME/` with one such directory per saved step
(`step-00002000/`); the trainer keeps its optimizer state in a separate file beside the weights
(`training_state.pt`), which loading never reads. Directories are written to a temporary sibling
and renamed into place (nanoplay.atomic), so a crash mid-write never leaves a half-written checkpoint
behind. The output head is stored only when it is not tied to the input embedding.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .atomic import write_dir_atomically
from .errors import NanoplayError
from .model import GPT, GPTConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "nanoplay"
STEP_DIR = re.compile(r"^step-(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def is_checkpoint_dir(path: Path) -> bool:
    """A directory of ours holding one checkpoint (not a run with steps)."""
    config = path / CONFIG_FILE
    if not (config.is_file() and (path / WEIGHTS_FILE).is_file()):
        return False
    try:
        return json.loads(config.read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def list_steps(run_dir: Path) -> dict[int, Path]:
    """Complete step checkpoints of a run directory, by step."""
    steps = {}
    if run_dir.is_dir():
        for child in run_dir.iterdir():
            m = STEP_DIR.match(child.name)
            if m and is_checkpoint_dir(child):
                steps[int(m.group(1))] = child
    return dict(sorted(steps.items()))


def save_checkpoint(model: GPT, directory: Path, *, step: int | None = None, meta: dict | None = None) -> Path:
    """Write model weights + config to `directory` atomically. `meta` adds keys to config.json."""
    config = {"format": FORMAT, "model": model.config.to_dict(), "tokenizer": "gpt2", "step": step}
    config.update(meta or {})
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        del state["lm_head.weight"]  # the same tensor as transformer.wte.weight: stored once

    def write(tmp: Path):
        save_file(state, tmp / WEIGHTS_FILE, metadata={"nanoplay_config": json.dumps(model.config.to_dict())})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")

    return write_dir_atomically(Path(directory), write)


def read_config(directory: Path) -> dict:
    return read_json(Path(directory) / CONFIG_FILE)


def read_json(path: Path) -> dict:
    """A checkpoint's JSON file (ours, or a Hugging Face config.json); damage is one clear line."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise NanoplayError(f"{path} is unreadable or not JSON ({e}): the checkpoint is damaged; re-save, "
                            f"re-export or re-download it") from e


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Memory-mapped load; a truncated or corrupt file gets a clear error."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise NanoplayError(f"{path} is truncated or corrupt ({e}): re-download or re-save it") from e


# the config values a weight's shape follows, named in the message when they disagree
SHAPE_SETTINGS = {"transformer.wte.weight": "vocab_size", "lm_head.weight": "vocab_size",
                  "transformer.wpe.weight": "the context length (n_positions / block_size)"}


def config_from_dict(d: dict, where: str) -> GPTConfig:
    """Our config.json's model section (or a safetensors header's) -> GPTConfig; anything unknown is refused."""
    try:
        return GPTConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise NanoplayError(f"{where}: {e}") from e


def build_model(config: GPTConfig, state: dict[str, torch.Tensor], source: str) -> GPT:
    """
    A GPT from a nanoGPT-named state dict, without spending time on a random init first. A tied model
    takes its output head from transformer.wte.weight (an lm_head.weight in the file is ignored, as
    transformers does); an untied one must have its own lm_head.weight.
    """
    with torch.device("meta"):
        model = GPT(config)
    state = dict(state)
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state.get("transformer.wte.weight")
    elif "lm_head.weight" not in state:
        raise NanoplayError(f"{source}: its config says the output head is not tied to the input embedding "
                            f"(tie_word_embeddings false), but it holds no lm_head.weight")
    expected = set(model.state_dict().keys())
    missing = sorted(k for k in expected if state.get(k) is None)
    unexpected = sorted(state.keys() - expected)
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise NanoplayError(f"{source} does not hold a GPT-2-architecture model matching its config ({detail})")
    for name, tensor in model.state_dict().items():
        if state[name].shape != tensor.shape:
            setting = f" (the config's {SHAPE_SETTINGS[name]} does not match the weights)" if name in SHAPE_SETTINGS else ""
            raise NanoplayError(f"{source}: {name} has shape {tuple(state[name].shape)}, config expects "
                                f"{tuple(tensor.shape)}{setting}")
    model.load_state_dict(state, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.transformer.wte.weight  # assign=True broke the tie
    return model.eval()


def load_checkpoint_dir(directory: Path) -> tuple[GPT, dict]:
    """Our checkpoint directory -> (model on CPU, its config.json)."""
    directory = Path(directory)
    meta = read_config(directory)
    if meta.get("format") != FORMAT or "model" not in meta:
        raise NanoplayError(f"{directory} is not a nanoplay checkpoint (its config.json has no model section)")
    state = load_safetensors(directory / WEIGHTS_FILE)
    return build_model(config_from_dict(meta["model"], str(directory)), state, str(directory)), meta
