"""Weights straight from safetensors: header checks, a strict key/shape/dtype check, then tensor-by-tensor loading.

Order (``load_model``): config -> expected {key: shape} from the config alone (``expected_shapes``) -> every
header parsed, validated and checked against it (``check_checkpoint``) -> only then the model is built on the
``meta`` device and filled one tensor at a time, converted to the target device and dtype. A bad folder fails
before any layer exists or any weight is allocated. Two layout fixes: InternLM2's ``wqkv`` is regrouped, and each
FFN's ``w1``/``w3`` are stacked into one ``w13`` as they are read (one GEMM; never two copies). An AWQ
checkpoint's 4-bit tensors are first converted to pyvl's layout (pyvl.quant.awq), whose rows are outputs, so
both fixes apply.

Memory: by default each tensor is read with plain file reads into memory the model owns, so the files may change
or vanish afterwards with no effect, and the host holds one copy of the weights plus one tensor in flight.
``mmap=True`` maps the files instead (zero-copy where no conversion is needed, e.g. a bf16 file loaded as bf16
on the CPU): the parameters then alias the file's pages, so rewriting the file changes the model and truncating
it can kill the process with SIGBUS.

What cannot be checked: the bytes themselves (safetensors has no checksum), and a relabel between same-size
float dtypes (BF16 <-> F16) - both read as valid numbers. Pickle checkpoints are refused: unpickling runs code.
"""

from __future__ import annotations

import json
import struct
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from .config import ModelConfig
from .errors import CheckpointError
from .models.llm import regroup_wqkv
from .quant import awq
from .shapes import expected_shapes

__all__ = [
    "TensorInfo",
    "read_header",
    "index_checkpoint",
    "check_checkpoint",
    "tensors_by_file",
    "expected_shapes",
    "load_weights",
    "load_model",
]

SAFETENSORS_DTYPES = {
    "BF16": (torch.bfloat16, 2),
    "F16": (torch.float16, 2),
    "F32": (torch.float32, 4),
    "F64": (torch.float64, 8),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
}
FLOAT_DTYPES = ("BF16", "F16", "F32", "F64")  # every model parameter is a float
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
MAX_HEADER_BYTES = 100 * 1024 * 1024
_READ_ERRORS = (OSError, RuntimeError, ValueError, TypeError, SafetensorError)


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    offset: int  # absolute file offset of the first byte


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_entry(path: Path, name: str, entry: Any, data_size: int) -> tuple[str, tuple[int, ...], int, int]:
    """One header entry -> (dtype, shape, begin, nbytes), or a CheckpointError naming the file and key."""
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise CheckpointError(
            f"{where}: entry must be an object with exactly dtype/shape/data_offsets, got {entry!r:.120}"
        )
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise CheckpointError(f"{where}: dtype {dtype!r:.40} is not one of {sorted(SAFETENSORS_DTYPES)}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise CheckpointError(f"{where}: shape {shape!r:.120} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise CheckpointError(f"{where}: data_offsets {offsets!r:.120} is not a list of two integers")
    numel = 1
    for dim in shape:  # Python ints: a huge product cannot overflow, it just fails the size check
        numel *= dim
    nbytes = numel * SAFETENSORS_DTYPES[dtype][1]
    begin, end = offsets
    if not (0 <= begin <= end <= data_size) or end - begin != nbytes:
        raise CheckpointError(
            f"{where} ({dtype}, shape {shape}) has data_offsets [{begin}, {end}] but needs "
            f"{nbytes} bytes inside a {data_size}-byte data section; the file is truncated "
            "or corrupt"
        )
    return dtype, tuple(shape), begin, nbytes


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate one safetensors header; errors name the file and the key at fault.

    Beyond each entry's own consistency, the tensors must tile the data section exactly (no gap, no overlap,
    nothing after the last one), as the safetensors format requires.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(
                    f"{path}: {size} bytes is too short for a safetensors file "
                    "(expected an 8-byte header length, then a JSON header)"
                )
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, MAX_HEADER_BYTES):
                raise CheckpointError(
                    f"{path}: header length field says {n} bytes but the file holds "
                    f"{size - 8} after it; the file is truncated or not safetensors"
                )
            raw = f.read(n)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{path}: header is not valid JSON ({exc}); the file is corrupt") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: __metadata__ {metadata!r:.120} is not an object of strings")
    data_size, base = size - 8 - n, 8 + n
    spans, out = [], {}
    for name, entry in header.items():
        dtype, shape, begin, nbytes = _parse_entry(path, name, entry, data_size)
        spans.append((begin, begin + nbytes, name))
        out[name] = TensorInfo(path, dtype, shape, nbytes, base + begin)
    pos = 0
    for begin, end, name in sorted(spans):
        if begin != pos:
            raise CheckpointError(
                f"{path}: tensor {name!r} starts at data offset {begin}, expected {pos}: tensors "
                "overlap or leave a gap; the file is corrupt"
            )
        pos = end
    if pos != data_size:
        raise CheckpointError(
            f"{path}: tensors end at data offset {pos} but the data section holds {data_size} "
            "bytes; the file is truncated, padded or corrupt"
        )
    return out


def _refuse_pickles(folder: Path) -> None:
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{folder}: found pickle checkpoint(s) {pickles} and no safetensors weights. pyvl does not load "
            "pickle files because unpickling can run arbitrary code; convert them to safetensors first "
            "(safetensors.torch.save_file) or download the .safetensors release"
        )


def _shard_path(folder: Path, index: Path, name: str, shard: Any) -> Path:
    """A weight_map value must be a plain ``*.safetensors`` file name in the folder itself.

    Symbolic links are followed (the Hugging Face cache links snapshot files to blobs elsewhere); what is
    refused is an index that names paths: absolute, ``..``, or into subfolders.
    """
    if not (
        isinstance(shard, str)
        and shard.endswith(".safetensors")
        and Path(shard).name == shard
        and "/" not in shard
        and "\\" not in shard
        and not Path(shard).is_absolute()
    ):
        raise CheckpointError(
            f"{index}: weight_map[{name!r}] = {shard!r:.120} is not a plain *.safetensors "
            f"file name inside {folder}"
        )
    return folder / shard


def index_checkpoint(folder: str | Path) -> dict[str, TensorInfo]:
    """Every tensor of a model folder -> where it lives, from the shard index or the single file."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, KeyError, TypeError):
            raise CheckpointError(
                f"{index}: not a valid index (expected JSON with a 'weight_map' object)"
            ) from None
        except OSError as exc:
            raise CheckpointError(f"{index}: cannot read ({exc.strerror or exc})") from None
        paths = {name: _shard_path(folder, index, name, shard) for name, shard in weight_map.items()}
        shards = sorted(set(paths.values()))
        missing = [p.name for p in shards if not p.is_file()]
        if missing:
            raise CheckpointError(
                f"{index}: shard file(s) {missing} listed in weight_map are missing from {folder}"
            )
        headers = {p: read_header(p) for p in shards}
        tensors = {}
        for name, path in paths.items():
            if name not in headers[path]:
                raise CheckpointError(
                    f"{index}: maps {name!r} to {path.name}, but that file has no such tensor"
                )
            tensors[name] = headers[path][name]
        return tensors
    single = folder / "model.safetensors"
    if single.is_file():
        return read_header(single)
    _refuse_pickles(folder)
    raise CheckpointError(f"{folder}: no model.safetensors.index.json or model.safetensors found")


def check_keys(expected: dict[str, tuple[int, ...]], found: dict[str, TensorInfo], folder: Path) -> None:
    """One error that lists every missing, unexpected, mis-shaped and non-float key, or nothing."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    common = sorted(set(expected) & set(found))
    misshaped = [
        f"{k}: checkpoint {list(found[k].shape)}, model expects {list(expected[k])}"
        for k in common
        if tuple(found[k].shape) != tuple(expected[k])
    ]
    not_float = [
        f"{k}: {found[k].dtype} in {found[k].file.name}, expected one of {list(FLOAT_DTYPES)}"
        for k in common
        if found[k].dtype not in FLOAT_DTYPES and not k.endswith(awq.PACKED_KEYS)
    ]
    not_packed = [  # an AWQ checkpoint's qweight/qzeros: 8 nibbles to an int32 word
        f"{k}: {found[k].dtype} in {found[k].file.name}, expected I32"
        for k in common
        if found[k].dtype != "I32" and k.endswith(awq.PACKED_KEYS)
    ]
    if missing or unexpected or misshaped or not_float or not_packed:
        lines = [f"{folder}: the checkpoint does not match config.json"]
        for title, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("wrong shape", misshaped),
            ("not a float dtype", not_float),
            ("not packed int32", not_packed),
        ):
            if items:
                lines.append(f"  {len(items)} {title}:")
                lines.extend(f"    {item}" for item in items)
        raise CheckpointError("\n".join(lines))


def check_checkpoint(folder: str | Path, cfg: ModelConfig) -> dict[str, TensorInfo]:
    """Index ``folder`` and check its keys, shapes and dtypes against ``cfg`` alone (no model needed)."""
    tensors = index_checkpoint(folder)
    if cfg.quant is None and any(name.endswith(".qweight") for name in tensors):
        raise CheckpointError(
            f"{folder}: the checkpoint holds 4-bit AWQ tensors (.qweight) but config.json has no "
            "quantization_config; an AWQ GEMM folder needs one (see pyvl.quant.awq)"
        )
    check_keys(expected_shapes(cfg), tensors, Path(folder))
    return tensors


def _read_owned(info: TensorInfo, name: str, f) -> torch.Tensor:
    """Read one tensor's bytes into fresh memory (no mapping), in the file's dtype and shape."""
    torch_dtype = SAFETENSORS_DTYPES[info.dtype][0]
    buf = torch.empty(info.nbytes, dtype=torch.uint8)
    f.seek(info.offset)
    if info.nbytes and f.readinto(memoryview(buf.numpy())) != info.nbytes:
        raise CheckpointError(
            f"{info.file}: tensor {name!r} ends past the end of the file; it was truncated while loading"
        )
    return buf.view(torch_dtype).reshape(info.shape)


def tensors_by_file(tensors: dict[str, TensorInfo]) -> dict[Path, list[str]]:
    """The tensors' names grouped by the file that holds them (each file is opened once)."""
    by_file: dict[Path, list[str]] = {}
    for name, info in tensors.items():
        by_file.setdefault(info.file, []).append(name)
    return by_file


def _iter_tensors(tensors: dict[str, TensorInfo], mmap: bool) -> Iterator[tuple[str, torch.Tensor]]:
    for path, names in tensors_by_file(tensors).items():
        name = None
        try:
            if mmap:
                with safe_open(str(path), framework="pt", device="cpu") as f:
                    for name in names:
                        yield name, f.get_tensor(name)
            else:
                with open(path, "rb") as f:
                    for name in sorted(names, key=lambda n: tensors[n].offset):  # sequential reads
                        yield name, _read_owned(tensors[name], name, f)
        except CheckpointError:
            raise
        except _READ_ERRORS as exc:
            raise CheckpointError(
                f"{path}: failed while reading tensor {name!r} ({type(exc).__name__}: {exc})"
            ) from None


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
            sys.stderr.write(
                f"\rloading weights [{bar:<30}] {frac:6.1%} "
                f"{self.done / 2**30:.2f}/{self.total / 2**30:.2f} GiB"
            )
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write(f" {time.perf_counter() - self.start:.1f}s\n")


def _layout_fix(cfg: ModelConfig) -> Callable[[str, torch.Tensor], torch.Tensor]:
    def fix(name: str, tensor: torch.Tensor) -> torch.Tensor:
        if cfg.quant is not None:  # AWQ GEMM tensors -> pyvl's layout, rows = outputs like a float weight
            tensor = awq.to_rows(name, tensor)
        # wqkv's weight and bias, or a 4-bit wqkv's qweight/qzeros/scales: its rows regrouped
        if ".attention.wqkv." in name:
            return regroup_wqkv(tensor, cfg.llm)
        return tensor

    return fix


def _assign(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    ffn, _, layer = module_name.rpartition(".")
    if layer in ("w1", "w3") and ffn.endswith(".feed_forward"):  # the second layout fix: w1/w3 stacked
        model.get_submodule(ffn).load_gate_up(f"{layer}.{attr}", tensor)
        return
    module = model.get_submodule(module_name) if module_name else model
    setattr(module, attr, torch.nn.Parameter(tensor, requires_grad=False))


def load_weights(
    model: torch.nn.Module,
    cfg: ModelConfig,
    folder: Path,
    device: torch.device,
    dtype: torch.dtype,
    progress: bool | None = None,
    mmap: bool = False,
) -> None:
    """Fill a meta-device ``model`` from ``folder``: strict check first, then one tensor at a time.

    mmap=False (default): every parameter owns its memory. mmap=True: map the files; see the module notes.
    """
    tensors = check_checkpoint(folder, cfg)
    model_shapes = {k: awq.checkpoint_shape(k, tuple(v.shape)) for k, v in model.state_dict().items()}
    check_keys(model_shapes, tensors, Path(folder))
    total = sum(info.nbytes for info in tensors.values())
    # Default: a bar for loads over 1 GiB when stderr is a terminal (a long load should not look hung).
    bar = _Progress(
        total, enabled=progress if progress is not None else (total > 2**30 and sys.stderr.isatty())
    )
    fix = _layout_fix(cfg)
    for name, tensor in _iter_tensors(tensors, mmap):
        tensor = fix(name, tensor.to(device))  # on the device: an AWQ weight's repacking is faster there
        _assign(model, name, tensor.to(dtype) if tensor.is_floating_point() else tensor)
        bar.update(tensors[name].nbytes)
    bar.close()


def load_model(
    cfg: ModelConfig,
    ops,
    folder: Path,
    device: torch.device,
    dtype: torch.dtype,
    progress: bool | None = None,
    mmap: bool = False,
) -> torch.nn.Module:
    """Check the checkpoint against ``cfg``, then build the model on ``meta`` and fill it (see load_weights)."""
    from .models.vlm import InternVLChatModel

    check_checkpoint(folder, cfg)
    with torch.device("meta"):
        model = InternVLChatModel(cfg, ops)
    load_weights(model, cfg, folder, device, dtype, progress=progress, mmap=mmap)
    return model
