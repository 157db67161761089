"""LFW on tightly cropped photos: how much of the aligned crop falls outside the image, and
what that costs in accuracy, for each way of filling it.

Users photograph tightly cropped faces (ID photos, crops from other tools); the aligner's
crop then reaches past the image and ``facenet_edge.align`` fills the rest (``--fills``;
the runtime uses the model card's ``fill``). This script builds a tight LFW once, in
``--tight DIR`` (outside the repository): every LFW pair image cut to ``--factor`` times
the box our default detector finds in it (``main_face``, the protocol of the
runtime-path LFW evaluation), square round the box centre, clipped to the image, saved as
JPEG (quality 95) with LFW's folder layout and a copy of pairs.txt. Full and tight LFW are
then scored through the runtime path (``common.LfwFaces`` -> ``facenet_edge.align`` with
each fill -> ``facenet_edge.Embedder``; 10 folds, thresholds picked on the other 9), per
model; embeddings are cached per (variant, model, fill) in ``--cache``.

    python benchmarks/tight_crops.py --tight /tmp/lfw_tight [--model M.tflite ...] [--factor 1.1]
                                     [--fills replicate,black,grey,reflect] [--pairs N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from common import (
    Describe,
    LfwFaces,
    LfwPairs,
    ModelUnderTest,
    add_common_arguments,
    add_lfw_arguments,
    face_outcomes,
    lfw_embeddings,
    lfw_name,
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

from facenet_edge.align import FILLS, alignment_matrix
from facenet_edge.arguments import name_list
from facenet_edge.detect import DEFAULT_DETECTOR, Detection
from facenet_edge.embed import Embedder, l2_normalize
from facenet_edge.errors import FacenetEdgeError
from facenet_edge.io import read_image
from facenet_train.metrics import LfwResult
from facenet_train.preprocess import LFW_CENTRE_FALLBACK, PICK_RULE, CropOptions

REPO = Path(__file__).resolve().parents[1]
JPEG_QUALITY = 95
MANIFEST = "tight_crops.json"
VARIANTS = ("full", "tight")


# --------------------------------------------------------------------------- the tight LFW


def tight_box(box: np.ndarray, factor: float, shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """(left, top, right, bottom): a square ``factor`` times the box's longer side round
    its centre, clipped to an image of ``shape``."""
    x1, y1, x2, y2 = (float(v) for v in box)
    half = factor * max(x2 - x1, y2 - y1) / 2
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    height, width = shape[:2]
    left, top = max(0, round(cx - half)), max(0, round(cy - half))
    return left, top, min(width, round(cx + half)), min(height, round(cy + half))


def build_tight_lfw(lfw: LfwPairs, faces: LfwFaces, out: Path, factor: float) -> LfwPairs:
    """The tight copy of ``lfw``'s images in ``out`` (made once: images already there with
    the same settings are kept, so a ``--pairs`` run's images serve a full run too)."""
    if out.resolve().is_relative_to(REPO):
        raise FacenetEdgeError(f"--tight {out} is inside the repository: pass a folder outside it, e.g. /tmp/lfw_tight")
    # The boxes depend on the detector and its protocol, not on the aligner (which
    # LfwFaces.protocol also names): an aligner change keeps the tight LFW.
    protocol = f"{faces.name}; {PICK_RULE}; pad retries {CropOptions().pad_retries}; centre {LFW_CENTRE_FALLBACK:.4f}"
    settings = {"source": str(lfw.root.resolve()), "factor": factor, "detector": protocol, "jpeg_quality": JPEG_QUALITY}
    manifest = out / MANIFEST
    boxes: dict[str, list[int]] = {}
    if manifest.is_file():
        previous = json.loads(manifest.read_text())
        made = previous["settings"]
        if made != settings:
            differ = [f"{k} {made.get(k)!r}" for k in settings if made.get(k) != settings[k]]
            raise FacenetEdgeError(f"{out} holds a tight LFW made with {', '.join(differ)}: pass another --tight DIR")
        boxes = previous["boxes"]
    elif out.is_dir() and any(out.iterdir()):
        raise FacenetEdgeError(f"{out} is not empty and holds no {MANIFEST}: pass a new folder as --tight")
    write_json(manifest, {"settings": settings, "boxes": boxes})
    todo = [p for p in lfw.images if lfw_name(p) not in boxes or not (out / lfw_name(p)).is_file()]
    print(f"tight LFW in {out}: {len(lfw.images) - len(todo)} images there, {len(todo)} to cut ...",
          file=sys.stderr, flush=True)
    for path in todo:
        image = read_image(path)
        detection, _ = faces.find(path, image)
        left, top, right, bottom = tight_box(detection.box, factor, image.shape)
        target = out / lfw_name(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.stem}.tmp.jpg")  # the extension picks OpenCV's encoder
        crop = cv2.cvtColor(image[top:bottom, left:right], cv2.COLOR_RGB2BGR)
        if not cv2.imwrite(str(tmp), crop, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]):
            raise FacenetEdgeError(f"cannot write {tmp}")
        os.replace(tmp, target)
        boxes[lfw_name(path)] = [left, top, right, bottom]
    shutil.copyfile(lfw.root / "pairs.txt", out / "pairs.txt")
    write_json(manifest, {"settings": settings, "boxes": boxes})
    return LfwPairs(out, lfw.pairs, lfw.folds)


# --------------------------------------------------------------------------- scoring


def outside_fraction(shape: tuple[int, ...], detection: Detection, size: tuple[int, int], template: str) -> float:
    """The fraction of the aligned crop's pixels that sample outside an image of ``shape``:
    what the fill makes up (bilinear sampling needs both neighbours, so the last half pixel
    counts as outside)."""
    height, width = size
    inverse = cv2.invertAffineTransform(alignment_matrix(detection, size, template=template))
    ys, xs = np.mgrid[0:height, 0:width]
    x, y = (np.stack([xs.ravel(), ys.ravel(), np.ones(xs.size)], axis=1) @ inverse.T).T
    inside = (x >= 0) & (x <= shape[1] - 1) & (y >= 0) & (y <= shape[0] - 1)
    return 1.0 - float(inside.mean())


def found_faces(lfw: LfwPairs, faces: LfwFaces) -> list[tuple[tuple[int, ...], Detection]]:
    """(image shape, our detector's face) per image of ``lfw.images``; ``faces`` keeps the
    detections, so embedding the images afterwards does not detect again."""
    found = []
    for path in lfw.images:
        image = read_image(path)
        found.append((image.shape, faces.find(path, image)[0]))
    return found


def describe_filled(embedder: Embedder, fill: str) -> Describe:
    """``common.describe_with`` with the aligner's ``fill``."""

    def describe(images: list[np.ndarray], detections: list[Detection]) -> np.ndarray:
        return embedder.embed(np.stack([embedder.crop(im, d, fill) for im, d in zip(images, detections)]))

    return describe


@dataclass(frozen=True)
class Tercile:
    """A third of the pairs, by the larger outside fraction of the pair's two images."""

    low: float
    high: float
    pairs: int
    accuracy: float


@dataclass(frozen=True)
class Score:
    """One (model, LFW variant, fill). ``fractions``: per image of the variant, the share of
    the aligned crop outside the image; ``correct``: per pair, whether the threshold of its
    fold (picked on the other folds) got it right; ``outcomes`` as in ``accuracy.py``."""

    model: str
    variant: str
    fill: str
    result: LfwResult
    fractions: np.ndarray
    outcomes: np.ndarray
    pair_fractions: np.ndarray
    correct: np.ndarray

    def terciles(self) -> list[Tercile]:
        # Split by rank, not by value: many pairs share a fraction (0 on full LFW).
        order = np.argsort(self.pair_fractions, kind="stable")
        return [
            Tercile(float(self.pair_fractions[part].min()), float(self.pair_fractions[part].max()), len(part),
                    float(self.correct[part].mean()))
            for part in np.array_split(order, 3)
        ]

    def images(self) -> dict[str, int]:
        return face_outcomes(self.outcomes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "variant": self.variant,
            "fill": self.fill,
            **self.result.scores(),
            "fold_accuracies": self.result.fold_accuracies,
            "outside_fraction_median": float(np.median(self.fractions)),
            "outside_fraction_mean": float(np.mean(self.fractions)),
            "images_with_outside": int(np.sum(self.fractions > 0)),
            "terciles": self.terciles(),
            "images": self.images(),
        }


def score(lfw: LfwPairs, descriptors: np.ndarray, fractions: np.ndarray, outcomes: np.ndarray,
          model: str, variant: str, fill: str) -> Score:
    result = lfw_result(lfw, descriptors)
    first, second = lfw.pair_indices()
    unit = l2_normalize(descriptors)
    distances = np.sum((unit[first] - unit[second]) ** 2, axis=1)  # as lfw_result measures them
    fold = np.concatenate([np.full(len(part), k) for k, part in
                           enumerate(np.array_split(np.arange(len(distances)), lfw.folds))])
    correct = (distances < result.fold_thresholds[fold]) == lfw.issame
    return Score(model, variant, fill, result, fractions, outcomes,
                 np.maximum(fractions[first], fractions[second]), correct)


def score_all(models: Sequence[ModelUnderTest], variants: dict[str, LfwPairs], faces: LfwFaces,
              fills: Sequence[str], args: argparse.Namespace) -> list[Score]:
    cache = args.cache or args.out / "cache"
    scores = []
    for variant, lfw in variants.items():
        print(f"{variant} LFW: detecting ...", file=sys.stderr, flush=True)
        found = found_faces(lfw, faces)
        for model in models:
            with Embedder.from_path(model.path, num_threads=args.threads) as embedder:
                size, template = embedder.input_size, embedder.card.alignment
                fractions = np.array([outside_fraction(shape, d, size, template) for shape, d in found])
                for fill in fills:
                    print(f"{variant} LFW: {model.label} / {fill} ...", file=sys.stderr, flush=True)
                    # The variant is in the key: both variants name their images alike.
                    key = f"{variant}-{model.label}-{embedder.identity.sha256[:12]}-{fill}"
                    descriptors, outcomes = lfw_embeddings(lfw, faces, key, describe_filled(embedder, fill), cache)
                    scores.append(score(lfw, descriptors, fractions, outcomes, model.label, variant, fill))
    return scores


# --------------------------------------------------------------------------- report


def print_tables(scores: Sequence[Score], lfw: LfwPairs, factor: float) -> None:
    print(f"\n## LFW full vs tight ({factor:g} x the detector's box), {len(lfw.pairs)} pairs in {lfw.folds} folds, "
          f"{len(lfw.images)} images, through the runtime path\n")
    by_key = {(s.model, s.variant, s.fill): s for s in scores}
    headers = ["model", "fill", "full LFW", "VAL @ FAR 1e-3 (full)", "tight LFW", "VAL @ FAR 1e-3 (tight)",
               "tight - full"]
    rows = []
    for model, _, fill in [k for k in by_key if k[1] == "full"]:
        full, tight = by_key[(model, "full", fill)].result, by_key[(model, "tight", fill)].result
        rows.append([model, fill, f"{100 * full.accuracy_mean:.2f} ± {100 * full.accuracy_std:.2f} %",
                     f"{100 * full.val_mean:.1f} ± {100 * full.val_std:.1f} %",
                     f"{100 * tight.accuracy_mean:.2f} ± {100 * tight.accuracy_std:.2f} %",
                     f"{100 * tight.val_mean:.1f} ± {100 * tight.val_std:.1f} %",
                     f"{100 * (tight.accuracy_mean - full.accuracy_mean):+.2f}"])
    print(markdown_table(headers, rows))

    print("\n## Share of the aligned crop outside the image, per image\n")
    headers = ["model", "LFW", "median", "mean", "images with any outside", "faces found / after padding / centre box"]
    rows = []
    for s in scores:
        if s.fill == scores[0].fill:  # fractions and detections do not depend on the fill
            found = s.images()
            rows.append([s.model, s.variant, f"{100 * np.median(s.fractions):.1f} %",
                         f"{100 * np.mean(s.fractions):.1f} %",
                         f"{int(np.sum(s.fractions > 0))} / {len(s.fractions)}",
                         f"{found['found']} / {found['found_after_padding']} / {found['centre_box']}"])
    print(markdown_table(headers, rows))

    tight = [s for s in scores if s.variant == "tight"]
    print("\n## Tight LFW accuracy per tercile of the outside share (the pair's larger one)\n")
    ranges = [f"{100 * t.low:.0f}-{100 * t.high:.0f} % outside" for t in tight[0].terciles()]
    rows = [[s.model, s.fill] + [f"{100 * t.accuracy:.2f} %" for t in s.terciles()] for s in tight]
    print(markdown_table(["model", "fill", *ranges], rows))
    print("\nEach pair is scored with its fold's threshold (picked on the other 9 folds); terciles hold a third "
          "of the pairs each; the ranges are the first model's.")


def run(args: argparse.Namespace) -> int:
    full = require_lfw(args)
    if args.factor <= 0:
        raise FacenetEdgeError(f"--factor must be positive, got {args.factor}")
    models = models_under_test(args.model)
    machine = machine_info([args.threads] if args.threads else None)
    print("# facenet-edge LFW on tight crops\n")
    print(machine_line(machine))
    with LfwFaces(DEFAULT_DETECTOR, args.threads) as faces:
        tight = build_tight_lfw(full, faces, args.tight, args.factor)
        scores = score_all(models, {"full": full, "tight": tight}, faces, args.fills, args)
    print_tables(scores, full, args.factor)
    config = {
        "lfw": args.lfw,
        "tight": args.tight,
        "factor": args.factor,
        "jpeg_quality": JPEG_QUALITY,
        "detector": DEFAULT_DETECTOR,
        "pairs": len(full.pairs),
        "images": len(full.images),
        "models": [{"label": m.label, "path": m.path, "target": m.target} for m in models],
        "fills": list(args.fills),
        "threads": args.threads,
    }
    results = {"scores": [s.to_dict() for s in scores]}
    path = write_json(args.out / "tight_crops.json", report("tight_crops", machine, config, results, []))
    print(f"\nwrote {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tight_crops", description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, several_models=True)
    add_lfw_arguments(parser)
    parser.add_argument("--tight", type=Path, required=True, metavar="DIR",
                        help="where the tight LFW is built once and reused (outside the repository)")
    parser.add_argument("--factor", type=float, default=1.1, metavar="F",
                        help="tight crop side / the detector's box side (default: %(default)s)")
    parser.add_argument("--fills", type=name_list(list(FILLS)), default=tuple(FILLS), metavar="NAME,NAME",
                        help=f"how the aligner fills what is outside the image (default: {','.join(FILLS)})")
    parser.add_argument("--threads", type=int, metavar="N", help="interpreter threads (default: the runtime's)")
    return run_script(parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
