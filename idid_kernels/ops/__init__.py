"""torch.library plumbing of the C++/CUDA ops: fake (meta) kernels and autograd, one file per op.

The op schemas live in csrc/bindings.cpp; importing this package after ``idid_kernels._C`` adds the
Python-side registrations, so every backend behind an op shares one autograd formula and works
under ``torch.compile(fullgraph=True)``.
"""
from . import idid_loss, norm_contraction  # noqa: F401
