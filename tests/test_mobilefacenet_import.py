"""InsightFace's MobileFaceNet from ncnn files (facenet_train.mobilefacenet_import): a model
written out in ncnn's format, with PReLU slopes of 0 (ReLU), comes back computing the same."""

import keras
import numpy as np
import pytest

from facenet_train import cli
from facenet_train.checkpoint import load_compact
from facenet_train.models import build_model

EPSILON = 1e-3  # Keras' batch normalisation default, which ncnn's format does not have


def _write_ncnn(model: keras.Model, param, weights, skip: str = "") -> None:
    """``model`` as an ncnn pair in InsightFace's naming; ReLU written as PReLU with slope 0;
    without the layers whose names start with ``skip``."""
    lines, blobs = [], []

    def add(kind, name, params, *arrays, header=False):
        if skip and name.startswith(skip):
            return
        lines.append(f"{kind} {name} 1 1 in_{name} out_{name} " + " ".join(f"{k}={v}" for k, v in params.items()))
        for i, array in enumerate(arrays):
            if header and i == 0:
                blobs.append(np.zeros(1, np.uint32).tobytes())
            blobs.append(np.asarray(array, np.float32).tobytes())

    names = {"gdc": "conv_6dw7_7", "gdc_bn": "conv_6dw7_7_batchnorm"}
    for layer in model.layers:
        if isinstance(layer, keras.layers.DepthwiseConv2D):
            kernel = layer.get_weights()[0][..., 0]  # (k, k, C)
            add("ConvolutionDepthWise", names.get(layer.name, layer.name) + "_conv2d",
                {0: kernel.shape[2], 1: kernel.shape[0], 5: 0, 6: kernel.size, 7: kernel.shape[2]},
                kernel.transpose(2, 0, 1), header=True)
        elif isinstance(layer, keras.layers.Conv2D):
            kernel = layer.get_weights()[0]  # (k, k, in, out)
            add("Convolution", layer.name + "_conv2d", {0: kernel.shape[3], 1: kernel.shape[0], 5: 0, 6: kernel.size},
                kernel.transpose(3, 2, 0, 1), header=True)
        elif isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            name = names.get(layer.name, layer.name.removesuffix("_bn") + "_batchnorm")
            add("BatchNorm", name, {0: len(gamma)}, gamma, mean, var + EPSILON, beta)
        elif isinstance(layer, keras.layers.ReLU):
            add("PReLU", layer.name, {0: layer.output.shape[-1]}, np.zeros(layer.output.shape[-1]))
        elif isinstance(layer, keras.layers.PReLU):
            slopes = layer.get_weights()[0].ravel()
            add("PReLU", layer.name.removesuffix("_prelu") + "_relu", {0: len(slopes)}, slopes)
        elif layer.name == "embedding_dense":
            kernel, bias = layer.get_weights()
            add("InnerProduct", "pre_fc1", {0: kernel.shape[1], 1: 1, 2: kernel.size}, kernel.T, bias, header=True)
            width = kernel.shape[1]
            add("BatchNorm", "fc1", {0: width}, np.ones(width), np.zeros(width), np.ones(width), np.zeros(width))
    param.write_text("7767517\n" + f"{len(lines)} {len(lines)}\n" + "\n".join(lines) + "\n")
    weights.write_bytes(b"".join(blobs))


def _randomised(name: str) -> keras.Model:
    """Model ``name`` with random batch-norm statistics and PReLU slopes (so a mistake in
    their order shows)."""
    model = build_model(name)
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = len(layer.get_weights()[0])
            layer.set_weights([rng.uniform(0.5, 1.5, n), rng.normal(0, 0.1, n), rng.normal(0, 0.1, n),
                               rng.uniform(0.5, 2.0, n)])
        elif isinstance(layer, keras.layers.PReLU):
            layer.set_weights([rng.uniform(-1.0, 1.0, layer.get_weights()[0].shape)])
    return model


@pytest.fixture(scope="module")
def source():
    return _randomised("mobilefacenet")


def test_an_ncnn_pair_imports_computing_what_it_computed(source, tmp_path, capsys):
    param, weights = tmp_path / "mfn.param", tmp_path / "mfn.bin"
    _write_ncnn(source, param, weights)
    assert cli.main(["import-mobilefacenet", str(param), str(weights), "--out", str(tmp_path / "m.npz")]) == 0
    assert "33 PReLU layers became ReLU" in capsys.readouterr().out
    imported = load_compact(tmp_path / "m.npz")
    images = np.random.default_rng(1).normal(0, 1, (2, 112, 112, 3)).astype(np.float32)
    want, got = source(images, training=False).numpy(), imported(images, training=False).numpy()
    # Compact weights hold kernels as float16, so the embeddings agree to that rounding.
    assert np.min(np.sum(want * got, axis=1)) > 0.999


def test_with_prelu_the_slopes_come_too(tmp_path, capsys):
    source = _randomised("mobilefacenet_prelu")
    param, weights = tmp_path / "mfn.param", tmp_path / "mfn.bin"
    _write_ncnn(source, param, weights)
    out = tmp_path / "p.npz"
    assert cli.main(["import-mobilefacenet", str(param), str(weights), "--prelu", "--out", str(out)]) == 0
    assert "its 33 PReLU layers included" in capsys.readouterr().out
    imported = load_compact(out)
    assert imported.name == "mobilefacenet_prelu"
    images = np.random.default_rng(1).normal(0, 1, (2, 112, 112, 3)).astype(np.float32)
    want, got = source(images, training=False).numpy(), imported(images, training=False).numpy()
    assert np.min(np.sum(want * got, axis=1)) > 0.999


def test_quantized_truncated_and_foreign_files_are_refused_by_name(source, tmp_path):
    from facenet_train.mobilefacenet_import import import_mobilefacenet

    param, weights = tmp_path / "mfn.param", tmp_path / "mfn.bin"
    _write_ncnn(source, param, weights)
    good = weights.read_bytes()
    weights.write_bytes(good[:-4])
    with pytest.raises(ValueError, match="ends before the weights"):
        import_mobilefacenet(param, weights, tmp_path / "m.npz")
    weights.write_bytes(np.array([0x01306B47], np.uint32).tobytes() + good[4:])
    with pytest.raises(ValueError, match="stored quantized"):
        import_mobilefacenet(param, weights, tmp_path / "m.npz")
    weights.write_bytes(good + b"\0" * 8)
    with pytest.raises(ValueError, match="8 bytes more"):
        import_mobilefacenet(param, weights, tmp_path / "m.npz")
    _write_ncnn(source, param, weights, skip="res_5_block1_conv_proj")
    with pytest.raises(ValueError, match="not InsightFace's MobileFaceNet: no weights for res_5_block1_conv_proj"):
        import_mobilefacenet(param, weights, tmp_path / "m.npz")
    param.write_text("not ncnn\n")
    with pytest.raises(ValueError, match="not an ncnn .param file"):
        import_mobilefacenet(param, weights, tmp_path / "m.npz")
    assert not (tmp_path / "m.npz").exists()
