"""Enrolment quality: refuse photos that would make a gallery worse, and show how
consistent a person's samples are, before a bad enrolment refuses them at the door.

A sample is compared with every query for as long as it is enrolled, so one blurred,
tiny, turned-away or wrong face costs on every attempt. A photo is refused, with the
reason, when its face is

* too small (fewer than ``min_face`` pixels across: the aligner upsamples noise),
* blurred (variance of the Laplacian of the face resized to 128 x 128 below
  ``min_sharpness``; the same measure at every face size),
* turned away (yaw from the landmarks: the nose's offset from the eyes' midpoint, in eye
  distances, beyond ``max_yaw``; or the eye line tilted beyond ``max_roll_deg``),
* not alone: another face at least ``neighbour_size`` times the subject's size within
  ``neighbour_distance`` face widths of it (the wrong person could be the one enrolled).

Consistency: the mean and largest squared-L2 distance between a person's samples,
against the threshold a query must meet. Samples farther apart than the threshold are the
same person photographed very differently (a query like one of them may be refused), or
two people under one name.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import cv2
import numpy as np

# Face side the sharpness is measured at, so the number does not depend on the face's size.
_SHARPNESS_SIDE = 128


class HasFace(Protocol):
    box: np.ndarray
    landmarks: np.ndarray | None


@dataclass(frozen=True)
class QualityOptions:
    """Limits an enrolment photo's face must meet (see the module's docstring)."""

    min_face: int = 60
    min_sharpness: float = 25.0
    max_yaw: float = 0.4
    max_roll_deg: float = 30.0
    neighbour_size: float = 0.4
    neighbour_distance: float = 3.0


@dataclass(frozen=True)
class Quality:
    """What was measured on one face, and ``reason`` (None: good to enrol)."""

    side: float
    sharpness: float
    yaw: float | None
    roll_deg: float | None
    reason: str | None

    @property
    def ok(self) -> bool:
        return self.reason is None


def side_of(face: HasFace) -> float:
    x1, y1, x2, y2 = face.box
    return float(min(x2 - x1, y2 - y1))


def sharpness(image: np.ndarray, face: HasFace) -> float:
    """Variance of the Laplacian of the face's box, resized to 128 x 128 first."""
    height, width = image.shape[:2]
    x1, y1, x2, y2 = (int(round(v)) for v in face.box)
    crop = image[max(0, y1) : min(height, y2), max(0, x1) : min(width, x2)]
    if crop.size == 0:
        return 0.0
    grey = cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY) if crop.ndim == 3 else crop
    grey = cv2.resize(grey, (_SHARPNESS_SIDE, _SHARPNESS_SIDE), interpolation=cv2.INTER_AREA)
    return float(cv2.Laplacian(grey, cv2.CV_64F).var())


def pose(landmarks: np.ndarray) -> tuple[float, float]:
    """(yaw, roll in degrees) from BlazeFace's landmarks (image-left eye, image-right eye,
    nose tip, mouth centre). Yaw: the nose's offset from the eyes' midpoint along the eye
    line, in eye distances (0 frontal, about 0.5 in profile)."""
    left, right, nose = (np.asarray(p, dtype=float) for p in landmarks[:3])
    eyes = right - left
    distance = float(np.hypot(*eyes))
    if distance == 0:
        return math.inf, 0.0
    roll = math.degrees(math.atan2(eyes[1], eyes[0]))
    along = float(np.dot(nose - (left + right) / 2, eyes / distance))
    return along / distance, roll


def check_face(image: np.ndarray, face: HasFace, others: Sequence[HasFace], options: QualityOptions) -> Quality:
    """Measure ``face`` in ``image`` (``others``: the other faces found there) and say
    why it should not be enrolled, if it should not."""
    side = side_of(face)
    sharp = sharpness(image, face)
    yaw, roll = pose(face.landmarks) if face.landmarks is not None else (None, None)
    reason = None
    near = [o for o in others if _near(face, o, side, options)]
    if side < options.min_face:
        reason = f"face too small ({side:.0f} px, need {options.min_face})"
    elif sharp < options.min_sharpness:
        reason = f"too blurry (sharpness {sharp:.0f}, need {options.min_sharpness:g})"
    elif yaw is not None and abs(yaw) > options.max_yaw:
        reason = f"face turned away (yaw {yaw:+.2f} eye distances, limit {options.max_yaw:g})"
    elif roll is not None and abs(roll) > options.max_roll_deg:
        reason = f"head tilted ({roll:+.0f} degrees, limit {options.max_roll_deg:g})"
    elif near:
        reason = f"another face ({side_of(near[0]):.0f} px) next to the subject: crop the photo to one person"
    return Quality(side, sharp, yaw, roll, reason)


def _near(face: HasFace, other: HasFace, side: float, options: QualityOptions) -> bool:
    if side_of(other) < options.neighbour_size * side:
        return False
    centre = (np.asarray(face.box[:2]) + np.asarray(face.box[2:])) / 2
    theirs = (np.asarray(other.box[:2]) + np.asarray(other.box[2:])) / 2
    return float(np.hypot(*(centre - theirs))) <= options.neighbour_distance * side


@dataclass(frozen=True)
class Consistency:
    """How far apart one person's samples are (squared L2): ``mean`` and ``largest``
    pairwise distance (None with one sample), against ``threshold``."""

    name: str
    samples: int
    mean: float | None
    largest: float | None
    threshold: float

    @property
    def consistent(self) -> bool:
        """Every pair of samples would match each other."""
        return self.largest is None or self.largest <= self.threshold

    def line(self) -> str:
        if self.mean is None:
            return f"{self.name}: 1 sample (enrol a few photos: one sample is fragile)"
        verdict = "consistent" if self.consistent else (
            "SPREAD OUT: some of these samples would not match each other; check they all show this person, "
            "and in the light and pose the camera sees"
        )
        return (
            f"{self.name}: {self.samples} samples, mean distance {self.mean:.3f}, largest {self.largest:.3f} "
            f"(threshold {self.threshold:.3f}): {verdict}"
        )


def consistency(name: str, embeddings: np.ndarray, threshold: float) -> Consistency:
    """Pairwise distances between one person's (N, D) unit samples."""
    vectors = np.asarray(embeddings, dtype=np.float64)
    vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    count = len(vectors)
    if count < 2:
        return Consistency(name, count, None, None, threshold)
    distances = np.clip(2.0 - 2.0 * (vectors @ vectors.T), 0.0, 4.0)[np.triu_indices(count, 1)]
    return Consistency(name, count, float(distances.mean()), float(distances.max()), threshold)
