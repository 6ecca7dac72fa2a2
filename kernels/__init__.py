"""GPU kernel sources, shipped as ``pyvl.kernels``: ``<op>.py`` (Triton) and ``cuda/<op>.cu`` (CUDA, compiled into
``pyvl._C`` at build time and shipped for reference). Same op names as ``pyvl/ops/reference.py``."""
