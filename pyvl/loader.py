"""Weights straight from safetensors: header checks, a strict key/shape check, then tensor-by-tensor loading.

The model is built on the ``meta`` device (no memory), every checkpoint header is parsed and checked against
it first, and only then are tensors read, one at a time from the memory-mapped files, converted to the target
device and dtype, and assigned. So the host never holds a second copy of the weights, and a bad folder fails
before anything is allocated. The one layout fix is the InternLM2 ``wqkv`` regrouping (see models/llm.py).
Pickle checkpoints are refused: unpickling runs arbitrary code.
"""

from __future__ import annotations

import json
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import safe_open

from .config import ModelConfig
from .errors import CheckpointError
from .models.llm import regroup_wqkv

__all__ = ["TensorInfo", "read_header", "index_checkpoint", "load_weights"]

SAFETENSORS_DTYPES = {
    "BF16": (torch.bfloat16, 2), "F16": (torch.float16, 2), "F32": (torch.float32, 4),
    "F64": (torch.float64, 8), "I64": (torch.int64, 8), "I32": (torch.int32, 4), "I16": (torch.int16, 2),
    "I8": (torch.int8, 1), "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1),
}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate one safetensors header; errors name the file and the key at fault."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: {size} bytes is too short for a safetensors file "
                                      "(expected an 8-byte header length, then a JSON header)")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, MAX_HEADER_BYTES):
                raise CheckpointError(f"{path}: header length field says {n} bytes but the file holds "
                                      f"{size - 8} after it; the file is truncated or not safetensors")
            raw = f.read(n)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: header is not valid JSON ({exc}); the file is corrupt") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object")
    data_size = size - 8 - n
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: entry {name!r} lacks dtype/shape/data_offsets") from None
        if dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {dtype!r}; expected one of "
                                  f"{sorted(SAFETENSORS_DTYPES)}")
        numel = 1
        for dim in shape:
            numel *= int(dim)
        nbytes = numel * SAFETENSORS_DTYPES[dtype][1]
        if not (0 <= begin <= end <= data_size) or end - begin != nbytes:
            raise CheckpointError(f"{path}: tensor {name!r} ({dtype}, shape {list(shape)}) has data_offsets "
                                  f"[{begin}, {end}] but needs {nbytes} bytes inside a {data_size}-byte data "
                                  "section; the file is truncated or corrupt")
        out[name] = TensorInfo(path, dtype, shape, nbytes)
    return out


def _refuse_pickles(folder: Path) -> None:
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{folder}: found pickle checkpoint(s) {pickles} and no safetensors weights. pyvl does not load "
            "pickle files because unpickling can run arbitrary code; convert them to safetensors first "
            "(safetensors.torch.save_file) or download the .safetensors release")


def index_checkpoint(folder: str | Path) -> dict[str, TensorInfo]:
    """Every tensor of a model folder -> where it lives, from the shard index or the single file."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            raise CheckpointError(f"{index}: not a valid index (expected JSON with a 'weight_map' object)"
                                  ) from None
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise CheckpointError(f"{index}: shard file(s) {missing} listed in weight_map are missing "
                                  f"from {folder}")
        headers = {s: read_header(folder / s) for s in shards}
        tensors = {}
        for name, shard in weight_map.items():
            if name not in headers[shard]:
                raise CheckpointError(f"{index}: maps {name!r} to {shard}, but that file has no such tensor")
            tensors[name] = headers[shard][name]
        return tensors
    single = folder / "model.safetensors"
    if single.is_file():
        return read_header(single)
    _refuse_pickles(folder)
    raise CheckpointError(f"{folder}: no model.safetensors.index.json or model.safetensors found")


def _layout_fix(cfg: ModelConfig) -> Callable[[str, torch.Tensor], torch.Tensor]:
    def fix(name: str, tensor: torch.Tensor) -> torch.Tensor:
        if name.endswith(".attention.wqkv.weight") or name.endswith(".attention.wqkv.bias"):
            return regroup_wqkv(tensor, cfg.llm)
        return tensor
    return fix


def check_keys(expected: dict[str, tuple[int, ...]], found: dict[str, TensorInfo], folder: Path) -> None:
    """One error that lists every missing, unexpected and mis-shaped key, or nothing."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshaped = [f"{k}: checkpoint {list(found[k].shape)}, model expects {list(expected[k])}"
                 for k in sorted(set(expected) & set(found)) if tuple(found[k].shape) != tuple(expected[k])]
    if missing or unexpected or misshaped:
        lines = [f"{folder}: the checkpoint does not match config.json"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)):
            if items:
                lines.append(f"  {len(items)} {title}:")
                lines.extend(f"    {item}" for item in items)
        raise CheckpointError("\n".join(lines))


def _iter_tensors(tensors: dict[str, TensorInfo]) -> Iterator[tuple[str, torch.Tensor]]:
    by_file: dict[Path, list[str]] = {}
    for name, info in tensors.items():
        by_file.setdefault(info.file, []).append(name)
    for path, names in by_file.items():
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in names:
                    yield name, f.get_tensor(name)
        except (OSError, RuntimeError, ValueError) as exc:
            if isinstance(exc, CheckpointError):
                raise
            raise CheckpointError(f"{path}: failed while reading tensors ({exc})") from None


class _Progress:
    """A one-line stderr progress bar, redrawn at most four times a second."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.done, self.enabled, self.start = total, 0, enabled, time.perf_counter()
        self.last_draw = 0.0

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if self.enabled and (now - self.last_draw > 0.25 or self.done == self.total):
            self.last_draw = now
            frac = self.done / max(self.total, 1)
            bar = "#" * int(frac * 30)
            sys.stderr.write(f"\rloading weights [{bar:<30}] {frac:6.1%} "
                             f"{self.done / 2**30:.2f}/{self.total / 2**30:.2f} GiB")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write(f" {time.perf_counter() - self.start:.1f}s\n")


def _assign(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    setattr(module, attr, torch.nn.Parameter(tensor, requires_grad=False))


def load_weights(model: torch.nn.Module, cfg: ModelConfig, folder: Path, device: torch.device,
                 dtype: torch.dtype, progress: bool | None = None) -> None:
    """Fill a meta-device ``model`` from ``folder``: strict check first, then one tensor at a time."""
    tensors = index_checkpoint(folder)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_keys(expected, tensors, folder)
    total = sum(info.nbytes for info in tensors.values())
    # Default: a bar for loads over 1 GiB when stderr is a terminal (a long load should not look hung).
    bar = _Progress(total, enabled=progress if progress is not None else (total > 2**30 and sys.stderr.isatty()))
    fix = _layout_fix(cfg)
    for name, tensor in _iter_tensors(tensors):
        _assign(model, name, fix(name, tensor).to(device=device, dtype=dtype))
        bar.update(tensors[name].nbytes)
    bar.close()
