"""
The shared sampler: one Engine serves every model the process has loaded.

Requests are submitted from any thread and advanced one token per `step()`: for each model, new
requests are prefilled into a slot of the model's static KV cache (reusing any cached prefix), then all
of the model's running requests decode together in one batched forward. `start()` runs the stepping in
a background thread (the TUI); `generate()` and `run_until_done()` drive it in the caller's thread (the
CLI, the trainer).

A request records everything about what it generated: per token the id, text, log-probability under
the model's raw distribution and under the sampling distribution, rank, entropy and top alternatives;
and for the request its running perplexity, finish reason and any context-window slides.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .cpu_decode import decode_thread_count, keep_freed_memory, threads_for, use_decode_layout
from .cpu_kernel import KernelDecoder, tensors_read, watched_or_wrapped, why_not_compiled
from .errors import NanoplayError
from .kvcache import KVCache
from .loading import LoadedModel, load_model, resolve_device
from .precision import quantize_int8
from .sampling import Distribution, SamplingParams, apply_penalties, choose, draw_noise, logits_fault
from .speculative import DEFAULT_DRAFT_TOKENS, DraftCache, check_draft, speculative_step
from .static_decode import StaticDecoder
from .tokenizer import TextStream, get_tokenizer

DEFAULT_CACHE_BUDGET = 2 * 1024**3  # bytes of KV cache per model, which sets its number of slots
MAX_SLOTS = 8


@dataclass
class Alternative:
    id: int
    text: str
    logprob: float  # under the model's raw distribution
    sampling_logprob: float  # under the distribution sampled from (-inf where filtered out)


@dataclass
class TokenInfo:
    id: int
    text: str  # the text this token completed ("" while a UTF-8 character is still incomplete)
    bytes: bytes  # the token's own bytes
    logprob: float  # log-probability under the model's raw distribution
    sampling_logprob: float  # under the distribution actually sampled from
    rank: int  # 1 = the model's most likely token
    entropy: float  # of the raw distribution, in nats
    top: list[Alternative] = field(default_factory=list)


UpdateCallback = Callable[["Request", list[TokenInfo], str], None]


class Request:
    """One completion being generated. Read its fields; call cancel() to stop it."""

    _id_counter = itertools.count(1)

    def __init__(self, runner: "ModelRunner", prompt_ids: list[int], params: SamplingParams,
                 on_update: UpdateCallback | None, prefix: list[int] = ()):
        """prefix: context before the prompt that is not part of it (text_context's <|endoftext|>)."""
        block = runner.loaded.config.block_size
        self.id = next(self._id_counter)
        self.model = runner.loaded
        self.params = params.with_seed()
        self.seed = self.params.seed
        self.prompt_truncated = 0  # prompt tokens dropped because the prompt outgrew the context
        context = [*prefix, *prompt_ids]
        if len(context) >= block:  # keep room to generate before the first slide; the prefix goes first
            context = context[-(block - min(self.params.max_new_tokens, block // 2)):]
            self.prompt_truncated = max(0, len(prompt_ids) - len(context))
            prompt_ids = prompt_ids[self.prompt_truncated:]
        self.prompt_ids = prompt_ids
        self._prefix_len = len(context) - len(prompt_ids)  # context tokens before the prompt
        self.tokens: list[TokenInfo] = []
        self.text = ""  # generated text, stop strings excluded
        self.finish_reason: str | None = None  # length | stop | eot | cancelled | error
        self.error: str | None = None
        self.window_slides = 0  # times the context window slid during generation
        self.on_update = on_update
        self.submitted_at = time.perf_counter()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        # engine-side state
        self._runner = runner
        self._ids = context  # the sequence so far: prefix + prompt + generated
        self._slot: int | None = None
        self._next_token: int | None = None  # sampled, not yet fed to the model
        self._cancel = False
        self._done = threading.Event()
        self._stream = TextStream(get_tokenizer(), context=prompt_ids)  # a character the prompt began is completed
        self._held = ""  # decoded text held back because it may begin a stop string
        self._token_starts: list[int] = []  # offset of each token's text in the unstopped text
        self._text_length = 0
        self._choices = 0  # tokens chosen so far: the next one's noise index (greedy draws no noise)
        self.draft: LoadedModel | None = None  # a draft model proposing tokens (speculative decoding)
        self.draft_tokens = 0  # tokens it proposes per step
        self.draft_proposed = 0  # draft tokens proposed so far
        self.draft_accepted = 0  # ... and kept because the model chose the same token
        self._counts = None
        if self.params.presence_penalty or self.params.frequency_penalty:
            self._counts = torch.zeros(runner.loaded.config.vocab_size, device=runner.loaded.device)

    # -- what callers use --------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def cancel(self) -> None:
        """Stop generating; the request finishes with reason 'cancelled' and frees its cache slot."""
        self._cancel = True
        self._runner.engine._wake()

    @property
    def perplexity(self) -> float | None:
        """exp of the mean negative log-probability of the generated tokens under the model."""
        if not self.tokens:
            return None
        return math.exp(-sum(t.logprob for t in self.tokens) / len(self.tokens))

    @property
    def tokens_per_second(self) -> float | None:
        """Decode speed: tokens after the first, over the time since the first."""
        end = self.finished_at or time.perf_counter()
        if self.first_token_at is None or len(self.tokens) < 2 or end <= self.first_token_at:
            return None
        return (len(self.tokens) - 1) / (end - self.first_token_at)

    @property
    def context_used(self) -> int:
        return len(self._ids) if self._slot is None else len(self._runner.cache.tokens[self._slot])

    # -- engine side -------------------------------------------------------------------------------

    def _accept(self, info: TokenInfo) -> str:
        """Record a generated token; returns the text that became final (stop strings held back)."""
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.tokens.append(info)
        self._ids.append(info.id)
        self._token_starts.append(self._text_length)
        self._text_length += len(info.text)
        if self._counts is not None:
            self._counts[info.id] += 1
        return self._release(self._held + info.text)

    def _release(self, text: str) -> str:
        stops = self.params.stop
        if not stops:
            self.text += text
            return text
        hits = [i for i in (text.find(s) for s in stops) if i >= 0]
        if hits:
            cut = min(hits)
            emitted, self._held = text[:cut], ""
            self.text += emitted
            stop_at = len(self.text)  # offset of the stop string in the unstopped text
            # tokens that begin at or after it: none of their text is in self.text (one that the stop
            # string begins partway through stays, so the tokens always spell out at least the text)
            while self.tokens and self._token_starts[-1] >= stop_at:
                self.tokens.pop()
                self._token_starts.pop()
            self._finish("stop")
            return emitted
        # hold back the longest tail that could still grow into a stop string
        hold = max((k for s in stops for k in range(1, min(len(s), len(text) + 1)) if text.endswith(s[:k])),
                   default=0)
        emitted, self._held = text[:len(text) - hold], text[len(text) - hold:]
        self.text += emitted
        return emitted

    def _finish(self, reason: str, error: str | None = None) -> str:
        """Mark finished; returns any held-back text released by it."""
        if self.finish_reason is not None:
            return ""
        tail = ""
        if reason != "stop":
            tail = self._held + self._stream.flush()
            self.text += tail
        self._held = ""
        self.finish_reason, self.error = reason, error
        self.finished_at = time.perf_counter()
        return tail

    def _noise(self, ahead: int) -> torch.Tensor:
        """
        The uniform noise (vocab,) of the token `ahead` places after the next one to be chosen: a
        function of the seed and the token's index alone (sampling.draw_noise), so whoever asks (a draft
        model looking ahead, or the model itself) gets the same, and speculation never changes it.
        """
        return draw_noise(self.seed, self._choices + ahead, self.model.config.vocab_size, self.model.device)

    def _take_noise(self) -> torch.Tensor:
        """The next token's noise, used up."""
        noise = self._noise(0)
        self._choices += 1
        return noise

    def _notify(self, new_tokens: list[TokenInfo], new_text: str) -> None:
        if self.on_update is not None:
            self.on_update(self, new_tokens, new_text)


def alternatives(ids: list[int], logprobs: list[float], sampling_logprobs: list[float]) -> list[Alternative]:
    tokenizer = get_tokenizer()
    return [Alternative(t, tokenizer.token_bytes(t).decode("utf-8", "replace"), lp, slp)
            for t, lp, slp in zip(ids, logprobs, sampling_logprobs)]


class ModelRunner:
    """One loaded model's KV cache, its slots, and the requests running on it."""

    def __init__(self, engine: "Engine", loaded: LoadedModel, max_slots: int, cache_budget: int):
        self.engine = engine
        self.loaded = loaded
        per_slot = KVCache.bytes_per_slot(loaded.config, loaded.dtype)
        self.num_slots = max(1, min(max_slots, cache_budget // per_slot))
        self._cache: KVCache | None = None  # allocated on first use, then reused for the process's life
        self._static: StaticDecoder | None = None
        use_static = engine.static_decode
        self.use_static_decode = loaded.device.type == "cuda" if use_static is None else use_static
        # the compiled CPU decode step (cpu_kernel.py), where the engine wants it and it can run this model
        self.use_compiled_decode = not self.use_static_decode and engine.compiles(loaded.model)
        self._compiled: KernelDecoder | None = None
        self.queue: list[Request] = []
        self.running: list[Request] = []
        self.owner: list[Request | None] = [None] * self.num_slots
        self.last_used = [0] * self.num_slots
        self._drafts: dict[int, DraftCache] = {}  # draft models' KV caches, by id of the draft
        self._clock = itertools.count(1)
        # keys and values are only reused (a cached prefix) from slots filled with the weights of now
        self._weights = tensors_read(loaded.model)
        self.weights_version = 0
        self.filled_with = [0] * self.num_slots  # the weights_version each slot's keys and values come from

    @property
    def cache(self) -> KVCache:
        if self._cache is None:
            self._cache = KVCache(self.loaded.config, self.num_slots, self.loaded.device, self.loaded.dtype)
        return self._cache

    @property
    def compiled(self) -> KernelDecoder | None:
        """The compiled decode step on this model's cache, when the runner decodes with one now: not while
        hooks watch the model, its forward is replaced or its tensors were replaced by ones the step
        cannot run, as last looked when a request joined (KernelDecoder.look_again)."""
        if not self.use_compiled_decode:
            return None
        if self._compiled is None:
            if why_not_compiled(self.loaded.model):
                return None
            self._compiled = KernelDecoder(self.loaded.model, self.cache)
        return None if self._compiled.why_not else self._compiled

    def has_work(self) -> bool:
        return bool(self.queue or self.running)

    def step(self) -> None:
        drafts = {id(r.draft): r.draft.model for r in self.running + self.queue if r.draft is not None}
        with threads_for(self.loaded.model, *drafts.values(), compiled=self.use_compiled_decode):
            self._step()

    @torch.inference_mode()
    def _step(self) -> None:
        for r in [r for r in self.queue + self.running if r._cancel]:
            self._complete(r, "cancelled")
        if self.queue:  # hooks, a wrapped forward or new weights since the last request take effect from this one
            self._look_at_models()
        decoding = list(self.running)
        # admit queued requests while slots are free; their prefill yields their first token
        while self.queue:
            slot = self._pick_slot(self.queue[0]._ids)
            if slot is None:
                break
            r = self.queue[0]
            r._slot = slot
            self.owner[slot] = r
            self.running.append(r)
            self.queue.pop(0)  # only now: a Ctrl+C in between leaves r in a list that cancelling sweeps
            self._prefill(r, r._ids)
        # everyone else advances by one token, in one batched forward
        sliding = [r for r in decoding if len(self.cache.tokens[r._slot]) >= self.loaded.config.block_size]
        for r in sliding:  # the window is full: keep its newer half, re-prefill, carry on
            r.window_slides += 1
            self._prefill(r, r._ids[-(self.loaded.config.block_size // 2):])
        batch = sorted((r for r in decoding if r not in sliding and r.finish_reason is None), key=lambda r: r._slot)
        for r in [r for r in batch if r.draft is not None]:
            if self._speculate(r):
                batch.remove(r)
        if batch:
            self._decode(batch)

    def _speculate(self, r: Request) -> bool:
        """One speculative step for r with its draft model (speculative.py); False if it must decode plainly."""
        drafts = self._drafts.get(id(r.draft))
        if drafts is None or drafts.draft is not r.draft:
            drafts = self._drafts[id(r.draft)] = DraftCache(r.draft, self.num_slots, self.engine.compiles(r.draft.model))
        return speculative_step(self, r, drafts)

    def _look_at_models(self) -> None:
        """
        What the steps derived from the model (and its drafts) still hold: tensors replaced or changed in
        place since (tensors_read) make every cached key and value stale and the CUDA graphs' addresses
        old; hooks or a replaced forward would not run in a graph's replay; the compiled step looks
        for itself (KernelDecoder.look_again). Called when a request joins (a walk of the modules).
        """
        weights = tensors_read(self.loaded.model)
        if weights != self._weights:
            dtypes = [{t[1] for t in w} for w in (self._weights, weights)]
            if dtypes[0] != dtypes[1]:  # the KV cache and every step were made for the dtype it was loaded in
                names = [", ".join(sorted(str(d).removeprefix("torch.") for d in ds)) for ds in dtypes]
                raise NanoplayError(f"its weights went from {names[0]} to {names[1]} after loading: load it in "
                                    f"the dtype you want instead (Engine.load(spec, dtype=...), --dtype)")
            self._weights = weights
            self.weights_version += 1
            self._static = None
        elif self._static is not None and self._static.capture and watched_or_wrapped(self.loaded.model):
            self._static = None
        if self._compiled is not None:
            self._compiled.look_again(weights)
        for drafts in self._drafts.values():
            drafts.look_again()

    def _pick_slot(self, ids: list[int]) -> int | None:
        """A free slot for a new sequence, pre-filled with the longest cached prefix of `ids` we have
        (from slots filled with the weights of now)."""
        free = [s for s in range(self.num_slots) if self.owner[s] is None]
        if not free:
            return None
        cached = self.cache.tokens
        best, best_len = None, 0
        for s in range(self.num_slots):
            if self.filled_with[s] != self.weights_version:
                continue
            n = _common_prefix(cached[s], ids, limit=len(ids) - 1)  # the last token is always fed
            if n > best_len:
                best, best_len = s, n
        if best is not None and self.owner[best] is None:
            return best
        slot = min(free, key=lambda s: (self.last_used[s], s))  # least recently used
        if best is not None:  # the prefix is in a busy slot: copy it over
            self.cache.copy_prefix(best, slot, best_len)
            self.filled_with[slot] = self.weights_version
        return slot

    def _prefill(self, r: Request, ids: list[int]) -> None:
        """Feed `ids` into r's slot (after whatever prefix the slot already holds) and sample."""
        cache = self.cache
        if self.filled_with[r._slot] != self.weights_version:  # keys and values of other weights
            cache.tokens[r._slot], self.filled_with[r._slot] = [], self.weights_version
        start = _common_prefix(cache.tokens[r._slot], ids, limit=len(ids) - 1)
        feed = ids[start:]
        cache.bind_prefill(r._slot, start, len(feed))
        device = self.loaded.device
        idx = torch.tensor([feed], device=device)
        positions = torch.arange(start, len(ids), device=device).unsqueeze(0)
        logits = self.loaded.model(idx, positions=positions, cache=cache, last_only=True)[:, -1]
        cache.tokens[r._slot] = list(ids)
        self._sample([r], logits)

    def _decode(self, batch: list[Request]) -> None:
        cache = self.cache
        slots = [r._slot for r in batch]
        positions = [len(cache.tokens[s]) for s in slots]
        if self.use_static_decode:
            if self._static is None:
                self._static = StaticDecoder(self.loaded.model, cache)
            logits = self._static.decode(slots, [r._next_token for r in batch], positions)  # (B, vocab)
        elif (compiled := self.compiled) is not None:
            logits = compiled.decode(slots, [r._next_token for r in batch], positions, decode_thread_count())
        else:
            cache.bind_decode(slots, positions)
            device = self.loaded.device
            idx = torch.tensor([[r._next_token] for r in batch], device=device)  # (B, 1)
            pos = torch.tensor(positions, device=device).unsqueeze(1)  # (B, 1)
            logits = self.loaded.model(idx, positions=pos, cache=cache)[:, -1]  # (B, vocab)
        for r in batch:
            cache.tokens[r._slot].append(r._next_token)
        self._sample(batch, logits)

    def _sample(self, batch: list[Request], logits: torch.Tensor) -> None:
        """Choose each request's next token from its row of logits (B, vocab) and record it."""
        tokenizer = get_tokenizer()
        raw = logits.float()
        k = max(r.params.top_logprobs for r in batch)
        distribution = Distribution.of(raw, k)
        faults = [None] * len(batch) if distribution.finite_checked else logits_fault(logits)
        if any(faults):  # such a row has no distribution to sample: its request fails, the others go on
            for r, fault in zip(batch, faults):
                if fault is not None:
                    self._complete(r, "error", f"{self.loaded.name}: {fault}")
            keep = [i for i, fault in enumerate(faults) if fault is None]
            if not keep:
                return
            batch, raw = [batch[i] for i in keep], raw[keep]
            distribution = Distribution.of(raw, k)
        tokens, sampling = self._choose(batch, raw, distribution)  # B ids; (B, 1 + m) or None for plain greedy
        chosen_lp, rank, top_ids, top_lp = distribution.figures(tokens, k)
        if sampling is None:  # greedy: the sampling distribution is a point mass on the argmax
            chosen_slp = [0.0] * len(batch)
            top_slp = [[0.0 if i == token else float("-inf") for i in ids] for ids, token in zip(top_ids, tokens)]
        else:
            chosen_slp, top_slp = [row[0] for row in sampling], [row[1:1 + k] for row in sampling]
        columns = (tokens, chosen_lp, chosen_slp, rank, distribution.entropy.tolist(), top_ids, top_lp, top_slp)
        for r, (token, lp, slp, rank, entropy, alt_ids, alt_lp, alt_slp) in zip(batch, zip(*columns)):
            p = r.params
            if (token == tokenizer.eot_id and p.stop_on_eot) or token in p.stop_token_ids:
                self._complete(r, "eot" if token == tokenizer.eot_id else "stop")
                continue
            k = p.top_logprobs
            info = TokenInfo(id=token, text=r._stream.push(token), bytes=tokenizer.token_bytes(token), logprob=lp,
                             sampling_logprob=slp, rank=rank, entropy=entropy,
                             top=alternatives(alt_ids[:k], alt_lp[:k], alt_slp[:k]))
            new_text = r._accept(info)
            if r.finish_reason is None and len(r.tokens) >= p.max_new_tokens:
                new_text += r._finish("length")
            if r.finish_reason is not None:
                self._release_slot(r)
            else:
                r._next_token = token
            r._notify([info], new_text)
            if r.finish_reason is not None:
                r._done.set()

    @staticmethod
    def _choose(batch: list[Request], raw: torch.Tensor,
                distribution: Distribution) -> tuple[list[int], list[list[float]] | None]:
        """
        Next tokens (B), and for each row the sampling log-probabilities of its token and of the
        distribution's top ids (B, 1 + m), asked of each row's sampling distribution for those ids alone
        (sampling.SamplingLogprobs); None when all are plain greedy.
        """
        if all(r.params.is_plain_greedy for r in batch):
            return distribution.greedy(), None  # +inf logits win, as in the sampler
        tokens, picked = [], []
        for i, (r, top_ids) in enumerate(zip(batch, distribution.top_ids.tolist())):
            p = r.params
            noise = None if p.temperature == 0 else r._take_noise()
            seen = (torch.tensor(r._ids[r._prefix_len:], device=raw.device, dtype=torch.long)
                    if p.repetition_penalty != 1.0 else None)  # prompt + output, not text_context's prefix
            token, sampling = choose(apply_penalties(raw[i], p, seen, r._counts), p, noise)
            tokens.append(token)
            picked.append(sampling.at([token] + top_ids))
        return tokens, picked

    def _complete(self, r: Request, reason: str, error: str | None = None) -> None:
        tail = r._finish(reason, error)
        if r in self.queue:
            self.queue.remove(r)
        self._release_slot(r)
        r._notify([], tail)
        r._done.set()

    def _release_slot(self, r: Request) -> None:
        if r in self.running:
            self.running.remove(r)
        if r._slot is not None:
            self.owner[r._slot] = None
            self.last_used[r._slot] = next(self._clock)


def text_context(ids: list[int], eot_prefix: bool = True) -> list[int]:
    """
    The one conditioning rule for "how likely is this text" and "continue this text": the model sees
    the text's ids after <|endoftext|>, as GPT-2 saw every document in training, so the first token
    is predicted from it (as lm-evaluation-harness's loglikelihood_rolling and `nanoplay score` do).
    Ids that already begin with it (a chat template) are left as they are. eot_prefix=False gives
    the ids as they are: the first token is then predicted from nothing (scoring skips it). An empty
    text is [<|endoftext|>] either way: generation needs a token to start from.
    """
    eot = get_tokenizer().eot_id
    if not ids or (eot_prefix and ids[0] != eot):
        return [eot, *ids]
    return list(ids)


def check_token_ids(model: LoadedModel, ids, from_text: bool) -> None:
    """
    The one check of input token ids against a model's vocabulary, for every entry point (gen, score,
    eval, the playground, the Python API). `ids` is a list or a tensor of the whole sequence the model
    will see; `from_text`: they come from GPT-2's BPE, which a model with another vocabulary (a
    character-level nanoGPT) cannot read. Raises NanoplayError naming the model and the fix.
    """
    ids = torch.as_tensor(ids, dtype=torch.long)
    vocab = model.config.vocab_size
    bad = ids[(ids < 0) | (ids >= vocab)]
    if model.foreign_vocabulary and (from_text or bad.numel()):
        raise NanoplayError(model.foreign_vocabulary)
    if bad.numel():
        raise NanoplayError(f"token id {bad[0].item()} is outside {model.name}'s vocabulary of {vocab} "
                            f"(ids 0 to {vocab - 1})")


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    n = min(len(a), len(b), limit)
    for i in range(n):
        if a[i] != b[i]:
            return i
    return max(n, 0)


class Engine:
    """Loads models once and runs every request of every model through shared, batched decoding."""

    def __init__(self, max_slots: int = MAX_SLOTS, cache_budget: int = DEFAULT_CACHE_BUDGET,
                 static_decode: bool | None = None, compiled_decode: bool = True):
        """
        static_decode: decode every slot in one fixed-shape step (static_decode.py), replayed as CUDA
        graphs on a GPU. None, the default, uses it on CUDA devices only: on a CPU the ordinary step,
        which reads only the keys each batch needs, is faster.
        compiled_decode: on a CPU, decode with the compiled step (cpu_kernel.py) where it can run the
        model; False keeps every step in torch.
        """
        self.max_slots = max_slots
        self.cache_budget = cache_budget
        self.static_decode = static_decode
        self.compiled_decode = compiled_decode
        keep_freed_memory()  # decode steps allocate vocabulary-wide tensors: reuse them, not fresh pages
        self._runners: dict[int, ModelRunner] = {}
        self._loaded: dict[tuple, LoadedModel] = {}
        self._cond = threading.Condition()
        self._step_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = False

    # -- models ------------------------------------------------------------------------------------

    def load(self, spec: str, device: str | None = None, dtype: torch.dtype = torch.float32,
             progress=None, gelu: str | None = None) -> LoadedModel:
        """
        Load `spec` once (None: onto the GPU when there is one, else the CPU); later calls share it.
        dtype torch.int8 quantizes the weight matrices to int8 (CPU only; see precision.py).
        `gelu` ("tanh" or "exact") sets a nanoGPT checkpoint's GELU, as the spec suffix #gelu=... does.
        """
        device = resolve_device(device)
        key = (spec, str(device), dtype, gelu)
        if key not in self._loaded:
            int8 = dtype == torch.int8  # int8 weights, float32 activations (precision.py)
            loaded = load_model(spec, device=device, dtype=torch.float32 if int8 else dtype, progress=progress,
                                gelu=gelu)
            if int8:
                try:
                    quantize_int8(loaded.model)
                except NanoplayError as e:  # which of several models cannot be int8
                    raise NanoplayError(f"{loaded.name}: {e}") from None
            if loaded.device.type == "cpu":
                use_decode_layout(loaded.model, compiled=self.compiles(loaded.model))
            self._loaded[key] = loaded
        return self._loaded[key]

    def compiles(self, model: torch.nn.Module) -> bool:
        """Whether this engine decodes `model` in the compiled CPU step (compiled_decode, and it can)."""
        return self.compiled_decode and why_not_compiled(model) is None

    def unload(self, model: LoadedModel) -> None:
        """Cancel the model's requests and free its KV cache (a pane closed, say)."""
        with self._cond:
            runner = self._runners.get(id(model))
            if runner is None or runner.loaded is not model:
                return
            requests = runner.queue + runner.running
        for r in requests:
            r.cancel()
        for r in requests:
            if self._thread is None:
                self.run_until_done([r])
            r.wait()
        with self._cond:
            del self._runners[id(model)]
            self._loaded = {k: v for k, v in self._loaded.items() if v is not model}

    def _runner(self, model: LoadedModel) -> ModelRunner:
        with self._cond:
            runner = self._runners.get(id(model))
            if runner is None or runner.loaded is not model:
                runner = self._runners[id(model)] = ModelRunner(self, model, self.max_slots, self.cache_budget)
            return runner

    # -- requests ----------------------------------------------------------------------------------

    def submit(self, model: LoadedModel, prompt: str | list[int], params: SamplingParams | None = None,
               on_update: UpdateCallback | None = None, eot_prefix: bool = True, draft: LoadedModel | None = None,
               draft_tokens: int = DEFAULT_DRAFT_TOKENS) -> Request:
        """
        Queue a completion of `prompt` (text, or token ids) and return its Request at once. The model
        sees the prompt as `text_context` gives it: after <|endoftext|> unless eot_prefix is False.
        With a `draft` model sharing the vocabulary, the request decodes speculatively: the draft
        proposes `draft_tokens` tokens per step and the model checks them in one forward, giving exactly
        the tokens and figures it gives alone (speculative.py). Raises NanoplayError for bad input.
        """
        if draft is not None:
            check_draft(model, draft, draft_tokens)
        tokenizer = get_tokenizer()
        ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        context = text_context(ids, eot_prefix)
        check_token_ids(model, context, from_text=isinstance(prompt, str))
        runner = self._runner(model)
        request = Request(runner, ids, params or SamplingParams(), on_update, prefix=context[:len(context) - len(ids)])
        if draft is not None:
            request.draft, request.draft_tokens = draft, draft_tokens
        with self._cond:
            runner.queue.append(request)
            self._cond.notify_all()
        return request

    def step(self) -> bool:
        """Advance every request by one token. Returns False when there was nothing to do."""
        with self._step_lock:
            with self._cond:
                runners = [r for r in self._runners.values() if r.has_work()]
            for runner in runners:
                try:
                    runner.step()
                except Exception as e:  # a failing model must not take the others down
                    why = str(e) if isinstance(e, NanoplayError) else f"{type(e).__name__}: {e}"  # ours say it all
                    message = f"{runner.loaded.name}: {why}"
                    for r in runner.queue + runner.running:
                        runner._complete(r, "error", message)
            return bool(runners)

    def run_until_done(self, requests: list[Request]) -> None:
        """Drive the engine in this thread (or wait for the background one) until `requests` finish."""
        while not all(r.done for r in requests):
            if self._thread is not None:
                for r in requests:
                    r.wait()
            elif not self.step():
                break

    def generate(self, model: LoadedModel, prompt: str | list[int], params: SamplingParams | None = None,
                 eot_prefix: bool = True, draft: LoadedModel | None = None,
                 draft_tokens: int = DEFAULT_DRAFT_TOKENS) -> Request:
        """submit() and run until done, in this thread."""
        request = self.submit(model, prompt, params, eot_prefix=eot_prefix, draft=draft, draft_tokens=draft_tokens)
        self.run_until_done([request])
        return request

    # -- background stepping (the TUI) -------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="nanoplay-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            with self._cond:
                self._stopping = True
                self._cond.notify_all()
            self._thread.join()
            self._thread = None

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not any(r.has_work() for r in self._runners.values()):
                    self._cond.wait()
                if self._stopping:
                    return
            self.step()

    # -- scoring -----------------------------------------------------------------------------------

    @torch.inference_mode()
    def score(self, model: LoadedModel, text: str | list[int], top_logprobs: int = 5,
              eot_prefix: bool = True) -> list[TokenInfo]:
        """
        Per-token data for every token of `text` under `model`, each predicted from the tokens before
        it in `text_context(ids, eot_prefix)`: the first from <|endoftext|>, or (eot_prefix=False) not
        at all. Texts longer than the context are scored in windows that overlap by half, so every
        token sees at least half a context. Raises NanoplayError when the model's logits are NaN.
        """
        tokenizer = get_tokenizer()
        ids = tokenizer.encode(text) if isinstance(text, str) else list(text)
        seq = text_context(ids, eot_prefix) if ids else []
        check_token_ids(model, seq, from_text=isinstance(text, str))
        with threads_for(model.model):
            return self._score_windows(model, seq, top_logprobs)

    @staticmethod
    def _score_windows(model: LoadedModel, seq: list[int], top_logprobs: int) -> list[TokenInfo]:
        tokenizer = get_tokenizer()
        window = model.config.block_size
        stride = max(1, window // 2)
        stream = TextStream(tokenizer)
        out: list[TokenInfo] = []
        first_target, begin = 1, 0
        while first_target < len(seq):
            end = min(begin + window, len(seq))
            idx = torch.tensor([seq[begin:end]], device=model.device)
            logits = model.model(idx)[0]  # (T, vocab): predicts seq[begin+1:end+1]
            fault = next((f for f in logits_fault(logits) if f is not None), None)
            if fault is not None:
                raise NanoplayError(f"{model.name}: {fault}")
            # the rows predicting seq[first_target:end]
            rows = Distribution.of(logits[first_target - 1 - begin:end - 1 - begin], top_logprobs)
            chosen_lp, rank, top_ids, top_lp = rows.figures(seq[first_target:end], top_logprobs)
            columns = (chosen_lp, rank, rows.entropy.tolist(), top_ids, top_lp)
            for token, lp, rank, entropy, alt_ids, alt_lp in zip(seq[first_target:end], *columns):
                # nothing is sampled: the sampling distribution is the model's own
                out.append(TokenInfo(id=token, text=stream.push(token), bytes=tokenizer.token_bytes(token),
                                     logprob=lp, sampling_logprob=lp, rank=rank, entropy=entropy,
                                     top=alternatives(alt_ids, alt_lp, alt_lp)))
            first_target = end
            begin += stride
        return out
