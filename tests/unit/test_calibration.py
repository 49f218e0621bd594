"""Temperature scaling, ECE, risk-coverage (trainer.calibration): properties over generated
probabilities, and the served layer against the numpy reference."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from trainer import calibration

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def _softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


logits = st.integers(2, 12).flatmap(lambda c: arrays(np.float64, st.tuples(st.integers(1, 40), st.just(c)),
                                                     elements=st.floats(-30, 30)))


@settings(max_examples=60, deadline=None)
@given(logits, st.floats(0.1, 10.0))
def test_temperature_keeps_the_ranking_and_sums_to_one(z, temperature):
    probs = _softmax(z)
    scaled = calibration.apply_temperature(probs, temperature)
    np.testing.assert_allclose(scaled.sum(axis=1), 1.0, atol=1e-9)
    # top-1 unchanged (ties aside): temperature scaling never changes accuracy
    best = probs.max(axis=1, keepdims=True)
    assert np.all(probs[np.arange(len(z)), scaled.argmax(axis=1)] >= best[:, 0] - 1e-9)
    # equals softmax(logits / T) for a softmax model (up to the 1e-12 clip of tiny probabilities)
    if np.all(probs > 1e-11):
        np.testing.assert_allclose(scaled, _softmax(z / temperature), atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(logits, st.integers(0, 2**31 - 1))
def test_ece_is_in_unit_interval_and_zero_for_perfect_confidence(z, seed):
    probs = _softmax(z)
    labels = np.random.default_rng(seed).integers(0, probs.shape[1], len(probs))
    ece = calibration.expected_calibration_error(probs, labels)
    assert 0.0 <= ece <= 1.0
    one_hot = np.eye(probs.shape[1])[labels]
    assert calibration.expected_calibration_error(one_hot, labels) == pytest.approx(0.0)
    wrong = np.eye(probs.shape[1])[(labels + 1) % probs.shape[1]]
    assert calibration.expected_calibration_error(wrong, labels) == pytest.approx(1.0)


def test_fitted_temperature_recovers_overconfidence_and_lowers_ece():
    """Photos whose true logits are z, served overconfident as softmax(3 z): the fit finds T
    near 3, and ECE and NLL drop; top-1 stays the same."""
    rng = np.random.default_rng(0)
    n, c = 4000, 10
    z = rng.normal(0, 1.5, (n, c))
    labels = np.array([rng.choice(c, p=p) for p in _softmax(z)])
    served = _softmax(3.0 * z)
    t = calibration.fit_temperature(served[:2000], labels[:2000])
    assert 2.5 < t < 3.5
    rep = calibration.report(served[2000:], labels[2000:], t)
    assert rep.ece_after < rep.ece_before / 3 and rep.ece_after < 0.03
    assert rep.nll_after < rep.nll_before
    after = calibration.apply_temperature(served[2000:], t)
    assert np.array_equal(after.argmax(1), served[2000:].argmax(1))


@settings(max_examples=40, deadline=None)
@given(logits, st.integers(0, 2**31 - 1))
def test_risk_coverage_keeps_fewer_photos_as_the_threshold_rises(z, seed):
    probs = _softmax(z)
    labels = np.random.default_rng(seed).integers(0, probs.shape[1], len(probs))
    rows = calibration.risk_coverage(probs, labels)
    kept = [r["kept"] for r in rows]
    assert kept == sorted(kept, reverse=True)
    for r in rows:
        mask = probs.max(1) >= r["min_score"]
        assert r["photos_kept"] == int(mask.sum())
        if mask.any():
            assert r["top1_of_kept"] == pytest.approx((probs.argmax(1) == labels)[mask].mean(), abs=1e-4)


def test_served_layer_matches_the_numpy_reference():
    from trainer.serving import TemperatureSoftmax

    rng = np.random.default_rng(1)
    probs = _softmax(rng.normal(0, 4, (16, 7))).astype(np.float32)
    layer = TemperatureSoftmax(1.7)
    np.testing.assert_allclose(np.asarray(layer(probs)), calibration.apply_temperature(probs, 1.7), atol=1e-5)
    with pytest.raises(ValueError):
        TemperatureSoftmax(0.0)
