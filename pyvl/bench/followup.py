"""What a follow-up question on a cached image costs, by the form the image is given in (``pyvl bench engine``).

For each input kind (a PNG or JPEG file path, the same files' bytes, a PIL image, the tiles tensor of the
original API) the same chat is asked about a large photo (bench engine's: 12 MP, 4:3: 12 tiles + a thumbnail) and a
one-tile image, once cold, then ``repeat`` new questions each. The row gives the median time to first token of
the follow-ups on both, and the difference: what the large image still costs once its features and prefix are
cached (reading and hashing the input; ideally nothing else). The prompts have the same text, so the
difference is the image alone.
"""

from __future__ import annotations

import io
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..engine.request import ChatStats
from ..image import load_image
from .preprocess import synthetic_photo
from .timing import median_seconds

__all__ = ["SMALL", "KINDS", "followup_rows"]

SMALL = (448, 448)  # one tile
KINDS = ("PNG path", "JPEG path", "PNG bytes", "JPEG bytes", "PIL.Image", "tiles tensor")


def _encoded(pixels: np.ndarray, fmt: str) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return out.getvalue()


def _forms(pixels: np.ndarray, folder: Path, name: str) -> dict:
    """The image in every kind of KINDS."""
    png, jpeg = _encoded(pixels, "PNG"), _encoded(pixels, "JPEG")
    (folder / f"{name}.png").write_bytes(png)
    (folder / f"{name}.jpg").write_bytes(jpeg)
    return {
        "PNG path": str(folder / f"{name}.png"),
        "JPEG path": str(folder / f"{name}.jpg"),
        "PNG bytes": png,
        "JPEG bytes": jpeg,
        "PIL.Image": Image.fromarray(pixels),
        "tiles tensor": load_image(pixels, max_num=12),
    }


def _followup_ms(chat, image, repeat: int, round_: int) -> float:
    """Median time to first token of ``repeat`` new questions about ``image``, after one that caches it."""
    chat.chat(image, f"Round {round_}: describe this image.", dict(max_new_tokens=1))
    times = []
    for i in range(repeat):
        stats = ChatStats()
        chat.chat(
            image,
            f"Round {round_}, question {i:03d}: what colour is it?",
            dict(max_new_tokens=1),
            stats=stats,
        )
        times.append(stats.time_to_first_token_s * 1e3)
    return statistics.median(times)


def followup_rows(chat, repeat: int, large: tuple[int, int], kinds=KINDS, small=SMALL) -> list[dict]:
    """One row per input kind: {"kind", "tiles", "small_ms", "large_ms", "extra_ms"}, and for the PIL image
    "asarray_ms", what reading its pixels once with np.asarray costs."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        forms = {
            size: _forms(synthetic_photo(*size, seed=7), Path(tmp), f"{size[0]}x{size[1]}")
            for size in (large, small)
        }
        tiles = forms[large]["tiles tensor"].shape[0]
        for k, kind in enumerate(kinds):
            small_ms = _followup_ms(chat, forms[small][kind], repeat, 2 * k)
            large_ms = _followup_ms(chat, forms[large][kind], repeat, 2 * k + 1)
            row = {
                "kind": kind,
                "tiles": tiles,
                "small_ms": small_ms,
                "large_ms": large_ms,
                "extra_ms": large_ms - small_ms,
            }
            if kind == "PIL.Image":  # the yardstick of a decoded image: reading its pixels once
                image = forms[large][kind]
                row["asarray_ms"] = median_seconds(lambda: np.asarray(image), repeat=repeat) * 1e3
            rows.append(row)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return rows
