"""Argument checks shared by the public API: exact types, ranges, and whether a KV cache fits in memory.

The rules, everywhere: an integer argument takes int or a numpy integer, never a bool, a float (1.5 is not
silently truncated) or a string; a real argument takes int/float (numpy too), finite, never a bool or a string;
a flag takes a bool (numpy bool too), never a truthy string. Each check raises the ``error`` class it is given
(a PyvlError subclass) with a message naming the argument, the value and what was expected, and returns the
value as a plain Python int/float/bool.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import torch

from .errors import PromptError, PyvlError

__all__ = [
    "integer",
    "real",
    "boolean",
    "text",
    "kv_cache_bytes",
    "available_memory",
    "check_kv_cache_fits",
    "PIXEL_VALUE_BOUND",
    "pixel_tensor",
    "token_rows",
    "patch_counts",
    "history",
    "is_decimal_id",
]


def _range(low, high) -> str:
    if low is not None and high is not None:
        return f" in {low}..{high}"
    if low is not None:
        return f" >= {low}"
    return f" <= {high}" if high is not None else ""


def integer(value, name: str, low: int | None = None, high: int | None = None, error=PyvlError) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise error(f"{name}={value!r}: expected an integer{_range(low, high)}, got {type(value).__name__}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        raise error(f"{name}={value!r}: expected an integer{_range(low, high)}")
    return value


def real(
    value,
    name: str,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    error=PyvlError,
) -> float:
    """A finite number in [low, high] ((low, high] with ``low_open``)."""
    bounds = ([f"{'>' if low_open else '>='} {low:g}"] if low is not None else []) + (
        [f"<= {high:g}"] if high is not None else []
    )
    expected = " ".join(["a finite number", " and ".join(bounds)]).strip()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise error(f"{name}={value!r}: expected {expected}, got {type(value).__name__}")
    value = float(value)
    if (
        not math.isfinite(value)
        or (low is not None and (value <= low if low_open else value < low))
        or (high is not None and value > high)
    ):
        raise error(f"{name}={value!r}: expected {expected}")
    return value


def boolean(value, name: str, error=PyvlError) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise error(f"{name}={value!r}: expected True or False, got {type(value).__name__}")
    return bool(value)


def text(value, name: str, error=PyvlError) -> str:
    """A str that UTF-8 can encode (a lone surrogate, e.g. from a bad decode, cannot be tokenized)."""
    if not isinstance(value, str):
        raise error(f"{name} must be a str, got {type(value).__name__}: {value!r:.80}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise error(
            f"{name} holds {value[exc.start : exc.end]!r} at index {exc.start}, a lone surrogate that "
            "is not valid Unicode text; decode the input with errors='replace' first"
        ) from None
    return value


def kv_cache_bytes(
    num_layers: int, num_kv_heads: int, head_dim: int, capacity: int, batch: int, dtype: torch.dtype
) -> int:
    """Keys and values of every layer: 2 x layers x kv_heads x head_dim x capacity x batch x element size."""
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * num_kv_heads * head_dim * capacity * batch * element


def available_memory(device: torch.device) -> int | None:
    """Bytes free for a new allocation on ``device``: cudaMemGetInfo on CUDA, MemAvailable on Linux CPUs;
    None where it cannot be known (then no check is made)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    if device.type == "cpu" and sys.platform.startswith("linux"):
        try:
            with open("/proc/meminfo", encoding="ascii") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            return None
    return None


def check_kv_cache_fits(
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    capacity: int,
    batch: int,
    dtype: torch.dtype,
    device: torch.device,
    error=PyvlError,
) -> None:
    """Refuse, before allocating, a KV cache larger than the memory ``device`` has free."""
    need = kv_cache_bytes(num_layers, num_kv_heads, head_dim, capacity, batch, dtype)
    free = available_memory(device)
    if free is not None and need > free:
        raise error(
            f"the KV cache for {batch} sequence(s) of {capacity} tokens ({num_layers} layers x "
            f"{num_kv_heads} kv heads x {head_dim} x {dtype}) needs {need / 2**30:.2f} GiB but {device} has "
            f"{free / 2**30:.2f} GiB free; lower max_new_tokens, shorten the prompt, or load with a "
            "smaller max_context"
        )


# |pixel_values| above this is refused: normalised tiles lie in about [-2.2, 2.7] (ImageNet mean/std), so a
# larger value is not a preprocessed image (and 1e30 overflows the vision tower to NaN, answering '').
PIXEL_VALUE_BOUND = 100.0
_PIXEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def pixel_tensor(pixel_values: torch.Tensor) -> None:
    """Floating, finite, |x| <= PIXEL_VALUE_BOUND, on the CPU or a CUDA device (moved to the model's later)."""
    if pixel_values.dtype not in _PIXEL_DTYPES:
        raise PromptError(
            f"pixel_values has dtype {pixel_values.dtype}; expected normalised floating tiles "
            f"({', '.join(map(str, _PIXEL_DTYPES))}), e.g. from pyvl.load_image"
        )
    if pixel_values.device.type not in ("cpu", "cuda"):
        raise PromptError(f"pixel_values is on {pixel_values.device}; expected a CPU or CUDA tensor")
    bad = ~(pixel_values.abs() <= PIXEL_VALUE_BOUND)  # NaN compares False, so it counts as bad too
    if bool(bad.any()):
        first = pixel_values.flatten()[bad.flatten().nonzero()[0, 0]].item()
        raise PromptError(
            f"pixel_values holds {int(bad.sum())} value(s) that are not finite or exceed "
            f"{PIXEL_VALUE_BOUND:g} in magnitude (first: {first!r}); normalised tiles lie in about "
            "[-2.2, 2.7]"
        )


def token_rows(input_ids, name: str, vocab_size: int) -> list[list[int]]:
    """One prompt (ints, 1-D tensor/array) or several (lists of ints, 2-D tensor/array) -> rows of ids,
    each non-empty and inside the vocabulary."""
    if isinstance(input_ids, (torch.Tensor, np.ndarray)):
        is_int = (
            (
                not input_ids.dtype.is_floating_point
                and not input_ids.dtype.is_complex
                and input_ids.dtype != torch.bool
            )
            if isinstance(input_ids, torch.Tensor)
            else (np.issubdtype(input_ids.dtype, np.integer))
        )
        if not is_int or input_ids.ndim not in (1, 2):
            raise PromptError(
                f"{name} must hold integer token ids, 1-D (one prompt) or 2-D (one per row); got "
                f"{input_ids.dtype} of shape {tuple(input_ids.shape)}"
            )
        rows = input_ids.tolist()
        rows = [rows] if input_ids.ndim == 1 else rows
    elif isinstance(input_ids, (list, tuple)):
        nested = bool(input_ids) and all(
            isinstance(row, (list, tuple, torch.Tensor, np.ndarray)) for row in input_ids
        )
        rows = (
            [list(row.tolist() if isinstance(row, (torch.Tensor, np.ndarray)) else row) for row in input_ids]
            if nested
            else [list(input_ids)]
        )
    else:
        raise PromptError(
            f"{name} must be a list of token ids, a list of such lists, or an integer tensor; got "
            f"{type(input_ids).__name__}"
        )
    if not rows or any(not row for row in rows):
        raise PromptError(f"{name} must hold at least one token in every prompt; got {rows!r:.80}")
    for r, row in enumerate(rows):
        for k, token in enumerate(row):
            integer(
                token,
                f"{name}[{r}][{k}]" if len(rows) > 1 else f"{name}[{k}]",
                0,
                vocab_size - 1,
                error=PromptError,
            )
    return [[int(t) for t in row] for row in rows]


def patch_counts(num_patches_list) -> list[int] | None:
    """None, or tile counts per image: ints >= 1 (1.9 is not truncated to 1)."""
    if num_patches_list is None:
        return None
    if not isinstance(num_patches_list, (list, tuple)):
        raise PromptError(
            f"num_patches_list must be a list of tile counts (ints >= 1) or None, got "
            f"{type(num_patches_list).__name__}"
        )
    return [
        integer(n, f"num_patches_list[{k}]", 1, error=PromptError) for k, n in enumerate(num_patches_list)
    ]


def history(turns) -> None:
    """None, or a list of (question, answer) pairs of str."""
    if turns is None:
        return
    if not isinstance(turns, (list, tuple)):
        raise PromptError(
            f"history must be a list of (question, answer) pairs or None, got {type(turns).__name__}"
        )
    for k, turn in enumerate(turns):
        if not (isinstance(turn, (tuple, list)) and len(turn) == 2):
            raise PromptError(f"history[{k}] must be a (question, answer) pair of strings, got {turn!r:.80}")
        text(turn[0], f"history[{k}] question", PromptError)
        text(turn[1], f"history[{k}] answer", PromptError)


def is_decimal_id(key) -> bool:
    """A JSON object key that names a token id: ASCII digits only ('²'.isdigit() is True and int() refuses it),
    at most 9 of them (so int() is cheap and the id fits any vocabulary check)."""
    return isinstance(key, str) and key.isascii() and key.isdigit() and len(key) <= 9
