"""Frame -> faces: detect, align, embed (one batch per frame), optionally match a gallery.

Detection runs on a small image (a downscaled copy, or picamera2's ``lores`` stream) and
crops come from the full-resolution frame, so faces keep their detail at little cost.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from .card import ModelCard, ModelIdentity
from .detect import DEFAULT_DETECTOR, Detection, check_image, create_detector
from .embed import Embedder, default_model_path
from .io import read_image

# Frames wider than this are shrunk before detectors that work at the image's own resolution:
# a 640 x 480 camera frame is detected whole, so YuNet still finds faces 3 m away.
DEFAULT_DETECT_WIDTH = 640

if TYPE_CHECKING:  # gallery imports sqlite3, camera capture code; the pipeline only needs their types for hints
    from .camera import Frame
    from .gallery import Match


@dataclass
class Face:
    """One face in a frame: detection in the frame's pixels (``box`` x1, y1, x2, y2;
    detector ``score``; ``landmarks`` 4 x 2, None for box-only detectors), its unit
    ``embedding``, and the gallery's answer when one was given: ``gallery.match``'s
    result for this face (a ``Match``, whose ``accepted`` is the open-set decision, or
    None for an empty gallery; a list of ``Match`` when ``top_k > 1``). None without a
    gallery. ``crop``: the aligned face the embedder saw, RGB uint8 of the model's input
    size (``pipeline.embedder.input_size`` + 3 channels); a view into the frame's batch,
    so keep a copy (``crop.copy()``) to hold one face past the others."""

    box: np.ndarray
    score: float
    landmarks: np.ndarray | None
    embedding: np.ndarray | None
    match: Match | list[Match] | None = None
    crop: np.ndarray | None = None


@dataclass
class PipelineOptions:
    """``model_path``: embedding model (None: the packaged default). ``detector``: backend
    name, with ``detector_options`` passed to it. ``max_faces``: keep the best-scoring few.
    ``min_face_size``: drop faces whose box is smaller (pixels of the processed frame).
    ``detect_width``: frames wider than this are shrunk before detectors that work at the
    image's own resolution (YuNet, Haar); BlazeFace resizes to 128 x 128 itself."""

    model_path: str | None = None
    detector: str = DEFAULT_DETECTOR
    detector_options: dict[str, Any] = field(default_factory=dict)
    num_threads: int | None = None
    max_faces: int | None = None
    min_face_size: int = 20
    detect_width: int = DEFAULT_DETECT_WIDTH


class FacePipeline:
    """Detector + embedder. Not thread-safe: one pipeline per thread.

    ``embedder``: the ``Embedder`` (its ``card``, ``identity``, ``input_size``,
    ``embed(crops)``); ``detector``: the detector backend; ``options``: the
    ``PipelineOptions`` it was made with. ``card`` and ``identity`` are the embedder's
    model card and model identity (what a ``Gallery`` checks), for convenience.
    """

    def __init__(
        self,
        model_path: str | Path | None = None,
        detector: str = DEFAULT_DETECTOR,
        detector_options: dict[str, Any] | None = None,
        num_threads: int | None = None,
        max_faces: int | None = None,
        min_face_size: int = 20,
        detect_width: int = DEFAULT_DETECT_WIDTH,
    ) -> None:
        if detect_width < 1:
            raise ValueError(f"detect_width must be at least 1 pixel, got {detect_width}")
        self.options = PipelineOptions(
            model_path=None if model_path is None else str(model_path),
            detector=detector,
            detector_options=dict(detector_options or {}),
            num_threads=num_threads,
            max_faces=max_faces,
            min_face_size=min_face_size,
            detect_width=detect_width,
        )
        path = model_path if model_path is not None else default_model_path()
        self.embedder = Embedder.from_path(path, num_threads=num_threads)
        try:
            self.detector = create_detector(detector, num_threads=num_threads, **self.options.detector_options)
        except BaseException:
            self.embedder.close()
            raise

    @property
    def card(self) -> ModelCard:
        """The embedding model's card (thresholds, input size, alignment, ...)."""
        return self.embedder.card

    @property
    def identity(self) -> ModelIdentity:
        """The embedding model's identity, as galleries record and check it (the model
        file is hashed once, on first use)."""
        return self.embedder.identity

    @classmethod
    def create_from_options(cls, options: PipelineOptions) -> FacePipeline:
        return cls(
            model_path=options.model_path,
            detector=options.detector,
            detector_options=options.detector_options,
            num_threads=options.num_threads,
            max_faces=options.max_faces,
            min_face_size=options.min_face_size,
            detect_width=options.detect_width,
        )

    def detect(self, image_rgb: np.ndarray) -> list[Detection]:
        """Detections in ``image_rgb``'s pixels, best first, filtered by size and count."""
        check_image(image_rgb)
        width = image_rgb.shape[1]
        limit = self.options.detect_width
        if self.detector.input_size is None and width > limit:
            factor = width / limit
            small = cv2.resize(image_rgb, (limit, round(image_rgb.shape[0] / factor)), interpolation=cv2.INTER_AREA)
            detections = [d.scaled(factor) for d in self.detector.detect(small)]
        else:
            detections = self.detector.detect(image_rgb)
        return self._filter(detections)

    def _filter(self, detections: list[Detection]) -> list[Detection]:
        size = self.options.min_face_size
        kept = [d for d in detections if min(d.box[2] - d.box[0], d.box[3] - d.box[1]) >= size]
        return kept[: self.options.max_faces] if self.options.max_faces is not None else kept

    def process(self, image_rgb: np.ndarray, gallery: Any = None, top_k: int = 1) -> list[Face]:
        """Faces in an RGB uint8 frame, embedded, and matched against ``gallery`` if given."""
        return self._faces(image_rgb, self.detect(image_rgb), gallery, top_k)

    def process_frame(self, frame: Frame, gallery: Any = None, top_k: int = 1) -> list[Face]:
        """Faces in a frame from a source: detected on its ``lores`` image when it has one
        (picamera2's small stream) and cropped from its full ``image``, else all from ``image``."""
        return self._faces(frame.image, self.detect_frame(frame), gallery, top_k)

    def detect_frame(self, frame: Frame) -> list[Detection]:
        """Detections in a frame from a source, in its ``image``'s pixels: found on its
        ``lores`` image when it has one, else on ``image`` (what ``process_frame`` and
        ``Tracker.step_frame`` crop from)."""
        if frame.lores is not None:
            return self.detect_lores(frame.lores, frame.image)
        return self.detect(frame.image)

    def process_lores(
        self, lores_rgb: np.ndarray, main_rgb: np.ndarray, gallery: Any = None, top_k: int = 1
    ) -> list[Face]:
        """Detect on the small ``lores`` frame, crop from ``main`` (same field of view, as
        picamera2 gives them). Boxes are returned in ``main``'s pixels."""
        return self._faces(main_rgb, self.detect_lores(lores_rgb, main_rgb), gallery, top_k)

    def detect_lores(self, lores_rgb: np.ndarray, main_rgb: np.ndarray) -> list[Detection]:
        """Detections on the small ``lores`` frame, in ``main``'s pixels."""
        check_image(lores_rgb)
        check_image(main_rgb)
        fx = main_rgb.shape[1] / lores_rgb.shape[1]
        fy = main_rgb.shape[0] / lores_rgb.shape[0]
        if abs(fx - fy) > 0.01 * fx:
            raise ValueError(
                f"lores {lores_rgb.shape[1]}x{lores_rgb.shape[0]} and main {main_rgb.shape[1]}x{main_rgb.shape[0]} "
                "must have the same aspect ratio"
            )
        return self._filter([d.scaled(fx) for d in self.detector.detect(lores_rgb)])

    def _faces(self, image: np.ndarray, detections: list[Detection], gallery: Any, top_k: int) -> list[Face]:
        if not detections:
            return []
        crops = np.stack([self.embedder.crop(image, d) for d in detections])
        embeddings = self.embedder.embed(crops)
        if gallery is None:
            matches = [None] * len(detections)
        elif top_k == 1:
            matches = gallery.match(embeddings, self.embedder.identity)
        else:
            matches = gallery.match_top_k(embeddings, self.embedder.identity, top_k)
        return [
            Face(box=d.box, score=d.score, landmarks=d.landmarks, embedding=e, match=m, crop=c)
            for d, e, m, c in zip(detections, embeddings, matches, crops)
        ]

    def embed_image(self, image: str | Path | np.ndarray) -> list[Face]:
        """Faces of an image file or RGB array, embedded (no matching)."""
        return self.process(image if isinstance(image, np.ndarray) else read_image(image))

    def close(self) -> None:
        self.detector.close()
        self.embedder.close()

    def __enter__(self) -> FacePipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Vote:
    """Steady decisions over frames (door use): ``update`` returns a name only while at
    least ``min_agree`` of the last ``window`` frames, none older than ``max_age_s``,
    named that person; otherwise None. A tie between two names is None."""

    def __init__(self, window: int = 5, min_agree: int = 3, max_age_s: float = 2.0) -> None:
        if not 1 <= min_agree <= window:
            raise ValueError(f"need 1 <= min_agree <= window, got min_agree={min_agree}, window={window}")
        self.min_agree = min_agree
        self.max_age_s = max_age_s
        self._history: deque[tuple[float, str | None]] = deque(maxlen=window)

    def update(self, name: str | None, timestamp: float) -> str | None:
        """Record this frame's answer (None: unknown or no face) and return the decision."""
        self._history.append((timestamp, name))
        recent = [n for t, n in self._history if n is not None and timestamp - t <= self.max_age_s]
        ranked = Counter(recent).most_common(2)
        if not ranked or ranked[0][1] < self.min_agree:
            return None
        if len(ranked) == 2 and ranked[1][1] == ranked[0][1]:
            return None
        return ranked[0][0]

    def reset(self) -> None:
        """Forget all frames (e.g. after the door opened)."""
        self._history.clear()
