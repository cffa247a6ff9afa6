"""The ``triton`` backend: fused Triton kernels for CUDA (or the CPU under TRITON_INTERPRET=1).

``kernels`` holds the streaming passes, ``select`` the selection kernels, ``launcher`` their
launchers and the registered function.
"""

from .launcher import interpreting

__all__ = ["interpreting"]
