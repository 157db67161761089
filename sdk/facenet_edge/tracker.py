"""Tracking and fusion: one person in front of the camera is one attempt, not one per frame.

Detection runs on every frame (cheap); each face is followed from frame to frame by the
overlap (IoU) of its box with the box its track had last. A track is embedded on every
frame until it has ``min_frames`` embeddings; then its decision is the gallery's answer
for the normalised mean of its ``fuse`` best-quality embeddings (quality: detector score
times face size, so small or doubtful detections weigh nothing). Averaging cancels much
of each frame's noise, which is what lets a door accept more of its people without
accepting more strangers (``benchmarks/tracking.py``, docs/benchmarks.md). Once decided,
a track is embedded only every ``reembed_every`` frames, to follow a change (someone
turning towards the camera); the embed calls saved are counted.

A track that misses ``max_missed`` frames in a row ends; the next detection there starts
a new track (a new attempt).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .detect import Detection

if TYPE_CHECKING:  # gallery imports sqlite3, camera capture code; the tracker only needs their types for hints
    from .camera import Frame
    from .gallery import Match


@dataclass(frozen=True)
class TrackerOptions:
    """``min_iou``: the least box overlap that continues a track. ``max_missed``: frames a
    track survives without a detection. ``min_frames``: embeddings before a track is
    decided. ``fuse``: best-quality embeddings averaged. ``reembed_every``: a decided
    track is embedded on every k-th frame only."""

    min_iou: float = 0.3
    max_missed: int = 5
    min_frames: int = 3
    fuse: int = 5
    reembed_every: int = 10

    def __post_init__(self) -> None:
        if not 0.0 < self.min_iou <= 1.0:
            raise ValueError(f"min_iou must be in (0, 1], got {self.min_iou}")
        for name in ("min_frames", "fuse", "reembed_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_missed < 0:
            raise ValueError(f"max_missed must be at least 0, got {self.max_missed}")


@dataclass
class Track:
    """One face followed over frames. ``match``: the gallery's answer for the fused
    embedding (None until decided, or with no gallery). ``frames``: frames it was seen
    in; ``embedded``: embeddings taken; ``samples``: the best ones, (quality, unit vector)."""

    id: int
    box: np.ndarray
    frames: int = 1
    missed: int = 0
    embedded: int = 0
    since_embedded: int = 0
    samples: list[tuple[float, np.ndarray]] = field(default_factory=list)
    match: Match | None = None

    @property
    def decided(self) -> bool:
        return self.match is not None

    def fused(self) -> np.ndarray | None:
        """The unit mean of the kept samples (None before the first)."""
        if not self.samples:
            return None
        mean = np.mean([e for _, e in self.samples], axis=0)
        return mean / np.linalg.norm(mean)


@dataclass(frozen=True)
class TrackedFace:
    """A face in this frame: its ``track`` (whose ``match`` is the fused decision),
    ``detection``, and whether it was ``embedded`` this frame."""

    track: Track
    detection: Detection
    embedded: bool


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes."""
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    if width <= 0 or height <= 0:
        return 0.0
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def quality(detection: Detection) -> float:
    """How much a frame's embedding is worth: detector score times the face's smaller side."""
    x1, y1, x2, y2 = detection.box
    return float(detection.score) * float(max(0.0, min(x2 - x1, y2 - y1)))


class Tracker:
    """IoU tracker with per-track fusion. Not thread-safe: one per camera loop.

    ``update(detections)`` assigns this frame's detections to tracks; ``step(pipeline,
    image, gallery)`` does a whole frame: detect, track, embed only the tracks that need
    it, fuse and match. ``embed_calls`` and ``faces_seen`` count what was embedded out of
    what was detected."""

    def __init__(self, options: TrackerOptions | None = None) -> None:
        self.options = options or TrackerOptions()
        self.tracks: list[Track] = []
        self._next_id = 1
        self.embed_calls = 0
        self.faces_seen = 0

    def update(self, detections: Sequence[Detection]) -> list[tuple[Track, Detection]]:
        """Continue tracks with this frame's detections (greedy, highest IoU first), start
        a track for each detection left over, end tracks missed too long."""
        pairs = sorted(
            ((iou(t.box, d.box), ti, di) for ti, t in enumerate(self.tracks) for di, d in enumerate(detections)),
            reverse=True,
        )
        used_tracks: set[int] = set()
        used_detections: set[int] = set()
        assigned: list[tuple[Track, Detection]] = []
        for overlap, ti, di in pairs:
            if overlap < self.options.min_iou:
                break
            if ti in used_tracks or di in used_detections:
                continue
            used_tracks.add(ti)
            used_detections.add(di)
            track = self.tracks[ti]
            track.box = np.asarray(detections[di].box, dtype=float)
            track.frames += 1
            track.missed = 0
            assigned.append((track, detections[di]))
        for ti, track in enumerate(self.tracks):
            if ti not in used_tracks:
                track.missed += 1
        self.tracks = [t for t in self.tracks if t.missed <= self.options.max_missed]
        for di, detection in enumerate(detections):
            if di not in used_detections:
                track = Track(id=self._next_id, box=np.asarray(detection.box, dtype=float))
                self._next_id += 1
                self.tracks.append(track)
                assigned.append((track, detection))
        return assigned

    def wants_embedding(self, track: Track) -> bool:
        """Undecided tracks: every frame; decided ones: every ``reembed_every``-th."""
        return not track.decided or track.since_embedded + 1 >= self.options.reembed_every

    def add_embedding(self, track: Track, embedding: np.ndarray, weight: float) -> None:
        """Keep ``embedding`` among the track's ``fuse`` best by ``weight``."""
        unit = np.asarray(embedding, dtype=np.float32)
        track.samples.append((weight, unit / np.linalg.norm(unit)))
        track.samples.sort(key=lambda s: s[0], reverse=True)
        del track.samples[self.options.fuse :]
        track.embedded += 1
        track.since_embedded = 0

    def ready(self, track: Track) -> bool:
        """Enough embeddings to decide."""
        return track.embedded >= self.options.min_frames

    def step(self, pipeline: Any, image: np.ndarray, gallery: Any = None) -> list[TrackedFace]:
        """One frame through ``pipeline`` (a ``FacePipeline``): detect, track, embed the
        tracks that want it (one batch), and match the fused embedding of every track
        ready to decide against ``gallery``."""
        return self.step_detections(pipeline, image, pipeline.detect(image), gallery)

    def step_frame(self, pipeline: Any, frame: Frame, gallery: Any = None) -> list[TrackedFace]:
        """As :meth:`step`, for a ``Frame`` from a source: detected on its ``lores`` image
        when it has one (``FacePipeline.detect_frame``, as ``process_frame`` does), embedded
        from its full ``image``."""
        return self.step_detections(pipeline, frame.image, pipeline.detect_frame(frame), gallery)

    def step_detections(
        self, pipeline: Any, image: np.ndarray, detections: Sequence[Detection], gallery: Any = None
    ) -> list[TrackedFace]:
        """As :meth:`step`, with this frame's detections given, in ``image``'s pixels."""
        assigned = self.update(detections)
        self.faces_seen += len(assigned)
        wanted = [(t, d) for t, d in assigned if self.wants_embedding(t)]
        for track, _ in assigned:
            track.since_embedded += 1
        if wanted:
            crops = np.stack([pipeline.embedder.crop(image, d) for _, d in wanted])
            embeddings = pipeline.embedder.embed(crops)
            self.embed_calls += len(wanted)
            for (track, detection), embedding in zip(wanted, embeddings):
                self.add_embedding(track, embedding, quality(detection))
            ready = [t for t, _ in wanted if self.ready(t)]
            if ready and gallery is not None:
                matches = gallery.match(np.stack([t.fused() for t in ready]), pipeline.identity)
                for track, match in zip(ready, matches):
                    track.match = match
        embedded = {id(t) for t, _ in wanted}
        return [TrackedFace(t, d, id(t) in embedded) for t, d in assigned]

    def reset(self) -> None:
        """Forget every track (e.g. the camera moved); counters are kept."""
        self.tracks = []
