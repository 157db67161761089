"""FacePipeline end to end on the astronaut, lores/main detection, gallery hook, Vote,
aligned crops on faces, and the lazily imported top-level API."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import cv2
import numpy as np
import pytest

from facenet_edge.align import align
from facenet_edge.camera import Frame
from facenet_edge.detect import Detection
from facenet_edge.errors import ModelError
from facenet_edge.pipeline import Face, FacePipeline, PipelineOptions, Vote
from facenet_edge.tracker import Tracker


@pytest.fixture(scope="module")
def pipeline(tiny_model):
    with FacePipeline(model_path=tiny_model.int8) as p:
        yield p


def test_end_to_end(pipeline, astronaut):
    (face,) = pipeline.process(astronaut)
    assert isinstance(face, Face)
    assert face.embedding.shape == (128,) and face.embedding.dtype == np.float32
    assert np.linalg.norm(face.embedding) == pytest.approx(1.0, abs=1e-5)
    assert face.landmarks.shape == (4, 2) and 0.8 < face.score <= 1.0
    assert 150 < face.box[0] < face.box[2] < 300
    assert face.match is None


def test_face_carries_the_aligned_crop_the_embedder_saw(pipeline, astronaut):
    (face,) = pipeline.process(astronaut)
    assert face.crop.shape == (*pipeline.embedder.input_size, 3) == (96, 96, 3)
    assert face.crop.dtype == np.uint8
    detection = Detection(box=face.box, score=face.score, landmarks=face.landmarks)
    np.testing.assert_array_equal(face.crop, align(astronaut, detection, (96, 96), template=pipeline.card.alignment))
    np.testing.assert_allclose(pipeline.embedder.embed(face.crop[None])[0], face.embedding, atol=1e-6)
    lores = cv2.resize(astronaut, (256, 256), interpolation=cv2.INTER_AREA)
    (from_lores,) = pipeline.process_lores(lores, astronaut)
    assert from_lores.crop.shape == (96, 96, 3)  # cut from main, whatever the lores size


def test_card_and_identity_are_the_embedders(pipeline):
    assert pipeline.card is pipeline.embedder.card
    assert pipeline.identity == pipeline.embedder.identity
    assert pipeline.card.input_size == pipeline.embedder.input_size


LAZY_EXPORTS = textwrap.dedent(
    """
    import importlib, json, sys
    heavy = ("cv2", "sqlite3", "tqdm", "tensorflow")
    loaded = lambda: sorted(m for m in heavy if m in sys.modules)
    import facenet_edge
    report = {"at_import": loaded()}
    gallery = facenet_edge.Gallery
    report["after_gallery"] = loaded()
    report["mismatched"] = [
        name for name, module in facenet_edge._LAZY.items()
        if getattr(facenet_edge, name) is not getattr(importlib.import_module("facenet_edge." + module), name)
    ]
    report["missing_from_dir"] = sorted(set(facenet_edge.__all__) - set(dir(facenet_edge)))
    report["names"] = sorted(facenet_edge.__all__)
    print(json.dumps(report))
    """
)


def test_top_level_exports_resolve_lazily():
    result = subprocess.run([sys.executable, "-c", LAZY_EXPORTS], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["at_import"] == []
    assert report["after_gallery"] == ["sqlite3"]  # the gallery needs SQLite, not OpenCV
    assert report["mismatched"] == [] and report["missing_from_dir"] == []
    public = {"Gallery", "Match", "Person", "open_source", "Frame", "FrameSource", "LatestFrameSource", "Vote"}
    assert public <= set(report["names"])


def test_no_face(pipeline):
    assert pipeline.process(np.zeros((240, 320, 3), np.uint8)) == []


def test_create_from_options(tiny_model, pipeline, astronaut):
    options = PipelineOptions(model_path=str(tiny_model.int8), detector="haar", detector_options={"min_size": 40})
    with FacePipeline.create_from_options(options) as haar:
        assert haar.options == options
        assert haar.detector.min_size == 40
        (face,) = haar.process(astronaut)
    assert face.landmarks is None and face.embedding.shape == (128,)
    assert pipeline.embedder.input_size == (96, 96)


def test_wide_frames_are_shrunk_for_resolution_bound_detectors(tiny_model, astronaut):
    big = cv2.resize(astronaut, None, fx=2, fy=2)
    with FacePipeline(model_path=tiny_model.int8, detector="haar") as haar:
        (small,) = haar.process(astronaut)
        calls = []
        detect = haar.detector.detect
        haar.detector.detect = lambda image: calls.append(image.shape) or detect(image)
        (large,) = haar.process(big)
    assert calls == [(640, 640, 3)]  # 1024 x 1024 -> detect_width 640
    np.testing.assert_allclose(large.box / 2, small.box, atol=8)


def test_detect_width_below_one_pixel_is_refused(tiny_model):
    with pytest.raises(ValueError, match="detect_width must be at least 1 pixel, got 0"):
        FacePipeline(model_path=tiny_model.int8, detect_width=0)


def test_filters(tiny_model, astronaut):
    with FacePipeline(model_path=tiny_model.int8, min_face_size=200) as p:
        assert p.process(astronaut) == []
    with FacePipeline(model_path=tiny_model.int8, max_faces=0) as p:
        assert p.process(astronaut) == []


def test_process_lores(pipeline, astronaut):
    lores = cv2.resize(astronaut, (256, 256), interpolation=cv2.INTER_AREA)
    (face,) = pipeline.process_lores(lores, astronaut)
    (direct,) = pipeline.process(astronaut)
    np.testing.assert_allclose(face.landmarks, direct.landmarks, atol=6)
    assert float(face.embedding @ direct.embedding) > 0.99
    with pytest.raises(ValueError, match="aspect ratio"):
        pipeline.process_lores(cv2.resize(astronaut, (320, 240)), astronaut)


def test_frames_with_lores_are_detected_on_lores_by_the_tracker_too(pipeline, astronaut, monkeypatch):
    """picamera2's ``lores`` stream: process_frame and Tracker.step_frame both detect on it
    and crop from the full image, so --track gets the same faces as the vote."""
    lores = cv2.resize(astronaut, (256, 256), interpolation=cv2.INTER_AREA)
    frame = Frame(image=astronaut, timestamp=0.0, index=0, lores=lores)
    detected, cropped = [], []
    detect, crop = pipeline.detector.detect, pipeline.embedder.crop
    monkeypatch.setattr(pipeline.detector, "detect", lambda image: detected.append(image.shape) or detect(image))
    monkeypatch.setattr(pipeline.embedder, "crop", lambda image, d: cropped.append(image.shape) or crop(image, d))
    (face,) = pipeline.process_frame(frame)
    (tracked,) = Tracker().step_frame(pipeline, frame)
    assert detected == [lores.shape, lores.shape] and cropped == [astronaut.shape, astronaut.shape]
    np.testing.assert_allclose(tracked.detection.box, face.box)
    assert tracked.embedded and tracked.track.match is None  # no gallery: tracked, not decided


def test_gallery_is_called_once_per_frame(pipeline, astronaut):
    class FakeGallery:
        def __init__(self):
            self.calls = []

        def match_top_k(self, embeddings, identity, k):
            self.calls.append((embeddings.shape, identity, k))
            return [f"match-{i}" for i in range(len(embeddings))]

    gallery = FakeGallery()
    (face,) = pipeline.process(astronaut, gallery=gallery, top_k=3)
    assert gallery.calls == [((1, 128), pipeline.embedder.identity, 3)]
    assert face.match == "match-0"


def test_embed_image(pipeline, astronaut, tmp_path):
    path = tmp_path / "astronaut.png"
    cv2.imwrite(str(path), cv2.cvtColor(astronaut, cv2.COLOR_RGB2BGR))
    (from_file,) = pipeline.embed_image(path)
    (from_array,) = pipeline.embed_image(astronaut)
    np.testing.assert_array_equal(from_file.embedding, from_array.embedding)


def test_no_default_model_yet(monkeypatch):
    from facenet_edge import pipeline as pipeline_module

    def no_default():
        raise ModelError("no default model is shipped yet; pass --model PATH")

    monkeypatch.setattr(pipeline_module, "default_model_path", no_default)
    with pytest.raises(ModelError, match="pass --model PATH"):
        FacePipeline()


def test_vote_needs_agreement():
    vote = Vote(window=5, min_agree=3, max_age_s=2.0)
    assert vote.update("ann", 0.0) is None
    assert vote.update(None, 0.1) is None
    assert vote.update("ann", 0.2) is None
    assert vote.update("bob", 0.3) is None
    assert vote.update("ann", 0.4) == "ann"
    assert vote.update("ann", 0.5) == "ann"
    assert vote.update("bob", 0.6) == "ann"  # last 5: ann bob ann ann bob
    assert vote.update("bob", 0.7) == "bob"  # last 5: bob ann ann bob bob


def test_vote_forgets_old_frames():
    vote = Vote(window=5, min_agree=3, max_age_s=1.0)
    vote.update("ann", 0.0)
    vote.update("ann", 0.5)
    assert vote.update("ann", 2.0) is None  # the first two are too old
    assert vote.update("ann", 2.1) is None
    assert vote.update("ann", 2.2) == "ann"
    vote.reset()
    assert vote.update("ann", 2.3) is None


def test_vote_tie_and_validation():
    vote = Vote(window=4, min_agree=2)
    for name, t in [("ann", 0.0), ("bob", 0.1), ("ann", 0.2), ("bob", 0.3)]:
        result = vote.update(name, t)
    assert result is None
    with pytest.raises(ValueError):
        Vote(window=3, min_agree=4)
