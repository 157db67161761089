"""LFW through the runtime's own path: the detector finds the face in each full LFW image,
``facenet_edge.align`` crops it, the model embeds it — what a user of the SDK gets, as
opposed to scoring pre-cut crops from a cache.

The face per image follows ``facenet-train preprocess-lfw``'s protocol
(``preprocess.crop_face``): the photo's subject (``facenet_edge.detect.main_face``),
retries on black-padded copies, a centred box when nothing is found, so every pair is
scored. Descriptors are cached per (model, detector) so a second run only scores.
Used by ``facenet-train evaluate --runtime-path``, the converter's card and the
benchmarks (accuracy, peers).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facenet_edge.detect import Detection, create_detector
from facenet_edge.embed import Embedder, l2_normalize
from facenet_edge.io import read_image

from .data import aligner_version
from .lfw import Pair, read_pairs
from .metrics import LfwResult, evaluate_distances
from .preprocess import LFW_CENTRE_FALLBACK, PICK_RULE, CropOptions, crop_face


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
        raise ValueError(f"pairs must be at least {2 * len(folds)} (one matched and one mismatched pair per fold)")
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
    """Our runtime path after detection: the model's crop (size, template, fill), then the interpreter."""

    def describe(images: list[np.ndarray], detections: list[Detection]) -> np.ndarray:
        return embedder.embed(np.stack([embedder.crop(im, d) for im, d in zip(images, detections)]))

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


@dataclass(frozen=True)
class RuntimeLfw:
    """A model's LFW scores through the runtime path, and how each image's face was found."""

    result: LfwResult
    detector: str
    pairs: int
    found: int  # images whose face the detector found directly
    padded: int  # ... after padding
    centre_box: int  # ... nowhere: a centre box stood in

    def card_entry(self) -> dict:
        from .verify import lfw_scores

        return {**lfw_scores(self.result), "detector": self.detector, "pairs": self.pairs, "found": self.found,
                "found_after_padding": self.padded, "centre_box": self.centre_box}


def evaluate_runtime_path(model: str | Path, lfw_dir: str | Path, detector: str = "blazeface",
                          cache_dir: str | Path | None = None, threads: int | None = None) -> RuntimeLfw:
    """LFW 10-fold of the ``.tflite`` at ``model`` on the full LFW images of ``pairs.txt``,
    through ``detector`` -> ``main_face`` -> ``align`` -> ``Embedder``. ``cache_dir``
    keeps the embeddings for a later run (default: none kept)."""
    import tempfile

    lfw = load_lfw(Path(lfw_dir))
    with Embedder.from_path(model, num_threads=threads) as embedder, LfwFaces(detector, threads) as faces, \
            tempfile.TemporaryDirectory(prefix="lfw-embeddings-") as scratch:
        key = f"{Path(model).stem}-{embedder.identity.sha256[:12]}"
        descriptors, outcomes = lfw_embeddings(lfw, faces, key, describe_with(embedder), Path(cache_dir or scratch))
    return RuntimeLfw(lfw_result(lfw, descriptors), detector, len(lfw.pairs), int(np.sum(outcomes == 0)),
                      int(np.sum(outcomes > 0)), int(np.sum(outcomes < 0)))
