"""Pure-PyTorch oracles: readable, autograd-differentiable, the ground truth for every backend."""
from .cm_margin import CONTRACTIONS, REDUCTIONS, cm_logits, cm_margin_loss, cm_margin_loss_params, contraction_scale
from .heads import adaface_loss, ldam_loss, magface_loss
from .idid import IDIDTerms, idid_loss
from .margins import MARGIN_GRADS, MARGINS, MarginParams, phi, phi_grad, resolve_margin
from .primitives import class_density, norm_contraction, normalize, pairwise_cosine

__all__ = [
    "CONTRACTIONS", "MARGINS", "MARGIN_GRADS", "REDUCTIONS", "IDIDTerms", "MarginParams",
    "adaface_loss", "class_density", "cm_logits", "cm_margin_loss", "cm_margin_loss_params", "contraction_scale",
    "idid_loss", "ldam_loss", "magface_loss", "norm_contraction", "normalize", "pairwise_cosine", "phi", "phi_grad",
    "resolve_margin",
]
