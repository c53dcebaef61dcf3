"""
Reading the text a user gives nanoplay: one policy for every input (stdin, prompt and text files,
evaluation data, command-line arguments).

Text must be UTF-8. Anything else is refused with one line that names the input and the byte offset
of the first bad byte, rather than replaced: a replaced byte silently changes the tokens a model is
scored or prompted on. A UTF-8 byte-order mark at the start is dropped (it is not text).
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import NanoplayError

BOM = b"\xef\xbb\xbf"


def _not_utf8(source: str, data: bytes, at: int, offset: int = 0) -> NanoplayError:
    return NanoplayError(f"{source}: not valid UTF-8 at byte {offset + at} (0x{data[at]:02x}); "
                         f"convert it first, e.g. `iconv -f latin1 -t utf-8`")


def decode_text(data: bytes, source: str) -> str:
    """`data` as UTF-8 text, without a leading byte-order mark. Raises NanoplayError naming `source`
    and the offset (in `data`, counting from 0) of the first byte that is not UTF-8."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise _not_utf8(source, data, e.start) from None


def read_text(path: Path | str) -> str:
    """The whole file at `path` as text (see decode_text); an unreadable file is one line too."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise NanoplayError(f"cannot read {path}: {e.strerror or e}") from e
    return decode_text(data, str(path))


def check_utf8(path: Path | str, block_size: int = 1 << 20) -> None:
    """Refuse a file that is not UTF-8 before another reader (`datasets`, say) sees it, with the same
    message as read_text. Reads in blocks, so a large corpus is never held in memory."""
    carry, offset = b"", 0  # carry: a character split between blocks; offset: its position in the file
    try:
        with open(path, "rb") as f:
            while block := f.read(block_size):
                data, carry = carry + block, b""
                try:
                    data.decode("utf-8")
                except UnicodeDecodeError as e:
                    if e.reason != "unexpected end of data":
                        raise _not_utf8(str(path), data, e.start, offset) from None
                    carry = data[e.start:]  # the block ended inside a character: finish it with the next
                offset += len(data) - len(carry)
    except OSError as e:
        raise NanoplayError(f"cannot read {path}: {e.strerror or e}") from e
    if carry:
        raise _not_utf8(str(path), carry, 0, offset)


def surrogate_problem(text: str) -> str | None:
    """Why `text` is not text, or None: a lone surrogate (JSON's "\\ud800", a \\uXXXX escape) is half of a
    UTF-16 pair. The tokenizer would replace it with U+FFFD unseen, and printing it fails."""
    at = next((i for i, c in enumerate(text) if "\ud800" <= c <= "\udfff"), None)
    if at is None:
        return None
    return (f"a lone surrogate (\\u{ord(text[at]):04x}) at character {at + 1} is half of a UTF-16 pair, "
            f"not text: write the character itself, or both halves of its pair")


def json_text(value: str, where: str) -> str:
    """A string that JSON (or an escape) gave: `value` itself, or NanoplayError naming `where`."""
    problem = surrogate_problem(value)
    if problem:
        raise NanoplayError(f"{where}: {problem}")
    return value


def argument_text(value: str, option: str) -> str:
    """A command-line argument as text. Bytes that are not UTF-8 reach Python as lone surrogates
    (PEP 383); they are refused like a file's, with the offset in the argument's bytes."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return decode_text(os.fsencode(value), option)
    return value
