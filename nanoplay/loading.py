"""
Model specs -- one syntax for the CLI, the TUI and Python -- and the loaders behind them.

A spec is, in the order tried:
  1. a path: a checkpoint directory of ours (or a run directory of them), a Hugging Face-format
     directory, a nanoGPT `ckpt.pt`, a `.safetensors` file, or a `.gguf` file (llama.cpp's format);
  2. a name under the checkpoints directory (`owt-30m`, newest step; `owt-30m@2000`, that step);
  3. a Hub id (`gpt2`, `gpt2-medium`, `owner/repo`, optionally `@revision`) whose config is GPT-2.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .errors import NanoplayError
from .model import GPT, GPTConfig

GPT2_FAMILY = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "distilgpt2")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
HF_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
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

    @property
    def config(self) -> GPTConfig:
        return self.model.config

    @property
    def num_params(self) -> int:
        return self.model.num_params()

    @property
    def chat_template(self) -> str | None:
        return self.meta.get("chat_template")

    @property
    def device(self) -> torch.device:
        return self.model.transformer.wte.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.transformer.wte.weight.dtype


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
               progress=None) -> LoadedModel:
    """
    Resolve a spec and load it onto `device` (None: the GPU when there is one). `progress` is a tqdm
    class for Hub downloads (None: the default bar).
    """
    device = resolve_device(device)
    loaded = _load_on_cpu(spec, progress)
    loaded.model = loaded.model.to(device=device, dtype=dtype)
    return loaded


def _load_on_cpu(spec: str, progress) -> LoadedModel:
    spec = spec.strip()
    if not spec:
        raise NanoplayError("empty model spec: give a checkpoint name, a path or a Hub id such as gpt2")
    path = Path(spec).expanduser()
    if path.exists():
        return load_path(path)
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


def load_path(path: Path) -> LoadedModel:
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
        return load_nanogpt(path)
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


def load_nanogpt(path: Path) -> LoadedModel:
    """A nanoGPT ckpt.pt: read without unpickling code; works with or without optimizer state."""
    data = _torch_load(path)
    if not isinstance(data, dict) or "model" not in data or "model_args" not in data:
        raise NanoplayError(f"{path} is not a nanoGPT checkpoint (no 'model' and 'model_args' entries)")
    args = data["model_args"]
    config = GPTConfig(
        block_size=args["block_size"], vocab_size=args["vocab_size"], n_layer=args["n_layer"],
        n_head=args["n_head"], n_embd=args["n_embd"], bias=args.get("bias", True),
        activation="gelu",  # nanoGPT's model.py uses nn.GELU(), the exact form
    )
    state = {}
    for k, v in data["model"].items():
        k = k.removeprefix("_orig_mod.")  # left by torch.compile
        if not k.endswith(".attn.bias"):  # older nanoGPT's causal-mask buffer
            state[k] = v
    model = ckpt.build_model(config, state, str(path))
    return LoadedModel(name=path.parent.name + "/" + path.name, model=model, source="nanogpt",
                       location=str(path), step=data.get("iter_num"))


def config_from_hf(hf: dict, where: str) -> GPTConfig:
    """GPTConfig from a transformers GPT2Config dict; anything that is not GPT-2 is refused."""
    model_type = hf.get("model_type")
    if model_type != "gpt2":
        raise NanoplayError(f"{where} is not a GPT-2-architecture model (model_type {model_type!r}); nanoplay runs GPT-2-style models only")
    act = hf.get("activation_function", "gelu_new")
    if act in HF_TANH_GELUS:
        activation = "gelu_tanh"
    elif act == "gelu":
        activation = "gelu"
    else:
        raise NanoplayError(f"{where} uses activation {act!r}; nanoplay supports GPT-2's tanh GELU and the exact GELU")
    n_embd = hf.get("n_embd", 768)
    if hf.get("n_inner") not in (None, 4 * n_embd) or hf.get("scale_attn_by_inverse_layer_idx") or \
            hf.get("scale_attn_weights") is False or hf.get("add_cross_attention"):
        raise NanoplayError(f"{where} changes GPT-2's architecture (n_inner/attention scaling/cross-attention): not supported")
    return GPTConfig(
        block_size=hf.get("n_positions", 1024), vocab_size=hf.get("vocab_size", 50257),
        n_layer=hf.get("n_layer", 12), n_head=hf.get("n_head", 12), n_embd=n_embd, bias=True,
        layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5), activation=activation,
    )


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
        state = _torch_load(directory / "pytorch_model.bin")
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


def _torch_load(path: Path):
    """A pickled torch file, read with weights_only=True: tensors and plain data, never code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for truncated / foreign files
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise NanoplayError(f"{path} is not a loadable checkpoint ({reason}): it may be truncated; re-copy it") from e


def load_safetensors_file(path: Path) -> LoadedModel:
    """A bare .safetensors: ours carry their config in the header; others need a config.json beside them."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except Exception as e:
        raise NanoplayError(f"{path} is truncated or corrupt ({e}): re-download or re-save it") from e
    if "nanoplay_config" in header:
        config = GPTConfig.from_dict(json.loads(header["nanoplay_config"]))
        model = ckpt.build_model(config, ckpt.load_safetensors(path), str(path))
        return LoadedModel(name=path.name, model=model, source="checkpoint", location=str(path))
    sibling = path.parent / "config.json"
    if not sibling.is_file():
        raise NanoplayError(f"{path} has no nanoplay config in its header and no config.json beside it")
    hf = ckpt.read_json(sibling)
    if hf.get("format") == ckpt.FORMAT:
        config, state = GPTConfig.from_dict(hf["model"]), ckpt.load_safetensors(path)
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

    def download(local_only: bool) -> str:
        config_path = hf_hub_download(repo_id, "config.json", revision=revision, local_files_only=local_only)
        config_from_hf(ckpt.read_json(config_path), where)  # refuse non-GPT-2 before the weights
        return hf_hub_download(repo_id, "model.safetensors", revision=revision, tqdm_class=progress,
                               local_files_only=local_only)

    offline = NanoplayError(f"{where} is not in the local Hugging Face cache and the Hub cannot be reached: "
                            f"run `nanoplay pull {where}` where you have network")
    try:
        try:
            weights = download(local_only=True)  # the cache first: no network round trip when it is there
        except LocalEntryNotFoundError:
            if not hub_reachable():
                raise offline from None
            weights = download(local_only=False)
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
        cfg = GPTConfig.from_dict(meta["model"])
        detail = f"{cfg.n_layer}L/{cfg.n_head}H/{cfg.n_embd}d ctx {cfg.block_size}"
        if meta.get("chat_template"):
            detail += ", chat"
        found.append(LocalModel(spec=name, kind="checkpoint", size_bytes=size, steps=list(steps), detail=detail))
    found.extend(_cached_hub_models())
    return found


def _cached_hub_models() -> list[LocalModel]:
    """GPT-2-architecture repos in the Hugging Face cache that have their safetensors weights."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        cache = scan_cache_dir()
    except CacheNotFound:
        return []
    found = []
    for repo in sorted(cache.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        for rev in repo.revisions:
            files = {f.file_name: f for f in rev.files}
            if "model.safetensors" not in files or "config.json" not in files:
                continue
            try:
                cfg = config_from_hf(ckpt.read_json(files["config.json"].file_path), repo.repo_id)
            except NanoplayError:  # not GPT-2, or damaged: not listed
                continue
            found.append(LocalModel(spec=repo.repo_id, kind="hub-cache", size_bytes=rev.size_on_disk,
                                    detail=f"{cfg.n_layer}L/{cfg.n_head}H/{cfg.n_embd}d ctx {cfg.block_size}"))
            break
    return found
