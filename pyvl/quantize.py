"""``pyvl quantize``: a float InternVL 1.5 folder -> an AWQ GEMM folder (4-bit decoder linears) pyvl loads.

Each InternLM2 decoder linear (wqkv, wo, w1, w3, w2) is quantized per group of G inputs by round-to-nearest
with a zero point, as AutoAWQ's ``pseudo_quantize_tensor`` (w_bit 4, zero_point) does, over a range that
always includes 0 (as PyTorch's observers do):

    lo = min(min(w), 0)   hi = max(max(w), 0)   s = max(hi - lo, 1e-5) / 15, rounded to float16 as stored
    z = clamp(-round(lo / s), 0, 15)            q = clamp(round(w / s) + z, 0, 15)

For the groups of real weights, which hold both signs, that is AutoAWQ's result exactly; a group of one sign
(which AutoAWQ clamps badly: a constant 0.25 comes back as 1e-5) stays within half a step like the others.
The result is written as AWQ GEMM tensors (pyvl.quant.awq) with ``quantization_config`` in llm_config, where
LMDeploy's auto_awq writes it for InternVL. What is not done: AWQ's activation-aware scale search, which needs
calibration data; this is its round-to-nearest baseline, in the same format. Everything else (ViT, mlp1,
embeddings, norms, output head, tokenizer and other files) is copied unchanged.

The output folder is written under a temporary name and renamed when complete: it never exists half-written.
Memory: one source tensor and at most one output shard (``max_shard_bytes``) at a time.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ModelConfig, load_config
from .errors import CheckpointError, ConfigError
from .loader import PICKLE_SUFFIXES, TensorInfo, check_checkpoint
from .quant.awq import NATURAL_ORDER, QUANTIZED_LINEARS, from_rows, pack_nibbles, quantization_config

__all__ = ["quantize_weight", "quantize_folder", "QUANTIZED_WEIGHT_SUFFIXES"]

QUANTIZED_WEIGHT_SUFFIXES = tuple(f".{name}.weight" for name in QUANTIZED_LINEARS)
MAX_SHARD_BYTES = 5 * 10**9  # the released V1-5 shards are about 5 GB
_REWRITTEN = ("model.safetensors.index.json", "config.json")  # and every *.safetensors


def quantize_weight(
    weight: torch.Tensor, group: int, scale_dtype: torch.dtype = torch.float16
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A float weight [N, K] -> (qweight int32 [N, K/8], qzeros uint8 [N, K/G], scales [N, K/G] in
    ``scale_dtype``) in pyvl's layout, by round-to-nearest with a zero point (see the module docstring)."""
    n, k = weight.shape
    w = weight.float().reshape(n, k // group, group)
    high, low = w.amax(dim=-1).clamp(min=0), w.amin(dim=-1).clamp(max=0)  # the range holds 0
    scales = ((high - low).clamp(min=1e-5) / 15).to(scale_dtype)
    if not torch.isfinite(scales).all():
        raise CheckpointError(
            f"a group's range {float((high - low).max()):.3g} overflows {scale_dtype} scales"
        )
    s = scales.float()
    zeros = (-torch.round(low / s)).clamp(0, 15)
    q = (torch.round(w / s[..., None]) + zeros[..., None]).clamp(0, 15)
    return pack_nibbles(q.reshape(n, k).to(torch.uint8), NATURAL_ORDER), zeros.to(torch.uint8), scales


def _quantized_config(src: Path, group_size: int) -> tuple[dict, ModelConfig]:
    """The source config.json with ``llm_config.quantization_config`` added, and it parsed (which checks that
    the group size divides every decoder linear)."""
    path = src / "config.json"
    raw = json.loads(path.read_text(encoding="utf-8"))  # load_config has read it already
    raw["llm_config"]["quantization_config"] = quantization_config(group_size)
    return raw, ModelConfig.from_dict(raw, source=f"{path} with group_size {group_size}")


def _output_tensors(
    tensors: dict[str, TensorInfo], cfg: ModelConfig, device: torch.device
) -> Iterator[tuple[str, torch.Tensor]]:
    """Every output tensor, file by file: decoder linears' weights as AWQ GEMM triples, the rest as read."""
    by_file: dict[Path, list[str]] = {}
    for name, info in tensors.items():
        by_file.setdefault(info.file, []).append(name)
    for path, names in by_file.items():
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in names:
                tensor = f.get_tensor(name)
                if not name.endswith(QUANTIZED_WEIGHT_SUFFIXES):
                    yield name, tensor
                    continue
                try:
                    rows = quantize_weight(tensor.to(device), cfg.quant.group(tensor.shape[1]))
                except CheckpointError as exc:
                    raise CheckpointError(f"{path}: tensor {name!r}: {exc}") from None
                for attr, packed in from_rows(*rows).items():
                    yield f"{name.removesuffix('.weight')}.{attr}", packed.cpu()


def _write_shards(tensors: Iterator[tuple[str, torch.Tensor]], folder: Path, max_shard_bytes: int) -> None:
    """Shards of at most ``max_shard_bytes`` (one tensor per shard if it is larger) named as released:
    ``model.safetensors`` alone, or ``model-0000i-of-0000n.safetensors`` and ``model.safetensors.index.json``.
    """
    shards: list[dict[str, torch.Tensor]] = []
    pending: dict[str, torch.Tensor] = {}
    pending_bytes = total = 0

    def flush() -> None:
        save_file(pending, str(folder / f"shard-{len(shards)}.tmp"), metadata={"format": "pt"})
        shards.append(dict.fromkeys(pending))  # names only: the tensors are written and released
        pending.clear()

    for name, tensor in tensors:
        size = tensor.numel() * tensor.element_size()
        if pending and pending_bytes + size > max_shard_bytes:
            flush()
            pending_bytes = 0
        pending[name] = tensor.contiguous()
        pending_bytes += size
        total += size
    flush()
    if len(shards) == 1:
        (folder / "shard-0.tmp").rename(folder / "model.safetensors")
        return
    weight_map = {}
    for i, names in enumerate(shards):
        shard = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        (folder / f"shard-{i}.tmp").rename(folder / shard)
        weight_map.update(dict.fromkeys(names, shard))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def quantize_folder(
    src: str | Path,
    dst: str | Path,
    group_size: int = 128,
    device: str | torch.device = "cpu",
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Path:
    """Write ``dst``, an AWQ GEMM copy of the float InternVL folder ``src`` (see the module docstring), and
    return it. ``device``: where the weights are quantized. Raises ConfigError / CheckpointError naming the
    file, key or value at fault; ``dst`` must not exist yet, and is never left half-written."""
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise CheckpointError(f"{src}: not a directory; pyvl quantize takes a model folder")
    if dst.exists():
        raise ConfigError(f"{dst}: already exists; pyvl quantize writes a new folder")
    if not dst.parent.is_dir():
        raise ConfigError(f"{dst.parent}: no such folder to write {dst.name} into")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device}: no CUDA device is available; use device='cpu'")
    source_cfg = load_config(src)
    if source_cfg.quant is not None:
        raise ConfigError(
            f"{src / 'config.json'}: the model is already quantized (it has a quantization_config)"
        )
    tensors = check_checkpoint(src, source_cfg)
    raw, cfg = _quantized_config(src, group_size)
    work = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        _write_shards(_output_tensors(tensors, cfg, torch.device(device)), work, max_shard_bytes)
        (work / "config.json").write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")
        for path in sorted(src.iterdir()):  # tokenizer, generation config, remote code, ...: as they are
            skip = path.suffix in (*PICKLE_SUFFIXES, ".safetensors") or path.name in _REWRITTEN
            if path.is_file() and not skip:
                shutil.copy2(path, work / path.name)
        work.rename(dst)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return dst
