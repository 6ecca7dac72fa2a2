"""A seeded, bounded fuzz test of ``pyvl.load_image``: mutated image files and mutated arrays.

Cases run in a worker process (``python test_fuzz_image.py --worker``), many per worker, one timeout each, so
a crash or a hang is a failure of that case rather than of the test run; a dead or stuck worker is counted and
replaced. For every case: no crash, no hang, nothing raised but a PyvlError, and when the input is accepted
the native path equals the Pillow path (``use_native=False``) exactly, as does acceptance itself.

PYVL_FUZZ_N (default 250) sets the number of cases, PYVL_FUZZ_SEED the seed (default: fresh, printed).
Shapes stay small (tiles of 16-56 px, sides up to 48 px, thin images up to 3000 px): extreme aspect ratios
such as 89,000,000 x 1 are kept out until the native resize bounds its scratch memory.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import queue
import random
import secrets
import struct
import subprocess
import sys
import tempfile
import threading
import zlib

CASE_TIMEOUT_S = 30.0  # per case, generous: the CI machine is shared
START_TIMEOUT_S = 180.0  # importing torch in a fresh worker


# ---- case generation (parent) ---------------------------------------------------------------------------
DECLARED_SIZES = (0, 1, 2, 255, 4096, 65535, 100_000, 2**31 - 1)  # bombs: products far over MAX_IMAGE_PIXELS


def _base_image(rng: random.Random):
    import numpy as np
    from PIL import Image

    w, h = rng.randint(1, 48), rng.randint(1, 48)
    gen = np.random.default_rng(rng.getrandbits(32))
    if rng.random() < 0.5:
        array = gen.integers(0, 256, (h, w, 4), dtype=np.uint8)
    else:  # smooth content, where resampling errors would show
        y, x = np.mgrid[0:h, 0:w]
        array = np.stack(
            [x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) % 256, 255 - x % 256], -1
        )
        array = array.astype(np.uint8)
    image = Image.fromarray(array, "RGBA")
    return image.convert(rng.choice(["RGB", "RGB", "RGBA", "L", "LA", "P", "1", "I;16", "CMYK"]))


def _encode(rng: random.Random, features) -> tuple[str, bytes]:
    image = _base_image(rng)
    fmt = rng.choice(["PNG", "JPEG", "GIF", "BMP", "TIFF"] + (["WEBP"] if features.check("webp") else []))
    convert = {
        "JPEG": ("RGB", "L", "CMYK"),
        "GIF": ("P", "L"),
        "BMP": ("RGB", "RGBA", "L", "P", "1"),
        "WEBP": ("RGB", "RGBA"),
        "PNG": ("RGB", "RGBA", "L", "LA", "P", "1", "I;16"),
    }.get(fmt)
    if convert and image.mode not in convert:
        image = image.convert(rng.choice(convert))
    out = io.BytesIO()
    image.save(out, fmt)
    return fmt, out.getvalue()


def _png_dims(data: bytearray, w: int, h: int) -> None:
    if data[12:16] == b"IHDR":
        data[16:24] = struct.pack(">II", w & 0xFFFFFFFF, h & 0xFFFFFFFF)
        data[29:33] = struct.pack(
            ">I", zlib.crc32(bytes(data[12:29]))
        )  # a valid CRC: the size is what is tested


def _edit_header(fmt: str, data: bytearray, rng: random.Random) -> None:
    w, h = rng.choice(DECLARED_SIZES), rng.choice(DECLARED_SIZES)
    if fmt == "PNG":
        _png_dims(data, w, h)
    elif fmt == "BMP" and len(data) >= 26:
        data[18:26] = struct.pack("<ii", min(w, 2**31 - 1), min(h, 2**31 - 1) * rng.choice((1, -1)))
    elif fmt == "GIF" and len(data) >= 10:
        data[6:10] = struct.pack("<HH", min(w, 65535), min(h, 65535))
        at = data.find(b"\x2c", 10)  # image descriptor: its own size
        if at > 0 and at + 9 <= len(data):
            data[at + 5 : at + 9] = struct.pack("<HH", min(w, 65535), min(h, 65535))
    elif fmt == "JPEG":
        at = max(data.find(b"\xff\xc0"), data.find(b"\xff\xc2"))
        if at > 0 and at + 9 <= len(data):
            data[at + 5 : at + 9] = struct.pack(">HH", min(h, 65535), min(w, 65535))
    elif fmt == "WEBP" and data[12:16] == b"VP8 " and len(data) >= 30:
        data[26:30] = struct.pack("<HH", min(w, 16383), min(h, 16383))
    else:  # TIFF and the rest: overwrite a few bytes of the header
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(min(len(data), 64))] = rng.randrange(256)


def _mutate(fmt: str, data: bytes, rng: random.Random) -> tuple[str, bytes]:
    data = bytearray(data)
    kind = rng.choice(["clean", "flip", "flip", "truncate", "header", "header", "splice", "append"])
    if kind == "flip":
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif kind == "truncate":
        data = data[: rng.randrange(len(data))]
    elif kind == "header":
        _edit_header(fmt, data, rng)
    elif kind == "splice":
        at, n = rng.randrange(len(data)), rng.randint(1, 32)
        data[at : at + n] = bytes(rng.randrange(256) for _ in range(rng.randint(0, 32)))
    elif kind == "append":
        data += bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    return kind, bytes(data)


DTYPES = ["uint8"] * 12 + [
    "int8",
    "uint16",
    ">u2",
    "float32",
    "float64",
    "bool",
    "object",
    "complex64",
    "int64",
]


def _array_recipe(rng: random.Random) -> dict:
    """How to build the array in the worker (a view does not survive pickling, so its recipe travels)."""
    r = rng.random()
    if r < 0.05:
        shape = [rng.randint(0, 6) for _ in range(rng.choice((0, 1, 4)))]
    elif r < 0.12:
        shape = [1, rng.randint(1000, 3000), 3] if rng.random() < 0.5 else [rng.randint(1000, 3000), 2, 3]
    else:
        shape = [0 if rng.random() < 0.04 else rng.randint(1, 40) for _ in range(2)]
        if rng.random() < 0.8:
            shape.append(rng.choice((3, 3, 3, 4, 4, 1, 2, 5)))
    ops = []
    for _ in range(rng.choice((0, 1, 1, 2, 3))):
        op = rng.choice(
            [
                "flip",
                "step",
                "transpose",
                "broadcast",
                "readonly",
                "fortran",
                "crop",
                "zero_stride",
                "channel_view",
            ]
        )
        ops.append((op, rng.getrandbits(16)))
    return {"dtype": rng.choice(DTYPES), "shape": shape, "seed": rng.getrandbits(32), "ops": ops}


def make_cases(seed: int, n: int) -> list[dict]:
    from PIL import features

    rng = random.Random(seed)
    cases = []
    for i in range(n):
        tiling = {
            "max_num": rng.randint(1, 6),
            "image_size": rng.choice((16, 28, 56)),
            "use_thumbnail": rng.random() < 0.8,
        }
        if rng.random() < 0.6:
            fmt, data = _encode(rng, features)
            kind, data = _mutate(fmt, data, rng)
            cases.append(
                {"id": i, "what": f"{fmt} {kind}", "bytes": data, "as_path": rng.random() < 0.3, **tiling}
            )
        else:
            cases.append({"id": i, "what": "array", "array": _array_recipe(rng), **tiling})
    return cases


# ---- the worker --------------------------------------------------------------------------------------------
def build_array(recipe: dict):
    import numpy as np

    gen = np.random.default_rng(recipe["seed"])
    shape, dtype = tuple(recipe["shape"]), np.dtype(recipe["dtype"])
    if dtype.kind == "O":
        a = np.empty(shape, dtype=object)
        a[...] = 7
    else:
        a = gen.integers(0, 256, shape).astype(dtype)
    for op, r in recipe["ops"]:
        if a.ndim == 0:
            break
        axis = r % a.ndim
        if op == "flip":
            a = np.flip(a, axis)
        elif op == "step":
            a = a[(slice(None),) * axis + (slice(None, None, 1 + r % 3),)]
        elif op == "transpose" and a.ndim >= 2:
            a = np.swapaxes(a, 0, 1)
        elif op == "broadcast" and a.ndim >= 2 and a.shape[0] > 0:
            a = np.broadcast_to(a[:1], (1 + r % 30,) + a.shape[1:])
        elif op == "readonly":
            a = a.view()
            a.flags.writeable = False
        elif op == "fortran":
            a = np.asfortranarray(a)
        elif op == "crop" and a.shape[axis] > 2:
            a = a[(slice(None),) * axis + (slice(1, a.shape[axis] - 1),)]
        elif op == "zero_stride" and a.shape[axis] > 0:
            strides = list(a.strides)
            strides[axis] = 0
            a = np.lib.stride_tricks.as_strided(a, strides=strides, writeable=False)
        elif op == "channel_view" and a.ndim == 3 and a.shape[2] >= 4:
            a = a[..., (r % 2) : (r % 2) + 3]
    return a


def _run_case(case: dict, tmpdir: str) -> dict:
    import torch

    import pyvl

    if "array" in case:
        source = build_array(case["array"])
    elif case["as_path"]:
        source = os.path.join(tmpdir, f"case{case['id']}")
        with open(source, "wb") as f:
            f.write(case["bytes"])
    else:
        source = case["bytes"]
    tiling = {k: case[k] for k in ("max_num", "image_size", "use_thumbnail")}
    outcomes = []
    for use_native in (True, False):
        try:
            outcomes.append(pyvl.load_image(source, use_native=use_native, **tiling))
        except pyvl.PyvlError as exc:
            outcomes.append(exc)
        except Exception as exc:
            return {
                "status": "foreign",
                "detail": f"use_native={use_native}: {type(exc).__name__}: {exc}"[:300],
            }
    native, pillow = outcomes
    if isinstance(native, Exception) and isinstance(pillow, Exception):
        return {"status": "refused", "detail": type(native).__name__}
    if isinstance(native, Exception) or isinstance(pillow, Exception):
        return {"status": "mismatch", "detail": f"native {native!r:.150} vs Pillow {pillow!r:.150}"}
    if native.shape != pillow.shape or not torch.equal(native, pillow):
        diff = (native - pillow).abs().max().item() if native.shape == pillow.shape else "shape"
        return {
            "status": "mismatch",
            "detail": f"{tuple(native.shape)} vs {tuple(pillow.shape)}, max diff {diff}",
        }
    return {"status": "accepted", "detail": str(tuple(native.shape))}


def worker() -> None:
    import pyvl  # noqa: F401 - imported before "ready", so the per-case timeout excludes it

    out = sys.stdout
    print("ready", file=out, flush=True)
    with tempfile.TemporaryDirectory() as tmpdir:
        while True:
            try:
                case = pickle.load(sys.stdin.buffer)
            except EOFError:
                return
            result = _run_case(case, tmpdir)
            print(json.dumps({"id": case["id"], **result}), file=out, flush=True)


# ---- the parent ----------------------------------------------------------------------------------------------
class Worker:
    def __init__(self, stderr_file):
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr_file,
        )
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        if self.next_line(START_TIMEOUT_S) != "ready":
            raise RuntimeError(f"the fuzz worker did not start (exit code {self.proc.poll()})")

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.decode().strip())
        self.lines.put(None)  # end of output: the worker died or exited

    def next_line(self, timeout: float) -> str | None:
        return self.lines.get(timeout=timeout)

    def send(self, case: dict) -> None:
        pickle.dump(case, self.proc.stdin)
        self.proc.stdin.flush()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def run_fuzz(seed: int, n: int) -> tuple[dict, list[str]]:
    """Run n cases; return the status counts and a description of every failing case."""
    counts = {
        "accepted": 0,
        "refused": 0,
        "foreign": 0,
        "mismatch": 0,
        "crash": 0,
        "hang": 0,
        "worker_starts": 0,
    }
    failures = []
    with tempfile.TemporaryFile() as stderr_file:
        worker_proc = None
        for case in make_cases(seed, n):
            if worker_proc is None:
                worker_proc = Worker(stderr_file)
                counts["worker_starts"] += 1
            try:
                worker_proc.send(case)
                line = worker_proc.next_line(CASE_TIMEOUT_S)
            except queue.Empty:
                line = "hang"
            except (BrokenPipeError, OSError):
                line = None
            if line is None or line == "hang":
                status = "crash" if line is None else "hang"
                worker_proc.stop()
                detail = f"exit code {worker_proc.proc.returncode}"
                worker_proc = None
                result = {"status": status, "detail": detail}
            else:
                result = json.loads(line)
            counts[result["status"]] += 1
            if result["status"] not in ("accepted", "refused"):
                failures.append(
                    f"case {case['id']} ({case['what']}, {case.get('array', '')}): {result['status']}: "
                    f"{result['detail']}"
                )
        if worker_proc is not None:
            worker_proc.proc.stdin.close()
            worker_proc.proc.wait(timeout=CASE_TIMEOUT_S)
    return counts, failures


def test_fuzz_load_image():
    seed = int(os.environ.get("PYVL_FUZZ_SEED") or secrets.randbits(32))
    n = int(os.environ.get("PYVL_FUZZ_N") or 250)
    counts, failures = run_fuzz(seed, n)
    summary = f"PYVL_FUZZ_SEED={seed} PYVL_FUZZ_N={n}: {counts}"
    print(summary)
    assert not failures, summary + "\n" + "\n".join(failures[:20])
    assert counts["accepted"] > n // 10 and counts["refused"] > n // 10, summary  # both sides are exercised


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    worker()
