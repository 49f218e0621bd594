"""trainer.progress: one bar per training phase, right when early stopping ends it."""

from __future__ import annotations

import io

import numpy as np
import pytest

from trainer.progress import EpochBar, resolve_progress


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_auto_is_a_bar_on_a_terminal_and_lines_elsewhere():
    assert resolve_progress("auto", Terminal()) == "bar"
    assert resolve_progress("auto", io.StringIO()) == "lines"
    assert resolve_progress("lines", Terminal()) == "lines" and resolve_progress("bar", io.StringIO()) == "bar"


@pytest.mark.parametrize("patience, stops_early", [(0, True), (100, False)])
def test_the_bar_counts_the_epochs_keras_ran(patience, stops_early, capsys):
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, activation="softmax")])
    model.compile(keras.optimizers.SGD(0.0), "sparse_categorical_crossentropy", metrics=["accuracy"])
    bar = EpochBar(12, "fit head")
    x, y = np.random.default_rng(0).random((16, 3)), np.arange(16) % 2
    stop = keras.callbacks.EarlyStopping(monitor="loss", patience=patience, min_delta=1.0)  # lr 0: never improves
    history = model.fit(x, y, epochs=12, verbose=0, callbacks=[stop, bar])
    assert bar.bar.n == len(history.history["loss"])
    assert (bar.bar.n < 12) == stops_early
    err = capsys.readouterr().err
    assert "loss=" in err and "acc=" in err
    assert ("(stopped early)" in err) == stops_early
