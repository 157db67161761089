"""Carry a trained model's weights into a wider layout of the same stages, keeping its function.

Each layer of the wider layout (a ``MODELS`` entry with the same stages and more filters)
takes the trained kernel in the channels the trained model has; the new filters keep their
fresh initialisation, and every weight that reads a new channel starts at zero. So the wider
model computes exactly what the trained one did, and training continues from there: the
new channels start to count as the weights reading them move off zero (the aim of Net2Net,
Chen et al. 2016, by zero fan-out instead of copied units, so no symmetry needs breaking).

    facenet-train widen WEIGHTS.npz --to nn4_small2_wide --out WIDE.npz
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import keras
import numpy as np

from .checkpoint import load_keras_model, save_compact
from .models import MODELS, Conv, Inception, MaxPool, ModelSpec, Stage, build_model

WIDTHS = ("n1x1", "n3x3_reduce", "n3x3", "n5x5_reduce", "n5x5", "pool_proj")


def check_wider(source: ModelSpec, target: ModelSpec) -> None:
    """Raise ValueError unless ``target`` is ``source`` with some widths grown (none shrunk, none
    added or dropped), an average-pooled top and no factorized convolution."""
    if source.fc_hidden or target.fc_hidden:
        raise ValueError("only layouts that average-pool their final map can be widened")
    names = ([s.name for s in source.stages], [s.name for s in target.stages])
    if names[0] != names[1]:
        raise ValueError(f"{target.name} has other stages than {source.name}")
    for old, new in zip(source.stages, target.stages, strict=True):
        if type(old) is not type(new) or (isinstance(old, Conv) and (old.rank or new.rank)):
            raise ValueError(f"{new.name}: {target.name} does not widen {source.name} here (another kind of stage)")
        widths = ("filters",) if isinstance(old, Conv) else WIDTHS if isinstance(old, Inception) else ()
        same = dataclasses.replace(new, **{w: getattr(old, w) for w in widths})
        grown = all(getattr(new, w) >= getattr(old, w) and bool(getattr(new, w)) == bool(getattr(old, w))
                    for w in widths)
        if same != old or not grown:
            raise ValueError(f"{new.name}: {target.name} must keep {source.name}'s stage and only grow its widths")


def widened_model(source: keras.Model, name: str, input_size: int = 0) -> keras.Model:
    """Model ``name`` computing what ``source`` computes (see the module's docstring), at
    ``input_size`` (default: the source's)."""
    check_wider(MODELS[source.name], MODELS[name])
    target = build_model(name, int(source.output_shape[-1]), input_size or int(source.input_shape[1]))
    carry = _Carry(source, target)
    channels = np.arange(int(source.input_shape[-1]))
    width = len(channels)
    for old, new in zip(MODELS[source.name].stages, MODELS[name].stages, strict=True):
        channels, width = carry.stage(old, new, channels, width)
    carry.kernel("embedding_dense", channels)
    return target


class _Carry:
    """Copies ``source``'s weights into ``target``. ``channels`` maps each of a layer's input
    channels in ``source`` to its index in ``target``; ``width`` is the input's width there."""

    def __init__(self, source: keras.Model, target: keras.Model):
        self.source, self.target = source, target

    def kernel(self, name: str, channels: np.ndarray) -> np.ndarray:
        """Conv2D or Dense ``name``: the old filters read the old channels with the trained
        kernel and the new channels with zeros; returns the old filters' indices."""
        trained = self.source.get_layer(name).get_weights()
        weights = self.target.get_layer(name).get_weights()
        filters = trained[0].shape[-1]
        kernel = weights[0]
        kernel[..., :filters] = 0.0
        kernel[..., channels, :filters] = trained[0]
        for fresh, old in zip(weights[1:], trained[1:], strict=True):  # a Dense layer's bias
            fresh[:filters] = old
        self.target.get_layer(name).set_weights(weights)
        return np.arange(filters)

    def conv(self, name: str, channels: np.ndarray) -> np.ndarray:
        """``_conv_bn_act``'s layers: the kernel, then each batch-normalisation vector."""
        filters = self.kernel(name, channels)
        weights = self.target.get_layer(f"{name}_bn").get_weights()
        for fresh, old in zip(weights, self.source.get_layer(f"{name}_bn").get_weights(), strict=True):
            fresh[filters] = old
        self.target.get_layer(f"{name}_bn").set_weights(weights)
        return filters

    def stage(self, old: Stage, new: Stage, channels: np.ndarray, width: int) -> tuple[np.ndarray, int]:
        """The stage's output channels in ``target`` and its width there."""
        if isinstance(new, MaxPool):
            return channels, width
        if isinstance(new, Conv):
            return self.conv(new.name, channels), new.filters
        parts, offset = [], 0
        for branch, size in ((("1x1",), new.n1x1), (("3x3_reduce", "3x3"), new.n3x3),
                             (("5x5_reduce", "5x5"), new.n5x5), (("pool_proj",), new.pool_proj)):
            if not size:
                continue
            inner = channels
            for layer in branch:
                inner = self.conv(f"{new.name}_{layer}", inner)
            parts.append(offset + inner)
            offset += size
        if not new.pool_proj:  # the pooled input passes through unprojected
            parts.append(offset + channels)
            offset += width
        return np.concatenate(parts), offset


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path, help="the trained model: run folder, .keras or compact .npz")
    parser.add_argument("--to", required=True, choices=sorted(MODELS), help="the wider layout")
    parser.add_argument("--input-size", type=int, default=0,
                        help="pixels on a side of the written model (default: the trained model's)")
    parser.add_argument("--out", required=True, type=Path, help="the compact .npz to write")


def run(args: argparse.Namespace) -> int:
    """The ``widen`` command."""
    try:
        source = load_keras_model(args.checkpoint)
        model = widened_model(source, args.to, args.input_size)
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"facenet-train widen: error: {exc}") from None
    path = save_compact(model, args.out)
    print(f"wrote {path}: {model.name}, {model.count_params():,} parameters ({source.name}: "
          f"{source.count_params():,}), the same function")
    return 0
