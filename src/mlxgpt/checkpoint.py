"""Checkpoints: `model.safetensors` + `optimizer.safetensors` + `state.json`, written atomically.

Layout of `<run>/checkpoints/`: complete `iter_XXXXXXX/` directories (written under a temporary name, fsync'd,
renamed) and `last` / `best` symlinks swapped atomically, so neither ever points at a partial write.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from mlxgpt.errors import UserError

FORMAT = "mlxgpt-checkpoint"
FILES = ("model.safetensors", "optimizer.safetensors", "state.json")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _point(link: Path, target_name: str) -> None:
    """Atomically make `link` a symlink to `target_name` (a sibling)."""
    tmp = link.with_name(f".{link.name}.tmp{os.getpid()}")
    tmp.unlink(missing_ok=True)
    os.symlink(target_name, tmp)
    os.replace(tmp, link)
    _fsync(link.parent)


def save_checkpoint(ckpt_root: Path, model_params: dict, optimizer_state: dict, state: dict,
                    is_best: bool = False, keep: int = 1) -> Path:
    """Write iter_<n>/ atomically, point `last` (and `best`) at it, keep the newest `keep` others."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    name = f"iter_{state['iter']:07d}"
    final = ckpt_root / name
    tmp = ckpt_root / f".{name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    mx.save_safetensors(str(tmp / "model.safetensors"), dict(tree_flatten(model_params)))
    mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(optimizer_state)))
    (tmp / "state.json").write_text(json.dumps({"format": FORMAT, **state}, indent=2))
    for f in FILES:
        _fsync(tmp / f)
    _fsync(tmp)
    if final.exists():  # the same iteration saved again (e.g. best after last): replace it whole
        old = ckpt_root / f".{name}.old{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync(ckpt_root)
    _point(ckpt_root / "last", name)
    if is_best:
        _point(ckpt_root / "best", name)
    _prune(ckpt_root, keep)
    return final


def _prune(ckpt_root: Path, keep: int) -> None:
    """Delete all but the newest `keep` iteration dirs, never one that `last` or `best` points at."""
    pinned = {os.readlink(ckpt_root / n) for n in ("last", "best") if (ckpt_root / n).is_symlink()}
    dirs = sorted(p.name for p in ckpt_root.glob("iter_*") if p.is_dir())
    for name in dirs[: max(0, len(dirs) - keep)]:
        if name not in pinned:
            shutil.rmtree(ckpt_root / name)


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


def read_state(ckpt: Path) -> dict:
    """The checkpoint's state.json, validated."""
    try:
        state = json.loads((ckpt / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"checkpoint {ckpt} has an unreadable state.json ({e}); use another checkpoint") from None
    if state.get("format") != FORMAT:
        raise UserError(f"{ckpt} is not an mlxgpt checkpoint (state.json has no format={FORMAT!r})")
    return state


def load_arrays(ckpt: Path, name: str) -> dict[str, mx.array]:
    """One safetensors file of a checkpoint; a missing or truncated file is a UserError."""
    path = ckpt / name
    if not path.is_file():
        raise UserError(f"checkpoint {ckpt} is incomplete: {name} is missing; use another checkpoint")
    try:
        return mx.load(str(path))
    except Exception as e:  # MLX raises RuntimeError/ValueError on truncated or foreign files
        raise UserError(f"checkpoint file {path} is corrupt or truncated ({e}); use another checkpoint") from None
