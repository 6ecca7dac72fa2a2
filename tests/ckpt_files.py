"""Test helpers: a safetensors file as (header dict, data bytes) and back, for hand-made damage."""

from __future__ import annotations

import json
import struct
from pathlib import Path


def split(raw: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def join(header: dict, data: bytes) -> bytes:
    text = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(text)) + text + data


def edit_header(path: Path, edit) -> None:
    """Rewrite ``path`` with ``edit(header, data) -> data or None`` applied (the header is edited in place)."""
    header, data = split(path.read_bytes())
    new_data = edit(header, data)
    path.write_bytes(join(header, data if new_data is None else new_data))


def shard_of(folder: Path, key: str) -> Path:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    return folder / index["weight_map"][key]
