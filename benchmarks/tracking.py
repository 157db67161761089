"""Tracking and fusion against single frames and the vote, per attempt, at matched FPIR, on
camera-like sequences built from LFW photos.

People of LFW's evaluation half with at least K photos are enrolled (E photos each) into a
``Gallery``. Each of them then "walks up to the door": their other photos (up to
``--photos``) are shown one after another, each for ``--frames`` frames, on a 640 x 480
frame with a small drift and scale change from frame to frame; strangers (people with fewer
than K photos, never enrolled; all of them by default) do the same. Blank frames separate
the visits. The model's work is done once per frame (the detector, then the largest face
embedded; blank frames have no face to find) and cached per model with ``--cache``; then
three policies decide from the same faces and embeddings:

* single frames: every frame's face is matched; each frame with a face is an attempt
  (what the SDK did per frame);
* vote: the same per-frame answers through ``facenet_edge.Vote`` (3 of the last 5 frames,
  ``facenet-edge stream``'s default); a visit is one attempt;
* tracking + fusion: ``facenet_edge.Tracker`` (``TrackerOptions`` defaults) decides from
  the fused embeddings of the visit's track; a visit is one attempt.

Each policy's attempt gets a score: the lowest threshold at which it names someone, and
who (the per-name thresholds are derived below so that "the policy names N at threshold t"
is exactly "N's score < t", a match being accepted below t). A mated attempt (an enrolled
person's) is missed or misnamed at t unless its score is below t and names them; a
non-mated attempt is a false positive when its score is below t. Sweeping t gives each
policy's DET curve, FNIR at FPIR 1 % and 0.1 % per attempt (the matched comparison), and the
operating point at the threshold the card derives for the default target FPIR; embed calls
are counted.

    python benchmarks/tracking.py [--model M_int8.tflite] [--strangers S] [--cache DIR] [--plot PNG]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from common import (
    add_common_arguments,
    default_lfw,
    machine_info,
    machine_line,
    markdown_table,
    report,
    resolve_model,
    run_script,
    write_json,
)
from openset import FPIR_POINTS, design, pct, threshold_at_fpir

from facenet_edge import FacePipeline, Gallery
from facenet_edge.arguments import positive_int
from facenet_edge.detect import Detection, main_face
from facenet_edge.errors import FacenetEdgeError
from facenet_edge.fpir import DEFAULT_FPIR, card_distribution, threshold_for_fpir
from facenet_edge.io import read_image
from facenet_edge.tracker import Tracker, TrackerOptions
from facenet_train.data import detectors_version
from facenet_train.openset_lfw import lfw_images

FRAME = (480, 640)
GAP_FRAMES = 8  # blank frames between visits: more than a track's max_missed and the vote's window
FPS = 15.0
# facenet_edge.Vote's defaults, which `facenet-edge stream` uses.
VOTE = {"window": 5, "min_agree": 3, "max_age_s": 2.0}
POLICIES = ("single frames", "vote 3 of 5 frames", "tracking + fusion")
QUICK = {"people": 6, "strangers": 6}
CACHE_VERSION = 1  # bump when what a cached recording holds changes


@dataclass(frozen=True)
class Visit:
    name: str
    enrolled: bool
    photos: list[Path]


def visits(lfw_root: Path, min_images: int, enrol: int, photos: int, people: int | None, strangers: int | None,
           seed: int) -> tuple[dict[str, list[Path]], list[Visit]]:  # fmt: skip
    """(enrolment photos per person, the visits in a shuffled order); ``strangers`` None: all."""
    lfw = lfw_images(lfw_root)
    plan = design(lfw, min_images, people, None)
    rng = np.random.default_rng(seed)
    enrolment: dict[str, list[Path]] = {}
    shown: list[Visit] = []
    for name, rows in plan.people.items():
        order = [lfw.images[i] for i in rng.permutation(rows)]
        enrolment[name] = order[:enrol]
        shown.append(Visit(name, True, order[enrol : enrol + photos]))
    by_person: dict[str, list[Path]] = {}
    for row in plan.nonmated:
        by_person.setdefault(lfw.images[row].parent.name, []).append(lfw.images[row])
    names = sorted(by_person)
    for i in rng.permutation(len(names))[:strangers]:
        shown.append(Visit(names[i], False, by_person[names[i]][:photos]))
    return enrolment, [shown[i] for i in rng.permutation(len(shown))]


def frames_of(visit: Visit, per_photo: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """The visit's photos on a grey frame, drifting a few pixels and changing scale a
    little from frame to frame, as someone standing at a door does."""
    height, width = FRAME
    for path in visit.photos:
        photo = read_image(path)
        scale = rng.uniform(0.95, 1.2)
        x, y = rng.uniform(-40, 40), rng.uniform(-30, 30)
        for _ in range(per_photo):
            scale *= rng.uniform(0.98, 1.02)
            x, y = x + rng.uniform(-6, 6), y + rng.uniform(-4, 4)
            side = int(round(photo.shape[0] * scale))
            resized = cv2.resize(photo, (side, side), interpolation=cv2.INTER_AREA)
            frame = np.full((height, width, 3), 128, np.uint8)
            left, top = int(width / 2 + x - side / 2), int(height / 2 + y - side / 2)
            frame[top : top + side, left : left + side] = resized
            yield frame


# --------------------------------------------------------------------------- the model's work, once


@dataclass(frozen=True)
class Recording:
    """Per frame of the stream: the largest face's ``boxes`` (NaN: no face) and detector
    ``scores``, its ``embeddings``, and the ``visit`` it belongs to (its gap frames too);
    ``enrolled``: each person's enrolment embeddings."""

    boxes: np.ndarray
    scores: np.ndarray
    embeddings: np.ndarray
    visit: np.ndarray
    enrolled: dict[str, np.ndarray]

    @property
    def faces(self) -> np.ndarray:
        return ~np.isnan(self.boxes[:, 0])

    def detection(self, frame: int) -> Detection | None:
        return Detection(self.boxes[frame], float(self.scores[frame])) if self.faces[frame] else None

    def save(self, path: Path) -> None:
        names = sorted(self.enrolled)
        np.savez(path, boxes=self.boxes, scores=self.scores, embeddings=self.embeddings, visit=self.visit,
                 enrolled_names=np.array([n for n in names for _ in self.enrolled[n]]),
                 enrolled_embeddings=np.concatenate([self.enrolled[n] for n in names]))  # fmt: skip

    @classmethod
    def load(cls, path: Path) -> Recording:
        with np.load(path) as data:
            owners, vectors = data["enrolled_names"], data["enrolled_embeddings"]
            enrolled = {str(n): vectors[owners == n] for n in np.unique(owners)}
            return cls(data["boxes"], data["scores"], data["embeddings"], data["visit"], enrolled)


def largest(detections: Sequence[Detection]) -> Detection | None:
    """The face nearest the camera (a door watches the person in front of it)."""
    return max(detections, key=lambda d: min(d.box[2] - d.box[0], d.box[3] - d.box[1]), default=None)


def record(pipeline: FacePipeline, enrolment: dict[str, list[Path]], shown: Sequence[Visit], per_photo: int,
           seed: int) -> Recording:  # fmt: skip
    enrolled: dict[str, np.ndarray] = {}
    for name, photos in enrolment.items():
        images = [read_image(p) for p in photos]
        faces = [(pipeline.process(image), image.shape) for image in images]
        embeddings = [main_face(found, shape).embedding for found, shape in faces if found]
        if embeddings:
            enrolled[name] = np.stack(embeddings)
    rng = np.random.default_rng(seed)
    boxes: list[np.ndarray] = []
    scores: list[float] = []
    embeddings: list[np.ndarray] = []
    visit: list[int] = []
    dim = next(iter(enrolled.values())).shape[1]
    for number, shown_visit in enumerate(shown):
        frames = list(frames_of(shown_visit, per_photo, rng))
        found = [largest(pipeline.detect(frame)) for frame in frames]
        crops = [pipeline.embedder.crop(frame, face) for frame, face in zip(frames, found) if face is not None]
        embedded = iter(pipeline.embedder.embed(np.stack(crops)) if crops else [])
        for face in [*found, *[None] * GAP_FRAMES]:
            boxes.append(np.full(4, np.nan) if face is None else np.asarray(face.box, dtype=float))
            scores.append(0.0 if face is None else float(face.score))
            embeddings.append(np.zeros(dim, np.float32) if face is None else next(embedded))
            visit.append(number)
        if (number + 1) % 250 == 0:
            print(f"{number + 1}/{len(shown)} visits", file=sys.stderr, flush=True)
    return Recording(np.array(boxes), np.array(scores), np.array(embeddings, np.float32), np.array(visit), enrolled)


# --------------------------------------------------------------------------- per-name thresholds per policy


def vote_thresholds(matches: Sequence[tuple[str, float] | None], times: Sequence[float], window: int,
                    min_agree: int, max_age_s: float) -> list[dict[str, float]]:  # fmt: skip
    """Per frame, name -> the threshold above which ``Vote(window, min_agree, max_age_s)``,
    fed each frame's nearest person when their distance is below the threshold (else None),
    decides that name at this frame: the ``min_agree``-th smallest distance of the recent
    frames in the window that name it. Exact only when ``min_agree`` is over half the
    window: then no other name can tie or outvote one that has ``min_agree`` frames."""
    if 2 * min_agree <= window:
        raise ValueError(f"a vote of {min_agree} of {window} can tie: no single threshold per name")
    out = []
    for j in range(len(matches)):
        start = max(0, j - window + 1)
        by_name: dict[str, list[float]] = {}
        for match, at in zip(matches[start : j + 1], times[start : j + 1]):
            if match is not None and times[j] - at <= max_age_s:
                by_name.setdefault(match[0], []).append(match[1])
        out.append({n: sorted(d)[min_agree - 1] for n, d in by_name.items() if len(d) >= min_agree})
    return out


class Replay:
    """The ``FacePipeline`` the tracker sees when it replays a recording: each frame is
    passed as its face's embedding, which is what "cropping" the face gives, and embedding
    that returns it (the tracker's crop of the same detection is the one already embedded)."""

    def __init__(self, identity: Any) -> None:
        self.identity = identity
        self.embedder = self

    @staticmethod
    def crop(image: np.ndarray, detection: Detection) -> np.ndarray:
        return image

    @staticmethod
    def embed(crops: np.ndarray) -> np.ndarray:
        return crops


def tracker_thresholds(recording: Recording, gallery: Any, identity: Any,
                       options: TrackerOptions) -> tuple[list[dict[str, float]], int]:  # fmt: skip
    """Per frame, name -> the distance of the fused match a track decided for that name
    (the tracker embeds, fuses and matches whatever the threshold: only ``accepted``
    depends on it), and the tracker's embed calls."""
    tracker = Tracker(options)
    stand_in = Replay(identity)
    out = []
    for frame in range(len(recording.visit)):
        face = recording.detection(frame)
        seen = tracker.step_detections(stand_in, recording.embeddings[frame], [] if face is None else [face], gallery)
        decided: dict[str, float] = {}
        for tracked in seen:
            match = tracked.track.match
            if match is not None:
                decided[match.name] = min(decided.get(match.name, math.inf), match.distance)
        out.append(decided)
    return out, tracker.embed_calls


@dataclass(frozen=True)
class Attempt:
    """One attempt of a policy: the ``visit`` it belongs to and, per name, the threshold
    above which the policy names that person during it (``thresholds``)."""

    visit: int
    thresholds: dict[str, float]

    def first(self) -> tuple[str | None, float]:
        """(the name decided at the lowest threshold, that threshold); (None, inf): nobody, ever."""
        if not self.thresholds:
            return None, math.inf
        name = min(self.thresholds, key=self.thresholds.__getitem__)
        return name, self.thresholds[name]


def per_visit(per_frame: Sequence[dict[str, float]], visit: np.ndarray, count: int) -> list[Attempt]:
    """A visit names a person at t when any of its frames does."""
    merged: list[dict[str, float]] = [{} for _ in range(count)]
    for decided, number in zip(per_frame, visit):
        for name, threshold in decided.items():
            merged[number][name] = min(merged[number].get(name, math.inf), threshold)
    return [Attempt(number, m) for number, m in enumerate(merged)]


def policy_attempts(recording: Recording, gallery: Any, identity: Any,
                    options: TrackerOptions) -> tuple[dict[str, list[Attempt]], dict[str, int]]:  # fmt: skip
    """Per policy, its attempts and embed calls."""
    faces = np.flatnonzero(recording.faces)
    nearest = gallery.match(recording.embeddings[faces], identity) if len(faces) else []
    matches: list[tuple[str, float] | None] = [None] * len(recording.visit)
    for frame, match in zip(faces, nearest):
        matches[frame] = (match.name, match.distance)
    single = [Attempt(int(recording.visit[f]), {matches[f][0]: matches[f][1]}) for f in faces]
    times = [frame / FPS for frame in range(len(matches))]
    count = int(recording.visit.max()) + 1 if len(recording.visit) else 0
    voted = per_visit(vote_thresholds(matches, times, **VOTE), recording.visit, count)
    tracked, tracker_calls = tracker_thresholds(recording, gallery, identity, options)
    attempts = dict(zip(POLICIES, (single, voted, per_visit(tracked, recording.visit, count))))
    return attempts, dict(zip(POLICIES, (len(faces), len(faces), tracker_calls)))


# --------------------------------------------------------------------------- FNIR against FPIR


@dataclass(frozen=True)
class PolicyScores:
    """``mated``: per enrolled person's attempt, the threshold above which it names them
    first (inf: never); ``nonmated``: per stranger's attempt, the threshold above which it
    names anyone (inf: never)."""

    policy: str
    mated: np.ndarray
    nonmated: np.ndarray
    embed_calls: int

    @classmethod
    def of(cls, policy: str, attempts: Sequence[Attempt], shown: Sequence[Visit], embed_calls: int) -> PolicyScores:
        mated, nonmated = [], []
        for attempt in attempts:
            name, score = attempt.first()
            visit = shown[attempt.visit]
            if visit.enrolled:
                mated.append(score if name == visit.name else math.inf)
            else:
                nonmated.append(score)
        return cls(policy, np.array(mated, float), np.array(nonmated, float), embed_calls)

    def at(self, threshold: float) -> dict[str, Any]:
        """Errors when matches below ``threshold`` are accepted."""
        missed = int(np.sum(self.mated >= threshold))
        false_positives = int(np.sum(self.nonmated < threshold))
        return {
            "threshold": threshold if math.isfinite(threshold) else None,
            "mated": len(self.mated),
            "missed": missed,
            "fnir": missed / len(self.mated) if len(self.mated) else None,
            "nonmated": len(self.nonmated),
            "false_positives": false_positives,
            "fpir": false_positives / len(self.nonmated) if len(self.nonmated) else None,
        }

    def at_fpir(self, fpir: float) -> dict[str, Any] | None:
        """At the largest threshold that names at most ``fpir`` of the strangers' attempts
        (None when there are too few to resolve it)."""
        threshold = threshold_at_fpir(self.nonmated, fpir)
        return None if threshold is None else {"target_fpir": fpir, **self.at(threshold)}

    def det(self, points: int = 200) -> dict[str, list[float]]:
        """(FPIR, FNIR) at up to ``points`` thresholds, each the largest naming k strangers'
        attempts (the next stranger's score; beyond the last, any distance)."""
        ordered = np.sort(self.nonmated[np.isfinite(self.nonmated)])
        if not len(ordered):
            return {"fpir": [], "fnir": []}
        thresholds = np.append(ordered, math.inf)[np.unique(np.geomspace(1, len(ordered), points).astype(int))]
        fpir = np.searchsorted(ordered, thresholds) / len(self.nonmated)
        fnir = 1.0 - np.searchsorted(np.sort(self.mated), thresholds) / max(1, len(self.mated))
        return {"fpir": fpir.tolist(), "fnir": fnir.tolist()}


def print_tables(scores: Sequence[PolicyScores], threshold: float) -> dict[str, Any]:
    single_calls = scores[0].embed_calls
    results: dict[str, Any] = {"matched": [], "operating_point": []}
    print("\n## FNIR per attempt at matched FPIR per attempt\n")
    rows = []
    for fpir in FPIR_POINTS:
        for s in scores:
            point = s.at_fpir(fpir)
            results["matched"].append({"policy": s.policy, "target_fpir": fpir, **(point or {})})
            if point is None:
                rows.append([f"{fpir:g}", s.policy, len(s.nonmated), "-", "-", "-", "-"])
                continue
            at = "-" if point["threshold"] is None else f"{point['threshold']:.4f}"
            rows.append([f"{fpir:g}", s.policy, point["nonmated"], point["false_positives"], pct(point["fpir"]), at,
                         pct(point["fnir"])])  # fmt: skip
    print(markdown_table(["FPIR at most", "policy", "non-mated attempts", "false positives", "FPIR %", "threshold",
                          "FNIR %"], rows))  # fmt: skip
    print(f"\n## At the card's threshold for target FPIR {DEFAULT_FPIR:g} ({threshold:.4f})\n")
    rows = []
    for s in scores:
        point = s.at(threshold)
        saved = 1 - s.embed_calls / single_calls if single_calls else None
        results["operating_point"].append({"policy": s.policy, **point, "embed_calls": s.embed_calls,
                                           "embed_calls_saved": saved})  # fmt: skip
        rows.append([s.policy, point["mated"], pct(point["fnir"]), point["nonmated"], pct(point["fpir"]),
                     point["false_positives"], s.embed_calls, pct(saved)])  # fmt: skip
    print(markdown_table(["policy", "mated attempts", "FNIR %", "non-mated attempts", "FPIR %", "false positives",
                          "embed calls", "embed calls saved %"], rows))  # fmt: skip
    return results


def plot_det(scores: Sequence[PolicyScores], threshold: float, path: Path) -> Path:
    """Each policy's DET curve on log FPIR, with its point at the card's threshold."""
    from matplotlib.figure import Figure  # optional: no pyplot, no global backend state

    fig = Figure(figsize=(6.4, 4.8))
    ax = fig.add_subplot()
    for s in scores:
        curve = s.det()
        line = ax.plot(curve["fpir"], curve["fnir"], label=f"{s.policy} ({len(s.nonmated)} non-mated)")[0]
        point = s.at(threshold)
        if point["fpir"]:
            ax.plot([point["fpir"]], [point["fnir"]], "o", color=line.get_color())
    for fpir in FPIR_POINTS:
        ax.axvline(fpir, color="grey", linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlim(1e-4, 1.0)
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("FPIR per attempt (strangers' attempts given a name)")
    ax.set_ylabel("FNIR per attempt (enrolled people missed or misnamed)")
    ax.set_title(f"DET per attempt, LFW door sequences; dots: card threshold for FPIR {DEFAULT_FPIR:g}",
                 fontsize="small")  # fmt: skip
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower left", fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


# --------------------------------------------------------------------------- the run


def recording_for(pipeline: FacePipeline, enrolment: dict[str, list[Path]], shown: Sequence[Visit],
                  args: argparse.Namespace, config: dict[str, Any]) -> Recording:  # fmt: skip
    """The recording, from ``--cache`` when one was made by the same model, detector (name
    and code) and configuration."""
    if args.cache is None:
        return record(pipeline, enrolment, shown, args.frames, args.seed)
    key = json.dumps({**config, "model_sha256": pipeline.identity.sha256, "detector": pipeline.options.detector,
                      "detectors": detectors_version(), "version": CACHE_VERSION}, sort_keys=True)
    path = args.cache / f"tracking-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"
    if path.is_file():
        print(f"recording read from {path}", file=sys.stderr)
        return Recording.load(path)
    recording = record(pipeline, enrolment, shown, args.frames, args.seed)
    args.cache.mkdir(parents=True, exist_ok=True)
    recording.save(path)
    return recording


def run(args: argparse.Namespace) -> int:
    if args.lfw is None or not args.lfw.is_dir():
        raise FacenetEdgeError(f"LFW not found ({args.lfw or '../shared/data/lfw'}): pass --lfw DIR")
    model = resolve_model(args.model)
    machine = machine_info()
    print("# facenet-edge tracking and fusion\n")
    print(machine_line(machine))
    started = time.monotonic()
    people = QUICK["people"] if args.quick else None
    strangers = QUICK["strangers"] if args.quick else args.strangers
    enrolment, shown = visits(args.lfw, args.min_images, args.enrol, args.photos, people, strangers, args.seed)
    options = TrackerOptions()
    config = {
        "lfw": str(args.lfw.resolve()),
        "min_images": args.min_images,
        "enrol": args.enrol,
        "photos_per_visit": args.photos,
        "frames_per_photo": args.frames,
        "people": len(enrolment),
        "strangers": sum(not v.enrolled for v in shown),
        "seed": args.seed,
    }
    with FacePipeline(model_path=model) as pipeline, tempfile.TemporaryDirectory(prefix="tracking-") as scratch:
        distribution = card_distribution(pipeline.card)
        if distribution is None:
            raise FacenetEdgeError(
                f"the card of {model} has no impostor distribution (facenet-train calibrate-openset)")
        recording = recording_for(pipeline, enrolment, shown, args, config)
        samples = sum(len(e) for e in recording.enrolled.values())
        threshold = threshold_for_fpir(distribution, DEFAULT_FPIR, samples).threshold
        # The gallery's own accept flag is not used: every decision is read off the distances.
        with Gallery.create(Path(scratch) / "door.db", pipeline.identity, threshold) as gallery:
            for name, embeddings in recording.enrolled.items():
                gallery.add(name, embeddings, pipeline.identity)
            attempts, calls = policy_attempts(recording, gallery, pipeline.identity, options)
    scores = [PolicyScores.of(p, attempts[p], shown, calls[p]) for p in POLICIES]
    results = print_tables(scores, threshold)
    png = plot_det(scores, threshold, args.plot or args.out / "tracking_det.png")
    elapsed = time.monotonic() - started
    print(f"\n{len(recording.enrolled)} people enrolled ({samples} samples), {len(shown)} visits "
          f"({config['strangers']} strangers), {int(recording.faces.sum())} frames with a face, "
          f"{elapsed:.0f} s")  # fmt: skip
    results.update({
        "det": {s.policy: s.det() for s in scores},
        "scores": {s.policy: {"mated": [v if math.isfinite(v) else None for v in s.mated.tolist()],
                              "nonmated": [v if math.isfinite(v) else None for v in s.nonmated.tolist()]}
                   for s in scores},
        "det_png": png,
        "seconds": elapsed,
    })  # fmt: skip
    config.update({"model": model, "samples": samples, "target_fpir": DEFAULT_FPIR, "threshold": threshold,
                   "vote": VOTE, "tracker": options, "quick": args.quick})  # fmt: skip
    path = write_json(args.out / "tracking.json", report("tracking", machine, config, results, []))
    print(f"\nwrote {path} and {png}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tracking", description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--lfw", type=Path, default=default_lfw(), metavar="DIR",
                        help="LFW folder, one folder of images per person (default: ../shared/data/lfw)")
    parser.add_argument("--min-images", type=positive_int, default=4, metavar="K",
                        help="people with at least K photos are enrolled (default: 4)")
    parser.add_argument("--enrol", type=positive_int, default=3, metavar="E", help="photos enrolled (default: 3)")
    parser.add_argument("--photos", type=positive_int, default=3, metavar="P", help="photos per visit (default: 3)")
    parser.add_argument("--frames", type=positive_int, default=5, metavar="F", help="frames per photo (default: 5)")
    parser.add_argument("--strangers", type=positive_int, metavar="S",
                        help="visits by people never enrolled (default: every one of the evaluation half)")
    parser.add_argument("--cache", type=Path, metavar="DIR",
                        help="keep the model's work (detections, embeddings) here, per model and configuration")
    parser.add_argument("--plot", type=Path, metavar="PNG", help="the DET plot (default: OUT/tracking_det.png)")
    parser.add_argument("--seed", type=int, default=0)
    return run_script(parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
