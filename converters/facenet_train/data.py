"""Training data: dataset readers, the aligned-crop cache, and the P x K batch sampler.

Readers turn a dataset folder into ``Sample`` records. ``preprocess`` turns samples into
the crop cache (sharded ``.npz`` + ``manifest.json``); training loads the whole cache into
memory (80k faces at 112x112x3 are about 3 GB) and draws batches from it with
``PKSampler``.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from facenet_edge import align, detect
from facenet_edge.files import private_file

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".pgm", ".ppm", ".webp"})

CACHE_VERSION = 1
MANIFEST_NAME = "manifest.json"
FAILURES_NAME = "failures.tsv"


def aligner_version() -> str:
    """A hash of ``facenet_edge.align``'s source: any change to the runtime's cropping
    changes it, so a cache made by another aligner is recognised as such."""
    return f"facenet_edge.align sha256:{hashlib.sha256(Path(align.__file__).read_bytes()).hexdigest()[:12]}"


def detectors_version() -> str:
    """A hash of ``facenet_edge.detect``'s source: a change to any detector's code or
    settings changes it, so LFW embeddings cached with another version are not reused."""
    return f"facenet_edge.detect sha256:{hashlib.sha256(Path(detect.__file__).read_bytes()).hexdigest()[:12]}"


def check_aligner(manifest: CacheManifest, where: str | Path) -> None:
    """Warn when a cache was cropped by another version of the runtime's aligner: its crops
    are no longer exactly what the device makes."""
    current = aligner_version()
    if manifest.aligner != current:
        warnings.warn(f"crop cache {where} was made by {manifest.aligner!r}, the runtime now aligns with "
                      f"{current!r}: rerun preprocess into a new folder so crops match the device's", stacklevel=2)


@dataclass(frozen=True)
class Sample:
    """One image file. ``identity`` is namespaced by source (``pins/pins_Adriana Lima``);
    None for unlabeled images (a flat folder)."""

    path: str
    identity: str | None
    source: str


@dataclass(frozen=True)
class SourceLayout:
    """What we know about a dataset's identities beyond its folder names.

    ``people``: sources with the same value name the same people, so their identities are
    merged into one label (CelebA's numbers in celeba_aligned and celeba_wild; celebrity
    names in pins and glint24). ``name_prefix`` is dropped from a folder to get the name.
    ``unique_file_names``: a file name names one photo across the whole ``people`` group,
    so a second copy (another crop of the same photo) is a duplicate.
    """

    people: str
    name_prefix: str = ""
    unique_file_names: bool = False


KNOWN_SOURCES: dict[str, SourceLayout] = {
    "celeba_aligned": SourceLayout("celeba", unique_file_names=True),
    "celeba_wild": SourceLayout("celeba", unique_file_names=True),
    "pins": SourceLayout("names", name_prefix="pins_"),
    "glint24": SourceLayout("names"),
}


def source_layout(source: str) -> SourceLayout:
    """Layout of a known source; any other source is its own people group."""
    return KNOWN_SOURCES.get(source, SourceLayout(source))


def person_key(identity: str) -> str:
    """The label key of a namespaced identity: identities of the same person in different
    sources map to the same key (``pins/pins_Barack Obama`` and ``glint24/Barack Obama``
    -> ``names/barack_obama``)."""
    source, folder = identity.split("/", 1)
    layout = source_layout(source)
    name = folder[len(layout.name_prefix):] if folder.startswith(layout.name_prefix) else folder
    return f"{layout.people}/{name.strip().replace(' ', '_').lower()}"


def _is_image(entry: os.DirEntry) -> bool:
    return entry.is_file() and Path(entry.name).suffix.lower() in IMAGE_EXTENSIONS


def read_source(root: str | Path, source: str) -> list[Sample]:
    """All images under ``root``: each sub-folder is one identity (``source/folder``);
    images directly in ``root`` are unlabeled. Sorted, so shard contents are reproducible."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {root}")
    samples: list[Sample] = []
    with os.scandir(root) as entries:
        entries = sorted(entries, key=lambda e: e.name)
    for entry in entries:
        if entry.is_dir():
            with os.scandir(entry.path) as files:
                names = sorted(f.name for f in files if _is_image(f))
            identity = f"{source}/{entry.name}"
            samples.extend(Sample(os.path.join(entry.path, n), identity, source) for n in names)
        elif _is_image(entry):
            samples.append(Sample(entry.path, None, source))
    return samples


def read_overlap(path: str | Path) -> set[str]:
    """Identities listed in an overlap file (``datasets.py lfw-overlap``: tab-separated
    ``source, folder, LFW name`` per line) as namespaced identities ``source/folder``."""
    excluded = set()
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split("\t")
        if len(fields) < 2:
            raise ValueError(f"{path}:{number}: expected 'source<TAB>folder<TAB>name', got {line!r}")
        excluded.add(f"{fields[0]}/{fields[1]}")
    return excluded


def exclude_identities(samples: Iterable[Sample], excluded: set[str]) -> list[Sample]:
    """Drop every sample of an excluded person, in every source where that person appears
    (the overlap file lists folders; the same person may sit under another source)."""
    people = {person_key(i) for i in excluded}
    return [s for s in samples if s.identity is None or person_key(s.identity) not in people]


def drop_duplicate_photos(samples: Iterable[Sample]) -> tuple[list[Sample], list[Sample]]:
    """(kept, dropped): second copies of one photo (same person, same file name, in a
    people group whose file names are photo ids). The first source listed wins."""
    seen: set[tuple[str, str]] = set()
    kept, dropped = [], []
    for s in samples:
        if s.identity is not None and source_layout(s.source).unique_file_names:
            key = (person_key(s.identity), os.path.basename(s.path))
            if key in seen:
                dropped.append(s)
                continue
            seen.add(key)
        kept.append(s)
    return kept, dropped


def label_table(samples: Iterable[Sample]) -> list[str]:
    """Sorted person keys: a sample's int label is its person's index here."""
    return sorted({person_key(s.identity) for s in samples if s.identity is not None})


# ---------------------------------------------------------------- the crop cache


@dataclass
class CacheManifest:
    """``manifest.json`` of a crop cache. ``plan`` fingerprints the inputs so a resumed
    preprocess refuses to mix shards from different sample lists or settings."""

    crop_size: int
    border: int
    template: str
    detector: str
    aligner: str
    shard_size: int
    plan: str
    people: list[str]
    shards: list[str]
    sources: dict[str, dict[str, int]] = field(default_factory=dict)
    excluded_identities: list[str] = field(default_factory=list)
    complete: bool = False
    version: int = CACHE_VERSION

    @property
    def full_size(self) -> int:
        """Side of the stored (bordered) crops."""
        return self.crop_size + 2 * self.border

    def save(self, cache_dir: str | Path) -> None:
        path = Path(cache_dir) / MANIFEST_NAME
        with private_file(path, OSError) as f:
            f.write((json.dumps(self.__dict__, indent=1) + "\n").encode())

    @classmethod
    def load(cls, cache_dir: str | Path) -> CacheManifest:
        path = Path(cache_dir) / MANIFEST_NAME
        if not path.is_file():
            raise FileNotFoundError(
                f"no crop cache at {cache_dir} (missing {MANIFEST_NAME}); run `facenet-train preprocess`")
        data = json.loads(path.read_text())
        if data.get("version") != CACHE_VERSION:
            raise ValueError(f"{path}: cache version {data.get('version')}, this code reads {CACHE_VERSION}")
        return cls(**data)


SHARD_ARRAYS = ("crops", "labels", "identities", "sources", "paths", "boxes", "landmarks", "scores", "pads")


@dataclass
class FaceCache:
    """A crop cache in memory. Arrays are aligned on the first axis: ``crops`` uint8
    (N, S, S, 3) with S = crop_size + 2 * border; ``labels`` int32 (-1 = unlabeled);
    ``boxes``/``landmarks`` the detection in original-image pixels (landmarks NaN for
    box-only detectors); ``pads``: pixels of black padding the detector needed (0: none,
    -1: a centre box stood in);
    ``teacher``: (N, D) float32 teacher descriptors (NaN rows: none) or None."""

    manifest: CacheManifest
    crops: np.ndarray
    labels: np.ndarray
    identities: np.ndarray
    sources: np.ndarray
    paths: np.ndarray
    boxes: np.ndarray
    landmarks: np.ndarray
    scores: np.ndarray
    pads: np.ndarray
    teacher: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)


ShardFilter = Callable[[dict[str, np.ndarray]], np.ndarray]
"""A shard's arrays -> boolean mask of the faces to keep."""


def without_people(excluded: set[str]) -> ShardFilter:
    """A ``load_cache`` filter dropping excluded people (see ``exclude_identities``), e.g.
    LFW people before a model is scored on LFW."""
    people = {person_key(i) for i in excluded}
    return lambda shard: np.array([not i or person_key(i) not in people for i in shard["identities"]], dtype=bool)


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.npz"


TEACHER_SIZE = 128  # dlib's face descriptor
# A run's files fixing the student's space (read without TensorFlow, e.g. by benchmarks).
TEACHER_MEAN = "teacher_mean.npy"  # subtracted from the teacher's descriptors (loss.center_teacher)
TEACHER_BASIS = "teacher_basis.npy"  # projects a teacher wider than the student (teacher_basis)


def teacher_centre(teacher: np.ndarray) -> np.ndarray:
    """The mean descriptor over the faces that have one (rows without are NaN)."""
    return teacher[np.isfinite(teacher).all(axis=1)].mean(axis=0).astype(np.float32)


def teacher_basis(teacher: np.ndarray, size: int) -> np.ndarray:
    """(D, size) principal axes of the descriptors of the faces that have one: projects a
    teacher wider than the student (EdgeFace's 512-d) onto the student's embedding size.
    Each axis' sign is fixed (largest loading positive) so the same faces always give the
    same basis, whichever command computes it (``teacher-head`` and ``train``)."""
    finite = teacher[np.isfinite(teacher).all(axis=1)].astype(np.float64)
    _, _, vt = np.linalg.svd(finite - finite.mean(axis=0), full_matrices=False)
    axes = vt[:size]
    axes *= np.sign(axes[np.arange(len(axes)), np.abs(axes).argmax(axis=1)])[:, None]
    return axes.T.astype(np.float32)


def teacher_targets(teacher: np.ndarray, centre: np.ndarray | None, basis: np.ndarray | None) -> np.ndarray:
    """Distillation targets: descriptors minus ``centre``, projected on ``basis`` (each optional)."""
    targets = teacher if centre is None else teacher - centre
    return targets if basis is None else targets @ basis


def teacher_prototypes(targets: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(labels.max() + 1, D): each identity's centre, the mean of its faces' unit-length
    targets (rows without a target, NaN, left out), unit length; all zero for a label with
    no such face (identities left out of the run)."""
    labelled = (labels >= 0) & np.isfinite(targets).all(axis=1)
    unit = targets[labelled] / np.linalg.norm(targets[labelled], axis=1, keepdims=True)
    sums = np.zeros((int(labels.max()) + 1, targets.shape[1]))
    np.add.at(sums, labels[labelled], unit)
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    return np.divide(sums, norms, out=np.zeros_like(sums), where=norms > 0).astype(np.float32)


def teacher_name(shard: str) -> str:
    return shard.replace("shard-", "teacher-").replace(".npz", ".npy")


def write_npz_atomic(path: Path, **arrays: np.ndarray) -> None:
    """Write then rename, so a stopped run never leaves a half shard that looks complete."""
    with private_file(path, OSError) as f:
        np.savez(f, **arrays)


def read_shard(path: str | Path, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """A shard's arrays (only ``names`` when given: an npz member is read only on access)."""
    with np.load(path) as data:
        return {name: data[name] for name in (names or data.files)}


def load_cache(cache_dir: str | Path, with_teacher: bool = False, filters: Sequence[ShardFilter] = (),
               partial_teacher: bool = False, shards: Sequence[str] | None = None) -> FaceCache:
    """Load a complete cache into memory (optionally with the teacher descriptors),
    keeping the faces every filter keeps; filtering shard by shard keeps the peak memory
    at the size of what is kept. ``partial_teacher``: a shard whose teacher file is not
    written yet gets NaN descriptors (no distillation target) and loses its unlabeled
    faces, which nothing but the distillation loss uses. ``shards``: only these of the
    manifest's shards, by name, in this order (None: all)."""
    cache_dir = Path(cache_dir)
    manifest = CacheManifest.load(cache_dir)
    if not manifest.complete:
        raise ValueError(f"crop cache {cache_dir} is incomplete; rerun `facenet-train preprocess` "
                         "with the same arguments to finish it")
    parts: dict[str, list[np.ndarray]] = defaultdict(list)
    teacher_parts = []
    for shard in manifest.shards if shards is None else shards:
        arrays = read_shard(cache_dir / shard)
        keep = np.ones(len(arrays["labels"]), dtype=bool)
        for f in filters:
            keep &= f(arrays)
        teacher_path = cache_dir / teacher_name(shard)
        missing = with_teacher and not teacher_path.is_file()
        if missing and not partial_teacher:
            raise FileNotFoundError(f"teacher descriptors missing: {teacher_path}; "
                                    f"run `facenet-train teacher --cache {cache_dir}`")
        if missing:
            keep &= arrays["labels"] >= 0
        for name in SHARD_ARRAYS:
            parts[name].append(arrays[name][keep])
        if with_teacher and not missing:
            descriptors = np.load(teacher_path)
            if len(descriptors) != len(keep):
                raise ValueError(f"{teacher_path} holds {len(descriptors)} descriptors for {len(keep)} faces")
            teacher_parts.append(descriptors[keep])
        elif with_teacher:  # a missing shard's rows: a count, filled once the width is known
            teacher_parts.append(int(np.count_nonzero(keep)))
    size = manifest.full_size
    empty = {
        "crops": np.zeros((0, size, size, 3), np.uint8),
        "boxes": np.zeros((0, 4), np.float32),
        "landmarks": np.zeros((0, 4, 2), np.float32),
    }
    arrays = {
        name: np.concatenate(parts[name]) if parts[name] else empty.get(name, np.zeros(0))
        for name in SHARD_ARRAYS
    }
    teacher = None
    if with_teacher:
        width = next((t.shape[1] for t in teacher_parts if isinstance(t, np.ndarray)), TEACHER_SIZE)
        teacher = np.concatenate([np.full((t, width), np.nan) if isinstance(t, int) else t for t in teacher_parts]
                                 or [np.zeros((0, width))]).astype(np.float32)
    return FaceCache(manifest, teacher=teacher, **arrays)


# ---------------------------------------------------------------- batch sampling


@dataclass(frozen=True)
class SamplerConfig:
    """``p`` identities x ``k`` faces per batch, plus ``unlabeled`` faces that only the
    distillation loss sees. ``identity_power``: identities are drawn with probability
    proportional to (faces)^power: 0 = uniform over identities, 1 = uniform over faces."""

    p: int = 30
    k: int = 4
    unlabeled: int = 0
    identity_power: float = 0.5
    seed: int = 0


class PKSampler:
    """Batches of cache indices as a pure function of (seed, step): a resumed run draws
    exactly the batches the stopped run would have, with no sampler state to save.

    ``batch(step)`` returns (replicas, p/replicas * k + unlabeled/replicas) indices; each
    replica's row holds whole identities (k faces each, then its unlabeled faces), so
    triplets are mined inside one replica's slice.
    """

    def __init__(self, labels: np.ndarray, config: SamplerConfig, replicas: int = 1,
                 unlabeled_pool: np.ndarray | None = None):
        if config.p % replicas or config.unlabeled % replicas:
            raise ValueError(f"p={config.p} and unlabeled={config.unlabeled} must divide by the {replicas} replicas")
        if config.k < 2 or config.p < 2:
            raise ValueError(f"need p >= 2 identities and k >= 2 faces for triplets, got p={config.p}, k={config.k}")
        self.config = config
        self.replicas = replicas
        labels = np.asarray(labels)
        order = np.argsort(labels, kind="stable")
        values, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
        usable = (values >= 0) & (counts >= 2)
        self.groups = [order[s:s + c] for s, c in zip(starts[usable], counts[usable])]
        if len(self.groups) < config.p:
            raise ValueError(f"only {len(self.groups)} identities have 2 or more faces; p={config.p} needs that many")
        weights = counts[usable].astype(np.float64) ** config.identity_power
        self.weights = weights / weights.sum()
        if unlabeled_pool is None:
            # Unlabeled faces and faces of one-face identities: no triplet use, but a teacher target.
            singles = np.isin(labels, values[(values >= 0) & (counts < 2)])
            unlabeled_pool = np.flatnonzero((labels < 0) | singles)
        self.unlabeled_pool = np.asarray(unlabeled_pool)
        if config.unlabeled and not len(self.unlabeled_pool):
            raise ValueError("unlabeled > 0 but the cache has no unlabeled faces")

    @property
    def batch_size(self) -> int:
        return self.config.p * self.config.k + self.config.unlabeled

    @property
    def identities(self) -> int:
        return len(self.groups)

    def batch(self, step: int) -> np.ndarray:
        cfg = self.config
        rng = np.random.default_rng([cfg.seed, step])
        chosen = rng.choice(len(self.groups), size=cfg.p, replace=False, p=self.weights)
        faces = []
        for g in chosen:
            group = self.groups[g]
            if len(group) >= cfg.k:
                faces.append(rng.choice(group, cfg.k, replace=False))
            else:  # every face once, then repeats (augmentation makes the repeats differ)
                faces.append(np.concatenate([rng.permutation(group), rng.choice(group, cfg.k - len(group))]))
        labeled = np.stack(faces).reshape(self.replicas, -1)
        if not cfg.unlabeled:
            return labeled
        extra = rng.choice(self.unlabeled_pool, cfg.unlabeled).reshape(self.replicas, -1)
        return np.concatenate([labeled, extra], axis=1)
