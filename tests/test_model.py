"""The model against transformers' GPT-2 (the reference) with identical weights."""

import torch

from nanoplay.loading import config_from_hf, state_from_hf
from nanoplay.checkpoint import build_model
from tests.conftest import hf_gpt2


def _ours_from_hf(hf):
    cfg = config_from_hf(hf.config.to_dict(), "test")
    return build_model(cfg, state_from_hf(hf.state_dict()), "test")


def _check_logits_match(hf, vocab):
    ours = _ours_from_hf(hf)
    idx = torch.randint(0, vocab, (2, 37), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(idx).logits
        got = ours(idx)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_tiny_config_matches_transformers():
    _check_logits_match(hf_gpt2(), 50257)


def test_exact_gelu_matches_transformers():
    _check_logits_match(hf_gpt2(activation="gelu"), 50257)


def test_gpt2_shape_matches_transformers():
    # GPT-2 small's shape (12 layers, 12 heads, 768 wide, context 1024)
    _check_logits_match(hf_gpt2(n_layer=12, n_head=12, n_embd=768, n_positions=1024), 50257)


def test_last_only_equals_last_position():
    ours = _ours_from_hf(hf_gpt2())
    idx = torch.randint(0, 50257, (3, 20))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx, last_only=True)[:, 0], ours(idx)[:, -1])
