"""Tiny models in every on-disk format nanoplay reads, built offline."""

import copy

import pytest
import torch
from safetensors.torch import save_file

from nanoplay.checkpoint import save_checkpoint, step_dir_name
from nanoplay.model import GPT, GPTConfig

# Vocabulary large enough for real GPT-2 token ids, everything else tiny.
TINY = dict(block_size=64, vocab_size=50304, n_layer=2, n_head=2, n_embd=32)


def tiny_model(seed=0, **overrides) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**TINY, **overrides}))
    # random biases and LayerNorm affines, so a loader that drops one is caught
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(0, 0.1).add_(1.0 if "ln" in name and name.endswith("weight") else 0.0)
    return model.eval()


def hf_gpt2(seed=0, n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=50257, activation="gelu_new"):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=n_positions,
                     vocab_size=vocab_size, activation_function=activation,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(0, 0.1).add_(1.0 if "ln" in name and name.endswith("weight") else 0.0)
    return model


def write_hf_snapshot(hf_home, repo_id, hf_model, commit="0123456789abcdef0123456789abcdef01234567"):
    """A Hugging Face cache entry, laid out as huggingface_hub writes it."""
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    hf_model.config.to_json_file(snap / "config.json")
    # GPT-2 on the Hub stores keys without the `transformer.` prefix: do the same
    state = {k.removeprefix("transformer."): v.contiguous() for k, v in hf_model.state_dict().items()
             if k != "lm_head.weight"}
    save_file(state, snap / "model.safetensors", metadata={"format": "pt"})
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snap


@pytest.fixture(autouse=True)
def float32_by_default(monkeypatch):
    """--dtype auto is float32 in every test, whatever the machine: the exact-match tests pin it (on a CPU
    with native bf16 products auto would pick bf16; see nanoplay.precision)."""
    from nanoplay import precision

    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset())


@pytest.fixture
def checkpoints(tmp_path, monkeypatch):
    """An empty checkpoints/ directory that nanoplay discovers."""
    root = tmp_path / "checkpoints"
    root.mkdir()
    monkeypatch.setenv("NANOPLAY_CHECKPOINTS", str(root))
    return root


@pytest.fixture
def tiny_run(checkpoints):
    """checkpoints/tiny with steps 100 and 200 (different weights)."""
    for step, seed in ((100, 1), (200, 2)):
        save_checkpoint(tiny_model(seed), checkpoints / "tiny" / step_dir_name(step), step=step)
    return checkpoints / "tiny"


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    home = tmp_path / "hf"
    home.mkdir()
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    return home


def write_nanogpt_ckpt(path, model: GPT, with_optimizer=True, compiled=True):
    """A ckpt.pt as nanoGPT's train.py writes it."""
    cfg = model.config
    prefix = "_orig_mod." if compiled else ""
    ckpt = {
        "model": {prefix + k: v for k, v in model.state_dict().items()},
        "model_args": dict(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                           block_size=cfg.block_size, bias=cfg.bias, vocab_size=cfg.vocab_size, dropout=0.0),
        "iter_num": 5000,
        "best_val_loss": torch.tensor(3.5),
        "config": {"dataset": "openwebtext", "batch_size": 12},
    }
    if with_optimizer:  # real AdamW state, from a step on a copy (the saved weights stay as given)
        trained = copy.deepcopy(model)
        opt = torch.optim.AdamW(trained.parameters(), lr=1e-3)
        trained(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))[1].backward()
        opt.step()
        ckpt["optimizer"] = opt.state_dict()
    torch.save(ckpt, path)
    return path


def disjoint_window_nll(model: GPT, ids: torch.Tensor, context: int) -> tuple[float, int]:
    """A model's summed loss over `ids` by its own forward on disjoint windows of `context` tokens (each
    window's first token unscored), and the count of tokens scored: the reference the strided rule at
    stride = context must equal."""
    nll, count = 0.0, 0
    for begin in range(0, ids.numel(), context):
        window = ids[begin:begin + context]
        if window.numel() < 2:
            continue
        with torch.no_grad():
            _, loss = model(window[None, :-1], window[None, 1:])
        nll += loss.item() * (window.numel() - 1)
        count += window.numel() - 1
    return nll, count
