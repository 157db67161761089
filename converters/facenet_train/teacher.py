"""dlib's 128-d ResNet descriptors of the cached faces: targets for distillation.

``facenet-train teacher --cache DIR`` writes ``teacher-NNNNN.npy`` (N, 128) float32 beside
each ``shard-NNNNN.npz``, row for row; a shard's file is written whole or not at all, so a
stopped run resumes at the first missing one. dlib (the ``teacher`` extra: dlib-bin and
face-recognition-models) is imported only here.

dlib sees the original image and OUR detector's box (as a ``dlib.rectangle``), from which
its own five-point shape predictor and face chip alignment take over: the teacher
describes the same face the student is trained on, in dlib's own framing.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from tqdm import tqdm

from facenet_edge.errors import ImageError
from facenet_edge.io import read_image

from . import data


class DlibTeacher:
    """dlib's five-point shape predictor + ResNet face recognition model."""

    def __init__(self) -> None:
        try:
            import dlib
            import face_recognition_models
        except ImportError as exc:
            raise ImportError(
                f"the dlib teacher needs the `teacher` extra ({exc.name} is missing): "
                "pip install 'facenet-edge[teacher]'"
            ) from None
        self._dlib = dlib
        self._shapes = dlib.shape_predictor(face_recognition_models.pose_predictor_five_point_model_location())
        self._model = dlib.face_recognition_model_v1(face_recognition_models.face_recognition_model_location())

    def describe(self, image: np.ndarray, box: np.ndarray) -> np.ndarray:
        """Descriptor of the face in ``box`` (x1, y1, x2, y2) of an RGB uint8 image."""
        x1, y1, x2, y2 = (int(round(float(v))) for v in box)
        shape = self._shapes(image, self._dlib.rectangle(x1, y1, x2, y2))
        return np.asarray(self._model.compute_face_descriptor(image, shape, num_jitters=0), np.float32)


_worker: dict = {}


def _init_worker() -> None:
    _worker["teacher"] = DlibTeacher()


def _describe(item: tuple[str, np.ndarray]) -> np.ndarray:
    path, box = item
    try:
        image = read_image(path)
    except ImageError:  # the file changed since preprocessing: no target for this face
        return np.full(data.TEACHER_SIZE, np.nan, np.float32)
    return _worker["teacher"].describe(image, box)


@contextmanager
def _describer(workers: int) -> Iterator[Callable[[list], Iterator[np.ndarray]]]:
    """A function mapping (path, box) items to descriptors, in order, in this process or
    in a pool of ``workers`` that lives for the whole run."""
    if workers <= 1:
        _init_worker()
        yield lambda items: map(_describe, items)
        return
    with multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker) as pool:
        yield lambda items: pool.imap(_describe, items, chunksize=8)


def compute_teacher(cache_dir: str | Path, workers: int = 1) -> tuple[int, float]:
    """Write the missing teacher shards of a complete cache. Returns (faces described,
    seconds spent on them)."""
    cache_dir = Path(cache_dir)
    manifest = data.CacheManifest.load(cache_dir)
    if not manifest.complete:
        raise ValueError(f"crop cache {cache_dir} is incomplete; finish `facenet-train preprocess` first")
    todo = [s for s in manifest.shards if not (cache_dir / data.teacher_name(s)).is_file()]
    total = sum(manifest.sources[s].get("faces", 0) for s in manifest.sources)
    remaining = {s: data.read_shard(cache_dir / s, ("paths", "boxes")) for s in todo}
    left = sum(len(a["paths"]) for a in remaining.values())
    start = time.perf_counter()
    with tqdm(total=total, initial=total - left, unit="face", desc="teacher", dynamic_ncols=True,
              mininterval=1.0) as bar, _describer(workers) as describe:
        for shard, arrays in remaining.items():
            rows = []
            for descriptor in describe(list(zip(arrays["paths"].tolist(), arrays["boxes"]))):
                rows.append(descriptor)
                bar.update()
            _save(cache_dir / data.teacher_name(shard), rows)
    return left, time.perf_counter() - start


def _save(path: Path, rows: list[np.ndarray]) -> None:
    array = np.stack(rows) if rows else np.zeros((0, data.TEACHER_SIZE), np.float32)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, array.astype(np.float32))
    os.replace(tmp, path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache", required=True, type=Path, help="a `facenet-train preprocess` folder")
    parser.add_argument("--workers", type=int, default=2, help="processes (default 2)")


def run(args: argparse.Namespace) -> int:
    faces, seconds = compute_teacher(args.cache, args.workers)
    if faces:
        print(f"{faces} faces in {seconds:.1f} s: {1000 * seconds / faces:.1f} ms/face with {args.workers} worker(s)")
    else:
        print(f"nothing to do: every shard of {args.cache} has its teacher file")
    return 0
