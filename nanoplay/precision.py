"""
Weight precision for inference: which dtype a machine runs fastest, and 8-bit weights.

Decoding reads every weight once per token, so fewer bytes per weight decode faster -- where the CPU
can compute with them. torch's bfloat16 products run on oneDNN's avx512_bf16 / AMX kernels; without
those instructions torch converts bf16 in software, so `preferred_dtype` picks bf16 only on CPUs that
have them (a pure function of the CPU's flags, see `cpu_flags`). The compiled decode step
(cpu_kernel.py) widens bf16 in registers and decodes it faster than float32 on any CPU, but `auto`
also loads the models `eval` and `score` measure, so it stays float32 there (README: Weight precision).

int8 is weight-only quantization at load time: each output row of every matrix product (the output
head included) is stored as int8 with one scale per row (symmetric, scale = max |w| / 127). Decode
steps run in the compiled step (cpu_kernel.py), which widens the int8 weights to float32 in registers
and rounds each product's inputs and results to bf16 as torch's kernel does (so `score`, and a machine
without a compiler, give the same numbers up to a rare rounding flip); in torch (prefill, scoring, and decoding where there is no compiler) the product runs in torch's own
kernel, `torch._weight_int8pack_mm`, which reads the int8 weights directly, with bf16 inputs and
outputs (its fast path on CPUs without AVX-512). Norms, attention, the residual stream, the KV cache
and the embeddings stay float32. A row's result does not depend on the other rows of the batch, so a
request decodes the same alone or batched.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn as nn

from .errors import NanoplayError

BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of CPUs with native bf16 products


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none: macOS, Windows)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def preferred_dtype(device_type: str, flags: frozenset[str] | set[str]) -> torch.dtype:
    """The weights' dtype that decodes fastest: bf16 on a CPU with native bf16 products, else float32."""
    if device_type == "cpu" and any(f in flags for f in BF16_FLAGS):
        return torch.bfloat16
    return torch.float32


def default_dtype(device: torch.device | str) -> torch.dtype:
    """preferred_dtype for this machine's CPU flags."""
    return preferred_dtype(torch.device(device).type, cpu_flags())


# each precision as --dtype names it (torch.int8: int8 weight matrices, float32 elsewhere)
PRECISION_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int8: "int8"}

# torch 2.13's int8 kernel reads past the end of rows of other widths: on a CPU with AVX-512 (an Intel
# Xeon here), widths of 8 times an odd number gave NaN or wrong products for 1 to 3 rows and a
# segmentation fault for 4 or more; on AVX2 ones, widths that are not multiples of 8 crashed
INT8_WIDTH_MULTIPLE = 16


class Int8Linear(nn.Module):
    """
    nn.Linear with int8 weights (out, in) and one scale per output row (out,): y = (x @ q.T) * scale + b.
    Built from a float Linear by `Int8Linear.from_linear`; inference only.
    """

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = qweight.size(1), qweight.size(0)
        self.register_buffer("qweight", qweight)  # (out, in) int8
        self.register_buffer("scales", scales)  # (out,) bf16, the kernel's input dtype
        self.register_buffer("bias", bias)  # (out,) float32 or None

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        w = linear.weight.float()  # (out, in)
        exact = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)  # (out,): a zero row stays zero
        # the kernel takes bf16 scales: round each up, so that the row's largest weight still fits in 127,
        # and quantize with the scale the kernel will use
        scales = exact.to(torch.bfloat16)
        scales = torch.where(scales.float() < exact, torch.nextafter(scales, torch.full_like(scales, 1e30)), scales)
        qweight = torch.round(w / scales.float().unsqueeze(1)).clamp(-127, 127).to(torch.int8).contiguous()
        bias = None if linear.bias is None else linear.bias.detach().float().clone()
        return cls(qweight, scales, bias)

    def dequantized(self) -> torch.Tensor:
        """The float32 weights (out, in) this layer computes with (for tests and quality checks)."""
        return self.qweight.float() * self.scales.float().unsqueeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape  # (..., in)
        y = torch._weight_int8pack_mm(x.reshape(-1, self.in_features).to(torch.bfloat16), self.qweight, self.scales)
        # back to x's dtype, adding the bias on the way (one op: a decode step runs this 4 times a layer)
        y = y.to(x.dtype) if self.bias is None else self.bias.to(x.dtype).add(y)  # (N, out)
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


@torch.no_grad()
def quantize_int8(model: nn.Module) -> nn.Module:
    """
    Replace every nn.Linear of a float32 model (the output head too) by an Int8Linear, in place.
    A tied input embedding keeps its float32 table: a lookup reads one row of it per token, while
    the head, which reads all of it, gets its own int8 copy. Returns the model.
    """
    if next(model.parameters()).device.type != "cpu":
        raise NanoplayError("int8 weights run on the CPU only (torch's int8 kernel): give --device cpu")
    widths = sorted({m.in_features for m in model.modules()
                     if isinstance(m, nn.Linear) and m.in_features % INT8_WIDTH_MULTIPLE})
    if widths:
        raise NanoplayError(f"int8 weights need matrix input widths that are multiples of {INT8_WIDTH_MULTIPLE} "
                            f"(torch's int8 kernel); this model has {', '.join(map(str, widths))}: "
                            "give --dtype fp32 or bf16")
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, Int8Linear.from_linear(child))
    return model
