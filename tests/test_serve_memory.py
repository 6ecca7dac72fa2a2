"""Big requests give their memory back: with ``pyvl serve``'s allocator thresholds (pyvl.serve.malloc), decoding
and tiling 6000x6000 PNGs in worker threads, as the server does, leaves RSS where it was. (Without them glibc's
growing mmap threshold keeps ~200 MB of freed buffers in its arenas: 269 -> 494 MB on the CI machine.)"""

from __future__ import annotations

import subprocess
import sys

import pytest

SCRIPT = """
import concurrent.futures, io, os
import numpy as np
from PIL import Image
import pyvl
from pyvl.serve.malloc import pin_allocator_thresholds

assert pin_allocator_thresholds()
def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
pixels = np.random.default_rng(0).integers(0, 4, (6000, 6000, 3), np.uint8) * 64
buf = io.BytesIO()
Image.fromarray(pixels).save(buf, "PNG", compress_level=1)
png = buf.getvalue()
del pixels, buf
pool = concurrent.futures.ThreadPoolExecutor(4)
list(pool.map(lambda _: pyvl.load_image(np.zeros((448, 448, 3), np.uint8)), range(4)))  # warm every thread
warm = rss_mb()
for _ in range(3):
    list(pool.map(lambda _: pyvl.load_image(png, max_num=12), range(2)))
print(warm, rss_mb())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator and /proc are Linux's")
def test_big_images_leave_rss_where_it_was():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    warm, after = map(float, proc.stdout.split())
    assert after - warm < 30, (warm, after)
