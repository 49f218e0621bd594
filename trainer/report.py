"""Plots of a dataset analysis: size histogram, photos per breed, a before/after preprocessing
sheet and an augmentation sheet (as the seed's slides showed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from trainer import data as datasets


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_sizes(report: dict, path: Path) -> Path:
    plt = _pyplot()
    sizes = np.array(report["sizes"] or [[0, 0]])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].hist(sizes[:, 0], bins=40, alpha=0.6, label="width")
    axes[0].hist(sizes[:, 1], bins=40, alpha=0.6, label="height")
    axes[0].set_xlabel("pixels")
    axes[0].set_ylabel("photos")
    axes[0].legend()
    axes[0].set_title("Image sizes")
    axes[1].scatter(sizes[:, 0], sizes[:, 1], s=4, alpha=0.4)
    axes[1].set_xlabel("width")
    axes[1].set_ylabel("height")
    axes[1].set_title("Width vs height")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_breed_counts(report: dict, path: Path) -> Path:
    plt = _pyplot()
    items = sorted(report["per_breed"].items(), key=lambda kv: -kv[1])
    names = [k.split("-", 1)[1].replace("_", " ") for k, _ in items]
    fig, ax = plt.subplots(figsize=(max(6, 0.18 * len(items) + 2), 4.5))
    ax.bar(range(len(items)), [v for _, v in items])
    ax.set_xticks(range(len(items)), names, rotation=90, fontsize=7 if len(items) > 40 else 9)
    ax.axhline(report["per_breed_summary"]["mean"], color="red", ls="--", label="mean")
    ax.set_ylabel("photos")
    ax.set_title(f"Photos per breed ({report['photos']} photos, {report['breeds']} breeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_sheet(rows: list[tuple[str, list[np.ndarray]]], column_titles: list[str], path: Path, title: str) -> Path:
    """A grid of images: one row per photo, one column per treatment."""
    plt = _pyplot()
    n_rows, n_cols = len(rows), len(column_titles)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(2.4 * n_cols, 2.5 * n_rows), squeeze=False)
    for r, (label, imgs) in enumerate(rows):
        for c, img in enumerate(imgs):
            ax = axes[r, c]
            ax.imshow(np.clip(img, 0, 255).astype(np.uint8))
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(column_titles[c], fontsize=9)
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def sample_photos(dataset: datasets.DatasetIndex, n: int = 4, seed: int = 0) -> datasets.LoadedPhotos:
    """One photo from each of ``n`` breeds, decoded at the model's input size."""
    rng = np.random.default_rng(seed)
    folders = list(dataset.classes)
    rng.shuffle(folders)
    picks = []
    for folder in folders[:n]:
        candidates = [p for p in dataset.photos if p.folder == folder]
        picks.append(candidates[int(rng.integers(len(candidates)))])
    return datasets.load_photos(dataset, picks, progress=False)


def preprocessing_sheet(loaded: datasets.LoadedPhotos, path: Path) -> Path:
    """Original vs equalised photos (the seed's 'before/after preprocessing' slide)."""
    from trainer.preprocessing import Equalize

    equalised = np.asarray(Equalize()(loaded.pixels.astype(np.float32)))
    rows = [(p.folder.split("-", 1)[1], [orig, eq]) for p, orig, eq in zip(loaded.photos, loaded.pixels, equalised)]
    return plot_sheet(rows, ["original (224x224)", "after equalisation"], path, "Preprocessing: before / after")


def augmentation_sheet(loaded: datasets.LoadedPhotos, path: Path, seed: int = 0) -> Path:
    """Each augmentation alone, then all together, on the same photos."""
    import keras

    from trainer.preprocessing import build_augmentation

    x = loaded.pixels.astype(np.float32)
    single = {
        "flip": keras.layers.RandomFlip("horizontal", seed=seed),
        "rotation": keras.layers.RandomRotation(0.15, seed=seed),
        "zoom": keras.layers.RandomZoom(0.25, seed=seed),
        "translation": keras.layers.RandomTranslation(0.15, 0.15, seed=seed),
        "contrast": keras.layers.RandomContrast(0.5, seed=seed, value_range=(0, 255)),
        "all (training)": build_augmentation(seed=seed),
    }
    outs = {name: np.asarray(layer(x, training=True)) for name, layer in single.items()}
    rows = [(p.folder.split("-", 1)[1], [x[i]] + [outs[k][i] for k in single]) for i, p in enumerate(loaded.photos)]
    return plot_sheet(rows, ["original"] + list(single), path, "Augmentation (random, seeded)")


def write_analysis(dataset: datasets.DatasetIndex, report: dict, out_dir: Path, seed: int = 0) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"sizes": plot_sizes(report, out_dir / "sizes.png"),
             "breeds": plot_breed_counts(report, out_dir / "breeds.png")}
    sample = sample_photos(dataset, seed=seed)
    if len(sample.photos):
        files["preprocessing"] = preprocessing_sheet(sample, out_dir / "preprocessing.png")
        files["augmentation"] = augmentation_sheet(sample, out_dir / "augmentation.png", seed)
    return files
