"""Data pipeline: sources, prepare (keys, no-op reruns, interruptions, HF corpora) and the batch loader."""
import fcntl
import importlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf
from tqdm import tqdm

from mlxgpt.config import DataConfig
from mlxgpt.data import TokenData, load_data, prepare
from mlxgpt.data.sources import pydoc_text
from mlxgpt.errors import UserError
from mlxgpt.hub import PROXY_VARIABLES
from mlxgpt.log import stderr_unless_failing
from mlxgpt.tokenizer import GPT2Tokenizer

prepare_module = importlib.import_module("mlxgpt.data.prepare")  # the module (mlxgpt.data.prepare is the function)
REAL_TOKENIZE, REAL_WRITE_JSON = prepare_module._tokenize_batch, prepare_module._write_json
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
EOT = 50256


@pytest.fixture(autouse=True)
def hf_cache(tmp_path, monkeypatch):
    """Keep the datasets library's cache inside the test's temporary directory."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def data_cfg(tmp_path: Path, cache: str = "cache", **overrides):
    return OmegaConf.structured(DataConfig(cache_dir=str(tmp_path / cache), **overrides))


def stream(data: TokenData, split: str) -> np.ndarray:
    """A split's whole token stream, read from its shard files in meta order."""
    shards = data.meta["splits"][split]["shards"]
    return np.concatenate([np.fromfile(data.directory / s["file"], dtype=np.uint16) for s in shards] or [np.empty(0, np.uint16)])


def documents(data: TokenData, split: str) -> list[str]:
    """The documents of a split: the stream cut after each EOT, decoded."""
    ids = stream(data, split)
    assert ids.size == 0 or ids[-1] == EOT
    return [data.tokenizer.decode(d[:-1]) for d in np.split(ids, np.flatnonzero(ids == EOT) + 1)[:-1]]


def make_docs(n: int) -> list[str]:
    paragraphs = [p for p in pydoc_text().split("\n\n") if p.strip()]
    return [f"Document {i}.\n{paragraphs[i % len(paragraphs)]}" for i in range(n)]


def file_state(directory: Path) -> dict:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(directory.iterdir()) if p.is_file()}


# ---- single texts: nanoGPT's counts, keys, reruns, errors ----

def test_shakespeare_char_counts_match_nanogpt(tmp_path, shared_dir):
    path = shared_dir / "data" / "tinyshakespeare" / "input.txt"
    data = load_data(data_cfg(tmp_path, name="shakespeare_char", source="url", path=str(path), sha256=SHAKESPEARE_SHA256))
    assert (data.num_tokens("train"), data.num_tokens("val"), data.vocab_size) == (1_003_854, 111_540, 65)
    assert data.meta["source"]["sha256"] == SHAKESPEARE_SHA256 and data.meta["dtype"] == "uint16"
    assert data.tokenizer.decode(stream(data, "train")[:14]) == "First Citizen:"


def test_shakespeare_gpt2_counts_match_nanogpt(tmp_path, shared_dir, tiktoken_cache):
    path = shared_dir / "data" / "tinyshakespeare" / "input.txt"
    data = load_data(data_cfg(tmp_path, name="shakespeare", source="url", tokenizer="gpt2", path=str(path), sha256=SHAKESPEARE_SHA256))
    assert (data.num_tokens("train"), data.num_tokens("val"), data.vocab_size) == (301_966, 36_059, 50257)


def test_a_text_tokenized_in_pieces_has_the_whole_texts_tokens(tmp_path, shared_dir, tiktoken_cache, monkeypatch):
    text = (shared_dir / "data" / "tinyshakespeare" / "input.txt").read_text() + "x  \n\n y\n\tz \n"
    (tmp_path / "input.txt").write_text(text)
    whole = np.array(GPT2Tokenizer().encode(text[:int(len(text) * 0.9)]), dtype=np.uint16)
    monkeypatch.setattr(prepare_module, "TEXT_PIECE_CHARS", 1000)  # ~1000 pieces, cut after newlines
    data = load_data(data_cfg(tmp_path, source="text", tokenizer="gpt2", path=str(tmp_path / "input.txt")))
    assert np.array_equal(stream(data, "train"), whole)


PEAK_MEMORY = """
import re, sys
from pathlib import Path
from omegaconf import OmegaConf
from mlxgpt.config import DataConfig
from mlxgpt.data import prepare
peak = lambda: int(re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text())[1]) * 1024
before = peak()  # (not ru_maxrss: a child process starts with its parent's)
prepare(OmegaConf.structured(DataConfig(source="text", tokenizer=sys.argv[1], path=sys.argv[2], cache_dir=sys.argv[3])))
print(peak() - before)
"""


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the peak memory from Linux's /proc")
@pytest.mark.parametrize("tokenizer", ["char", "gpt2"])
def test_a_large_text_is_prepared_in_memory_of_a_few_times_its_size(tmp_path, shared_dir, tiktoken_cache, tokenizer):
    """A Python list of its token ids took ~11x the text's size (a 1 GB text: 11 GB)."""
    text = tmp_path / "large.txt"
    text.write_text((shared_dir / "data" / "tinyshakespeare" / "input.txt").read_text() * 30)  # 33 MB
    grew = subprocess.run([sys.executable, "-c", PEAK_MEMORY, tokenizer, str(text), str(tmp_path / "cache")],
                          capture_output=True, text=True, timeout=300, check=True).stdout
    assert int(grew) < 5 * text.stat().st_size, grew


def test_pydoc_default_is_embedded_and_a_rerun_is_a_no_op(tmp_path):
    cfg = data_cfg(tmp_path)
    directory = prepare(cfg)
    before = file_state(directory)
    assert prepare(cfg) == directory and file_state(directory) == before
    data = TokenData(directory)
    text = pydoc_text()
    assert data.num_tokens("train") == int(len(text) * 0.9) and data.num_tokens("val") == len(text) - int(len(text) * 0.9)
    assert data.tokenizer.decode(stream(data, "val")) == text[int(len(text) * 0.9):]


def test_key_follows_content_and_split_rule(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("same text here\n" * 20)
    b.write_text("same text here\n" * 20)
    first = prepare(data_cfg(tmp_path, name="t", source="text", path=str(a)))
    assert prepare(data_cfg(tmp_path, name="t", source="text", path=str(b))) == first  # same content, same data
    assert prepare(data_cfg(tmp_path, name="t", source="text", path=str(a), val_fraction=0.2)) != first
    b.write_text("other text\n" * 20)
    assert prepare(data_cfg(tmp_path, name="t", source="text", path=str(b))) != first


def test_fixed_char_vocabulary_keeps_ids_and_refuses_characters_outside(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("abba cab\n" * 50)
    data = load_data(data_cfg(tmp_path, name="t", source="text", path=str(text), chars="\n abcdxyz"))
    assert data.tokenizer.chars == "\n abcdxyz" and data.tokenizer.vocab_size == 9
    assert stream(data, "train")[:4].tolist() == [2, 3, 3, 2]  # ids are positions in data.chars, not in the text's set
    own = prepare(data_cfg(tmp_path, name="t", source="text", path=str(text)))
    assert own != data.directory  # the vocabulary is part of the key
    with pytest.raises(UserError, match=r"2 characters outside the fixed 4-character vocabulary.*'\\n '"):
        prepare(data_cfg(tmp_path, name="t", source="text", path=str(text), chars="abcd"))


def test_text_directory_and_glob(tmp_path):
    root = tmp_path / "books"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("alpha\n")
    (root / "b.txt").write_text("beta")  # no final newline: one is added between files
    (root / "sub" / "c.md").write_text("gamma\n")
    (root / ".hidden").write_text("never\n")
    whole = TokenData(prepare(data_cfg(tmp_path, name="books", source="text", path=str(root), val_fraction=0.5)))
    assert whole.tokenizer.decode(np.concatenate([stream(whole, "train"), stream(whole, "val")])) == "alpha\nbeta\ngamma\n"
    top = TokenData(prepare(data_cfg(tmp_path, name="books", source="text", path=str(root / "*.txt"), val_fraction=0.5)))
    assert top.tokenizer.decode(np.concatenate([stream(top, "train"), stream(top, "val")])) == "alpha\nbeta\n"


def test_windows_text_files_lose_byte_order_mark_and_carriage_returns(tmp_path):
    root = tmp_path / "notes"
    root.mkdir()
    (root / "a.txt").write_bytes(b"\xef\xbb\xbfalpha\r\nbeta\r\n")
    (root / "b.txt").write_bytes(b"\xef\xbb\xbfgamma\r\n")
    data = TokenData(prepare(data_cfg(tmp_path, name="notes", source="text", path=str(root), val_fraction=0.5)))
    assert data.tokenizer.decode(np.concatenate([stream(data, "train"), stream(data, "val")])) == "alpha\nbeta\ngamma\n"


def test_text_directory_and_glob_skip_hidden_folders(tmp_path):
    root = tmp_path / ".local" / "repo"  # hidden above the given directory: still read
    (root / ".git" / "objects").mkdir(parents=True)
    (root / "a.txt").write_text("alpha\n")
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (root / ".git" / "objects" / "x.txt").write_text("never\n")
    for path in (root, root / "**", root / "**" / "*.txt"):
        data = TokenData(prepare(data_cfg(tmp_path, name="repo", source="text", path=str(path), val_fraction=0.5)))
        assert data.tokenizer.decode(np.concatenate([stream(data, "train"), stream(data, "val")])) == "alpha\n", path


def test_missing_empty_and_binary_text_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="matches no file"):
        prepare(data_cfg(tmp_path, source="text", path=str(tmp_path / "nope.txt")))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(UserError, match="only empty files"):
        prepare(data_cfg(tmp_path, source="text", path=str(tmp_path / "empty.txt")))
    (tmp_path / "blob.txt").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(UserError, match="not UTF-8"):
        prepare(data_cfg(tmp_path, source="text", path=str(tmp_path / "blob.txt")))


def test_url_download_verifies_checksum_and_renames_atomically(tmp_path):
    import hashlib

    remote = tmp_path / "remote" / "input.txt"
    remote.parent.mkdir()
    remote.write_text("to be or not to be\n" * 50)
    good = hashlib.sha256(remote.read_bytes()).hexdigest()
    downloads = tmp_path / "cache" / "downloads"
    with pytest.raises(UserError, match="expected data.sha256=00"):
        prepare(data_cfg(tmp_path, source="url", url=remote.as_uri(), sha256="00" * 32))
    assert not downloads.exists() or not list(downloads.iterdir())  # nothing half-downloaded or unverified left
    data = load_data(data_cfg(tmp_path, name="u", source="url", url=remote.as_uri(), sha256=good))
    assert [p.read_bytes() for p in downloads.iterdir()] == [remote.read_bytes()]
    assert next(downloads.iterdir()).name.endswith("-input.txt")
    assert data.meta["source"] == {"source": "url", "sha256": good}
    with pytest.raises(UserError, match="the downloaded copy .*-input.txt has sha256 .*; delete it to download it again"):
        prepare(data_cfg(tmp_path, source="url", url=remote.as_uri(), sha256="11" * 32))


def test_local_copy_with_wrong_checksum_is_a_user_error(tmp_path):
    copy = tmp_path / "input.txt"
    copy.write_text("not shakespeare\n")
    with pytest.raises(UserError, match=f"expected data.sha256={SHAKESPEARE_SHA256}") as error:
        prepare(data_cfg(tmp_path, name="shakespeare_char", source="url", path=str(copy), sha256=SHAKESPEARE_SHA256))
    message = str(error.value)
    assert f"data.path={copy} is not the shakespeare_char file" in message and "\n" not in message
    assert f"data=text data.path={copy}" in message and "data.sha256=null" in message and "delete" not in message
    data = load_data(data_cfg(tmp_path, name="shakespeare_char", source="url", path=str(copy), sha256=None))  # the skip it names
    assert data.tokenizer.decode(np.concatenate([stream(data, "train"), stream(data, "val")])) == "not shakespeare\n"
    with pytest.raises(UserError, match="does not exist"):
        prepare(data_cfg(tmp_path, source="url", path=str(tmp_path / "missing.txt")))


def test_a_failed_prepare_leaves_no_directory_and_succeeds_once_the_input_is_fixed(tmp_path, tiktoken_cache, monkeypatch):
    prepared = tmp_path / "cache" / "prepared"
    pq.write_table(pa.table({"content": make_docs(20)}), tmp_path / "docs.parquet")
    hf = data_cfg(tmp_path, name="pq", source="hf", tokenizer="gpt2", hf_path="parquet",
                  data_files=str(tmp_path / "docs.parquet"), num_proc=1)
    with pytest.raises(UserError, match="no column 'text'"):
        prepare(hf)
    assert list(prepared.iterdir()) == []

    def interrupted(*args):
        raise KeyboardInterrupt

    (tmp_path / "t.txt").write_text("abba cab\n" * 50)
    monkeypatch.setattr(prepare_module, "get_tokenizer", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare(data_cfg(tmp_path, name="t", source="text", path=str(tmp_path / "t.txt")))
    assert list(prepared.iterdir()) == []
    monkeypatch.undo()
    pq.write_table(pa.table({"text": make_docs(20)}), tmp_path / "docs.parquet")
    assert len(documents(load_data(hf), "train")) > 0 and len(list(prepared.iterdir())) == 1


def test_a_prepare_waiting_for_the_lock_of_a_failed_one_locks_the_new_directory(tmp_path, monkeypatch):
    """The failed prepare removes the directory and the lock file the waiter holds open: the waiter locks anew."""
    (tmp_path / "t.txt").write_text("abba cab\n" * 50)
    cfg = data_cfg(tmp_path, name="t", source="text", path=str(tmp_path / "t.txt"))
    real_flock, real_tokenize, waiting, locks, calls = fcntl.flock, prepare_module._tokenize_text, threading.Event(), [], []

    def flock(file, operation):
        locks.append(file.name)
        if len(locks) == 2:  # the second prepare, about to wait for the first
            waiting.set()
        real_flock(file, operation)

    def tokenize_fails_first(*args):
        calls.append(args)
        if len(calls) == 1:
            assert waiting.wait(30)
            raise Interrupted
        return real_tokenize(*args)

    monkeypatch.setattr(fcntl, "flock", flock)
    monkeypatch.setattr(prepare_module, "_tokenize_text", tokenize_fails_first)
    results = []

    def run():
        try:
            results.append(prepare(cfg))
        except Interrupted as e:
            results.append(e)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    failed, prepared = sorted(results, key=lambda r: isinstance(r, Path))
    assert isinstance(failed, Interrupted) and TokenData(prepared).num_tokens("train") > 0
    assert len(locks) == 3  # the waiter found its lock file removed and locked the new one


def test_unwritable_data_dir_is_a_user_error_naming_the_setting(tmp_path):
    (tmp_path / "t.txt").write_text("some text\n" * 20)
    (tmp_path / "file").write_text("")  # a data dir below a file: unwritable even for root
    for source in (dict(source="text", path=str(tmp_path / "t.txt")), dict(source="url", url=(tmp_path / "t.txt").as_uri())):
        with pytest.raises(UserError, match=r"^cannot write to .*file/cache.* \(.*Not a directory.*\); .*paths.data_dir="):
            prepare(data_cfg(tmp_path, cache="file/cache", **source))


# ---- the loader ----

def test_same_key_same_batch_and_windows_are_real_slices(tmp_path):
    data = load_data(data_cfg(tmp_path))
    x, y = data.get_batch("train", 8, 32, (1337, 5, 0, 0))
    again = data.get_batch("train", 8, 32, (1337, 5, 0, 0))
    other = data.get_batch("train", 8, 32, (1337, 5, 1, 0))
    assert x.dtype == np.int32 and x.shape == y.shape == (8, 32)
    assert np.array_equal(x, again[0]) and np.array_equal(y, again[1])
    assert not np.array_equal(x, other[0])
    assert np.array_equal(x[:, 1:], y[:, :-1])
    windows = np.lib.stride_tricks.sliding_window_view(stream(data, "train"), 33)
    for row_x, row_y in zip(x, y):
        match = windows[(windows[:, :32] == row_x).all(axis=1)]
        assert len(match) and any(np.array_equal(m[1:], row_y) for m in match)


def test_windows_cross_shard_boundaries_as_one_stream(tmp_path):
    (tmp_path / "t.txt").write_text("".join(chr(ord("a") + i % 26) + ("\n" if i % 11 == 0 else "") for i in range(600)))
    data = load_data(data_cfg(tmp_path, name="t", source="text", path=str(tmp_path / "t.txt"), shard_tokens=7))
    train = data.meta["splits"]["train"]
    assert len(train["shards"]) == -(-train["tokens"] // 7) and all(s["tokens"] == 7 for s in train["shards"][:-1])
    tokens = stream(data, "train")
    for key in range(30):
        x, y = data.get_batch("train", 4, 16, (key,))
        starts = np.random.default_rng((key,)).integers(0, len(tokens) - 16, size=4)
        assert np.array_equal(x, np.stack([tokens[s:s + 16] for s in starts]))
        assert np.array_equal(y, np.stack([tokens[s + 1:s + 17] for s in starts]))


def test_split_shorter_than_a_block_names_split_and_fix(tmp_path):
    (tmp_path / "t.txt").write_text("abcdefghij" * 9 + "abcdefghi\n")  # 100 characters: 90 train, 10 val
    data = load_data(data_cfg(tmp_path, name="t", source="text", path=str(tmp_path / "t.txt")))
    with pytest.raises(UserError, match=r"the val split .* 10 tokens.*lower trainer.block_size, or raise data.val_fraction \(now 0.1\)$"):
        data.get_batch("val", 2, 10, (0,))
    with pytest.raises(UserError, match=r"the train split .* 90 tokens.*lower trainer.block_size, or use more text$"):
        data.get_batch("train", 2, 90, (0,))
    assert data.get_batch("val", 2, 9, (0,))[0].shape == (2, 9)


def test_missing_or_damaged_prepared_data_is_refused_and_prepared_again(tmp_path):
    with pytest.raises(UserError, match="holds no prepared data"):
        TokenData(tmp_path / "nothing")
    cfg = data_cfg(tmp_path)
    directory = prepare(cfg)
    shard = directory / "train_000000.bin"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(UserError, match="delete .* and prepare again"):
        TokenData(directory)
    assert prepare(cfg) == directory and TokenData(directory).num_tokens("train") > 1000


def test_a_shard_overwritten_with_ids_outside_the_vocabulary_is_a_one_line_error(tmp_path):
    (tmp_path / "t.txt").write_text("abcdefghij\n" * 100)
    data = load_data(data_cfg(tmp_path, name="t", source="text", path=str(tmp_path / "t.txt")))
    shard = data.directory / "train_000000.bin"
    shard.write_bytes(b"\xff" * shard.stat().st_size)  # same size: only the ids tell (the model would read past wte)
    with pytest.raises(UserError, match=r"^[^\n]*token id 65535, outside its 11-token vocabulary; delete .* and prepare again$"):
        TokenData(data.directory).get_batch("train", 2, 8, (0,))


# ---- Hugging Face corpora (local fixtures, same load_dataset code path as the hub) ----

def test_hf_parquet_documents_end_with_eot_and_split_as_nanogpt(tmp_path, tiktoken_cache):
    docs = make_docs(300)
    pq.write_table(pa.table({"text": docs, "id": list(range(300))}), tmp_path / "docs.parquet")
    cfg = data_cfg(tmp_path, name="pq", source="hf", tokenizer="gpt2", hf_path="parquet",
                   data_files=str(tmp_path / "docs.parquet"), val_size=0.02, num_proc=1, shard_tokens=5000)
    data = load_data(cfg)
    expected = datasets.Dataset.from_dict({"text": docs}).train_test_split(test_size=0.02, seed=2357)
    assert documents(data, "val") == expected["test"]["text"]  # nanoGPT's split and order
    assert documents(data, "train") == expected["train"]["text"]
    splits = data.meta["splits"]
    assert (splits["val"]["documents"], splits["train"]["documents"]) == (6, 294) and len(splits["train"]["shards"]) >= 3
    assert data.meta["tokenizer"] == {"name": "gpt2"} and data.vocab_size == 50257


def test_hf_jsonl_stream_splits_by_hash_deterministically(tmp_path, tiktoken_cache):
    docs = make_docs(400)
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    cfg = dict(name="js", source="hf", tokenizer="gpt2", hf_path="json", data_files=[str(tmp_path / "docs.jsonl")],
               text_column="body", streaming=True, val_size=0.1, num_proc=1, shard_tokens=10_000)
    data = load_data(data_cfg(tmp_path, **cfg))
    train, val = documents(data, "train"), documents(data, "val")
    assert sorted(train + val) == sorted(docs) and 20 <= len(val) <= 60
    assert train == [d for d in docs if d in set(train)]  # stream order kept
    again = load_data(data_cfg(tmp_path, cache="other", **cfg))
    assert documents(again, "val") == val


def test_hf_saved_dataset_dir_and_max_documents(tmp_path, tiktoken_cache):
    docs = make_docs(120)
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": docs})}).save_to_disk(str(tmp_path / "saved"))
    data = load_data(data_cfg(tmp_path, name="saved", source="hf", tokenizer="gpt2", path=str(tmp_path / "saved"),
                              val_size=0.05, num_proc=1, max_documents=100))
    got = documents(data, "train") + documents(data, "val")
    assert len(got) == 100 and sorted(got) == sorted(docs[:100])
    assert data.meta["splits"]["val"]["documents"] == 5
    with pytest.raises(UserError, match=r"^data.path=.*saved has no split 'validation' \(splits: \['train'\]\); set data.hf_split$"):
        prepare(data_cfg(tmp_path, source="hf", tokenizer="gpt2", path=str(tmp_path / "saved"), hf_split="validation"))


def test_hf_bad_settings_are_user_errors(tmp_path, tiktoken_cache):
    pq.write_table(pa.table({"text": make_docs(20)}), tmp_path / "docs.parquet")
    base = dict(source="hf", hf_path="parquet", data_files=str(tmp_path / "docs.parquet"), num_proc=1)
    with pytest.raises(UserError, match="no column 'content'"):
        prepare(data_cfg(tmp_path, tokenizer="gpt2", text_column="content", **base))
    with pytest.raises(UserError, match="use data.tokenizer=gpt2"):
        prepare(data_cfg(tmp_path, tokenizer="char", **base))
    with pytest.raises(UserError, match="cannot load the dataset"):
        prepare(data_cfg(tmp_path, tokenizer="gpt2", **{**base, "data_files": str(tmp_path / "missing.parquet")}))


def test_local_hf_files_that_do_not_load_are_one_line_errors_naming_the_cause_and_the_local_fix(tmp_path, tiktoken_cache):
    folder = tmp_path / "corpus"
    folder.mkdir()
    pq.write_table(pa.table({"text": make_docs(20)}), folder / "a.parquet")
    pq.write_table(pa.table({"body": make_docs(20)}), folder / "b.parquet")
    base = dict(source="hf", tokenizer="gpt2", num_proc=1)
    cases = [  # (settings, what the error must say)
        (dict(path=str(folder)), r"^data.path=\S+ is not a directory that datasets' save_to_disk wrote \(.+\); for data "
                                 r"files use data.hf_path=parquet\|json\|csv\|text data.data_files='<files>'$"),
        (dict(hf_path=str(folder / "a.parquet")), r"^data.hf_path=\S+a.parquet is a file, not a dataset: name its format "
                                                  r"and the file, data.hf_path=parquet\|json\|csv\|text data.data_files="),
    ]
    for workers in (1, 2):  # with 2, the cause comes from a worker process
        cases.append((dict(hf_path="parquet", data_files=str(folder / "*.parquet"), num_proc=workers),
                      r"^cannot load the dataset .*CastError: Couldn't cast .* because column names don't match"))
    for settings, message in cases:
        with pytest.raises(UserError, match=message) as error:
            prepare(data_cfg(tmp_path, **{**base, **settings}))
        assert "network" not in str(error.value) and "\n" not in str(error.value)


def test_hf_text_column_of_numbers_is_a_user_error_naming_the_string_columns(tmp_path, tiktoken_cache):
    pq.write_table(pa.table({"id": list(range(20)), "body": make_docs(20)}), tmp_path / "docs.parquet")
    for streaming in (False, True):
        cfg = data_cfg(tmp_path, source="hf", tokenizer="gpt2", hf_path="parquet", data_files=str(tmp_path / "docs.parquet"),
                       text_column="id", streaming=streaming, num_proc=1)
        with pytest.raises(UserError, match=r"data.text_column=id holds int64 values, not text; .*\['body'\]"):
            prepare(cfg)


def test_hf_path_to_a_local_folder_is_prepared_again_when_its_files_change(tmp_path, tiktoken_cache):
    folder = tmp_path / "corpus"
    folder.mkdir()
    pq.write_table(pa.table({"text": make_docs(40)}), folder / "docs.parquet")
    cfg = data_cfg(tmp_path, name="local", source="hf", tokenizer="gpt2", hf_path=str(folder), val_size=0.1, num_proc=1)
    first = load_data(cfg)
    pq.write_table(pa.table({"text": ["a new document"] * 10}), folder / "docs.parquet")
    second = load_data(cfg)
    assert second.directory != first.directory and documents(second, "train") == ["a new document"] * 9


def test_worker_processes_give_the_same_tokens_as_one_process(tmp_path, tiktoken_cache):
    pq.write_table(pa.table({"text": make_docs(700)}), tmp_path / "docs.parquet")
    cfg = dict(name="pq", source="hf", tokenizer="gpt2", hf_path="parquet", data_files=str(tmp_path / "docs.parquet"),
               val_size=0.01, shard_tokens=20_000)
    one = load_data(data_cfg(tmp_path, cache="one", num_proc=1, **cfg))
    two = load_data(data_cfg(tmp_path, cache="two", num_proc=2, **cfg))
    assert one.meta == two.meta
    assert all(np.array_equal(stream(one, s), stream(two, s)) for s in ("train", "val"))


def interrupted_corpus(tmp_path: Path) -> dict:
    pq.write_table(pa.table({"text": make_docs(2000)}), tmp_path / "docs.parquet")
    return dict(name="pq", source="hf", tokenizer="gpt2", hf_path="parquet", data_files=str(tmp_path / "docs.parquet"),
                val_size=0.01, num_proc=1, shard_tokens=3000)


class Interrupted(Exception):
    """Stands for any failure in the middle of a prepare (Ctrl-C, out of disk, a bad document)."""


def counting_tokenizer(monkeypatch) -> list:
    """Record how many documents each call of the real tokenize step gets."""
    calls = []

    def tokenize(texts, split):
        calls.append(len(texts))
        return REAL_TOKENIZE(texts, split)

    monkeypatch.setattr(prepare_module, "_tokenize_batch", tokenize)
    return calls


def interrupt(monkeypatch, where: str) -> None:
    """Fail at the 4th tokenize call, or at the 3rd checkpoint (after its shards got their final names)."""
    if where == "tokenize":
        calls = []

        def tokenize(texts, split):
            if len(calls) == 3:
                raise Interrupted
            calls.append(len(texts))
            return REAL_TOKENIZE(texts, split)

        monkeypatch.setattr(prepare_module, "_tokenize_batch", tokenize)
        return
    real_write, checkpoints = prepare_module._write_json, []

    def write_json(path, data):
        if path.name == "progress.json" and len(checkpoints) == 2:
            raise Interrupted
        checkpoints.append(path.name)
        real_write(path, data)

    monkeypatch.setattr(prepare_module, "_write_json", write_json)


def assert_resumes_to_clean_output(tmp_path, monkeypatch, cfg: dict, total_documents: int) -> None:
    directory = next((tmp_path / "cache" / "prepared").iterdir())
    assert not (directory / "meta.json").exists()
    with pytest.raises(UserError):
        TokenData(directory)
    cursor = json.loads((directory / "progress.json").read_text())["cursor"]
    assert 0 < cursor < total_documents
    monkeypatch.setattr(prepare_module, "_write_json", REAL_WRITE_JSON)
    calls = counting_tokenizer(monkeypatch)
    resumed = TokenData(prepare(data_cfg(tmp_path, **cfg)))
    assert sum(calls) == total_documents - cursor  # continued from the last checkpoint
    clean = TokenData(prepare(data_cfg(tmp_path, cache="clean", **cfg)))
    assert resumed.directory == directory and resumed.meta == clean.meta
    assert {p.name for p in directory.glob("*.bin")} == {p.name for p in clean.directory.glob("*.bin")}
    assert all((directory / p.name).read_bytes() == p.read_bytes() for p in clean.directory.glob("*.bin"))
    assert not list(directory.glob(".*.part")) and not (directory / "progress.json").exists()


@pytest.mark.parametrize("where", ["tokenize", "checkpoint"])
def test_interrupted_prepare_leaves_nothing_accepted_and_resumes(tmp_path, tiktoken_cache, monkeypatch, where):
    cfg = interrupted_corpus(tmp_path)
    interrupt(monkeypatch, where)
    with pytest.raises(Interrupted):
        prepare(data_cfg(tmp_path, **cfg))
    if where == "checkpoint":  # shards completed after the last checkpoint exist under final names
        directory = next((tmp_path / "cache" / "prepared").iterdir())
        progress = json.loads((directory / "progress.json").read_text())
        listed = {s["file"] for w in progress["writers"].values() for s in w["shards"]}
        assert {p.name for p in directory.glob("*.bin")} - listed
    assert_resumes_to_clean_output(tmp_path, monkeypatch, cfg, total_documents=2000)


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_killed_prepare_process_resumes_to_identical_output(tmp_path, tiktoken_cache, monkeypatch):
    cfg = interrupted_corpus(tmp_path)
    script = f"""
import importlib, json, os, signal
import mlxgpt, datasets
from omegaconf import OmegaConf
datasets.config.HF_DATASETS_CACHE = {str(tmp_path / "hf_cache")!r}
module = importlib.import_module("mlxgpt.data.prepare")
real_write, checkpoints = module._write_json, []
def killed_at_third_checkpoint(path, data):
    if path.name == "progress.json" and len(checkpoints) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    checkpoints.append(path.name)
    real_write(path, data)
module._write_json = killed_at_third_checkpoint
module.prepare(OmegaConf.create(json.loads({json.dumps(OmegaConf.to_container(data_cfg(tmp_path, **cfg)))!r})))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]
    assert_resumes_to_clean_output(tmp_path, monkeypatch, cfg, total_documents=2000)


@pytest.mark.slow
def test_bench_prepare_runs_and_matches_nanogpt_tokens(tiktoken_cache):
    out = subprocess.run([sys.executable, "-m", "mlxgpt.bench_prepare", "--mb", "0.3", "--num-proc", "1"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| mlxgpt prepare |" in out.stdout and "are identical to the nanoGPT-style output" in out.stdout


@pytest.mark.slow
@pytest.mark.parametrize("args", [["--mb", "0.01"], ["--num-proc", "0"]])
def test_bench_prepare_user_errors_are_one_line(tmp_path, args):
    """Offline without the GPT-2 ranks (was a ConnectionError traceback from a child), or a size below 1."""
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(tmp_path), "HTTPS_PROXY": "http://127.0.0.1:9", "NO_PROXY": ""}
    out = subprocess.run([sys.executable, "-m", "mlxgpt.bench_prepare", *args], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.startswith("error: ") and len(out.stderr.splitlines()) == 1
    assert ("TIKTOKEN_CACHE_DIR" if args[0] == "--mb" else "--num-proc 0: must be > 0") in out.stderr


@pytest.mark.slow
def test_openwebtext_offline_is_one_line_naming_the_local_copy_options(tmp_path, tiktoken_cache):
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "HF_ENDPOINT": "https://hub.invalid", "MLXGPT_DATA_DIR": str(tmp_path / "data")}
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", *PROXY_VARIABLES):
        env.pop(name, None)  # no network: the hub's host does not resolve, and the load fails at once
    proc = subprocess.run([sys.executable, str(root / "train.py"), "data=openwebtext", "model=nano", "logger=none",
                           f"paths.log_dir={tmp_path}/logs"], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("error: cannot load the dataset data.hf_path=Skylion007/openwebtext")
    assert "data.hf_path=parquet data.data_files='<dir>/*.parquet'" in proc.stderr and "Retrying" not in proc.stderr
    assert "hub.invalid does not resolve (no network?)" in proc.stdout


@pytest.mark.slow
def test_a_local_dataset_that_does_not_load_shows_only_the_one_line_error_and_one_that_loads_its_progress(
        tmp_path, tiktoken_cache):
    """datasets' own messages (a worker's too), warnings and progress bars of a failed load are not on the console."""
    pq.write_table(pa.table({"text": make_docs(20)}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"body": make_docs(20)}), tmp_path / "b.parquet")  # columns that do not match a.parquet
    (tmp_path / "bad.csv").write_text('text\n"a quote never closed\n')
    env = {**os.environ, "MLXGPT_DATA_DIR": str(tmp_path / "data"), "HF_DATASETS_CACHE": str(tmp_path / "hf_cache")}

    def train(*data: str, returncode: int) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "train.py"), "data=hf",
                               *data, "model=nano", "logger=none", "trainer.max_iters=1", "trainer.eval_iters=1",
                               "callbacks.sample.max_new_tokens=1", f"paths.log_dir={tmp_path}/logs"],
                              capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
        assert proc.returncode == returncode, proc.stderr[-3000:]
        return proc

    for data in (["data.hf_path=parquet", f"data.data_files={tmp_path}/*.parquet", "data.num_proc=2"],
                 ["data.hf_path=csv", f"data.data_files={tmp_path}/bad.csv"]):
        proc = train(*data, returncode=2)
        assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: cannot load the dataset"), proc.stderr
    loaded = train("data.hf_path=parquet", f"data.data_files={tmp_path}/a.parquet", "data.val_size=0.3", returncode=0)
    assert "Generating train split: 20 examples" in loaded.stderr  # its progress bar, as it ended


def test_what_a_load_writes_to_stderr_shows_live_once_it_has_taken_its_delay_and_not_if_it_fails_sooner(monkeypatch):
    console = io.StringIO()
    monkeypatch.setattr(sys, "stderr", console)
    with stderr_unless_failing(delay_s=0.3):
        with tqdm(total=3, desc="long load", mininterval=0) as bar:  # writes to sys.stderr
            bar.update(1)
            assert console.getvalue() == ""
            time.sleep(0.3)
            bar.update(1)
            assert "long load:  67%" in console.getvalue()  # shown as it comes, before the load ends
    with stderr_unless_failing(delay_s=60):
        print("short load", file=sys.stderr)
    assert console.getvalue().endswith("short load\n")  # shown when it ends
    with pytest.raises(ValueError), stderr_unless_failing(delay_s=60):
        print("a failed load's noise", file=sys.stderr)
        raise ValueError("corrupt file")
    assert "noise" not in console.getvalue() and sys.stderr is console
