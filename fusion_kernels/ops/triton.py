"""The ``triton`` backend: fused Triton kernels for CUDA (or the CPU under TRITON_INTERPRET=1)."""
