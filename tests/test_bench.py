"""``pyvl bench``: presets at the released models' sizes, the CPU path of e2e, the CUDA gates, the result formatting, the
kernel-resource helper and the sweep's configuration plumbing (under TRITON_INTERPRET=1 without a GPU).

Timings are never asserted (they are only checked to be positive numbers); the GPU figures are measured by
running the commands on a GPU machine.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import types

import pytest
import torch

from pyvl.bench import e2e, e2e_hf
from pyvl.bench.presets import PRESETS, parameter_count, preset_config, random_model
from pyvl.cli import build_parser, main
from pyvl.demo import ASSETS
from pyvl.tokenizer import Tokenizer

# Spec section 1: (vision layers, width, heads, MLP, norm, qkv bias, qk norm; LLM layers, width, heads, kv heads, FFN)
SPEC = {
    "internvl-chat-v1-5": ((45, 3200, 25, 12800, "rms_norm", False, True), (48, 6144, 48, 8, 16384)),
    "mini-internvl-chat-2b-v1-5": ((24, 1024, 16, 4096, "layer_norm", True, False), (24, 2048, 16, 8, 8192)),
}
E2E_KEYS = {"key", "figure", "unit", "pyvl", "hf", "hf/pyvl"}


@pytest.mark.parametrize("name", sorted(SPEC))
def test_presets_have_the_spec_dimensions(name):
    cfg = preset_config(name)
    v, lm = cfg.vision, cfg.llm
    assert (
        v.num_hidden_layers,
        v.hidden_size,
        v.num_attention_heads,
        v.intermediate_size,
        v.norm_type,
        v.qkv_bias,
        v.qk_normalization,
    ) == SPEC[name][0]
    assert (
        lm.num_hidden_layers,
        lm.hidden_size,
        lm.num_attention_heads,
        lm.num_key_value_heads,
        lm.intermediate_size,
    ) == SPEC[name][1]
    assert (lm.vocab_size, lm.max_position_embeddings, lm.rope_theta, lm.rms_norm_eps) == (
        92553,
        32768,
        1e6,
        1e-5,
    )
    assert (lm.rope_scaling_type, lm.rope_scaling_factor) == ("dynamic", 2.0)  # as the measured HF baseline
    assert (cfg.ps_version, cfg.image_size, cfg.num_image_token, cfg.select_layer, lm.bias) == (
        "v2",
        448,
        256,
        -1,
        False,
    )
    assert v.head_dim == (128 if name == "internvl-chat-v1-5" else 64) and lm.head_dim == 128


def test_preset_parameter_counts_on_meta():
    v15 = parameter_count(preset_config("internvl-chat-v1-5"))
    mini = parameter_count(preset_config("mini-internvl-chat-2b-v1-5"))
    assert round(v15["total"] / 1e9, 1) == 25.5  # shared/measurements: 25.5 B
    assert round(v15["vision_model"] / 1e9, 2) == 5.54 and round(v15["language_model"] / 1e9, 2) == 19.86
    assert round(mini["total"] / 1e9, 1) == 2.2  # 4.41 GB of bf16, as released
    assert round(mini["total"] * 2 / 1e9, 2) == 4.41
    assert round(mini["vision_model"] / 1e6) == 304 and round(mini["language_model"] / 1e9, 2) == 1.89
    assert set(PRESETS) == {
        "internvl-chat-v1-5",
        "mini-internvl-chat-2b-v1-5",
        "tiny",
        "internvl-chat-v1-5-awq",
        "tiny-awq",
    }


def test_random_model_is_materialised_in_the_asked_dtype():
    model = random_model(preset_config("tiny"), "cpu", torch.bfloat16)
    params = dict(model.named_parameters())
    assert all(
        p.device.type == "cpu" and p.dtype == torch.bfloat16 and not p.requires_grad for p in params.values()
    )
    assert torch.all(params["language_model.model.norm.weight"] == 1)
    assert torch.all(params["vision_model.encoder.layers.0.norm1.bias"] == 0)
    assert torch.all(params["mlp1.0.weight"] == 1)
    w = params["language_model.output.weight"].float()
    assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.002
    with torch.inference_mode():
        feats = model.extract_feature(torch.randn(1, 3, 448, 448))
    assert feats.shape == (1, 256, 128) and torch.isfinite(feats).all()


@pytest.mark.parametrize("tiles,text", [(1, 70), (13, 70), (2, 0)])
def test_build_prompt_counts_tokens(tiles, text):
    tokenizer = Tokenizer.from_folder(ASSETS)
    ids = e2e.build_prompt(tokenizer, tiles, text, 256)
    n_image = sum(i == tokenizer.img_context_id for i in ids)
    assert n_image == tiles * 256 and max(ids) < len(tokenizer)
    minimum = len(e2e.build_prompt(tokenizer, tiles, 0, 256)) - n_image
    assert len(ids) - n_image == max(text, minimum)
    if tiles == 13:
        assert len(ids) == 3398  # ~3,400 tokens, the prompt of the targets


def test_bench_e2e_tiny_on_cpu_json(capsys):
    code = main(
        [
            "bench",
            "e2e",
            "--preset",
            "tiny",
            "--random-weights",
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--tiles",
            "1",
            "2",
            "--prompt-tokens",
            "20",
            "--decode-tokens",
            "3",
            "--repeat",
            "1",
            "--json",
        ]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    rows = {r["key"]: r for r in result["rows"]}
    assert list(rows) == [
        "preprocess",
        "vision_1",
        "vision_2",
        "prefill",
        "ttft",
        "ttft_preprocess",
        "ttft_vision",
        "ttft_prefill",
        "ttft_sample",
        "ttft_other",
        "decode",
        "peak_memory",
        "weights",
        "kv_pool",
    ]
    for row in rows.values():
        assert set(row) == E2E_KEYS  # the same columns always; HF's are None on the CPU
        assert isinstance(row["pyvl"], float) and row["pyvl"] > 0, row
        assert row["hf"] is None and row["hf/pyvl"] is None
    assert rows["decode"]["unit"] == "ms/token" and rows["peak_memory"]["unit"] == "GB"
    stages = sum(rows[k]["pyvl"] for k in ("ttft_preprocess", "ttft_vision", "ttft_prefill", "ttft_sample"))
    assert stages < rows["ttft"]["pyvl"] and rows["ttft_prefill"]["figure"].endswith("(1 chunk)")
    # the default KV pool holds just the prompt and its answer
    assert result["setup"]["kv_pool_GB"] == rows["kv_pool"]["pyvl"] < 0.01
    assert result["setup"]["graphs"]["eager_reason"] == "no CUDA graphs on cpu"
    setup = result["setup"]
    assert (setup["preset"], setup["device"], setup["dtype"], setup["tiles"]) == (
        "tiny",
        "cpu",
        "float32",
        [1, 2],
    )
    assert setup["prompt_tokens"] == 2 * 256 + setup["text_tokens"]
    assert setup["ops"]["vit_attention"] == "reference"  # backend auto on the CPU
    assert setup["systems"] == ["pyvl"]
    assert len(result["notes"]) == 1 and "HF comparison" in result["notes"][0]


def test_bench_e2e_streams_each_row_as_it_is_measured(capsys, monkeypatch):
    from pyvl.bench.report import collect

    seen_before_ttft = []
    measure = e2e._first_token_and_decode

    def spy(*args):  # what had been printed when the engine's runs began
        seen_before_ttft.extend(capsys.readouterr().out.splitlines())
        return measure(*args)

    monkeypatch.setattr(e2e, "_first_token_and_decode", spy)
    argv = [
        "bench",
        "e2e",
        "--preset",
        "tiny",
        "--random-weights",
        "--device",
        "cpu",
        "--tiles",
        "1",
        "--prompt-tokens",
        "0",
        "--decode-tokens",
        "2",
        "--repeat",
        "1",
        "--no-hf",
        "--kv-cache-gb",
        "0.002",
    ]
    assert main(argv + ["--jsonl"]) == 0
    lines = seen_before_ttft + capsys.readouterr().out.splitlines()
    early = collect(seen_before_ttft)
    assert [r["key"] for r in early["rows"]] == ["preprocess", "vision_1", "prefill"] and not early[
        "complete"
    ]
    assert early["setup"]["ops"]["vit_attention"] == "reference"  # known as soon as the model is built
    streamed = collect(lines)
    assert streamed["complete"] and 0 < streamed["setup"]["kv_pool_GB"] <= 0.002  # --kv-cache-gb
    assert [r["key"] for r in streamed["rows"]][-3:] == ["peak_memory", "weights", "kv_pool"]
    assert all(r["pyvl"] is not None for r in streamed["rows"])


def test_bench_e2e_table_and_flags(capsys):
    code = main(
        [
            "bench",
            "e2e",
            "--preset",
            "tiny",
            "--random-weights",
            "--device",
            "cpu",
            "--tiles",
            "1",
            "--prompt-tokens",
            "0",
            "--decode-tokens",
            "2",
            "--repeat",
            "1",
            "--no-hf",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert (
        "vision + projector, 1 tile" in out and "ms/token" in out and "note: HF comparison not asked" in out
    )
    assert main(["bench", "e2e", "--preset", "tiny", "--device", "cpu"]) == 2  # no --random-weights
    assert "--random-weights" in capsys.readouterr().err
    assert main(["bench", "e2e", "--preset", "tiny", "--random-weights", "--decode-tokens", "1"]) == 2
    assert "--decode-tokens >= 2" in capsys.readouterr().err


def test_hf_comparison_is_skipped_with_a_reason(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import fails as when it is not installed
    assert "not installed" in e2e_hf.hf_unavailable(torch.device("cuda"))
    monkeypatch.setitem(sys.modules, "transformers", types.ModuleType("transformers"))
    assert "CUDA only" in e2e_hf.hf_unavailable(torch.device("cpu"))
    assert e2e_hf.hf_unavailable(torch.device("cuda")) is None


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_hf_model_has_the_same_size(name):
    transformers = pytest.importorskip("transformers")
    cfg = preset_config(name)
    with torch.device("meta"):
        model = transformers.InternVLForConditionalGeneration(e2e_hf.hf_config(cfg, 1002))
    hf = sum(p.numel() for p in model.parameters())
    ours = parameter_count(cfg)["total"]
    assert abs(hf - ours) <= 2 * cfg.vision.hidden_size  # HF adds a final vision LayerNorm (weight + bias)


def test_bench_e2e_keeps_the_other_figures_when_a_stage_fails(capsys, monkeypatch):
    def broken(**_):
        raise RuntimeError("no memory left")

    monkeypatch.setattr(e2e, "GenerationConfig", broken)  # the ttft + decode stage raises
    code = main(
        [
            "bench",
            "e2e",
            "--preset",
            "tiny",
            "--random-weights",
            "--device",
            "cpu",
            "--tiles",
            "1",
            "--prompt-tokens",
            "0",
            "--decode-tokens",
            "2",
            "--repeat",
            "1",
            "--no-hf",
            "--json",
        ]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    rows = {r["key"]: r for r in result["rows"]}
    assert rows["ttft"]["pyvl"] is None and rows["decode"]["pyvl"] is None
    assert rows["prefill"]["pyvl"] > 0 and rows["vision_1"]["pyvl"] > 0
    assert any("ttft+decode failed: RuntimeError: no memory left" in n for n in result["notes"])


def test_bench_parser():
    parser = build_parser()
    args = parser.parse_args(["bench", "sweep", "--json", "--rep-ms", "50"])
    assert (args.what, args.json, args.rep_ms) == ("sweep", True, 50)
    args = parser.parse_args(
        ["bench", "preprocess", "--device", "cuda", "--sizes", "640x480", "--max-nums", "6"]
    )
    assert (args.device, args.sizes, args.max_nums) == ("cuda", ["640x480"], [6])
    args = parser.parse_args(["bench", "e2e", "--random-weights", "--hf-only"])
    assert args.hf_only and not args.no_hf
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "e2e", "--hf-only", "--no-hf"])
    args = parser.parse_args(["bench", "kernels", "--smoke", "--jsonl"])
    assert args.smoke and args.jsonl and not args.json
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "kernels", "--json", "--jsonl"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the messages printed without a GPU")
@pytest.mark.parametrize(
    "argv, words",
    [
        (["bench", "kernels"], "bench kernels needs a CUDA GPU"),
        (["bench", "sweep", "--json"], "bench sweep needs a CUDA GPU"),
        (
            ["bench", "preprocess", "--device", "cuda", "--json"],
            "bench preprocess --device cuda needs a CUDA device",
        ),
        (
            ["bench", "e2e", "--preset", "tiny", "--random-weights", "--device", "cpu", "--hf-only"],
            "CUDA only",
        ),
    ],
)
def test_gpu_benchmarks_need_cuda(capsys, argv, words):
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert lines[-1].startswith("pyvl: error: ") and words in lines[-1], captured.err
    assert "Traceback" not in captured.err and captured.out == ""


def test_kernel_resources_of_a_compiled_kernel_and_of_anything_else():
    from pyvl.bench.resources import format_resources, resources

    class Compiled:  # what Triton 3.x's CompiledKernel carries once its binary is loaded
        metadata = types.SimpleNamespace(shared=98304)

        def _init_handles(self):
            self.n_regs, self.n_spills = 255, 4

    got = resources(Compiled())
    assert got == {"regs": 255, "spills": 4, "shared_bytes": 98304}
    assert resources(None) == {"regs": None, "spills": None, "shared_bytes": None}  # the interpreter's launch
    assert format_resources([got, resources(None)]) == "255/4/96K + -/-/-"
    assert format_resources([]) == "-"


def test_launched_kernels_records_each_launch_and_unwraps():
    from pyvl.bench.kernels import paged_pool
    from pyvl.bench.resources import launched_kernels
    from pyvl.kernels import paged_attention as ca

    device = "cuda" if torch.cuda.is_available() else "cpu"
    q = torch.randn(1, 4, 16, device=device)
    pool, tables, _ = paged_pool(1, 40, 2, 16, device, torch.float32)
    lens = torch.full((1,), 40, dtype=torch.int32, device=device)
    with launched_kernels() as kernels:
        ca.paged_decode_attention(q, pool[0], pool[1], tables, lens, num_splits=3)
        ca.paged_decode_attention(
            q, pool[0], pool[1], tables, lens, num_splits=3
        )  # the same kernels: listed once
    assert [k["kernel"] for k in kernels] == ["_paged_decode_split_kernel", "_decode_reduce_kernel"]
    assert all(set(k) == {"kernel", "regs", "spills", "shared_bytes"} for k in kernels)
    if device == "cpu":
        assert all(k["regs"] is None and k["shared_bytes"] is None for k in kernels)
    assert "run" not in vars(ca._paged_decode_split_kernel) and "run" not in vars(ca._decode_reduce_kernel)


def test_rotation_copies_exceed_twice_the_l2():
    from pyvl.bench.kernels import rotation_copies

    mb = 2**20
    assert rotation_copies(14 * mb, 60 * mb) == 9  # 3400 keys: 9 copies = 126 MB >= 120 MB
    assert rotation_copies(134 * mb, 60 * mb) == 2  # never fewer than two, so no call finds its K/V cached
    for nbytes in (1, 7 * mb, 59 * mb, 500 * mb):
        assert rotation_copies(nbytes, 60 * mb) * nbytes >= 120 * mb


def test_sweep_vit_non_default_config_matches_the_reference():
    from pyvl.bench import sweep
    from pyvl.kernels.vit_attention import default_config

    device = "cuda" if torch.cuda.is_available() else "cpu"
    other = dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=1)
    assert other != default_config(16, torch.float32, 33)
    rows = sweep.vit_rows(shape=(1, 2, 33, 16), configs=[other], device=device, dtype=torch.float32)
    assert [r["default"] for r in rows] == [True, False] and rows[1]["params"] == other
    for r in rows:
        assert r["status"] == "ok" and r["rel_err"] < 1e-5, r  # float32: IEEE dots
        assert r["ms"] is None and r["kernels"][0]["kernel"] == "_vit_attention_kernel"
    assert "BLOCK_M=16 BLOCK_N=32 warps=4 stages=1" in sweep.format_result(
        {"setup": {"device": "cpu", "torch": "t", "triton": "x", "l2_MB": 0}, "rows": rows, "notes": []}
    )


def test_sweep_emits_each_row_as_soon_as_it_is_measured():
    from pyvl.bench import sweep

    device = "cuda" if torch.cuda.is_available() else "cpu"
    timed, emitted = [], []
    timer = lambda fn: timed.append(fn) or float(len(timed))  # noqa: E731  (the n-th one "takes" n ms)
    configs = [dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1), dict(BLOCK_M=16, BLOCK_N=32)]
    rows = sweep.vit_rows(
        shape=(1, 2, 33, 16),
        configs=configs,
        device=device,
        dtype=torch.float32,
        timer=timer,
        emit=lambda row: emitted.append((row["config"], len(timed))),
    )
    assert emitted == [
        (r["config"], i + 1) for i, r in enumerate(rows)
    ]  # each row out before the next is timed
    assert [r["vs_default"] for r in rows] == [1.0, 0.5, 0.333] and rows[0][
        "default"
    ]  # the default's ms / its ms


def test_sweep_decode_split_override_matches_the_reference():
    from pyvl.bench import sweep

    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = sweep.decode_rows(
        (4, 2, 40, 16),
        configs=[dict(num_splits=3, BLOCK_N=16), dict(num_splits=1)],
        device=device,
        dtype=torch.float32,
        copies=2,
    )
    assert rows[0]["default"] and not any(r["default"] for r in rows[1:])
    assert [r["params"]["num_splits"] for r in rows[1:]] == [3, 1]
    assert rows[0]["params"]["num_splits"] not in (3, 1)  # the launcher's own choice, resolved for the table
    for r in rows:
        assert r["status"] == "ok" and r["rel_err"] < 1e-5, r


def test_sweep_rows_fail_on_nan_and_report_errors():
    from pyvl.bench import sweep

    nan = sweep._row(
        "op",
        "s",
        {"BLOCK_N": 16},
        False,
        lambda: [torch.zeros(1)],
        lambda outs: float("nan"),
        None,
        1,
        1.0,
        "GB/s",
    )
    assert nan["status"].startswith("FAIL") and nan["rel_err"] is None

    def broken():
        raise RuntimeError("out of resource: shared memory")

    err = sweep._row("op", "s", {"BLOCK_N": 16}, False, broken, None, None, 1, 1.0, "GB/s")
    assert err["status"] == "error: RuntimeError: out of resource: shared memory" and err["ms"] is None


def test_kernels_and_preprocess_results_format():
    from pyvl.bench import kernels, preprocess_cuda

    row = {
        "op": "paged_decode_attention",
        "shape": "decode 48/8 x 3400 x 128",
        "timing": "graph, 9 K/V copies",
        "ms": 0.0123,
        "rate": 1234.5,
        "unit": "GB/s",
        "of_ceiling": 0.4,
        "baseline": "SDPA gqa",
        "baseline_ms": None,
        "baseline/ours": None,
        "rel_diff": 1.2e-3,
        "target": ">= 1500 GB/s",
        "kernels": [
            {"kernel": "_paged_decode_split_kernel", "regs": 128, "spills": 0, "shared_bytes": 32768}
        ],
    }
    text = kernels.format_result(
        {
            "setup": {"device": "H200", "torch": "2", "triton": "3.6", "l2_MB": 60.0},
            "ceilings": {"copy_GBps": 3900.0, "gemm_bf16_TFLOPs": 700.0},
            "rows": [row],
            "notes": ["x: failed"],
        }
    )
    assert "graph, 9 K/V copies" in text and "128/0/32K" in text and "regs/spills/smem" in text
    assert text.splitlines()[-1] == "note: x: failed"
    prep = {
        "image": "3840x2160",
        "max_num": 12,
        "grid": "4x2",
        "tiles": 9,
        "dtype": "bfloat16",
        "kernel_ms": 0.08,
        "from_host_ms": 3.1,
        "h2d_pinned_ms": 1.2,
        "h2d_pageable_ms": 2.5,
        "interpolate_ms": 0.9,
        "floor_ms": 0.01,
        "floor/kernel": 0.1,
        "interpolate/kernel": 11.2,
        "max_abs_diff_vs_cpu": 0.0,
        "interp_max_abs_diff": 0.1,
        "target": "< 0.1 ms",
    }
    text = preprocess_cuda.format_result(
        {
            "setup": {"device": "H200", "torch": "2", "tile": 448},
            "copy_GBps": 3900.0,
            "rows": [prep],
            "notes": [],
        }
    )
    assert "from host" in text and "diff vs CPU" in text and "< 0.1 ms" in text


def test_interpolate_baseline_has_the_kernels_output_shape():
    from pyvl.bench.preprocess import synthetic_photo
    from pyvl.bench.preprocess_cuda import interpolate_tiles

    image = torch.from_numpy(synthetic_photo(600, 300))
    tiles = interpolate_tiles(image, 2, 1, torch.bfloat16, tile=64)
    assert (
        tiles.shape == (3, 3, 64, 64)
        and tiles.dtype == torch.bfloat16
        and torch.isfinite(tiles.float()).all()
    )
    assert interpolate_tiles(image, 1, 1, torch.float32, tile=64).shape == (1, 3, 64, 64)  # no thumbnail


def _bench(*argv: str, interpret: bool = True, **popen) -> subprocess.Popen:
    """``python -m pyvl bench ARGV`` in a fresh process (TRITON_INTERPRET is read when the kernels are imported)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONUNBUFFERED")}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.Popen(
        [sys.executable, "-m", "pyvl", "bench", *argv],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


SMOKE_OPS = ["--ops", "pixel_shuffle", "rms_norm"]


def test_bench_kernels_smoke_streams_the_result_that_json_prints_whole():
    from pyvl.bench.kernels import SMOKE
    from pyvl.bench.report import collect

    lines = _bench("kernels", "--smoke", "--jsonl", *SMOKE_OPS).communicate(timeout=300)[0].splitlines()
    pieces = [json.loads(line) for line in lines]
    assert [p.get("set") for p in pieces[:2]] == ["setup", "ceilings"] and pieces[-1] == {"done": True}
    streamed = collect(lines)
    assert streamed["complete"] and streamed["setup"]["shapes"] == "smoke" and streamed["notes"] == []
    rows = streamed["rows"]
    assert [r["op"] for r in rows] == ["pixel_shuffle"] + ["rms_norm", "rms_norm (+residual)"] * 2
    g = math.isqrt(SMOKE.vit_seq - 1)
    assert rows[0]["shape"] == f"{SMOKE.vit_tiles} x {g} x {g} x {SMOKE.vit_width} v2"
    assert all(r["ms"] > 0 and r["rate"] > 0 and r["rel_diff"] < 1e-2 for r in rows), rows
    whole = json.loads(_bench("kernels", "--smoke", "--json", *SMOKE_OPS).communicate(timeout=300)[0])
    assert set(whole) == {"setup", "ceilings", "rows", "notes"}
    assert [(r["op"], r["shape"]) for r in whole["rows"]] == [(r["op"], r["shape"]) for r in rows]


def test_bench_sweep_killed_after_its_first_row_keeps_it():
    from pyvl.bench.report import collect

    proc = _bench("sweep", "--smoke", "--jsonl")
    lines = []
    try:
        for line in proc.stdout:  # each row must arrive as soon as it is measured, not at the end
            lines.append(line)
            if '"row"' in line:
                break
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    got = collect(lines + proc.stdout.readlines())
    # Killed right after the first row came: rows held back in a buffer, or printed in a batch, would come too.
    assert not got["complete"] and 1 <= len(got["rows"]) <= 2, "".join(lines)
    first = got["rows"][0]
    assert first["default"] and first["status"] == "ok" and first["vs_default"] == 1.0
    assert got["setup"]["rel_bound"] == 1e-2


def test_bench_smoke_needs_the_interpreter():
    out, err = _bench("kernels", "--smoke", interpret=False).communicate(timeout=300)
    assert "set TRITON_INTERPRET=1" in err and out == ""
