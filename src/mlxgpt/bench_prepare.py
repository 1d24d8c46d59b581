"""Benchmark: mlxgpt's prepare vs a nanoGPT-style datasets.map + np.memmap pipeline on the same local corpus.

Both turn a synthetic parquet corpus (documents built from the Python docs) into GPT-2 BPE tokens with EOT
after each document and nanoGPT's train/val split. Each pipeline runs in a fresh child process with its own
empty datasets cache; the child reports its wall time and the peak resident memory of its largest process
(getrusage: itself and its waited-for workers). Usage: python -m mlxgpt.bench_prepare [--mb 40] [--num-proc N]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

VAL_SIZE, SEED = 0.0005, 2357  # nanoGPT's openwebtext split
CORPUS_FILES = 8
PIPELINES = {
    "nanogpt": "nanoGPT-style: datasets.map + np.memmap",
    "mlxgpt": "mlxgpt prepare",
    "mlxgpt-stream": "mlxgpt prepare, streaming=True",
}


def make_corpus(directory: Path, megabytes: float) -> None:
    """Write parquet files of English-like documents (3-40 random pydoc paragraphs each, two files' worth at least);
    print the counts as JSON. First checks that the GPT-2 BPE ranks load, before anything is timed."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mlxgpt.data.sources import pydoc_text
    from mlxgpt.tokenizer import GPT2Tokenizer

    GPT2Tokenizer()  # offline without the ranks: a UserError saying how to provide them
    paragraphs = [p for p in pydoc_text().split("\n\n") if len(p.strip()) > 40]
    rng = random.Random(0)
    docs, size = [], 0
    while size < megabytes * 1e6 or len(docs) < 2 * CORPUS_FILES:  # no file empty, a train and a val document
        docs.append("\n\n".join(rng.choices(paragraphs, k=rng.randint(3, 40))))
        size += len(docs[-1].encode())
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(CORPUS_FILES):
        pq.write_table(pa.table({"text": docs[i::CORPUS_FILES]}), directory / f"part-{i:03d}.parquet")
    print(json.dumps({"documents": len(docs), "bytes": size}))


def run_mlxgpt(corpus: Path, out: Path, num_proc: int, streaming: bool) -> dict[str, list[Path]]:
    from omegaconf import OmegaConf

    from mlxgpt.config import DataConfig
    from mlxgpt.data import TokenData, prepare

    cfg = OmegaConf.structured(DataConfig(
        name="bench", source="hf", tokenizer="gpt2", hf_path="parquet", data_files=str(corpus / "*.parquet"),
        val_size=VAL_SIZE, split_seed=SEED, num_proc=num_proc, streaming=streaming, cache_dir=str(out)))
    data = TokenData(prepare(cfg))
    return {split: [data.directory / s["file"] for s in info["shards"]] for split, info in data.meta["splits"].items()}


def run_nanogpt_style(corpus: Path, out: Path, num_proc: int) -> dict[str, list[Path]]:
    """nanoGPT's data/openwebtext/prepare.py approach, on a local parquet corpus (written here, not copied)."""
    import datasets
    import tiktoken

    bpe = tiktoken.get_encoding("r50k_base")  # = nanoGPT's "gpt2" ranks; the offline cache holds these
    ds = datasets.load_dataset("parquet", data_files=str(corpus / "*.parquet"), split="train", num_proc=num_proc)
    parts = ds.train_test_split(test_size=VAL_SIZE, seed=SEED, shuffle=True)
    parts["val"] = parts.pop("test")

    def tokenize(row):
        ids = bpe.encode_ordinary(row["text"]) + [bpe.eot_token]
        return {"ids": ids, "len": len(ids)}

    tokenized = parts.map(tokenize, remove_columns=["text"], num_proc=num_proc, desc="tokenize")
    result = {}
    for split, part in tokenized.items():
        tokens = np.memmap(out / f"{split}.bin", dtype=np.uint16, mode="w+", shape=(int(np.sum(part["len"], dtype=np.uint64)),))
        chunks, at = min(1024, len(part)), 0
        for i in range(chunks):
            ids = np.concatenate(part.shard(num_shards=chunks, index=i, contiguous=True).with_format("numpy")["ids"])
            tokens[at:at + len(ids)] = ids
            at += len(ids)
        tokens.flush()
        result[split] = [out / f"{split}.bin"]
    return result


def child(pipeline: str, corpus: Path, out: Path, num_proc: int) -> None:
    """Run one pipeline; print its token count, seconds, peak RSS and a checksum of its tokens as JSON."""
    import hashlib

    started = time.perf_counter()
    if pipeline == "nanogpt":
        splits = run_nanogpt_style(corpus, out, num_proc)
    else:
        splits = run_mlxgpt(corpus, out, num_proc, streaming=pipeline == "mlxgpt-stream")
    seconds = time.perf_counter() - started
    to_bytes = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    peak = max(u.ru_maxrss for u in usage) * to_bytes
    cpu = sum(u.ru_utime + u.ru_stime for u in usage)
    digest = hashlib.sha256()
    for path in splits["train"] + splits["val"]:
        digest.update(path.read_bytes())
    tokens = sum(p.stat().st_size for paths in splits.values() for p in paths) // 2
    print(json.dumps({"tokens": tokens, "seconds": seconds, "cpu_seconds": cpu, "peak_bytes": peak, "sha256": digest.hexdigest()}))


def run_child(*args: str, env: dict | None = None) -> dict:
    """Run this module with args in a child process; its last stdout line as JSON.

    Children do all the heavy work: a child's ru_maxrss starts from its parent's RSS at fork time, so this
    process stays small (it imports nothing beyond the standard library and numpy).
    """
    done = subprocess.run([sys.executable, "-m", "mlxgpt.bench_prepare", *args], env=env, capture_output=True, text=True)
    if done.returncode == 2 and done.stderr.startswith("error: "):  # a user error, one line: pass it on
        print(done.stderr.strip(), file=sys.stderr)
        sys.exit(2)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(pipeline: str, corpus: Path, work: Path, num_proc: int) -> dict:
    out = work / pipeline
    out.mkdir(parents=True)
    env = {**os.environ, "HF_DATASETS_CACHE": str(out / "hf_cache")}  # cold cache: both pay the arrow conversion
    return run_child("--child", pipeline, "--corpus", str(corpus), "--out", str(out), "--num-proc", str(num_proc), env=env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=float, default=40, help="corpus size in MB of UTF-8 text")
    parser.add_argument("--num-proc", type=int, default=os.cpu_count(), help="worker processes for both pipelines")
    parser.add_argument("--repeat", type=int, default=1, help="runs per pipeline (interleaved); the fastest is reported")
    parser.add_argument("--child", choices=[*PIPELINES, "corpus"], help=argparse.SUPPRESS)
    parser.add_argument("--corpus", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    bad = [(flag, value) for flag, value in (("--mb", args.mb), ("--num-proc", args.num_proc), ("--repeat", args.repeat))
           if not value > 0]
    if bad:
        from mlxgpt.cli import fail  # only here: its imports would grow this process, whose RSS its children inherit

        fail(f"{bad[0][0]} {bad[0][1]}: must be > 0; give a positive number")
    if args.child == "corpus":
        from mlxgpt.cli import fail
        from mlxgpt.errors import UserError

        try:
            return make_corpus(args.out, args.mb)
        except UserError as e:
            fail(str(e))
    if args.child:
        return child(args.child, args.corpus, args.out, args.num_proc)
    with tempfile.TemporaryDirectory(prefix="mlxgpt-bench-prepare-") as tmp:
        work = Path(tmp)
        corpus = run_child("--child", "corpus", "--out", str(work / "corpus"), "--mb", str(args.mb))
        print(f"corpus: {corpus['documents']:,} documents, {corpus['bytes'] / 1e6:.1f} MB in {CORPUS_FILES} parquet files; "
              f"{args.num_proc} worker processes; {os.cpu_count()} CPUs; val_size {VAL_SIZE}, seed {SEED}; best of {args.repeat}\n", flush=True)
        runs = [(p, measure(p, work / "corpus", work / f"run{i}", args.num_proc)) for i in range(args.repeat) for p in PIPELINES]
        results = {p: min((r for name, r in runs if name == p), key=lambda r: r["seconds"]) for p in PIPELINES}
    base = results["nanogpt"]
    print("| pipeline | tokens | wall s | tokens/s | CPU s | peak RSS (MB) | throughput vs nanoGPT | peak RSS vs nanoGPT |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        rate = r["tokens"] / r["seconds"]
        print(f"| {PIPELINES[name]} | {r['tokens']:,} | {r['seconds']:.2f} | {rate:,.0f} | {r['cpu_seconds']:.1f} "
              f"| {r['peak_bytes'] / 2**20:.0f} | {rate / (base['tokens'] / base['seconds']):.2f}x | {r['peak_bytes'] / base['peak_bytes']:.2f}x |")
    same = results["mlxgpt"]["sha256"] == base["sha256"]
    print(f"\nmlxgpt prepare's train+val tokens {'are identical to' if same else 'DIFFER from'} the nanoGPT-style output "
          "(streaming splits by document hash, so its split differs by design).")


if __name__ == "__main__":
    main()
