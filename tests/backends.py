"""Skip markers for the tests that need a backend this machine may lack, defined once."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from fusion_kernels.ops.triton import interpreting

#: The C++ extension is built (it is optional: without a compiler the package still works).
needs_cpp = pytest.mark.skipif(
    importlib.util.find_spec("fusion_kernels._cpp") is None,
    reason="the C++ extension is not built (run `pip install -e .` with a C++ compiler)",
)
#: Triton is installed and runs on the CPU through its interpreter.
needs_interpreter = pytest.mark.skipif(
    not interpreting() or importlib.util.find_spec("triton") is None,
    reason="runs Triton's interpreter on the CPU: set TRITON_INTERPRET=1 (and install triton)",
)
#: A CUDA device, with Triton compiling for it (not interpreting: the sizes these tests use are
#: too large for the interpreter, and interpreted kernels do not run on device tensors).
needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available() or interpreting(),
    reason="needs a CUDA device (and no TRITON_INTERPRET)",
)
