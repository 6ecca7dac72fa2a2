"""Packed-weight formats: AWQ GEMM checkpoints read into pyvl's 4-bit layout (:mod:`pyvl.quant.awq`), the
4-bit linear layer that runs them (:mod:`pyvl.quant.linear`). ``pyvl quantize``, which writes such a checkpoint
from a float one, reads checkpoints as the loader does, so it lives above both (:mod:`pyvl.quantize`)."""
