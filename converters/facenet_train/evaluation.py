"""LFW scoring of a model: the 10-fold protocol (``metrics``) on LFW's pairs (``lfw``), two ways.

- From aligned crops (:class:`LfwCropPairs`, a ``preprocess-lfw`` cache matched to the
  pairs): what ``train.eval_every``, ``facenet-train evaluate`` and the converter's
  Keras-vs-TFLite check score. Keras and TFLite models embed through the same functions,
  which preprocess exactly as the runtime does (``facenet_edge.embed.normalise``).
- Through the runtime's own path (:func:`evaluate_runtime_path`): the detector finds the
  face in each full LFW image, the model's crop is cut from it, the model embeds it —
  what a user of the SDK gets. The face per image follows ``facenet-train preprocess-lfw``'s
  protocol (``preprocess.crop_face``): the photo's subject (``facenet_edge.detect.main_face``),
  retries on black-padded copies, a centred box when nothing is found, so every pair is
  scored. Descriptors are cached per (model, detector) so a second run only scores. Used by
  ``facenet-train evaluate --runtime-path``, the converter's card and the benchmarks
  (accuracy, peers).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from facenet_edge.card import ModelCard, card_path_for
from facenet_edge.detect import Detection, create_detector
from facenet_edge.embed import Embedder, l2_normalize, normalise
from facenet_edge.io import read_image

from . import data
from .augment import centre_crop
from .lfw import LfwPairs, load_lfw
from .metrics import LfwResult, evaluate_distances
from .preprocess import LFW_CENTRE_FALLBACK, PICK_RULE, CropOptions, crop_face

MODEL_BATCH = 32  # crops per call of a Keras model or the Embedder
LFW_BATCH = 128  # crops per call of an ``Embed`` when scoring LFW pairs

Embed = Callable[[np.ndarray], np.ndarray]
"""RGB uint8 crops (N, H, W, 3) -> (N, D) unit embeddings."""


# ---------------------------------------------------------------- embedding crops


def keras_embeddings(model, crops: np.ndarray, card: ModelCard) -> np.ndarray:
    """Float reference embeddings, preprocessed as the runtime does."""
    parts = [np.asarray(model(normalise(crops[i : i + MODEL_BATCH].astype(np.float32), card), training=False))
             for i in range(0, len(crops), MODEL_BATCH)]
    return l2_normalize(np.concatenate(parts))


def tflite_embeddings(model_path: Path, card: ModelCard, crops: np.ndarray) -> np.ndarray:
    """Embeddings from the runtime's Embedder (its preprocessing, quantization, batching),
    without the card's test-time flip: these check the conversion against the float model."""
    with Embedder.from_path(model_path, card=replace(card, flip_test=False)) as embedder:
        return np.concatenate([embedder.embed(crops[i : i + MODEL_BATCH]) for i in range(0, len(crops), MODEL_BATCH)])


def default_card(model) -> ModelCard:
    """The card a converted model of this run gets by default (its preprocessing)."""
    height, width = (int(d) for d in model.input_shape[1:3])
    return ModelCard(name=model.name, version="0", architecture=model.name, input_height=height, input_width=width,
                     embedding_size=int(model.output_shape[-1]))


def keras_embedder(model) -> Embed:
    card = default_card(model)
    return lambda crops: keras_embeddings(model, crops, card)


def tflite_embedder(path: Path) -> tuple[Embed, tuple[int, int]]:
    """The model's ``Embed`` and its (height, width), from the card beside it."""
    card = ModelCard.load(card_path_for(path))
    return (lambda crops: tflite_embeddings(path, card, crops)), card.input_size


# ---------------------------------------------------------------- LFW from aligned crops


@dataclass(frozen=True)
class LfwCropPairs:
    """LFW's pairs as pre-cut crops (``preprocess-lfw`` cache) plus indices, in ``pairs.txt`` fold order.

    For whole images through the runtime detector, see :func:`evaluate_runtime_path`.
    """

    crops: np.ndarray
    first: np.ndarray
    second: np.ndarray
    issame: np.ndarray
    rows: np.ndarray | None = None  # each crop's row in the cache (``from_cache``): scores rows of the whole cache

    @classmethod
    def load(cls, lfw_dir: str | Path, lfw_cache: str | Path, size: int) -> LfwCropPairs:
        """The pairs of ``lfw_dir`` with their crops from ``lfw_cache``, which must hold
        ``size`` px crops made by the current aligner."""
        manifest = data.CacheManifest.load(lfw_cache)
        data.check_aligner(manifest, lfw_cache)
        if manifest.crop_size != size:
            raise ValueError(f"LFW cache {lfw_cache} holds {manifest.crop_size}px crops, the model takes {size}px; "
                             f"rebuild it with `facenet-train preprocess-lfw --crop-size {size}`")
        return cls.from_cache(lfw_dir, lfw_cache, size)

    @classmethod
    def from_cache(cls, lfw_dir: str | Path, lfw_cache: str | Path, size: int) -> LfwCropPairs:
        """The crops of every image the pairs use (matched to the cache by ``person/file``,
        the last two path parts; centre-cut to ``size``) and each pair's first and second
        crop in them."""
        lfw = load_lfw(lfw_dir)
        cache = data.load_cache(lfw_cache)
        where = {"/".join(Path(p).parts[-2:]): i for i, p in enumerate(cache.paths.tolist())}
        used: dict[int, int] = {}  # cache index -> position in the returned crops
        first, second = [], []
        for pair in lfw.pairs:
            for path, out in zip(pair.paths(lfw.root), (first, second), strict=True):
                key = "/".join(path.parts[-2:])
                if key not in where:
                    raise ValueError(f"{key} is not in the LFW crop cache {lfw_cache}; "
                                     "rebuild it with `facenet-train preprocess-lfw`")
                out.append(used.setdefault(where[key], len(used)))
        rows = np.fromiter(used, dtype=np.int64, count=len(used))
        return cls(centre_crop(cache.crops[rows], size), np.array(first), np.array(second), lfw.issame, rows)

    def embeddings(self, embed: Embed, mirrored: bool = False) -> np.ndarray:
        """Every crop's embedding (of its left-right mirror image with ``mirrored``)."""
        crops = np.ascontiguousarray(self.crops[:, :, ::-1]) if mirrored else self.crops
        return np.concatenate([embed(crops[i:i + LFW_BATCH]) for i in range(0, len(crops), LFW_BATCH)])

    def pair_distances(self, embeddings: np.ndarray) -> np.ndarray:
        """Squared L2 distance of every pair, from every crop's embedding."""
        return np.sum((embeddings[self.first] - embeddings[self.second]) ** 2, axis=1)

    def distances(self, embed: Embed) -> np.ndarray:
        """Squared L2 distance of every pair."""
        return self.pair_distances(self.embeddings(embed))

    def evaluate(self, embed: Embed) -> LfwResult:
        return evaluate_distances(self.distances(embed), self.issame)


@dataclass(frozen=True)
class MirrorScores:
    """How alike a model describes each LFW crop and its mirror image, and LFW with the two
    averaged (test-time flip, at twice the embed time)."""

    cosine_mean: float
    flip_averaged: LfwResult


def mirror_scores(pairs: LfwCropPairs, embed: Embed, embeddings: np.ndarray) -> MirrorScores:
    """``embeddings``: ``pairs.embeddings(embed)``, reused."""
    mirrored = pairs.embeddings(embed, mirrored=True)
    averaged = l2_normalize(embeddings + mirrored)
    return MirrorScores(float(np.mean(np.sum(embeddings * mirrored, axis=1))),
                        evaluate_distances(pairs.pair_distances(averaged), pairs.issame))


# ---------------------------------------------------------------- LFW through the runtime path


class LfwFaces:
    """Our detector's face in each LFW image, found once per run, with the protocol of
    ``facenet-train preprocess-lfw`` (``facenet_train.preprocess.crop_face``): the most
    subject covering the image centre (else the largest, most central face), retries on
    black-padded copies, a centred box when nothing is found, so every pair is scored.
    ``outcome``: 0 found, > 0 found after padding by that many pixels, -1 centre box."""

    def __init__(self, detector: str, threads: int | None = None) -> None:
        self.name = detector
        self._detector = create_detector(detector, num_threads=threads)
        # crop_face aligns a crop as well; only its detection is used here (each model aligns to its own size).
        self._options = CropOptions(border=0, detector=detector, centre_fallback=LFW_CENTRE_FALLBACK)
        self._found: dict[Path, tuple[Detection, int]] = {}

    @property
    def protocol(self) -> str:
        """Recorded in the embedding cache: a change of aligner, detector code or protocol invalidates it."""
        return (f"{data.aligner_version()}; {self.name} ({data.detectors_version()}); {PICK_RULE}; "
                f"pad retries {self._options.pad_retries}; centre {LFW_CENTRE_FALLBACK:.4f}")

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
    # A key may name a model's folder ("v014/m_int8 v0.14.0"): the cache stays one flat file.
    cache = cache_dir / f"lfw-{key.replace('/', '_').replace(os.sep, '_')}-{faces.name}.npz"
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
        return {**self.result.scores(), "detector": self.detector, "pairs": self.pairs, "found": self.found,
                "found_after_padding": self.padded, "centre_box": self.centre_box}


def evaluate_runtime_path(model: str | Path, lfw_dir: str | Path, detector: str = "blazeface",
                          cache_dir: str | Path | None = None, threads: int | None = None) -> RuntimeLfw:
    """LFW 10-fold of the ``.tflite`` at ``model`` on the full LFW images of ``pairs.txt``,
    through ``detector`` -> ``main_face`` -> ``align`` -> ``Embedder``. ``cache_dir``
    keeps the embeddings for a later run (default: none kept)."""
    lfw = load_lfw(Path(lfw_dir))
    with Embedder.from_path(model, num_threads=threads) as embedder, LfwFaces(detector, threads) as faces, \
            tempfile.TemporaryDirectory(prefix="lfw-embeddings-") as scratch:
        key = f"{Path(model).stem}-{embedder.identity.sha256[:12]}"
        descriptors, outcomes = lfw_embeddings(lfw, faces, key, describe_with(embedder), Path(cache_dir or scratch))
    return RuntimeLfw(lfw_result(lfw, descriptors), detector, len(lfw.pairs), int(np.sum(outcomes == 0)),
                      int(np.sum(outcomes > 0)), int(np.sum(outcomes < 0)))
