"""The LLM forward keeps per-layer hidden states only when asked (at 10k tokens they take several GB)."""

import weakref

import torch
from conftest import loaded_model

from pyvl.kv_cache import PagedBatch, PagedKVCache


def _older_outputs_alive_at_final_norm(keep_states: bool) -> tuple[int, int]:
    """(layer outputs other than the last still alive when the final norm runs, number of layers)."""
    model = loaded_model("v15").model
    lm = model.language_model
    outputs: list[weakref.ref] = []
    alive = []
    handles = [
        layer.register_forward_hook(lambda m, a, out: outputs.append(weakref.ref(out)))
        for layer in lm.model.layers
    ]
    handles.append(
        lm.model.norm.register_forward_pre_hook(
            lambda m, a: alive.append(sum(ref() is not None for ref in outputs[:-1]))
        )
    )
    try:
        with torch.inference_mode():
            ids = torch.arange(3, 40)[None]
            cache = PagedKVCache(
                lm.cfg.num_hidden_layers, 1, lm.cfg.num_key_value_heads, lm.cfg.head_dim, torch.float32, "cpu"
            )
            lm(
                lm.embed(ids),
                torch.arange(ids.shape[1])[None],
                PagedBatch.contiguous_prefill(cache, ids.shape[1]),
                return_hidden_states=keep_states,
            )
    finally:
        for h in handles:
            h.remove()
    return alive[0], len(lm.model.layers)


def test_layer_outputs_are_freed_unless_asked_for():
    alive, layers = _older_outputs_alive_at_final_norm(keep_states=False)
    assert layers >= 2 and alive == 0, f"{alive} older layer outputs kept alive without return_hidden_states"
    alive, layers = _older_outputs_alive_at_final_norm(keep_states=True)
    assert alive == layers - 1
