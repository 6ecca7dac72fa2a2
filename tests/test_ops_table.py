"""The op table's choices: SDPA attention for bf16/fp16 on the CPU, resize_tiles behind the table.

The SDPA implementations are judged like every kernel (tests/kernel_tolerances.py): against the reference on
float32-upcast inputs, at most twice as wrong as the reference run in the same dtype, on fresh random inputs
and odd shapes. The preprocessing op must give the same tiles whichever implementation serves it, and a
loaded model must preprocess raw images through its own op, on its device, in its dtype.
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import GOLDEN
from kernel_tolerances import assert_matches_oracle, fresh_generator, randn

import pyvl
from pyvl.image import IMAGENET_MEAN, IMAGENET_STD, choose_grid, load_image
from pyvl.ops import reference, resolve_ops, sdpa

HALF = [torch.bfloat16, torch.float16]
IMAGE = GOLDEN / "images" / "gradient_800x600.png"


def _native_built() -> bool:
    try:
        from pyvl.ops import preprocess  # noqa: F401
    except ImportError:
        return False
    return True


# --- SDPA against the float32 oracle ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("b, h, s, d", [(1, 2, 1025, 64), (2, 3, 257, 32), (3, 1, 1, 64), (1, 2, 129, 128)])
def test_sdpa_vit_attention_matches_oracle(dtype, b, h, s, d):
    gen, seed = fresh_generator()
    q, k, v = (randn(b, h, s, d, dtype=dtype, device="cpu", gen=gen) for _ in range(3))
    out = sdpa.vit_attention(q, k, v)
    assert out.dtype == dtype and out.shape == q.shape
    oracle = reference.vit_attention(q.float(), k.float(), v.float())
    assert_matches_oracle(out, oracle, reference.vit_attention(q, k, v), f"seed {seed}, {dtype}, S={s}")


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("ratio", [1, 2, 6])
@pytest.mark.parametrize("sq, sk", [(37, 37), (1, 45), (5, 130), (1, 1)])
def test_sdpa_paged_prefill_matches_oracle(dtype, ratio, sq, sk):
    gen, seed = fresh_generator()
    hkv, d, bs = 2, 64, 16
    n_blocks = -(-sk // bs)
    q = randn(sq, hkv * ratio, d, dtype=dtype, device="cpu", gen=gen)
    k_pool, v_pool = (randn(n_blocks + 2, hkv, bs, d, dtype=dtype, device="cpu", gen=gen) for _ in range(2))
    table = torch.randperm(n_blocks + 2, generator=gen)[:n_blocks].to(torch.int32)
    out = sdpa.paged_prefill_attention(q, k_pool, v_pool, table, sk)
    assert out.dtype == dtype and out.shape == q.shape
    oracle = reference.paged_prefill_attention(q.float(), k_pool.float(), v_pool.float(), table, sk)
    same = reference.paged_prefill_attention(q, k_pool, v_pool, table, sk)
    assert_matches_oracle(out, oracle, same, f"seed {seed}, {dtype}, GQA {ratio}, Sq {sq}, Sk {sk}")


def test_sdpa_paged_prefill_is_causal():
    """Changing a future key, or a pool slot past the context, must not move any output that may not see it."""
    gen, _ = fresh_generator()
    q = randn(6, 4, 16, dtype=torch.bfloat16, device="cpu", gen=gen)
    k, v = (randn(1, 2, 16, 16, dtype=torch.bfloat16, device="cpu", gen=gen) for _ in range(2))
    table = torch.zeros(1, dtype=torch.int32)
    base = sdpa.paged_prefill_attention(q, k, v, table, 10)  # queries at positions 4..9
    k2, v2 = k.clone(), v.clone()
    k2[0, :, 10:], v2[0, :, 10:] = 9.0, 9.0  # slots past the context
    assert torch.equal(sdpa.paged_prefill_attention(q, k2, v2, table, 10), base)
    k2[0, :, 9], v2[0, :, 9] = -9.0, -9.0  # the last key: only the last query sees it
    moved = sdpa.paged_prefill_attention(q, k2, v2, table, 10)
    assert torch.equal(moved[:5], base[:5])
    assert not torch.equal(moved[5], base[5])


# --- which implementation serves each op --------------------------------------------------------------------


@pytest.mark.parametrize("dtype", HALF)
def test_auto_on_the_cpu_serves_half_attention_with_sdpa(dtype):
    ops = resolve_ops("auto", "cpu", dtype=dtype)
    assert (
        ops.vit_attention is sdpa.vit_attention
        and ops.paged_prefill_attention is sdpa.paged_prefill_attention
    )
    assert ops.backends["vit_attention"] == ops.backends["paged_prefill_attention"] == "sdpa"
    assert ops.rms_norm is reference.rms_norm  # no faster equally exact choice for the rest
    forced = resolve_ops("auto", "cpu", {"vit_attention": "reference"}, dtype=dtype)
    assert forced.vit_attention is reference.vit_attention and forced.backends["vit_attention"] == "reference"
    assert (
        resolve_ops("reference", "cpu", dtype=dtype).paged_prefill_attention
        is reference.paged_prefill_attention
    )


def test_auto_in_float32_keeps_the_references():
    ops = resolve_ops("auto", "cpu", dtype=torch.float32)
    assert ops.vit_attention is reference.vit_attention
    assert ops.paged_prefill_attention is reference.paged_prefill_attention
    assert {ops.backends[n] for n in ("vit_attention", "paged_prefill_attention", "rms_norm")} == {
        "reference"
    }


def test_resize_tiles_resolution():
    want = "native" if _native_built() else "reference"
    for backend in ("auto", "triton"):  # no Triton kernel: the compiled one serves under both
        assert resolve_ops(backend, "cpu").backends["resize_tiles"] == want
    ops = resolve_ops("auto", "cpu", {"resize_tiles": "reference"})
    assert ops.resize_tiles is reference.resize_tiles and ops.backends["resize_tiles"] == "reference"


# --- the resize_tiles op ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "h, w, cols, rows, thumbnail", [(600, 800, 3, 2, True), (31, 17, 1, 1, True), (100, 300, 3, 1, False)]
)
def test_resize_tiles_implementations_agree(dtype, h, w, cols, rows, thumbnail):
    if not _native_built():
        pytest.skip("pyvl._C is not built (test_packaging insists it is)")
    from pyvl.ops import preprocess

    rgb = np.random.default_rng(h * w).integers(0, 256, (h, w, 3), dtype=np.uint8)
    args = (rgb, cols, rows, 64, thumbnail, IMAGENET_MEAN, IMAGENET_STD)
    want = reference.resize_tiles(*args, dtype=dtype, device=torch.device("cpu"))
    got = preprocess.resize_tiles_cpu(*args, dtype=dtype, device=torch.device("cpu"))
    assert want.shape == (cols * rows + int(thumbnail and cols * rows > 1), 3, 64, 64)
    assert got.dtype == want.dtype == dtype and torch.equal(got, want)


@pytest.mark.parametrize("dtype, served", [(torch.float32, "reference"), (torch.bfloat16, "auto")])
def test_model_preprocesses_through_its_op(dtype, served):
    overrides = {"resize_tiles": "reference"} if served == "reference" else None
    chat = pyvl.load(GOLDEN / "mini" / "checkpoint", device="cpu", dtype=dtype, op_backends=overrides)
    if served == "reference":
        assert chat.model.ops.backends["resize_tiles"] == "reference"
    calls = []
    op = chat.model.ops.resize_tiles
    object.__setattr__(chat.model.ops, "resize_tiles", lambda *a, **kw: calls.append(kw) or op(*a, **kw))
    try:
        tiles, patches = chat.tile_images([IMAGE, IMAGE], max_num=2)
    finally:
        object.__setattr__(chat.model.ops, "resize_tiles", op)
    assert [c["dtype"] for c in calls] == [dtype, dtype] and calls[0]["device"] == chat.device
    single = load_image(IMAGE, max_num=2)
    assert patches == [single.shape[0]] * 2 and tiles.dtype == dtype
    assert torch.equal(tiles, torch.cat([single, single]).to(dtype))


def test_tiling_policy_fits_the_kernels():
    if not _native_built():
        pytest.skip("pyvl._C is not built (test_packaging insists it is)")
    from pyvl.image import MAX_TILES
    from pyvl.ops import native

    assert 1 <= MAX_TILES <= native.MAX_GRID_TILES  # every grid choose_grid may pick, the kernels accept


def test_load_image_paths_agree():
    cols, rows = choose_grid(800, 600, 1, 6)
    got = load_image(IMAGE, max_num=6, use_native=False)
    assert got.shape[0] == cols * rows + 1 and torch.equal(got, load_image(IMAGE, max_num=6))


def test_ops_never_import_the_image_policy():
    """pyvl.image imports pyvl.ops (the resize is an op); the other way round would be a cycle again."""
    packages = {0: "", 1: "pyvl.ops", 2: "pyvl"}  # what a relative import inside pyvl/ops/ starts from
    for path in (Path(pyvl.__file__).parent / "ops").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                module = ".".join(filter(None, [packages[node.level], node.module]))
                modules = [module] + [f"{module}.{alias.name}" for alias in node.names]
            else:
                continue
            assert "pyvl.image" not in modules, f"{path.name} imports pyvl.image ({modules})"
