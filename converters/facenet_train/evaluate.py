"""``facenet-train evaluate``: LFW 10-fold verification of a Keras run or a TFLite model.

From aligned crops (a ``preprocess-lfw`` cache, or crops made on the spot with the same
code), or with ``--runtime-path`` through the runtime's detector, aligner and interpreter
on the full images; the scoring itself is ``evaluation``'s.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from facenet_edge.detect import DEFAULT_DETECTOR, DETECTORS

from . import data
from .checkpoint import load_keras_model
from .evaluation import LfwCropPairs, evaluate_runtime_path, keras_embedder, mirror_scores, tflite_embedder
from .metrics import LfwResult, evaluate_distances, failure_sheet, plot_roc
from .preprocess import CropOptions, build_lfw_cache


def add_arguments(parser: argparse.ArgumentParser) -> None:
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", type=Path, help="a run folder or a .keras file")
    which.add_argument("--tflite", type=Path, help="a .tflite model with its card (.json) beside it")
    parser.add_argument("--lfw", required=True, type=Path, help="LFW folder (one folder per person, pairs.txt)")
    parser.add_argument("--aligned-cache", type=Path, help="`facenet-train preprocess-lfw` output (default: crop now)")
    parser.add_argument("--runtime-path", action="store_true",
                        help="with --tflite: the full LFW images through the runtime (detector, aligner, "
                             "interpreter), as the model card's `lfw.runtime_path` numbers are measured")
    parser.add_argument("--detector", default=DEFAULT_DETECTOR, choices=sorted(DETECTORS),
                        help="detector for crops made now (without --aligned-cache) or for --runtime-path")
    parser.add_argument("--workers", type=int, default=2, help="processes for crops made now")
    parser.add_argument("--mirror", action="store_true",
                        help="also embed every crop's mirror image: how alike the model describes the two "
                             "(mean cosine) and LFW with the two averaged (test-time flip)")
    parser.add_argument("--out", type=Path, help="write the scores as JSON")
    parser.add_argument("--roc", type=Path, help="draw the ROC curve (PNG)")
    parser.add_argument("--failures", type=Path,
                        help="contact sheet (PNG) of the worst false rejects and false accepts at the best threshold")


def run(args: argparse.Namespace) -> int:
    if args.runtime_path:
        return _run_runtime_path(args)
    if args.tflite:
        embed, (height, width) = tflite_embedder(args.tflite)
        name = args.tflite.stem
    else:
        model = load_keras_model(args.checkpoint)
        embed, name = keras_embedder(model), args.checkpoint.stem
        height, width = (int(d) for d in model.input_shape[1:3])
    if height != width:
        raise ValueError(f"{name} takes {width}x{height} crops; the aligned crops are square")
    with tempfile.TemporaryDirectory(prefix="lfw-crops-") as scratch:
        cache = args.aligned_cache
        if cache is None:
            cache = Path(scratch)
            options = CropOptions(crop_size=height, detector=args.detector)
            build_lfw_cache(args.lfw, cache, options, workers=args.workers)
        pairs = LfwCropPairs.load(args.lfw, cache, height)
        embeddings = pairs.embeddings(embed)
        distances = pairs.pair_distances(embeddings)
        result = evaluate_distances(distances, pairs.issame)
        mirror = mirror_scores(pairs, embed, embeddings) if args.mirror else None
        fallback = sum(c.get("fallback", 0) for c in data.CacheManifest.load(cache).sources.values())
    print(f"{name}: {result.summary()}")
    if mirror:
        print(f"mirror images: mean cosine to the crop's embedding {mirror.cosine_mean:.4f}; "
              f"the two averaged: {mirror.flip_averaged.summary()}")
    if fallback:
        print(f"({fallback} LFW images had no face found; a centre box stood in)")
    if args.out:
        scores = {"model": str(args.tflite or args.checkpoint), **_scores(result), "centre_fallback_images": fallback}
        if mirror:
            scores["mirror"] = {"cosine_mean": mirror.cosine_mean, "flip_averaged": _scores(mirror.flip_averaged)}
        args.out.write_text(json.dumps(scores, indent=1) + "\n")
    if args.roc:
        plot_roc({name: result}, args.roc)
    if args.failures:
        path, errors = failure_sheet(pairs.crops, pairs.first, pairs.second, distances, pairs.issame,
                                     result.best_threshold, args.failures)
        print(f"{errors['false_rejects']} false rejects and {errors['false_accepts']} false accepts at "
              f"{result.best_threshold:.3f}; the worst are in {path}")
    return 0


def _scores(result: LfwResult) -> dict:
    return {**result.scores(), "fold_accuracies": [float(a) for a in result.fold_accuracies]}


def _run_runtime_path(args: argparse.Namespace) -> int:
    if not args.tflite or args.aligned_cache or args.failures or args.mirror:
        raise ValueError("--runtime-path scores a --tflite model on the full LFW images: "
                         "it takes neither --aligned-cache, --failures nor --mirror")
    run = evaluate_runtime_path(args.tflite, args.lfw, args.detector)
    print(f"{args.tflite.stem} (runtime path, {args.detector}): {run.result.summary()}")
    print(f"faces: {run.found} found, {run.padded} after padding, {run.centre_box} centre boxes")
    if args.out:
        args.out.write_text(json.dumps({"model": str(args.tflite), **_scores(run.result), **run.card_entry()},
                                       indent=1) + "\n")
    if args.roc:
        plot_roc({args.tflite.stem: run.result}, args.roc)
    return 0
