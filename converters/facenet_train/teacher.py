"""A teacher's descriptors of the cached faces: targets for distillation.

``facenet-train teacher --cache DIR --teacher NAME`` writes ``teacher-NNNNN.npy`` (N, D)
float32 beside each ``shard-NNNNN.npz``, row for row, and ``teacher.json`` naming the
teacher; a shard's file is written whole or not at all, so a stopped run resumes at the
first missing one. One cache holds one teacher's descriptors.

- ``edgeface`` (the default): EdgeFace-XS in onnxruntime (``facenet_train.edgeface``;
  export it first with ``facenet-train teacher-export``), 512-d, on the cached crop itself,
  so it describes exactly what the student sees; ~3.4 ms a face (x2 with the mirror).
- ``dlib``: dlib's 128-d ResNet (the ``teacher`` extra: dlib-bin and
  face-recognition-models), on the original image and OUR detector's box (as a
  ``dlib.rectangle``), from which its own five-point shape predictor and face chip
  alignment take over; ~110 ms a face.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from facenet_edge.errors import ImageError
from facenet_edge.io import read_image

from . import data
from .augment import centre_crop
from .edgeface import EdgeFaceTeacher


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


ShardLabeller = Callable[[dict[str, np.ndarray]], Iterator[np.ndarray]]
"""A shard's arrays -> its faces' descriptors, in order."""


@dataclass(frozen=True)
class TeacherOptions:
    """Which teacher labels the cache: ``name`` (a ``TEACHERS`` key), ``workers``
    (processes for dlib, onnxruntime threads for EdgeFace), ``onnx`` (EdgeFace's export)."""

    name: str = "edgeface"
    workers: int = 2
    onnx: Path | None = None


@contextmanager
def _dlib_labeller(options: TeacherOptions, manifest: data.CacheManifest) -> Iterator[ShardLabeller]:
    with _describer(options.workers) as describe:
        yield lambda arrays: describe(list(zip(arrays["paths"].tolist(), arrays["boxes"])))


@contextmanager
def _edgeface_labeller(options: TeacherOptions, manifest: data.CacheManifest) -> Iterator[ShardLabeller]:
    if options.onnx is None:
        raise ValueError("the edgeface teacher needs its ONNX file (--onnx, made by `facenet-train teacher-export`)")
    teacher = EdgeFaceTeacher(options.onnx, threads=options.workers)
    yield lambda arrays: iter(teacher.describe(centre_crop(arrays["crops"], manifest.crop_size)))


@dataclass(frozen=True)
class Teacher:
    """A teacher: ``labeller`` opens it for a cache (None: it teaches inside the training
    step, as ``harmonic.old_model``, and labels no cache); ``terms`` names it (and the terms
    of its weights) in the card of a model distilled from it."""

    labeller: Callable[[TeacherOptions, data.CacheManifest], AbstractContextManager[ShardLabeller]] | None
    terms: str


# The one list of teachers: `facenet-train teacher --teacher` and `convert --teacher` offer these.
TEACHERS: dict[str, Teacher] = {
    "edgeface": Teacher(_edgeface_labeller,
                        "EdgeFace-XS (Idiap; code BSD-3, weights published for non-commercial research)"),
    "dlib": Teacher(_dlib_labeller, "dlib's ResNet face descriptor"),
    # configs/mobilefacenet_relu.toml: the imported PReLU model, frozen, teaches its ReLU twin.
    "insightface_mobilefacenet": Teacher(
        None, "InsightFace's MobileFaceNet (weights published for non-commercial research only), "
              "whose weights it also starts from"),
}
LABELLERS = [name for name, teacher in TEACHERS.items() if teacher.labeller is not None]
TEACHER_JSON = "teacher.json"


def cached_teacher(cache_dir: Path) -> str | None:
    """The teacher whose descriptors a cache holds (None: none yet). Descriptors written
    before ``teacher.json`` existed are dlib's."""
    stamp = cache_dir / TEACHER_JSON
    if stamp.is_file():
        return json.loads(stamp.read_text())["teacher"]
    return "dlib" if any(cache_dir.glob("teacher-*.npy")) else None


def compute_teacher(cache_dir: str | Path, options: TeacherOptions = TeacherOptions()) -> tuple[int, float]:
    """Write the missing teacher shards of a complete cache. Returns (faces described,
    seconds spent on them)."""
    cache_dir = Path(cache_dir)
    manifest = data.CacheManifest.load(cache_dir)
    if not manifest.complete:
        raise ValueError(f"crop cache {cache_dir} is incomplete; finish `facenet-train preprocess` first")
    if options.name not in LABELLERS:
        raise ValueError(f"teacher {options.name!r} labels no cache; choose one of {LABELLERS}")
    held = cached_teacher(cache_dir)
    if held not in (None, options.name):
        raise ValueError(f"{cache_dir} holds {held}'s descriptors; label a copy of the cache with {options.name}")
    todo = [s for s in manifest.shards if not (cache_dir / data.teacher_name(s)).is_file()]
    total = sum(manifest.sources[s].get("faces", 0) for s in manifest.sources)
    left = sum(len(data.read_shard(cache_dir / s, ("labels",))["labels"]) for s in todo)
    start = time.perf_counter()
    with tqdm(total=total, initial=total - left, unit="face", desc="teacher", dynamic_ncols=True,
              mininterval=1.0) as bar, TEACHERS[options.name].labeller(options, manifest) as label:
        # Stamped once the teacher has loaded: a teacher that cannot start claims nothing.
        (cache_dir / TEACHER_JSON).write_text(json.dumps({"teacher": options.name}) + "\n")
        for shard in todo:
            rows = []
            for descriptor in label(data.read_shard(cache_dir / shard)):
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
    parser.add_argument("--teacher", choices=LABELLERS, default="edgeface",
                        help="which teacher (default edgeface)")
    parser.add_argument("--onnx", type=Path, help="with --teacher edgeface: the `facenet-train teacher-export` file")
    parser.add_argument("--workers", type=int, default=2, help="processes for dlib, threads for edgeface (default 2)")


def run(args: argparse.Namespace) -> int:
    faces, seconds = compute_teacher(args.cache, TeacherOptions(args.teacher, args.workers, args.onnx))
    if faces:
        print(f"{faces} faces in {seconds:.1f} s: {1000 * seconds / faces:.1f} ms/face with {args.workers} worker(s)")
    else:
        print(f"nothing to do: every shard of {args.cache} has its teacher file")
    return 0
