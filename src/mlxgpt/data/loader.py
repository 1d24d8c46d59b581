"""Random (x, y) training windows from a prepared directory's memory-mapped uint16 shards."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mlxgpt.errors import UserError
from mlxgpt.tokenizer import tokenizer_from_meta

META_FILE = "meta.json"
FORMAT = 1  # version of the prepared layout; prepare writes it, read_meta insists on it


def read_meta(directory: str | Path) -> dict:
    """meta.json of a completely prepared directory; UserError when it is missing or a shard is damaged."""
    directory = Path(directory)
    try:
        meta = json.loads((directory / META_FILE).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{directory} holds no prepared data ({type(e).__name__}); prepare it with mlxgpt.data.prepare(cfg)") from None
    if meta.get("format") != FORMAT:
        raise UserError(f"{directory} was prepared in format {meta.get('format')}, this version reads {FORMAT}; delete it and prepare again")
    for split in meta["splits"].values():
        for shard in split["shards"]:
            path = directory / shard["file"]
            size = path.stat().st_size if path.is_file() else -1
            if size != 2 * shard["tokens"]:
                raise UserError(f"{path} has {size} bytes, expected {2 * shard['tokens']}; delete {directory} and prepare again")
    return meta


class TokenData:
    """A prepared dataset: its meta, tokenizer and batches of token windows from each split."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.meta = read_meta(self.directory)
        self.tokenizer = tokenizer_from_meta(self.meta["tokenizer"])
        self._shards = {
            split: [np.memmap(self.directory / s["file"], dtype=np.uint16, mode="r") for s in info["shards"]]
            for split, info in self.meta["splits"].items()
        }
        # _starts[split][i] is the stream position of shard i's first token; the last entry is the total
        self._starts = {split: np.cumsum([0] + [len(s) for s in shards]) for split, shards in self._shards.items()}

    @property
    def vocab_size(self) -> int:
        return self.meta["vocab_size"]

    def num_tokens(self, split: str) -> int:
        if split not in self._starts:
            raise UserError(f"no split {split!r} in {self.directory}; splits: {sorted(self._starts)}")
        return int(self._starts[split][-1])

    def get_batch(self, split: str, batch_size: int, block_size: int, key: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        """batch_size windows of block_size tokens (x) and the same shifted by one (y), int32; key fixes the draw."""
        n = self.num_tokens(split)
        if n < block_size + 1:
            raise UserError(f"the {split} split of {self.meta['name']} has {n} tokens, fewer than block_size+1 = {block_size + 1}; "
                            f"lower trainer.block_size, or {self._more_tokens_hint(split)}")
        starts = np.random.default_rng(key).integers(0, n - block_size, size=batch_size)
        rows = np.stack([self._read(split, int(s), block_size + 1) for s in starts]).astype(np.int32)
        if rows.max() >= self.vocab_size:  # a damaged shard of the right size: the model would index past its table
            raise UserError(f"the {split} split of {self.directory} holds token id {rows.max()}, outside its "
                            f"{self.vocab_size}-token vocabulary; delete {self.directory} and prepare again")
        return np.ascontiguousarray(rows[:, :-1]), np.ascontiguousarray(rows[:, 1:])

    def _more_tokens_hint(self, split: str) -> str:
        """How to give a split more tokens: a larger held-out share for val, more text for train."""
        if split != "val":
            return "use more text"
        setting = "val_size" if "val_size" in self.meta["split"] else "val_fraction"
        return f"raise data.{setting} (now {self.meta['split'][setting]})"

    def _read(self, split: str, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the split, treating its shards as one stream."""
        shards, starts = self._shards[split], self._starts[split]
        i = int(np.searchsorted(starts, start, side="right")) - 1
        pieces = []
        while length > 0:
            offset = start - int(starts[i])
            piece = shards[i][offset:offset + length]
            pieces.append(piece)
            start, length, i = start + len(piece), length - len(piece), i + 1
        return np.concatenate(pieces)
