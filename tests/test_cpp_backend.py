"""What is specific to the cpp backend (the C++ CPU kernels of idid_kernels._C): the extension loads
where CI requires it, with every op registered, and ``backend="auto"`` picks it for CPU tensors.
The ops' contract on this backend is in the conformance suites (tests/test_<op>.py)."""
import os

import pytest
import torch

import idid_kernels as ik
from idid_kernels import _backends

HAVE_EXT = "cpp" in ik.available_backends()
needs_ext = pytest.mark.skipif(not HAVE_EXT, reason="idid_kernels._C is not built (IDID_KERNELS_NO_EXT)")

OPS = ("norm_contraction", "pairwise_cosine", "class_density", "cm_margin_loss", "idid_loss")


def test_extension_loaded_when_required():
    # .ci/run sets IDID_KERNELS_REQUIRE_EXT=1: there a missing extension is a failure, not a skip.
    if os.environ.get("IDID_KERNELS_REQUIRE_EXT") == "1":
        assert HAVE_EXT, _backends.missing("cpp")
    if HAVE_EXT:
        assert _backends.extension().with_cuda in (0, 1)
        for name in ("norm_contraction_forward", "norm_contraction_backward", "pairwise_cosine_forward",
                     "pairwise_cosine_backward", "class_density_forward", "class_density_backward"):
            assert hasattr(torch.ops.idid_kernels, name), name


@needs_ext
@pytest.mark.parametrize("op", OPS)
def test_auto_picks_cpp_on_cpu(op):
    assert _backends.select_backend(op, "auto", torch.device("cpu")) == "cpp"
