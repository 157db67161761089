"""What the benchmark scripts share.

The general helpers (machine info, percentiles, Markdown tables, JSON output, targets,
synthetic galleries, test frames, the ``--model/--out/--quick`` arguments) live in
``facenet_edge.bench``, because ``facenet-edge bench`` ships in the wheel and needs them on
a Raspberry Pi; they are re-exported here so every script imports from one place. What
only the scripts need is defined here: which models to compare, and LFW (pairs, our
detector's face per image, embeddings cached per model and detector, 10-fold scores
within one model or across two).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facenet_edge.align import align
from facenet_edge.bench import (
    DEFAULT_OUT,
    MB,
    FaceImage,
    Percentiles,
    Target,
    add_common_arguments,
    bulk_enroll,
    default_lfw,
    face_images,
    fmt,
    machine_info,
    machine_line,
    markdown_table,
    report,
    resolve_model,
    rss_bytes,
    run_script,
    synthetic_embeddings,
    targets_table,
    time_calls,
    write_json,
)
from facenet_edge.card import ModelCard, card_path_for
from facenet_edge.detect import Detection, create_detector
from facenet_edge.embed import Embedder, l2_normalize
from facenet_edge.interpreter import load_interpreter, uses_edgetpu
from facenet_edge.io import read_image
from facenet_train.convert import TARGETS
from facenet_train.lfw import Pair, read_pairs
from facenet_train.metrics import LfwResult, evaluate_distances
from facenet_train.data import aligner_version
from facenet_train.preprocess import LFW_CENTRE_FALLBACK, PICK_RULE, CropOptions, crop_face

__all__ = [
    "DEFAULT_OUT",
    "MB",
    "FaceImage",
    "Percentiles",
    "Target",
    "add_common_arguments",
    "bulk_enroll",
    "default_lfw",
    "face_images",
    "fmt",
    "machine_info",
    "machine_line",
    "markdown_table",
    "report",
    "resolve_model",
    "rss_bytes",
    "run_script",
    "synthetic_embeddings",
    "targets_table",
    "time_calls",
    "write_json",
    "ModelUnderTest",
    "conversions",
    "models_under_test",
    "LfwPairs",
    "load_lfw",
    "LfwFaces",
    "Describe",
    "describe_with",
    "lfw_embeddings",
    "lfw_result",
    "lfw_cross_result",
    "add_lfw_arguments",
]

# --------------------------------------------------------------------------- models


@dataclass(frozen=True)
class ModelUnderTest:
    """An embedding model to measure. ``target``: float32, float16, int8 (from the card's
    quantization entry, else the input tensor's type) or edgetpu."""

    path: Path
    card: ModelCard
    target: str

    @property
    def label(self) -> str:
        return self.path.stem

    @property
    def int8(self) -> bool:
        return self.target in ("int8", "edgetpu")


def conversions(path: Path) -> list[Path]:
    """``path`` and the ``NAME_{float32,float16,int8}.tflite`` beside it (``facenet-train
    convert``'s names) that have a card; just ``path`` when its name has no target suffix."""
    for target in TARGETS:
        suffix = f"_{target}"
        if path.stem.endswith(suffix):
            base = path.stem[: -len(suffix)]
            siblings = [path.with_name(f"{base}_{t}.tflite") for t in TARGETS]
            return [p for p in siblings if p == path or (p.is_file() and card_path_for(p).is_file())]
    return [path]


def models_under_test(paths: Sequence[Path] | None) -> list[ModelUnderTest]:
    """``--model`` paths as given, else the shipped model and its conversions."""
    chosen = list(paths) if paths else conversions(resolve_model(None))
    models = []
    for path in chosen:
        with Embedder.from_path(path) as embedder:
            card = embedder.card
        if uses_edgetpu(path, None):
            target = "edgetpu"
        elif card.quantization.get("target"):
            target = card.quantization["target"]
        else:
            with load_interpreter(path) as interpreter:
                target = "int8" if interpreter.input.quantized else "float32"
        models.append(ModelUnderTest(path, card, target))
    return models


# --------------------------------------------------------------------------- LFW


@dataclass(frozen=True)
class LfwPairs:
    """LFW View 2 pairs, in fold order (``pairs`` may be a subsample, equal per fold)."""

    root: Path
    pairs: list[Pair]
    folds: int

    @property
    def images(self) -> list[Path]:
        """Every image the pairs use, once, sorted."""
        return sorted({p for pair in self.pairs for p in pair.paths(self.root)})

    @property
    def issame(self) -> np.ndarray:
        return np.array([pair.issame for pair in self.pairs])

    def pair_indices(self) -> tuple[np.ndarray, np.ndarray]:
        """Each pair's first and second image as rows of ``images``."""
        row = {path: i for i, path in enumerate(self.images)}
        first, second = zip(*(tuple(row[p] for p in pair.paths(self.root)) for pair in self.pairs))
        return np.array(first), np.array(second)


def load_lfw(root: Path, pairs: int | None = None) -> LfwPairs:
    """``root/pairs.txt``; with ``pairs``, that many pairs spread evenly over every fold,
    half matched and half mismatched (so the 10-fold protocol still applies)."""
    folds = read_pairs(root / "pairs.txt")
    if pairs is None:
        return LfwPairs(root, [p for fold in folds for p in fold], len(folds))
    per_half = pairs // (2 * len(folds))
    if per_half < 1:
        raise SystemExit(f"--pairs must be at least {2 * len(folds)} (one matched and one mismatched pair per fold)")
    chosen = []
    for fold in folds:
        half = len(fold) // 2
        picks = np.unique(np.linspace(0, half - 1, min(per_half, half)).round().astype(int))
        chosen += [fold[i] for i in picks] + [fold[half + i] for i in picks]
    return LfwPairs(root, chosen, len(folds))


class LfwFaces:
    """Our detector's face in each LFW image, found once per run, with the protocol of
    ``facenet-train preprocess-lfw`` (``facenet_train.preprocess.crop_face``): the most
    subject covering the image centre (else the largest, most central face), retries on black-padded copies, a centred box when nothing is
    found, so every pair is scored. ``outcome``: 0 found, > 0 found after padding by
    that many pixels, -1 centre box."""

    def __init__(self, detector: str, threads: int | None = None) -> None:
        self.name = detector
        self._detector = create_detector(detector, num_threads=threads)
        # crop_face aligns a crop as well; only its detection is used here (each model aligns to its own size).
        self._options = CropOptions(border=0, detector=detector, centre_fallback=LFW_CENTRE_FALLBACK)
        self._found: dict[Path, tuple[Detection, int]] = {}

    @property
    def protocol(self) -> str:
        """Recorded in the embedding cache: a change of aligner or protocol invalidates it."""
        return (f"{aligner_version()}; {self.name}; {PICK_RULE}; pad retries {self._options.pad_retries}; "
                f"centre {LFW_CENTRE_FALLBACK:.4f}")

    def find(self, path: Path, image: np.ndarray) -> tuple[Detection, int]:
        if path not in self._found:
            result = crop_face(self._detector, image, self._options)
            self._found[path] = (result.detection, result.pad)
        return self._found[path]

    def close(self) -> None:
        self._detector.close()

    def __enter__(self) -> LfwFaces:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# Images and our detector's faces in them -> (N, D) descriptors.
Describe = Callable[[list[np.ndarray], list[Detection]], np.ndarray]


def describe_with(embedder: Embedder) -> Describe:
    """Our runtime path after detection: the aligner (the model's size and template), then the interpreter."""
    size, template = embedder.input_size, embedder.card.alignment

    def describe(images: list[np.ndarray], detections: list[Detection]) -> np.ndarray:
        return embedder.embed(np.stack([align(im, d, size, template=template) for im, d in zip(images, detections)]))

    return describe


def lfw_embeddings(
    lfw: LfwPairs, faces: LfwFaces, key: str, describe: Describe, cache_dir: Path, batch: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """(descriptor per image of ``lfw.images``, detection outcome per image). Each image is
    described once per (model ``key``, detector): results are kept in
    ``cache_dir/lfw-KEY-DETECTOR.npz`` and only images missing from it are computed."""
    cache = cache_dir / f"lfw-{key}-{faces.name}.npz"
    known: dict[str, tuple[np.ndarray, int]] = {}
    if cache.is_file():
        with np.load(cache) as data:
            if str(data["protocol"]) == faces.protocol:
                known = {
                    p: (e, int(o)) for p, e, o in zip(data["paths"].tolist(), data["embeddings"], data["outcomes"])
                }
    names = ["/".join(path.parts[-2:]) for path in lfw.images]
    missing = [(name, path) for name, path in zip(names, lfw.images) if name not in known]
    for start in range(0, len(missing), batch):
        chunk = missing[start : start + batch]
        images = [read_image(path) for _, path in chunk]
        found = [faces.find(path, image) for (_, path), image in zip(chunk, images)]
        descriptors = describe(images, [detection for detection, _ in found])
        for (name, _), descriptor, (_, outcome) in zip(chunk, descriptors, found):
            known[name] = (np.asarray(descriptor, np.float32), outcome)
    if missing:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.tmp")
        with open(tmp, "wb") as f:
            np.savez(
                f,
                protocol=np.array(faces.protocol),
                paths=np.array(list(known)),
                embeddings=np.stack([e for e, _ in known.values()]),
                outcomes=np.array([o for _, o in known.values()]),
            )
        os.replace(tmp, cache)
    return np.stack([known[n][0] for n in names]), np.array([known[n][1] for n in names])


def lfw_result(lfw: LfwPairs, descriptors: np.ndarray) -> LfwResult:
    """10-fold LFW scores of squared L2 distances between unit descriptors (dlib's are
    not unit length; ours already are)."""
    return lfw_cross_result(lfw, descriptors, descriptors)


def lfw_cross_result(lfw: LfwPairs, gallery: np.ndarray, probes: np.ndarray) -> LfwResult:
    """10-fold LFW scores across two models: each pair's first image as ``gallery``
    describes it against its second as ``probes`` does (descriptors per image of
    ``lfw.images``, scaled to unit length here), squared L2."""
    if gallery.shape != probes.shape:
        raise ValueError(f"gallery descriptors {gallery.shape} and probe descriptors {probes.shape} differ in shape")
    first, second = lfw.pair_indices()
    distances = np.sum((l2_normalize(gallery)[first] - l2_normalize(probes)[second]) ** 2, axis=1)
    return evaluate_distances(distances, lfw.issame, n_folds=lfw.folds)


def add_lfw_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--lfw",
        type=Path,
        default=default_lfw(),
        metavar="DIR",
        help="LFW folder with pairs.txt (default: ../shared/data/lfw)",
    )
    parser.add_argument(
        "--pairs", type=int, metavar="N", help="score N pairs spread over the 10 folds (default: all 6000)"
    )
    parser.add_argument("--cache", type=Path, metavar="DIR", help="LFW embedding cache (default: OUT/cache)")
