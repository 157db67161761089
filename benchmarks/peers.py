"""Peers side by side: dlib's ResNet face descriptor against our models (float32, int8), in
one run, on the same faces, with the same face boxes, at the same thread count.

Per face, each side does its own alignment then its network: ours ``facenet_edge.align``
then the interpreter; dlib its five-point shape predictor (started from OUR detector's
box, as the distillation teacher in ``facenet_train.teacher`` is) then
``face_recognition_model_v1.compute_face_descriptor``. dlib-bin is built without BLAS, so
its network runs on the calling thread whatever ``--threads`` says; the CPU/wall column
shows how many cores each side really kept busy. With LFW (``--lfw``), the 10-fold
accuracy of every peer, through the same detector (cached like ``accuracy.py``'s), and
for each of our models a cross-model row ("dlib gallery × MODEL probes", target
``cross``): each pair's first image described by dlib (scaled to unit length), its second
by our model. It asks whether a face_recognition gallery can be imported without
re-enrolling anyone; only a model distilled into dlib's descriptor space can score well
there, any other is near chance. A model distilled from centred descriptors
(``loss.center_teacher``) carries the centre in its card (``extra.teacher_mean``), and
dlib's descriptors are compared as ``unit(d - teacher_mean)``.

    python benchmarks/peers.py [--model M_float32.tflite --model M_int8.tflite] [--threads 1] [--pairs N]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from common import (
    FaceImage,
    LfwFaces,
    ModelUnderTest,
    Percentiles,
    Target,
    add_common_arguments,
    add_lfw_arguments,
    describe_with,
    face_images,
    fmt,
    lfw_cross_result,
    lfw_embeddings,
    lfw_photos,
    lfw_result,
    load_lfw,
    machine_info,
    machine_line,
    markdown_table,
    models_under_test,
    report,
    run_script,
    targets_table,
    write_json,
)

from facenet_edge.detect import DEFAULT_DETECTOR, DETECTORS, Detection, create_detector
from facenet_edge.embed import Embedder

DLIB = "dlib ResNet v1"
TARGET_RATIO = 1 / 20
FACES, RUNS, QUICK_FACES, QUICK_RUNS, QUICK_PAIRS = 20, 10, 3, 2, 20
# Face recognisers considered and why they are not in the table: each fetches its
# weights from the internet at run time instead of installing them from PyPI.
UNAVAILABLE = {
    "OpenCV SFace (cv2.FaceRecognizerSF)": "needs face_recognition_sface_2021dec.onnx downloaded from opencv_zoo",
    "insightface (ArcFace)": "downloads its model packs (buffalo_l, ...) on first use",
    "facenet-pytorch (InceptionResnetV1)": "downloads its VGGFace2/CASIA weights on first use",
    "deepface": "downloads each model's weights on first use",
}


class DlibPeer:
    """dlib's five-point shape predictor and ResNet descriptor, from face_recognition_models' files."""

    def __init__(self) -> None:
        import dlib
        import face_recognition_models

        self._dlib = dlib
        self._shapes = dlib.shape_predictor(face_recognition_models.pose_predictor_five_point_model_location())
        self._model = dlib.face_recognition_model_v1(face_recognition_models.face_recognition_model_location())
        self.uses_blas = bool(dlib.DLIB_USE_BLAS)
        self.version = dlib.__version__

    def shape(self, image: np.ndarray, detection: Detection) -> Any:
        x1, y1, x2, y2 = (int(round(float(v))) for v in detection.box)
        return self._shapes(image, self._dlib.rectangle(x1, y1, x2, y2))

    def descriptor(self, image: np.ndarray, shape: Any) -> np.ndarray:
        return np.asarray(self._model.compute_face_descriptor(image, shape, num_jitters=0), np.float32)

    def describe(self, images: list[np.ndarray], detections: list[Detection]) -> np.ndarray:
        return np.stack([self.descriptor(im, self.shape(im, d)) for im, d in zip(images, detections)])


def dlib_peer() -> tuple[DlibPeer | None, str]:
    """The dlib peer, or None and why not."""
    missing = [m for m in ("dlib", "face_recognition_models") if importlib.util.find_spec(m) is None]
    if missing:
        return None, f"not installed ({', '.join(missing)}): pip install 'facenet-edge[dlib]'"
    return DlibPeer(), ""


@dataclass(frozen=True)
class PeerLatency:
    """Per face: ``prepare`` (our align / dlib's shape predictor), ``network`` (embed /
    descriptor), ``total`` (both). ``cpu_per_wall``: process CPU seconds per wall second
    over the timed part, about the number of cores kept busy."""

    peer: str
    target: str
    threads: str
    prepare: Percentiles
    network: Percentiles
    total: Percentiles
    cpu_per_wall: float


# One face -> (seconds preparing, seconds in the network).
TimeFace = Callable[[FaceImage], tuple[float, float]]


@dataclass(frozen=True)
class Side:
    """One peer in the latency comparison."""

    name: str
    target: str
    threads: str
    time_face: TimeFace


def time_ours(embedder: Embedder) -> TimeFace:

    def time_face(face: FaceImage) -> tuple[float, float]:
        start = time.perf_counter()
        crop = embedder.crop(face.image, face.detection)
        aligned = time.perf_counter()
        embedder.embed(crop[None])
        return aligned - start, time.perf_counter() - aligned

    return time_face


def time_dlib(peer: DlibPeer) -> TimeFace:
    def time_face(face: FaceImage) -> tuple[float, float]:
        start = time.perf_counter()
        shape = peer.shape(face.image, face.detection)
        shaped = time.perf_counter()
        peer.descriptor(face.image, shape)
        return shaped - start, time.perf_counter() - shaped

    return time_face


def time_sides(sides: Sequence[Side], faces: Sequence[FaceImage], runs: int) -> list[PeerLatency]:
    """``runs`` passes over every face after one untimed pass. The peers take turns within
    each pass, so a change in the machine's load hits all of them alike."""
    for side in sides:
        for face in faces:
            side.time_face(face)
    timings: dict[str, list[tuple[float, float]]] = {side.name: [] for side in sides}
    cpu = dict.fromkeys(timings, 0.0)
    wall = dict.fromkeys(timings, 0.0)
    for _ in range(runs):
        for side in sides:
            cpu_start, wall_start = time.process_time(), time.perf_counter()
            timings[side.name] += [side.time_face(face) for face in faces]
            cpu[side.name] += time.process_time() - cpu_start
            wall[side.name] += time.perf_counter() - wall_start
    rows = []
    for side in sides:
        seconds = np.array(timings[side.name])
        parts = (Percentiles.of(seconds[:, 0]), Percentiles.of(seconds[:, 1]), Percentiles.of(seconds.sum(axis=1)))
        rows.append(PeerLatency(side.name, side.target, side.threads, *parts, cpu[side.name] / wall[side.name]))
    return rows


def measure_latency(
    models: Sequence[ModelUnderTest], peer: DlibPeer | None, faces: Sequence[FaceImage], threads: int, runs: int
) -> list[PeerLatency]:
    with ExitStack() as stack:
        sides = []
        if peer is not None:
            # Without BLAS dlib computes on the calling thread only.
            sides.append(Side(DLIB, "float32", "BLAS's" if peer.uses_blas else "1 (no BLAS)", time_dlib(peer)))
        for model in models:
            embedder = stack.enter_context(Embedder.from_path(model.path, num_threads=threads))
            sides.append(Side(model.label, model.target, str(threads), time_ours(embedder)))
        return time_sides(sides, faces, runs)


def ratio_target(
    rows: Sequence[PeerLatency], models: Sequence[ModelUnderTest], threads: int, why_no_dlib: str
) -> Target:
    """int8 embed on one thread against dlib's descriptor, both p50 of this run."""
    dlib_row = next((r for r in rows if r.peer == DLIB), None)
    int8 = next((m.label for m in models if m.int8), None)
    int8_row = next((r for r in rows if r.peer == int8), None)
    name = "int8 embed (1 thread) / dlib descriptor"
    if dlib_row is None or int8_row is None or threads != 1:
        note = why_no_dlib or ("no int8 model given" if int8_row is None else "needs --threads 1")
        return Target(name, TARGET_RATIO, "x", note=note)
    return Target(name, TARGET_RATIO, "x", measured=int8_row.network.p50_ms / dlib_row.network.p50_ms, note="p50 / p50")


def lfw_accuracy(models: Sequence[ModelUnderTest], peer: DlibPeer | None, args: argparse.Namespace) -> list[dict]:
    """LFW 10-fold scores of every peer through the same detector and boxes, then, with
    dlib, one cross-model row per model of ours: dlib's gallery against its probes."""
    lfw = load_lfw(args.lfw, args.pairs or (QUICK_PAIRS if args.quick else None))
    cache = args.cache or args.out / "cache"
    scores, cross = [], []
    dlib_descriptors = None
    with LfwFaces(args.detector, args.threads) as faces:
        if peer is not None:
            print(f"{DLIB} on LFW ...", file=sys.stderr, flush=True)
            dlib_descriptors, _ = lfw_embeddings(lfw, faces, f"dlib-{peer.version}", peer.describe, cache)
            scores.append({"peer": DLIB, "target": "float32", **lfw_result(lfw, dlib_descriptors).scores()})
        for model in models:
            print(f"{model.label} on LFW ...", file=sys.stderr, flush=True)
            with Embedder.from_path(model.path, num_threads=args.threads) as embedder:
                key = f"{model.label}-{embedder.identity.sha256[:12]}"
                descriptors, _ = lfw_embeddings(lfw, faces, key, describe_with(embedder), cache)
            scores.append({"peer": model.label, "target": model.target, **lfw_result(lfw, descriptors).scores()})
            if dlib_descriptors is None:
                continue
            if descriptors.shape != dlib_descriptors.shape:
                dims = f"{descriptors.shape[1]}-d, dlib {dlib_descriptors.shape[1]}-d"
                print(f"{model.label}: {dims}: no cross-model row", file=sys.stderr, flush=True)
                continue
            # A face_recognition gallery (dlib's descriptors) matched by our model's probes;
            # a model distilled from centred descriptors names the centre in its card.
            centre = np.asarray(model.card.extra.get("teacher_mean", np.zeros(dlib_descriptors.shape[1])), np.float32)
            result = lfw_cross_result(lfw, dlib_descriptors - centre, descriptors)
            cross.append(
                {
                    "peer": f"dlib gallery × {model.label} probes",
                    "target": "cross",
                    "cross": True,
                    "gallery": DLIB,
                    "probes": model.label,
                    **result.scores(),
                }
            )
    return [{**score, "cross": score.get("cross", False), "pairs": len(lfw.pairs)} for score in scores + cross]


def print_tables(rows: Sequence[PeerLatency], accuracy: list[dict], targets: Sequence[Target], note: str) -> None:
    print("\n## Latency per face (ms)\n")
    dlib_row = next((r for r in rows if r.peer == DLIB), None)
    headers = ["peer", "target", "threads", "CPU/wall", "align or shape p50", "network p50", "per face p50"]
    headers += ["per face p90", "per face p99", "per face / dlib"]
    print(
        markdown_table(
            headers,
            [
                [r.peer, r.target, r.threads, fmt(r.cpu_per_wall), fmt(r.prepare.p50_ms, 3), fmt(r.network.p50_ms, 3)]
                + [fmt(r.total.p50_ms, 3), fmt(r.total.p90_ms, 3), fmt(r.total.p99_ms, 3)]
                + [fmt(r.total.p50_ms / dlib_row.total.p50_ms, 4) if dlib_row else "-"]
                for r in rows
            ],
        )
    )
    print(f"\n{note}")
    print("\nNot compared: " + "; ".join(f"{name}: {why}" for name, why in UNAVAILABLE.items()) + ".")
    if accuracy:
        print(f"\n## LFW, {accuracy[0]['pairs']} pairs, 10 folds\n")
        print(
            markdown_table(
                ["peer", "target", "accuracy %", "VAL % @ FAR 1e-3", "AUC"],
                [
                    [a["peer"], a["target"], f"{100 * a['accuracy_mean']:.2f} ± {100 * a['accuracy_std']:.2f}"]
                    + [f"{100 * a['val_mean']:.1f}", fmt(a["auc"], 4)]
                    for a in accuracy
                ],
            )
        )
        if any(a["cross"] for a in accuracy):
            print(
                "\nCross rows: each pair's first image described by dlib (unit length), its second by our model;"
                " near chance unless the model was distilled into dlib's descriptor space."
            )
    print("\n## Targets\n")
    print(targets_table(targets))


def run(args: argparse.Namespace) -> int:
    runs = args.runs or (QUICK_RUNS if args.quick else RUNS)
    count = args.faces or (QUICK_FACES if args.quick else FACES)
    models = models_under_test(args.model)
    peer, why_no_dlib = dlib_peer()
    machine = machine_info([args.threads])
    print("# facenet-edge against peers\n")
    print(machine_line(machine))
    cv2.setNumThreads(args.threads)  # OpenCV (our aligner) at the same thread count
    with create_detector(args.detector, num_threads=args.threads) as detector:
        faces = face_images(count, detector, args.image, lfw_photos(args.lfw))
    rows = measure_latency(models, peer, faces, args.threads, runs)
    use_lfw = args.lfw is not None and (args.lfw / "pairs.txt").is_file() and not args.no_lfw
    accuracy = lfw_accuracy(models, peer, args) if use_lfw else []
    targets = [ratio_target(rows, models, args.threads, why_no_dlib)]
    note = f"{len(faces)} faces ({', '.join(f.source for f in faces)}), {runs} passes; boxes from {args.detector}. " + (
        f"dlib {peer.version}, BLAS {'on' if peer.uses_blas else 'off'}." if peer else f"dlib: {why_no_dlib}."
    )
    print_tables(rows, accuracy, targets, note)
    results = {
        "faces": [f.source for f in faces],
        "latency": [asdict(r) for r in rows],
        "lfw": accuracy,
        "lfw_note": "" if use_lfw else "LFW not found or --no-lfw: accuracy not measured",
        "dlib": {"version": peer.version, "blas": peer.uses_blas} if peer else {"unavailable": why_no_dlib},
        "unavailable": UNAVAILABLE,
    }
    config = {"threads": args.threads, "runs": runs, "faces": count, "detector": args.detector, "pairs": args.pairs}
    path = write_json(args.out / "peers.json", report("peers", machine, config, results, targets))
    print(f"\nwrote {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="peers", description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, several_models=True)
    add_lfw_arguments(parser)
    parser.add_argument(
        "--threads", type=int, default=1, metavar="N", help="threads for our models and OpenCV (default 1)"
    )
    parser.add_argument(
        "--detector", choices=sorted(DETECTORS), default=DEFAULT_DETECTOR, help="whose boxes both sides use"
    )
    parser.add_argument("--faces", type=int, metavar="N", help=f"face photos timed (default {FACES})")
    parser.add_argument("--runs", type=int, metavar="N", help=f"timed passes over them (default {RUNS})")
    parser.add_argument(
        "--image", type=Path, action="append", default=[], metavar="PATH", help="face photo(s) to use first"
    )
    parser.add_argument("--no-lfw", action="store_true", help="latency only")
    return run_script(parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
