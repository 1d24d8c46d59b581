"""Read a W&B run file (`run-<id>.wandb`, W&B's own record of what a run logged) back, one record at a time.

The file is a leveldb-style log: a 7-byte header (`:W&B`, magic 0xBEE1, version 0), then 32 KiB blocks of
records, each `crc32 (4) | length (2) | type (1) | payload`, a payload split FIRST/MIDDLE/LAST across blocks;
the crc32 covers the type byte and the payload. Payloads are `wandb_internal_pb2.Record` protobufs.
"""
from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Any, Iterator

HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
BLOCK_SIZE = 32 * 1024
RECORD_HEADER = struct.Struct("<IHB")  # crc32, payload length, chunk type
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: str | Path) -> Iterator[Any]:
    """Every record of the file in order, read a block at a time; a torn tail (a run still writing, or killed) ends
    the iteration. ValueError for a file that is not a W&B run file or is damaged."""
    from google.protobuf.message import DecodeError
    from wandb.proto import wandb_internal_pb2

    with open(path, "rb") as f:
        if f.read(len(HEADER)) != HEADER:
            raise ValueError(f"{path} is not a W&B run file of a known version")
        block, offset, parts = f.read(BLOCK_SIZE - len(HEADER)), len(HEADER), []
        while block:
            pos = 0
            while pos + RECORD_HEADER.size <= len(block):  # a block's tail too small for a header is zero padding
                crc, length, kind = RECORD_HEADER.unpack_from(block, pos)
                start = pos + RECORD_HEADER.size
                payload = block[start:start + length]
                if len(payload) < length:
                    return
                if zlib.crc32(bytes([kind]) + payload) != crc:
                    raise ValueError(f"{path}: checksum mismatch in the record at byte {offset + pos}")
                pos = start + length
                parts.append(payload)
                if kind in (FULL, LAST):
                    record = wandb_internal_pb2.Record()
                    try:
                        record.ParseFromString(b"".join(parts))
                    except DecodeError as e:
                        raise ValueError(f"{path}: unreadable record before byte {offset + pos}: {e}") from e
                    parts = []
                    yield record
            offset += len(block)
            block = f.read(BLOCK_SIZE)
