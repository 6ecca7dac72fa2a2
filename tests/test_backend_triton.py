"""The whole model through backend="triton" (every registered kernel) against the golden fixtures.

On a CPU-only machine the kernels run under TRITON_INTERPRET=1, which is how CI covers the kernel path end to
end; benchmarks/device_check.sh runs the same tests on the GPU. float32 here: logits must match the recorded
originals within the float32 bound of test_golden, and greedy tokens exactly.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import importlib

from conftest import GOLDEN, golden_cases, image_for_key
from safetensors.torch import load_file

import pyvl
from pyvl.ops import _TRITON_OPS, reference, resolve_ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ATOL = 1e-4


@pytest.fixture(scope="module", params=["v15", "mini"])
def fast(request):
    model = pyvl.load(GOLDEN / request.param / "checkpoint", device=DEVICE, dtype="float32", backend="triton")
    return request.param, model


@pytest.mark.parametrize("name", sorted(_TRITON_OPS))
def test_each_kernel_is_registered(name):
    """A per-op override swaps in exactly the registered kernel and says so; auto on the CPU never does."""
    module, func = _TRITON_OPS[name].split(":")
    kernel = getattr(importlib.import_module(module), func)
    ops = resolve_ops("reference", DEVICE, op_backends={name: "triton"})
    assert getattr(ops, name) is kernel and ops.backends[name] == "triton"
    assert getattr(resolve_ops("auto", "cpu"), name) is getattr(reference, name)


def test_every_kernel_is_in_use(fast):
    _, model = fast
    served = model.model.ops.backends
    assert {k for k, v in served.items() if v == "triton"} >= {
        "rms_norm",
        "add_rms_norm",
        "vit_attention",
        "apply_rotary",
        "silu_mul",
        "pixel_shuffle",
        "store_kv",
        "paged_prefill_attention",
        "paged_decode_attention",
    }
    assert {k for k, v in served.items() if v != "triton"} <= {"layer_norm", "gelu", "resize_tiles"}
    assert served["resize_tiles"] in ("native", "cuda")  # the compiled preprocessing, never Pillow


@pytest.mark.parametrize("case", ["text_only", "img_tiny_50x40_palette_max1"])
def test_golden_case_through_kernels(fast, case):
    variant, model = fast
    spec = golden_cases(variant)["cases"][case]
    want = load_file(GOLDEN / variant / "cases" / f"{case}.safetensors")
    keys = spec["pixel_values_keys"]
    pixels = None
    if keys:
        path, max_num = image_for_key(keys[0])
        pixels = pyvl.load_image(path, max_num=max_num)
    ids = want["input_ids"].tolist()
    if (
        pixels is None
    ):  # text: every prompt position; images: the ViT under the interpreter is slow, run it once
        logits = model.logits(ids).cpu()
        err = (logits[-8:] - want["logits_last"]).abs().max().item()
        assert torch.isfinite(logits).all() and err <= ATOL, f"{variant}/{case}: logits max |diff| {err:.2e}"
    new_ids, scores = model.generate(ids, pixels, dict(max_new_tokens=4), output_scores=True)
    err = (scores[0].cpu() - want["gen_scores"][:4]).abs().max().item()
    assert torch.isfinite(scores).all() and err <= ATOL, f"{variant}/{case}: step scores max |diff| {err:.2e}"
    assert new_ids[0].tolist() == spec["new_token_ids"][:4]
