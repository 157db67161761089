"""Carry a trained model's weights into a layout whose k×k convolutions are factorized.

A ``Conv`` stage with ``rank > 0`` (``nn4_small2_sep``'s conv2) is a k×1 convolution with
``rank`` filters followed by a 1×k one. Its kernels are the best rank-``rank`` approximation
of the trained k×k kernel, read as a matrix from (row offset, input channel) to (column
offset, output channel): the truncated SVD, its singular values split evenly between the
two factors. Every other variable is copied unchanged, so training continues from the
trained model instead of starting over.

    facenet-train factorize WEIGHTS.npz --to nn4_small2_sep --out FACTORIZED.npz
"""

from __future__ import annotations

import argparse
from pathlib import Path

import keras
import numpy as np

from .checkpoint import load_keras_model, save_compact
from .models import MODELS, Conv, build_model


def factorize_kernel(kernel: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, float]:
    """``(vertical, horizontal, kept)``: kernels of shape (k, 1, in, rank) and (1, k, rank, out)
    whose composition is the best rank-``rank`` approximation of ``kernel`` (k, k, in, out),
    and the fraction of its squared norm that approximation keeps."""
    k, k2, cin, cout = kernel.shape
    if k != k2:
        raise ValueError(f"a {k}x{k2} kernel is not square")
    matrix = kernel.transpose(0, 2, 1, 3).reshape(k * cin, k * cout)
    u, s, vt = np.linalg.svd(matrix.astype(np.float64), full_matrices=False)
    if rank > len(s):
        raise ValueError(f"rank {rank} exceeds the kernel's {len(s)}")
    root = np.sqrt(s[:rank])
    vertical = (u[:, :rank] * root).reshape(k, cin, rank)[:, None]
    horizontal = (root[:, None] * vt[:rank]).reshape(rank, k, cout).transpose(1, 0, 2)[None]
    return vertical.astype(np.float32), horizontal.astype(np.float32), float(np.sum(s[:rank] ** 2) / np.sum(s ** 2))


def factorized_model(source: keras.Model, name: str, input_size: int = 0) -> tuple[keras.Model, dict[str, float]]:
    """Model ``name`` with ``source``'s weights, its factorized convolutions approximated;
    also the fraction of each factorized kernel's squared norm kept."""
    target = build_model(name, int(source.output_shape[-1]), input_size)
    factorized = {stage.name: stage.rank for stage in MODELS[name].stages if isinstance(stage, Conv) and stage.rank}
    kept = {}
    for layer in target.layers:
        if not layer.weights or layer.name.removesuffix("_vertical") in factorized:
            continue
        layer.set_weights(source.get_layer(layer.name).get_weights())
    for conv, rank in factorized.items():
        vertical, horizontal, kept[conv] = factorize_kernel(source.get_layer(conv).get_weights()[0], rank)
        target.get_layer(f"{conv}_vertical").set_weights([vertical])
        target.get_layer(conv).set_weights([horizontal])
    return target, kept


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path, help="the trained model: run folder, .keras or compact .npz")
    layouts = sorted(n for n, spec in MODELS.items() if any(isinstance(s, Conv) and s.rank for s in spec.stages))
    parser.add_argument("--to", required=True, choices=layouts, help="the factorized layout")
    parser.add_argument("--input-size", type=int, default=0,
                        help="pixels on a side of the written model (default: the layout's own size)")
    parser.add_argument("--out", required=True, type=Path, help="the compact .npz to write")


def run(args: argparse.Namespace) -> int:
    """The ``factorize`` command."""
    try:
        model, kept = factorized_model(load_keras_model(args.checkpoint), args.to, args.input_size)
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"facenet-train factorize: error: {exc}") from None
    path = save_compact(model, args.out)
    print(f"wrote {path}: " + ", ".join(f"{conv} keeps {share:.1%} of its kernel's squared norm"
                                        for conv, share in kept.items()))
    return 0
