"""
Fine-tuning data: conversations, checked line by line, encoded in the chat template with a loss mask.

Accepted per line (JSONL) or per row (JSON list, parquet, Hub dataset):
  {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
  [{"role": ..., "content": ...}, ...]                 (a bare list of messages)
  {"prompt": "...", "response": "..."}                 (one user turn and its answer)

A valid conversation: an optional system message first, then user and assistant messages alternating,
starting with a user and ending with an assistant, every content a non-empty string, and the whole
fitting in the model's context.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nanoplay.chat import ROLES, encode_conversation
from nanoplay.errors import NanoplayError
from nanoplay.textdata import load_hub_dataset, quiet_datasets
from nanoplay.textio import surrogate_problem
from nanoplay.tokenizer import EOT_ID

MAX_REPORTED = 20


@dataclass
class Problem:
    line: int  # 1-based line (JSONL) or row number
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}"


def to_messages(record) -> list[dict]:
    """One record in any accepted shape -> its list of messages; ValueError with the reason if malformed."""
    if isinstance(record, dict) and "messages" in record:
        messages = record["messages"]
    elif isinstance(record, list):
        messages = record
    elif isinstance(record, dict) and ("prompt" in record or "response" in record):
        for key in ("prompt", "response"):
            if key not in record:
                raise ValueError(f'has "{"prompt" if key == "response" else "response"}" but no "{key}"')
        messages = [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]
    else:
        raise ValueError('not a conversation: expected {"messages": [...]}, a list of messages, or {"prompt": ..., "response": ...}')
    if not isinstance(messages, list) or not messages:
        raise ValueError("has no messages")
    clean = []
    for i, m in enumerate(messages, 1):
        if not isinstance(m, dict):
            raise ValueError(f"message {i} is not an object with role and content")
        if "role" not in m or m["role"] is None:
            raise ValueError(f"message {i} has no role")
        if m["role"] not in ROLES:
            raise ValueError(f"message {i} has unknown role {m['role']!r} (use system, user or assistant)")
        if m.get("content") is None:
            raise ValueError(f"message {i} ({m['role']}) has no content")
        if not isinstance(m["content"], str):
            raise ValueError(f"message {i} ({m['role']}) has content {m['content']!r}: it must be a string")
        if not m["content"].strip():
            raise ValueError(f"message {i} ({m['role']}) has empty content")
        if problem := surrogate_problem(m["content"]):
            raise ValueError(f"message {i} ({m['role']}): {problem}")
        clean.append({"role": m["role"], "content": m["content"]})
    check_order([m["role"] for m in clean])
    return clean


def check_order(roles: list[str]) -> None:
    turns = roles[1:] if roles[0] == "system" else roles
    if not turns:
        raise ValueError("roles out of order: a system message alone, with no user and assistant turns")
    for i, role in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            position = i + 1 + (len(roles) - len(turns))
            raise ValueError(f"roles out of order: message {position} is {role}, expected {expected} "
                             f"(an optional system message, then user and assistant alternating)")
    if turns[-1] != "assistant":
        raise ValueError("roles out of order: the conversation ends with a user message and no assistant answer")


def read_records(data: str) -> list[tuple[int, object]]:
    """(line number, parsed record or a Problem) for every non-blank line / row of the source."""
    path = Path(data).expanduser()
    if path.is_file() and path.suffix == ".jsonl":
        records = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                records.append((n, Problem(n, f"not JSON ({e.msg} at column {e.colno})")))
        return records
    if path.is_file() and path.suffix == ".json":
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise NanoplayError(f"{path} is not JSON ({e.msg} at line {e.lineno}): expected a list of conversations") from e
        if not isinstance(rows, list):
            raise NanoplayError(f"{path}: expected a JSON list of conversations, or use JSONL (one per line)")
        return list(enumerate(rows, 1))
    return list(enumerate(_dataset_rows(data), 1))


def _dataset_rows(data: str) -> list:
    """Rows of a parquet file or a Hub dataset, through `datasets`."""
    import datasets

    path = Path(data).expanduser()
    try:
        if path.exists():
            if path.suffix != ".parquet" and not path.is_dir():
                raise NanoplayError(f"{path}: expected a .jsonl, .json or .parquet file of conversations")
            files = [str(path)] if path.is_file() else sorted(str(p) for p in path.rglob("*.parquet"))
            with quiet_datasets():
                ds = datasets.load_dataset("parquet", data_files=files, split="train")
        else:
            ds = load_hub_dataset(data, split="train")
    except (ConnectionError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as e:
        raise NanoplayError(f"{data}: no such file, and not a dataset in the local caches or on a reachable Hub") from e
    rows = []
    for row in ds:
        if "messages" in row:
            rows.append({"messages": row["messages"]})
        elif "prompt" in row or "response" in row:
            rows.append({k: row[k] for k in ("prompt", "response") if k in row})
        else:
            rows.append(row)
    return rows


@dataclass
class Example:
    line: int
    messages: list[dict]
    ids: list[int]  # the conversation in the chat template
    trained: list[bool]  # per id: is it a target the loss sees


def load_conversations(data: str, block_size: int) -> tuple[list[Example], list[Problem]]:
    """Every record checked and encoded; a conversation longer than the context is a problem too."""
    examples, problems = [], []
    for line, record in read_records(data):
        if isinstance(record, Problem):
            problems.append(record)
            continue
        try:
            messages = to_messages(record)
        except ValueError as e:
            problems.append(Problem(line, str(e)))
            continue
        ids, trained = encode_conversation(messages)
        if len(ids) - 1 > block_size:  # inputs are ids[:-1]
            problems.append(Problem(line, f"too long for the context: {len(ids) - 1} tokens, the model's context is {block_size}"))
            continue
        examples.append(Example(line, messages, ids, trained))
    return examples, problems


def report_problems(problems: list[Problem], source: str) -> str:
    shown = "\n".join(f"  {p}" for p in problems[:MAX_REPORTED])
    more = f"\n  ... and {len(problems) - MAX_REPORTED} more" if len(problems) > MAX_REPORTED else ""
    return f"{source}: {len(problems)} invalid conversation{'s' if len(problems) != 1 else ''}:\n{shown}{more}"


def split_examples(examples: list[Example], val_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A seeded validation split of whole conversations (at least one when there are two or more)."""
    n_val = round(len(examples) * val_fraction)
    if val_fraction > 0 and len(examples) >= 2:
        n_val = max(1, n_val)
    order = np.random.default_rng([seed, 2]).permutation(len(examples))
    val = sorted((examples[i] for i in order[:n_val]), key=lambda e: e.line)
    train = sorted((examples[i] for i in order[n_val:]), key=lambda e: e.line)
    return train, val


def collate(examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (B, T) inputs and targets; targets are -1 where not trained (prompts, padding)."""
    T = max(len(e.ids) - 1 for e in examples)
    x = torch.full((len(examples), T), EOT_ID, dtype=torch.long)
    y = torch.full((len(examples), T), -1, dtype=torch.long)
    for row, e in enumerate(examples):
        ids = torch.tensor(e.ids)
        trained = torch.tensor(e.trained[1:])
        x[row, :len(ids) - 1] = ids[:-1]
        y[row, :len(ids) - 1] = torch.where(trained, ids[1:], torch.full_like(ids[1:], -1))
    return x, y


class ChatData:
    """Epochs of shuffled conversations; the micro-batches of a step are a pure function of (seed, step)."""

    def __init__(self, train: list[Example], val: list[Example], batch_size: int, micro_per_step: int,
                 seed: int, eval_batches: int, source: str):
        if not train:
            raise NanoplayError(f"{source}: no conversations left to train on")
        self.train, self.batch_size, self.micro_per_step, self.seed = train, batch_size, micro_per_step, seed
        self.source = source
        self.val = [collate(val[i:i + batch_size]) for i in range(0, len(val), batch_size)][:eval_batches]
        self._perms: dict[int, np.ndarray] = {}

    def _example(self, position: int) -> Example:
        epoch, index = divmod(position, len(self.train))
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, 3, epoch]).permutation(len(self.train))}
        return self.train[self._perms[epoch][index]]

    def train_batch(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        first = (step * self.micro_per_step + micro) * self.batch_size
        return collate([self._example(p) for p in range(first, first + self.batch_size)])

    def val_batches(self):
        return self.val

    def steps_per_epoch(self) -> float:
        return len(self.train) / (self.batch_size * self.micro_per_step)

    def describe(self) -> str:
        return f"{self.source}: {len(self.train)} training conversations"
