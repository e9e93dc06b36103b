"""torch.library plumbing of the C++/CUDA ops: fake (meta) kernels and autograd, one file per op.

The op schemas live in csrc/bindings.cpp; importing this package after ``idid_kernels._C`` adds the
Python-side registrations, so every backend behind an op shares one autograd formula and works
under ``torch.compile(fullgraph=True)``. The registrations are made for each library in
:data:`NAMESPACES`: ``idid_kernels`` (the cpp kernels on CPU tensors, the cuda kernels on CUDA
tensors) and, in a CPU build with the CUDA-execution emulator, ``idid_kernels_emu`` (the same
schemas, whose CPU kernels run the CUDA kernels in the emulator).
"""
from .. import _C
from . import class_density, cm_margin, idid_loss, norm_contraction, pairwise_cosine

NAMESPACES = ("idid_kernels",) + (("idid_kernels_emu",) if getattr(_C, "with_cuda_emulator", 0) else ())

for _ns in NAMESPACES:
    for _module in (class_density, cm_margin, idid_loss, norm_contraction, pairwise_cosine):
        _module.register(_ns)
