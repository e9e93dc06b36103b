"""torch.library plumbing of the C++/CUDA ops: fake (meta) kernels and autograd, one file per op.

The op schemas live in csrc/bindings.cpp; importing this package after ``idid_kernels._C`` adds the
Python-side registrations, so every backend behind an op shares one autograd formula and works
under ``torch.compile(fullgraph=True)``.
"""
from .. import _C  # noqa: F401  (the op schemas must exist before the registrations below)
from . import class_density, cm_margin, idid_loss, norm_contraction, pairwise_cosine  # noqa: F401
