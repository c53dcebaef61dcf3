"""`nanoplay train` (pre-training) and `nanoplay finetune` (chat fine-tuning): the trainer package's CLI."""

from __future__ import annotations


def register(subparsers) -> None:
    from trainer.config import add_config_flags, preset_names

    p = subparsers.add_parser("train", help="pre-train a GPT (presets: owt-30m, gpt2-124m, demo)",
                              description="Pre-train a GPT. Settings come from a preset or --config file; "
                                          "every setting is also a flag, which wins.")
    p.add_argument("--preset", help=f"one of: {', '.join(preset_names())} (default: owt-30m)")
    p.add_argument("--config", metavar="FILE", help="a TOML config file (start from --print-config)")
    p.add_argument("--resume", action="store_true", help="continue the run checkpoints/NAME from its newest checkpoint")
    p.add_argument("--print-config", action="store_true",
                   help="print the config that would run as TOML (with an --init model's shape) and exit")
    add_config_flags(p)
    p.set_defaults(run=run_train)

    p = subparsers.add_parser("finetune", help="fine-tune a model on conversations (JSONL) into a chat model",
                              description="Fine-tune on conversations: one JSON object per line with "
                                          '{"messages": [{"role": ..., "content": ...}]}, a bare list of messages, '
                                          'or {"prompt": ..., "response": ...}.')
    p.add_argument("--config", metavar="FILE", help="a TOML config file (start from --print-config)")
    p.add_argument("--resume", action="store_true", help="continue the run checkpoints/NAME from its newest checkpoint")
    p.add_argument("--print-config", action="store_true",
                   help="print the config that would run as TOML (the --init model's shape, the name, the steps) and exit")
    p.add_argument("--skip-invalid", action="store_true", help="train on the valid conversations, report how many were dropped")
    p.add_argument("--show-mask", action="store_true", help="print one example coloured by trained / not trained, and exit")
    add_config_flags(p, sections=("data", "optim", "run"),
                     help_texts={"name": "run name under checkpoints/ (default: the --init model's name + -chat)"})
    p.add_argument("--init", help="model spec to start from (default: the newest local pre-trained checkpoint)")
    p.set_defaults(run=run_finetune)


def run_train(args) -> int:
    from trainer.config import load_config, overrides_from_args
    from trainer.train import train

    overrides = overrides_from_args(args)
    config = load_config(args.preset, args.config, overrides)
    if args.print_config:
        from trainer.train import config_notes, setup

        effective, _, _ = setup(config, args.resume, overrides)  # an --init model's shape, a resumed run's config
        print(effective.to_toml(config_notes(effective, args.resume)), end="")
        return 0
    result = train(config, resume=args.resume, overrides=overrides)
    _finish_distributed()
    print(f"{'stopped' if result.stopped_early else 'finished'} at step {result.step}"
          + (f"; last checkpoint {result.checkpoint}" if result.checkpoint else ""))
    return 0


def run_finetune(args) -> int:
    from trainer.config import overrides_from_args
    from trainer.finetune import plan_finetune, run_finetune as finetune

    overrides = overrides_from_args(args)
    if args.print_config:
        plan = plan_finetune(args.config, overrides, resume=args.resume, skip_invalid=args.skip_invalid)
        print(plan.cfg.to_toml(plan.notes), end="")
        return 0
    result = finetune(args.config, overrides, resume=args.resume, skip_invalid=args.skip_invalid,
                      show_mask_only=args.show_mask)
    _finish_distributed()
    if result is not None:
        print(f"{'stopped' if result.stopped_early else 'finished'} at step {result.step}"
              + (f"; chat checkpoint {result.checkpoint}" if result.checkpoint else ""))
    return 0


def _finish_distributed():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
