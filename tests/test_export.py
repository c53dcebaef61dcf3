"""Exports other tools run as they are: Hugging Face directories (transformers) and GGUF files (llama.cpp)."""

import json
import os
import stat

import numpy as np
import pytest
import torch

from nanoplay.chat import CHAT_TEMPLATE, encode_conversation
from nanoplay.checkpoint import save_checkpoint
from nanoplay.cli import main
from nanoplay.engine import Engine
from nanoplay.errors import NanoplayError
from nanoplay.export import EXPORTED_FILES, export_hf, gpt2_bpe_file, hf_config_kwargs
from nanoplay.gguf_format import FILE_TYPES, write_gguf
from nanoplay.loading import load_model
from nanoplay.model import GPTConfig
from nanoplay.sampling import SamplingParams
from nanoplay.tokenizer import get_tokenizer
from tests.conftest import TINY, tiny_model

# text that exercises GPT-2's pre-tokenizer: contractions, non-ASCII letters, digits, runs of spaces and newlines
PROMPT = "The café's naïve owner said:  \"it's 3.14!\"\n\n\tOK — 7 cats"
IDX = torch.randint(0, 50257, (2, 11), generator=torch.Generator().manual_seed(3))


def positional_model(**overrides):
    """A tiny model whose position embeddings dominate, so each greedy token depends on its position: a
    continuation conditioned one position off (a missing or extra <|endoftext|>) differs at every token."""
    model = tiny_model(**overrides)
    with torch.no_grad():
        model.transformer.wpe.weight.mul_(30)
    return model


def logits(model, idx=IDX):
    with torch.no_grad():
        return model(idx)


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def nanoplay_greedy(checkpoint, prompt, max_new_tokens=12):
    """nanoplay's own greedy continuation: the engine, its tokenizer and its conditioning rule."""
    engine = Engine()
    loaded = engine.load(str(checkpoint), device="cpu")
    return engine.generate(loaded, prompt, SamplingParams(max_new_tokens=max_new_tokens, temperature=0, seed=0))


# -- Hugging Face ------------------------------------------------------------------------------------


def test_hf_export_runs_in_transformers_offline_with_nanoplays_tokens_and_text(tmp_path, hf_home):
    from transformers import AutoTokenizer, GenerationConfig, pipeline

    model = positional_model()
    save_checkpoint(model, tmp_path / "ck")
    directory = export_hf(model, tmp_path / "hf")
    assert sorted(p.name for p in directory.iterdir()) == sorted(EXPORTED_FILES)
    assert mode(directory) == 0o755 and all(mode(p) == 0o644 for p in directory.iterdir())
    config = json.loads((directory / "config.json").read_text())
    # the dropout it was trained with (GPTConfig.dropout, 0.0 here), not transformers' default of 0.1
    assert (config["resid_pdrop"], config["embd_pdrop"], config["attn_pdrop"]) == (0.0, 0.0, 0.0)
    assert config["tie_word_embeddings"] is True and config["n_ctx"] == TINY["block_size"]
    generation = GenerationConfig.from_pretrained(directory)
    assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id) == (50256, 50256, 50256)

    ours = get_tokenizer()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert tokenizer(PROMPT, add_special_tokens=False)["input_ids"] == ours.encode(PROMPT)
    # every text after <|endoftext|>, as nanoplay conditions it (engine.text_context)
    assert tokenizer(PROMPT)["input_ids"] == [50256, *ours.encode(PROMPT)]
    assert tokenizer.decode(ours.encode(PROMPT)) == PROMPT
    assert "<|user|>" not in tokenizer.get_vocab()  # not a chat model: no chat tokens, no template
    assert tokenizer.chat_template is None and tokenizer.model_max_length == TINY["block_size"]

    expected = nanoplay_greedy(tmp_path / "ck", PROMPT)
    generator = pipeline("text-generation", model=str(directory), device="cpu")
    out = generator(PROMPT, max_new_tokens=12, do_sample=False, return_tensors=True)[0]["generated_token_ids"]
    assert out == [50256, *ours.encode(PROMPT), *[t.id for t in expected.tokens]]
    assert len(set(out[-12:])) > 6  # a continuation that tells positions apart, not one repeated token
    assert tokenizer.decode(out[-12:]) == expected.text


def test_hf_export_of_a_chat_model_has_its_tokens_and_template(tmp_path, hf_home):
    from transformers import AutoTokenizer, GenerationConfig, GPT2LMHeadModel

    model = tiny_model(tie_word_embeddings=False, dropout=0.05)
    directory = export_hf(model, tmp_path / "hf", chat_template=CHAT_TEMPLATE)
    config = json.loads((directory / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["resid_pdrop"] == 0.05
    # the untied head travels: transformers computes our logits with it
    hf = GPT2LMHeadModel.from_pretrained(directory).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(IDX).logits, logits(model), atol=1e-4, rtol=1e-4)
    assert GenerationConfig.from_pretrained(directory).eos_token_id == [50256, 50260]  # <|end|> ends an answer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert [tokenizer.convert_tokens_to_ids(t) for t in ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")] == \
        [50257, 50258, 50259, 50260]
    conversation = [{"role": "system", "content": "You are terse."},
                    {"role": "user", "content": "Hi! Où est   la gare?\n"},
                    {"role": "assistant", "content": " It's 3 km north."},
                    {"role": "user", "content": "Thanks"}]
    for prompt in (True, False):
        ids = tokenizer.apply_chat_template(conversation, add_generation_prompt=prompt, tokenize=True,
                                            return_dict=False)
        assert ids == encode_conversation(conversation, add_generation_prompt=prompt)[0]
    assert tokenizer.decode([50258, 17250, 50260]) == "<|user|>Hi<|end|>"


def test_hf_config_records_the_trained_dropout():
    kwargs = hf_config_kwargs(GPTConfig(**TINY, dropout=0.2))
    assert (kwargs["resid_pdrop"], kwargs["embd_pdrop"], kwargs["attn_pdrop"]) == (0.2, 0.2, 0.2)


def test_hf_export_refuses_a_vocabulary_without_the_tokens_it_needs(tmp_path):
    with pytest.raises(NanoplayError, match="vocabulary has 65 entries, fewer than GPT-2's BPE needs"):
        export_hf(tiny_model(vocab_size=65), tmp_path / "hf")
    with pytest.raises(NanoplayError, match="fewer than GPT-2's BPE with the chat tokens needs"):
        export_hf(tiny_model(vocab_size=50257), tmp_path / "hf", chat_template=CHAT_TEMPLATE)
    assert not (tmp_path / "hf").exists()


# -- GGUF ----------------------------------------------------------------------------------------------


# every setting a GGUF carries for nanoplay: an untied head, the exact GELU (a key nanoplay reads), no
# biases (written as zeros: llama.cpp needs them), a chat model's tokens and template, its epsilon
EVERY_SETTING = {"tie_word_embeddings": False, "activation": "gelu", "bias": False, "layer_norm_epsilon": 1e-6}


# Q8_0 stores rows of whole 32-value blocks; a 48-wide model's 48-long rows fall back to F16, as llama.cpp's
# converter does, while its 192-long rows (the MLP's down projection) are Q8_0: one file reads all three types
Q8_0_MODEL = {"n_embd": 48}


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory):
    """
    GGUF files written and loaded back once each (reading one takes seconds): F32 of a model with every
    setting a GGUF carries, Q8_0 (with F16 and F32 tensors too) of a plain GPT-2-shaped one.
    """
    folder = tmp_path_factory.mktemp("gguf")
    models = {"f32": tiny_model(**EVERY_SETTING), "q8_0": tiny_model(**Q8_0_MODEL)}
    files = {t: write_gguf(m, folder / f"tiny-{t}.gguf", t, name="tiny",
                           chat_template=CHAT_TEMPLATE if t == "f32" else None) for t, m in models.items()}
    return models, files, {t: load_model(str(p)) for t, p in files.items()}


def test_gguf_f32_loads_back_with_the_same_logits_and_settings(gguf_files):
    models, files, loaded = gguf_files
    back = loaded["f32"]
    assert back.source == "gguf" and back.name == "tiny-f32.gguf" and back.meta["gguf_file_type"] == "F32"
    # the same settings, except that llama.cpp's GPT-2 has biases (ours, zero)
    assert back.config == GPTConfig(**{**models["f32"].config.to_dict(), "bias": True})
    assert back.chat_template == CHAT_TEMPLATE
    assert (logits(back.model) - logits(models["f32"])).abs().max() <= 1e-5
    assert mode(files["f32"]) == 0o644
    assert [p.name for p in files["f32"].parent.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_gguf_q8_0_and_f16_load_back_as_their_rounded_weights(gguf_files):
    import gguf

    models, _, loaded = gguf_files
    back = loaded["q8_0"]
    assert back.meta["gguf_file_type"] == "F16+F32+Q8_0" and back.config == models["q8_0"].config
    # the reference: the model with each matrix rounded as llama.cpp stores it (1-D tensors and the
    # position embeddings stay F32), computed here from the weights, not from the file
    rounded = tiny_model(**Q8_0_MODEL)
    with torch.no_grad():
        for name, p in rounded.named_parameters():
            if p.dim() == 2 and name != "transformer.wpe.weight":
                qtype = gguf.GGMLQuantizationType.Q8_0 if p.shape[1] % 32 == 0 else gguf.GGMLQuantizationType.F16
                p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(p.numpy(), qtype), qtype)))
    assert (logits(back.model) - logits(rounded)).abs().max() <= 1e-5
    assert 0 < (logits(back.model) - logits(models["q8_0"])).abs().max() <= 2e-2


def test_gguf_carries_llama_cpps_gpt2_metadata_tensors_and_tokenizer(gguf_files):
    import gguf

    models, files, _ = gguf_files
    cfg = models["q8_0"].config
    reader = gguf.GGUFReader(files["q8_0"])

    def value(key):
        return reader.get_field(key).contents()

    assert value("general.architecture") == "gpt2" and value("general.name") == "tiny"
    assert value("general.file_type") == 7  # LLAMA_FTYPE_MOSTLY_Q8_0
    assert [value(f"gpt2.{k}") for k in ("context_length", "embedding_length", "feed_forward_length", "block_count",
                                          "attention.head_count")] == [64, 48, 192, 2, 2]
    assert value("gpt2.attention.layer_norm_epsilon") == pytest.approx(cfg.layer_norm_epsilon)
    assert value("tokenizer.ggml.model") == "gpt2" and value("tokenizer.ggml.pre") == "gpt-2"
    tokens = value("tokenizer.ggml.tokens")
    encoder = json.loads(gpt2_bpe_file("encoder.json"))
    assert len(tokens) == cfg.vocab_size and tokens[464] == "The" and tokens[262] == "Ġthe"
    assert all(tokens[i] == t for t, i in encoder.items())
    assert tokens[50256] == "<|endoftext|>" and tokens[50300] == "[PAD50300]"
    types = value("tokenizer.ggml.token_type")
    assert (types[0], types[50256], types[50257]) == (1, 3, 5)  # NORMAL, CONTROL, UNUSED
    merges = value("tokenizer.ggml.merges")
    assert len(merges) == 50000 and merges[0] == "Ġ t"
    assert [value(f"tokenizer.ggml.{k}") for k in ("bos_token_id", "eos_token_id", "add_bos_token")] == \
        [50256, 50256, True]
    # tensors as llama.cpp's GPT-2 loader (src/models/gpt2.cpp) creates them: ggml shapes, innermost first
    n, ff, v, ctx = 48, 192, cfg.vocab_size, 64
    expected = {"token_embd.weight": [n, v], "position_embd.weight": [n, ctx],
                "output_norm.weight": [n], "output_norm.bias": [n]}
    for i in range(2):
        expected |= {f"blk.{i}.attn_norm.weight": [n], f"blk.{i}.attn_norm.bias": [n],
                     f"blk.{i}.attn_qkv.weight": [n, 3 * n], f"blk.{i}.attn_qkv.bias": [3 * n],
                     f"blk.{i}.attn_output.weight": [n, n], f"blk.{i}.attn_output.bias": [n],
                     f"blk.{i}.ffn_norm.weight": [n], f"blk.{i}.ffn_norm.bias": [n],
                     f"blk.{i}.ffn_up.weight": [n, ff], f"blk.{i}.ffn_up.bias": [ff],
                     f"blk.{i}.ffn_down.weight": [ff, n], f"blk.{i}.ffn_down.bias": [n]}
    assert {t.name: t.shape.tolist() for t in reader.tensors} == expected  # tied: no output.weight
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert {k for name, k in kinds.items() if len(expected[name]) == 1} == {"F32"}
    assert (kinds["position_embd.weight"], kinds["blk.0.ffn_down.weight"], kinds["blk.0.ffn_up.weight"]) == \
        ("F32", "Q8_0", "F16")
    # nn.Linear (out, in) as it is: row j of c_attn's weight is output feature j
    qkv = next(t for t in reader.tensors if t.name == "blk.0.attn_qkv.weight")
    rows = gguf.quants.dequantize(qkv.data, qkv.tensor_type)
    np.testing.assert_allclose(rows, models["q8_0"].transformer.h[0].attn.c_attn.weight.detach().numpy(), atol=2e-3)


def test_gguf_write_that_fails_leaves_the_earlier_file_and_no_trace(tmp_path, monkeypatch):
    from nanoplay import gguf_format

    earlier = tmp_path / "m.gguf"
    earlier.write_bytes(b"GGUF, an earlier export")

    def disk_full(model):
        yield "token_embd.weight", np.zeros((4, 4), dtype=np.float32)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf_format, "_tensors", disk_full)
    with pytest.raises(NanoplayError, match=r"^cannot write .*/m.gguf: No space left on device$"):
        write_gguf(tiny_model(), earlier)
    assert earlier.read_bytes() == b"GGUF, an earlier export" and [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


def _write_small_gguf(path, arch="gpt2", tokens=("a", "b"), skip=()):
    """A hand-made GGUF with a few keys and tensors: the shapes of other people's files, in milliseconds."""
    import gguf

    writer = gguf.GGUFWriter(path, arch=arch)
    keys = {"context_length": 8, "embedding_length": 4, "feed_forward_length": 16, "block_count": 1,
            "attention.head_count": 2}
    for key, v in keys.items():
        if key not in skip:
            writer.add_uint32(f"{arch}.{key}", v)
    writer.add_float32(f"{arch}.attention.layer_norm_epsilon", 1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(list(tokens))
    writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 4), dtype=np.float32))
    writer.add_tensor("position_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_files_nanoplay_cannot_run_are_refused_in_one_line(tmp_path):
    llama = _write_small_gguf(tmp_path / "llama.gguf", arch="llama")
    with pytest.raises(NanoplayError, match=r"llama.gguf is a 'llama' model: nanoplay runs GPT-2-architecture "
                                            r"models only$"):
        load_model(str(llama))
    other = _write_small_gguf(tmp_path / "other.gguf")
    with pytest.raises(NanoplayError, match=r"other.gguf has a BPE vocabulary other than GPT-2's: nanoplay tokenizes"):
        load_model(str(other))
    partial = _write_small_gguf(tmp_path / "partial.gguf", skip=("context_length",))
    with pytest.raises(NanoplayError, match=r"partial.gguf has no gpt2.context_length: not a complete GPT-2 GGUF"):
        load_model(str(partial))
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(llama.read_bytes()[:100])
    with pytest.raises(NanoplayError, match=r"cut.gguf is not a readable GGUF file \(.*\): it may be truncated"):
        load_model(str(cut))
    with pytest.raises(NanoplayError, match=r"unknown model '\./missing.gguf'"):
        load_model("./missing.gguf")


def test_gguf_export_refuses_what_llama_cpp_cannot_compute(tmp_path):
    with pytest.raises(NanoplayError, match="activation is relu; llama.cpp's GPT-2 computes the tanh GELU"):
        write_gguf(tiny_model(activation="relu"), tmp_path / "relu.gguf")
    with pytest.raises(NanoplayError, match="scales attention other than by 1/sqrt"):
        write_gguf(tiny_model(scale_attn_by_inverse_layer_idx=True), tmp_path / "scaled.gguf")
    assert list(tmp_path.iterdir()) == []


# -- the command -----------------------------------------------------------------------------------------


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_export_command_writes_both_formats(tiny_run, tmp_path, capsys):
    code, out, err = run_cli(capsys, "export", "tiny", "--hf", str(tmp_path / "hf"), "--gguf", str(tmp_path / "m.gguf"),
                             "--gguf-type", "f16")
    assert code == 0 and err == ""
    assert out.splitlines() == [
        f"exported tiny@200 to {tmp_path / 'hf'} (transformers: from_pretrained, pipeline)",
        f"exported tiny@200 to {tmp_path / 'm.gguf'} (GGUF F16, 5.0 MB; llama.cpp: llama-cli -m {tmp_path / 'm.gguf'})",
    ]
    assert mode(tmp_path / "m.gguf") == 0o644 and (tmp_path / "hf" / "tokenizer.json").is_file()
    # an earlier GGUF file is replaced
    assert run_cli(capsys, "export", "tiny@100", "--gguf", str(tmp_path / "m.gguf"))[0] == 0


@pytest.mark.parametrize("argv, message", [
    (["tiny"], "nothing to export: give --hf DIR, --gguf FILE, or both"),
    (["tiny", "--hf", "{tmp}/hf", "--gguf-type", "q8_0"], "--gguf-type applies to a GGUF export: give --gguf FILE too"),
    (["nope", "--gguf", "{tmp}/x.gguf"], "unknown model 'nope'"),
    (["tiny", "--gguf", "{tmp}/notes.gguf"], ("{tmp}/notes.gguf already exists and is not a GGUF file: give a new "
                                              "file name (only an earlier GGUF file is replaced)")),
    (["tiny", "--gguf", "{tmp}/model.bin"], "{tmp}/model.bin: give a file name ending in .gguf"),
    (["tiny", "--gguf", "{tmp}/notes.gguf/x.gguf"], ("cannot write {tmp}/notes.gguf/x.gguf: {tmp}/notes.gguf is a "
                                                     "file, not a folder")),
    (["tiny", "--hf", "{tmp}/notes.gguf"], "{tmp}/notes.gguf is a file, not a folder"),
])
def test_export_command_errors_are_one_line(tiny_run, hf_home, tmp_path, capsys, argv, message):
    (tmp_path / "notes.gguf").write_text("my notes")
    code, out, err = run_cli(capsys, "export", *[a.format(tmp=tmp_path) for a in argv])
    assert code == 2 and out == ""
    assert err.startswith("nanoplay: error: ") and message.format(tmp=tmp_path) in err and err.count("\n") == 1
    assert (tmp_path / "notes.gguf").read_text() == "my notes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "hf", "notes.gguf"]  # nothing written


def test_export_cli_type_choices_are_the_writers():
    from nanoplay.commands.export import GGUF_TYPES

    assert GGUF_TYPES == tuple(FILE_TYPES)
