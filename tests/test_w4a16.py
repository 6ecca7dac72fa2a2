"""pyvl.kernels.w4a16 against pyvl.ops.reference.w4a16_linear (rules: kernel_tolerances.py).

Both inner products (gemv up to GEMV_MAX_ROWS rows, gemm above) at odd row counts, output widths with a
masked tail (N = k * BLOCK_N + 8), group sizes 32 / 64 / 128 / 48 (chunks of 16) / one group per row, with and
without bias, x as a strided view of a wider tensor and as [B, S, K]. The oracle is the reference on float32
x and scales (W exact in float32); the same-dtype reference rounds W to x's dtype as the kernel does.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

from kernel_tolerances import assert_matches_oracle, fresh_generator, randn

from pyvl.kernels.w4a16 import GEMV_MAX_ROWS, w4a16_linear
from pyvl.ops import reference as ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def packed_weight(n: int, k: int, group: int, dtype, gen: torch.Generator):
    """Random qweight int32 [n, k/8] (every bit pattern, sign bit included), qzeros uint8, scales in dtype."""
    qweight = torch.randint(-(2**31), 2**31, (n, k // 8), generator=gen, dtype=torch.int64).to(torch.int32)
    qzeros = torch.randint(0, 16, (n, k // group), generator=gen).to(torch.uint8)
    scales = (torch.rand(n, k // group, generator=gen) * 0.02 + 0.002).to(dtype)
    return qweight.to(DEVICE), qzeros.to(DEVICE), scales.to(DEVICE)


def check(x, weight, bias=None, out=None, config=None, what=""):
    """Run the kernel (into a NaN-poisoned ``out``) and hold it to the oracle."""
    qweight, qzeros, scales = weight
    n = qweight.shape[0]
    if out is None:
        out = torch.full((*x.shape[:-1], n), float("nan"), dtype=x.dtype, device=x.device)
    assert w4a16_linear(x, qweight, qzeros, scales, bias, out=out, config=config) is out
    oracle = ref.w4a16_linear(
        x.float(), qweight, qzeros, scales.float(), None if bias is None else bias.float()
    )
    assert_matches_oracle(out, oracle, ref.w4a16_linear(x, qweight, qzeros, scales, bias), what)
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("m", [1, 3, GEMV_MAX_ROWS, GEMV_MAX_ROWS + 1, 33])
@pytest.mark.parametrize(
    "n, k, group", [(72, 128, 32), (40, 192, 64), (136, 256, 128), (32, 160, 160), (24, 240, 48)]
)
def test_matches_reference(dtype, m, n, k, group):
    gen, seed = fresh_generator()
    x = randn(m, k, dtype=dtype, device=DEVICE, gen=gen)
    check(x, packed_weight(n, k, group, dtype, gen), what=f"seed {seed}")


@pytest.mark.parametrize("m", [2, 20])
def test_bias_strided_rows_and_batch_dims(m):
    gen, seed = fresh_generator()
    weight = packed_weight(96, 128, 64, torch.bfloat16, gen)
    bias = randn(96, dtype=torch.bfloat16, device=DEVICE, gen=gen)
    wide = randn(m, 3 * 128, dtype=torch.bfloat16, device=DEVICE, gen=gen)
    check(wide[:, 128:256], weight, bias, what=f"strided rows, seed {seed}")  # a view: row stride 384
    check(wide[:, :128].reshape(m, 1, 128), weight, bias, what=f"[B, S, K], seed {seed}")
    out = torch.full((2 * m, 96), float("nan"), dtype=torch.bfloat16, device=DEVICE)[
        ::2
    ]  # out with a row stride
    check(wide[:, :128], weight, bias, out=out, what=f"strided out, seed {seed}")


@pytest.mark.parametrize("kernel", ["gemv", "gemm"])
@pytest.mark.parametrize("m", [4, 6])
def test_either_product_at_the_same_rows(kernel, m):
    """The launcher's choice by row count is only speed: both inner products give the reference (with 6 rows,
    the gemv product's 4-row programs split them)."""
    gen, seed = fresh_generator()
    x = randn(m, 128, dtype=torch.bfloat16, device=DEVICE, gen=gen)
    config = dict(kernel=kernel, BLOCK_M=4 if kernel == "gemv" else 16, BLOCK_N=32, BLOCK_K=32)
    check(x, packed_weight(64, 128, 32, torch.bfloat16, gen), config=config, what=f"{kernel}, seed {seed}")


def test_decode_rows_take_the_gemv_product():
    from pyvl.bench.resources import launched_kernels
    from pyvl.kernels.w4a16 import default_config

    assert [default_config(m)["kernel"] for m in (1, GEMV_MAX_ROWS, GEMV_MAX_ROWS + 1)] == [
        "gemv",
        "gemv",
        "gemm",
    ]
    gen, _ = fresh_generator()
    with launched_kernels() as kernels:  # the bench's regs/spills/smem column finds the kernel
        w4a16_linear(
            randn(1, 64, dtype=torch.bfloat16, device=DEVICE, gen=gen),
            *packed_weight(32, 64, 32, torch.bfloat16, gen),
        )
    assert [k["kernel"] for k in kernels] == ["_w4a16_kernel"]


def test_empty_rows():
    gen, _ = fresh_generator()
    weight = packed_weight(32, 64, 32, torch.bfloat16, gen)
    assert w4a16_linear(torch.empty(0, 64, dtype=torch.bfloat16, device=DEVICE), *weight).shape == (0, 32)


def test_rejects_bad_inputs():
    gen, _ = fresh_generator()
    qweight, qzeros, scales = packed_weight(32, 64, 32, torch.bfloat16, gen)
    x = torch.zeros(2, 64, dtype=torch.bfloat16, device=DEVICE)
    with pytest.raises(ValueError, match="qweight must be a contiguous int32"):
        w4a16_linear(x, qweight.float(), qzeros, scales)
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., 64\]"):
        w4a16_linear(x[:, :32], qweight, qzeros, scales)
    with pytest.raises(ValueError, match="scales must be"):
        w4a16_linear(x, qweight, qzeros, scales.float())
    with pytest.raises(ValueError, match="qzeros must be a contiguous uint8"):
        w4a16_linear(x, qweight, qzeros.int(), scales)
    with pytest.raises(ValueError, match="multiple of 16"):  # 8 groups over 64 inputs: groups of 8
        w4a16_linear(
            x, qweight, torch.zeros(32, 8, dtype=torch.uint8), torch.ones(32, 8, dtype=torch.bfloat16)
        )
    with pytest.raises(ValueError, match=r"bias must be \[32\]"):
        w4a16_linear(x, qweight, qzeros, scales, torch.zeros(16, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="last-dim stride"):
        w4a16_linear(torch.zeros(64, 2, dtype=torch.bfloat16, device=DEVICE).t(), qweight, qzeros, scales)


@gpu
@pytest.mark.parametrize("m", [1, 16, 3400])
def test_real_shape(m):
    """InternLM2-20B's wqkv (8192 x 6144, groups of 128): a decode step, a full decode batch, a prefill."""
    gen, seed = fresh_generator()
    x = randn(m, 6144, dtype=torch.bfloat16, device=DEVICE, gen=gen)
    check(x, packed_weight(8192, 6144, 128, torch.bfloat16, gen), what=f"m {m}, seed {seed}")


def test_bench_rows_smoke():
    """``pyvl bench kernels --smoke``'s w4a16 rows (the GPU's, at tiny shapes): every linear, both kernels,
    each row's output against cuBLAS-on-the-dequantized-weight's."""
    from pyvl.bench import kernels
    from pyvl.kernels._common import interpreting

    if not interpreting():
        pytest.skip(
            "the smoke runs under the Triton interpreter; on a GPU, benchmarks/device_check.sh times the rows"
        )
    result = kernels.run(ops=["w4a16_linear"], smoke=True)
    assert result["notes"] == []
    shapes = [row["shape"].split()[:2] for row in result["rows"]]
    s = kernels.SMOKE
    assert shapes == [["wqkv", "1"], ["wo", "1"], ["w13", "1"], ["w13", str(s.decode_batch)], ["w2", "1"]] + [
        ["w13", str(s.prompt)],
        ["w2", str(s.prompt)],
    ]
    assert all(row["rel_diff"] < 1e-2 and row["ms"] > 0 for row in result["rows"]), result["rows"]


_SM90_COMPILE = """
import re, subprocess, sys, tempfile
try:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource
except ImportError as exc:
    sys.exit(f"SKIP {exc}")
from pyvl.kernels.w4a16 import _w4a16_kernel, default_config

pointers = dict(X="*bf16", QW="*i32", QZ="*u8", S="*bf16", Bias="*bf16", Out="*bf16")
scalars = "M N K stride_xm stride_om stride_qw stride_qz stride_s".split()
for m in (1, 2, 4, 16, 64, 3400):
    cfg = default_config(m)
    constexprs = dict(GROUP=128, HAS_BIAS=False, DOT=cfg["kernel"] == "gemm", BLOCK_M=cfg["BLOCK_M"],
                      BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], INTERPRET=False, PRECISION=None)
    signature = pointers | dict.fromkeys(scalars, "i32") | dict.fromkeys(constexprs, "constexpr")
    kernel = triton.compile(ASTSource(_w4a16_kernel, signature, constexprs), target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
        ptx.write(kernel.asm["ptx"])
        ptx.flush()
        report = subprocess.run([get_ptxas(90).path, "-arch=sm_90a", "-v", ptx.name, "-o", "/dev/null"],
                                capture_output=True, text=True).stderr
    regs, spills = re.search(r"Used (\\d+) registers", report)[1], re.search(r"(\\d+) bytes spill stores", report)[1]
    print(m, cfg["kernel"], regs, spills)
"""


def test_compiles_for_sm90_without_spills():
    """Offline, no GPU needed: each regime's default configuration compiles to sm_90a (Triton's own ptxas) and
    keeps its registers: a dequantized tile too big for them would spill to local memory on every step."""
    import subprocess
    import sys

    env = {
        k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"
    }  # the real compiler, not the interpreter
    proc = subprocess.run(
        [sys.executable, "-c", _SM90_COMPILE], env=env, capture_output=True, text=True, timeout=600
    )
    if proc.returncode and proc.stderr.startswith("SKIP"):
        pytest.skip(f"no Triton CUDA backend here: {proc.stderr.strip()[-200:]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split() for line in proc.stdout.splitlines()]
    assert [r[0] for r in rows] == ["1", "2", "4", "16", "64", "3400"], proc.stdout
    assert all(int(spills) == 0 for *_, spills in rows), proc.stdout
    print(proc.stdout)
