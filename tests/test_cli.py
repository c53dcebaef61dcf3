"""The command line as scripts use it: JSONL output, exit codes, one-line errors."""

import io
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from nanoplay.cli import main
from nanoplay import precision
from nanoplay.tokenizer import get_tokenizer


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # rich tables unwrapped


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def strict_json(line):
    """Parse as strict JSON readers do (JavaScript's JSON.parse): no NaN or Infinity."""
    def reject(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(line, parse_constant=reject)


def test_gen_json(tiny_run, capsys):
    argv = ["gen", "-m", "tiny", "-m", "tiny@100", "--prompt", "The future of AI is", "--max-new-tokens", "6",
            "--temperature", "0.8", "--top-k", "200", "--seed", "1337", "--n", "2", "--json", "--top-logprobs", "3"]
    code, out, _ = run_cli(capsys, *argv)
    assert code == 0
    records = [json.loads(line) for line in out.splitlines()]
    assert [(r["model"], r["seed"]) for r in records] == [("tiny@200", 1337), ("tiny@200", 1338),
                                                          ("tiny@100", 1337), ("tiny@100", 1338)]
    for r in records:
        assert r["finish_reason"] in ("length", "eot") and r["settings"]["top_k"] == 200
        assert len(r["tokens"]) == r["completion_tokens"] <= 6
        assert "".join(t["token"] for t in r["tokens"]) == r["text"]
        assert all(len(t["top_logprobs"]) == 3 and t["logprob"] <= 0 for t in r["tokens"])
        assert r["perplexity"] == pytest.approx(math.exp(-sum(t["logprob"] for t in r["tokens"]) / len(r["tokens"])))
    # same seed, same tokens: a second run reproduces the first
    _, again, _ = run_cli(capsys, *argv)
    assert [json.loads(line)["text"] for line in again.splitlines()] == [r["text"] for r in records]


@pytest.mark.parametrize("dtype, recorded", [("fp32", "fp32"), ("bf16", "bf16"), ("int8", "int8"), ("auto", "bf16")])
def test_gen_and_score_json_say_the_weights_precision(tiny_run, capsys, monkeypatch, dtype, recorded):
    """bf16's figures are not fp32's (gen's compiled step and score's torch products differ by ~1e-2 in
    bf16): every record says which precision made it, the one --dtype auto chose included."""
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx512_bf16"}))  # a CPU where auto is bf16
    code, out, _ = run_cli(capsys, "gen", "-m", "tiny", "--prompt", "The", "--max-new-tokens", "2", "--json",
                           "--device", "cpu", "--dtype", dtype)
    assert code == 0 and json.loads(out)["dtype"] == recorded
    code, out, _ = run_cli(capsys, "score", "-m", "tiny", "--text", "The cat", "--json", "--device", "cpu",
                           "--dtype", dtype)
    assert code == 0 and json.loads(out)["dtype"] == recorded


def test_gen_json_is_strict_with_null_for_filtered_alternatives(tiny_run, capsys):
    # greedy: the sampled distribution puts all mass on the top token, -inf on the others
    code, out, _ = run_cli(capsys, "gen", "-m", "tiny", "--prompt", "The class", "--max-new-tokens", "2",
                           "--temperature", "0", "--top-logprobs", "2", "--json")
    assert code == 0
    for token in strict_json(out)["tokens"]:
        best, second = token["top_logprobs"]
        assert token["sampling_logprob"] == best["sampling_logprob"] == 0.0 and token["rank"] == 1
        assert second["sampling_logprob"] is None and second["logprob"] < best["logprob"] <= 0


def test_gen_prompts_any_suffix_case_json_array_and_bom(tiny_run, tmp_path, capsys):
    def prompts_of(path, text):
        path.write_text(text, encoding="utf-8")
        code, out, _ = run_cli(capsys, "gen", "-m", "tiny", "--prompts", str(path), "--max-new-tokens", "1", "--json")
        assert code == 0
        return [strict_json(line)["prompt"] for line in out.splitlines()]

    assert prompts_of(tmp_path / "PROMPTS.JSONL", '\ufeff{"prompt": "One"}\n\n"Two"\n') == ["One", "Two"]
    assert prompts_of(tmp_path / "p.Json", '\ufeff["One", {"prompt": "Two"}]') == ["One", "Two"]
    assert prompts_of(tmp_path / "p.txt", "\ufeffalpha\r\n\nbeta\r\n") == ["alpha", "beta"]


@pytest.mark.parametrize("name, text, message", [
    ("p.json", '["ok", 3]', 'p.json: item 2 of the array: expected {"prompt": "..."} or a JSON string'),
    ("p.json", '{"prompt": "one"}', 'p.json: expected a JSON array of prompts, like ["...", {"prompt": "..."}]'),
    ("p.json", '"one"\n"two"\n', "p.json: not valid JSON (Extra data at line 2 column 1); "
                                 "one JSON value per line is JSONL: name the file .jsonl"),
    ("p.json", "[]", "p.json holds no prompts"),
    ("p.txt", "\n  \n", "p.txt holds no prompts"),
    # JSON's escape of half a UTF-16 pair: the tokenizer replaced it unseen, and printing the prompt failed
    ("p.jsonl", '{"prompt": "a\\ud800"}\n', "p.jsonl:1: a lone surrogate (\\ud800) at character 2 is half of a "
                                              "UTF-16 pair, not text: write the character itself, or both halves of its pair"),
    ("p.json", '["ok", "\\udc00"]', "p.json: item 2 of the array: a lone surrogate (\\udc00) at character 1 is "
                                     "half of a UTF-16 pair, not text: write the character itself, or both halves of its pair"),
])
def test_gen_bad_prompts_file_is_one_line(tiny_run, tmp_path, capsys, name, text, message):
    (tmp_path / name).write_text(text)
    code, out, err = run_cli(capsys, "gen", "-m", "tiny", "--prompts", str(tmp_path / name))
    assert code == 2 and out == "" and err == f"nanoplay: error: {tmp_path}/{message}\n"


@pytest.mark.parametrize("flags, message", [
    (["--seed", "-1"], "invalid sampling setting: seed must be between 0 and 2**63 - 1"),  # was run with seed 2**63 - 1
    (["--seed", str(2**63)], "invalid sampling setting: seed must be between 0 and 2**63 - 1"),  # was run with seed 0
    (["--n", "0"], "--n must be at least 1"),
    (["--temperature", "nan"], "invalid sampling setting: temperature must be a finite number"),
])
def test_gen_bad_settings_are_one_line_before_any_model_loads(tiny_run, capsys, flags, message):
    code, out, err = run_cli(capsys, "gen", "-m", "no-such-model", "-p", "Hi", *flags)
    assert (code, out, err) == (2, "", f"nanoplay: error: {message}\n")


def test_gen_prompt_from_stdin(tiny_run, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("Once upon a time\n"))  # as `echo` pipes it
    code, out, _ = run_cli(capsys, "gen", "-m", "tiny", "--max-new-tokens", "1", "--json")
    assert code == 0 and strict_json(out)["prompt"] == "Once upon a time"
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    code, out, err = run_cli(capsys, "gen", "-m", "tiny")
    assert code == 2 and out == "" and err == ("nanoplay: error: no prompt on stdin: it was empty; pipe some text, "
                                               "or give --prompt TEXT or --prompts FILE\n")


def test_gen_malformed_jsonl_line(tiny_run, tmp_path, capsys):
    f = tmp_path / "prompts.jsonl"
    f.write_text('{"prompt": "ok"}\n{"prompt": oops}\n')
    code, _, err = run_cli(capsys, "gen", "-m", "tiny", "--prompts", str(f), "--json")
    assert code == 2
    assert err.startswith(f"nanoplay: error: {f}:2: not valid JSON") and err.count("\n") == 1


def test_gen_streams_text(tiny_run, capsys):
    code, out, _ = run_cli(capsys, "gen", "-m", "tiny", "--prompt", "Hello", "--max-new-tokens", "5", "--seed", "3")
    _, js, _ = run_cli(capsys, "gen", "-m", "tiny", "--prompt", "Hello", "--max-new-tokens", "5", "--seed", "3", "--json")
    assert code == 0 and out == "Hello" + json.loads(js)["text"] + "\n"


def test_gen_text_reports_its_random_seed(tiny_run, capsys):
    code, out, err = run_cli(capsys, "gen", "-m", "tiny", "--prompt", "Hello", "--max-new-tokens", "5")
    seed = int(err.split()[2])
    assert code == 0 and err == f"nanoplay: seed {seed} (--seed {seed} repeats this run)\n"
    _, again, err = run_cli(capsys, "gen", "-m", "tiny", "--prompt", "Hello", "--max-new-tokens", "5", "--seed", str(seed))
    assert again == out and err == ""


def test_gen_json_interrupted_writes_cancelled_records(tiny_run, capsys, monkeypatch):
    from nanoplay.engine import Engine

    argv = ["gen", "-m", "tiny", "--prompt", "One", "--prompt", "Two", "--max-new-tokens", "20", "--no-stop-eot",
            "--seed", "5", "--json"]
    _, full, _ = run_cli(capsys, *argv)
    step, calls = Engine.step, []

    def ctrl_c_before_the_third_step(engine):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return step(engine)

    monkeypatch.setattr(Engine, "step", ctrl_c_before_the_third_step)
    code, out, err = run_cli(capsys, *argv)
    assert code == 130 and err == "nanoplay: interrupted\n"
    records, complete = [strict_json(line) for line in out.splitlines()], [strict_json(line) for line in full.splitlines()]
    assert [r["prompt"] for r in records] == ["One", "Two"]
    for r, c in zip(records, complete):  # a prefill and a decode step ran: two tokens each, as in the full run
        assert r["finish_reason"] == "cancelled" and r["completion_tokens"] == 2
        assert r["tokens"] == c["tokens"][:2] and c["finish_reason"] == "length"


def test_gen_long_prompt_says_so_once_per_prompt(tiny_run, capsys):
    code, out, err = run_cli(capsys, "gen", "-m", "tiny", "--prompt", "word " * 200, "--prompt", "short",
                             "--max-new-tokens", "4", "--n", "2", "--json")
    assert code == 0 and err == ("nanoplay: note: prompt longer than tiny@200's context of 64 tokens: kept its last "
                                 "60 tokens; the window slides as it generates\n")
    assert [strict_json(line)["prompt_truncated"] for line in out.splitlines()] == [141, 141, 0, 0]  # 201 tokens, 60 kept


def test_gen_chat_says_when_the_template_is_plain_text(tiny_run, checkpoints, capsys):
    from nanoplay.chat import CHAT_TEMPLATE
    from nanoplay.checkpoint import save_checkpoint, step_dir_name
    from tests.conftest import tiny_model

    save_checkpoint(tiny_model(3), checkpoints / "tiny-chat" / step_dir_name(1), step=1,
                    meta={"chat_template": CHAT_TEMPLATE})
    code, out, err = run_cli(capsys, "gen", "-m", "tiny", "-m", "tiny-chat", "--chat", "--prompt", "Hi",
                             "--max-new-tokens", "2", "--n", "2", "--json")
    assert code == 0 and len(out.splitlines()) == 4
    assert err == ('nanoplay: note: tiny@200 is not chat-tuned: --chat gives it a plain-text chat '
                   '("User: ..." then "Assistant:")\n')


def test_score_json_by_hand(tiny_run, capsys):
    text = "Bits per byte are fair across tokenizers."
    code, out, _ = run_cli(capsys, "score", "-m", "tiny", "--text", text, "--json")
    r = json.loads(out)
    nll = -sum(t["logprob"] for t in r["per_token"])
    assert r["tokens"] == len(r["per_token"])
    assert r["perplexity"] == pytest.approx(math.exp(nll / r["tokens"]))
    assert r["bits_per_byte"] == pytest.approx(nll / math.log(2) / len(text.encode()))
    assert r["per_token"][0]["surprisal_bits"] == pytest.approx(-r["per_token"][0]["logprob"] / math.log(2))


def test_alternatives_have_bytes_like_tokens(tiny_run, capsys):
    text = "Café 🙂"  # the emoji is several byte-level tokens, none of them a character alone
    _, out, _ = run_cli(capsys, "score", "-m", "tiny", "--text", text, "--json", "--top-logprobs", "3")
    per_token = strict_json(out)["per_token"]
    assert b"".join(bytes(t["bytes"]) for t in per_token) == text.encode()
    alternatives = [a for t in per_token for a in t["top_logprobs"]]
    _, out, _ = run_cli(capsys, "gen", "-m", "tiny", "--prompt", text, "--temperature", "0", "--max-new-tokens", "3",
                        "--json", "--top-logprobs", "3")
    for t in strict_json(out)["tokens"]:
        assert t["top_logprobs"][0]["bytes"] == t["bytes"]  # greedy: the top alternative is the token
        alternatives += t["top_logprobs"]
    assert len(alternatives) == 3 * len(per_token) + 9
    for a in alternatives:
        assert bytes(a["bytes"]).decode("utf-8", "replace") == a["token"]


def test_score_file_ignores_a_byte_order_mark(tiny_run, tmp_path, capsys):
    text = "Bits per byte are fair across tokenizers."
    (tmp_path / "essay.txt").write_text("\ufeff" + text, encoding="utf-8")
    _, from_file, _ = run_cli(capsys, "score", "-m", "tiny", "--file", str(tmp_path / "essay.txt"), "--json")
    _, from_text, _ = run_cli(capsys, "score", "-m", "tiny", "--text", text, "--json")
    assert strict_json(from_file) == strict_json(from_text)


@pytest.mark.parametrize("command", [["gen", "--prompt", "Hi", "--max-new-tokens", "1"], ["score", "--text", "Hi"]])
def test_top_logprobs_limit_is_the_same_for_gen_and_score(tiny_run, capsys, command):
    for count in ("21", "-1"):
        code, out, err = run_cli(capsys, *command, "-m", "tiny", "--top-logprobs", count, "--json")
        assert code == 2 and out == "" and err == "nanoplay: error: --top-logprobs must be between 0 and 20\n"
    code, out, _ = run_cli(capsys, *command, "-m", "tiny", "--top-logprobs", "20", "--json")
    key = "tokens" if command[0] == "gen" else "per_token"
    assert code == 0 and len(strict_json(out)[key][0]["top_logprobs"]) == 20


def test_models_lists_checkpoints(tiny_run, hf_home, capsys):
    code, out, _ = run_cli(capsys, "models")
    assert code == 0 and "tiny" in out and "100, 200" in out and "nanoplay pull" in out


def test_bench_runs_side_by_side(tiny_run, capsys):
    code, out, _ = run_cli(capsys, "bench", "-m", "tiny", "--vs", "transformers", "--repeats", "1",
                           "--prompt-tokens", "8", "--new-tokens", "8", "--batch", "1", "--batch", "2")
    assert code == 0 and "transformers" in out and "vs batch 1" in out


def test_bench_scoring(tiny_run, capsys):
    code, out, _ = run_cli(capsys, "bench", "-m", "tiny", "--scoring", "--batch", "2")
    assert code == 0 and "transformers forward" in out and "max logit difference" in out


def test_export_cli(tiny_run, tmp_path, capsys):
    code, out, _ = run_cli(capsys, "export", "tiny", "--hf", str(tmp_path / "hf"))
    assert code == 0 and (tmp_path / "hf" / "model.safetensors").is_file()


@pytest.mark.parametrize("spec, message", [
    ("./missing/ckpt.pt", "unknown model './missing/ckpt.pt'"),
    ("gpt2-xl", "gpt2-xl is not in the local Hugging Face cache and the Hub cannot be reached"),
])
def test_bad_model_is_one_line_exit_2(tmp_path, spec, message):
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1",
           "NANOPLAY_CHECKPOINTS": str(tmp_path / "none")}
    p = subprocess.run([sys.executable, "-m", "nanoplay", "gen", "-m", spec, "--prompt", "x"],
                       capture_output=True, text=True, env=env)
    assert p.returncode == 2
    assert message in p.stderr and p.stderr.count("\n") == 1 and "Traceback" not in p.stderr


@pytest.mark.parametrize("command", [["gen", "--prompt", "x"], ["score", "--text", "x"]])
def test_model_that_fails_to_load_is_one_line_exit_2(tiny_run, tmp_path, capsys, command):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_run / "step-00000200", broken)
    (broken / "config.json").write_text("{oops")
    code, out, err = run_cli(capsys, *command, "-m", "tiny", "-m", str(broken), "--json")
    assert code == 2 and out == ""
    assert err == (f"nanoplay: error: {broken}/config.json is unreadable or not JSON (Expecting property name "
                   "enclosed in double quotes: line 1 column 2 (char 1)): the checkpoint is damaged; re-save, "
                   "re-export or re-download it\n")


def test_pull_offline_is_one_line(hf_home, capsys):
    code, _, err = run_cli(capsys, "pull", "gpt2-medium")
    assert code == 2 and err == ("nanoplay: error: gpt2-medium is not in the local Hugging Face cache and the Hub "
                                 "cannot be reached: run `nanoplay pull gpt2-medium` where you have network\n")


def test_pull_finds_a_cached_snapshot(hf_home, capsys):
    from tests.conftest import hf_gpt2, write_hf_snapshot

    snap = write_hf_snapshot(hf_home, "gpt2", hf_gpt2())
    code, out, _ = run_cli(capsys, "pull", "gpt2")
    assert code == 0 and out.strip() == f"gpt2: {snap}"


def test_command_line_parsing_does_not_import_torch():
    # `nanoplay` opens the playground in under 1.5 s only if parsing stays light
    code = "import sys; from nanoplay.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_bench_shape_names_match_the_engine():
    from nanoplay.bench import SHAPES
    from nanoplay.commands.bench import SHAPE_NAMES

    assert sorted(SHAPES) == list(SHAPE_NAMES)


def test_bench_llama_cpp_type_names_match_the_engine():
    from nanoplay.bench import LLAMA_CPP_QUANTIZED
    from nanoplay.commands.bench import VS_LLAMA_CPP_QUANTIZED

    assert [f"llama.cpp:{t}" for t in LLAMA_CPP_QUANTIZED] == list(VS_LLAMA_CPP_QUANTIZED)


def test_device_is_the_gpu_when_present_and_bad_devices_are_one_line(tiny_run, capsys, monkeypatch):
    from nanoplay.loading import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == torch.device("cpu")
    for device, message in (("cuda", "CUDA is not available on this machine; use cpu"),
                            ("tpu", "give cpu or cuda[:N]"), ("mps", "nanoplay runs on cpu or cuda[:N]")):
        code, out, err = run_cli(capsys, "gen", "-m", "tiny", "--prompt", "Hi", "--device", device)
        assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device(None) == torch.device("cuda")


# -- issue 11: edges of gen and score ------------------------------------------------------------------

def test_gen_tiny_temperature_is_greedy(tiny_run, capsys):
    argv = ["gen", "-m", "tiny", "--prompt", "The class", "--max-new-tokens", "4", "--json"]
    _, greedy, _ = run_cli(capsys, *argv, "--temperature", "0")
    code, tiny, _ = run_cli(capsys, *argv, "--temperature", "1e-38", "--seed", "1")
    assert code == 0
    tokens = strict_json(tiny)["tokens"]
    assert [t["id"] for t in tokens] == [t["id"] for t in strict_json(greedy)["tokens"]]
    assert all(t["sampling_logprob"] == 0.0 and t["rank"] == 1 for t in tokens)  # not null, not token 0


@pytest.mark.parametrize("flag", [[], ["--no-eot-prefix"]])
def test_gen_and_score_give_the_same_tokens_the_same_logprobs(tiny_run, capsys, flag):
    prompt = "The cat sat on the"
    _, out, _ = run_cli(capsys, "gen", "-m", "tiny", "--prompt", prompt, "--max-new-tokens", "6", "--seed", "2",
                        "--no-stop-eot", "--json", *flag)
    generated = strict_json(out)["tokens"]
    ids = get_tokenizer().encode(prompt) + [t["id"] for t in generated]
    text = get_tokenizer().decode(ids)
    assert get_tokenizer().encode(text) == ids  # so score sees the same tokens
    _, out, _ = run_cli(capsys, "score", "-m", "tiny", "--text", text, "--json", *flag)
    scored = strict_json(out)["per_token"][-len(generated):]
    assert [t["id"] for t in scored] == [t["id"] for t in generated]
    assert [t["logprob"] for t in scored] == pytest.approx([t["logprob"] for t in generated], abs=1e-5)


def test_gen_prompts_get_their_own_seeds_and_each_line_reruns_alone(tiny_run, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("Once upon a time\nOnce upon a time\nIn the beginning\n")
    code, out, _ = run_cli(capsys, "gen", "-m", "tiny", "-m", "tiny@100", "--prompts", str(prompts), "--seed", "7",
                           "--n", "2", "--max-new-tokens", "8", "--no-stop-eot", "--json")
    records = [strict_json(line) for line in out.splitlines()]
    assert code == 0 and len(records) == 12
    seeds = [r["seed"] for r in records]
    assert seeds[:6] == [7, 8, 7 + 1000003, 8 + 1000003, 7 + 2000006, 8 + 2000006] == seeds[6:]  # models share
    first, second = records[0], records[2]  # the same prompt twice: different streams now
    assert first["prompt"] == second["prompt"] and first["text"] != second["text"]
    for r in records[3], records[10]:
        _, again, _ = run_cli(capsys, "gen", "-m", r["model"], "--prompt", r["prompt"], "--seed", str(r["seed"]),
                              "--max-new-tokens", "8", "--no-stop-eot", "--json")
        assert strict_json(again)["text"] == r["text"]


def test_gen_stop_reads_escapes(tiny_run, capsys):
    code, out, _ = run_cli(capsys, "gen", "-m", "tiny", "--prompt", "Hi", "--stop", r"\n", "--stop", r"a\\b",
                           "--max-new-tokens", "2", "--json")
    assert code == 0 and strict_json(out)["settings"]["stop"] == ["\n", "a\\b"]
    code, out, err = run_cli(capsys, "gen", "-m", "tiny", "--prompt", "Hi", "--stop", r"\q")
    assert code == 2 and out == "" and err == ("nanoplay: error: stop string \\q: unknown escape \\q; the escapes are "
                                               "\\n \\t \\r \\\\ (a backslash) \\, and \\uXXXX\n")


def test_greedy_gen_prints_no_seed_and_records_none(tiny_run, capsys):
    code, out, err = run_cli(capsys, "gen", "-m", "tiny", "--prompt", "Hello", "--max-new-tokens", "3",
                             "--temperature", "0")
    assert code == 0 and err == ""
    _, out, _ = run_cli(capsys, "gen", "-m", "tiny", "--prompt", "Hello", "--max-new-tokens", "3",
                        "--temperature", "0", "--n", "2", "--json")
    assert [strict_json(line)["seed"] for line in out.splitlines()] == [None, None]
    assert all(strict_json(line)["settings"]["seed"] is None for line in out.splitlines())


def test_gen_text_samples_and_chat_are_laid_out(tiny_run, capsys):
    code, out, _ = run_cli(capsys, "gen", "-m", "tiny", "--prompt", "Hi", "--n", "2", "--max-new-tokens", "3",
                           "--seed", "4")
    assert code == 0 and out.startswith("── tiny@200 · sample 1 · seed 4 ──\nHi")  # no leading blank line
    assert "]\n\n── tiny@200 · sample 2 · seed 5 ──\nHi" in out
    _, out, _ = run_cli(capsys, "gen", "-m", "tiny", "--chat", "--prompt", "Is it in Python?", "--max-new-tokens",
                        "4", "--seed", "4")
    _, js, _ = run_cli(capsys, "gen", "-m", "tiny", "--chat", "--prompt", "Is it in Python?", "--max-new-tokens",
                       "4", "--seed", "4", "--json")
    assert out == f"User: Is it in Python?\nAssistant: {strict_json(js)['text'].lstrip()}\n"


NOT_UTF8 = "not valid UTF-8 at byte 6 (0xe9); convert it first, e.g. `iconv -f latin1 -t utf-8`"


@pytest.mark.parametrize("command", [["gen", "--prompts"], ["score", "--file"]])
def test_invalid_utf8_files_are_one_line_with_the_offset(tiny_run, tmp_path, capsys, command):
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"Hello \xe9t\xe9\n")
    code, out, err = run_cli(capsys, *command, str(path), "-m", "tiny")
    assert code == 2 and out == "" and err == f"nanoplay: error: {path}: {NOT_UTF8}\n"


@pytest.mark.parametrize("command", [["gen", "--max-new-tokens", "1"], ["score"]])
def test_invalid_utf8_on_stdin_is_the_same_error(tiny_run, tmp_path, command):
    env = {**os.environ, "NANOPLAY_CHECKPOINTS": str(tiny_run.parent)}
    p = subprocess.run([sys.executable, "-m", "nanoplay", *command, "-m", "tiny"], input=b"Hello \xe9t\xe9\n",
                       capture_output=True, env=env)
    assert p.returncode == 2 and p.stdout == b"" and p.stderr.decode() == f"nanoplay: error: stdin: {NOT_UTF8}\n"


@pytest.mark.parametrize("command", [
    ["gen", "--prompt", "Once", "--prompt", "Twice", "--n", "40", "--max-new-tokens", "30", "--seed", "1"],
    ["gen", "--prompt", "Once", "--n", "40", "--max-new-tokens", "30", "--json"],
    ["score", "--text", "word " * 200, "--json"],
])
def test_a_closed_pipe_ends_quietly(tiny_run, command):
    env = {**os.environ, "NANOPLAY_CHECKPOINTS": str(tiny_run.parent)}
    p = subprocess.Popen([sys.executable, "-m", "nanoplay", *command, "-m", "tiny"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=env)
    p.stdout.close()  # as `| head -0` does, before anything is written
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) in (0, 141) and err == ""


@pytest.mark.parametrize("command", [["models"], ["score", "--text", "word " * 50]])
def test_a_closed_pipe_under_a_rich_table_ends_as_any_closed_pipe(tiny_run, command):
    """rich's console ends a broken pipe with exit 1 of its own; nanoplay's commands end with 141."""
    env = {**os.environ, "NANOPLAY_CHECKPOINTS": str(tiny_run.parent), "COLUMNS": "200"}
    p = subprocess.Popen([sys.executable, "-m", "nanoplay", *command, *(["-m", "tiny"] if command != ["models"] else [])],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    p.stdout.close()
    assert p.wait(timeout=120) == 141 and p.stderr.read() == b""


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("command", [["gen", "--prompt", "Once", "--max-new-tokens", "3", "--seed", "1"],
                                     ["gen", "--prompt", "Once", "--max-new-tokens", "3", "--seed", "1", "--json"],
                                     ["score", "--text", "word"], ["models"]])
def test_standard_output_that_cannot_be_written_is_one_line(tiny_run, command):
    """A full disk (/dev/full) or a closed standard output (`>&-`): one line, never a traceback."""
    env = {**os.environ, "NANOPLAY_CHECKPOINTS": str(tiny_run.parent)}
    argv = [sys.executable, "-m", "nanoplay", *command, *(["-m", "tiny"] if command != ["models"] else [])]
    with open("/dev/full", "w") as full:
        p = subprocess.run(argv, stdout=full, stderr=subprocess.PIPE, env=env)
    assert (p.returncode, p.stderr.decode()) == (1, "nanoplay: error: cannot write standard output: "
                                                     "No space left on device\n")
    p = subprocess.run(argv, stdout=None, stderr=subprocess.PIPE, env=env, close_fds=True,
                       preexec_fn=lambda: os.close(1))
    assert (p.returncode, p.stderr.decode()) == (2, "nanoplay: error: standard output is closed: send it to a "
                                                     "file or a pipe (> out.txt)\n")


def test_bench_defaults_fit_the_model(tiny_run, capsys):
    # tiny has a 64-token context: the default 128-token prompt did not fit
    code, out, err = run_cli(capsys, "bench", "-m", "tiny", "--repeats", "1", "--batch", "1")
    assert code == 0 and "32-token prompts, 32 new tokens" in out, err


def test_invalid_utf8_in_an_eval_local_copy_is_the_same_error(tiny_run, tmp_path, capsys):
    path = tmp_path / "wiki.test.raw"
    path.write_bytes(b"Hello \xe9t\xe9\n = Title = \n")
    code, out, err = run_cli(capsys, "eval", "-m", "tiny", "-d", f"wikitext-2={path}")
    assert code == 2 and err.endswith(f"{path}: {NOT_UTF8}\n") and "Traceback" not in err


@pytest.mark.parametrize("argv, message", [
    (["gen", "-m", "tiny", "-p", "Hi", "--max-new-tokens", "1e9"],
     "nanoplay gen: error: argument --max-new-tokens: invalid int value: '1e9' (see nanoplay gen --help)"),
    (["gen", "-m", "tiny", "-p", "Hi", "--prompts", "p.txt"],
     "nanoplay gen: error: argument --prompts: not allowed with argument --prompt/-p (see nanoplay gen --help)"),
    # a negative number is a value: -inf was "expected one argument", as if it were an option
    (["gen", "-m", "tiny", "-p", "Hi", "--temperature", "-inf"],
     "nanoplay: error: invalid sampling setting: temperature must be a finite number"),
    (["gen", "-m", "tiny", "-p", "Hi", "--top-p", "-1e-3"], "nanoplay: error: invalid sampling setting: top_p must be in (0, 1]"),
])
def test_usage_errors_are_one_line(tiny_run, capsys, argv, message):
    """argparse printed its whole usage block (13 lines) before the error."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    assert (code, out, err) == (2, "", message + "\n")
