"""InternVL's pixel (un)shuffle as one gather-copy (Triton), optionally reading straight from the ViT output.

For scale 0.5 the reference (``pyvl.ops.reference.pixel_shuffle``, a view/permute sequence) is the permutation

    out[n, t, q*C + c] = x[n, 2a + q // 2, 2j + q % 2, c]        q = 0..3, c = 0..C-1
    v2: t = a * (w/2) + j        v1: t = j * (h/2) + a          (v1 leaves the 2x2-merged grid transposed)

x [N, h, w, C] -> out [N, h*w/4, 4C]. Each output token is four contiguous runs of C values, each copied from
one contiguous source row, so loads and stores coalesce along C; nothing is computed, so the result is
bit-identical in any dtype. x may be any strided view (4 strides are passed): ``pixel_shuffle_from_vit`` hands
the kernel ``vit_hidden[:, 1:]`` seen as [N, g, g, C], which skips the CLS row by pointer offset instead of the
reference's slice + reshape copies. out is contiguous by default; an ``out=`` of any strides is accepted.
Grid: (cdiv(N * h*w/4, BLOCK_T), cdiv(C, BLOCK_C)); a program copies BLOCK_T tokens x BLOCK_C channels of all
four quadrants.

The projector's LayerNorm is not fused here: it needs the whole 4C row per program and would turn this copy
into a reduction kernel; mlp1 runs it right after, on the contiguous output.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import DTYPES, check_device, interpreting

__all__ = ["pixel_shuffle", "pixel_shuffle_from_vit"]

_VERSIONS = ("v1", "v2")


@triton.jit
def _pixel_shuffle_kernel(
    X,
    Out,
    total,
    tokens,
    half_h,
    half_w,
    C,
    stride_xn,
    stride_xh,
    stride_xw,
    stride_xc,
    stride_on,
    stride_ot,
    stride_oc,
    V2: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    g = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)  # output token over the batch
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    n = g // tokens
    t = g % tokens
    if V2:  # token a * (w/2) + j
        a = t // half_w
        j = t % half_w
    else:  # token j * (h/2) + a
        j = t // half_h
        a = t % half_h
    mask = (g < total)[:, None] & (c < C)[None, :]
    src = X + (n * stride_xn + (2 * a) * stride_xh + (2 * j) * stride_xw)[:, None] + (c * stride_xc)[None, :]
    dst = Out + (n * stride_on + t * stride_ot)[:, None] + (c * stride_oc)[None, :]
    for q in tl.static_range(4):  # quadrant (dy, dx) = (q // 2, q % 2) -> channels [q*C, (q+1)*C)
        v = tl.load(src + (q // 2) * stride_xh + (q % 2) * stride_xw, mask=mask)
        tl.store(dst + q * C * stride_oc, v, mask=mask)


def _blocks(c: int, interpreting: bool) -> tuple[int, int]:
    """(BLOCK_T, BLOCK_C): 4096-element tiles of 128-channel rows on the GPU (256-byte runs in bf16, no tail
    for C = 3200 or 1024); under the interpreter few, big programs, since each costs about a millisecond."""
    if interpreting:
        return 64, triton.next_power_of_2(c)
    block_c = min(triton.next_power_of_2(c), 128)
    return 4096 // block_c, block_c


def _launch(name: str, x: torch.Tensor, ps_version: str, out: torch.Tensor | None) -> torch.Tensor:
    """x: a [N, h, w, C] view (any strides) -> out [N, h*w/4, 4C]."""
    if x.dtype not in DTYPES:
        raise ValueError(f"{name}: dtype {x.dtype} is not one of {DTYPES}")
    if ps_version not in _VERSIONS:
        raise ValueError(f"{name}: ps_version must be one of {_VERSIONS}, got {ps_version!r}")
    check_device(x, name)
    n, h, w, c = x.shape
    if h % 2 or w % 2 or min(n, h, w, c) == 0:
        raise ValueError(
            f"{name}: the patch grid must be non-empty with an even height and width for scale 0.5, "
            f"got [N, h, w, C] = {tuple(x.shape)}"
        )
    shape = (n, h * w // 4, 4 * c)
    if out is None:
        out = torch.empty(shape, dtype=x.dtype, device=x.device)
    elif tuple(out.shape) != shape or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(
            f"{name}: out must be {shape} {x.dtype} on {x.device}; got {tuple(out.shape)} {out.dtype} "
            f"on {out.device}"
        )
    block_t, block_c = _blocks(c, interpreting())
    grid = (triton.cdiv(n * shape[1], block_t), triton.cdiv(c, block_c))
    _pixel_shuffle_kernel[grid](
        x,
        out,
        n * shape[1],
        shape[1],
        h // 2,
        w // 2,
        c,
        *x.stride(),
        *out.stride(),
        V2=ps_version == "v2",
        BLOCK_T=block_t,
        BLOCK_C=block_c,
        num_warps=4,
    )
    return out


def pixel_shuffle(
    x: torch.Tensor, scale: float, ps_version: str, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The reference's pixel_shuffle(x [N, h, w, C], 0.5, ps_version) -> [N, h*w/4, 4C], bit-identical."""
    if scale != 0.5:
        raise ValueError(
            f"pixel_shuffle: the kernel implements scale 0.5 (InternVL's downsample_ratio), got {scale}"
        )
    if x.dim() != 4:
        raise ValueError(f"pixel_shuffle: x must be a [N, h, w, C] patch grid, got shape {tuple(x.shape)}")
    return _launch("pixel_shuffle", x, ps_version, out)


def pixel_shuffle_from_vit(
    vit_hidden: torch.Tensor, ps_version: str, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """ViT output [N, 1 + g*g, C] (CLS first) -> pixel_shuffle(patches [N, g, g, C], 0.5) [N, g*g/4, 4C].

    Equal to ``reference.pixel_shuffle(vit_hidden[:, 1:].reshape(N, g, g, C), 0.5, ps_version)``, without the
    copies: the CLS row is skipped by pointer offset and the grid is read through strides.
    """
    if vit_hidden.dim() != 3:
        raise ValueError(
            f"pixel_shuffle_from_vit: vit_hidden must be [N, 1 + g*g, C], got shape {tuple(vit_hidden.shape)}"
        )
    n, s, c = vit_hidden.shape
    g = math.isqrt(max(s - 1, 0))
    if s < 2 or g * g != s - 1:
        raise ValueError(
            f"pixel_shuffle_from_vit: vit_hidden has {s} tokens; expected CLS + a square grid "
            f"(1 + g*g, e.g. 1025 = 1 + 32*32)"
        )
    patches = vit_hidden[:, 1:]  # (N, g*g, C), a view: CLS skipped by the storage offset
    sn, st, sc = patches.stride()
    grid = patches.as_strided(
        (n, g, g, c), (sn, g * st, st, sc)
    )  # (N, g, g, C), rows of the grid g tokens apart
    return _launch("pixel_shuffle_from_vit", grid, ps_version, out)
