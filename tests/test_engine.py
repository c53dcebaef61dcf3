"""The shared sampler: KV cache against full forwards, batching, seeds, stops, overflow, cancellation."""

import copy
import math
import threading

import pytest
import torch

from nanoplay.cpu_kernel import kernel_status
from nanoplay.engine import Engine
from nanoplay.errors import NanoplayError
from nanoplay.kvcache import KVCache
from nanoplay.loading import LoadedModel
from nanoplay.sampling import SamplingParams
from nanoplay.static_decode import StaticDecoder
from nanoplay.tokenizer import get_tokenizer
from tests.conftest import hf_gpt2, tiny_model


def loaded(model, name="tiny"):
    return LoadedModel(name=name, model=model, source="test", location="memory")


@torch.no_grad()
def test_kv_cache_matches_full_forward_with_mixed_lengths():
    model = tiny_model()
    cache = KVCache(model.config, slots=4, device="cpu", dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    prompts = {0: [5, 6, 7], 2: list(range(100, 117)), 3: [42]}  # slot 1 left empty: non-contiguous rows
    seqs = {}
    for slot, ids in prompts.items():
        cache.bind_prefill(slot, 0, len(ids))
        out = model(torch.tensor([ids]), positions=torch.arange(len(ids)).unsqueeze(0), cache=cache)
        torch.testing.assert_close(out, model(torch.tensor([ids])), atol=1e-5, rtol=1e-5)
        seqs[slot] = list(ids)
    for _ in range(20):  # batched decode; every step equals a full forward of each sequence
        slots = sorted(seqs)
        new = {s: int(torch.randint(0, 50257, (1,), generator=gen)) for s in slots}
        positions = [len(seqs[s]) for s in slots]
        cache.bind_decode(slots, positions)
        out = model(torch.tensor([[new[s]] for s in slots]), positions=torch.tensor(positions).unsqueeze(1),
                    cache=cache)[:, -1]
        for row, s in enumerate(slots):
            seqs[s].append(new[s])
            torch.testing.assert_close(out[row], model(torch.tensor([seqs[s]]))[0, -1], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_prefill_after_cached_prefix_matches_full_forward():
    model = tiny_model()
    cache = KVCache(model.config, slots=2, device="cpu", dtype=torch.float32)
    ids = list(range(300, 330))
    cache.bind_prefill(1, 0, 12)
    model(torch.tensor([ids[:12]]), positions=torch.arange(12).unsqueeze(0), cache=cache)
    cache.bind_prefill(1, 12, 18)  # the rest, on top of the cached 12
    out = model(torch.tensor([ids[12:]]), positions=torch.arange(12, 30).unsqueeze(0), cache=cache)
    torch.testing.assert_close(out, model(torch.tensor([ids]))[:, 12:], atol=1e-5, rtol=1e-5)



def test_keys_and_values_of_old_weights_are_not_reused_as_a_prefix():
    """A prompt's cached prefix (the KV cache of an earlier request) belongs to the weights it was computed
    with: after a parameter is replaced or changed in place, the same prompt gets what a fresh engine
    gives, in every decode path, also when the old prefix sits in a busy slot."""
    from nanoplay.bench import truncated_draft

    params = SamplingParams(max_new_tokens=4, temperature=0, top_logprobs=1)
    prompt = "The cat sat on the mat and the dog"

    def logprobs(engine, model, **kw):
        return [t.logprob for t in engine.generate(model, prompt, params, **kw).tokens]

    for kw in ({"compiled_decode": False}, {"compiled_decode": False, "static_decode": True}, {}):
        model = loaded(tiny_model())
        engine = Engine(**kw)
        logprobs(engine, model)
        with torch.no_grad():
            model.model.transformer.h[0].attn.c_attn.weight.mul_(1.5)  # in place: the same tensor
        assert logprobs(engine, model) == logprobs(Engine(**kw), model), kw
        attn = model.model.transformer.h[1].attn
        attn.c_proj.weight = torch.nn.Parameter(attn.c_proj.weight * -1)  # a new tensor
        assert logprobs(engine, model) == logprobs(Engine(**kw), model), kw
    busy = engine.submit(model, prompt, SamplingParams(max_new_tokens=40, temperature=0))  # holds the prompt
    for _ in range(3):
        engine.step()
    with torch.no_grad():
        model.model.transformer.ln_f.weight.mul_(0.5)
    assert logprobs(engine, model) == logprobs(Engine(), model)
    busy.cancel()
    # a draft's cache likewise: its stale keys would change which tokens it proposes (how many are
    # accepted), never the figures
    draft = truncated_draft(loaded(copy.deepcopy(model.model)), 1)  # its own weights, agreeing often
    params = SamplingParams(max_new_tokens=12, temperature=0)
    engine.generate(model, prompt, params, draft=draft)
    with torch.no_grad():
        draft.model.transformer.h[0].attn.c_attn.weight.mul_(1.2)
    again = engine.generate(model, prompt, params, draft=draft)
    assert again.draft_accepted > 0
    drafts = engine._runner(model)._drafts[id(draft)].cache  # its keys: those of the draft as it is now
    held = drafts.tokens[again._slot]
    reference = KVCache(draft.config, slots=1, device="cpu", dtype=torch.float32)
    reference.bind_prefill(0, 0, len(held))
    with torch.no_grad():
        draft.model(torch.tensor([held]), positions=torch.arange(len(held)).unsqueeze(0), cache=reference)
    torch.testing.assert_close(drafts.k[0][again._slot, :, :len(held)], reference.k[0][0, :, :len(held)])


@torch.no_grad()
def test_static_decode_step_matches_full_forward_and_spares_idle_slots():
    # the fixed-shape step that CUDA graphs replay, run eagerly: every slot is fed, busy or not
    model = tiny_model()  # context 64: sequences cross the 16- and 32-key buckets
    cache = KVCache(model.config, slots=4, device="cpu", dtype=torch.float32)
    decoder = StaticDecoder(model, cache)
    gen = torch.Generator().manual_seed(1)
    prompts = {0: [5, 6, 7], 1: list(range(200, 240)), 3: list(range(100, 110))}  # slot 2 stays empty
    seqs = {}
    for slot, ids in prompts.items():
        cache.bind_prefill(slot, 0, len(ids))
        model(torch.tensor([ids]), positions=torch.arange(len(ids)).unsqueeze(0), cache=cache)
        seqs[slot] = list(ids)
    idle_keys = [k[1, :, :40].clone() for k in cache.k]  # slot 1 holds a cached prefix but sits idle
    busy = [0, 3]
    for _ in range(20):
        new = [int(torch.randint(0, 50257, (1,), generator=gen)) for _ in busy]
        positions = [len(seqs[s]) for s in busy]
        out = decoder.decode(busy, new, positions)
        for row, (s, token) in enumerate(zip(busy, new)):
            seqs[s].append(token)
            torch.testing.assert_close(out[row], model(torch.tensor([seqs[s]]))[0, -1], atol=1e-5, rtol=1e-5)
    assert {decoder.bucket(n) for n in (4, 17, 30)} == {16, 32}
    for before, k in zip(idle_keys, cache.k):
        assert torch.equal(k[1, :, :40], before)


def test_static_decode_engine_generates_what_the_ordinary_one_does():
    model = loaded(tiny_model())
    requests = [("Once upon a time", SamplingParams(max_new_tokens=40, temperature=0.9, top_k=50, seed=3)),
                ("A", SamplingParams(max_new_tokens=70, temperature=0, stop_on_eot=False)),  # slides at 64
                ("Two words and then some more of them", SamplingParams(max_new_tokens=25, seed=5))]
    runs = []
    for static in (False, True):
        engine = Engine(static_decode=static)
        reqs = [engine.submit(model, prompt, params) for prompt, params in requests]
        engine.run_until_done(reqs)
        runs.append(reqs)
    assert engine._runner(model).use_static_decode and engine._runner(model)._static is not None
    for ordinary, static in zip(*runs):
        assert [t.id for t in static.tokens] == [t.id for t in ordinary.tokens]
        assert [t.logprob for t in static.tokens] == pytest.approx([t.logprob for t in ordinary.tokens], abs=1e-4)
    assert runs[1][1].window_slides >= 1

def greedy_reference(model, ids, steps):
    out = []
    with torch.no_grad():
        for _ in range(steps):
            nxt = int(model(torch.tensor([ids + out]))[0, -1].argmax())
            out.append(nxt)
    return out


def test_greedy_matches_transformers_generate():
    hf = hf_gpt2(seed=3)
    from nanoplay.checkpoint import build_model
    from nanoplay.loading import config_from_hf, state_from_hf

    ours = loaded(build_model(config_from_hf(hf.config.to_dict(), "t"), state_from_hf(hf.state_dict()), "t"))
    prompt = get_tokenizer().encode("The meaning of life is")
    req = Engine().generate(ours, prompt, SamplingParams(max_new_tokens=12, temperature=0, stop_on_eot=False))
    prompt = [get_tokenizer().eot_id] + prompt  # the engine's text_context: a prompt follows <|endoftext|>
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    assert [t.id for t in req.tokens] == ref[0, len(prompt):].tolist()
    for t in req.tokens:  # plain greedy: rank 1, and the sampling distribution is a point mass
        assert t.rank == 1 and t.top[0].id == t.id and t.sampling_logprob == 0.0
        assert [a.sampling_logprob for a in t.top] == [0.0] + [float("-inf")] * (len(t.top) - 1)


def test_greedy_with_repetition_penalty_matches_transformers_generate():
    hf = hf_gpt2(seed=4)
    from nanoplay.checkpoint import build_model
    from nanoplay.loading import config_from_hf, state_from_hf

    ours = loaded(build_model(config_from_hf(hf.config.to_dict(), "t"), state_from_hf(hf.state_dict()), "t"))
    prompt = get_tokenizer().encode("the the the the")
    req = Engine().generate(ours, prompt, SamplingParams(max_new_tokens=12, temperature=0, repetition_penalty=1.5,
                                                         stop_on_eot=False, top_logprobs=3), eot_prefix=False)
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                      repetition_penalty=1.5, pad_token_id=0)
    assert [t.id for t in req.tokens] == ref[0, len(prompt):].tolist()
    for t in req.tokens:  # greedy samples from a point mass
        assert t.sampling_logprob == 0.0
        assert all(a.sampling_logprob == (0.0 if a.id == t.id else float("-inf")) for a in t.top)


def test_token_data_is_consistent_with_the_model():
    model = tiny_model()
    req = Engine().generate(loaded(model), "Hi there", SamplingParams(max_new_tokens=6, seed=4, top_logprobs=3))
    ids = [get_tokenizer().eot_id] + get_tokenizer().encode("Hi there") + [t.id for t in req.tokens]
    with torch.no_grad():
        logprobs = model(torch.tensor([ids]))[0].log_softmax(-1)
    for i, t in enumerate(req.tokens):
        row = logprobs[len(ids) - len(req.tokens) - 1 + i]
        assert t.logprob == pytest.approx(float(row[t.id]), abs=1e-4)
        # the engine ranks on its own (KV-cached) logits: tokens within float32 rounding of this full
        # forward's may fall on either side
        assert int((row > row[t.id] + 1e-5).sum()) + 1 <= t.rank <= int((row > row[t.id] - 1e-5).sum()) + 1
        assert t.entropy == pytest.approx(float(-(row.exp() * row).sum()), abs=1e-3)
        assert [a.id for a in t.top] == torch.topk(row, 3).indices.tolist()
        assert t.sampling_logprob == pytest.approx(t.logprob, abs=1e-4)  # temperature 1, no filters
    assert req.perplexity == pytest.approx(math.exp(-sum(t.logprob for t in req.tokens) / 6))


def test_sampled_tokens_report_sampling_logprobs_asked_for_their_ids_alone(monkeypatch):
    """At a temperature alone each token's and alternative's sampling log-probability is the model's
    log_softmax(logits / T) (a full forward's, independently), computed for those ids only: where the
    compiled race runs, the engine never builds the vocabulary-wide row (a tenth of a sampled step)."""
    from nanoplay import sampling

    if not kernel_status():
        monkeypatch.setattr(sampling.TemperedLogits, "row", property(lambda self: pytest.fail("a whole row")))
    model = tiny_model()
    params = SamplingParams(max_new_tokens=6, temperature=0.7, seed=4, top_logprobs=3)
    req = Engine().generate(loaded(model), "Hi there", params)
    ids = [get_tokenizer().eot_id] + get_tokenizer().encode("Hi there") + [t.id for t in req.tokens]
    with torch.no_grad():
        tempered = (model(torch.tensor([ids]))[0].double() / 0.7).log_softmax(-1)
    for i, t in enumerate(req.tokens):
        row = tempered[len(ids) - len(req.tokens) - 1 + i]
        assert t.sampling_logprob == pytest.approx(float(row[t.id]), abs=1e-4)
        for a in t.top:
            assert a.sampling_logprob == pytest.approx(float(row[a.id]), abs=1e-4)


def test_same_seed_alone_or_batched():
    model = loaded(tiny_model())
    params = SamplingParams(max_new_tokens=25, temperature=0.9, top_k=100, seed=11)
    alone = Engine().generate(model, "Once upon a time", params)
    engine = Engine()
    others = [engine.submit(model, p, SamplingParams(max_new_tokens=40, seed=s)) for s, p in
              enumerate(["A", "Two words", "Something longer than the rest of them"])]
    batched = engine.submit(model, "Once upon a time", params)
    engine.run_until_done(others + [batched])
    assert [t.id for t in batched.tokens] == [t.id for t in alone.tokens]
    different = Engine().generate(model, "Once upon a time", SamplingParams(max_new_tokens=25, temperature=0.9,
                                                                            top_k=100, seed=12))
    assert [t.id for t in different.tokens] != [t.id for t in alone.tokens]


def test_common_random_numbers_across_models():
    # a 50257-entry model and the same weights padded to 50304 draw identical noise for real tokens
    base = tiny_model(vocab_size=50257)
    padded = tiny_model(vocab_size=50304)
    with torch.no_grad():
        # the final hidden state's feature 0 is always 1 and every real token's embedding has 5 there,
        # so the padded entries (zero rows) are e^5 times less likely than any real token
        base.transformer.ln_f.weight[0], base.transformer.ln_f.bias[0] = 0.0, 1.0
        base.transformer.wte.weight[:, 0] = 5.0
        padded.transformer.wte.weight.zero_()
        padded.transformer.wte.weight[:50257] = base.transformer.wte.weight
        for (name, p), q in zip(padded.named_parameters(), base.parameters()):
            if "wte" not in name:
                p.copy_(q)
    params = SamplingParams(max_new_tokens=30, temperature=1.0, seed=99)
    engine = Engine()
    a = engine.submit(loaded(base, "a"), "The", params)
    b = engine.submit(loaded(padded, "b"), "The", params)
    engine.run_until_done([a, b])
    assert [t.id for t in a.tokens] == [t.id for t in b.tokens]


def test_n_samples_share_the_prompt_prefill():
    model = tiny_model()
    lengths = []
    original = model.forward

    def counting_forward(idx, *args, **kwargs):
        lengths.append(idx.shape)
        return original(idx, *args, **kwargs)

    model.forward = counting_forward
    engine = Engine()
    prompt = list(range(1000, 1030))
    lm = loaded(model)
    reqs = [engine.submit(lm, prompt, SamplingParams(max_new_tokens=3, seed=s)) for s in range(3)]
    engine.run_until_done(reqs)
    prefills = [s for s in lengths if s[1] > 1]
    assert prefills == [torch.Size([1, 31])]  # <|endoftext|> and the prompt; the others copied the cached prompt, fed only its last token
    # and those copies produce exactly what a fresh engine computes
    for s, r in enumerate(reqs):
        fresh = Engine().generate(loaded(tiny_model()), prompt, SamplingParams(max_new_tokens=3, seed=s))
        assert [t.id for t in r.tokens] == [t.id for t in fresh.tokens]


def test_chat_turn_reuses_the_cached_conversation():
    model = tiny_model()
    engine = Engine()
    lm = loaded(model)
    first = engine.generate(lm, list(range(500, 520)), SamplingParams(max_new_tokens=5, temperature=0))
    runner = engine._runner(lm)
    history = list(range(500, 520)) + [t.id for t in first.tokens] + [600, 601]
    second = engine.submit(lm, history, SamplingParams(max_new_tokens=5, temperature=0))
    engine.run_until_done([second])
    history = [get_tokenizer().eot_id] + history  # the engine's text_context
    assert runner.cache.tokens[second._slot][:25] == history[:25]
    assert [t.id for t in second.tokens] == greedy_reference(model, history, 5)


def test_stop_string_across_token_boundaries():
    model = loaded(tiny_model())
    params = dict(max_new_tokens=30, temperature=1.0, seed=5, stop_on_eot=False)
    free = Engine().generate(model, "Hello", SamplingParams(**params))
    starts = [sum(len(t.text) for t in free.tokens[:i]) for i in range(len(free.tokens))]
    # a stop string that begins inside token i and ends inside token i+1, first seen there
    for i in range(len(free.tokens) - 1):
        stop = (free.tokens[i].text + free.tokens[i + 1].text)[1:-1]
        if len(free.tokens[i].text) > 1 and len(free.tokens[i + 1].text) > 1 and free.text.find(stop) == starts[i] + 1:
            break
    else:
        pytest.fail("no suitable token pair in the sample")
    req = Engine().generate(model, "Hello", SamplingParams(**params, stop=["never appears", stop]))
    assert req.finish_reason == "stop"
    assert req.text == free.text[:starts[i] + 1]
    assert [t.id for t in req.tokens] == [t.id for t in free.tokens[:i + 1]]
    # a stop string that begins exactly where token j begins: none of token j's text is kept, nor token j
    for j in range(1, len(free.tokens)):
        stop = free.tokens[j].text[:2]
        if len(stop) == 2 and free.text.find(stop) == starts[j]:
            break
    else:
        pytest.fail("no suitable token in the sample")
    req = Engine().generate(model, "Hello", SamplingParams(**params, stop=[stop]))
    assert req.finish_reason == "stop" and req.text == free.text[:starts[j]]
    assert [t.id for t in req.tokens] == [t.id for t in free.tokens[:j]]


def test_streamed_text_never_splits_utf8():
    tok = get_tokenizer()
    text = "Café, naïve 🎉🙂 — 日本語 ok"
    ids = tok.encode(text)
    assert len(ids) > len(text.split())  # multi-byte characters span several tokens
    from nanoplay.tokenizer import TextStream

    stream = TextStream(tok)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_reserved_ids_decode_without_crashing():
    tok = get_tokenizer()
    assert tok.decode([50260, 50300, 15496]) == "<|end|><|reserved_50300|>Hello"


def test_prompt_longer_than_context_slides():
    model = loaded(tiny_model())  # context 64
    long_prompt = list(range(1000, 1100))
    req = Engine().generate(model, long_prompt, SamplingParams(max_new_tokens=80, temperature=0, stop_on_eot=False))
    assert req.finish_reason == "length" and len(req.tokens) == 80
    assert req.prompt_truncated == 100 - (64 - 32)
    assert req.window_slides >= 1
    # after the slide the model sees the newest 32 tokens, and greedy continues from exactly those
    assert req.context_used <= 64


def test_cancel_frees_the_slot():
    model = loaded(tiny_model())
    engine = Engine()
    engine.start()
    try:
        started = threading.Event()
        req = engine.submit(model, "Go", SamplingParams(max_new_tokens=10_000, stop_on_eot=False),
                            on_update=lambda r, toks, text: started.set())
        assert started.wait(30)
        req.cancel()
        assert req.wait(30)
        assert req.finish_reason == "cancelled" and 0 < len(req.tokens) < 10_000
        runner = engine._runner(model)
        assert runner.owner == [None] * runner.num_slots and not runner.running
    finally:
        engine.stop()


def test_unload_cancels_and_frees_the_cache():
    engine = Engine()
    lm = loaded(tiny_model())
    req = engine.submit(lm, "Hi", SamplingParams(max_new_tokens=50))
    engine.step()
    engine.unload(lm)
    assert req.finish_reason == "cancelled" and id(lm) not in engine._runners


def test_bad_prompt_ids_are_refused():
    with pytest.raises(NanoplayError, match="outside tiny's vocabulary"):
        Engine().submit(loaded(tiny_model()), [60000], SamplingParams())


def test_score_matches_transformers():
    hf = hf_gpt2(seed=8, n_positions=16)
    from nanoplay.checkpoint import build_model
    from nanoplay.loading import config_from_hf, state_from_hf

    ours = loaded(build_model(config_from_hf(hf.config.to_dict(), "t"), state_from_hf(hf.state_dict()), "t"))
    text = "Short texts are easy; longer ones need a sliding window over the context, like this one does."
    ids = get_tokenizer().encode(text)
    assert len(ids) > 16  # longer than the 16-token context: scored in half-overlapping windows
    scored = Engine().score(ours, text)
    assert [t.id for t in scored] == ids
    seq = [50256] + ids
    with torch.no_grad():
        for i, t in enumerate(scored[:15]):  # within the first window: full left context
            ref = hf(torch.tensor([seq[:i + 1]])).logits[0, -1].log_softmax(-1)[seq[i + 1]]
            assert t.logprob == pytest.approx(float(ref), abs=1e-4)
        for target in range(16, len(seq)):  # windows start every 8 tokens (half the context)
            begin = 8 * ((target - 16) // 8 + 1)
            ref = hf(torch.tensor([seq[begin:target]])).logits[0, -1].log_softmax(-1)[seq[target]]
            assert scored[target - 1].logprob == pytest.approx(float(ref), abs=1e-4)


@pytest.mark.parametrize("compiled", [True, False])
def test_engine_loaded_models_compute_the_same(tiny_run, compiled):
    """Loaded for the compiled decode step, the weights keep nn.Linear's layout; for torch's steps they are
    stored transposed. Either way the model computes what the plainly loaded one does."""
    from nanoplay.loading import load_model

    if compiled and kernel_status():
        pytest.skip(kernel_status())
    engine = Engine(compiled_decode=compiled)
    fast = engine.load("tiny")
    plain = load_model("tiny")
    w = fast.model.transformer.h[0].attn.c_attn.weight
    layout = (w.shape[1], 1) if compiled else (1, w.shape[0])
    assert w.shape == plain.model.transformer.h[0].attn.c_attn.weight.shape and w.stride() == layout
    assert engine._runner(fast).use_compiled_decode == compiled
    assert fast.model.lm_head.weight is fast.model.transformer.wte.weight
    idx = torch.randint(0, 50257, (3, 40))
    with torch.no_grad():
        torch.testing.assert_close(fast.model(idx), plain.model(idx), atol=1e-5, rtol=1e-5)
    params = SamplingParams(max_new_tokens=20, temperature=0, stop_on_eot=False)
    assert [t.id for t in engine.generate(fast, "Hello", params).tokens] == \
        [t.id for t in Engine().generate(plain, "Hello", params).tokens]


def test_weights_converted_to_another_dtype_after_loading_fail_the_request_with_a_clear_line():
    """model.to(bfloat16) after loading: the KV cache (and the compiled step) are float32's; every request
    failed with torch's "Expected query, key, and value to have the same dtype"."""
    model = loaded(tiny_model())
    engine = Engine()
    assert engine.generate(model, "Hi", SamplingParams(max_new_tokens=2, temperature=0)).finish_reason == "length"
    model.model.to(torch.bfloat16)
    r = engine.generate(model, "Hi", SamplingParams(max_new_tokens=2, temperature=0))
    assert (r.finish_reason, r.error) == ("error", "tiny: its weights went from float32 to bfloat16 after loading: "
                                          "load it in the dtype you want instead (Engine.load(spec, dtype=...), --dtype)")
