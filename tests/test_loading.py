"""Every on-disk format, and every bad input with its one-line message."""

import shutil
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
    with pytest.raises(NanoplayError, match="ckpt.pt is not a loadable checkpoint"):
        load_model(str(pt))
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text('{"model_type": "gpt2", ')  # a Hugging Face directory cut short
    (hf / "model.safetensors").write_bytes(b"")
    with pytest.raises(NanoplayError, match=r"hf/config.json is unreadable or not JSON \(.*\): the checkpoint is damaged"):
        load_model(str(hf))


def test_unknown_spec(checkpoints, tiny_run):
    with pytest.raises(NanoplayError, match=r"unknown model './nope.pt'.*local checkpoints: tiny"):
        load_model("./nope.pt")


def test_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"model": Evil(), "model_args": {}}, tmp_path / "evil.pt")
    with pytest.raises(NanoplayError, match="not a loadable checkpoint"):
        load_model(str(tmp_path / "evil.pt"))


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
