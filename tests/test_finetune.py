"""Chat fine-tuning: the template and its loss mask, input validation, learning, and chat-mode loading."""

import json

import jinja2
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import tiny_model
from nanoplay import cli
from nanoplay.chat import CHAT_TEMPLATE, END_ID, encode_conversation, render_prompt, stop_token_ids
from nanoplay.checkpoint import save_checkpoint, step_dir_name
from nanoplay.engine import Engine
from nanoplay.errors import NanoplayError
from nanoplay.loading import load_model
from nanoplay.sampling import SamplingParams
from nanoplay.tokenizer import EOT_ID, get_tokenizer
from trainer.chat_data import collate, load_conversations, split_examples
from trainer.finetune import newest_pretrained, pad_vocab, run_finetune
from trainer.monitor import read_metrics

SYSTEM, USER, ASSISTANT = 50257, 50258, 50259


@pytest.fixture
def env(tmp_path, monkeypatch, checkpoints):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return checkpoints


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_template_and_mask_on_a_hand_checked_conversation():
    tok = get_tokenizer()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye <|end|>"},
                {"role": "assistant", "content": "Bye."}]
    ids, trained = encode_conversation(messages)
    enc = tok.encode
    expected = ([EOT_ID, SYSTEM, *enc("Be brief."), END_ID, USER, *enc("Hi"), END_ID,
                 ASSISTANT, *enc("Hello."), END_ID, USER, *enc("Bye <|end|>"), END_ID, ASSISTANT, *enc("Bye."), END_ID])
    assert ids == expected
    assert enc("Bye <|end|>").count(END_ID) == 0  # typed special text stays text
    # by hand: only the two answers and their <|end|> are trained
    answer1 = 1 + 1 + len(enc("Be brief.")) + 1 + 1 + len(enc("Hi")) + 1 + 1  # index of "Hello." 's first token
    n1 = len(enc("Hello.")) + 1
    answer2 = len(ids) - len(enc("Bye.")) - 1
    want = [False] * len(ids)
    want[answer1:answer1 + n1] = [True] * n1
    want[answer2:] = [True] * (len(enc("Bye.")) + 1)
    assert trained == want
    # the recorded Jinja template renders the same tokens (for contents without special-token text)
    plain = messages[:3]
    text = jinja2.Template(CHAT_TEMPLATE).render(messages=plain, add_generation_prompt=False)
    assert tok.encode(text, allow_special=True) == encode_conversation(plain)[0]
    prompt = render_prompt(plain[:2], CHAT_TEMPLATE)
    assert prompt == encode_conversation(plain[:2])[0] + [ASSISTANT] and stop_token_ids(CHAT_TEMPLATE) == [END_ID]

    # collate: targets are the next ids where trained, -1 elsewhere (prompts and padding)
    x, y = collate([type("E", (), {"ids": ids, "trained": trained})(), type("E", (), {"ids": ids[:6], "trained": trained[:6]})()])
    assert x.shape == y.shape == (2, len(ids) - 1)
    assert x[0].tolist() == ids[:-1]
    assert [t for t in y[0].tolist() if t != -1] == [i for i, k in zip(ids, trained) if k]
    assert y[0, answer1 - 1].item() == ids[answer1] and y[0, answer1 - 2].item() == -1
    assert y[1].tolist() == [-1] * (len(ids) - 1)  # no answer in the first 6 tokens; padding is never trained


MALFORMED = [
    ("{not json", "not JSON"),
    ({"messages": [{"content": "hi"}, {"role": "assistant", "content": "x"}]}, "message 1 has no role"),
    ({"messages": [{"role": "bot", "content": "hi"}]}, "message 1 has unknown role 'bot'"),
    ([{"role": "assistant", "content": "hi"}], "roles out of order: message 1 is assistant, expected user"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "message 2 is user, expected assistant"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
     "ends with a user message"),
    ([{"role": "system", "content": "s"}], "a system message alone"),
    ([{"role": "user", "content": "  "}, {"role": "assistant", "content": "b"}], "message 1 (user) has empty content"),
    ([{"role": "user", "content": 5}, {"role": "assistant", "content": "b"}],
     "message 1 (user) has content 5: it must be a string"),
    ([{"role": "user", "content": "a"}, {"role": "assistant"}], "message 2 (assistant) has no content"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b\ud800"}],
     "message 2 (assistant): a lone surrogate (\\ud800) at character 2"),
    ({"prompt": "q"}, 'has "prompt" but no "response"'),
    ({"text": "hello"}, "not a conversation"),
    ({"messages": []}, "has no messages"),
    ({"prompt": "word " * 80, "response": "ok"}, "too long for the context"),
]
GOOD = {"messages": [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}]}


def test_every_malformed_line_is_reported_with_its_number_and_reason(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD] + [r for r, _ in MALFORMED] + [{"prompt": "2+2?", "response": "4"}])
    examples, problems = load_conversations(str(path), block_size=64)
    assert [e.line for e in examples] == [1, len(MALFORMED) + 2]
    assert [p.line for p in problems] == list(range(2, len(MALFORMED) + 2))
    for problem, (_, reason) in zip(problems, MALFORMED):
        assert reason in problem.reason, (problem, reason)


def test_cli_stops_with_exit_2_or_skips_invalid(env, tmp_path, capsys):
    save_checkpoint(tiny_model(1), env / "base" / step_dir_name(10), step=10)
    records = [GOOD] * 3 + ["oops"] * 25
    path = write_jsonl(tmp_path / "d.jsonl", records)
    assert cli.main(["finetune", "--data", str(path)]) == 2
    err = capsys.readouterr().err
    assert "25 invalid conversations" in err and "line 4: not JSON" in err and "line 23: not JSON" in err
    assert "line 24:" not in err and "... and 5 more" in err  # at most 20 listed
    assert "--skip-invalid" in err.splitlines()[-1]
    assert cli.main(["finetune", "--data", str(path), "--skip-invalid", "--show-mask"]) == 0
    out = capsys.readouterr()
    assert "dropped 25 invalid conversation(s), training on 3" in out.err
    assert "line 1: 3 of 14 tokens trained" in out.out and "Paris." in out.out


def test_accepts_every_shape_and_parquet(env, tmp_path):
    shapes = [GOOD, GOOD["messages"], {"prompt": GOOD["messages"][0]["content"], "response": "Paris."}]
    jsonl = write_jsonl(tmp_path / "d.jsonl", shapes)
    (tmp_path / "d.json").write_text(json.dumps(shapes))
    pq.write_table(pa.table({"messages": [GOOD["messages"]] * 2}), tmp_path / "d.parquet")
    pq.write_table(pa.table({"prompt": ["What is the capital of France?"], "response": ["Paris."]}), tmp_path / "p.parquet")
    want = encode_conversation(GOOD["messages"])[0]
    for path, n in ((jsonl, 3), (tmp_path / "d.json", 3), (tmp_path / "d.parquet", 2), (tmp_path / "p.parquet", 1)):
        examples, problems = load_conversations(str(path), block_size=64)
        assert not problems and len(examples) == n and all(e.ids == want for e in examples), path


def test_pad_vocab_keeps_the_hub_models_outputs():
    base = tiny_model(2, vocab_size=50257)
    padded = pad_vocab(base)
    assert padded.config.vocab_size == 50304 and padded.lm_head.weight is padded.transformer.wte.weight
    x = torch.randint(0, 50257, (1, 10))
    with torch.no_grad():
        assert torch.allclose(padded.eval()(x)[..., :50257], base(x), atol=1e-5)
    assert torch.allclose(padded.transformer.wte.weight[50300], base.transformer.wte.weight.mean(0))


QA = [("What is the capital of France?", "Paris."), ("What color is the sky?", "Blue."),
      ("How many legs has a cat?", "Four.")]


def test_a_tiny_model_learns_to_answer_and_loads_in_chat_mode(env, tmp_path, capsys):
    save_checkpoint(tiny_model(5), env / "base" / step_dir_name(100), step=100)
    assert newest_pretrained() == "base"
    dialogs = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QA] * 4
    path = write_jsonl(tmp_path / "dialogs.jsonl", dialogs)
    result = run_finetune(overrides={"data": str(path), "max_iters": 60, "learning_rate": 1e-2, "min_lr": 1e-3,
                                     "warmup_iters": 5, "batch_size": 6, "eval_interval": 30, "sample_tokens": 8},
                          display="none")
    assert result.step == 60 and result.checkpoint.endswith(step_dir_name(60))

    lm = load_model("base-chat")  # named after its init; the newest step
    assert lm.chat_template == CHAT_TEMPLATE and lm.meta["init"] == "base"
    assert newest_pretrained() == "base"  # a chat model is never picked as the base of another fine-tune
    engine = Engine()
    for question, answer in QA:
        prompt = render_prompt([{"role": "user", "content": question}], lm.chat_template)
        req = engine.generate(lm, prompt, SamplingParams(max_new_tokens=10, temperature=0,
                                                         stop_token_ids=stop_token_ids(lm.chat_template)))
        assert req.text == answer and req.finish_reason == "stop"
    # and `nanoplay gen --chat` finds the template by itself
    assert cli.main(["gen", "--model", "base-chat", "--chat", "--prompt", QA[0][0], "--temperature", "0",
                     "--max-new-tokens", "10", "--json"]) == 0
    record = json.loads(capsys.readouterr().out.splitlines()[0])
    assert record["text"] == QA[0][1]


def test_finetune_needs_data_and_a_base(env):
    with pytest.raises(NanoplayError, match="finetune needs --data"):
        run_finetune(overrides={})
    with pytest.raises(NanoplayError, match="no pre-trained checkpoint"):
        newest_pretrained()


def test_print_config_is_what_runs_and_reads_back(env, tmp_path, capsys):
    save_checkpoint(tiny_model(5), env / "base" / step_dir_name(100), step=100)
    dialogs = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QA] * 4
    path = write_jsonl(tmp_path / "dialogs.jsonl", dialogs)
    assert cli.main(["finetune", "--data", str(path), "--init", "base", "--sample-tokens", "0", "--print-config"]) == 0
    printed = capsys.readouterr().out
    # 3 epochs of the 11 training conversations (12 minus round(12 x 0.05) = 1 held out) at 4 per step are
    # ceil(3 x 11 / 4) = 9 steps: too few to learn the format, so min_iters raises them to 100 (100 / 2.75 epochs)
    assert ("max_iters = 100  # 3 epochs of 11 training conversations are 9 steps: min_iters raises it to "
            "36.4 epochs") in printed
    assert cli.main(["finetune", "--data", str(path), "--init", "base", "--sample-tokens", "0", "--min-iters", "5",
                     "--print-config"]) == 0
    printed = capsys.readouterr().out
    # the base's shape (not owt-30m's 6/384/512), its name, and the 9 steps of 3 epochs; the warm-up fits them
    for line in ("n_layer = 2", "n_embd = 32", "block_size = 64", "vocab_size = 50304", 'init = "base"',
                 'name = "base-chat"', "max_iters = 9  # 3 epochs of 11 training conversations (delete",
                 "warmup_iters = 20  # capped to 0 steps: warm-up takes at most 10% of max_iters 9"):
        assert line in printed, line
    assert "# the shape of --init base, its vocabulary padded for the chat tokens" in printed
    assert not (env / "base-chat").exists()
    config = tmp_path / "ft.toml"
    config.write_text(printed)
    assert cli.main(["finetune", "--config", str(config)]) == 0
    assert "finished at step 9" in capsys.readouterr().out
    # max_iters written in the file wins over epochs, as a flag does
    config.write_text(printed.replace("max_iters = 9", "max_iters = 2").replace('"base-chat"', '"two"'))
    assert cli.main(["finetune", "--config", str(config)]) == 0
    assert "finished at step 2" in capsys.readouterr().out


def test_finetune_names_and_help(env, tmp_path, capsys):
    save_checkpoint(tiny_model(5), env / "base" / step_dir_name(100), step=100)
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD] * 3)
    assert cli.main(["finetune", "--data", str(path), "--name", "../out"]) == 2
    assert "run name '../out': use one plain folder name" in capsys.readouterr().err
    assert not (env.parent / "out").exists()
    with pytest.raises(SystemExit):
        cli.main(["finetune", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--name NAME run name under checkpoints/ (default: the --init model's name + -chat)" in help_text


COLOURS = [("sky", "blue"), ("grass", "green"), ("snow", "white"), ("coal", "black"), ("blood", "red"),
           ("sun", "yellow"), ("sea", "blue"), ("leaf", "green"), ("milk", "white"), ("night", "black")]
LEGS = [("cat", "four"), ("bird", "two"), ("spider", "eight"), ("ant", "six"), ("dog", "four"),
        ("snake", "no"), ("horse", "four"), ("duck", "two"), ("bee", "six"), ("fish", "no")]


def test_the_default_finetune_learns_the_chat_format_from_20_conversations(env, tmp_path, capsys):
    # the case: 20 conversations with every default. Before, 3 epochs at 8 per step were 8 steps, all
    # inside a 20-step warm-up (lr <= 3.8e-5): the held-out loss hardly moved and the answers had no <|end|>.
    # A base of the demo's width (128) and vocabulary, 2 layers and a 64-token context keep it quick.
    save_checkpoint(tiny_model(7, n_embd=128), env / "base" / step_dir_name(1), step=1)
    dialogs = ([[{"role": "user", "content": f"What colour is the {x}?"},
                 {"role": "assistant", "content": f"The {x} is {c}."}] for x, c in COLOURS]
               + [[{"role": "user", "content": f"How many legs has a {x}?"},
                   {"role": "assistant", "content": f"A {x} has {n} legs."}] for x, n in LEGS])
    path = write_jsonl(tmp_path / "dialogs.jsonl", [{"messages": d} for d in dialogs])
    result = run_finetune(overrides={"data": str(path), "sample_tokens": 0}, display="plain")
    assert result.step == 100  # 3 epochs of 19 conversations at 4 per step are 15 steps: min_iters makes 100
    assert "too few" not in capsys.readouterr().err
    vals = [m["val_loss"] for m in read_metrics(env / "base-chat" / "metrics.jsonl") if "val_loss" in m]
    assert vals[-1] < vals[0] - 5.0  # measured: 10.83 -> 3.04 nats (the old defaults: 10.83 -> 10.72)

    lm = load_model("base-chat")
    _, (held_out,) = split_examples(load_conversations(str(path), 64)[0], 0.05, seed=1337)  # the defaults' split
    prompt = render_prompt(held_out.messages[:1], lm.chat_template)
    req = Engine().generate(lm, prompt, SamplingParams(max_new_tokens=16, temperature=0,
                                                       stop_token_ids=stop_token_ids(lm.chat_template)))
    assert req.finish_reason == "stop" and req.text.strip(), req.text  # an answer, ended by <|end|>
