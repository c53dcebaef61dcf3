"""`nanoplay bench`: decode and prefill speed at each precision, side by side with transformers and llama.cpp,
against the bandwidth bound."""

from __future__ import annotations

import os
import sys

from .common import add_model_options, load_models, resolve_device, stdout_console, torch_dtype


# nanoplay.bench.SHAPES, named here so that parsing the command line does not import torch
SHAPE_NAMES = ("gpt2-124m", "gpt2-large", "gpt2-medium", "owt-30m")


# nanoplay.bench.LLAMA_CPP_QUANTIZED, as --vs names them
VS_LLAMA_CPP_QUANTIZED = ("llama.cpp:q4_0", "llama.cpp:q4_k_m")
DEFAULT_BENCH_TOKENS = 128  # prompt and new tokens, where the model's context allows


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="prefill/decode tokens/s, optionally against transformers and llama.cpp")
    add_model_options(p, required=False, dtypes=True)
    p.add_argument("--shape", choices=SHAPE_NAMES, action="append",
                   help="benchmark a preset shape with random weights (no download needed)")
    p.add_argument("--vs", choices=["transformers", "llama.cpp", *VS_LLAMA_CPP_QUANTIZED, "ctranslate2"], action="append",
                   help="also run the same weights through transformers generate(), llama.cpp (at the type "
                        "matching each --dtype, or at a 4-bit type: llama.cpp:q4_0, llama.cpp:q4_k_m) or "
                        "CTranslate2 (fp32 and int8); repeatable. llama.cpp and CTranslate2 come with "
                        "pip install 'nanoplay[bench]'")
    p.add_argument("--batch", type=int, action="append", help="batch sizes (default: 1 and 4)")
    p.add_argument("--prompt-tokens", type=int, help="default: 128, or half the smallest context benchmarked")
    p.add_argument("--new-tokens", type=int, help="default: 128, or half the smallest context benchmarked")
    p.add_argument("--repeats", type=int, default=3, help="alternating repeats; the best of each is kept")
    p.add_argument("--scoring", action="store_true",
                   help="benchmark batched scoring (nanoplay eval's path) against a transformers forward instead")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    draft = p.add_mutually_exclusive_group()
    draft.add_argument("--draft", metavar="SPEC", help="speculative decoding instead: each model alone against the "
                                                       "model with this draft (a model spec or a --shape name)")
    draft.add_argument("--draft-layers", type=int, metavar="N",
                       help="speculative decoding instead, the draft being each model's own first N layers")
    p.add_argument("--draft-tokens", type=int, action="append", metavar="K",
                   help="tokens the draft proposes per step (repeatable; default 4)")
    p.set_defaults(run=run)


def run(args) -> int:
    import torch
    from ..bench import at_precision, available, random_model, run_bench
    from ..evaluation import bench_scoring
    from ..engine import Engine
    from ..errors import NanoplayError
    from ..precision import PRECISION_NAMES
    from ..speculative import check_draft_tokens

    if not args.model and not args.shape:
        raise NanoplayError("nothing to benchmark: give --model SPEC or --shape owt-30m / gpt2-124m")
    checks = (("--batch", args.batch or [1], 1), ("--threads", [1 if args.threads is None else args.threads], 1),
              ("--repeats", [args.repeats], 1), ("--prompt-tokens", [args.prompt_tokens or 0] * (args.prompt_tokens is not None), 1),
              ("--new-tokens", [args.new_tokens or 0] * (args.new_tokens is not None), 2),  # decode speed is measured from the second token on
              ("--draft-layers", [] if args.draft_layers is None else [args.draft_layers], 1))
    for flag, values, least in checks:
        if values and min(values) < least:
            raise NanoplayError(f"{flag} must be at least {least}, not {min(values)}")
    for k in args.draft_tokens or []:
        check_draft_tokens(k)
    if args.threads is not None:
        cpus = os.cpu_count() or args.threads
        if args.threads > cpus:  # threads beyond the CPUs wait on each other: every number would be lower
            print(f"note: --threads {args.threads} is more than the CPUs here ({cpus}): expect slower numbers",
                  file=sys.stderr)
        torch.set_num_threads(args.threads)
    vs = set(args.vs or [])
    llama_types = tuple(name.partition(":")[2] for name in VS_LLAMA_CPP_QUANTIZED if name in vs)
    for name in sorted(vs - {"transformers"}):
        module, package = ("ctranslate2", "ctranslate2") if name == "ctranslate2" else ("llama_cpp", "llama-cpp-python")
        if not available(module):
            raise NanoplayError(f"--vs {name} needs {package}: pip install 'nanoplay[bench]'")
    device = resolve_device(args.device)
    dtypes = list(dict.fromkeys(torch_dtype(name, device) for name in args.dtype or ["auto"]))
    if torch.int8 in dtypes and torch.device(device).type != "cpu":
        raise NanoplayError("--dtype int8 runs on the CPU only (torch's int8 kernel): add --device cpu")
    if torch.int8 in dtypes and args.scoring:
        raise NanoplayError("--scoring runs the same weights through transformers, which has no int8 weights "
                            "here: give --dtype fp32 or bf16")
    engine = Engine()
    # (float32 reference, {dtype: the model at that precision}) per model: the reference is what llama.cpp
    # converts and what a lower precision's quality is measured against
    sources = []
    for spec in args.model or []:
        variants = dict(zip(dtypes, (load_models(engine, [spec], device, d)[0] for d in dtypes)))
        reference = variants.get(torch.float32)
        if reference is None and (len(dtypes) > 1 or dtypes != [torch.float32] or "llama.cpp" in vs):
            reference = load_models(engine, [spec], device, torch.float32)[0]
        sources.append((reference, variants))
    for shape in args.shape or []:
        reference = random_model(shape)
        reference.model.to(device)
        sources.append((reference, {d: at_precision(reference, d) for d in dtypes}))
    # defaults that fit every model benchmarked: prompt and new tokens together within the smallest context
    smallest = min(reference.config.block_size for reference, _ in sources)
    if args.prompt_tokens is None:
        args.prompt_tokens = min(DEFAULT_BENCH_TOKENS, smallest // 2)
    if args.new_tokens is None:
        args.new_tokens = max(2, min(DEFAULT_BENCH_TOKENS, smallest // 2, smallest - args.prompt_tokens))
    plain = not (args.scoring or args.draft or args.draft_layers)  # decoding args.prompt_tokens + new tokens
    for reference, _ in sources:
        config = reference.config
        if not args.scoring and args.prompt_tokens + 1 >= config.block_size:
            raise NanoplayError(f"--prompt-tokens {args.prompt_tokens} does not fit {reference.name}'s context of "
                                f"{config.block_size} tokens: give at most {config.block_size - 2}")
        # past the context the engine slides its window (re-prefilling half of it) and llama.cpp stops:
        # neither is decoding speed
        if plain and args.prompt_tokens + args.new_tokens > config.block_size:
            raise NanoplayError(f"--prompt-tokens {args.prompt_tokens} and --new-tokens {args.new_tokens} do not fit "
                                f"{reference.name}'s context of {config.block_size} tokens together: give at most "
                                f"{config.block_size} in all")
    console = stdout_console()
    threads = torch.get_num_threads()
    header = (f"torch {torch.__version__}, {threads} CPU thread{'s' if threads != 1 else ''}, device {device}, "
              f"{', '.join(PRECISION_NAMES[d] for d in dtypes)}; {args.prompt_tokens}-token prompts, "
              f"{args.new_tokens} new tokens, greedy, best of {args.repeats} alternating rounds")
    if args.draft or args.draft_layers:
        return run_draft(args, engine, sources, device, console, header)
    console.print(header)
    for reference, variants in sources:
        if args.scoring:
            for model in variants.values():
                console.print(render_scoring(bench_scoring(model, batch_size=max(args.batch or [4]))))
            continue
        reports = run_bench(variants, batches=tuple(args.batch or (1, 4)), prompt_tokens=args.prompt_tokens,
                            new_tokens=args.new_tokens, vs_transformers="transformers" in vs,
                            vs_llama_cpp="llama.cpp" in vs, llama_cpp_types=llama_types,
                            vs_ctranslate2="ctranslate2" in vs, repeats=args.repeats, reference=reference)
        for dtype, model in variants.items():
            console.print(render(model, reports[dtype]))
    return 0


def render(model, report):
    """The table of one model at one precision; names and labels are plain text, never markup."""
    from rich.table import Table
    from rich.text import Text

    results, bandwidth = report["results"], report["bandwidth"]
    bound = bandwidth / report["weight_bytes"] if bandwidth else None
    title = (f"{model.name}, {report['precision']}: {report['params'] / 1e6:.1f}M params, "
             f"{report['weight_bytes'] / 1e6:.0f} MB of weights read per token; decode: {report['decode']}")
    if bandwidth:
        title += (f"; streaming read of as many bytes {bandwidth / 1e9:.1f} GB/s (best of {report['bandwidth_reads']}, "
                  f"{report['threads']} threads) -> batch-1 bound {bound:.1f} tok/s")
    notes = []  # under the table: what a lower precision costs, and every engine that failed
    if "quality" in report:
        q = report["quality"]
        notes.append(f"quality vs fp32 on {q['tokens']} tokens of the bundled corpus: loss {q['loss']:.4f} vs "
                     f"{q['reference_loss']:.4f} nats/token ({q['loss'] - q['reference_loss']:+.4f}), "
                     f"most likely next token the same as fp32's {q['argmax_agreement']:.1%}")
    notes += [f"not measured: {failure}" for failure in report["failures"]]
    llama = report["llama_cpp"]  # the llama.cpp type matching this precision, or None
    if llama and any(batch > 1 for _, batch in results):
        notes.append("llama.cpp: batch 1 only (llama-cpp-python's Llama holds one sequence)")
    columns = ("batch", "engine", "prefill tok/s", "decode tok/s", "vs transformers", "vs llama.cpp",
               "vs batch 1", "of bound")
    rows = []
    for (label, batch), r in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0] != "nanoplay")):
        theirs = results.get(("transformers", batch))
        llamas = results.get((llama, batch))
        single = results.get((label, 1))
        rows.append((
            str(batch), Text(label), f"{r.prefill_tok_s:.0f}", f"{r.decode_tok_s:.1f}",
            f"{r.decode_tok_s / theirs.decode_tok_s:.2f}x" if theirs and label != "transformers" else "",
            f"{r.decode_tok_s / llamas.decode_tok_s:.2f}x" if llamas and not label.startswith("llama.cpp") else "",
            f"{r.decode_tok_s / single.decode_tok_s:.2f}x" if single and batch != 1 else "",
            # the bound is this precision's: another's weights are another size
            f"{r.decode_tok_s / bound:.0%}" if bound and batch == 1 and label not in report["other_precisions"] else "",
        ))
    shown = [i for i in range(len(columns)) if i < 4 or any(row[i] for row in rows)]  # ratios only where there are
    table = Table(title=Text(title), caption=Text("\n".join(notes)) if notes else None)
    for i in shown:
        table.add_column(columns[i], justify="right")
    for row in rows:
        table.add_row(*(row[i] for i in shown))
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


def run_draft(args, engine, sources, device, console, header: str) -> int:
    """bench --draft / --draft-layers: each model's decode speed alone and with a draft model, the draft
    at the model's precision (a truncated draft shares the model's own weights). Every draft is made
    before anything is printed: one that cannot be is the command's only line."""
    from rich.table import Table
    from rich.text import Text

    from ..bench import SHAPES, at_precision, bench_draft, random_model, truncated_draft
    from ..errors import NanoplayError
    from ..precision import PRECISION_NAMES

    drafts = {}  # dtype -> the draft model at that precision

    def draft_at(dtype):
        if dtype not in drafts:
            if args.draft in SHAPES:
                reference = random_model(args.draft, seed=1)
                reference.model.to(device)
                drafts[dtype] = at_precision(reference, dtype)
            else:
                drafts[dtype] = load_models(engine, [args.draft], device, dtype)[0]
        return drafts[dtype]

    pairs = []  # (precision, the model, its draft)
    for reference, variants in sources:
        for dtype, model in variants.items():
            try:
                pairs.append((dtype, model, draft_at(dtype) if args.draft else truncated_draft(model, args.draft_layers)))
            except ValueError as e:  # more layers than the model has
                raise NanoplayError(f"--draft-layers {args.draft_layers}: {e} ({model.name})") from e
    console.print(header)
    table = Table(title="speculative decoding: greedy, the same tokens with and without the draft "
                        f"(checked), best of {args.repeats} alternating rounds of {args.new_tokens} tokens")
    for col in ("model", "precision", "draft", "k", "alone tok/s", "with draft tok/s", "speed-up", "accepted"):
        table.add_column(col, justify="right")
    for dtype, model, draft in pairs:
        for k in args.draft_tokens or [4]:
            r = bench_draft(model, draft, new_tokens=args.new_tokens, draft_tokens=k, repeats=args.repeats)
            table.add_row(Text(r["model"]), PRECISION_NAMES[dtype], Text(r["draft"]), str(k),
                          f"{r['plain_tok_s']:.1f}", f"{r['draft_tok_s']:.1f}", f"{r['speedup']:.2f}x",
                          f"{r['acceptance']:.0%}")
    console.print(table)
    return 0
