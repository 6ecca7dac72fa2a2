"""4-bit AWQ models under tensor parallelism: the plan cuts packed tensors along whole words (outputs) and whole
groups (inputs), each rank's slices dequantize to exactly its part of the float weight, TP=2 and TP=3 (gloo,
real worker processes) answer as one process, and a split that would cut a group is refused.

The golden v15 model (4 query heads over 2 KV heads, head_dim 16, FFN 128) quantized by the tests' AutoAWQ:
with groups of 32, TP=2 splits wo's 64 inputs 32 + 32 and the FFN's 4 groups 2 + 2; with groups of 16, TP=3
splits the heads 2 + 1 + 1 (wo's inputs 32 + 16 + 16) and the FFN's 8 groups 3 + 3 + 2, uneven like the plan's
float splits; with groups of 32, TP=3 would cut wo inside a group. And a checkpoint of 6 query heads over 3 KV
heads, whose two ranks each repeat a KV head, so a packed K/V column range is read twice.
"""

from __future__ import annotations

import functools

import awq_reference as autoawq
import pytest
import torch
from conftest import GOLDEN, image_for_key
from parallel_models import uneven_groups_config, write_checkpoint
from safetensors.torch import load_file

import pyvl
from pyvl.bench.presets import preset_dict
from pyvl.config import ModelConfig, load_config
from pyvl.errors import ConfigError
from pyvl.ops.reference import dequantize_w4
from pyvl.parallel.plan import ShardPlan, Slice
from pyvl.quant import awq

REL_TOL = 1e-4  # as tests/test_parallel.py: TP=N logits within 1e-4 relative of TP=1
GEN = dict(max_new_tokens=8)
LINEARS = ("attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w3", "feed_forward.w2")


@functools.cache
def _pair(root, group: int, source: str = "v15"):
    """(AWQ folder, float32 twin) of ``source``: "v15" (golden), or "uneven": 6 query heads over 3 KV heads,
    whose TP=2 ranks each repeat a KV head (see tests/parallel_models.py), FFN 128."""
    folder = root / f"{source}-g{group}"
    folder.mkdir()
    if source == "v15":
        src = GOLDEN / "v15" / "checkpoint"
    else:
        config = uneven_groups_config()
        config["llm_config"]["intermediate_size"] = 128  # whole groups of 16 (the tp config's 130 is not)
        src = write_checkpoint(folder / "float", config)
    autoawq.write_awq_pair(src, folder / "awq", folder / "twin", group)
    return folder / "awq", folder / "twin"


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("awq_tp")
    return lambda group, source="v15": _pair(root, group, source)


def _cut(tensor: torch.Tensor, cut: Slice) -> torch.Tensor:
    if cut.dim is None:
        return tensor
    return torch.cat([tensor.narrow(cut.dim, a, b - a) for a, b in cut.ranges], dim=cut.dim)


@pytest.mark.parametrize(
    "source, group, world", [("v15", 32, 2), ("v15", 16, 2), ("v15", 16, 3), ("uneven", 16, 2)]
)
def test_each_ranks_packed_slices_dequantize_to_its_part_of_the_weight(pairs, source, group, world):
    awq_dir, twin_dir = pairs(group, source)
    cfg = load_config(awq_dir)
    if source == "uneven":  # the case the test is for: KV heads repeated on each rank
        assert [ShardPlan.for_rank(cfg, r, world).llm.kv_heads for r in range(world)] == [
            (0, 0, 1),
            (1, 2, 2),
        ]
    packed, twin = load_file(awq_dir / "model.safetensors"), load_file(twin_dir / "model.safetensors")
    for rank in range(world):
        plan = ShardPlan.for_rank(cfg, rank, world)
        packed_cuts, float_cuts = plan.slices(cfg), plan.llm.slices(cfg.llm)  # the same cuts, as floats
        for n in range(cfg.llm.num_hidden_layers):
            for linear in LINEARS:
                prefix = f"language_model.model.layers.{n}.{linear}"
                want = _cut(twin[f"{prefix}.weight"], float_cuts[f"{prefix}.weight"])
                rows = [
                    awq.to_rows(f"{prefix}.{a}", _cut(packed[f"{prefix}.{a}"], packed_cuts[f"{prefix}.{a}"]))
                    for a in ("qweight", "qzeros", "scales")
                ]
                assert torch.equal(dequantize_w4(*rows), want), f"rank {rank} of {world}: {prefix}"


@pytest.mark.parametrize("group, world", [(32, 2), (16, 3)])
def test_tensor_parallel_answers_as_one_process(pairs, group, world):
    folder = pairs(group)[0]
    kw = dict(device="cpu", dtype="float32", backend="reference")
    one = pyvl.load(folder, **kw)
    pixels = pyvl.load_image(image_for_key("gradient_800x600@max1")[0], max_num=1)
    ids = one.tokenizer.encode("A cat sat on the mat.")
    with pyvl.load(folder, tensor_parallel_size=world, **kw) as model:
        want, got = one.logits(ids), model.logits(ids)
        rel = ((got - want).abs().max() / want.abs().max()).item()
        assert torch.isfinite(got).all() and rel <= REL_TOL, f"TP={world}: logits differ by {rel:.2e}"
        for ask in (
            lambda m: m.chat(pixels, "What is in the image?", GEN),
            lambda m: m.chat(pixels, "Describe the colours.", GEN),  # its image and prefix cached
            lambda m: m.batch_chat(
                torch.cat([pixels, pixels]), ["What?", "Why?"], GEN, num_patches_list=[1, 1]
            ),
        ):
            assert ask(model) == ask(one)


def test_a_split_inside_a_group_is_refused_before_any_worker_starts(pairs):
    folder = pairs(32)[0]
    with pytest.raises(
        ConfigError, match=r"tensor_parallel_size=3: .*attention\.wo would be inputs 32\.\.48"
    ):
        pyvl.load(folder, device="cpu", dtype="float32", tensor_parallel_size=3)


def test_one_group_per_row_cannot_be_split():
    d = preset_dict("internvl-chat-v1-5-awq")
    d["llm_config"]["quantization_config"]["group_size"] = -1
    cfg = ModelConfig.from_dict(d)
    ShardPlan.for_rank(cfg, 0, 1)
    with pytest.raises(ConfigError, match=r"FFN's 16384 channels are 1 group\(s\) of 16384.*at most 1 ranks"):
        ShardPlan.for_rank(cfg, 0, 2)


def test_the_plan_counts_the_bytes_a_rank_holds(pairs):
    """ShardPlan.nbytes (pyvl info's per-rank figure) for a 4-bit model: the bytes a loaded model holds."""
    folder = pairs(32)[0]
    cfg = load_config(folder)
    model = pyvl.load(folder, device="cpu", dtype="bfloat16", backend="reference")
    held = sum(p.numel() * p.element_size() for p in model.model.parameters())
    assert ShardPlan.for_rank(cfg, 0, 1).nbytes(cfg, torch.bfloat16) == held
    halves = [ShardPlan.for_rank(cfg, r, 2).nbytes(cfg, torch.bfloat16) for r in range(2)]
    assert max(halves) < 0.75 * held
