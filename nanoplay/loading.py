"""
Model specs -- one syntax for the CLI, the TUI and Python -- and the loaders behind them.

A spec is, in the order tried:
  1. a path: a checkpoint directory of ours (or a run directory of them), a Hugging Face-format
     directory, a nanoGPT `ckpt.pt`, a `.safetensors` file, or a `.gguf` file (llama.cpp's format);
  2. a name under the checkpoints directory (`owt-30m`, newest step; `owt-30m@2000`, that step);
  3. a Hub id (`gpt2`, `gpt2-medium`, `owner/repo`, optionally `@revision`) whose config is GPT-2.
The GPT-2 family's short names and their new homes on the Hub (`openai-community/gpt2`, ...) are
aliases: either finds a copy cached under the other.

A spec may end in `#gelu=tanh` or `#gelu=exact`: the GELU of a nanoGPT checkpoint, which nanoGPT
never records (the one architecture detail a file can leave unproven; see load_nanogpt).
"""

from __future__ import annotations

import io
import json
import os
import pickletools
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .errors import NanoplayError
from .model import ACTIVATIONS, GPT, GPTConfig
from .tokenizer import GPT2_VOCAB_SIZE

GPT2_FAMILY = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "distilgpt2")
# where the Hub moved them: a name finds a copy cached under either
HUB_ALIASES = {"gpt2": "openai-community/gpt2", "gpt2-medium": "openai-community/gpt2-medium",
               "gpt2-large": "openai-community/gpt2-large", "gpt2-xl": "openai-community/gpt2-xl",
               "distilgpt2": "distilbert/distilgpt2"}
HUB_SHORT_NAMES = {new: short for short, new in HUB_ALIASES.items()}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# transformers' activation_function -> ours: its several spellings of the two GELUs, and its other
# parameter-free activations under their own names (transformers.activations.ACT2CLS)
HF_ACTIVATIONS = {
    "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_python_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh", "gelu_accurate": "gelu_tanh",  # the tanh formula, sqrt(2/pi) rounded
    "gelu_python": "gelu", "swish": "silu",
    **{name: name for name in ACTIVATIONS if name != "gelu_tanh"},
}
HF_LEARNED_ACTIVATIONS = ("prelu", "xielu")  # activations with weights of their own, which our MLP has not
GELU_OPTIONS = {"tanh": "gelu_tanh", "exact": "gelu"}  # the spec suffix #gelu=...
NANOGPT_ARGS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")  # model_args always has these
NANOGPT_OPTIONAL_ARGS = ("bias", "dropout")  # ... and these since January 2023
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


@dataclass
class LoadedModel:
    """A model ready to run, with where it came from."""

    name: str  # short display name: owt-30m@2000, gpt2, ckpt.pt
    model: GPT
    source: str  # checkpoint | nanogpt | hf | hub | gguf
    location: str  # the path or Hub id it was read from
    step: int | None = None
    meta: dict = field(default_factory=dict)  # our config.json extras: chat template, val loss...
    # what loading assumed because the file could not prove it, one short line each (on stderr, in the
    # pane header): the GELU of a nanoGPT checkpoint, a vocabulary that is not GPT-2's
    notes: list[str] = field(default_factory=list)
    # why GPT-2's BPE cannot encode text for this model (a character-level nanoGPT, say); None when it can
    foreign_vocabulary: str | None = None

    @property
    def config(self) -> GPTConfig:
        return self.model.config

    @property
    def num_params(self) -> int:
        """Its parameters, counted once despite tying, whatever their precision: int8 weight matrices
        and biases are buffers (precision.Int8Linear), and a tied head's int8 copy is the embedding table's."""
        from .precision import Int8Linear

        count = self.model.num_params()
        for module in self.model.modules():
            if isinstance(module, Int8Linear):
                tied_copy = module is self.model.lm_head and self.config.tie_word_embeddings
                count += (0 if tied_copy else module.qweight.numel()) + (0 if module.bias is None else module.bias.numel())
        return count

    @property
    def chat_template(self) -> str | None:
        return self.meta.get("chat_template")

    @property
    def device(self) -> torch.device:
        return self.model.transformer.wte.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.transformer.wte.weight.dtype

    @property
    def weights_dtype(self) -> torch.dtype:
        """Its weight matrices' dtype as Engine.load takes it: torch.int8 for int8 weights (whose
        embeddings and norms stay float32, so `dtype` says float32), else `dtype`. A model loaded beside
        this one at its precision (a draft) is loaded at this."""
        from .precision import Int8Linear

        return torch.int8 if isinstance(self.model.lm_head, Int8Linear) else self.dtype

    @property
    def precision(self) -> str:
        """Its weight matrices' precision as --dtype names it: "fp32", "bf16", "fp16" or "int8"."""
        from .precision import PRECISION_NAMES

        return PRECISION_NAMES[self.weights_dtype]


def checkpoints_root() -> Path:
    """Where trained checkpoints live and are discovered: $NANOPLAY_CHECKPOINTS or ./checkpoints."""
    return Path(os.environ.get("NANOPLAY_CHECKPOINTS", "checkpoints"))


def local_run_names() -> list[str]:
    root = checkpoints_root()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and (ckpt.list_steps(p) or ckpt.is_checkpoint_dir(p)))


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None: the CUDA GPU when there is one, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise NanoplayError(f"device {device!r}: give cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise NanoplayError(f"device {device}: CUDA is not available on this machine; use cpu")
    if device.type not in ("cpu", "cuda"):
        raise NanoplayError(f"device {device}: nanoplay runs on cpu or cuda[:N]")
    return device


def load_model(spec: str, *, device: str | torch.device | None = "cpu", dtype: torch.dtype = torch.float32,
               progress=None, gelu: str | None = None) -> LoadedModel:
    """
    Resolve a spec and load it onto `device` (None: the GPU when there is one). `progress` is a tqdm
    class for Hub downloads (None: the default bar). `gelu` ("tanh" or "exact") sets the GELU of a
    nanoGPT checkpoint, as the spec suffix `#gelu=...` does. Raises NanoplayError with one line.
    """
    device = resolve_device(device)
    spec, gelu = split_spec_options(spec.strip(), gelu)
    loaded = _load_on_cpu(spec, progress, gelu)
    if gelu is not None:
        loaded.name += f"#gelu={gelu}"
    if loaded.config.vocab_size < GPT2_VOCAB_SIZE:
        loaded.foreign_vocabulary = loaded.foreign_vocabulary or (
            f"{loaded.name} has a {loaded.config.vocab_size}-token vocabulary, not GPT-2's BPE: nanoplay encodes "
            f"text with GPT-2's BPE only, so this model would need its own tokenizer")
        loaded.notes.append(f"{loaded.config.vocab_size}-token vocabulary, not GPT-2's")
    loaded.model = loaded.model.to(device=device, dtype=dtype)
    return loaded


def split_spec_options(spec: str, gelu: str | None = None) -> tuple[str, str | None]:
    """
    'out/ckpt.pt#gelu=tanh' -> ('out/ckpt.pt', 'tanh'). A `#` in the name of a file that exists is
    part of the name; Hub ids and revisions cannot hold one. `gelu`, from the Python API, must agree.
    """
    base, sep, option = spec.rpartition("#")
    if sep and not Path(spec).expanduser().exists():
        key, _, value = option.partition("=")
        if key.strip() != "gelu" or value.strip() not in GELU_OPTIONS:
            raise NanoplayError(f"{spec!r}: the part after # must be gelu=tanh or gelu=exact (the GELU of a "
                                f"nanoGPT checkpoint)")
        if gelu is not None and gelu != value.strip():
            raise NanoplayError(f"{spec!r} asks for gelu={value.strip()} but gelu={gelu!r} was also given")
        spec, gelu = base.strip(), value.strip()
    if gelu is not None and gelu not in GELU_OPTIONS:
        raise NanoplayError(f"gelu={gelu!r}: give 'tanh' (nanoGPT before June 2023) or 'exact' (since)")
    return spec, gelu


GELU_ONLY_NANOGPT = "gelu= applies to a nanoGPT ckpt.pt, whose GELU is not recorded; other formats record their activation"


def _load_on_cpu(spec: str, progress, gelu: str | None = None) -> LoadedModel:
    if not spec:
        raise NanoplayError("empty model spec: give a checkpoint name, a path or a Hub id such as gpt2")
    path = Path(spec).expanduser()
    if path.exists():
        return load_path(path, gelu=gelu)
    if gelu is not None:
        raise NanoplayError(f"{spec}: {GELU_ONLY_NANOGPT}")
    name, _, at = spec.partition("@")
    run_dir = checkpoints_root() / name
    if name and run_dir.is_dir():
        return load_run(run_dir, step=_parse_step(spec, at) if at else None)
    if HUB_ID.match(name) and not spec.endswith((".pt", ".safetensors", ".gguf")):
        try:
            return load_hub(name, revision=at or None, progress=progress)
        except NanoplayError as e:
            if "/" in name or name in GPT2_FAMILY:
                raise
            # a bare name that is no known Hub model was most likely meant as a local checkpoint
            raise NanoplayError(f"{_unknown_spec_message(spec)}; as a Hub id: {e}") from e
    raise NanoplayError(_unknown_spec_message(spec) + "; see `nanoplay models`")


def _unknown_spec_message(spec: str) -> str:
    runs = local_run_names()
    have = f"local checkpoints: {', '.join(runs)}" if runs else f"no checkpoints under {checkpoints_root()}/"
    return f"unknown model {spec!r}: not a file, not a checkpoint name ({have})"


def _parse_step(spec: str, at: str) -> int:
    if not at.isdigit():
        raise NanoplayError(f"{spec!r}: the part after @ must be a step number, like owt-30m@2000")
    return int(at)


def load_path(path: Path, gelu: str | None = None) -> LoadedModel:
    if gelu is not None and not (path.is_file() and path.suffix in (".pt", ".pth", ".ckpt")):
        raise NanoplayError(f"{path}: {GELU_ONLY_NANOGPT}")
    if path.is_dir():
        if ckpt.is_checkpoint_dir(path):
            return _load_our_dir(path, name=path.name)
        if ckpt.list_steps(path):
            return load_run(path)
        if (path / ckpt.CONFIG_FILE).is_file():
            return load_hf_dir(path, name=path.name, source="hf")
        raise NanoplayError(f"{path} holds no model: expected config.json + model.safetensors, or step-* checkpoints")
    if path.suffix == ".safetensors":
        return load_safetensors_file(path)
    if path.suffix in (".pt", ".pth", ".ckpt"):
        return load_nanogpt(path, gelu=gelu)
    if path.suffix == ".gguf":
        return load_gguf(path)
    raise NanoplayError(f"{path}: unknown model file type; expected a directory, a .pt (nanoGPT), .safetensors "
                        "or .gguf file")


def load_run(run_dir: Path, step: int | None = None) -> LoadedModel:
    """A run directory under checkpoints/: the newest step, or the one asked for."""
    steps = ckpt.list_steps(run_dir)
    if not steps:
        if step is None and ckpt.is_checkpoint_dir(run_dir):
            return _load_our_dir(run_dir, name=run_dir.name)
        raise NanoplayError(f"{run_dir} has no complete checkpoint (step-*/ with config.json + model.safetensors)")
    if step is None:
        step = max(steps)
    elif step not in steps:
        available = f"available steps: {', '.join(map(str, steps))}"
        if (run_dir / ckpt.step_dir_name(step)).is_dir():  # there, but not loadable: say so, not "no step"
            raise NanoplayError(f"{run_dir / ckpt.step_dir_name(step)} is damaged or incomplete (config.json or "
                                f"model.safetensors missing or unreadable); {available}")
        raise NanoplayError(f"{run_dir.name} has no step {step}; {available}")
    return _load_our_dir(steps[step], name=f"{run_dir.name}@{step}")


def _load_our_dir(directory: Path, name: str) -> LoadedModel:
    model, meta = ckpt.load_checkpoint_dir(directory)
    return LoadedModel(name=name, model=model, source="checkpoint", location=str(directory),
                       step=meta.get("step"), meta=meta)


def load_nanogpt(path: Path, gelu: str | None = None) -> LoadedModel:
    """
    A nanoGPT ckpt.pt: read without unpickling code; works with or without optimizer state.

    nanoGPT's model_args never record the GELU: its model.py used the tanh approximation until June
    2023 (commit 594068e, "Use nn.GELU") and the exact form since. A file whose model_args lack `bias`
    predates the bias option (January 2023), so it is tanh; any other file is assumed exact, and the
    LoadedModel's notes say so. `gelu` ("tanh" or "exact") overrides both.
    """
    data = read_torch_file(path)
    if not isinstance(data, dict) or "model" not in data or "model_args" not in data:
        raise NanoplayError(f"{path} is not a nanoGPT checkpoint (no 'model' and 'model_args' entries)")
    args = data["model_args"]
    missing = [k for k in NANOGPT_ARGS if not isinstance(args.get(k), int)]
    unknown = sorted(map(str, set(args) - set(NANOGPT_ARGS) - set(NANOGPT_OPTIONAL_ARGS)))
    if missing or unknown:
        detail = f"lack {', '.join(missing)}" if missing else f"hold {', '.join(unknown)}, which nanoGPT's do not"
        raise NanoplayError(f"{path}: its model_args {detail}: a modified nanoGPT that nanoplay cannot run faithfully")
    notes = []
    if gelu is not None:
        activation = GELU_OPTIONS[gelu]
    elif "bias" not in args:
        activation = "gelu_tanh"  # proven: older than nanoGPT's bias option, so older than its exact GELU
    else:
        activation = "gelu"
        notes.append("GELU assumed exact (not recorded; add #gelu=tanh for nanoGPT before June 2023)")
    state = {}
    for k, v in data["model"].items():
        k = k.removeprefix("_orig_mod.")  # left by torch.compile
        if not k.endswith(".attn.bias"):  # older nanoGPT's causal-mask buffer
            state[k] = v
    # nanoGPT has tied the output head to the input embedding since January 2023; an older file has its own
    head, wte = state.get("lm_head.weight"), state.get("transformer.wte.weight")
    tied = head is None or wte is None or head.shape != wte.shape or torch.equal(head, wte)
    config = GPTConfig(
        block_size=args["block_size"], vocab_size=args["vocab_size"], n_layer=args["n_layer"],
        n_head=args["n_head"], n_embd=args["n_embd"], bias=args.get("bias", True), activation=activation,
        tie_word_embeddings=tied,
    )
    model = ckpt.build_model(config, state, str(path))
    name = f"{path.parent.name}/{path.name}" if path.parent.name else path.name  # out/ckpt.pt; ./ckpt.pt is ckpt.pt
    loaded = LoadedModel(name=name, model=model, source="nanogpt", location=str(path), step=data.get("iter_num"),
                         notes=notes)
    if config.vocab_size < GPT2_VOCAB_SIZE:
        loaded.foreign_vocabulary = _nanogpt_vocabulary(path, data, loaded.name, config.vocab_size)
    return loaded


def _nanogpt_vocabulary(path: Path, data: dict, name: str, vocab_size: int) -> str:
    """What a nanoGPT model with its own (character-level) vocabulary is, and what it would need."""
    config = data.get("config") if isinstance(data.get("config"), dict) else {}
    dataset = config.get("dataset")
    candidates = [path.parent / "meta.pkl"] + ([Path("data") / str(dataset) / "meta.pkl"] if dataset else [])
    meta = next((p for p in candidates if p.is_file()), None)
    where = f"its characters are in {meta}" if meta else "nanoGPT keeps its characters in the data set's meta.pkl"
    source = f", data set {dataset}" if dataset else ""
    return (f"{name} has a {vocab_size}-token vocabulary, not GPT-2's BPE (a character-level nanoGPT model{source}): "
            f"nanoplay encodes text with GPT-2's BPE only; {where}, a pickle nanoplay does not read, so it would "
            f"need that character table as a tokenizer")


def config_from_hf(hf: dict, where: str) -> GPTConfig:
    """
    GPTConfig from a transformers GPT2Config dict. Every setting that changes GPT-2's maths is honoured
    or refused with one line; a missing key means transformers' default, as GPT2Config reads it.
    reorder_and_upcast_attn only computes the attention scores in fp32 (and only in transformers' eager
    attention): the same maths, so it needs nothing here.
    """
    model_type = hf.get("model_type")
    if model_type != "gpt2":
        raise NanoplayError(f"{where} is not a GPT-2-architecture model (model_type {model_type!r}); nanoplay runs GPT-2-style models only")
    act = hf.get("activation_function", "gelu_new")
    if act in HF_LEARNED_ACTIVATIONS:
        raise NanoplayError(f"{where} uses activation_function {act!r}, which has learned parameters of its own; "
                            f"nanoplay supports the parameter-free ones ({', '.join(sorted(HF_ACTIVATIONS))})")
    if act not in HF_ACTIVATIONS:
        raise NanoplayError(f"{where} uses activation_function {act!r}, which transformers' GPT-2 does not know "
                            f"either; nanoplay supports {', '.join(sorted(HF_ACTIVATIONS))}")
    if hf.get("add_cross_attention"):
        raise NanoplayError(f"{where} has cross-attention layers (add_cross_attention): the decoder of an "
                            f"encoder-decoder model, not a language model nanoplay runs")
    try:
        return GPTConfig(
            block_size=hf.get("n_positions", 1024), vocab_size=hf.get("vocab_size", 50257),
            n_layer=hf.get("n_layer", 12), n_head=hf.get("n_head", 12), n_embd=hf.get("n_embd", 768), bias=True,
            layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5), activation=HF_ACTIVATIONS[act],
            n_inner=hf.get("n_inner"), tie_word_embeddings=hf.get("tie_word_embeddings", True),
            scale_attn_weights=hf.get("scale_attn_weights", True),
            scale_attn_by_inverse_layer_idx=hf.get("scale_attn_by_inverse_layer_idx", False),
        )
    except (TypeError, ValueError) as e:
        raise NanoplayError(f"{where}: its config.json does not describe a GPT-2 model nanoplay can build ({e})") from e


def state_from_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers GPT-2 names -> ours: keys with or without `transformer.`, Conv1D weights transposed."""
    out = {}
    for k, v in state.items():
        if k == "lm_head.weight":
            out[k] = v
            continue
        k = k.removeprefix("transformer.")
        if k.endswith((".attn.bias", ".attn.masked_bias")):  # causal-mask buffers, not weights
            continue
        if k.endswith(CONV1D_WEIGHTS):
            v = v.t().contiguous()  # Conv1D stores (in, out); nn.Linear wants (out, in)
        out["transformer." + k] = v
    return out


def load_hf_dir(directory: Path, name: str, source: str, location: str | None = None) -> LoadedModel:
    """A directory in Hugging Face format: config.json + model.safetensors (or a local pytorch_model.bin)."""
    hf = ckpt.read_json(directory / "config.json")
    config = config_from_hf(hf, name)
    weights = directory / "model.safetensors"
    if weights.is_file():
        state = ckpt.load_safetensors(weights)
    elif (directory / "pytorch_model.bin").is_file():
        state = read_torch_file(directory / "pytorch_model.bin")
    else:
        raise NanoplayError(f"{directory} has no model.safetensors")
    model = ckpt.build_model(config, state_from_hf(state), name)
    return LoadedModel(name=name, model=model, source=source, location=location or str(directory))


def load_gguf(path: Path) -> LoadedModel:
    """A GGUF file of GPT-2 architecture (llama.cpp's format; see nanoplay.gguf_format), dequantized to float32."""
    from .gguf_format import read_gguf

    config, state, meta = read_gguf(path)
    return LoadedModel(name=path.name, model=ckpt.build_model(config, state, str(path)), source="gguf",
                       location=str(path), meta=meta)


def read_torch_file(path: Path, fix: str = "re-copy or re-save it"):
    """
    A pickled torch file, read with weights_only=True: tensors and plain containers, never code. A
    refused file is one line saying so; a damaged one says how, then `fix`. torch's own text and
    warnings stay out of both.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns before it refuses a TorchScript archive, say
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for refused, truncated and foreign files
            refused = _unsafe_content(path, e)
            raise NanoplayError(refused or f"{_damage(path, e)}: {fix}") from None


def _unsafe_content(path: Path, error: Exception) -> str | None:
    """The refusal, when torch refused what the file holds (not because the file is cut short)."""
    unsafe = f"{path} contains Python objects other than tensors; refused for safety"
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            if any("/code/" in n or n.endswith("constants.pkl") for n in z.namelist()):
                return f"{unsafe} (a TorchScript archive: it holds code)"
    found = re.search(r"GLOBAL (\S+) was not an allowed global", str(error))
    if found and _damage(path, error) is None:  # a cut file can end inside a name: it asks for "torch._ut"
        return f"{unsafe} (it asks for {found.group(1)}; nanoplay unpickles only with weights_only=True)"
    return None


def _damage(path: Path, error: Exception) -> str | None:
    """How `path` is damaged, read from its structure without executing anything; None if it is whole."""
    truncated = f"{path} is truncated (the file ends before its data does)"
    with open(path, "rb") as f:
        zipped = f.read(4) == b"PK\x03\x04"  # the format torch.save writes; before torch 1.6, bare pickles
    if zipped:
        if not zipfile.is_zipfile(path):
            return truncated  # a zip's directory is at its end
        try:
            with zipfile.ZipFile(path) as z:
                pickled = [n for n in z.namelist() if n.endswith("data.pkl")]
                data, pickles = (z.read(pickled[0]) if pickled else b""), 1
        except (zipfile.BadZipFile, OSError, EOFError):
            return truncated
    else:  # the legacy format: pickles of the magic number, protocol, system info, the objects, the storage keys
        data, pickles = path.read_bytes(), 5
    stream = io.BytesIO(data)
    for _ in range(pickles):
        try:
            for _op in pickletools.genops(stream):  # reads the opcodes, runs none
                pass
        except ValueError as e:
            return f"{path} is not a PyTorch checkpoint" if "unknown" in str(e) else truncated
    if "GLOBAL" in str(error):
        return None
    if isinstance(error, EOFError) or "unexpected EOF" in str(error):  # the tensor data after the pickles is cut
        return truncated
    reason = str(error).strip().splitlines()[0][:120] if str(error).strip() else type(error).__name__
    return f"{path} is damaged ({reason})"


def load_safetensors_file(path: Path) -> LoadedModel:
    """A bare .safetensors: ours carry their config in the header; others need a config.json beside them."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except Exception as e:
        raise NanoplayError(f"{path} is truncated or corrupt ({e}): re-download or re-save it") from e
    if "nanoplay_config" in header:
        config = ckpt.config_from_dict(json.loads(header["nanoplay_config"]), str(path))
        model = ckpt.build_model(config, ckpt.load_safetensors(path), str(path))
        return LoadedModel(name=path.name, model=model, source="checkpoint", location=str(path))
    sibling = path.parent / "config.json"
    if not sibling.is_file():
        raise NanoplayError(f"{path} has no nanoplay config in its header and no config.json beside it")
    hf = ckpt.read_json(sibling)
    if hf.get("format") == ckpt.FORMAT:
        config, state = ckpt.config_from_dict(hf["model"], str(sibling)), ckpt.load_safetensors(path)
    else:
        config, state = config_from_hf(hf, str(path)), state_from_hf(ckpt.load_safetensors(path))
    return LoadedModel(name=path.name, model=ckpt.build_model(config, state, str(path)), source="hf",
                       location=str(path))


def hub_download(repo_id: str, revision: str | None = None, progress=None) -> Path:
    """config.json + model.safetensors of a Hub repo into the HF cache (never a pickled .bin)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HFValidationError,
                                        LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    where = repo_id + (f"@{revision}" if revision else "")

    def download(repo: str, local_only: bool) -> str:
        config_path = hf_hub_download(repo, "config.json", revision=revision, local_files_only=local_only)
        config_from_hf(ckpt.read_json(config_path), where)  # refuse non-GPT-2 before the weights
        return hf_hub_download(repo, "model.safetensors", revision=revision, tqdm_class=progress,
                               local_files_only=local_only)

    def cached() -> str:
        """The cache first, under either name of a moved repo: no network round trip when it is there."""
        for repo in hub_names(repo_id):
            try:
                return download(repo, local_only=True)
            except LocalEntryNotFoundError:
                continue
        raise LocalEntryNotFoundError(f"{where} is not cached")

    offline = NanoplayError(f"{where} is not in the local Hugging Face cache and the Hub cannot be reached: "
                            f"run `nanoplay pull {where}` where you have network")
    try:
        try:
            weights = cached()
        except LocalEntryNotFoundError:
            if not hub_reachable():
                raise offline from None
            weights = download(repo_id, local_only=False)
    except LocalEntryNotFoundError as e:
        raise offline from e
    except EntryNotFoundError as e:
        raise NanoplayError(f"{where} has no model.safetensors on the Hub; nanoplay loads only safetensors from the Hub") from e
    except RevisionNotFoundError as e:
        raise NanoplayError(f"{where}: no such revision on the Hub") from e
    except GatedRepoError as e:
        raise NanoplayError(f"{where} is gated on the Hub: accept its terms and log in with `hf auth login`") from e
    except HFValidationError as e:
        raise NanoplayError(f"{where!r} is not a Hub repo id: give owner/name (or a GPT-2 name like gpt2-medium)") from e
    except RepositoryNotFoundError as e:
        raise NanoplayError(f"unknown model {where!r}: not a local checkpoint and no such repo on the Hub") from e
    return Path(weights).parent


def hub_names(repo_id: str) -> list[str]:
    """The names a Hub repo is known by: gpt2 and openai-community/gpt2 are the same repo, moved."""
    moved = HUB_ALIASES.get(repo_id) or HUB_SHORT_NAMES.get(repo_id)
    return [repo_id, moved] if moved else [repo_id]


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick connection test, so that no network fails in seconds rather than after minutes of retries."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_hub(repo_id: str, revision: str | None = None, progress=None) -> LoadedModel:
    snapshot = hub_download(repo_id, revision, progress)
    name = repo_id + (f"@{revision}" if revision else "")
    return load_hf_dir(snapshot, name=name, source="hub", location=repo_id)


@dataclass
class LocalModel:
    """One entry of `nanoplay models`: what can be loaded without network."""

    spec: str
    kind: str  # checkpoint | hub-cache
    size_bytes: int
    steps: list[int] = field(default_factory=list)
    detail: str = ""


def list_local_models() -> list[LocalModel]:
    found = []
    root = checkpoints_root()
    for name in local_run_names():
        run = root / name
        steps = ckpt.list_steps(run)
        dirs = list(steps.values()) or [run]
        size = sum(f.stat().st_size for d in dirs for f in d.iterdir() if f.is_file())
        meta = ckpt.read_config(dirs[-1])
        cfg = ckpt.config_from_dict(meta["model"], str(dirs[-1]))
        detail = f"{cfg.n_layer}L/{cfg.n_head}H/{cfg.n_embd}d ctx {cfg.block_size}"
        if meta.get("chat_template"):
            detail += ", chat"
        found.append(LocalModel(spec=name, kind="checkpoint", size_bytes=size, steps=list(steps), detail=detail))
    found.extend(_cached_hub_models())
    return found


def _cached_hub_models() -> list[LocalModel]:
    """
    GPT-2-architecture repos in the Hugging Face cache that have their safetensors weights, each once: a
    moved repo cached under both its names (gpt2, openai-community/gpt2) is listed under the short one.
    """
    from huggingface_hub import constants, scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:  # the cache folder as huggingface_hub sees it now (scan_cache_dir's default is fixed at its import)
        cache = scan_cache_dir(constants.HF_HUB_CACHE)
    except CacheNotFound:
        return []
    found = {}
    for repo in sorted(cache.repos, key=lambda r: r.repo_id):
        spec = HUB_SHORT_NAMES.get(repo.repo_id, repo.repo_id)
        if repo.repo_type != "model" or spec in found:
            continue
        for rev in repo.revisions:
            files = {f.file_name: f for f in rev.files}
            if "model.safetensors" not in files or "config.json" not in files:
                continue
            try:
                cfg = config_from_hf(ckpt.read_json(files["config.json"].file_path), repo.repo_id)
            except NanoplayError:  # not GPT-2, or damaged: not listed
                continue
            found[spec] = LocalModel(spec=spec, kind="hub-cache", size_bytes=rev.size_on_disk,
                                     detail=f"{cfg.n_layer}L/{cfg.n_head}H/{cfg.n_embd}d ctx {cfg.block_size}")
            break
    return list(found.values())
