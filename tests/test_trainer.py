"""The trainer: data through one path, the loop, exact resume, atomic checkpoints, signals, DDP."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nanoplay.checkpoint import list_steps, load_checkpoint_dir, read_config
from nanoplay.errors import NanoplayError
from nanoplay.loading import load_model
from nanoplay.textdata import load_text_dataset, resolve_source
from nanoplay.tokenizer import EOT_ID, get_tokenizer
from trainer import checkpoints, data
from trainer.config import TrainConfig, load_config, load_preset, read_config_file
from trainer.loop import lr_at
from trainer.monitor import braille_plot, peak_flops, read_metrics
from trainer.train import train

REPO = Path(__file__).resolve().parents[1]
TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=4, gradient_accumulation_steps=1,
            max_iters=12, warmup_iters=2, learning_rate=3e-3, eval_interval=6, eval_batches=2,
            checkpoint_interval=6, keep_last=5, log_interval=100, sample_tokens=0, name="tiny")
TINY_FLAGS = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items() if k != "name"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Checkpoints, token cache and HF home in temporary folders; pydoc-topics tokenised once per module."""
    root = tmp_path_factory.mktemp("trainer")
    values = {"NANOPLAY_CHECKPOINTS": str(root / "checkpoints"), "NANOPLAY_DATA_CACHE": str(root / "tokens"),
              "HF_HOME": str(root / "hf"), "HF_HUB_OFFLINE": "1"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in values.items():
            mp.setenv(k, v)
        yield root


@pytest.fixture
def run_root(env, tmp_path, monkeypatch):
    """A fresh checkpoints folder per test (the token cache stays shared)."""
    monkeypatch.setenv("NANOPLAY_CHECKPOINTS", str(tmp_path / "checkpoints"))
    return tmp_path / "checkpoints"


def subprocess_env():
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


# --- config ----------------------------------------------------------------------------------------


def test_presets_read_and_flags_override():
    owt = load_preset("owt-30m")
    assert (owt.n_layer, owt.n_head, owt.n_embd, owt.block_size, owt.vocab_size) == (6, 6, 384, 512, 50304)
    assert owt.batch_size * owt.gradient_accumulation_steps == 64 and owt.max_iters == 20000
    assert (owt.beta1, owt.beta2, owt.weight_decay, owt.grad_clip, owt.dropout) == (0.9, 0.95, 0.1, 1.0, 0.0)
    assert owt.data == "openwebtext" and owt.name == "owt-30m"
    gpt2 = load_preset("gpt2-124m")
    assert (gpt2.n_layer, gpt2.n_head, gpt2.n_embd, gpt2.block_size) == (12, 12, 768, 1024)
    assert load_config("demo", overrides={"max_iters": 7, "learning_rate": None}).max_iters == 7
    with pytest.raises(NanoplayError, match="unknown preset 'nope'"):
        load_preset("nope")


def test_printed_config_reads_back_and_unknown_keys_are_refused(tmp_path):
    cfg = load_preset("demo", max_iters=33)
    path = tmp_path / "my.toml"
    path.write_text(cfg.to_toml())
    assert TrainConfig(**read_config_file(path)) == cfg
    path.write_text("[optim]\nmax_iter = 3\n")
    with pytest.raises(NanoplayError, match="unknown key 'max_iter'"):
        read_config_file(path)
    path.write_text("[optim]\nmax_iters = 'many'\n")
    with pytest.raises(NanoplayError, match="max_iters must be a int"):
        read_config_file(path)


BAD_VALUES = [
    (["--learning-rate", "-1"], "learning_rate must be greater than 0, not -1.0"),
    (["--dropout", "1.5"], "dropout must be at least 0 and below 1, not 1.5"),
    (["--learning-rate", "inf"], "learning_rate must be a finite number, not inf"),  # passed `> 0`
    (["--min-lr", "nan"], "min_lr must be a finite number, not nan"),  # passed `< 0`
    (["--grad-clip", "nan"], "grad_clip must be a finite number, not nan"),
    (["--val-fraction", "nan"], "val_fraction must be a finite number, not nan"),
    (["--activation", "gelu2"], "activation 'gelu2': use gelu_tanh or gelu or gelu_10 or quick_gelu"),
    (["--vocab-size", "100"], "vocab_size 100 is smaller than the GPT-2 tokenizer's 50257 tokens: "
                              "use 50304 (padded to a multiple of 64, the default) or 50257"),
    (["--batch-size", "0"], "batch_size must be at least 1, not 0"),
    (["--warmup-iters", "-5"], "warmup_iters must be 0 or more, not -5"),
    (["--seed", "-1"], "seed must be 0 or more, not -1"),
    (["--n-head", "5"], "n_embd (32) must be divisible by n_head (5)"),
    (["--device", "tpu"], "device 'tpu': give cpu or cuda[:N]"),
    (["--device", "meta"], "device meta: nanoplay runs on cpu or cuda[:N]"),
    (["--device", "mps"], "device mps: nanoplay runs on cpu or cuda[:N]"),
]


@pytest.mark.parametrize("flags, message", BAD_VALUES, ids=[f[0][0] for f in BAD_VALUES])
def test_bad_settings_are_one_line_and_exit_2_before_anything_runs(env, run_root, capsys, flags, message):
    from nanoplay import cli

    assert cli.main(["train", "--preset", "demo", *TINY_FLAGS, "--name=bad", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"nanoplay: error: {message}") and err.count("\n") == 1
    assert not (run_root / "bad").exists()


@pytest.mark.parametrize("name", ["", ".", "..", "../escape", "a/b", "a\\b", ".hidden", "demo@3", " x"])
def test_run_names_are_one_plain_folder_name(env, run_root, capsys, name):
    from nanoplay import cli

    assert cli.main(["train", "--preset", "demo", *TINY_FLAGS, f"--name={name}"]) == 2
    assert capsys.readouterr().err == (f"nanoplay: error: run name {name!r}: use one plain folder name such as "
                                       f"my-run (no /, \\ or @, not empty, not starting with a dot)\n")
    assert not run_root.exists() and not (run_root.parent / "escape").exists()
    with pytest.raises(NanoplayError, match="run name '../escape'"):
        train(TrainConfig(name="../escape"))


def test_learning_rate_schedule_by_hand():
    cfg = TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=4, lr_decay_iters=14, max_iters=40)
    assert lr_at(0, cfg) == pytest.approx(1 / 5)
    assert lr_at(3, cfg) == pytest.approx(4 / 5)
    assert lr_at(4, cfg) == pytest.approx(1.0)  # cosine starts at the top
    assert lr_at(9, cfg) == pytest.approx(0.1 + 0.5 * 0.9)  # half way: cos = 0
    assert lr_at(14, cfg) == pytest.approx(0.1) and lr_at(39, cfg) == pytest.approx(0.1)


@pytest.mark.parametrize("max_iters, warmup_iters, lr_decay_iters", [
    (8, 20, 0),  # the default fine-tune: 3 epochs of 20 conversations, warm-up 20 steps
    (12, 2, 0), (100, 500, 0), (300, 30, 0), (40, 0, 1000), (1000, 500, 20000), (1, 5, 0),
])
def test_the_schedule_fits_any_run_length(max_iters, warmup_iters, lr_decay_iters):
    cfg = TrainConfig(learning_rate=1e-3, min_lr=1e-4, warmup_iters=warmup_iters, lr_decay_iters=lr_decay_iters,
                      max_iters=max_iters)
    lrs = [lr_at(step, cfg) for step in range(max_iters)]
    warmup = min(warmup_iters, max_iters // 10)  # at most a tenth of the run
    assert max(lrs) == pytest.approx(1e-3)  # every run reaches its learning rate...
    assert lrs.index(max(lrs)) == warmup  # ...right after its warm-up
    assert all(a < b for a, b in zip(lrs[:warmup], lrs[1:warmup + 1]))  # warming up
    assert all(a >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1:]))  # then decaying...
    if max_iters >= 2:
        assert lr_at(max_iters, cfg) == pytest.approx(1e-4)  # ...to min_lr by the end of the run
        assert lrs[-1] < 1e-3


def test_a_short_run_warns_in_one_line_and_print_config_notes_the_capped_schedule(env, run_root, capsys):
    from nanoplay import cli

    assert cli.main(["train", "--preset", "demo", "--max-iters", "8", "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "warmup_iters = 30  # capped to 0 steps: warm-up takes at most 10% of max_iters 8" in printed
    cfg = load_preset("demo", **{**TINY, "max_iters": 3, "eval_interval": 0, "name": "short"})
    train(cfg, display="plain")
    err = capsys.readouterr().err.splitlines()
    assert err == ["warning: 3 steps are too few to learn much (the loss barely moves in under 50): raise --max-iters"]
    train(load_preset("demo", **{**TINY, "max_iters": 50, "eval_interval": 0, "name": "long"}), display="plain")
    assert capsys.readouterr().err == ""


def test_eta_is_smooth_through_compilation_recompilation_and_evaluation_spikes():
    from trainer.monitor import eta_seconds

    # a hand-made run of 200 steps: 1 s each, the first 30 s (compilation), a 12 s recompilation at
    # step 3 (a new batch shape), 0.5 s steps in a quiet stretch, and an 8 s evaluation after every 50th step
    steps = [30.0, 1.0, 12.0] + [1.0] * 37 + [0.5] * 20 + [1.0] * 140
    evals = {50: 8.0, 100: 8.0, 150: 8.0}  # after these steps (the one at 200 ends the run: not ahead of any step)
    truth = [sum(steps[k + 1:]) + sum(v for s, v in evals.items() if s > k + 1) for k in range(len(steps))]
    etas, overhead = [], 0.0
    for k in range(len(steps)):
        overhead += evals.get(k, 0.0)  # the evaluation after step k shows up between step k and step k + 1
        etas.append(eta_seconds(steps[:k + 1], overhead, len(steps) - k - 1))
    assert math.isnan(etas[0])  # the first step (compilation) says nothing about the others
    for k in range(1, len(steps) - 1):
        assert truth[k] / 1.6 <= etas[k] <= truth[k] * 1.6, (k, etas[k], truth[k])
        assert etas[k + 1] <= etas[k] * 1.25, (k, etas[k], etas[k + 1])  # never jumps up
    # by hand: after step 60, the median of the last 50 steps (1 s: 30 of them) plus 8 s spread over 59 steps
    assert etas[59] == pytest.approx(140 * (1.0 + 8.0 / 59))


def test_braille_plot_and_peak_table():
    # two columns of dots: the first value at the top row, the second at the bottom row of a 1x1 cell
    assert braille_plot([1.0, 0.0], width=1, height=1) == [chr(0x2800 + 0x01 + 0x80)]
    assert braille_plot([5.0, 5.0], width=1, height=1) == [chr(0x2800 + 0x40 + 0x80)]  # flat: the bottom row
    lines = braille_plot([float(i) for i in range(100)], width=10, height=3)
    assert len(lines) == 3 and all(len(line) == 10 for line in lines)
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA A100-SXM4-40GB") == 312e12
    assert peak_flops(None) is None and peak_flops("Some Future GPU") is None


# --- data ------------------------------------------------------------------------------------------

DOCS = [f"Document number {i}. " + " ".join(f"word{j}" for j in range(i % 7 + 20)) + "\nThe end." for i in range(20)]


def shard_tokens(directory: Path, split: str) -> np.ndarray:
    meta = json.loads((directory / "meta.json").read_text())
    return np.concatenate([np.fromfile(directory / s["file"], dtype=np.uint16) for s in meta["splits"][split]])


def expected_stream(texts) -> np.ndarray:
    tok = get_tokenizer()
    return np.array([t for text in texts for t in tok.encode(text) + [EOT_ID]], dtype=np.uint16)


def test_text_jsonl_and_parquet_give_the_same_tokens(env, tmp_path):
    txt = tmp_path / "txt"
    txt.mkdir()
    for i, doc in enumerate(DOCS):
        (txt / f"doc{i:02d}.txt").write_text(doc)
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(DOCS)))
    pq.write_table(pa.table({"id": list(range(20)), "text": DOCS}), tmp_path / "docs.parquet")

    results = []
    for spec in (txt, tmp_path / "docs.jsonl", tmp_path / "docs.parquet"):
        source = resolve_source(str(spec), val_fraction=0.1)
        directory = data.prepare(source, progress=False)
        train_docs = list(load_text_dataset(str(spec), "train", val_fraction=0.1)["text"])
        val_docs = list(load_text_dataset(str(spec), "val", val_fraction=0.1)["text"])
        assert len(val_docs) == 2 and sorted(train_docs + val_docs) == sorted(DOCS)
        # the shards are each split's documents, tokenised independently, each followed by <|endoftext|>
        assert np.array_equal(shard_tokens(directory, "train"), expected_stream(train_docs))
        assert np.array_equal(shard_tokens(directory, "val"), expected_stream(val_docs))
        results.append((shard_tokens(directory, "train"), shard_tokens(directory, "val")))
    for train_ids, val_ids in results[1:]:
        assert np.array_equal(train_ids, results[0][0]) and np.array_equal(val_ids, results[0][1])


def test_cache_is_reused_and_invalidated_by_edits(env, tmp_path):
    path = tmp_path / "one.txt"
    path.write_text("hello world. " * 200)
    first = data.prepare(resolve_source(str(path), val_fraction=0.1), progress=False)
    stamp = (first / "meta.json").stat().st_mtime_ns
    assert data.prepare(resolve_source(str(path), val_fraction=0.1), progress=False) == first
    assert (first / "meta.json").stat().st_mtime_ns == stamp  # not rewritten
    # a single document: validation is the last 10% of its characters
    text = path.read_text()
    cut = len(text) - int(len(text) * 0.1)
    assert np.array_equal(shard_tokens(first, "val"), expected_stream([text[cut:]]))
    time.sleep(0.01)
    path.write_text("goodbye world. " * 200)
    assert data.prepare(resolve_source(str(path), val_fraction=0.1), progress=False) != first


def test_local_data_holds_out_enough_to_validate_by_default(env, tmp_path, monkeypatch):
    import nanoplay.textdata as textdata

    # one 50 kB file: 100 kB of text would be twice all of it, so the default is the 10% cap
    text = "".join(f"Line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(1000))[:50_000]
    (tmp_path / "one.txt").write_text(text)
    source = resolve_source(str(tmp_path / "one.txt"))
    assert source.val_fraction == 0.0  # by size, decided when the documents are read
    directory = data.prepare(source, progress=False)
    assert np.array_equal(shard_tokens(directory, "val"), expected_stream([text[45_000:]]))  # the last 10%
    # (0.05% of it, the old default, was 25 characters: too few for one window)
    td = data.TokenData(directory, block_size=128, batch_size=2, seed=1, eval_batches=1)
    assert len(td.val_batches()) == 1
    assert list(load_text_dataset(str(tmp_path / "one.txt"), "val")["text"]) == [text[45_000:]]  # eval agrees

    # 80 files of 25 kB: 100 kB is 5% of them, 4 whole documents
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(80):
        (folder / f"{i:02d}.txt").write_text(f"{i:02d}" + "x" * 24_998)
    assert len(load_text_dataset(str(folder), "val")) == 4
    # a large corpus gives up no more than nanoGPT's 0.05%
    monkeypatch.setattr(textdata, "MIN_VAL_BYTES", 1)
    assert list(load_text_dataset(str(tmp_path / "one.txt"), "val")["text"]) == [text[-25:]]


def test_local_files_are_read_without_library_noise(env, tmp_path, capfd):
    import datasets

    path = tmp_path / "quiet.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    bars_were_off = datasets.utils.are_progress_bars_disabled()
    data.prepare(resolve_source(str(path), val_fraction=0.1), progress=True)  # stderr is no terminal here
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{oops\n')
    with pytest.raises(NanoplayError):
        load_text_dataset(str(broken), "all")  # what `nanoplay eval --data broken.jsonl` reads
    assert capfd.readouterr().err == ""  # no "Generating train split", no bars, no "Failed to load JSON"
    assert datasets.utils.are_progress_bars_disabled() == bars_were_off  # the library's settings come back


def test_openwebtext_schema_local_copy_stands_in_for_the_hub(env, tmp_path, monkeypatch):
    """A folder laid out like the Hub repo (data/train-*.parquet, one 'text' column) goes the Hub path."""
    import nanoplay.textdata as textdata

    repo = tmp_path / "openwebtext"
    (repo / "data").mkdir(parents=True)
    docs = [f"Web page {i}: " + "some text " * (5 + i % 3) for i in range(40)]
    pq.write_table(pa.table({"text": docs[:25]}), repo / "data" / "train-00000-of-00002.parquet")
    pq.write_table(pa.table({"text": docs[25:]}), repo / "data" / "train-00001-of-00002.parquet")
    monkeypatch.setattr(textdata, "OPENWEBTEXT_REPO", str(repo))
    monkeypatch.setattr(textdata, "OPENWEBTEXT_VAL_FRACTION", 0.05)
    source = resolve_source("openwebtext")
    assert source.kind == "hub" and source.val_fraction == 0.05
    directory = data.prepare(source, progress=False)
    val_docs = list(load_text_dataset("openwebtext", "val")["text"])  # what `nanoplay eval --data openwebtext` reads
    assert len(val_docs) == 2 and set(val_docs) <= set(docs)
    assert np.array_equal(shard_tokens(directory, "val"), expected_stream(val_docs))
    assert len(shard_tokens(directory, "train")) == sum(len(get_tokenizer().encode(d)) + 1 for d in docs) - len(
        expected_stream(val_docs))


def test_offline_uncached_hub_data_is_one_clear_line(env):
    with pytest.raises(NanoplayError) as e:
        data.prepare(resolve_source("nobody/no-such-corpus"), progress=False)
    message = str(e.value)
    assert "\n" not in message and "Hub cannot be reached" in message and "--data PATH" in message


def test_a_short_split_names_the_fix_for_that_split(env, tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. " * 20)  # 201 tokens, 202 with the end-of-text
    for fraction, split, fix in ((0.1, "val", "a larger --val-fraction, more data"),
                                 (0.9, "train", "more data, a smaller --val-fraction")):
        directory = data.prepare(resolve_source(str(path), val_fraction=fraction), progress=False)
        with pytest.raises(NanoplayError) as e:
            data.TokenData(directory, block_size=64, batch_size=2, seed=1, eval_batches=1)
        assert str(e.value) == (f"{path}: the {split} split has fewer than 65 tokens (one context of 64 and its next "
                                f"token); use {fix}, or a smaller --block-size")


def test_chat_data_given_to_pretraining_says_to_finetune(env, tmp_path):
    turn = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    same = tmp_path / "dialogs.jsonl"
    same.write_text(json.dumps({"messages": turn}) + "\n" + json.dumps({"messages": turn}) + "\n")
    mixed = tmp_path / "mixed.jsonl"  # shapes datasets cannot put in one table
    mixed.write_text(json.dumps({"messages": turn}) + "\n" + json.dumps(turn) + "\n" + json.dumps({"prompt": "a", "response": "b"}) + "\n")
    for path in (same, mixed):
        with pytest.raises(NanoplayError) as e:
            data.prepare(resolve_source(str(path)), progress=False)
        assert str(e.value) == (f"{path} holds chat conversations, not texts (no text column): "
                                f"to train on dialogs use `nanoplay finetune --data {path}`")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{oops\n')
    with pytest.raises(NanoplayError) as e:  # the JSON reader's own words, not datasets' wrapper
        data.prepare(resolve_source(str(broken)), progress=False)
    assert str(e.value) == f"{broken} could not be read (JSON parse error: Missing a name for object member. in row 1)"


def test_batches_are_a_function_of_step_and_micro_batch(env):
    directory = data.prepare(resolve_source("pydoc-topics", val_fraction=0.1), progress=False)
    td = data.TokenData(directory, block_size=16, batch_size=3, seed=7, eval_batches=2)
    x, y = td.train_batch(5, 1)
    assert x.shape == y.shape == (3, 16) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
    assert torch.equal(td.train_batch(5, 1)[0], x) and not torch.equal(td.train_batch(5, 0)[0], x)
    again = data.TokenData(directory, block_size=16, batch_size=3, seed=7, eval_batches=2)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(td.val_batches(), again.val_batches()))


# --- the loop --------------------------------------------------------------------------------------


def test_demo_preset_loss_falls_on_the_bundled_corpus(env, run_root):
    # the demo preset's model, data and optimizer; a smaller batch and fewer steps keep the test quick
    cfg = load_preset("demo", max_iters=60, warmup_iters=10, batch_size=2, block_size=64, eval_interval=30,
                      eval_batches=4, checkpoint_interval=0, sample_tokens=0)
    result = train(cfg, display="none")
    metrics = read_metrics(run_root / "demo" / "metrics.jsonl")
    losses = [m["loss"] for m in metrics if "loss" in m]
    vals = [m["val_loss"] for m in metrics if "val_loss" in m]
    assert len(losses) == 60 and result.step == 60
    assert losses[0] > 10.0  # ln(50304) = 10.8: an untrained model
    assert sum(losses[-10:]) / 10 < losses[0] - 3.0
    assert vals[-1] < vals[0] - 3.0
    model = load_model("demo")  # the playground's spec finds it
    assert model.step == 60 and model.meta["val_loss"] == pytest.approx(vals[-1])


def stop_at(step):
    import threading

    event = threading.Event()

    def on_progress(p):
        if p.step >= step:
            event.set()

    return event, on_progress


def test_resume_equals_an_uninterrupted_run_bit_for_bit(env, run_root):
    train(load_preset("demo", **TINY), display="none")
    full = read_metrics(run_root / "tiny" / "metrics.jsonl")

    cfg = load_preset("demo", **{**TINY, "name": "split"})
    event, on_progress = stop_at(4)
    first = train(cfg, on_progress=on_progress, stop_event=event)
    assert first.stopped_early and first.step == 5  # the step in flight finishes, then it saves
    assert list(list_steps(run_root / "split")) == [5]
    second = train(cfg, resume=True, display="none")
    assert second.step == 12
    resumed = read_metrics(run_root / "split" / "metrics.jsonl")

    def series(metrics, key):
        return [(m["step"], m[key]) for m in metrics if key in m]

    assert series(resumed, "loss") == series(full, "loss")  # exactly equal, step for step
    assert series(resumed, "val_loss") == series(full, "val_loss")
    a, _ = load_checkpoint_dir(run_root / "tiny" / "step-00000012")
    b, _ = load_checkpoint_dir(run_root / "split" / "step-00000012")
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    with pytest.raises(NanoplayError, match="already has checkpoints"):
        train(cfg, display="none")


def test_resume_refuses_a_new_shape_and_takes_new_step_counts(env, run_root, capsys):
    from nanoplay import cli

    cfg = load_preset("demo", **{**TINY, "name": "ra", "max_iters": 2, "eval_interval": 0})
    train(cfg, display="none")
    with pytest.raises(NanoplayError) as e:
        train(cfg, resume=True, overrides={"n_layer": 3, "n_embd": 32, "max_iters": 4}, display="none")
    assert str(e.value) == ("--resume continues ra's model as it is (n_layer 2): drop --n-layer 3, "
                            "or start a new run with --name NEW")  # n_embd 32 is unchanged: not named
    assert list(list_steps(run_root / "ra")) == [2]
    # --print-config shows the resumed run's config with the flags that may change
    assert cli.main(["train", "--preset", "demo", "--name", "ra", "--resume", "--max-iters", "3", "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "# the model of ra's newest checkpoint: --resume keeps its shape" in printed
    assert "n_layer = 2" in printed and "max_iters = 3" in printed and "block_size = 32" in printed
    assert train(cfg, resume=True, overrides={"n_layer": 2, "max_iters": 3}, display="none").step == 3


def test_an_unreadable_training_state_says_which_step_to_delete(run_root):
    from conftest import tiny_model

    run = run_root / "cut"
    for step in (3, 6):
        checkpoints.save_step(run, step, tiny_model(step), {"step": step}, meta={})
    state = run / "step-00000006" / "training_state.pt"
    state.write_bytes(state.read_bytes()[:20])  # truncated
    with pytest.raises(NanoplayError) as e:
        train(load_preset("demo", **{**TINY, "name": "cut"}), resume=True, display="none")
    assert str(e.value) == (f"{state} is truncated (the file ends before its data does): delete "
                            f"{run / 'step-00000006'} to resume from step 3, the one before it")
    (run / "step-00000003" / "training_state.pt").unlink()
    with pytest.raises(NanoplayError) as e:
        checkpoints.load_state(run / "step-00000006")
    assert str(e.value).endswith(f"this run has no other checkpoint to resume from: delete {run / 'step-00000006'} "
                                 f"and start again without --resume")


def test_keeps_the_last_k_and_the_best(env, run_root):
    run = run_root / "prune"
    from conftest import tiny_model

    from nanoplay.checkpoint import save_checkpoint, step_dir_name

    for step, val in [(1, 3.0), (2, 1.0), (3, 2.5), (4, 2.0), (5, 4.0)]:
        save_checkpoint(tiny_model(step), run / step_dir_name(step), step=step, meta={"val_loss": val})
    assert checkpoints.prune(run, keep_last=2) == [1, 3]
    assert list(list_steps(run)) == [2, 4, 5]  # the newest two and the best (step 2)


def test_sigterm_finishes_the_step_saves_and_exits_0(env, run_root):
    proc = subprocess.Popen([sys.executable, "-m", "nanoplay", "train", "--preset", "demo", *TINY_FLAGS,
                             "--max-iters=100000", "--checkpoint-interval=0", "--eval-interval=0", "--name=sig"],
                            env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = run_root / "sig" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    steps = list_steps(run_root / "sig")
    assert len(steps) == 1
    step = next(iter(steps))
    assert step >= 3 and read_metrics(metrics)[-1]["step"] == step
    assert checkpoints.load_state(steps[step])["step"] == step
    assert "SIGTERM" in out and f"stopped at step {step}" in out


KILL_CHILD = """
import os, pathlib, sys, time, torch
real_save, calls = torch.save, []
def slow_save(obj, f, *args, **kwargs):  # the second checkpoint's state is written, then we hang mid-write
    real_save(obj, f, *args, **kwargs)
    calls.append(f)
    if len(calls) == 2:
        pathlib.Path(os.environ["MARKER"]).write_text(str(f))
        time.sleep(600)
torch.save = slow_save
from trainer.config import load_preset
from trainer.train import train
train(load_preset("demo", **eval(sys.argv[1])), display="none")
"""


def test_kill_9_during_a_checkpoint_write_leaves_the_previous_one_loadable(env, run_root, tmp_path):
    marker = tmp_path / "writing"
    cfg = {**TINY, "name": "killed", "checkpoint_interval": 3, "max_iters": 9}
    proc = subprocess.Popen([sys.executable, "-c", KILL_CHILD, repr(cfg)], env={**subprocess_env(), "MARKER": str(marker)})
    deadline = time.time() + 120
    while time.time() < deadline and not marker.exists() and proc.poll() is None:
        time.sleep(0.1)
    assert marker.exists(), "the child never reached its second checkpoint"
    proc.kill()  # SIGKILL: no handler, no cleanup
    proc.wait()
    run = run_root / "killed"
    assert Path(marker.read_text()).parent.name.startswith(".step-00000006.tmp-")  # it died inside the write
    assert list(list_steps(run)) == [3]  # the half-written step 6 is invisible
    loaded = load_model("killed")
    assert loaded.step == 3 and loaded.meta["format"] == "nanoplay"
    assert checkpoints.load_state(run / "step-00000003")["step"] == 3
    # resuming cleans the leftovers and carries on
    result = train(load_preset("demo", **cfg), resume=True, display="none")
    assert result.step == 9 and list(list_steps(run)) == [3, 6, 9]
    assert not [p for p in run.iterdir() if p.name.startswith(".")]


def test_ddp_two_cpu_processes_match_one_process_with_the_same_global_batch(env, run_root):
    # one process: 2 micro-batches of 4 per step; two processes under torchrun: 1 micro-batch of 4 each
    single = {**TINY, "name": "single", "max_iters": 5, "gradient_accumulation_steps": 2, "checkpoint_interval": 0}
    train(load_preset("demo", **single), display="none")
    flags = [f for f in TINY_FLAGS if not f.startswith(("--max-iters", "--checkpoint-interval"))]
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          "-m", "nanoplay", "train", "--preset", "demo", *flags, "--max-iters=5",
                          "--checkpoint-interval=0", "--name=ddp"],
                         env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "4 x 1 x 2 sequences per step" in out.stdout
    a = read_metrics(run_root / "single" / "metrics.jsonl")
    b = read_metrics(run_root / "ddp" / "metrics.jsonl")
    losses_a = [m["loss"] for m in a if "loss" in m]
    losses_b = [m["loss"] for m in b if "loss" in m]
    assert len(losses_a) == len(losses_b) == 5
    assert losses_a[0] == pytest.approx(losses_b[0], rel=1e-6)  # same weights, same batches
    assert losses_a == pytest.approx(losses_b, rel=1e-4)  # then only float summation order differs
    assert [m["val_loss"] for m in a if "val_loss" in m] == pytest.approx(
        [m["val_loss"] for m in b if "val_loss" in m], rel=1e-4)
    assert math.isclose(read_config(run_root / "ddp" / "step-00000005")["val_loss"],
                        read_config(run_root / "single" / "step-00000005")["val_loss"], rel_tol=1e-4)


def test_init_from_a_model_spec_continues_pretraining(env, run_root, tmp_path):
    from conftest import tiny_model

    from nanoplay.checkpoint import save_checkpoint

    base = tiny_model(3, block_size=32)
    save_checkpoint(base, tmp_path / "base", step=100)
    cfg = load_preset("demo", **{**TINY, "name": "cont", "max_iters": 2, "eval_interval": 0}, init=str(tmp_path / "base"))
    result = train(cfg, display="none")
    trained = load_model("cont")
    assert result.step == 2 and trained.meta["init"] == str(tmp_path / "base")
    assert trained.config.n_embd == base.config.n_embd and trained.config.activation == base.config.activation
    # it started from the base weights: one tiny step away, not a fresh init
    drift = (trained.model.transformer.wpe.weight - base.transformer.wpe.weight).abs().max().item()
    assert 0 < drift < 0.05


def test_print_config_shows_the_init_models_shape(env, run_root, tmp_path, capsys):
    from conftest import tiny_model

    from nanoplay import cli
    from nanoplay.checkpoint import save_checkpoint

    save_checkpoint(tiny_model(3, block_size=48), tmp_path / "base", step=100)
    assert cli.main(["train", "--preset", "owt-30m", "--init", str(tmp_path / "base"), "--name", "cont",
                     "--print-config"]) == 0
    printed = capsys.readouterr().out
    path = tmp_path / "printed.toml"
    path.write_text(printed)
    cfg = TrainConfig(**read_config_file(path))
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size) == (2, 2, 32, 48)  # not owt-30m's 6/6/384/512
    assert cfg.name == "cont" and cfg.init == str(tmp_path / "base")
    assert f"# the shape of --init {tmp_path / 'base'}: read from the model, not from here" in printed
    assert not run_root.exists()  # printing writes nothing


def test_parallel_tokenisation_gives_the_same_shards(env, tmp_path, monkeypatch):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    one = data.prepare(resolve_source(str(path), val_fraction=0.1), num_proc=1, progress=False)
    monkeypatch.setenv("NANOPLAY_DATA_CACHE", str(tmp_path / "other-cache"))
    two = data.prepare(resolve_source(str(path), val_fraction=0.1), num_proc=2, progress=False)
    assert one != two
    for split in ("train", "val"):
        assert np.array_equal(shard_tokens(one, split), shard_tokens(two, split))


def test_live_view_and_tensorboard_without_the_package(tmp_path, monkeypatch):
    from rich.console import Console

    from trainer.monitor import Monitor, _tensorboard_writer

    seen = []
    monitor = Monitor(run_dir=tmp_path / "run", title="train x", max_iters=100, start_step=0, log_interval=10,
                      flops_per_token=1e9, device_name="NVIDIA H100 80GB HBM3", tensorboard=False, display="none",
                      on_progress=seen.append)
    for step in range(1, 21):
        monitor.step(step, loss=10.0 - step * 0.3, lr=1e-3, tokens=100_000, seconds=1.0)
    monitor.evaluation(20, 4.5, 4.5)
    console = Console(record=True, width=100)
    console.print(monitor._render())
    screen = console.export_text()
    monitor.close()
    assert "20/100" in screen and "4.0000" in screen and "4.5000 (best 4.5000)" in screen
    assert "10.1%" in screen  # MFU: 1e9 FLOPs/token x 1e5 tokens/s over the H100's 989 TFLOPS
    assert "1m20s" in screen  # ETA: 80 steps left at 1 s each
    assert any(0x2800 < ord(c) <= 0x28FF for c in screen)  # the braille loss curve
    assert seen[-1].step == 20 and seen[-1].max_steps == 100 and seen[-1].loss == pytest.approx(4.0)
    assert [m["step"] for m in read_metrics(tmp_path / "run" / "metrics.jsonl")][-2:] == [20, 20]

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    with pytest.raises(NanoplayError, match="pip install tensorboard"):
        _tensorboard_writer(tmp_path / "tb")


def test_eval_and_trainer_agree_on_the_pydoc_validation_split():
    # the demo preset states no fraction: it and `nanoplay eval --data pydoc-topics` use the source's default
    from trainer.config import load_preset

    cfg = load_preset("demo")
    trainer_source = resolve_source(cfg.data, cfg.text_column, cfg.val_fraction)
    assert trainer_source.val_fraction == resolve_source("pydoc-topics").val_fraction == 0.1
    assert len(load_text_dataset("pydoc-topics", "val")) == 8
