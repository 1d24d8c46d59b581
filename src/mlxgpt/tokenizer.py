"""Tokenizers behind one small interface: characters of a corpus, or GPT-2 BPE (tiktoken)."""
from __future__ import annotations

import codecs
import json
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from mlxgpt.errors import UserError

# tiktoken caches a downloaded file under the sha1 of its URL; this is r50k_base.tiktoken's name.
GPT2_RANKS_CACHE_NAME = "0ea1e91bbb3a60f729a8dc8f777fd2fc07cd8df4"
EOT_TEXT = "<|endoftext|>"


class CharTokenizer:
    """One token per character; the vocabulary is the sorted set of the corpus characters."""

    name = "char"
    eot_token = None

    def __init__(self, chars: str):
        self.chars = chars
        self._ids = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        try:
            return [self._ids[c] for c in text]
        except KeyError as missing:
            raise UserError(
                f"character {missing.args[0]!r} is not in this dataset's {self.vocab_size}-character vocabulary; "
                "use only characters that occur in the training text, or a BPE dataset (data.tokenizer=gpt2)"
            ) from None

    def encode_prompt(self, text: str) -> list[int]:
        """The ids a generation starts from: the text's (the first character's id for an empty text)."""
        return self.encode(text) or [0]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def decode_stream(self, ids: Iterable[int]) -> Iterator[str]:
        """decode() one piece per id, as the ids arrive."""
        return (self.chars[int(i)] for i in ids)

    def to_meta(self) -> dict:
        return {"name": self.name, "chars": self.chars}


class GPT2Tokenizer:
    """GPT-2 BPE: tiktoken's r50k_base ranks (the same as its "gpt2") and <|endoftext|> = 50256."""

    name = "gpt2"
    vocab_size = 50257
    eot_token = 50256

    def __init__(self):
        import tiktoken

        try:
            self._bpe = tiktoken.get_encoding("r50k_base")
        except Exception as e:  # tiktoken downloads the ranks on first use; offline this fails in many ways
            raise UserError(
                f"cannot load the GPT-2 BPE ranks ({type(e).__name__}: {str(e)[:120]}); connect to the internet once, "
                f"or copy r50k_base.tiktoken to <dir>/{GPT2_RANKS_CACHE_NAME} and set TIKTOKEN_CACHE_DIR=<dir>"
            ) from e

    def encode(self, text: str) -> list[int]:
        return self._bpe.encode_ordinary(text)

    def encode_prompt(self, text: str) -> list[int]:
        """The ids a generation starts from: the text's, with `<|endoftext|>` as the EOT token (as nanoGPT's sample.py;
        the EOT token alone for an empty text)."""
        return self._bpe.encode(text, allowed_special={EOT_TEXT}) or [self.eot_token]

    def encode_array(self, text: str) -> np.ndarray:
        """encode() as a uint16 array, without building a Python list (several times faster)."""
        try:
            ids = self._bpe.encode_to_numpy(text, disallowed_special=())
        except UnicodeEncodeError:  # lone surrogates: replace them as encode_ordinary does
            ids = self._bpe.encode_to_numpy(text.encode("utf-16", "surrogatepass").decode("utf-16", "replace"), disallowed_special=())
        return ids.astype(np.uint16)

    def decode(self, ids: Sequence[int]) -> str:
        return self._bpe.decode([int(i) for i in ids])

    def decode_stream(self, ids: Iterable[int]) -> Iterator[str]:
        """decode() piece by piece as the ids arrive: a character whose UTF-8 bytes span tokens comes with its last."""
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")  # decode()'s errors="replace" too
        for i in ids:
            if text := utf8.decode(self._bpe.decode_single_token_bytes(int(i))):
                yield text
        if text := utf8.decode(b"", final=True):
            yield text

    def to_meta(self) -> dict:
        return {"name": self.name}

    def hf_files(self, max_length: int) -> dict[str, str]:
        """vocab.json, merges.txt and tokenizer_config.json: the same BPE as transformers' GPT2Tokenizer files."""
        # token bytes -> rank, in rank order: the ids below <|endoftext|> are r50k's BPE tokens, each id its rank
        ranks = {self._bpe.decode_single_token_bytes(i): i for i in range(self.eot_token)}
        show = _byte_characters()

        def text(token: bytes) -> str:
            return "".join(show[b] for b in token)

        vocab = {text(token): rank for token, rank in ranks.items()} | {EOT_TEXT: self.eot_token}
        merges = [" ".join(map(text, _merged_pair(ranks, token, rank)))
                  for token, rank in ranks.items() if len(token) > 1]
        config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": max_length, "add_prefix_space": False,
                  "bos_token": EOT_TEXT, "eos_token": EOT_TEXT, "unk_token": EOT_TEXT}
        return {"vocab.json": json.dumps(vocab, ensure_ascii=False), "merges.txt": "\n".join(["#version: 0.2", *merges]),
                "tokenizer_config.json": json.dumps(config, indent=2)}


def _byte_characters() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte in its vocab.json and merges.txt (printable bytes stand for
    themselves, the others for characters from U+0100 on)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def _merged_pair(ranks: dict[bytes, int], token: bytes, rank: int) -> tuple[bytes, bytes]:
    """The two tokens whose merge makes `token`: BPE on its bytes with the merges ranked below it."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        pairs = [(ranks.get(a + b, rank), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        best, i = min(pairs)
        if best >= rank:
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts[0], parts[1]


Tokenizer = CharTokenizer | GPT2Tokenizer


def get_tokenizer(name: str, text: str | None = None, chars: str | None = None) -> Tokenizer:
    """The tokenizer called `name`; the char tokenizer takes `chars` as its vocabulary, or builds it from `text`."""
    if name == "char":
        if chars:
            return CharTokenizer(chars)
        if not text:
            raise UserError("the char tokenizer needs the corpus text to build its vocabulary; pass text=")
        return CharTokenizer.from_text(text)
    if name == "gpt2":
        return GPT2Tokenizer()
    raise UserError(f"unknown tokenizer {name!r}; use data.tokenizer=char or data.tokenizer=gpt2")


def tokenizer_from_meta(meta: dict) -> Tokenizer:
    """Rebuild the tokenizer that to_meta() described."""
    if meta.get("name") == "char":
        return CharTokenizer(meta["chars"])
    return get_tokenizer(meta.get("name", "?"))
