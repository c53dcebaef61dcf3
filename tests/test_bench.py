"""`nanoplay bench`: its flags are checked before anything is measured."""

import importlib.util
import multiprocessing
import os
import signal
import sys
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch

import nanoplay.bench
from nanoplay.bench import CTranslate2, Isolated, LlamaCpp, Result
from nanoplay.cli import main
from nanoplay.errors import NanoplayError
from nanoplay.export import export_hf
from nanoplay.gguf_format import write_gguf
from nanoplay.model import GPT, GPTConfig


@pytest.mark.parametrize("flags, message", [
    (["--batch", "0"], "--batch must be at least 1, not 0"),
    (["--threads", "0"], "--threads must be at least 1, not 0"),
    (["--threads", "-2"], "--threads must be at least 1, not -2"),  # was torch's RuntimeError, set before the check
    (["--repeats", "0"], "--repeats must be at least 1, not 0"),
    (["--new-tokens", "1"], "--new-tokens must be at least 2, not 1"),
    (["--draft-layers", "0"], "--draft-layers must be at least 1, not 0"),  # was a plain bench, exit 0
    (["--draft-layers", "99", "--repeats", "1", "--new-tokens", "2"],
     "--draft-layers 99: a truncated draft keeps 1 to 1 of the model's layers (tiny@200)"),  # was a traceback
    (["--draft-layers", "1", "--draft-tokens", "0"], "draft tokens per step must be between 1 and 16, not 0"),
    (["--draft-layers", "1", "--draft-tokens", "17"], "draft tokens per step must be between 1 and 16, not 17"),
    (["--scoring", "--dtype", "int8"], "--scoring runs the same weights through transformers, which has no int8 "
                                        "weights here: give --dtype fp32 or bf16"),
    (["--prompt-tokens", "63"], "--prompt-tokens 63 does not fit tiny@200's context of 64 tokens: give at most 62"),
    (["--prompt-tokens", "60", "--new-tokens", "8"], "--prompt-tokens 60 and --new-tokens 8 do not fit tiny@200's "
                                                       "context of 64 tokens together: give at most 64 in all"),
])
def test_bench_flags_are_checked(tiny_run, capsys, flags, message):
    assert main(["bench", "-m", "tiny", *flags]) == 2
    out, err = capsys.readouterr()
    assert err == f"nanoplay: error: {message}\n" and out == ""


def test_bench_prompt_that_fits_runs(tiny_run, capsys):
    assert main(["bench", "-m", "tiny", "--prompt-tokens", "62", "--new-tokens", "2", "--batch", "1",
                 "--repeats", "1"]) == 0
    assert "tiny@200" in capsys.readouterr().out
    # a long prompt alone: the default new tokens take what the context has left (was 32: window slides)
    assert main(["bench", "-m", "tiny", "--prompt-tokens", "60", "--batch", "1", "--repeats", "1"]) == 0
    assert "60-token prompts, 4 new tokens" in capsys.readouterr().out


def test_bench_says_how_each_model_decodes(tiny_run, capsys, monkeypatch):
    from nanoplay.cpu_kernel import kernel_status

    args = ["bench", "-m", "tiny", "--prompt-tokens", "8", "--new-tokens", "2", "--batch", "1", "--repeats", "1"]
    assert main(args) == 0
    expected = "decode: compiled step" if not kernel_status() else f"decode: torch ({kernel_status()})"
    assert expected in " ".join(capsys.readouterr().out.split())
    if not kernel_status():  # which bf16 maths ran: the pair products round the inputs to bf16
        from nanoplay.cpu_kernel import bf16_pairs

        assert main(args + ["--dtype", "bf16", "--dtype", "fp32"]) == 0
        out = " ".join(capsys.readouterr().out.split())
        assert f"decode: compiled step, bf16 {'pair products' if bf16_pairs() else 'widened to float32'};" in out
        assert "decode: compiled step;" in out  # fp32's
    monkeypatch.setattr("nanoplay.bench.why_not_compiled", lambda model: "no C compiler (cc: FileNotFoundError)")
    assert main(args) == 0
    assert "decode: torch (no C compiler (cc: FileNotFoundError))" in " ".join(capsys.readouterr().out.split())


def test_bench_int8_reports_its_quality_cost(tiny_run, capsys):
    assert main(["bench", "-m", "tiny", "--dtype", "fp32", "--dtype", "int8", "--prompt-tokens", "8",
                 "--new-tokens", "2", "--batch", "1", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "tiny@200, fp32" in out and "tiny@200, int8" in out
    assert out.count("quality vs fp32 on 1000 tokens") == 1  # the int8 table's, not fp32's own


@pytest.mark.parametrize("vs, package, needs", [
    ("llama.cpp", "llama_cpp", "llama-cpp-python"),
    ("llama.cpp:q4_k_m", "llama_cpp", "llama-cpp-python"),
    ("ctranslate2", "ctranslate2", "ctranslate2"),
])
def test_bench_vs_another_engine_needs_the_extra(monkeypatch, capsys, vs, package, needs):
    monkeypatch.setitem(sys.modules, package, None)  # its import fails, as when it is not installed
    assert main(["bench", "--shape", "owt-30m", "--vs", vs]) == 2
    assert capsys.readouterr().err == f"nanoplay: error: --vs {vs} needs {needs}: pip install 'nanoplay[bench]'\n"


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="needs llama-cpp-python (the bench extra)")
def test_bench_vs_llama_cpp_times_the_same_weights(tiny_run, capsys):
    assert main(["bench", "-m", "tiny", "--dtype", "int8", "--vs", "llama.cpp", "--prompt-tokens", "8",
                 "--new-tokens", "2", "--batch", "1", "--repeats", "1"]) == 0
    assert "llama.cpp Q8_0" in capsys.readouterr().out


class ProcessId:
    """A stand-in engine for Isolated: it reports the process it runs in, or fails as asked: raising when
    built, or killing its own process by a signal when it benches (as llama.cpp's AMX products did)."""

    REBUILD = " (rebuild hint)"

    def __init__(self, fail: str = ""):
        self.fail = fail
        if fail == "raise":
            raise ValueError("no such model")

    @staticmethod
    def label_of(file_type: str) -> str:  # as LlamaCpp's, for run_bench
        return f"stand-in {file_type}"

    def bench(self, batch, prompt_tokens, new_tokens):
        if self.fail == "SIGILL":
            os.kill(os.getpid(), signal.SIGILL)
        return Result(str(os.getpid()), batch, prompt_tokens, new_tokens)

    def close(self):
        pass


class IllegalInstruction(ProcessId):
    """A stand-in for LlamaCpp (path, file_type, threads, n_ctx) whose process dies by SIGILL as it benches."""

    def __init__(self, path, file_type, threads, n_ctx):
        super().__init__("SIGILL")


def test_bench_runs_other_engines_in_a_process_of_their_own():
    engine = Isolated("process id", ProcessId)
    try:
        result = engine.bench(4, 8, 16)
        assert engine.failure is None and int(result.label) != os.getpid()
        assert (result.batch, result.prefill_tok_s, result.decode_tok_s) == (4, 8, 16)
    finally:
        engine.close()
    failed = Isolated("process id", ProcessId, "raise")
    assert failed.failure == "process id: ValueError: no such model"
    assert failed.bench(1, 8, 16) is None
    failed.close()


def test_an_engine_that_dies_is_reported_and_the_others_go_on():
    engine = Isolated("process id", ProcessId, "SIGILL")  # built: it dies when it benches
    assert engine.failure is None
    assert engine.bench(1, 8, 16) is None  # was a NanoplayError that ended the whole bench
    assert engine.failure.startswith("process id: its process was killed by SIGILL (an instruction this CPU does not run")
    assert engine.failure.endswith("reinstall it built for this machine (rebuild hint)")
    assert engine.bench(1, 8, 16) is None
    engine.close()


def test_bench_goes_on_without_an_engine_that_died(tiny_run, capsys, monkeypatch):
    monkeypatch.setattr(nanoplay.bench, "LlamaCpp", IllegalInstruction)
    monkeypatch.setattr(nanoplay.bench, "available", lambda module: True)
    assert main(["bench", "-m", "tiny", "--dtype", "fp32", "--vs", "llama.cpp", "--prompt-tokens", "8",
                 "--new-tokens", "2", "--batch", "1", "--repeats", "1"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # the table's lines, joined
    assert "│ 1 │ nanoplay │" in out
    assert "not measured: stand-in f32: its process was killed by SIGILL" in out


def in_a_child_process(function, *args):
    """function(*args) in a fresh process: llama.cpp and CTranslate2 never load into the test process (once
    CTranslate2 has generated, other code in its process runs slower: see nanoplay.bench.Isolated)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def llama_cpp_quantized(source, file_type):
    """The tensor types of llama.cpp's quantization of `source`, and a short bench of it."""
    from gguf import GGMLQuantizationType, GGUFReader

    llama = LlamaCpp(source, file_type, threads=1, n_ctx=64)
    try:
        return ({GGMLQuantizationType(t.tensor_type).name for t in GGUFReader(llama.path).tensors},
                llama.bench(1, prompt_tokens=8, new_tokens=3))
    finally:
        llama.close()


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="needs llama-cpp-python (the bench extra)")
def test_bench_llama_cpp_4_bit_types_come_from_its_quantizer(tmp_path):
    torch.manual_seed(0)  # 256 wide: rows of whole Q4_K blocks, so no fallback type replaces it
    model = GPT(GPTConfig(n_layer=1, n_head=4, n_embd=256, block_size=64, vocab_size=50257)).eval()
    source = write_gguf(model, tmp_path / "model.gguf", "f32")
    for file_type, wanted in (("q4_0", "Q4_0"), ("q4_k_m", "Q4_K")):
        types, result = in_a_child_process(llama_cpp_quantized, source, file_type)
        assert wanted in types and "F32" in types  # the matrices quantized; norms and biases stay F32
        assert result.label == f"llama.cpp {file_type.upper()}" and result.decode_tok_s > 0


def ctranslate2_greedy(hf_dir, prompt, new_tokens):
    ct2 = CTranslate2(hf_dir, "float32", threads=1)
    try:
        [result] = ct2.generator.generate_batch([ct2.tokens(prompt)], max_length=new_tokens, sampling_topk=1,
                                                end_token=[], include_prompt_in_result=False)
    finally:
        ct2.close()
    return result.sequences_ids[0]


@pytest.mark.skipif(importlib.util.find_spec("ctranslate2") is None, reason="needs ctranslate2 (the bench extra)")
def test_bench_ctranslate2_runs_the_same_model_with_a_padded_vocabulary(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=50304)).eval()  # nanoGPT's padding
    prompt = [(1000 + 37 * i) % 50257 for i in range(8)]
    ours = list(prompt)
    with torch.no_grad():  # the reference: greedy decoding by full forwards
        for _ in range(6):
            ours.append(int(model(torch.tensor([ours]))[0, -1].argmax()))
    assert in_a_child_process(ctranslate2_greedy, export_hf(model, tmp_path / "hf"), prompt, 6) == ours[len(prompt):]


def test_the_bound_reads_as_many_bytes_as_the_weights(tiny_run, capsys, monkeypatch):
    """A model that fits in the last-level cache is bounded by the cache's rate: bench reads each
    precision's own weights' size (a fixed 256 MB read put a 30M model at 124-144% of its bound)."""
    sizes = []

    def recorded(device, size_bytes, repeats=5):
        sizes.append(size_bytes)
        return 1e9

    monkeypatch.setattr(nanoplay.bench, "measure_bandwidth", recorded)
    assert main(["bench", "-m", "tiny", "--dtype", "fp32", "--dtype", "bf16", "--prompt-tokens", "8",
                 "--new-tokens", "2", "--batch", "1", "--repeats", "2"]) == 0
    out = capsys.readouterr().out
    fp32, bf16 = sorted(set(sizes), reverse=True)
    assert len(sizes) == 4 and 1.9 < fp32 / bf16 <= 2  # each precision, every round; bf16's norms stay float32
    for size in (fp32, bf16):
        assert f"{size / 1e6:.0f} MB of weights read per token" in out
        assert f"batch-1 bound {1e9 / size:.1f} tok/s" in " ".join(out.split())


def test_bench_shows_only_the_ratios_it_measured(tiny_run, capsys):
    """No "vs transformers" or "vs llama.cpp" column without those engines."""
    assert main(["bench", "-m", "tiny", "--prompt-tokens", "8", "--new-tokens", "2", "--batch", "1", "--batch", "2",
                 "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "vs batch 1" in out
    assert "vs transformers" not in out and "vs llama.cpp" not in out


def test_bench_says_when_threads_outnumber_the_cpus(tiny_run, capsys, monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 1)  # --threads 2 then outnumbers them (and is this machine's usual count)
    before = torch.get_num_threads()
    try:
        assert main(["bench", "-m", "tiny", "--prompt-tokens", "8", "--new-tokens", "2", "--batch", "1",
                     "--repeats", "1", "--threads", "2", "--scoring", "--dtype", "fp32"]) == 0
    finally:
        torch.set_num_threads(before)
    assert "note: --threads 2 is more than the CPUs here (1): expect slower numbers\n" in capsys.readouterr().err


def test_the_bound_reads_memory_laid_out_as_the_weights_as_the_step_reads_them(monkeypatch):
    """On a CPU the bound's streaming read sums bytes in huge pages, as decoding reads its packed weights
    (from 4 kB pages it read 10% slower, and decoding showed 104-116% of its bound), with the step's own
    reading (cpu_kernel.stream_sum: torch's sum read 22 GB/s where the step streamed 25) over every byte."""
    from nanoplay.cpu_decode import HUGE_PAGE
    from nanoplay.cpu_kernel import kernel_status

    blocks, sums = [], []
    real, real_sum = nanoplay.bench.huge_page_memory, nanoplay.bench.stream_sum
    monkeypatch.setattr(nanoplay.bench, "huge_page_memory", lambda size: blocks.append(real(size)) or blocks[-1])
    monkeypatch.setattr(nanoplay.bench, "stream_sum", lambda x, threads: sums.append(real_sum(x, threads)) or sums[-1])
    rate = nanoplay.bench.measure_bandwidth(torch.device("cpu"), 3 * HUGE_PAGE + 64, repeats=2)
    assert [b.numel() for b in blocks] == [3 * HUGE_PAGE + 64] and blocks[0].data_ptr() % HUGE_PAGE == 0
    assert rate > 0
    if not kernel_status():  # every float of the block read, each a 1.0: a hand count
        assert sums and all(total == (3 * HUGE_PAGE + 64) // 4 for total in sums)


@pytest.mark.parametrize("n", [1, 63, 1024, 5000])
def test_the_steps_streaming_read_sums_every_value_once(n):
    from nanoplay.cpu_kernel import kernel_status, stream_sum

    if kernel_status():
        pytest.skip(kernel_status())
    x = torch.arange(n, dtype=torch.float32) % 7  # small integers: exact sums in any order
    assert stream_sum(x, 2) == float(x.double().sum())


def test_a_models_loading_note_is_printed_once(tmp_path, capsys):
    """bench loads a model once per precision (and a float32 reference): what loading assumed is one line."""
    from tests.conftest import tiny_model, write_nanogpt_ckpt

    path = tmp_path / "out" / "ckpt.pt"
    path.parent.mkdir()
    write_nanogpt_ckpt(path, tiny_model(), with_optimizer=False)
    assert main(["bench", "-m", str(path), "--dtype", "bf16", "--dtype", "int8", "--prompt-tokens", "4",
                 "--new-tokens", "2", "--batch", "1", "--repeats", "1"]) == 0
    assert capsys.readouterr().err.count("note: out/ckpt.pt: GELU assumed exact") == 1
