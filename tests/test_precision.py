"""Weight precision: the machine's default dtype, int8 weights against the float32 forward, bench's quality check."""

import copy

import pytest
import torch
import torch.nn.functional as F

from nanoplay.bench import quality
from nanoplay.engine import Engine
from nanoplay.loading import LoadedModel
from nanoplay.precision import Int8Linear, preferred_dtype, quantize_int8
from nanoplay.sampling import SamplingParams
from nanoplay.errors import NanoplayError
from tests.conftest import tiny_model, write_nanogpt_ckpt


def loaded(model, name="tiny"):
    return LoadedModel(name=name, model=model, source="test", location="memory")


@pytest.mark.parametrize("device, flags, expected", [
    ("cpu", {"avx2", "avx512f", "avx512_bf16", "avx512_vnni"}, torch.bfloat16),  # Zen 4, Cooper Lake
    ("cpu", {"avx2", "avx512f", "amx_bf16", "amx_tile"}, torch.bfloat16),  # Sapphire Rapids
    ("cpu", {"avx2", "avx512f", "avx512_vnni"}, torch.float32),  # Ice Lake: bf16 only in software
    ("cpu", {"avx2", "fma"}, torch.float32),  # Zen 3
    ("cpu", set(), torch.float32),  # no /proc/cpuinfo (macOS, Windows)
    ("cuda", {"avx512_bf16"}, torch.float32),
])
def test_preferred_dtype_follows_the_cpu_flags(device, flags, expected):
    assert preferred_dtype(device, frozenset(flags)) == expected


def test_dtype_auto_is_the_machines_choice(monkeypatch):
    from nanoplay import precision
    from nanoplay.commands.common import torch_dtype

    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    assert torch_dtype("auto", "cpu") == torch.bfloat16 and torch_dtype("fp32", "cpu") == torch.float32
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2"}))
    assert torch_dtype("auto", "cpu") == torch.float32 and torch_dtype("int8", "cpu") == torch.int8


@torch.no_grad()
def test_int8_linear_rounds_each_row_to_its_own_scale():
    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 40)
    linear.weight[3] *= 100  # one row far larger than the rest must not coarsen the others
    linear.weight[5] = 0.0
    q = Int8Linear.from_linear(linear)
    w = linear.weight
    error = (q.dequantized() - w).abs()
    step = w.abs().amax(1, keepdim=True) / 127  # each row's own quantization step
    assert (error <= step * 0.51 + 1e-6).all() and (q.dequantized()[5] == 0).all()
    x = torch.randn(3, 7, 48)
    # the product equals the dequantized weights' with bf16 inputs and outputs, to bf16's precision
    reference = F.linear(x.bfloat16().float(), q.dequantized(), None)
    torch.testing.assert_close(q(x) - linear.bias, reference, atol=0.02, rtol=0.01)
    assert q(x).shape == (3, 7, 40) and q(x).dtype == torch.float32


@torch.no_grad()
def test_int8_model_stays_close_to_float32_and_decodes_the_same():
    model = tiny_model()
    quantized = quantize_int8(copy.deepcopy(model))
    assert not any(isinstance(m, torch.nn.Linear) for m in quantized.modules())
    assert quantized.transformer.wte.weight.dtype == torch.float32  # embeddings and KV cache stay float32
    idx = torch.randint(0, 50257, (2, 40), generator=torch.Generator().manual_seed(0))
    ours, theirs = model(idx), quantized(idx)
    # per-row int8 weights and bf16 activations: within 2% of the logits' range
    assert (ours - theirs).abs().max() <= 0.02 * ours.abs().max()
    # its KV-cached decoding computes what its own full forward does, and greedy picks fp32's tokens
    params = SamplingParams(max_new_tokens=16, temperature=0, stop_on_eot=False)
    int8_run = Engine().generate(loaded(quantized), "The meaning of life is", params)
    fp32_run = Engine().generate(loaded(model), "The meaning of life is", params)
    assert [t.id for t in int8_run.tokens] == [t.id for t in fp32_run.tokens]
    ids = int8_run._ids
    full = quantized(torch.tensor([ids[:-1]]))[0].float().log_softmax(-1)
    first = len(ids) - len(int8_run.tokens)
    for i, t in enumerate(int8_run.tokens):
        assert t.logprob == pytest.approx(float(full[first - 1 + i, t.id]), abs=2e-3)


def test_engine_loads_int8_weights(tiny_run):
    engine = Engine()
    model = engine.load("tiny", dtype=torch.int8)
    assert model.name == "tiny@200" and model.precision == "int8" and model.dtype == torch.float32
    assert isinstance(model.model.lm_head, Int8Linear)
    assert engine.load("tiny", dtype=torch.int8) is model and engine.load("tiny") is not model
    req = engine.generate(model, "Hello", SamplingParams(max_new_tokens=5, temperature=0, stop_on_eot=False))
    assert len(req.tokens) == 5


@pytest.mark.parametrize("tied", [True, False])
def test_an_int8_model_counts_the_parameters_it_had(tied):
    """int8 matrices and biases are buffers, not parameters; the count (pane headers, eval's table) is the
    model's own, by hand: each matrix and vector once, a tied head's int8 copy not again."""
    model = tiny_model(tie_word_embeddings=tied)
    cfg = model.config
    C, V, L, T = cfg.n_embd, cfg.vocab_size, cfg.n_layer, cfg.block_size
    per_block = 2 * 2 * C + (3 * C * C + 3 * C) + (C * C + C) + (4 * C * C + 4 * C) + (4 * C * C + C)
    by_hand = V * C + T * C + L * per_block + 2 * C + (0 if tied else V * C)
    loaded = LoadedModel(name="t", model=model, source="test", location="memory")
    assert loaded.num_params == by_hand
    quantize_int8(model)
    assert loaded.num_params == by_hand


def test_int8_refusal_names_the_model(tmp_path):
    """Of several models on a command line, the line says which one int8 cannot take."""
    path = tmp_path / "e72" / "ckpt.pt"
    path.parent.mkdir()
    write_nanogpt_ckpt(path, tiny_model(n_embd=72, n_head=2), with_optimizer=False)
    with pytest.raises(NanoplayError) as refused:
        Engine().load(str(path), dtype=torch.int8)
    name = Engine().load(str(path)).name  # the model's name as every other line gives it
    assert "e72" in name
    assert str(refused.value).startswith(f"{name}: int8 weights need matrix input widths that are multiples of 16")


@torch.no_grad()
def test_quality_is_the_mean_loss_and_argmax_agreement():
    model = loaded(tiny_model())  # context 64: 100 tokens take three windows
    ids = torch.randint(0, 50257, (101,), generator=torch.Generator().manual_seed(1)).tolist()
    same = quality(model, model, ids)
    assert same["argmax_agreement"] == 1.0 and same["loss"] == same["reference_loss"] and same["tokens"] == 100
    short = ids[:40]  # one window: the plain cross-entropy of a full forward
    logits = model.model(torch.tensor([short[:-1]]))[0]
    assert quality(model, model, short)["loss"] == pytest.approx(float(F.cross_entropy(logits, torch.tensor(short[1:]))),
                                                                 rel=1e-5)
    other = loaded(tiny_model(seed=5))
    assert quality(model, other, ids)["argmax_agreement"] < 0.5


def test_weight_bytes_counts_what_a_decode_step_reads():
    from nanoplay.bench import weight_bytes

    model = tiny_model()  # tied head: the embedding table counted once, as the head; positions not at all
    cfg = model.config
    n_embd, width, vocab = cfg.n_embd, 4 * cfg.n_embd, cfg.vocab_size
    matrices = cfg.n_layer * (n_embd * 3 * n_embd + n_embd * n_embd + n_embd * width + width * n_embd)
    rows = cfg.n_layer * (3 * n_embd + n_embd + width + n_embd)  # output features: one bias (and scale) each
    norms = (2 * cfg.n_layer + 1) * 2 * n_embd
    assert weight_bytes(loaded(model)) == 4 * (matrices + rows + norms + vocab * n_embd)
    int8 = loaded(quantize_int8(copy.deepcopy(model)))
    # int8 weights, a bf16 scale per output row (the head's too), float32 biases and norms
    assert weight_bytes(int8) == matrices + vocab * n_embd + 2 * (rows + vocab) + 4 * (rows + norms)
