"""nanoplay eval: metrics against transformers and hand computations, data loaders offline, the CLI."""

import json
import math

import pytest
import torch
import torch.nn as nn
from conftest import disjoint_window_nll, hf_gpt2, tiny_model, write_nanogpt_ckpt
from pydoc_data.topics import topics

from nanoplay import evaluation as ev
from nanoplay.checkpoint import save_checkpoint
from nanoplay.cli import main
from nanoplay.errors import NanoplayError
from nanoplay.evaldata import documents_stream, load_eval_data, wikitext_stream
from nanoplay.loading import load_model
from nanoplay.model import GPT, GPTConfig
from nanoplay.tokenizer import get_tokenizer

CTX = 64  # the tiny models' context


@pytest.fixture(scope="module")
def hf_and_ours(tmp_path_factory):
    """A random GPT-2 in transformers, and the same weights read back by nanoplay from an HF directory."""
    hf = hf_gpt2(seed=3, n_positions=CTX)
    with torch.no_grad():  # sharper predictions, so a token scored with the wrong history shows
        hf.transformer.wte.weight.mul_(8)
    directory = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(directory)
    return hf, load_model(str(directory))


@pytest.fixture(scope="module")
def prose_ids():
    text = "\n\n".join(topics[k] for k in sorted(topics)[:6])
    return torch.tensor(get_tokenizer().encode(text)[:420])  # 420 = 13 strides of 32 + 4: a short last window


def guide_perplexity(hf, ids, stride, max_length=CTX):
    """
    The Hugging Face perplexity guide's loop (https://huggingface.co/docs/transformers/perplexity) with
    one correction: the guide weights each window's mean loss by its valid labels minus one, for the
    shift. That is right for the first window only; in later windows the first label is not at position
    0, so the loss averages all of them. With 512-token strides the difference is ~1e-6; with these
    32-token windows it is ~1e-3, so the count here is the number of labels the loss really averaged.
    """
    seq_len = ids.numel()
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = ids[begin_loc:end_loc][None]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            neg_log_likelihood = hf(input_ids, labels=target_ids).loss
        num_loss_tokens = (target_ids[:, 1:] != -100).sum().item()  # the labels left after the shift
        nll_sum += neg_log_likelihood.item() * num_loss_tokens
        n_tokens += num_loss_tokens
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return math.exp(nll_sum / n_tokens)


def guide_token_nll(hf, ids, stride, max_length=CTX):
    """Per-token losses from the guide's windows, position by position (NaN where nothing scores)."""
    out = torch.full((ids.numel(),), float("nan"), dtype=torch.float64)
    prev_end_loc = 0
    for begin_loc in range(0, ids.numel(), stride):
        end_loc = min(begin_loc + max_length, ids.numel())
        window = ids[begin_loc:end_loc][None]
        with torch.no_grad():
            logprobs = torch.log_softmax(hf(window).logits[0].double(), dim=-1)  # (T, V)
        for p in range(max(prev_end_loc, begin_loc + 1), end_loc):
            out[p] = -logprobs[p - begin_loc - 1, ids[p]]
        prev_end_loc = end_loc
        if end_loc == ids.numel():
            break
    return out


# -----------------------------------------------------------------------------
# perplexity


@pytest.mark.parametrize("stride", [CTX, CTX // 2])
def test_perplexity_matches_transformers_and_the_guide(hf_and_ours, prose_ids, stride):
    hf, loaded = hf_and_ours
    result = ev.perplexity(loaded.model, prose_ids, context=CTX, stride=stride, n_bytes=1, n_words=1, batch_size=3,
                           eot_prefix=False)
    expected = guide_perplexity(hf, prose_ids, stride)
    assert result.ppl == pytest.approx(expected, rel=1e-4)
    # token by token: each one scored in the same window, with the same history, as the guide does
    ours = ev.token_nll(loaded.model, prose_ids, CTX, stride, batch_size=4, eot_prefix=False)
    theirs = guide_token_nll(hf, prose_ids, stride)
    assert torch.equal(torch.isnan(ours), torch.isnan(theirs))
    scored = ~torch.isnan(theirs)
    assert torch.allclose(ours[scored], theirs[scored], atol=2e-5, rtol=0)
    # nanoplay's rule (the default): the guide's windows over <|endoftext|> + the text, so every token is
    # scored, the first one from <|endoftext|>, as gen and score condition it
    ours = ev.token_nll(loaded.model, prose_ids, CTX, stride, batch_size=4)
    theirs = guide_token_nll(hf, torch.cat([torch.tensor([get_tokenizer().eot_id]), prose_ids]), stride)[1:]
    assert not torch.isnan(theirs[0]) and torch.equal(torch.isnan(ours), torch.isnan(theirs))
    scored = ~torch.isnan(theirs)
    assert torch.allclose(ours[scored], theirs[scored], atol=2e-5, rtol=0)
    n_windows = len(range(0, prose_ids.numel() - CTX + stride, stride))
    assert result.scored == (prose_ids.numel() - n_windows if stride == CTX else prose_ids.numel() - 1)


def test_batching_and_padding_do_not_change_scores(hf_and_ours, prose_ids):
    _, loaded = hf_and_ours
    one = ev.token_nll(loaded.model, prose_ids, CTX, 32, batch_size=1)
    many = ev.token_nll(loaded.model, prose_ids, CTX, 32, batch_size=64)
    assert torch.allclose(one, many, atol=1e-5, equal_nan=True)


def test_final_hidden_is_the_forward_without_lm_head():
    model = tiny_model(5)
    x = torch.randint(0, 50257, (3, 40))
    with torch.no_grad():
        assert torch.allclose(model.lm_head(ev.final_hidden(model, x)), model(x), atol=1e-5)


def test_sliding_windows_by_hand():
    # 10 tokens, context 4, stride 2: every token after the first is scored once, with >= 2 of history
    assert ev.sliding_windows(10, 4, 2) == [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
    # stride = context: disjoint windows whose first tokens have no history and are skipped
    assert ev.sliding_windows(10, 4, 4) == [(0, 4, 1), (4, 8, 5), (8, 10, 9)]
    # a last window of one token scores nothing
    assert ev.sliding_windows(9, 4, 4) == [(0, 4, 1), (4, 8, 5)]
    with pytest.raises(NanoplayError, match="stride"):
        ev.sliding_windows(10, 4, 5)


def uniform_model(block_size=CTX):
    """A GPT whose every prediction is uniform over its 50304 ids: all weights zero."""
    model = GPT(GPTConfig(block_size=block_size, vocab_size=50304, n_layer=1, n_head=2, n_embd=8)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    return model


def test_bits_per_byte_and_word_perplexity_by_hand():
    text_rows = ["The cat sat.", "The dog ran."]
    data = wikitext_stream("wikitext-2", text_rows, "hand-made")
    tok = get_tokenizer()
    # "The cat sat.\n\nThe dog ran.": 26 bytes, 6 words, and these 10 tokens
    pieces = ["The", " cat", " sat", ".", "\n", "\n", "The", " dog", " ran", "."]
    assert [tok.decode([i]) for i in data.ids.tolist()] == pieces
    assert (data.n_bytes, data.n_words) == (26, 6)
    result = ev.perplexity(uniform_model(), data.ids, context=CTX, stride=32, n_bytes=data.n_bytes,
                           n_words=data.n_words, eot_prefix=False)
    ln_v = math.log(50304)
    assert result.scored == 9 and result.tokens == 10  # the guide's rule: the first token has no history
    assert ev.perplexity(uniform_model(), data.ids, context=CTX, stride=32, n_bytes=data.n_bytes,
                         n_words=data.n_words).scored == 10  # nanoplay's: it is predicted from <|endoftext|>
    assert result.loss == pytest.approx(ln_v, rel=1e-6)
    assert result.ppl == pytest.approx(50304, rel=1e-5)
    assert result.bits_per_byte == pytest.approx(math.log2(50304) * 10 / 26, rel=1e-6)
    assert result.word_ppl == pytest.approx(50304 ** (10 / 6), rel=1e-5)


def test_documents_are_joined_like_the_trainer_and_separators_have_no_bytes():
    tok = get_tokenizer()
    data = documents_stream("docs", ["ab c", "d"])
    assert data.ids.tolist() == tok.encode("ab c") + [tok.eot_id] + tok.encode("d") + [tok.eot_id]
    assert (data.n_bytes, data.n_words) == (5, 3)
    result = ev.perplexity(uniform_model(), data.ids, context=CTX, stride=CTX, n_bytes=data.n_bytes,
                           n_words=data.n_words)
    assert result.bits_per_byte == pytest.approx(math.log2(50304) * data.ids.numel() / 5, rel=1e-6)


# -----------------------------------------------------------------------------
# LAMBADA


BOOST = 12.0


def bigram_model(follows: dict[str, str], block_size=8):
    """
    A GPT made into a bigram table: the next-token logits depend only on the previous token, and are
    BOOST for the one token `follows` names after it and 0 for every other id (no blocks, no position
    embeddings, no final LayerNorm, an untied head). Unlisted previous tokens predict uniformly.
    """
    tok = get_tokenizer()
    prev = {tok.encode(a)[0]: tok.encode(b)[0] for a, b in follows.items()}
    K = len(prev) + 1  # one direction per listed previous token
    model = GPT(GPTConfig(block_size=block_size, vocab_size=50304, n_layer=0, n_head=1, n_embd=K)).eval()
    model.transformer["ln_f"] = nn.Identity()
    model.lm_head = nn.Linear(K, 50304, bias=False)
    with torch.no_grad():
        model.transformer.wte.weight.zero_()
        model.transformer.wpe.weight.zero_()
        model.lm_head.weight.zero_()
        for k, (a, b) in enumerate(prev.items(), start=1):
            model.transformer.wte.weight[a, k] = 1.0
            model.lm_head.weight[b, k] = BOOST
    return model


# Four texts whose last words the bigram model gets right, half right (start, not end), half right
# (end, not start) and right in one token; the contexts are longer than the model's 8-token context.
LAMBADA_TEXTS = [
    "He read every night about the strange island of Gulliver",  # ' G' 'ull' 'iver': all greedy
    "She was, as everyone kept telling her, a quixotic",  # ' qu' 'ix' right, 'otic' wrong
    "The small beetle they found in the garden was called zyzzyva",  # ' z' wrong, 'y' 'zzy' 'va' right
    "The old cat slept all afternoon on the mat",  # ' mat': one token, right
]
FOLLOWS = {" of": " G", " G": "ull", "ull": "iver", " a": " qu", " qu": "ix", "ix": "ed",
           " called": " the", " z": "y", "y": "zzy", "zzy": "va", " the": " mat"}


def test_lambada_whole_word_rule_by_hand():
    tok = get_tokenizer()
    assert [tok.decode([i]) for i in tok.encode(" zyzzyva")] == [" z", "y", "zzy", "va"]
    ln_z = math.log(math.exp(BOOST) + 50303)  # the normaliser after a listed token
    hit, miss = ln_z - BOOST, ln_z  # nll of the boosted token, of any other
    result = ev.lambada(bigram_model(FOLLOWS), LAMBADA_TEXTS, tok, context=8, rule="word", batch_size=3)
    per_example = [3 * hit, 2 * hit + miss, miss + 3 * hit, hit]
    assert result.examples == 4 and result.correct == 2
    assert result.accuracy == 0.5
    assert result.target_tokens == 3 + 3 + 4 + 1
    assert result.nll == pytest.approx(sum(per_example), rel=1e-6)
    assert result.ppl == pytest.approx(math.exp(sum(per_example) / 4), rel=1e-5)


def test_lambada_last_token_rule_by_hand():
    ln_z = math.log(math.exp(BOOST) + 50303)
    hit, miss = ln_z - BOOST, ln_z
    result = ev.lambada(bigram_model(FOLLOWS), LAMBADA_TEXTS, get_tokenizer(), context=8, rule="last-token")
    # only the final token counts: 'iver' right, 'otic' wrong, 'va' right, ' mat' right
    assert result.correct == 3 and result.target_tokens == 4
    assert result.ppl == pytest.approx(math.exp((hit + miss + hit + hit) / 4), rel=1e-5)


def test_lambada_targets_split_like_the_harness():
    tok = get_tokenizer()
    context, target = ev.lambada_request("It was called zyzzyva", tok, "word")
    assert tok.decode(context) == "It was called" and tok.decode(target) == " zyzzyva"
    context, target = ev.lambada_request("It was called zyzzyva", tok, "last-token")
    assert tok.decode(context) == "It was called zyzzy" and tok.decode(target) == "va"
    context, target = ev.lambada_request("Alone", tok, "word")  # no space: predicted from end-of-text
    assert context == [tok.eot_id] and tok.decode(target) == " Alone"


def test_lambada_scores_match_transformers(hf_and_ours):
    hf, loaded = hf_and_ours
    tok = get_tokenizer()
    texts = [" ".join(topics[k].split()[:n]) for k, n in zip(sorted(topics)[10:16], (5, 30, 80, 12, 3, 200))]
    requests = [ev.lambada_request(t, tok) for t in texts]
    ours = ev.score_continuations(loaded.model, requests, CTX, batch_size=2)
    for (context, target), (nll, greedy) in zip(requests, ours):
        seq = torch.tensor((context + target)[-(CTX + 1):])
        with torch.no_grad():
            logprobs = torch.log_softmax(hf(seq[None, :-1]).logits[0].double(), dim=-1)  # (T, V)
        rows = logprobs[-len(target):]
        assert nll == pytest.approx(-rows[torch.arange(len(target)), torch.tensor(target)].sum().item(), abs=1e-4)
        assert greedy == (rows.argmax(dim=-1) == torch.tensor(target)).all().item()


# -----------------------------------------------------------------------------
# data sets, offline


def write_datasets_cache(cache, repo_id, config, split, rows):
    """A `datasets` cache entry, laid out as load_dataset leaves it after a download."""
    from datasets import Dataset, DatasetInfo, SplitDict, SplitInfo
    from datasets.arrow_writer import ArrowWriter

    name = repo_id.split("/")[-1]
    directory = cache / repo_id.replace("/", "___") / config / "0.0.0" / "0123456789abcdef"
    directory.mkdir(parents=True)
    ds = Dataset.from_dict({"text": rows})
    with ArrowWriter(path=str(directory / f"{name}-{split}.arrow")) as writer:
        writer.write_table(ds.data.table)
        n, n_bytes = writer.finalize()
    DatasetInfo(features=ds.features, dataset_name=name, config_name=config,
                splits=SplitDict({split: SplitInfo(name=split, num_examples=n, num_bytes=n_bytes, dataset_name=name)})
                ).write_to_directory(str(directory))


@pytest.fixture
def datasets_cache(tmp_path, monkeypatch, hf_home):
    import datasets

    cache = tmp_path / "datasets"
    cache.mkdir()
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    return cache


WIKI_ROWS = ["", " = Robert Boulter = \n", "", " Robert Boulter is an English film , television and theatre actor . \n",
             "", " = = Career = = \n"]


def test_wikitext_from_the_datasets_cache_is_joined_like_the_guide(datasets_cache):
    write_datasets_cache(datasets_cache, "Salesforce/wikitext", "wikitext-2-raw-v1", "test", WIKI_ROWS)
    data = load_eval_data("wikitext-2")
    joined = "\n\n".join(WIKI_ROWS)
    assert data.ids.tolist() == get_tokenizer().encode(joined)
    assert (data.n_bytes, data.n_words, data.rows) == (len(joined.encode()), len(joined.split()), 6)
    assert load_eval_data("wikitext-2", limit=2).rows == 2


def test_lambada_from_the_datasets_cache(datasets_cache):
    write_datasets_cache(datasets_cache, "EleutherAI/lambada_openai", "default", "test", LAMBADA_TEXTS)
    data = load_eval_data("lambada")
    assert data.kind == "lambada" and data.texts == LAMBADA_TEXTS
    assert load_eval_data("lambada_openai", limit=3).texts == LAMBADA_TEXTS[:3]


def test_not_cached_offline_is_one_clear_line(datasets_cache):
    with pytest.raises(NanoplayError) as e:
        load_eval_data("wikitext-103")
    message = str(e.value)
    assert "\n" not in message and "wikitext-103=PATH" in message and "Salesforce/wikitext" in message


def test_local_copies_of_the_named_sets(tmp_path, capfd):
    import datasets

    datasets.Dataset.from_dict({"text": WIKI_ROWS}).to_parquet(tmp_path / "test.parquet")
    # the original file: a line per row, blank rows written as a lone space
    (tmp_path / "wiki.test.raw").write_text("".join(row or " \n" for row in WIKI_ROWS))
    (tmp_path / "lambada_test.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in LAMBADA_TEXTS))
    capfd.readouterr()  # the fixture's own writing above may show a progress bar
    from_parquet = load_eval_data(f"wikitext-2={tmp_path / 'test.parquet'}")
    assert from_parquet.ids.tolist() == get_tokenizer().encode("\n\n".join(WIKI_ROWS))
    from_raw = load_eval_data(f"wikitext-2={tmp_path / 'wiki.test.raw'}")
    assert torch.equal(from_raw.ids, from_parquet.ids) and from_raw.rows == len(WIKI_ROWS)
    assert load_eval_data(f"lambada={tmp_path / 'lambada_test.jsonl'}").texts == LAMBADA_TEXTS
    with pytest.raises(NanoplayError, match="no such file"):
        load_eval_data(f"lambada={tmp_path / 'missing.jsonl'}")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    with pytest.raises(NanoplayError, match=r"bad.jsonl could not be read as json: ArrowInvalid: JSON parse error"):
        load_eval_data(f"lambada={tmp_path / 'bad.jsonl'}")
    assert capfd.readouterr().err == ""  # no datasets progress bars or log lines: nanoplay says what matters


def test_training_corpus_is_the_trainers_val_split_token_for_token(tmp_path, monkeypatch):
    import numpy as np

    from nanoplay.textdata import resolve_source
    from trainer.data import prepare

    monkeypatch.setenv("NANOPLAY_DATA_CACHE", str(tmp_path / "tokens"))
    data = load_eval_data("pydoc-topics")
    shards = prepare(resolve_source("pydoc-topics"), progress=False)
    meta = json.loads((shards / "meta.json").read_text())
    val = np.concatenate([np.fromfile(shards / s["file"], dtype=np.uint16) for s in meta["splits"]["val"]])
    assert data.ids.tolist() == val.tolist()
    assert "val split" in data.description


def test_local_text_files_are_read_whole_or_split_like_the_trainer(tmp_path):
    from nanoplay.textdata import load_text_dataset

    docs = [topics[k] for k in sorted(topics)[:5]]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    whole = load_eval_data(str(tmp_path / "docs.jsonl"), text_column="body")
    assert whole.rows == 5 and whole.n_bytes == sum(len(d.encode()) for d in docs)
    val = load_eval_data(str(tmp_path / "docs.jsonl"), text_column="body", split="val")
    expected = list(load_text_dataset(str(tmp_path / "docs.jsonl"), split="val", text_column="body")["text"])
    assert val.ids.tolist() == documents_stream("x", expected).ids.tolist()


@pytest.mark.parametrize("name, text, spec, message", [
    ("empty.txt", "", "{path}", "{path} is empty: give a file with at least one row"),
    ("blank.txt", "\n\n  \n", "{path}", "--data {path}: holds no text to score; give a file with text"),
    ("empty.jsonl", "", "{path}", "{path} is empty: give a file with at least one row"),
    ("empty.jsonl", "", "lambada={path}", "{path} is empty: give a file with at least one row"),
    ("empty.txt", "", "wikitext-2={path}", "{path} is empty: give a file with at least one row"),
    ("blank.txt", "\n \n", "wikitext-2={path}", "--data wikitext-2={path}: holds no text to score; give a file with text"),
])
def test_data_with_nothing_to_score_is_refused_by_name(tmp_path, name, text, spec, message):
    """Perplexity per word and bits per byte divide by the words and bytes: an empty or blank file raised
    ZeroDivisionError after scoring, and an empty JSONL file a bare StopIteration inside `datasets`."""
    path = tmp_path / name
    path.write_text(text)
    spec = spec.format(path=path)
    with pytest.raises(NanoplayError) as e:
        load_eval_data(spec)
    assert str(e.value) == message.format(path=path)


@pytest.mark.parametrize("fraction", [float("nan"), 1.0, -0.1])
def test_a_val_fraction_outside_0_1_is_refused_by_name(tmp_path, fraction):
    """NaN made `round(n * fraction)` raise deep in the split; 1 or more made an empty train split."""
    from nanoplay.textdata import load_text_dataset

    (tmp_path / "docs.jsonl").write_text(json.dumps({"text": "some text"}) + "\n")
    with pytest.raises(NanoplayError, match=f"^val_fraction must be at least 0 and below 1, not {fraction}$"):
        load_text_dataset(str(tmp_path / "docs.jsonl"), split="val", val_fraction=fraction)


# -----------------------------------------------------------------------------
# the command, on every checkpoint format side by side


@pytest.fixture
def three_formats(tmp_path, checkpoints, hf_home):
    """The same kind of tiny model as a nanoGPT ckpt.pt, one of our checkpoints and an HF directory."""
    nanogpt = write_nanogpt_ckpt(tmp_path / "ckpt.pt", tiny_model(2, bias=False, activation="gelu"))
    save_checkpoint(tiny_model(1), checkpoints / "tiny" / "step-00000100", step=100)
    hf_dir = tmp_path / "hf-dir"
    hf_gpt2(seed=4, n_positions=CTX).save_pretrained(hf_dir)
    return [str(nanogpt), "tiny", str(hf_dir)]


@pytest.fixture
def local_sets(tmp_path):
    import datasets

    rows = [line for k in sorted(topics)[:2] for line in topics[k].split("\n")]
    datasets.Dataset.from_dict({"text": rows}).to_parquet(tmp_path / "wiki.parquet")
    (tmp_path / "lambada.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in LAMBADA_TEXTS))
    return [f"wikitext-2={tmp_path / 'wiki.parquet'}", f"lambada={tmp_path / 'lambada.jsonl'}"], rows


def test_eval_three_formats_side_by_side(three_formats, local_sets, capsys, monkeypatch):
    import nanoplay.precision

    # on a CPU with native bf16 (auto would pick bf16 there) eval still measures in float32, as report does
    monkeypatch.setattr(nanoplay.precision, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    data_args, rows = local_sets
    argv = ["eval", "--stride", str(CTX), "--json"]
    for spec in [*three_formats, "no-such-model"]:
        argv += ["--model", spec]
    for spec in data_args:
        argv += ["--data", spec]
    assert main(argv) == 2  # a model failed: the exit says so, and the others are still reported
    report = json.loads(capsys.readouterr().out)
    assert report["method"]["dtype"] == "float32"
    names = [row["model"] for row in report["models"]]
    assert names[0].endswith("/ckpt.pt") and names[1:] == ["tiny@100", "hf-dir", "no-such-model"]
    assert "error" in report["models"][3] and "no-such-model" in report["models"][3]["error"]

    # each model's loss equals its own forward's mean loss over the same disjoint windows, which cover the
    # text after <|endoftext|> (its first token is predicted from it, as gen and score do)
    ids = torch.tensor([get_tokenizer().eot_id] + get_tokenizer().encode("\n\n".join(rows)))
    for spec, row in zip(three_formats, report["models"]):
        nll, count = disjoint_window_nll(load_model(spec).model, ids, CTX)
        wiki = row["results"]["wikitext-2"]
        assert wiki["scored_tokens"] == count
        assert wiki["loss"] == pytest.approx(nll / count, rel=1e-5)
        assert row["results"]["lambada"]["examples"] == len(LAMBADA_TEXTS)
        assert (row["context"], row["stride"]) == (CTX, CTX)


def test_eval_markdown_and_table(three_formats, local_sets, capsys, tmp_path):
    data_args, _ = local_sets
    char_level = write_nanogpt_ckpt(tmp_path / "char.pt", tiny_model(6, vocab_size=65), with_optimizer=False)
    argv = ["eval", "--model", three_formats[1], "--model", "no-such-model", "--model", str(char_level),
            "--limit", "2"]
    for spec in data_args:
        argv += ["--data", spec]
    assert main([*argv, "--markdown"]) == 2
    out = capsys.readouterr().out
    header = out.splitlines()[0]
    for col in ("model", "params", "ctx", "stride", "wikitext-2 loss", "wikitext-2 bits/byte", "wikitext-2 word ppl",
                "lambada acc", "lambada ppl"):
        assert f" {col} |" in header
    assert "| tiny@100 | 1.6M | 64 | 32 |" in out
    assert "| no-such-model |" in out and "error: unknown model" in out
    assert "has a 65-token vocabulary, not GPT-2's BPE" in out
    assert "lm-evaluation-harness" in out and "2 rows" in out
    # the table, piped: nothing folded or cropped, whatever the width of a terminal would be
    assert main(argv) == 2
    out = capsys.readouterr().out
    assert "tiny@100" in out and "acc = every target token greedy, ppl = exp(mean target nll) (lm-evaluation-harness)" in out
    assert "context: each model's own (block_size); stride: half of each model's context (sliding window, each " \
           "token scored once with at least context - stride tokens of history)" in out


def test_eval_references_are_labelled_with_their_procedure():
    refs = ev.find_references("gpt2", "openwebtext", "loss", stride=512)
    assert [r.value for r in refs] == [3.12] and refs[0].stride == 1024
    large = ev.find_references("gpt2-large", "wikitext-2", "ppl", stride=512)
    assert [r.value for r in large] == [16.44, 19.44]  # the one measured at our stride first
    assert ev.find_references("gpt2", "lambada", "acc", rule="last-token") == []
    assert [r.value for r in ev.find_references("gpt2", "lambada", "ppl", rule="word")] == [40.06]


def test_bench_scoring_compares_with_transformers_on_the_same_weights(hf_and_ours):
    _, loaded = hf_and_ours
    result = ev.bench_scoring(loaded, batch_size=2, seq_len=16, repeats=1)
    assert result["ours_tokens_per_s"] > 0 and result["transformers_tokens_per_s"] > 0
    # disjoint windows at stride = seq_len: all but each window's first token are scored
    assert result["ours_scored_tokens_per_s"] == pytest.approx(result["ours_tokens_per_s"] * 30 / 32)
    assert result["ratio"] == pytest.approx(result["ours_tokens_per_s"] / result["transformers_tokens_per_s"])
    assert result["max_logit_diff"] < 1e-4  # the twin really computes what we compute
    half = ev.bench_scoring(loaded, batch_size=3, seq_len=16, repeats=1, stride=8)
    assert half["ours_scored_tokens_per_s"] == pytest.approx(half["ours_tokens_per_s"] * (15 + 8 + 8) / 48)


# -----------------------------------------------------------------------------
# lm-evaluation-harness's rolling rule and its WikiText task


def test_rolling_windows_are_the_harness_windows():
    # lm_eval's own test of get_rolling_token_windows + make_disjoint_window: 34 tokens, max_seq_len 10:
    # ([eot, 0..8] -> 0..9), ([9..18] -> 10..19), ([19..28] -> 20..29), ([23..32] -> 30..33). In stream
    # positions (the text after the <|endoftext|> at 0), the model reads [begin, end - 1) and scores [first, end).
    assert ev.rolling_windows(34, 10) == [(0, 11, 1), (10, 21, 11), (20, 31, 21), (24, 35, 31)]
    assert ev.rolling_windows(7, 10, offset=5) == [(5, 13, 6)]  # a short text: one window from its end-of-text
    assert ev.rolling_windows(0, 10) == []


def harness_rolling_nll(hf, ids: list[int], max_length=CTX) -> torch.Tensor:
    """
    The rolling rule written out directly against transformers: token i of the text belongs to the
    window of tokens [k, min(k + max_length, n)) with k = i - i % max_length, and is predicted from
    the max_length tokens (with <|endoftext|> in front of the text) before that window's last token.
    """
    tok = get_tokenizer()
    full = [tok.eot_id] + ids  # full[t + 1] is token t
    out = torch.empty(len(ids), dtype=torch.float64)
    for k in range(0, len(ids), max_length):
        end = min(k + max_length, len(ids))  # the window predicts tokens k..end-1, i.e. full[k+1..end]
        start = max(0, end - max_length)  # the model reads full[start:end]
        with torch.no_grad():
            logprobs = torch.log_softmax(hf(torch.tensor([full[start:end]])).logits[0].double(), dim=-1)
        for t in range(k, end):
            out[t] = -logprobs[t - start, ids[t]]  # full[t] (row t - start) predicts full[t + 1] = token t
    return out


def test_rolling_rule_matches_an_independent_implementation(hf_and_ours, prose_ids):
    hf, loaded = hf_and_ours
    ids = prose_ids[:300]  # 4 full windows of 64 and a short last one
    ours = ev.token_nll(loaded.model, ids, CTX, rule="rolling", batch_size=3)
    theirs = harness_rolling_nll(hf, ids.tolist())
    assert not torch.isnan(ours).any()  # every token is scored, the first from <|endoftext|>
    assert ours.sum().item() == pytest.approx(theirs.sum().item(), rel=1e-6)
    assert torch.allclose(ours, theirs, atol=2e-5, rtol=0)
    # documents are scored one by one, each from its own <|endoftext|>
    docs = ev.token_nll(loaded.model, ids, CTX, rule="rolling", doc_lengths=[100, 200])
    split = torch.cat([harness_rolling_nll(hf, ids[:100].tolist()), harness_rolling_nll(hf, ids[100:].tolist())])
    assert docs.sum().item() == pytest.approx(split.sum().item(), rel=1e-6)
    result = ev.perplexity(loaded.model, ids, context=CTX, stride=None, rule="rolling", n_bytes=1000, n_words=100)
    assert (result.scored, result.tokens, result.stride, result.rule) == (300, 300, None, "rolling")
    assert result.bits_per_byte == pytest.approx(theirs.sum().item() / 1000 / math.log(2), rel=1e-6)


HARNESS_PAGES = [(" = Robert Boulter = \n \n Robert Boulter is an English film , television and theatre actor . "
                  "He had a guest @-@ starring role in 2000 ( aged 12 ) . \n"),
                 " = Du Fu = \n \n Du Fu was a prominent Chinese poet of the Tang dynasty . \n"]


def test_harness_wikitext_documents_and_metrics(tmp_path):
    import re

    from nanoplay.evaldata import harness_wikitext, wikitext_detokenizer

    assert wikitext_detokenizer(HARNESS_PAGES[0]) == (
        " = Robert Boulter =\n\nRobert Boulter is an English film, television and theatre actor. "
        "He had a guest-starring role in 2000 (aged 12).\n")
    data = harness_wikitext(HARNESS_PAGES, "hand-made")
    tok = get_tokenizer()
    assert data.doc_lengths == [len(tok.encode(wikitext_detokenizer(p))) for p in HARNESS_PAGES]
    # the harness counts words and bytes on the article before detokenizing
    assert data.n_words == sum(len(re.split(r"\s+", p)) for p in HARNESS_PAGES)
    assert data.n_bytes == sum(len(p.encode()) for p in HARNESS_PAGES)
    n = data.ids.numel()
    result = ev.perplexity(uniform_model(), data.ids, context=CTX, stride=None, rule="rolling",
                           doc_lengths=data.doc_lengths, n_bytes=data.n_bytes, n_words=data.n_words)
    nll = n * math.log(50304)  # every token scored, each at ln V
    assert result.nll == pytest.approx(nll, rel=1e-6) and result.scored == n
    assert result.word_ppl == pytest.approx(math.exp(nll / data.n_words), rel=1e-6)  # exp(sum nll / words)
    assert result.byte_ppl == pytest.approx(math.exp(nll / data.n_bytes), rel=1e-6)  # exp(sum nll / bytes)
    assert result.bits_per_byte == pytest.approx(nll / data.n_bytes / math.log(2), rel=1e-6)
    # the original wiki.test.raw is cut into articles at its top-level headings
    (tmp_path / "wiki.test.raw").write_text("".join(HARNESS_PAGES))
    assert load_eval_data(f"wikitext={tmp_path / 'wiki.test.raw'}").doc_lengths == data.doc_lengths
    (tmp_path / "latin1.raw").write_bytes(" = Caf\xe9 = \n".encode("latin-1"))
    with pytest.raises(NanoplayError, match=r"latin1.raw: not valid UTF-8 at byte 6 \(0xe9\)"):
        load_eval_data(f"wikitext={tmp_path / 'latin1.raw'}")


def test_eval_rolling_rule_and_harness_references(three_formats, tmp_path, capsys):
    (tmp_path / "wiki.test.raw").write_text("".join(HARNESS_PAGES))
    assert main(["eval", "-m", three_formats[1], "-d", f"wikitext={tmp_path / 'wiki.test.raw'}", "--rule", "rolling",
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    result = report["models"][0]["results"]["wikitext"]
    assert result["rule"] == "rolling" and result["scored_tokens"] == result["tokens"]
    assert report["method"]["rule"] == "rolling" and report["method"]["stride"] is None
    refs = ev.reference_records("gpt2", "wikitext", ("word_ppl", "byte_ppl", "bits_per_byte"), stride=None,
                                rule="rolling")
    assert [(r["metric"], r["value"], r["same_procedure"]) for r in refs] == [
        ("word_ppl", 37.3698, True), ("byte_ppl", 1.9682, True), ("bits_per_byte", 0.9769, True)]
    strided = ev.reference_records("gpt2", "wikitext", ("word_ppl",), stride=512, rule="strided")
    assert strided[0]["same_procedure"] is False and strided[0]["measured"] == "rolling"
    assert main(["eval", "-m", three_formats[1], "-d", "wikitext-2", "--rule", "rolling", "--stride", "8"]) == 2
    assert "--stride applies to the strided rule" in capsys.readouterr().err
