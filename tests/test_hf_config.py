"""
Every transformers GPT2Config setting that changes the maths is honoured (logits equal transformers'
within 1e-4) or refused with one line; and an untied output head lives through loading, saving,
scoring and training.
"""

import json

import pytest
import torch

from nanoplay.checkpoint import save_checkpoint
from nanoplay.errors import NanoplayError
from nanoplay.loading import load_model

VOCAB = 512  # small: these tests build a model per setting
IDX = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(4))
BASE = dict(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=VOCAB, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1)


def hf_model(seed=0, attn_implementation=None, **settings):
    """A random transformers GPT-2 with weights large enough that every setting moves the logits."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(**{**BASE, **settings})
    if attn_implementation:
        cfg._attn_implementation = attn_implementation
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # biases and LayerNorm affines: random, so a dropped one is caught
                p.normal_(0, 0.3).add_(1.0 if "ln" in name and name.endswith("weight") else 0.0)
            else:  # wider than GPT-2's 0.02, so that pre-activations reach where activations differ
                p.normal_(0, 0.25)
    return model


def hf_logits(model):
    with torch.no_grad():
        return model(IDX).logits


def save_hf(model, directory):
    model.save_pretrained(directory)  # safetensors
    assert (directory / "model.safetensors").is_file()
    return directory


def max_diff(a, b):
    return (a - b).abs().max().item()


# (settings, the loaded config's value that shows it was read)
HONOURED = [
    *[({"activation_function": a}, None) for a in (
        "gelu_new", "gelu", "gelu_fast", "gelu_pytorch_tanh", "gelu_python", "gelu_python_tanh", "gelu_accurate",
        "gelu_10", "quick_gelu", "laplace", "relu", "relu2", "relu6", "leaky_relu", "hardswish", "silu", "swish",
        "mish", "sqrtsoftplus", "sigmoid", "tanh", "linear")],
    ({"n_inner": 48}, ("n_inner", 48)),
    ({"layer_norm_epsilon": 0.5}, ("layer_norm_epsilon", 0.5)),
    ({"scale_attn_weights": False}, ("scale_attn_weights", False)),
    ({"scale_attn_by_inverse_layer_idx": True}, ("scale_attn_by_inverse_layer_idx", True)),
    ({"scale_attn_weights": False, "scale_attn_by_inverse_layer_idx": True}, ("scale_attn_weights", False)),
    ({"reorder_and_upcast_attn": True}, None),  # fp32 scores: the same maths (eager attention, below)
    ({"tie_word_embeddings": False}, ("tie_word_embeddings", False)),
    ({"n_positions": 32}, ("block_size", 32)),
]


@pytest.mark.parametrize("settings,read", HONOURED, ids=lambda v: json.dumps(v) if isinstance(v, dict) else "")
def test_honoured_settings_match_transformers(tmp_path, settings, read):
    eager = "eager" if "reorder_and_upcast_attn" in settings else None  # the only path that reorders
    hf = hf_model(attn_implementation=eager, **settings)
    loaded = load_model(str(save_hf(hf, tmp_path / "hf")))
    with torch.no_grad():
        ours = loaded.model(IDX)
    diff = max_diff(ours, hf_logits(hf))
    print(f"{settings}: max |logit difference| {diff:.2e}")
    assert diff < 1e-4
    if read:
        assert getattr(loaded.config, read[0]) == read[1]


# settings that keep the weights' shapes: with the setting dropped, transformers' own logits move far
# more than the tolerance, so the comparison above can fail
SHAPE_KEEPING = [s for s, _ in HONOURED if not {"n_inner", "tie_word_embeddings", "n_positions"} & s.keys()
                 and s != {"reorder_and_upcast_attn": True} and s.get("activation_function") not in (
                     "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "gelu_python_tanh", "gelu_accurate")]


@pytest.mark.parametrize("settings", SHAPE_KEEPING, ids=lambda s: json.dumps(s))
def test_each_setting_changes_the_logits(settings):
    with_setting, without = hf_model(**settings), hf_model()
    assert max_diff(hf_logits(with_setting), hf_logits(without)) > 1e-3  # 10x the tolerance


@pytest.mark.parametrize("settings,edit,message", [
    ({"activation_function": "prelu"}, None,
     "uses activation_function 'prelu', which has learned parameters of its own; nanoplay supports the parameter-free"),
    ({"activation_function": "xielu"}, None, "uses activation_function 'xielu', which has learned parameters"),
    ({}, {"activation_function": "gelu_fancy"},
     "uses activation_function 'gelu_fancy', which transformers' GPT-2 does not know either"),
    ({"add_cross_attention": True}, None, "has cross-attention layers (add_cross_attention)"),
    ({}, {"vocab_size": 600}, ("transformer.wte.weight has shape (512, 32), config expects (600, 32) (the config's "
                               "vocab_size does not match the weights)")),
    ({}, {"n_positions": 128}, "transformer.wpe.weight has shape (64, 32), config expects (128, 32)"),
    ({}, {"n_inner": 64}, "mlp.c_fc.weight has shape"),
    ({}, {"tie_word_embeddings": False}, ("its config says the output head is not tied to the input embedding "
                                          "(tie_word_embeddings false), but it holds no lm_head.weight")),
])
def test_refused_settings_say_so_in_one_line(tmp_path, settings, edit, message):
    directory = save_hf(hf_model(**settings), tmp_path / "hf")
    if edit:  # a config.json that disagrees with its weights, or that transformers cannot build
        cfg = json.loads((directory / "config.json").read_text())
        (directory / "config.json").write_text(json.dumps({**cfg, **edit}))
    with pytest.raises(NanoplayError) as e:
        load_model(str(directory))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_n_ctx_is_ignored_as_transformers_ignores_it(tmp_path):
    hf = hf_model()
    directory = save_hf(hf, tmp_path / "hf")
    cfg = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**cfg, "n_ctx": 16}))
    loaded = load_model(str(directory))
    assert loaded.config.block_size == 64
    assert max_diff(loaded.model(IDX).detach(), hf_logits(hf)) < 1e-4


def test_our_config_refuses_settings_it_does_not_know(tmp_path):
    from nanoplay.model import GPT, GPTConfig

    save_checkpoint(GPT(GPTConfig(block_size=16, vocab_size=VOCAB, n_layer=1, n_head=2, n_embd=16)), tmp_path / "ck")
    config = json.loads((tmp_path / "ck" / "config.json").read_text())
    config["model"]["rotary"] = True  # written by some later version: it would change the maths
    (tmp_path / "ck" / "config.json").write_text(json.dumps(config))
    with pytest.raises(NanoplayError, match=r"ck: unknown model settings rotary: written by a newer nanoplay\?"):
        load_model(str(tmp_path / "ck"))


# ---- an untied output head, end to end


@pytest.fixture
def untied(tmp_path):
    """A transformers GPT-2 saved with tie_word_embeddings=false and its own lm_head.weight."""
    hf = hf_model(seed=3, tie_word_embeddings=False)
    assert not torch.equal(hf.lm_head.weight, hf.transformer.wte.weight)
    return hf, save_hf(hf, tmp_path / "untied")


def test_untied_head_loads_saves_and_reloads(untied, tmp_path):
    hf, directory = untied
    loaded = load_model(str(directory))
    assert loaded.config.tie_word_embeddings is False
    assert loaded.model.lm_head.weight is not loaded.model.transformer.wte.weight
    diff = max_diff(loaded.model(IDX).detach(), hf_logits(hf))
    print(f"untied head, HF directory: max |logit difference| {diff:.2e}")
    assert diff < 1e-4
    # our format keeps it: config and weights, in a checkpoint directory and a bare safetensors file
    save_checkpoint(loaded.model, tmp_path / "ck")
    again = load_model(str(tmp_path / "ck"))
    assert again.config == loaded.config
    assert max_diff(again.model(IDX).detach(), hf_logits(hf)) < 1e-4
    bare = load_model(str(tmp_path / "ck" / "model.safetensors"))
    assert max_diff(bare.model(IDX).detach(), hf_logits(hf)) < 1e-4


def test_untied_head_scores_like_transformers(untied):
    from nanoplay import Engine, SamplingParams

    hf, directory = untied
    engine = Engine()
    loaded = engine.load(str(directory), device="cpu")  # the engine's decode layout keeps the two apart
    ids = IDX[0].tolist()
    scored = engine.score(loaded, ids, eot_prefix=False)
    expected = hf_logits(hf)[0].log_softmax(-1)[torch.arange(len(ids) - 1), IDX[0, 1:]]
    torch.testing.assert_close(torch.tensor([t.logprob for t in scored], dtype=torch.float32), expected,
                               atol=1e-4, rtol=0)
    greedy = engine.generate(loaded, ids, SamplingParams(max_new_tokens=1, temperature=0), eot_prefix=False)
    assert greedy.tokens[0].id == hf_logits(hf)[0, -1].argmax().item()


def test_untied_head_trains_and_saves(tmp_path, monkeypatch):
    from trainer import checkpoints
    from trainer.config import load_preset
    from trainer.finetune import pad_vocab
    from trainer.train import model_from_spec

    monkeypatch.setenv("NANOPLAY_CHECKPOINTS", str(tmp_path / "checkpoints"))
    directory = save_hf(hf_model(tie_word_embeddings=False, vocab_size=50257), tmp_path / "untied")  # the trainer's vocabulary
    model, _ = model_from_spec(str(directory), load_preset("demo"), crop_block_size=False)
    assert model.config.tie_word_embeddings is False
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    head_before = model.lm_head.weight.detach().clone()
    for _ in range(2):
        _, loss = model(IDX[:, :-1], IDX[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert not torch.equal(model.lm_head.weight, head_before)  # the head trains as a parameter of its own
    step_dir = checkpoints.save_step(tmp_path / "checkpoints" / "run", 2, model, {"step": 2}, meta={})
    model.eval()
    loaded = load_model(str(step_dir))
    assert loaded.config.tie_word_embeddings is False
    torch.testing.assert_close(loaded.model(IDX), model(IDX), atol=1e-6, rtol=0)
    # padded for chat fine-tuning: the head gets its new rows too, and the old ids' logits stay
    padded = pad_vocab(model)
    torch.testing.assert_close(padded(IDX)[..., :50257], model(IDX), atol=1e-5, rtol=0)
