"""
The CUDA paths: graph-replayed decode steps, precision, and the trainer's compiled bf16 loop.

CI has no GPU, so these are skipped there; run them where one is lent (`python -m pytest tests/test_cuda.py`).
"""

import pytest
import torch

from nanoplay.engine import Engine
from nanoplay.loading import LoadedModel
from nanoplay.sampling import SamplingParams
from tests.conftest import tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

REQUESTS = [("Once upon a time", SamplingParams(max_new_tokens=40, temperature=0.9, top_k=50, seed=3)),
            ("A", SamplingParams(max_new_tokens=70, temperature=0, stop_on_eot=False)),  # slides at 64
            ("Two words and then some more of them", SamplingParams(max_new_tokens=25, seed=5))]


def on_cuda(model, dtype=torch.float32):
    return LoadedModel(name="tiny", model=model.to(device="cuda", dtype=dtype), source="test", location="memory")


def generate_all(engine, model):
    requests = [engine.submit(model, prompt, params) for prompt, params in REQUESTS]
    engine.run_until_done(requests)
    return requests


def assert_same_generations(a, b, atol):
    for x, y in zip(a, b):
        assert x.finish_reason == y.finish_reason != "error", (x.error, y.error)
        assert [t.id for t in x.tokens] == [t.id for t in y.tokens]
        assert [t.logprob for t in x.tokens] == pytest.approx([t.logprob for t in y.tokens], abs=atol)


def test_cuda_graph_steps_generate_what_eager_steps_and_the_cpu_do():
    model = tiny_model()
    cpu = generate_all(Engine(), LoadedModel(name="tiny", model=model, source="test", location="memory"))
    gpu_model = on_cuda(tiny_model())
    graphs = Engine()  # the default on CUDA
    replayed = generate_all(graphs, gpu_model)
    eager = generate_all(Engine(static_decode=False), gpu_model)
    runner = graphs._runner(gpu_model)
    assert runner.use_static_decode and set(runner._static.graphs) == {16, 32, 64}
    assert_same_generations(replayed, eager, atol=1e-4)
    assert_same_generations(replayed, cpu, atol=1e-3)


def test_cuda_graphs_captured_in_the_engine_thread():
    # the playground steps the engine in a background thread while its UI thread submits
    gpu_model = on_cuda(tiny_model())
    reference = generate_all(Engine(static_decode=False), gpu_model)
    engine = Engine()
    engine.start()
    try:
        threaded = generate_all(engine, gpu_model)
    finally:
        engine.stop()
    assert_same_generations(threaded, reference, atol=1e-4)


def test_bf16_on_cuda_stays_close_to_fp32():
    params = SamplingParams(max_new_tokens=20, temperature=0, stop_on_eot=False)
    fp32 = Engine().generate(on_cuda(tiny_model()), "The cat sat on the", params)
    ids = [t.id for t in fp32.tokens]
    bf16_model = on_cuda(tiny_model(), torch.bfloat16)
    scored = Engine().score(bf16_model, "The cat sat on the" + fp32.text)
    assert len(scored) >= len(ids)
    for ours, theirs in zip(scored[-len(ids):], fp32.tokens):
        assert ours.logprob == pytest.approx(theirs.logprob, abs=0.1)


def test_trainer_compiles_and_trains_in_bf16_on_cuda(tmp_path, monkeypatch):
    from nanoplay.loading import load_model
    from trainer.config import load_preset
    from trainer.monitor import read_metrics
    from trainer.train import train

    for name, value in {"NANOPLAY_CHECKPOINTS": tmp_path / "checkpoints", "NANOPLAY_DATA_CACHE": tmp_path / "tokens",
                        "HF_HOME": tmp_path / "hf", "HF_HUB_OFFLINE": "1"}.items():
        monkeypatch.setenv(name, str(value))
    cfg = load_preset("demo", max_iters=40, warmup_iters=5, batch_size=8, block_size=64, eval_interval=20,
                      eval_batches=2, checkpoint_interval=20, sample_tokens=0, device="cuda", compile=True)
    result = train(cfg, display="none")
    assert result.step == 40
    losses = [m["loss"] for m in read_metrics(tmp_path / "checkpoints" / "demo" / "metrics.jsonl") if "loss" in m]
    assert losses[0] > 10.0 and sum(losses[-5:]) / 5 < losses[0] - 2.0
    trained = load_model("demo")  # written from the compiled model: no _orig_mod. prefixes, loads on CPU
    assert trained.step == 40
