"""LFW 10-fold verification accuracy through the runtime path, per model conversion and per
detector backend, with every ROC curve in one PNG.

Each LFW image goes detector -> aligner -> interpreter: our detector (``--detectors``) with
``facenet-train preprocess-lfw``'s protocol (``common.LfwFaces``), ``facenet_edge.align`` to
the model's input, the model through ``facenet_edge.Embedder``. Scores come from
``facenet_train.metrics`` (the converter's LFW numbers use the same code). Each image is
embedded once per (model, detector) and cached (``--cache``), so a second run only scores.
With several models, each is also compared with the first on the same folds (paired): the
mean per-fold accuracy difference with its standard error and the folds it wins and loses,
which resolves a smaller difference than the two models' fold spreads do.

    python benchmarks/accuracy.py [--model M_float32.tflite --model M_int8.tflite] [--pairs N] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from common import (
    LfwFaces,
    LfwPairs,
    ModelUnderTest,
    add_common_arguments,
    add_lfw_arguments,
    describe_with,
    face_outcomes,
    fmt,
    lfw_embeddings,
    lfw_result,
    machine_info,
    machine_line,
    markdown_table,
    models_under_test,
    report,
    require_lfw,
    run_script,
    write_json,
)

from facenet_edge.arguments import name_list
from facenet_edge.detect import DETECTORS
from facenet_edge.embed import Embedder
from facenet_train.metrics import LfwResult, plot_roc

@dataclass(frozen=True)
class Score:
    """One (model, detector) on LFW. ``outcomes``: per image, 0 face found, > 0 found
    after padding, -1 centre box (nothing found)."""

    model: str
    target: str
    detector: str
    result: LfwResult
    outcomes: np.ndarray

    @property
    def name(self) -> str:
        return f"{self.model} / {self.detector}"

    def images(self) -> dict[str, int]:
        return face_outcomes(self.outcomes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "target": self.target,
            "detector": self.detector,
            **self.result.scores(),
            "fold_accuracies": self.result.fold_accuracies,
            "images": self.images(),
        }


@dataclass(frozen=True)
class Paired:
    """``model`` against ``baseline`` on the same folds and detector (accuracy points)."""

    model: str
    baseline: str
    detector: str
    differences: np.ndarray  # per fold, model minus baseline

    @property
    def mean(self) -> float:
        return float(self.differences.mean())

    @property
    def standard_error(self) -> float:
        return float(self.differences.std(ddof=1) / np.sqrt(len(self.differences)))

    @property
    def folds_better(self) -> int:
        return int(np.sum(self.differences > 0))

    @property
    def folds_worse(self) -> int:
        return int(np.sum(self.differences < 0))

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "baseline": self.baseline, "detector": self.detector,
                "fold_differences": self.differences, "mean": self.mean, "standard_error": self.standard_error,
                "folds_better": self.folds_better, "folds_worse": self.folds_worse}


def paired_with_first(scores: Sequence[Score]) -> list[Paired]:
    """Every model after the first against the first, per detector."""
    first: dict[str, Score] = {}
    pairs = []
    for s in scores:
        base = first.setdefault(s.detector, s)
        if base is not s:
            differences = 100 * (s.result.fold_accuracies - base.result.fold_accuracies)
            pairs.append(Paired(s.model, base.model, s.detector, differences))
    return pairs


def score_all(
    models: Sequence[ModelUnderTest], detectors: Sequence[str], lfw: LfwPairs, args: argparse.Namespace
) -> list[Score]:
    cache = args.cache or args.out / "cache"
    scores = []
    for detector in detectors:
        with LfwFaces(detector, args.threads) as faces:
            for model in models:
                print(f"{model.label} / {detector} ...", file=sys.stderr, flush=True)
                with Embedder.from_path(model.path, num_threads=args.threads) as embedder:
                    key = f"{model.label}-{embedder.identity.sha256[:12]}"
                    descriptors, outcomes = lfw_embeddings(lfw, faces, key, describe_with(embedder), cache)
                scores.append(Score(model.label, model.target, detector, lfw_result(lfw, descriptors), outcomes))
    return scores


def print_table(scores: Sequence[Score], lfw: LfwPairs) -> None:
    print(f"\n## LFW, {len(lfw.pairs)} pairs in {lfw.folds} folds, {len(lfw.images)} images\n")
    headers = ["model", "target", "detector", "accuracy %", "VAL % @ FAR 1e-3", "AUC", "EER %", "threshold (best acc.)"]
    headers += ["threshold @ FAR 1e-3", "faces found / after padding / centre box"]
    rows = []
    for s in scores:
        r, found = s.result, s.images()
        rows.append(
            [s.model, s.target, s.detector, f"{100 * r.accuracy_mean:.2f} ± {100 * r.accuracy_std:.2f}"]
            + [f"{100 * r.val_mean:.1f} ± {100 * r.val_std:.1f}", fmt(r.auc, 4), f"{100 * r.eer:.2f}",
               fmt(r.best_threshold, 3)]
            + [fmt(r.threshold_at_far, 3), f"{found['found']} / {found['found_after_padding']} / {found['centre_box']}"]
        )
    print(markdown_table(headers, rows))
    print("\nDistances: squared L2 between unit embeddings; thresholds accept a pair below them.")


def print_paired(pairs: Sequence[Paired]) -> None:
    if not pairs:
        return
    print("\n## Paired with the first model, fold by fold\n")
    headers = ["model", "against", "detector", "accuracy difference (points)", "folds better / worse"]
    rows = [[p.model, p.baseline, p.detector, f"{p.mean:+.2f} ± {p.standard_error:.2f} (s.e.)",
             f"{p.folds_better} / {p.folds_worse}"] for p in pairs]
    print(markdown_table(headers, rows))


def run(args: argparse.Namespace) -> int:
    lfw = require_lfw(args)
    models = models_under_test(args.model)
    detectors = args.detectors or tuple(DETECTORS)
    machine = machine_info([args.threads] if args.threads else None)
    print("# facenet-edge LFW accuracy\n")
    print(machine_line(machine))
    scores = score_all(models, detectors, lfw, args)
    print_table(scores, lfw)
    pairs = paired_with_first(scores)
    print_paired(pairs)
    args.out.mkdir(parents=True, exist_ok=True)
    png = plot_roc({s.name: s.result for s in scores}, args.out / "accuracy_roc.png")
    config = {
        "lfw": args.lfw,
        "pairs": len(lfw.pairs),
        "images": len(lfw.images),
        "models": [{"label": m.label, "path": m.path, "target": m.target} for m in models],
        "detectors": list(detectors),
        "threads": args.threads,
    }
    results = {"scores": [s.to_dict() for s in scores], "paired": [p.to_dict() for p in pairs], "roc_png": png}
    path = write_json(args.out / "accuracy.json", report("accuracy", machine, config, results, []))
    print(f"\nwrote {path} and {png}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="accuracy", description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, several_models=True)
    add_lfw_arguments(parser)
    parser.add_argument(
        "--detectors", type=name_list(sorted(DETECTORS)), metavar="NAME,NAME", help="default: every detector"
    )
    parser.add_argument("--threads", type=int, metavar="N", help="interpreter threads (default: the runtime's)")
    return run_script(parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
