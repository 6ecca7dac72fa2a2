"""Checkpoint key -> shape, from the config alone: what the models in pyvl/models/ will hold.

Mirrors vit.py, projector.py and llm.py so a checkpoint can be checked before any layer is built (a test
compares it with the meta-built model's state_dict). ``wqkv`` keeps the checkpoint's packed row count,
(n_h + 2 n_kv) * D, in both layouts. An AWQ checkpoint's decoder linears hold qweight/qzeros/scales in the
checkpoint's layout (pyvl.quant.awq.checkpoint_shape maps the model's to it).
"""

from __future__ import annotations

from .config import ModelConfig
from .quant.awq import checkpoint_shapes

__all__ = ["expected_shapes"]


def _vision(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    v = cfg.vision
    c, i, p, grid = v.hidden_size, v.intermediate_size, v.patch_size, v.image_size // v.patch_size
    norm = (("weight", (c,)), ("bias", (c,))) if v.norm_type == "layer_norm" else (("weight", (c,)),)
    out = {
        "embeddings.class_embedding": (1, 1, c),
        "embeddings.patch_embedding.weight": (c, v.num_channels, p, p),
        "embeddings.patch_embedding.bias": (c,),
        "embeddings.position_embedding": (1, grid * grid + 1, c),
    }
    for n in range(v.num_hidden_layers):
        layer = {
            "attn.qkv.weight": (3 * c, c),
            "attn.proj.weight": (c, c),
            "attn.proj.bias": (c,),
            "ls1": (c,),
            "ls2": (c,),
            "mlp.fc1.weight": (i, c),
            "mlp.fc1.bias": (i,),
            "mlp.fc2.weight": (c, i),
            "mlp.fc2.bias": (c,),
        }
        layer.update({f"norm{k}.{attr}": shape for k in (1, 2) for attr, shape in norm})
        if v.qkv_bias:
            layer["attn.qkv.bias"] = (3 * c,)
        if v.qk_normalization:
            layer.update({"attn.q_norm.weight": (c,), "attn.k_norm.weight": (c,)})
        out.update({f"encoder.layers.{n}.{k}": s for k, s in layer.items()})
    return {f"vision_model.{k}": s for k, s in out.items()}


def _projector(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    p, h = cfg.projector_in, cfg.llm.hidden_size
    return {
        "mlp1.0.weight": (p,),
        "mlp1.0.bias": (p,),
        "mlp1.1.weight": (h, p),
        "mlp1.1.bias": (h,),
        "mlp1.3.weight": (h, h),
        "mlp1.3.bias": (h,),
    }


def _llm(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    m = cfg.llm
    h, f, d, n_h, n_kv = (
        m.hidden_size,
        m.intermediate_size,
        m.head_dim,
        m.num_attention_heads,
        m.num_key_value_heads,
    )
    out = {"model.tok_embeddings.weight": (m.vocab_size, h), "model.norm.weight": (h,)}
    if not m.tie_word_embeddings:
        out["output.weight"] = (m.vocab_size, h)
    linears = {
        "attention.wqkv": ((n_h + 2 * n_kv) * d, h),
        "attention.wo": (h, n_h * d),
        "feed_forward.w1": (f, h),
        "feed_forward.w3": (f, h),
        "feed_forward.w2": (h, f),
    }
    for n in range(m.num_hidden_layers):
        prefix = f"model.layers.{n}."
        out[prefix + "attention_norm.weight"] = (h,)
        out[prefix + "ffn_norm.weight"] = (h,)
        for name, shape in linears.items():
            if cfg.quant is None:
                out[f"{prefix}{name}.weight"] = shape
            else:  # AWQ GEMM: qweight, qzeros and scales in the checkpoint's layout
                out.update(checkpoint_shapes(prefix + name, *shape, cfg.quant.group(shape[1])))
            if m.bias:
                out[f"{prefix}{name}.bias"] = (shape[0],)
    return {f"language_model.{k}": s for k, s in out.items()}


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter key of ``InternVLChatModel(cfg)`` -> its shape."""
    return {**_vision(cfg), **_projector(cfg), **_llm(cfg)}
