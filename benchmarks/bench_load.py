"""Load time and peak host memory of ``pyvl.load``: weights must exist once, never twice.

    python benchmarks/bench_load.py [MODEL_FOLDER] [--dtype bfloat16] [--device cpu] [--mmap] [--json | --jsonl]
    python benchmarks/bench_load.py --preset internvl-chat-v1-5 --device cuda [--max-gb N] [--jsonl]

Without a folder it writes a synthetic ~64 MB bf16 checkpoint (demo layout, wider LLM, 4 shards) to a temp
folder. ``--preset`` writes a random bf16 checkpoint of a preset's exact shapes instead (pyvl.bench.presets), in
5 GB shards as the released folders are, straight from one random block (so writing costs what the disk
takes); the files are then in the page cache, which is the state a model server restarts from. When the whole
checkpoint does not fit ``--max-gb`` (default: 80% of the free disk and of the available memory), the LLM keeps
only as many layers as fit, and the result also gives the full size's time extrapolated at the measured rate.

The load runs in this process after imports; the kernel's peak-RSS counter (VmHWM) is reset right before it
(``echo 5 > /proc/self/clear_refs``), so the reported peak is the load's own. The default load copies every
tensor into memory the model owns (plain reads, no mapping); ``--mmap`` measures the zero-copy mapping option
instead (``pyvl.loader.load_model(..., mmap=True)``), whose mapped pages count in RSS as they are touched. A
``pyvl.load`` includes building the engine (a 1 GB KV pool here) and, on CUDA, capturing its decode graphs:
``graph_capture_s`` says how much of ``load_s`` that was.
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path

SHARD_BYTES = 5 * 10**9
POOL_BYTES = 64 * 2**20  # one block of random bf16 values, repeated through every tensor


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _shapes(cfg_dict: dict) -> dict:
    import torch

    from pyvl.config import ModelConfig
    from pyvl.models.vlm import InternVLChatModel
    from pyvl.ops import resolve_ops

    with torch.device("meta"):
        model = InternVLChatModel(ModelConfig.from_dict(cfg_dict), resolve_ops())
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def write_synthetic_checkpoint(folder: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from pyvl.demo import demo_config_dict, write_demo_checkpoint

    write_demo_checkpoint(folder)
    cfg = demo_config_dict()
    cfg["llm_config"].update(
        hidden_size=512,
        intermediate_size=2048,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
    )
    cfg["hidden_size"] = 512
    (folder / "config.json").write_text(json.dumps(cfg))
    shapes = _shapes(cfg)
    for old in folder.glob("model-*.safetensors"):
        old.unlink()
    names = sorted(shapes)
    weight_map = {}
    gen = torch.Generator().manual_seed(0)
    for i in range(4):  # four shards, written one at a time
        part = {n: torch.randn(shapes[n], generator=gen).to(torch.bfloat16) for n in names[i::4]}
        file = f"model-{i + 1:05d}-of-00004.safetensors"
        save_file(part, str(folder / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
        del part
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )


def _checkpoint_bytes(cfg_dict: dict) -> int:
    return sum(2 * _numel(shape) for shape in _shapes(cfg_dict).values())


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _fit_layers(cfg_dict: dict, max_bytes: float) -> tuple[dict, int]:
    """The preset's config with as many LLM layers as fit ``max_bytes`` of bf16 (all of them when they do)."""
    import copy

    full = cfg_dict["llm_config"]["num_hidden_layers"]
    cfg = copy.deepcopy(cfg_dict)
    one = copy.deepcopy(cfg_dict)
    one["llm_config"]["num_hidden_layers"] = 1
    base = _checkpoint_bytes(one)
    one["llm_config"]["num_hidden_layers"] = 2
    per_layer = _checkpoint_bytes(one) - base
    layers = max(1, min(full, 1 + int((max_bytes - base) // per_layer)))
    cfg["llm_config"]["num_hidden_layers"] = layers
    return cfg, layers


def _write_shard(path: Path, tensors: list[tuple[str, tuple]], pool: memoryview) -> None:
    """A safetensors file of bf16 ``tensors``, their bytes cycled from ``pool`` (written as it goes)."""
    header, offset = {}, 0
    for name, shape in tensors:
        size = 2 * _numel(shape)
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        left = offset
        while left:
            chunk = pool[: min(left, len(pool))]
            f.write(chunk)
            left -= len(chunk)


def write_preset_checkpoint(folder: Path, preset: str, max_bytes: float) -> dict:
    """A random bf16 checkpoint of the preset's shapes (fewer LLM layers if the whole does not fit max_bytes)
    with the demo tokenizer; returns {"layers", "full_layers", "bytes", "full_bytes"}."""
    import torch

    from pyvl.bench.presets import preset_dict
    from pyvl.demo import ASSETS

    full = preset_dict(preset)
    cfg, layers = _fit_layers(full, max_bytes)
    folder.mkdir(parents=True, exist_ok=True)
    for (
        tokenizer_file
    ) in ASSETS.iterdir():  # the demo tokenizer: the loader needs one, its size is irrelevant
        shutil.copyfile(tokenizer_file, folder / tokenizer_file.name)
    (folder / "config.json").write_text(json.dumps(cfg))
    pool = memoryview(
        torch.randn(POOL_BYTES // 2, generator=torch.Generator().manual_seed(0))
        .to(torch.bfloat16)
        .view(torch.uint8)
        .numpy()
        .tobytes()
    )
    shards, current, size = [], [], 0
    for name, shape in sorted(_shapes(cfg).items()):
        if current and size + 2 * _numel(shape) > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += 2 * _numel(shape)
    shards.append(current)
    weight_map = {}
    for i, tensors in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_shard(folder / file, tensors, pool)
        weight_map.update({name: file for name, _ in tensors})
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    return {
        "layers": layers,
        "full_layers": full["llm_config"]["num_hidden_layers"],
        "bytes": _checkpoint_bytes(cfg),
        "full_bytes": _checkpoint_bytes(full),
    }


def _default_max_bytes(folder: Path) -> float:
    available = int(Path("/proc/meminfo").read_text().split("MemAvailable:")[1].split()[0]) * 1024
    return 0.8 * min(shutil.disk_usage(folder).free, available)


def measure(folder: Path, dtype: str, device: str, mmap: bool) -> dict:
    import torch

    import pyvl
    from pyvl.config import load_config
    from pyvl.loader import index_checkpoint, load_model
    from pyvl.ops import resolve_ops

    weight_bytes = sum(i.nbytes for i in index_checkpoint(folder).values())
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status_kib("VmRSS")
    t0 = time.perf_counter()
    capture_s = 0.0
    if mmap:
        dev = torch.device(device)
        model = load_model(
            load_config(folder), resolve_ops("auto", dev), folder, dev, getattr(torch, dtype), mmap=True
        )
    else:
        chat = pyvl.load(folder, device=device, dtype=dtype, kv_cache_gb=1.0)
        model, capture_s = chat.model, chat.engine.runner.graphs.capture_s
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = _status_kib("VmHWM")
    held = sum(p.numel() * p.element_size() for p in model.parameters())
    return {
        "folder": str(folder),
        "dtype": dtype,
        "device": device,
        "mmap": mmap,
        "load_s": round(seconds, 3),
        "graph_capture_s": round(capture_s, 3),
        "checkpoint_MiB": round(weight_bytes / 2**20, 1),
        "params_MiB": round(held / 2**20, 1),
        "GB_per_s": round(weight_bytes / 1e9 / seconds, 2),
        "peak_rss_growth_MiB": round((peak - before) / 1024, 1),
    }


def _run(args, tmp: Path, report) -> dict:
    folder = Path(args.folder) if args.folder else tmp / "checkpoint"
    written = None
    if args.preset:
        limit = args.max_gb * 1e9 if args.max_gb else _default_max_bytes(tmp)
        t0 = time.perf_counter()
        written = write_preset_checkpoint(folder, args.preset, limit)
        written["write_s"] = round(time.perf_counter() - t0, 2)
        report.set("setup", {"preset": args.preset, "device": args.device, "dtype": args.dtype, **written})
    elif not args.folder:
        write_synthetic_checkpoint(folder)
    result = measure(folder, args.dtype, args.device, args.mmap)
    if written and written["layers"] < written["full_layers"]:  # the full size at the measured rate
        result["full_size_load_s_extrapolated"] = round(written["full_bytes"] / 1e9 / result["GB_per_s"], 1)
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", nargs="?")
    p.add_argument(
        "--preset", default=None, help="write a random checkpoint of this preset's shapes and load it"
    )
    p.add_argument(
        "--max-gb", type=float, default=None, help="--preset: write at most this much (fewer layers)"
    )
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--mmap", action="store_true", help="map the files (zero-copy option) instead of copying")
    p.add_argument("--json", action="store_true")
    p.add_argument("--jsonl", action="store_true", help="JSON lines (pyvl.bench.report): setup, then the row")
    args = p.parse_args()
    if args.folder and args.preset:
        p.error("give a folder or --preset, not both")
    from pyvl.bench.report import Report

    report = Report(sys.stdout if args.jsonl else None)
    with tempfile.TemporaryDirectory() as tmp:
        result = _run(args, Path(tmp), report)
    report.row({"key": "load", **result})
    report.done()
    if args.json:
        print(json.dumps(result))
    elif not args.jsonl:
        for k, v in result.items():
            print(f"{k:>20}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
