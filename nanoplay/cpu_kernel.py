"""
The compiled CPU decode step (kernels/decode_step.c): one new token for each of several sequences,
the whole forward in one call, for float32, bfloat16 and int8 (precision.py) models; and the figures
of each token's distribution (kernels/distribution.c: log Z, entropy, the most likely ids), which
sampling.Distribution otherwise computes in torch.

Why: in torch a decode step of a small model is ~350 operations, and between the matrix products their
dispatch costs about as much as the products; and no well-kept CPU library here multiplies a few rows
by a matrix while reading each weight once (see `nanoplay bench` and the README's speed section). The C
step reads every weight once per step for all rows, with no Python inside.

It is compiled the first time it is needed, with the machine's C compiler (`$CC`, else `cc`) for the
machine's own CPU (-march=native) and OpenMP, into nanoplay's cache directory; the file's name carries
a hash of the source, the compiler and the CPU, so a new version or another machine compiles afresh.
Where there is no compiler (or `NANOPLAY_DECODE_KERNEL=0`), decoding stays in torch, and
`kernel_status()` says why. A few tokens of one sequence can go in one call too (speculative
decoding's check and its draft, speculative.py). Prompts, scoring and training run in torch: their
products have many rows, where BLAS is at its best (torch's, whose threads are the step's: see
cpu_decode.use_decode_layout).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import itertools
import os
import platform
import shlex
import subprocess
import tempfile
import weakref
from pathlib import Path

import torch
import torch.nn as nn

from .cpu_decode import decode_thread_count, huge_page_memory
from .kvcache import KVCache
from .model import GPT
from .precision import Int8Linear, cpu_flags

KERNELS = Path(__file__).parent / "kernels"
SOURCES = [KERNELS / "decode_step.c", KERNELS / "distribution.c"]  # compiled into one library
HEADERS = [KERNELS / "vectors.h"]  # what they include: part of the build's hash
DISABLE_VARIABLE = "NANOPLAY_DECODE_KERNEL"  # "0": never use the compiled step

WEIGHT_TYPES = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2}  # decode_step.c's WEIGHT_*
ACTIVATIONS = {"gelu_tanh": 0, "gelu": 1, "relu": 2, "silu": 3, "quick_gelu": 4}  # decode_step.c's ACT_*


class _Matrix(ctypes.Structure):
    _fields_ = [("weight", ctypes.c_void_p), ("scales", ctypes.c_void_p), ("bias", ctypes.c_void_p),
                ("in_features", ctypes.c_int64), ("out_features", ctypes.c_int64)]


class _Layer(ctypes.Structure):
    _fields_ = [("ln_1_weight", ctypes.c_void_p), ("ln_1_bias", ctypes.c_void_p),
                ("ln_2_weight", ctypes.c_void_p), ("ln_2_bias", ctypes.c_void_p),
                ("c_attn", _Matrix), ("attn_proj", _Matrix), ("c_fc", _Matrix), ("mlp_proj", _Matrix),
                ("k_cache", ctypes.c_void_p), ("v_cache", ctypes.c_void_p), ("attn_scale", ctypes.c_float)]


class _Model(ctypes.Structure):
    _fields_ = [("n_layer", ctypes.c_int64), ("n_head", ctypes.c_int64), ("n_embd", ctypes.c_int64),
                ("mlp_width", ctypes.c_int64), ("vocab_size", ctypes.c_int64), ("cache_len", ctypes.c_int64),
                ("weight_type", ctypes.c_int32), ("cache_type", ctypes.c_int32), ("embedding_type", ctypes.c_int32),
                ("activation", ctypes.c_int32), ("layer_norm_epsilon", ctypes.c_float),
                ("wte", ctypes.c_void_p), ("wpe", ctypes.c_void_p),
                ("ln_f_weight", ctypes.c_void_p), ("ln_f_bias", ctypes.c_void_p),
                ("lm_head", _Matrix), ("layers", ctypes.POINTER(_Layer))]


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "nanoplay" / "kernels"


def _compiler_version(cc: list[str]) -> str:
    return subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=30, check=True).stdout


def _build(cc: list[str], flags: list[str], target: Path) -> str:
    """Compile the step into `target` (written beside it, then renamed: a process that finds the name
    finds it whole); "" or why it failed, one line."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([*cc, *flags, *map(str, SOURCES), "-o", partial, "-lm"], capture_output=True, text=True,
                              timeout=300)
        if done.returncode != 0:
            lines = done.stderr.strip().splitlines() or ["no message"]
            return f"the decode kernel did not compile with {cc[0]} ({next((x for x in lines if 'error' in x), lines[-1]).strip()})"
        os.replace(partial, target)
        return ""
    finally:
        if os.path.exists(partial):
            os.unlink(partial)


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str]:
    """(the library, "") or (None, why not), once per process. Nothing here raises: any failure (no
    compiler, a cache directory that cannot be written, a damaged file in it) leaves decoding in torch."""
    if os.environ.get(DISABLE_VARIABLE) == "0":
        return None, f"off ({DISABLE_VARIABLE}=0)"
    cc = shlex.split(os.environ.get("CC") or "cc")  # CC may carry flags: "gcc -m64"
    try:
        version = _compiler_version(cc)
    except (OSError, ValueError, subprocess.SubprocessError) as e:
        return None, f"no C compiler ({' '.join(cc)}: {type(e).__name__}): install gcc or set CC"
    flags = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC"]
    key = hashlib.sha256(b"\0".join([*(source.read_bytes() for source in SOURCES + HEADERS), version.encode(),
                                     " ".join(cc + flags).encode(), platform.machine().encode(),
                                     " ".join(sorted(cpu_flags())).encode()]))
    target = _cache_dir() / f"decode_step-{key.hexdigest()[:16]}.so"
    for attempt in range(2):  # a file there that does not load (damaged, foreign) is built again, once
        try:
            if not target.exists():
                why = _build(cc, flags, target)
                if why:
                    return None, why
            library = ctypes.CDLL(str(target))
            step, statistics, race = library.decode_step, library.distribution_stats, library.temperature_race
            noise, pairs = library.uniform_noise, library.decode_bf16_pairs
            packed_bytes, pack, stream = library.packed_bytes, library.pack_matrix, library.stream_sum
            break
        except (OSError, AttributeError, subprocess.SubprocessError) as e:
            try:
                target.unlink(missing_ok=True)  # never leave a file that does not load
            except OSError as unlink_error:
                return None, f"the decode kernel in {target} does not load and cannot be replaced ({unlink_error})"
            if attempt:
                return None, f"the decode kernel could not be built or loaded in {target.parent} ({e})"
    step.argtypes = [ctypes.POINTER(_Model), ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                     ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    step.restype = ctypes.c_int
    statistics.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int,
                           ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    statistics.restype = ctypes.c_int
    race.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_double, ctypes.c_void_p, ctypes.c_int,
                     ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    race.restype = ctypes.c_int
    noise.argtypes = [ctypes.c_uint64, ctypes.c_int64, ctypes.c_void_p]
    noise.restype = None
    pairs.argtypes, pairs.restype = [], ctypes.c_int
    packed_bytes.argtypes, packed_bytes.restype = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64], ctypes.c_int64
    pack.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
    pack.restype = None
    stream.argtypes, stream.restype = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int], ctypes.c_double
    return library, ""


def kernel_status() -> str:
    """Empty when the compiled decode step is available on this machine, else one line saying why not."""
    return _load()[1]


def bf16_pairs() -> bool:
    """Whether the compiled step multiplies bf16 weights in bf16 pairs (avx512_bf16's vdpbf16ps), rounding
    each product's inputs and a bf16 cache's queries to bf16 as torch's bf16 maths does; False where it
    widens them to float32 instead, or the kernels do not load."""
    library = _load()[0]
    return bool(library is not None and library.decode_bf16_pairs())


def stream_sum(x: torch.Tensor, threads: int) -> float | None:
    """The sum of a contiguous float32 CPU tensor, read as the step's products read their weights (its
    lines prefetched ahead: decode_step.c's stream_sum), with `threads`; None without the library."""
    library = _load()[0]
    if library is None:
        return None
    return library.stream_sum(x.data_ptr(), x.numel(), threads)


def distribution_statistics(logits: torch.Tensor, top: int) -> tuple[torch.Tensor, ...] | None:
    """
    For rows of logits (N, vocab), float32 on the CPU: each row's maximum (N,), log_z = log sum
    exp(logits - max) (N,) and entropy (N,) in nats, all float64, its `top` most likely ids (N, top),
    most likely first and the lower id first among equal logits, and their log-probabilities (N, top)
    float64 (kernels/distribution.c), with the
    threads a decode step uses. None where the kernels do not load, for other tensors, and for rows
    with NaN or +-inf: the caller computes those in torch.
    """
    library = _load()[0]
    if (library is None or logits.device.type != "cpu" or logits.dtype != torch.float32 or logits.dim() != 2
            or not logits.numel()):
        return None
    logits = logits.contiguous()
    rows, vocab = logits.shape
    row_max = torch.empty(rows)
    log_z, entropy = torch.empty(rows, dtype=torch.float64), torch.empty(rows, dtype=torch.float64)
    top_ids = torch.empty(rows, top, dtype=torch.int64)
    top_logprobs = torch.empty(rows, top, dtype=torch.float64)
    status = library.distribution_stats(logits.data_ptr(), rows, vocab, top, decode_thread_count(),
                                        row_max.data_ptr(), log_z.data_ptr(), entropy.data_ptr(), top_ids.data_ptr(),
                                        top_logprobs.data_ptr())
    if status < 0:
        raise MemoryError("the distribution kernel could not allocate its scratch memory")
    return None if status else (row_max.double(), log_z, entropy, top_ids, top_logprobs)


def temperature_race(logits: torch.Tensor, temperature: float, noise: torch.Tensor) -> tuple[int, float, float] | None:
    """
    sampling.choose's exponential race at `temperature` with no other filter, for one row of float32 or
    float64 logits (vocab,) on the CPU and its uniform noise (vocab,) (sampling.draw_noise; kernels/distribution.c):
    (token, the row's maximum, log_z), where token j's sampling log-probability is (logits[j] - max) /
    temperature - log_z. None where the kernels do not load, for other tensors, and for a row with NaN
    or +-inf.
    """
    library = _load()[0]
    if (library is None or logits.device.type != "cpu" or logits.dtype not in (torch.float32, torch.float64)
            or logits.dim() != 1 or noise.device.type != "cpu" or noise.shape != logits.shape or not logits.numel()):
        return None
    logits, noise = logits.contiguous(), noise.double().contiguous()
    token, row_max, log_z = ctypes.c_int64(), ctypes.c_double(), ctypes.c_double()
    status = library.temperature_race(logits.data_ptr(), logits.dtype == torch.float64, logits.numel(), temperature,
                                      noise.data_ptr(), decode_thread_count(), ctypes.byref(token),
                                      ctypes.byref(row_max), ctypes.byref(log_z))
    if status < 0:
        raise MemoryError("the sampling kernel could not allocate its scratch memory")
    return None if status else (token.value, row_max.value, log_z.value)


def uniform_noise(step_key: int, size: int) -> torch.Tensor | None:
    """sampling.draw_noise's uniform numbers (size,) float64 for a step key in [0, 2**64), computed in C
    (kernels/distribution.c: the same bits as the torch version); None where the kernels do not load."""
    library = _load()[0]
    if library is None:
        return None
    out = torch.empty(size, dtype=torch.float64)
    library.uniform_noise(step_key, size, out.data_ptr())
    return out


def why_not_compiled(model: GPT) -> str | None:
    """
    None when the compiled step can decode `model` on this machine, else why not, in a few words:
    decoding then stays in torch (the maths the step does not know: other activations, fp16).
    """
    status = kernel_status()
    if status:
        return status
    cfg = model.config
    if model.transformer.wte.weight.device.type != "cpu":
        return "not on the CPU"
    watched = watched_or_wrapped(model)
    if watched:
        return watched
    if cfg.activation not in ACTIVATIONS:
        return f"its activation, {cfg.activation}"
    products = _products(model)
    dtypes = {_weight_matrix(m).dtype for m in products}
    if len(dtypes) != 1 or not dtypes <= set(WEIGHT_TYPES):
        return "weights in " + " and ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))
    if model.transformer.wte.weight.dtype not in (torch.float32, torch.bfloat16):
        return f"embeddings in {model.transformer.wte.weight.dtype}"
    if not all(_weight_matrix(m).is_contiguous() for m in products):
        return "weights not in nn.Linear's layout"
    return None


def watched_or_wrapped(model: GPT) -> str | None:
    """
    Why the step would not compute what `model(...)` does now, or None: the step computes GPT.forward's
    maths, so a model that computes anything else, or whose modules someone watches (forward hooks, its
    own or torch's global ones), runs in torch. A walk over the modules' own dicts: 20 us for the 30M
    shape on warm caches (model.modules() took 70), 0.1-0.2 ms right after a decode step has streamed
    the weights through them, so the engine asks whenever a request joins (KernelDecoder.look_again).
    """
    if type(model) is not GPT or "forward" in vars(model):
        return "a forward other than GPT's"
    if torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks:
        return "global forward hooks"
    modules = [model]
    while modules:
        module = modules.pop()
        if module._forward_hooks or module._forward_pre_hooks:
            return "forward hooks on its modules"
        modules.extend(module._modules.values())
    return None


def tensors_read(model: GPT) -> list[tuple]:
    """Each parameter's and buffer's identity as the step reads it: address, layout and version (torch
    counts in-place changes; `p.data.mul_(2)` escapes it, which is why `.data` is for code that knows)."""
    return [_identity(t) for t in itertools.chain(model.parameters(), model.buffers())]


def _identity(t: torch.Tensor) -> tuple:
    return t.data_ptr(), t.dtype, t.shape, t.stride(), t._version


def _products(model: GPT) -> list[nn.Module]:
    return [model.lm_head] + [m for b in model.transformer.h for m in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc,
                                                                        b.mlp.c_proj)]


def _weight_matrix(module: nn.Module) -> torch.Tensor:
    """A product module's weight matrix (out, in): an Int8Linear's int8 one, else nn.Linear's."""
    return module.qweight if isinstance(module, Int8Linear) else module.weight.detach()


# each product module's packed weights, with the identity of the weight they were packed from
_PACKED: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, torch.Tensor]] = weakref.WeakKeyDictionary()


def packed_weights(module: nn.Module) -> torch.Tensor:
    """
    The weight matrix of a product module (nn.Linear, Int8Linear), packed as the compiled step's products
    read it (decode_step.c's pack_matrix: groups of 64 outputs, input by input), in memory backed by huge
    pages where the kernel allows (cpu_decode.huge_page_memory): uint8, packed_bytes long. Made once per
    weight and shared by every step that decodes it (a model's own and a draft's), again when the weight
    is replaced or changed in place (tensors_read's identity). A second copy of the weights: torch's
    products (prompts, scoring) read the module's own.
    """
    library = _load()[0]
    weight = _weight_matrix(module)
    identity = _identity(weight)
    kept = _PACKED.get(module)
    if kept is not None and kept[0] == identity:
        return kept[1]
    weight_type, (out, width) = WEIGHT_TYPES[weight.dtype], weight.shape
    size = library.packed_bytes(weight_type, out, width)
    packed = huge_page_memory(size)
    library.pack_matrix(weight_type, weight.data_ptr(), out, width, packed.data_ptr(), decode_thread_count())
    _PACKED[module] = (identity, packed)
    return packed


class KernelDecoder:
    """
    The compiled decode step for one model and its KV cache. It holds the model's tensors (the C side
    reads their memory), its weight matrices packed for the step's products (packed_weights), and
    float32 copies of the few it needs in float32 (a bf16 model's norms and biases, int8 scales).
    """

    def __init__(self, model: GPT, cache: KVCache):
        why = why_not_compiled(model)
        if why:
            raise RuntimeError(f"the compiled decode step cannot run this model: {why}")
        self.library = _load()[0]
        self.model = model
        self.cache = cache
        self.why_not: str | None = None  # why the model runs in torch now (hooks, ...), as last looked
        self._build()

    def _build(self) -> None:
        """Read the model's tensors' addresses (and copy the few it needs in float32) into the C struct."""
        model, cache, cfg = self.model, self.cache, self.model.config
        self._tensors = tensors_read(model)
        self._keep: list[torch.Tensor] = []  # every tensor whose memory the C side reads
        lm_head, blocks = model.lm_head, model.transformer.h
        layers = (_Layer * cfg.n_layer)()
        for i, block in enumerate(blocks):
            attn, mlp = block.attn, block.mlp
            layers[i] = _Layer(self._f32(block.ln_1.weight), self._f32(block.ln_1.bias),
                               self._f32(block.ln_2.weight), self._f32(block.ln_2.bias),
                               self._matrix(attn.c_attn), self._matrix(attn.c_proj), self._matrix(mlp.c_fc),
                               self._matrix(mlp.c_proj), self._raw(cache.k[i]), self._raw(cache.v[i]), attn.scale)
        self._layers = layers
        wte = model.transformer.wte.weight.detach()
        wpe = model.transformer.wpe.weight.detach().to(wte.dtype)
        self.struct = _Model(cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.mlp_width, cfg.vocab_size,
                             cache.k[0].size(2), WEIGHT_TYPES[_weight_matrix(lm_head).dtype], WEIGHT_TYPES[cache.k[0].dtype],
                             WEIGHT_TYPES[wte.dtype], ACTIVATIONS[cfg.activation], cfg.layer_norm_epsilon,
                             self._raw(wte.contiguous()), self._raw(wpe.contiguous()),
                             self._f32(model.transformer.ln_f.weight), self._f32(model.transformer.ln_f.bias),
                             self._matrix(lm_head), layers)

    def look_again(self, tensors: list[tuple]) -> None:
        """
        Look at the model again (`why_not`), given its `tensors_read` as the caller just read them: hooks
        or a replaced forward send it to torch; a tensor replaced (`layer.weight = nn.Parameter(...)`) or
        changed in place since the step read it (the step reads float32 copies of a bf16 model's norms)
        rebuilds the step, or sends it to torch when the step cannot run the new tensors (why_not_compiled).
        """
        self.why_not = watched_or_wrapped(self.model)
        if self.why_not is None and tensors != self._tensors:
            self.why_not = why_not_compiled(self.model)
            if self.why_not is None:
                self._build()

    def _raw(self, t: torch.Tensor | None) -> int | None:
        """The address of a contiguous tensor as it is (the weights, the KV cache)."""
        if t is None:
            return None
        self._keep.append(t)
        return t.data_ptr()

    def _f32(self, t: torch.Tensor | None) -> int | None:
        """The address of a float32 tensor: t itself when it is one, else a float32 copy."""
        return None if t is None else self._raw(t.detach().float().contiguous())

    def _matrix(self, module: nn.Module) -> _Matrix:
        out, width = _weight_matrix(module).shape
        scales = self._f32(module.scales) if isinstance(module, Int8Linear) else None
        return _Matrix(self._raw(packed_weights(module)), scales, self._f32(module.bias), width, out)

    def decode(self, slots: list[int], tokens: list[int], positions: list[int], threads: int) -> torch.Tensor:
        """
        Logits (B, vocab) float32 of one new token in each of `slots` at `positions`; each token's key
        and value are written to the cache at its position, as the torch step does (KVCache.bind_decode).
        Rows may share a slot at consecutive positions (several tokens of one sequence: a speculative
        check, a draft catching up): each sees the keys of the rows before it, as a causal forward does.
        Raises ValueError for a slot, token or position outside the model and its cache.
        """
        cfg = self.model.config
        if not (min(slots) >= 0 and max(slots) < self.cache.slots and min(tokens) >= 0
                and max(tokens) < cfg.vocab_size and min(positions) >= 0 and max(positions) < cfg.block_size):
            raise ValueError(f"slots {slots}, tokens {tokens} or positions {positions} outside the model's "
                             f"{self.cache.slots} slots, {cfg.vocab_size} tokens or {cfg.block_size} positions")
        inputs = torch.tensor([slots, tokens, positions], dtype=torch.int64)  # (3, B)
        logits = torch.empty(len(slots), self.model.config.vocab_size)
        status = self.library.decode_step(ctypes.byref(self.struct), len(slots), inputs[1].data_ptr(),
                                          inputs[2].data_ptr(), inputs[0].data_ptr(), logits.data_ptr(), threads)
        if status != 0:
            raise MemoryError("the decode kernel could not allocate its scratch memory")
        return logits
