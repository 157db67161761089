"""The ``facenet-edge`` command: enrol, identify, verify, embed, maintain galleries, run a camera.

Errors the user can act on (unreadable image, no face, unknown gallery, wrong model) end
the command with ONE line on stderr and an exit code from :class:`ExitCode`; anything
else is a bug and keeps its traceback. docs/cli.md is the reference.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from datetime import datetime
from enum import IntEnum
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from . import card_summary
from .arguments import add_detect_width, positive_int
from .card import CardError, ModelCard, card_path_for
from .detect import DEFAULT_DETECTOR, DETECTORS, main_face
from .embed import Embedder, default_model_path
from .errors import (
    FacenetEdgeError,
    GalleryError,
    ImageError,
    IncompatibleModelError,
    ModelError,
    MultipleFacesError,
    NoFaceError,
    PoorPhotoError,
)
from .enrolment import QualityOptions, check_face, consistency
from .files import private_file
from .fpir import DEFAULT_FPIR, card_distribution, check_fpir
from .gallery import Gallery, Match, validate_name
from .interpreter import NATIVE_LOG_ENV
from .io import read_image
from .pipeline import Face, FacePipeline, Vote
from .tracker import Tracker


class ExitCode(IntEnum):
    """Exit statuses of every ``facenet-edge`` command (documented in docs/cli.md)."""

    OK = 0
    ERROR = 1  # anything else the user can fix (an output file cannot be written)
    USAGE = 2  # bad arguments (argparse's own code)
    IMAGE = 3  # an image is missing, empty, not an image, too small or too large; a video source fails
    NO_FACE = 4  # no face where one was needed
    MULTIPLE_FACES = 5  # several faces where enrolment needs exactly one
    GALLERY = 6  # gallery missing, not a gallery, unknown name, invalid name
    MODEL = 7  # model missing, truncated, not an embedding model, card unusable
    INCOMPATIBLE = 8  # embeddings from a model incompatible with the gallery's
    INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, as shells report it)


# Most specific first: IncompatibleModelError is a GalleryError.
_EXIT_CODES: list[tuple[type[BaseException], ExitCode]] = [
    (IncompatibleModelError, ExitCode.INCOMPATIBLE),
    (GalleryError, ExitCode.GALLERY),
    (ImageError, ExitCode.IMAGE),
    (NoFaceError, ExitCode.NO_FACE),
    (MultipleFacesError, ExitCode.MULTIPLE_FACES),
    (ModelError, ExitCode.MODEL),
    (CardError, ExitCode.MODEL),
    (FacenetEdgeError, ExitCode.ERROR),
    (OSError, ExitCode.ERROR),
]


def exit_code_for(error: BaseException) -> ExitCode:
    """The exit code reporting ``error`` (an exception type from ``facenet_edge.errors``)."""
    for kind, code in _EXIT_CODES:
        if isinstance(error, kind):
            return code
    raise TypeError(f"no exit code for {type(error).__name__}")


def _one_line(error: BaseException) -> str:
    if isinstance(error, OSError) and error.filename is not None:
        return f"{error.strerror or error}: {error.filename}"
    text = " ".join(part.strip() for part in str(error).splitlines() if part.strip())
    return text or type(error).__name__


def _say(message: str) -> None:
    """One line on stderr that does not tear a progress bar."""
    tqdm.write(f"facenet-edge: {message}", file=sys.stderr)


@dataclass
class _Failures:
    """Per-image failures of a batch command: reported as they happen, summed up at exit."""

    first: ExitCode = ExitCode.OK
    count: int = 0

    def add(self, error: FacenetEdgeError) -> None:
        _say(f"error: {_one_line(error)}")
        if self.first == ExitCode.OK:
            self.first = exit_code_for(error)
        self.count += 1

    def finish(self, total: int) -> int:
        if self.count:
            _say(f"error: {self.count} of {total} image(s) failed")
        return int(self.first)


# ---------------------------------------------------------------- helpers


def _progress(items: Sequence[str], args: argparse.Namespace, what: str) -> Iterable[str]:
    # A bar only for several images, on an interactive stderr, and not with --quiet.
    hidden = args.quiet or len(items) < 2 or not sys.stderr.isatty()
    return tqdm(items, desc=what, unit="image", file=sys.stderr, disable=hidden, leave=False)


def _model_path(args: argparse.Namespace) -> Path:
    return Path(args.model) if args.model else default_model_path()


def _pipeline(args: argparse.Namespace) -> FacePipeline:
    return FacePipeline(
        model_path=_model_path(args), detector=args.detector, num_threads=args.threads, detect_width=args.detect_width
    )


def _faces_per_image(
    pipeline: FacePipeline, args: argparse.Namespace, failures: _Failures, what: str
) -> Iterator[tuple[str, list[Face]]]:
    """(path, faces) for each readable image; unreadable images and images without a face
    are recorded in ``failures`` (an unreadable one is also reported in JSON and skipped)."""
    for path in _progress(args.images, args, what):
        try:
            faces = pipeline.process(read_image(path))
        except ImageError as exc:
            failures.add(exc)
            if args.json:
                _print_json({"path": path, "faces": [], "error": _one_line(exc)})
            continue
        if not faces:
            failures.add(NoFaceError(f"no face found in {path}"))
        yield path, faces


def _threshold(args: argparse.Namespace, card: ModelCard, model: Path) -> float:
    """--threshold, else the model card's default open-set threshold."""
    threshold = args.threshold if args.threshold is not None else card.thresholds.default()
    if threshold is None:
        raise ModelError(f"the model card of {model} has no threshold; pass --threshold")
    return threshold


def _use_fpir(gallery: Gallery, args: argparse.Namespace, card: ModelCard) -> None:
    """Unless --threshold is given, the gallery derives its threshold for --fpir (default
    DEFAULT_FPIR) strangers named per attempt from the card's impostor distribution, for
    the samples it holds. A card without one keeps the gallery's stored threshold."""
    if args.threshold is not None:
        if args.fpir is not None:
            raise GalleryError("--threshold and --fpir both set the threshold: give one")
        return
    distribution = card_distribution(card)
    if distribution is None:
        if args.fpir is not None:
            raise ModelError(
                f"the model card of {card.name} {card.version} has no impostor distribution, so --fpir cannot be "
                "met (facenet-train calibrate-openset writes one); use --threshold"
            )
        return
    gallery.use_fpir(distribution, DEFAULT_FPIR if args.fpir is None else args.fpir)


def _operating_json(gallery: Gallery) -> dict[str, Any]:
    """Which threshold the gallery holds: derived for an FPIR target, or fixed (target None)."""
    point = gallery.operating_point()
    if point is None:
        return {"threshold": round(gallery.threshold, 4), "fpir_target": None}
    return {"threshold": round(point.threshold, 4), "fpir_target": point.fpir, "samples": point.samples}


def _box(face: Face) -> list[float]:
    return [round(float(v), 2) for v in face.box]


def _face_json(face: Face) -> dict[str, Any]:
    data: dict[str, Any] = {"box": _box(face), "score": round(float(face.score), 4)}
    if face.landmarks is not None:
        data["landmarks"] = [[round(float(x), 2), round(float(y), 2)] for x, y in face.landmarks]
    return data


def _match_json(match: Match) -> dict[str, Any]:
    return {
        "name": match.name,
        "distance": round(match.distance, 4),
        "similarity": round(match.similarity, 4),
        "accepted": match.accepted,
    }


def _print_json(data: dict[str, Any]) -> None:
    print(json.dumps(data, ensure_ascii=False), flush=True)


def _enrolment_face(pipeline: FacePipeline, path: str, subject: bool, quality: QualityOptions | None) -> Face:
    """The face to enrol from one photo: the only one, or with ``subject`` the photo's
    subject (``main_face``); NoFaceError / MultipleFacesError otherwise, PoorPhotoError
    when it fails ``quality`` (None: not checked)."""
    image = read_image(path)
    faces = pipeline.process(image)
    if not faces:
        raise NoFaceError(f"no face found in {path}")
    if len(faces) == 1:
        face = faces[0]
    elif not subject:
        raise MultipleFacesError(
            f"{len(faces)} faces found in {path}; enrolment needs exactly one (crop it, or pass --subject)"
        )
    else:
        _say(f"{len(faces)} faces in {path}; enrolling the one covering the centre (else the largest)")
        face = main_face(faces, image.shape)
    if quality is not None:
        verdict = check_face(image, face, [f for f in faces if f is not face], quality)
        if not verdict.ok:
            raise PoorPhotoError(f"{path}: {verdict.reason} (--any-photo enrols it anyway)")
    return face


def _largest_face(faces: Sequence[Face]) -> Face | None:
    if not faces:
        return None
    return max(faces, key=lambda f: float((f.box[2] - f.box[0]) * (f.box[3] - f.box[1])))


def _native_logs(verbose: bool) -> None:
    """OpenCV, FFmpeg and the TFLite runtime print from native code. By default a
    command's stderr carries only its own lines; ``--verbose`` lets theirs through."""
    os.environ[NATIVE_LOG_ENV] = "1" if verbose else "0"
    if verbose:
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_INFO)
        return
    # OpenCV logs its own failures ("[ WARN:0@0.188] ... can't open camera by index")
    # before ours, which says the same in one line.
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    # Read by OpenCV when it first opens a video through FFmpeg (-8: AV_LOG_QUIET): an
    # MP4 with a quarter of its bytes zeroed printed 19,001 decoder lines.
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")


def _iso(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


# ---------------------------------------------------------------- commands


@dataclass(frozen=True)
class Enrolment:
    """What ``enroll`` did: samples added, images skipped (path, reason), and the counts
    after it of the person and of the whole gallery."""

    gallery: str
    name: str
    added: int
    skipped: list[tuple[str, str]]
    person_samples: int
    gallery_people: int
    gallery_samples: int


def cmd_enroll(args: argparse.Namespace) -> int:
    """Embed every image, then add the usable ones in one transaction; an unusable image
    (unreadable, no face, several faces without --subject) is named, skipped, and makes
    the exit code non-zero."""
    name = validate_name(args.name)
    skipped: list[tuple[str, FacenetEdgeError]] = []
    with ExitStack() as stack:
        gallery_path = Path(args.gallery)
        # An existing gallery is opened and checked first, so a wrong or damaged file
        # fails before any model work.
        gallery = stack.enter_context(Gallery.open(gallery_path)) if os.path.lexists(gallery_path) else None
        if gallery is not None:
            gallery.check_integrity()
        pipeline = stack.enter_context(_pipeline(args))
        identity = pipeline.embedder.identity
        if gallery is not None:
            gallery.check_identity(identity)
        embeddings = []
        quality = None if args.any_photo else QualityOptions()
        for path in _progress(args.images, args, "embedding"):
            try:
                embeddings.append(_enrolment_face(pipeline, path, args.subject, quality).embedding)
            except (ImageError, NoFaceError, MultipleFacesError) as exc:
                _say(f"skipped: {_one_line(exc)}")
                skipped.append((path, exc))
        if not embeddings:
            _say(f"error: nothing enrolled: none of the {len(args.images)} image(s) was usable")
            return int(exit_code_for(skipped[0][1]))
        if gallery is None:
            threshold = _threshold(args, pipeline.embedder.card, pipeline.embedder.model_path)
            # create=True: another enrolment creating the same gallery meanwhile is joined.
            gallery = stack.enter_context(
                Gallery.open(
                    gallery_path,
                    create=True,
                    identity=identity,
                    threshold=threshold,
                    embedding_size=pipeline.embedder.embedding_size,
                )
            )
        added = gallery.add(name, np.stack(embeddings), identity)
        people = gallery.list()
        _use_fpir(gallery, args, pipeline.embedder.card)
        samples = consistency(name, gallery.samples_of(name).astype(np.float32), gallery.threshold)
    result = Enrolment(
        gallery=str(gallery_path),
        name=name,
        added=added,
        skipped=[(path, _one_line(exc)) for path, exc in skipped],
        person_samples=next(p.samples for p in people if p.name == name),
        gallery_people=len(people),
        gallery_samples=sum(p.samples for p in people),
    )
    if args.json:
        skipped_json = [{"path": path, "reason": why} for path, why in result.skipped]
        _print_json({**asdict(result), "skipped": skipped_json, "consistency": asdict(samples)})
    else:
        print(
            f"enrolled {name!r}: {added} sample(s) added, {len(skipped)} image(s) skipped; "
            f"{name!r} now has {result.person_samples} sample(s); {gallery_path} holds "
            f"{result.gallery_samples} sample(s) of {result.gallery_people} people"
        )
        _say(samples.line())
    return int(exit_code_for(skipped[0][1])) if skipped else ExitCode.OK


def cmd_identify(args: argparse.Namespace) -> int:
    """Best gallery match(es) for every face in every image; failed images do not stop the run."""
    failures = _Failures()
    with ExitStack() as stack:
        gallery = stack.enter_context(Gallery.open(args.gallery, threshold=args.threshold))
        pipeline = stack.enter_context(_pipeline(args))
        identity = pipeline.embedder.identity
        gallery.check_identity(identity)
        _use_fpir(gallery, args, pipeline.embedder.card)
        for path, faces in _faces_per_image(pipeline, args, failures, "identifying"):
            results = gallery.match_top_k(np.stack([f.embedding for f in faces]), identity, args.top_k) if faces else []
            if args.json:
                faces_json = [_identified_json(f, r) for f, r in zip(faces, results)]
                _print_json({"path": path, "faces": faces_json, **_operating_json(gallery)})
            else:
                for number, (face, found) in enumerate(zip(faces, results), 1):
                    _print_identified(path, number, face, found)
    return failures.finish(len(args.images))


def _identified_json(face: Face, found: list[Match]) -> dict[str, Any]:
    best = found[0] if found and found[0].accepted else None
    return {
        **_face_json(face),
        "name": best.name if best else None,
        "distance": round(found[0].distance, 4) if found else None,
        "matches": [_match_json(m) for m in found],
    }


def _print_identified(path: str, number: int, face: Face, found: list[Match]) -> None:
    where = f"{path} face {number} [{', '.join(f'{v:.0f}' for v in face.box)}]"
    if not found:
        print(f"{where}: unknown (the gallery is empty)")
        return
    best = found[0]
    if best.accepted:
        print(f"{where}: {best.name} (distance {best.distance:.3f})")
    else:
        print(f"{where}: unknown (nearest {best.name}, distance {best.distance:.3f})")
    for rank, match in enumerate(found[1:], 2):
        verdict = "" if match.accepted else ", above threshold"
        print(f"    {rank}. {match.name} (distance {match.distance:.3f}{verdict})")


def cmd_verify(args: argparse.Namespace) -> int:
    """Are the subjects of two photos (``main_face``) the same person?"""
    with _pipeline(args) as pipeline:
        threshold = _threshold(args, pipeline.embedder.card, pipeline.embedder.model_path)
        embeddings = []
        for path in (args.image1, args.image2):
            image = read_image(path)
            faces = pipeline.process(image)
            if not faces:
                raise NoFaceError(f"no face found in {path}")
            face = main_face(faces, image.shape)
            if len(faces) > 1:
                _say(f"{len(faces)} faces in {path}; comparing the one covering the centre (else the largest)")
            embeddings.append(np.asarray(face.embedding, dtype=np.float64))
    distance = float(np.sum((embeddings[0] - embeddings[1]) ** 2))
    similarity = 1.0 - distance / 2.0
    same = distance <= threshold
    if args.json:
        _print_json(
            {
                "image1": args.image1,
                "image2": args.image2,
                "distance": round(distance, 4),
                "similarity": round(similarity, 4),
                "threshold": threshold,
                "same": same,
            }
        )
    else:
        verdict = "same person" if same else "different people"
        print(f"{verdict}: distance {distance:.3f} (threshold {threshold:.3f}), similarity {similarity:.3f}")
    return ExitCode.OK


def cmd_embed(args: argparse.Namespace) -> int:
    """Embeddings of every face in every image, as JSON lines and/or one .npy matrix."""
    failures = _Failures()
    rows: list[np.ndarray] = []
    with ExitStack() as stack:
        out = stack.enter_context(private_file(args.out, FacenetEdgeError)) if args.out is not None else None
        pipeline = stack.enter_context(_pipeline(args))
        for path, faces in _faces_per_image(pipeline, args, failures, "embedding"):
            if args.json:
                faces_json = [
                    {**_face_json(f), "embedding": np.asarray(f.embedding, np.float32).tolist()} for f in faces
                ]
                _print_json({"path": path, "faces": faces_json})
            for number, face in enumerate(faces, 1):
                if not args.json:  # the row number is the face's row in --out
                    print(f"row {len(rows)}: {path} face {number} [{', '.join(f'{v:.0f}' for v in face.box)}]")
                rows.append(np.asarray(face.embedding, np.float32))
        if out is not None:
            # Through a buffer: np.save into a real file writes with C fwrite, whose short
            # write on a full disk surfaces without an errno ("5120 requested and 2016
            # written"); a Python write reports ENOSPC, which names the file.
            buffer = io.BytesIO()
            np.save(buffer, np.stack(rows) if rows else np.zeros((0, pipeline.embedder.embedding_size), np.float32))
            out.write(buffer.getbuffer())
    if args.out is not None:
        _say(f"wrote {len(rows)} embedding(s) to {args.out}")
    return failures.finish(len(args.images))


def cmd_gallery(args: argparse.Namespace) -> int:
    """Gallery maintenance; needs no model."""
    path = Path(args.gallery)
    if args.action == "import" and not os.path.lexists(path):
        with Gallery.restore(path, args.file) as gallery:
            samples = sum(person.samples for person in gallery.list())
        print(f"created {path} from {args.file}: {samples} sample(s)")
        return ExitCode.OK
    with Gallery.open(path) as gallery:
        if args.action == "list":
            _gallery_list(gallery, args)
        elif args.action == "info":
            _gallery_info(gallery, args)
        elif args.action == "remove":
            deleted = gallery.remove(args.name)
            print(f"removed {args.name!r} ({deleted} sample(s)) from {path}")
        elif args.action == "rename":
            gallery.rename(args.old, args.new)
            print(f"renamed {args.old!r} to {args.new!r} in {path}")
        elif args.action == "export":
            count = gallery.export(args.file)
            print(f"exported {count} sample(s) from {path} to {args.file}")
        else:
            added = gallery.import_from(args.file)
            print(f"imported {added} new sample(s) from {args.file} into {path}")
    return ExitCode.OK


def _gallery_info(gallery: Gallery, args: argparse.Namespace) -> None:
    """People, samples, model, and the threshold the gallery holds for --fpir (or fixed)."""
    model = Path(args.model) if args.model else default_model_path()
    _use_fpir(gallery, args, ModelCard.load(card_path_for(model)))
    people = gallery.list()
    info = {
        "gallery": str(gallery.path),
        "people": len(people),
        "samples": sum(p.samples for p in people),
        "model_sha256": gallery.identity.sha256,
        "stored_threshold": gallery.stored_threshold,
        **_operating_json(gallery),
    }
    if args.json:
        _print_json(info)
        return
    target = info["fpir_target"]
    held = f"for FPIR {target:g} per attempt" if target is not None else "fixed"
    print(f"{info['gallery']}: {info['people']} people, {info['samples']} samples; "
          f"threshold {info['threshold']:.4f} ({held}; stored {info['stored_threshold']:.4f})")  # fmt: skip


def _gallery_list(gallery: Gallery, args: argparse.Namespace) -> None:
    people = gallery.list()
    if args.json:
        _print_json(
            {
                "gallery": str(gallery.path),
                "model_sha256": gallery.identity.sha256,
                "compatibility_group": gallery.identity.compatibility_group,
                "threshold": gallery.threshold,
                "people": [
                    {"name": p.name, "samples": p.samples, "created": p.created, "updated": p.updated} for p in people
                ],
            }
        )
        return
    for person in people:
        print(f"{person.name}\t{person.samples} sample(s)\tupdated {_iso(person.updated)}")
    print(f"{len(people)} people in {gallery.path}", file=sys.stderr)


# A network stream's FFmpeg timeouts: without them a server that accepts the connection
# and then stalls holds a read for about 30 s.
_STREAM_TIMEOUTS_MS = {cv2.CAP_PROP_OPEN_TIMEOUT_MSEC: 10_000, cv2.CAP_PROP_READ_TIMEOUT_MSEC: 5_000}


def cmd_stream(args: argparse.Namespace) -> int:
    """Identify the most prominent face in every frame; print a line when the steady
    (voted) decision changes. A live source that delivers no frame for longer than
    --vote-max-age makes the decision "nobody" (a door must not stay open on the last
    name while its camera is down); it keeps reconnecting meanwhile."""
    from .camera import open_source, redact  # capture set-up only when streaming

    window, min_agree = args.vote
    vote = Vote(window=window, min_agree=min_agree, max_age_s=args.vote_max_age)
    decision: str | None = None

    def report(index: int, elapsed: float) -> None:
        if args.json:
            now = datetime.now().astimezone().isoformat(timespec="milliseconds")
            _print_json({"frame": index, "t": round(elapsed, 3), "time": now, "name": decision})
        else:
            print(f"frame {index} t={elapsed:.3f}: {decision or 'nobody'}", flush=True)

    with ExitStack() as stack:
        gallery = stack.enter_context(Gallery.open(args.gallery, threshold=args.threshold))
        pipeline = stack.enter_context(_pipeline(args))
        gallery.check_identity(pipeline.embedder.identity)
        _use_fpir(gallery, args, pipeline.embedder.card)
        tracker = Tracker() if args.track else None
        options = {"params": _STREAM_TIMEOUTS_MS} if "://" in args.source else {}
        # latest_only: a recogniser slower than the camera works on the newest frame.
        source = open_source(args.source, latest_only=True, **options)
        stack.callback(source.close)
        start: float | None = None
        index = 0
        stalled = False
        count = 0
        for frame in _frames(source, args.vote_max_age):
            if frame is None:  # a live source stalled: nobody until frames come back
                if not stalled:
                    _say(f"no frame from {redact(args.source)} for {args.vote_max_age:g} s: deciding nobody")
                    stalled = True
                vote.reset()
                if decision is not None and start is not None:
                    decision = None
                    report(index, time.monotonic() - start)  # live timestamps are monotonic
                continue
            stalled = False
            count += 1
            # Seconds since the stream's first frame: a camera's or folder's clock is
            # monotonic time (since boot), meaningless to a reader.
            start = frame.timestamp if start is None else start
            index = frame.index
            if tracker is not None:
                voted = _tracked_decision(tracker, pipeline, frame, gallery)
            else:
                face = _largest_face(pipeline.process_frame(frame, gallery=gallery))
                seen = face.match.name if face is not None and face.match is not None and face.match.accepted else None
                voted = vote.update(seen, frame.timestamp)
            if voted != decision:
                decision = voted
                report(frame.index, frame.timestamp - start)
            if count == args.max_frames:
                break
    return ExitCode.OK


def _tracked_decision(tracker: Tracker, pipeline: FacePipeline, frame: Any, gallery: Gallery) -> str | None:
    """--track: the name the largest face's track decided from its fused embeddings (None
    while undecided, unknown or absent)."""
    tracked = tracker.step_frame(pipeline, frame, gallery)
    if not tracked:
        return None
    nearest = max(tracked, key=lambda t: float(min(t.detection.box[2] - t.detection.box[0],
                                                  t.detection.box[3] - t.detection.box[1])))  # fmt: skip
    match = nearest.track.match
    return match.name if match is not None and match.accepted else None


def _frames(source: Any, stall_s: float) -> Iterator[Any]:
    """The source's frames; from a live source (which ``open_source(latest_only=True)``
    wrapped in a ``LatestFrameSource``) also None each time no frame came for
    ``stall_s`` seconds."""
    if not source.live:
        yield from source
        return
    while True:
        try:
            yield source.poll(stall_s)
        except EOFError:
            return


def cmd_info(args: argparse.Namespace) -> int:
    """The model card, readable (``--json``: as stored), after checking that the model loads."""
    path = _model_path(args)
    with Embedder.from_path(path) as embedder:
        card, identity = embedder.card, embedder.identity
    if args.json:
        _print_json({"model": str(path), "sha256": identity.sha256, "card": card.to_dict()})
    else:
        print(card_summary.format_rows(card_summary.summary(card, path, identity.sha256)))
    return ExitCode.OK


def cmd_bench(args: argparse.Namespace) -> int:
    """``facenet-edge bench``: latency, FPS, cold start and memory on this machine. Its
    module and its options load only when it runs (the other commands never need them)."""
    from . import bench  # the benchmark harness only when benchmarking

    parser = argparse.ArgumentParser(prog="facenet-edge bench", description=bench.__doc__.split("\n\n")[0])
    bench.add_arguments(parser)
    try:
        options = parser.parse_args(args.bench_arguments)
    except SystemExit as exc:  # --help (0) or a usage error (2): argparse has printed why
        return int(exc.code or 0)
    return bench.run(options)


# ---------------------------------------------------------------- parser


def _distance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 < value < 4.0:
        raise argparse.ArgumentTypeError(f"a squared-L2 threshold lies between 0 and 4, got {value}")
    return value


def _rate(text: str) -> float:
    try:
        return check_fpir(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a rate strictly between 0 and 1, such as 1e-3, got {text!r}") from None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"need a positive number of seconds, got {text!r}")
    return value


def _vote(text: str) -> tuple[int, int]:
    try:
        window, min_agree = (int(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WINDOW:MIN_AGREE such as 5:3, got {text!r}") from None
    if not 1 <= min_agree <= window:
        raise argparse.ArgumentTypeError(f"need 1 <= MIN_AGREE <= WINDOW, got {text!r}")
    return window, min_agree


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (also used to render docs/cli.md's usage lines). A command
    takes only the options it uses: the gallery actions need no model, and only the
    commands that work through a list of images draw a progress bar."""
    model = argparse.ArgumentParser(add_help=False)
    model.add_argument(
        "--model", metavar="PATH", help="embedding model .tflite, card .json beside it (default: the shipped model)"
    )
    model.add_argument(
        "--verbose", action="store_true", help="let OpenCV, FFmpeg and TFLite print their own log lines on stderr"
    )
    running = argparse.ArgumentParser(add_help=False)  # how the pipeline runs
    running.add_argument(
        "--threads", type=positive_int, metavar="N", help="CPU threads for the models (default: the runtime's)"
    )
    running.add_argument(
        "--detector", choices=sorted(DETECTORS), default=DEFAULT_DETECTOR, help="face detector (default: %(default)s)"
    )
    add_detect_width(running)
    quiet = argparse.ArgumentParser(add_help=False)
    quiet.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="machine-readable output, one JSON object per line")
    threshold = argparse.ArgumentParser(add_help=False)
    threshold.add_argument(
        "--threshold",
        type=_distance,
        metavar="D",
        help="squared-L2 decision threshold (default: the model card's / the gallery's)",
    )
    fpir = argparse.ArgumentParser(add_help=False)
    fpir.add_argument(
        "--fpir",
        type=_rate,
        metavar="RATE",
        help=f"target share of strangers given a name per attempt; the gallery's threshold is derived for it and "
        f"the samples it holds, from the model card's impostor distribution (default: {DEFAULT_FPIR:g} when the "
        "card has one; else the gallery's threshold)",
    )
    faces = [model, running]
    batch = [model, running, quiet, as_json]

    parser = argparse.ArgumentParser(prog="facenet-edge", description="Face recognition on small devices.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("enroll", parents=[*batch, threshold, fpir], help="add a person to a gallery")
    p.add_argument(
        "--any-photo",
        action="store_true",
        help="enrol photos that fail the quality checks (small, blurred, turned away, another face beside)",
    )
    p.add_argument("--gallery", required=True, metavar="G", help="gallery file (created if missing)")
    p.add_argument("--name", required=True, help="the person's name")
    p.add_argument(
        "--subject",
        action="store_true",
        help="from a photo with several faces, enrol its subject (the face covering the centre, else the "
        "largest) instead of skipping the photo",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="photos of the person, one face each")
    p.set_defaults(handler=cmd_enroll)

    p = commands.add_parser("identify", parents=[*batch, threshold, fpir], help="who is in these images")
    p.add_argument("--gallery", required=True, metavar="G", help="gallery file to match against")
    p.add_argument("--top-k", type=positive_int, default=1, metavar="K", help="candidates per face (default: 1)")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="photos; every face in each is identified")
    p.set_defaults(handler=cmd_identify)

    p = commands.add_parser("verify", parents=[*faces, as_json, threshold], help="are two faces the same person")
    p.add_argument("image1", metavar="IMAGE1", help="first photo (its subject is compared)")
    p.add_argument("image2", metavar="IMAGE2", help="second photo")
    p.set_defaults(handler=cmd_verify)

    p = commands.add_parser("embed", parents=batch, help="face embeddings of images")
    p.add_argument("--out", metavar="FILE.npy", help="also save all embeddings as one (N, D) float32 .npy")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="photos; every face in each is embedded")
    p.set_defaults(handler=cmd_embed)

    p = commands.add_parser("gallery", help="list, remove, rename, export, import")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    gallery_opts = argparse.ArgumentParser(add_help=False)
    gallery_opts.add_argument("--gallery", required=True, metavar="G", help="gallery file")
    actions.add_parser("list", parents=[gallery_opts, as_json], help="enrolled people")
    a = actions.add_parser(
        "info", parents=[gallery_opts, as_json, threshold, fpir], help="size, model and the threshold it holds"
    )
    a.add_argument("--model", metavar="PATH", help="the model whose card gives the FPIR threshold (default: shipped)")
    a = actions.add_parser("remove", parents=[gallery_opts], help="delete a person and their samples")
    a.add_argument("name", metavar="NAME", help="the person to delete")
    a = actions.add_parser("rename", parents=[gallery_opts], help="rename a person")
    a.add_argument("old", metavar="OLD", help="the current name")
    a.add_argument("new", metavar="NEW", help="the new name (must be free)")
    a = actions.add_parser("export", parents=[gallery_opts], help="write all samples to an .npz")
    a.add_argument("file", metavar="FILE", help="the .npz to write")
    a = actions.add_parser("import", parents=[gallery_opts], help="add the samples of an export")
    a.add_argument("file", metavar="FILE", help="an .npz written by gallery export")
    p.set_defaults(handler=cmd_gallery)

    p = commands.add_parser(
        "stream", parents=[*faces, as_json, threshold, fpir], help="identify faces in a camera or video"
    )
    p.add_argument(
        "--track",
        action="store_true",
        help="follow each face over frames and decide from its fused embeddings (facenet_edge.Tracker) "
        "instead of a vote of single frames",
    )
    p.add_argument(
        "--source", required=True, metavar="SRC", help="camera index, video file, RTSP URL, picamera2 or image folder"
    )
    p.add_argument("--gallery", required=True, metavar="G", help="gallery file to match against")
    p.add_argument("--max-frames", type=positive_int, metavar="N", help="stop after N frames")
    p.add_argument(
        "--vote",
        type=_vote,
        default=(5, 3),
        metavar="WINDOW:MIN_AGREE",
        help="a name must win MIN_AGREE of the last WINDOW frames (default: 5:3)",
    )
    p.add_argument(
        "--vote-max-age",
        type=_seconds,
        default=2.0,
        metavar="S",
        help="frames older than S seconds do not vote, and a live source silent for S seconds means nobody "
        "(default: 2)",
    )
    p.set_defaults(handler=cmd_stream)

    p = commands.add_parser("info", parents=[model, as_json], help="model card summary")
    p.set_defaults(handler=cmd_info)

    # Its options are parsed by cmd_bench, so the benchmark module loads only when it runs.
    p = commands.add_parser("bench", add_help=False, help="latency, FPS, cold start and memory on this machine")
    p.set_defaults(handler=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns its exit code (``facenet-edge`` exits with it)."""
    parser = build_parser()
    try:
        args, rest = parser.parse_known_args(argv)
        if rest and args.command != "bench":
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
    except SystemExit as exc:  # --help (0) or a usage error (2): argparse has printed why
        return int(exc.code or 0)
    args.bench_arguments = rest
    _native_logs(getattr(args, "verbose", False))
    try:
        return int(args.handler(args))
    except BrokenPipeError:
        # The reader of our output went away (``| head``): stop quietly, and keep Python
        # from complaining again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return int(ExitCode.ERROR)
    except (FacenetEdgeError, OSError) as exc:
        _say(f"error: {_one_line(exc)}")
        return int(exit_code_for(exc))
    except KeyboardInterrupt:
        _say("interrupted")
        return int(ExitCode.INTERRUPTED)
