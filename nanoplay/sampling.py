"""
Sampling settings and the per-step maths of the shared sampler.

The order in which a request's settings act on the model's next-token logits:
  1. repetition penalty (Hugging Face semantics, over prompt + generated tokens): a seen token's logit
     is divided by the penalty when positive and multiplied by it when negative;
  2. presence and frequency penalties (OpenAI's formula, over generated tokens):
     logit[j] -= frequency_penalty * count[j] + presence_penalty * (count[j] > 0);
  3. temperature: (logits - max) / temperature (temperature 0 means greedy: the argmax of step 2's
     logits; subtracting the maximum first keeps a tiny temperature finite, so it tends to greedy);
  4. top-k: keep the k highest;
  5. top-p (nucleus): keep the smallest set whose probability reaches p;
  6. min-p: keep tokens whose probability is at least min_p times the most likely one's;
  7. sample from what is left (the "sampling distribution").

Sampling uses the exponential race (Gumbel-max in another guise): token = argmax(p / E) with E ~ Exp(1),
one noise value per vocabulary entry per step. The noise is counter-based (`draw_noise`): token j's at
the request's n-th choice is a fixed function of (seed, n, j), so two requests with the same seed draw
the same noise at every step -- alone or batched, with or without a draft model, on any device, and on
different models that share the vocabulary (common random numbers) -- and side-by-side differences
come from the models, not from luck.

Every generated token also carries statistics of the model's raw distribution (before step 1):
log-probability, rank, entropy, and the top alternatives.

Non-finite logits have one meaning everywhere: -inf is a token the model rules out, +inf a token that
takes all the probability (shared evenly when several do), and NaN has no meaning: the request fails
with an error naming it (`logits_fault`). The per-step maths runs in float64 on logits whose maximum is
subtracted first, so no setting can overflow them into NaN, and a removed token is never drawn.
"""

from __future__ import annotations

import functools
import math
import re
import secrets
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from .errors import NanoplayError
from .textio import json_text

MAX_TOP_LOGPROBS = 20  # alternatives reported per token at most (OpenAI's API allows as many)


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: list[str] = field(default_factory=list)  # strings that end the completion (not included)
    stop_token_ids: list[int] = field(default_factory=list)  # e.g. a chat template's <|end|>
    stop_on_eot: bool = True  # <|endoftext|> ends the completion
    seed: int | None = None  # None: a random seed, recorded on the request (greedy uses none)
    top_logprobs: int = 5  # alternatives reported per token

    def __post_init__(self):
        numbers = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")
        # finite first: NaN fails every comparison below, whose messages would name the wrong fault
        checks = [(getattr(self, name) is None or math.isfinite(getattr(self, name)), f"{name} must be a finite number")
                  for name in numbers]
        checks += [
            (self.max_new_tokens >= 1, "max_new_tokens must be at least 1"),
            (self.temperature >= 0, "temperature must be >= 0 (0 = greedy)"),
            (self.top_k is None or self.top_k >= 1, "top_k must be >= 1"),
            (self.top_p is None or 0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.min_p is None or 0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0 (1 = off)"),
            (0 <= self.top_logprobs <= MAX_TOP_LOGPROBS, f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}"),
            (all(self.stop), "stop strings must not be empty"),
            (self.seed is None or 0 <= self.seed < 2**63, "seed must be between 0 and 2**63 - 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise NanoplayError(f"invalid sampling setting: {message}")
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)

    @property
    def is_plain_greedy(self) -> bool:
        """Greedy on the raw logits: no penalty can change the argmax."""
        return (self.temperature == 0 and self.repetition_penalty == 1.0 and not self.presence_penalty
                and not self.frequency_penalty)

    def with_seed(self) -> "SamplingParams":
        """A copy whose seed is fixed (a fresh random one if unset). Greedy decoding (temperature 0)
        draws no random numbers, so its seed is None: a seed there would claim an effect it has not."""
        d = asdict(self)
        if self.temperature == 0:
            d["seed"] = None
        elif d["seed"] is None:
            d["seed"] = secrets.randbits(31)
        return SamplingParams(**d)

    def to_dict(self) -> dict:
        return asdict(self)


# Prompt k of a run (from 0) gets the stream seed + PROMPT_SEED_STRIDE * k, its samples that + 0, 1, ...:
# distinct for up to 4294 prompts of up to a million samples each, even in a seed's low 32 bits.
PROMPT_SEED_STRIDE = 1_000_003


def derive_seed(seed: int, prompt_index: int = 0, sample_index: int = 0) -> int:
    """The seed of sample `sample_index` of prompt `prompt_index` in a run seeded with `seed`, wrapped
    into [0, 2**63). Prompt 0's samples use seed, seed + 1, ...; models share it (common random numbers)."""
    return (seed + PROMPT_SEED_STRIDE * prompt_index + sample_index) % 2**63


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", ",": ","}


def parse_stop_string(text: str) -> str:
    """
    A stop string as typed (`gen --stop`, the playground's settings): backslash escapes \\n (newline),
    \\t (tab), \\r, \\\\ (a backslash), \\, (a comma, which separates the playground's stop strings)
    and \\uXXXX (any character by its code point); any other backslash is an error.
    """
    out, i = [], 0
    while i < len(text):
        c = text[i]
        if c != "\\":
            out.append(c)
            i += 1
            continue
        code = text[i + 1:i + 2]
        if code in _ESCAPES:
            out.append(_ESCAPES[code])
            i += 2
        elif code == "u" and re.fullmatch(r"[0-9a-fA-F]{4}", text[i + 2:i + 6]):
            out.append(chr(int(text[i + 2:i + 6], 16)))
            i += 6
        elif code == "u":
            raise NanoplayError(f"stop string {text}: \\u takes exactly 4 hex digits (\\u000a), not "
                                f"{text[i:i + 6]}")
        else:
            raise NanoplayError(f"stop string {text}: unknown escape {text[i:i + 2]}; the escapes are "
                                f"\\n \\t \\r \\\\ (a backslash) \\, and \\uXXXX")
    # a character beyond U+FFFF is typed as its UTF-16 pair, \\ud83d\\ude00: joined here, as JSON does
    joined = "".join(out).encode("utf-16-le", "surrogatepass").decode("utf-16-le", "surrogatepass")
    return json_text(joined, f"stop string {text}")


def format_stop_string(stop: str) -> str:
    """The inverse of parse_stop_string: what to type to get `stop`."""
    special = {"\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r", ",": "\\,"}
    return "".join(special.get(c, c) if c.isprintable() or c in special or ord(c) > 0xFFFF else f"\\u{ord(c):04x}"
                   for c in stop)


def parse_stop_list(text: str) -> list[str]:
    """Comma-separated stop strings, as the playground's settings field takes them (\\, for a comma in
    one; spaces around each are dropped), each read by parse_stop_string."""
    parts = re.split(r"(?<!\\),", text.replace("\\\\", "\0"))  # split at commas no backslash escapes
    return [parse_stop_string(part.replace("\0", "\\\\").strip()) for part in parts if part.strip()]


def all_finite(x: torch.Tensor) -> bool:
    """
    True when no entry of x is NaN or +-inf, by one sum: a reduction is the fastest pass over a row of
    logits (a comparison writes a whole bool tensor), and NaN and inf survive any sum. A sum of finite
    values can still overflow; that only sends the caller down its slower exact path.
    """
    return math.isfinite(x.sum().item())


def logits_fault(logits: torch.Tensor) -> list[str | None]:
    """
    For rows of a model's logits (B, vocab): why a row defines no distribution, or None when it does.
    NaN anywhere is a fault of the model (damaged weights, an overflow in a low-precision dtype); a
    row that rules out every token is one too.
    """
    if all_finite(logits):  # the common case, in one pass
        return [None] * logits.size(0)
    nan = torch.isnan(logits).any(-1).tolist()
    empty = (logits == float("-inf")).all(-1).tolist()
    return ["model produced NaN logits (damaged weights, or an overflow in its dtype: try --dtype float32)" if n
            else "model produced logits that are -inf for every token" if e else None for n, e in zip(nan, empty)]


def stable_logits(logits: torch.Tensor) -> torch.Tensor:
    """
    Logits (..., vocab) as float64 with the same distribution and no +inf or NaN: where a row has +inf
    entries they share all the probability (the limit of ever larger logits), so they become 0 and the
    rest -inf; NaN, which penalty arithmetic on a ruled-out token can give (-inf + inf), stays ruled out.
    Rows with NaN from the model itself are refused earlier (`logits_fault`).
    """
    logits = logits.double()
    if all_finite(logits):
        return logits
    logits = logits.masked_fill(torch.isnan(logits), float("-inf"))
    infinite = logits == math.inf
    if infinite.any():
        rows = infinite.any(-1, keepdim=True)
        logits = torch.where(rows, torch.where(infinite, 0.0, float("-inf")).to(logits.dtype), logits)
    return logits


def _logprobs(logits: torch.Tensor, row_max: torch.Tensor, log_z: torch.Tensor) -> torch.Tensor:
    """log-probabilities (N, k) float64 of logits (N, k) in rows whose maximum and log_z are (N,)"""
    return (logits.double() - row_max.unsqueeze(1)) - log_z.unsqueeze(1)


@dataclass
class Distribution:
    """
    A model's next-token distributions for rows of logits (N, vocab), with what each token reports,
    computed once per step for the whole batch. A token's log-probability is (logit - max) - log_z in
    float64, log_softmax's formula; the figures come from two passes over the vocabulary, in C where
    the compiled kernels load (cpu_kernel.distribution_statistics), else in torch.
    """

    logits: torch.Tensor  # (N, vocab): float32, or float64 from `stable_logits` where a row is not finite
    max: torch.Tensor  # (N,) float64: each row's largest logit
    log_z: torch.Tensor  # (N,) float64: log sum exp(logits - max)
    entropy: torch.Tensor  # (N,) nats
    top_ids: torch.Tensor  # (N, m): the m most likely ids, most likely first, m >= min(2, vocab)
    top_logprobs: torch.Tensor  # (N, m)
    finite_checked: bool  # every row was found finite (the C pass checks; the torch one does not)

    @classmethod
    def of(cls, logits: torch.Tensor, top: int) -> "Distribution":
        """logits (N, vocab); `top`: alternatives wanted. A row with no distribution (`logits_fault`) gets
        figures that mean nothing: where finite_checked is False the caller asks logits_fault."""
        from .cpu_kernel import distribution_statistics

        m = min(max(top, 2), logits.size(-1))
        figures = distribution_statistics(logits, m)  # None for rows that are not all finite, or no compiler
        if figures is None:  # as kernels/distribution.c computes them
            logits = stable_logits(logits)
            row_max = logits.amax(-1)
            shifted = logits - row_max.unsqueeze(-1)  # (N, vocab), <= 0
            e = shifted.exp()
            at_max = shifted == 0
            # sum e = 1 + rest: log1p(rest) keeps a rest of 1e-20, which log(1 + 1e-20) would lose
            rest = e.masked_fill(at_max, 0.0).sum(-1) + (at_max.sum(-1) - 1)
            log_z = rest.log1p()
            # -sum p log p = log_z - sum e * shifted / (1 + rest); a -inf logit adds 0 * -inf = NaN, which
            # nansum skips
            entropy = log_z - torch.nansum(e * shifted, dim=-1) / (1 + rest)
            # equal logits in id order, as the kernel and argmax give them (topk's order among ties is
            # its own: the listed alternatives would differ at the cut-off)
            top_ids = torch.sort(logits, dim=-1, descending=True, stable=True).indices[:, :m]
            return cls(logits, row_max, log_z, entropy, top_ids, _logprobs(logits.gather(1, top_ids), row_max, log_z),
                       finite_checked=False)
        return cls(logits, *figures, finite_checked=True)

    @functools.cached_property
    def logprobs(self) -> torch.Tensor:
        """Every token's log-probability (N, vocab) float64: the model's raw log-probabilities."""
        return _logprobs(self.logits, self.max, self.log_z)

    @functools.cached_property
    def _top(self) -> tuple[list[list[int]], list[list[float]]]:
        """The top ids and their logits, as Python lists (rows are few; a torch call costs microseconds)."""
        return self.top_ids.tolist(), self.logits.gather(1, self.top_ids).tolist()

    def greedy(self) -> list[int]:
        """The most likely token of each row: torch.argmax's, the first id of a tie."""
        tokens = []
        for i, (ids, top) in enumerate(zip(*self._top)):
            tied = len(top) < 2 or not top[0] > top[1]
            tokens.append(int(self.logits[i].argmax()) if tied else ids[0])  # no tie: the top's first
        return tokens

    def figures(self, tokens: list[int], k: int) -> tuple[list[float], list[int], list[list[int]], list[list[float]]]:
        """
        For the token taken at each row: its log-probability, its rank (1 = most likely: 1 + how many
        tokens have a larger logit, counted on the logits, where float64 rounding of the
        log-probabilities cannot merge two of them), and the k most likely ids and their
        log-probabilities, one list per row. The same float64 arithmetic as `logprobs`, in Python.
        """
        logprobs, ranks = [], []
        for i, (token, ids, top, row_max, log_z) in enumerate(zip(tokens, *self._top, self.max.tolist(),
                                                                     self.log_z.tolist())):
            x = top[ids.index(token)] if token in ids else float(self.logits[i, token])
            if x >= top[-1]:  # every token more likely than the chosen one is among the top
                higher = sum(v > x for v in top)
            else:
                higher = _count_above(self.logits[i], x)
            logprobs.append((x - row_max) - log_z)
            ranks.append(higher + 1)
        return logprobs, ranks, [ids[:k] for ids in self._top[0]], self.top_logprobs[:, :k].tolist()


def _count_above(row: torch.Tensor, x: float) -> int:
    """How many entries of a row (vocab,) exceed x: by numpy on a CPU, where it takes 7 us for 50304
    entries and torch's comparison and sum 55-80 us."""
    if row.device.type == "cpu":
        return int(np.count_nonzero(row.numpy() > x))
    return int((row > x).sum())


def apply_penalties(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor,
                    generated_counts: torch.Tensor | None) -> torch.Tensor:
    """
    Steps 1-2 on one row (vocab,). seen: ids in prompt + output; generated_counts: (V,) counts of output
    ids. Where a penalty applies, float64 out; where none does, the logits themselves (the later steps
    read any dtype: a float64 copy of the vocabulary per token per row was a tenth of a sampled step).
    """
    repetition = params.repetition_penalty != 1.0 and seen is not None and seen.numel()
    counted = (params.presence_penalty or params.frequency_penalty) and generated_counts is not None
    if not (repetition or counted):
        return logits
    logits = stable_logits(logits)
    if repetition:
        picked = logits[seen]
        logits = logits.clone()
        logits[seen] = torch.where(picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty)
    if counted:
        counts = generated_counts.to(logits.dtype)
        logits = logits - (params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(logits.dtype))
    return stable_logits(logits)  # a huge penalty can overflow to +-inf: keep one meaning for it


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """
    Steps 3-6 on one row: temperature, top-k, top-p, min-p; removed entries become -inf. The result
    (float64) differs from logits / temperature by a constant (its maximum is 0), which no softmax sees.
    """
    logits = stable_logits(logits)
    beyond_k = None
    if params.top_k is not None and params.top_k < logits.size(-1):
        # ranked before scaling, which keeps the order but may round neighbours into ties (temperature 1e300)
        beyond_k = logits < torch.topk(logits, params.top_k).values[-1]
    # subtract the maximum before dividing: a tiny temperature then sends the others to -inf, never to NaN
    logits = (logits - logits.max()) / params.temperature
    if beyond_k is not None:
        logits = logits.masked_fill(beyond_k, float("-inf"))
    if params.top_p is not None and params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)  # float64: the boundary must not move with rounding
        # drop a token when the ones before it already reach top_p (the first token always stays)
        drop_sorted = (probs.cumsum(-1) - probs) >= params.top_p
        logits = logits.masked_fill(drop_sorted.scatter(0, order, drop_sorted), float("-inf"))
    if params.min_p is not None and params.min_p > 0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    return logits


def only_temperature(params: SamplingParams, vocab_size: int) -> bool:
    """True when steps 4-6 (top-k, top-p, min-p) remove nothing whatever the logits."""
    return ((params.top_k is None or params.top_k >= vocab_size) and (params.top_p is None or params.top_p >= 1.0)
            and not params.min_p)


_MASK64 = 2**64 - 1
_GOLDEN = 0x9E3779B97F4A7C15  # SplitMix64's increment: 2**64 divided by the golden ratio, odd
_MIX1, _MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB  # its finaliser's multipliers (Vigna's)


def _mix(z: int) -> int:
    """SplitMix64's finaliser on a 64-bit integer: a bijection whose output bits each depend on all input bits."""
    z = ((z ^ (z >> 30)) * _MIX1) & _MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & _MASK64
    return z ^ (z >> 31)


def noise_key(seed: int, index: int) -> int:
    """The 64-bit key of the noise of choice `index` (0 for a request's first token) under `seed`: the
    output at position index + 1 of the SplitMix64 stream that starts at the seed's own first output."""
    return _mix((_mix((seed + _GOLDEN) & _MASK64) + (index + 1) * _GOLDEN) & _MASK64)


def _signed(z: int) -> int:
    """A 64-bit pattern as torch's int64 holds it (two's complement)."""
    return z - 2**64 if z >= 2**63 else z


def _shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 tensors read as unsigned (torch's >> keeps the sign)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def _uniforms(key: int, size: int, device) -> torch.Tensor:
    """draw_noise in torch: SplitMix64 over int64 tensors, whose products wrap modulo 2**64 as C's do."""
    z = torch.arange(1, size + 1, dtype=torch.int64, device=device) * _signed(_GOLDEN) + _signed(key)
    z = (z ^ _shift_right(z, 30)) * _signed(_MIX1)
    z = (z ^ _shift_right(z, 27)) * _signed(_MIX2)
    z = z ^ _shift_right(z, 31)
    return _shift_right(z, 11).double() * 2.0**-53  # the top 53 bits: exact in a double


def draw_noise(seed: int, index: int, vocab_size: int, device) -> torch.Tensor:
    """
    The uniform noise U (vocab_size,) float64 in [0, 1) of a request's choice number `index` (0 for its
    first token) under `seed`; its exponential E = -log1p(-U) ~ Exp(1) races (`choose`). Token j's
    value is SplitMix64's output at position j + 1 of the stream that starts at noise_key(seed, index),
    top 53 bits: a function of (seed, index, j) alone, so every vocabulary size, device and batch, and a
    draft model looking ahead, see the same value for the same token. Computed in C on a CPU where the
    kernels load (0.03-0.04 ms for 50304 values; torch's generator took 0.5-0.6 ms, serially), else in torch,
    bit for bit the same.
    """
    key = noise_key(seed, index)
    if torch.device(device).type == "cpu":
        from .cpu_kernel import uniform_noise

        noise = uniform_noise(key, vocab_size)
        if noise is not None:
            return noise
    return _uniforms(key, vocab_size, device)


def exponential(noise: torch.Tensor) -> torch.Tensor:
    """Exp(1) values E = -log1p(-U) (float64) of uniform noise U in [0, 1), by inversion (U = 0 gives 0)."""
    return noise.double().neg().log1p_().neg_()


class SamplingLogprobs:
    """
    The distribution a token was drawn from (step 7's, after the settings), as float64 log-probabilities:
    `at(ids)` for a few tokens (what a generated token reports for itself and its alternatives) and
    `row` (vocab,) for all of them, made only when asked: a vocabulary-wide float64 row per token per
    request cost more than the race that drew the token.
    """

    row: torch.Tensor  # (vocab,) float64: each kind below makes it its own way

    def at(self, ids: list[int]) -> list[float]:
        return self.row[ids].tolist()


class PointMass(SamplingLogprobs):
    """Greedy decoding's: all the probability on one token."""

    def __init__(self, token: int, size: int, device):
        self.token, self.size, self.device = token, size, device

    @functools.cached_property
    def row(self) -> torch.Tensor:
        row = torch.full((self.size,), float("-inf"), dtype=torch.float64, device=self.device)
        row[self.token] = 0.0
        return row

    def at(self, ids: list[int]) -> list[float]:
        return [0.0 if i == self.token else float("-inf") for i in ids]


class LogprobRow(SamplingLogprobs):
    """A row the sampling chain computed whole (top-k, top-p, min-p)."""

    def __init__(self, row: torch.Tensor):
        self.row = row


class TemperedLogits(SamplingLogprobs):
    """A temperature's alone: (logit - max) / temperature - log_z, for finite logits (vocab,) on the CPU
    (the compiled race's) of any float dtype. `at` does the same float64 operations in Python as `row`
    in torch: the same bits."""

    def __init__(self, logits: torch.Tensor, row_max: float, temperature: float, log_z: float):
        self.logits, self.max, self.temperature, self.log_z = logits, row_max, temperature, log_z

    @functools.cached_property
    def row(self) -> torch.Tensor:
        return torch.sub(self.logits.double(), self.max).div_(self.temperature).sub_(self.log_z)

    def at(self, ids: list[int]) -> list[float]:
        picked = self.logits.numpy()[ids].tolist()  # numpy picks a few entries in 2 us, torch in 8
        return [((x - self.max) / self.temperature) - self.log_z for x in picked]


def choose(logits: torch.Tensor, params: SamplingParams, noise: torch.Tensor | None) -> tuple[int, SamplingLogprobs]:
    """
    Pick the next token from one row of penalised logits (vocab,) and its uniform noise (vocab,)
    (`draw_noise`; None for greedy); returns (id, the sampling log-probabilities). The row must have a
    distribution (`logits_fault` is None for it). With a temperature and no other filter, on a CPU
    where the kernels load, the race runs in C (cpu_kernel.temperature_race, on float32 or float64
    logits): the same token, and log-probabilities equal to float64 rounding.
    """
    if params.temperature == 0:
        token = int(torch.argmax(stable_logits(logits)))
        return token, PointMass(token, logits.size(-1), logits.device)
    if only_temperature(params, logits.size(-1)):  # the default settings: steps 3 and 7 in one compiled pass
        from .cpu_kernel import temperature_race

        raced = temperature_race(logits, params.temperature, noise)  # None: no compiler, or not finite
        if raced is not None:
            token, row_max, log_z = raced
            return token, TemperedLogits(logits, row_max, params.temperature, log_z)
    sampling_logprobs = filter_logits(logits, params).log_softmax(-1)
    # exponential race: argmax p / E  ==  argmax log p - log E; a removed token stays out even if E is 0
    race = torch.where(sampling_logprobs > float("-inf"), sampling_logprobs - exponential(noise).log(), float("-inf"))
    return int(torch.argmax(race)), LogprobRow(sampling_logprobs)
