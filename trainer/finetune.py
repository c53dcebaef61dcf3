"""`nanoplay finetune --data dialogs.jsonl`: turn a pre-trained model into a chat model."""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from nanoplay.chat import CHAT_TEMPLATE, END_ID, render_prompt
from nanoplay.checkpoint import list_steps, read_config
from nanoplay.errors import NanoplayError
from nanoplay.loading import LoadedModel, checkpoints_root, load_model
from nanoplay.model import GPT
from nanoplay.tokenizer import get_tokenizer

from . import chat_data, checkpoints
from .config import TrainConfig, read_config_file
from .loop import TrainResult, init_distributed, pick_device, schedule_notes, train_loop
from .train import MODEL_FIELDS, resume_run, set_dropout

DEFAULTS = Path(__file__).parent / "finetune.toml"
CHAT_VOCAB = 50304  # the special tokens need a padded vocabulary


def finetune_config(config_file: str | None, overrides: dict) -> tuple[TrainConfig, set[str]]:
    """finetune.toml, then the user's file, then flags; also the keys the user set (file or flags)."""
    values = read_config_file(DEFAULTS)
    user = read_config_file(Path(config_file)) if config_file else {}
    user.update({k: v for k, v in overrides.items() if v is not None})
    values.update(user)
    if "data" not in values:
        raise NanoplayError("finetune needs --data: a JSONL file of conversations (or JSON, parquet, a Hub dataset id)")
    return TrainConfig(**values), set(user)


def newest_pretrained() -> str:
    """The local run (not a chat model) whose newest checkpoint was written last."""
    root = checkpoints_root()
    candidates = []
    if root.is_dir():
        for run in root.iterdir():
            steps = list_steps(run)
            if steps:
                newest = steps[max(steps)]
                if not read_config(newest).get("chat_template"):
                    candidates.append((newest.stat().st_mtime, run.name))
    if not candidates:
        raise NanoplayError(f"no pre-trained checkpoint under {root}/ to fine-tune: pass --init gpt2 (or any model "
                            f"spec), or train one first with `nanoplay train --preset demo`")
    return max(candidates)[1]


def pad_vocab(model: GPT, vocab_size: int = CHAT_VOCAB) -> GPT:
    """A Hub GPT-2 (50257) gets the reserved ids; new rows start at the mean embedding (and output row)."""
    if model.config.vocab_size >= vocab_size:
        return model
    config = dataclasses.replace(model.config, vocab_size=vocab_size)
    padded = GPT(config)
    rows = ["transformer.wte.weight", "lm_head.weight"]  # (vocab, n_embd); one tensor when tied
    state = {k: v for k, v in model.state_dict().items() if k not in rows}
    padded.load_state_dict(state, strict=False)
    old_state, new_state = model.state_dict(), padded.state_dict()
    with torch.no_grad():
        for name in rows[:1] if config.tie_word_embeddings else rows:
            old, new = old_state[name], new_state[name]
            new[:old.size(0)] = old
            new[old.size(0):] = old.mean(dim=0)
    return padded


def show_mask(example: chat_data.Example) -> None:
    """Print one conversation, trained tokens highlighted (the targets the loss sees)."""
    from rich.console import Console
    from rich.text import Text

    tok = get_tokenizer()
    text = Text()
    for token_id, trained in zip(example.ids, example.trained):
        text.append(tok.decode([token_id]), style="bold black on green" if trained else "dim")
    console = Console()
    console.print(Text("trained", style="bold black on green") + Text("  ") + Text("not trained (context only)", style="dim"))
    console.print(f"line {example.line}: {sum(example.trained)} of {len(example.ids)} tokens trained")
    console.print(text)


def make_chat_sampler(name: str, messages: list[dict], cfg: TrainConfig):
    from nanoplay.engine import Engine
    from nanoplay.sampling import SamplingParams

    engine = Engine(max_slots=1)
    prompt = render_prompt(messages, CHAT_TEMPLATE)
    params = SamplingParams(max_new_tokens=cfg.sample_tokens, temperature=0.0, stop_token_ids=[END_ID], top_logprobs=0)
    wrapped = {}

    def sample(model: GPT) -> str:
        if id(model) not in wrapped:
            wrapped[id(model)] = LoadedModel(name=name, model=model, source="checkpoint", location=name,
                                             meta={"chat_template": CHAT_TEMPLATE})
        model.eval()
        try:
            return f"{messages[-1]['content']!r} -> {engine.generate(wrapped[id(model)], prompt, params).text!r}"
        finally:
            model.train()

    return sample


@dataclass
class Plan:
    """What a fine-tuning run will do: the effective config, the model and the conversations."""

    cfg: TrainConfig
    model: GPT
    resume_state: dict | None
    examples: list[chat_data.Example]  # the valid conversations, in file order
    problems: list[chat_data.Problem]
    data: chat_data.ChatData
    sample_messages: list[dict]  # the first held-out question, answered at each evaluation
    notes: dict[str, str]  # for --print-config: where values the user did not write come from


def plan_finetune(config_file: str | None = None, overrides: dict | None = None, resume: bool = False,
                  skip_invalid: bool = False, world_size: int = 1) -> Plan:
    """
    The config that will run: the --init model's shape, the run's name (INIT-chat unless --name), and
    max_iters from `epochs` over the training conversations unless max_iters is set (flag or file).
    Invalid conversations stop it (listed on stderr) unless `skip_invalid`.
    """
    overrides = dict(overrides or {})
    cfg, user_keys = finetune_config(config_file, overrides)
    resume_state = None
    if resume:
        if not cfg.name:
            raise NanoplayError("--resume needs --name: the fine-tuning run to continue")
        cfg, model, resume_state = resume_run(checkpoints.run_dir(cfg.name), overrides)
        notes = {"model": f"the model of {cfg.name}'s newest checkpoint: --resume keeps its shape"}
    else:
        init_name = cfg.init or newest_pretrained()
        model = pad_vocab(load_model(init_name).model.float())
        cfg = dataclasses.replace(cfg, init=init_name, name=cfg.name or f"{Path(init_name).name.split('@')[0]}-chat",
                                  **{f: getattr(model.config, f) for f in MODEL_FIELDS if f != "dropout"})
        set_dropout(model, cfg.dropout)
        notes = {"model": f"the shape of --init {init_name}, its vocabulary padded for the chat tokens: read from "
                          f"the model, not from here (dropout excepted)"}

    examples, problems = chat_data.load_conversations(cfg.data, cfg.block_size)
    if problems:
        report = chat_data.report_problems(problems, cfg.data)
        if not skip_invalid:
            print(report, file=sys.stderr)
            raise NanoplayError(f"{cfg.data} has {len(problems)} invalid conversation(s), listed above: "
                                f"fix them, or pass --skip-invalid to train on the {len(examples)} valid ones")
    train, val = chat_data.split_examples(examples, cfg.val_fraction, cfg.seed)
    micro_per_step = cfg.gradient_accumulation_steps * world_size
    data = chat_data.ChatData(train, val, cfg.batch_size, micro_per_step, cfg.seed, cfg.eval_batches, cfg.data)
    if cfg.epochs > 0 and "max_iters" not in user_keys:
        epoch_steps = math.ceil(cfg.epochs * data.steps_per_epoch())
        cfg = dataclasses.replace(cfg, max_iters=max(epoch_steps, cfg.min_iters))
        counted = f"{cfg.epochs:g} epochs of {len(train)} training conversations"
        if epoch_steps < cfg.min_iters:
            counted = (f"{counted} are {epoch_steps} steps: min_iters raises it to "
                       f"{cfg.max_iters / data.steps_per_epoch():.3g} epochs")
        notes["max_iters"] = f"{counted} (delete this line to count again for other data)"
    notes.update(schedule_notes(cfg))
    first = (val or train)[0].messages
    sample_messages = first[:next(i for i, m in enumerate(first) if m["role"] == "assistant")]
    return Plan(cfg, model.train(), resume_state, examples, problems, data, sample_messages, notes)


def run_finetune(config_file: str | None = None, overrides: dict | None = None, resume: bool = False,
                 skip_invalid: bool = False, show_mask_only: bool = False, display: str = "auto") -> TrainResult | None:
    cfg, _ = finetune_config(config_file, dict(overrides or {}))
    dist_info = init_distributed(pick_device(cfg.device).type)  # a bad device fails here, before anything loads
    plan = plan_finetune(config_file, overrides, resume, skip_invalid, dist_info.world_size)
    cfg = plan.cfg
    if plan.problems and dist_info.is_main:
        print(f"--skip-invalid: dropped {len(plan.problems)} invalid conversation(s), training on {len(plan.examples)}",
              file=sys.stderr)
    if show_mask_only:  # (with no valid conversation, plan_finetune has already said so)
        show_mask(plan.examples[0])
        return None

    run_dir = checkpoints.run_dir(cfg.name)
    if not resume and list_steps(run_dir):
        raise NanoplayError(f"{run_dir} already has checkpoints: pass --resume --name {cfg.name}, or --name NEW")
    if dist_info.is_main:
        checkpoints.clean_partial_writes(run_dir)
    sampler = make_chat_sampler(cfg.name, plan.sample_messages, cfg) if dist_info.is_main and cfg.sample_tokens else None
    meta = {"run": cfg.name, "data": cfg.data, "init": cfg.init, "chat_template": CHAT_TEMPLATE,
            "dropped_invalid": len(plan.problems)}
    return train_loop(cfg, plan.model, plan.data, run_dir, meta=meta, title=f"finetune {cfg.name}",
                      resume_state=plan.resume_state, sampler=sampler, dist_info=dist_info, display=display)
