"""Read back what an offline W&B run recorded, from its `run-<id>.wandb` file.

The file is a 7-byte header (`:W&B`, magic, version) followed by a LevelDB-style log: 32 KiB blocks of
records `crc32c (4) | length (2, LE) | type (1) | data`, type 1 full, 2 first, 3 middle, 4 last. Each
reassembled payload is a `wandb.proto.wandb_internal_pb2.Record`.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
HEADER = 7


def records(path: str | Path) -> list[wandb_internal_pb2.Record]:
    raw = Path(path).read_bytes()
    assert raw[:4] == b":W&B", f"{path} is not a W&B run file"
    out, pending, pos = [], b"", HEADER
    while pos + 7 <= len(raw):
        room = BLOCK - pos % BLOCK
        if room < 7:  # block trailer padding
            pos += room
            continue
        length, kind = struct.unpack("<HB", raw[pos + 4:pos + 7])
        data = raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            break
        pending = data if kind in (1, 2) else pending + data
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def history(run_dir: str | Path) -> list[dict]:
    """Every logged history row of the offline run in `run_dir` (an `offline-run-*` folder), as dicts."""
    (path,) = Path(run_dir).glob("run-*.wandb")
    rows = []
    for record in records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def config(run_dir: str | Path) -> dict:
    """The run's config as the logger set it (every update applied in order), top-level key -> value."""
    (path,) = Path(run_dir).glob("run-*.wandb")
    out: dict = {}
    for record in records(path):
        if record.WhichOneof("record_type") == "config":
            for item in record.config.update:
                out[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
            for item in record.config.remove:
                out.pop(item.key or "/".join(item.nested_key), None)
    return out
