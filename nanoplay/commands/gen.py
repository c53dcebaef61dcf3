"""`nanoplay gen`: scripted generation, streamed as text or written as JSONL with log-probabilities."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import NanoplayError
from ..textio import argument_text, json_text, read_text
from .common import (add_model_options, alternative_record, check_top_logprobs, json_line, load_models, read_stdin,
                     resolve_device, torch_dtype)


def register(subparsers) -> None:
    p = subparsers.add_parser("gen", help="generate from one or more models (text or JSONL with logprobs)")
    add_model_options(p)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", "-p", action="append", help="a prompt (repeatable); default: read stdin")
    src.add_argument("--prompts", type=Path, metavar="FILE",
                     help='prompts file: .jsonl (one {"prompt": ...} or JSON string per line), .json (an array of those) '
                          'or text (one per line)')
    p.add_argument("--n", type=int, default=1, help="samples per prompt and model (seeds seed, seed+1, ...)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--min-p", type=float)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--stop", action="append", default=[],
                   help=r"stop string (repeatable; not included); escapes \n \t \r \\ \uXXXX")
    p.add_argument("--no-stop-eot", action="store_true", help="keep going past <|endoftext|>")
    p.add_argument("--seed", type=int, help="random seed (default: a random one, reported; greedy uses none); "
                                             "prompt k of --prompts uses seed + 1000003*k")
    p.add_argument("--no-eot-prefix", action="store_true",
                   help="feed the prompt as it is, not after <|endoftext|> (see README: Sampling)")
    p.add_argument("--top-logprobs", type=int, default=5, help="alternatives per token in --json output")
    p.add_argument("--chat", action="store_true", help="treat each prompt as a user message in the model's chat template")
    p.add_argument("--json", action="store_true", help="one JSON object per completion")
    p.add_argument("--draft", metavar="SPEC", help="a small model with the same vocabulary that drafts tokens for every "
                                                   "model to check (speculative decoding: same output, fewer forwards)")
    p.add_argument("--draft-tokens", type=int, default=4, metavar="K", help="tokens the draft proposes per step (1-16)")
    p.set_defaults(run=run)


def read_prompts(args) -> list[str]:
    if args.prompt:
        return [argument_text(p, "--prompt") for p in args.prompt]
    if args.prompts:
        return read_prompts_file(args.prompts)
    if sys.stdin.isatty():
        raise NanoplayError("no prompt: give --prompt TEXT, --prompts FILE, or pipe text on stdin")
    text = read_stdin()
    if not text:
        raise NanoplayError("no prompt on stdin: it was empty; pipe some text, or give --prompt TEXT or --prompts FILE")
    return [text.removesuffix("\n")]  # the newline `echo` ends with is not part of the prompt, as with $(...)


def read_prompts_file(path: Path) -> list[str]:
    """A .jsonl file (a prompt per line), a .json file (an array of prompts) or text (a prompt per line)."""
    text = read_text(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        prompts = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise NanoplayError(f"{path}:{number}: not valid JSON ({e.msg}); each line must be "
                                    f'{{"prompt": "..."}} or a JSON string') from e
            prompts.append(prompt_from_item(item, f"{path}:{number}"))
    elif suffix == ".json":
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            hint = "; one JSON value per line is JSONL: name the file .jsonl" if e.msg == "Extra data" else ""
            raise NanoplayError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno}){hint}") from e
        if not isinstance(items, list):
            raise NanoplayError(f'{path}: expected a JSON array of prompts, like ["...", {{"prompt": "..."}}]')
        prompts = [prompt_from_item(item, f"{path}: item {i} of the array") for i, item in enumerate(items, 1)]
    else:
        prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise NanoplayError(f"{path} holds no prompts")
    return prompts


def prompt_from_item(item, where: str) -> str:
    """A prompt as a JSONL line or a JSON array item gives it: {"prompt": "..."} or a string."""
    if isinstance(item, dict) and isinstance(item.get("prompt"), str):
        return json_text(item["prompt"], where)
    if isinstance(item, str):
        return json_text(item, where)
    raise NanoplayError(f'{where}: expected {{"prompt": "..."}} or a JSON string')


def sampling_params(args, seed: int | None, chat_template=None, chat: bool = False):
    from ..sampling import SamplingParams, parse_stop_string

    stop, stop_ids = [parse_stop_string(argument_text(s, "--stop")) for s in args.stop], []
    if chat:
        from ..chat import stop_strings, stop_token_ids

        stop += stop_strings(chat_template)
        stop_ids = stop_token_ids(chat_template)
    return SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        min_p=args.min_p, repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty, stop=stop, stop_token_ids=stop_ids,
        stop_on_eot=not args.no_stop_eot, seed=seed, top_logprobs=args.top_logprobs,
    )


def completion_record(request, prompt: str, index: int) -> dict:
    """One completion in OpenAI-like shapes, plus nanoplay's per-token extras."""
    def top(alternatives):
        return [{**alternative_record(a), "sampling_logprob": a.sampling_logprob} for a in alternatives]

    return {
        "model": request.model.name,
        "dtype": request.model.precision,  # what --dtype auto chose: bf16's figures are not fp32's
        "prompt": prompt,
        "index": index,
        "seed": request.seed,
        "settings": request.params.to_dict(),
        "text": request.text,
        "finish_reason": request.finish_reason,
        "error": request.error,
        "prompt_tokens": len(request.prompt_ids),
        "prompt_truncated": request.prompt_truncated,
        "window_slides": request.window_slides,
        "completion_tokens": len(request.tokens),
        "perplexity": request.perplexity,
        "tokens_per_second": request.tokens_per_second,
        "draft": request.draft.name if request.draft else None,
        "draft_proposed": request.draft_proposed,  # draft tokens proposed, and kept as the model's own choice
        "draft_accepted": request.draft_accepted,
        "tokens": [
            {"token": t.text, "id": t.id, "bytes": list(t.bytes), "logprob": t.logprob,
             "sampling_logprob": t.sampling_logprob, "rank": t.rank, "entropy": t.entropy, "top_logprobs": top(t.top)}
            for t in request.tokens
        ],
    }


def run(args) -> int:
    import random

    from ..engine import Engine
    from ..sampling import derive_seed
    from ..speculative import check_draft_tokens

    if args.n < 1:
        raise NanoplayError("--n must be at least 1")
    check_top_logprobs(args.top_logprobs)
    check_draft_tokens(args.draft_tokens)  # with or without --draft: a bad value is refused either way
    prompts = read_prompts(args)
    # bad settings (a stop string's escape, a seed out of range: derive_seed wraps only the later
    # prompts' and samples' seeds) fail before any model loads
    sampling_params(args, args.seed)
    device = resolve_device(args.device)
    dtype = torch_dtype(args.dtype, device)
    engine = Engine()
    models = load_models(engine, args.model, device, dtype)
    draft = load_models(engine, [args.draft], device, dtype)[0] if args.draft else None
    greedy = args.temperature == 0  # draws no random numbers: no seed to choose, report or record
    base_seed = None if greedy else args.seed if args.seed is not None else random.randrange(2**31)
    jobs = []  # (request, prompt, sample index), in output order
    for model in models:
        if args.chat and model.chat_template is None:
            print(f"nanoplay: note: {model.name} is not chat-tuned: --chat gives it a plain-text chat "
                  f'("User: ..." then "Assistant:")', file=sys.stderr)
        for k, prompt in enumerate(prompts):
            prompt_input = prompt
            if args.chat:
                from ..chat import render_prompt

                prompt_input = render_prompt([{"role": "user", "content": prompt}], model.chat_template)
            for i in range(args.n):  # each prompt its own stream; the models on one prompt share it
                seed = None if greedy else derive_seed(base_seed, k, i)
                params = sampling_params(args, seed, model.chat_template, args.chat)
                jobs.append((engine.submit(model, prompt_input, params, eot_prefix=not args.no_eot_prefix, draft=draft,
                                           draft_tokens=args.draft_tokens), prompt, i))
    for request, _, i in jobs:
        if request.prompt_truncated and i == 0:  # a prompt's samples share its truncation: one note
            print(f"nanoplay: note: prompt longer than {request.model.name}'s context of "
                  f"{request.model.config.block_size} tokens: kept its last {len(request.prompt_ids)} tokens; "
                  f"the window slides as it generates", file=sys.stderr)
    if args.seed is None and not greedy and not args.json:  # JSON records carry their seeds
        print(f"nanoplay: seed {base_seed} (--seed {base_seed} repeats this run)", file=sys.stderr)
    if args.json:
        requests = [r for r, _, _ in jobs]
        try:
            engine.run_until_done(requests)
        except KeyboardInterrupt:  # Ctrl+C: the unfinished completions are written too, as 'cancelled'
            for r in requests:
                r.cancel()
            engine.run_until_done(requests)
            write_records(jobs)
            raise
        write_records(jobs)
    else:
        stream_text(engine, jobs, show_headers=len(jobs) > 1, chat=args.chat)
    if draft is not None:
        proposed = sum(r.draft_proposed for r, _, _ in jobs)
        accepted = sum(r.draft_accepted for r, _, _ in jobs)
        print(f"nanoplay: draft {draft.name}: {accepted} of {proposed} proposed tokens accepted"
              + (f" ({accepted / proposed:.0%})" if proposed else ""), file=sys.stderr)
    failed = [r for r, _, _ in jobs if r.finish_reason == "error"]
    for r in failed:
        print(f"nanoplay: error: {r.error}", file=sys.stderr)
    return 1 if failed else 0


def write_records(jobs) -> None:
    for request, prompt, i in jobs:
        print(json_line(completion_record(request, prompt, i)))


def stream_text(engine, jobs, show_headers: bool, chat: bool = False) -> None:
    """
    Print completions one after another, the current one as it streams (all run batched). Several
    completions get a header each and a blank line between them; a chat shows the user's message and
    the answer on lines of their own.
    """
    out = sys.stdout
    for n, (request, prompt, i) in enumerate(jobs):
        if show_headers:
            seed = "" if request.seed is None else f" · seed {request.seed}"
            out.write(("\n" if n else "") + f"── {request.model.name} · sample {i + 1}{seed} ──\n")
        out.write(f"User: {prompt}\nAssistant: " if chat else prompt)
        shown, started = 0, not chat  # a chat answer's leading spaces ("Assistant: A ...") are not shown twice
        while True:
            text = request.text
            new = text[shown:]
            if not started:
                new = new.lstrip()
                started = bool(new)
            out.write(new)
            out.flush()
            shown = len(text)
            if request.done:
                break
            engine.step()
        note = f" [{request.finish_reason}"
        if request.window_slides:
            note += f", window slid {request.window_slides}x"
        if request.perplexity is not None:
            note += f", ppl {request.perplexity:.2f}"
        out.write("\n" if not show_headers else f"\n{note}]\n")
