"""LFW for open-set identification: every LFW image through the runtime path, split by
identity into two halves that never share a person.

* The **calibration** half gives the model card its impostor distance distribution
  (``card.extra["impostor"]``, read by ``facenet_edge.fpir``), from which a gallery derives
  its threshold for a target FPIR.
* The **evaluation** half is all that ``benchmarks/openset.py`` enrols and probes, so the
  thresholds it checks were not fitted on its own faces.

A person's half is fixed by their name's SHA-256 (first byte even: evaluation), so it
does not depend on the LFW copy's file order or on which images exist.

``facenet-train calibrate-openset --model M.tflite --lfw DIR`` writes the entry into the
card beside ``M.tflite``; ``facenet-train convert --lfw DIR`` writes it too.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from facenet_edge.card import ModelCard, card_path_for
from facenet_edge.detect import DEFAULT_DETECTOR
from facenet_edge.embed import Embedder
from facenet_edge.fpir import DistributionError, ImpostorDistribution, impostor_pairs

from .evaluation import LfwFaces, describe_with, lfw_embeddings

CALIBRATION = "calibration"
EVALUATION = "evaluation"
SPLIT_RULE = "LFW identities whose name's SHA-256 starts with an odd byte"


def half_of(name: str) -> str:
    """Which half of LFW a person belongs to."""
    return CALIBRATION if hashlib.sha256(name.encode("utf-8")).digest()[0] % 2 else EVALUATION


@dataclass(frozen=True)
class LfwImages:
    """Every LFW image (``root/<name>/<name>_NNNN.jpg``), sorted; ``names``: each one's person."""

    root: Path
    images: list[Path]

    @property
    def names(self) -> np.ndarray:
        return np.array([path.parent.name for path in self.images])

    def half(self, which: str) -> np.ndarray:
        """Mask of the images whose person is in half ``which``."""
        return np.array([half_of(name) == which for name in self.names], dtype=bool)


def lfw_images(root: Path) -> LfwImages:
    """The LFW folder's images; ValueError when it holds none."""
    images = sorted(Path(root).glob("*/*.jpg"))
    if not images:
        raise ValueError(f"no LFW images (<name>/<name>_NNNN.jpg) in {root}")
    return LfwImages(Path(root), images)


@dataclass(frozen=True)
class OpensetEmbeddings:
    """Unit descriptors of ``lfw.images`` through the runtime path, from model ``key``."""

    lfw: LfwImages
    embeddings: np.ndarray
    key: str


def runtime_embeddings(
    model: Path, lfw: LfwImages, cache_dir: Path, detector: str = DEFAULT_DETECTOR, threads: int | None = None
) -> OpensetEmbeddings:
    """Every image's descriptor: detector -> the subject's face -> aligner -> model, cached
    in ``cache_dir`` per (model, detector) so a second run only reads them."""
    with Embedder.from_path(model, num_threads=threads) as embedder, LfwFaces(detector, threads) as faces:
        key = f"{Path(model).stem}-{embedder.identity.sha256[:12]}"
        descriptors, _ = lfw_embeddings(lfw, faces, key, describe_with(embedder), cache_dir)
    unit = descriptors / np.linalg.norm(descriptors, axis=1, keepdims=True)
    return OpensetEmbeddings(lfw, unit.astype(np.float32), key)


def impostor_distribution(
    model: Path, lfw_dir: Path, cache_dir: Path | None = None, detector: str = DEFAULT_DETECTOR
) -> ImpostorDistribution:
    """The impostor distance distribution of ``model`` on the calibration half: every pair
    of its images of two different people, through the runtime path, each person counting
    once. ``cache_dir`` keeps the embeddings for a later run (default: none kept)."""
    lfw = lfw_images(lfw_dir)
    half = LfwImages(lfw.root, [path for path, keep in zip(lfw.images, lfw.half(CALIBRATION)) if keep])
    if len(set(half.names)) < 2:
        raise DistributionError(f"LFW's calibration half in {lfw_dir} has fewer than two people")
    with contextlib.ExitStack() as stack:
        if cache_dir is None:
            cache_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="openset-embeddings-")))
        embedded = runtime_embeddings(model, half, cache_dir, detector)
    names = half.names
    source = (
        f"LFW calibration half ({SPLIT_RULE}): {len(half.images)} images of {len(set(names))} people "
        f"through the runtime path ({detector}), each person weighing the same; never probed by benchmarks/openset.py"
    )
    pairs = impostor_pairs(embedded.embeddings, names)
    return ImpostorDistribution.of(pairs.distances, source, pairs.weights)


def write_card_entry(model: Path, key: str, entry: dict) -> Path:
    """Set ``extra[key]`` in the card beside ``model``; every other byte of its JSON is
    kept as it was (fields this version does not know included). The result is checked
    as a card before it replaces the file. Returns the card's path."""
    path = card_path_for(model)
    ModelCard.load(path)  # a clear error for a missing or broken card
    data = json.loads(path.read_text())
    data["extra"] = {**data.get("extra", {}), key: entry}
    ModelCard.from_dict(data)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="the .tflite whose card (beside it) gets the entry")
    parser.add_argument("--lfw", type=Path, required=True, help="LFW folder (one folder of images per person)")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/openset"),
                        help="embedding cache (default: /tmp/openset)")
    parser.add_argument("--detector", default=DEFAULT_DETECTOR, help=f"detector backend (default: {DEFAULT_DETECTOR})")


def run(args: argparse.Namespace) -> int:
    """The ``calibrate-openset`` command."""
    distribution = impostor_distribution(args.model, args.lfw, args.cache, args.detector)
    write_card_entry(args.model, "impostor", distribution.to_dict())
    low = distribution.rates[0]
    print(
        f"{card_path_for(args.model)}: impostor distribution of {distribution.pairs} pairs "
        f"(rates {low:g} to {distribution.rates[-1]:g}; distance {distribution.distances[0]:.4f} at {low:g})"
    )
    return 0
