"""One progress bar per training phase instead of Keras's line per epoch (``fit --progress bar``)."""

from __future__ import annotations

import sys

import keras
from tqdm.auto import tqdm

#: Shown beside the bar (Keras name -> short label), in this order, when Keras reports them.
SHOWN = {"loss": "loss", "accuracy": "acc", "val_loss": "val_loss", "val_accuracy": "val_acc"}


def resolve_progress(progress: str, stream=sys.stderr) -> str:
    """``bar`` or ``lines`` for ``auto|bar|lines`` (``auto``: a bar on a terminal)."""
    if progress == "auto":
        try:
            return "bar" if stream.isatty() else "lines"
        except (AttributeError, ValueError):
            return "lines"
    return progress


class EpochBar(keras.callbacks.Callback):
    """A tqdm bar over a phase's epochs with the last epoch's loss and accuracy; it ends early
    when early stopping does, and starts where an interrupted run resumes."""

    def __init__(self, epochs: int, desc: str):
        super().__init__()
        self.epochs = epochs
        self.desc = desc
        self.bar: tqdm | None = None

    def on_train_begin(self, logs=None):
        self.bar = tqdm(total=self.epochs, desc=self.desc, unit="epoch", file=sys.stderr, leave=True)

    def on_epoch_end(self, epoch, logs=None):
        self.bar.n = epoch + 1
        self.bar.set_postfix({label: f"{logs[k]:.3f}" for k, label in SHOWN.items() if logs and k in logs},
                             refresh=False)
        self.bar.refresh()

    def on_train_end(self, logs=None):
        if self.bar is not None:
            if self.bar.n < self.epochs:
                self.bar.set_description(f"{self.desc} (stopped early)", refresh=False)
            self.bar.close()
