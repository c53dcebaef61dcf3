"""`nanoplay train`: pre-train (or continue pre-training) a GPT on a text corpus; `train()` is its Python API."""

from __future__ import annotations

import dataclasses
import torch

from nanoplay.checkpoint import list_steps, load_checkpoint_dir
from nanoplay.errors import NanoplayError
from nanoplay.loading import LoadedModel, load_model
from nanoplay.model import GPT, GPTConfig
from nanoplay.textdata import resolve_source

from . import checkpoints, data
from .config import TrainConfig
from .loop import TrainResult, find_resume, init_distributed, pick_device, schedule_notes, train_loop

MODEL_FIELDS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "dropout", "bias", "activation")
FIXED_ON_RESUME = ("init", *(f for f in MODEL_FIELDS if f != "dropout"))  # the checkpoint's model has them


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


def set_dropout(model: GPT, p: float) -> GPT:
    """A loaded model was built with its own dropout: make every dropout site use `p`."""
    model.config.dropout = p
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p
    for block in model.transformer.h:
        block.attn.dropout = p  # attention dropout is an argument of scaled_dot_product_attention
    return model


def model_from_spec(spec: str, cfg: TrainConfig, crop_block_size: bool) -> tuple[GPT, TrainConfig]:
    """Start from any model spec; the config takes the model's shape (and may crop its context)."""
    model = load_model(spec).model.float()
    if crop_block_size and cfg.block_size < model.config.block_size:
        # fewer positions than the model was trained with: keep the first ones (nanoGPT's crop_block_size)
        model.transformer.wpe.weight = torch.nn.Parameter(model.transformer.wpe.weight[:cfg.block_size].clone())
        model.config.block_size = cfg.block_size
    set_dropout(model, cfg.dropout)
    shape = {f: getattr(model.config, f) for f in MODEL_FIELDS}
    return model.train(), dataclasses.replace(cfg, **shape)


def resume_run(run_dir, overrides: dict) -> tuple[TrainConfig, GPT, dict]:
    """
    The newest resumable checkpoint of a run: its saved config plus `overrides`, its model and its
    training state. The model stays as it is, so a flag that would change its shape is refused.
    """
    _, step_dir = find_resume(run_dir)
    state = checkpoints.load_state(step_dir)
    saved = state["config"]
    changed = [k for k in FIXED_ON_RESUME if k in overrides and overrides[k] != saved[k]]
    if changed:
        given = " ".join(f"--{k.replace('_', '-')} {overrides[k]}" for k in changed)
        kept = ", ".join(f"{k} {saved[k]!r}" for k in changed)
        raise NanoplayError(f"--resume continues {run_dir.name}'s model as it is ({kept}): drop {given}, "
                            f"or start a new run with --name NEW")
    cfg = dataclasses.replace(TrainConfig(**saved), **overrides)
    model, _ = load_checkpoint_dir(step_dir)
    return cfg, set_dropout(model, cfg.dropout).train(), state


def setup(cfg: TrainConfig, resume: bool, overrides: dict) -> tuple[TrainConfig, GPT, dict | None]:
    """The config that will run (a resumed run's, or with an --init model's shape), its model, and the state to resume."""
    if resume:
        return resume_run(checkpoints.run_dir(cfg.name), overrides)
    if cfg.init:
        model, cfg = model_from_spec(cfg.init, cfg, crop_block_size="block_size" in overrides)
        return cfg, model, None
    return cfg, model_from_scratch(cfg), None


def config_notes(cfg: TrainConfig, resume: bool) -> dict[str, str]:
    """Comments for --print-config where a value does not come from the config itself, or the run caps it."""
    notes = schedule_notes(cfg)
    if resume:
        notes["model"] = f"the model of {cfg.name}'s newest checkpoint: --resume keeps its shape"
    elif cfg.init:
        notes["model"] = (f"the shape of --init {cfg.init}: read from the model, not from here (dropout excepted; "
                          f"a --block-size flag below its context crops it)")
    return notes


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
    run_dir = checkpoints.run_dir(cfg.name)
    dist_info = init_distributed(pick_device(cfg.device).type)  # a bad device fails here, before anything loads
    if dist_info.is_main:
        checkpoints.clean_partial_writes(run_dir)
    if not resume and list_steps(run_dir):
        raise NanoplayError(f"{run_dir} already has checkpoints (up to step {max(list_steps(run_dir))}): "
                            f"pass --resume to continue it, or --name NEW for a new run")
    cfg, model, resume_state = setup(cfg, resume, overrides)

    token_data = prepare_data(cfg, dist_info, progress=display != "none")
    meta = {"run": cfg.name, "data": cfg.data, "init": cfg.init or None}
    sampler = make_sampler(cfg.name, "The", cfg) if dist_info.is_main and cfg.sample_tokens else None
    return train_loop(cfg, model, token_data, run_dir, meta=meta, title=f"train {cfg.name}",
                      resume_state=resume_state, sampler=sampler, dist_info=dist_info, display=display,
                      on_progress=on_progress, stop_event=stop_event)
