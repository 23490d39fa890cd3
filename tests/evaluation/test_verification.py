"""verification_metrics: protocol details and edge cases (the 10-fold parity check is in tests/parity)."""
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from deepmetric.evaluation import verification_metrics
from deepmetric.evaluation.verification import _interp_threshold


def pairs(n, seed):
    rng = np.random.default_rng(seed)
    same = rng.random(n) < 0.5
    return np.where(same, rng.normal(0.8, 0.3, n), rng.normal(1.5, 0.3, n)).clip(0, 3.99), same


def test_auc_eer_and_roc():
    d, same = pairs(400, 0)
    m = verification_metrics(d, same, return_roc=True)
    assert m["auc"] == pytest.approx(roc_auc_score(same, -d))
    fpr, tpr, _ = roc_curve(same, -d)
    frr = 1 - tpr
    i = np.argmin(np.abs(frr - fpr))
    assert abs(m["eer"] - (frr[i] + fpr[i]) / 2) < 0.01
    assert 0.8 < m["accuracy"] <= 1 and 0 <= m["accuracy_std"] < 0.1 and m["num_pairs"] == 400
    assert set(m["roc"]) == {"fpr", "tpr", "thresholds"}


def test_ties_in_threshold_pick_the_smallest():
    # every threshold in (0.5, 1.5] separates perfectly: the first maximum, 0.51, is chosen in every fold
    d = np.tile([0.5, 1.5], 10)
    same = np.tile([True, False], 10)
    m = verification_metrics(d, same)
    assert m["accuracy"] == 1.0 and m["threshold"] == pytest.approx(0.51)


def test_repeated_far_values_do_not_crash():
    far = np.array([0.0, 0.0, 0.002, 0.002, 0.01])
    assert _interp_threshold(far, np.arange(5.0), 1e-3) == pytest.approx(1.0)  # between (0, t=0) and (0.002, t=2)
    assert _interp_threshold(far, np.arange(5.0), 0.5) == 0.0


def test_one_class_and_errors():
    with pytest.warns(UserWarning, match="one class"):
        m = verification_metrics(np.linspace(0, 1, 20), np.ones(20, bool))
    assert np.isnan(m["auc"]) and np.isnan(m["eer"]) and np.isnan(m["tar@far=1e-3"]) and m["accuracy"] > 0.8
    with pytest.raises(ValueError, match="n_folds"):
        verification_metrics([0.1, 0.2], [True, False])
    with pytest.raises(ValueError, match="flags"):
        verification_metrics([0.1] * 20, [True] * 19)
