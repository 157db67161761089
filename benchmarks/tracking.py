"""Tracking and fusion against single frames, per attempt, on camera-like sequences built
from LFW photos.

People of LFW's evaluation half with at least K photos are enrolled (E photos each) into a
``Gallery`` whose threshold is the card's for the default target FPIR per attempt. Each of
them then "walks up to the door": their other photos (up to ``--photos``) are shown one
after another, each for ``--frames`` frames, on a 640 x 480 frame with a small drift and
scale change from frame to frame; strangers (people with fewer than K photos, never
enrolled) do the same. Blank frames separate the visits. Every frame goes through the
detector; then three policies decide:

* single frames: the largest face is embedded and matched on every frame; each frame
  with a face is an attempt (what the SDK did per frame);
* vote: the same per-frame answers through ``facenet_edge.Vote`` (3 of the last 5 frames,
  ``facenet-edge stream``'s default); a visit is one attempt;
* tracking + fusion: ``facenet_edge.Tracker`` (``TrackerOptions`` defaults); a visit is
  one attempt, decided by its tracks' fused embeddings.

A visit of an enrolled person is missed (FNIR) unless their name is decided during it; a
stranger's visit is a false positive (FPIR) when any name is. Embed calls are counted.

    python benchmarks/tracking.py [--model M_int8.tflite] [--strangers 600]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
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
from openset import design

from facenet_edge import FacePipeline, Gallery, Vote
from facenet_edge.arguments import positive_int
from facenet_edge.detect import main_face
from facenet_edge.errors import FacenetEdgeError
from facenet_edge.fpir import DEFAULT_FPIR, card_distribution, threshold_for_fpir
from facenet_edge.io import read_image
from facenet_edge.tracker import Tracker, TrackerOptions
from facenet_train.openset_lfw import lfw_images

FRAME = (480, 640)
GAP_FRAMES = 8  # blank frames between visits: more than a track's max_missed
FPS = 15.0
QUICK = {"people": 6, "strangers": 6}


@dataclass(frozen=True)
class Visit:
    name: str
    enrolled: bool
    photos: list[Path]


def visits(lfw_root: Path, min_images: int, enrol: int, photos: int, people: int | None, strangers: int,
           seed: int) -> tuple[dict[str, list[Path]], list[Visit]]:  # fmt: skip
    """(enrolment photos per person, the visits in a shuffled order)."""
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


@dataclass
class Outcome:
    """Attempts and errors of one policy."""

    mated: int = 0
    missed: int = 0
    nonmated: int = 0
    false_positives: int = 0
    embed_calls: int = 0

    def add(self, enrolled: bool, named: set[str], truth: str) -> None:
        if enrolled:
            self.mated += 1
            self.missed += truth not in named
        else:
            self.nonmated += 1
            self.false_positives += bool(named)

    def to_dict(self) -> dict[str, Any]:
        return {
            "mated": self.mated,
            "missed": self.missed,
            "fnir": self.missed / self.mated if self.mated else None,
            "nonmated": self.nonmated,
            "false_positives": self.false_positives,
            "fpir": self.false_positives / self.nonmated if self.nonmated else None,
            "embed_calls": self.embed_calls,
        }


@dataclass
class Policies:
    single: Outcome = field(default_factory=Outcome)
    vote: Outcome = field(default_factory=Outcome)
    tracking: Outcome = field(default_factory=Outcome)


def largest(detections):
    return max(detections, key=lambda d: min(d.box[2] - d.box[0], d.box[3] - d.box[1]), default=None)


def run_visits(pipeline: FacePipeline, gallery: Gallery, shown: Sequence[Visit], per_photo: int,
               options: TrackerOptions, seed: int) -> Policies:  # fmt: skip
    policies = Policies()
    tracker = Tracker(options)
    vote = Vote()
    blank = np.full((*FRAME, 3), 128, np.uint8)
    rng = np.random.default_rng(seed)
    clock = 0
    for number, visit in enumerate(shown):
        voted: set[str] = set()
        tracked: set[str] = set()
        for frame in [*frames_of(visit, per_photo, rng), *[blank] * GAP_FRAMES]:
            clock += 1
            detections = pipeline.detect(frame)
            face = largest(detections)
            name = None
            if face is not None:
                crop = pipeline.embedder.crop(frame, face)
                policies.single.embed_calls += 1
                match = gallery.match(pipeline.embedder.embed(crop[None]), pipeline.identity)[0]
                name = match.name if match is not None and match.accepted else None
                policies.single.add(visit.enrolled, {name} if name else set(), visit.name)
            decided = vote.update(name, clock / FPS)
            if decided is not None:
                voted.add(decided)
            # The tracker sees the same face the single-frame policy matched (a door
            # watches the person nearest to it).
            for seen in tracker.step_detections(pipeline, frame, [face] if face is not None else [], gallery):
                if seen.track.match is not None and seen.track.match.accepted:
                    tracked.add(seen.track.match.name)
        policies.vote.add(visit.enrolled, voted, visit.name)
        policies.tracking.add(visit.enrolled, tracked, visit.name)
        if (number + 1) % 100 == 0:
            print(f"{number + 1}/{len(shown)} visits", file=sys.stderr, flush=True)
    policies.vote.embed_calls = policies.single.embed_calls
    policies.tracking.embed_calls = tracker.embed_calls
    return policies


def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def print_table(policies: Policies, threshold: float) -> list[dict[str, Any]]:
    rows, out = [], []
    single_calls = policies.single.embed_calls
    for label, outcome in (("single frames", policies.single), ("vote 3 of 5 frames", policies.vote),
                           ("tracking + fusion", policies.tracking)):  # fmt: skip
        r = {"policy": label, **outcome.to_dict()}
        r["embed_calls_saved"] = 1 - outcome.embed_calls / single_calls if single_calls else None
        out.append(r)
        rows.append([label, r["mated"], pct(r["fnir"]), r["nonmated"], pct(r["fpir"]), r["false_positives"],
                     r["embed_calls"], pct(r["embed_calls_saved"])])  # fmt: skip
    print(f"\n## Per attempt at the threshold for target FPIR {DEFAULT_FPIR:g} ({threshold:.4f})\n")
    print(markdown_table(["policy", "mated attempts", "FNIR %", "non-mated attempts", "FPIR %", "false positives",
                          "embed calls", "embed calls saved %"], rows))  # fmt: skip
    return out


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
    with FacePipeline(model_path=model) as pipeline, tempfile.TemporaryDirectory(prefix="tracking-") as scratch:
        distribution = card_distribution(pipeline.card)
        if distribution is None:
            raise FacenetEdgeError(
                f"the card of {model} has no impostor distribution (facenet-train calibrate-openset)")
        samples = args.enrol * len(enrolment)
        threshold = threshold_for_fpir(distribution, DEFAULT_FPIR, samples).threshold
        with Gallery.create(Path(scratch) / "door.db", pipeline.identity, threshold) as gallery:
            for name, photos in enrolment.items():
                images = [read_image(p) for p in photos]
                faces = [(pipeline.process(image), image.shape) for image in images]
                embeddings = [main_face(found, shape).embedding for found, shape in faces if found]
                if embeddings:
                    gallery.add(name, np.stack(embeddings), pipeline.identity)
            policies = run_visits(pipeline, gallery, shown, args.frames, options, args.seed)
    results = print_table(policies, threshold)
    elapsed = time.monotonic() - started
    print(f"\n{len(enrolment)} people enrolled ({samples} samples), {len(shown)} visits, {elapsed:.0f} s")
    config = {
        "model": model,
        "min_images": args.min_images,
        "enrol": args.enrol,
        "photos_per_visit": args.photos,
        "frames_per_photo": args.frames,
        "people": len(enrolment),
        "strangers": sum(not v.enrolled for v in shown),
        "target_fpir": DEFAULT_FPIR,
        "threshold": threshold,
        "tracker": options,
        "seed": args.seed,
        "quick": args.quick,
    }
    path = write_json(args.out / "tracking.json",
                      report("tracking", machine, config, {"policies": results, "seconds": elapsed}, []))  # fmt: skip
    print(f"\nwrote {path}")
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
    parser.add_argument("--strangers", type=positive_int, default=600, metavar="S",
                        help="visits by people never enrolled (default: 600)")
    parser.add_argument("--seed", type=int, default=0)
    return run_script(parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
