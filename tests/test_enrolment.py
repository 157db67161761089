"""Enrolment quality (facenet_edge.enrolment): each rejection reason on synthetic faces,
pose from landmarks, and per-person consistency."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import pytest

from facenet_edge.card import ModelIdentity
from facenet_edge.enrolment import QualityOptions, check_face, consistency, pose
from facenet_edge.gallery import Gallery


@dataclass
class FakeFace:
    box: np.ndarray
    landmarks: np.ndarray | None = None


def frontal(x: float, y: float, side: float) -> FakeFace:
    """A box with landmarks of a frontal, upright face."""
    eyes_y, nose_y, mouth_y = y + 0.4 * side, y + 0.6 * side, y + 0.8 * side
    marks = np.array([[x + 0.3 * side, eyes_y], [x + 0.7 * side, eyes_y], [x + 0.5 * side, nose_y],
                      [x + 0.5 * side, mouth_y]])  # fmt: skip
    return FakeFace(np.array([x, y, x + side, y + side], float), marks)


@pytest.fixture
def image() -> np.ndarray:
    """Sharp texture everywhere (random blocks)."""
    rng = np.random.default_rng(0)
    small = rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)
    return cv2.resize(small, (640, 480), interpolation=cv2.INTER_NEAREST)


def test_a_good_face_passes(image):
    quality = check_face(image, frontal(200, 100, 200), [], QualityOptions())
    assert quality.ok and quality.yaw == pytest.approx(0) and quality.roll_deg == pytest.approx(0)


def test_each_reason(image):
    options = QualityOptions()
    assert "too small" in check_face(image, frontal(200, 100, 40), [], options).reason
    blurred = cv2.GaussianBlur(image, (0, 0), 8)
    assert "too blurry" in check_face(blurred, frontal(200, 100, 200), [], options).reason
    turned = frontal(200, 100, 200)
    turned.landmarks[2, 0] += 0.5 * 80  # nose half an eye distance (80 px) to the side
    assert "turned away" in check_face(image, turned, [], options).reason
    tilted = frontal(200, 100, 200)
    tilted.landmarks[1, 1] += 80  # right eye 80 px lower than the left: 45 degrees
    assert "tilted" in check_face(image, tilted, [], options).reason
    beside = frontal(420, 100, 150)
    assert "another face" in check_face(image, frontal(200, 100, 200), [beside], options).reason
    far_small = frontal(600, 440, 30)  # a small face in a corner is no risk
    assert check_face(image, frontal(200, 100, 200), [far_small], options).ok


def test_pose_signs():
    face = frontal(0, 0, 100)
    face.landmarks[2, 0] -= 10
    yaw, roll = pose(face.landmarks)
    assert yaw == pytest.approx(-0.25) and roll == pytest.approx(0)


def test_consistency():
    rng = np.random.default_rng(0)
    base = rng.normal(size=128)
    close = np.stack([base + 0.1 * rng.normal(size=128) for _ in range(3)])
    report = consistency("ada", close, threshold=0.9)
    assert report.samples == 3 and report.consistent and report.mean < report.largest < 0.9
    mixed = np.concatenate([close, rng.normal(size=(1, 128))])  # someone else's photo among them
    report = consistency("ada", mixed, threshold=0.9)
    assert not report.consistent and "SPREAD OUT" in report.line()
    assert consistency("bo", close[:1], 0.9).mean is None


def test_samples_of_a_person(tmp_path):
    identity = ModelIdentity(sha256="e" * 64)
    rng = np.random.default_rng(2)
    with Gallery.create(tmp_path / "g.db", identity, 1.0) as gallery:
        vectors = rng.normal(size=(2, 128))
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        gallery.add("ada", vectors, identity)
        stored = gallery.samples_of("ada")
        assert stored.shape == (2, 128) and stored.dtype == np.int8
        assert consistency("ada", stored.astype(float), 1.0).samples == 2
        with pytest.raises(Exception, match="no person named 'bo'"):
            gallery.samples_of("bo")
