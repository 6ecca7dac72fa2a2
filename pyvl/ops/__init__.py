"""The op layer: one seam between the model code and the implementations of its hot ops.

The backend is chosen once, when a model is loaded (``pyvl.load(..., backend=...)``), and frozen into an
:class:`Ops` table that the modules call through. ``reference`` is plain PyTorch (:mod:`pyvl.ops.reference`);
``triton`` resolves each op to a kernel in ``pyvl.kernels`` when one is registered for it and tells you when
one is not. ``auto`` takes the kernels on CUDA; on the CPU it takes PyTorch's fused attention
(:mod:`pyvl.ops.sdpa`) for bf16/fp16, where the float32 references are slow at no gain in accuracy, and the
references otherwise. ``resize_tiles`` (image preprocessing) is served by the compiled kernels of
``pyvl._C`` (CUDA on a CUDA device, C++ otherwise) under every backend but ``reference``, which runs the
Pillow + torch pipeline; all three agree bit for bit. Per-op overrides
(``op_backends={"vit_attention": "reference"}``) exist to bisect numerics. ``Ops.backends`` says what
serves each op. No import-time switches, no globals: two models loaded with different backends coexist.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields

import torch

from . import reference, sdpa

__all__ = ["Ops", "BACKENDS", "OP_NAMES", "resolve_ops"]

BACKENDS = ("auto", "reference", "triton")


@dataclass(frozen=True)
class Ops:
    """The table of op implementations a model calls. Field names are the op names, same on every side."""

    rms_norm: Callable
    add_rms_norm: Callable  # (x, residual, weight, eps) -> (rms_norm(x + residual), x + residual)
    layer_norm: Callable
    vit_attention: Callable
    apply_rotary: Callable
    pixel_shuffle: Callable
    silu_mul: Callable
    gelu: Callable
    resize_tiles: (
        Callable  # (image.rgb_pixels' [H, W, 3], cols, rows, tile, thumbnail, mean, std, dtype, device)
    )
    # Paged KV (pool k/v [num_blocks, Hkv, BLOCK_SIZE, D] per layer; slot = block * BLOCK_SIZE + offset):
    store_kv: (
        Callable  # (k_new, v_new [N, Hkv, D], k_pool, v_pool, slot_mapping [N] int64; < 0 skipped), in place
    )
    paged_prefill_attention: (
        Callable  # (q [Sq, Hq, D], k_pool, v_pool, block_table [nb] int32, context_len: int)
    )
    paged_decode_attention: Callable  # (q [B, Hq, D], k_pool, v_pool, block_tables [B, max_blocks] int32,
    #                                    context_lens [B] int32 on the device; 0 = padding row -> zeros)
    w4a16_linear: Callable  # (x [..., K], qweight [N, K/8] int32, qzeros [N, K/G] uint8, scales [N, K/G],
    #                          bias [N] | None) -> [..., N]: a 4-bit weight's linear (pyvl.quant)
    backends: Mapping[str, str]  # op name -> backend that serves it, for `pyvl info` and bug reports


OP_NAMES = tuple(f.name for f in fields(Ops) if f.name != "backends")

# Kernel modules register their ops here as "op name" -> "module:function" inside pyvl.kernels.
_TRITON_OPS: dict[str, str] = {
    "rms_norm": "pyvl.kernels.rms_norm:rms_norm",
    "add_rms_norm": "pyvl.kernels.rms_norm:add_rms_norm",
    "vit_attention": "pyvl.kernels.vit_attention:vit_attention",
    "apply_rotary": "pyvl.kernels.apply_rotary:apply_rotary",
    "silu_mul": "pyvl.kernels.silu_mul:silu_mul",
    "pixel_shuffle": "pyvl.kernels.pixel_shuffle:pixel_shuffle",
    "store_kv": "pyvl.kernels.store_kv:store_kv",
    "paged_prefill_attention": "pyvl.kernels.paged_attention:paged_prefill_attention",
    "paged_decode_attention": "pyvl.kernels.paged_attention:paged_decode_attention",
    "w4a16_linear": "pyvl.kernels.w4a16:w4a16_linear",
}


# Ops that stay on PyTorch in every backend: elementwise/normalisation work ATen already does in one fused
# kernel, where a Triton version would not pay. backend="triton" serves them with torch and says so.
TORCH_OPS = frozenset({"layer_norm", "gelu"})

# Ops that auto serves with PyTorch's fused attention for these dtypes when no kernel serves them (the CPU).
_SDPA_OPS = frozenset({"vit_attention", "paged_prefill_attention"})
_SDPA_DTYPES = frozenset({torch.bfloat16, torch.float16})


def _triton_impl(name: str, required: bool) -> Callable | None:
    """The registered kernel for ``name``, or None (no kernel, or Triton missing and not required)."""
    target = _TRITON_OPS.get(name)
    if target is None:
        return None
    module, func = target.split(":")
    try:
        return getattr(importlib.import_module(module), func)
    except ImportError as exc:
        if required:
            raise ImportError(
                f"op {name!r}: cannot import its Triton kernel {target} ({exc}); "
                "install Triton (pip install 'pyvl[gpu]') or use backend='reference'"
            ) from exc
        return None


def _resize_tiles_impl(want: str, device: torch.device) -> tuple[Callable, str]:
    """The compiled preprocessing kernel for ``device`` (CUDA, else C++), or the reference when asked for
    or when ``pyvl._C`` is not built (a source checkout). No Triton kernel exists for it, so "triton" takes
    the compiled one as "auto" does."""
    if want != "reference":
        try:
            from . import preprocess
        except ImportError:
            preprocess = None
        if preprocess is not None and preprocess.matches_installed_pillow():
            if device.type == "cuda" and preprocess.native.has_cuda():
                return preprocess.resize_tiles_cuda, "cuda"
            return preprocess.resize_tiles_cpu, "native"
    return reference.resize_tiles, "reference"


def resolve_ops(
    backend: str = "auto",
    device: torch.device | str = "cpu",
    op_backends: Mapping[str, str] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Ops:
    """Build the op table for ``backend`` on ``device`` for a model in ``dtype``, with per-op overrides.

    ``auto`` takes a kernel for each op that has one when the device is CUDA; elsewhere SDPA for attention
    in bf16/fp16, the reference otherwise. ``triton`` (or a per-op "triton") insists: an op without a
    registered kernel is an error, never a silent fallback, except the TORCH_OPS, which no backend
    replaces, and resize_tiles (see ``_resize_tiles_impl``).
    """
    device = torch.device(device)
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not one of {BACKENDS}")
    op_backends = dict(op_backends or {})
    unknown = sorted(set(op_backends) - set(OP_NAMES))
    if unknown:
        raise ValueError(f"op_backends names unknown ops {unknown}; known ops: {list(OP_NAMES)}")
    impls: dict[str, Callable] = {}
    served: dict[str, str] = {}
    missing = []
    for name in OP_NAMES:
        want = op_backends.get(name, backend)
        if want not in BACKENDS:
            raise ValueError(f"op_backends[{name!r}] = {want!r} is not one of {BACKENDS}")
        if name == "resize_tiles":
            impls[name], served[name] = _resize_tiles_impl(want, device)
            continue
        if name in TORCH_OPS:
            impls[name], served[name] = getattr(reference, name), "torch"
            continue
        wants_kernel = want == "triton" or (want == "auto" and device.type == "cuda")
        kernel = _triton_impl(name, required=want == "triton") if wants_kernel else None
        if kernel is not None:
            impls[name], served[name] = kernel, "triton"
        elif want == "triton":
            missing.append(name)
        elif want == "auto" and device.type != "cuda" and name in _SDPA_OPS and dtype in _SDPA_DTYPES:
            impls[name], served[name] = getattr(sdpa, name), "sdpa"
        else:
            impls[name], served[name] = getattr(reference, name), "reference"
    if missing:
        raise ValueError(
            f"backend 'triton' has no kernel for ops {missing}; pass "
            f"op_backends={{name: 'reference'}} for them or use backend='auto'"
        )
    return Ops(**impls, backends=served)
