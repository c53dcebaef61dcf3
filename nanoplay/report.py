"""
`nanoplay report`'s engine: the steps of a training run, and reference models beside them, each scored on
the same data with the same rule, with what the run's own records say (parameters, training tokens,
the training and validation curve) and a fitted trend. No UI here: nanoplay.commands.report renders it.

Steps are chosen with a spec:

    RUN                 every saved step of checkpoints/RUN (the same as RUN@all)
    RUN@all             every saved step
    RUN@1000,2000       those steps
    RUN@1000-5000       every saved step from 1000 to 5000, both included
    RUN@500,1000-5000   both at once

Scores are cached under $NANOPLAY_SCORE_CACHE (default ~/.cache/nanoplay/scores), one JSON file per
(model file, data, rule, context, stride, LAMBADA rule, dtype): the model file by path, size and
modification time (a re-saved step is scored again), the data by a hash of its tokens or texts. A
second report after new steps land scores only the new ones.

The trend is L(D) = E + A * D^(-alpha), loss against training tokens D: for each alpha on a log grid
the best (E, A) is a linear least-squares problem, and the alpha with the smallest squared error wins
(then a finer grid around it). It is an extrapolation; its error is given as the residual RMS and the
leave-one-out RMS (each step predicted by the curve fitted without it).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import NanoplayError

CACHE_VERSION = 1  # bump when a scoring rule changes what a cached number means
MIN_FIT_POINTS = 4  # three parameters, and at least one degree of freedom left to judge the fit by
FIT_MULTIPLES = (2, 10)  # "what if I trained 2x / 10x as many iterations"
STEPS_SYNTAX = re.compile(r"^(all|\d+(-\d+)?(,\d+(-\d+)?)*)$")


def score_cache_dir() -> Path:
    return Path(os.environ.get("NANOPLAY_SCORE_CACHE", Path.home() / ".cache" / "nanoplay" / "scores"))


# -----------------------------------------------------------------------------
# what to score: the run's steps and the --vs models


@dataclass
class Subject:
    """One column of the report: a step of the run, or a model to compare with."""

    label: str  # owt-30m@2000, gpt2
    spec: str  # what load_model takes
    kind: str  # "step" | "vs"
    step: int | None = None
    directory: Path | None = None  # a step's checkpoint directory
    info: dict = field(default_factory=dict)  # params, context, training tokens, ...


def parse_steps(text: str, available: list[int], run: str) -> list[int]:
    """
    The steps a spec's part after `@` names, among the run's saved steps: `all`, `N`, `A-B` (inclusive)
    or a comma-separated list of those. A step that is not saved, or a range that holds none, is an error.
    """
    text = text.strip().replace(" ", "")
    if not STEPS_SYNTAX.match(text):
        raise NanoplayError(f"{run}@{text}: give steps as all, N, A-B or a list like 1000,2000-5000")
    if text == "all":
        return list(available)
    chosen: set[int] = set()
    for item in text.split(","):
        low, _, high = item.partition("-")
        if high:
            inside = [s for s in available if int(low) <= s <= int(high)]
            if not inside:
                raise NanoplayError(f"{run} has no saved step from {low} to {high}; saved: {_list(available)}")
            chosen.update(inside)
        elif int(low) in available:
            chosen.add(int(low))
        else:
            raise NanoplayError(f"{run} has no step {low}; saved: {_list(available)}")
    return sorted(chosen)


def _list(steps: list[int]) -> str:
    return ", ".join(map(str, steps)) if steps else "none"


def resolve_subjects(run_spec: str, vs: list[str]) -> tuple[list[Subject], Path | None]:
    """
    The columns: the run's chosen steps (a local run name, with or without @steps), or the one model
    the spec names when it is not a local run; then the --vs models. Returns them and the run directory.
    """
    from .checkpoint import list_steps
    from .loading import checkpoints_root

    name, at, steps_text = run_spec.strip().partition("@")
    run_dir = checkpoints_root() / name
    subjects = []
    if name and "/" not in name and run_dir.is_dir() and list_steps(run_dir):
        saved = list_steps(run_dir)
        for step in parse_steps(steps_text if at else "all", list(saved), name):
            subjects.append(Subject(f"{name}@{step}", f"{name}@{step}", "step", step, saved[step]))
    else:
        if at and steps_text.strip() and not steps_text.strip().isdigit() and run_dir.is_dir():
            raise NanoplayError(f"{run_dir} has no complete checkpoint (step-*/ with config.json + model.safetensors)")
        subjects.append(Subject(run_spec, run_spec, "vs"))
        run_dir = None
    for spec in vs:
        subjects.append(Subject(spec, spec, "vs"))
    return subjects, run_dir


# -----------------------------------------------------------------------------
# what the run's own records say


def param_counts(model) -> dict:
    """nanoGPT's two counts: all parameters (the tied head once), and "non-embedding" (minus position embeddings)."""
    return {"params": model.num_params(), "params_non_embedding": model.num_params(non_embedding=True)}


def step_info(directory: Path, step: int, logged_tokens: dict[int, int]) -> dict:
    """
    Parameters and context from the step's config.json (a model built on the meta device: nothing
    loaded), and the tokens it was trained on: the trainer's own count (`tokens_seen` in config.json,
    else in training_state.pt), else metrics.jsonl's tokens up to the step (`logged_tokens`, from
    read_curves), else step x tokens per iteration from the recorded training config.
    `training_tokens_from` says which.
    """
    import torch

    from .checkpoint import read_config
    from .model import GPT, GPTConfig

    meta = read_config(directory)
    with torch.device("meta"):
        model = GPT(GPTConfig.from_dict(meta["model"]))
    info = {**param_counts(model), "context": model.config.block_size, "step": step}
    tokens, source = meta.get("tokens_seen"), "config.json tokens_seen"
    if tokens is None:
        tokens, source = _state_tokens(directory / "training_state.pt"), "training_state.pt tokens_seen"
    if tokens is None:
        tokens, source = logged_tokens.get(step), "metrics.jsonl tokens"
    if tokens is None:
        cfg = meta.get("train_config") or {}
        per_iter = _tokens_per_iter(cfg)
        tokens, source = (step * per_iter, "step x tokens per iteration") if per_iter else (None, None)
    info.update(training_tokens=tokens, training_tokens_from=source)
    return info


def _state_tokens(path: Path) -> int | None:
    from .loading import read_torch_file

    if not path.is_file():
        return None
    try:
        state = read_torch_file(path)  # weights_only=True, and quiet
    except NanoplayError:  # a damaged or refused state only costs this one number; the other sources follow
        return None
    return state.get("tokens_seen") if isinstance(state, dict) else None


def _tokens_per_iter(cfg: dict) -> int | None:
    try:
        return (int(cfg["batch_size"]) * int(cfg["gradient_accumulation_steps"]) * int(cfg["block_size"])
                * int(cfg.get("world_size", 1)))
    except (KeyError, TypeError, ValueError):
        return None


def read_curves(run_dir: Path | None) -> dict:
    """
    The run's training curve from metrics.jsonl: train loss per step, the trainer's validation loss,
    and the tokens seen by each step. Empty lists when there is no log; a malformed line is skipped.
    """
    curves = {"train": [], "val": [], "tokens": {}}
    path = run_dir / "metrics.jsonl" if run_dir else None
    if path is None or not path.is_file():
        return curves
    seen = 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("step"), int):
            continue
        if isinstance(entry.get("loss"), (int, float)):
            seen += int(entry.get("tokens") or 0)
            curves["train"].append((entry["step"], float(entry["loss"])))
            curves["tokens"][entry["step"]] = seen
        elif isinstance(entry.get("val_loss"), (int, float)):
            curves["val"].append((entry["step"], float(entry["val_loss"])))
    return curves


# -----------------------------------------------------------------------------
# scoring, with the cache


@dataclass
class Settings:
    """Everything besides the model and the data that changes a score."""

    rule: str = "strided"  # strided | rolling
    stride: int | None = None  # strided: None = half of each model's context
    lambada_rule: str = "word"
    dtype: str = "float32"
    batch_size: int | None = None
    eot_prefix: bool = True  # strided: the first token predicted from <|endoftext|> (evaluation.plan_windows)

    def for_model(self, context: int) -> dict:
        stride = (self.stride or context // 2) if self.rule == "strided" else None
        return {"rule": self.rule, "stride": stride, "context": context, "lambada_rule": self.lambada_rule,
                "dtype": self.dtype, "eot_prefix": self.eot_prefix}


def data_identity(data) -> str:
    """A hash of exactly what is scored: the tokens (and document boundaries, byte and word counts) or texts."""
    h = hashlib.sha256(f"{data.key}\0{data.kind}\0".encode())
    if data.kind == "stream":
        h.update(data.ids.numpy().astype("<i8").tobytes())
        h.update(json.dumps([data.n_bytes, data.n_words, data.doc_lengths]).encode())
    else:
        h.update(json.dumps(data.texts).encode())
    return h.hexdigest()


def file_identity(path: Path) -> dict:
    """A model file by resolved path, size and modification time: cheap, and changes when it is re-written."""
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def model_identity(subject: Subject, loaded=None) -> dict | None:
    """What a cached score is tied to; None when a model has no file to tie it to (then it is not cached)."""
    from .checkpoint import WEIGHTS_FILE

    if subject.directory is not None:
        return file_identity(subject.directory / WEIGHTS_FILE)
    if loaded is None:
        return None
    if loaded.source == "hub":  # the snapshot's file: its path holds the commit
        from huggingface_hub import try_to_load_from_cache

        _, _, revision = loaded.name.partition("@")
        found = try_to_load_from_cache(loaded.location, "model.safetensors", revision=revision or None)
        return file_identity(Path(found)) if isinstance(found, str) else None
    path = Path(loaded.location)
    if path.is_dir():
        weights = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
        return file_identity(weights[0]) if weights else None
    return file_identity(path) if path.is_file() else None


class ScoreCache:
    """Scores on disk, one JSON file per key, written atomically."""

    def __init__(self, directory: Path | None = None, enabled: bool = True):
        self.directory = Path(directory) if directory else score_cache_dir()
        self.enabled = enabled

    def _path(self, key: dict) -> Path:
        digest = hashlib.sha256(json.dumps({"v": CACHE_VERSION, **key}, sort_keys=True).encode()).hexdigest()
        return self.directory / f"{digest[:32]}.json"

    def get(self, key: dict | None) -> dict | None:
        if key is None or not self.enabled:
            return None
        try:
            record = json.loads(self._path(key).read_text())
        except (OSError, ValueError):  # missing, or damaged: score again
            return None
        return record.get("result") if record.get("key") == key else None

    def put(self, key: dict | None, result: dict) -> None:
        from .atomic import write_file_atomically

        if key is None or not self.enabled:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        write_file_atomically(self._path(key), json.dumps({"key": key, "result": result}, indent=1) + "\n")


def score(loaded, data, settings: Settings, on_progress=None) -> dict:
    """One model on one data set: the metrics dict of evaluation's result (perplexity or LAMBADA)."""
    from . import evaluation as ev
    from .tokenizer import get_tokenizer

    how = settings.for_model(loaded.config.block_size)
    if data.kind == "stream":
        result = ev.perplexity(loaded.model, data.ids, context=how["context"], stride=how["stride"], rule=how["rule"],
                               doc_lengths=data.doc_lengths, n_bytes=data.n_bytes, n_words=data.n_words,
                               batch_size=settings.batch_size, on_progress=on_progress,
                               eot_prefix=settings.eot_prefix)
    else:
        result = ev.lambada(loaded.model, data.texts, get_tokenizer(), context=how["context"],
                            rule=settings.lambada_rule, batch_size=settings.batch_size, on_progress=on_progress)
    return result.to_dict()


def work_units(data, context: int, settings: Settings) -> int:
    """Progress units one model costs on one data set: scored tokens, or LAMBADA examples."""
    from . import evaluation as ev

    if data.kind != "stream":
        return len(data.texts)
    how = settings.for_model(context)
    return ev.scored_tokens(data.ids.numel(), context, rule=how["rule"], stride=how["stride"],
                            doc_lengths=data.doc_lengths, eot_prefix=settings.eot_prefix)


# -----------------------------------------------------------------------------
# the trend


def fit_power_law(tokens: list[float], losses: list[float]) -> dict:
    """
    L(D) = E + A * D^(-alpha) through (tokens, loss) points, by least squares: alpha on a log grid
    (0.01 to 3), then a finer one around the best; for each alpha, (E, A) in closed form (numpy
    lstsq), keeping A > 0 and E >= 0 (a fit that wants E < 0 is refitted with E = 0). Raises
    NanoplayError with fewer than MIN_FIT_POINTS distinct token counts.
    """
    import numpy as np

    D = np.asarray(tokens, dtype=np.float64)
    L = np.asarray(losses, dtype=np.float64)
    if len(set(D.tolist())) < MIN_FIT_POINTS or np.any(D <= 0):
        raise NanoplayError(f"a trend needs at least {MIN_FIT_POINTS} steps with different, positive training "
                            f"token counts (have {len(set(D[D > 0].tolist()))})")
    scale = D.max()  # tokens in units of the largest, so that D^-alpha stays well inside float range
    x = D / scale

    def solve(alpha: float):
        basis = x ** -alpha
        (E, A), *_ = np.linalg.lstsq(np.stack([np.ones_like(basis), basis], 1), L, rcond=None)
        if E < 0:
            E, A = 0.0, float(basis @ L / (basis @ basis))
        if A <= 0:
            return None
        sse = float(((E + A * basis - L) ** 2).sum())
        return sse, float(E), float(A), alpha

    def best_on(grid):
        fits = [f for f in map(solve, grid) if f is not None]
        return min(fits) if fits else None

    best = best_on(np.geomspace(0.01, 3.0, 200))
    if best is None:
        raise NanoplayError("the validation loss does not fall with training tokens: no power law to fit")
    best = best_on(np.geomspace(best[3] / 1.05, best[3] * 1.05, 101)) or best
    sse, E, A, alpha = best
    A_raw = A * scale ** alpha  # A for D in tokens rather than in units of the largest D

    def predict(d):
        return E + A_raw * np.asarray(d, dtype=np.float64) ** -alpha

    residual_rms = math.sqrt(sse / len(D))
    loo = []  # each point predicted by the curve fitted to the others (needs MIN_FIT_POINTS without it)
    for i in range(len(D)):
        keep = np.arange(len(D)) != i
        try:
            sub = fit_power_law(D[keep].tolist(), L[keep].tolist())
        except NanoplayError:
            loo = None
            break
        loo.append(float(L[i] - sub["E"] - sub["A"] * D[i] ** -sub["alpha"]))
    return {"E": E, "A": A_raw, "alpha": alpha, "points": len(D), "residual_rms": residual_rms,
            "loo_rms": math.sqrt(sum(r * r for r in loo) / len(loo)) if loo else None, "predict": predict}


def trend(points: list[tuple[int, float, float]]) -> dict:
    """
    The fitted trend of (step, training tokens, loss) points and what it suggests for 2x and 10x as
    many iterations as the last step, at the same tokens per iteration. {'error': why} when it cannot fit.
    """
    points = [(s, d, l) for s, d, l in points if d is not None and l is not None and math.isfinite(l)]
    try:
        fit = fit_power_law([d for _, d, _ in points], [l for _, _, l in points])
    except NanoplayError as e:
        return {"error": str(e)}
    step, tokens, _ = max(points)
    predict = fit.pop("predict")
    fit["extrapolation"] = [{"multiple": m, "step": step * m, "training_tokens": tokens * m,
                             "loss": float(predict(tokens * m))} for m in FIT_MULTIPLES]
    fit["formula"] = "L(D) = E + A * D^-alpha, D = training tokens"
    fit["method"] = "least squares: alpha on a log grid, (E, A) in closed form for each (numpy)"
    return fit


# -----------------------------------------------------------------------------
# the whole report


def build(subjects: list[Subject], data: list, settings: Settings, *, device: str, dtype, run_dir: Path | None,
          cache: ScoreCache, on_start=None, on_progress=None, on_model_done=None) -> dict:
    """
    Score every subject on every data set (from the cache where it can), then assemble the report:
    a column per subject with its parameters, context, training tokens and results (each with the
    published references), the run's curves, and the trend of the first stream set's loss.

    Callbacks for a progress display: on_start(total units still to score), on_progress(units, tokens),
    on_model_done(subject, seconds, scored). A model that fails to load gets an `error` instead.
    """
    import gc
    import time

    from .evaluation import reference_records
    from .loading import load_model
    from .tokenizer import GPT2_VOCAB_SIZE

    curves = read_curves(run_dir)
    for s in subjects:
        if s.kind == "step":
            s.info = step_info(s.directory, s.step, curves["tokens"])
    # what is already cached is known before anything loads (for the steps; --vs models need loading first)
    todo = {}
    for s in subjects:
        if s.kind == "step":
            ident = model_identity(s)
            keys = {d.key: _key(ident, d, settings.for_model(s.info["context"])) for d in data}
            todo[s.label] = [d for d in data if cache.get(keys[d.key]) is None]
    if on_start:
        on_start(sum(work_units(d, s.info["context"], settings) for s in subjects if s.kind == "step"
                     for d in todo[s.label]))
    columns = []
    for s in subjects:
        column = {"label": s.label, "kind": s.kind, "spec": s.spec, **s.info, "results": {}, "scored": []}
        columns.append(column)
        loaded = None
        if s.kind == "vs" or todo.get(s.label):
            try:
                loaded = load_model(s.spec, device=device, dtype=dtype)
            except NanoplayError as e:
                column["error"] = str(e)
                continue
            except Exception as e:  # noqa: BLE001 - a loader's own error (a corrupt file, the Hub): one line, the others go on
                column["error"] = f"cannot load {s.spec}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                continue
            if s.kind == "vs":
                column.update(param_counts(loaded.model), context=loaded.config.block_size, training_tokens=None)
        ident = model_identity(s, loaded)
        how = settings.for_model(column["context"])
        column["stride"], column["rule"] = how["stride"], how["rule"]
        start = time.perf_counter()
        for d in data:
            key = _key(ident, d, how)
            result = cache.get(key)
            if result is None:
                if loaded.config.vocab_size < GPT2_VOCAB_SIZE:
                    column["error"] = (f"{loaded.name} has a {loaded.config.vocab_size}-token vocabulary, not "
                                       f"GPT-2's BPE: it cannot score GPT-2-tokenised text")
                    break
                result = score(loaded, d, settings, on_progress if s.kind == "step" else None)
                cache.put(key, result)
                column["scored"].append(d.key)
            rule = settings.lambada_rule if d.kind != "stream" else settings.rule
            metrics = ("acc", "ppl") if d.kind != "stream" else ("loss", "ppl", "word_ppl", "byte_ppl", "bits_per_byte")
            result["references"] = reference_records(_reference_name(s, loaded), d.key, metrics,
                                                     stride=how["stride"], rule=rule)
            column["results"][d.key] = result
        if on_model_done:
            on_model_done(s, time.perf_counter() - start, column["scored"])
        del loaded
        gc.collect()
    main = next((d.key for d in data if d.kind == "stream"), None)
    points = [(c["step"], c.get("training_tokens"), c["results"].get(main, {}).get("loss"))
              for c in columns if c["kind"] == "step" and "error" not in c]
    return {
        "run": run_dir.name if run_dir else None,
        "data": [{"key": d.key, "description": d.description, "rows": d.rows,
                  **({"tokens": d.ids.numel(), "bytes": d.n_bytes, "words": d.n_words} if d.kind == "stream" else {})}
                 for d in data],
        "method": {"rule": settings.rule, "stride": settings.stride or ("half of each model's context"
                                                                        if settings.rule == "strided" else None),
                   "lambada_rule": settings.lambada_rule, "dtype": settings.dtype, "device": device,
                   "context": "each model's own (block_size)"},
        "columns": columns,
        "published": published_losses(),
        "curves": {"train": curves["train"], "val": curves["val"]},
        "trend": {"data": main, **trend(points)} if main else {"error": "no perplexity data set to fit a trend to"},
    }


def _key(ident: dict | None, data, how: dict) -> dict | None:
    return None if ident is None else {"model": ident, "data": data_identity(data), **how}


def _reference_name(subject: Subject, loaded) -> str:
    """The name references are filed under: the Hub id a --vs model was loaded from, else its spec."""
    return loaded.location if loaded is not None and loaded.source == "hub" else subject.spec


def published_losses() -> list[dict]:
    """The published OpenWebText validation losses of the GPT-2 family: the plots' horizontal lines."""
    from .evaluation import REFERENCES

    return [{"model": r.models[0], "data": r.data, "loss": r.value, "measured": r.label(), "source": r.source}
            for r in REFERENCES if r.metric == "loss"]
