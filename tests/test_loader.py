"""Model-folder loading: sharded and single-file safetensors, the strict key check, and every error path."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

import pyvl
from pyvl.errors import CheckpointError, ConfigError
from pyvl.loader import index_checkpoint, read_header
from conftest import GOLDEN

MINI = GOLDEN / "mini" / "checkpoint"


@pytest.fixture
def folder(tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(MINI, dst)
    for p in dst.iterdir():
        p.chmod(0o644)
    return dst


def shard_names(folder):
    return sorted(p.name for p in folder.glob("model-*.safetensors"))


def test_sharded_load_equals_shard_tensors(folder):
    model = pyvl.load(folder, device="cpu", dtype="bfloat16")
    params = dict(model.model.named_parameters())
    from pyvl.models.llm import regroup_wqkv

    for shard in shard_names(folder):
        for name, tensor in load_file(folder / shard).items():
            want = regroup_wqkv(tensor, model.config.llm) if name.endswith("wqkv.weight") else tensor
            assert torch.equal(params[name], want), name
    assert all(p.device.type == "cpu" and p.dtype == torch.bfloat16 for p in params.values())


def test_single_file_checkpoint(folder):
    merged = {}
    for shard in shard_names(folder):
        merged.update(load_file(folder / shard))
        (folder / shard).unlink()
    (folder / "model.safetensors.index.json").unlink()
    save_file(merged, str(folder / "model.safetensors"), metadata={"format": "pt"})
    a = pyvl.load(folder, device="cpu").logits([1, 5, 6, 7])
    b = pyvl.load(MINI, device="cpu").logits([1, 5, 6, 7])
    assert torch.equal(a, b)


def test_wqkv_regroup_puts_each_head_where_the_spec_says():
    from pyvl.config import load_config
    from pyvl.models.llm import regroup_wqkv

    cfg = load_config(GOLDEN / "v15" / "checkpoint").llm  # 4 query heads, 2 KV heads: G = 2
    n_kv, g, d, h = cfg.num_key_value_heads, cfg.num_kv_groups, cfg.head_dim, cfg.hidden_size
    packed = torch.randn((n_kv * (g + 2)) * d, h)
    planar = regroup_wqkv(packed, cfg)
    for n in range(cfg.num_attention_heads):  # query head n -> group n // G, slot n % G
        rows = ((n // g) * (g + 2) + n % g) * d
        assert torch.equal(planar[n * d:(n + 1) * d], packed[rows:rows + d])
    q_rows = cfg.num_attention_heads * d
    for kv in range(n_kv):
        k_rows, v_rows = (kv * (g + 2) + g) * d, (kv * (g + 2) + g + 1) * d
        assert torch.equal(planar[q_rows + kv * d:q_rows + (kv + 1) * d], packed[k_rows:k_rows + d])
        assert torch.equal(planar[q_rows + (n_kv + kv) * d:q_rows + (n_kv + kv + 1) * d], packed[v_rows:v_rows + d])


def test_missing_shard(folder):
    (folder / shard_names(folder)[1]).unlink()
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002.safetensors.*missing"):
        pyvl.load(folder, device="cpu")


def test_truncated_file(folder):
    shard = folder / shard_names(folder)[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        pyvl.load(folder, device="cpu")


@pytest.mark.parametrize("damage", ["length", "json", "short"])
def test_corrupt_header(folder, damage):
    shard = folder / shard_names(folder)[0]
    data = bytearray(shard.read_bytes())
    if damage == "length":
        data[:8] = struct.pack("<Q", 10**12)
    elif damage == "json":
        data[8:12] = b"\xff\xfe{{"
    else:
        data = data[:5]
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=shard.name):
        pyvl.load(folder, device="cpu")


def _rewrite(folder, edit):
    """Apply edit(dict of tensors) to the first shard and keep the index consistent."""
    shard = folder / shard_names(folder)[0]
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard.name}
    index["weight_map"].update({k: shard.name for k in tensors})
    index_path.write_text(json.dumps(index))
    return tensors


def test_strict_check_lists_every_problem_at_once(folder):
    def edit(t):
        t["vision_model.encoder.layers.0.ls1"] = torch.zeros(7, dtype=torch.bfloat16)  # wrong shape
        t["vision_model.encoder.layers.0.extra.weight"] = torch.zeros(3, dtype=torch.bfloat16)  # unknown
        del t["vision_model.embeddings.class_embedding"]  # missing

    _rewrite(folder, edit)
    with pytest.raises(CheckpointError) as err:
        pyvl.load(folder, device="cpu")
    msg = str(err.value)
    assert "1 missing" in msg and "vision_model.embeddings.class_embedding" in msg
    assert "1 unexpected" in msg and "vision_model.encoder.layers.0.extra.weight" in msg
    assert "1 wrong shape" in msg and "vision_model.encoder.layers.0.ls1: checkpoint [7], model expects [48]" in msg


def test_index_points_at_absent_tensor(folder):
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["language_model.model.norm.weight"] = shard_names(folder)[0]
    index_path.write_text(json.dumps(index))
    if "language_model.model.norm.weight" in load_file(folder / shard_names(folder)[0]):
        pytest.fail("fixture layout changed")
    with pytest.raises(CheckpointError, match="no such tensor"):
        pyvl.load(folder, device="cpu")


def test_pickle_checkpoint_is_refused(folder):
    for shard in shard_names(folder):
        (folder / shard).unlink()
    (folder / "model.safetensors.index.json").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(CheckpointError, match="pickle.*arbitrary code"):
        pyvl.load(folder, device="cpu")


def test_no_weights_at_all(folder):
    for shard in shard_names(folder):
        (folder / shard).unlink()
    (folder / "model.safetensors.index.json").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        pyvl.load(folder, device="cpu")


def test_not_a_folder(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        pyvl.load(tmp_path / "nope")


def test_read_header_reports_sizes(folder):
    infos = read_header(folder / shard_names(folder)[0])
    assert infos and all(i.dtype == "BF16" and i.nbytes == 2 * torch.Size(i.shape).numel() for i in infos.values())
    assert set(index_checkpoint(folder)) == set(json.loads((folder / "model.safetensors.index.json")
                                                           .read_text())["weight_map"])


@pytest.mark.parametrize("edit, match", [
    (lambda c: c.pop("llm_config"), "required key 'llm_config'"),
    (lambda c: c["vision_config"].pop("hidden_size"), "vision_config: required key 'hidden_size'"),
    (lambda c: c.update(ps_version="v3"), "ps_version 'v3'"),
    (lambda c: c.update(select_layer=-9), "select_layer -9 is out of range"),
    (lambda c: c.update(hidden_size=65), "hidden_size 65 contradicts"),
    (lambda c: c["llm_config"].update(num_key_value_heads=3), "not a multiple of num_key_value_heads 3"),
    (lambda c: c["llm_config"].update(rope_scaling={"type": "yarn", "factor": 2.0}), "rope_scaling type 'yarn'"),
    (lambda c: c["llm_config"].update(architectures=["Phi3ForCausalLM"]), "InternLM2ForCausalLM only"),
    (lambda c: c.update(template="phi3-chat"), "template 'phi3-chat'"),
])
def test_config_errors(folder, edit, match):
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    edit(cfg)
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=match):
        pyvl.load(folder, device="cpu")


def test_config_not_json(folder):
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        pyvl.load(folder, device="cpu")


def test_missing_ps_version_warns_and_uses_class_default(folder, caplog):
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["ps_version"], cfg["select_layer"]
    cfg_path.write_text(json.dumps(cfg))
    with caplog.at_level("WARNING", logger="pyvl"):
        model = pyvl.load(folder, device="cpu")
    assert model.config.ps_version == "v1" and model.config.select_layer == -1
    assert "ps_version" in caplog.text and "select_layer" in caplog.text


def test_progress_bar(capsys):
    pyvl.load(MINI, device="cpu", progress=True)
    err = capsys.readouterr().err
    assert "loading weights" in err and "100.0%" in err
    pyvl.load(MINI, device="cpu")  # small load, not a terminal: silent
    assert capsys.readouterr().err == ""
