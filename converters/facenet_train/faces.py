"""Aligned faces for calibration and verification, picked across identities.

Two sources: a crop cache (``facenet-train preprocess``: bordered crops whose centre
window is exactly the runtime's aligned crop) or a folder of aligned crops made by
``facenet_edge.align`` (sub-folders name identities; a crop larger than the model input
by an even border on each side is centre-cropped, like the cache's).

Only the picked faces are read: a cache of 80k faces does not have to fit in memory.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from facenet_edge.io import read_image

from . import data
from .augment import centre_crop


@dataclass(frozen=True)
class FaceSet:
    """RGB uint8 crops (N, H, W, 3) of the model's input size, with their identities."""

    crops: np.ndarray
    identities: np.ndarray
    source: str

    def __len__(self) -> int:
        return len(self.crops)

    def take(self, indices: np.ndarray) -> FaceSet:
        return FaceSet(self.crops[indices], self.identities[indices], self.source)

    @property
    def identity_count(self) -> int:
        return len(set(self.identities.tolist()))


def spread_across_identities(identities: list[str], count: int, seed: int = 0) -> np.ndarray:
    """Indices of up to ``count`` faces, one per identity in turn (identities and their
    faces in a seeded random order), so a few hundred faces cover as many people as
    possible instead of the first few folders. Unlabeled faces ("") count as one
    identity each."""
    rng = np.random.default_rng(seed)
    groups: dict[str, list[int]] = defaultdict(list)
    for i, identity in enumerate(identities):
        groups[identity or f"\0{i}"].append(i)
    queues = [list(rng.permutation(g)) for g in groups.values()]
    queues = [queues[i] for i in rng.permutation(len(queues))]
    picked: list[int] = []
    while len(picked) < count and queues:
        queues = [q for q in queues if q]
        for queue in queues:
            if len(picked) == count:
                break
            picked.append(int(queue.pop()))
    return np.array(picked, dtype=np.int64)


def _fit(crop: np.ndarray, size: tuple[int, int], where: str) -> np.ndarray:
    height, width = size
    if crop.shape[:2] == (height, width):
        return crop
    if crop.shape[0] - height != crop.shape[1] - width:
        raise ValueError(
            f"{where}: {crop.shape[1]}x{crop.shape[0]} is not an aligned {width}x{height} crop (plus a border)")
    return centre_crop(crop[None], height)[0]


def _cache_faces(cache_dir: Path, size: tuple[int, int], count: int, seed: int) -> FaceSet:
    manifest = data.CacheManifest.load(cache_dir)
    if not manifest.complete:
        raise ValueError(f"crop cache {cache_dir} is incomplete; finish `facenet-train preprocess` first")
    if manifest.crop_size != size[0] or size[0] != size[1]:
        raise ValueError(
            f"crop cache {cache_dir} holds {manifest.crop_size}px crops; the model takes {size[1]}x{size[0]}")
    identities, where = [], []
    for shard in manifest.shards:
        with np.load(cache_dir / shard) as arrays:  # npz members load lazily: identities only
            names = arrays["identities"].tolist()
        identities.extend(names)
        where.extend((shard, i) for i in range(len(names)))
    picked = spread_across_identities(identities, count, seed)
    by_shard: dict[str, list[int]] = defaultdict(list)
    for k in picked:
        by_shard[where[k][0]].append(int(k))
    crops: dict[int, np.ndarray] = {}
    for shard, ks in by_shard.items():
        with np.load(cache_dir / shard) as arrays:
            shard_crops = arrays["crops"]
        for k in ks:
            crops[k] = centre_crop(shard_crops[where[k][1]][None], size[0])[0]
    return FaceSet(
        np.stack([crops[int(k)] for k in picked]),
        np.array([identities[k] for k in picked], dtype=str),
        f"crop cache {cache_dir}",
    )


def _folder_faces(folder: Path, size: tuple[int, int], count: int, seed: int) -> FaceSet:
    paths: list[Path] = []
    for root, _, files in os.walk(folder):
        paths.extend(Path(root) / f for f in files if Path(f).suffix.lower() in data.IMAGE_EXTENSIONS)
    paths.sort()
    if not paths:
        raise ValueError(f"no images under {folder}")
    identities = ["" if p.parent == folder else str(p.parent.relative_to(folder)) for p in paths]
    picked = spread_across_identities(identities, count, seed)
    crops = np.stack([_fit(read_image(paths[k]), size, str(paths[k])) for k in picked])
    return FaceSet(crops, np.array([identities[k] for k in picked], dtype=str), f"image folder {folder}")


def load_faces(source: str | Path, size: tuple[int, int], count: int, seed: int = 0) -> FaceSet:
    """Up to ``count`` aligned faces of ``size`` (height, width) from a crop cache or a
    folder of aligned crops, spread across identities."""
    source = Path(source)
    if (source / data.MANIFEST_NAME).is_file():
        return _cache_faces(source, size, count, seed)
    if source.is_dir():
        return _folder_faces(source, size, count, seed)
    raise FileNotFoundError(f"face source not found: {source} (a crop cache or a folder of aligned crops)")
