"""Fused Triton kernels (the ``triton`` backend): one module per op, launched from ``functional``.

Importing this package imports triton; ``TRITON_INTERPRET=1`` must be set before that import for the
kernels to run on CPU tensors (the test suite does this when no GPU is visible).
"""
import triton  # noqa: F401  (fails here, with a clear ImportError, when triton is missing)
