"""Photos without a dog: find them and split them, deterministically, for the dog check.

A not-dog folder holds photos at any depth; the first folder under it is the photo's *group*
(``cats``, ``imagenet-objects``) and the folder holding it its *class* (``cats``,
``imagenet-objects/n01440764-tench``). ``dogbreeds-train fit`` looks for one inside DATA
(``DATA/not-dogs/``, which the Stanford layout ignores) unless ``--not-dogs`` names another.

The split is a pure function of each photo's relative path (no seed, no listing order): per
class, photos are ordered by ``sha256(relative path)`` and cut into ``fit`` (40%: fits the dog
head), ``val`` (20%: chooses the threshold) and ``test`` (40%: measured only). The same folder
always gives the same split, whoever splits it (the trainer, the benchmark, the tests).
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
from tqdm.auto import tqdm

from worker import images

FOLDER = "not-dogs"  # DATA/not-dogs/: the not-dog photos fit finds by itself
PARTS = ("fit", "val", "test")
FRACTIONS = (0.4, 0.2, 0.4)


@dataclass(frozen=True)
class NotDogPhoto:
    relative_path: str  # posix, relative to the not-dog folder

    @property
    def group(self) -> str:
        """``cats`` / ``imagenet-objects`` / ``.`` (photos at the top level)."""
        parts = PurePosixPath(self.relative_path).parts
        return parts[0] if len(parts) > 1 else "."

    @property
    def klass(self) -> str:
        return str(PurePosixPath(self.relative_path).parent)


@dataclass
class NotDogSplit:
    source: str
    fit: list[str] = field(default_factory=list)
    val: list[str] = field(default_factory=list)
    test: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"source": self.source, "rule": RULE, "fit": self.fit, "val": self.val, "test": self.test}

    def counts(self) -> dict[str, int]:
        return {part: len(getattr(self, part)) for part in PARTS}


RULE = ("per class (folder), photos ordered by sha256 of their relative path; the first 40% fit the dog "
        "head, the next 20% choose the threshold, the last 40% are the test part (measured only)")


def find_not_dogs(root: str | Path) -> list[NotDogPhoto]:
    """Every photo under ``root`` (recursively), sorted."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"not-dog folder not found: {root}")
    return [NotDogPhoto(p.relative_to(root).as_posix()) for p in sorted(root.rglob("*"))
            if p.is_file() and p.name.lower().endswith(images.IMAGE_SUFFIXES)]


def order(relative_path: str) -> str:
    """The split's order key of a photo (sha256 of its relative path)."""
    return hashlib.sha256(relative_path.encode()).hexdigest()


def split_not_dogs(photos: list[NotDogPhoto], source: str = "") -> NotDogSplit:
    """The deterministic fit / val / test split (see the module doc). A class of one photo
    goes to fit; of two, fit and val."""
    by_class: dict[str, list[str]] = defaultdict(list)
    for photo in photos:
        by_class[photo.klass].append(photo.relative_path)
    split = NotDogSplit(source)
    for klass in sorted(by_class):
        paths = sorted(by_class[klass], key=order)
        n = len(paths)
        n_fit = max(1, round(n * FRACTIONS[0]))
        n_val = min(n - n_fit, max(1 if n >= 2 else 0, round(n * FRACTIONS[1])))
        split.fit += paths[:n_fit]
        split.val += paths[n_fit:n_fit + n_val]
        split.test += paths[n_fit + n_val:]
    for part in PARTS:
        getattr(split, part).sort()
    return split


def load_pixels(root: str | Path, relative_paths: list[str], size: int, fit: str = images.DEFAULT_FIT,
                progress: bool = True, desc: str = "decode not-dogs") -> tuple[np.ndarray, list[str]]:
    """Decoded photos (uint8, n x size x size x 3) with the worker's decoder, and the relative
    paths kept (unreadable photos are skipped)."""
    root = Path(root)
    arrays, kept = [], []
    for rel in tqdm(relative_paths, desc=desc, unit="img", disable=not progress, leave=False):
        try:
            arrays.append(images.load_image((root / rel).read_bytes(), size=(size, size), fit=fit))
        except (images.ImageDecodeError, OSError):
            continue
        kept.append(rel)
    pixels = np.stack(arrays) if arrays else np.zeros((0, size, size, 3), np.uint8)
    return pixels, kept
