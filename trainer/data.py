"""Find, analyse, split and load a dataset in the Stanford Dogs layout.

The layout is one folder per breed, named ``<synset>-<Breed>`` (``n02085620-Chihuahua``), holding
the photos. DATA is a local folder or ``s3://bucket/prefix``. Photos are decoded with
``worker.images`` so that training and serving see identical pixels.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
import re
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from tqdm.auto import tqdm

from worker import images
from worker.s3uri import S3Uri, s3_client

BREED_FOLDER = re.compile(r"^(n\d{8})-(.+)$")
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Photo:
    """One photo of the dataset: where it is, and its breed folder."""

    relative_path: str  # "<synset>-<Breed>/<file>"
    folder: str  # "<synset>-<Breed>"

    @property
    def synset(self) -> str:
        return self.folder.split("-", 1)[0]


@dataclass
class DatasetIndex:
    """The photos of a dataset and its classes (breed folders, sorted)."""

    source: str
    classes: list[str]
    photos: list[Photo]

    def class_index(self) -> dict[str, int]:
        return {folder: i for i, folder in enumerate(self.classes)}

    def labels(self, photos: Sequence[Photo] | None = None) -> np.ndarray:
        index = self.class_index()
        return np.array([index[p.folder] for p in (photos or self.photos)], dtype=np.int32)

    def read_bytes(self, photo: Photo) -> bytes:
        if self.source.startswith("s3://"):
            uri = S3Uri.parse(self.source)
            key = f"{uri.key.rstrip('/')}/{photo.relative_path}" if uri.key else photo.relative_path
            return s3_client().get_object(Bucket=uri.bucket, Key=key)["Body"].read()
        return (Path(self.source) / photo.relative_path).read_bytes()

    def fingerprint(self, photos: Sequence[Photo] | None = None) -> str:
        """A content-free identity of a photo list: source, paths and file sizes/etags are not
        read; relative paths and the class list are enough for a fixed dataset folder."""
        digest = hashlib.sha256()
        digest.update(json.dumps(self.classes).encode())
        for photo in photos or self.photos:
            digest.update(photo.relative_path.encode() + b"\0")
        return digest.hexdigest()[:16]


def _is_photo(name: str) -> bool:
    return name.lower().endswith(images.IMAGE_SUFFIXES)


def find_dataset(source: str | Path, breeds: Iterable[str] | None = None) -> DatasetIndex:
    """Index DATA (local folder or s3://bucket/prefix) laid out as ``<synset>-<Breed>/*.jpg``.

    ``breeds`` keeps only those folders (full folder names or synsets)."""
    source = str(source)
    if source.startswith("s3://"):
        relative = _list_s3(source)
    else:
        root = Path(source)
        if not root.is_dir():
            raise FileNotFoundError(f"dataset folder not found: {root}")
        relative = sorted(
            str(p.relative_to(root)) for p in root.glob("*/*") if p.is_file() and _is_photo(p.name)
        )
    wanted = set(breeds) if breeds else None
    photos = []
    for rel in relative:
        folder = rel.split("/", 1)[0]
        if not BREED_FOLDER.match(folder):
            continue
        if wanted and folder not in wanted and folder.split("-", 1)[0] not in wanted:
            continue
        photos.append(Photo(rel, folder))
    if not photos:
        raise ValueError(f"no photos in the Stanford layout <synset>-<Breed>/*.jpg under {source}")
    classes = sorted({p.folder for p in photos})
    return DatasetIndex(source=source, classes=classes, photos=photos)


def _list_s3(source: str) -> list[str]:
    uri = S3Uri.parse(source)
    prefix = f"{uri.key.rstrip('/')}/" if uri.key else ""
    keys = []
    for page in s3_client().get_paginator("list_objects_v2").paginate(Bucket=uri.bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            rel = obj["Key"][len(prefix):]
            if rel.count("/") == 1 and _is_photo(rel):
                keys.append(rel)
    return sorted(keys)


# ----------------------------------------------------------------------------------------------
# Splits


@dataclass
class Split:
    """Which photos train, validate and test a model (saved with every run)."""

    method: str  # "stratified(seed=..)" or "file:<path>"
    train: list[str] = field(default_factory=list)
    val: list[str] = field(default_factory=list)
    test: list[str] = field(default_factory=list)

    def photos(self, dataset: DatasetIndex, part: str) -> list[Photo]:
        by_path = {p.relative_path: p for p in dataset.photos}
        return [by_path[r] for r in getattr(self, part)]

    def counts(self) -> dict[str, int]:
        return {part: len(getattr(self, part)) for part in SPLITS}

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: Path) -> "Split":
        return cls(**json.loads(Path(path).read_text()))


def stratified_split(dataset: DatasetIndex, val: float = 0.15, test: float = 0.15, seed: int = 0) -> Split:
    """Per breed, shuffle with ``seed`` and cut val/test fractions (at least one photo each
    where a breed has three or more)."""
    rng = random.Random(seed)
    split = Split(method=f"stratified(val={val}, test={test}, seed={seed})")
    by_breed: dict[str, list[str]] = defaultdict(list)
    for photo in dataset.photos:
        by_breed[photo.folder].append(photo.relative_path)
    for folder in sorted(by_breed):
        paths = sorted(by_breed[folder])
        rng.shuffle(paths)
        n_test = max(1, round(len(paths) * test)) if test > 0 and len(paths) >= 3 else 0
        n_val = max(1, round(len(paths) * val)) if val > 0 and len(paths) >= 3 else 0
        split.test += paths[:n_test]
        split.val += paths[n_test:n_test + n_val]
        split.train += paths[n_test + n_val:]
    return split


def split_from_file(dataset: DatasetIndex, path: str | Path, *, column: str = "stanford_split",
                    val: float = 0.1, seed: int = 0) -> Split:
    """An explicit split: a TSV/CSV with ``relative_path`` and a split column (``train``/``test``
    and optionally ``val``; e.g. ``MANIFEST.tsv`` of ../shared/data), or a JSON Split saved by a
    previous run. When the file has no ``val`` rows, ``val`` of each breed's train photos
    (seeded) become the validation set: the test set stays untouched for evaluation."""
    path = Path(path)
    if path.suffix == ".json":
        return Split.load(path)
    text = path.read_text()
    dialect = "excel-tab" if "\t" in text.splitlines()[0] else "excel"
    rows = list(csv.DictReader(io.StringIO(text), dialect=dialect))
    if not rows or "relative_path" not in rows[0] or column not in rows[0]:
        raise ValueError(f"{path}: needs columns relative_path and {column}")
    assigned = {r["relative_path"]: r[column].strip().lower() for r in rows}
    known = {p.relative_path for p in dataset.photos}
    split = Split(method=f"file:{path.name}[{column}]")
    train_by_breed: dict[str, list[str]] = defaultdict(list)
    for rel in sorted(known):
        part = assigned.get(rel)
        if part == "test":
            split.test.append(rel)
        elif part in ("val", "validation"):
            split.val.append(rel)
        elif part == "train":
            train_by_breed[rel.split("/", 1)[0]].append(rel)
    has_val = bool(split.val)
    rng = random.Random(seed)
    for folder in sorted(train_by_breed):
        paths = train_by_breed[folder]
        if not has_val and val > 0:
            rng.shuffle(paths)
            n_val = max(1, round(len(paths) * val)) if len(paths) >= 3 else 0
            split.val += sorted(paths[:n_val])
            paths = sorted(paths[n_val:])
        split.train += paths
    if not split.train or not split.test:
        raise ValueError(f"{path}: split leaves no train or no test photos for this dataset")
    return split


def restrict_to_classes(dataset: DatasetIndex, split: Split) -> DatasetIndex:
    """Keep only the breeds that have train photos in the split (a breed with one stray test
    photo would otherwise be an untrainable class)."""
    trained = {rel.split("/", 1)[0] for rel in split.train}
    photos = [p for p in dataset.photos if p.folder in trained]
    return DatasetIndex(dataset.source, sorted(trained), photos)


def keep_breeds_with(dataset: DatasetIndex, min_photos: int) -> DatasetIndex:
    """Keep only breeds with at least ``min_photos`` photos (e.g. the 11 breeds of the shared
    subset that have 150 or more)."""
    counts = Counter(p.folder for p in dataset.photos)
    kept = sorted(folder for folder, n in counts.items() if n >= min_photos)
    if not kept:
        raise ValueError(f"no breed has {min_photos} photos or more in {dataset.source}")
    return DatasetIndex(dataset.source, kept, [p for p in dataset.photos if p.folder in set(kept)])


# ----------------------------------------------------------------------------------------------
# Loading pixels


@dataclass
class LoadedPhotos:
    """Decoded, resized photos (uint8, N x H x W x 3) with their labels; failures listed."""

    photos: list[Photo]
    pixels: np.ndarray
    labels: np.ndarray
    failures: list[tuple[str, str]]  # (relative_path, error code)


def load_photos(dataset: DatasetIndex, photos: Sequence[Photo], size: tuple[int, int] = images.MODEL_INPUT_SIZE,
                desc: str = "decode", progress: bool = True, fit: str = images.DEFAULT_FIT) -> LoadedPhotos:
    """Decode and resize photos with worker.images (the serving decoder); unreadable ones are
    skipped and reported, never fatal."""
    index = dataset.class_index()
    kept, arrays, labels, failures = [], [], [], []
    for photo in tqdm(photos, desc=desc, unit="img", disable=not progress, leave=False):
        try:
            arrays.append(images.load_image(dataset.read_bytes(photo), size=size, fit=fit))
        except images.ImageDecodeError as error:
            failures.append((photo.relative_path, error.code))
            continue
        kept.append(photo)
        labels.append(index[photo.folder])
    pixels = np.stack(arrays) if arrays else np.zeros((0, size[1], size[0], 3), np.uint8)
    return LoadedPhotos(kept, pixels, np.array(labels, np.int32), failures)


# ----------------------------------------------------------------------------------------------
# Analysis


def analyze(dataset: DatasetIndex, progress: bool = True) -> dict:
    """Counts per breed, image size distribution, colour modes, unreadable files (with their
    decode error code). Reads headers and decodes every photo once."""
    from PIL import Image

    counts = Counter(p.folder for p in dataset.photos)
    sizes, modes, formats, unreadable = [], Counter(), Counter(), []
    for photo in tqdm(dataset.photos, desc="analyze", unit="img", disable=not progress):
        data = dataset.read_bytes(photo)
        try:
            images.decode_image(data)
        except images.ImageDecodeError as error:
            unreadable.append({"path": photo.relative_path, "code": error.code, "message": error.message})
            continue
        with Image.open(io.BytesIO(data)) as img:
            sizes.append((img.width, img.height))
            modes[img.mode] += 1
            formats[img.format] += 1
    widths = np.array([w for w, _ in sizes] or [0])
    heights = np.array([h for _, h in sizes] or [0])
    per_breed = [c for c in counts.values()]
    return {
        "source": dataset.source,
        "photos": len(dataset.photos),
        "breeds": len(dataset.classes),
        "per_breed": dict(sorted(counts.items())),
        "per_breed_summary": {"min": min(per_breed), "max": max(per_breed), "mean": float(np.mean(per_breed))},
        "sizes": [list(s) for s in sizes],
        "size_summary": {
            "width": {"min": int(widths.min()), "median": float(np.median(widths)), "max": int(widths.max())},
            "height": {"min": int(heights.min()), "median": float(np.median(heights)), "max": int(heights.max())},
        },
        "modes": dict(modes),
        "formats": dict(formats),
        "unreadable": unreadable,
    }
