"""Registers per thread, spills and shared memory of the Triton kernels one call launches.

A launch ``fn[grid](...)`` goes through ``fn.run(...)``, which returns the CompiledKernel it ran (Triton 3.x,
3.6 and 3.9 alike); the kernel's ``n_regs`` / ``n_spills`` are filled when its binary is loaded
(``_init_handles``, done by the first launch) and ``metadata.shared`` holds its shared-memory bytes.
:func:`launched_kernels` wraps ``run`` on the kernel objects of ``pyvl.kernels`` for the duration of a
``with`` block and collects what the launches return; the wrappers are removed on exit. Under
TRITON_INTERPRET=1 nothing is compiled, so every figure is None; so is any figure a Triton version does not
carry.
"""

from __future__ import annotations

import contextlib
import importlib

__all__ = ["KERNEL_MODULES", "launched_kernels", "resources", "format_resources"]

KERNEL_MODULES = (
    "vit_attention",
    "paged_attention",
    "store_kv",
    "rms_norm",
    "apply_rotary",
    "silu_mul",
    "pixel_shuffle",
    "w4a16",
)
_MISSING = object()


def _kernel_objects() -> list:
    from triton.runtime.jit import KernelInterface  # JITFunction and InterpretedFunction both derive from it

    found = []
    for name in KERNEL_MODULES:
        module = importlib.import_module(f"pyvl.kernels.{name}")
        found += [
            obj for obj in vars(module).values() if isinstance(obj, KernelInterface) and obj not in found
        ]
    return found


def _int_or_none(value) -> int | None:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def resources(kernel) -> dict:
    """{"regs", "spills", "shared_bytes"} of a CompiledKernel (None for each figure it does not carry)."""
    init = getattr(kernel, "_init_handles", None)
    if callable(init):
        try:
            init()  # a no-op once launched; loads the binary of a kernel that was only compiled
        except Exception:  # e.g. OutOfResources: the figures below are still in the metadata or absent
            pass
    return {
        "regs": _int_or_none(getattr(kernel, "n_regs", None)),
        "spills": _int_or_none(getattr(kernel, "n_spills", None)),
        "shared_bytes": _int_or_none(getattr(getattr(kernel, "metadata", None), "shared", None)),
    }


@contextlib.contextmanager
def launched_kernels():
    """Yields a list that fills with {"kernel", "regs", "spills", "shared_bytes"}, one per distinct kernel
    launched inside the block (in launch order)."""
    launched: list[dict] = []
    patched = []

    def recording(fn, original):
        def run(*args, **kwargs):
            compiled = original(*args, **kwargs)
            name = getattr(fn, "__name__", None) or getattr(getattr(fn, "fn", None), "__name__", "?")
            if not kwargs.get("warmup") and all(entry["kernel"] != name for entry in launched):
                launched.append({"kernel": name, **resources(compiled)})
            return compiled

        return run

    try:
        for fn in _kernel_objects():
            own = fn.__dict__.get("run", _MISSING)  # an instance attribute, if a Triton version sets one
            fn.run = recording(fn, fn.run)
            patched.append((fn, own))
        yield launched
    finally:
        for fn, own in patched:
            if own is _MISSING:
                del fn.run  # back to the class's method
            else:
                fn.run = own


def _size(nbytes: int | None) -> str:
    if nbytes is None:
        return "-"
    return f"{nbytes / 1024:.0f}K" if nbytes >= 1024 else str(nbytes)


def format_resources(kernels: list[dict]) -> str:
    """'regs/spills/shared' per kernel, e.g. '255/0/96K + 32/0/0' ('-' where unknown)."""
    if not kernels:
        return "-"
    show = lambda v: "-" if v is None else str(v)  # noqa: E731
    return " + ".join(f"{show(k['regs'])}/{show(k['spills'])}/{_size(k['shared_bytes'])}" for k in kernels)
