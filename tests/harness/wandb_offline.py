"""Read an offline W&B run (`WANDB_MODE=offline`) back: its `run-<id>.wandb` file, which W&B
writes in the LevelDB log format (32 KiB blocks of checksummed, possibly fragmented records after
a 7-byte `:W&B` header), each record a `wandb.proto.wandb_internal_pb2.Record`. wandb >= 0.2x
ships no Python reader of it (its core is in Go), so the tests read it here with wandb's own
protobuf classes.

Public API:
    offline_run_file(save_dir) -> pathlib.Path          the one run-*.wandb under save_dir
    read_records(path) -> list[Record]
    history(path) -> list[dict]     each `log` call's items: {key: value (JSON-decoded)}
    run_info(path) -> Record.run    project, display_name, entity, config
"""

from __future__ import annotations

import json
import pathlib
import struct
import zlib

__all__ = ["history", "offline_run_file", "read_records", "run_info"]

_BLOCK = 32768
_FILE_HEADER = struct.Struct("<4sHB")  # ident ":W&B", magic 0xBEE1, version 0
_RECORD_HEADER = struct.Struct("<IHB")  # crc32 (of type byte + data), length, type
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def offline_run_file(save_dir) -> pathlib.Path:
    files = sorted(pathlib.Path(save_dir).glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, f"expected one offline run under {save_dir}, found {files}"
    return files[0]


def _chunks(data: bytes):
    """(type, payload) of each physical record, checked against its CRC-32."""
    ident, magic, version = _FILE_HEADER.unpack_from(data, 0)
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), (ident, magic, version)
    pos = _FILE_HEADER.size
    while pos + _RECORD_HEADER.size <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _RECORD_HEADER.size:  # a block's tail too short for a header: padding
            pos += left
            continue
        crc, length, kind = _RECORD_HEADER.unpack_from(data, pos)
        if kind == 0 and length == 0:
            pos += left  # zero padding up to the block's end
            continue
        payload = data[pos + _RECORD_HEADER.size:pos + _RECORD_HEADER.size + length]
        assert zlib.crc32(bytes([kind]) + payload) == crc, f"bad checksum at byte {pos}"
        yield kind, payload
        pos += _RECORD_HEADER.size + length


def read_records(path) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

    records, parts = [], []
    for kind, payload in _chunks(pathlib.Path(path).read_bytes()):
        parts.append(payload)
        if kind in (_FULL, _LAST):
            record = pb.Record()
            record.ParseFromString(b"".join(parts))
            records.append(record)
            parts = []
        else:
            assert kind in (_FIRST, _MIDDLE), f"unknown record type {kind}"
    return records


def history(path) -> list[dict]:
    """The history rows, in order: `{key: value}` (with `_step` W&B's step)."""
    rows = []
    for record in read_records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append({(item.key or "/".join(item.nested_key)): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def run_info(path):
    for record in read_records(path):
        if record.WhichOneof("record_type") == "run":
            return record.run
    raise AssertionError(f"{path}: no run record")
