"""Classification metrics of the imbalanced-learning papers, written out so their conventions are explicit.

All take integer label arrays (numpy or torch) and the number of classes C. Conventions:

- per-class recall r_c = TP_c / (TP_c + FN_c) for classes present in ``y_true``; NaN for a class with
  no true sample (its recall is undefined, not 0).
- macro-F1: mean over the classes present in ``y_true`` or ``y_pred`` of
  F1_c = 2 TP_c / (2 TP_c + FP_c + FN_c). A class that is predicted but never true has F1 = 0; a class
  that is neither true nor predicted is left out (0/0). This equals scikit-learn's
  ``f1_score(average="macro")`` without a ``labels`` argument.
- G-mean: geometric mean of the per-class recalls over the classes present in ``y_true``; 0 when any
  of them is 0 (one class never recognised sinks the whole score, which is why the papers use it).
- accuracy: fraction of correct predictions; NaN for an empty set.
- Pearson correlation: NaN when either variable is constant.
"""
from __future__ import annotations

import math

import numpy as np


def _as_int_array(a) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.asarray(a, dtype=np.int64).reshape(-1)


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """(C, C) counts, rows = true class, columns = predicted class."""
    t, p = _as_int_array(y_true), _as_int_array(y_pred)
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in length: {t.shape[0]} vs {p.shape[0]}")
    for name, a in (("y_true", t), ("y_pred", p)):
        if a.size and (a.min() < 0 or a.max() >= num_classes):
            raise ValueError(f"{name} has labels outside [0, {num_classes})")
    return np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def accuracy(y_true, y_pred) -> float:
    t, p = _as_int_array(y_true), _as_int_array(y_pred)
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in length: {t.shape[0]} vs {p.shape[0]}")
    return float(np.mean(t == p)) if t.size else math.nan


def per_class_recall(y_true, y_pred, num_classes: int) -> np.ndarray:
    """(C,) recalls; NaN where the class has no true sample."""
    cm = confusion_matrix(y_true, y_pred, num_classes)
    support = cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, np.diag(cm) / np.maximum(support, 1), np.nan)


def macro_f1(y_true, y_pred, num_classes: int) -> float:
    cm = confusion_matrix(y_true, y_pred, num_classes)
    tp = np.diag(cm).astype(np.float64)
    fp = cm.sum(axis=0) - tp
    fn = cm.sum(axis=1) - tp
    denom = 2 * tp + fp + fn
    seen = denom > 0                  # true or predicted at least once
    if not seen.any():
        return math.nan
    return float(np.mean(2 * tp[seen] / denom[seen]))


def g_mean(y_true, y_pred, num_classes: int) -> float:
    recall = per_class_recall(y_true, y_pred, num_classes)
    recall = recall[~np.isnan(recall)]
    if recall.size == 0:
        return math.nan
    if np.any(recall == 0):
        return 0.0
    return float(np.exp(np.mean(np.log(recall))))


def pearson(a, b) -> float:
    """Pearson correlation coefficient of two equally long 1-D samples."""
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    if hasattr(b, "detach"):
        b = b.detach().cpu().numpy()
    a, b = np.asarray(a, dtype=np.float64).reshape(-1), np.asarray(b, dtype=np.float64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"pearson needs equally long samples, got {a.size} and {b.size}")
    if a.size < 2:
        return math.nan
    da, db = a - a.mean(), b - b.mean()
    den = math.sqrt(float(np.dot(da, da)) * float(np.dot(db, db)))
    return float(np.dot(da, db) / den) if den > 0 else math.nan
