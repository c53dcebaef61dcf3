"""nanoplay report: step specs, training state, the cache, the trend fit, files and the command, on a tiny run."""

import json
import os
from pydoc_data.topics import topics

import pytest
import torch
from conftest import disjoint_window_nll, hf_gpt2, tiny_model

from nanoplay import report as rp
from nanoplay.cli import main
from nanoplay.errors import NanoplayError
from nanoplay.loading import load_model
from nanoplay.tokenizer import get_tokenizer

CTX = 64
BATCH, ACCUM = 4, 2  # the tiny run's sequences per iteration
STEPS = (100, 200, 300)


def write_step(run_dir, step, tokens_seen=True):
    """One step as the trainer saves it: engine-format weights, config.json extras, training_state.pt."""
    from trainer.checkpoints import save_step

    cfg = {"batch_size": BATCH, "gradient_accumulation_steps": ACCUM, "block_size": CTX}
    tokens = step * BATCH * ACCUM * CTX
    meta = {"train_config": cfg, "val_loss": None, "train_loss": None}
    if tokens_seen:
        meta["tokens_seen"] = tokens
    state = {"step": step, "optimizer": {}, "best_val_loss": 9.0, "tokens_seen": tokens, "config": cfg}
    model = tiny_model(seed=1)
    with torch.no_grad():  # later steps predict less sharply at random: their loss falls towards ln(vocab)
        model.transformer.wte.weight.mul_(300 / step)
    save_step(run_dir, step, model, state, meta)


@pytest.fixture
def tiny_run(checkpoints, tmp_path, monkeypatch):
    """checkpoints/tiny with three steps, its metrics.jsonl, a small text and an empty score cache."""
    monkeypatch.setenv("NANOPLAY_SCORE_CACHE", str(tmp_path / "scores"))
    run_dir = checkpoints / "tiny"
    for step in STEPS:
        write_step(run_dir, step)
    with open(run_dir / "metrics.jsonl", "w") as f:
        for step in range(1, 401):
            f.write(json.dumps({"step": step, "loss": 10 - step / 100, "tokens": BATCH * ACCUM * CTX}) + "\n")
            if step % 100 == 0:
                f.write(json.dumps({"step": step, "val_loss": 10.5 - step / 100}) + "\n")
    text = tmp_path / "notes.txt"
    text.write_text(" ".join(topics[sorted(topics)[3]].split()[:300]))
    return run_dir, text


def run_report(capsys, *argv):
    code = main(["report", *argv, "--json", "--no-plot"])
    return code, json.loads(capsys.readouterr().out)


# -----------------------------------------------------------------------------
# which steps


def test_step_specs():
    saved = [100, 200, 300, 500, 1000]
    assert rp.parse_steps("all", saved, "r") == saved
    assert rp.parse_steps("200,100", saved, "r") == [100, 200]
    assert rp.parse_steps("150-500", saved, "r") == [200, 300, 500]
    assert rp.parse_steps("100,300-1000", saved, "r") == [100, 300, 500, 1000]
    with pytest.raises(NanoplayError, match="r has no step 400; saved: 100, 200, 300, 500, 1000"):
        rp.parse_steps("400", saved, "r")
    with pytest.raises(NanoplayError, match="no saved step from 600 to 900"):
        rp.parse_steps("600-900", saved, "r")
    with pytest.raises(NanoplayError, match="give steps as all, N, A-B"):
        rp.parse_steps("latest", saved, "r")


def test_subjects_of_a_run_and_of_a_single_model(tiny_run):
    subjects, run_dir = rp.resolve_subjects("tiny", ["gpt2"])
    assert [s.label for s in subjects] == ["tiny@100", "tiny@200", "tiny@300", "gpt2"]
    assert run_dir.name == "tiny" and [s.kind for s in subjects] == ["step"] * 3 + ["vs"]
    subjects, _ = rp.resolve_subjects("tiny@200-300", [])
    assert [s.step for s in subjects] == [200, 300]
    subjects, run_dir = rp.resolve_subjects("some/model-dir", [])
    assert run_dir is None and [s.kind for s in subjects] == ["vs"]


# -----------------------------------------------------------------------------
# what the run's records say


def test_training_tokens_and_parameters_from_the_run(tiny_run):
    run_dir, _ = tiny_run
    logged = rp.read_curves(run_dir)["tokens"]
    info = rp.step_info(run_dir / "step-00000200", 200, logged)
    model = tiny_model()
    assert info["params"] == model.num_params() == sum(p.numel() for p in model.parameters())
    assert info["params_non_embedding"] == info["params"] - CTX * 32  # nanoGPT's: minus position embeddings
    assert info["context"] == CTX
    assert (info["training_tokens"], info["training_tokens_from"]) == (200 * BATCH * ACCUM * CTX,
                                                                        "config.json tokens_seen")
    # an older step without the count in config.json: training_state.pt, then the log, then step x batch
    write_step(run_dir, 400, tokens_seen=False)
    assert rp.step_info(run_dir / "step-00000400", 400, logged)["training_tokens_from"] == "training_state.pt tokens_seen"
    (run_dir / "step-00000400" / "training_state.pt").unlink()
    info = rp.step_info(run_dir / "step-00000400", 400, logged)
    assert (info["training_tokens"], info["training_tokens_from"]) == (400 * BATCH * ACCUM * CTX, "metrics.jsonl tokens")
    info = rp.step_info(run_dir / "step-00000400", 400, {})
    assert (info["training_tokens"], info["training_tokens_from"]) == (400 * BATCH * ACCUM * CTX,
                                                                        "step x tokens per iteration")


def test_curves_skip_malformed_lines(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 3.5, "tokens": 10}\nnot json\n'
                                           '{"step": 1, "val_loss": 3.7}\n{"step": 2, "sample": "hi"}\n')
    curves = rp.read_curves(tmp_path)
    assert curves["train"] == [(1, 3.5)] and curves["val"] == [(1, 3.7)] and curves["tokens"] == {1: 10}


# -----------------------------------------------------------------------------
# the trend


def test_power_law_fit_recovers_a_known_curve_and_says_its_error():
    tokens = [1e6, 3e6, 1e7, 3e7, 1e8]
    E, A, alpha = 2.5, 400.0, 0.35
    fit = rp.fit_power_law(tokens, [E + A * d ** -alpha for d in tokens])
    assert fit["E"] == pytest.approx(E, rel=1e-3) and fit["alpha"] == pytest.approx(alpha, rel=1e-3)
    assert fit["A"] == pytest.approx(A, rel=1e-2)
    assert fit["residual_rms"] < 1e-4 and fit["loo_rms"] < 1e-2
    # noise shows up as fit error; leave-one-out is the honest one, never smaller than the residual
    noisy = [E + A * d ** -alpha + n for d, n in zip(tokens, (0.05, -0.04, 0.03, -0.05, 0.02))]
    fit = rp.fit_power_law(tokens, noisy)
    assert 0.01 < fit["residual_rms"] <= fit["loo_rms"]


def test_trend_extrapolates_more_iterations_and_refuses_too_few_points():
    points = [(s, s * 1000.0, 3.0 + 50 * (s * 1000.0) ** -0.4) for s in (100, 200, 400, 800)]
    trend = rp.trend(points)
    assert [e["multiple"] for e in trend["extrapolation"]] == [2, 10]
    ten = trend["extrapolation"][1]
    assert ten["step"] == 8000 and ten["training_tokens"] == 8e6
    assert ten["loss"] == pytest.approx(3.0 + 50 * 8e6 ** -0.4, rel=1e-3)
    assert "error" in rp.trend(points[:3]) and "at least 4 steps" in rp.trend(points[:3])["error"]


# -----------------------------------------------------------------------------
# the command


def direct_loss(spec, text):
    """The loss of a model on a text by its own forward over disjoint windows (stride = context), the text
    after <|endoftext|> (nanoplay's conditioning rule: its first token is predicted from it)."""
    eot = get_tokenizer().eot_id
    ids = torch.tensor([eot] + get_tokenizer().encode(text) + [eot])
    nll, count = disjoint_window_nll(load_model(spec).model, ids, CTX)
    return nll / count


def test_report_scores_every_step_and_the_vs_model_alike(tiny_run, tmp_path, capsys):
    _, text = tiny_run
    hf_dir = tmp_path / "hf-dir"
    hf_gpt2(seed=4, n_positions=CTX).save_pretrained(hf_dir)
    out = tmp_path / "out"
    code, report = run_report(capsys, "tiny", "--vs", str(hf_dir), "--data", str(text), "--stride", str(CTX),
                              "--out", str(out))
    assert code == 0
    assert [c["label"] for c in report["columns"]] == ["tiny@100", "tiny@200", "tiny@300", str(hf_dir)]
    key = str(text)
    for column in report["columns"]:
        spec = column["spec"]
        assert column["results"][key]["loss"] == pytest.approx(direct_loss(spec, text.read_text()), rel=1e-5)
        assert (column["context"], column["stride"], column["rule"]) == (CTX, CTX, "strided")
    assert [c["training_tokens"] for c in report["columns"]] == [s * BATCH * ACCUM * CTX for s in STEPS] + [None]
    assert report["curves"]["train"][:2] == [[1, 9.99], [2, 9.98]] and len(report["curves"]["val"]) == 4
    assert "at least 4 steps" in report["trend"]["error"]  # three steps: no trend, and it says why
    # the files: Markdown embedding the image, PNG, SVG, and the JSON again
    md = (out / "report.md").read_text()
    assert "![validation loss against step and training tokens](report.png)" in md
    assert "| parameters (non-embedding) |" in md and "| training tokens | 51,200 | 102,400 | 153,600 |" in md
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "report.svg").read_text().lstrip().startswith("<?xml")
    assert json.loads((out / "report.json").read_text())["columns"][0]["label"] == "tiny@100"


def test_second_report_scores_only_the_new_step(tiny_run, tmp_path, capsys, monkeypatch):
    run_dir, text = tiny_run
    scored = []
    real_score = rp.score

    def counting_score(loaded, data, settings, on_progress=None):
        scored.append((loaded.name, data.key))
        return real_score(loaded, data, settings, on_progress)

    monkeypatch.setattr(rp, "score", counting_score)
    argv = ("tiny", "--data", str(text), "--out", str(tmp_path / "out"))
    code, first = run_report(capsys, *argv)
    assert code == 0 and scored == [(f"tiny@{s}", str(text)) for s in STEPS]
    write_step(run_dir, 400)  # a new step lands
    scored.clear()
    assert main(["report", *argv]) == 0  # the terminal's table and plots this time; the JSON is in the out folder
    out = capsys.readouterr().out
    for row in ("parameters (non-embedding)", "parameters (all)", "context", "training tokens"):
        assert row in out
    assert "validation loss on notes.txt against step" in out and "against training tokens" in out  # plotext
    assert "trend (an extrapolation, not a promise)" in out and "10x the iterations (step 4,000" in out
    assert ", 1 row, " in " ".join(out.split())  # the text file is one line (it said "1 rows", eval "1 row")
    second = json.loads((tmp_path / "out" / "report.json").read_text())
    assert scored == [("tiny@400", str(text))]
    assert [c["scored"] for c in second["columns"]] == [[], [], [], [str(text)]]
    for a, b in zip(first["columns"], second["columns"]):
        assert a["results"] == b["results"]  # cached numbers are the numbers
    # four steps now: a trend, with its fit error, labelled as the extrapolation it is
    assert second["trend"]["points"] == 4 and "residual_rms" in second["trend"]
    # re-saving a step changes its identity (size and mtime), and another rule or stride is another entry
    before = rp.model_identity(rp.Subject("tiny@200", "tiny@200", "step", 200, run_dir / "step-00000200"))
    write_step(run_dir, 200)
    after = rp.model_identity(rp.Subject("tiny@200", "tiny@200", "step", 200, run_dir / "step-00000200"))
    assert before != after
    cache = rp.ScoreCache()
    strided = rp.Settings().for_model(CTX)
    assert cache.get({"model": before, "data": "x", **strided}) is None
    cache.put({"model": before, "data": "x", **strided}, {"loss": 1.0})
    assert cache.get({"model": before, "data": "x", **strided}) == {"loss": 1.0}
    assert cache.get({"model": after, "data": "x", **strided}) is None
    assert cache.get({"model": before, "data": "x", **rp.Settings(rule="rolling").for_model(CTX)}) is None
    assert cache.get({"model": before, "data": "x", **rp.Settings(stride=8).for_model(CTX)}) is None


def test_report_without_matplotlib_says_how_to_get_images(tiny_run, tmp_path, capsys, monkeypatch):
    import builtins

    _, text = tiny_run
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    out = tmp_path / "out"
    assert main(["report", "tiny@300", "--data", str(text), "--out", str(out), "--no-plot"]) == 0
    captured = capsys.readouterr()
    assert "pip install 'nanoplay[report]'" in captured.err
    assert "tiny@300" in captured.out and (out / "report.md").is_file() and not (out / "report.png").exists()
    assert "report.png" not in (out / "report.md").read_text()


def test_bad_run_specs_are_one_line(tiny_run, capsys):
    assert main(["report", "tiny@999", "--data", "x.txt"]) == 2
    assert "tiny has no step 999; saved: 100, 200, 300" in capsys.readouterr().err


def test_an_out_folder_that_cannot_be_written_is_refused_before_scoring(tiny_run, tmp_path, capsys, monkeypatch):
    """--out naming a file, or a folder that cannot be made: one line, and nothing scored first (it was a
    FileExistsError or FileNotFoundError traceback after all the scoring)."""
    from nanoplay import report as rp

    _, text = tiny_run
    monkeypatch.setattr(rp, "build", lambda *a, **k: pytest.fail("scored before the --out folder was checked"))
    (tmp_path / "afile").write_text("")
    (tmp_path / "ro").mkdir(mode=0o500)
    cases = [(tmp_path / "afile", "is a file, not a folder: give a folder for report.md, report.json and the images"),
             (tmp_path / "afile" / "sub", "cannot make the folder (Not a directory); give another")]
    if os.geteuid() != 0:  # root writes anywhere
        cases.append((tmp_path / "ro" / "sub", "cannot make the folder (Permission denied); give another"))
    for out, message in cases:
        assert main(["report", "tiny@300", "--data", str(text), "--out", str(out), "--no-plot"]) == 2
        assert capsys.readouterr().err == f"nanoplay: error: --out {out}: {message}\n".replace(f"{out}: is", f"{out} is")
