"""Fuzz worker for tests/test_fuzz_loader.py: mutate a golden checkpoint folder, load it, report one JSON line.

    python tests/fuzz_loader_worker.py SEED START COUNT

Mutant i (a pure function of SEED and i) is one random damage to a copy of a golden folder (v15 for even i,
mini for odd): a safetensors header value (dtype, shape, offsets, name), header bytes, the length field, a
truncation, the index (weight_map values and keys, paths outside the folder), a missing file, or a config.json
value (wrong type, out of range, a valid alternative, a missing key). Each mutant carries ``may_change``: True
only where the mutant is a valid model the loader cannot tell from the original (a BF16 <-> F16 relabel, two
equal-size tensors swapping data, an in-range config value, a key left to its default). The worker loads it with
``pyvl.load(device="cpu", dtype="float32")`` and compares the logits of a short prompt and the features of a
fixed tile with the unmutated model's. Address space is capped so that a huge allocation fails here.
"""

from __future__ import annotations

import json
import math
import random
import resource
import shutil
import sys
import tempfile
import traceback
from pathlib import Path

HERE = Path(__file__).parent
GOLDEN = HERE / "data" / "golden"
VARIANTS = ("v15", "mini")
INDEX = "model.safetensors.index.json"
ADDRESS_SPACE_CAP = 24 * 2**30  # torch reserves much virtual memory up front; real use here is < 1 GB

sys.path.insert(0, str(HERE))
from ckpt_files import join, split  # noqa: E402

# config key -> (kind, range or choices, required, valid alternatives that may change outputs).
# Ranges are pyvl's documented ones; alternatives that would not match the checkpoint's shapes are not listed
# (they must be refused, and the "mismatch" values below exercise that).
CONFIG_KEYS = {
    "vision_config.hidden_size": ("int", (1, 65536), True, []),
    "vision_config.num_attention_heads": ("int", (1, 1024), True, [2, 8]),
    "vision_config.intermediate_size": ("int", (1, 262144), True, []),
    "vision_config.num_hidden_layers": ("int", (1, 1024), True, []),
    "vision_config.image_size": ("int", (1, 4480), True, []),
    "vision_config.patch_size": ("int", (1, 4480), False, []),
    "vision_config.num_channels": ("int", (3, 3), False, []),
    "vision_config.qkv_bias": ("bool", None, False, []),
    "vision_config.qk_normalization": ("bool", None, False, []),
    "vision_config.norm_type": ("choice", ("rms_norm", "layer_norm"), False, []),
    "vision_config.layer_norm_eps": ("float", (0, 1e-2), False, [1e-5, 1e-3]),
    "llm_config.hidden_size": ("int", (1, 65536), True, []),
    "llm_config.intermediate_size": ("int", (1, 262144), True, []),
    "llm_config.num_hidden_layers": ("int", (1, 1024), True, []),
    "llm_config.num_attention_heads": ("int", (1, 1024), True, []),
    "llm_config.num_key_value_heads": ("int", (1, 1024), False, []),
    "llm_config.vocab_size": ("int", (1, 2**20), True, []),
    "llm_config.max_position_embeddings": ("int", (1, 2**22), False, [2, 3, 100000]),
    "llm_config.rope_theta": ("float", (0, 1e12), False, [10000, 1.5, 5e5]),
    "llm_config.rms_norm_eps": ("float", (0, 1e-2), False, [1e-6, 1e-3]),
    "llm_config.rope_scaling.factor": ("float", (1, 1024), True, [1.0, 4.0]),
    "llm_config.rope_scaling.type": ("choice", ("dynamic", "linear"), True, ["linear"]),
    "llm_config.bias": ("bool", None, False, []),
    "llm_config.tie_word_embeddings": ("bool", None, False, []),
    "llm_config.bos_token_id": ("int", (0, 1008), False, [0, 1008]),
    "llm_config.eos_token_id": ("int", (0, 1008), False, [0, 7]),
    "llm_config.pad_token_id": ("int", (0, 1008), False, [0]),
    "select_layer": ("int", None, False, [-2, 1]),
    "force_image_size": ("int", (1, 4480), False, [224, 896]),
    "downsample_ratio": ("float", (0, 1), False, []),
    "ps_version": ("choice", ("v1", "v2"), False, ["v1", "v2"]),
    "template": ("choice", ("internlm2-chat",), False, []),
    "use_thumbnail": ("bool", None, False, [True, False]),
    "min_dynamic_patch": ("int", (1, 256), False, [2]),
    "max_dynamic_patch": ("int", (1, 256), False, [1, 40]),
    "torch_dtype": ("choice", ("bfloat16", "float16", "float32"), False, ["float16", "float32"]),
}
NULL_IS_DEFAULT = {
    "llm_config.num_key_value_heads",
    "llm_config.pad_token_id",
    "force_image_size",
    "template",
}
IGNORED_KEYS = [
    "llm_config.use_cache",
    "llm_config.max_length",
    "vision_config.use_flash_attn",
    "pad2square",
    "dynamic_image_size",
    "llm_config.initializer_range",
]
GARBAGE = [
    True,
    False,
    "64",
    "false",
    1.5,
    2.0,
    -1,
    0,
    10**6,
    1e6,
    10**12,
    2**63,
    10**30,
    None,
    [],
    {},
    [64],
    {"a": 1},
    math.nan,
    math.inf,
    -math.inf,
    "",
    "xxx",
]


def _path_get(d, path):
    *sections, key = path.split(".")
    for s in sections:
        d = d[s]
    return d, key


def _bad_values(kind, bounds, path):
    """Values the documented rules refuse, for one key."""
    wrong_type = {
        "int": [True, "64", 1.5, 2.0, [], {}, math.nan],
        "float": [True, False, "0.5", [], {"v": 1}, math.nan, math.inf, -math.inf],
        "bool": ["false", "true", 0, 1, [], "yes"],
        "choice": [5, "bogus", ["v2"], True],
    }[kind]
    if path not in NULL_IS_DEFAULT:
        wrong_type = wrong_type + [None]
    if kind == "int" and bounds:
        wrong_type += [bounds[0] - 1, bounds[1] + 1, bounds[1] * 1000 + 7]
    if kind == "float" and bounds:
        wrong_type += [bounds[0] - 1, -bounds[1], bounds[1] * 10 + 1]
        if bounds[0] == 0:
            wrong_type += [0, 0.0]
    if path == "select_layer":
        wrong_type += [-(10**6), 10**6]
    return wrong_type


def mutate_config(files, rng):
    cfg = json.loads(files["config.json"])
    choice = rng.random()
    if choice < 0.45:
        path = rng.choice(sorted(CONFIG_KEYS))
        kind, bounds, _, _ = CONFIG_KEYS[path]
        value = rng.choice(_bad_values(kind, bounds, path))
        d, key = _path_get(cfg, path)
        d[key] = value
        desc, may_change = f"config {path} = {value!r} (invalid)", False
    elif choice < 0.6:
        path = rng.choice([p for p, spec in CONFIG_KEYS.items() if spec[3]])
        value = rng.choice(CONFIG_KEYS[path][3])
        d, key = _path_get(cfg, path)
        d[key] = value
        desc, may_change = f"config {path} = {value!r} (valid alternative)", True
    elif choice < 0.75:
        path = rng.choice(sorted(CONFIG_KEYS))
        d, key = _path_get(cfg, path)
        d.pop(key, None)
        required = CONFIG_KEYS[path][2]
        desc, may_change = (
            f"config {path} deleted ({'required' if required else 'has a default'})",
            not required,
        )
    elif choice < 0.85:
        path = rng.choice(IGNORED_KEYS)
        value = rng.choice(GARBAGE)
        d, key = _path_get(cfg, path)
        d[key] = value
        desc, may_change = f"config ignored key {path} = {value!r}", False
    elif choice < 0.92:
        section = rng.choice(["vision_config", "llm_config", "llm_config.rope_scaling"])
        value = rng.choice(GARBAGE)
        d, key = _path_get(cfg, section)
        d[key] = value
        desc, may_change = f"config section {section} = {value!r}", False
    else:
        raw = files["config.json"]
        cut = rng.randrange(len(raw))
        files["config.json"] = raw[:cut]
        return f"config.json truncated to {cut} bytes", False
    files["config.json"] = json.dumps(cfg).encode()
    return desc, may_change


def _entries(header):
    return sorted((n for n in header if n != "__metadata__"), key=lambda n: header[n]["data_offsets"][0])


def mutate_header(files, rng):
    shard = rng.choice(sorted(n for n in files if n.endswith(".safetensors")))
    header, data = split(files[shard])
    names = _entries(header)
    name = rng.choice(names)
    entry = header[name]
    what = rng.randrange(9)
    may_change = False
    if what == 0:
        new = rng.choice(
            [
                "F16",
                "F32",
                "F64",
                "I16",
                "I32",
                "I64",
                "U8",
                "I8",
                "BOOL",
                "BF17",
                "",
                ["BF16"],
                5,
                None,
                "bf16",
                "F8_E4M3",
            ]
        )
        entry["dtype"] = new
        may_change = new == "F16"  # BF16 -> F16: same size, still a float, undetectable
        desc = f"{shard} {name} dtype -> {new!r}"
    elif what == 1:
        shape = entry["shape"]
        options = [
            shape[::-1],
            [1] + shape,
            shape + [1],
            shape[:-1],
            [[d] for d in shape],
            [-d for d in shape],
            [True] * len(shape),
            [str(d) for d in shape],
            [2**40] * 3,
            [],
            [0] + shape[1:],
            [d * 2 for d in shape],
            "x",
            None,
            [d + 0.0 for d in shape],
        ]
        new = rng.choice(options)
        entry["shape"] = new
        desc = f"{shard} {name} shape {shape} -> {new!r}"
    elif what == 2:
        begin, end = entry["data_offsets"]
        k = rng.choice([1, 2, 4, 64, end - begin, 10**12, 2**64])
        new = rng.choice(
            [
                [begin + k, end + k],
                [begin - k, end - k],
                [begin, end + k],
                [begin, end - k],
                [end, begin],
                [str(begin), str(end)],
                [begin],
                [begin, end, end],
                [float(begin), end],
                None,
                {"0": begin},
            ]
        )
        entry["data_offsets"] = new
        desc = f"{shard} {name} data_offsets [{begin}, {end}] -> {new!r}"
    elif what == 3:
        other = rng.choice(names)
        a, b = entry["data_offsets"], header[other]["data_offsets"]
        entry["data_offsets"], header[other]["data_offsets"] = b, a
        # Equal byte counts: both layouts are valid files, the loader cannot know which is right.
        may_change = other != name and a[1] - a[0] == b[1] - b[0] and entry["dtype"] == header[other]["dtype"]
        desc = f"{shard} data_offsets of {name} and {other} swapped"
    elif what == 4:
        other = rng.choice(names)
        header[name], header[other] = header[other], header[name]
        may_change = (
            other != name
            and header[name]["shape"] == header[other]["shape"]
            and header[name]["dtype"] == header[other]["dtype"]
        )
        desc = f"{shard} entries of {name} and {other} swapped"
    elif what == 5:
        new = rng.choice([name + "x", name.replace(".", "_", 1), "", name.upper(), name + ".weight"])
        header[new] = header.pop(name)
        desc = f"{shard} {name} renamed {new!r}"
    elif what == 6:
        del header[name]
        desc = f"{shard} entry {name} deleted"
    elif what == 7:
        header[name] = rng.choice(GARBAGE)
        desc = f"{shard} entry {name} = {header[name]!r}"
    else:
        header["__metadata__"] = rng.choice([{"format": "pt"}, {"format": 1}, [], "pt", None, {"x": "y"}])
        may_change = False
        desc = f"{shard} __metadata__ -> {header['__metadata__']!r}"
    files[shard] = join(header, data)
    return desc, may_change


def mutate_bytes(files, rng):
    shard = rng.choice(sorted(n for n in files if n.endswith(".safetensors")))
    raw = bytearray(files[shard])
    n = int.from_bytes(raw[:8], "little")
    what = rng.randrange(4)
    if what == 0:
        pos = rng.randrange(8, 8 + n)
        raw[pos] = rng.randrange(256)
        desc = f"{shard} header byte {pos} -> {raw[pos]}"
    elif what == 1:
        new = rng.choice([n + 1, n - 1, 0, 7, len(raw), 2**63, 2**64 - 1, n + 8])
        raw[:8] = new.to_bytes(8, "little")
        desc = f"{shard} header length {n} -> {new}"
    elif what == 2:
        cut = rng.randrange(len(raw))
        del raw[cut:]
        desc = f"{shard} truncated to {cut} bytes"
    else:
        extra = rng.choice([1, 2, 100])
        raw += b"\0" * extra
        desc = f"{shard} {extra} bytes appended"
    files[shard] = bytes(raw)
    return desc, False


def mutate_index(files, rng, outside: Path):
    index = json.loads(files[INDEX])
    wm = index["weight_map"]
    names = sorted(wm)
    shards = sorted(set(wm.values()))
    name = rng.choice(names)
    what = rng.randrange(8)
    if what == 0:
        new = rng.choice(
            [s for s in shards if s != wm[name]] + ["missing.safetensors", "config.json", "", "."]
        )
        wm[name] = new
        desc = f"index {name} -> {new!r}"
    elif what == 1:
        new = rng.choice(
            [
                str(outside / wm[name]),
                f"../{outside.name}/{wm[name]}",
                f"sub/{wm[name]}",
                f"./{wm[name]}",
                f"/{wm[name]}",
                f"..\\{wm[name]}",
            ]
        )
        wm[name] = new
        desc = f"index {name} -> path {new!r} (a valid copy lies there)"
    elif what == 2:
        wm[name] = rng.choice(GARBAGE)
        desc = f"index {name} -> {wm[name]!r}"
    elif what == 3:
        del wm[name]
        desc = f"index entry {name} deleted"
    elif what == 4:
        wm[name + ".bogus"] = wm[name]
        desc = f"index entry {name}.bogus added"
    elif what == 5:
        index["weight_map"] = rng.choice([list(wm), None, "x", 5, {}])
        desc = f"index weight_map -> {type(index['weight_map']).__name__}"
    elif what == 6:
        del files[INDEX]
        return "index file deleted", False
    else:
        del files[rng.choice(shards)]
        return "a shard file deleted", False
    files[INDEX] = json.dumps(index).encode()
    return desc, False


def make_mutant(seed: int, i: int, pristine: dict[str, bytes], outside: Path):
    rng = random.Random(f"{seed}:{i}")
    files = dict(pristine)
    pick = rng.random()
    if pick < 0.4:
        desc, may_change = mutate_config(files, rng)
    elif pick < 0.7:
        desc, may_change = mutate_header(files, rng)
    elif pick < 0.85:
        desc, may_change = mutate_bytes(files, rng)
    else:
        desc, may_change = mutate_index(files, rng, outside)
    return files, desc, may_change


def outputs(model, tile):
    import torch

    with torch.no_grad():
        return model.logits([1, 5, 6, 7]), model.model.extract_feature(tile)


def main() -> int:
    seed, start, count = (int(a) for a in sys.argv[1:4])
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_CAP, hard))
    import torch

    import pyvl
    from pyvl.errors import PyvlError

    torch.manual_seed(0)
    tile = torch.randn(1, 3, 448, 448)
    pristine, baseline = {}, {}
    for v in VARIANTS:
        folder = GOLDEN / v / "checkpoint"
        pristine[v] = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
        baseline[v] = outputs(pyvl.load(folder, device="cpu", dtype="float32"), tile)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        outside = root / "outside"
        for i in range(start, start + count):
            variant = VARIANTS[i % 2]
            files, desc, may_change = make_mutant(seed, i, pristine[variant], outside)
            folder = root / "model"
            shutil.rmtree(folder, ignore_errors=True)
            shutil.rmtree(outside, ignore_errors=True)
            for d in (folder, folder / "sub", outside):
                d.mkdir()
            for name, raw in files.items():
                (folder / name).write_bytes(raw)
                if name.endswith(".safetensors"):  # valid copies where escaping paths would point
                    (outside / name).write_bytes(pristine[variant][name])
                    (folder / "sub" / name).write_bytes(pristine[variant][name])
            # Values the documented rules refuse, and required keys deleted, must not load at all.
            must_refuse = desc.endswith("(invalid)") or desc.endswith("(required)")
            record = {
                "i": i,
                "variant": variant,
                "mutation": desc,
                "may_change": may_change,
                "must_refuse": must_refuse,
            }
            try:
                model = pyvl.load(folder, device="cpu", dtype="float32")
            except PyvlError as exc:
                record.update(outcome="refused", error=f"{type(exc).__name__}: {str(exc)[:200]}")
            except BaseException as exc:
                record.update(
                    outcome="error",
                    error=f"{type(exc).__name__}: {str(exc)[:200]}",
                    where=traceback.format_exc()[-600:],
                )
            else:
                try:
                    got = outputs(model, tile)
                    same = all(
                        g.shape == b.shape and torch.equal(g, b) for g, b in zip(got, baseline[variant])
                    )
                    record.update(outcome="same" if same else "changed")
                except BaseException as exc:
                    record.update(outcome="compute_error", error=f"{type(exc).__name__}: {str(exc)[:200]}")
                del model
            print(json.dumps(record, ensure_ascii=True), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
