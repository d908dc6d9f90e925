"""Read a wandb offline run file (`run-<id>.wandb`) with wandb's own protobuf records.

wandb >= 0.19 writes these files from its Go core and no longer ships a Python reader. The format
is a LevelDB-style log: a 7-byte file header (":W&B", magic 0xBEE1, version), then 32 KiB blocks
of records, each with a 7-byte header (CRC32, length, type: full/first/middle/last).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list[wandb_internal_pb2.Record]:
    data = Path(path).read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:HEADER])
    assert ident == b":W&B" and magic == 0xBEE1, "not a wandb run file"
    position, pending, out = HEADER, b"", []
    while position + HEADER <= len(data):
        left_in_block = BLOCK - position % BLOCK
        if left_in_block < HEADER:  # block tail padding
            position += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position : position + HEADER])
        if kind == 0 and length == 0:
            break
        payload = data[position + HEADER : position + HEADER + length]
        position += HEADER + length
        if kind in (FULL, FIRST):
            pending = payload
        else:
            pending += payload
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
    return out


def history(path: Path) -> list[dict]:
    """Every logged step as {key: value} (plus "_step")."""
    rows = []
    for record in records(path):
        if record.WhichOneof("record_type") == "history":
            row = {(item.key or "/".join(item.nested_key)): json.loads(item.value_json) for item in record.history.item}
            row.setdefault("_step", record.history.step.num)
            rows.append(row)
    return rows


def config(path: Path) -> dict:
    out = {}
    for record in records(path):
        kind = record.WhichOneof("record_type")
        items = record.run.config.update if kind == "run" else record.config.update if kind == "config" else []
        for item in items:
            out[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return out
