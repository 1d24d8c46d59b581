"""Tokenize a corpus once into uint16 shard files plus meta.json, keyed by everything that decides the tokens.

Layout of <cache_dir>/prepared/<name>-<key>/: train_000000.bin ..., val_000000.bin ..., meta.json (written
last). A shard is written under a hidden temporary name and renamed when complete; a Hugging Face corpus
also keeps progress.json, so that a rerun after an interruption continues from the last completed shard; a
prepare that fails (or is interrupted) before that removes its directory.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import math
import multiprocessing
import os
import re
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mlxgpt.data.loader import FORMAT, META_FILE, read_meta
from mlxgpt.data.sources import hf_identity, load_documents, read_text, unwritable
from mlxgpt.errors import DISK_ERRORS, UserError
from mlxgpt.tokenizer import get_tokenizer

PROGRESS_FILE = "progress.json"
LOCK_FILE = ".lock"
DOCS_PER_TASK = 256  # documents per tokenizer task: big enough to amortize inter-process transfer
TEXT_PIECE_CHARS = 1 << 22  # characters of a single text tokenized at a time
PIECE_CUT = re.compile(r"(?<=\S)\n(?=\S)")  # a lone newline: a cut after it keeps the text's GPT-2 tokens
SPLITS = ("train", "val")
WRITE_ERRORS = DISK_ERRORS | {errno.ENOTDIR, errno.ENOENT}  # the data dir's path, below a file or gone


def prepare(cfg) -> Path:
    """Prepare cfg's corpus unless already done; returns its directory."""
    text, spec = _source_and_spec(cfg)
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    directory = Path(cfg.cache_dir).expanduser() / "prepared" / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', cfg.name)}-{key}"
    if _is_prepared(directory):
        return directory
    try:
        while not _prepare_locked(cfg, directory, key, spec, text):
            pass  # a failed prepare removed the directory while this one waited for its lock: lock the new one
    except OSError as e:
        if e.errno not in WRITE_ERRORS:  # e.g. a stream's network error: not the data dir's fault
            raise
        raise unwritable(directory, e) from None
    return directory


def _prepare_locked(cfg, directory: Path, key: str, spec: dict, text: str | None) -> bool:
    """Prepare under directory's lock (another process, e.g. another rank, may be preparing the same data); False
    when the lock file was removed before this process got it."""
    directory.mkdir(parents=True, exist_ok=True)
    try:
        lock = open(directory / LOCK_FILE, "a")
    except FileNotFoundError:  # the directory was removed since mkdir
        return False
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _is_current(lock, directory / LOCK_FILE):
            return False
        if _is_prepared(directory):
            return True
        try:
            _prepare_into(cfg, directory, key, spec, text)
        except BaseException:  # an error or an interruption: keep only what a rerun resumes from
            if not (directory / PROGRESS_FILE).exists():
                _remove(directory)
            raise
    return True


def _is_current(lock, path: Path) -> bool:
    """Whether the open lock file is still the one at path (a failed prepare may have removed it)."""
    try:
        return os.path.samestat(os.fstat(lock.fileno()), path.stat())
    except FileNotFoundError:
        return False


def _remove(directory: Path) -> None:
    """Remove a directory this process holds the lock of: its files, the lock file last, then the directory."""
    for path in directory.iterdir():
        if path.name != LOCK_FILE:
            path.unlink()
    (directory / LOCK_FILE).unlink()
    try:
        directory.rmdir()
    except OSError:  # a process that came since made a new lock file: the directory is its now
        pass


def _prepare_into(cfg, directory: Path, key: str, spec: dict, text: str | None) -> None:
    """Tokenize into directory's shards, then write meta.json (last: it marks the directory complete)."""
    (directory / META_FILE).unlink(missing_ok=True)
    if text is None:
        tokenizer, splits = _tokenize_documents(cfg, directory, key)
    else:
        tokenizer, splits = _tokenize_text(cfg, directory, text)
    meta = {"format": FORMAT, "name": cfg.name, "key": key, "source": spec["source"], "split": spec["split"],
            "tokenizer": tokenizer.to_meta(), "vocab_size": tokenizer.vocab_size, "dtype": "uint16", "splits": splits}
    _write_json(directory / META_FILE, meta)
    (directory / PROGRESS_FILE).unlink(missing_ok=True)


def _source_and_spec(cfg) -> tuple[str | None, dict]:
    """The text of a single-text corpus (None for HF), and everything that decides the prepared tokens."""
    if cfg.source == "hf":
        text, source = None, {**hf_identity(cfg), "max_documents": cfg.max_documents}
        split = {"val_size": cfg.val_size, "seed": cfg.split_seed, "by": "hash" if cfg.streaming else "train_test_split"}
    else:
        text, sha256 = read_text(cfg)
        source, split = {"source": cfg.source, "sha256": sha256}, {"val_fraction": cfg.val_fraction}
    tokenizer = cfg.tokenizer if cfg.chars is None else {"name": cfg.tokenizer, "chars": cfg.chars}
    return text, {"format": FORMAT, "source": source, "split": split, "tokenizer": tokenizer}


class ShardWriter:
    """Appends one split's tokens to shards of shard_tokens tokens; a shard gets its final name when full."""

    def __init__(self, directory: Path, split: str, shard_tokens: int, state: dict | None = None):
        self.directory, self.split, self.shard_tokens = directory, split, shard_tokens
        self.shards = list(state["shards"]) if state else []  # completed: [{"file", "tokens"}]
        self.partial = state["partial"] if state else 0  # tokens in the open temporary shard
        temp, final = self._paths()
        if self.partial and _size(temp) < 2 * self.partial:
            os.replace(final, temp)  # it was completed after the last checkpoint: continue it from there
        self._file = open(temp, "r+b" if self.partial else "wb")
        self._file.truncate(2 * self.partial)
        self._file.seek(0, os.SEEK_END)

    def write(self, tokens: np.ndarray) -> bool:
        """Append uint16 tokens; True when this completed a shard."""
        completed = False
        while tokens.size:
            take = max(min(tokens.size, self.shard_tokens - self.partial), 0)
            self._file.write(tokens[:take].tobytes())
            self.partial, tokens = self.partial + take, tokens[take:]
            if self.partial >= self.shard_tokens:
                self._complete_shard()
                self._file = open(self._paths()[0], "wb")
                completed = True
        return completed

    def sync(self) -> None:
        """Make the temporary shard durable up to now (before a checkpoint names its length)."""
        self._file.flush()
        os.fsync(self._file.fileno())

    def state(self) -> dict:
        return {"shards": self.shards, "partial": self.partial}

    def finish(self) -> dict:
        """Complete the last shard; the split's entry for meta.json."""
        if self.partial:
            self._complete_shard()
        else:
            self._file.close()
            self._paths()[0].unlink()
        return {"tokens": sum(s["tokens"] for s in self.shards), "shards": self.shards}

    def _paths(self) -> tuple[Path, Path]:
        name = f"{self.split}_{len(self.shards):06d}.bin"
        return self.directory / f".{name}.part", self.directory / name

    def _complete_shard(self) -> None:
        self.sync()
        self._file.close()
        temp, final = self._paths()
        os.replace(temp, final)
        self.shards.append({"file": final.name, "tokens": self.partial})
        self.partial = 0


def _tokenize_text(cfg, directory: Path, text: str):
    """A single text: the first 1 - val_fraction of its characters are train, the rest val (as nanoGPT)."""
    tokenizer = get_tokenizer(cfg.tokenizer, text, cfg.chars)
    _check_uint16(tokenizer)
    if cfg.tokenizer == "char":
        _check_chars(text, tokenizer.chars)
    cut = int(len(text) * (1 - cfg.val_fraction))
    splits = {}
    with tqdm(total=len(text), unit="char", unit_scale=True, desc=f"prepare {cfg.name}",
              disable=len(text) <= TEXT_PIECE_CHARS) as bar:
        for split, (start, end) in zip(SPLITS, ((0, cut), (cut, len(text)))):
            writer = ShardWriter(directory, split, cfg.shard_tokens)
            for piece in _pieces(text, start, end):
                writer.write(np.array(tokenizer.encode(piece), dtype=np.uint16))
                bar.update(len(piece))
            splits[split] = writer.finish()
    return tokenizer, splits


def _pieces(text: str, start: int, end: int):
    """text[start:end] in pieces of about TEXT_PIECE_CHARS characters (bounded memory for a large text), each cut after
    a newline between non-spaces: a token of its own in GPT-2's BPE, so the pieces' tokens are the whole text's."""
    while start < end:
        found = PIECE_CUT.search(text, min(start + TEXT_PIECE_CHARS, end), end)
        stop = found.end() if found else end
        yield text[start:stop]
        start = stop


def _tokenize_documents(cfg, directory: Path, key: str):
    """A Hugging Face corpus: documents to BPE tokens with EOT after each, by all cores, resumable per shard."""
    if cfg.tokenizer != "gpt2":
        raise UserError(f"data.tokenizer={cfg.tokenizer} needs the whole text at once; use data.tokenizer=gpt2 for Hugging Face corpora")
    tokenizer = get_tokenizer("gpt2")
    ds = load_documents(cfg)
    progress = _resumable_progress(directory, key)
    if progress is None:
        for stale in [*directory.glob("*.bin"), *directory.glob(".*.part")]:
            stale.unlink()
        progress = {"key": key, "cursor": 0, "documents": dict.fromkeys(SPLITS, 0), "writers": {}}
    writers = {s: ShardWriter(directory, s, cfg.shard_tokens, progress["writers"].get(s)) for s in SPLITS}
    batches, total = _document_batches(ds, cfg, progress["cursor"])
    workers = cfg.num_proc or os.cpu_count() or 1
    if total is not None:
        workers = max(1, min(workers, math.ceil((total - progress["cursor"]) / DOCS_PER_TASK)))
    bar = tqdm(total=total, initial=progress["cursor"], unit="doc", desc=f"prepare {cfg.name}")
    started, new_tokens = time.perf_counter(), 0
    for n_docs, parts in _tokenized(batches, workers, (cfg.val_size, cfg.split_seed)):
        completed = False
        for split, (tokens, docs) in parts.items():
            completed |= writers[split].write(tokens)
            progress["documents"][split] += docs
            new_tokens += tokens.size
        progress["cursor"] += n_docs
        bar.update(n_docs)
        bar.set_postfix_str(f"{new_tokens / 1e6:.1f}M tokens, {new_tokens / (time.perf_counter() - started) / 1e3:.0f}k tok/s", refresh=False)
        if completed:
            for writer in writers.values():
                writer.sync()
            progress["writers"] = {s: w.state() for s, w in writers.items()}
            _write_json(directory / PROGRESS_FILE, progress)
    bar.close()
    splits = {s: {**w.finish(), "documents": progress["documents"][s]} for s, w in writers.items()}
    return tokenizer, splits


def _document_batches(ds, cfg, start: int):
    """(texts, split) batches from document `start` on, and the document count (None if unknown).

    A materialized dataset is split as nanoGPT does (train_test_split(test_size=val_size, seed), val
    first, then train); a stream assigns each document by a seeded hash of its text (split None).
    """
    column = cfg.text_column
    if cfg.streaming:
        stream = ds.skip(start) if start else ds
        return ((batch[column], None) for batch in stream.iter(batch_size=DOCS_PER_TASK)), _stream_length(ds, cfg)
    try:
        parts = ds.train_test_split(test_size=cfg.val_size, seed=cfg.split_seed)
    except ValueError as e:
        raise UserError(f"cannot split {len(ds)} documents with data.val_size={cfg.val_size} ({e}); change data.val_size or data.max_documents") from None

    def batches():
        offset = 0
        for split, part in (("val", parts["test"]), ("train", parts["train"])):
            for i in range(max(start - offset, 0), len(part), DOCS_PER_TASK):
                yield part[i:i + DOCS_PER_TASK][column], split
            offset += len(part)

    return batches(), len(ds)


def _stream_length(ds, cfg) -> int | None:
    """The number of documents a stream will give, when the dataset info knows it."""
    try:
        n = ds.info.splits[cfg.hf_split].num_examples
    except (AttributeError, KeyError, TypeError):
        return cfg.max_documents
    return n if cfg.max_documents is None else min(n, cfg.max_documents)


def _tokenized(batches, workers: int, split_args: tuple):
    """(number of documents, {split: (tokens, documents)}) per batch, in order, from `workers` processes."""
    if workers == 1:
        _init_worker(*split_args)
        for texts, split in batches:
            yield len(texts), _tokenize_batch(texts, split)
        return
    context = multiprocessing.get_context("spawn")  # fork is unsafe with Arrow's threads, and unavailable on macOS by default
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=split_args) as pool:
        pending = deque()  # at most 2 tasks per worker in flight: bounded memory, workers never idle
        for texts, split in batches:
            pending.append((len(texts), pool.submit(_tokenize_batch, texts, split)))
            if len(pending) >= 2 * workers:
                n, future = pending.popleft()
                yield n, future.result()
        while pending:
            n, future = pending.popleft()
            yield n, future.result()


_worker: dict = {}


def _init_worker(val_size: float, seed: int) -> None:
    _worker.update(tokenizer=get_tokenizer("gpt2"), val_size=val_size, salt=str(seed).encode()[:16])


def _tokenize_batch(texts: list[str], split: str | None) -> dict:
    """Each document's tokens followed by EOT, concatenated per split; split None routes by hash."""
    tokenizer = _worker["tokenizer"]
    eot = np.array([tokenizer.eot_token], dtype=np.uint16)
    parts = {s: [] for s in SPLITS}
    for text in texts:
        text = text or ""
        parts[split or _hash_split(text)] += (tokenizer.encode_array(text), eot)
    empty = np.empty(0, dtype=np.uint16)
    return {s: (np.concatenate(p) if p else empty, len(p) // 2) for s, p in parts.items()}


def _hash_split(text: str) -> str:
    """val for a val_size fraction of documents, decided by a seeded hash of the text alone."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8, salt=_worker["salt"]).digest()
    return "val" if int.from_bytes(digest, "little") < _worker["val_size"] * 2**64 else "train"


def _resumable_progress(directory: Path, key: str) -> dict | None:
    """progress.json of an interrupted prepare of the same key whose files are all still there, else None."""
    try:
        progress = json.loads((directory / PROGRESS_FILE).read_text())
    except (OSError, ValueError):
        return None
    if progress.get("key") != key:
        return None
    for split, state in progress["writers"].items():
        for shard in state["shards"]:
            if _size(directory / shard["file"]) != 2 * shard["tokens"]:
                return None
        name = f"{split}_{len(state['shards']):06d}.bin"
        if max(_size(directory / f".{name}.part"), _size(directory / name)) < 2 * state["partial"]:
            return None
    return progress


def _is_prepared(directory: Path) -> bool:
    if not (directory / META_FILE).exists():
        return False
    try:
        read_meta(directory)
    except UserError:
        return False
    return True


def _check_chars(text: str, chars: str) -> None:
    """UserError naming the text's characters outside a fixed char vocabulary (data.chars)."""
    outside = sorted(set(text) - set(chars))
    if outside:
        raise UserError(f"the text has {len(outside)} characters outside the fixed {len(chars)}-character vocabulary "
                        f"(data.chars, the checkpoint's when fine-tuning) ({''.join(outside[:10])!r}); remove them "
                        "from the text, or train a new model on it")


def _check_uint16(tokenizer) -> None:
    if tokenizer.vocab_size > 2**16:
        raise UserError(f"the corpus has {tokenizer.vocab_size} distinct characters, more than uint16 tokens hold (65536); use data.tokenizer=gpt2")


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else -1


def _write_json(path: Path, data: dict) -> None:
    """Write JSON atomically: a reader sees the old file or the complete new one."""
    temp = path.with_name(f".{path.name}.part")
    with open(temp, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, path)
