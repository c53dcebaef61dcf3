"""Sampling filters and penalties against transformers' logits processors and hand computations."""

import math
import random

import pytest
import torch

from nanoplay.errors import NanoplayError
from nanoplay.sampling import SamplingParams, apply_penalties, choose, draw_noise, exponential, filter_logits

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
    token, sampling = choose(x, SamplingParams(temperature=0), None)
    sampling_lp = sampling.row
    assert token == int(x.argmax()) and sampling_lp[token] == 0 and torch.isinf(sampling_lp).sum() == V - 1
    assert sampling.at([3, token, 0]) == sampling_lp[[3, token, 0]].tolist()


def test_exponential_race_samples_the_distribution():
    # frequencies of 20k draws match the softmax probabilities (a few standard errors)
    x = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    params = SamplingParams(temperature=1.0)
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(5)
    for _ in range(20000):
        token, _ = choose(x, params, torch.rand(5, generator=g, dtype=torch.float64))
        counts[token] += 1
    probs = x.softmax(-1)
    stderr = (probs * (1 - probs) / 20000).sqrt()
    assert ((counts / 20000 - probs).abs() < 4 * stderr).all()


def test_noise_is_shared_across_vocab_sizes():
    a = draw_noise(1, 0, 50257, "cpu")
    b = draw_noise(1, 0, 50304, "cpu")
    assert torch.equal(a, b[:50257])


# SplitMix64 seeded with 1234567: its first five outputs (Rosetta Code, "Pseudo-random numbers/Splitmix64")
SPLITMIX64_1234567 = [6457827717110365317, 3203168211198807973, 9817491932198370423, 4593380528125082431,
                      16408922859458223821]


def test_noise_is_splitmix64_in_torch_and_in_c():
    """The torch version, the C one and plain Python integers give the published SplitMix64 outputs and
    the same bits as each other, for keys and indices near the ends of their ranges."""
    import nanoplay.cpu_kernel as cpu_kernel
    from nanoplay.sampling import _mix, _uniforms, noise_key

    expected = torch.tensor([(z >> 11) * 2.0**-53 for z in SPLITMIX64_1234567], dtype=torch.float64)
    assert torch.equal(_uniforms(1234567, 5, "cpu"), expected)
    keys = [noise_key(seed, index) for seed in (0, 1, 2**31, 2**63 - 1) for index in (0, 1, 10**6)]
    assert len(set(keys)) == len(keys)
    for key in keys + [0, 2**64 - 1]:
        reference = _uniforms(key, 50304, "cpu")
        assert float(reference[7]) == (_mix((key + 8 * 0x9E3779B97F4A7C15) % 2**64) >> 11) * 2.0**-53
        assert bool(((reference >= 0) & (reference < 1)).all())
        if not cpu_kernel.kernel_status():
            assert torch.equal(cpu_kernel.uniform_noise(key, 50304), reference), key
    if not cpu_kernel.kernel_status():
        assert torch.equal(cpu_kernel.uniform_noise(1234567, 5), expected)


def test_noise_is_exponential():
    """Exp(1): P(E > t) = e^-t, checked at several t over 20 draws of 50304 (4 standard errors), down to
    the tail that decides unlikely tokens (t = 12: 6e-6, which float32 uniforms, with 24 bits, would cut
    off at 16.6 altogether)."""
    noise = torch.cat([exponential(draw_noise(2, index, 50304, "cpu")) for index in range(20)])
    n = noise.numel()
    assert noise.dtype == torch.float64 and bool((noise >= 0).all())
    for t in (0.1, 0.5, 1, 2, 4, 8, 12):
        p = math.exp(-t)
        assert abs(float((noise > t).double().mean()) - p) < 4 * math.sqrt(p * (1 - p) / n) + 1e-9, t
    assert float(noise.max()) > 12


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_k=0), dict(max_new_tokens=0),
                                 dict(stop=[""]), dict(repetition_penalty=0), dict(seed=-1), dict(seed=2**63)])
def test_invalid_settings_are_refused(bad):
    with pytest.raises(NanoplayError, match="invalid sampling setting"):
        SamplingParams(**bad)


def test_the_largest_seed_works():
    params = SamplingParams(seed=2**63 - 1, max_new_tokens=1)
    noise = draw_noise(params.seed, 2**40, V, "cpu")
    assert bool(((noise >= 0) & (noise < 1)).all()) and noise.unique().numel() == V


# -- non-finite logits and extreme settings (issue 11, item 1) -------------------------------------------

def test_a_tiny_temperature_is_greedy_not_token_0():
    # 1e-38 overflowed logits / temperature to +-inf: softmax NaN, argmax token 0, null log-probs
    x = logits(7)
    for index, temperature in enumerate((1e-38, 1e-300, 5e-324)):
        token, sampling = choose(x, SamplingParams(temperature=temperature), draw_noise(0, index, V, "cpu"))
        sampling_lp = sampling.row
        assert token == int(x.argmax()) != 0
        assert sampling_lp[token] == 0.0 and not torch.isnan(sampling_lp).any()


def test_infinite_logits_take_all_the_mass_and_nan_is_named():
    from nanoplay.sampling import Distribution, logits_fault

    x = logits(8)
    x[[5, 9]] = float("inf")
    lp = Distribution.of(x.unsqueeze(0), 5).logprobs[0]
    assert lp[5] == lp[9] == pytest.approx(math.log(0.5)) and torch.isinf(lp).sum() == V - 2
    picks = {choose(x, SamplingParams(temperature=0.7), draw_noise(1, index, V, "cpu"))[0] for index in range(50)}
    assert picks == {5, 9}
    assert choose(x, SamplingParams(temperature=0), None)[0] == 5
    x[3] = float("nan")
    ruled_out = torch.full((V,), float("-inf"))
    assert logits_fault(torch.stack([x, logits(9), ruled_out])) == [
        "model produced NaN logits (damaged weights, or an overflow in its dtype: try --dtype float32)", None,
        "model produced logits that are -inf for every token"]


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("bad", ["temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                                 "frequency_penalty"])
def test_infinite_settings_are_refused(bad, value):
    """NaN fails every range check, so a range message (temperature must be >= 0) would name the wrong fault."""
    with pytest.raises(NanoplayError, match=f"^invalid sampling setting: {bad} must be a finite number$"):
        SamplingParams(**{bad: value})


def random_row(rng: random.Random, size: int) -> torch.Tensor:
    """Logits a model could produce, and worse: ordinary, huge, tiny, +-inf (never all -inf)."""
    kinds = [lambda: rng.gauss(0, 5), lambda: rng.choice([-1, 1]) * 3e38, lambda: rng.choice([-1, 1]) * 1e-45,
             lambda: float("-inf"), lambda: float("inf"), lambda: rng.gauss(0, 1e30)]
    weights = [10, 1, 1, 2, rng.choice([0, 0, 0, 1]), 1]
    row = torch.tensor([rng.choices(kinds, weights)[0]() for _ in range(size)], dtype=torch.float32)
    if torch.isinf(row).all() and (row < 0).all():
        row[0] = 0.0
    return row


def random_params(rng: random.Random) -> SamplingParams:
    pick = rng.choice
    return SamplingParams(
        temperature=pick([0, 1e-38, 5e-324, 1e-6, 0.7, 1, 100, 1e300]),
        top_k=pick([None, 1, 2, 5, 30]), top_p=pick([None, 1e-12, 0.1, 0.9, 1.0]), min_p=pick([None, 0, 0.5, 1.0]),
        repetition_penalty=pick([1.0, 1e-30, 0.5, 2.0, 1e30]), presence_penalty=pick([0.0, -2.0, 2.0, 1e300, -1e300]),
        frequency_penalty=pick([0.0, 1.0, -1e308, 1e308]), seed=1)


def test_any_logits_and_settings_give_an_allowed_token_with_finite_logprobs():
    """A seeded property test: 400 random rows and settings, extremes included."""
    from nanoplay.sampling import Distribution

    rng = random.Random(11)
    size = 40
    for case in range(400):
        row, params = random_row(rng, size), random_params(rng)
        seen = torch.tensor(rng.sample(range(size), rng.randrange(size // 2)), dtype=torch.long)
        counts = torch.zeros(size)
        counts[seen[: len(seen) // 2]] = torch.tensor([float(rng.randrange(1, 4)) for _ in seen[: len(seen) // 2]])
        penalised = apply_penalties(row, params, seen, counts)
        noise = draw_noise(11, case, size, "cpu")
        token, sampling = choose(penalised, params, noise)
        sampling_lp = sampling.row
        where = f"case {case}: {params}"
        ids = [token, *rng.sample(range(size), 3)]
        assert sampling.at(ids) == sampling_lp[ids].tolist(), where  # a few ids alone: the same bits
        assert not torch.isnan(sampling_lp).any(), where
        assert torch.isfinite(sampling_lp[token]), where  # the token is one the filters kept
        assert float(sampling_lp.logsumexp(-1)) == pytest.approx(0.0, abs=1e-9), where  # a distribution
        assert torch.isfinite(Distribution.of(row.unsqueeze(0), 2).logprobs[0, token]), where  # under the model too
        assert row[token] != float("-inf"), where  # never a token the model rules out
        if torch.isinf(row).any() and (row == float("inf")).any():
            assert row[token] == float("inf"), where  # +inf takes all the mass
        higher = int((penalised > penalised[token]).sum())
        if params.top_k is not None:
            assert higher < params.top_k, where
        if params.temperature == 0 or params.top_k == 1 or params.top_p == 1e-12:
            assert higher == 0, where  # greedy, or a filter that keeps only the best


def test_filtered_tokens_are_never_drawn_even_with_zero_noise():
    x = logits(10)
    noise = torch.full((V,), 0.5, dtype=torch.float64)
    noise[int(x.argmin())] = 0.0  # U = 0 gives E = 0, which made -log E = +inf, and -inf + inf = NaN won the argmax
    token, _ = choose(x, SamplingParams(top_k=3), noise)
    assert token in torch.topk(x, 3).indices.tolist()


# -- stop-string escapes and per-prompt seeds (items 3, 4) ----------------------------------------------

@pytest.mark.parametrize("typed, stop", [(r"\n", "\n"), (r"\n\nUser:", "\n\nUser:"), (r"a\tb", "a\tb"),
                                         (r"C:\\dir", "C:\\dir"), (r"\u00e9t\u00E9", "été"), (r"1\,5", "1,5"),
                                         ("plain", "plain"), ("é\n", "é\n"),
                                         (r"a\ud83d\ude00b", "a\U0001f600b")])  # a UTF-16 pair is one character
def test_stop_string_escapes(typed, stop):
    from nanoplay.sampling import format_stop_string, parse_stop_string

    assert parse_stop_string(typed) == stop
    assert parse_stop_string(format_stop_string(stop)) == stop


@pytest.mark.parametrize("typed, message", [(r"\q", "unknown escape"), ("end\\", "unknown escape"),
                                            (r"\x41", "unknown escape"), (r"\u12", r"\\u takes exactly 4 hex digits"),
                                            (r"\ud83d", "a lone surrogate"), (r"\ude00\ud83d", "a lone surrogate")])
def test_bad_stop_escapes_are_refused(typed, message):
    from nanoplay.sampling import parse_stop_string

    with pytest.raises(NanoplayError, match=message):
        parse_stop_string(typed)


def test_the_playground_reads_stop_strings_by_the_same_rule():
    from nanoplay.sampling import parse_stop_string
    from nanoplay.tui.screens.settings import parse_stop, show

    assert parse_stop(r" \n\nUser: , a\,b, C:\\ ") == [parse_stop_string(r"\n\nUser:"), "a,b", "C:\\"]
    assert parse_stop(show("stop", ["\n", "a,b", "x\\y"])) == ["\n", "a,b", "x\\y"]


def test_prompt_seeds_never_collide_with_sample_seeds():
    from nanoplay.sampling import derive_seed

    for base in (0, 1337, 2**31 - 1, 2**63 - 5):
        seeds = [derive_seed(base, k, i) for k in range(50) for i in range(20)]
        assert seeds[:3] == [base % 2**63, (base + 1) % 2**63, (base + 2) % 2**63]  # prompt 0: seed, seed+1, ...
        assert len({s % 2**32 for s in seeds}) == len(seeds)  # distinct even in their low 32 bits


@pytest.fixture(params=["compiled", "torch"])
def figures_path(request, monkeypatch):
    """Distribution's figures from the compiled kernel (kernels/distribution.c), or from torch."""
    import nanoplay.cpu_kernel as cpu_kernel

    if request.param == "compiled" and cpu_kernel.kernel_status():
        pytest.skip(cpu_kernel.kernel_status())
    if request.param == "torch":
        monkeypatch.setattr(cpu_kernel, "distribution_statistics", lambda logits, top: None)
    return request.param


def test_distribution_figures_match_a_full_pass_over_the_vocabulary(figures_path):
    """Distribution takes shortcuts (the top entries give the greedy token and most ranks; C or torch
    computes max, log_z and entropy): each figure against its definition over the whole row, in float64,
    ties and extremes included, and rows wider than the kernel's chunks (4096 entries)."""
    from nanoplay.sampling import Distribution, stable_logits

    rng = random.Random(5)
    rows = [random_row(rng, 60) for _ in range(40)]
    for row in rows[:10]:  # ties for first place, which torch.argmax breaks by the lowest id
        row[[7, 3, 50]] = row.max() + 1 if torch.isfinite(row.max()) else 0.0
    rows += [torch.tensor([2.0, 1.0, 2.0] + [-math.inf] * 57), torch.tensor([0.0] * 60)]
    wide = torch.randn(9000, generator=torch.Generator().manual_seed(5)) * 4
    wide[[8191, 4096, 4095, 8999]] = wide.max() + 2  # tied across the chunks' edges
    rows += [wide, torch.randn(9000, generator=torch.Generator().manual_seed(6)) * 4]
    for i, row in enumerate(rows):
        if torch.isnan(row).any() or (row == -math.inf).all():
            continue
        size = row.numel()
        d = Distribution.of(row.unsqueeze(0), 5)
        reference = stable_logits(row).log_softmax(-1)  # float64, +inf rows made finite
        torch.testing.assert_close(d.logprobs[0], reference, rtol=1e-15, atol=1e-13, msg=str(i))
        probs = reference.exp()
        assert float(d.entropy[0]) == pytest.approx(float(torch.special.entr(probs).sum()), abs=1e-9), i
        assert int(d.greedy()[0]) == int(torch.argmax(stable_logits(row))), i
        # every token, the likely and the unlikely: rank = 1 + how many are strictly more likely
        tokens = list(range(size))
        many = Distribution(d.logits.expand(size, -1), d.max.expand(size), d.log_z.expand(size),
                            d.entropy.expand(size), d.top_ids.expand(size, -1), d.top_logprobs.expand(size, -1),
                                d.finite_checked)
        chosen, rank, top_ids, top_lp = many.figures(tokens, 3)
        torch.testing.assert_close(torch.tensor(chosen, dtype=torch.float64), reference, rtol=1e-15, atol=1e-13,
                                   msg=str(i))
        stable = stable_logits(row)
        assert rank == [int((stable > stable[t]).sum()) + 1 for t in range(size)], i
        assert chosen == d.logprobs[0].tolist(), i  # Python's float64 arithmetic is torch's
        top = torch.tensor(top_lp[0], dtype=torch.float64)
        torch.testing.assert_close(top, reference.sort(descending=True).values[:3], rtol=1e-15, atol=1e-13)
        assert torch.equal(d.logprobs[0][top_ids[0]], top), i  # the same float64 arithmetic
    # equal logits: the lower id first, as argmax, in both paths (topk lists ties in an order of its own)
    assert Distribution.of(wide.unsqueeze(0), 5).top_ids[0, :4].tolist() == [4095, 4096, 8191, 8999]
    ties = torch.zeros(1, 50304)
    ties[0, [40000, 3, 17, 50000, 9]] = 1.0
    assert Distribution.of(ties, 4).top_ids[0].tolist() == [3, 9, 17, 40000]
    assert Distribution.of(torch.zeros(1, 300), 4).top_ids[0].tolist() == [0, 1, 2, 3]


def test_figures_stay_exact_for_a_model_all_but_certain(figures_path):
    """Rows [0, d] for d from -745 to 0: log_z = log(1 + e^d) and the entropy, against math's, to float64
    rounding even where e^d is 1e-300 (log1p of what the maximum's 1 leaves, not the log of 1 + e^d); in
    the kernel this checks its e^x over the whole range it takes, as the entropy shows e^d's error."""
    from nanoplay.sampling import Distribution

    d = torch.linspace(-745.0, 0.0, 20001)
    figures = Distribution.of(torch.stack([torch.zeros_like(d), d], dim=1), 2)
    for k in range(0, 20001, 7):
        x = float(d[k])  # float32 -> exact in float64
        log_z = math.log1p(math.exp(x))
        entropy = -(math.exp(-log_z) * -log_z + math.exp(x - log_z) * (x - log_z))
        if x > -708:
            assert float(figures.log_z[k]) == pytest.approx(log_z, rel=1e-14, abs=1e-320), x
            assert float(figures.entropy[k]) == pytest.approx(entropy, rel=1e-13, abs=1e-320), x
        else:  # the kernel adds nothing below e^-708: 1e-308 of a total of at least 1
            assert float(figures.log_z[k]) == pytest.approx(log_z, abs=1e-307), x


def test_compiled_figures_agree_with_torch_and_not_with_the_thread_count(monkeypatch):
    """kernels/distribution.c against the torch path, and the same bits with one thread or two."""
    import nanoplay.cpu_kernel as cpu_kernel
    from nanoplay.sampling import Distribution

    if cpu_kernel.kernel_status():
        pytest.skip(cpu_kernel.kernel_status())
    batch = torch.randn(5, 50304, generator=torch.Generator().manual_seed(3)) * 3
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2):
            torch.set_num_threads(count)
            results.append(cpu_kernel.distribution_statistics(batch, 20))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*results))
    monkeypatch.setattr(cpu_kernel, "distribution_statistics", lambda logits, top: None)
    reference = Distribution.of(batch, 20)
    row_max, log_z, entropy, top_ids, top_logprobs = results[0]
    assert torch.equal(row_max, reference.max) and torch.equal(top_ids, reference.top_ids)
    # the top log-probabilities by the torch path's arithmetic, on its own log Z
    expected = (batch.double().gather(1, top_ids) - row_max.unsqueeze(1)) - log_z.unsqueeze(1)
    assert torch.equal(top_logprobs, expected)
    torch.testing.assert_close(top_logprobs, reference.top_logprobs, rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(log_z, reference.log_z, rtol=1e-15, atol=0)
    torch.testing.assert_close(entropy, reference.entropy, rtol=1e-13, atol=0)


def test_finite_check_sends_nan_inf_and_overflowing_rows_down_the_exact_path():
    from nanoplay.sampling import all_finite, logits_fault, stable_logits

    finite = torch.tensor([[1.0, -2.0, 3.0]])
    assert all_finite(finite)
    for bad in (math.nan, math.inf, -math.inf):
        assert not all_finite(torch.tensor([[1.0, bad, 3.0]]))
    huge = torch.tensor([[3e38, 3e38, -1.0]])  # finite, but its float32 sum overflows
    assert not all_finite(huge)
    assert logits_fault(huge) == [None]
    assert torch.equal(stable_logits(huge), huge.double())


def test_the_compiled_race_draws_what_the_torch_chain_draws(monkeypatch):
    """choose at a temperature alone runs in C where the kernels load: the same token as the torch chain
    for seeded random rows (extremes, ties, rows wider than a 4096-entry chunk; float32 and float64),
    temperatures from 5e-324 to 1e300 and noise with zeros, and the same sampling log-probabilities to
    float64 rounding, asked for a few ids or the whole row."""
    import nanoplay.cpu_kernel as cpu_kernel

    if cpu_kernel.kernel_status():
        pytest.skip(cpu_kernel.kernel_status())
    rng = random.Random(12)
    compiled_race = cpu_kernel.temperature_race
    used = 0
    for case in range(300):
        size = rng.choice([1, 3, 40, 9000])
        row = random_row(rng, size)
        row[torch.isinf(row)] = 0.0  # finite rows: others go to the torch chain
        if rng.random() < 0.2:
            row[: size // 2] = row.max()  # ties for first place
        params = SamplingParams(temperature=rng.choice([5e-324, 1e-38, 1e-6, 0.7, 1.0, 100.0, 1e300]), seed=1)
        noise = draw_noise(12, case, size, "cpu")
        if rng.random() < 0.1:
            noise[rng.randrange(size)] = 0.0  # E = 0 wins
        logits = row.double() if case % 2 else row  # penalised rows are float64, raw ones float32
        monkeypatch.setattr(cpu_kernel, "temperature_race", compiled_race)
        used += compiled_race(logits, params.temperature, noise) is not None
        token, sampling = choose(logits, params, noise)
        monkeypatch.setattr(cpu_kernel, "temperature_race", lambda *args: None)
        ref_token, ref = choose(logits, params, noise)
        where = f"case {case}: size {size}, temperature {params.temperature}"
        assert token == ref_token, where
        torch.testing.assert_close(sampling.row, ref.row, rtol=1e-13, atol=1e-12, msg=where)
        ids = [token, *rng.sample(range(size), min(size, 3))]
        assert sampling.at(ids) == sampling.row[ids].tolist(), where
    assert used == 300  # every case took the compiled race
