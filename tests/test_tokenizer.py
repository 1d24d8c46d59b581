"""Tokenizers: char vocabulary and errors, GPT-2 BPE ids (real tiktoken, offline cache), meta round trips."""
import os
import subprocess
import sys

import numpy as np
import pytest

from mlxgpt.errors import UserError
from mlxgpt.tokenizer import CharTokenizer, GPT2Tokenizer, get_tokenizer, tokenizer_from_meta


def test_char_vocabulary_is_the_sorted_set_of_corpus_characters():
    tok = get_tokenizer("char", "hello world")
    assert tok.chars == " dehlorw" and tok.vocab_size == 8 and tok.eot_token is None
    assert tok.encode("hold") == [3, 5, 4, 1]
    assert tok.decode(tok.encode("low world")) == "low world"
    assert tok.decode(np.array([3, 5])) == "ho"


def test_char_unknown_character_names_it_and_the_fix():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(UserError, match=r"character 'z' is not in .* 3-character vocabulary.*tokenizer=gpt2"):
        tok.encode("abz")


def test_char_meta_round_trip_is_json_and_identical():
    tok = CharTokenizer.from_text("\nZa é")
    again = tokenizer_from_meta(tok.to_meta())
    assert again.chars == tok.chars and again.encode("é a") == tok.encode("é a")


def test_bad_names_and_missing_text_are_user_errors():
    with pytest.raises(UserError, match="unknown tokenizer 'bpe'"):
        get_tokenizer("bpe")
    with pytest.raises(UserError, match="needs the corpus text"):
        get_tokenizer("char")


def test_gpt2_ids_match_gpt2(tiktoken_cache):
    tok = get_tokenizer("gpt2")
    assert (tok.vocab_size, tok.eot_token) == (50257, 50256)
    assert tok.encode("hello world") == [31373, 995]
    assert tok.decode([31373, 995]) == "hello world"
    assert isinstance(tokenizer_from_meta(tok.to_meta()), GPT2Tokenizer)


def test_gpt2_decode_stream_joins_to_decode_and_never_splits_a_character(tiktoken_cache):
    tok = GPT2Tokenizer()
    text = "naïve café, 日本語 and 🙂 emoji"
    ids = tok.encode(text)
    assert "\ufffd" in "".join(tok.decode([i]) for i in ids)  # some characters span tokens
    pieces = list(tok.decode_stream(iter(ids)))
    assert "".join(pieces) == text and "\ufffd" not in "".join(pieces)
    drawn = np.random.default_rng(0).integers(0, tok.vocab_size, 2000).tolist()  # any ids: invalid UTF-8 replaced
    assert "".join(tok.decode_stream(drawn)) == tok.decode(drawn)
    chars = CharTokenizer.from_text("ab c")
    assert list(chars.decode_stream([1, 0, 2])) == ["a", " ", "b"]


@pytest.mark.parametrize("text", ["hello world", "a <|endoftext|> b", "lone \ud800 surrogate", ""])
def test_gpt2_encode_array_equals_encode_ordinary(tiktoken_cache, text):
    tok = GPT2Tokenizer()
    ids = tok.encode_array(text)
    assert ids.dtype == np.uint16 and ids.tolist() == tok.encode(text)
    assert tok.eot_token not in ids  # special-token text is ordinary text


def test_gpt2_without_cached_ranks_offline_says_how_to_seed_the_cache(tmp_path):
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(tmp_path), "HTTPS_PROXY": "http://127.0.0.1:9", "NO_PROXY": ""}
    code = "import mlxgpt\nfrom mlxgpt.tokenizer import GPT2Tokenizer\nGPT2Tokenizer()"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "UserError: cannot load the GPT-2 BPE ranks" in out.stderr and "TIKTOKEN_CACHE_DIR" in out.stderr
