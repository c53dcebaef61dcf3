"""
Training configuration: one flat dataclass, read from a preset or a user's TOML file, overridden by flags.

A config file has sections ([model], [data], [optim], [run]) only to be readable; every key is a
field of TrainConfig, and every field is also a command-line flag (`max_iters` -> `--max-iters`).
`nanoplay train --preset owt-30m --print-config > my.toml` writes a file to copy and edit.
"""

from __future__ import annotations

import argparse
import math
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from nanoplay.errors import NanoplayError

PRESETS_DIR = Path(__file__).parent / "presets"
GPT2_VOCAB = 50257  # the tokenizer's ids, <|endoftext|> last; chat fine-tuning pads to 50304 for its special tokens


@dataclass
class TrainConfig:
    # [model] the shape of a model trained from scratch; `init` starts from an existing one instead
    n_layer: int = field(default=6, metadata={"section": "model"})
    n_head: int = field(default=6, metadata={"section": "model"})
    n_embd: int = field(default=384, metadata={"section": "model"})
    block_size: int = field(default=512, metadata={"section": "model"})
    vocab_size: int = field(default=50304, metadata={"section": "model"})
    dropout: float = field(default=0.0, metadata={"section": "model"})
    bias: bool = field(default=True, metadata={"section": "model"})
    activation: str = field(default="gelu_tanh", metadata={"section": "model"})
    init: str = field(default="", metadata={"section": "model", "help": "model spec to start from (e.g. gpt2)"})
    # [data]
    data: str = field(default="openwebtext", metadata={"section": "data"})
    text_column: str = field(default="", metadata={"section": "data", "help": "default: 'text' or the only string column"})
    val_fraction: float = field(default=0.0, metadata={"section": "data", "help": (
        "held-out share; 0: the source's default (openwebtext 0.0005 as nanoGPT, pydoc-topics 0.1, "
        "other data about 100 kB of its text, 0.05%% to 10%% of it)")})
    num_proc: int = field(default=0, metadata={"section": "data", "help": "tokenizer processes (0: one per CPU for large data)"})
    # [optim]
    batch_size: int = field(default=16, metadata={"section": "optim"})
    gradient_accumulation_steps: int = field(default=4, metadata={"section": "optim"})
    max_iters: int = field(default=20000, metadata={"section": "optim"})
    epochs: float = field(default=0.0, metadata={"section": "optim", "help": "fine-tuning: passes over the data (sets max_iters)"})
    min_iters: int = field(default=0, metadata={"section": "optim", "help": (
        "fine-tuning: at least this many steps when epochs sets max_iters (a small set needs many passes)")})
    learning_rate: float = field(default=1e-3, metadata={"section": "optim"})
    min_lr: float = field(default=1e-4, metadata={"section": "optim"})
    warmup_iters: int = field(default=500, metadata={"section": "optim"})
    lr_decay_iters: int = field(default=0, metadata={"section": "optim", "help": "0: max_iters"})
    weight_decay: float = field(default=0.1, metadata={"section": "optim"})
    beta1: float = field(default=0.9, metadata={"section": "optim"})
    beta2: float = field(default=0.95, metadata={"section": "optim"})
    grad_clip: float = field(default=1.0, metadata={"section": "optim", "help": "0: no clipping"})
    # [run]
    name: str = field(default="", metadata={"section": "run", "help": "run name under checkpoints/ (default: the preset's or config file's name)"})
    seed: int = field(default=1337, metadata={"section": "run"})
    eval_interval: int = field(default=500, metadata={"section": "run"})
    eval_batches: int = field(default=50, metadata={"section": "run"})
    checkpoint_interval: int = field(default=2000, metadata={"section": "run", "help": "0: only at the end"})
    keep_last: int = field(default=3, metadata={"section": "run"})
    log_interval: int = field(default=10, metadata={"section": "run"})
    sample_tokens: int = field(default=40, metadata={"section": "run", "help": "sample length printed at each evaluation (0: none)"})
    device: str = field(default="auto", metadata={"section": "run", "help": "auto, cpu or cuda[:N]"})
    dtype: str = field(default="auto", metadata={"section": "run", "help": "auto (bf16 autocast on CUDA, fp32 on CPU), float32, bfloat16"})
    compile: bool = field(default=True, metadata={"section": "run", "help": "torch.compile on CUDA"})
    tensorboard: bool = field(default=False, metadata={"section": "run", "help": "also write TensorBoard logs"})

    def __post_init__(self):
        """Every value is checked here, before anything is loaded: one line naming the key and what it takes."""
        from nanoplay.model import ACTIVATIONS  # imports torch: not at the top, so building the CLI stays fast

        for f in fields(self):  # finite first: NaN passes `< 0` and fails `> 0`, and inf passes both
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise NanoplayError(f"{f.name} must be a finite number, not {value}")
        for name in ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "gradient_accumulation_steps",
                     "max_iters", "log_interval"):
            if getattr(self, name) < 1:
                raise NanoplayError(f"{name} must be at least 1, not {getattr(self, name)}")
        for name in ("warmup_iters", "lr_decay_iters", "epochs", "min_iters", "min_lr", "weight_decay", "grad_clip", "num_proc",
                     "seed", "eval_interval", "eval_batches", "checkpoint_interval", "keep_last", "sample_tokens"):
            if getattr(self, name) < 0:
                raise NanoplayError(f"{name} must be 0 or more, not {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise NanoplayError(f"learning_rate must be greater than 0, not {self.learning_rate}")
        for name in ("dropout", "val_fraction", "beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise NanoplayError(f"{name} must be at least 0 and below 1, not {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise NanoplayError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.vocab_size < GPT2_VOCAB:
            raise NanoplayError(f"vocab_size {self.vocab_size} is smaller than the GPT-2 tokenizer's {GPT2_VOCAB} "
                                f"tokens: use 50304 (padded to a multiple of 64, the default) or {GPT2_VOCAB}")
        if self.activation not in ACTIVATIONS:
            raise NanoplayError(f"activation {self.activation!r}: use {' or '.join(ACTIVATIONS)}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise NanoplayError(f"dtype {self.dtype!r}: use auto, float32 or bfloat16")
        if self.name:  # empty: finetune names the run after its --init; train() refuses it
            check_run_name(self.name)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_toml(self, notes: dict[str, str] | None = None) -> str:
        """The config as TOML; `notes` are comments, by section (under its header) or by key (after it)."""
        notes = notes or {}
        lines, section = [], None
        for f in fields(self):
            if f.metadata["section"] != section:
                section = f.metadata["section"]
                lines.append(f"{'' if not lines else chr(10)}[{section}]")
                if section in notes:
                    lines.append(f"# {notes[section]}")
            note = f"  # {notes[f.name]}" if f.name in notes else ""
            lines.append(f"{f.name} = {_toml_value(getattr(self, f.name))}{note}")
        return "\n".join(lines) + "\n"


def check_run_name(name: str) -> None:
    """A run is one folder under checkpoints/, and `name@step` picks a step: a name is one plain path component."""
    if (not name or name.startswith(".") or any(c in name for c in "/\\@") or name != name.strip()
            or not name.isprintable()):
        raise NanoplayError(f"run name {name!r}: use one plain folder name such as my-run "
                            f"(no /, \\ or @, not empty, not starting with a dot)")


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(v)


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.toml"))


def read_config_file(path: Path) -> dict:
    """A TOML file -> flat {field: value}; unknown keys and wrong types are refused by name."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise NanoplayError(f"config {path}: {e}") from e
    known = {f.name: f for f in fields(TrainConfig)}
    flat = {}
    for section, values in data.items():
        items = values.items() if isinstance(values, dict) else [(section, values)]
        for key, value in items:
            if key not in known:
                raise NanoplayError(f"config {path}: unknown key {key!r}; see `nanoplay train --print-config` for the keys")
            default = known[key].default
            if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if type(value) is not type(default):
                raise NanoplayError(f"config {path}: {key} must be a {type(default).__name__}, not {value!r}")
            flat[key] = value
    return flat


def load_config(preset: str | None = None, config_file: str | None = None, overrides: dict | None = None) -> TrainConfig:
    """Preset (by name) or config file, then flag overrides; the run is named after the preset/file."""
    if preset and config_file:
        raise NanoplayError("give --preset or --config, not both")
    if config_file:
        path = Path(config_file)
    else:
        preset = preset or "owt-30m"
        path = PRESETS_DIR / f"{preset}.toml"
        if not path.is_file():
            raise NanoplayError(f"unknown preset {preset!r}; presets: {', '.join(preset_names())}")
    values = {"name": path.stem, **read_config_file(path)}
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return TrainConfig(**values)


def load_preset(preset: str, **overrides) -> TrainConfig:
    """A preset by name with some fields changed: load_preset("demo", max_iters=100)."""
    return load_config(preset=preset, overrides=overrides)


def add_config_flags(parser: argparse.ArgumentParser, sections=("model", "data", "optim", "run"),
                     help_texts: dict[str, str] | None = None) -> None:
    """One flag per field of the given sections, default None so only given flags override; `help_texts` replace some help."""
    for f in fields(TrainConfig):
        if f.metadata["section"] not in sections:
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = (help_texts or {}).get(f.name, f.metadata.get("help"))
        if isinstance(f.default, bool):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, type=type(f.default), default=None, metavar=f.name.upper(),
                                help=help_text)


def overrides_from_args(args: argparse.Namespace) -> dict:
    return {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name, None) is not None}
