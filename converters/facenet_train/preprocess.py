"""Detect, align and cache training faces: ``facenet-train preprocess`` and ``preprocess-lfw``.

Faces are found with ``facenet_edge.detect`` and cropped with ``facenet_edge.align`` (the
runtime's own code, so training crops and device crops match), with a border kept for
random-crop augmentation. Output: shards of ``data.SHARD_ARRAYS`` (``shard-NNNNN.npz``,
written whole or not at all) and ``manifest.json``. Shards already on disk are skipped,
so a stopped run loses at most the shard it was writing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from facenet_edge.align import align
from facenet_edge.detect import DEFAULT_DETECTOR, DETECTORS, Detection, create_detector, main_face
from facenet_edge.errors import ImageError
from facenet_edge.io import read_image

from . import data
from .data import CacheManifest, Sample
from .lfw import load_lfw

NO_LANDMARKS = np.full((4, 2), np.nan, np.float32)


@dataclass(frozen=True)
class CropOptions:
    """How faces are found and cropped.

    ``pad_retries``: when the detector finds nothing, it is run again on the image padded
    with black by these fractions of its longer side. Tight crops (Yale B, some 112x112
    ArcFace crops) leave the detector no context; on a 600-image probe of Extended Yale B,
    185 had no face, and 25 % black padding recovered 178 of them (replicated edges: 128).
    The padding only helps detection: faces are aligned from the original image.
    ``centre_fallback``: for evaluation sets, a box of this fraction of the image side at
    the centre stands in when nothing is found, so every pair is scored.
    """

    crop_size: int = 96
    border: int = 8
    template: str = "facenet96"
    detector: str = "blazeface"
    pad_retries: tuple[float, ...] = (0.25, 0.5)
    centre_fallback: float | None = None


@dataclass(frozen=True)
class FaceResult:
    """One image's outcome: a crop and the detection in original-image pixels, or a
    failure reason. ``pad``: pixels of black padding the detector needed; -1 marks a
    centre-fallback box."""

    index: int
    crop: np.ndarray | None = None
    detection: Detection | None = None
    pad: int = 0
    error: str = ""


# Named in caches of detections (benchmarks' LFW embeddings): a new rule invalidates them.
PICK_RULE = "subject covering the centre, else large and central"


def pad_image(image: np.ndarray, pad: int) -> np.ndarray:
    return cv2.copyMakeBorder(image, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=(0, 0, 0))


def shift_detection(d: Detection, offset: float) -> Detection:
    landmarks = None if d.landmarks is None else d.landmarks + offset
    return Detection(box=d.box + offset, score=d.score, landmarks=landmarks)


def crop_face(detector, image: np.ndarray, options: CropOptions, index: int = 0) -> FaceResult:
    """Detect (retrying on padded copies), pick one face, align it with the border."""
    size = (options.crop_size, options.crop_size)
    for pad in [0] + [round(f * max(image.shape[:2])) for f in options.pad_retries]:
        padded = pad_image(image, pad) if pad else image
        detections = detector.detect(padded)
        if detections:
            face = shift_detection(main_face(detections, padded.shape), -pad)
            # Align from the unpadded image: what falls outside it is filled the way the
            # runtime fills it (edge pixels replicated), not with the detector's black.
            crop = align(image, face, size, border=options.border, template=options.template)
            return FaceResult(index, crop, face, pad)
    if options.centre_fallback is not None:
        height, width = image.shape[:2]
        half = options.centre_fallback * min(height, width) / 2
        box = np.array([width / 2 - half, height / 2 - half, width / 2 + half, height / 2 + half])
        face = Detection(box=box, score=0.0)
        crop = align(image, face, size, border=options.border, template=options.template)
        return FaceResult(index, crop, face, -1)
    return FaceResult(index, error="no face")


# Each worker process holds its own detector (a TFLite interpreter cannot be pickled).
_worker: dict = {}


def _init_worker(options: CropOptions, threads: int | None) -> None:
    _worker["detector"] = create_detector(options.detector, num_threads=threads)
    _worker["options"] = options


def _process(item: tuple[int, str]) -> FaceResult:
    index, path = item
    try:
        image = read_image(path)
    except ImageError as exc:
        return FaceResult(index, error=f"unreadable: {exc}")
    return crop_face(_worker["detector"], image, _worker["options"], index)


@contextmanager
def _cropper(options: CropOptions, workers: int) -> Iterator[Callable[[list], Iterator[FaceResult]]]:
    """A function mapping (index, path) items to results, in order, in this process or in
    a pool of ``workers`` that lives for the whole run."""
    if workers <= 1:
        _init_worker(options, None)
        yield lambda items: map(_process, items)
        return
    # spawn, not fork: a forked TFLite/OpenMP runtime can deadlock in the child.
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_init_worker, initargs=(options, 1)) as pool:
        yield lambda items: pool.imap(_process, items, chunksize=8)


def _plan(samples: Sequence[Sample], options: CropOptions, shard_size: int, people: list[str], aligner: str) -> str:
    digest = hashlib.sha256(json.dumps([asdict(options), shard_size, people, aligner]).encode())
    for s in samples:
        digest.update(f"{s.path}\0{s.identity}\0{s.source}\n".encode())
    return digest.hexdigest()


def _shard_arrays(samples: Sequence[Sample], results: Sequence[FaceResult], people: dict[str, int],
                  size: int) -> dict[str, np.ndarray]:
    faces = [r for r in results if r.crop is not None]
    failed = [r for r in results if r.crop is None]
    n = len(faces)
    picked = [samples[r.index] for r in faces]
    return {
        "crops": np.stack([r.crop for r in faces]) if faces else np.zeros((0, size, size, 3), np.uint8),
        "labels": np.array([people[data.person_key(s.identity)] if s.identity else -1 for s in picked], np.int32),
        "identities": np.array([s.identity or "" for s in picked], dtype=str),
        "sources": np.array([s.source for s in picked], dtype=str),
        "paths": np.array([s.path for s in picked], dtype=str),
        "boxes": np.array([r.detection.box for r in faces], np.float32).reshape(n, 4),
        "landmarks": np.array(
            [NO_LANDMARKS if r.detection.landmarks is None else r.detection.landmarks for r in faces], np.float32
        ).reshape(n, 4, 2),
        "scores": np.array([r.detection.score for r in faces], np.float32),
        "pads": np.array([r.pad for r in faces], np.int32),
        "failed_paths": np.array([samples[r.index].path for r in failed], dtype=str),
        "failed_reasons": np.array([r.error for r in failed], dtype=str),
        "failed_sources": np.array([samples[r.index].source for r in failed], dtype=str),
    }


def build_cache(
    samples: Sequence[Sample],
    out: str | Path,
    options: CropOptions,
    shard_size: int = 1000,
    workers: int = 1,
    excluded: Sequence[str] = (),
) -> CacheManifest:
    """Crop ``samples`` into the cache at ``out``, resuming a run with the same inputs."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    people = data.label_table(samples)
    aligner = data.aligner_version()
    plan = _plan(samples, options, shard_size, people, aligner)
    shards = [data.shard_name(i) for i in range(-(-len(samples) // shard_size))]
    manifest = CacheManifest(
        crop_size=options.crop_size, border=options.border, template=options.template,
        detector=options.detector, aligner=aligner, shard_size=shard_size, plan=plan,
        people=people, shards=shards, excluded_identities=sorted(excluded),
    )
    if (out / data.MANIFEST_NAME).is_file():
        previous = CacheManifest.load(out)
        if previous.plan != plan:
            raise ValueError(f"{out} holds a cache made from other images or settings (or by another aligner: "
                             f"{previous.aligner}); choose another --out")
        manifest = previous
    manifest.save(out)

    todo = [i for i, name in enumerate(shards) if not (out / name).is_file()]
    label_of = {p: i for i, p in enumerate(people)}
    failures = 0
    with tqdm(total=len(samples), initial=len(samples) - sum(len(_part(samples, i, shard_size)) for i in todo),
              unit="img", desc="preprocess", dynamic_ncols=True, mininterval=1.0) as bar, \
            _cropper(options, workers) as crop:
        for i in todo:
            part = _part(samples, i, shard_size)
            results = []
            for result in crop([(j, s.path) for j, s in enumerate(part)]):
                results.append(result)
                failures += result.crop is None
                bar.update()
                bar.set_postfix(no_face=failures, refresh=False)
            arrays = _shard_arrays(part, results, label_of, manifest.full_size)
            data.write_npz_atomic(out / shards[i], **arrays)
    finish(out, manifest)
    return manifest


def _part(samples: Sequence[Sample], index: int, shard_size: int) -> Sequence[Sample]:
    return samples[index * shard_size:(index + 1) * shard_size]


def finish(out: Path, manifest: CacheManifest) -> None:
    """Count faces and failures per source from the shards; write the failure list."""
    counts: dict[str, Counter] = defaultdict(Counter)
    with open(out / data.FAILURES_NAME, "w") as failures:
        failures.write("source\tpath\treason\n")
        for name in manifest.shards:
            with np.load(out / name) as shard:
                for source, pad in zip(shard["sources"], shard["pads"]):
                    counts[str(source)]["faces"] += 1
                    counts[str(source)]["padded" if pad > 0 else "fallback" if pad < 0 else "direct"] += 1
                failed = zip(shard["failed_paths"], shard["failed_reasons"], shard["failed_sources"])
                for path, reason, source in failed:
                    counts[str(source)]["failed"] += 1
                    failures.write(f"{source}\t{path}\t{reason}\n")
    manifest.sources = {s: dict(c) for s, c in sorted(counts.items())}
    manifest.complete = True
    manifest.save(out)


def gather_samples(keys: Sequence[str], datasets_dir: str | Path, limit: int | None = None,
                   exclude_files: Sequence[str | Path] = ()) -> tuple[list[Sample], set[str], int]:
    """(samples, excluded identities, duplicate photos dropped) for dataset ``keys``.
    ``limit``: the first N images left in each source (sorted, so whole identity folders)."""
    excluded: set[str] = set()
    for path in exclude_files:
        excluded |= data.read_overlap(path)
    samples: list[Sample] = []
    for key in keys:
        found = data.exclude_identities(data.read_source(Path(datasets_dir) / key, key), excluded)
        samples.extend(found[:limit] if limit else found)
    samples, dropped = data.drop_duplicate_photos(samples)
    return samples, excluded, len(dropped)


def print_summary(manifest: CacheManifest, out: Path) -> None:
    if not manifest.complete:
        print(f"stopped early; rerun the same command to finish {out}")
        return
    print(f"{'source':16} {'faces':>7} {'direct':>7} {'padded':>7} {'fallback':>8} {'no face':>8}")
    for source, c in manifest.sources.items():
        print(f"{source:16} {c.get('faces', 0):7} {c.get('direct', 0):7} {c.get('padded', 0):7} "
              f"{c.get('fallback', 0):8} {c.get('failed', 0):8}")
    print(f"identities: {len(manifest.people)}; failures listed in {out / data.FAILURES_NAME}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="dataset keys, comma-separated (folders under --datasets-dir)")
    parser.add_argument("--datasets-dir", required=True, type=Path,
                        help="folder holding one sub-folder per dataset key")
    parser.add_argument("--out", required=True, type=Path, help="cache folder (created; resumed when it exists)")
    _add_crop_arguments(parser)
    parser.add_argument("--exclude", action="append", default=[], type=Path, metavar="FILE",
                        help="identity list (datasets.py lfw-overlap format) to leave out; may be repeated")
    parser.add_argument("--limit", type=int, help="only the first N images of each dataset (a quick check)")


def _add_crop_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--detector", default=DEFAULT_DETECTOR, choices=sorted(DETECTORS))
    parser.add_argument("--workers", type=int, default=2, help="processes (default 2)")
    parser.add_argument("--shard-size", type=int, default=1000, help="images per shard (default 1000)")
    parser.add_argument("--crop-size", type=int, default=96, help="model input size in pixels (default 96)")
    parser.add_argument("--border", type=int, default=8, help="extra pixels cached on each side (default 8)")


def run(args: argparse.Namespace) -> int:
    keys = [k for k in args.data.split(",") if k]
    samples, excluded, duplicates = gather_samples(keys, args.datasets_dir, args.limit, args.exclude)
    print(f"{len(samples)} images from {', '.join(keys)}; {len(excluded)} identities excluded, "
          f"{duplicates} duplicate photos dropped")
    options = CropOptions(crop_size=args.crop_size, border=args.border, detector=args.detector)
    manifest = build_cache(samples, args.out, options, args.shard_size, args.workers, sorted(excluded))
    print_summary(manifest, args.out)
    return 0


# ---------------------------------------------------------------- LFW


LFW_CENTRE_FALLBACK = 1 / 2.2
"""LFW images are Viola-Jones detections grown 2.2 times: the face box is about this
fraction of the side, centred."""


def lfw_samples(lfw_dir: str | Path) -> list[Sample]:
    """Every image that LFW's ``pairs.txt`` uses, once, sorted."""
    paths = sorted(str(path) for path in load_lfw(lfw_dir).images)
    return [Sample(p, f"lfw/{Path(p).parent.name}", "lfw") for p in paths]


def build_lfw_cache(lfw_dir: str | Path, out: str | Path, options: CropOptions, shard_size: int = 1000,
                    workers: int = 1) -> CacheManifest:
    """The crop cache of the LFW pair images; a centre box stands in where no face is found."""
    options = replace(options, centre_fallback=LFW_CENTRE_FALLBACK)
    return build_cache(lfw_samples(lfw_dir), out, options, shard_size, workers)


def add_lfw_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lfw", required=True, type=Path, help="LFW folder (one folder per person, pairs.txt)")
    parser.add_argument("--out", required=True, type=Path, help="cache folder")
    _add_crop_arguments(parser)


def run_lfw(args: argparse.Namespace) -> int:
    options = CropOptions(crop_size=args.crop_size, border=args.border, detector=args.detector)
    manifest = build_lfw_cache(args.lfw, args.out, options, args.shard_size, args.workers)
    print_summary(manifest, args.out)
    return 0
