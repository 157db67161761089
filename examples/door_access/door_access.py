"""Door access: recognise enrolled people at a door camera and unlock for them.

    camera -> FacePipeline + Gallery -> Vote over frames -> unlock hook -> access log

A decision is made only when several recent frames agree (``facenet_edge.Vote``), so one
odd frame never opens the door. Enrolled people are let in; anyone else is refused. Every
decision goes to an SQLite access log (mode 0600). A per-person cooldown keeps someone
standing in front of the camera from unlocking (and being logged) over and over.

Enrol, then run (see README.md for the details and the safety notes)::

    python door_access.py --model m.tflite --enroll-folder photos/ada --name Ada
    python door_access.py --model m.tflite --enroll Ada            # from the camera
    python door_access.py --model m.tflite --relay-pin 17          # run the door

No liveness check: a printed photo or a screen showing an enrolled person can fool a
camera-only system. Do not guard anything that matters with it alone.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import math
import os
import sqlite3
import sys
import threading
import time
from collections.abc import Iterable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

from facenet_edge import (
    Face,
    FacePipeline,
    FacenetEdgeError,
    Frame,
    FrameSource,
    Gallery,
    Tracker,
    Vote,
    card_distribution,
    open_source,
)
from facenet_edge.arguments import add_detect_width
from facenet_edge.camera import redact
from facenet_edge.detect import DEFAULT_DETECTOR, DETECTORS
from facenet_edge.gallery import validate_name

log = logging.getLogger("door_access")

# An unrecognised face votes this. Enrolled names cannot contain control characters (the
# gallery refuses them), so it can never be mistaken for a person.
UNKNOWN_VOTE = "\x00unknown"
UNKNOWN = "unknown"  # how an unrecognised person appears in the access log


class DoorError(Exception):
    """A problem the user can fix (bad option, too few good enrolment frames, ...)."""


# ------------------------------------------------------------------ unlock hooks


class Unlocker(Protocol):
    """What opens the door. Implement ``unlock``/``close`` to plug in your own lock."""

    def unlock(self, name: str) -> None: ...

    def close(self) -> None: ...


class LogUnlocker:
    """No lock attached: says what a lock would have done."""

    def unlock(self, name: str) -> None:
        log.info("UNLOCK for %s (no relay configured: log only)", name)

    def close(self) -> None:
        pass


class RelayUnlocker:
    """A relay on a GPIO pin (``gpiozero.OutputDevice``), energised for ``seconds``.

    The relay is switched off by a timer, so recognition keeps running while the door is open.
    """

    def __init__(self, pin: int, seconds: float, active_high: bool = True) -> None:
        from gpiozero import OutputDevice

        self._relay = OutputDevice(pin, active_high=active_high, initial_value=False)
        self._seconds = seconds
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()

    def unlock(self, name: str) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
            self._relay.on()
            self._timer = threading.Timer(self._seconds, self._relay.off)
            self._timer.daemon = True
            self._timer.start()
        log.info("UNLOCK for %s: relay on for %.1f s", name, self._seconds)

    def close(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
            self._relay.off()  # never leave the door unlocked behind us
            self._relay.close()


def make_unlocker(relay_pin: int | None, seconds: float, active_high: bool = True) -> Unlocker:
    """A relay when a pin is given and gpiozero is installed, else a log line."""
    if relay_pin is None:
        return LogUnlocker()
    if importlib.util.find_spec("gpiozero") is None:
        log.warning("gpiozero is not installed: --relay-pin %d ignored, unlocks are only logged", relay_pin)
        return LogUnlocker()
    try:
        return RelayUnlocker(relay_pin, seconds, active_high)
    except Exception as exc:  # gpiozero raises its own types (no pin factory, pin in use, ...)
        raise DoorError(f"cannot drive a relay on GPIO pin {relay_pin}: {exc}") from exc


# ------------------------------------------------------------------ access log


class AccessLog:
    """Access decisions in an SQLite file that only its owner can read (mode 0600):
    time (Unix seconds), name (or "unknown"), granted, similarity to the nearest enrolled
    person, and optionally a small JPEG thumbnail of the face."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        # Create the file 0600 before SQLite opens it (SQLite gives its journal the same
        # mode), and tighten a file that already exists: it holds who came and when. It is
        # a database that keeps its history, so it is tightened in place as the SDK does
        # with galleries, not replaced by a new file as write-once outputs are.
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        os.chmod(self.path, 0o600)
        self._conn = sqlite3.connect(self.path)
        with self._conn:
            self._conn.execute(
                "CREATE TABLE IF NOT EXISTS access ("
                " id INTEGER PRIMARY KEY, time REAL NOT NULL, name TEXT NOT NULL,"
                " granted INTEGER NOT NULL, similarity REAL, thumbnail BLOB)"
            )

    def record(self, name: str, granted: bool, similarity: float | None, thumbnail: bytes | None = None) -> None:
        with self._conn:  # one transaction per decision: committed before the next frame
            self._conn.execute(
                "INSERT INTO access (time, name, granted, similarity, thumbnail) VALUES (?, ?, ?, ?, ?)",
                (time.time(), name, int(granted), similarity, thumbnail),
            )

    def close(self) -> None:
        self._conn.close()


# ------------------------------------------------------------------ frames and faces


def box_side(face: Face) -> float:
    x1, y1, x2, y2 = face.box
    return float(min(x2 - x1, y2 - y1))


def largest_face(faces: list[Face]) -> Face | None:
    """The face nearest the camera: at a door, that is the person asking to come in."""
    return max(faces, key=box_side, default=None)


def face_crop(image: np.ndarray, face: Face, margin: float = 0.2) -> np.ndarray:
    """The face's box plus ``margin`` on each side, clipped to the image."""
    x1, y1, x2, y2 = face.box
    dx, dy = (x2 - x1) * margin, (y2 - y1) * margin
    height, width = image.shape[:2]
    left, top = max(0, int(x1 - dx)), max(0, int(y1 - dy))
    right, bottom = min(width, int(math.ceil(x2 + dx))), min(height, int(math.ceil(y2 + dy)))
    return image[top:bottom, left:right]


def sharpness(image: np.ndarray, face: Face) -> float:
    """Variance of the Laplacian of the face, resized to 128 x 128 first so the number
    does not depend on how large the face is. Low means blurred."""
    crop = cv2.resize(face_crop(image, face, margin=0.0), (128, 128), interpolation=cv2.INTER_AREA)
    return float(cv2.Laplacian(cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY), cv2.CV_64F).var())


def thumbnail_jpeg(image: np.ndarray, face: Face, size: int = 96) -> bytes | None:
    """A small JPEG of the face for the access log (None if it cannot be made)."""
    crop = face_crop(image, face)
    if crop.size == 0:
        return None
    scale = size / max(crop.shape[:2])
    small = cv2.resize(crop, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(small, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 80])
    return data.tobytes() if ok else None


# ------------------------------------------------------------------ enrolment


@dataclass(frozen=True)
class Quality:
    """What an enrolment frame must meet: one face, at least ``min_face`` pixels across,
    and at least ``min_sharpness`` (variance of the Laplacian, see ``sharpness``)."""

    min_face: int = 80
    min_sharpness: float = 50.0


def rejection(image: np.ndarray, faces: list[Face], quality: Quality) -> str | None:
    """Why this frame is no good for enrolment, or None when it is."""
    if not faces:
        return "no face found"
    if len(faces) > 1:
        return f"{len(faces)} faces in view (only the person enrolling may be visible)"
    side = box_side(faces[0])
    if side < quality.min_face:
        return f"face too small ({side:.0f} px, need {quality.min_face}: come closer)"
    score = sharpness(image, faces[0])
    if score < quality.min_sharpness:
        return f"too blurry (sharpness {score:.0f}, need {quality.min_sharpness:g}: hold still, add light)"
    return None


def enroll_from_frames(
    pipeline: FacePipeline,
    frames: Iterable[Frame],
    quality: Quality,
    samples: int | None,
    interval_s: float = 0.0,
) -> list[np.ndarray]:
    """Embeddings of the good frames, each at least ``interval_s`` after the previous one
    taken (so the samples differ a little), stopping after ``samples`` (None: all).
    Every rejected frame is logged with its reason (repeats of the same reason once)."""
    taken: list[np.ndarray] = []
    last_taken = -math.inf
    last_reason: str | None = None
    for frame in frames:
        what = frame.path.name if frame.path is not None else f"frame {frame.index}"
        try:
            faces = pipeline.process_frame(frame)
        except (ValueError, cv2.error) as exc:  # a corrupt frame is skipped, not fatal
            log.warning("%s skipped: %s", what, exc)
            continue
        reason = rejection(frame.image, faces, quality)
        if reason is not None:
            if reason != last_reason or frame.path is not None:
                log.info("%s rejected: %s", what, reason)
            last_reason = reason
            continue
        last_reason = None
        if frame.timestamp - last_taken < interval_s:
            continue
        taken.append(faces[0].embedding)
        last_taken = frame.timestamp
        log.info("%s accepted: sample %d%s", what, len(taken), f" of {samples}" if samples else "")
        if samples is not None and len(taken) >= samples:
            break
    return taken


def open_gallery_for_enrollment(path: Path, pipeline: FacePipeline, threshold: float | None) -> Gallery:
    """The gallery at ``path``, created when missing with the model card's threshold
    (``thresholds.far_1e3``: the distance at a false-accept rate of 1e-3 on LFW)."""
    identity = pipeline.identity
    if path.exists():
        gallery = Gallery.open(path)
        gallery.check_identity(identity)
        return gallery
    threshold = threshold if threshold is not None else pipeline.card.thresholds.default()
    if threshold is None:
        raise DoorError("the model card has no threshold: pass --threshold D to create the gallery")
    return Gallery.create(path, identity, threshold, embedding_size=pipeline.embedder.embedding_size)


# ------------------------------------------------------------------ the door


@dataclass(frozen=True)
class DoorSettings:
    """``window``/``min_agree``/``max_age_s``: the vote (min_agree of the last window frames,
    none older than max_age_s). ``cooldown_s``: after a decision about someone, further
    decisions about them are ignored this long. Times are on the source's clock."""

    window: int = 5
    min_agree: int = 3
    max_age_s: float = 2.0
    cooldown_s: float = 10.0
    save_thumbnails: bool = False
    max_frames: int | None = None
    # Decide per tracked person from fused frames (facenet_edge.Tracker) instead of the vote.
    track: bool = False


@dataclass
class DoorStats:
    frames: int = 0
    bad_frames: int = 0
    granted: int = 0
    refused: int = 0
    interrupted: bool = False
    started: float = field(default_factory=time.monotonic)

    def summary(self) -> str:
        seconds = time.monotonic() - self.started
        return (
            f"{self.frames} frames in {seconds:.1f} s ({self.bad_frames} bad), "
            f"{self.granted} granted, {self.refused} refused" + (" (interrupted)" if self.interrupted else "")
        )


def run_door(
    pipeline: FacePipeline,
    gallery: Gallery,
    frames: Iterable[Frame],
    unlocker: Unlocker,
    access_log: AccessLog,
    settings: DoorSettings,
) -> DoorStats:
    """Watch ``frames`` until they end, ``max_frames`` or Ctrl-C; returns what happened."""
    stats = DoorStats()
    vote = Vote(window=settings.window, min_agree=settings.min_agree, max_age_s=settings.max_age_s)
    tracker = Tracker() if settings.track else None
    # The latest frame and face behind each vote: what gets logged when that vote wins.
    evidence: dict[str, tuple[np.ndarray, Face]] = {}
    cooldown_until: dict[str, float] = {}
    try:
        for frame in frames:
            stats.frames += 1
            try:
                if tracker is not None:
                    face = tracked_face(tracker, pipeline, frame, gallery)
                else:
                    face = largest_face(pipeline.process_frame(frame, gallery=gallery))
            except (ValueError, cv2.error) as exc:  # a corrupt frame must not stop the door
                stats.bad_frames += 1
                log.warning("frame %d skipped: %s", frame.index, exc)
                face = None
            if face is None:
                seen = None
            else:
                seen = face.match.name if face.match is not None and face.match.accepted else UNKNOWN_VOTE
                evidence[seen] = (frame.image, face)
            if tracker is not None:  # a track decides once, from its fused frames; the cooldown stops repeats
                decided = seen if face is not None and face.match is not None else None
            else:
                decided = vote.update(seen, frame.timestamp)
            if decided is not None:
                vote.reset()  # the next decision needs fresh agreeing frames
                image, decided_face = evidence[decided]
                evidence.clear()
                if frame.timestamp >= cooldown_until.get(decided, -math.inf):
                    cooldown_until[decided] = frame.timestamp + settings.cooldown_s
                    decide(decided, image, decided_face, unlocker, access_log, settings, stats)
            if stats.frames == settings.max_frames:
                break
    except KeyboardInterrupt:
        stats.interrupted = True
    return stats


def tracked_face(tracker: Tracker, pipeline: FacePipeline, frame: Frame, gallery: Gallery) -> Face | None:
    """The nearest person's face with its track's decision as ``match`` (None while the
    track is undecided), or None when nobody is in view."""
    tracked = tracker.step_frame(pipeline, frame, gallery)
    if not tracked:
        return None
    nearest = max(tracked, key=lambda t: box_side(t.detection))
    d = nearest.detection
    return Face(box=d.box, score=d.score, landmarks=d.landmarks, embedding=None, match=nearest.track.match)


def decide(
    decided: str,
    image: np.ndarray,
    face: Face,
    unlocker: Unlocker,
    access_log: AccessLog,
    settings: DoorSettings,
    stats: DoorStats,
) -> None:
    """Act on a vote: unlock for an enrolled person, refuse anyone else; log it either way."""
    granted = decided != UNKNOWN_VOTE
    name = decided if granted else UNKNOWN
    similarity = face.match.similarity if face.match is not None else None
    thumbnail = thumbnail_jpeg(image, face) if settings.save_thumbnails else None
    if granted:
        stats.granted += 1
        unlocker.unlock(name)
    else:
        stats.refused += 1
    # Log after unlocking: the door must not wait on the disk.
    access_log.record(name, granted, similarity, thumbnail)
    shown = "n/a (empty gallery)" if similarity is None else f"{similarity:.3f}"
    log.info("%s: %s (similarity %s)", "GRANTED" if granted else "REFUSED", name, shown)


# ------------------------------------------------------------------ command line


def default_source() -> str:
    """picamera2 on a Raspberry Pi with the library installed, else the first OpenCV camera."""
    return "picamera2" if importlib.util.find_spec("picamera2") is not None else "0"


def open_camera(args: argparse.Namespace) -> FrameSource:
    """The camera (or test video). A live camera is read by a capture thread that keeps
    only the newest frame (``latest_only``), so decisions are about who is at the door
    now, however slow recognition is; a lost camera is reopened with growing pauses,
    ``--max-retries`` times in a row. A video file is read frame by frame."""
    spec = args.source or default_source()
    # A stream URL may carry the camera's password (rtsp://user:pass@cam/...): never log it.
    log.info("camera: %s", redact(spec))
    return open_source(spec, latest_only=True, max_retries=args.max_retries)


def retries(text: str) -> int | None:
    """``--max-retries``: a count, or ``forever`` (None)."""
    if text == "forever":
        return None
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 or more, or 'forever'")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Recognise enrolled people at a door camera and unlock for them.",
        epilog="No liveness check: a photo or a screen can fool it. Use a second factor for anything that matters.",
    )
    parser.add_argument(
        "--model", metavar="PATH", help="embedding model .tflite, its card beside it (default: the packaged model)"
    )
    parser.add_argument(
        "--detector", default=DEFAULT_DETECTOR, choices=sorted(DETECTORS), help="(default: %(default)s)"
    )
    parser.add_argument("--threads", type=int, metavar="N", help="CPU threads for the models")
    add_detect_width(parser)
    parser.add_argument(
        "--gallery",
        type=Path,
        metavar="FILE",
        default=Path("door_gallery.db"),
        help="enrolled people (default: door_gallery.db)",
    )
    parser.add_argument(
        "--source",
        default=None,
        help="camera index, 'picamera2', video file or stream URL (default: picamera2 when installed, else camera 0)",
    )
    parser.add_argument(
        "--max-retries",
        type=retries,
        default=10,
        metavar="N",
        help="reconnect attempts in a row for a lost camera, or 'forever' (default: 10)",
    )
    parser.add_argument(
        "--threshold",
        type=float,
        metavar="D",
        help="accept squared-L2 distances up to D (default: derived for --fpir when the model card has an "
        "impostor distribution, else the gallery's)",
    )
    parser.add_argument(
        "--fpir",
        type=float,
        default=1e-3,
        metavar="RATE",
        help="strangers let in per attempt the threshold is set for, given the people enrolled (default: 1e-3)",
    )

    enrol = parser.add_argument_group("enrolment (enrol, then exit)")
    action = enrol.add_mutually_exclusive_group()
    action.add_argument("--enroll", metavar="NAME", help="enrol NAME from the camera")
    action.add_argument("--enroll-folder", type=Path, metavar="DIR", help="enrol --name from the photos in DIR")
    enrol.add_argument("--name", help="who the photos in --enroll-folder show")
    enrol.add_argument("--samples", type=int, default=5, metavar="N", help="good camera frames to take (default: 5)")
    enrol.add_argument(
        "--sample-interval",
        type=float,
        default=0.5,
        metavar="S",
        help="seconds between camera samples, so they differ (default: 0.5)",
    )
    enrol.add_argument(
        "--min-face",
        type=int,
        default=Quality.min_face,
        metavar="PX",
        help=f"smallest face side accepted for enrolment (default: {Quality.min_face})",
    )
    enrol.add_argument(
        "--min-sharpness",
        type=float,
        default=Quality.min_sharpness,
        metavar="V",
        help=f"variance-of-Laplacian blur limit for enrolment (default: {Quality.min_sharpness:g})",
    )

    door = parser.add_argument_group("door")
    door.add_argument(
        "--vote",
        nargs=2,
        type=int,
        default=[5, 3],
        metavar=("WINDOW", "MIN_AGREE"),
        help="decide when MIN_AGREE of the last WINDOW frames agree (default: 5 3)",
    )
    door.add_argument(
        "--vote-max-age", type=float, default=2.0, metavar="S", help="older frames do not vote (default: 2)"
    )
    door.add_argument(
        "--cooldown",
        type=float,
        default=10.0,
        metavar="S",
        help="ignore further decisions about the same person for S seconds (default: 10)",
    )
    door.add_argument(
        "--track",
        action="store_true",
        help="decide per tracked person from the fused embeddings of several frames instead of the vote",
    )
    door.add_argument("--relay-pin", type=int, metavar="PIN", help="GPIO (BCM) pin of the lock relay (needs gpiozero)")
    door.add_argument("--relay-active-low", action="store_true", help="the relay board switches on a low pin")
    door.add_argument(
        "--unlock-seconds", type=float, default=3.0, metavar="S", help="how long the relay stays on (default: 3)"
    )
    door.add_argument(
        "--access-log", type=Path, default=Path("access_log.db"), metavar="FILE", help="SQLite access log (mode 0600)"
    )
    door.add_argument("--save-thumbnails", action="store_true", help="store a small face JPEG with each decision")
    door.add_argument("--max-frames", type=int, metavar="N", help="stop after N frames (testing)")
    return parser


def enroll(args: argparse.Namespace, pipeline: FacePipeline, stack: ExitStack) -> None:
    """Enrol from a folder of photos or from the camera; the gallery changes only at the end."""
    quality = Quality(min_face=args.min_face, min_sharpness=args.min_sharpness)
    name = validate_name(args.name if args.enroll_folder is not None else args.enroll)  # before any capture
    if args.enroll_folder is not None:
        if not args.enroll_folder.is_dir():
            raise DoorError(f"not a folder: {args.enroll_folder}")
        source = stack.enter_context(open_source(str(args.enroll_folder)))
        embeddings = enroll_from_frames(pipeline, source, quality, samples=None)
        if not embeddings:
            raise DoorError(f"no usable photo of {name} in {args.enroll_folder}; nothing enrolled")
    else:
        source = stack.enter_context(open_camera(args))
        log.info("enrolling %s: look at the camera; %d good frames needed", name, args.samples)
        embeddings = enroll_from_frames(pipeline, source, quality, args.samples, args.sample_interval)
        if len(embeddings) < args.samples:
            raise DoorError(f"the source ended after {len(embeddings)} of {args.samples} good frames; nothing enrolled")
    gallery = stack.enter_context(open_gallery_for_enrollment(args.gallery, pipeline, args.threshold))
    added = gallery.add(name, np.stack(embeddings), pipeline.identity)
    log.info("enrolled %s: %d sample(s) added to %s", name, added, args.gallery)


def run(args: argparse.Namespace, pipeline: FacePipeline, stack: ExitStack) -> DoorStats:
    gallery = stack.enter_context(Gallery.open(args.gallery, threshold=args.threshold))
    gallery.check_identity(pipeline.identity)
    distribution = card_distribution(pipeline.card)
    if args.threshold is None and distribution is not None:
        # The threshold for --fpir strangers let in per attempt, for the people enrolled.
        gallery.use_fpir(distribution, args.fpir)
    if len(gallery) == 0:
        log.warning("gallery %s is empty: everyone will be refused", args.gallery)
    unlocker = make_unlocker(args.relay_pin, args.unlock_seconds, active_high=not args.relay_active_low)
    stack.callback(unlocker.close)
    access_log = AccessLog(args.access_log)
    stack.callback(access_log.close)
    source = stack.enter_context(open_camera(args))
    settings = DoorSettings(
        window=args.vote[0],
        min_agree=args.vote[1],
        max_age_s=args.vote_max_age,
        cooldown_s=args.cooldown,
        save_thumbnails=args.save_thumbnails,
        max_frames=args.max_frames,
        track=args.track,
    )
    point = gallery.operating_point()
    held = f"for {point.fpir:g} strangers let in per attempt" if point is not None else "fixed"
    log.info("door running: %d enrolled, threshold %.4g (squared L2, %s)", len(gallery), gallery.threshold, held)
    return run_door(pipeline, gallery, source, unlocker, access_log, settings)


def main(argv: list[str] | None = None) -> int:
    """Enrol or run the door; returns the exit code (0 ok, 1 error, 130 Ctrl-C)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.enroll_folder is not None and not args.name:
        parser.error("--enroll-folder needs --name NAME")
    if args.samples < 1:
        parser.error("--samples must be at least 1")
    if not 0 < args.fpir < 1:
        parser.error("--fpir must be a rate strictly between 0 and 1, such as 1e-3")
    if not 1 <= args.vote[1] <= args.vote[0]:
        parser.error("--vote WINDOW MIN_AGREE needs 1 <= MIN_AGREE <= WINDOW")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        with ExitStack() as stack:
            pipeline = stack.enter_context(
                FacePipeline(
                    model_path=args.model,
                    detector=args.detector,
                    num_threads=args.threads,
                    detect_width=args.detect_width,
                )
            )
            if args.enroll is not None or args.enroll_folder is not None:
                enroll(args, pipeline, stack)
                return 0
            stats = run(args, pipeline, stack)
        log.info("stopped: %s", stats.summary())  # after the stack closed camera, relay and log
        return 130 if stats.interrupted else 0
    except KeyboardInterrupt:  # during start-up or enrolment (nothing was written)
        log.info("interrupted")
        return 130
    except (FacenetEdgeError, DoorError, OSError, sqlite3.Error) as exc:
        log.error("%s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
