"""InsightFace's MobileFaceNet, from its ncnn files, into our ``mobilefacenet`` layout.

InsightFace's MobileFaceNet (99.2 % on LFW, 128-d) ships as ncnn ``.param`` / ``.bin`` files
(the accuracy issue's third teacher: fetch ``github:CrD1997/mobilefacenet_ncnn``,
``models/insightface_mfnet_mxnet.{param,bin}``). :func:`read_ncnn` reads such a pair (float32
weights only) and :func:`mobilefacenet_weights` maps it onto
``build_model("mobilefacenet")`` by layer name:

- ``X_conv2d`` -> ``X``, ``X_batchnorm`` -> ``X_bn``; the 7x7 depthwise read-out
  ``conv_6dw7_7`` -> ``gdc``;
- ``pre_fc1`` and the batch normalisation after it (``fc1``) -> ``embedding_dense``, folded;
- the PReLU slopes go to ``{conv}_prelu`` of ``mobilefacenet_prelu`` (``--prelu``), the model
  as InsightFace trained it; ``mobilefacenet`` (the default) has ReLU there (models.py says
  why) and drops them, so it is a start for distillation from the former, not a finished
  model (on LFW: 99.4 % with PReLU, about 65 % with ReLU before training; docs/model.md).

ncnn's batch normalisation has no epsilon; Keras adds its own (1e-3), which the import
cancels by scaling gamma. The weights' terms follow InsightFace's: non-commercial research.

    facenet-train import-mobilefacenet insightface_mfnet_mxnet.param insightface_mfnet_mxnet.bin \\
        --out mobilefacenet_insightface.npz [--prelu]
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .checkpoint import save_compact
from .models import build_model

MODEL, PRELU_MODEL = "mobilefacenet", "mobilefacenet_prelu"
# ncnn's header word before a raw float32 weight blob (others mark fp16 or int8 blobs).
RAW_FLOAT32 = 0
READ_OUT = {"conv_6dw7_7": "gdc"}
EMBEDDING = ("pre_fc1", "fc1")


@dataclass(frozen=True)
class NcnnLayer:
    kind: str
    name: str
    params: dict[str, str]
    blobs: dict[str, np.ndarray] = field(default_factory=dict)


def read_ncnn(param: str | Path, weights: str | Path) -> list[NcnnLayer]:
    """The layers of an ncnn model with their weight blobs, in file order."""
    lines = Path(param).read_text().split("\n")
    if not lines or lines[0].strip() != "7767517":
        raise ValueError(f"{param} is not an ncnn .param file (its first line is not the magic 7767517)")
    data = Path(weights).read_bytes()
    offset = 0

    def floats(count: int, header: bool) -> np.ndarray:
        nonlocal offset
        if header:
            flag = int(np.frombuffer(data, np.uint32, 1, offset)[0])
            if flag != RAW_FLOAT32:
                raise ValueError(f"{weights}: a weight blob is stored quantized (flag {flag:#x}); "
                                 "only float32 ncnn models can be imported")
            offset += 4
        if offset + 4 * count > len(data):
            raise ValueError(f"{weights} ends before the weights {param} describes")
        blob = np.frombuffer(data, np.float32, count, offset).copy()
        offset += 4 * count
        return blob

    layers = []
    for line in lines[2:]:
        if not line.strip():
            continue
        kind, name, n_in, n_out, *rest = line.split()
        params = dict(item.split("=", 1) for item in rest[int(n_in) + int(n_out):])
        blobs = {}
        if kind in ("Convolution", "ConvolutionDepthWise", "InnerProduct"):
            size_key, bias_key = ("2", "1") if kind == "InnerProduct" else ("6", "5")
            blobs["weight"] = floats(int(params[size_key]), header=True)
            if params.get(bias_key, "0") == "1":
                blobs["bias"] = floats(int(params["0"]), header=False)
        elif kind == "BatchNorm":
            blobs = {key: floats(int(params["0"]), header=False) for key in ("slope", "mean", "var", "bias")}
        elif kind == "PReLU":
            blobs["slope"] = floats(int(params["0"]), header=False)
        layers.append(NcnnLayer(kind, name, params, blobs))
    if offset != len(data):
        raise ValueError(f"{weights} holds {len(data) - offset} bytes more than {param} describes")
    return layers


def mobilefacenet_weights(layers: list[NcnnLayer], prelu: bool = False) -> dict[str, list[np.ndarray]]:
    """Keras weights of ``build_model("mobilefacenet")`` (``mobilefacenet_prelu`` with
    ``prelu``), by layer name."""
    by_name = {layer.name: layer for layer in layers}
    weights: dict[str, list[np.ndarray]] = {}
    for layer in layers:
        if prelu and layer.kind == "PReLU":
            weights[layer.name.removesuffix("_relu") + "_prelu"] = [layer.blobs["slope"][None, None, :]]
        if layer.kind in ("Convolution", "ConvolutionDepthWise") and layer.name.endswith("_conv2d"):
            base = layer.name.removesuffix("_conv2d")
            ours = READ_OUT.get(base, base)
            weights[ours] = [_kernel(layer)]
            weights[f"{ours}_bn"] = _batch_norm(by_name[f"{base}_batchnorm"])
    dense, norm = (by_name[name] for name in EMBEDDING)
    kernel = dense.blobs["weight"].reshape(int(dense.params["0"]), -1).T
    gamma, beta, mean, var = norm.blobs["slope"], norm.blobs["bias"], norm.blobs["mean"], norm.blobs["var"]
    scale = gamma / np.sqrt(var)
    weights["embedding_dense"] = [kernel * scale, (dense.blobs.get("bias", 0.0) - mean) * scale + beta]
    return weights


def _kernel(layer: NcnnLayer) -> np.ndarray:
    out, k = int(layer.params["0"]), int(layer.params["1"])
    blob = layer.blobs["weight"]
    if layer.kind == "ConvolutionDepthWise":
        return blob.reshape(out, k, k).transpose(1, 2, 0)[..., None]  # (k, k, channels, 1)
    return blob.reshape(out, -1, k, k).transpose(2, 3, 1, 0)  # (k, k, in, out)


def _batch_norm(layer: NcnnLayer, epsilon: float = 1e-3) -> list[np.ndarray]:
    """Keras [gamma, beta, moving mean, moving variance] computing what ncnn's epsilon-free
    normalisation computes."""
    var = layer.blobs["var"]
    gamma = layer.blobs["slope"] * np.sqrt(var + epsilon) / np.sqrt(var)
    return [gamma, layer.blobs["bias"], layer.blobs["mean"], var]


def import_mobilefacenet(param: str | Path, weights: str | Path, out: str | Path,
                         prelu: bool = False) -> tuple[Path, int]:
    """Write the ``mobilefacenet`` compact weights of an ncnn model (``mobilefacenet_prelu``
    with ``prelu``); returns the path and the number of PReLU layers."""
    layers = read_ncnn(param, weights)
    model = build_model(PRELU_MODEL if prelu else MODEL)
    imported = mobilefacenet_weights(layers, prelu)
    expected = {layer.name for layer in model.layers if layer.weights}
    if missing := sorted(expected - imported.keys()):
        raise ValueError(f"{param} is not InsightFace's MobileFaceNet: no weights for {', '.join(missing[:3])}")
    if extra := sorted(imported.keys() - expected):
        raise ValueError(f"{param} is not InsightFace's MobileFaceNet: it has layers {', '.join(extra[:3])}")
    for name, values in imported.items():
        layer = model.get_layer(name)
        shapes = [tuple(w.shape) for w in layer.weights]
        if shapes != [v.shape for v in values]:
            raise ValueError(f"{param}: layer {name} holds {[v.shape for v in values]}, the layout needs {shapes}")
        layer.set_weights(values)
    return save_compact(model, out), sum(layer.kind == "PReLU" for layer in layers)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("param", type=Path, help="the ncnn .param file (insightface_mfnet_mxnet.param)")
    parser.add_argument("weights", type=Path, help="its .bin file")
    parser.add_argument("--prelu", action="store_true",
                        help=f"keep the PReLU slopes ({PRELU_MODEL}: the model as trained, a teacher) instead of "
                             f"{MODEL} with ReLU (the student)")
    parser.add_argument("--out", required=True, type=Path, help="the compact weights .npz to write")


def run(args: argparse.Namespace) -> int:
    """The ``import-mobilefacenet`` command."""
    path, activations = import_mobilefacenet(args.param, args.weights, args.out, args.prelu)
    if args.prelu:
        print(f"wrote {path}: {PRELU_MODEL} with InsightFace's weights, its {activations} PReLU layers included")
    else:
        print(f"wrote {path}: {MODEL} with InsightFace's weights; {activations} PReLU layers became ReLU, "
              f"so distil it from the {PRELU_MODEL} import before use (docs/model.md)")
    return 0
