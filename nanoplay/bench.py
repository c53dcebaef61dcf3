"""
Speed measurements for `nanoplay bench`: prefill and decode tokens/s of the shared sampler at each
weight precision, the same weights through transformers' `generate()` (in this process), llama.cpp and
CTranslate2 (each in a process of its own, `Isolated`), the memory-bandwidth bound, and what a lower
precision costs in quality.

Machines are noisy, so each number is the best of several alternating repeats (ours, theirs, ours, ...)
and only ratios measured side by side in one run are quoted.
"""

from __future__ import annotations

import copy
import ctypes
import dataclasses
import functools
import importlib
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .cpu_decode import decode_thread_count, huge_page_memory, use_decode_layout
from .cpu_kernel import bf16_pairs, kernel_status, stream_sum, why_not_compiled
from .engine import Engine
from .errors import NanoplayError
from .loading import LoadedModel
from .model import GPT, GPTConfig
from .precision import PRECISION_NAMES, quantize_int8
from .sampling import SamplingParams

SHAPES = {
    "owt-30m": GPTConfig(n_layer=6, n_head=6, n_embd=384, block_size=512, vocab_size=50304),
    "gpt2-124m": GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257),
    "gpt2-medium": GPTConfig(n_layer=24, n_head=16, n_embd=1024, block_size=1024, vocab_size=50257),
    "gpt2-large": GPTConfig(n_layer=36, n_head=20, n_embd=1280, block_size=1024, vocab_size=50257),
}
# llama.cpp's type for each of ours: F16 is its 16-bit type (the writer has no BF16), Q8_0 its 8-bit one
LLAMA_CPP_TYPES = {torch.float32: "f32", torch.bfloat16: "f16", torch.float16: "f16", torch.int8: "q8_0"}
QUALITY_TOKENS = 1000


def random_model(shape: str, seed: int = 0) -> LoadedModel:
    """A float32 model of a named shape with random weights: the speed does not depend on the values."""
    torch.manual_seed(seed)
    model = GPT(SHAPES[shape]).eval()
    return LoadedModel(name=f"{shape} (random weights)", model=model, source="random", location=shape)


def at_precision(loaded: LoadedModel, dtype: torch.dtype) -> LoadedModel:
    """A float32 model's copy at `dtype`, prepared for decoding as Engine.load prepares the models it loads."""
    model = copy.deepcopy(loaded.model)
    if dtype == torch.int8:
        quantize_int8(model)
    else:
        model.to(dtype)
    if next(model.parameters()).device.type == "cpu":
        use_decode_layout(model, compiled=why_not_compiled(model) is None)
    return LoadedModel(name=loaded.name, model=model, source=loaded.source, location=loaded.location)


def timed(fn, device: torch.device) -> float:
    """Seconds `fn()` takes, including the GPU work it queued."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t


def measure_bandwidth(device: torch.device, size_bytes: int, repeats: int = 5) -> float:
    """
    Bytes/s of a streaming read (a sum over `size_bytes`), best of `repeats`, with torch's current
    threads -- the threads that decode. bench reads as many bytes as a decode step's weights, again and
    again as decoding does, so a model that fits in the last-level cache gets that cache's rate (a 30M
    model's 120 MB float32 weights fit in an Intel Xeon's 300 MB L3, and decoded at 1.2-1.4x a 256 MB
    read's rate); it calls it in every round and keeps the best. On a CPU the bytes lie in huge pages,
    as the step's weights do (cpu_decode.huge_page_memory), and the compiled step's library reads them
    as its products read their weights (cpu_kernel.stream_sum, lines prefetched ahead; torch's sum where
    it does not load, which on an Intel Xeon read 495 MB at 22 GB/s while the step streamed them at 25).
    """
    count = max(1, size_bytes // 4)
    if torch.device(device).type == "cpu":  # the weights' pages, read as the step reads them
        x = huge_page_memory(count * 4).view(torch.float32).fill_(1.0)
        read = x.sum if kernel_status() else functools.partial(stream_sum, x, decode_thread_count())
    else:
        x = torch.ones(count, device=device)
        read = x.sum
    read()  # fault the pages in before timing
    return size_bytes / min(timed(read, device) for _ in range(repeats))


def weight_bytes(model: LoadedModel) -> int:
    """
    Bytes a batch-1 decode step reads: every weight of the blocks and the head, biases and norms
    included, each tensor once (a tied head and embedding are one). Of the embedding tables a step
    reads one row, so an untied or int8-headed model's tables are not counted.
    """
    m = model.model
    tensors = {t.data_ptr(): t for mod in (*m.transformer.h, m.transformer.ln_f, m.lm_head)
               for t in (*mod.parameters(), *mod.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def to_transformers(loaded: LoadedModel):
    """The same weights in transformers' GPT2LMHeadModel (via our export mapping, in memory)."""
    from transformers import GPT2LMHeadModel

    from .export import export_hf, transformers_quiet

    with tempfile.TemporaryDirectory() as tmp, transformers_quiet():
        export_hf(loaded.model, tmp)
        hf = GPT2LMHeadModel.from_pretrained(tmp, dtype=loaded.dtype)
    return hf.eval().to(loaded.device)


def available(module: str) -> bool:
    """Whether an optional engine's module (llama_cpp, ctranslate2: the bench extra) imports here."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


# llama.cpp's 4-bit types, which `--vs llama.cpp:TYPE` adds: made from the F32 file by llama.cpp's own
# quantizer, with its own fallbacks (Q4_K needs rows of whole 256-value blocks; narrower ones take Q5_0)
LLAMA_CPP_QUANTIZED = {"q4_0": "MOSTLY_Q4_0", "q4_k_m": "MOSTLY_Q4_K_M"}


class LlamaCpp:
    """
    A GGUF file in llama.cpp (through llama-cpp-python): file_type is the file's ("f32", "f16", "q8_0"),
    or one of LLAMA_CPP_QUANTIZED, which llama.cpp's quantizer then makes from the (F32) file first.
    """

    # how Isolated tells to rebuild it when it dies by SIGILL: for this CPU, without AMX (seen in a VM)
    REBUILD = (""": CMAKE_ARGS="-DGGML_NATIVE=ON -DCMAKE_C_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16' """
               """-DCMAKE_CXX_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16'" pip install --force-reinstall """
               "--no-deps --no-cache-dir llama-cpp-python")

    @staticmethod
    def label_of(file_type: str) -> str:
        return f"llama.cpp {file_type.upper()}"

    def __init__(self, path: Path, file_type: str, threads: int, n_ctx: int):
        import llama_cpp

        llama_cpp.llama_log_set(_quiet_llama_log(), None)  # its loader and quantizer print pages to stderr
        self.label = self.label_of(file_type)
        if file_type in LLAMA_CPP_QUANTIZED:
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_{LLAMA_CPP_QUANTIZED[file_type]}")
            params.nthread = threads
            source, path = path, path.with_name(f"{path.stem}-{file_type}.gguf")
            if llama_cpp.llama_model_quantize(str(source).encode(), str(path).encode(), ctypes.byref(params)) != 0:
                raise RuntimeError(f"llama.cpp could not quantize {source} to {file_type.upper()}")
        self.path = path  # the GGUF file timed
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                                   n_batch=n_ctx, verbose=False)

    def bench(self, batch: int, prompt_tokens: int, new_tokens: int) -> "Result | None":
        """Greedy decoding of one sequence (llama-cpp-python's Llama holds one); None for a larger batch."""
        import llama_cpp
        import numpy as np

        if batch != 1:
            return None
        llm = self.llm
        vocab = llm.n_vocab()

        def greedy() -> int:  # the argmax of the last token's logits (Llama.scores holds them only with logits_all)
            return int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,))))

        prompt = _prompts(1, prompt_tokens)[0]
        llm.reset()
        t = time.perf_counter()
        llm.eval(prompt)
        token = greedy()
        start = time.perf_counter()
        for _ in range(new_tokens - 1):
            llm.eval([token])
            token = greedy()
        end = time.perf_counter()
        return Result(self.label, 1, prompt_tokens / (start - t), (new_tokens - 1) / (end - start))

    def close(self) -> None:
        self.llm.close()


@functools.cache
def _quiet_llama_log():
    """A llama.cpp log callback that drops every message, kept alive here: llama.cpp holds a pointer to it."""
    import llama_cpp

    return llama_cpp.llama_log_callback(lambda level, text, user_data: None)


# CTranslate2's CPU compute types for ours: it has no 16-bit products on a CPU
CTRANSLATE2_TYPES = {torch.float32: "float32", torch.int8: "int8"}


class CTranslate2:
    """
    A transformers GPT-2 directory (our export) in CTranslate2, converted by its own converter into a
    folder beside it, at compute type "float32" or "int8" (its own int8: weights and activations). A
    padded vocabulary's placeholder tokens are saved into the directory's tokenizer.
    """

    @staticmethod
    def label_of(compute_type: str) -> str:
        return f"CTranslate2 {compute_type}"

    def __init__(self, hf_dir: Path, compute_type: str, threads: int):
        import ctranslate2
        from ctranslate2.converters import TransformersConverter
        from transformers import AutoConfig, AutoTokenizer

        from .export import transformers_quiet

        self.label = self.label_of(compute_type)
        ct2_dir = hf_dir.with_name(f"{hf_dir.name}-ctranslate2-{compute_type}")
        with transformers_quiet():
            # CTranslate2 wants one vocabulary entry per embedding row: a padded vocabulary (50304 rows
            # for GPT-2's 50257 tokens) gets placeholder tokens, never fed
            tokenizer = AutoTokenizer.from_pretrained(hf_dir)
            padding = AutoConfig.from_pretrained(hf_dir).vocab_size - len(tokenizer)
            if padding > 0:
                tokenizer.add_tokens([f"<|padding {i}|>" for i in range(padding)], special_tokens=True)
                tokenizer.save_pretrained(hf_dir)
            TransformersConverter(str(hf_dir)).convert(str(ct2_dir), quantization=compute_type, force=True)
        self.tokens = tokenizer.convert_ids_to_tokens  # CTranslate2 takes token strings
        self.generator = ctranslate2.Generator(str(ct2_dir), device="cpu", compute_type=compute_type,
                                               intra_threads=threads, inter_threads=1)

    def bench(self, batch: int, prompt_tokens: int, new_tokens: int) -> "Result":
        """Greedy decoding of `batch` prompts in one generate_batch call, timed as bench_transformers is."""
        prompts = [self.tokens(p) for p in _prompts(batch, prompt_tokens)]

        def generate(n: int):
            self.generator.generate_batch(prompts, max_length=n, min_length=n, sampling_topk=1, end_token=[],
                                          include_prompt_in_result=False)

        one = timed(lambda: generate(1), torch.device("cpu"))
        full = timed(lambda: generate(new_tokens), torch.device("cpu"))
        return Result(self.label, batch, batch * prompt_tokens / one, batch * (new_tokens - 1) / (full - one))

    def close(self) -> None:
        del self.generator


class Isolated:
    """
    Another library's engine (LlamaCpp, CTranslate2) in a process of its own, built there as
    engine_class(*args) and driven from here: `bench` and `close` as the engine's.

    Why: in one process they slow each other down. Once CTranslate2 had generated, llama.cpp in the same
    process decoded at less than half its speed for the rest of the process (30M shape, F32, 2 threads:
    179 tok/s, then 78), so a table from one process would be unfair to whoever runs after it.

    An engine that fails, raising or taking its process down (llama.cpp's AMX products died by SIGILL
    in a virtual machine whose CPU lists AMX), never stops the benchmark: from then on `bench` gives
    None, and `failure` says what happened in one line.
    """

    def __init__(self, label: str, engine_class, *args):
        import multiprocessing

        self.label = label
        self.failure: str | None = None
        self._rebuild = getattr(engine_class, "REBUILD", "")  # how to build the engine for this CPU
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no library state is inherited
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(child, engine_class, args), daemon=True)
        self._process.start()
        child.close()
        self._receive()  # built, or failed

    def _receive(self):
        try:
            status, value = self._conn.recv()
        except EOFError:
            self._process.join()
            status, value = "error", self._death()
        if status == "error":
            self.failure = f"{self.label}: {value}"
            return None
        return value

    def _death(self) -> str:
        """Why the process ended without a word: the signal that killed it, or its exit code."""
        import signal

        code = self._process.exitcode
        if code is None or code >= 0:
            return f"its process exited with code {code}"
        name = signal.Signals(-code).name if -code in signal.valid_signals() else f"signal {-code}"
        why = f"its process was killed by {name}"
        if -code == signal.SIGILL:
            why += (" (an instruction this CPU does not run: a build for another CPU, or one using AMX where a "
                    "virtual machine lists it but does not enable it): reinstall it built for this machine"
                    + self._rebuild)
        return why

    def bench(self, batch: int, prompt_tokens: int, new_tokens: int) -> "Result | None":
        if self.failure:
            return None
        self._conn.send((batch, prompt_tokens, new_tokens))
        return self._receive()

    def close(self) -> None:
        if self._process.is_alive():
            if not self.failure:  # a failed engine's process is ending of its own accord
                self._conn.send(None)
            self._process.join(timeout=10)
            if self._process.is_alive():  # still inside a bench (the parent was interrupted): stop it
                self._process.kill()
                self._process.join()
        self._conn.close()


def _serve(conn, engine_class, args) -> None:
    """The child process of Isolated: build the engine, then answer bench requests until None."""
    try:
        engine = engine_class(*args)
        conn.send(("ok", None))
        while (request := conn.recv()) is not None:
            conn.send(("ok", engine.bench(*request)))
        engine.close()
    except Exception as e:  # the parent reports it, with the engine's label
        conn.send(("error", f"{type(e).__name__}: {e}"))
    finally:
        conn.close()


@dataclass
class Result:
    label: str
    batch: int
    prefill_tok_s: float
    decode_tok_s: float  # aggregate over the batch


def _prompts(batch: int, prompt_tokens: int) -> list[list[int]]:
    return [[(1000 + 17 * b + i) % 50000 for i in range(prompt_tokens)] for b in range(batch)]


def bench_ours(engine: Engine, model: LoadedModel, batch: int, prompt_tokens: int, new_tokens: int,
               label: str = "nanoplay") -> Result:
    """Greedy decoding of `batch` different prompts at once; decode speed from first to last token."""
    prompts = _prompts(batch, prompt_tokens)
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0, stop_on_eot=False, top_logprobs=5)
    t = time.perf_counter()
    first = engine.generate(model, prompts[0] + [7], SamplingParams(max_new_tokens=1, temperature=0),
                            eot_prefix=False)
    prefill = (prompt_tokens + 1) / (first.first_token_at - t)
    requests = [engine.submit(model, p, params, eot_prefix=False) for p in prompts]
    engine.run_until_done(requests)
    start = max(r.first_token_at for r in requests)  # all prefilled: from here on every step is batched
    end = max(r.finished_at for r in requests)
    decoded = sum(len(r.tokens) for r in requests) - batch
    return Result(label, batch, prefill, decoded / (end - start))


@torch.inference_mode()
def bench_transformers(hf, batch: int, prompt_tokens: int, new_tokens: int, device) -> Result:
    prompts = torch.tensor(_prompts(batch, prompt_tokens), device=device)
    common = dict(do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(prompts))
    one = timed(lambda: hf.generate(prompts, max_new_tokens=1, **common), prompts.device)
    full = timed(lambda: hf.generate(prompts, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **common),
                 prompts.device)
    return Result("transformers", batch, batch * prompt_tokens / one, batch * (new_tokens - 1) / (full - one))


def quality_text_ids(tokens: int = QUALITY_TOKENS) -> list[int]:
    """The last `tokens` + 1 tokens of the bundled corpus (Python's pydoc topics, which `train --preset
    demo` trains on; its validation share is at the end), each document after <|endoftext|>."""
    from pydoc_data.topics import topics

    from .tokenizer import get_tokenizer

    tokenizer = get_tokenizer()
    ids: list[int] = []
    for key in reversed(sorted(topics)):
        ids[:0] = [tokenizer.eot_id, *tokenizer.encode(topics[key])]
        if len(ids) > tokens:
            return ids[-(tokens + 1):]
    return ids


@torch.inference_mode()
def quality(reference: LoadedModel, model: LoadedModel, ids: list[int]) -> dict:
    """
    What a precision costs, on the text `ids`: each model's mean loss (nats/token) predicting every
    token from the ones before it (windows of half a context, each position predicted once with at
    least half a context before it), and how often its most likely next token is the reference's.
    """
    block = reference.config.block_size
    stride = max(1, block // 2)
    losses = {"reference": [], "model": []}
    agree, total, first = 0, 0, 1
    begin = 0
    while first < len(ids):
        end = min(begin + block, len(ids))
        window = torch.tensor([ids[begin:end]], device=reference.device)
        targets = torch.tensor(ids[first:end], device=reference.device)
        tops = []
        for key, m in (("reference", reference), ("model", model)):
            logits = m.model(window)[0, first - 1 - begin:end - 1 - begin].float()  # predictions of ids[first:end]
            losses[key].append(torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item())
            tops.append(logits.argmax(-1))
        agree += int((tops[0] == tops[1]).sum())
        total += end - first
        first, begin = end, begin + stride
    return {"tokens": total, "reference_loss": sum(losses["reference"]) / total,
            "loss": sum(losses["model"]) / total, "argmax_agreement": agree / total}


def run_bench(variants: dict[torch.dtype, LoadedModel], batches=(1, 4), prompt_tokens: int = 128,
              new_tokens: int = 128, vs_transformers: bool = False, vs_llama_cpp: bool = False,
              llama_cpp_types: tuple[str, ...] = (), vs_ctranslate2: bool = False, repeats: int = 3,
              reference: LoadedModel | None = None) -> dict[torch.dtype, dict]:
    """
    Alternating rounds of every engine at every precision, so that every ratio is measured side by
    side: `variants` maps each dtype (torch.int8 for int8 weights) to the model prepared for decoding
    at it; `reference`, the float32 model, is what llama.cpp and CTranslate2 convert and what a lower
    precision's quality is measured against. llama.cpp runs at the type matching each dtype with
    `vs_llama_cpp`, and at each of `llama_cpp_types` (LLAMA_CPP_QUANTIZED) once, shown in every
    dtype's report; CTranslate2 runs at fp32 and int8. Returns a report per dtype.
    """
    first = next(iter(variants.values()))
    source = reference or first
    engines = {"nanoplay": Engine()}
    if first.device.type == "cuda":  # what the CUDA graphs buy: the same engine with ordinary eager steps
        engines["nanoplay, eager steps"] = Engine(static_decode=False)
    threads = torch.get_num_threads()
    # per dtype (None: shown with every dtype), every contender: a function of (batch, new tokens) giving a
    # Result, or None where it cannot run that batch
    contenders: dict[torch.dtype | None, list] = {}
    # llama.cpp and CTranslate2, each in a process of its own (Isolated) reading files written here
    files = tempfile.TemporaryDirectory()
    folder = Path(files.name)
    isolated: dict[torch.dtype | None, list[Isolated]] = {}  # by the dtype whose table shows them (None: all)

    def other(dtype: torch.dtype | None, label: str, engine_class, *args):
        engine = Isolated(label, engine_class, *args)
        isolated.setdefault(dtype, []).append(engine)
        return lambda b, n: engine.bench(b, prompt_tokens, n)

    def gguf(file_type: str) -> Path:
        from .gguf_format import write_gguf

        path = folder / f"model-{file_type}.gguf"
        return path if path.exists() else write_gguf(source.model, path, file_type)

    def hf_export() -> Path:
        from .export import export_hf, transformers_quiet

        path = folder / "hf"
        if not path.exists():
            with transformers_quiet():
                export_hf(source.model, path)
        return path

    try:
        for dtype, model in variants.items():
            runs = [lambda b, n, e=engine, m=model, label=label: bench_ours(e, m, b, prompt_tokens, n, label)
                    for label, engine in engines.items()]
            if vs_transformers and dtype != torch.int8:
                hf = to_transformers(model)
                runs.append(lambda b, n, hf=hf, m=model: bench_transformers(hf, b, prompt_tokens, n, m.device))
            if vs_llama_cpp:
                file_type = LLAMA_CPP_TYPES[dtype]
                runs.append(other(dtype, LlamaCpp.label_of(file_type), LlamaCpp, gguf(file_type), file_type,
                                  threads, model.config.block_size))
            if vs_ctranslate2 and dtype in CTRANSLATE2_TYPES:
                compute_type = CTRANSLATE2_TYPES[dtype]
                runs.append(other(dtype, CTranslate2.label_of(compute_type), CTranslate2, hf_export(),
                                  compute_type, threads))
            contenders[dtype] = runs
        for file_type in llama_cpp_types:  # quantized from the F32 file
            contenders.setdefault(None, []).append(
                other(None, LlamaCpp.label_of(file_type), LlamaCpp, gguf("f32"), file_type, threads,
                      source.config.block_size))
        for runs in contenders.values():  # warm up: allocate the caches, touch the weights, capture graphs
            for run in runs:
                for b in batches:
                    run(b, 8)
        best: dict[torch.dtype | None, dict[tuple[str, int], Result]] = {dtype: {} for dtype in contenders}
        bandwidth: dict[torch.dtype, float] = {}  # of a read as large as each precision's weights
        for _ in range(repeats):
            for b in batches:
                for dtype, runs in contenders.items():
                    for r in filter(None, (run(b, new_tokens) for run in runs)):
                        key = (r.label, b)
                        if key not in best[dtype] or r.decode_tok_s > best[dtype][key].decode_tok_s:
                            best[dtype][key] = r
            for dtype, model in variants.items():
                bandwidth[dtype] = max(bandwidth.get(dtype, 0.0), measure_bandwidth(model.device, weight_bytes(model)))
    finally:
        for engine in (e for engines in isolated.values() for e in engines):
            engine.close()
        files.cleanup()
    reports = {}
    for dtype, model in variants.items():
        report = reports[dtype] = {
            "results": {**best[dtype], **best.get(None, {})}, "bandwidth": bandwidth.get(dtype, 0.0),
            "weight_bytes": weight_bytes(model), "threads": threads, "bandwidth_reads": repeats * 5,
            "precision": PRECISION_NAMES[dtype], "params": source.num_params,
            "llama_cpp": f"llama.cpp {LLAMA_CPP_TYPES[dtype].upper()}" if vs_llama_cpp else None,
            "other_precisions": {label for label, _ in best.get(None, {})}, "decode": decode_path(model),
            "failures": [e.failure for e in isolated.get(dtype, []) + isolated.get(None, []) if e.failure]}
        if reference is not None and dtype != torch.float32:
            report["quality"] = quality(reference, model, quality_text_ids())
    return reports


def decode_path(loaded: LoadedModel) -> str:
    """How the engine decodes this model: "compiled step" (for bf16, whether in bf16 pair products or
    widening to float32: cpu_kernel.bf16_pairs), or "torch" and why (a CPU without a compiler, say)."""
    if loaded.device.type != "cpu":
        return "CUDA graphs" if loaded.device.type == "cuda" else "torch"
    why = why_not_compiled(loaded.model)
    if why is not None:
        return f"torch ({why})"
    if loaded.weights_dtype == torch.bfloat16:
        return "compiled step, " + ("bf16 pair products" if bf16_pairs() else "bf16 widened to float32")
    return "compiled step"


def truncated_draft(loaded: LoadedModel, n_layer: int) -> LoadedModel:
    """The model's first n_layer blocks with its own embeddings, final LayerNorm and head (shared, not
    copied): a draft that agrees with the model more often than an unrelated one of the same size."""
    if not 1 <= n_layer < loaded.config.n_layer:
        raise ValueError(f"a truncated draft keeps 1 to {loaded.config.n_layer - 1} of the model's layers")
    model = loaded.model
    draft = copy.copy(model)  # shallow: the modules, and so the weights, are the model's own
    draft._modules = dict(model._modules)  # ... but in dicts of its own, so the model stays whole
    draft.transformer = torch.nn.ModuleDict(dict(model.transformer.items()))
    draft.transformer.h = torch.nn.ModuleList(list(model.transformer.h[:n_layer]))
    draft.config = dataclasses.replace(loaded.config, n_layer=n_layer)
    return LoadedModel(name=f"{loaded.name}, first {n_layer} layers", model=draft, source=loaded.source,
                       location=loaded.location)


def bench_draft(model: LoadedModel, draft: LoadedModel, new_tokens: int = 128, draft_tokens: int = 4,
                repeats: int = 3, temperature: float = 0.0) -> dict:
    """
    Decode tok/s of `model` alone and with `draft` proposing `draft_tokens` per step (speculative.py),
    in alternating rounds from the same prompt (the bundled corpus's text, so a trained draft meets
    text like its training data); the best round of each, the speed-up, and the share of proposed
    tokens accepted. Both runs give the same tokens: that is checked, not assumed.
    """
    engine = Engine()
    prompt = quality_text_ids(min(64, model.config.block_size // 4))
    params = SamplingParams(max_new_tokens=new_tokens, temperature=temperature, seed=0, stop_on_eot=False)

    def run(with_draft: bool):
        request = engine.submit(model, prompt, params, eot_prefix=False, draft=draft if with_draft else None,
                                draft_tokens=draft_tokens)
        engine.run_until_done([request])
        return request

    run(False), run(True)  # warm up both models and their caches
    best = {False: 0.0, True: 0.0}
    for _ in range(repeats):
        runs = {with_draft: run(with_draft) for with_draft in (False, True)}
        if [t.id for t in runs[True].tokens] != [t.id for t in runs[False].tokens]:
            raise RuntimeError("speculative decoding changed the tokens: a bug, please report it")
        for with_draft, r in runs.items():
            best[with_draft] = max(best[with_draft], r.tokens_per_second or 0.0)
    speculative = runs[True]
    return {"model": model.name, "draft": draft.name, "draft_tokens": draft_tokens, "temperature": temperature,
            "plain_tok_s": best[False], "draft_tok_s": best[True], "speedup": best[True] / best[False],
            "acceptance": speculative.draft_accepted / max(1, speculative.draft_proposed),
            "tokens": len(speculative.tokens)}
