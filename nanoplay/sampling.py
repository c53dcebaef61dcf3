"""
Sampling settings and the per-step maths of the shared sampler.

The order in which a request's settings act on the model's next-token logits:
  1. repetition penalty (Hugging Face semantics, over prompt + generated tokens): a seen token's logit
     is divided by the penalty when positive and multiplied by it when negative;
  2. presence and frequency penalties (OpenAI's formula, over generated tokens):
     logit[j] -= frequency_penalty * count[j] + presence_penalty * (count[j] > 0);
  3. temperature: logits / temperature (temperature 0 means greedy: the argmax of step 2's logits);
  4. top-k: keep the k highest;
  5. top-p (nucleus): keep the smallest set whose probability reaches p;
  6. min-p: keep tokens whose probability is at least min_p times the most likely one's;
  7. sample from what is left (the "sampling distribution").

Sampling uses the exponential race (Gumbel-max in another guise): token = argmax(p / E) with E ~ Exp(1),
one noise value per vocabulary entry per step, drawn from the request's own generator. Two requests
with the same seed therefore draw the same noise at every step -- alone or batched, and on different
models that share the vocabulary (common random numbers) -- so side-by-side differences come from the
models, not from luck.

Every generated token also carries statistics of the model's raw distribution (before step 1):
log-probability, rank, entropy, and the top alternatives.
"""

from __future__ import annotations

import secrets
from dataclasses import asdict, dataclass, field

import torch

from .errors import NanoplayError

# Noise is drawn over at least this many entries (nanoGPT's padded vocabulary), so models with 50257 and
# 50304 entries see the same noise for every real token id.
NOISE_SIZE = 50304
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
    seed: int | None = None  # None: a random seed, recorded on the request
    top_logprobs: int = 5  # alternatives reported per token

    def __post_init__(self):
        checks = [
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
        """A copy whose seed is fixed (a fresh random one if unset)."""
        d = asdict(self)
        if d["seed"] is None:
            d["seed"] = secrets.randbits(31)
        return SamplingParams(**d)

    def to_dict(self) -> dict:
        return asdict(self)


def apply_penalties(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor,
                    generated_counts: torch.Tensor | None) -> torch.Tensor:
    """Steps 1-2 on one row. seen: ids in prompt + output; generated_counts: (V,) counts of output ids."""
    if params.repetition_penalty != 1.0 and seen.numel():
        picked = logits[seen]
        logits = logits.clone()
        logits[seen] = torch.where(picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty)
    if (params.presence_penalty or params.frequency_penalty) and generated_counts is not None:
        counts = generated_counts.to(logits.dtype)
        logits = logits - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Steps 3-6 on one row: temperature, top-k, top-p, min-p; removed entries become -inf."""
    logits = logits / params.temperature
    if params.top_k is not None and params.top_k < logits.size(-1):
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p is not None and params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.double().softmax(-1)  # float64: the boundary must not move with rounding
        # drop a token when the ones before it already reach top_p (the first token always stays)
        drop_sorted = (probs.cumsum(-1) - probs) >= params.top_p
        logits = logits.masked_fill(drop_sorted.scatter(0, order, drop_sorted), float("-inf"))
    if params.min_p is not None and params.min_p > 0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    return logits


def draw_noise(generator: torch.Generator, vocab_size: int, device) -> torch.Tensor:
    """This step's Exp(1) noise for one request: the same values for the same seed and step."""
    noise = torch.empty(max(NOISE_SIZE, vocab_size), device=device)
    noise.exponential_(generator=generator)
    return noise[:vocab_size]


def choose(logits: torch.Tensor, params: SamplingParams, noise: torch.Tensor | None) -> tuple[int, torch.Tensor]:
    """Pick the next token from one row of penalised logits; returns (id, sampling log-probs)."""
    if params.temperature == 0:
        token = int(torch.argmax(logits))
        sampling_logprobs = torch.full_like(logits, float("-inf"))
        sampling_logprobs[token] = 0.0  # greedy: a point mass
        return token, sampling_logprobs
    sampling_logprobs = filter_logits(logits, params).log_softmax(-1)
    # exponential race: argmax p / E  ==  argmax log p - log E
    token = int(torch.argmax(sampling_logprobs - noise.log()))
    return token, sampling_logprobs
