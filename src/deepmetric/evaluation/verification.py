"""Pair verification metrics: the LFW / CFP / AgeDB 10-fold protocol (insightface ``eval/verification.py``,
from facenet), plus threshold-free ROC AUC and EER."""
from __future__ import annotations

import warnings
from typing import Dict, Optional

import numpy as np
import torch
from sklearn.metrics import roc_auc_score, roc_curve

from .neighbors import ArrayLike

ACC_THRESHOLDS = np.arange(0, 4, 0.01)
VAL_THRESHOLDS = np.arange(0, 4, 0.001)
FAR_TARGET = 1e-3


def _counts_below(d: np.ndarray, fold: np.ndarray, n_folds: int, thresholds: np.ndarray) -> np.ndarray:
    """(n_folds, T) counts of ``d < threshold`` per fold (strict, as the protocol's ``np.less``)."""
    out = np.zeros((n_folds, len(thresholds)), dtype=np.int64)
    for f in range(n_folds):
        out[f] = np.searchsorted(np.sort(d[fold == f]), thresholds, side="left")
    return out


def _interp_threshold(far: np.ndarray, thresholds: np.ndarray, target: float) -> float:
    """Threshold reaching FAR = ``target`` by linear interpolation of the (FAR → threshold) curve.

    FAR is non-decreasing in the threshold and repeats values; insightface's ``interp1d`` crashes on
    repeated x with current SciPy. Each distinct FAR keeps its smallest threshold, then ``np.interp``.
    Returns 0.0 when even the largest threshold stays below the target (as insightface).
    """
    if far.max() < target:
        return 0.0
    uniq, first = np.unique(far, return_index=True)
    return float(np.interp(target, uniq, thresholds[first]))


def _eer(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """Equal error rate: where FAR (fpr) = FRR (1 − tpr), linearly interpolated on the ROC curve."""
    diff = (1.0 - tpr) - fpr  # decreasing from 1 to -1 along the curve
    i = int(np.argmax(diff <= 0))
    if i == 0:
        return float(fpr[0])
    t = diff[i - 1] / (diff[i - 1] - diff[i])
    return float(fpr[i - 1] + t * (fpr[i] - fpr[i - 1]))


def verification_metrics(distances: ArrayLike, is_same: ArrayLike, n_folds: int = 10,
                         thresholds: Optional[np.ndarray] = None, return_roc: bool = False) -> Dict[str, object]:
    """LFW-protocol verification metrics from pair distances (lower = more alike, e.g. ‖e1 − e2‖² ∈ [0, 4]).

    Protocol (insightface ``calculate_roc`` / ``calculate_val``), pairs split into ``n_folds`` **contiguous**
    folds (``KFold(shuffle=False)``: the first N mod n_folds folds get one extra pair); a pair is predicted
    "same" when ``distance < threshold`` (strict):

    - ``accuracy``: for each fold, the threshold in ``thresholds`` (default ``arange(0, 4, 0.01)``) with the
      best accuracy on the *other* folds (ties → the smallest threshold, ``np.argmax``) is applied to the
      fold; ``accuracy`` = mean of the fold accuracies, ``accuracy_std`` = their population std (ddof=0),
      ``threshold`` = mean of the chosen thresholds.
    - ``tar@far=1e-3`` (insightface VAL@FAR): per fold, on the other folds FAR(t) = false accepts / different
      pairs for t in ``arange(0, 4, 0.001)``; the threshold reaching FAR = 1e-3 is interpolated (repeated FAR
      values keep their smallest threshold: insightface's ``interp1d`` crashes there; 0.0 if FAR never
      reaches 1e-3); TAR = true accepts / same pairs on the fold. Mean over folds; also
      ``tar@far=1e-3_std`` and ``far@far=1e-3`` (the FAR actually obtained, mean over folds).
    - ``auc``: ROC AUC over all pairs (score = −distance; ties count ½). ``eer``: the error rate where
      FAR = FRR on that ROC curve, linearly interpolated.

    Edge cases: needs at least ``n_folds`` pairs (ValueError); with only one class present, AUC, EER and
    TAR are NaN (warning). A fold without same (different) pairs gives NaN TAR (FAR) for that fold, as
    insightface would. ``return_roc=True`` adds ``"roc"``: ``fpr``, ``tpr``, ``thresholds`` (distances).

    >>> m = verification_metrics([0.1, 1.5, 0.1, 1.9], [True, False, True, False], n_folds=2)
    >>> m["accuracy"], round(m["threshold"], 2), m["auc"], m["eer"]
    (1.0, 0.11, 1.0, 0.0)
    """
    d = np.asarray(distances.detach().cpu() if torch.is_tensor(distances) else distances, dtype=np.float64).reshape(-1)
    same = np.asarray(is_same.detach().cpu() if torch.is_tensor(is_same) else is_same).reshape(-1).astype(bool)
    if len(d) != len(same):
        raise ValueError(f"{len(d)} distances for {len(same)} is_same flags")
    if n_folds < 2 or len(d) < n_folds:
        raise ValueError(f"need n_folds >= 2 and at least n_folds pairs, got n_folds={n_folds}, {len(d)} pairs")
    if np.isnan(d).any():
        raise ValueError("distances contain NaN")
    thr = ACC_THRESHOLDS if thresholds is None else np.asarray(thresholds, dtype=np.float64)
    sizes = np.full(n_folds, len(d) // n_folds) + (np.arange(n_folds) < len(d) % n_folds)
    fold = np.repeat(np.arange(n_folds), sizes)

    def per_fold(ths: np.ndarray):
        s_lt = _counts_below(np.where(same, d, np.inf), fold, n_folds, ths)  # same pairs accepted
        d_lt = _counts_below(np.where(same, np.inf, d), fold, n_folds, ths)  # different pairs accepted
        n_s = np.bincount(fold, weights=same, minlength=n_folds).astype(np.int64)
        return s_lt, d_lt, n_s, sizes - n_s

    s_lt, d_lt, n_s, n_d = per_fold(thr)
    correct = s_lt + (n_d[:, None] - d_lt)  # per fold and threshold
    train_correct = correct.sum(0)[None, :] - correct
    best = np.argmax(train_correct, axis=1)  # first maximum = smallest threshold
    acc = correct[np.arange(n_folds), best] / sizes

    out: Dict[str, object] = {
        "accuracy": float(np.mean(acc)), "accuracy_std": float(np.std(acc)), "threshold": float(np.mean(thr[best])),
    }
    both = same.any() and (~same).any()
    if not both:
        warnings.warn("verification_metrics: only one class of pairs present; AUC, EER and TAR are NaN", stacklevel=2)
    vs_lt, vd_lt, _, _ = per_fold(VAL_THRESHOLDS)
    tar, far = np.full(n_folds, np.nan), np.full(n_folds, np.nan)
    if both:
        with np.errstate(invalid="ignore", divide="ignore"):
            for f in range(n_folds):
                n_diff_train = n_d.sum() - n_d[f]
                far_train = (vd_lt.sum(0) - vd_lt[f]) / n_diff_train
                t = _interp_threshold(far_train, VAL_THRESHOLDS, FAR_TARGET)
                d_f, s_f = d[fold == f], same[fold == f]
                tar[f] = np.sum((d_f < t) & s_f) / n_s[f]
                far[f] = np.sum((d_f < t) & ~s_f) / n_d[f]
    out["tar@far=1e-3"] = float(np.mean(tar))
    out["tar@far=1e-3_std"] = float(np.std(tar))
    out["far@far=1e-3"] = float(np.mean(far))
    if both:
        fpr, tpr, roc_thr = roc_curve(same, -d, drop_intermediate=False)
        out["auc"] = float(roc_auc_score(same, -d))
        out["eer"] = _eer(fpr, tpr)
        if return_roc:
            out["roc"] = {"fpr": fpr, "tpr": tpr, "thresholds": -roc_thr}
    else:
        out["auc"] = out["eer"] = float("nan")
    out["num_pairs"] = int(len(d))
    return out
