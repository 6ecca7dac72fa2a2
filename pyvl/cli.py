"""The ``pyvl`` command line: ``pyvl chat`` (streaming, multi-turn, multi-image), ``pyvl info``,
``pyvl quantize``, ``pyvl bench``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import PyvlError

__all__ = ["main"]


def _add_generation_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int, default=512)
    g.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=50)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)


def _add_tensor_parallel_flag(p, help: str, default: int = 1) -> None:
    p.add_argument("--tensor-parallel-size", type=int, default=default, metavar="N", help=help)


def _add_image_cache_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--image-cache-dir",
        default=None,
        metavar="DIR",
        help="keep image features on disk too: a later run answers about a known image without the "
        "vision model",
    )
    p.add_argument("--image-cache-dir-gb", type=float, default=10.0, help="size bound of --image-cache-dir")


def _add_engine_flags(p: argparse.ArgumentParser) -> None:
    """The engine's knobs, named as vLLM's (pyvl.load's arguments)."""
    g = p.add_argument_group("engine (vLLM's flag names; pyvl.load's arguments)")
    g.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        metavar="TOKENS",
        help="longest prompt + answer (default: the model's, see README); pyvl.load(max_context=)",
    )
    g.add_argument("--max-num-seqs", type=int, default=16, help="sequences decoded together (default 16)")
    g.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=2048,
        help="prompt tokens prefilled per engine step (default 2048); pyvl.load(max_batched_tokens=)",
    )
    g.add_argument(
        "--kv-cache-gb",
        type=float,
        default=None,
        help="the paged KV pool (default: max-num-seqs full contexts, at most half the free GPU memory)",
    )
    g.add_argument(
        "--image-cache-gb", type=float, default=1.0, help="image-feature cache in memory (default 1)"
    )
    g.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reuse the KV of cached prompt prefixes (default on; --no-enable-prefix-caching prefills every "
        "prompt whole)",
    )
    _add_tensor_parallel_flag(
        g, "split the model over N GPUs (or CPU processes); under torchrun, its WORLD_SIZE; see README"
    )


# pyvl.load's argument -> the flag's dest
_ENGINE_FLAGS = {
    "max_context": "max_model_len",
    "max_num_seqs": "max_num_seqs",
    "max_batched_tokens": "max_num_batched_tokens",
    "kv_cache_gb": "kv_cache_gb",
    "image_cache_gb": "image_cache_gb",
    "prefix_caching": "enable_prefix_caching",
    "tensor_parallel_size": "tensor_parallel_size",
}


def _engine_options(args) -> dict:
    return {argument: getattr(args, dest) for argument, dest in _ENGINE_FLAGS.items()}


def _generation_config(args) -> dict:
    return dict(
        max_new_tokens=args.max_new_tokens,
        do_sample=args.do_sample,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    )


def _load_model(args):
    import pyvl

    from .demo import DEMO_NOTICE, demo_model_path

    if args.model is None:
        print(DEMO_NOTICE, file=sys.stderr)
        path = demo_model_path()
    else:
        path = Path(args.model)
    try:
        return pyvl.load(
            path,
            device=args.device,
            dtype=args.dtype,
            backend=args.backend,
            image_cache_dir=args.image_cache_dir,
            image_cache_dir_gb=args.image_cache_dir_gb,
            **_engine_options(args),
        )
    except pyvl.ConfigError as exc:  # pyvl.load names its argument; a command-line user typed the flag
        flag = next((d for a, d in _ENGINE_FLAGS.items() if str(exc).startswith(f"{a}=")), None)
        if flag is None:
            raise
        raise pyvl.ConfigError(f"--{flag.replace('_', '-')}: {exc}") from None


def _images(model, paths: list[str], max_num: int | None):
    """Each --image, keyed once for the whole session (the front door); tiled by the model's op, on its device,
    only when its features are not cached."""
    return [model.prompts.image(path, max_num) for path in paths] or None


def _first_question(question: str, n_images: int) -> str:
    """The first turn's question, with a placeholder per image unless it has its own (template's rule)."""
    from .template import IMAGE_PLACEHOLDER, with_image_labels

    return (
        question if not n_images or IMAGE_PLACEHOLDER in question else with_image_labels(question, n_images)
    )


def _answer(model, images, question, gen, history, stats: bool):
    from .engine.request import ChatStats

    pieces, s = [], ChatStats()
    for piece in model.stream(images, question, gen, history=history, stats=s):
        pieces.append(piece)
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if stats:
        print(
            f"[{s.prompt_tokens} prompt tokens ({s.cached_tokens} cached), {s.new_tokens} new; "
            f"{s.images_encoded} of {s.images} images through the ViT, vision {s.vision_s * 1e3:.1f} ms, "
            f"time to first token {s.time_to_first_token_s * 1e3:.1f} ms, "
            f"decode {s.decode_tokens_per_s:.1f} tokens/s]",
            file=sys.stderr,
        )
    return "".join(pieces)


def cmd_chat(args) -> int:
    from .generation_config import GenerationConfig

    gen = GenerationConfig.from_user(_generation_config(args))  # bad flags fail before the model loads
    with _load_model(args) as model:  # closed on the way out: tensor-parallel workers end with the command
        return _chat_session(args, model, gen)


def _chat_session(args, model, gen) -> int:
    images = _images(model, args.image, args.max_num)
    if args.question:
        _answer(
            model, images, _first_question(" ".join(args.question), len(args.image)), gen, None, args.stats
        )
        return 0
    # Interactive multi-turn session: images attach to the first turn, history carries them onward.
    print("pyvl interactive chat: empty line or Ctrl-D to quit, /reset to start over.", file=sys.stderr)
    history = None
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            print(file=sys.stderr)
            return 0
        if not line or line in ("/quit", "/exit"):
            return 0
        if line == "/reset":
            history = None
            continue
        question = _first_question(line, len(args.image)) if history is None else line
        answer = _answer(model, images, question, gen, history, args.stats)
        history = list(history or []) + [(question, answer)]


def cmd_serve(args) -> int:
    try:
        from .serve import MediaPolicy, ServeSettings
        from .serve.server import serve
    except ImportError as exc:
        raise PyvlError(
            f"pyvl serve needs the serve extra ({exc.name} is missing): pip install 'pyvl[serve]'"
        ) from None

    root = None
    if args.allowed_local_media_path is not None:
        root = Path(args.allowed_local_media_path).resolve()
        if not root.is_dir():
            raise PyvlError(f"--allowed-local-media-path {args.allowed_local_media_path}: not a directory")
    positive = (
        "max_tiles_per_request",
        "max_request_megapixels",
        "max_queue",
        "max_request_mb",
        "max_image_mb",
    )
    for flag in (*positive, "fetch_timeout"):
        if getattr(args, flag) <= 0:
            raise PyvlError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    model = _load_model(args)
    media = MediaPolicy(
        max_bytes=int(args.max_image_mb * 2**20),
        fetch_timeout_s=args.fetch_timeout,
        allow_private_urls=args.allow_private_urls,
        local_root=root,
    )
    settings = ServeSettings(
        served_model_name=args.served_model_name or model.folder.resolve().name,
        api_key=args.api_key,
        media=media,
        max_tiles_per_request=args.max_tiles_per_request,
        max_request_megapixels=args.max_request_megapixels,
        max_request_bytes=int(args.max_request_mb * 2**20),
        max_queue=args.max_queue,
    )
    with model:
        serve(model, settings, args.host, args.port, args.log_level)
    return 0


def _human(n: float) -> str:
    for unit in ("", "K", "M", "B"):
        if abs(n) < 1000:
            return f"{n:.2f}{unit}" if unit else f"{int(n)}"
        n /= 1000
    return f"{n:.2f}T"


def count_weights(tensors: dict) -> tuple[dict[str, int], int, int]:
    """Checkpoint tensors -> (weights per part, float elements, bytes of an AWQ model's 4-bit tensors once
    loaded): a model in dtype T holds float elements x size(T) + those bytes."""
    counts = {"vision_model": 0, "mlp1": 0, "language_model": 0}
    float_numel = packed_bytes = 0
    for name, info in tensors.items():
        numel = 1
        for d in info.shape:
            numel *= d
        part = name.split(".", 1)[0]
        if name.endswith(".qweight"):  # 8 weights a word, held as stored
            counts[part] = counts.get(part, 0) + 8 * numel
            packed_bytes += info.nbytes
        elif name.endswith(".qzeros"):  # 8 zero points a word, a byte each once loaded
            packed_bytes += 8 * numel
        else:  # scales are float but not weights
            counts[part] = counts.get(part, 0) + (0 if name.endswith(".scales") else numel)
            float_numel += numel
    return counts, float_numel, packed_bytes


def _per_rank(cfg, world: int) -> dict:
    """What each rank holds at tensor_parallel_size ``world``, from the shard plan (no weights read)."""
    import torch

    from .checks import kv_cache_bytes
    from .parallel import ShardPlan

    plans = [ShardPlan.for_rank(cfg, rank, world) for rank in range(world)]
    whole = ShardPlan.for_rank(cfg, 0, 1).nbytes(cfg, torch.bfloat16)
    llm = cfg.llm
    return {
        "size": world,
        "ranks": [
            {
                "rank": p.rank,
                "weights_bf16_bytes": p.nbytes(cfg, torch.bfloat16),
                "share_of_weights": round(p.nbytes(cfg, torch.bfloat16) / whole, 4),
                "vit_heads": f"{p.vision.heads.start}..{p.vision.heads.stop - 1}",
                "query_heads": f"{p.llm.q_heads.start}..{p.llm.q_heads.stop - 1}",
                "kv_heads": list(p.llm.kv_heads),
                "vocab": f"{p.llm.vocab.start}..{p.llm.vocab.stop - 1}",
                "kv_cache_bf16_bytes_per_token": kv_cache_bytes(
                    llm.num_hidden_layers, len(p.llm.kv_heads), llm.head_dim, 1, 1, torch.bfloat16
                ),
            }
            for p in plans
        ],
    }


def cmd_info(args) -> int:
    from .config import load_config
    from .loader import index_checkpoint

    folder = Path(args.path)
    cfg = load_config(folder)
    tensors = index_checkpoint(folder)
    counts, float_numel, packed_bytes = count_weights(tensors)
    total = sum(counts.values())
    v, lm = cfg.vision, cfg.llm
    summary = {
        "folder": str(folder),
        "vision": f"InternViT {v.num_hidden_layers} layers x {v.hidden_size} wide, {v.num_attention_heads} heads, "
        f"MLP {v.intermediate_size}, {v.norm_type}, qk_norm={v.qk_normalization}, qkv_bias={v.qkv_bias}",
        "projector": f"pixel shuffle {cfg.ps_version} x{cfg.downsample_ratio} -> mlp1 {cfg.projector_in} -> "
        f"{lm.hidden_size}; {cfg.num_image_token} tokens per {cfg.image_size}px tile",
        "llm": f"InternLM2 {lm.num_hidden_layers} layers x {lm.hidden_size} wide, {lm.num_attention_heads}/"
        f"{lm.num_key_value_heads} q/kv heads, FFN {lm.intermediate_size}, vocab {lm.vocab_size}, "
        f"rope theta {lm.rope_theta:g} scaling {lm.rope_scaling_type or 'none'} x{lm.rope_scaling_factor:g}, "
        f"max positions {lm.max_position_embeddings}",
        "tiles": f"{cfg.min_dynamic_patch}..{cfg.max_dynamic_patch} (+thumbnail={cfg.use_thumbnail}), "
        f"select_layer {cfg.select_layer}, template {cfg.template}",
        "parameters": {k: _human(c) for k, c in counts.items()} | {"total": _human(total)},
        "quantization": "none"
        if cfg.quant is None
        else f"AWQ GEMM 4-bit decoder linears, group size {cfg.quant.group_size}",
        "weights_memory_GiB": {
            dt: round((float_numel * size + packed_bytes) / 2**30, 3)
            for dt, size in (("bfloat16", 2), ("float16", 2), ("float32", 4))
        },
    }
    if args.tensor_parallel_size > 1:
        summary["tensor_parallel"] = _per_rank(cfg, args.tensor_parallel_size)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    tp = summary.pop("tensor_parallel", None)
    for key, value in summary.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k} {val}" for k, val in value.items())
        print(f"{key:>19}: {value}")
    for rank in tp["ranks"] if tp else ():
        print(
            f"{'tp rank ' + str(rank['rank']):>19}: {_human(rank['weights_bf16_bytes'])}B in bf16 "
            f"({rank['share_of_weights']:.1%} of the weights); ViT heads {rank['vit_heads']}, query heads "
            f"{rank['query_heads']}, KV heads {rank['kv_heads']}, vocab {rank['vocab']}; KV cache "
            f"{rank['kv_cache_bf16_bytes_per_token']} B/token"
        )
    return 0


def _print_result(args, result: dict, formatter) -> int:
    print(json.dumps(result, indent=1) if args.json else formatter(result))
    return 0


def _bench_report(args):
    """The Report a benchmark fills: with --jsonl it prints each piece the moment it is measured."""
    from .bench.report import Report

    return Report(sys.stdout if args.jsonl else None)


def _print_report(args, result: dict, formatter) -> int:
    """The end of a benchmark that filled ``_bench_report(args)``: --jsonl has printed it already."""
    return 0 if args.jsonl else _print_result(args, result, formatter)


def _bench_preprocess(args) -> int:
    from .bench.timing import format_table

    sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.sizes] if args.sizes else None
    if args.device is not None and args.device.startswith("cuda"):
        from .bench import preprocess_cuda

        result = preprocess_cuda.run(
            sizes=sizes or preprocess_cuda.SIZES,
            max_nums=args.max_nums or preprocess_cuda.MAX_NUMS,
            repeat_ms=args.rep_ms,
            report=_bench_report(args),
        )
        return _print_report(args, result, preprocess_cuda.format_result)
    if args.device not in (None, "cpu"):
        raise PyvlError(f"bench preprocess: --device {args.device} is neither cpu nor cuda")
    from .bench import preprocess

    rows = preprocess.run(
        sizes=sizes or preprocess.SIZES,
        max_nums=args.max_nums or preprocess.MAX_NUMS,
        repeat=args.repeat or 5,
    )
    print(json.dumps(rows, indent=1) if args.json else format_table(rows))
    return 0


def _bench_e2e(args) -> int:
    from .bench import e2e
    from .bench.timing import format_table

    if not args.random_weights:
        raise PyvlError("bench e2e runs on random weights only for now: pass --random-weights")
    try:
        result = e2e.run(
            args.preset,
            device=args.device,
            dtype=args.dtype,
            tiles=args.tiles,
            prompt_tokens=args.prompt_tokens,
            decode_tokens=args.decode_tokens,
            backend=args.backend,
            repeat=args.repeat or 3,
            compare_hf=not args.no_hf,
            hf_only=args.hf_only,
            kv_cache_gb=args.kv_cache_gb,
            report=_bench_report(args),
        )
    except ValueError as exc:
        raise PyvlError(str(exc)) from None

    def table(result: dict) -> str:
        setup = result["setup"]
        lines = [", ".join(f"{k} {v}" for k, v in setup.items() if k != "ops")]
        if setup.get("ops"):
            lines.append("ops: " + ", ".join(f"{k}={v}" for k, v in setup["ops"].items()))
        lines.append(
            format_table(
                [{k: "-" if v is None else v for k, v in r.items() if k != "key"} for r in result["rows"]]
            )
        )
        return "\n".join(lines + [f"note: {note}" for note in result["notes"]])

    return _print_report(args, result, table)


def _bench_engine(args) -> int:
    from .bench import engine
    from .bench.timing import format_table
    from .demo import demo_model_path

    if args.random_weights and args.model is not None:
        raise PyvlError(
            "bench engine: --model and --random-weights exclude each other (a folder's weights, or "
            "--preset's size with random ones)"
        )
    model, preset = (None, args.preset) if args.random_weights else (args.model or demo_model_path(), None)
    try:
        photo = tuple(int(v) for v in args.photo.lower().split("x")) if args.photo else engine.PHOTO
        result = engine.run(
            model,
            preset=preset,
            device=args.device,
            dtype=args.dtype,
            repeat=args.repeat or 3,
            photo=photo,
            kv_cache_gb=args.kv_cache_gb or 8.0,
            report=_bench_report(args),
        )
    except ValueError as exc:
        raise PyvlError(str(exc)) from None
    return _print_report(
        args, result, lambda r: "\n".join([format_table(r["rows"])] + [f"note: {n}" for n in r["notes"]])
    )


def cmd_quantize(args) -> int:
    from .quantize import quantize_folder

    dst = quantize_folder(args.src, args.dst, group_size=args.group_size, device=args.device)
    print(f"{dst}: 4-bit AWQ GEMM decoder linears, group size {args.group_size} (round-to-nearest)")
    return 0


def _bench_tp(args) -> int:
    from .bench import tp
    from .bench.timing import format_table

    if not args.random_weights:
        raise PyvlError("bench tp runs on random weights only: pass --random-weights")
    try:
        result = tp.run(
            args.preset,
            world=args.tensor_parallel_size,
            device=args.device,
            dtype=args.dtype,
            tiles=max(args.tiles),
            prompt_tokens=args.prompt_tokens,
            decode_tokens=args.decode_tokens,
            backend=args.backend,
            repeat=args.repeat or 3,
            kv_cache_gb=args.kv_cache_gb,
            report=_bench_report(args),
        )
    except ValueError as exc:
        raise PyvlError(str(exc)) from None
    return _print_report(
        args, result, lambda r: "\n".join([format_table(r["rows"])] + [f"note: {n}" for n in r["notes"]])
    )


def cmd_bench(args) -> int:
    if args.what == "preprocess":
        return _bench_preprocess(args)
    if args.what == "e2e":
        return _bench_e2e(args)
    if args.what == "kernels":
        from .bench import kernels

        result = kernels.run(
            ops=args.ops, repeat_ms=args.rep_ms, report=_bench_report(args), smoke=args.smoke
        )
        return _print_report(args, result, kernels.format_result)
    if args.what == "sweep":
        from .bench import sweep

        result = sweep.run(repeat_ms=args.rep_ms, report=_bench_report(args), smoke=args.smoke)
        return _print_report(args, result, sweep.format_result)
    from .bench.timing import format_table

    if args.what == "engine":
        return _bench_engine(args)
    if args.what == "tp":
        return _bench_tp(args)
    if args.what == "serve":
        from .bench import serve

        serial_row = lambda r: {"clients": "1 at a time"} | r["serial"] | {"tok/s vs serial": 1.0}  # noqa: E731
        result = serve.run(args.model, requests=args.repeat or 16)
        return _print_result(
            args,
            result,
            lambda r: format_table([serial_row(r)] + r["rows"]) + "\n\n" + format_table(r["constrained"]),
        )
    raise AssertionError(args.what)  # argparse restricts the choices


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyvl", description="InternVL 1.5 inference runtime")
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of a failure instead of the one-line error"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    chat = sub.add_parser("chat", help="chat about images (streams the answer)")
    chat.add_argument("question", nargs="*", help="the question; omit for an interactive session")
    chat.add_argument("--model", default=None, help="model folder (default: the built-in random demo model)")
    chat.add_argument("--image", action="append", default=[], help="image file; repeat for several images")
    chat.add_argument(
        "--max-num", type=int, default=None, help="max tiles per image, 1..40 (default: config)"
    )
    chat.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available)")
    chat.add_argument("--dtype", default=None, help="bfloat16, float16 or float32")
    chat.add_argument("--backend", default="auto", choices=("auto", "reference", "triton"))
    chat.add_argument("--stats", action="store_true", help="print time to first token and tokens/s")
    _add_image_cache_flags(chat)
    _add_engine_flags(chat)
    _add_generation_flags(chat)
    chat.set_defaults(func=cmd_chat)
    srv = sub.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions, /metrics); needs pyvl[serve]",
    )
    srv.add_argument("--model", default=None, help="model folder (default: the built-in random demo model)")
    srv.add_argument(
        "--served-model-name", default=None, help="the model id clients send (default: folder name)"
    )
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY on /v1/*")
    srv.add_argument(
        "--allow-private-urls",
        action="store_true",
        help="let image urls reach private, loopback and link-local addresses",
    )
    srv.add_argument(
        "--allowed-local-media-path",
        default=None,
        metavar="DIR",
        help="image urls may be local paths inside DIR (default: none allowed)",
    )
    srv.add_argument(
        "--max-tiles-per-request", type=int, default=40, help="448px tiles over all images of a request"
    )
    srv.add_argument(
        "--max-request-megapixels",
        type=float,
        default=180.0,
        help="pixels decoded over all images of a request, counted from their headers (default 180)",
    )
    srv.add_argument("--max-request-mb", type=float, default=50.0, help="largest request body (413 above)")
    srv.add_argument(
        "--max-image-mb", type=float, default=20.0, help="largest image (data url, download or file)"
    )
    srv.add_argument("--fetch-timeout", type=float, default=10.0, help="seconds to fetch one image url")
    srv.add_argument("--max-queue", type=int, default=64, help="requests in flight at once (503 above)")
    srv.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available)")
    srv.add_argument("--dtype", default=None, help="bfloat16, float16 or float32")
    srv.add_argument("--backend", default="auto", choices=("auto", "reference", "triton"))
    srv.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    _add_image_cache_flags(srv)
    _add_engine_flags(srv)
    srv.set_defaults(func=cmd_serve)
    info = sub.add_parser("info", help="config summary, parameter counts, memory per dtype")
    info.add_argument("path", help="model folder")
    info.add_argument("--json", action="store_true", help="print JSON")
    _add_tensor_parallel_flag(info, "also say what each of N tensor-parallel ranks holds")
    info.set_defaults(func=cmd_info)
    quant = sub.add_parser(
        "quantize", help="write a 4-bit AWQ GEMM copy of a model folder (its InternLM2 decoder linears)"
    )
    quant.add_argument("src", help="float model folder")
    quant.add_argument("dst", help="new folder to write (must not exist)")
    quant.add_argument(
        "--group-size",
        type=int,
        default=128,
        help="inputs per zero point and scale: 32, 64, 128 (default) or -1",
    )
    quant.add_argument(
        "--device", default="cpu", choices=("cpu", "cuda"), help="where to quantize (default cpu)"
    )
    quant.set_defaults(func=cmd_quantize)
    bench = sub.add_parser(
        "bench", help="benchmarks (median times and ratios against baselines run alongside)"
    )
    bench.add_argument(
        "what",
        choices=("preprocess", "kernels", "sweep", "e2e", "engine", "tp", "serve"),
        help="preprocess: image -> pixel values (CPU, or --device cuda); kernels: each Triton kernel "
        "against torch at the real shapes (CUDA); sweep: block configurations of ViT and "
        "decode attention (CUDA); e2e: pixels -> tokens at a preset's size, next to HF "
        "transformers; engine: prefix/image reuse and batching ratios (--model, default demo; or --preset "
        "--random-weights); tp: time to first token and decode at TP=1 and TP=N (--preset "
        "--random-weights --tensor-parallel-size N); serve: 1/4/16 "
        "streaming clients against pyvl serve on loopback vs one at a time (--repeat: requests)",
    )
    bench.add_argument(
        "--model",
        default=None,
        help="engine: model folder (default: the demo model, or --preset with --random-weights)",
    )
    bench.add_argument(
        "--repeat", type=int, default=None, help="timed runs per figure (default: preprocess 5, e2e 3)"
    )
    bench.add_argument(
        "--rep-ms",
        type=int,
        default=200,
        help="time budget of each do_bench measurement, ms (kernels, sweep, preprocess --device cuda)",
    )
    bench.add_argument(
        "--device",
        default=None,
        help="preprocess: cpu (default) or cuda; e2e: cuda, cpu, ... (default: cuda if available)",
    )
    output = bench.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true")
    output.add_argument(
        "--jsonl",
        action="store_true",
        help="stream the result as JSON lines while it is measured (pyvl.bench.report): a run "
        "killed at a time limit keeps every row it printed (kernels, sweep, preprocess "
        "--device cuda)",
    )
    bench.add_argument(
        "--smoke",
        action="store_true",
        help="kernels, sweep: the same code paths on the CPU at tiny shapes under "
        "TRITON_INTERPRET=1, timed by a perf_counter median (checks the code, not the speed)",
    )
    prep = bench.add_argument_group("preprocess")
    prep.add_argument("--sizes", nargs="*", help="image sizes WxH (default: 3840x2160 1920x1080 640x480)")
    prep.add_argument(
        "--max-nums", nargs="*", type=int, help="max_num values (default: 6 12 40 on the CPU, 12 on CUDA)"
    )
    kern = bench.add_argument_group("kernels")
    kern.add_argument(
        "--ops", nargs="*", default=None, help="only these ops (default: every registered kernel)"
    )
    _add_tensor_parallel_flag(
        bench, "tp: the tensor-parallel size measured beside TP=1 (default 2)", default=2
    )
    e2e_flags = bench.add_argument_group("e2e, engine and tp")
    e2e_flags.add_argument(
        "--preset",
        default="internvl-chat-v1-5",
        choices=(
            "internvl-chat-v1-5",
            "internvl-chat-v1-5-awq",
            "mini-internvl-chat-2b-v1-5",
            "tiny",
            "tiny-awq",
        ),
    )
    e2e_flags.add_argument(
        "--random-weights", action="store_true", help="random weights at the preset's exact size"
    )
    e2e_flags.add_argument(
        "--dtype", default=None, help="bf16, fp16 or float32 (default: bf16 on CUDA, float32 on CPU)"
    )
    e2e_flags.add_argument(
        "--tiles",
        nargs="+",
        type=int,
        default=[1, 7, 13],
        help="tile counts timed for vision; the largest makes the prompt (default: 1 7 13)",
    )
    e2e_flags.add_argument(
        "--prompt-tokens", type=int, default=70, help="text tokens besides the image (default: 70)"
    )
    e2e_flags.add_argument(
        "--decode-tokens", type=int, default=32, help="greedy steps timed for decode (default: 32)"
    )
    e2e_flags.add_argument("--backend", default="auto", choices=("auto", "reference", "triton"))
    e2e_flags.add_argument(
        "--photo",
        default=None,
        metavar="WxH",
        help="engine: the photo asked about (default 1792x1344: 13 tiles)",
    )
    e2e_flags.add_argument(
        "--kv-cache-gb",
        type=float,
        default=None,
        help="the engine's KV pool (default e2e: just the prompt and its answer; engine: 8)",
    )
    hf = e2e_flags.add_mutually_exclusive_group()
    hf.add_argument("--no-hf", action="store_true", help="skip the HF transformers comparison")
    hf.add_argument(
        "--hf-only",
        action="store_true",
        help="only HF transformers' figures (to run them after pyvl's, in a separate process)",
    )
    bench.set_defaults(func=cmd_bench)
    return parser


def _one_line(text: str) -> str:
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> int:
    """Run one command. A failure prints one line, ``pyvl: error: ...``, and returns 2 for bad input (a
    PyvlError) or 1 for anything unexpected; ``--debug`` lets the exception through, traceback and all."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if args.debug:
            raise
        if isinstance(exc, PyvlError):
            print(f"pyvl: error: {_one_line(str(exc))}", file=sys.stderr)
            return 2
        print(
            f"pyvl: error: unexpected {type(exc).__name__}: {_one_line(str(exc))} (run with --debug for the "
            "traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
