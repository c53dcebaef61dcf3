"""
Evaluation metrics, each computed the way the published numbers it is compared with were.

Perplexity of a long token stream (WikiText, OpenWebText val, any text) uses the Hugging Face
perplexity guide's strided sliding window: windows of the model's own context start every `stride`
tokens, and each token is scored once, in the first window that reaches it, so it is predicted from
at least context - stride tokens of history (fewer only at the very start). With stride = context
the windows do not overlap and the first token of each window is predicted from nothing, so it is
left out, exactly as in the guide. From the summed negative log-likelihood we report

    loss      = nll / scored tokens                 (nats per token)
    ppl       = exp(loss)
    bits/byte = loss / ln 2 * tokens / bytes        (tokenizer-independent: bytes of UTF-8 text)
    word ppl  = exp(loss * tokens / words)          (WikiText; words split on whitespace)

The last two rescale the mean token loss to the whole text's tokens (Megatron-LM's "adjusted
perplexity" for WikiText), which is exact when every token is scored and otherwise treats the
handful of unscored window starts as average tokens.

`rule="rolling"` is lm-evaluation-harness's loglikelihood_rolling instead: every token is scored, the
first predicted from <|endoftext|>; the first window predicts the first `context` tokens, each later
one the next `context` tokens (fewer at the end) with the model reading the `context` tokens before
the last of them, so no token is scored twice. Documents (the harness's WikiText articles) are scored one by
one, each from its own <|endoftext|>.

LAMBADA is scored like lm-evaluation-harness (context = the text up to its last space, target = the
space and the last word, accuracy = every target token is the greedy choice, perplexity = exp of the
mean target nll per example); `rule="last-token"` is OpenAI's easier GPT-2 rule, where only the
text's final BPE token is predicted from everything before it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch.nn import functional as F

from .errors import NanoplayError
from .tokenizer import EOT_ID

LN2 = math.log(2)
LAMBADA_RULES = ("word", "last-token")
RULES = ("strided", "rolling")  # perplexity rules: the HF guide's sliding window, the harness's rolling windows
DEFAULT_BATCH_TOKENS = 8192  # tokens per forward
# Rows of logits projected at once: small enough on CPU that the (rows, vocab) block stays in cache
# while cross-entropy reads it back, large enough on GPU to keep it busy.
LOGIT_CHUNK_BYTES = {"cpu": 32 << 20, "cuda": 1 << 30}


def default_batch_size(seq_len: int, batch_tokens: int = DEFAULT_BATCH_TOKENS) -> int:
    return max(1, batch_tokens // seq_len)


def final_hidden(model, idx: torch.Tensor) -> torch.Tensor:
    """
    The model's forward up to, not including, lm_head: (B, T) ids -> (B, T, n_embd) after ln_f.
    Scoring projects only the positions it scores onto the vocabulary, one cache-sized block at a
    time, instead of materialising (B, T, vocab) logits; tests check lm_head of this equals model(idx).
    """
    tr = model.transformer
    positions = torch.arange(idx.size(1), device=idx.device)  # (T,)
    x = tr.drop(tr.wte(idx) + tr.wpe(positions))  # (B, T, n_embd)
    for block in tr.h:
        x = block(x)
    return tr.ln_f(x)


def target_scores(model, hidden: torch.Tensor, targets: torch.Tensor,
                  greedy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """
    Negative log-likelihood (M,) float64 on the CPU of the target ids (M,) that hidden states
    (M, n_embd) predict, and with greedy=True whether each target is the argmax (M,) bool.
    Computed in fp32 whatever the model's dtype, in row blocks so that the (M, vocab) logits never
    exist at once; log-sum-exp rather than cross_entropy, whose fp32 CPU kernel loses ~1e-4 nats
    summing many tiny probabilities.
    """
    device = hidden.device
    vocab = model.config.vocab_size
    chunk = max(1, LOGIT_CHUNK_BYTES.get(device.type, LOGIT_CHUNK_BYTES["cuda"]) // (4 * vocab))
    targets = targets.to(device)
    nll = torch.empty(targets.numel(), dtype=torch.float32, device=device)
    hits = torch.empty(targets.numel(), dtype=torch.bool, device=device) if greedy else None
    for i in range(0, targets.numel(), chunk):
        logits = model.lm_head(hidden[i:i + chunk]).float()  # (chunk, vocab)
        t = targets[i:i + chunk, None]  # (chunk, 1)
        nll[i:i + chunk] = (torch.logsumexp(logits, dim=-1, keepdim=True) - logits.gather(1, t))[:, 0]
        if greedy:
            hits[i:i + chunk] = logits.argmax(dim=-1) == t[:, 0]
    return nll.double().cpu(), (hits.cpu() if greedy else None)


# -----------------------------------------------------------------------------
# perplexity of a token stream


@dataclass
class PerplexityResult:
    nll: float  # summed negative log-likelihood of the scored tokens, nats
    scored: int  # tokens that were predicted (strided: all but the first of each non-overlapping window)
    tokens: int  # tokens in the whole stream
    bytes: int  # UTF-8 bytes of the text those tokens spell (end-of-text separators count 0)
    words: int  # words in the text (whitespace-separated; the harness's count for its WikiText)
    context: int
    stride: int | None  # None under the rolling rule
    rule: str = "strided"

    @property
    def loss(self) -> float:
        return self.nll / self.scored

    @property
    def ppl(self) -> float:
        return math.exp(self.loss)

    @property
    def bits_per_byte(self) -> float:
        return self.loss / LN2 * self.tokens / self.bytes

    @property
    def byte_ppl(self) -> float:
        return math.exp(self.loss * self.tokens / self.bytes)

    @property
    def word_ppl(self) -> float:
        return math.exp(self.loss * self.tokens / self.words)

    def to_dict(self) -> dict:
        return dict(loss=self.loss, ppl=self.ppl, bits_per_byte=self.bits_per_byte, byte_ppl=self.byte_ppl,
                    word_ppl=self.word_ppl, nll=self.nll, scored_tokens=self.scored, tokens=self.tokens,
                    bytes=self.bytes, words=self.words, context=self.context, stride=self.stride, rule=self.rule)


def sliding_windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """
    The perplexity guide's windows over a stream of n_tokens: (begin, end, first) for each, where the
    window holds tokens [begin, end) and scores tokens [first, end), those no earlier window scored.
    """
    if not 0 < stride <= context:
        raise NanoplayError(f"stride {stride} must be between 1 and the context length {context}")
    windows, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + context, n_tokens)
        first = max(prev_end, begin + 1)  # a window's first token has no history to be predicted from
        if first < end:
            windows.append((begin, end, first))
        prev_end = end
        if end == n_tokens:
            break
    return windows


def rolling_windows(n_tokens: int, context: int, offset: int = 0) -> list[tuple[int, int, int]]:
    """
    lm-evaluation-harness's loglikelihood_rolling windows (its get_rolling_token_windows with
    context_len=1, then make_disjoint_window) for one text of n_tokens tokens that sits in a stream
    after an <|endoftext|> at `offset`: the text is stream[offset + 1 : offset + 1 + n_tokens].
    (begin, end, first) as in sliding_windows: the window holds stream[begin:end] (at most context + 1
    tokens: the model reads all but the last) and scores [first, end). Every token of the text is
    scored exactly once.
    """
    windows, done = [], 0
    while done < n_tokens:
        n = min(context, n_tokens - done)  # tokens this window predicts
        end = offset + 1 + done + n
        begin = offset if done == 0 else end - 1 - context  # the first reads from <|endoftext|>
        windows.append((begin, end, offset + 1 + done))
        done += n
    return windows


def plan_windows(n_tokens: int, context: int, *, rule: str = "strided", stride: int | None = None,
                 doc_lengths: list[int] | None = None, eot_id: int = EOT_ID, eot_prefix: bool = True):
    """
    How a rule scores a stream of n_tokens ids: (prefix, windows, where). The model reads
    `stream` = the ids with <|endoftext|> inserted before each document (rolling) or before the whole
    stream (strided, unless eot_prefix is False), `windows` over it as in sliding_windows, and `where`
    (n_tokens,) gives each id's position in it. `prefix(ids)` builds that stream. doc_lengths: the
    rolling rule scores each document on its own (default: the whole stream is one document).
    eot_prefix is nanoplay's one conditioning rule (engine.text_context): the first token is predicted
    from <|endoftext|>; False gives the perplexity guide's windows exactly, its first token unscored.
    """
    if rule == "strided":
        if not eot_prefix:
            return (lambda ids: ids), sliding_windows(n_tokens, context, stride or context), torch.arange(n_tokens)

        def after_eot(ids: torch.Tensor) -> torch.Tensor:
            return torch.cat([torch.tensor([eot_id], dtype=ids.dtype), ids])

        windows = sliding_windows(n_tokens + 1, context, stride or context)
        return after_eot, windows, torch.arange(1, n_tokens + 1)
    if rule != "rolling":
        raise NanoplayError(f"unknown rule {rule!r}; use one of {', '.join(RULES)}")
    lengths = doc_lengths if doc_lengths is not None else [n_tokens]
    if sum(lengths) != n_tokens:
        raise NanoplayError(f"documents of {sum(lengths)} tokens do not make up the {n_tokens}-token stream")
    windows, where, offset = [], [], 0
    for n in lengths:
        windows += rolling_windows(n, context, offset)
        where.append(torch.arange(offset + 1, offset + 1 + n))
        offset += n + 1

    def prefix(ids: torch.Tensor) -> torch.Tensor:
        parts, start = [], 0
        for n in lengths:
            parts += [torch.tensor([eot_id], dtype=ids.dtype), ids[start:start + n]]
            start += n
        return torch.cat(parts)

    return prefix, windows, torch.cat(where) if where else torch.zeros(0, dtype=torch.long)


def scored_tokens(n_tokens: int, context: int, *, rule: str = "strided", stride: int | None = None,
                  doc_lengths: list[int] | None = None, eot_prefix: bool = True) -> int:
    """How many tokens a rule scores (a progress bar's total)."""
    _, windows, _ = plan_windows(n_tokens, context, rule=rule, stride=stride, doc_lengths=doc_lengths,
                                 eot_prefix=eot_prefix)
    return sum(end - first for _, end, first in windows)


@torch.inference_mode()
def window_nll(model, stream: torch.Tensor, windows: list[tuple[int, int, int]], batch_size: int | None = None,
               on_progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """
    Negative log-likelihood, float64 (N,), of the tokens of `stream` (N,) that the (begin, end, first)
    windows score, NaN elsewhere. The model reads stream[begin:end - 1] (the last token is only a
    target); windows are scored `batch_size` at a time, the shorter ones padded on the right, which a
    causal model never looks at. on_progress(units, tokens), if given, is called after each batch with
    the tokens it scored (twice).
    """
    n = stream.numel()
    longest = max((end - begin - 1 for begin, end, _ in windows), default=1)
    batch_size = batch_size or default_batch_size(longest)
    device = next(model.parameters()).device
    nll = torch.full((n,), float("nan"), dtype=torch.float64)
    for i in range(0, len(windows), batch_size):
        batch = windows[i:i + batch_size]
        T = max(end - begin - 1 for begin, end, _ in batch)
        x = torch.zeros((len(batch), T), dtype=torch.long)
        rows, cols, positions = [], [], []
        for r, (begin, end, first) in enumerate(batch):
            x[r, :end - begin - 1] = stream[begin:end - 1]
            pos = torch.arange(first, end)  # the scored tokens, by absolute position
            rows.append(torch.full_like(pos, r))
            cols.append(pos - begin - 1)  # the hidden state at column t predicts the token at column t + 1
            positions.append(pos)
        rows, cols, positions = torch.cat(rows), torch.cat(cols), torch.cat(positions)
        hidden = final_hidden(model, x.to(device))  # (B, T, n_embd)
        nll[positions] = target_scores(model, hidden[rows.to(device), cols.to(device)], stream[positions])[0]
        if on_progress is not None:
            on_progress(positions.numel(), positions.numel())
    return nll


def token_nll(model, ids: torch.Tensor, context: int, stride: int | None = None, batch_size: int | None = None,
              on_progress: Callable[[int, int], None] | None = None, *, rule: str = "strided",
              doc_lengths: list[int] | None = None, eot_prefix: bool = True) -> torch.Tensor:
    """
    Negative log-likelihood of every token of `ids` (N,) under a rule (strided sliding window, or the
    harness's rolling windows), as a float64 tensor (N,) with NaN for the tokens no window scores.
    eot_prefix: see plan_windows.
    """
    n = ids.numel()
    if n < (2 if rule == "strided" and not eot_prefix else 1):
        raise NanoplayError("the text is too short to score: it needs at least two tokens")
    prefix, windows, where = plan_windows(n, context, rule=rule, stride=stride, doc_lengths=doc_lengths,
                                          eot_prefix=eot_prefix)
    return window_nll(model, prefix(ids), windows, batch_size, on_progress)[where]


def perplexity(model, ids: torch.Tensor, *, context: int, stride: int | None, n_bytes: int, n_words: int,
               rule: str = "strided", doc_lengths: list[int] | None = None, batch_size: int | None = None,
               on_progress=None, eot_prefix: bool = True) -> PerplexityResult:
    nll = token_nll(model, ids, context, stride, batch_size, on_progress, rule=rule, doc_lengths=doc_lengths,
                    eot_prefix=eot_prefix)
    scored = ~torch.isnan(nll)
    return PerplexityResult(nll=nll[scored].sum().item(), scored=int(scored.sum()), tokens=ids.numel(),
                            bytes=n_bytes, words=n_words, context=context,
                            stride=stride if rule == "strided" else None, rule=rule)


# -----------------------------------------------------------------------------
# LAMBADA


@dataclass
class LambadaResult:
    examples: int
    correct: int  # examples whose every target token is the model's greedy choice
    nll: float  # summed over examples of the target's total negative log-likelihood
    target_tokens: int
    rule: str

    @property
    def accuracy(self) -> float:
        return self.correct / self.examples

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / self.examples)

    def to_dict(self) -> dict:
        return dict(acc=self.accuracy, ppl=self.ppl, examples=self.examples, correct=self.correct,
                    nll=self.nll, target_tokens=self.target_tokens, rule=self.rule)


def lambada_request(text: str, tokenizer, rule: str = "word") -> tuple[list[int], list[int]]:
    """(context ids, target ids) of one LAMBADA text under a rule."""
    if rule == "last-token":
        ids = tokenizer.encode(text)
        return ids[:-1] or [tokenizer.eot_id], ids[-1:]
    if rule != "word":
        raise NanoplayError(f"unknown LAMBADA rule {rule!r}; use one of {', '.join(LAMBADA_RULES)}")
    # lm-evaluation-harness's lambada_openai: doc_to_text / doc_to_target split on the last space
    context, _, word = text.rpartition(" ")
    target = " " + word
    # ... and its _encode_pair: trailing spaces of the context move to the target, then the target's
    # tokens are whatever the whole text's tokenisation has after the context's own tokens
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, target = context[:-n_spaces], context[-n_spaces:] + target
    if not context:  # nothing to condition on: the harness predicts from end-of-text
        return [tokenizer.eot_id], tokenizer.encode(target)
    context_ids = tokenizer.encode(context)
    whole = tokenizer.encode(context + target)
    return context_ids, whole[len(context_ids):]


@torch.inference_mode()
def score_continuations(model, requests: list[tuple[list[int], list[int]]], context: int,
                        batch_size: int | None = None, on_progress=None) -> list[tuple[float, bool]]:
    """
    (total nll of the target, whether every target token is the greedy argmax) for each
    (context ids, target ids) request. Inputs longer than the model's context keep their last tokens,
    as the harness does. Requests are batched by length and padded on the right; on_progress(examples,
    tokens) is called after each batch.
    """
    device = next(model.parameters()).device
    inputs = []
    for ctx, tgt in requests:
        if not tgt:
            raise NanoplayError("a LAMBADA example has an empty target: is its text empty?")
        seq = (ctx + tgt)[-(context + 1):]
        inputs.append((seq[:-1], seq[len(seq) - len(tgt):]))  # model input, the targets it predicts
    order = sorted(range(len(inputs)), key=lambda i: len(inputs[i][0]), reverse=True)
    results: list = [None] * len(inputs)
    i = 0
    while i < len(order):
        T = len(inputs[order[i]][0])  # the longest input of the batch, since they come longest first
        batch = order[i:i + (batch_size or default_batch_size(T))]
        i += len(batch)
        x = torch.zeros((len(batch), T), dtype=torch.long)
        rows, cols, targets = [], [], []
        for r, j in enumerate(batch):
            inp, tgt = inputs[j]
            x[r, :len(inp)] = torch.tensor(inp)
            start = len(inp) - len(tgt)  # the hidden state at column t predicts token t + 1
            rows += [r] * len(tgt)
            cols += range(start, start + len(tgt))
            targets += tgt
        rows, cols, targets = torch.tensor(rows), torch.tensor(cols), torch.tensor(targets)
        hidden = final_hidden(model, x.to(device))  # (B, T, n_embd)
        nll, greedy = target_scores(model, hidden[rows.to(device), cols.to(device)], targets, greedy=True)
        nll_sum = torch.zeros(len(batch), dtype=torch.float64).index_add_(0, rows, nll)  # (B,)
        miss_sum = torch.zeros(len(batch), dtype=torch.float64).index_add_(0, rows, (~greedy).double())  # (B,)
        for r, j in enumerate(batch):
            results[j] = (nll_sum[r].item(), miss_sum[r].item() == 0)
        if on_progress is not None:
            on_progress(len(batch), sum(len(inputs[j][0]) for j in batch))
    return results


def lambada(model, texts: list[str], tokenizer, *, context: int, rule: str = "word",
            batch_size: int | None = None, on_progress=None) -> LambadaResult:
    requests = [lambada_request(t, tokenizer, rule) for t in texts]
    scores = score_continuations(model, requests, context, batch_size, on_progress)
    return LambadaResult(examples=len(scores), correct=sum(ok for _, ok in scores),
                         nll=sum(lp for lp, _ in scores), target_tokens=sum(len(t) for _, t in requests),
                         rule=rule)


# -----------------------------------------------------------------------------
# published figures to compare with


@dataclass(frozen=True)
class Reference:
    models: tuple[str, ...]  # the spec names it applies to
    data: str  # a data set key of nanoplay.evaldata
    metric: str  # loss | ppl | acc | word_ppl | byte_ppl | bits_per_byte
    value: float
    how: str  # the procedure behind the number, in a few words
    source: str
    stride: int | None = None  # the stride it was measured at (the strided rule only)
    rule: str | None = None  # strided | rolling for perplexity; the LAMBADA rule it was measured under

    def same_procedure(self, stride: int | None, rule: str | None) -> bool:
        """Whether it was measured as we measure (a rule of None: any)."""
        return self.stride in (None, stride) and (rule is None or self.rule in (None, rule))

    def label(self) -> str:
        """How it was measured, in a word or two: 'stride 1024', 'rolling', 'last-token'."""
        return f"stride {self.stride}" if self.stride else str(self.rule)


NANOGPT = "https://github.com/karpathy/nanoGPT#baselines"
HARNESS = "https://github.com/EleutherAI/lm-evaluation-harness/issues/2159"
# lm-evaluation-harness run on the Hub's gpt2 by workofart/ml-by-hand, as the baseline of its GPT-2 reproduction
HARNESS_WIKITEXT = "https://github.com/workofart/ml-by-hand/releases/tag/gpt2-124m-openwebtext-56000"
HF_GUIDE = "https://huggingface.co/docs/transformers/perplexity"
NANOGPT_HOW = ("nanoGPT's OWT val split (0.05% of documents, seed 2357, the split nanoplay.textdata reproduces), "
               "random 1024-token windows, which average like stride 1024")
HARNESS_WIKITEXT_HOW = "lm-evaluation-harness wikitext: articles, detokenized, rolling windows of 1024"
GPT2 = ("gpt2", "openai-community/gpt2")

REFERENCES = (
    Reference(GPT2, "openwebtext", "loss", 3.12, NANOGPT_HOW, NANOGPT, stride=1024, rule="strided"),
    Reference(("gpt2-medium", "openai-community/gpt2-medium"), "openwebtext", "loss", 2.84, NANOGPT_HOW, NANOGPT,
              stride=1024, rule="strided"),
    Reference(("gpt2-large", "openai-community/gpt2-large"), "openwebtext", "loss", 2.67, NANOGPT_HOW, NANOGPT,
              stride=1024, rule="strided"),
    Reference(("gpt2-xl", "openai-community/gpt2-xl"), "openwebtext", "loss", 2.54, NANOGPT_HOW, NANOGPT,
              stride=1024, rule="strided"),
    Reference(GPT2, "lambada", "acc", 0.3256, "lm-evaluation-harness lambada_openai, whole last word", HARNESS,
              rule="word"),
    Reference(GPT2, "lambada", "ppl", 40.06, "lm-evaluation-harness lambada_openai, whole last word", HARNESS,
              rule="word"),
    Reference(GPT2, "wikitext", "word_ppl", 37.3698, HARNESS_WIKITEXT_HOW, HARNESS_WIKITEXT, rule="rolling"),
    Reference(GPT2, "wikitext", "byte_ppl", 1.9682, HARNESS_WIKITEXT_HOW, HARNESS_WIKITEXT, rule="rolling"),
    Reference(GPT2, "wikitext", "bits_per_byte", 0.9769, HARNESS_WIKITEXT_HOW, HARNESS_WIKITEXT, rule="rolling"),
    Reference(("gpt2-large", "openai-community/gpt2-large"), "wikitext-2", "ppl", 19.44,
              "HF perplexity guide, raw test joined with blank lines", HF_GUIDE, stride=1024, rule="strided"),
    Reference(("gpt2-large", "openai-community/gpt2-large"), "wikitext-2", "ppl", 16.44,
              "HF perplexity guide, raw test joined with blank lines", HF_GUIDE, stride=512, rule="strided"),
)


def find_references(model_name: str, data: str, metric: str, *, stride: int | None = None,
                    rule: str | None = None) -> list[Reference]:
    """
    Published figures for a model, data set and metric. Those measured as we measure (stride, rule)
    come first; figures measured otherwise are still returned, and the caller labels them as such,
    except LAMBADA figures under another rule, which measure another task.
    """
    found = [r for r in REFERENCES if model_name in r.models and r.data == data and r.metric == metric]
    if rule in LAMBADA_RULES:
        found = [r for r in found if r.rule in (None, rule)]
    return sorted(found, key=lambda r: not r.same_procedure(stride, rule))


def reference_records(model_name: str, data: str, metrics, *, stride: int | None, rule: str | None) -> list[dict]:
    """The published figures for each metric, as JSON-ready records labelled with how they were measured."""
    return [{"metric": metric, "value": ref.value, "how": ref.how, "source": ref.source, "stride": ref.stride,
             "rule": ref.rule, "measured": ref.label(), "same_procedure": ref.same_procedure(stride, rule)}
            for metric in metrics for ref in find_references(model_name, data, metric, stride=stride, rule=rule)]


# -----------------------------------------------------------------------------
# throughput against transformers


def bench_scoring(loaded, batch_size: int = 8, seq_len: int | None = None, repeats: int = 5,
                  stride: int | None = None) -> dict:
    """
    Tokens/s through the model of our batched scoring (`token_nll`: batch_size windows of seq_len,
    every `stride` tokens; default stride = seq_len, every position scored) against a plain
    transformers GPT2LMHeadModel forward of the same (batch_size, seq_len) tokens on the same weights.
    The two alternate, after a warm-up each, and the medians of `repeats` runs are compared. With
    stride < seq_len we project only the scored positions, as `nanoplay eval` does by default.
    """
    import statistics

    from .bench import timed, to_transformers

    model = loaded.model
    seq_len = seq_len or loaded.config.block_size
    stride = stride or seq_len
    device = loaded.device
    hf = to_transformers(loaded)
    n = batch_size * seq_len  # tokens through the model, for both
    ids = torch.randint(0, min(loaded.config.vocab_size, 50257), ((batch_size - 1) * stride + seq_len,))
    windows = sliding_windows(ids.numel(), seq_len, stride)
    assert len(windows) == batch_size and all(end - begin == seq_len for begin, end, _ in windows)
    scored = sum(end - first for _, end, first in windows)
    hf_input = torch.stack([ids[begin:end] for begin, end, _ in windows]).to(device)  # (B, T)

    def ours():
        token_nll(model, ids, context=seq_len, stride=stride, batch_size=batch_size, eot_prefix=False)  # the same windows

    @torch.inference_mode()
    def plain():
        hf(hf_input).logits

    with torch.inference_mode():  # the twin must compute what we compute, or the comparison means nothing
        diff = (hf(hf_input).logits.float() - model(hf_input).float()).abs().max().item()
    timed(ours, device), timed(plain, device)  # warm-up: allocator, kernels, caches
    ours_s, plain_s = [], []
    for _ in range(repeats):
        ours_s.append(timed(ours, device))
        plain_s.append(timed(plain, device))
    ours_tps = n / statistics.median(ours_s)
    plain_tps = n / statistics.median(plain_s)
    return dict(model=loaded.name, device=str(device), dtype=str(loaded.weights_dtype).removeprefix("torch."),
                batch_size=batch_size, seq_len=seq_len, stride=stride, repeats=repeats,
                ours_tokens_per_s=ours_tps, ours_scored_tokens_per_s=scored / statistics.median(ours_s),
                transformers_tokens_per_s=plain_tps, ratio=ours_tps / plain_tps, max_logit_diff=diff)
