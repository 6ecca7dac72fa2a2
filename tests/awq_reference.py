"""AWQ GEMM as AutoAWQ defines it, written here from its public source (casper-hansen/AutoAWQ:
``quantize/quantizer.py`` ``pseudo_quantize_tensor``, ``modules/linear/gemm.py`` ``WQLinear_GEMM.from_linear``,
``utils/packing_utils.py`` ``dequantize_gemm``) and independent of pyvl.quant: the tests' oracle for the
format, and a writer of AWQ checkpoints for the loading tests.

    quantize: per group of G inputs of a row, s = max(max - min, 1e-5) / 15, z = clamp(-round(min / s), 0, 15),
              q = clamp(round(w / s) + z, 0, 15); s stored as fp16
    pack:     for each word column c and nibble i: qweight[:, c] |= intweight[:, 8c + ORDER[i]] << 4i
    unpack:   iweight = (qweight[..., None] >> [0, 4, .., 28]) & 15 viewed [.., 8C], columns put back in
              output order by the reverse order (0, 4, 1, 5, 2, 6, 3, 7); W^T = (iweight - izeros) * scales
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ's order_map
REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]  # AutoAWQ's AWQ_REVERSE_ORDER
DECODER_LINEARS = ("attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w3", "feed_forward.w2")


def pack(intweight: torch.Tensor) -> torch.Tensor:
    """int [R, 8C] values 0..15 -> int32 [R, C], AutoAWQ's column loop (in int64, then the low 32 bits)."""
    words = torch.zeros(intweight.shape[0], intweight.shape[1] // 8, dtype=torch.int64)
    for col in range(words.shape[1]):
        for i in range(8):
            words[:, col] |= intweight[:, col * 8 + ORDER[i]].to(torch.int64) << (i * 4)
    return (words - (words >= 2**31).to(torch.int64) * 2**32).to(torch.int32)


def unpack(words: torch.Tensor) -> torch.Tensor:
    """int32 [R, C] -> int64 [R, 8C] in output order."""
    shifts = torch.arange(0, 32, 4)
    nibbles = ((words.to(torch.int64)[:, :, None] >> shifts) & 15).view(words.shape[0], -1)
    order = torch.arange(nibbles.shape[1]).view(-1, 8)[:, REVERSE_ORDER].reshape(-1)
    return nibbles[:, order]


def dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The float32 W [N, K] of AWQ GEMM tensors qweight [K, N/8], qzeros [K/G, N/8], scales [K/G, N]."""
    group = qweight.shape[0] // scales.shape[0]
    iweight = unpack(qweight)
    izeros = unpack(qzeros).repeat_interleave(group, dim=0)
    return ((iweight - izeros).float() * scales.float().repeat_interleave(group, dim=0)).t().contiguous()


def quantize(weight: torch.Tensor, group: int) -> dict[str, torch.Tensor]:
    """A float weight [N, K] -> its AWQ GEMM tensors, as AutoAWQ's round-to-nearest (w_bit 4, zero_point)
    and WQLinear_GEMM packing write them (without the activation-aware scaling, which only changes W)."""
    n, k = weight.shape
    w = weight.float().reshape(-1, group)  # (N * K/G, G): one row a group, as AutoAWQ reshapes it
    max_val, min_val = w.amax(dim=1, keepdim=True), w.amin(dim=1, keepdim=True)
    scales = (max_val - min_val).clamp(min=1e-5) / 15
    zeros = (-torch.round(min_val / scales)).clamp(0, 15)
    intweight = torch.clamp(torch.round(w / scales) + zeros, 0, 15).reshape(n, k)
    # AutoAWQ stores [in, out] (and [in/G, out] for zeros and scales): the transposes of pyvl's rows
    return {
        "qweight": pack(intweight.t().to(torch.int64)),
        "qzeros": pack(zeros.reshape(n, k // group).t().to(torch.int64)),
        "scales": scales.reshape(n, k // group).t().contiguous().half(),
    }


def random_linear(n: int, k: int, group: int, gen: torch.Generator):
    """Random AWQ GEMM tensors of a [n, k] linear and its float32 weight: q, z uniform 0..15, fp16 scales."""
    q = torch.randint(0, 16, (k, n), generator=gen)
    z = torch.randint(0, 16, (k // group, n), generator=gen)
    s = (torch.rand(k // group, n, generator=gen) * 0.05 + 0.005).half()
    tensors = {"qweight": pack(q), "qzeros": pack(z), "scales": s}
    return tensors, dequantize(tensors["qweight"], tensors["qzeros"], s)


def awq_config(group_size: int) -> dict:
    return {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm"}


def write_awq_pair(src: Path, awq_dir: Path, twin_dir: Path, group: int) -> None:
    """From the float folder ``src``: ``awq_dir``, its decoder linears quantized by :func:`quantize` into AWQ
    GEMM tensors (``quantization_config`` in llm_config, as LMDeploy's auto_awq writes it), and ``twin_dir``,
    the same model in float32 holding those tensors' dequantized weights. Every other tensor and file is
    copied."""
    tensors = {}
    for path in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(path))
    quantized, twin = {}, {}
    for name, tensor in tensors.items():
        prefix = name.removesuffix(".weight")
        if name.endswith(".weight") and prefix.endswith(DECODER_LINEARS):
            awq = quantize(tensor, group)
            quantized.update({f"{prefix}.{attr}": t for attr, t in awq.items()})
            twin[name] = dequantize(awq["qweight"], awq["qzeros"], awq["scales"])
        else:
            quantized[name] = tensor
            twin[name] = tensor.float()
    for folder, weights in ((awq_dir, quantized), (twin_dir, twin)):
        folder.mkdir()
        for path in src.iterdir():
            if not path.name.startswith("model"):
                shutil.copy(path, folder / path.name)
        save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((awq_dir / "config.json").read_text())
    config["llm_config"]["quantization_config"] = awq_config(group)
    (awq_dir / "config.json").write_text(json.dumps(config))
