"""
Pre-training data: a text source (nanoplay.textdata) tokenised once into uint16 memory-mapped shards.

Documents are separated by <|endoftext|>. The shards are cached under $NANOPLAY_DATA_CACHE (default
~/.cache/nanoplay/tokens) by a key of the source (files' sizes and dates included) and the tokenizer,
so the next run reuses them without reading the source (or needing the network) again.

Batches are a pure function of (seed, step, micro-batch index): resuming at step N reads exactly the
batches an uninterrupted run would have read, and DDP ranks take disjoint micro-batches of one global batch.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from nanoplay.checkpoint import write_dir_atomically
from nanoplay.errors import NanoplayError
from nanoplay.textdata import TextSource, load_documents, quiet_datasets, split_documents
from nanoplay.tokenizer import EOT_ID, get_tokenizer

CACHE_VERSION = 1
TOKENIZER_ID = "gpt2-bpe+eot-separated"
SHARD_TOKENS = 100_000_000  # 200 MB per uint16 shard


def cache_root() -> Path:
    return Path(os.environ.get("NANOPLAY_DATA_CACHE", Path.home() / ".cache" / "nanoplay" / "tokens"))


def cache_dir(source: TextSource) -> Path:
    key = hashlib.sha256(f"{CACHE_VERSION}:{TOKENIZER_ID}:{source.fingerprint()}".encode()).hexdigest()[:16]
    return cache_root() / f"{source.name.strip('/~.').replace('/', '_')[-40:]}-{key}"


def _tokenize_batch(batch):
    tok = get_tokenizer()
    ids = tok.encoding.encode_ordinary_batch(batch["text"])
    for doc in ids:
        doc.append(EOT_ID)  # end-of-text after every document, as GPT-2 was trained
    return {"ids": ids, "len": [len(d) for d in ids]}


def prepare(source: TextSource, num_proc: int = 0, progress: bool = True) -> Path:
    """
    Tokenise the source into cached shards (once); returns the cache directory. `progress`: bars for
    tokenising and writing, shown only on a terminal (a log file would get every redraw).
    """
    final = cache_dir(source)
    if (final / "meta.json").is_file():
        return final
    docs = load_documents(source)
    if len(docs) == 0:
        raise NanoplayError(f"{source.name} has no documents")
    parts = split_documents(docs, source.val_fraction)
    procs = num_proc or (os.cpu_count() if len(docs) >= 10_000 else 1)
    progress = progress and sys.stderr.isatty()

    def write(tmp: Path):
        meta = {"source": source.name, "tokenizer": TOKENIZER_ID, "documents": len(docs), "splits": {}}
        for split, part in parts.items():
            with quiet_datasets(not progress):
                tokenized = part.map(_tokenize_batch, batched=True, batch_size=256, remove_columns=["text"],
                                     num_proc=procs if procs > 1 else None,
                                     desc=f"tokenizing {source.name} {split} ({procs} processes)")
            meta["splits"][split] = _write_shards(tokenized, tmp, split, progress)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))

    return write_dir_atomically(final, write)


def _write_shards(ds, directory: Path, split: str, progress: bool) -> list[dict]:
    """The split's token stream, in order, cut into uint16 shards of at most SHARD_TOKENS."""
    from tqdm.auto import tqdm

    total = int(np.sum(list(ds["len"])))
    sizes = [min(SHARD_TOKENS, total - start) for start in range(0, total, SHARD_TOKENS)]
    shards = [{"file": f"{split}-{i:05d}.bin", "tokens": n} for i, n in enumerate(sizes)]
    bar = tqdm(total=total, unit="tok", unit_scale=True, desc=f"writing {split}", disable=not progress)
    index, out, pos = -1, None, 0
    for batch in ds.iter(batch_size=1024):
        chunk = np.concatenate([np.asarray(ids, dtype=np.uint16) for ids in batch["ids"]])
        while len(chunk):  # a document may straddle two shards: a shard is just a slice of the stream
            if out is None or pos == len(out):
                if out is not None:
                    out.flush()
                index, pos = index + 1, 0
                out = np.memmap(directory / shards[index]["file"], dtype=np.uint16, mode="w+", shape=(sizes[index],))
            take = min(len(chunk), len(out) - pos)
            out[pos:pos + take] = chunk[:take]
            chunk, pos = chunk[take:], pos + take
            bar.update(take)
    if out is not None:
        out.flush()
    bar.close()
    return shards


class TokenData:
    """The cached shards of one source, sampled as (x, y) batches of random windows, nanoGPT-style."""

    def __init__(self, directory: Path, block_size: int, batch_size: int, seed: int, eval_batches: int):
        self.directory = Path(directory)
        meta = json.loads((self.directory / "meta.json").read_text())
        self.source = meta["source"]
        self.block_size, self.batch_size, self.seed = block_size, batch_size, seed
        self.splits = {}
        for split, shards in meta["splits"].items():
            arrays = [np.memmap(self.directory / s["file"], dtype=np.uint16, mode="r") for s in shards if s["tokens"]]
            arrays = [a for a in arrays if len(a) > block_size]  # a window needs block_size + 1 tokens
            if not arrays:
                # a larger validation share grows the val split and shrinks the train split
                fix = "more data, a smaller --val-fraction" if split == "train" else "a larger --val-fraction, more data"
                raise NanoplayError(f"{self.source}: the {split} split has fewer than {block_size + 1} tokens (one "
                                    f"context of {block_size} and its next token); use {fix}, or a smaller --block-size")
            self.splits[split] = arrays
        self.train_tokens = sum(len(a) for a in self.splits["train"])
        # fixed validation batches: the same windows at every evaluation, and in every run of this seed
        self.val = [self._batch("val", np.random.default_rng([seed, 1, i])) for i in range(eval_batches)]

    def _batch(self, split: str, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        arrays = self.splits[split]
        starts = np.array([len(a) - self.block_size for a in arrays])  # valid window starts per shard
        picks = rng.integers(0, starts.sum(), size=self.batch_size)
        shard = np.searchsorted(np.cumsum(starts), picks, side="right")
        offset = picks - np.concatenate([[0], np.cumsum(starts)])[shard]
        rows = [arrays[s][o:o + self.block_size + 1].astype(np.int64) for s, o in zip(shard, offset)]
        xy = torch.from_numpy(np.stack(rows))  # (B, T+1)
        return xy[:, :-1], xy[:, 1:]

    def train_batch(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Micro-batch `micro` of the global batch of `step`: (B, T) inputs and next-token targets."""
        return self._batch("train", np.random.default_rng([self.seed, 0, step, micro]))

    def val_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return self.val

    def describe(self) -> str:
        return f"{self.source}: {self.train_tokens:,} training tokens"
