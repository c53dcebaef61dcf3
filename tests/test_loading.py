"""Every on-disk format, and every bad input with its one-line message."""

import os
import shutil
import stat
from pathlib import Path

import pytest
import torch

from nanoplay.checkpoint import load_checkpoint_dir, save_checkpoint
from nanoplay.errors import NanoplayError
from nanoplay.loading import load_model
from tests.conftest import hf_gpt2, tiny_model, write_hf_snapshot, write_nanogpt_ckpt

IDX = torch.randint(0, 50257, (2, 11), generator=torch.Generator().manual_seed(3))


def logits(model):
    with torch.no_grad():
        return model(IDX)


def test_our_directory_roundtrip(tmp_path):
    model = tiny_model(bias=False, activation="gelu", layer_norm_epsilon=1e-6)
    save_checkpoint(model, tmp_path / "ck", step=7, meta={"val_loss": 1.5})
    loaded = load_model(str(tmp_path / "ck"))
    assert loaded.source == "checkpoint" and loaded.step == 7 and loaded.meta["val_loss"] == 1.5
    assert loaded.config == model.config
    torch.testing.assert_close(logits(loaded.model), logits(model), rtol=0, atol=0)
    # the tie survives loading: one tensor serves input embedding and output head
    assert loaded.model.lm_head.weight is loaded.model.transformer.wte.weight


def test_checkpoint_names_and_steps(tiny_run):
    newest = load_model("tiny")
    assert newest.name == "tiny@200" and newest.step == 200
    older = load_model("tiny@100")
    assert older.step == 100
    torch.testing.assert_close(logits(older.model), logits(tiny_model(1)))
    with pytest.raises(NanoplayError, match="no step 300; available steps: 100, 200"):
        load_model("tiny@300")
    (tiny_run / "step-00000100" / "config.json").write_text("{not json")
    with pytest.raises(NanoplayError, match=r"step-00000100 is damaged or incomplete \(config.json or model.safetensors "
                                            r"missing or unreadable\); available steps: 200"):
        load_model("tiny@100")


def test_safetensors_file_alone(tmp_path):
    model = tiny_model()
    save_checkpoint(model, tmp_path / "ck")
    shutil.copy(tmp_path / "ck" / "model.safetensors", tmp_path / "weights.safetensors")
    loaded = load_model(str(tmp_path / "weights.safetensors"))
    torch.testing.assert_close(logits(loaded.model), logits(model))


@pytest.mark.parametrize("with_optimizer", [True, False])
def test_nanogpt_ckpt(tmp_path, with_optimizer):
    # nanoGPT trains with bias=False and the exact GELU; compare against transformers' "gelu"
    model = tiny_model(bias=False, activation="gelu")
    path = write_nanogpt_ckpt(tmp_path / "ckpt.pt", model, with_optimizer=with_optimizer)
    loaded = load_model(str(path))
    assert loaded.source == "nanogpt" and loaded.step == 5000
    assert loaded.config.activation == "gelu" and loaded.config.bias is False
    torch.testing.assert_close(logits(loaded.model), logits(model))


def test_nanogpt_exact_gelu_matches_transformers(tmp_path):
    hf = hf_gpt2(activation="gelu", vocab_size=50304)
    ours = load_model(str(_export_hf(hf, tmp_path))).model
    write_nanogpt_ckpt(tmp_path / "ckpt.pt", ours)
    loaded = load_model(str(tmp_path / "ckpt.pt")).model
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDX), hf(IDX).logits, atol=1e-4, rtol=1e-4)


def _export_hf(hf, tmp_path):
    hf.save_pretrained(tmp_path / "hfdir")
    return tmp_path / "hfdir"


def test_hf_directory(tmp_path):
    hf = hf_gpt2()
    loaded = load_model(str(_export_hf(hf, tmp_path)))
    assert loaded.source == "hf"
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(IDX), hf(IDX).logits, atol=1e-4, rtol=1e-4)


def test_hub_snapshot_offline(hf_home, checkpoints):
    hf = hf_gpt2(seed=5)
    write_hf_snapshot(hf_home, "gpt2", hf)
    loaded = load_model("gpt2")
    assert loaded.source == "hub" and loaded.name == "gpt2"
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(IDX), hf(IDX).logits, atol=1e-4, rtol=1e-4)


def test_hub_not_cached_offline(hf_home, checkpoints):
    with pytest.raises(NanoplayError) as e:
        load_model("gpt2-medium")
    assert str(e.value) == ("gpt2-medium is not in the local Hugging Face cache and the Hub cannot be "
                            "reached: run `nanoplay pull gpt2-medium` where you have network")


def test_not_gpt2_architecture(hf_home, checkpoints):
    hf = hf_gpt2()
    snap = write_hf_snapshot(hf_home, "someone/llama-ish", hf)
    cfg = (snap / "config.json").read_text().replace('"model_type": "gpt2"', '"model_type": "llama"')
    (snap / "config.json").write_text(cfg)
    with pytest.raises(NanoplayError, match="not a GPT-2-architecture model"):
        load_model("someone/llama-ish")


def test_truncated_checkpoints(tmp_path):
    save_checkpoint(tiny_model(), tmp_path / "ck")
    weights = tmp_path / "ck" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(NanoplayError, match="truncated or corrupt"):
        load_checkpoint_dir(tmp_path / "ck")
    pt = write_nanogpt_ckpt(tmp_path / "ckpt.pt", tiny_model())
    pt.write_bytes(pt.read_bytes()[:3000])
    with pytest.raises(NanoplayError) as e:
        load_model(str(pt))
    assert str(e.value) == f"{pt} is truncated (the file ends before its data does): re-copy or re-save it"
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text('{"model_type": "gpt2", ')  # a Hugging Face directory cut short
    (hf / "model.safetensors").write_bytes(b"")
    with pytest.raises(NanoplayError, match=r"hf/config.json is unreadable or not JSON \(.*\): the checkpoint is damaged"):
        load_model(str(hf))


def test_unknown_spec(checkpoints, tiny_run):
    with pytest.raises(NanoplayError, match=r"unknown model './nope.pt'.*local checkpoints: tiny"):
        load_model("./nope.pt")


def test_pickled_code_is_refused(tmp_path, capfd):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"model": Evil(), "model_args": {}}, tmp_path / "evil.pt")
    with pytest.raises(NanoplayError) as e:
        load_model(str(tmp_path / "evil.pt"))
    assert str(e.value) == (f"{tmp_path / 'evil.pt'} contains Python objects other than tensors; refused for safety "
                            f"(it asks for print; nanoplay unpickles only with weights_only=True)")
    # any class at all, even a harmless one, is refused the same way
    import argparse

    torch.save({"model": {}, "model_args": {}, "config": argparse.Namespace(lr=1)}, tmp_path / "ns.pt")
    with pytest.raises(NanoplayError, match=r"ns.pt contains Python objects other than tensors; refused for safety"):
        load_model(str(tmp_path / "ns.pt"))
    # a TorchScript archive holds code: refused before torch warns about it
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), tmp_path / "script.pt")
    with pytest.raises(NanoplayError, match=r"script.pt contains Python objects other than tensors; refused for "
                                            r"safety \(a TorchScript archive: it holds code\)"):
        load_model(str(tmp_path / "script.pt"))
    out, err = capfd.readouterr()
    assert "pwned" not in out and "Warning" not in err and "Weights only" not in err


@pytest.mark.parametrize("zipped", [True, False])
def test_truncated_torch_files_say_truncated(tmp_path, capfd, zipped):
    """torch.save's zip format, and the bare pickles before torch 1.6; cut inside the pickle or the tensor data."""
    path = tmp_path / "ckpt.pt"
    model = tiny_model()
    torch.save({"model": model.state_dict(), "model_args": {}}, path, _use_new_zipfile_serialization=zipped)
    whole = path.read_bytes()
    for cut in (100, len(whole) // 2, len(whole) - 10):
        path.write_bytes(whole[:cut])
        with pytest.raises(NanoplayError) as e:
            load_model(str(path))
        assert str(e.value) == f"{path} is truncated (the file ends before its data does): re-copy or re-save it"
    assert "Warning" not in capfd.readouterr().err


@pytest.mark.parametrize("overrides", [{}, {"bias": False, "activation": "gelu"}])
def test_export_hf_reads_back_in_transformers(tmp_path, overrides):
    from transformers import GPT2LMHeadModel

    from nanoplay.export import export_hf

    model = tiny_model(**overrides)
    export_hf(model, tmp_path / "hf")
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(IDX).logits, logits(model), atol=1e-4, rtol=1e-4)
    # and nanoplay reads its own export back as an HF-format directory
    torch.testing.assert_close(logits(load_model(str(tmp_path / "hf")).model), logits(model), atol=1e-5, rtol=1e-5)



def test_export_never_replaces_what_is_not_an_earlier_export(tmp_path, capfd):
    from nanoplay.export import export_hf

    model = tiny_model()
    project = tmp_path / "project"
    project.mkdir()
    (project / "notes.txt").write_text("important")
    with pytest.raises(NanoplayError, match=r"project already holds other files \(notes.txt\): give a new or empty"):
        export_hf(model, project)
    assert (project / "notes.txt").read_text() == "important"
    (tmp_path / "README.md").write_text("a file")
    with pytest.raises(NanoplayError, match="README.md is a file, not a folder"):
        export_hf(model, tmp_path / "README.md")
    assert (tmp_path / "README.md").read_text() == "a file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "project"]  # no leftovers either
    # an earlier export is replaced, an empty folder is filled, and "." has a name once resolved
    export_hf(tiny_model(seed=1), tmp_path / "hf")
    export_hf(model, tmp_path / "hf")
    torch.testing.assert_close(logits(load_model(str(tmp_path / "hf")).model), logits(model), atol=1e-5, rtol=1e-5)
    (tmp_path / "empty").mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path / "empty")
        assert export_hf(model, Path(".")) == tmp_path / "empty"
    assert (tmp_path / "empty" / "model.safetensors").is_file()
    assert "Writing" not in capfd.readouterr().err  # no progress bars from transformers

def test_hub_revision_offline(hf_home, checkpoints):
    commit = "fedcba9876543210fedcba9876543210fedcba98"
    hf = hf_gpt2(seed=9)
    write_hf_snapshot(hf_home, "someone/tiny-gpt", hf, commit=commit)
    loaded = load_model(f"someone/tiny-gpt@{commit}")
    assert loaded.name == f"someone/tiny-gpt@{commit}"
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(IDX), hf(IDX).logits, atol=1e-4, rtol=1e-4)
    with pytest.raises(NanoplayError, match="someone/tiny-gpt@v2 is not in the local Hugging Face cache"):
        load_model("someone/tiny-gpt@v2")


def test_unreachable_hub_data_set_fails_without_a_request(monkeypatch):
    import datasets
    import huggingface_hub.constants as constants
    import huggingface_hub.utils._http as http

    import nanoplay.loading as loading
    from nanoplay.textdata import load_text_dataset

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(loading, "hub_reachable", lambda: False)
    requests = []

    def no_network():
        requests.append(1)
        raise ConnectionError("no network in this test")

    monkeypatch.setattr(http, "get_session", no_network)
    with pytest.raises(NanoplayError, match="someone/not-cached is not in the local caches and the Hub cannot be reached"):
        load_text_dataset("someone/not-cached")
    assert requests == []  # only the cache was tried
    assert constants.HF_HUB_OFFLINE is False and datasets.config.HF_HUB_OFFLINE is False  # switch restored


def test_a_malformed_hub_id_is_named_as_such(hf_home):
    from nanoplay.loading import hub_download

    with pytest.raises(NanoplayError, match=r"'a/b/c' is not a Hub repo id: give owner/name"):
        hub_download("a/b/c")


# ---- nanoGPT's GELU: tanh until June 2023, exact since, never recorded


def nanogpt_forward(state: dict, n_head: int, idx: torch.Tensor, gelu: str) -> torch.Tensor:
    """nanoGPT's model.py of early 2023, written out: explicit masked-softmax attention and its new_gelu."""
    import math

    from torch.nn import functional as F

    def new_gelu(x):  # nanoGPT's, until commit 594068e (June 2023)
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))

    act = new_gelu if gelu == "tanh" else F.gelu
    w = {k.removeprefix("_orig_mod."): v for k, v in state.items()}

    def linear(x, name):
        return x @ w[name + ".weight"].T + w.get(name + ".bias", 0)

    def layer_norm(x, name):
        return F.layer_norm(x, (x.size(-1),), w[name + ".weight"], w.get(name + ".bias"), 1e-5)

    B, T = idx.shape
    x = w["transformer.wte.weight"][idx] + w["transformer.wpe.weight"][:T]
    C = x.size(-1)
    for i in range(sum(1 for k in w if k.endswith(".ln_1.weight"))):
        h = f"transformer.h.{i}"
        q, k, v = linear(layer_norm(x, h + ".ln_1"), h + ".attn.c_attn").split(C, dim=2)
        q, k, v = (t.view(B, T, n_head, C // n_head).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(C // n_head)
        att = att.masked_fill(torch.tril(torch.ones(T, T)) == 0, float("-inf")).softmax(-1)
        x = x + linear((att @ v).transpose(1, 2).reshape(B, T, C), h + ".attn.c_proj")
        x = x + linear(act(linear(layer_norm(x, h + ".ln_2"), h + ".mlp.c_fc")), h + ".mlp.c_proj")
    return layer_norm(x, "transformer.ln_f") @ w["lm_head.weight"].T


def old_nanogpt_ckpt(path, *, bias_key: bool, tied: bool = True, vocab_size=50304, config=None):
    """A ckpt.pt as nanoGPT's train.py wrote it; bias_key=False: before January 2023's bias option (with its
    causal-mask buffers). Weights wide enough that the two GELUs give logits further apart than 1e-3."""
    model = tiny_model(seed=11, vocab_size=vocab_size, tie_word_embeddings=tied)
    state = {}
    with torch.no_grad():
        for k, v in model.state_dict().items():
            state[k] = v.normal_(0, 0.3).add_(1.0 if "ln" in k and k.endswith("weight") else 0.0) if v.dim() == 1 \
                else v.normal_(0, 0.25)
    cfg = model.config
    args = dict(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, block_size=cfg.block_size,
                dropout=0.0, vocab_size=vocab_size)
    if bias_key:
        args["bias"] = True
    else:
        for i in range(cfg.n_layer):
            state[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(cfg.block_size, cfg.block_size)).view(
                1, 1, cfg.block_size, cfg.block_size)
    torch.save({"model": {"_orig_mod." + k: v for k, v in state.items()}, "model_args": args, "iter_num": 600,
                "config": config or {"dataset": "openwebtext"}}, path)
    return state


def test_nanogpt_before_the_bias_option_is_tanh(tmp_path):
    state = old_nanogpt_ckpt(tmp_path / "ckpt.pt", bias_key=False)
    loaded = load_model(str(tmp_path / "ckpt.pt"))
    assert loaded.config.activation == "gelu_tanh" and loaded.notes == []  # proven by the file: nothing assumed
    with torch.no_grad():
        ours, tanh, exact = loaded.model(IDX), nanogpt_forward(state, 2, IDX, "tanh"), nanogpt_forward(state, 2, IDX, "exact")
    diff = (ours - tanh).abs().max().item()
    print(f"nanoGPT without 'bias' (tanh): max |logit difference| {diff:.2e}; exact GELU would be "
          f"{(exact - tanh).abs().max().item():.2e} off")
    assert diff < 1e-4 and (exact - tanh).abs().max() > 1e-3


def test_nanogpt_gelu_assumed_is_said_and_can_be_overridden(tmp_path, capsys):
    from nanoplay.cli import main
    from nanoplay.engine import Engine

    path = tmp_path / "out" / "ckpt.pt"
    path.parent.mkdir()
    state = old_nanogpt_ckpt(path, bias_key=True)
    with torch.no_grad():
        tanh, exact = nanogpt_forward(state, 2, IDX, "tanh"), nanogpt_forward(state, 2, IDX, "exact")
    assumed = load_model(str(path))
    assert assumed.config.activation == "gelu" and assumed.name == "out/ckpt.pt"
    assert assumed.notes == ["GELU assumed exact (not recorded; add #gelu=tanh for nanoGPT before June 2023)"]
    torch.testing.assert_close(assumed.model(IDX), exact, atol=1e-4, rtol=0)
    # the same override in a spec (CLI, TUI), load_model and Engine.load
    for loaded in (load_model(f"{path}#gelu=tanh"), load_model(str(path), gelu="tanh"),
                   Engine().load(str(path), device="cpu", gelu="tanh")):
        assert loaded.name == "out/ckpt.pt#gelu=tanh" and loaded.notes == []
        with torch.no_grad():
            diff = (loaded.model(IDX) - tanh).abs().max().item()
        assert diff < 1e-4, diff
    print(f"nanoGPT with #gelu=tanh: max |logit difference| {diff:.2e}")
    torch.testing.assert_close(load_model(f"{path}#gelu=exact").model(IDX), exact, atol=1e-4, rtol=0)
    # the CLI says what it assumed, on stderr
    assert main(["gen", "-m", str(path), "--prompt", "Hi", "--max-new-tokens", "1", "--json"]) == 0
    err = capsys.readouterr().err
    assert "note: out/ckpt.pt: GELU assumed exact (not recorded; add #gelu=tanh for nanoGPT before June 2023)" in err


@pytest.mark.parametrize("spec,message", [
    ("{path}#gelu=fast", "the part after # must be gelu=tanh or gelu=exact"),
    ("{path}#tanh", "the part after # must be gelu=tanh or gelu=exact"),
    ("tiny#gelu=tanh", "tiny: gelu= applies to a nanoGPT ckpt.pt, whose GELU is not recorded"),
    ("gpt2#gelu=tanh", "gpt2: gelu= applies to a nanoGPT ckpt.pt"),
])
def test_gelu_option_is_checked(tmp_path, tiny_run, hf_home, spec, message):
    old_nanogpt_ckpt(tmp_path / "ckpt.pt", bias_key=True)
    with pytest.raises(NanoplayError, match=message):
        load_model(spec.format(path=tmp_path / "ckpt.pt"))
    with pytest.raises(NanoplayError, match="asks for gelu=tanh but gelu='exact' was also given"):
        load_model(f"{tmp_path / 'ckpt.pt'}#gelu=tanh", gelu="exact")


def test_nanogpt_before_weight_tying_keeps_its_own_head(tmp_path):
    state = old_nanogpt_ckpt(tmp_path / "ckpt.pt", bias_key=False, tied=False)
    loaded = load_model(str(tmp_path / "ckpt.pt"))
    assert loaded.config.tie_word_embeddings is False
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(IDX), nanogpt_forward(state, 2, IDX, "tanh"), atol=1e-4, rtol=0)


def test_nanogpt_model_args_nanogpt_never_had_are_refused(tmp_path):
    model = tiny_model()
    write_nanogpt_ckpt(tmp_path / "ckpt.pt", model)
    data = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    data["model_args"]["n_kv_head"] = 1  # a fork's grouped-query attention, say
    torch.save(data, tmp_path / "fork.pt")
    with pytest.raises(NanoplayError, match=r"fork.pt: its model_args hold n_kv_head, which nanoGPT's do not: a "
                                            r"modified nanoGPT that nanoplay cannot run faithfully"):
        load_model(str(tmp_path / "fork.pt"))


# ---- a vocabulary that is not GPT-2's: a character-level nanoGPT


@pytest.fixture
def char_ckpt(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    old_nanogpt_ckpt(tmp_path / "ckpt_char.pt", bias_key=True, vocab_size=65, config={"dataset": "shakespeare_char"})
    (tmp_path / "meta.pkl").write_bytes(b"never unpickled")
    return tmp_path / "ckpt_char.pt"


CHAR_MESSAGE = ("ckpt_char.pt has a 65-token vocabulary, not GPT-2's BPE (a character-level nanoGPT model, data set "
                "shakespeare_char): nanoplay encodes text with GPT-2's BPE only; its characters are in meta.pkl, a "
                "pickle nanoplay does not read, so it would need that character table as a tokenizer")


@pytest.mark.parametrize("argv", [
    ["score", "-m", "./ckpt_char.pt", "--text", "First Citizen:"],
    ["gen", "-m", "./ckpt_char.pt", "--prompt", "First Citizen:"],
    ["eval", "-m", "./ckpt_char.pt", "-d", "text.txt"],
])
def test_char_level_model_is_named_in_one_line(char_ckpt, capsys, argv):
    from nanoplay.cli import main

    (char_ckpt.parent / "text.txt").write_text("First Citizen: Before we proceed any further, hear me speak.\n")
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2
    assert CHAR_MESSAGE in (err if argv[0] != "eval" else out + err)
    assert "Traceback" not in err and "IndexError" not in err


def test_every_entry_point_checks_token_ids_in_the_engine(char_ckpt, tiny_run):
    from nanoplay import Engine, SamplingParams

    engine = Engine()
    char = engine.load("./ckpt_char.pt", device="cpu")
    assert char.name == "ckpt_char.pt" and "65-token vocabulary, not GPT-2's" in char.notes
    for call in (lambda: engine.score(char, "First"), lambda: engine.submit(char, "First"),
                 lambda: engine.score(char, [3, 4, 80], eot_prefix=False)):
        with pytest.raises(NanoplayError) as e:
            call()
        assert str(e.value) == CHAR_MESSAGE
    # token ids of its own vocabulary (the caller's own tokenizer) are fine
    assert len(engine.score(char, [3, 4, 5], eot_prefix=False)) == 2
    assert len(engine.generate(char, [3, 4], SamplingParams(max_new_tokens=2), eot_prefix=False).tokens) == 2
    tiny = engine.load("tiny", device="cpu")
    for call in (lambda: engine.score(tiny, [5, 50304]), lambda: engine.submit(tiny, [-1, 5])):
        with pytest.raises(NanoplayError, match=r"token id (50304|-1) is outside tiny@200's vocabulary of 50304 "
                                                r"\(ids 0 to 50303\)"):
            call()


# ---- the GPT-2 family's old and new names on the Hub


@pytest.mark.parametrize("cached,asked", [("openai-community/gpt2", "gpt2"), ("gpt2", "openai-community/gpt2"),
                                          ("distilbert/distilgpt2", "distilgpt2")])
def test_either_hub_name_finds_either_cached_copy(hf_home, checkpoints, cached, asked):
    hf = hf_gpt2(seed=6)
    write_hf_snapshot(hf_home, cached, hf)
    loaded = load_model(asked)
    assert loaded.source == "hub" and loaded.name == asked
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(IDX), hf(IDX).logits, atol=1e-4, rtol=1e-4)


def test_models_lists_a_moved_repo_once(hf_home, checkpoints, capsys, monkeypatch):
    from nanoplay.cli import main
    from nanoplay.loading import list_local_models

    monkeypatch.setenv("COLUMNS", "200")
    write_hf_snapshot(hf_home, "openai-community/gpt2", hf_gpt2())
    write_hf_snapshot(hf_home, "gpt2", hf_gpt2(), commit="1" * 40)
    write_hf_snapshot(hf_home, "distilbert/distilgpt2", hf_gpt2())
    assert [m.spec for m in list_local_models()] == ["distilgpt2", "gpt2"]
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "openai-community" not in out and "distilbert/" not in out
    assert "Not downloaded: gpt2-medium, gpt2-large, gpt2-xl (" in out


# ---- written files get the usual permissions


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_have_the_usual_permissions(tmp_path, monkeypatch, umask):
    from nanoplay.atomic import write_file_atomically
    from nanoplay.tui.sessions import save_session

    monkeypatch.setenv("NANOPLAY_SESSIONS", str(tmp_path / "sessions"))
    old = os.umask(umask)
    try:
        save_checkpoint(tiny_model(), tmp_path / "ck")
        session = save_session("s1", {"panes": []})
        note = write_file_atomically(tmp_path / "note.md", "# hi\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "ck").stat().st_mode) == 0o777 & ~umask
    for f in (tmp_path / "ck" / "model.safetensors", tmp_path / "ck" / "config.json", session, note):
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f
