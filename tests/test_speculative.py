"""Speculative decoding: with and without a draft model, a request gives the same tokens and figures."""

import copy
import json

import pytest
import torch

from nanoplay.bench import truncated_draft
from nanoplay.engine import Engine
from nanoplay.errors import NanoplayError
from nanoplay.loading import LoadedModel
from nanoplay.sampling import SamplingParams
from tests.conftest import tiny_model


def loaded(model, name):
    return LoadedModel(name=name, model=model, source="test", location="memory")


def generate(engine, model, prompt, params, draft=None, draft_tokens=4):
    requests = [engine.submit(model, prompt, params, draft=draft, draft_tokens=draft_tokens)]
    engine.run_until_done(requests)
    return requests[0]


def assert_same(plain, speculative):
    assert speculative.finish_reason == plain.finish_reason
    assert [t.id for t in speculative.tokens] == [t.id for t in plain.tokens]
    assert speculative.text == plain.text
    for a, b in zip(plain.tokens, speculative.tokens):
        assert b.rank == a.rank
        assert b.logprob == pytest.approx(a.logprob, abs=1e-4)
        assert b.sampling_logprob == pytest.approx(a.sampling_logprob, abs=1e-4)
        assert b.entropy == pytest.approx(a.entropy, abs=1e-4)
        assert [x.id for x in b.top] == [x.id for x in a.top]


SETTINGS = [
    dict(temperature=0),
    dict(temperature=1.0),
    dict(temperature=0.7, top_k=50),
    dict(temperature=1.2, top_p=0.9, repetition_penalty=1.3),
    dict(temperature=0.9, min_p=0.05, presence_penalty=0.5, frequency_penalty=0.3),
]


@pytest.mark.parametrize("settings", SETTINGS)
def test_draft_changes_no_token_or_figure(settings):
    target = loaded(tiny_model(seed=1, n_layer=3), "target")
    drafts = {"itself": target, "truncated": truncated_draft(target, 1),
              "unrelated": loaded(tiny_model(seed=2), "unrelated")}
    engine = Engine()
    for seed in (0, 1):
        params = SamplingParams(max_new_tokens=24, seed=seed, top_logprobs=3, stop_on_eot=False, **settings)
        plain = generate(engine, target, "The cat sat on", params)
        assert len(plain.tokens) == 24
        for name, draft in drafts.items():
            speculative = generate(engine, target, "The cat sat on", params, draft=draft)
            assert_same(plain, speculative)
            assert speculative.draft_proposed > 0
            if name == "itself":  # a draft equal to the model is always right
                assert speculative.draft_accepted == speculative.draft_proposed


def test_a_draft_that_agrees_saves_forwards_of_the_model():
    target = loaded(tiny_model(seed=1), "target")
    twin = loaded(copy.deepcopy(target.model), "twin")  # the same weights: every proposal is right
    calls = []
    hook = target.model.register_forward_hook(lambda *_: calls.append(1))
    engine = Engine(compiled_decode=False)  # every step a torch forward, which the hook counts
    params = SamplingParams(max_new_tokens=21, temperature=0.8, seed=3, stop_on_eot=False)
    plain = generate(engine, target, "Hello", params)
    plain_calls, calls[:] = len(calls), []
    speculative = generate(engine, target, "Hello", params, draft=twin, draft_tokens=4)
    hook.remove()
    assert plain_calls == 21  # the prefill gives the first token, then one forward per token
    assert len(calls) == 1 + 4  # the prefill, then 20 tokens in checks of 4 proposals + 1
    assert speculative.draft_accepted == speculative.draft_proposed == 16
    assert_same(plain, speculative)


def test_speculation_survives_window_slides_and_batching():
    target = loaded(tiny_model(seed=4), "target")  # context 64
    draft = truncated_draft(target, 1)
    engine = Engine()
    prompt = list(range(1000, 1050))  # 50 tokens: the window slides while 40 are generated
    params = SamplingParams(max_new_tokens=40, temperature=1.0, seed=9, stop_on_eot=False)
    plain = generate(engine, target, prompt, params)
    assert plain.window_slides >= 1
    other_params = SamplingParams(max_new_tokens=30, temperature=1.0, seed=5, stop_on_eot=False)
    alone = generate(engine, target, "Another prompt", other_params)
    # the speculative request runs beside an ordinary one on the same model
    together = [engine.submit(target, prompt, params, draft=draft), engine.submit(target, "Another prompt", other_params)]
    engine.run_until_done(together)
    assert_same(plain, together[0])
    assert together[0].window_slides == plain.window_slides
    assert_same(alone, together[1])


def test_stop_strings_end_a_speculative_request_where_they_end_a_plain_one():
    target = loaded(tiny_model(seed=1), "target")
    engine = Engine()
    free = generate(engine, target, "Once", SamplingParams(max_new_tokens=30, temperature=0, stop_on_eot=False))
    stop = free.text[8:12]  # a piece of what it writes anyway
    assert stop.strip()
    params = SamplingParams(max_new_tokens=30, temperature=0, stop=[stop], stop_on_eot=False)
    plain = generate(engine, target, "Once", params)
    assert plain.finish_reason == "stop"
    assert_same(plain, generate(engine, target, "Once", params, draft=target))


def test_a_draft_with_another_vocabulary_is_refused():
    target = loaded(tiny_model(seed=1), "target")
    char_level = loaded(tiny_model(seed=2, vocab_size=65), "chars")
    with pytest.raises(NanoplayError, match="vocabulary"):
        Engine().submit(target, "Hi", SamplingParams(), draft=char_level)
    with pytest.raises(NanoplayError, match="draft tokens"):
        Engine().submit(target, "Hi", SamplingParams(), draft=target, draft_tokens=0)


def test_gen_draft_gives_the_same_json_and_reports_acceptance(tiny_run, capsys):
    from nanoplay.cli import main

    argv = ["gen", "-m", "tiny@200", "--prompt", "The future", "--max-new-tokens", "12", "--temperature", "0.9",
            "--seed", "5", "--json", "--no-stop-eot"]
    assert main(argv) == 0
    plain = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert main(argv + ["--draft", "tiny@100", "--draft-tokens", "3"]) == 0
    out, err = capsys.readouterr()
    speculative = [json.loads(line) for line in out.splitlines()]
    assert [t["id"] for t in speculative[0]["tokens"]] == [t["id"] for t in plain[0]["tokens"]]
    assert speculative[0]["text"] == plain[0]["text"]
    assert speculative[0]["draft"] == "tiny@100" and plain[0]["draft"] is None
    accepted, proposed = speculative[0]["draft_accepted"], speculative[0]["draft_proposed"]
    assert 0 <= accepted <= proposed > 0
    assert f"draft tiny@100: {accepted} of {proposed} proposed tokens accepted" in err
    assert main(argv + ["--draft", "tiny@100", "--draft-tokens", "0"]) == 2
    assert "draft tokens per step must be between 1 and 16" in capsys.readouterr().err
    for bad in ("0", "17"):  # refused without --draft too (it ran, ignoring it), before any model loads
        assert main(argv[:1] + ["-m", "no-such-model"] + argv[3:] + ["--draft-tokens", bad]) == 2
        assert capsys.readouterr().err == f"nanoplay: error: draft tokens per step must be between 1 and 16, not {bad}\n"


def test_bench_draft_reports_speed_and_acceptance(tiny_run, capsys):
    from nanoplay.cli import main

    common = ["bench", "-m", "tiny@200", "--new-tokens", "8", "--prompt-tokens", "8", "--repeats", "1", "--dtype", "fp32"]
    assert main(common + ["--draft", "tiny@100", "--draft-tokens", "2", "--draft-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "speculative decoding" in out and out.count("tiny@100") == 2  # a row per --draft-tokens
    assert main(common + ["--draft-layers", "1"]) == 0
    assert "first 1 layers" in capsys.readouterr().out


def test_bench_draft_runs_the_draft_at_each_precision(tiny_run, capsys, monkeypatch):
    """A draft at the model's precision (it was float32 beside an int8 or bf16 model), a row per precision
    that says which, under the same header line as every bench."""
    import nanoplay.bench as bench
    from nanoplay.cli import main

    pairs = []  # (model, draft) precisions as bench_draft got them
    real = bench.bench_draft
    monkeypatch.setattr(bench, "bench_draft", lambda model, draft, **kw: pairs.append(
        (model.precision, draft.precision)) or real(model, draft, **kw))
    argv = ["bench", "-m", "tiny@200", "--new-tokens", "4", "--prompt-tokens", "4", "--repeats", "1",
            "--dtype", "fp32", "--dtype", "bf16", "--dtype", "int8"]
    assert main(argv + ["--draft", "tiny@100"]) == 0
    assert pairs == [("fp32", "fp32"), ("bf16", "bf16"), ("int8", "int8")]
    out = capsys.readouterr().out
    assert out.startswith("torch ") and "fp32, bf16, int8;" in out.splitlines()[0]
    rows = [line for line in out.splitlines() if "tiny@200" in line]
    assert [next(p for p in ("fp32", "bf16", "int8") if p in row) for row in rows] == ["fp32", "bf16", "int8"]


def test_truncated_draft_leaves_the_model_whole():
    target = loaded(tiny_model(seed=1, n_layer=3), "target")
    before = target.model(torch.tensor([[1, 2, 3]]))
    draft = truncated_draft(target, 1)
    assert len(draft.model.transformer.h) == 1 and len(target.model.transformer.h) == 3
    torch.testing.assert_close(target.model(torch.tensor([[1, 2, 3]])), before)
    assert draft.model.transformer.wte is target.model.transformer.wte  # shared, not copied
