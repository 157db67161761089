"""Stream embeddings: every face in a camera, video file or RTSP stream, with its embedding,
written as JSON Lines or as chunked ``.npz`` files.

A live source is read through ``facenet_edge.LatestFrameSource`` (``open_source(...,
latest_only=True)``): a capture thread keeps only the newest frame, so a slow device
falls behind by dropping frames (counted and reported) instead of building a backlog of
ever-older ones. A video file or a folder is read in step with processing: every frame is
processed unless ``--every``/``--fps`` say otherwise. ``--fps`` counts seconds of the
source's own clock (a video file's position), so a file is thinned the same however fast
the device is; a folder of images has no clock, so there ``--fps`` is refused.

    python stream_embed.py --source 0 --out faces.jsonl
    python stream_embed.py --source rtsp://cam/stream --fps 5 --out faces.npz --chunk 500
    python stream_embed.py --source clip.mp4 --every 3 --out -   # JSON Lines on stdout

Embeddings are biometric data: every output file is a new file with mode 0600, replacing
any file of that name (an old 0644 one included).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Iterable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Protocol

import cv2
import numpy as np

from facenet_edge import FacePipeline, FacenetEdgeError, Frame, open_source
from facenet_edge.arguments import add_detect_width
from facenet_edge.detect import DEFAULT_DETECTOR, DETECTORS
from facenet_edge.files import private_file

log = logging.getLogger("stream_embed")


# ------------------------------------------------------------------ reading frames


@dataclass
class FrameGate:
    """Which frames to process: every ``every``-th frame, and no more than ``fps`` per
    second of the source's clock (None: no limit)."""

    every: int = 1
    fps: float | None = None
    _seen: int = field(default=0, init=False, repr=False)
    _last: float = field(default=-float("inf"), init=False, repr=False)

    def __call__(self, frame: Frame) -> bool:
        self._seen += 1
        if (self._seen - 1) % self.every:
            return False
        # A little slack so a 30 fps source is not cut to 15 by jitter when asking for 30.
        if self.fps is not None and frame.timestamp - self._last < 0.95 / self.fps:
            return False
        self._last = frame.timestamp
        return True


# ------------------------------------------------------------------ writing faces


@dataclass(frozen=True)
class FaceRecord:
    """One face: ``timestamp`` in seconds (the position for a video file, Unix time of
    capture otherwise), the frame's index, box (x1, y1, x2, y2), detector score and the
    128-d unit embedding."""

    timestamp: float
    frame: int
    box: np.ndarray
    score: float
    embedding: np.ndarray


class Writer(Protocol):
    def write(self, records: list[FaceRecord]) -> None: ...

    def close(self) -> None: ...


def output_path(path: str) -> Path:
    """``--out`` as a path, checked up front: a missing folder is one clear line, not an
    errno from deep inside the writer."""
    target = Path(path)
    if not target.parent.is_dir():
        raise FileNotFoundError(f"output folder does not exist: {target.parent}")
    return target


def open_private(path: Path) -> IO[str]:
    """A new, empty file at ``path`` with mode 0600, open for writing text.

    The SDK's ``private_file`` publishes it (a new file renamed over any old one), so an
    old 0644 file, or someone who opened it while it was readable, never sees the
    embeddings; writing an existing file in place would keep both. The embeddings are then
    written through a duplicate of its descriptor, so lines reach the file as they come
    (``tail -f``) instead of only when the stream ends."""
    with private_file(path, FacenetEdgeError) as file:
        fd = os.dup(file.fileno())
    return os.fdopen(fd, "w")


class JsonLinesWriter:
    """One JSON object per face per line; flushed every frame so ``tail -f`` sees it."""

    def __init__(self, path: str) -> None:
        self._file = sys.stdout if path == "-" else open_private(output_path(path))

    def write(self, records: list[FaceRecord]) -> None:
        for r in records:
            line = {
                "timestamp": round(r.timestamp, 6),
                "frame": r.frame,
                "box": [round(float(v), 2) for v in r.box],
                "score": round(float(r.score), 4),
                "embedding": [float(v) for v in r.embedding],
            }
            self._file.write(json.dumps(line) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not sys.stdout:
            self._file.close()


class NpzChunkWriter:
    """``--out faces.npz --chunk N``: ``faces-00000.npz``, ``faces-00001.npz``, ... of up to
    N faces each, with arrays ``timestamp``, ``frame``, ``box``, ``score``, ``embedding``.
    Each chunk is written by the SDK's ``private_file``: under a temporary name, fsynced and
    renamed, so a reader never sees half a chunk, and mode 0600 even over an old 0644 file."""

    def __init__(self, path: str, chunk: int) -> None:
        self._path = output_path(path)
        self._chunk = chunk
        self._pending: list[FaceRecord] = []
        self.files: list[Path] = []

    def write(self, records: list[FaceRecord]) -> None:
        self._pending.extend(records)
        while len(self._pending) >= self._chunk:
            self._flush(self._pending[: self._chunk])
            del self._pending[: self._chunk]

    def _flush(self, records: list[FaceRecord]) -> None:
        target = self._path.with_name(f"{self._path.stem}-{len(self.files):05d}.npz")
        with private_file(target, FacenetEdgeError) as file:
            np.savez(
                file,
                timestamp=np.array([r.timestamp for r in records], dtype=np.float64),
                frame=np.array([r.frame for r in records], dtype=np.int64),
                box=np.array([r.box for r in records], dtype=np.float32),
                score=np.array([r.score for r in records], dtype=np.float32),
                embedding=np.array([r.embedding for r in records], dtype=np.float32),
            )
        self.files.append(target)
        log.info("wrote %s (%d faces)", target, len(records))

    def close(self) -> None:
        if self._pending:
            self._flush(self._pending)
            self._pending.clear()


# ------------------------------------------------------------------ the loop


@dataclass
class StreamStats:
    read: int = 0
    processed: int = 0
    skipped: int = 0
    dropped: int = 0
    bad: int = 0
    faces: int = 0
    interrupted: bool = False
    started: float = field(default_factory=time.monotonic)

    def fps(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.processed / elapsed if elapsed > 0 else 0.0

    def summary(self) -> str:
        return (
            f"{self.read} frames read, {self.processed} processed, {self.skipped} skipped, "
            f"{self.dropped} dropped, {self.bad} bad, {self.faces} faces, {self.fps():.1f} fps"
            + (" (interrupted)" if self.interrupted else "")
        )


class FpsReadout:
    """A status line on stderr at most once per ``interval_s``: redrawn in place on a
    terminal, one line each time otherwise (a log file)."""

    def __init__(self, interval_s: float = 1.0, stream: IO = sys.stderr) -> None:
        self._interval = interval_s
        self._stream = stream
        self._tty = stream.isatty()
        self._next = time.monotonic() + interval_s
        self._window: tuple[float, int] = (time.monotonic(), 0)  # fps over the last interval

    def update(self, stats: StreamStats) -> None:
        now = time.monotonic()
        if now < self._next:
            return
        since, processed = self._window
        fps = (stats.processed - processed) / (now - since)
        self._window, self._next = (now, stats.processed), now + self._interval
        line = f"{fps:5.1f} fps | {stats.processed} frames | {stats.faces} faces | {stats.dropped} dropped"
        self._stream.write(f"\r{line}" if self._tty else f"{line}\n")
        self._stream.flush()

    def finish(self) -> None:
        if self._tty:
            self._stream.write("\n")


def embed_stream(
    pipeline: FacePipeline,
    frames: Iterable[Frame],
    writer: Writer,
    gate: FrameGate,
    file_clock: bool,
    max_frames: int | None = None,
    readout: FpsReadout | None = None,
) -> StreamStats:
    """Process frames until the source ends, ``max_frames`` are processed, or Ctrl-C.
    ``frames``: any source; a ``LatestFrameSource``'s ``dropped`` count is reported.
    ``file_clock``: timestamps are positions in a video file (else monotonic, turned into
    Unix time)."""
    stats = StreamStats()
    to_unix = 0.0 if file_clock else time.time() - time.monotonic()
    taken = 0

    def count() -> None:  # read = handed to us + dropped by the capture thread
        stats.dropped = getattr(frames, "dropped", 0)
        stats.read = taken + stats.dropped

    try:
        for frame in frames:
            taken += 1
            count()
            if not gate(frame):
                stats.skipped += 1
                continue
            try:
                faces = pipeline.process_frame(frame)
            except (ValueError, cv2.error) as exc:  # a corrupt frame is skipped, not fatal
                stats.bad += 1
                log.warning("frame %d skipped: %s", frame.index, exc)
                continue
            stamp = frame.timestamp + to_unix
            writer.write([FaceRecord(stamp, frame.index, f.box, f.score, f.embedding) for f in faces])
            stats.processed += 1
            stats.faces += len(faces)
            if readout is not None:
                readout.update(stats)
            if stats.processed == max_frames:
                break
    except KeyboardInterrupt:
        stats.interrupted = True
    count()
    return stats


# ------------------------------------------------------------------ command line


def retries(text: str) -> int | None:
    """``--max-retries``: a count, or ``forever`` (None)."""
    if text == "forever":
        return None
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 or more, or 'forever'")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Write every face of a video stream with its embedding.")
    parser.add_argument(
        "--model", metavar="PATH", help="embedding model .tflite, its card beside it (default: the packaged model)"
    )
    parser.add_argument(
        "--detector", default=DEFAULT_DETECTOR, choices=sorted(DETECTORS), help="(default: %(default)s)"
    )
    parser.add_argument("--threads", type=int, metavar="N", help="CPU threads for the models")
    add_detect_width(parser)
    parser.add_argument(
        "--source",
        default="0",
        help="camera index, 'picamera2', video file, RTSP/HTTP URL or a folder of images (default: 0)",
    )
    parser.add_argument(
        "--out", required=True, metavar="FILE", help="FILE.jsonl (JSON Lines; '-' for stdout) or FILE.npz (chunks)"
    )
    parser.add_argument("--chunk", type=int, default=1000, metavar="N", help="faces per .npz chunk (default: 1000)")
    parser.add_argument("--every", type=int, default=1, metavar="N", help="process every N-th frame (default: 1)")
    parser.add_argument(
        "--fps",
        type=float,
        metavar="F",
        help="process at most F frames per second of the source's clock: a camera's or stream's, or a video "
        "file's own time (not for a folder of images: use --every)",
    )
    parser.add_argument("--max-frames", type=int, metavar="N", help="stop after processing N frames")
    parser.add_argument(
        "--max-retries",
        type=retries,
        default=10,
        metavar="N",
        help="reconnect attempts in a row for a lost camera or stream, or 'forever' (default: 10)",
    )
    parser.add_argument("--quiet", "-q", action="store_true", help="no fps readout")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Returns the exit code: 0 ok, 1 error, 130 Ctrl-C."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.every < 1 or args.chunk < 1 or (args.fps is not None and args.fps <= 0):
        parser.error("--every and --chunk must be at least 1, --fps above 0")
    folder = Path(args.source).is_dir()
    if folder and args.fps is not None:
        # Images in a folder have no capture times: pacing them by how fast this device
        # happens to process them would keep an arbitrary few.
        parser.error("--fps needs a source with a clock (camera, stream, video file); for a folder use --every N")
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
            # The output first: a bad --out fails before the camera is opened.
            writer = NpzChunkWriter(args.out, args.chunk) if args.out.endswith(".npz") else JsonLinesWriter(args.out)
            stack.callback(writer.close)
            # A live source is read by a capture thread keeping only the newest frame, and
            # reopened with growing pauses when lost; files and folders frame by frame.
            source = stack.enter_context(open_source(args.source, latest_only=True, max_retries=args.max_retries))
            readout = None if args.quiet else FpsReadout()
            stats = embed_stream(
                pipeline,
                source,
                writer,
                FrameGate(every=args.every, fps=args.fps),
                file_clock=not source.live and not folder,
                max_frames=args.max_frames,
                readout=readout,
            )
            if readout is not None:
                readout.finish()
        # Printed after the stack closed the source and flushed the last chunk.
        print(f"stream_embed: {stats.summary()}", file=sys.stderr)
        return 130 if stats.interrupted else 0
    except KeyboardInterrupt:  # during start-up
        print("stream_embed: interrupted", file=sys.stderr)
        return 130
    except (FacenetEdgeError, OSError) as exc:
        print(f"stream_embed: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
