"""The engine's edges: one conditioning rule for a text, non-finite logits from a model, and characters
whose bytes straddle a prompt and its completion (issue 11, items 1, 2 and 10)."""

import pytest
import torch

from conftest import tiny_model
from nanoplay.engine import Engine, text_context
from nanoplay.loading import LoadedModel
from nanoplay.sampling import SamplingParams
from nanoplay.tokenizer import TextStream, get_tokenizer

EOT = 50256


def loaded(model, name="tiny"):
    return LoadedModel(name=name, model=model, source="test", location="memory")


def Rigged(model, rig):
    """The model, its logits passed through `rig(logits)` (NaN, +inf, a forced token)."""
    forward = model.forward
    model.forward = lambda idx, *args, **kwargs: rig(forward(idx, *args, **kwargs).clone())
    return model


def test_text_context_is_the_one_rule():
    assert text_context([5, 6]) == [EOT, 5, 6]
    assert text_context([5, 6], eot_prefix=False) == [5, 6]
    assert text_context([EOT, 5]) == [EOT, 5]  # a chat template already starts with it
    assert text_context([]) == text_context([], eot_prefix=False) == [EOT]


@pytest.mark.parametrize("eot_prefix", [True, False])
def test_generation_and_scoring_condition_alike(eot_prefix):
    # score predicted the first token from <|endoftext|>, gen did not: the same tokens got different log-probs
    lm = loaded(tiny_model(5))
    engine = Engine()
    prompt = get_tokenizer().encode("The cat sat on the")
    req = engine.generate(lm, prompt, SamplingParams(max_new_tokens=8, seed=3, stop_on_eot=False), eot_prefix=eot_prefix)
    completion = [t.id for t in req.tokens]
    scored = engine.score(lm, prompt + completion, eot_prefix=eot_prefix)
    offset = len(prompt) - (0 if eot_prefix else 1)  # without the prefix the first token is not scored
    assert [t.id for t in scored[offset:]] == completion
    assert [t.logprob for t in req.tokens] == pytest.approx([t.logprob for t in scored[offset:]], abs=1e-5)
    # and by hand: one forward over the context the rule gives
    with torch.no_grad():
        context = text_context(prompt + completion, eot_prefix)
        logprobs = lm.model(torch.tensor([context]))[0].log_softmax(-1)
    start = len(context) - len(completion)
    by_hand = [float(logprobs[start - 1 + i, t]) for i, t in enumerate(completion)]
    assert [t.logprob for t in req.tokens] == pytest.approx(by_hand, abs=1e-4)


def test_nan_logits_fail_the_request_with_the_cause_and_the_others_go_on():
    inner = tiny_model(1)
    nan_model = loaded(Rigged(inner, lambda x: x.fill_(float("nan"))), "broken")
    fine = loaded(tiny_model(1), "fine")
    engine = Engine()
    bad = engine.submit(nan_model, "Hello", SamplingParams(max_new_tokens=4, seed=1))
    good = engine.submit(fine, "Hello", SamplingParams(max_new_tokens=4, seed=1))
    engine.run_until_done([bad, good])
    assert bad.finish_reason == "error" and bad.tokens == []
    assert bad.error.startswith("broken: model produced NaN logits")
    assert good.finish_reason == "length" and len(good.tokens) == 4
    with pytest.raises(Exception, match="broken: model produced NaN logits"):
        engine.score(nan_model, "Hello")


def test_a_model_with_infinite_logits_gets_its_token_and_finite_figures():
    def rig(x):
        x[..., 42] = float("inf")
        return x

    lm = loaded(Rigged(tiny_model(2), rig))
    for params in (SamplingParams(max_new_tokens=3, temperature=0), SamplingParams(max_new_tokens=3, seed=5),
                   SamplingParams(max_new_tokens=3, temperature=1e-38, top_p=0.5, repetition_penalty=1.3, seed=5)):
        req = Engine().generate(lm, "Hi", params)
        assert [t.id for t in req.tokens] == [42, 42, 42]
        for t in req.tokens:
            assert t.logprob == 0.0 and t.sampling_logprob == 0.0 and t.rank == 1 and t.entropy == 0.0


def test_a_character_straddling_prompt_and_completion_is_whole():
    # "🦜" is three byte-level tokens; the prompt ends after the first. The completion (forced to the other
    # two) must show the character, not a bare U+FFFD for the bytes the prompt left open.
    tok = get_tokenizer()
    ids = tok.encode("a 🦜 b")
    start = next(i for i, t in enumerate(ids) if b"\xf0" in tok.token_bytes(t))
    prompt, rest = ids[:start + 1], ids[start + 1:]
    forced = iter(rest)
    wanted = {}

    def rig(x):
        wanted["next"] = next(forced, EOT)
        x[..., wanted["next"]] = 1e4
        return x

    lm = loaded(Rigged(tiny_model(3), rig))
    req = Engine().generate(lm, prompt, SamplingParams(max_new_tokens=len(rest), temperature=0, stop_on_eot=False))
    assert [t.id for t in req.tokens] == rest
    assert req.text == "🦜 b" and "\ufffd" not in req.text
    assert tok.decode(prompt) + req.text != tok.decode(ids)  # the prompt alone shows its open bytes as U+FFFD


def test_text_stream_holds_bytes_across_the_context():
    tok = get_tokenizer()
    ids = tok.encode("a 🦜 b")
    for cut in range(len(ids) + 1):
        stream = TextStream(tok, context=ids[:cut])
        text = "".join(stream.push(i) for i in ids[cut:]) + stream.flush()
        assert "\ufffd" not in text
        assert text == tok.decode(ids)[len(tok.decode(ids[:cut]).rstrip("\ufffd")):]
    # an open character the completion does not finish is the context's: the completion has no U+FFFD for it
    stream = TextStream(tok, context=ids[:3])
    assert stream.push(tok.encode(" x")[0]) + stream.flush() == " x"
