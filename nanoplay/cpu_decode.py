"""
How a model decodes fast on a CPU: its weights laid out for the product a decode step runs, float32
products through numpy's BLAS, and one thread pool working at a time. (Where a C compiler is at hand,
the decode step itself is compiled: cpu_kernel.py; every product outside it, a prefill's, a score's,
then stays torch's, so that the step's OpenMP threads share the cores with no other pool: see
use_decode_layout.)

A decode step multiplies one activation row per sequence by every weight matrix, so its speed is the
rate at which the products stream the weights from memory. torch's CPU products run on MKL, which
takes a generic code path on AMD CPUs; numpy's wheels carry OpenBLAS, which picks its kernels by the
CPU's instructions, whoever made it. Measured side by side on a 2-core AMD EPYC (AVX2), reading all of
a model's matrices once: MKL streamed the 30M shape's at 16-22 GB/s, OpenBLAS at 28-30 GB/s, of a
32 GB/s streaming read; a whole decode step ran 1.2-1.3x faster (`nanoplay bench` measures it).

Two thread pools on the same cores must not wait for work at the same time: torch's OpenMP workers
and OpenBLAS's threads both spin for a while after each task, and with both at 2 threads a decode
step ran 7x slower. So while a model with BLAS products steps (`decode_threads`), torch computes with
one thread -- its share of a decode step is small: norms, activations, attention of one query -- and
OpenBLAS with the threads torch had.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import mmap
import threading

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class BlasLinear(nn.Module):
    """
    nn.Linear for inference whose float32 CPU product runs in numpy's BLAS: y = x @ weight.T + bias.
    It keeps the Linear's parameters (so a tied head still shares the embedding's tensor), with the
    weight (out, in) stored transposed, (in, out)-major, the layout a product with few rows reads
    best. Other dtypes and devices, and anything that needs gradients, take F.linear.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight  # (out, in), with weight.t() contiguous (use_decode_layout)
        self.bias = linear.bias  # (out,) or None
        self._arrays = None  # (the parameters' addresses, weight.T and bias as numpy views of them)

    def _numpy(self) -> tuple[np.ndarray, np.ndarray | None]:
        """weight.T (in, out) and bias (out,) as numpy views: an in-place change of a parameter shows
        through them, and a parameter given new memory gets new views (the old memory stays alive while
        a view of it is kept, so its address cannot come back)."""
        w, b = self.weight, self.bias
        key = (w.data_ptr(), None if b is None else b.data_ptr())
        if self._arrays is None or self._arrays[0] != key:
            self._arrays = (key, w.detach().t().numpy(), None if b is None else b.detach().numpy())
        return self._arrays[1], self._arrays[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if x.device.type != "cpu" or x.dtype != torch.float32 or w.dtype != torch.float32 or (
                torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)):
            return F.linear(x, w, self.bias)
        # a decode step runs ~25 of these: every torch op saved here is a few µs a product (measured
        # 5-15 µs each inside a step, where streaming the weights evicts torch's code from the caches)
        weight_t, bias = self._numpy()
        rows = x.numpy().reshape(-1, self.in_features)  # (N, in): one product for every row of the batch
        # overflow gives inf as torch's product does, which the sampler reports; numpy would also warn
        # on stderr (2 us a product)
        with np.errstate(over="ignore", invalid="ignore"):
            y = np.matmul(rows, weight_t)  # (N, out)
            if bias is not None:
                np.add(y, bias, out=y)
        return torch.from_numpy(y.reshape(*x.shape[:-1], self.out_features))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


@torch.no_grad()
def use_decode_layout(model: nn.Module, compiled: bool) -> None:
    """
    Prepare a CPU model for decoding, in place. For inference only: the engine applies it to the
    models it loads itself.

    With `compiled`, the compiled decode step (cpu_kernel.py) will decode it from its own packed copy of
    the weights (cpu_kernel.packed_weights), and the model stays as it is: the products of many rows (a
    prefill, scoring) run in torch, whose OpenMP threads are the step's own (Linux's wheels bring libgomp). Why not numpy's
    BLAS for those: OpenBLAS's threads spin for about 0.1 s after each product, on the cores the step's
    threads need. Measured on a 2-core Intel Xeon (30M shape, float32, alternating processes): the
    first ~20 steps after every prefill ran at half speed (a step right after a BLAS product 12.2-12.5
    ms, 6.3-7.5 ms later), so 32 new tokens decoded at 130-155 tok/s with BLAS prefills against 220-250
    without them; the prefills themselves ran 1.2-1.35x faster in torch (MKL) there too.

    Otherwise a float32 model's matrices are stored transposed in memory (the values and shapes stay
    the same), which BLAS's products with few rows read fastest, and its nn.Linear products go to
    numpy's BLAS (BlasLinear). bf16 and fp16 models keep nn.Linear, in its own layout: torch's
    reduced-precision matrix-vector kernels read it 4.7x faster than the transposed one (30M shape,
    bf16, 2 threads, AVX2); int8 models keep their Int8Linear.
    """
    if compiled:
        return
    if model.transformer.wte.weight.dtype != torch.float32:
        return
    tied = model.config.tie_word_embeddings and type(model.lm_head) is nn.Linear
    if tied:  # one tensor for both, as before
        wte = nn.Parameter(model.transformer.wte.weight.t().contiguous().t(), requires_grad=False)
        model.transformer.wte.weight = wte
        model.lm_head.weight = wte
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                if not (tied and child is model.lm_head):
                    child.weight = nn.Parameter(child.weight.t().contiguous().t(), requires_grad=False)
                setattr(module, name, BlasLinear(child))


HUGE_PAGE = 2 * 1024**2  # x86-64's and most arm64 kernels' transparent huge page


def huge_page_memory(size: int) -> torch.Tensor:
    """
    `size` bytes (uint8, zeros) from a 2 MB boundary of a private anonymous mapping that the kernel is
    advised to back with huge pages: the compiled step's packed weights (cpu_kernel.packed_weights), and
    bench's bound, which must read memory as the weights are read. Why: a decode step streams every
    weight once, and with 4 kB pages it also walks the page tables for every 4 kB it reads. Measured: on
    a 2-core AMD EPYC, the same matrix-vector products 21-23 GB/s from 4 kB pages, 24-29 GB/s from huge
    pages; on an Intel Xeon a sum over 495 MB 20 GB/s against 22. Where the kernel does not take the
    advice, the memory is ordinary. The tensor keeps the mapping alive. Where there is no such mapping
    (Windows: no mmap.MAP_PRIVATE), ordinary zeroed memory.
    """
    if not hasattr(mmap, "MAP_PRIVATE"):
        return torch.zeros(size, dtype=torch.uint8)
    # private: a shared anonymous mapping is shared memory, which takes huge pages by another setting
    arena = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):  # before the first touch, which is when pages are given
        arena.madvise(mmap.MADV_HUGEPAGE)
    memory = torch.frombuffer(arena, dtype=torch.uint8)  # shares the mapping and keeps it alive
    start = -memory.data_ptr() % HUGE_PAGE
    return memory[start:start + size]


def uses_blas(model: nn.Module) -> bool:
    """
    Whether the model's products run in numpy's BLAS. use_decode_layout moves all of a model's
    products or none, so its output head tells: asked every decode step, this costs no walk over
    the modules.
    """
    return isinstance(getattr(model, "lm_head", None), BlasLinear)


def threads_for(*models: nn.Module, compiled: bool = False) -> contextlib.AbstractContextManager:
    """
    The thread setting for running these models: decode_threads if any of them uses BLAS, or if the
    compiled decode step runs. Its OpenMP threads are torch's own where torch brings libgomp (Linux's
    wheels), but a second pool beside another OpenMP; letting torch's sampler use every thread
    between steps measured no faster (30M shape, int8 and fp32, batch 1 and 4).
    """
    if compiled or any(uses_blas(m) for m in models):
        return decode_threads()
    return contextlib.nullcontext()


def decode_thread_count() -> int:
    """The threads a decode step may use: the process's count (`--threads`), also within decode_threads."""
    state = _DecodeThreads
    with state.lock:
        return state.saved if state.inside else torch.get_num_threads()


GLIBC_M_TRIM_THRESHOLD, GLIBC_M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (malloc.h)
KEEP_FREED_BYTES = 32 * 1024**2  # the largest M_MMAP_THRESHOLD glibc accepts on 64-bit


@functools.cache
def keep_freed_memory() -> bool:
    """
    Have glibc's malloc keep freed blocks of up to 32 MB for reuse, process-wide; False where the C
    library is not glibc (nothing changes). Why: every decode step allocates tensors as wide as the
    vocabulary (logits, the sampler's float64 log-probabilities: 0.2-6 MB), and glibc by default gives
    such blocks back to the kernel when they are freed, so the next step gets fresh pages, each
    zero-filled on its first touch. Measured on a 2-core VM: 800 page faults per step, and the
    sampler's statistics for 4 rows took 4.8 ms instead of 1.8 ms. The cost: a process keeps up to
    its peak of such blocks instead of returning them (the models' weights, larger, are not affected).
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
    except (OSError, TypeError):  # no C library to open by name: Windows
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # not glibc: musl, macOS
        return False
    return bool(libc.mallopt(GLIBC_M_MMAP_THRESHOLD, KEEP_FREED_BYTES)
                and libc.mallopt(GLIBC_M_TRIM_THRESHOLD, 4 * KEEP_FREED_BYTES))


@functools.cache
def _blas_threadpools():
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController().select(user_api="blas")


class _DecodeThreads:
    """
    The state behind decode_threads. torch's thread count is per thread, but a thread that has not
    asked for it yet takes the last count any thread set (torch's lazy_init_num_threads), and the
    engine's thread may step while a worker scores: so the first to enter saves the count, and every
    thread leaving puts that back, never a 1 that another thread set meanwhile.
    """

    lock = threading.Lock()
    inside = 0  # threads within decode_threads now
    saved = 0  # torch's thread count when the first of them entered
    blas = 0  # the thread count last given to the BLAS libraries (0: never)
    depth = threading.local()  # .n: how deep the calling thread is within decode_threads


@contextlib.contextmanager
def decode_threads():
    """
    Within: torch computes with one thread and numpy's BLAS (and the compiled decode step) with the
    threads torch had (the process's setting, which `--threads` sets, see decode_thread_count), so
    that only one pool waits for work. Safe to nest and to enter from several threads at once.
    """
    state = _DecodeThreads
    # a thread takes the process's count the first time it asks (or computes), and that would undo a
    # set_num_threads(1) made before: ask first
    own = torch.get_num_threads()
    with state.lock:
        if state.inside == 0:
            state.saved = own
            if state.blas != state.saved:
                _blas_threadpools().limit(limits=state.saved)
                state.blas = state.saved
        state.inside += 1
        state.depth.n = getattr(state.depth, "n", 0) + 1
        torch.set_num_threads(1)
    try:
        yield
    finally:
        with state.lock:
            state.inside -= 1
            state.depth.n -= 1
            torch.set_num_threads(1 if state.depth.n else state.saved)  # nested: the outer one still runs
