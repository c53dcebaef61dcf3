"""
Text corpora as the trainer reads them, shared with the evaluator so both see the same documents.

A source (`--data`) is one of:
  - `openwebtext`: a parquet copy on the Hub (Skylion007/openwebtext), split like nanoGPT's prepare.py
    (0.05% of the documents, seed 2357, for validation);
  - `pydoc-topics`: Python's documentation topics, bundled with Python (the offline demo corpus);
  - a local `.txt` / `.jsonl` / `.json` / `.parquet` file or a folder of them (a .txt file is one document);
  - any Hub dataset id with a text column (`owner/name`, or `owner/name:config`).

Validation split: whole documents when the fraction leaves at least one on each side; otherwise (a
single input.txt, say) the last `val_fraction` of each document's characters. Unless told a fraction,
data other than openwebtext and pydoc-topics holds out about MIN_VAL_BYTES of text (many contexts of
1024 tokens), but at least 0.05% (nanoGPT's share) and at most 10% of it: a small file keeps enough
to validate on, a large corpus gives up little.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import NanoplayError

LOCAL_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
OPENWEBTEXT_REPO = "Skylion007/openwebtext"
OPENWEBTEXT_VAL_FRACTION = 0.0005
PYDOC_VAL_FRACTION = 0.1  # 8 of the 79 topics: nanoGPT's 0.05% would hold out none
MIN_VAL_BYTES = 100_000  # ~25k GPT-2 tokens: two dozen windows of 1024
DEFAULT_VAL_FRACTIONS = (0.0005, 0.1)  # the range that MIN_VAL_BYTES is kept within
SPLIT_SEED = 2357  # nanoGPT's


@dataclass
class TextSource:
    """Where text comes from and how it is split; `fingerprint` changes whenever its content may have."""

    name: str  # as the user wrote it
    kind: str  # hub | local | bundled
    path: str  # Hub id, or the datasets builder (text/json/parquet) for local files
    files: list[str]
    config_name: str | None
    text_column: str  # "" = 'text', or the only string column
    val_fraction: float  # 0: by the data's size (see the module doc)

    def fingerprint(self) -> str:
        stamp = [(f, os.path.getsize(f), os.path.getmtime(f)) for f in self.files]
        desc = json.dumps([self.kind, self.path, self.config_name, stamp, self.text_column, self.val_fraction])
        return hashlib.sha256(desc.encode()).hexdigest()[:16]


def resolve_source(data: str, text_column: str | None = None, val_fraction: float | None = None) -> TextSource:
    if val_fraction is not None and not 0 <= val_fraction < 1:  # NaN too
        raise NanoplayError(f"val_fraction must be at least 0 and below 1, not {val_fraction}")
    column = text_column or ""
    # None or 0: the source's own default, so that the trainer and `nanoplay eval` agree unless told otherwise
    fraction = val_fraction or (PYDOC_VAL_FRACTION if data == "pydoc-topics" else 0.0)
    if data == "openwebtext":
        return TextSource(data, "hub", OPENWEBTEXT_REPO, [], None, column or "text", OPENWEBTEXT_VAL_FRACTION)
    if data == "pydoc-topics":
        return TextSource(data, "bundled", "pydoc_data.topics", [], None, "text", fraction)
    path = Path(data).expanduser()
    if path.exists():
        files = local_files(path)
        builders = {LOCAL_BUILDERS[f.suffix] for f in files}
        if len(builders) > 1:
            raise NanoplayError(f"{path} mixes file types ({', '.join(sorted({f.suffix for f in files}))}): use one kind per folder")
        return TextSource(data, "local", builders.pop(), [str(f.resolve()) for f in files], None, column, fraction)
    if "/" in data and not data.startswith((".", "/", "~")):
        repo, _, config_name = data.partition(":")
        return TextSource(data, "hub", repo, [], config_name or None, column, fraction)
    raise NanoplayError(f"--data {data!r}: no such file or folder, and not openwebtext, pydoc-topics or a Hub id like owner/name")


def local_files(path: Path) -> list[Path]:
    if path.is_file():
        files = [path]
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    files = [f for f in files if f.suffix in LOCAL_BUILDERS]
    if not files:
        raise NanoplayError(f"{path}: no .txt, .jsonl, .json or .parquet files to read")
    for f in files:
        check_not_empty(f)
    return files


def check_not_empty(path: Path) -> None:
    """Refuse an empty file, on which `datasets`' readers fail with a bare StopIteration (JSON) or a
    schema error (text, read as rows)."""
    if path.stat().st_size == 0:
        raise NanoplayError(f"{path} is empty: give a file with at least one row")


def load_documents(source: TextSource):
    """All documents of the source as a `datasets.Dataset` with one string column, 'text'."""
    import datasets

    if source.kind == "bundled":
        from pydoc_data.topics import topics

        return datasets.Dataset.from_dict({"text": [topics[k] for k in sorted(topics)]})
    try:
        if source.kind == "local":
            kwargs = {"sample_by": "document"} if source.path == "text" else {}
            with quiet_datasets():
                ds = datasets.load_dataset(source.path, data_files=source.files, split="train", **kwargs)
        else:
            ds = load_hub_dataset(source.path, source.config_name, split="train")  # download progress stays
    except (ConnectionError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as e:
        if source.kind == "hub":
            raise NanoplayError(
                f"{source.name} is not in the local caches and the Hub cannot be reached (or has no such data "
                f"set): run this once where you have network, or pass local files with --data PATH"
            ) from e
        raise NanoplayError(f"{source.name}: {e}") from e
    except (ValueError, datasets.exceptions.DatasetGenerationError) as e:
        if _first_record_is_a_conversation(source):  # messages of different shapes make datasets fail
            raise NanoplayError(_chat_not_text(source)) from e
        cause = reader_error(e)
        raise NanoplayError(f"{source.name} could not be read ({str(cause).strip().splitlines()[0][:200]})") from e
    column = _text_column(ds, source)
    ds = ds.select_columns([column])
    return ds if column == "text" else ds.rename_column(column, "text")


def _text_column(ds, source: TextSource) -> str:
    import datasets

    strings = [n for n, f in ds.features.items() if isinstance(f, datasets.Value) and f.dtype in ("string", "large_string")]
    if source.text_column:
        if source.text_column not in strings:
            raise NanoplayError(f"{source.name} has no text column {source.text_column!r}; string columns: {strings}")
        return source.text_column
    if "text" in strings:
        return "text"
    if len(strings) == 1:
        return strings[0]
    if _is_conversation(ds.features):
        raise NanoplayError(_chat_not_text(source))
    if not strings:
        raise NanoplayError(f"{source.name} has no column of strings to train on (columns: {list(ds.features)})")
    raise NanoplayError(f"{source.name}: which column is the text? pass --text-column (string columns: {strings})")


def reader_error(e: BaseException) -> BaseException:
    """The error of the reader itself (pyarrow's, json's), which `datasets` wraps in its own: it names the fault."""
    while e.__cause__ is not None:
        e = e.__cause__
    return e


@contextmanager
def quiet_datasets(quiet: bool = True):
    """
    No `datasets` progress bars or log lines inside the block: reading local files is quick, and nanoplay
    reports its own errors. The previous settings come back after it.
    """
    import datasets

    if not quiet:
        yield
        return
    bars_were_off, verbosity = datasets.utils.are_progress_bars_disabled(), datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if not bars_were_off:
            datasets.enable_progress_bars()


def _is_conversation(keys) -> bool:
    """Keys of a record in one of `nanoplay finetune`'s shapes ({"messages": ...} or {"prompt", "response"})."""
    return "messages" in keys or {"prompt", "response"} <= set(keys)


def _first_record_is_a_conversation(source: TextSource) -> bool:
    """Whether a local JSON Lines source starts with a conversation (a list of messages or a chat record)."""
    if source.kind != "local" or source.path != "json":
        return False
    try:
        with open(source.files[0], encoding="utf-8") as f:
            record = json.loads(next((line for line in f if line.strip()), "null"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):  # a .json list, say: not worth reading whole
        return False
    return isinstance(record, list) or isinstance(record, dict) and _is_conversation(record)


def _chat_not_text(source: TextSource) -> str:
    return (f"{source.name} holds chat conversations, not texts (no text column): "
            f"to train on dialogs use `nanoplay finetune --data {source.name}`")


def load_hub_dataset(*args, **kwargs):
    """
    `datasets.load_dataset` for a Hub data set. When the Hub cannot be reached, only the local cache is
    tried, so a data set that is not there fails in seconds with our one line, instead of after a
    minute of retries and warnings.
    """
    import datasets
    from huggingface_hub import constants

    from .loading import hub_reachable

    if hub_reachable():
        return datasets.load_dataset(*args, **kwargs)
    # datasets and huggingface_hub read their offline switch at call time from these two attributes
    saved = constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        return datasets.load_dataset(*args, **kwargs)
    finally:
        constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved


def split_documents(docs, val_fraction: float) -> dict:
    """{'train': Dataset, 'val': Dataset} with a 'text' column, split as described in the module doc (0: by size)."""
    import datasets

    if not val_fraction:
        low, high = DEFAULT_VAL_FRACTIONS
        val_fraction = min(high, max(low, MIN_VAL_BYTES / max(1, docs.data.nbytes)))
    n_val = round(len(docs) * val_fraction)
    if n_val >= 1 and len(docs) - n_val >= 1:
        split = docs.train_test_split(test_size=n_val, seed=SPLIT_SEED, shuffle=True)
        return {"train": split["train"], "val": split["test"]}
    texts = list(docs["text"])
    cuts = [len(t) - max(1, int(len(t) * val_fraction)) for t in texts]
    return {"train": datasets.Dataset.from_dict({"text": [t[:c] for t, c in zip(texts, cuts)]}),
            "val": datasets.Dataset.from_dict({"text": [t[c:] for t, c in zip(texts, cuts)]})}


def load_text_dataset(source: str, split: str = "train", text_column: str | None = None,
                      val_fraction: float | None = None):
    """The `train` or `val` documents of a source, exactly those the trainer uses; `all`: unsplit."""
    if split not in ("train", "val", "all"):
        raise NanoplayError(f"split {split!r}: the trainer's splits are train and val (or all)")
    resolved = resolve_source(source, text_column, val_fraction)
    docs = load_documents(resolved)
    return docs if split == "all" else split_documents(docs, resolved.val_fraction)[split]
