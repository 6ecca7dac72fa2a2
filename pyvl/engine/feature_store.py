"""The disk tier of the image-feature cache: a folder of safetensors files that outlives the process.

A new process asked about a known image reads its features (ViT + projector output) here instead of running the
vision model. Several processes may share one folder at once.

Key: the image digest (``features.py``: it covers the image content and the tiling settings) and the
fingerprint of the vision side of the model (:func:`vision_fingerprint`): its config, dtype, parameter names and
shapes, and sampled parameter values. Two models, or one model in two dtypes, sharing a folder never read each
other's features. Not detected: two checkpoints that differ only between the sampled values (one edited weight).
The features of one checkpoint and dtype are shared across devices and backends, whose kernels agree within
their tolerances, not bit for bit.

File format, one file per entry, named ``<digest hex>-<fingerprint>.safetensors``: a safetensors file holding one
tensor, ``features`` (the [tiles * 256, llm_hidden] features in the model's dtype), and these ``__metadata__``
strings, all of which must match on read:
  format        "pyvl-image-features"
  version       "1"
  fingerprint   the 32 hex digits of the file name
  digest        the image digest in hex, as in the file name
  dtype         the tensor's dtype ("bfloat16", "float32", ...)
  shape         the tensor's shape as JSON ("[3328, 6144]")

Rules:
  - Reads trust nothing: a file that is not a regular file, is larger than the bound, does not parse as
    safetensors (truncated, corrupt header, random bytes) or whose metadata does not match its name and its
    tensor is removed, logged as a warning and read as a miss. The caller never sees an exception from a read.
  - Writes are atomic: the bytes go to ``<entry name>.<16 hex>.tmp`` in the same folder, are fsynced, then
    renamed over the entry. A writer killed midway leaves only its temp file, which readers never look at and
    the next put removes once it is STALE_TEMP_SECONDS old. Two processes writing one key both succeed; the
    last rename wins and the file is whole either way.
  - The folder holds at most ``max_bytes`` of entry files, least recently used evicted first: a hit sets the
    file's mtime to now, and a put removes the oldest files (by mtime) until it fits. An entry larger than the
    whole bound is not stored. With several writers at once the bound can be overshot by the entries written
    in the meantime; the next put evicts them back under it.
  - Files whose names are neither entries nor temp files are never read, counted or removed.
  - ``put_async`` never waits for the disk: a daemon writer thread per store copies the tensor to the host and
    writes it; when its small queue is full the write is dropped (this is a cache). Write failures (disk full,
    permissions) are logged as warnings and the entry is simply not stored.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import queue
import re
import secrets
import shutil
import stat
import threading
import time
import weakref
from collections import defaultdict
from pathlib import Path

import blake3
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from ..errors import PyvlError
from .features import DIGEST_BYTES

__all__ = ["FeatureStore", "vision_fingerprint", "sampled_positions"]

log = logging.getLogger(__name__)

FORMAT = "pyvl-image-features"
FORMAT_VERSION = "1"
FINGERPRINT_VERSION = (
    b"pyvl.vision-fingerprint.v1\0"  # bump when a change to pyvl's vision code changes features
)
FINGERPRINT_BYTES = 16
SAMPLES_PER_TENSOR = 64
STALE_TEMP_SECONDS = 60.0
DEFAULT_QUEUE_SIZE = 4

_HEX = f"[0-9a-f]{{{2 * DIGEST_BYTES}}}-[0-9a-f]{{{2 * FINGERPRINT_BYTES}}}"
ENTRY_NAME = re.compile(_HEX + r"\.safetensors")
TEMP_NAME = re.compile(_HEX + r"\.safetensors\.[0-9a-f]{16}\.tmp")
_STOP = object()


# ---- the fingerprint -----------------------------------------------------------------------------------------
def sampled_positions(numel: int) -> range:
    """The flat positions of a parameter that the fingerprint reads: up to SAMPLES_PER_TENSOR, evenly strided
    from 0 across the tensor. A change anywhere else in the tensor does not change the fingerprint."""
    step = max(1, (numel - 1) // (SAMPLES_PER_TENSOR - 1))
    return range(0, numel, step)[:SAMPLES_PER_TENSOR]


def _sample(param: torch.Tensor) -> torch.Tensor:
    """The sampled values as a strided view (no copy, on the parameter's device)."""
    positions = sampled_positions(param.numel())
    return param.detach().reshape(-1)[positions.start : positions.stop : positions.step]


def _config_bytes(model) -> bytes:
    """Every config value that changes the features for given weights."""
    cfg = model.cfg
    values = {
        "vision": dataclasses.asdict(cfg.vision),
        "select_layer": cfg.select_layer,
        "image_size": cfg.image_size,
        "downsample_ratio": cfg.downsample_ratio,
        "ps_version": cfg.ps_version,
        "num_image_token": cfg.num_image_token,
        "llm_hidden_size": cfg.llm.hidden_size,
        "dtype": str(model.dtype),
    }
    return json.dumps(values, sort_keys=True).encode()


def vision_fingerprint(model) -> str:
    """32 hex digits naming what the vision side computes: the config values that shape the features, the
    model's dtype, the name, shape and dtype of every ``vision_model.*`` and ``mlp1.*`` parameter, and
    :func:`sampled_positions` of each parameter's values.

    Cheap at any size: only the samples are read (one host copy per parameter dtype, whatever the device), so
    the cost grows with the number of parameters, not their bytes (the 6B tower's 595: ~14 ms on a CPU core, 64
    values each, 76 KB of bf16 read in all). A checkpoint that differs from another only
    in values outside the samples (e.g. one edited weight) gets the same fingerprint; any fine-tune that moves
    the weights broadly, another dtype, shape or config does not."""
    h = blake3.blake3(FINGERPRINT_VERSION)
    h.update(_config_bytes(model))
    samples = defaultdict(list)
    for prefix, module in (("vision_model", model.vision_model), ("mlp1", model.mlp1)):
        for name, param in module.named_parameters(prefix=prefix):
            h.update(f"{name}\0{param.dtype}\0{list(param.shape)}\0".encode())
            samples[param.dtype].append(_sample(param))
    for dtype in sorted(samples, key=str):
        values = torch.cat(samples[dtype]).cpu()
        h.update(values.view(torch.uint8).numpy().tobytes())
    return h.digest()[:FINGERPRINT_BYTES].hex()


# ---- file helpers ----------------------------------------------------------------------------------------------
class _Invalid(Exception):
    """An entry file that must not be trusted."""


def _metadata(fingerprint: str, digest_hex: str, features: torch.Tensor) -> dict[str, str]:
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "digest": digest_hex,
        "dtype": str(features.dtype).removeprefix("torch."),
        "shape": json.dumps(list(features.shape)),
    }


def _read_regular_file(path: Path, max_bytes: int) -> bytes:
    """The whole file; never follows a link nor blocks on a FIFO. FileNotFoundError when absent."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise _Invalid("not a regular file")
        if info.st_size > max_bytes:
            raise _Invalid(f"{info.st_size} bytes, over the store's bound of {max_bytes}")
        return f.read()


def _decode(blob: bytes, fingerprint: str, digest_hex: str) -> torch.Tensor:
    """The features tensor of an entry file's bytes, checked against the metadata its name implies."""
    tensors = load_safetensors(blob)  # checks the header and that the data section is whole
    if set(tensors) != {"features"}:
        raise _Invalid(f"holds tensors {sorted(tensors)}, expected only 'features'")
    features = tensors["features"]
    header_len = int.from_bytes(blob[:8], "little")
    metadata = json.loads(blob[8 : 8 + header_len]).get("__metadata__", {})
    wanted = _metadata(fingerprint, digest_hex, features)
    if metadata != wanted:  # the tensor's dtype and shape must be the recorded ones, the rest the name's
        raise _Invalid(f"metadata {metadata} does not match {wanted}")
    return features


def _remove(path: Path) -> None:
    """Remove a file, link or directory; gone already is fine (another process got there first)."""
    try:
        if stat.S_ISDIR(os.lstat(path).st_mode):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass


def _touch(path: Path) -> None:
    """Make the entry the most recently used. Failing is harmless: evicted meanwhile by another process (the
    features already read are still good), or a read-only folder (the entry just ages)."""
    try:
        os.utime(path)
    except OSError:
        pass


def _write_atomically(path: Path, blob: bytes) -> None:
    temp = path.with_name(f"{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        with open(temp, "xb") as f:  # "x": never write through a link someone left at this name
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.replace(temp, path)
    except BaseException:
        _remove(temp)
        raise


# ---- the store -------------------------------------------------------------------------------------------------
class FeatureStore:
    """Image features on disk in ``folder``, for one model (``fingerprint``), at most ``max_bytes`` of files.

    ``get`` and ``in`` may be called from any thread; ``put`` writes on the calling thread, ``put_async`` on the
    store's writer thread. ``hits`` and ``misses`` count ``get`` calls, ``dropped`` the writes a full queue
    refused. A bad argument, or a folder that cannot be created or written, raises a PyvlError; once open,
    nothing that happens on disk does (a read is a miss, a write is not stored, both logged)."""

    def __init__(
        self,
        folder: str | os.PathLike,
        max_bytes: int,
        fingerprint: str,
        queue_size: int = DEFAULT_QUEUE_SIZE,
    ):
        if not (isinstance(max_bytes, int) and max_bytes >= 0):
            raise PyvlError(f"FeatureStore max_bytes must be an integer >= 0, got {max_bytes!r}")
        if not re.fullmatch(f"[0-9a-f]{{{2 * FINGERPRINT_BYTES}}}", str(fingerprint)):
            raise PyvlError(
                f"FeatureStore fingerprint must be {2 * FINGERPRINT_BYTES} lowercase hex digits "
                f"(vision_fingerprint's), got {fingerprint!r:.80}"
            )
        self.folder = Path(folder)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PyvlError(
                f"image feature folder {self.folder}: cannot create it ({exc.strerror or exc})"
            ) from None
        if not os.access(self.folder, os.W_OK | os.X_OK):
            raise PyvlError(f"image feature folder {self.folder}: not a folder this process can write to")
        self.max_bytes = max_bytes
        self.fingerprint = fingerprint
        self.hits = 0
        self.misses = 0
        self.dropped = 0
        # Unbounded, so the stop mark can always be queued (even from the writer thread); put_async keeps the
        # waiting writes to queue_size itself.
        self._queue: queue.Queue = queue.Queue()
        self._queue_size = queue_size
        self._lock = threading.Lock()  # one put_async at a time, and none queued after close
        self._closed = False
        writer = threading.Thread(
            target=_write_queued,
            args=(self._queue, weakref.ref(self)),
            name="pyvl-feature-store",
            daemon=True,
        )
        writer.start()
        # Stops the writer (after the queued writes) on close, when the store is collected, and at exit, so the
        # thread is never inside torch while the interpreter finalises.
        self._stop_writer = weakref.finalize(self, _stop, self._queue, writer)

    # ---- reads --------------------------------------------------------------------------------------------------
    def get(self, digest: bytes, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """The features stored for ``digest`` on ``device`` (the entry becomes the most recently used), or None.
        A file that fails any check is removed and counts as a miss."""
        path = self._path(digest)
        try:
            features = _decode(_read_regular_file(path, self.max_bytes), self.fingerprint, digest.hex())
        except FileNotFoundError:
            return self._miss()
        except Exception as exc:  # whatever a damaged or foreign file makes the reader raise
            log.warning("image feature file %s is unusable (%s); removing it", path, exc)
            self._remove_quietly(path)
            return self._miss()
        _touch(path)
        try:
            features = features.to(device)
        except Exception as exc:  # e.g. out of device memory: the caller computes the features instead
            log.warning("image features from %s could not be moved to %s (%s)", path, device, exc)
            return self._miss()
        self.hits += 1
        return features

    def __contains__(self, digest: bytes) -> bool:
        """A regular file exists for ``digest`` (one stat; its content is checked only by ``get``)."""
        try:
            return stat.S_ISREG(os.stat(self._path(digest), follow_symlinks=False).st_mode)
        except OSError:
            return False

    # ---- writes -------------------------------------------------------------------------------------------------
    def put(self, digest: bytes, features: torch.Tensor) -> bool:
        """Store ``features`` now, on the calling thread, evicting the least recently used entries to make room.
        False when the entry alone exceeds max_bytes or the disk refused it (logged)."""
        path = self._path(digest)
        host = features.detach().to("cpu").contiguous()
        blob = save_safetensors({"features": host}, _metadata(self.fingerprint, digest.hex(), host))
        if len(blob) > self.max_bytes:
            return False
        try:
            self.folder.mkdir(parents=True, exist_ok=True)  # a cleaner may have removed it since
            self._make_room(len(blob), replacing=path.name)
            _write_atomically(path, blob)
        except OSError as exc:
            log.warning("image features not stored in %s (%s)", path, exc.strerror or exc)
            return False
        return True

    def put_async(self, digest: bytes, features: torch.Tensor) -> bool:
        """Queue ``features`` for the writer thread and return at once; False (the write dropped) when the queue
        is full or the store is closed. ``features`` must not be modified afterwards: the writer copies it to
        the host later, on the device's default stream (after the kernels that the engine queued there)."""
        self._path(digest)  # a bad digest raises here, on the caller's thread
        with self._lock:
            if self._closed:
                return False
            if self._queue.qsize() >= self._queue_size:
                self.dropped += 1
                log.debug("image feature store queue full; dropped the write of %s", digest.hex())
                return False
            self._queue.put((digest, features))
        return True

    def flush(self) -> None:
        """Wait until every queued write is done."""
        self._queue.join()

    def close(self) -> None:
        """Write what is queued, then stop the writer thread; later put_async calls return False."""
        with self._lock:
            self._closed = True
        self._stop_writer()

    # ---- helpers ------------------------------------------------------------------------------------------------
    def _path(self, digest: bytes) -> Path:
        if not (isinstance(digest, bytes) and len(digest) == DIGEST_BYTES):
            raise PyvlError(f"an image digest is {DIGEST_BYTES} bytes, got {digest!r:.80}")
        return self.folder / f"{digest.hex()}-{self.fingerprint}.safetensors"

    def _miss(self) -> None:
        self.misses += 1
        return None

    @staticmethod
    def _remove_quietly(path: Path) -> None:
        try:
            _remove(path)
        except OSError as exc:
            log.warning("could not remove %s (%s)", path, exc.strerror or exc)

    def _make_room(self, size: int, replacing: str) -> None:
        """Evict the oldest entries until ``size`` more bytes fit (the entry named ``replacing`` is about to be
        overwritten, so it does not count), and remove stale temp files on the way."""
        entries, total, now = [], 0, time.time()
        for name, info in _regular_files(self.folder):
            if TEMP_NAME.fullmatch(name) and now - info.st_mtime > STALE_TEMP_SECONDS:
                self._remove_quietly(self.folder / name)  # left by a killed writer
            elif ENTRY_NAME.fullmatch(name) and name != replacing:
                entries.append((info.st_mtime, info.st_size, name))
                total += info.st_size
        for _, entry_size, name in sorted(entries):
            if total + size <= self.max_bytes:
                break
            self._remove_quietly(self.folder / name)
            total -= entry_size


def _regular_files(folder: Path):
    """(name, stat) of the regular files in folder; files that vanish while listed are skipped."""
    with os.scandir(folder) as listing:
        for item in listing:
            try:
                info = item.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISREG(info.st_mode):
                yield item.name, info


# ---- the writer thread -----------------------------------------------------------------------------------------
def _write_queued(jobs: queue.Queue, store_ref) -> None:
    """The writer thread: the queued writes, one at a time, until the stop mark."""
    while _write_next(jobs, store_ref):
        pass


def _write_next(jobs: queue.Queue, store_ref) -> bool:
    """Do the next queued write; False at the stop mark. Between writes the thread holds neither the store (only
    a weak reference: an unused store can be collected, which stops the thread) nor the last tensor."""
    job = jobs.get()
    try:
        if job is _STOP:
            return False
        store = store_ref()
        if store is not None:
            store.put(*job)
    except Exception:  # a bug: log it, the thread must carry on
        log.exception("image feature store writer: a write failed")
    finally:
        jobs.task_done()
    return True


def _stop(jobs: queue.Queue, writer: threading.Thread) -> None:
    jobs.put(_STOP)
    if writer is not threading.current_thread():  # the store can be collected on its own writer thread
        writer.join()
