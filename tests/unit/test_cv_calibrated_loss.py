"""Cross-validation compares configurations on the held-out loss after temperature scaling
(what ``fit`` publishes), not on the raw loss, which also scores over- or under-confidence."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer.tuning import temperature_scaled_loss


def _softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 12), st.integers(5, 200), st.floats(0.05, 20.0))
def test_calibrated_loss_is_never_above_the_raw_loss(seed, classes, n, scale):
    rng = np.random.default_rng(seed)
    probs = _softmax(rng.normal(0, scale, (n, classes)))
    labels = rng.integers(0, classes, n)
    raw = float(-np.log(np.clip(probs[np.arange(n), labels], 1e-12, 1)).mean())
    temperature, calibrated = temperature_scaled_loss(probs, labels)
    assert calibrated <= raw + 1e-9
    assert np.exp(-3) - 1e-6 <= temperature <= np.exp(3) + 1e-6


def test_temperature_undoes_a_known_over_confidence():
    """Labels drawn from softmax(z), answers softmax(3 z): the fitted temperature is about 3 and the
    calibrated loss about the loss of the true probabilities."""
    rng = np.random.default_rng(0)
    z = rng.normal(0, 1.5, (20_000, 5))
    true = _softmax(z)
    labels = np.array([rng.choice(5, p=p) for p in true])
    temperature, calibrated = temperature_scaled_loss(_softmax(3 * z), labels)
    assert abs(temperature - 3) < 0.15
    truth = float(-np.log(true[np.arange(len(labels)), labels]).mean())
    assert abs(calibrated - truth) < 0.01
