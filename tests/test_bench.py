"""`nanoplay bench`: its flags are checked before anything is measured."""

import pytest

from nanoplay.cli import main


@pytest.mark.parametrize("flags, message", [
    (["--batch", "0"], "--batch must be at least 1"),
    (["--threads", "0"], "--threads must be at least 1"),
    (["--repeats", "0"], "--repeats must be at least 1"),
    (["--new-tokens", "1"], "--new-tokens must be at least 2"),
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
