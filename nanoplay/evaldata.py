"""
The data sets `nanoplay eval --data` accepts, loaded once and shared by every model evaluated.

    wikitext-2, wikitext-103   raw test split, rows joined with "\\n\\n" (the HF perplexity guide)
    wikitext                   lm-evaluation-harness's task of that name: the wikitext-2 test split as
                               its 62 articles (EleutherAI/wikitext_document_level), each detokenized
                               and scored on its own; words and bytes counted on the original article
    lambada                    EleutherAI/lambada_openai, the 5,153 texts OpenAI's GPT-2 was scored on
    openwebtext, pydoc-topics  the trainer's validation split, tokenised as the trainer does
    a path or a Hub id         local .txt/.jsonl/.parquet files or folders, or a Hub text data set (all of it,
                               or --split train/val: the trainer's split of it)

The named sets come from the Hub through `datasets.load_dataset` (cached after the first download);
`NAME=PATH` reads a local copy of one instead (a .parquet, .jsonl or .txt holding the same rows).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import NanoplayError
from .textdata import check_not_empty, load_hub_dataset, quiet_datasets, reader_error
from .tokenizer import get_tokenizer

WIKITEXT_HUB = "Salesforce/wikitext"
WIKITEXT_CONFIGS = {"wikitext-2": "wikitext-2-raw-v1", "wikitext-103": "wikitext-103-raw-v1"}
HARNESS_WIKITEXT_HUB = "EleutherAI/wikitext_document_level"
HARNESS_WIKITEXT_CONFIG = "wikitext-2-raw-v1"
LAMBADA_HUB = "EleutherAI/lambada_openai"
LAMBADA_CONFIG = "default"  # the English texts; the other configs are machine translations
ALIASES = {"wikitext2": "wikitext-2", "wikitext103": "wikitext-103", "lambada_openai": "lambada",
           "lambada-openai": "lambada", "owt": "openwebtext", "wikitext-harness": "wikitext"}
NAMED = (*WIKITEXT_CONFIGS, "wikitext", "lambada", "openwebtext")
TRAINING_CORPORA = ("openwebtext", "pydoc-topics")  # evaluated on the validation split the trainer holds out
LOCAL_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".txt": "text", ".raw": "text"}


@dataclass
class EvalData:
    """One evaluation set: a token stream for perplexity, or LAMBADA's texts."""

    key: str  # wikitext-2 | wikitext-103 | wikitext | lambada | openwebtext | the path or Hub id given
    kind: str  # "stream" | "lambada"
    description: str  # where it came from and how it was joined
    rows: int  # rows (documents, lines, examples) used
    ids: torch.Tensor | None = None  # stream: (N,) token ids
    n_bytes: int = 0  # stream: UTF-8 bytes of the text
    n_words: int = 0  # stream: whitespace-separated words of the text
    texts: list[str] | None = None  # lambada
    doc_lengths: list[int] | None = None  # stream of documents scored one by one (the rolling rule): tokens each

    @property
    def is_wikitext(self) -> bool:
        return self.key in WIKITEXT_CONFIGS


def load_eval_data(spec: str, *, limit: int | None = None, text_column: str | None = None,
                   split: str | None = None, val_fraction: float | None = None) -> EvalData:
    """Resolve one --data spec: NAME, NAME=PATH (a local copy of a named set), a path, or a Hub id.
    Raises NanoplayError for data with nothing to score (an empty or blank file, an empty split): its
    perplexity per word and bits per byte would divide by zero."""
    data = _load_eval_data(spec, limit, text_column, split, val_fraction)
    if data.kind == "lambada" and not data.texts:
        raise NanoplayError(f"--data {spec}: holds no LAMBADA examples; give a file with one text per row")
    if data.kind == "stream" and not data.n_words:  # no bytes, or only whitespace: no words to divide by
        raise NanoplayError(f"--data {spec}: holds no text to score"
                            f"{f' in its {split} split' if split and split != 'all' else ''}; give a file with text")
    return data


def _load_eval_data(spec: str, limit: int | None, text_column: str | None, split: str | None,
                    val_fraction: float | None) -> EvalData:
    head, sep, local = spec.partition("=")
    name = ALIASES.get(head.strip().lower(), head.strip().lower())
    if name not in NAMED:
        name, local = spec.strip(), ""  # a path or Hub id, which may itself hold a "="
    elif sep and name == "openwebtext":
        raise NanoplayError(f"--data {spec}: NAME=PATH gives a local copy of wikitext-2, wikitext-103, wikitext or "
                            f"lambada; "
                            f"pass other text files as the path alone")
    if name in WIKITEXT_CONFIGS:
        if local:  # blank lines of the original wiki.*.raw files are empty rows, as the Hub's rows have them
            rows, where = [r if r.strip() else "" for r in _local_rows(Path(local), "text")], local
        else:
            rows, where = _hub_rows(name, WIKITEXT_HUB, WIKITEXT_CONFIGS[name], "test", "text"), WIKITEXT_HUB
        rows = rows[:limit] if limit else rows
        return wikitext_stream(name, rows, f"{where} {WIKITEXT_CONFIGS[name]} test, rows joined with '\\n\\n'")
    if name == "wikitext":
        if local:
            pages, where = _local_pages(Path(local)), local
        else:
            pages, where = _hub_rows(name, HARNESS_WIKITEXT_HUB, HARNESS_WIKITEXT_CONFIG, "test", "page"), \
                HARNESS_WIKITEXT_HUB
        pages = pages[:limit] if limit else pages
        return harness_wikitext(pages, f"{where} {HARNESS_WIKITEXT_CONFIG} test as lm-evaluation-harness's wikitext "
                                       f"task: an article per document, detokenized")
    if name == "lambada":
        if local:
            texts, where = _local_rows(Path(local), "text"), local
        else:
            texts, where = _hub_rows(name, LAMBADA_HUB, LAMBADA_CONFIG, "test", "text"), LAMBADA_HUB
        texts = texts[:limit] if limit else texts
        return EvalData(key="lambada", kind="lambada", description=f"{where} test (OpenAI's LAMBADA)",
                        rows=len(texts), texts=texts)
    docs, split = _text_documents(name, text_column, split, limit, val_fraction)
    part = "all of it" if split == "all" else f"its {split} split"
    return documents_stream(name, docs, f"{part}, read as the trainer reads it (each document followed by "
                                        f"<|endoftext|>)")


def wikitext_stream(key: str, rows: list[str], description: str) -> EvalData:
    """The perplexity guide's WikiText: every row of the test split, joined with a blank line."""
    text = "\n\n".join(rows)
    ids = torch.tensor(get_tokenizer().encode(text), dtype=torch.long)
    return EvalData(key=key, kind="stream", description=description, rows=len(rows), ids=ids,
                    n_bytes=len(text.encode("utf-8")), n_words=len(text.split()))


def harness_wikitext(pages: list[str], description: str) -> EvalData:
    """
    lm-evaluation-harness's wikitext task: each article detokenized (`wikitext_detokenizer`) and
    tokenized on its own, to be scored one by one; its words (`re.split(r"\\s+", page)`, as the
    harness counts them) and UTF-8 bytes are those of the original article.
    """
    tok = get_tokenizer()
    docs = [tok.encode(wikitext_detokenizer(page)) for page in pages]
    return EvalData(key="wikitext", kind="stream", description=description, rows=len(pages),
                    ids=torch.tensor([i for d in docs for i in d], dtype=torch.long),
                    n_bytes=sum(len(p.encode("utf-8")) for p in pages),
                    n_words=sum(len(re.split(r"\s+", p)) for p in pages), doc_lengths=[len(d) for d in docs])


# lm-evaluation-harness's wikitext_detokenizer (lm_eval/tasks/wikitext/preprocess_wikitext.py), which
# undoes WikiText's tokenisation before GPT-2's BPE sees the text: plain replacements and regular
# expressions, applied in this order.
_DETOKENIZE = (
    ("s '", "s'"), (re.compile(r"/' [0-9]/"), r"/'[0-9]/"),  # contractions
    (" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."),  # number separators
    (" : ", ": "), (" ; ", "; "), (" . ", ". "), (" ! ", "! "), (" ? ", "? "), (" , ", ", "),  # punctuation
    (re.compile(r"\(\s*([^\)]*?)\s*\)"), r"(\1)"), (re.compile(r"\[\s*([^\]]*?)\s*\]"), r"[\1]"),  # brackets
    (re.compile(r"{\s*([^}]*?)\s*}"), r"{\1}"), (re.compile(r"\"\s*([^\"]*?)\s*\""), r'"\1"'),
    (re.compile(r"'\s*([^']*?)\s*'"), r"'\1'"),
    ("= = = =", "===="), ("= = =", "==="), ("= =", "=="),  # headings
    (" \u00b0 ", "\u00b0"), (" \n", "\n"), ("\n ", "\n"), (" N ", " 1 "), (" 's", "'s"),
)


def wikitext_detokenizer(text: str) -> str:
    for pattern, replacement in _DETOKENIZE:
        text = pattern.sub(replacement, text) if isinstance(pattern, re.Pattern) else text.replace(pattern, replacement)
    return text


def documents_stream(key: str, docs: list[str], description: str | None = None) -> EvalData:
    """Documents as the trainer streams them: each one's tokens followed by end-of-text."""
    tok = get_tokenizer()
    ids: list[int] = []
    for doc in docs:
        ids.extend(tok.encode(doc))
        ids.append(tok.eot_id)
    return EvalData(key=key, kind="stream", rows=len(docs),
                    description=description or "each document followed by <|endoftext|>",
                    ids=torch.tensor(ids, dtype=torch.long), n_bytes=sum(len(d.encode("utf-8")) for d in docs),
                    n_words=sum(len(d.split()) for d in docs))


def _text_documents(source: str, text_column: str | None, split: str | None, limit: int | None,
                    val_fraction: float | None) -> tuple[list[str], str]:
    """
    Documents through nanoplay.textdata, the trainer's reader: a training corpus (openwebtext,
    pydoc-topics) gives its validation split, a file or Hub set the user points at all of itself,
    unless `split` says otherwise.
    """
    from .textdata import load_text_dataset

    split = split or ("val" if source in TRAINING_CORPORA else "all")
    ds = load_text_dataset(source, split=split, text_column=text_column, val_fraction=val_fraction)
    if limit:
        ds = ds.select(range(min(limit, len(ds))))
    return list(ds["text"]), split


def _hub_rows(key: str, repo: str, config: str, split: str, column: str) -> list[str]:
    import datasets

    try:
        ds = load_hub_dataset(repo, config, split=split)
    except ConnectionError as e:  # offline (or the Hub unreachable) and not in the datasets cache
        raise NanoplayError(
            f"{key} ({repo}, {config}) is not in the datasets cache ({datasets.config.HF_DATASETS_CACHE}) and the "
            f"Hub cannot be reached: run once with network, or pass a local copy as --data {key}=PATH"
        ) from e
    except ValueError as e:
        if "Couldn't find cache" not in str(e):
            raise
        raise NanoplayError(f"{key}: the datasets cache has {repo} but not its {config} config; run once with "
                            f"network, or pass a local copy as --data {key}=PATH") from e
    return list(ds[column])


ARTICLE_HEADING = re.compile(r"^ = [^=].* = $")  # " = Robert Boulter = ": a new article (one "=" each side)


def _local_pages(path: Path) -> list[str]:
    """
    Articles of a local copy of the harness's WikiText: a .parquet/.jsonl with its `page` column, or the
    original wiki.test.raw, cut before each top-level heading line.
    """
    if path.suffix.lower() not in (".raw", ".txt"):
        return _local_rows(path, "page")
    if not path.is_file():
        raise NanoplayError(f"{path}: no such file")
    pages: list[list[str]] = []
    from .textio import read_text  # the one UTF-8 policy: a bad byte is an error naming it

    for line in read_text(path).splitlines(keepends=True):
        if ARTICLE_HEADING.match(line.rstrip("\n")) or not pages:
            pages.append([])
        pages[-1].append(line)
    return ["".join(p) for p in pages]


def _local_rows(path: Path, column: str) -> list[str]:
    """The rows of a local copy, read by the same `datasets` builders the Hub files go through."""
    import datasets

    if not path.is_file():
        raise NanoplayError(f"{path}: no such file")
    builder = LOCAL_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise NanoplayError(f"{path}: expected a {', '.join(LOCAL_BUILDERS)} file")
    check_not_empty(path)
    kwargs = {"keep_linebreaks": True} if builder == "text" else {}  # WikiText's rows keep their "\n"
    if builder != "parquet":  # text files: nanoplay.textio's one UTF-8 policy, the byte named
        from .textio import check_utf8

        check_utf8(path)
    try:
        with quiet_datasets():
            ds = datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
    except Exception as e:  # a malformed line, say
        cause = reader_error(e)
        raise NanoplayError(f"{path} could not be read as {builder}: {type(cause).__name__}: {cause}") from e
    if column not in ds.column_names:
        raise NanoplayError(f"{path} has no {column!r} column (columns: {', '.join(ds.column_names)})")
    return list(ds[column])
