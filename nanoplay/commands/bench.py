"""`nanoplay bench`: decode and prefill speed, side by side with transformers, against the bandwidth bound."""

from __future__ import annotations

from .common import add_model_options, load_models, resolve_device, stdout_console, torch_dtype


# nanoplay.bench.SHAPES, named here so that parsing the command line does not import torch
SHAPE_NAMES = ("gpt2-124m", "owt-30m")


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="prefill/decode tokens/s, optionally against transformers generate()")
    add_model_options(p, required=False)
    p.add_argument("--shape", choices=SHAPE_NAMES, action="append",
                   help="benchmark a preset shape with random weights (no download needed)")
    p.add_argument("--vs", choices=["transformers"], help="also run the same weights through transformers")
    p.add_argument("--batch", type=int, action="append", help="batch sizes (default: 1 and 4)")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="alternating repeats; the best of each is kept")
    p.add_argument("--scoring", action="store_true",
                   help="benchmark batched scoring (nanoplay eval's path) against a transformers forward instead")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.set_defaults(run=run)


def run(args) -> int:
    import torch
    from ..bench import random_model, run_bench
    from ..evaluation import bench_scoring
    from ..engine import Engine
    from ..errors import NanoplayError

    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.model and not args.shape:
        raise NanoplayError("nothing to benchmark: give --model SPEC or --shape owt-30m / gpt2-124m")
    checks = (("--batch", args.batch or [1], 1), ("--threads", [1 if args.threads is None else args.threads], 1),
              ("--repeats", [args.repeats], 1), ("--prompt-tokens", [args.prompt_tokens], 1),
              ("--new-tokens", [args.new_tokens], 2))  # decode speed is measured from the second token on
    for flag, values, least in checks:
        if min(values) < least:
            raise NanoplayError(f"{flag} must be at least {least}")
    device, dtype = resolve_device(args.device), torch_dtype(args.dtype)
    engine = Engine()
    models = load_models(engine, args.model or [], device, dtype)
    models += [random_model(s) for s in args.shape or []]
    for model in models:
        if not args.scoring and args.prompt_tokens + 1 >= model.config.block_size:
            raise NanoplayError(f"--prompt-tokens {args.prompt_tokens} does not fit {model.name}'s context of "
                                f"{model.config.block_size} tokens: give at most {model.config.block_size - 2}")
    console = stdout_console()
    console.print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, device {device}, {args.dtype}; "
                  f"{args.prompt_tokens}-token prompts, {args.new_tokens} new tokens, greedy, best of {args.repeats}")
    for model in models:
        model.model.to(device=device, dtype=dtype)
        if args.scoring:
            console.print(render_scoring(bench_scoring(model, batch_size=max(args.batch or [4]))))
            continue
        report = run_bench(model, batches=tuple(args.batch or (1, 4)), prompt_tokens=args.prompt_tokens,
                           new_tokens=args.new_tokens, vs_transformers=args.vs == "transformers",
                           repeats=args.repeats)
        console.print(render(model, report))
    return 0


def render(model, report):
    from rich.table import Table

    results, bandwidth = report["results"], report["bandwidth"]
    bound = bandwidth / report["weight_bytes"] if bandwidth else None
    title = f"{model.name}: {model.num_params / 1e6:.1f}M params, {report['weight_bytes'] / 1e6:.0f} MB of weights"
    if bandwidth:
        title += f"; memory bandwidth {bandwidth / 1e9:.1f} GB/s -> batch-1 bound {bound:.1f} tok/s"
    table = Table(title=title)
    for col in ("batch", "engine", "prefill tok/s", "decode tok/s", "vs transformers", "vs batch 1", "of bound"):
        table.add_column(col, justify="right")
    for (label, batch), r in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0] != "nanoplay")):
        theirs = results.get(("transformers", batch))
        single = results.get((label, 1))
        table.add_row(
            str(batch), label, f"{r.prefill_tok_s:.0f}", f"{r.decode_tok_s:.1f}",
            f"{r.decode_tok_s / theirs.decode_tok_s:.2f}x" if theirs and label != "transformers" else "",
            f"{r.decode_tok_s / single.decode_tok_s:.2f}x" if single and batch != 1 else "",
            f"{r.decode_tok_s / bound:.0%}" if bound and batch == 1 else "",
        )
    return table


def render_scoring(r: dict):
    from rich.table import Table

    table = Table(title=f"{r['model']}: scoring {r['batch_size']} x {r['seq_len']} tokens (stride {r['stride']}), "
                        f"median of {r['repeats']}; max logit difference {r['max_logit_diff']:.1e}")
    for col in ("engine", "tokens/s", "vs transformers"):
        table.add_column(col, justify="right")
    table.add_row("nanoplay", f"{r['ours_tokens_per_s']:.0f}", f"{r['ratio']:.2f}x")
    table.add_row("transformers forward", f"{r['transformers_tokens_per_s']:.0f}", "")
    return table
