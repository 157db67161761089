"""Alignment: output shape, determinism, border consistency, landmarks on the template."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from facenet_edge.align import FILLS, TEMPLATES, align, alignment_matrix
from facenet_edge.detect import BlazeFaceDetector, Detection, HaarDetector


@pytest.fixture(scope="module")
def face(astronaut) -> Detection:
    with BlazeFaceDetector() as detector:
        (found,) = detector.detect(astronaut)
    return found


@pytest.mark.parametrize("size", [(96, 96), (112, 96), (160, 160)])
def test_shape_and_dtype(astronaut, face, size):
    crop = align(astronaut, face, size)
    assert crop.shape == (*size, 3) and crop.dtype == np.uint8
    assert align(astronaut, face, size, border=8).shape == (size[0] + 16, size[1] + 16, 3)


def test_deterministic(astronaut, face):
    np.testing.assert_array_equal(align(astronaut, face, (96, 96)), align(astronaut.copy(), face, (96, 96)))


@pytest.mark.parametrize("upscale", [1, 5], ids=["direct", "area-downscaled"])
def test_bordered_crop_centre_is_plain_crop(astronaut, face, upscale):
    image = cv2.resize(astronaut, None, fx=upscale, fy=upscale) if upscale > 1 else astronaut
    detection = face.scaled(upscale)
    plain = align(image, detection, (96, 96)).astype(int)
    centre = align(image, detection, (96, 96), border=12)[12:-12, 12:-12].astype(int)
    # The matrices differ by exactly the border's translation, but warpAffine maps pixels
    # in fixed point (1/32 px), so a few pixels may round to a neighbouring sample.
    np.testing.assert_allclose(alignment_matrix(detection, (96, 96), 12)[:, 2] - 12,
                               alignment_matrix(detection, (96, 96))[:, 2], atol=1e-9)
    diff = np.abs(centre - plain)
    assert diff.max() <= 4 and (diff > 0).mean() < 0.02


def test_landmarks_land_on_template(face):
    matrix = alignment_matrix(face, (96, 96))
    moved = face.landmarks @ matrix[:, :2].T + matrix[:, 2]
    np.testing.assert_allclose(moved, TEMPLATES["facenet96"] * 96, atol=4)


def test_box_only_detection(astronaut):
    with HaarDetector() as detector:
        (found,) = detector.detect(astronaut)
    crop = align(astronaut, found, (96, 96))
    assert crop.shape == (96, 96, 3)
    assert crop.std() > 10  # a face, not replicated border


def test_rejects_non_rgb(face):
    with pytest.raises(ValueError, match="H x W x 3"):
        align(np.zeros((64, 64), np.uint8), face, (96, 96))


@pytest.fixture(scope="module")
def tight(astronaut, face) -> tuple[np.ndarray, Detection]:
    """The astronaut cut to her detected box: the aligned crop reaches past every side."""
    x1, y1, x2, y2 = face.box.round().astype(int)
    shift = np.array([x1, y1], float)
    detection = Detection(box=face.box - np.tile(shift, 2), score=face.score, landmarks=face.landmarks - shift)
    return np.ascontiguousarray(astronaut[y1:y2, x1:x2]), detection


def test_default_fill_replicates_the_edge(tight):
    image, detection = tight
    replicated = cv2.warpAffine(image, alignment_matrix(detection, (96, 96)), (96, 96), flags=cv2.INTER_LINEAR,
                                borderMode=cv2.BORDER_REPLICATE)
    np.testing.assert_array_equal(align(image, detection, (96, 96)), replicated)
    np.testing.assert_array_equal(align(image, detection, (96, 96), fill="replicate"), replicated)


def test_fills_differ_only_outside_the_image(tight):
    image, detection = tight
    crops = {fill: align(image, detection, (96, 96), fill=fill).astype(int) for fill in FILLS}
    # Pixels well inside the image: the same whatever the fill.
    inverse = cv2.invertAffineTransform(alignment_matrix(detection, (96, 96)))
    ys, xs = np.mgrid[0:96, 0:96]
    x, y = (np.stack([xs.ravel(), ys.ravel(), np.ones(xs.size)], axis=1) @ inverse.T).T
    inside = ((x >= 1) & (x <= image.shape[1] - 2) & (y >= 1) & (y <= image.shape[0] - 2)).reshape(96, 96)
    outside = ((x < -1) | (x > image.shape[1]) | (y < -1) | (y > image.shape[0])).reshape(96, 96)
    assert inside.any() and outside.mean() > 0.1
    for crop in crops.values():
        np.testing.assert_array_equal(crop[inside], crops["replicate"][inside])
    assert (crops["black"][outside] == 0).all() and (crops["grey"][outside] == 128).all()
    assert not np.array_equal(crops["reflect"][outside], crops["replicate"][outside])


def test_unknown_fill_is_refused(astronaut, face):
    with pytest.raises(ValueError, match="unknown fill 'wrap': use one of replicate, black, grey, reflect"):
        align(astronaut, face, (96, 96), fill="wrap")
