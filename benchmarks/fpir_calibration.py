"""Which impostor pairs should calibrate a threshold for a target FPIR: every image pair
counting the same, or each person once (a pair of people ``a`` and ``b`` weighing
``1 / (n_a * n_b)``, ``facenet_edge.fpir.impostor_pairs``)?

Counting image pairs lets the few LFW people with hundreds of photos set the distribution's
tail; a gallery enrols each person with a few photos and each stranger is one attempt. This
calibrates both ways on one half of LFW (``facenet_train.openset_lfw``: people split by
name) and measures random galleries drawn from the other half, then the swap:

* gallery people: the measured half's people with at least ``--min-images`` (K) photos;
  strangers: every photo of its people with fewer than K, never enrolled;
* per (N, E), N in 10, 100, all and E in 1, 3: random galleries of N people (without
  replacement) with E random photos each; each stranger's nearest distance to a gallery's
  samples (squared L2) is one attempt;
* per target FPIR and weighting: the threshold ``threshold_for_fpir`` derives for N * E
  samples (interpolated and extrapolated as a ``Gallery`` does), the strangers within it
  (false positives), and measured / target.

Every image goes detector -> the subject's face -> aligner -> model once
(``runtime_embeddings``, cached in ``--cache``). Seeded: the same arguments give the same
galleries.

    python benchmarks/fpir_calibration.py [--model M_int8.tflite] [--galleries-scale 1]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from common import (
    default_lfw,
    machine_info,
    machine_line,
    markdown_table,
    report,
    resolve_model,
    run_script,
    write_json,
)
from openset import split_people

from facenet_edge.arguments import positive_int
from facenet_edge.detect import DEFAULT_DETECTOR
from facenet_edge.errors import FacenetEdgeError
from facenet_edge.fpir import ImpostorDistribution, impostor_pairs, threshold_for_fpir
from facenet_train.openset_lfw import CALIBRATION, EVALUATION, lfw_images, runtime_embeddings

TARGETS = (1e-3, 1e-2)
ENROLS = (1, 3)
# Gallery size in people (0: all of the measured half's) -> random galleries drawn.
GALLERIES = {10: 200, 100: 40, 0: 15}
IMAGE_PAIRS = "image pairs"
EACH_PERSON_ONCE = "each person once"
# (calibrated on, measured on)
DIRECTIONS = ((CALIBRATION, EVALUATION), (EVALUATION, CALIBRATION))


@dataclass(frozen=True)
class MeasuredHalf:
    """Who can be enrolled (``people``: rows of each one's images, in name order) and who
    probes as a stranger (``strangers``: rows), from the measured half."""

    people: list[np.ndarray]
    strangers: np.ndarray


@dataclass(frozen=True)
class Row:
    direction: str
    weighting: str
    size: int
    enrol: int
    target: float
    threshold: float
    extrapolated: bool
    false_positives: int
    attempts: int
    ratio: float  # measured FPIR / target


def measured_half(names: np.ndarray, rows: np.ndarray, min_images: int) -> MeasuredHalf:
    """Split ``rows`` (one half's images, ``names[rows]`` their people) as the open-set
    benchmark does (``openset.split_people``), gallery people as a list to draw from."""
    split = split_people(names, rows, min_images)
    return MeasuredHalf(list(split.people.values()), split.nonmated)


def distributions(embeddings: np.ndarray, names: np.ndarray, source: str) -> dict[str, ImpostorDistribution]:
    """The impostor distribution of ``embeddings`` under each weighting."""
    pairs = impostor_pairs(embeddings, names)
    return {
        IMAGE_PAIRS: ImpostorDistribution.of(pairs.distances, source),
        EACH_PERSON_ONCE: ImpostorDistribution.of(pairs.distances, source, pairs.weights),
    }


def nearest_distances(
    embeddings: np.ndarray, half: MeasuredHalf, size: int, enrol: int, galleries: int, rng: np.random.Generator
) -> np.ndarray:
    """Every stranger's squared-L2 distance to its nearest sample, over ``galleries`` random
    galleries of ``size`` people with ``enrol`` random photos each (one attempt per entry)."""
    strangers = embeddings[half.strangers]
    nearest = []
    for _ in range(galleries):
        chosen = rng.choice(len(half.people), size, replace=False)
        samples = np.concatenate([rng.permutation(half.people[c])[:enrol] for c in chosen])
        distance = np.clip(2.0 - 2.0 * strangers @ embeddings[samples].T, 0.0, 4.0)
        nearest.append(distance.min(axis=1))
    return np.concatenate(nearest)


def score(
    nearest: np.ndarray, distribution: ImpostorDistribution, target: float, samples: int
) -> tuple[float, bool, int]:
    """(the threshold derived for ``target`` at ``samples`` samples, whether it was
    extrapolated, the attempts within it)."""
    derived = threshold_for_fpir(distribution, target, samples)
    return derived.threshold, derived.extrapolated, int(np.sum(nearest <= derived.threshold))


def measure(
    direction: str,
    embeddings: np.ndarray,
    half: MeasuredHalf,
    calibrated: dict[str, ImpostorDistribution],
    galleries: dict[int, int],
    seed: int,
) -> list[Row]:
    """Rows for every (N, E), target and weighting of one direction; ``galleries``: size in
    people (0 for all) -> galleries drawn."""
    rows = []
    for index, (size_or_all, count) in enumerate(galleries.items()):
        size = size_or_all or len(half.people)
        for enrol in ENROLS:
            rng = np.random.default_rng([seed, index, enrol])
            nearest = nearest_distances(embeddings, half, size, enrol, count, rng)
            for target in TARGETS:
                for weighting, distribution in calibrated.items():
                    threshold, extrapolated, false_positives = score(nearest, distribution, target, size * enrol)
                    ratio = false_positives / len(nearest) / target
                    rows.append(Row(direction, weighting, size, enrol, target, threshold, extrapolated,
                                    false_positives, len(nearest), ratio))  # fmt: skip
            print(f"{direction}: N={size} E={enrol}", file=sys.stderr, flush=True)
    return rows


def print_table(rows: list[Row]) -> None:
    print("\n## Thresholds for a target FPIR per attempt, measured on the other half\n")
    headers = ["direction", "weighting", "N", "E", "target FPIR", "threshold", "extrapolated", "false positives",
               "attempts", "measured / target"]  # fmt: skip
    table = [
        [r.direction, r.weighting, r.size, r.enrol, f"{r.target:g}", f"{r.threshold:.4f}",
         "yes" if r.extrapolated else "no", r.false_positives, r.attempts, f"{r.ratio:.2f}"]
        for r in rows
    ]  # fmt: skip
    print(markdown_table(headers, table))


def run(args: argparse.Namespace) -> int:
    if args.lfw is None or not args.lfw.is_dir():
        raise FacenetEdgeError(f"LFW not found ({args.lfw or '../shared/data/lfw'}): pass --lfw DIR")
    if max(ENROLS) > args.min_images:
        raise FacenetEdgeError(f"--min-images must be at least {max(ENROLS)}: galleries enrol that many photos")
    if args.galleries_scale <= 0:
        raise FacenetEdgeError(f"--galleries-scale must be positive, got {args.galleries_scale}")
    model = resolve_model(args.model)
    galleries = {size: max(1, round(count * args.galleries_scale)) for size, count in GALLERIES.items()}
    machine = machine_info()
    print("# facenet-edge FPIR calibration: impostor pair weighting\n")
    print(machine_line(machine))
    started = time.monotonic()
    lfw = lfw_images(args.lfw)
    embeddings = runtime_embeddings(model, lfw, args.cache, DEFAULT_DETECTOR).embeddings
    names = lfw.names
    rows, halves = [], {}
    for calibration, measured in DIRECTIONS:
        fit = lfw.half(calibration)
        source = f"LFW {calibration} half: {int(fit.sum())} images"
        calibrated = distributions(embeddings[fit], names[fit], source)
        half = measured_half(names, np.flatnonzero(lfw.half(measured)), args.min_images)
        if any(size > len(half.people) for size in galleries):
            raise FacenetEdgeError(
                f"the {measured} half has {len(half.people)} people with {args.min_images} photos: fewer than "
                f"the largest gallery ({max(galleries)})"
            )
        halves[measured] = {"gallery_people": len(half.people), "strangers": len(half.strangers)}
        rows += measure(f"{calibration} -> {measured}", embeddings, half, calibrated, galleries, args.seed)
    elapsed = time.monotonic() - started
    print_table(rows)
    print(f"\n{len(lfw.images)} images embedded or read from the cache; {elapsed:.0f} s in all")
    config = {
        "model": model,
        "detector": DEFAULT_DETECTOR,
        "min_images": args.min_images,
        "halves": halves,
        "galleries": {str(size or "all"): count for size, count in galleries.items()},
        "enrol": list(ENROLS),
        "targets": list(TARGETS),
        "seed": args.seed,
    }
    results = {"rows": [asdict(r) for r in rows], "seconds": elapsed}
    path = write_json(args.out / "fpir_calibration.json", report("fpir_calibration", machine, config, results, []))
    print(f"\nwrote {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fpir_calibration", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, metavar="PATH",
                        help="embedding model .tflite with its card beside it (default: the shipped model)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/fpir_calibration"), metavar="DIR",
                        help="where fpir_calibration.json goes (default: %(default)s)")
    parser.add_argument("--lfw", type=Path, default=default_lfw(), metavar="DIR",
                        help="LFW folder, one folder of images per person (default: ../shared/data/lfw)")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/openset/cache"), metavar="DIR",
                        help="embedding cache (default: %(default)s)")
    parser.add_argument("--min-images", type=positive_int, default=4, metavar="K",
                        help="people with at least K photos can be enrolled, the others are strangers (default: 4)")
    parser.add_argument("--galleries-scale", type=float, default=1.0, metavar="X",
                        help="draw X times the default galleries (200, 40 and 15 for N = 10, 100 and all)")
    parser.add_argument("--seed", type=int, default=0)
    return run_script(parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
