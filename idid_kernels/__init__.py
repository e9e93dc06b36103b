"""idid_kernels: fused kernels for imbalance-aware losses.

- IDID-R1: this package's reconstruction of the IDID loss (Du et al., IEEE TNNLS 2024,
  doi:10.1109/tnnls.2023.3286484): intraclass diversity, interclass distillation, adaptive weight.
- Contraction-mapped margin softmax (Liu et al., Pattern Recognition Letters 2024,
  doi:10.1016/j.patrec.2024.08.016): margin-softmax logits scaled per sample by sigmoid(||x||).

Public API: :func:`cm_margin_loss`, :func:`idid_loss`, :func:`adaface_loss`, :func:`magface_loss`,
:func:`ldam_loss`, :func:`pairwise_cosine`,
:func:`class_density`, :func:`norm_contraction`, :class:`CMMarginLoss`, :class:`IDIDLoss`, the
margin heads :class:`AdaFaceLoss`, :class:`MagFaceLoss` and :class:`LDAMLoss`, :func:`available_backends`,
the CPU GEMM engine (:func:`cpu_gemm`) and the CPU scratch block's :func:`empty_cache`,
:func:`keep_scratch` and :func:`scratch_bytes`.
"""
import torch  # noqa: F401  (loads libtorch before the optional extension)

from ._backends import BackendUnavailableError, available_backends
from ._gemm import cpu_gemm
from ._scratch import empty_cache, keep_scratch, scratch_bytes
from .functional import (
    adaface_loss, class_density, cm_margin_loss, idid_loss, ldam_loss, magface_loss, norm_contraction, pairwise_cosine,
)
from .nn import AdaFaceLoss, CMMarginLoss, IDIDLoss, LDAMLoss, MagFaceLoss
from .reference.idid import IDIDTerms

__version__ = "0.1.0"

__all__ = [
    "AdaFaceLoss", "BackendUnavailableError", "CMMarginLoss", "IDIDLoss", "IDIDTerms", "LDAMLoss", "MagFaceLoss",
    "adaface_loss", "available_backends", "class_density", "cm_margin_loss", "cpu_gemm", "empty_cache", "idid_loss",
    "keep_scratch", "ldam_loss", "magface_loss", "norm_contraction", "pairwise_cosine", "scratch_bytes",
]
