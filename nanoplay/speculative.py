"""
Speculative decoding in the shared sampler: a small draft model proposes a few tokens, and the model
checks them all in one forward.

It is exact in the strong sense: with the same seed a request gives the same tokens and the same
per-token figures with and without a draft model. The model's token at every position is still chosen
by its own sampling chain (sampling.py) from its own logits, with that position's exponential-race
noise, a function of the seed and the token's index alone (`Request._noise`, sampling.draw_noise), and
the draft proposes with the very same noise. So the draft never changes a
token, only how many forwards of the model it takes, and common random numbers across panes survive.
(The figures agree to float rounding: the model scores k+1 tokens in one forward instead of one at a
time.)

One step for a request whose next token y0 is chosen but not yet fed to the model:
  1. the draft catches up on the sequence (its own KV cache, one slot per slot of the model's) and
     proposes d1..dk, each as the draft's sampling chain with that position's noise would choose it;
  2. the model feeds [y0, d1, ..., dk] in one forward: k+1 rows of logits;
  3. row j gives the model's token y(j+1), recorded exactly as an ordinary step records a token;
     the step ends at the first y(j+1) != d(j+1), whose cache entries are simply overwritten later.
     When all k agree, row k gives one more token for free.
With a draft that agrees often the model runs about once per accepted run of tokens instead of once
per token; on a CPU a forward of k+1 tokens costs little more than one, since both read every weight once.

Requests with a draft are checked one at a time (not batched with the model's other requests), and
near the end of either model's context a request falls back to ordinary steps, which slide the window.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .cpu_decode import decode_thread_count
from .cpu_kernel import KernelDecoder, tensors_read
from .errors import NanoplayError
from .kvcache import KVCache
from .sampling import apply_penalties, choose

if TYPE_CHECKING:
    from .engine import ModelRunner, Request
    from .loading import LoadedModel

DEFAULT_DRAFT_TOKENS = 4
MAX_DRAFT_TOKENS = 16  # the most tokens a draft may propose per step (gen --draft-tokens, bench)
# longer feeds (a draft catching up on a new prompt) take torch's forward. A check of k proposals feeds
# k + 1 tokens, and must take the step that decodes without a draft (torch's products round otherwise)
MAX_COMPILED_TOKENS = MAX_DRAFT_TOKENS + 1
GPT2_VOCAB = 50257  # tokens of GPT-2's BPE; larger vocabularies are padding beyond them


def check_draft_tokens(draft_tokens: int) -> None:
    """Refuse a number of draft tokens per step outside 1..MAX_DRAFT_TOKENS (raises NanoplayError)."""
    if not 1 <= draft_tokens <= MAX_DRAFT_TOKENS:
        raise NanoplayError(f"draft tokens per step must be between 1 and {MAX_DRAFT_TOKENS}, not {draft_tokens}")


def check_draft(model: "LoadedModel", draft: "LoadedModel", draft_tokens: int) -> None:
    """Refuse a draft model that cannot propose the model's tokens (raises NanoplayError)."""
    check_draft_tokens(draft_tokens)
    v, vd = model.config.vocab_size, draft.config.vocab_size
    if v != vd and min(v, vd) < GPT2_VOCAB:
        raise NanoplayError(f"draft model {draft.name} (vocabulary {vd}) does not share {model.name}'s "
                            f"vocabulary ({v}): a draft must use the same tokenizer")
    if draft.device != model.device:
        raise NanoplayError(f"draft model {draft.name} is on {draft.device}, {model.name} on {model.device}: "
                            f"load both on one device")


class DraftCache:
    """
    A draft model's KV cache beside one model's: the draft's slot i follows the model's slot i. With
    `compiled` (Engine.compiles), the draft's forwards of a few tokens run in the compiled CPU step.
    """

    def __init__(self, draft: "LoadedModel", slots: int, compiled: bool):
        self.draft = draft
        self.cache = KVCache(draft.config, slots, draft.device, draft.dtype)
        self.compiled = KernelDecoder(draft.model, self.cache) if compiled else None
        self._weights = tensors_read(draft.model)

    def look_again(self) -> None:
        """The draft's weights replaced or changed since: its cached keys and values are stale (see
        ModelRunner._look_at_models); its compiled step is handed the same reading (KernelDecoder.look_again)."""
        weights = tensors_read(self.draft.model)
        if weights != self._weights:
            self._weights = weights
            self.cache.tokens = [[] for _ in self.cache.tokens]
        if self.compiled is not None:
            self.compiled.look_again(weights)


def forward_tokens(model: "LoadedModel", cache: KVCache, compiled: KernelDecoder | None, slot: int, start: int,
                   tokens: list[int], last_only: bool = False) -> torch.Tensor:
    """
    Logits (len(tokens), vocab) -- (1, vocab) with last_only -- of `tokens` fed into `slot` at positions
    start.. (after what the slot holds before `start`), their keys and values cached: in the compiled
    step when there is one and the tokens are few (it reads every weight once for up to 4 of them),
    else in a torch forward.
    """
    if compiled is not None and not compiled.why_not and len(tokens) <= MAX_COMPILED_TOKENS:
        positions = list(range(start, start + len(tokens)))
        logits = compiled.decode([slot] * len(tokens), tokens, positions, decode_thread_count())
        return logits[-1:] if last_only else logits
    cache.bind_prefill(slot, start, len(tokens))
    positions = torch.arange(start, start + len(tokens), device=model.device).unsqueeze(0)
    return model.model(torch.tensor([tokens], device=model.device), positions=positions, cache=cache,
                       last_only=last_only)[0]


def speculative_step(runner: "ModelRunner", r: "Request", drafts: DraftCache) -> bool:
    """
    Advance request r by one speculative step (one forward of the model, 1 to k+1 tokens recorded).
    Returns False, doing nothing, when r cannot speculate now: too near the end of either context, or
    one token from its limit. The caller then decodes it the ordinary way.
    """
    cache, model = runner.cache, runner.loaded
    slot = r._slot
    start = len(cache.tokens[slot])  # where y0 goes
    k = min(r.draft_tokens,
            r.params.max_new_tokens - len(r.tokens) - 1,  # the last row's token is a free extra one
            model.config.block_size - 1 - start,  # positions start..start+k must fit the context
            drafts.draft.config.block_size - 1 - start)  # the draft feeds up to d(k-1) after y0
    if k < 1:
        return False
    proposed = _propose(r, drafts, cache.tokens[slot] + [r._next_token], k, model.config.vocab_size)

    # 2. the model scores y0, d1..dk in one forward: row j predicts the token after the j-th of them
    fed = [r._next_token] + proposed
    logits = forward_tokens(model, cache, runner.compiled, slot, start, fed)  # (k+1, vocab)
    prefix = cache.tokens[slot]

    # 3. record the model's own choice row by row, up to the first disagreement
    r.draft_proposed += k
    row = 0
    for row in range(k + 1):
        runner._sample([r], logits[row:row + 1])  # chooses with the next noise, records, may finish r
        if r.finish_reason is not None or row == k or r._next_token != proposed[row]:
            break
        r.draft_accepted += 1
    cache.tokens[slot] = prefix + fed[:row + 1]  # the fed tokens that are now part of the sequence
    return True


@torch.inference_mode()
def _propose(r: "Request", drafts: DraftCache, window: list[int], k: int, vocab_size: int) -> list[int]:
    """
    The draft's k proposals after `window` (the model's cached tokens and y0: the draft sees the same
    context as the model, slid windows included), each chosen with the noise of its position.
    """
    from .engine import _common_prefix

    draft, dcache, slot, params = drafts.draft, drafts.cache, r._slot, r.params
    seen_ids = r._ids[r._prefix_len:]  # what penalties look at, as in an ordinary step: prompt and output
    counts = r._counts.clone() if r._counts is not None else None
    # catch up: feed whatever of the window the draft's slot does not hold yet
    start = _common_prefix(dcache.tokens[slot], window, len(window) - 1)
    feed = window[start:]
    proposed: list[int] = []
    for j in range(k):
        logits = forward_tokens(draft, dcache, drafts.compiled, slot, start, feed, last_only=True)[0]  # (Vd,)
        dcache.tokens[slot] = window[:start] + feed
        seen = torch.tensor(seen_ids, device=draft.device) if params.repetition_penalty != 1.0 else None
        noise = None if params.temperature == 0 else r._noise(j)
        token, _ = choose(apply_penalties(_to_vocab(logits.float(), vocab_size), params, seen, counts), params, noise)
        proposed.append(token)
        seen_ids.append(token)
        if counts is not None:
            counts[token] += 1
        window, start, feed = window + [token], start + len(feed), [token]
    return proposed


def _to_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The draft's logits (Vd,) over the model's vocabulary (V,): padding entries cut or ruled out."""
    if logits.size(0) >= vocab_size:
        return logits[:vocab_size]
    return torch.cat([logits, logits.new_full((vocab_size - logits.size(0),), float("-inf"))])

