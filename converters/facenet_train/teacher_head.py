"""Start a distillation run inside the teacher's space: refit a trained model's embedding
layer to the teacher by ridge regression on its own penultimate features.

Switching a trained student to a new target space by gradient descent first wrecks what
it knew (measured: 80 steps of triplet + distillation took the interim model from 80.8 %
to 74.3 % on LFW). A linear head fitted in closed form puts the embeddings in the (centred,
unit) teacher space at once (77.97 % on LFW, cosine to the teacher 0.52 on the fitted
faces), and training continues from there.

A student already distilled from this teacher, whose run folder (and so its space: the
teacher's centre and axes) is lost, continues in a space computed again: ``--rotate``
turns its embedding layer by the orthogonal matrix that best maps its embeddings onto
the new targets (orthogonal Procrustes). A rotation changes no distance between
embeddings, so the student's accuracy is kept exactly, and the principal axes recomputed
on other crops, which may come out mixed or sign-flipped, are matched before any step.

    facenet-train teacher-head RUN_OR_WEIGHTS --cache CROP_CACHE --out head.weights.h5 [--rotate]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import keras
import numpy as np
from facenet_edge.embed import l2_normalize, normalise

from . import data
from .augment import centre_crop
from .checkpoint import load_keras_model
from .evaluation import default_card

BATCH = 200


def fit_head(features: np.ndarray, targets: np.ndarray, ridge: float) -> tuple[np.ndarray, np.ndarray]:
    """(kernel, bias) minimising ``|[features, 1] W - unit(targets)|^2 + ridge |W|^2``
    (the bias is regularised too)."""
    x = np.hstack([features, np.ones((len(features), 1))]).astype(np.float64)
    y = targets / np.linalg.norm(targets, axis=1, keepdims=True)
    w = np.linalg.solve(x.T @ x + ridge * np.eye(x.shape[1]), x.T @ y)
    return w[:-1].astype(np.float32), w[-1].astype(np.float32)


def fit_rotation(embeddings: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """The orthogonal ``R`` minimising ``|unit(embeddings) R - unit(targets)|``."""
    u, _, vt = np.linalg.svd(l2_normalize(embeddings).T @ l2_normalize(targets))
    return (u @ vt).astype(np.float32)


def mean_cosine(embeddings: np.ndarray, targets: np.ndarray) -> float:
    return float(np.mean(np.sum(l2_normalize(embeddings) * l2_normalize(targets), axis=1)))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path, help="the trained student: run folder, .keras or compact .npz")
    parser.add_argument("--cache", required=True, type=Path, help="crop cache with teacher descriptors")
    parser.add_argument("--shards", type=int, help="use only the first N shards of the cache (default: all)")
    parser.add_argument("--faces", type=int, default=8000, help="faces to fit on, drawn at random (default 8000)")
    parser.add_argument("--ridge", type=float, default=10.0, help="ridge penalty (default 10)")
    parser.add_argument("--rotate", action="store_true",
                        help="rotate the trained embedding layer onto the teacher instead of refitting it "
                             "(for a student distilled from this teacher before)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, type=Path, help="the student with the new head (.weights.h5)")


def run(args: argparse.Namespace) -> int:
    if not args.out.name.endswith(".weights.h5"):
        raise ValueError(f"--out {args.out}: Keras writes weights to a file named *.weights.h5")
    first = None if args.shards is None else data.CacheManifest.load(args.cache).shards[:args.shards]
    cache = data.load_cache(args.cache, with_teacher=True, shards=first)
    described = np.flatnonzero(np.isfinite(cache.teacher).all(axis=1))
    if len(described) < args.faces:
        raise ValueError(
            f"{args.cache} has {len(described)} faces with teacher descriptors; --faces asks for {args.faces}")
    chosen = np.random.default_rng(args.seed).choice(described, args.faces, replace=False)
    model = load_keras_model(args.checkpoint)
    dense = model.get_layer("embedding_dense")
    penultimate = keras.Model(model.input, dense.input)
    size, card = int(model.input_shape[1]), default_card(model)
    features = np.concatenate([
        penultimate(normalise(centre_crop(cache.crops[chosen[i:i + BATCH]], size).astype(np.float32), card),
                    training=False).numpy()
        for i in range(0, len(chosen), BATCH)
    ])
    size = int(model.output_shape[-1])
    basis = data.teacher_basis(cache.teacher, size) if cache.teacher.shape[1] > size else None
    targets = data.teacher_targets(cache.teacher[chosen], data.teacher_centre(cache.teacher), basis)
    if args.rotate:
        kernel, bias = dense.get_weights()
        trained = features @ kernel + bias
        before = mean_cosine(trained, targets)
        rotation = fit_rotation(trained, targets)
        kernel, bias = kernel @ rotation, bias @ rotation
    else:
        kernel, bias = fit_head(features, targets, args.ridge)
    dense.set_weights([kernel, bias])
    cosine = mean_cosine(features @ kernel + bias, targets)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    model.save_weights(args.out)
    how = f"rotated (mean cosine before {before:.3f})" if args.rotate else "fitted"
    print(f"head {how} on {args.faces} faces: mean cosine to the centred teacher {cosine:.3f}; "
          f"wrote {args.out}")
    return 0
