"""The image-feature LRU, bounded in bytes (the digests that key it: tests/test_image_input.py)."""

from __future__ import annotations

import pytest
import torch

from pyvl.engine.features import FeatureCache
from pyvl.errors import PyvlError


def features(n_floats: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(n_floats).to(dtype)


def test_cache_is_bounded_in_bytes_and_evicts_the_least_recently_used():
    cache = FeatureCache(max_bytes=40)  # room for ten float32 values
    a, b, c = features(4), features(4), features(2, torch.bfloat16)  # 16, 16 and 4 bytes
    assert cache.put(b"a", a) and cache.put(b"b", b) and cache.put(b"c", c)
    assert (len(cache), cache.nbytes) == (3, 36)
    assert torch.equal(cache.get(b"a"), a)  # a is now the most recently used
    assert cache.put(b"d", features(3))  # 12 more bytes: b, the oldest, must go
    assert b"b" not in cache and b"a" in cache and b"c" in cache
    assert cache.nbytes == 32 and cache.nbytes <= cache.max_bytes
    assert cache.put(b"e", features(10))  # exactly the bound: evicts everything else
    assert (len(cache), cache.nbytes) == (1, 40)


def test_a_tensor_larger_than_the_bound_is_not_cached():
    cache = FeatureCache(max_bytes=16)
    kept = features(2)
    cache.put(b"kept", kept)
    assert cache.put(b"big", features(5)) is False
    assert b"big" not in cache and torch.equal(cache.get(b"kept"), kept) and cache.nbytes == 8
    assert FeatureCache(0).put(b"x", features(1)) is False


def test_replacing_an_entry_counts_its_bytes_once():
    cache = FeatureCache(max_bytes=100)
    cache.put(b"a", features(10))
    newer = features(5)
    cache.put(b"a", newer)
    assert (len(cache), cache.nbytes) == (1, 20) and torch.equal(cache.get(b"a"), newer)


def test_hits_misses_and_clear():
    cache = FeatureCache(max_bytes=1 << 20)
    cache.put(b"a", features(3))
    cache.get(b"a")
    cache.get(b"a")
    cache.get(b"missing")
    assert (cache.hits, cache.misses) == (2, 1)
    assert b"a" in cache and (cache.hits, cache.misses) == (2, 1)  # membership counts nothing
    cache.clear()
    assert (len(cache), cache.nbytes) == (0, 0) and cache.get(b"a") is None and cache.misses == 2
    with pytest.raises(PyvlError):
        FeatureCache(-1)


_ASK = """
import json, sys
import pyvl
model = pyvl.load(sys.argv[1], device="cpu", dtype="float32", backend="reference", image_cache_dir=sys.argv[2])
stats = pyvl.ChatStats()
answer = model.chat(sys.argv[3], "What is in the image?", dict(max_new_tokens=8), stats=stats)
model.engine.shutdown()  # flushes the features queued for the disk
print(json.dumps({"answer": answer, "encoded": stats.images_encoded}))
"""


def _ask_in_a_new_process(folder, image) -> dict:
    import json
    import subprocess
    import sys

    from conftest import GOLDEN

    out = subprocess.run(
        [sys.executable, "-c", _ASK, str(GOLDEN / "v15" / "checkpoint"), str(folder), str(image)],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_a_new_process_answers_about_a_known_image_without_the_vit(tmp_path):
    from conftest import image_for_key

    image, _ = image_for_key("gradient_800x600@max1")
    first = _ask_in_a_new_process(tmp_path / "features", image)
    assert first["encoded"] == 1 and len(list((tmp_path / "features").glob("*.safetensors"))) == 1
    second = _ask_in_a_new_process(tmp_path / "features", image)
    assert second == {"answer": first["answer"], "encoded": 0}  # read from the disk, the same answer


def test_the_disk_tier_refuses_a_folder_it_cannot_use(tmp_path):
    from conftest import GOLDEN

    import pyvl
    from pyvl.errors import ConfigError

    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(ConfigError, match="file"):
        pyvl.load(GOLDEN / "v15" / "checkpoint", device="cpu", image_cache_dir=tmp_path / "file")
    with pytest.raises(ConfigError, match="image_cache_dir must be a folder path"):
        pyvl.load(GOLDEN / "v15" / "checkpoint", device="cpu", image_cache_dir=3)
