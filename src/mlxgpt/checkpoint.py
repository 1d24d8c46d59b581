"""Checkpoints: `model.safetensors` + `optimizer.safetensors` + `state.json`, written atomically.

state.json records each array file's size and SHA-256 (`files`); every load checks them first, so a changed byte (bit
rot, a bad copy) is an error, not garbage weights. Checkpoints saved before the digests load without the check.

Layout of `<run>/checkpoints/`: complete `iter_XXXXXXX/` directories and `last` / `best` symlinks. A directory is
written under a hidden temporary name, fsync'd and renamed; a link is swapped with one rename; a directory is
renamed to a hidden name before it is deleted. So a kill at any moment leaves `last` and `best` pointing at
complete checkpoints, plus at most some hidden debris that loaders never look at and the next save removes.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import struct
from pathlib import Path
from typing import Mapping

import mlx.core as mx
from mlx.utils import tree_flatten

from mlxgpt.digest import file_sha256
from mlxgpt.errors import UserError

FORMAT = "mlxgpt-checkpoint"
FILES = ("model.safetensors", "optimizer.safetensors", "state.json")
ARRAY_FILES = FILES[:2]
STATE_KEYS = ("iter", "tokens_seen", "best_val_loss", "seed", "model_config", "tokenizer", "config")  # readers need
MODEL_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")  # what makes weights fit a model
ITER_DIR = re.compile(r"iter_(\d+)(?:-(\d+))?")  # iter_0000040, or iter_0000040-1 for a second save of iteration 40
DEBRIS = (".iter_*", ".last.tmp*", ".best.tmp*")  # left by a save or prune that was killed
SHA256 = re.compile(r"[0-9a-f]{64}")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _point(link: Path, target_name: str) -> None:
    """Atomically make `link` a symlink to `target_name` (a sibling)."""
    tmp = link.with_name(f".{link.name}.tmp")
    tmp.unlink(missing_ok=True)
    os.symlink(target_name, tmp)
    os.replace(tmp, link)
    _fsync(link.parent)


def save_checkpoint(ckpt_root: Path, model_params: dict, optimizer_state: dict, state: dict,
                    is_best: bool = False, keep: int = 1) -> Path:
    """Write iter_<n>/ atomically, point `last` (and `best`) at it, keep the newest `keep` and those the links point at.

    One writer per `ckpt_root` at a time (the run directory's lock): debris of earlier writers is removed."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    _remove_debris(ckpt_root)
    name = _free_name(ckpt_root, state["iter"])
    tmp = ckpt_root / f".{name}.tmp"
    try:
        tmp.mkdir()
        mx.save_safetensors(str(tmp / "model.safetensors"), dict(tree_flatten(model_params)))
        mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(optimizer_state)))
        files = {name: {"sha256": file_sha256(tmp / name), "bytes": (tmp / name).stat().st_size}
                 for name in ARRAY_FILES}  # hashed from the page cache the write just filled
        (tmp / "state.json").write_text(json.dumps({"format": FORMAT, **state, "files": files}, indent=2))
        for f in FILES:
            _fsync(tmp / f)
        _fsync(tmp)
        os.replace(tmp, ckpt_root / name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # frees the space a full disk needs; a kill leaves it as debris
        raise
    _fsync(ckpt_root)
    _point(ckpt_root / "last", name)
    if is_best:
        _point(ckpt_root / "best", name)
    _prune(ckpt_root, keep)
    return ckpt_root / name


def _free_name(ckpt_root: Path, iteration: int) -> str:
    """iter_<n>, or iter_<n>-<k> when iteration n was saved before: a complete directory is never replaced."""
    name, k = f"iter_{iteration:07d}", 0
    while (ckpt_root / name).exists():
        k += 1
        name = f"iter_{iteration:07d}-{k}"
    return name


def _iteration_dirs(ckpt_root: Path) -> list[str]:
    """Names of the complete checkpoint directories, oldest first."""
    found = [(m, p.name) for p in ckpt_root.iterdir() if p.is_dir() and not p.is_symlink()
             and (m := ITER_DIR.fullmatch(p.name))]
    return [name for m, name in sorted(found, key=lambda f: (int(f[0][1]), int(f[0][2] or 0)))]


def _prune(ckpt_root: Path, keep: int) -> None:
    """Delete all but the newest `keep` iteration dirs, never one that `last` or `best` points at."""
    pinned = {os.readlink(ckpt_root / n) for n in ("last", "best") if (ckpt_root / n).is_symlink()}
    dirs = _iteration_dirs(ckpt_root)
    for name in dirs[: max(0, len(dirs) - keep)]:
        if name not in pinned:
            doomed = ckpt_root / f".{name}.del"
            os.replace(ckpt_root / name, doomed)  # gone from view at once; a kill mid-delete leaves only debris
            shutil.rmtree(doomed)


def _remove_debris(ckpt_root: Path) -> None:
    for pattern in DEBRIS:
        for path in ckpt_root.glob(pattern):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def latest(ckpt_root: Path) -> Path | None:
    """The checkpoint to continue from: what `last` points at, else (a kill before the first link) the newest one."""
    last = ckpt_root / "last"
    if last.is_symlink() and (last / "state.json").is_file():
        return last.resolve()
    dirs = _iteration_dirs(ckpt_root) if ckpt_root.is_dir() else []
    return (ckpt_root / dirs[-1]).resolve() if dirs else None


def resolve(path: str | Path, which: str = "last") -> Path:
    """A checkpoint dir from a run dir, a checkpoints/ dir or a checkpoint dir itself."""
    p = Path(path).expanduser()
    for candidate in (p, p / which, p / "checkpoints" / which):
        if (candidate / "state.json").is_file():
            return candidate.resolve()
    if not p.exists():
        raise UserError(f"checkpoint {p} does not exist: pass a run directory or a checkpoint directory")
    raise UserError(f"no checkpoint found in {p}: expected state.json (and model.safetensors) in {p}, "
                    f"{p / which} or {p / 'checkpoints' / which}")


def resolve_best(path: str | Path) -> Path:
    """Like resolve(path, "best"), falling back to the last checkpoint (a run stopped before evaluating has no best)."""
    try:
        return resolve(path, "best")
    except UserError:
        return resolve(path, "last")


def read_state(ckpt: Path) -> dict:
    """The checkpoint's state.json, validated."""
    try:
        state = json.loads((ckpt / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"checkpoint {ckpt} has an unreadable state.json ({e}); {_use_another(ckpt)}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{ckpt} is not an mlxgpt checkpoint (state.json has no format={FORMAT!r})")
    missing = [key for key in STATE_KEYS if key not in state]
    if missing:
        raise UserError(f"checkpoint {ckpt} has a damaged state.json (no {', '.join(missing)}); {_use_another(ckpt)}")
    if "files" in state and not _valid_files(state["files"]):
        raise UserError(f"checkpoint {ckpt} has a damaged state.json (its files entry is not a sha256 and bytes for "
                        f"each of {', '.join(ARRAY_FILES)}); {_use_another(ckpt)}")
    return state


def _valid_files(files) -> bool:
    """state.json's `files`: {"sha256": 64 hex digits, "bytes": an int} for each array file."""
    return isinstance(files, dict) and all(
        isinstance(entry := files.get(name), dict) and type(entry.get("bytes")) is int
        and isinstance(entry.get("sha256"), str) and SHA256.fullmatch(entry["sha256"]) is not None
        for name in ARRAY_FILES)


def _use_another(ckpt: Path) -> str:
    """The fix for a damaged checkpoint, naming the newest other one of its run where there is one."""
    here = ckpt.resolve()
    others = [name for name in _iteration_dirs(here.parent) if name != here.name] if ITER_DIR.fullmatch(here.name) else []
    return f"use another checkpoint, e.g. {here.parent / others[-1]}" if others else "use another checkpoint"


def verify(ckpt: Path) -> dict:
    """state.json, and every array file complete (its safetensors header matches its size), without loading arrays."""
    state = read_state(ckpt)
    for name in ARRAY_FILES:
        path = ckpt / name
        if not path.is_file():
            raise UserError(f"checkpoint {ckpt} is incomplete: {name} is missing; {_use_another(ckpt)}")
        if not _complete_safetensors(path):
            raise UserError(f"checkpoint file {path} is corrupt or truncated; {_use_another(ckpt)}")
    return state


def _complete_safetensors(path: Path) -> bool:
    """A safetensors file: 8-byte header length, JSON header, then exactly the data its tensors' offsets cover."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100_000_000:
                return False
            header = json.loads(f.read(n))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        return 8 + n + end == path.stat().st_size
    except (OSError, ValueError, struct.error, KeyError, TypeError, IndexError, AttributeError):
        return False


def check_model(ckpt: Path, state: dict, model_cfg: Mapping) -> None:
    """UserError unless the checkpoint's model has the sizes in `model_cfg` (None values are not compared)."""
    saved = state.get("model_config") or {}
    differ = [k for k in MODEL_KEYS if model_cfg.get(k) is not None and saved.get(k) != model_cfg.get(k)]
    if differ == ["vocab_size"] and state.get("tokenizer", {}).get("name") == "char":
        raise UserError(f"checkpoint {ckpt} has a {saved.get('vocab_size')}-character vocabulary, this data "
                        f"{model_cfg.get('vocab_size')} characters: continue it on the data it was trained on")
    if differ:
        option = ((state.get("config") or {}).get("model") or {}).get("name")
        trained = f", trained with model={option}" if option else ""
        fix = " ".join(f"model.{k}={saved.get(k)}" for k in differ)
        raise UserError(f"checkpoint {ckpt} is for a different model ({_sizes_text(saved)}{trained}) than this config "
                        f"({_sizes_text(model_cfg)}); use the checkpoint's model settings ({fix}) or start a new run")


def check_tokenizer(ckpt: Path, state: dict, tokenizer_meta: dict) -> None:
    """UserError unless the data is tokenized exactly as the checkpoint's training data (the same token ids)."""
    saved = state.get("tokenizer") or {}
    if saved == tokenizer_meta:
        return
    if saved.get("name") == tokenizer_meta.get("name") == "char":
        outside = sorted(set(tokenizer_meta["chars"]) - set(saved["chars"]))
        problem = (f"has {len(outside)} characters outside the checkpoint's {len(saved['chars'])}-character "
                   f"vocabulary ({''.join(outside[:10])!r})" if outside else
                   "has a different character vocabulary (ids would mean other characters)")
        raise UserError(f"the data {problem}; checkpoint {ckpt} can only continue on text with exactly its characters: "
                        f"use such text, or a BPE dataset (data.tokenizer=gpt2) with a BPE model")
    raise UserError(f"checkpoint {ckpt} was trained with the {saved.get('name')} tokenizer, this data uses "
                    f"{tokenizer_meta.get('name')}; use data with data.tokenizer={saved.get('name')}")


def _sizes_text(model_cfg: Mapping) -> str:
    return "/".join(f"{k}={model_cfg.get(k)}" for k in MODEL_KEYS)


def load_arrays(ckpt: Path, name: str, state: dict) -> dict[str, mx.array]:
    """One safetensors file of a checkpoint, first checked against the size and SHA-256 in its `state` (read_state)
    where it has them; a missing, truncated or changed file is a UserError."""
    path = ckpt / name
    if not path.is_file():
        raise UserError(f"checkpoint {ckpt} is incomplete: {name} is missing; {_use_another(ckpt)}")
    if "files" in state:
        _check_unchanged(ckpt, path, state["files"][name])
    try:
        return mx.load(str(path))
    except Exception as e:  # MLX raises RuntimeError/ValueError on truncated or foreign files
        raise UserError(f"checkpoint file {path} is corrupt or truncated ({e}); {_use_another(ckpt)}") from None


def _check_unchanged(ckpt: Path, path: Path, saved: dict) -> None:
    """UserError unless the file has the size and SHA-256 that state.json recorded when it was saved."""
    try:
        size = path.stat().st_size
        if size != saved["bytes"]:
            raise UserError(f"checkpoint file {path} is corrupt or truncated ({size} bytes, {saved['bytes']} when "
                            f"saved); {_use_another(ckpt)}")
        if file_sha256(path) != saved["sha256"]:
            raise UserError(f"checkpoint file {path} is corrupt: its contents differ from what was saved (its SHA-256 "
                            f"is not the one in state.json); {_use_another(ckpt)}")
    except OSError as e:
        raise UserError(f"cannot read checkpoint file {path} ({e.strerror}); {_use_another(ckpt)}") from None
