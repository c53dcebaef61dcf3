"""
Speed measurements for `nanoplay bench`: prefill and decode tokens/s of the shared sampler, the same
weights through transformers' `generate()` in the same process, and the memory-bandwidth bound.

Machines are noisy, so each number is the best of several alternating repeats (ours, theirs, ours, ...)
and only ratios measured side by side in one run are quoted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .engine import Engine, use_decode_layout
from .loading import LoadedModel
from .model import GPT, GPTConfig
from .sampling import SamplingParams

SHAPES = {
    "owt-30m": GPTConfig(n_layer=6, n_head=6, n_embd=384, block_size=512, vocab_size=50304),
    "gpt2-124m": GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257),
}


def random_model(shape: str, seed: int = 0) -> LoadedModel:
    """A model of a named shape with random weights: the speed does not depend on the values."""
    torch.manual_seed(seed)
    model = GPT(SHAPES[shape]).eval()
    use_decode_layout(model)  # as Engine.load does for CPU models
    return LoadedModel(name=f"{shape} (random weights)", model=model, source="random", location=shape)


def timed(fn, device: torch.device) -> float:
    """Seconds `fn()` takes, including the GPU work it queued."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t


def measure_bandwidth(device: torch.device, size_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes/s of a streaming read through a buffer larger than any cache (a sum over 1 GiB)."""
    x = torch.ones(size_bytes // 4, device=device)
    return size_bytes / min(timed(x.sum, device) for _ in range(repeats))


def weight_bytes(model: LoadedModel) -> int:
    """Bytes read per decode step: every parameter once (the tied embedding counts once)."""
    return sum(p.numel() * p.element_size() for p in model.model.parameters())


def to_transformers(loaded: LoadedModel):
    """The same weights in transformers' GPT2LMHeadModel (via our export mapping, in memory)."""
    import tempfile

    from transformers import GPT2LMHeadModel

    from .export import export_hf, transformers_quiet

    with tempfile.TemporaryDirectory() as tmp, transformers_quiet():
        export_hf(loaded.model, tmp)
        hf = GPT2LMHeadModel.from_pretrained(tmp, dtype=loaded.dtype)
    return hf.eval().to(loaded.device)


@dataclass
class Result:
    label: str
    batch: int
    prefill_tok_s: float
    decode_tok_s: float  # aggregate over the batch


def bench_ours(engine: Engine, model: LoadedModel, batch: int, prompt_tokens: int, new_tokens: int,
               label: str = "nanoplay") -> Result:
    """Greedy decoding of `batch` different prompts at once; decode speed from first to last token."""
    prompts = [[(1000 + 17 * b + i) % 50000 for i in range(prompt_tokens)] for b in range(batch)]
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0, stop_on_eot=False, top_logprobs=5)
    t = time.perf_counter()
    first = engine.generate(model, prompts[0] + [7], SamplingParams(max_new_tokens=1, temperature=0))
    prefill = (prompt_tokens + 1) / (first.first_token_at - t)
    requests = [engine.submit(model, p, params) for p in prompts]
    engine.run_until_done(requests)
    start = max(r.first_token_at for r in requests)  # all prefilled: from here on every step is batched
    end = max(r.finished_at for r in requests)
    decoded = sum(len(r.tokens) for r in requests) - batch
    return Result(label, batch, prefill, decoded / (end - start))


@torch.inference_mode()
def bench_transformers(hf, batch: int, prompt_tokens: int, new_tokens: int, device) -> Result:
    prompts = torch.tensor([[(1000 + 17 * b + i) % 50000 for i in range(prompt_tokens)] for b in range(batch)],
                           device=device)
    common = dict(do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(prompts))
    one = timed(lambda: hf.generate(prompts, max_new_tokens=1, **common), prompts.device)
    full = timed(lambda: hf.generate(prompts, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **common),
                 prompts.device)
    return Result("transformers", batch, batch * prompt_tokens / one, batch * (new_tokens - 1) / (full - one))


def run_bench(model: LoadedModel, batches=(1, 4), prompt_tokens: int = 128, new_tokens: int = 128,
              vs_transformers: bool = False, repeats: int = 3, on_result=None) -> dict:
    engines = {"nanoplay": Engine()}
    if model.device.type == "cuda":  # what the CUDA graphs buy: the same engine with ordinary eager steps
        engines["nanoplay, eager steps"] = Engine(static_decode=False)
    hf = to_transformers(model) if vs_transformers else None
    for engine in engines.values():  # warm up: allocate the cache, touch the weights, capture graphs
        for b in batches:
            bench_ours(engine, model, b, prompt_tokens, 8)
    best: dict[tuple[str, int], Result] = {}
    for _ in range(repeats):
        for b in batches:
            runs = [bench_ours(engine, model, b, prompt_tokens, new_tokens, label) for label, engine in engines.items()]
            if hf is not None:
                runs.append(bench_transformers(hf, b, prompt_tokens, new_tokens, model.device))
            for r in runs:
                key = (r.label, b)
                if key not in best or r.decode_tok_s > best[key].decode_tok_s:
                    best[key] = r
        if on_result:
            on_result(best)
    bandwidth = measure_bandwidth(model.device)
    return {"results": best, "bandwidth": bandwidth, "weight_bytes": weight_bytes(model)}
