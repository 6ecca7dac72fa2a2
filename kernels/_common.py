"""What the Triton kernels share: the dtypes they take, two jit helpers that also cover interpreter gaps (bf16
dots and bf16 rounding), whether they run under the interpreter, and the operand checks of their launchers."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = [
    "DTYPES",
    "INTERPRET_LONG",
    "mma",
    "cast",
    "interpreting",
    "check_device",
    "check_operands",
    "rows",
]

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INTERPRET_LONG = 128  # under the interpreter, sequences longer than this get big blocks (see default_config)


@triton.jit
def mma(a, b, acc, INTERPRET: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b (acc=None: a fresh float32 product). Under the interpreter the operands go up to float32
    first: it cannot dot bf16 (it multiplies the raw bit patterns, triton-lang/triton#11584). They are exact in
    float32, so the result is the tensor cores' bf16 x bf16 -> fp32 product."""
    if INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def cast(x, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """float32 -> DTYPE, rounding to nearest even. The interpreter truncates float32 -> bf16 casts (the GPU
    rounds), so there the rounding is done on the bits first and the truncating cast is then exact."""
    if INTERPRET:
        if DTYPE == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
            x = tl.where(x != x, x, rounded.to(tl.float32, bitcast=True))  # NaN stays NaN
    return x.to(DTYPE)


def interpreting() -> bool:
    """True when the kernels were decorated under TRITON_INTERPRET=1 (they then run on CPU tensors)."""
    return type(mma).__name__ == "InterpretedFunction"


def check_device(t: torch.Tensor, name: str) -> None:
    if interpreting():
        if t.device.type != "cpu":
            raise ValueError(
                f"{name} is on {t.device}, but the kernels run under TRITON_INTERPRET=1 (CPU only)"
            )
    elif t.device.type != "cuda":
        raise ValueError(
            f"{name} is on {t.device}: Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 set "
            f"before pyvl.kernels is imported, for CPU tensors)"
        )


def check_operands(op: str, named: dict[str, torch.Tensor]) -> None:
    """Every operand on the kernels' device type, all on the first one's device, last dim contiguous."""
    first = next(iter(named.values()))
    for name, t in named.items():
        check_device(t, name)
        if t.device != first.device:
            raise ValueError(f"{op}: {name} is on {t.device}, {next(iter(named))} on {first.device}")
        if t.stride(-1) != 1:
            raise ValueError(
                f"{op}: {name} {tuple(t.shape)} has last-dim stride {t.stride(-1)}; the last dim "
                f"must be contiguous"
            )


def rows(name: str, what: str, t: torch.Tensor) -> torch.Tensor:
    """t [..., C] -> a [rows, C] view with a row stride; never a copy."""
    if t.stride(-1) != 1:
        raise ValueError(f"{name}: {what} {tuple(t.shape)} has last-dim stride {t.stride(-1)}; it must be 1")
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:
        raise ValueError(
            f"{name}: {what} {tuple(t.shape)} with strides {t.stride()} cannot be seen as rows of "
            f"one stride; pass a contiguous tensor"
        ) from None
