"""Model-folder loading: sharded and single-file safetensors, the strict key check, and every error path."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch
from ckpt_files import edit_header, shard_of
from conftest import GOLDEN
from safetensors.torch import load_file, save_file

import pyvl
from pyvl.config import load_config
from pyvl.errors import CheckpointError
from pyvl.loader import index_checkpoint, read_header

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

    tensors = {}
    for shard in shard_names(folder):
        tensors.update(load_file(folder / shard))
    for name, tensor in tensors.items():
        if name.endswith("feed_forward.w1.weight"):  # the two layout fixes: w1/w3 stacked, wqkv regrouped
            up = tensors[name.replace(".w1.", ".w3.")]
            assert torch.equal(params[name.replace(".w1.", ".w13.")], torch.cat([tensor, up])), name
        elif not name.endswith("feed_forward.w3.weight"):
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
        assert torch.equal(planar[n * d : (n + 1) * d], packed[rows : rows + d])
    q_rows = cfg.num_attention_heads * d
    for kv in range(n_kv):
        k_rows, v_rows = (kv * (g + 2) + g) * d, (kv * (g + 2) + g + 1) * d
        assert torch.equal(planar[q_rows + kv * d : q_rows + (kv + 1) * d], packed[k_rows : k_rows + d])
        assert torch.equal(
            planar[q_rows + (n_kv + kv) * d : q_rows + (n_kv + kv + 1) * d], packed[v_rows : v_rows + d]
        )


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
    assert (
        "1 wrong shape" in msg
        and "vision_model.encoder.layers.0.ls1: checkpoint [7], model expects [48]" in msg
    )


def test_index_points_at_absent_tensor(folder):
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["language_model.model.norm.weight"] = shard_names(folder)[0]
    index_path.write_text(json.dumps(index))
    if "language_model.model.norm.weight" in load_file(folder / shard_names(folder)[0]):
        pytest.fail("fixture layout changed")
    with pytest.raises(CheckpointError, match="no such tensor"):
        pyvl.load(folder, device="cpu")


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "model.pth", "model.ckpt", "model.pkl"])
def test_pickle_checkpoint_is_refused(folder, name):
    for shard in shard_names(folder):
        (folder / shard).unlink()
    (folder / "model.safetensors.index.json").unlink()
    (folder / name).write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(CheckpointError, match=f"pickle checkpoint.*{name}.*arbitrary code"):
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
    assert infos and all(
        i.dtype == "BF16" and i.nbytes == 2 * torch.Size(i.shape).numel() for i in infos.values()
    )
    assert set(index_checkpoint(folder)) == set(
        json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    )


def test_progress_bar(capsys):
    pyvl.load(MINI, device="cpu", progress=True)
    err = capsys.readouterr().err
    assert "loading weights" in err and "100.0%" in err
    pyvl.load(MINI, device="cpu")  # small load, not a terminal: silent
    assert capsys.readouterr().err == ""


def test_checkpoint_missing_exactly_one_key_is_refused(folder):
    key = "language_model.model.norm.weight"
    _rewrite_without(folder, key)
    with pytest.raises(CheckpointError) as err:
        pyvl.load(folder, device="cpu")
    assert f"1 missing:\n    {key}" in str(err.value) and "unexpected" not in str(err.value)


def _rewrite_without(folder, key):
    shard = shard_of(folder, key)
    tensors = load_file(shard)
    del tensors[key]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"][key]
    index_path.write_text(json.dumps(index))


def test_data_offsets_span_must_equal_dtype_times_shape(folder):
    """One tensor's span is 2 bytes longer than bf16 x shape (padding after its data); nothing else is wrong."""
    key = "language_model.model.norm.weight"
    shard = shard_of(folder, key)

    def pad(header, data):
        begin, end = header[key]["data_offsets"]
        for entry in header.values():
            if isinstance(entry, dict) and "data_offsets" in entry and entry["data_offsets"][0] >= end:
                entry["data_offsets"] = [o + 2 for o in entry["data_offsets"]]
        header[key]["data_offsets"] = [begin, end + 2]
        return data[:end] + b"\0\0" + data[end:]

    edit_header(shard, pad)
    with pytest.raises(
        CheckpointError,
        match=rf"{shard.name}: tensor '{key}' \(BF16, shape \[64\]\) has "
        r"data_offsets \[\d+, \d+\] but needs 128 bytes",
    ):
        pyvl.load(folder, device="cpu")


def test_float_tensor_relabelled_as_integer_is_refused(folder):
    key = "language_model.output.weight"
    edit_header(shard_of(folder, key), lambda header, data: header[key].update(dtype="I16"))
    with pytest.raises(CheckpointError, match=rf"1 not a float dtype:\n    {key}: I16"):
        pyvl.load(folder, device="cpu")


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("dtype", ["BF16"], "dtype \\['BF16'\\] is not one of"),
        ("dtype", "F8_E4M3", "dtype 'F8_E4M3' is not one of"),
        ("shape", [[64]], "is not a list of non-negative integers"),
        ("shape", [-64], "is not a list of non-negative integers"),
        ("shape", [True], "is not a list of non-negative integers"),
        ("shape", "64", "is not a list of non-negative integers"),
        ("shape", [2**40, 2**40, 2**40], "needs 2658455991569831745807614120560689152 bytes"),
        ("data_offsets", ["0", "128"], "is not a list of two integers"),
        ("data_offsets", [0], "is not a list of two integers"),
        ("data_offsets", [0, 128.0], "is not a list of two integers"),
        ("data_offsets", None, "is not a list of two integers"),
    ],
)
def test_malformed_header_entry_names_file_and_key(folder, field, value, match):
    key = "language_model.model.norm.weight"
    shard = shard_of(folder, key)
    edit_header(shard, lambda header, data: header[key].update({field: value}))
    with pytest.raises(CheckpointError, match=rf"{shard.name}: tensor '{key}'.*{match}"):
        pyvl.load(folder, device="cpu")


def test_overlapping_tensors_are_refused(folder):
    shard = folder / shard_names(folder)[0]

    def overlap(header, data):
        a, b = sorted((e["data_offsets"], n) for n, e in header.items() if n != "__metadata__")[:2]
        header[b[1]]["data_offsets"] = (
            list(a[0]) if a[0][1] - a[0][0] == b[0][1] - b[0][0] else [0, b[0][1] - b[0][0]]
        )

    edit_header(shard, overlap)
    with pytest.raises(CheckpointError, match="overlap or leave a gap"):
        pyvl.load(folder, device="cpu")


def test_non_string_metadata_is_refused(folder):
    shard = folder / shard_names(folder)[0]
    edit_header(shard, lambda header, data: header.update(__metadata__={"format": 1}))
    with pytest.raises(CheckpointError, match=f"{shard.name}: __metadata__"):
        pyvl.load(folder, device="cpu")


@pytest.mark.parametrize(
    "value", ["ABSOLUTE", "../model/{shard}", "sub/{shard}", "./{shard}", 7, None, ["{shard}"], "config.json"]
)
def test_weight_map_values_must_be_plain_file_names_in_the_folder(folder, tmp_path, value):
    key = "language_model.model.norm.weight"
    shard = shard_of(folder, key)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(shard, outside / shard.name)
    (folder / "sub").mkdir()
    shutil.copy(shard, folder / "sub" / shard.name)
    if value == "ABSOLUTE":
        value = str(outside / shard.name)
    elif isinstance(value, str):
        value = value.format(shard=shard.name)
    elif isinstance(value, list):
        value = [shard.name]
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"][key] = value
    index_path.write_text(json.dumps(index))
    with pytest.raises(
        CheckpointError, match=rf"weight_map\['{key}'\] = .* is not a plain \*.safetensors file name"
    ):
        pyvl.load(folder, device="cpu")


def test_mmap_reader_errors_become_checkpoint_errors(folder):
    """safetensors' own SafetensorError (here: a tensor name it cannot find) must not escape."""
    from pyvl.loader import TensorInfo, _iter_tensors

    info = next(iter(index_checkpoint(folder).values()))
    bogus = {"not.in.the.file": TensorInfo(info.file, info.dtype, info.shape, info.nbytes, info.offset)}
    with pytest.raises(CheckpointError, match="failed while reading tensor 'not.in.the.file'"):
        list(_iter_tensors(bogus, mmap=True))


def test_checkpoint_checked_against_config_before_the_model_exists(folder, monkeypatch):
    from pyvl import loader
    from pyvl.models import vlm

    built = []
    monkeypatch.setattr(vlm.InternVLChatModel, "__init__", lambda *a: built.append(a) or pytest.fail("built"))
    _rewrite_without(folder, "language_model.model.norm.weight")
    with pytest.raises(CheckpointError, match="1 missing"):
        loader.load_model(load_config(folder), None, folder, torch.device("cpu"), torch.float32)
    assert not built


@pytest.mark.parametrize(
    "source", ["v15", "mini", "preset:internvl-chat-v1-5", "preset:mini-internvl-chat-2b-v1-5", "preset:tiny"]
)
def test_expected_shapes_equal_the_built_model(source):
    from pyvl.bench.presets import preset_config
    from pyvl.loader import expected_shapes
    from pyvl.models.vlm import InternVLChatModel
    from pyvl.ops import resolve_ops

    cfg = (
        preset_config(source[7:])
        if source.startswith("preset:")
        else load_config(GOLDEN / source / "checkpoint")
    )
    with torch.device("meta"):
        model = InternVLChatModel(cfg, resolve_ops())
    assert expected_shapes(cfg) == {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_loaded_weights_do_not_depend_on_the_files(folder, dtype):
    """Default load copies: zeroing, then truncating, every shard afterwards changes nothing."""
    model = pyvl.load(folder, device="cpu", dtype=dtype)
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    logits = model.logits([1, 5, 6, 7])
    paths = [folder / shard for shard in shard_names(folder)]
    for path in paths:
        size = path.stat().st_size
        with open(path, "r+b") as f:  # in place: a mapping of this file would see the zeros
            f.write(b"\0" * size)
    # Compared before truncating: with mapped parameters this fails here instead of dying of SIGBUS below.
    after = model.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    for path in paths:
        path.write_bytes(b"")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(model.logits([1, 5, 6, 7]), logits)


def test_mmap_option_loads_the_same_weights(folder):
    from pyvl.loader import load_model
    from pyvl.ops import resolve_ops

    cfg = load_config(folder)
    a = load_model(cfg, resolve_ops(), folder, torch.device("cpu"), torch.bfloat16, mmap=True).state_dict()
    b = load_model(cfg, resolve_ops(), folder, torch.device("cpu"), torch.bfloat16).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
