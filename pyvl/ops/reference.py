"""Plain-PyTorch reference of every op pyvl dispatches: the CPU backend, the spec and the test oracle.

Each op computes in float32 where the original InternVL code does (norm statistics, softmax, rotary tables)
and casts back where it does. Layouts:
  attention q: [B, Hq, Sq, D], k/v: [B, Hkv, Sk, D] (GQA: query head n reads KV head n // (Hq // Hkv))
  paged KV pool (one layer): k_pool/v_pool [num_blocks, Hkv, BLOCK_SIZE, D]; slot = block_id * BLOCK_SIZE + offset;
    a sequence's keys 0..L-1 lie in the blocks its block table lists, in order; paged q/out are [tokens, Hq, D]
  rotary cos/sin: [B, S, D] already gathered at the token positions (rotate-half, duplicated halves)
  pixel_shuffle x: [N, h, w, C] patch grid (row-major tokens) -> [N, h*w*r^2, C/r^2]
  resize_tiles image: RGB uint8 [H, W, 3] -> tiles [cols*rows (+1 thumbnail), 3, T, T] (NCHW)
  w4a16_linear weight (pyvl.quant): qweight int32 [N, K/8] (word c of row n: columns 8c..8c+7, column 8c + j
    in bits 4j..4j+3), qzeros uint8 [N, K/G], scales [N, K/G];
    W[n, k] = (q[n, k] - qzeros[n, k//G]) * scales[n, k//G]
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import ImageError

__all__ = [
    "rms_norm",
    "add_rms_norm",
    "layer_norm",
    "vit_attention",
    "causal_attention",
    "apply_rotary",
    "pixel_shuffle",
    "silu_mul",
    "gelu",
    "resize_tiles",
    "tile_boxes",
    "tile_images",
    "normalize_tiles",
    "store_kv",
    "gather_kv",
    "paged_prefill_attention",
    "paged_decode_attention",
    "dequantize_w4",
    "w4a16_linear",
]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """w * cast_back(x * rsqrt(mean(x^2) + eps)), statistics in float32 (InternRMSNorm / InternLM2RMSNorm)."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual): a decoder layer's residual add and the next norm, the sum rounded
    to the activation dtype first, as the original adds then normalises."""
    total = x + residual
    return rms_norm(total, weight, eps), total


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """Standard LayerNorm over the last dim (InternViT-300M norms, the mlp1 projector norm)."""
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def vit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Bidirectional softmax(q k^T / sqrt(D)) v over [B, H, S, D], in float32, cast back."""
    scale = q.shape[-1] ** -0.5
    scores = (q.float() * scale) @ k.float().transpose(-2, -1)  # (B, H, S, S)
    return (scores.softmax(dim=-1) @ v.float()).to(q.dtype)


def causal_mask(sq: int, sk: int, device) -> torch.Tensor:
    """Which keys each of the last Sq queries may see: bool (Sq, Sk)."""
    q_pos = torch.arange(sk - sq, sk, device=device)
    k_pos = torch.arange(sk, device=device)
    return k_pos[None, :] <= q_pos[:, None]


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal GQA attention of Sq new queries [B, Hq, Sq, D] over Sk keys [B, Hkv, Sk, D] (the queries are the
    last Sq positions): the oracle the paged kernels are tested against."""
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    group = hq // hkv
    qf = q.float().reshape(b, hkv, group * sq, d)  # query heads sharing a KV head, stacked along rows
    scores = (qf @ k.float().transpose(-2, -1)) / (d**0.5)  # (B, Hkv, G*Sq, Sk)
    scores = scores.view(b, hkv, group, sq, sk).masked_fill(~causal_mask(sq, sk, q.device), float("-inf"))
    probs = scores.softmax(dim=-1).to(q.dtype).float()  # the original casts P back before P @ V
    out = probs.view(b, hkv, group * sq, sk) @ v.float()
    return out.view(b, hq, sq, d).to(q.dtype)


def store_kv(
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write token t's K/V [N, Hkv, D] into the pools at slot slot_mapping[t]; slots < 0 (padding rows of a
    CUDA-graph batch) are skipped. In place. The boolean selection syncs the host: eager use only."""
    block_size = k_pool.shape[2]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    blocks, offsets = slots // block_size, slots % block_size
    k_pool[blocks, :, offsets] = k_new[
        keep
    ]  # advanced indices around a slice: the indexed view is [n, Hkv, D]
    v_pool[blocks, :, offsets] = v_new[keep]


def gather_kv(pool: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """A sequence's first ``length`` keys (or values) read through its block table: [1, Hkv, length, D]."""
    n_blocks = -(-length // pool.shape[2])
    blocks = pool[block_table[:n_blocks].long()]  # [n, Hkv, BS, D]
    hkv, d = pool.shape[1], pool.shape[3]
    return blocks.transpose(0, 1).reshape(1, hkv, -1, d)[:, :, :length]


def paged_prefill_attention(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_table: torch.Tensor, context_len: int
) -> torch.Tensor:
    """Causal GQA attention of one sequence's last Sq positions (q [Sq, Hq, D]) over its keys
    0..context_len-1, read through block_table [nb] (they include the Sq new tokens, already stored).
    Returns [Sq, Hq, D]: :func:`causal_attention` on the gathered keys."""
    k = gather_kv(k_pool, block_table, context_len)
    v = gather_kv(v_pool, block_table, context_len)
    out = causal_attention(q.transpose(0, 1)[None], k, v)  # [1, Hq, Sq, D]
    return out[0].transpose(0, 1).contiguous()


def paged_decode_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
) -> torch.Tensor:
    """One query per row (q [B, Hq, D], at position context_lens[b] - 1) over keys 0..context_lens[b]-1 read
    through block_tables[b]; rows with length 0 are padding and give zeros. Returns [B, Hq, D]. All rows in one
    batched product over the longest row's keys, shorter rows masked (the maximum length is read on the host:
    the eager/CPU path; the Triton kernel is the capturable one). Numerics as :func:`causal_attention`."""
    b, hq, d = q.shape
    hkv, block = k_pool.shape[1], k_pool.shape[2]
    longest = int(context_lens.max()) if b else 0
    if longest == 0:
        return torch.zeros_like(q)
    tables = block_tables[:, : -(-longest // block)].long()
    k = k_pool[tables].permute(0, 2, 1, 3, 4).reshape(b, hkv, -1, d)[:, :, :longest]  # (B, Hkv, L, D)
    v = v_pool[tables].permute(0, 2, 1, 3, 4).reshape(b, hkv, -1, d)[:, :, :longest]
    qf = q.float().view(b, hkv, hq // hkv, d)  # query heads sharing a KV head, as rows
    scores = (qf @ k.float().transpose(-2, -1)) / (d**0.5)  # (B, Hkv, G, L)
    real = torch.arange(longest, device=q.device)[None] < context_lens[:, None].long()  # (B, L)
    scores = scores.masked_fill(~real[:, None, None], float("-inf"))
    probs = scores.softmax(dim=-1).to(q.dtype).float()  # the original casts P back before P @ V
    # a short row's table may point past its keys at anything (NaN included): those values must not count
    v = v.float().masked_fill(~real[:, None, :, None], 0.0)
    out = (probs @ v).view(b, hq, d).to(q.dtype)
    return out.masked_fill((context_lens == 0)[:, None, None], 0.0)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """x * cos + rotate_half(x) * sin on q [B, Hq, S, D] and k [B, Hkv, S, D]; cos/sin [B, S, D]."""
    cos = cos[:, None].to(q.dtype)  # the original rounds the tables to the activation dtype first
    sin = sin[:, None].to(q.dtype)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def pixel_shuffle(x: torch.Tensor, scale: float, ps_version: str) -> torch.Tensor:
    """InternVL's pixel (un)shuffle of a patch grid [N, h, w, C] -> [N, h*w*scale^2, C/scale^2].

    Output cell (a, b) holds [x(2a,2b) | x(2a,2b+1) | x(2a+1,2b) | x(2a+1,2b+1)] for scale 0.5. v1 leaves the
    grid transposed (token b*16+a), v2 swaps it back (token a*16+b). Written with the original's view/permute
    sequence because that sequence *is* the definition.
    """
    n, h, w, c = x.shape
    x = x.reshape(n, h, int(w * scale), int(c / scale))  # merge horizontal neighbours
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(w * scale), int(h * scale), int(c / (scale * scale)))  # merge vertical neighbours
    if ps_version == "v2":
        x = x.permute(0, 2, 1, 3).contiguous()
    return x.reshape(n, -1, x.shape[-1])


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU gate: silu(w1 x) * (w3 x)."""
    return F.silu(gate) * up


def gelu(x: torch.Tensor) -> torch.Tensor:
    """Exact (erf) GELU, as both the InternViT MLP and mlp1 use."""
    return F.gelu(x)


def tile_boxes(cols: int, rows: int, tile: int) -> list[tuple[int, int, int, int]]:
    """Crop boxes (left, top, right, bottom) of the grid tiles, row-major."""
    return [
        ((k % cols) * tile, (k // cols) * tile, (k % cols + 1) * tile, (k // cols + 1) * tile)
        for k in range(cols * rows)
    ]


_INT_MAX = 2**31 - 1


def _check_bicubic_tables(size: tuple[int, int], out: tuple[int, int]) -> None:
    """Refuse, as pyvl's native resize does, a BICUBIC resize whose weight table Pillow cannot allocate (its
    precompute_coeffs raises a bare MemoryError when out_size x taps doubles exceed INT_MAX bytes)."""
    for in_size, out_size in zip(size, out):
        taps = math.ceil(2.0 * max(in_size / out_size, 1.0)) * 2 + 1
        if out_size * taps * 8 > _INT_MAX:
            raise ImageError(
                f"resize_tiles: {size[0]}x{size[1]} image to {out[0]}x{out[1]}: resizing {in_size} pixels to "
                f"{out_size} needs a weight table of {out_size} x {taps} taps, more than Pillow allows "
                f"({_INT_MAX} bytes)"
            )


def tile_images(img: Image.Image, cols: int, rows: int, tile: int, thumbnail: bool) -> list[Image.Image]:
    """The original dynamic_preprocess after its grid choice: resize the RGB image to the grid with Pillow
    BICUBIC, crop row-major, then the whole image resized to one tile last when asked for and cols*rows > 1."""
    thumbnail = thumbnail and cols * rows != 1
    _check_bicubic_tables(img.size, (tile * cols, tile * rows))
    if thumbnail:
        _check_bicubic_tables(img.size, (tile, tile))
    # BICUBIC is Pillow's default for RGB (the original passes no filter); explicit so the mode can't change it.
    resized = img.resize((tile * cols, tile * rows), Image.Resampling.BICUBIC)
    tiles = [resized.crop(box) for box in tile_boxes(cols, rows, tile)]
    if thumbnail:
        tiles.append(img.resize((tile, tile), Image.Resampling.BICUBIC))
    return tiles


def normalize_tiles(tiles: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float32 [N, 3, H, W]: torchvision ToTensor + Normalize(mean, std), in float32."""
    # NHWC -> NCHW (the layout the ViT patch embedding expects); contiguous like ToTensor's output.
    x = torch.from_numpy(np.ascontiguousarray(tiles)).permute(0, 3, 1, 2).contiguous().float().div(255)
    mean_t = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    std_t = torch.tensor(std, dtype=torch.float32)[:, None, None]
    return (x - mean_t) / std_t


def resize_tiles(
    image: np.ndarray,
    cols: int,
    rows: int,
    tile: int,
    thumbnail: bool,
    mean: Sequence[float],
    std: Sequence[float],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """RGB uint8 [H, W, 3] -> normalised tiles [cols*rows (+1), 3, tile, tile] in ``dtype`` on ``device``.

    The original pipeline (Pillow tiles, then ToTensor + Normalize) for a grid already chosen; other dtypes
    are the float32 tiles cast.
    """
    img = Image.fromarray(
        np.ascontiguousarray(image)
    )  # [H, W, 3] uint8, pixels 3 or 4 bytes apart -> mode RGB
    tiles = tile_images(img, cols, rows, tile, thumbnail)
    pixels = normalize_tiles(np.stack([np.asarray(t) for t in tiles]), mean, std)  # (N, T, T, 3) -> NCHW
    return pixels.to(device=device, dtype=dtype)


def dequantize_w4(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The float32 weight [N, K] of a packed 4-bit one (layout in the module docstring; G = K / groups)."""
    n, words = qweight.shape
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=qweight.device)
    q = ((qweight[:, :, None] >> shifts) & 0xF).reshape(
        n, words * 8
    )  # (N, K/8, 8): nibble j is column 8c + j
    group = q.shape[1] // scales.shape[1]
    zeros = qzeros.float().repeat_interleave(group, dim=1)
    return (q.float() - zeros) * scales.float().repeat_interleave(group, dim=1)


def w4a16_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [..., K] @ W^T (+ bias) -> [..., N], W dequantized in float32 and rounded to x's dtype (what the
    kernels feed the tensor cores), then an ordinary linear in x's dtype."""
    return F.linear(x, dequantize_w4(qweight, qzeros, scales).to(x.dtype), bias)
