"""GPU kernel sources, shipped as ``pyvl.kernels``: ``<op>.py`` (Triton) and ``cuda/<op>.cu`` (CUDA, compiled into
``pyvl._C`` at build time and shipped for reference). Same op names as ``pyvl/ops/reference.py``.

Triton kernels (registered in ``pyvl.ops._TRITON_OPS``, each launcher with the reference's signature plus
keyword-only ``out=`` / tuning arguments):
  vit_attention.py     vit_attention          non-causal FlashAttention-2 forward, S = 1025 masked, no padding
  paged_attention.py   paged_prefill_attention, paged_decode_attention
                                              causal GQA attention over the paged KV pool: one sequence's
                                              prefill; split-KV decode, lengths from a device tensor (CUDA graphs)
  store_kv.py          store_kv               scatter new K/V rows into the paged pool by slot
  rms_norm.py          rms_norm, add_rms_norm RMSNorm, and residual add + RMSNorm fused
  apply_rotary.py      apply_rotary           rotate-half RoPE of q and k in one launch (in place via out=)
  silu_mul.py          silu_mul               silu(gate) * up
  pixel_shuffle.py     pixel_shuffle          InternVL pixel (un)shuffle v1/v2, and pixel_shuffle_from_vit (CLS
                                              dropped by pointer offset)
CUDA kernels (bound in csrc/bindings.cpp, wrapped in pyvl/ops/native.py):
  cuda/resize_tiles.cu      Pillow-exact bicubic grid + thumbnail + normalisation (the GPU twin of
                            csrc/cpu/resize_tiles.cpp; coefficients from csrc/resample_coeffs.h)
They run on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 was set before this package was imported
(triton reads it when @triton.jit runs); tests/test_<op>.py run them that way.
"""
