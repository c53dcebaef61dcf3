"""`nanoplay bench`: its flags are checked before anything is measured."""

import importlib.util

import pytest

from nanoplay.cli import main


@pytest.mark.parametrize("flags, message", [
    (["--batch", "0"], "--batch must be at least 1"),
    (["--threads", "0"], "--threads must be at least 1"),
    (["--repeats", "0"], "--repeats must be at least 1"),
    (["--new-tokens", "1"], "--new-tokens must be at least 2"),
    (["--scoring", "--dtype", "int8"], "--scoring runs the same weights through transformers, which has no int8 "
                                        "weights here: give --dtype fp32 or bf16"),
    (["--prompt-tokens", "63"], "--prompt-tokens 63 does not fit tiny@200's context of 64 tokens: give at most 62"),
])
def test_bench_flags_are_checked(tiny_run, capsys, flags, message):
    assert main(["bench", "-m", "tiny", *flags]) == 2
    out, err = capsys.readouterr()
    assert err == f"nanoplay: error: {message}\n" and out == ""


def test_bench_prompt_that_fits_runs(tiny_run, capsys):
    assert main(["bench", "-m", "tiny", "--prompt-tokens", "62", "--new-tokens", "2", "--batch", "1",
                 "--repeats", "1"]) == 0
    assert "tiny@200" in capsys.readouterr().out


def test_bench_int8_reports_its_quality_cost(tiny_run, capsys):
    assert main(["bench", "-m", "tiny", "--dtype", "fp32", "--dtype", "int8", "--prompt-tokens", "8",
                 "--new-tokens", "2", "--batch", "1", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "tiny@200, fp32" in out and "tiny@200 (int8), int8" in out
    assert out.count("quality vs fp32 on 1000 tokens") == 1  # the int8 table's, not fp32's own


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is not None, reason="llama-cpp-python is installed")
def test_bench_vs_llama_cpp_needs_the_extra(capsys):
    assert main(["bench", "--shape", "owt-30m", "--vs", "llama.cpp"]) == 2
    assert capsys.readouterr().err == ("nanoplay: error: --vs llama.cpp needs llama-cpp-python: "
                                       "pip install 'nanoplay[bench]'\n")


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="needs llama-cpp-python (the bench extra)")
def test_bench_vs_llama_cpp_times_the_same_weights(tiny_run, capsys):
    assert main(["bench", "-m", "tiny", "--dtype", "int8", "--vs", "llama.cpp", "--prompt-tokens", "8",
                 "--new-tokens", "2", "--batch", "1", "--repeats", "1"]) == 0
    assert "llama.cpp Q8_0" in capsys.readouterr().out
