"""``pyvl.load``: a released model folder -> a ready :class:`~pyvl.chat.InternVLChat`."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from . import checks
from .chat import InternVLChat
from .config import load_config
from .engine.engine import Engine, EngineConfig
from .errors import CheckpointError, ConfigError, PyvlError, WorkerError
from .loader import load_model
from .ops import resolve_ops
from .tokenizer import Tokenizer

__all__ = ["load"]

log = logging.getLogger("pyvl")

MAX_CONTEXT = 2**20  # tokens (32x V1-5's 32K positions): a ceiling on typos; memory is checked per call
_DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
}


def _resolve_dtype(dtype, device: torch.device, default: str) -> torch.dtype:
    if dtype is None:
        # bf16 as released on GPUs; float32 on the CPU, where bf16 matmuls are slow and less exact.
        return _DTYPES.get(default, torch.bfloat16) if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ConfigError(f"dtype {dtype} is not supported; use bfloat16, float16 or float32")
        return dtype
    if str(dtype) not in _DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not one of {sorted(_DTYPES)}")
    return _DTYPES[str(dtype)]


def _resolve_device(device) -> torch.device:
    """CUDA when available by default; a CPU or a visible CUDA device, else ConfigError."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, (str, torch.device)):
        raise ConfigError(
            f"device must be a str or torch.device such as 'cpu' or 'cuda', got {type(device).__name__}"
        )
    try:
        device = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(f"device={device!r} is not a torch device ({exc}); use 'cpu' or 'cuda'") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device={device}: pyvl runs on 'cpu' or 'cuda'")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device={device}: no CUDA device is available (torch {torch.__version__}, "
                f"CUDA build {torch.version.cuda}); use device='cpu'"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device={device}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return device


def _stop_ids(folder: Path, tokenizer: Tokenizer) -> tuple[int, ...]:
    """<|im_end|> always (the original chat() forces it); validate generation_config.json if present."""
    path = folder / "generation_config.json"
    if path.is_file():
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    return (tokenizer.im_end_id,)


def _context_length(folder: Path, llm_max_positions: int) -> int:
    """Default context: the larger of max_position_embeddings and the tokenizer's model_max_length.

    Dynamic NTK lets InternLM2 run past max_position_embeddings, and the released tokenizer config states
    how long the model was used with; the KV cache is sized per call, so this is only a ceiling.
    """
    path = folder / "tokenizer_config.json"
    tokenizer_max = 0
    if path.is_file():
        value = json.loads(path.read_text(encoding="utf-8")).get("model_max_length", 0)
        tokenizer_max = int(value) if isinstance(value, (int, float)) and value < 10**9 else 0
    return max(llm_max_positions, tokenizer_max)


def _tensor_parallel(
    folder: Path, world: int, device: torch.device, dtype: torch.dtype, backend, op_backends
):
    """Start (or, under torchrun, join) the group of ``world`` ranks; rank 0's model is ``cluster.model``."""
    from .parallel import launch
    from .parallel.spec import ShardSpec

    if device.type == "cuda" and device.index is not None:
        raise ConfigError(
            f"device={device}: with tensor_parallel_size={world} the ranks take GPUs 0..{world - 1} (or LOCAL_RANK "
            "under torchrun); pass device='cuda' and choose the GPUs with CUDA_VISIBLE_DEVICES"
        )
    spec = ShardSpec(
        device.type,
        str(dtype).removeprefix("torch."),
        backend,
        dict(op_backends) if op_backends else None,
        folder=str(folder.resolve()),
    )
    if (
        "RANK" in os.environ and "WORLD_SIZE" in os.environ
    ):  # started by torchrun: its processes are the ranks
        if int(os.environ["RANK"]) != 0:
            launch.serve_and_exit(spec, world)
        return launch.join(spec, world)
    return launch.start(spec, world)


def load(
    path: str | Path,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    backend: str = "auto",
    op_backends: Mapping[str, str] | None = None,
    max_context: int | None = None,
    progress: bool | None = None,
    mmap: bool = False,
    kv_cache_gb: float | None = None,
    image_cache_gb: float = 1.0,
    max_num_seqs: int = 16,
    max_batched_tokens: int = 2048,
    cuda_graphs: bool = True,
    prefix_caching: bool = True,
    image_cache_dir: str | os.PathLike | None = None,
    image_cache_dir_gb: float = 10.0,
    tensor_parallel_size: int = 1,
) -> InternVLChat:
    """Load an InternVL 1.5 folder (config.json, safetensors, tokenizer) as released.

    device: "cuda", "cpu", ... (default: CUDA when available). dtype: default bf16 on CUDA, float32 on CPU.
    backend: "auto" | "reference" | "triton"; op_backends overrides it per op (see pyvl.ops).
    max_context: the longest prompt + answer accepted (default: see ``_context_length``).
    progress: show a stderr progress bar (default: for loads over 1 GiB when stderr is a terminal).
    mmap: map the safetensors files instead of copying (zero-copy for a same-dtype CPU load; the files must then
    stay unchanged while the model lives, and truncating one can kill the process with SIGBUS).
    Engine (pyvl.engine): kv_cache_gb sizes the paged KV pool (default: half the free GPU memory on CUDA; on
    the CPU room for max_num_seqs full contexts, at most 2 GiB); image_cache_gb bounds the image-feature cache;
    max_num_seqs requests decode together; a prefill step takes at most max_batched_tokens tokens;
    cuda_graphs=False turns CUDA-graph decode off; prefix_caching=False prefills every prompt whole;
    image_cache_dir keeps computed image features on disk too (at most image_cache_dir_gb), so that another
    process, or this one after a restart, answers about a known image without the vision model.
    tensor_parallel_size: split the model over this many ranks (pyvl.parallel): this process is rank 0 and
    runs the engine; pyvl starts the others, one per GPU (device "cuda": GPUs 0..N-1) or, on the CPU, one
    process each, and ends them with the model (``close()``, garbage collection, or this process's end). Under
    torchrun (RANK and WORLD_SIZE set, WORLD_SIZE = N) the group is torchrun's processes, and on ranks > 0 this
    call serves rank 0 and then exits the process. Each rank reads only its slices of the files (mmap and
    progress do not apply).
    Raises ConfigError / CheckpointError naming the file and key at fault; nothing is half-loaded.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise CheckpointError(f"path must be a model folder (str or os.PathLike), got {type(path).__name__}")
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a directory; pyvl.load takes a model folder")
    device = _resolve_device(device)
    if max_context is not None:
        checks.integer(max_context, "max_context", 2, MAX_CONTEXT, error=ConfigError)
    if progress is not None:
        checks.boolean(progress, "progress", error=ConfigError)
    if not isinstance(backend, str):
        raise ConfigError(
            f"backend must be a str ('auto', 'reference' or 'triton'), got {type(backend).__name__}"
        )
    if op_backends is not None and not isinstance(op_backends, Mapping):
        raise ConfigError(
            f"op_backends must be a mapping of op name -> backend, got {type(op_backends).__name__}"
        )
    checks.boolean(mmap, "mmap", error=ConfigError)
    if kv_cache_gb is not None:
        checks.real(kv_cache_gb, "kv_cache_gb", 0, 1e5, low_open=True, error=ConfigError)
    checks.real(image_cache_gb, "image_cache_gb", 0, 1e5, error=ConfigError)
    checks.integer(max_num_seqs, "max_num_seqs", 1, 1024, error=ConfigError)
    checks.integer(max_batched_tokens, "max_batched_tokens", 16, 1 << 20, error=ConfigError)
    checks.boolean(cuda_graphs, "cuda_graphs", error=ConfigError)
    checks.boolean(prefix_caching, "prefix_caching", error=ConfigError)
    if image_cache_dir is not None and not isinstance(image_cache_dir, (str, os.PathLike)):
        raise ConfigError(
            f"image_cache_dir must be a folder path (str or os.PathLike), got "
            f"{type(image_cache_dir).__name__}"
        )
    checks.real(image_cache_dir_gb, "image_cache_dir_gb", 0, 1e6, low_open=True, error=ConfigError)
    checks.integer(tensor_parallel_size, "tensor_parallel_size", 1, None, error=ConfigError)
    cfg = load_config(folder)
    dtype = _resolve_dtype(dtype, device, cfg.torch_dtype)
    tokenizer = Tokenizer.from_folder(folder)
    if len(tokenizer) > cfg.llm.vocab_size:
        raise ConfigError(
            f"{folder}: the tokenizer has {len(tokenizer)} tokens but llm_config.vocab_size is "
            f"{cfg.llm.vocab_size}"
        )
    ops = resolve_ops(backend, device, op_backends, dtype)
    context = (
        max_context if max_context is not None else _context_length(folder, cfg.llm.max_position_embeddings)
    )
    if context < 2:
        raise ConfigError(f"max_context {context} must be at least 2")
    cluster = None
    if tensor_parallel_size > 1:
        cluster = _tensor_parallel(folder, tensor_parallel_size, device, dtype, backend, op_backends)
        model = cluster.model
    else:
        model = load_model(cfg, ops, folder, device, dtype, progress=progress, mmap=mmap)
    model.eval()
    try:
        engine_config = EngineConfig.for_model(
            model,
            context,
            kv_cache_gb,
            image_cache_gb,
            max_num_seqs,
            max_batched_tokens,
            cuda_graphs,
            prefix_caching,
            image_cache_dir,
            image_cache_dir_gb,
            kv_heads=None if cluster is None else cluster.kv_heads_max,
        )
        engine = Engine(
            model, engine_config, salt=f"{folder.resolve()}|{dtype}", bos_id=tokenizer.bos_id, cluster=cluster
        )
    except PyvlError as exc:  # e.g. an image_cache_dir that cannot be created or written
        if cluster is not None:
            cluster.close()
        if isinstance(exc, WorkerError):
            raise
        raise ConfigError(str(exc)) from None
    except BaseException:
        if cluster is not None:
            cluster.close()
        raise
    log.info(
        "loaded %s on %s (%s, ops: %s; KV pool %d blocks of %d tokens)",
        folder,
        device,
        dtype,
        dict(ops.backends),
        engine.pool.num_blocks,
        engine.pool.block_size,
    )
    return InternVLChat(model, tokenizer, cfg, folder, context, _stop_ids(folder, tokenizer), engine)
