"""Functional API: validate arguments once, pick a backend, call it.

Every function takes ``backend="auto" | "reference" | "cpp" | "cuda" | "triton"``. ``"auto"`` picks
the fastest backend that is available here, has a kernel for the op and runs on the inputs'
device; naming a backend that cannot run raises
:class:`~idid_kernels._backends.BackendUnavailableError` (or NotImplementedError when it exists but
has no kernel for that op yet). The math of each op is in its reference implementation
(:mod:`idid_kernels.reference`) and in spec/cm_margin.md and spec/idid.md.
"""
from __future__ import annotations

import functools

import torch

from . import reference as ref
from ._backends import op_namespace, select_backend
from ._validation import (
    check_bool, check_choice, check_class_weight, check_finite, check_int, check_labels, check_matrix,
    check_nonnegative, check_positive, check_row_vector, check_same,
)
from .reference.cm_margin import CONTRACTIONS, REDUCTIONS
from .reference.margins import MARGIN_GRADS, MarginParams, check_margin_numbers, resolve_row_margins


# The cpp and cuda backends share these wrappers of the C++ ops; ``ns`` is the library whose
# kernels run (_backends.op_namespace: the emulated CUDA kernels on CPU tensors have their own).
def _norm_contraction_ext(x, offset, temperature, ns="idid_kernels"):
    from .ops.norm_contraction import norm_contraction as op
    return op(x, offset, temperature, ns=ns)


def _cm_margin_loss_ext(x, weight, labels, *, params, ns="idid_kernels", **kwargs):
    from .ops.cm_margin import cm_margin_loss as op
    return op(x, weight, labels, params, ns=ns, **kwargs)


def _pairwise_cosine_ext(x, y, ns="idid_kernels"):
    from .ops.pairwise_cosine import pairwise_cosine as op
    return op(x, y, ns=ns)


def _norm_contraction_triton(x, offset, temperature):
    from .triton.norm_contraction import norm_contraction as op
    return op(x, offset, temperature)


def _cm_margin_loss_triton(x, weight, labels, *, params, **kwargs):
    from .triton.cm_margin import cm_margin_loss as op
    return op(x, weight, labels, params, **kwargs)


def _pairwise_cosine_triton(x, y):
    from .triton.pairwise_cosine import pairwise_cosine as op
    return op(x, y)


def _class_density_ext(x, labels, num_classes, t, ns="idid_kernels"):
    from .ops.class_density import class_density as op
    return op(x, labels, num_classes, t, ns=ns)


def _class_density_triton(x, labels, num_classes, t):
    from .triton.class_density import class_density as op
    return op(x, labels, num_classes, t)


def _idid_loss_ext(x, proxies, similarity, labels, ns="idid_kernels", **kw):
    from .ops.idid_loss import idid_loss as op
    return op(x, proxies, similarity, labels, ns=ns, **kw)


def _idid_loss_triton(x, proxies, similarity, labels, **kw):
    from .triton.idid_loss import idid_loss as op
    return op(x, proxies, similarity, labels, **kw)


# op -> backend -> callable taking the validated arguments of the public function.
_KERNELS = {
    "norm_contraction": {"reference": ref.norm_contraction, "cpp": _norm_contraction_ext,
                         "cuda": _norm_contraction_ext, "triton": _norm_contraction_triton},
    "pairwise_cosine": {"reference": ref.pairwise_cosine, "cpp": _pairwise_cosine_ext, "cuda": _pairwise_cosine_ext,
                        "triton": _pairwise_cosine_triton},
    "class_density": {"reference": ref.class_density, "cpp": _class_density_ext, "cuda": _class_density_ext,
                      "triton": _class_density_triton},
    "cm_margin_loss": {"reference": ref.cm_margin_loss_params, "cpp": _cm_margin_loss_ext, "cuda": _cm_margin_loss_ext,
                       "triton": _cm_margin_loss_triton},
    "idid_loss": {"reference": ref.idid_loss, "cpp": _idid_loss_ext, "cuda": _idid_loss_ext,
                  "triton": _idid_loss_triton},
}


def _kernel(op: str, backend: str, device: torch.device):
    chosen = select_backend(op, backend, device)
    kernel = _KERNELS[op][chosen]
    ns = op_namespace(chosen, device)
    if ns != "idid_kernels":
        return functools.partial(kernel, ns=ns)
    return kernel


def check_cm_inputs(x, weight) -> None:
    """x (N, d) and weight (C, d), C >= 2, same dtype and device."""
    check_matrix("x", x)
    check_matrix("weight", weight, cols=x.shape[1], cols_of="the feature dimension of x")
    check_same("x", x, weight=weight)
    if weight.shape[0] < 2:
        raise ValueError(f"weight has {weight.shape[0]} class row(s); a softmax loss needs C >= 2")


def validate_cm_config(*, s, margin, m, m1, m2, m3, sphere_lambda, easy_margin, contraction, norm_offset,
                       norm_temperature, margin_grad, reduction, ignore_index):
    """Check the scalar keywords of :func:`cm_margin_loss`; returns the resolved margin."""
    check_positive("s", s)
    check_bool("easy_margin", easy_margin)
    # per-row (tensor) m2/m3: their shape is checked by cm_margin_loss, which knows N
    numbers = {name: 0.0 if isinstance(value, torch.Tensor) else value for name, value in (("m2", m2), ("m3", m3))}
    check_margin_numbers(m=m, m1=m1, sphere_lambda=sphere_lambda, **numbers)
    for name, value in (("m", m), ("m1", m1), *numbers.items(), ("sphere_lambda", sphere_lambda)):
        if value is not None:
            check_finite(name, value)
    params = resolve_row_margins(margin, m, m1, m2, m3, sphere_lambda, easy_margin)
    check_choice("contraction", contraction, CONTRACTIONS)
    check_finite("norm_offset", norm_offset)
    check_positive("norm_temperature", norm_temperature)
    check_choice("margin_grad", margin_grad, MARGIN_GRADS)
    check_choice("reduction", reduction, REDUCTIONS)
    check_int("ignore_index", ignore_index)
    return params


def validate_idid_config(*, alpha, tau, t, eps, diversity_weight, ignore_index, distillation=True, diversity=True,
                         adaptive_weight=True, class_balanced=True, return_terms=False):
    """Check the scalar keywords of :func:`idid_loss`."""
    for name, value in (("distillation", distillation), ("diversity", diversity),
                        ("adaptive_weight", adaptive_weight), ("class_balanced", class_balanced),
                        ("return_terms", return_terms)):
        check_bool(name, value)
    check_positive("alpha", alpha)
    check_positive("tau", tau)
    check_positive("t", t)
    check_positive("eps", eps)
    check_nonnegative("diversity_weight", diversity_weight)
    check_int("ignore_index", ignore_index)


def cm_margin_loss(x, weight, labels, *, s=30.0, margin="cosface", m=None, m1=1.0, m2=0.0, m3=0.0,
                   sphere_lambda=0.0, easy_margin=False, contraction="sigmoid", norm_offset=0.0,
                   norm_temperature=1.0, detach_norm=False, margin_grad="exact", class_weight=None,
                   ignore_index=-100, reduction="mean", backend="auto"):
    """Contraction-mapped margin-softmax loss (Liu et al. 2024, doi:10.1016/j.patrec.2024.08.016).

    Logits z_nj = s * sigmoid((||x_n|| - norm_offset) / norm_temperature) * psi_nj, where psi is the
    cosine <x_n/||x_n||, w_j/||w_j||> with the margin ``phi`` applied to the target column; then
    cross-entropy with ``F.cross_entropy``'s ``weight``/``ignore_index``/``reduction`` semantics.

    Args:
        x: (N, d) features. weight: (C, d) class weights, same dtype and device.
        labels: (N,) int64 in [0, C) or ``ignore_index``.
        s: logit scale. margin: "none" | "cosface" | "arcface" | "combined" | "sphereface".
        m: the preset's margin (cosface 0.4, arcface 0.5, sphereface 4 by default; radians).
        m1, m2, m3: cos(m1 theta + m2) - m3 for ``margin="combined"``. ``m2`` and ``m3`` may be (N,)
            floating tensors on x's device: per-row margins, differentiable (each backend returns
            d loss / d m2_n and d m3_n when they require grad). Their values are not checked (a
            NaN margin gives that row a NaN loss).
        sphere_lambda: SphereFace's blend with the plain cosine. easy_margin: keep c <= 0 unmargined
            (arcface/combined).
        contraction: "sigmoid" (the paper) or "none" (a_n = s). norm_offset, norm_temperature: the
            sigmoid's shift and temperature. detach_norm: no gradient through the norm.
        margin_grad: "exact" phi'(c) or "straight_through" (phi' = 1, InsightFace's behaviour).
        class_weight: optional (C,) per-class weight. reduction: "mean" | "sum" | "none".
        backend: see the module docstring.

    Returns:
        A scalar for "mean"/"sum", (N,) for "none". Only the CosFace head (s=30, m=0.4, sigmoid) is
        the authors' published code; the other combinations are this package's derivation.
    """
    check_cm_inputs(x, weight)
    n = x.shape[0]
    params = validate_cm_config(s=s, margin=margin, m=m, m1=m1, m2=m2, m3=m3, sphere_lambda=sphere_lambda,
                                easy_margin=easy_margin, contraction=contraction, norm_offset=norm_offset,
                                norm_temperature=norm_temperature, margin_grad=margin_grad, reduction=reduction,
                                ignore_index=ignore_index)
    for name, value in (("m2", m2), ("m3", m3)):
        if isinstance(value, torch.Tensor):
            check_row_vector(name, value, n, x.device)
    return _cm_margin_loss_params(x, weight, labels, params, s=s, contraction=contraction, norm_offset=norm_offset,
                                  norm_temperature=norm_temperature, detach_norm=detach_norm, margin_grad=margin_grad,
                                  class_weight=class_weight, ignore_index=ignore_index, reduction=reduction,
                                  backend=backend)


def _cm_margin_loss_params(x, weight, labels, params: MarginParams, *, s, contraction, norm_offset, norm_temperature,
                           detach_norm, margin_grad, class_weight, ignore_index, reduction, backend):
    """:func:`cm_margin_loss` with the margin resolved (the margin heads of :mod:`idid_kernels.nn`
    call this with theirs); x, weight and the scalar keywords are already checked."""
    num_classes = weight.shape[0]
    check_bool("detach_norm", detach_norm)
    check_class_weight(class_weight, num_classes, x.device)
    labels = check_labels(labels, x.shape[0], num_classes, x.device, ignore_index)
    kernel = _kernel("cm_margin_loss", backend, x.device)
    return kernel(x, weight, labels, params=params, s=s, contraction=contraction, norm_offset=norm_offset,
                  norm_temperature=norm_temperature, detach_norm=detach_norm, margin_grad=margin_grad,
                  class_weight=class_weight, ignore_index=ignore_index, reduction=reduction)


def idid_loss(x, proxies, similarity, labels, *, alpha=16.0, tau=1.0, t=2.0, eps=1e-8, distillation=True,
              diversity=True, adaptive_weight=True, diversity_weight=1.0, class_balanced=True,
              ignore_index=-100, return_terms=False, backend="auto"):
    """IDID-R1 loss: this package's reconstruction of Du et al.'s IDID loss (IEEE TNNLS 2024,
    doi:10.1109/tnnls.2023.3286484) from the paper's abstract (the equations are not public).

    loss = L_IC + lambda * L_ID with L_IC the class-balanced proxy softmax plus the KL distillation
    from a learnable class similarity, L_ID the mean within-class density, lambda the adaptive
    weight stopgrad(L_IC) / (stopgrad(L_ID) + eps). See :mod:`idid_kernels.reference.idid`.

    Args:
        x: (B, d) embeddings. proxies: (C, d) class proxies. similarity: (C, C) learnable class
            similarity (symmetrised; the diagonal is unused). labels: (B,) int64 or ``ignore_index``.
        alpha: logit scale. tau: distillation temperature. t: diversity-kernel sharpness.
        eps: in the adaptive weight's denominator.
        distillation, diversity, adaptive_weight, class_balanced: switch each part (ablations);
            ``adaptive_weight=False`` uses the fixed ``diversity_weight``.
        return_terms: also return L_IC, L_ID and lambda (an :class:`IDIDTerms`).
        backend: see the module docstring.
    """
    check_matrix("x", x)
    b, d = x.shape
    check_matrix("proxies", proxies, cols=d, cols_of="the feature dimension of x")
    num_classes = proxies.shape[0]
    if num_classes < 2:
        raise ValueError(f"proxies has {num_classes} class row(s); IDID needs C >= 2")
    check_matrix("similarity", similarity, rows=num_classes, cols=num_classes, rows_of="one per class",
                 cols_of="one per class")
    check_same("x", x, proxies=proxies, similarity=similarity)
    validate_idid_config(alpha=alpha, tau=tau, t=t, eps=eps, diversity_weight=diversity_weight,
                         ignore_index=ignore_index, distillation=distillation, diversity=diversity,
                         adaptive_weight=adaptive_weight, class_balanced=class_balanced, return_terms=return_terms)
    labels = check_labels(labels, b, num_classes, x.device, ignore_index)
    kernel = _kernel("idid_loss", backend, x.device)
    return kernel(x, proxies, similarity, labels, alpha=alpha, tau=tau, t=t, eps=eps, distillation=distillation,
                  diversity=diversity, adaptive_weight=adaptive_weight, diversity_weight=diversity_weight,
                  class_balanced=class_balanced, ignore_index=ignore_index, return_terms=return_terms)


def pairwise_cosine(x, y=None, *, backend="auto"):
    """Cosine similarities S_ij = <x_i/||x_i||, y_j/||y_j||>, shape (N, M); ``y=None`` means y = x."""
    check_matrix("x", x)
    if y is not None:
        check_matrix("y", y, cols=x.shape[1], cols_of="the feature dimension of x")
        check_same("x", x, y=y)
    return _kernel("pairwise_cosine", backend, x.device)(x, y)


def class_density(x, labels, num_classes, *, t=2.0, backend="auto"):
    """Per-class density D_c (C,): mean of exp(t (cos_ij - 1)) over ordered same-class pairs i != j;
    0 for classes with fewer than two rows (spec/idid.md). Labels must lie in [0, num_classes)."""
    check_matrix("x", x)
    num_classes = check_int("num_classes", num_classes, minimum=1)
    check_positive("t", t)
    labels = check_labels(labels, x.shape[0], num_classes, x.device)
    return _kernel("class_density", backend, x.device)(x, labels, num_classes, t)


def norm_contraction(x, *, offset=0.0, temperature=1.0, backend="auto"):
    """sigmoid((||x_n|| - offset) / temperature), shape (N,): the contraction of feature norms."""
    check_matrix("x", x)
    offset = check_finite("offset", offset)
    temperature = check_positive("temperature", temperature)
    return _kernel("norm_contraction", backend, x.device)(x, offset, temperature)
