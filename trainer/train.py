"""`nanoplay train`: pre-train (or continue pre-training) a GPT on a text corpus; `train()` is its Python API."""

from __future__ import annotations

import dataclasses
import torch

from nanoplay.checkpoint import list_steps, load_checkpoint_dir
from nanoplay.errors import NanoplayError
from nanoplay.loading import LoadedModel, checkpoints_root, load_model
from nanoplay.model import GPT, GPTConfig
from nanoplay.textdata import resolve_source

from . import checkpoints, data
from .config import TrainConfig
from .loop import TrainResult, find_resume, init_distributed, train_loop

MODEL_FIELDS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "dropout", "bias", "activation")


def make_sampler(name: str, prompt: str, cfg: TrainConfig):
    """A function model -> short sample text, through the shared engine (greedy-ish, fixed seed)."""
    from nanoplay.engine import Engine
    from nanoplay.sampling import SamplingParams

    engine = Engine(max_slots=1)
    params = SamplingParams(max_new_tokens=cfg.sample_tokens, temperature=0.8, top_k=200, seed=cfg.seed, top_logprobs=0)
    wrapped = {}

    def sample(model: GPT) -> str:
        if id(model) not in wrapped:  # one LoadedModel, so the engine keeps one KV cache for the run
            wrapped[id(model)] = LoadedModel(name=name, model=model, source="checkpoint", location=name)
        model.eval()
        try:
            return engine.generate(wrapped[id(model)], prompt, params).text
        finally:
            model.train()

    return sample


def model_from_scratch(cfg: TrainConfig) -> GPT:
    torch.manual_seed(cfg.seed)
    return GPT(GPTConfig(**{f: getattr(cfg, f) for f in MODEL_FIELDS}))


def model_from_spec(spec: str, cfg: TrainConfig, crop_block_size: bool) -> tuple[GPT, TrainConfig]:
    """Start from any model spec; the config takes the model's shape (and may crop its context)."""
    model = load_model(spec).model.float()
    if crop_block_size and cfg.block_size < model.config.block_size:
        # fewer positions than the model was trained with: keep the first ones (nanoGPT's crop_block_size)
        model.transformer.wpe.weight = torch.nn.Parameter(model.transformer.wpe.weight[:cfg.block_size].clone())
        model.config.block_size = cfg.block_size
    model.config.dropout = cfg.dropout  # the loaded model was built with its own dropout
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = cfg.dropout
    for block in model.transformer.h:
        block.attn.dropout = cfg.dropout  # attention dropout is an argument of scaled_dot_product_attention
    shape = {f: getattr(model.config, f) for f in MODEL_FIELDS}
    return model.train(), dataclasses.replace(cfg, **shape)


def prepare_data(cfg: TrainConfig, dist_info, progress: bool = True) -> data.TokenData:
    """Tokenise on rank 0 first (others wait), then everyone opens the cached shards."""
    source = resolve_source(cfg.data, cfg.text_column, cfg.val_fraction)
    if dist_info.enabled and not dist_info.is_main:
        torch.distributed.barrier()
    directory = data.prepare(source, cfg.num_proc, progress=progress and dist_info.is_main)
    if dist_info.enabled and dist_info.is_main:
        torch.distributed.barrier()
    return data.TokenData(directory, cfg.block_size, cfg.batch_size, cfg.seed, cfg.eval_batches)


def train(cfg: TrainConfig, *, resume: bool = False, overrides: dict | None = None, on_progress=None,
          stop_event=None, display: str = "auto") -> TrainResult:
    """
    Pre-train as `cfg` says, into checkpoints/<cfg.name>/. With `resume`, continue that run from its
    newest checkpoint with the config it was started with, plus `overrides` (the fields a user set
    explicitly, e.g. a larger max_iters). `on_progress(Progress)` is called after every step and
    `stop_event` (a threading.Event) stops the run like Ctrl+C; both are for callers such as the TUI,
    which also get no console output unless they ask for a `display` (live, plain, none).
    """
    overrides = overrides or {}
    if display == "auto" and on_progress is not None:
        display = "none"
    dist_info = init_distributed("cuda" if cfg.device.startswith("cuda") or
                                 (cfg.device == "auto" and torch.cuda.is_available()) else "cpu")
    run_dir = checkpoints_root() / cfg.name
    if dist_info.is_main:
        checkpoints.clean_partial_writes(run_dir)

    resume_state = None
    if resume:
        step, step_dir = find_resume(run_dir)
        resume_state = checkpoints.load_state(step_dir)
        cfg = dataclasses.replace(TrainConfig(**resume_state["config"]), **overrides)
        model, _ = load_checkpoint_dir(step_dir)
        model.train()
    else:
        steps = list_steps(run_dir)
        if steps:
            raise NanoplayError(f"{run_dir} already has checkpoints (up to step {max(steps)}): "
                                f"pass --resume to continue it, or --name NEW for a new run")
        if cfg.init:
            model, cfg = model_from_spec(cfg.init, cfg, crop_block_size="block_size" in overrides)
        else:
            model = model_from_scratch(cfg)
    if cfg.max_iters < 1:
        raise NanoplayError("max_iters must be at least 1")

    token_data = prepare_data(cfg, dist_info, progress=display != "none")
    meta = {"run": cfg.name, "data": cfg.data, "init": cfg.init or None}
    sampler = make_sampler(cfg.name, "The", cfg) if dist_info.is_main and cfg.sample_tokens else None
    return train_loop(cfg, model, token_data, run_dir, meta=meta, title=f"train {cfg.name}",
                      resume_state=resume_state, sampler=sampler, dist_info=dist_info, display=display,
                      on_progress=on_progress, stop_event=stop_event)
