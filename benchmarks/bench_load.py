"""Load time and peak host memory of ``pyvl.load``: weights must exist once, never twice.

    python benchmarks/bench_load.py [MODEL_FOLDER] [--dtype bfloat16] [--device cpu] [--mmap] [--json]

Without a folder it writes a synthetic ~64 MB bf16 checkpoint (demo layout, wider LLM, 4 shards) to a temp
folder. The load runs in this process after imports; the kernel's peak-RSS counter (VmHWM) is reset right
before it (``echo 5 > /proc/self/clear_refs``), so the reported peak is the load's own. The default load copies
every tensor into memory the model owns (plain reads, no mapping); ``--mmap`` measures the zero-copy mapping
option instead (``pyvl.loader.load_model(..., mmap=True)``), whose mapped pages count in RSS as they are touched.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def write_synthetic_checkpoint(folder: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from pyvl.demo import demo_config_dict, write_demo_checkpoint

    write_demo_checkpoint(folder)
    cfg = demo_config_dict()
    cfg["llm_config"].update(hidden_size=512, intermediate_size=2048, num_hidden_layers=8,
                             num_attention_heads=8, num_key_value_heads=2)
    cfg["hidden_size"] = 512
    (folder / "config.json").write_text(json.dumps(cfg))
    from pyvl.config import ModelConfig
    from pyvl.models.vlm import InternVLChatModel
    from pyvl.ops import resolve_ops

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in InternVLChatModel(ModelConfig.from_dict(cfg), resolve_ops()).state_dict().items()}
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
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


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
    if mmap:
        dev = torch.device(device)
        model = load_model(load_config(folder), resolve_ops("auto", dev), folder, dev, getattr(torch, dtype),
                           mmap=True)
    else:
        model = pyvl.load(folder, device=device, dtype=dtype).model
    seconds = time.perf_counter() - t0
    peak = _status_kib("VmHWM")
    held = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"folder": str(folder), "dtype": dtype, "device": device, "mmap": mmap, "load_s": round(seconds, 3),
            "checkpoint_MiB": round(weight_bytes / 2**20, 1), "params_MiB": round(held / 2**20, 1),
            "peak_rss_growth_MiB": round((peak - before) / 1024, 1)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", nargs="?")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--mmap", action="store_true", help="map the files (zero-copy option) instead of copying")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.folder) if args.folder else Path(tmp) / "synthetic"
        if not args.folder:
            write_synthetic_checkpoint(folder)
        result = measure(folder, args.dtype, args.device, args.mmap)
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>20}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
