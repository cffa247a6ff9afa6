"""The ``cpp`` backend: the fused C++ CPU kernel (csrc/), registered when its extension loads."""
