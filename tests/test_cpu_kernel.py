"""The compiled CPU decode step (nanoplay/kernels/decode_step.c) against torch's forward of the same model."""

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import nanoplay.cpu_kernel as cpu_kernel
from nanoplay.cpu_decode import HUGE_PAGE, keep_freed_memory, use_decode_layout
from nanoplay.cpu_kernel import KernelDecoder, kernel_status, packed_weights, why_not_compiled
from nanoplay.engine import Engine
from nanoplay.errors import NanoplayError
from nanoplay.kvcache import KVCache
from nanoplay.loading import LoadedModel
from nanoplay.precision import INT8_WIDTH_MULTIPLE, Int8Linear, quantize_int8
from nanoplay.sampling import SamplingParams
from nanoplay.speculative import MAX_DRAFT_TOKENS
from tests.conftest import tiny_model

pytestmark = pytest.mark.skipif(bool(kernel_status()), reason=kernel_status() or "")

# odd widths (45, 99: bf16 pairs pad the inputs; heads of 15 end in a tail one by one), and every option
# of the maths the step reads from the config
CONFIGS = {
    "gpt2": dict(),
    "odd widths, exact gelu, no bias, untied": dict(n_embd=45, n_head=3, activation="gelu", bias=False,
                                                    tie_word_embeddings=False, n_inner=99),
    "relu, unscaled, inverse layer scale": dict(activation="relu", scale_attn_weights=False,
                                                scale_attn_by_inverse_layer_idx=True, layer_norm_epsilon=1e-3),
    "silu": dict(activation="silu", n_layer=3),
    "quick_gelu": dict(activation="quick_gelu"),
}


def prefill(model, cache, slot, ids):
    cache.bind_prefill(slot, 0, len(ids))
    model(torch.tensor([ids]), positions=torch.arange(len(ids)).unsqueeze(0), cache=cache)


def full_forward(model, seqs):
    """Each sequence's last logits from a forward of the whole sequence, in float64 (the reference)."""
    double = copy.deepcopy(model).double()
    with torch.no_grad():
        return torch.stack([double(torch.tensor([s]))[0, -1] for s in seqs]).float()


@pytest.mark.parametrize("overrides", CONFIGS.values(), ids=CONFIGS.keys())
@torch.no_grad()
def test_step_matches_full_forward_with_mixed_lengths_and_slots(overrides):
    model = tiny_model(**overrides)
    cache = KVCache(model.config, slots=4, device="cpu", dtype=torch.float32)
    seqs = {0: [5, 6, 7], 2: list(range(100, 117)), 3: [42]}  # slot 1 empty: rows that are not slots 0..B-1
    for slot, ids in seqs.items():
        prefill(model, cache, slot, ids)
    step = KernelDecoder(model, cache)
    gen = torch.Generator().manual_seed(0)
    for _ in range(12):
        slots = sorted(seqs)
        new = [int(torch.randint(0, 50257, (1,), generator=gen)) for _ in slots]
        logits = step.decode(slots, new, [len(seqs[s]) for s in slots], threads=2)
        for s, token in zip(slots, new):
            seqs[s].append(token)
        torch.testing.assert_close(logits, full_forward(model, [seqs[s] for s in slots]), atol=2e-5, rtol=1e-5)


@torch.no_grad()
def test_step_writes_the_keys_and_values_torchs_step_writes():
    """torch takes over a cache the step wrote (prefill after a cached prefix, a speculative check)."""
    model = tiny_model()
    ours, theirs = (KVCache(model.config, slots=2, device="cpu", dtype=torch.float32) for _ in range(2))
    for cache in (ours, theirs):
        prefill(model, cache, 1, [10, 11, 12, 13])
    KernelDecoder(model, ours).decode([1], [14], [4], threads=2)
    theirs.bind_decode([1], [4])
    model(torch.tensor([[14]]), positions=torch.tensor([[4]]), cache=theirs)
    for layer in range(model.config.n_layer):
        torch.testing.assert_close(ours.k[layer], theirs.k[layer], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(ours.v[layer], theirs.v[layer], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
@torch.no_grad()
def test_a_rows_logits_do_not_depend_on_its_batch(dtype):
    """Bit for bit: the same summation order alone and batched, so a request decodes the same either way."""
    # 6 rows: the products take a block of 4 and one of 2. Odd widths (45; an MLP 99 wide) for bf16 pairs'
    # padding and the activation's one-by-one tail; int8's 80 (torch's int8 kernel needs multiples of 16)
    model = tiny_model(n_embd=80 if dtype == torch.int8 else 45, n_head=2 if dtype == torch.int8 else 3,
                       n_inner=None if dtype == torch.int8 else 99)
    if dtype == torch.int8:
        quantize_int8(model)
    else:
        model.to(dtype)
    rows = 6
    cache_dtype = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
    cache = KVCache(model.config, slots=rows, device="cpu", dtype=cache_dtype)
    for slot in range(rows):
        prefill(model, cache, slot, [7 + slot, 8, 9])
    before = [(k.clone(), v.clone()) for k, v in zip(cache.k, cache.v)]
    step = KernelDecoder(model, cache)
    batched = step.decode(list(range(rows)), [20 + slot for slot in range(rows)], [3] * rows, threads=2)
    for slot in range(rows):
        for (k, v), (k0, v0) in zip(zip(cache.k, cache.v), before):  # back to before the step
            k.copy_(k0), v.copy_(v0)
        alone = step.decode([slot], [20 + slot], [3], threads=1 + slot % 2)
        assert torch.equal(alone[0], batched[slot])


@torch.no_grad()
def test_int8_step_computes_what_torchs_int8_product_does():
    """bf16 inputs and bf16 results around float32 sums, as torch's int8 kernel (precision.py): so gen,
    score and a machine without a compiler give the same int8 numbers, up to a rare bf16 rounding flip."""
    model = tiny_model(n_embd=48, n_head=2)  # 48: a width torch's int8 kernel reads (INT8_WIDTH_MULTIPLE)
    quantize_int8(model)
    ids = [3, 1, 4, 1, 5, 9, 2, 6]
    cache = KVCache(model.config, slots=1, device="cpu", dtype=torch.float32)
    prefill(model, cache, 0, ids[:-1])
    logits = KernelDecoder(model, cache).decode([0], [ids[-1]], [len(ids) - 1], threads=2)
    expected = model(torch.tensor([ids]))[:, -1]
    torch.testing.assert_close(logits, expected, atol=5e-3, rtol=0)
    assert ((logits - expected).abs() > 1e-5).float().mean() < 1e-3
    # against float32 activations, the dequantized weights give logits visibly apart: the rounding is there
    reference = tiny_model(n_embd=48, n_head=2)
    for module, ref in zip(model.modules(), reference.modules()):
        if isinstance(module, Int8Linear):
            ref.weight = torch.nn.Parameter(module.dequantized())
    assert (logits - full_forward(reference, [ids])).abs().max() > 1e-4


@pytest.mark.parametrize("n_embd", [36, 72])  # 72: a multiple of 8 that torch's kernel misread on an AVX-512 Xeon
def test_int8_refuses_widths_torchs_kernel_cannot_read(n_embd):
    with pytest.raises(NanoplayError, match=f"multiples of 16 .* {n_embd}: give --dtype fp32 or bf16"):
        quantize_int8(tiny_model(n_embd=n_embd, n_head=3))


@pytest.mark.parametrize("rows", [1, 3])  # 4 rows or more crashed where 1 to 3 gave NaN: never asked here
def test_torchs_int8_kernel_reads_every_width_int8_admits(rows):
    """torch's int8 product against float32 maths at every width quantize_int8 admits up to 400 (on an
    AVX-512 CPU, widths of 8 times an odd number gave NaN or products off by orders of magnitude)."""
    torch.manual_seed(0)
    for width in range(8, 401, 8):
        if width % INT8_WIDTH_MULTIPLE:
            continue
        x = torch.randn(rows, width).bfloat16()
        weight = torch.randint(-127, 128, (24, width), dtype=torch.int8)
        scales = torch.rand(24).bfloat16()
        expected = (x.float() @ weight.float().T) * scales.float()
        torch.testing.assert_close(torch._weight_int8pack_mm(x, weight, scales).float(), expected,
                                   rtol=2e-2, atol=2e-2 * expected.abs().max().item(), msg=f"width {width}")


@torch.no_grad()
def test_bf16_step_reads_bf16_weights_and_cache():
    """bf16 weights read exactly, float32 sums, keys and values rounded to bf16 as torch stores them."""
    model = tiny_model().to(torch.bfloat16)
    reference = copy.deepcopy(model).float()  # the same (bf16) values, computed in float32
    ids = list(range(200, 210))
    cache = KVCache(model.config, slots=1, device="cpu", dtype=torch.bfloat16)
    prefill(model, cache, 0, ids[:-1])
    logits = KernelDecoder(model, cache).decode([0], [ids[-1]], [len(ids) - 1], threads=2)
    expected = full_forward(reference, [ids])
    # the cached keys and values were rounded to bf16 (by torch's bf16 prefill): a few bf16 ulps of the logits
    torch.testing.assert_close(logits, expected, atol=0.05, rtol=0.02)
    assert torch.equal(logits.argmax(-1), expected.argmax(-1))


@torch.no_grad()
def test_bf16_step_rounds_the_products_inputs_where_the_cpu_multiplies_bf16_pairs():
    """With avx512_bf16 the step multiplies bf16 weights by inputs rounded to bf16 (as torch's bf16
    products do); elsewhere it widens the weights and keeps float32 inputs (cpu_kernel.bf16_pairs says
    which). Against float64 forwards of
    the same bf16 values with and without that rounding, one token at position 0 in a float32 cache
    (so nothing else is rounded), the step is far closer to the one its CPU should compute."""
    model = tiny_model(n_embd=93, n_head=3).to(torch.bfloat16)  # 93: odd, the pairs' inputs padded with a zero
    plain = copy.deepcopy(model).double()
    rounding = copy.deepcopy(plain)
    for module in rounding.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_pre_hook(lambda _, inputs: (inputs[0].bfloat16().double(),))
    cache = KVCache(model.config, slots=1, device="cpu", dtype=torch.float32)
    logits = KernelDecoder(model, cache).decode([0], [1234], [0], threads=2)[0].double()
    error = {name: (logits - reference(torch.tensor([[1234]]))[0, -1]).abs().mean().item()
             for name, reference in (("rounded", rounding), ("float32", plain))}
    expected = "rounded" if cpu_kernel.bf16_pairs() else "float32"
    other = "float32" if expected == "rounded" else "rounded"
    assert error[expected] < error[other] / 5, error


@torch.no_grad()
def test_bf16_attention_scores_a_bf16_query_where_the_cpu_multiplies_bf16_pairs():
    """A bf16 KV cache holds keys and values rounded to bf16; with avx512_bf16 the step rounds the query
    too, as a bf16 model's query is in torch, and scores it in pair products. Two tokens through the step,
    against float64 forwards that round the products' inputs and the cached keys and values, with and
    without the query's rounding: the step is far closer to the one its CPU should compute."""
    model = tiny_model(n_embd=92, n_head=2).to(torch.bfloat16)  # heads of 46: a step of 32 and a tail of 14
    for block in model.transformer.h:  # sharper attention (x4, exact in bf16), where the query's rounding shows
        block.attn.c_attn.weight.mul_(4)
    pairs = cpu_kernel.bf16_pairs()
    references = {}
    for name, round_query in (("rounded", True), ("float32", False)):
        reference = copy.deepcopy(model).double()
        for module in reference.modules():
            if pairs and isinstance(module, torch.nn.Linear):  # the products' inputs, as the step rounds them
                module.register_forward_pre_hook(lambda _, inputs: (inputs[0].bfloat16().double(),))
        for block in reference.transformer.h:  # the cache's rounding, and the query's or not
            width = model.config.n_embd

            def round_qkv(_, __, qkv, round_query=round_query, width=width):
                rounded = qkv.bfloat16().double()
                return rounded if round_query else torch.cat([qkv[..., :width], rounded[..., width:]], dim=-1)

            block.attn.c_attn.register_forward_hook(round_qkv)
        references[name] = reference
    if not pairs:  # the step keeps the query in float32
        references = {"rounded": references["float32"], "float32": references["rounded"]}
    cache = KVCache(model.config, slots=1, device="cpu", dtype=torch.bfloat16)
    step = KernelDecoder(model, cache)
    step.decode([0], [1234], [0], threads=2)
    logits = step.decode([0], [99], [1], threads=2)[0].double()
    error = {name: (logits - reference(torch.tensor([[1234, 99]]))[0, -1]).abs().mean().item()
             for name, reference in references.items()}
    assert error["rounded"] < error["float32"] / 5, error


def test_bf16_pairs_are_compiled_where_the_compiler_targets_them():
    """The pair products are the step's wherever `$CC -march=native` targets avx512_bf16 (the CPU has it
    and the compiler knows it), and nowhere else."""
    import os
    import shlex

    cc = shlex.split(os.environ.get("CC") or "cc")
    macros = subprocess.run([*cc, "-march=native", "-dM", "-E", "-"], input="", capture_output=True, text=True,
                            timeout=60).stdout
    assert cpu_kernel.bf16_pairs() == ("__AVX512BF16__" in macros)


def test_models_it_cannot_run_say_why_and_decode_in_torch():
    assert why_not_compiled(tiny_model()) is None
    assert "mish" in why_not_compiled(tiny_model(activation="mish"))
    assert why_not_compiled(tiny_model().half()) == "weights in float16"
    transposed = tiny_model()
    use_decode_layout(transposed, compiled=False)
    assert "layout" in why_not_compiled(transposed)
    hooked = tiny_model()
    hooked.transformer.h[0].mlp.register_forward_hook(lambda *_: None)  # someone reads the activations
    assert why_not_compiled(hooked) == "forward hooks on its modules"
    wrapped = tiny_model()
    wrapped.forward = lambda *args, **kwargs: None
    assert why_not_compiled(wrapped) == "a forward other than GPT's"
    engine = Engine()
    model = LoadedModel(name="mish", model=tiny_model(activation="mish"), source="test", location="memory")
    request = engine.generate(model, "Hello", SamplingParams(max_new_tokens=4, temperature=0))
    assert len(request.tokens) == 4 and not engine._runner(model).use_compiled_decode


@pytest.mark.parametrize("dtype", [torch.float32, torch.int8])
def test_engine_decodes_as_torch_does(dtype):
    """Sampled tokens equal and every per-token figure close, with and without the compiled step."""
    def generate(compiled):
        model = tiny_model()
        if dtype == torch.int8:
            quantize_int8(model)
        use_decode_layout(model, compiled=compiled)
        loaded = LoadedModel(name="tiny", model=model, source="test", location="memory")
        engine = Engine(compiled_decode=compiled)
        params = SamplingParams(max_new_tokens=30, temperature=0.9, seed=4, top_logprobs=3, stop_on_eot=False)
        requests = [engine.submit(loaded, prompt, params) for prompt in ("Hello", "A longer prompt than that")]
        engine.run_until_done(requests)
        assert engine._runner(loaded).use_compiled_decode == compiled
        return requests

    for ours, theirs in zip(generate(True), generate(False)):
        assert [t.id for t in ours.tokens] == [t.id for t in theirs.tokens]
        # int8: a bf16 rounding of a product's result may flip between the two (different summation orders)
        tolerance = 5e-3 if dtype == torch.int8 else 1e-4
        for a, b in zip(ours.tokens, theirs.tokens):
            if dtype == torch.float32:  # int8: near ties among the alternatives may swap with the rounding
                assert [x.id for x in a.top] == [x.id for x in b.top]
                # each path counts the rank on its own logits (~1e-8 apart), and a random model's unlikely
                # tokens lie ~1e-5 apart: a neighbour that close may change sides
                assert abs(a.rank - b.rank) <= 2
            assert a.logprob == pytest.approx(b.logprob, abs=tolerance)
            assert a.entropy == pytest.approx(b.entropy, abs=tolerance)


@torch.no_grad()
def test_packed_weights_are_made_once_in_huge_pages_and_again_when_a_weight_changes():
    """The step's packed copy: on a huge page boundary, one per weight whatever reads it (a model's own
    step and a draft's), packed again when the weight changes in place, and the model's own tensors
    untouched (torch's products read them)."""
    model = tiny_model()
    reference = copy.deepcopy(model)
    head = packed_weights(model.lm_head)
    assert head.data_ptr() % HUGE_PAGE == 0
    caches = [KVCache(model.config, slots=1, device="cpu", dtype=torch.float32) for _ in range(2)]
    first, second = (KernelDecoder(model, cache) for cache in caches)
    assert first.struct.lm_head.weight == second.struct.lm_head.weight == head.data_ptr()
    for a, b in zip(model.state_dict().values(), reference.state_dict().values()):
        assert torch.equal(a, b)
    model.lm_head.weight.mul_(2)  # the tied embedding too
    assert packed_weights(model.lm_head).data_ptr() != head.data_ptr()


def test_freed_memory_is_kept_for_reuse_on_glibc():
    import platform

    assert keep_freed_memory() == (platform.libc_ver()[0] == "glibc")


@pytest.mark.parametrize("env, says", [({"NANOPLAY_DECODE_KERNEL": "0"}, "NANOPLAY_DECODE_KERNEL=0"),
                                       ({"CC": "/nonexistent/cc"}, "no C compiler (/nonexistent/cc")])
def test_without_the_compiled_step_decoding_stays_in_torch(env, says, tmp_path):
    """No compiler, or switched off: one line says why, and the engine decodes in torch."""
    script = (
        "from nanoplay.cpu_kernel import kernel_status, why_not_compiled\n"
        "from nanoplay.engine import Engine\n"
        "from nanoplay.loading import LoadedModel\n"
        "from nanoplay.sampling import SamplingParams\n"
        "from tests.conftest import tiny_model\n"
        "model = LoadedModel(name='t', model=tiny_model(), source='test', location='memory')\n"
        "engine = Engine()\n"
        "r = engine.generate(model, 'Hi', SamplingParams(max_new_tokens=3, temperature=0))\n"
        "print(len(r.tokens), engine._runner(model).use_compiled_decode)\n"
        "print(kernel_status())\n"
    )
    import os

    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env, "XDG_CACHE_HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    counts, status = done.stdout.splitlines()
    assert counts == "3 False" and says in status and "\n" not in status


def test_the_library_is_compiled_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cpu_kernel._load.cache_clear()
    try:
        assert cpu_kernel.kernel_status() == ""
        built = list((tmp_path / "nanoplay" / "kernels").iterdir())
        assert len(built) == 1 and built[0].suffix == ".so"  # no partial file left beside it
        stamp = built[0].stat().st_mtime_ns
        cpu_kernel._load.cache_clear()
        assert cpu_kernel.kernel_status() == "" and built[0].stat().st_mtime_ns == stamp
    finally:
        cpu_kernel._load.cache_clear()


@pytest.mark.parametrize("damage", ["cache is a file", "foreign library", "empty file", "compiler with flags"])
def test_a_broken_cache_or_compiler_never_fails_a_command(damage, tmp_path, monkeypatch):
    """Whatever is wrong around the compiled step, models load and decode (in torch, or rebuilt)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    cpu_kernel._load.cache_clear()
    try:
        if damage == "cache is a file":
            cache.write_text("not a directory")
        elif damage == "compiler with flags":
            monkeypatch.setenv("CC", "cc -m64")
        else:
            assert cpu_kernel.kernel_status() == ""
            (built,) = (cache / "nanoplay" / "kernels").iterdir()
            built.unlink()  # a new file under the name: this process still maps the old one
            if damage == "foreign library":  # a real shared library without the step
                built.write_bytes(next(Path(torch.__file__).parent.joinpath("lib").glob("libgomp*")).read_bytes())
            else:
                built.write_bytes(b"")
            cpu_kernel._load.cache_clear()
        status = cpu_kernel.kernel_status()
        if damage == "cache is a file":
            assert status.startswith("the decode kernel") and str(cache) in status and "\n" not in status
        else:  # rebuilt in place, or compiled with the flags
            assert status == "" and (cache / "nanoplay" / "kernels").is_dir()
        model = LoadedModel(name="t", model=tiny_model(), source="test", location="memory")
        engine = Engine()
        request = engine.generate(model, "Hi", SamplingParams(max_new_tokens=3, temperature=0))
        assert len(request.tokens) == 3 and engine._runner(model).use_compiled_decode == (status == "")
    finally:
        cpu_kernel._load.cache_clear()


def test_a_failed_compile_names_the_compilers_error(tmp_path, monkeypatch):
    fake = tmp_path / "cc"
    fake.write_text('#!/bin/sh\n[ "$1" = --version ] && { echo "fakecc 1.0"; exit 0; }\n'
                    'echo "decode_step.c:9:1: error: no such thing" >&2\necho "    | ^" >&2\nexit 1\n')
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cpu_kernel._load.cache_clear()
    try:
        status = cpu_kernel.kernel_status()
        assert status.startswith("the decode kernel did not compile with") and "error: no such thing" in status
        assert list((tmp_path / "nanoplay" / "kernels").iterdir()) == []  # no partial library left
        assert why_not_compiled(tiny_model()) == status
    finally:
        cpu_kernel._load.cache_clear()


@torch.no_grad()
def test_tokens_of_one_sequence_in_one_call_are_a_causal_forward():
    """Rows of one slot at consecutive positions (a speculative check): each sees the ones before it, and
    gets the bits it gets fed one at a time."""
    model = tiny_model()
    together, apart = (KVCache(model.config, slots=2, device="cpu", dtype=torch.float32) for _ in range(2))
    for cache in (together, apart):
        prefill(model, cache, 1, [10, 11, 12])
    tokens = [13, 14, 15, 16, 17]  # 5 rows: a block of 4 and one more
    logits = KernelDecoder(model, together).decode([1] * 5, tokens, [3, 4, 5, 6, 7], threads=2)
    one_by_one = KernelDecoder(model, apart)
    for i, token in enumerate(tokens):
        assert torch.equal(logits[i], one_by_one.decode([1], [token], [3 + i], threads=2)[0])
    seqs = [[10, 11, 12] + tokens[:i + 1] for i in range(5)]
    torch.testing.assert_close(logits, full_forward(model, seqs), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("draft_tokens", [4, MAX_DRAFT_TOKENS])
def test_speculative_decoding_through_the_compiled_step_changes_no_bit(draft_tokens):
    """The check of k+1 tokens runs in the same step as plain decoding, row for row: the same figures exactly,
    for every k a request may ask (the most: 17 tokens checked at once)."""
    from nanoplay.bench import truncated_draft

    target = LoadedModel(name="target", model=tiny_model(seed=1, n_layer=3), source="test", location="memory")
    params = SamplingParams(max_new_tokens=20, seed=2, temperature=0.8, top_logprobs=3, stop_on_eot=False)
    plain = Engine().generate(target, "The cat sat on", params)
    engine = Engine()  # a fresh cache: the prompt's prefill the same forward as plain's
    speculative = engine.generate(target, "The cat sat on", params, draft=truncated_draft(target, 2),
                                  draft_tokens=draft_tokens)
    assert engine._runner(target).use_compiled_decode and speculative.draft_accepted > 0
    assert [(t.id, t.logprob, t.sampling_logprob, t.entropy, t.rank, t.top) for t in speculative.tokens] == \
        [(t.id, t.logprob, t.sampling_logprob, t.entropy, t.rank, t.top) for t in plain.tokens]


def test_hooks_added_after_the_first_request_take_the_step_back_to_torch():
    """A hook (or a wrapped forward) that comes after the runner exists still sees, and changes, every token."""
    def generate(engine, model):
        return [t.id for t in engine.generate(model, "Hi", SamplingParams(max_new_tokens=6, temperature=0)).tokens]

    model = LoadedModel(name="t", model=tiny_model(), source="test", location="memory")
    engine = Engine()
    generate(engine, model)
    calls = []
    mlp = model.model.transformer.h[1].mlp
    hook = mlp.register_forward_hook(lambda module, args, out: calls.append(1) or out * 0)
    hooked = generate(engine, model)
    assert len(calls) == 6  # the prompt, then every step (torch's forward, not the compiled one)
    reference = Engine(compiled_decode=False)
    assert hooked == generate(reference, model)
    hook.remove()
    assert generate(engine, model) == generate(Engine(compiled_decode=False), model)
    calls.clear()  # torch's global hooks watch every module of every model
    with torch.nn.modules.module.register_module_forward_hook(lambda module, args, out: calls.append(1)):
        with torch.no_grad():
            model.model(torch.tensor([[1]]))
        per_forward = len(calls)
        calls.clear()
        generate(engine, model)
    assert len(calls) == 6 * per_forward  # the prompt, then every step


def test_weights_replaced_or_changed_after_the_first_request_are_read_again():
    """The step holds the addresses it read (and float32 copies of a bf16 model's norms): a parameter
    replaced, or changed in place, after a request is read again from the next request on; one the step
    cannot read (a transposed layout) sends the model to torch. Each against the torch forward on the same
    weights."""
    def generate(engine, model):
        out = engine.generate(model, "Hi", SamplingParams(max_new_tokens=6, temperature=0, top_logprobs=2))
        return [(t.id, [a.id for a in t.top]) for t in out.tokens], [t.logprob for t in out.tokens]

    def same_as_torch(engine, model, atol):
        (tokens, logprobs), (want, want_logprobs) = generate(engine, model), generate(Engine(compiled_decode=False), model)
        assert tokens == want
        torch.testing.assert_close(torch.tensor(logprobs), torch.tensor(want_logprobs), atol=atol, rtol=0)

    for dtype, atol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):  # bf16: torch rounds between products
        model = LoadedModel(name="t", model=tiny_model().to(dtype), source="test", location="memory")
        blocks = model.model.transformer.h
        engine = Engine()
        before = generate(engine, model)
        assert engine._runner(model).compiled is not None
        with torch.no_grad():
            fc = blocks[1].mlp.c_fc
            fc.weight = torch.nn.Parameter(fc.weight.flip(0) * 3)  # a new tensor
            blocks[0].ln_1.weight.mul_(-2)  # in place: a bf16 model's copy in float32 is stale
        same_as_torch(engine, model, atol)
        assert generate(engine, model) != before and engine._runner(model).compiled is not None
    with torch.no_grad():
        proj = blocks[0].attn.c_proj
        proj.weight = torch.nn.Parameter(proj.weight.t().contiguous().t())  # the same values, a layout it cannot read
    runner = engine._runner(model)
    same_as_torch(engine, model, 2e-2)
    assert runner.compiled is None and runner._compiled.why_not == "weights not in nn.Linear's layout"
