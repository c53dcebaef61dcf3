"""Sampling filters and penalties against transformers' logits processors and hand computations."""

import pytest
import torch

from nanoplay.errors import NanoplayError
from nanoplay.sampling import NOISE_SIZE, SamplingParams, apply_penalties, choose, draw_noise, filter_logits

V = 1000


def logits(seed=0):
    return torch.randn(V, generator=torch.Generator().manual_seed(seed)) * 3


def kept(row):
    return torch.isfinite(row)


def test_top_k_matches_transformers():
    from transformers import TopKLogitsWarper

    x = logits()
    ours = filter_logits(x, SamplingParams(temperature=1.0, top_k=17))
    ref = TopKLogitsWarper(17)(None, x.clone().unsqueeze(0))[0]
    assert kept(ours).sum() == 17
    assert torch.equal(kept(ours), kept(ref))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 0.99])
def test_top_p_matches_transformers(p):
    from transformers import TopPLogitsWarper

    x = logits(1)
    ours = filter_logits(x, SamplingParams(temperature=1.0, top_p=p))
    ref = TopPLogitsWarper(p)(None, x.clone().unsqueeze(0))[0]
    assert torch.equal(kept(ours), kept(ref))
    # by hand: the kept set is the smallest prefix of the sorted probabilities reaching p
    probs = x.double().softmax(-1).sort(descending=True).values
    n = int((probs.cumsum(-1) < p).sum()) + 1
    assert kept(ours).sum() == n


@pytest.mark.parametrize("m", [0.05, 0.3])
def test_min_p_matches_transformers(m):
    from transformers import MinPLogitsWarper

    x = logits(2)
    ours = filter_logits(x, SamplingParams(temperature=1.0, min_p=m))
    ref = MinPLogitsWarper(m)(None, x.clone().unsqueeze(0))[0]
    assert torch.equal(kept(ours), kept(ref))
    probs = x.softmax(-1)
    assert torch.equal(kept(ours), probs >= m * probs.max())


def test_temperature_scales_logits():
    # the same distribution as logits / temperature; the maximum is subtracted first, so it is 0
    x = logits(3)
    ours = filter_logits(x, SamplingParams(temperature=0.5))
    torch.testing.assert_close(ours, (x.double() - x.max()) / 0.5)
    torch.testing.assert_close(ours.log_softmax(-1), (x.double() / 0.5).log_softmax(-1))


def test_repetition_penalty_matches_transformers():
    from transformers import RepetitionPenaltyLogitsProcessor

    x = logits(4)
    seen = torch.tensor([3, 3, 10, 500, 999])
    ours = apply_penalties(x, SamplingParams(repetition_penalty=1.3), seen, None)
    ref = RepetitionPenaltyLogitsProcessor(1.3)(seen.unsqueeze(0), x.clone().unsqueeze(0))[0]
    torch.testing.assert_close(ours, ref.double())  # the sampler's maths runs in float64
    assert ours[10] == pytest.approx(float(x[10]) / 1.3 if x[10] > 0 else float(x[10]) * 1.3)


def test_presence_and_frequency_penalties_by_hand():
    x = logits(5)
    counts = torch.zeros(V)
    counts[7], counts[8] = 3, 1
    ours = apply_penalties(x, SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), torch.tensor([]), counts)
    assert ours[7] == pytest.approx(float(x[7]) - 0.25 * 3 - 0.5)
    assert ours[8] == pytest.approx(float(x[8]) - 0.25 * 1 - 0.5)
    assert ours[9] == x[9]


def test_greedy_is_argmax_and_a_point_mass():
    x = logits(6)
    token, sampling_lp = choose(x, SamplingParams(temperature=0), None)
    assert token == int(x.argmax()) and sampling_lp[token] == 0 and torch.isinf(sampling_lp).sum() == V - 1


def test_exponential_race_samples_the_distribution():
    # frequencies of 20k draws match the softmax probabilities (a few standard errors)
    x = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    params = SamplingParams(temperature=1.0)
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(5)
    for _ in range(20000):
        token, _ = choose(x, params, torch.empty(5).exponential_(generator=g))
        counts[token] += 1
    probs = x.softmax(-1)
    stderr = (probs * (1 - probs) / 20000).sqrt()
    assert ((counts / 20000 - probs).abs() < 4 * stderr).all()


def test_noise_is_shared_across_vocab_sizes():
    a = draw_noise(torch.Generator().manual_seed(1), 50257, "cpu")
    b = draw_noise(torch.Generator().manual_seed(1), NOISE_SIZE, "cpu")
    assert torch.equal(a, b[:50257])


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_k=0), dict(max_new_tokens=0),
                                 dict(stop=[""]), dict(repetition_penalty=0), dict(seed=-1), dict(seed=2**63)])
def test_invalid_settings_are_refused(bad):
    with pytest.raises(NanoplayError, match="invalid sampling setting"):
        SamplingParams(**bad)


def test_the_largest_seed_works():
    params = SamplingParams(seed=2**63 - 1, max_new_tokens=1)
    torch.Generator().manual_seed(params.seed)
