"""LFW at the door: each pair's first photo enrolled, its second seen by a door camera 0.5
to 3 m away, per detector: which detector a door should use.

The camera: a ``--frame`` W x H image (default 640 x 480, the door example's capture size)
through a lens of ``--hfov`` degrees (default 62.2, the Raspberry Pi Camera Module 2). A
face d metres away has its eyes f * 0.063 / d pixels apart (f = W / 2 / tan(hfov / 2);
63 mm, the adult mean), and LFW's are about 43 pixels apart (the median of BlazeFace's and
YuNet's landmarks over its pair images, 42.9 and 43.6), so each probe photo is resized by
that ratio and placed at the centre of a mid-grey frame.

Enrolment: the first photo of each pair through the runtime path with the same detector, as
the LFW benchmark scores it (``common.LfwFaces``; its accuracy with both photos enrolled is
the table's ``photo`` row). At the door: ``FacePipeline.detect`` on the whole frame, as on
the device (no padding, no centre box), the photo's subject (``main_face``), the model's
crop, the interpreter. A frame with no face found is a refusal: the pair scores the largest
squared distance, 4. Ten folds, each threshold picked on the other nine, as for LFW.
Embeddings are cached per (model, detector, camera, distance) in ``--cache``.

    python benchmarks/door_distance.py [--model M.tflite] [--detectors blazeface,yunet]
                                       [--distances 0.5,1,1.5,2,2.5,3] [--detect-widths 640,480] [--pairs N]

``--detect-widths``: the pipeline's ``detect_width`` (frames wider are shrunk before YuNet
and Haar, which cost in proportion to the pixels), one door row per width: what a faster
detection costs in faces found far away.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from common import (
    LfwFaces,
    LfwPairs,
    Percentiles,
    add_common_arguments,
    add_lfw_arguments,
    describe_with,
    lfw_embeddings,
    lfw_name,
    lfw_result,
    machine_info,
    machine_line,
    markdown_table,
    models_under_test,
    report,
    require_lfw,
    run_script,
    write_json,
)

from facenet_edge.arguments import int_list, name_list
from facenet_edge.detect import DETECTORS, main_face
from facenet_edge.embed import Embedder
from facenet_edge.io import read_image
from facenet_edge.pipeline import FacePipeline
from facenet_train.metrics import LfwResult, evaluate_distances

EYE_DISTANCE_M = 0.063
LFW_EYE_DISTANCE_PX = 43.0
REFUSED = 4.0  # squared L2 between opposite unit vectors: the largest there is
DISTANCES = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0)
QUICK_DISTANCES = (1.0, 3.0)
EMBED_BATCH = 32


@dataclass(frozen=True)
class Camera:
    width: int
    height: int
    hfov_degrees: float

    @property
    def focal_px(self) -> float:
        return self.width / 2 / math.tan(math.radians(self.hfov_degrees) / 2)

    def eye_distance_px(self, metres: float) -> float:
        return self.focal_px * EYE_DISTANCE_M / metres

    def frame(self, photo: np.ndarray, metres: float) -> np.ndarray:
        """An LFW ``photo`` as this camera sees it ``metres`` away, centred in a mid-grey
        frame (its middle cut out where it is larger than the frame)."""
        scale = self.eye_distance_px(metres) / LFW_EYE_DISTANCE_PX
        height, width = photo.shape[:2]
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        photo = cv2.resize(photo, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        frame = np.full((self.height, self.width, 3), 128, np.uint8)
        rows, cols = min(size[1], self.height), min(size[0], self.width)
        top, left = (self.height - rows) // 2, (self.width - cols) // 2
        src_top, src_left = (size[1] - rows) // 2, (size[0] - cols) // 2
        frame[top : top + rows, left : left + cols] = photo[src_top : src_top + rows, src_left : src_left + cols]
        return frame

    def label(self) -> str:
        return f"{self.width}x{self.height}, {self.hfov_degrees:g} deg"


@dataclass(frozen=True)
class Probes:
    """The door's view of some LFW images at one distance: per image, its embedding (zeros
    where no face was found), whether a face was found, and the detector's time."""

    names: list[str]
    embeddings: np.ndarray
    found: np.ndarray
    detect_seconds: np.ndarray


@dataclass(frozen=True)
class DoorScore:
    detector: str
    metres: float | None  # None: both photos enrolled (the LFW runtime path)
    detect_width: int | None  # the pipeline's, at the door; None for the photos
    result: LfwResult
    found: float  # share of the probe frames with a face found
    detect_ms: Percentiles | None

    def to_dict(self) -> dict[str, Any]:
        return {"detector": self.detector, "metres": self.metres, "detect_width": self.detect_width,
                **self.result.scores(),
                "fold_accuracies": self.result.fold_accuracies, "found": self.found,
                "detect_ms": None if self.detect_ms is None else asdict(self.detect_ms)}


def door_probes(pipeline: FacePipeline, camera: Camera, metres: float, paths: Sequence[Path],
                cache: Path, protocol: str) -> Probes:
    """``paths`` seen by ``camera`` at ``metres`` through ``pipeline``, kept in ``cache``
    (reused only for the same images and ``protocol``: aligner, detector code, pick rule)."""
    names = [lfw_name(p) for p in paths]
    if cache.is_file():
        with np.load(cache) as kept:
            # A cache from before the protocol was recorded is stale, like one of another protocol.
            if "protocol" in kept.files and kept["names"].tolist() == names and str(kept["protocol"]) == protocol:
                return Probes(names, kept["embeddings"], kept["found"], kept["detect_seconds"])
    embeddings = np.zeros((len(paths), pipeline.embedder.embedding_size), np.float32)
    found = np.zeros(len(paths), bool)
    seconds = np.zeros(len(paths))
    crops, rows = [], []
    for i, path in enumerate(paths):
        frame = camera.frame(read_image(path), metres)
        start = time.perf_counter()
        detections = pipeline.detect(frame)
        seconds[i] = time.perf_counter() - start
        if detections:
            crops.append(pipeline.embedder.crop(frame, main_face(detections, frame.shape)))
            rows.append(i)
        if len(crops) == EMBED_BATCH or (i == len(paths) - 1 and crops):
            embeddings[rows] = pipeline.embedder.embed(np.stack(crops))
            found[rows] = True
            crops, rows = [], []
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f".{cache.name}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, names=np.array(names), protocol=np.array(protocol), embeddings=embeddings, found=found,
                 detect_seconds=seconds)
    os.replace(tmp, cache)
    return Probes(names, embeddings, found, seconds)


def door_result(lfw: LfwPairs, gallery: np.ndarray, probes: Probes) -> LfwResult:
    """Each pair's first image from ``gallery`` (descriptors per ``lfw.images``) against its
    second as the door saw it; refused where the door found no face."""
    first, second = lfw.pair_indices()
    images = lfw.images
    row = {name: i for i, name in enumerate(probes.names)}
    probe_rows = np.array([row[lfw_name(images[i])] for i in second])
    distances = np.sum((gallery[first] - probes.embeddings[probe_rows]) ** 2, axis=1)
    distances[~probes.found[probe_rows]] = REFUSED
    return evaluate_distances(distances, lfw.issame, n_folds=lfw.folds)


def score_detector(detector: str, model: Path, camera: Camera, distances: Sequence[float],
                   detect_widths: Sequence[int], lfw: LfwPairs, args: argparse.Namespace) -> list[DoorScore]:
    cache = args.cache or args.out / "cache"
    print(f"{detector}: enrolment photos ...", file=sys.stderr, flush=True)
    with LfwFaces(detector, args.threads) as faces, Embedder.from_path(model, num_threads=args.threads) as embedder:
        key = f"{model.stem}-{embedder.identity.sha256[:12]}"
        gallery, _ = lfw_embeddings(lfw, faces, key, describe_with(embedder), cache)
        protocol = faces.protocol
    scores = [DoorScore(detector, None, None, lfw_result(lfw, gallery), 1.0, None)]
    _, second = lfw.pair_indices()
    images = lfw.images
    probe_paths = [images[i] for i in sorted(set(second.tolist()))]
    for width in detect_widths:
        # A width the frame fits in changes nothing: the same cache as a run without the option.
        shrunk = f"-detect{width}" if width < camera.width else ""
        with FacePipeline(model_path=model, detector=detector, num_threads=args.threads,
                          detect_width=width) as pipeline:
            for metres in distances:
                print(f"{detector}, detect width {width}: {len(probe_paths)} frames at {metres:g} m ...",
                      file=sys.stderr, flush=True)
                name = (f"door-{key}-{detector}{shrunk}-{camera.width}x{camera.height}-{camera.hfov_degrees:g}"
                        f"-{metres:g}m.npz")
                probes = door_probes(pipeline, camera, metres, probe_paths, cache / name, protocol)
                scores.append(DoorScore(detector, metres, width, door_result(lfw, gallery, probes),
                                        float(probes.found.mean()), Percentiles.of(probes.detect_seconds)))
    return scores


def print_table(scores: Sequence[DoorScore], camera: Camera, lfw: LfwPairs) -> None:
    print(f"\n## LFW at the door: {len(lfw.pairs)} pairs, camera {camera.label()} "
          f"(f = {camera.focal_px:.0f} px)\n")
    headers = ["detector", "detect width", "distance", "eyes apart (px)", "faces found %", "accuracy %",
               "VAL % @ FAR 1e-3", "detect ms (median)"]
    rows = []
    for s in scores:
        r = s.result
        rows.append([
            s.detector,
            "" if s.detect_width is None else str(s.detect_width),
            "photo" if s.metres is None else f"{s.metres:g} m",
            f"{LFW_EYE_DISTANCE_PX:.0f}" if s.metres is None else f"{camera.eye_distance_px(s.metres):.1f}",
            f"{100 * s.found:.1f}",
            f"{100 * r.accuracy_mean:.2f} ± {100 * r.accuracy_std:.2f}",
            f"{100 * r.val_mean:.1f}",
            "" if s.detect_ms is None else f"{s.detect_ms.p50_ms:.1f}",
        ])
    print(markdown_table(headers, rows))
    print("\n'photo': both photos enrolled (the LFW runtime path). A frame with no face found counts as a refusal.")


def plot(scores: Sequence[DoorScore], path: Path) -> Path:
    from matplotlib.figure import Figure  # optional: no pyplot, no global backend state

    fig = Figure(figsize=(6.4, 4.8))
    ax = fig.add_subplot()
    curves = dict.fromkeys((s.detector, s.detect_width) for s in scores if s.metres is not None)
    several_widths = len({width for _, width in curves}) > 1
    for index, (detector, width) in enumerate(curves):
        door = [s for s in scores if (s.detector, s.detect_width) == (detector, width) and s.metres is not None]
        metres, colour = [s.metres for s in door], f"C{index}"
        label = f"{detector}, detect width {width}" if several_widths else detector
        ax.plot(metres, [100 * s.result.accuracy_mean for s in door], color=colour, marker="o",
                label=f"{label}: accuracy")
        ax.plot(metres, [100 * s.found for s in door], color=colour, linestyle="--", marker=".",
                label=f"{label}: faces found")
    ax.set_xlabel("distance from the camera (m)")
    ax.set_ylabel("%")
    ax.set_ylim(0, 101)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower left", fontsize="small")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def run(args: argparse.Namespace) -> int:
    lfw = require_lfw(args)
    model = models_under_test([args.model] if args.model else None)[0]
    camera = Camera(args.frame[0], args.frame[1], args.hfov)
    distances = args.distances or (QUICK_DISTANCES if args.quick else DISTANCES)
    detectors = args.detectors or ("blazeface", "yunet")
    detect_widths = args.detect_widths or (camera.width,)
    machine = machine_info([args.threads] if args.threads else None)
    print("# facenet-edge LFW at the door\n")
    print(machine_line(machine))
    scores = [s for detector in detectors
              for s in score_detector(detector, model.path, camera, distances, detect_widths, lfw, args)]
    print_table(scores, camera, lfw)
    args.out.mkdir(parents=True, exist_ok=True)
    png = plot(scores, args.out / "door_distance.png")
    config = {"lfw": args.lfw, "pairs": len(lfw.pairs), "model": {"label": model.label, "path": model.path},
              "camera": {"width": camera.width, "height": camera.height, "hfov_degrees": camera.hfov_degrees,
                         "focal_px": camera.focal_px},
              "lfw_eye_distance_px": LFW_EYE_DISTANCE_PX, "eye_distance_m": EYE_DISTANCE_M,
              "distances_m": list(distances), "detectors": list(detectors), "detect_widths": list(detect_widths),
              "threads": args.threads}
    results = {"scores": [s.to_dict() for s in scores], "png": png}
    path = write_json(args.out / "door_distance.json", report("door_distance", machine, config, results, []))
    print(f"\nwrote {path} and {png}")
    return 0


def positive_floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 0.5,1,2, got {text!r}") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"distances must be above 0, got {text!r}")
    return values


def frame_size(text: str) -> tuple[int, int]:
    width, _, height = text.partition("x")
    if not (width.isdigit() and height.isdigit() and int(width) > 0 and int(height) > 0):
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 640x480, got {text!r}")
    return int(width), int(height)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="door_distance", description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    add_lfw_arguments(parser)
    parser.add_argument("--detectors", type=name_list(sorted(DETECTORS)), metavar="NAME,NAME",
                        help="default: blazeface,yunet")
    parser.add_argument("--distances", type=positive_floats, metavar="M,M",
                        help=f"metres from the camera (default: {','.join(f'{d:g}' for d in DISTANCES)})")
    parser.add_argument("--frame", type=frame_size, default=(640, 480), metavar="WxH",
                        help="camera frame (default: 640x480)")
    parser.add_argument("--hfov", type=float, default=62.2, metavar="DEG",
                        help="horizontal field of view in degrees (default: 62.2, Pi Camera Module 2)")
    parser.add_argument("--detect-widths", type=int_list, metavar="W,W",
                        help="the pipeline's detect_width, one door row per width (default: the frame's width)")
    parser.add_argument("--threads", type=int, metavar="N", help="interpreter threads (default: the runtime's)")
    return run_script(parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
