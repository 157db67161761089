"""Analytic parameter and operation counts, layer by layer, from Keras layer configurations.

Two counts per layer (docs/models.md):

- ``macs``: multiply-adds, the unit of the FaceNet paper's "FLOPS" column. A Conv2D or Dense output
  element costs ``fan_in`` multiply-adds, plus one for a bias. BatchNormalization costs one per
  element (its scale and shift); at conversion it folds into the preceding convolution, so
  conv + BN counts exactly what the paper's conv-with-bias counts.
- ``flops``: floating-point operations: 2 per multiply-add, 1 per bias add, and the layers without
  multiply-adds: pooling ``k*k`` per output element (as TensorFlow's profiler counts it), ReLU and a residual
  addition 1 per element, PReLU 2, L2 normalisation 3 per element.

``facenet-train describe MODEL`` prints the report of a model in the registry.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import keras

from .models import L2Normalize, StaticFlatten, build_model

# Layers that only move data.
_FREE = (keras.layers.InputLayer, keras.layers.Concatenate, StaticFlatten, keras.layers.Flatten, keras.layers.Reshape,
         keras.layers.ZeroPadding2D)


@dataclass(frozen=True)
class LayerCost:
    """One layer's output shape (without the batch axis), parameter count and operation counts."""

    name: str
    kind: str
    output_shape: tuple[int, ...]
    params: int
    macs: int
    flops: int


@dataclass(frozen=True)
class FlopReport:
    """Per-layer costs of one model for a single input image."""

    model_name: str
    input_shape: tuple[int, ...]
    layers: tuple[LayerCost, ...]
    trainable_params: int

    @property
    def params(self) -> int:
        """All weights, as Keras counts them (BatchNormalization's moving statistics included)."""
        return sum(layer.params for layer in self.layers)

    @property
    def macs(self) -> int:
        return sum(layer.macs for layer in self.layers)

    @property
    def flops(self) -> int:
        return sum(layer.flops for layer in self.layers)


def count_flops(model: keras.Model) -> FlopReport:
    """Counts ``model``'s parameters, multiply-adds and FLOPs per image, layer by layer.

    Raises ``ValueError`` for a layer kind without a counting rule, rather than counting it as free.
    """
    layers = []
    for layer in model.layers:
        shape = tuple(int(d) for d in layer.output.shape[1:])
        macs, flops = _layer_cost(layer, math.prod(shape))
        layers.append(LayerCost(layer.name, type(layer).__name__, shape, layer.count_params(), macs, flops))
    trainable = sum(math.prod(w.shape) for w in model.trainable_weights)
    return FlopReport(model.name, tuple(int(d) for d in model.input_shape[1:]), tuple(layers), trainable)


def _layer_cost(layer, out: int) -> tuple[int, int]:
    """(multiply-adds, FLOPs) of one layer with ``out`` output elements."""
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        # Kernel is (kh, kw, channels, 1): each output element sees one channel's kh x kw window.
        fan_in = math.prod(layer.kernel.shape[:2])
        bias = out if layer.use_bias else 0
        return out * fan_in + bias, 2 * out * fan_in + bias
    if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)):
        # Kernel is (kh, kw, in_channels / groups, filters) or (inputs, units): all but the last axis fan in.
        fan_in = math.prod(layer.kernel.shape[:-1])
        bias = out if layer.use_bias else 0
        activation = 0 if layer.activation is keras.activations.linear else out
        return out * fan_in + bias, 2 * out * fan_in + bias + activation
    if isinstance(layer, keras.layers.BatchNormalization):
        return out, 2 * out
    if isinstance(layer, (keras.layers.MaxPooling2D, keras.layers.AveragePooling2D)):
        return 0, math.prod(layer.pool_size) * out
    if isinstance(layer, (keras.layers.ReLU, keras.layers.Add)):
        return 0, out
    if isinstance(layer, keras.layers.PReLU):
        return 0, 2 * out  # a comparison, and a multiplication by the slope
    if isinstance(layer, L2Normalize):
        return 0, 3 * out
    if isinstance(layer, _FREE):
        return 0, 0
    raise ValueError(f"no FLOP counting rule for layer {layer.name!r} of type {type(layer).__name__}")


def format_report(report: FlopReport) -> str:
    """The report as a fixed-width table, one row per layer, then totals."""
    name_width = max(len("layer"), *(len(layer.name) for layer in report.layers))
    kind_width = max(len("kind"), *(len(layer.kind) for layer in report.layers))
    row = f"{{:<{name_width}}}  {{:<{kind_width}}}  {{:>14}}  {{:>11}}  {{:>15}}  {{:>15}}"
    lines = [
        f"{report.model_name}: input {'x'.join(map(str, report.input_shape))}",
        row.format("layer", "kind", "output", "params", "MACs", "FLOPs"),
    ]
    for layer in report.layers:
        shape = "x".join(map(str, layer.output_shape))
        counts = (f"{layer.params:,}", f"{layer.macs:,}", f"{layer.flops:,}")
        lines.append(row.format(layer.name, layer.kind, shape, *counts))
    lines.append(row.format("total", "", "", f"{report.params:,}", f"{report.macs:,}", f"{report.flops:,}"))
    lines.append(
        f"params {report.params / 1e6:.2f}M ({report.trainable_params / 1e6:.2f}M trainable), "
        f"{report.macs / 1e6:.1f}M multiply-adds (the FaceNet paper's 'FLOPS'), {report.flops / 1e6:.1f}M FLOPs"
    )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="model name (see facenet_train.models.MODELS)")
    parser.add_argument("--embedding-size", type=int, default=128)
    parser.add_argument("--input-size", type=int, default=0,
                        help="square input side in pixels (default: the model's own)")


def run(args: argparse.Namespace) -> int:
    """The ``describe`` command."""
    model = build_model(args.model, embedding_size=args.embedding_size, input_size=args.input_size)
    print(format_report(count_flops(model)))
    return 0
