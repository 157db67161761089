"""Student-teacher agreement: the cosine between each model's embeddings and the distillation
teacher's descriptors projected into the student's space, on held-out faces (LFW).

A student distilled from EdgeFace-XS (512-d) is trained towards the teacher's descriptor
centred by the run's ``teacher_mean.npy`` and projected on its ``teacher_basis.npy`` (the
teacher's first principal axes, one per student dimension; ``facenet_train.data.teacher_targets``),
both in the training run folder (``--space``). How close it gets on faces it never trained on
is this cosine. The faces are every crop of the ``facenet-train preprocess-lfw`` cache
(``--lfw-cache``; LFW is held out of training), centre-cut to the runtime's template crop.
The teacher (``facenet_train.edgeface.EdgeFaceTeacher``, onnxruntime) describes each crop
with flip, the mean of the crop's and its mirror's descriptors, as it labels training
views; each student embeds it through the runtime's ``facenet_edge.Embedder`` (its card's
preprocessing, quantization and flip_test). Per model: faces, mean, median and 10th
percentile of the cosine. The teacher takes about a minute for LFW's 7,701 crops on two
cores: ``--teacher-cache FILE`` keeps its descriptors of every face (written on first use,
whatever ``--faces``) and reuses them.

    python benchmarks/teacher_agreement.py --teacher-onnx edgeface_xs.onnx --space RUN_DIR \\
        --lfw-cache LFW_CROP_CACHE [--model M.tflite ...] [--faces N] [--teacher-cache FILE.npy]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from common import (
    ModelUnderTest,
    add_common_arguments,
    machine_info,
    machine_line,
    markdown_table,
    models_under_test,
    report,
    run_script,
    write_json,
)

from facenet_edge.arguments import positive_int
from facenet_edge.embed import Embedder, l2_normalize
from facenet_edge.errors import FacenetEdgeError
from facenet_edge.files import private_file
from facenet_train import data
from facenet_train.augment import centre_crop
from facenet_train.edgeface import EdgeFaceTeacher
from facenet_train.evaluation import MODEL_BATCH

QUICK_FACES = 32


# --------------------------------------------------------------------------- inputs


def template_crops(lfw_cache: Path) -> np.ndarray:
    """(N, S, S, 3) uint8: every face of a ``preprocess-lfw`` cache, in its shards' order,
    centre-cut to the template crop (the cache's crop size, without its border)."""
    try:
        cache = data.load_cache(lfw_cache)
    except (FileNotFoundError, ValueError) as exc:
        raise FacenetEdgeError(f"--lfw-cache: {exc}") from None
    data.check_aligner(cache.manifest, lfw_cache)
    if not len(cache):
        raise FacenetEdgeError(f"--lfw-cache {lfw_cache} holds no faces")
    return centre_crop(cache.crops, cache.manifest.crop_size)


def pick_faces(total: int, faces: int | None) -> np.ndarray:
    """Indices of ``faces`` faces spread evenly over the ``total`` (all of them without ``faces``)."""
    if faces is None or faces >= total:
        return np.arange(total)
    return np.linspace(0, total - 1, faces).round().astype(int)


def load_space(run_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """The run's teacher centre (D,) and basis (D, K)."""
    if not run_dir.is_dir():
        raise FacenetEdgeError(f"--space {run_dir} is not a folder: pass a training run folder "
                               "(facenet-train train --out)")
    arrays = []
    for name in (data.TEACHER_MEAN, data.TEACHER_BASIS):
        if not (run_dir / name).is_file():
            raise FacenetEdgeError(f"--space {run_dir} holds no {name}: pass the folder of a run distilled from "
                                   "a teacher wider than the student (EdgeFace)")
        arrays.append(np.load(run_dir / name))
    mean, basis = arrays
    if mean.ndim != 1 or basis.ndim != 2 or len(mean) != len(basis):
        raise FacenetEdgeError(f"--space {run_dir}: {data.TEACHER_MEAN} {mean.shape} and "
                               f"{data.TEACHER_BASIS} {basis.shape} do not fit together (need (D,) and (D, K))")
    return mean, basis


def teacher_descriptors(args: argparse.Namespace, crops: np.ndarray, chosen: np.ndarray) -> tuple[np.ndarray, str]:
    """The teacher's descriptors of ``crops[chosen]``, and where they came from: the
    ``--teacher-cache`` file (one row per face of the LFW cache), or the teacher (on every
    face when they go to a new ``--teacher-cache`` file, else on the chosen ones)."""
    cache = args.teacher_cache
    if cache is not None and cache.is_file():
        descriptors = np.load(cache)
        if descriptors.ndim != 2 or len(descriptors) != len(crops):
            raise FacenetEdgeError(f"--teacher-cache {cache} holds {descriptors.shape} descriptors, --lfw-cache has "
                                   f"{len(crops)} faces: it was made from another cache; delete it or pass another")
        return descriptors[chosen], f"read from {cache}"
    try:
        teacher = EdgeFaceTeacher(args.teacher_onnx, **({"threads": args.threads} if args.threads else {}))
    except ImportError as exc:
        raise FacenetEdgeError(str(exc)) from None
    todo = np.arange(len(crops)) if cache is not None else chosen
    print(f"teacher: describing {len(todo)} faces ...", file=sys.stderr, flush=True)
    descriptors = teacher.describe(crops[todo])
    if cache is None:
        return descriptors, "computed"
    with private_file(cache, FacenetEdgeError) as file:
        np.save(file, descriptors)
    return descriptors[chosen], f"computed, written to {cache}"


# --------------------------------------------------------------------------- the measure


def cosines(embeddings: np.ndarray, teacher: np.ndarray, mean: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """Per face, the cosine between the student's embedding and the teacher's descriptor
    centred and projected as in training (``data.teacher_targets``)."""
    targets = data.teacher_targets(teacher, mean, basis)
    return np.sum(l2_normalize(embeddings) * l2_normalize(targets), axis=1)


@dataclass(frozen=True)
class Agreement:
    """One model's cosines to the teacher, summarised."""

    model: str
    path: str
    target: str
    faces: int
    mean: float
    median: float
    p10: float

    @classmethod
    def of(cls, model: ModelUnderTest, values: np.ndarray) -> Agreement:
        return cls(model.label, str(model.path), model.target, len(values), float(values.mean()),
                   float(np.median(values)), float(np.percentile(values, 10)))


def student_embeddings(model: ModelUnderTest, crops: np.ndarray, threads: int | None) -> np.ndarray:
    with Embedder.from_path(model.path, num_threads=threads) as embedder:
        if embedder.input_size != crops.shape[1:3]:
            raise FacenetEdgeError(f"{model.path} takes {embedder.input_size} crops, --lfw-cache holds "
                                   f"{crops.shape[1:3]}: rebuild it with `facenet-train preprocess-lfw --crop-size`")
        return np.concatenate([embedder.embed(crops[i:i + MODEL_BATCH]) for i in range(0, len(crops), MODEL_BATCH)])


# --------------------------------------------------------------------------- run


def run(args: argparse.Namespace) -> int:
    if not args.teacher_onnx.is_file():
        raise FacenetEdgeError(f"--teacher-onnx {args.teacher_onnx} not found: pass the EdgeFace export "
                               "(facenet-train teacher-export)")
    mean, basis = load_space(args.space)
    models = models_under_test(args.model)
    crops = template_crops(args.lfw_cache)
    chosen = pick_faces(len(crops), args.faces or (QUICK_FACES if args.quick else None))
    machine = machine_info([args.threads] if args.threads else None)
    teacher, source = teacher_descriptors(args, crops, chosen)
    if teacher.shape[1] != len(mean):
        raise FacenetEdgeError(f"the teacher gives {teacher.shape[1]}-d descriptors, --space {args.space} centres "
                               f"{len(mean)}-d ones: a run distilled from another teacher")
    scores = []
    for model in models:
        if model.card.embedding_size != basis.shape[1]:
            raise FacenetEdgeError(f"{model.path} embeds {model.card.embedding_size}-d, --space {args.space} "
                                   f"projects the teacher to {basis.shape[1]}-d")
        print(f"{model.label}: embedding {len(chosen)} faces ...", file=sys.stderr, flush=True)
        scores.append(Agreement.of(model, cosines(student_embeddings(model, crops[chosen], args.threads),
                                                  teacher, mean, basis)))

    print("# facenet-edge student-teacher agreement\n")
    print(machine_line(machine))
    print(f"\n## Cosine to the teacher projected into the student's space ({args.space}), "
          f"{len(chosen)} of {len(crops)} LFW crops\n")
    headers = ["model", "target", "faces", "mean", "median", "10th percentile"]
    rows = [[s.model, s.target, s.faces, f"{s.mean:.3f}", f"{s.median:.3f}", f"{s.p10:.3f}"] for s in scores]
    print(markdown_table(headers, rows))
    print(f"\nTeacher: {args.teacher_onnx} with flip, descriptors {source}; centred and projected with the "
          f"run's teacher mean and basis ({basis.shape[0]} -> {basis.shape[1]} dimensions).")
    config = {
        "teacher_onnx": args.teacher_onnx,
        "teacher_flip": True,
        "teacher_cache": args.teacher_cache,
        "teacher_descriptors": source,
        "space": args.space,
        "lfw_cache": args.lfw_cache,
        "faces": len(chosen),
        "faces_in_cache": len(crops),
        "models": [{"label": m.label, "path": m.path, "target": m.target} for m in models],
        "threads": args.threads,
        "quick": args.quick,
    }
    results = {"models": [asdict(s) for s in scores]}
    path = write_json(args.out / "teacher_agreement.json", report("teacher_agreement", machine, config, results, []))
    print(f"\nwrote {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="teacher_agreement", description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, several_models=True)
    parser.add_argument("--teacher-onnx", type=Path, required=True, metavar="FILE",
                        help="the EdgeFace-XS export (facenet-train teacher-export)")
    parser.add_argument("--space", type=Path, required=True, metavar="RUN_DIR",
                        help="a distilled training run folder (facenet-train train --out) with the teacher's "
                             "mean and basis (.npy)")
    parser.add_argument("--lfw-cache", type=Path, required=True, metavar="DIR",
                        help="`facenet-train preprocess-lfw` crop cache (the held-out faces)")
    parser.add_argument("--faces", type=positive_int, metavar="N",
                        help=f"N faces spread evenly over the cache (default: all; {QUICK_FACES} with --quick)")
    parser.add_argument("--teacher-cache", type=Path, metavar="FILE",
                        help="the teacher's descriptors of every face of --lfw-cache (.npy): written when absent, "
                             "read when present")
    parser.add_argument("--threads", type=positive_int, metavar="N",
                        help="interpreter and teacher threads (default: the runtime's; the teacher's 2)")
    return run_script(parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
