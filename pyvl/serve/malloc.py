"""The C allocator's thresholds fixed for a long-running server, so big requests give their memory back.

glibc raises its mmap threshold each time a block it had mmapped is freed (up to 32 MB on 64-bit). After one
big request (a 9000x9000 PNG: ~240 MB of decoded pixels and resize buffers, in worker threads), later blocks of
that size come from the malloc arenas instead, and freed arena memory stays with the process: the server's RSS
ratchets up by hundreds of MB and never comes down. Setting the thresholds turns that adjustment off: blocks of
1 MB and more are mmapped (unmapped on free), and a heap top with over 16 MB free is trimmed.
"""

from __future__ import annotations

import ctypes
import ctypes.util

__all__ = ["pin_allocator_thresholds"]

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 20
TRIM_THRESHOLD = 16 << 20


def pin_allocator_thresholds() -> bool:
    """Fix glibc's mmap and trim thresholds for this process; False where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 (glibc only: musl has mallopt but ignores these parameters)
    except (OSError, AttributeError, TypeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
