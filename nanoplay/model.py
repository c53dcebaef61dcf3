"""
The one GPT-2-architecture model nanoplay runs, trains and scores.

It follows nanoGPT's model.py (pre-LayerNorm blocks, learned positions, tied input/output embeddings)
and records in GPTConfig everything that differs between the places checkpoints come from:
GPT-2 on the Hub uses the tanh GELU and biases everywhere; nanoGPT uses the exact GELU (the tanh one
before mid-2023) and its train.py defaults to bias=False; vocabularies are 50257 (GPT-2) or padded to
50304 (nanoGPT, us). The rest are the options of transformers' GPT2Config that change the maths:
an untied output head, the MLP's width and activation, and the attention scaling.

Parameter names are nanoGPT's, so a nanoGPT state dict loads as it is and a Hugging Face one needs
only its Conv1D weights transposed (see loading.py).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
from torch.nn import functional as F

# The MLP's activation, by name: GPT-2's tanh approximation of GELU, the exact erf GELU, and every
# other parameter-free activation transformers' GPT-2 accepts, computed as transformers does
# (transformers.activations; the names are its names, see loading.HF_ACTIVATIONS for the aliases)
ACTIVATIONS = {
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "gelu_10": lambda x: F.gelu(x).clamp(-10, 10),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "laplace": lambda x: 0.5 * (1.0 + torch.erf((x - 0.707107) / (0.282095 * math.sqrt(2.0)))),
    "relu": F.relu,
    "relu2": lambda x: F.relu(x).square(),
    "relu6": F.relu6,
    "leaky_relu": F.leaky_relu,  # slope 0.01
    "hardswish": F.hardswish,
    "silu": F.silu,
    "mish": F.mish,
    "sqrtsoftplus": lambda x: F.softplus(x).sqrt(),
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "linear": lambda x: x,
}


@dataclass
class GPTConfig:
    block_size: int = 1024  # context length
    vocab_size: int = 50304  # 50257 for GPT-2 from the Hub; 50304 = padded to a multiple of 64
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm layers
    layer_norm_epsilon: float = 1e-5
    activation: str = "gelu_tanh"  # a key of ACTIVATIONS
    n_inner: int | None = None  # the MLP's hidden width; None: 4 * n_embd
    tie_word_embeddings: bool = True  # lm_head shares wte's weight; False: the model has its own output head
    scale_attn_weights: bool = True  # attention scores divided by sqrt(head size)
    scale_attn_by_inverse_layer_idx: bool = False  # ... and by 1 / (layer index + 1)

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, not {self.activation!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        """Every key must be a field: a detail this version does not know could change the maths."""
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown model settings {', '.join(unknown)}: written by a newer nanoplay?")
        return cls(**d)

    @property
    def mlp_width(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        # key, query, value projections for all heads, in one batch
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        # attention scores q.k are scaled by 1/sqrt(head size), or not at all, and optionally further by
        # 1/(layer_idx + 1): transformers' GPT-2 options scale_attn_weights, scale_attn_by_inverse_layer_idx
        self.scale = 1 / math.sqrt(config.n_embd // config.n_head) if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            self.scale /= layer_idx + 1

    def forward(self, x, cache=None):
        B, T, C = x.size()  # batch, sequence length, n_embd
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        hs = C // self.n_head
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        if cache is None:
            y = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True, scale=self.scale
            )
        else:
            # the cache stores this step's keys/values and returns everything visible so far:
            # k, v (B, nh, L, hs) with L >= T, and the mask that keeps each query causal
            k, v, mask, is_causal = cache.update(self.layer_idx, k, v)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=self.scale)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble all head outputs side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.mlp_width, bias=config.bias)
        self.act = ACTIVATIONS[config.activation]
        self.c_proj = nn.Linear(config.mlp_width, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        eps = config.layer_norm_epsilon
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=eps, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, cache=None):
        x = x + self.attn(self.ln_1(x), cache)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight  # weight tying

        self.apply(self._init_weights)
        # GPT-2 paper: scaled init of the residual projections
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters, counted once despite tying; minus position embeddings if non_embedding."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def forward(self, idx, targets=None, *, positions=None, cache=None, last_only=False):
        """
        idx: (B, T) token ids. positions: (B, T) absolute positions, default 0..T-1.
        cache: a KV cache (see nanoplay.kvcache) for incremental decoding, or None.
        Returns logits (B, T, vocab) -- (B, 1, vocab) with last_only -- and, given targets (B, T)
        with -1 for positions to ignore, the mean cross-entropy loss.
        """
        B, T = idx.size()
        if positions is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence of {T} tokens exceeds the context of {self.config.block_size}")
            positions = torch.arange(T, device=idx.device)  # (T,)
        x = self.transformer.wte(idx) + self.transformer.wpe(positions)  # (B, T, n_embd)
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x, cache)
        x = self.transformer.ln_f(x)
        if last_only:
            x = x[:, -1:, :]
        logits = self.lm_head(x)  # (B, T, vocab)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW with weight decay on matrices (2D+) only, fused where the device supports it."""
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        fused = device_type == "cuda"
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)

    def estimate_flops_per_token(self) -> float:
        """Training FLOPs per token (PaLM appendix B): 6N + 12 * L * H * Q * T."""
        cfg = self.config
        n = self.num_params(non_embedding=True)
        head_dim = cfg.n_embd // cfg.n_head
        return 6 * n + 12 * cfg.n_layer * cfg.n_head * head_dim * cfg.block_size
