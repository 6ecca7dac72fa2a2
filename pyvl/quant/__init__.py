"""Packed-weight formats: AWQ GEMM checkpoints read into pyvl's 4-bit layout (:mod:`pyvl.quant.awq`), the
4-bit linear layer that runs them (:mod:`pyvl.quant.linear`) and ``pyvl quantize``, which writes such a
checkpoint from a float one (:mod:`pyvl.quant.quantize`)."""
