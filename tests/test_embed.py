"""Embedder: card handling, preprocessing, int8/float agreement, batching, default model."""

from __future__ import annotations

import dataclasses
import hashlib
import shutil

import numpy as np
import pytest

from facenet_edge import embed as embed_module
from facenet_edge.align import align
from facenet_edge.card import ModelCard, card_path_for
from facenet_edge.detect import BlazeFaceDetector
from facenet_edge.embed import Embedder, default_model_path
from facenet_edge.errors import ModelError


@pytest.fixture(scope="module")
def crops(astronaut):
    """The astronaut's aligned face plus two other patches of the photo, (3, 96, 96, 3)."""
    with BlazeFaceDetector() as detector:
        (face,) = detector.detect(astronaut)
    return np.stack(
        [align(astronaut, face, (96, 96)), astronaut[300:396, 300:396], astronaut[50:146, 380:476]]
    )


@pytest.mark.parametrize("kind", ["int8", "float32"])
def test_embeddings_are_unit_float32(tiny_model, crops, kind):
    with Embedder.from_path(getattr(tiny_model, kind)) as embedder:
        out = embedder.embed(crops)
    assert out.shape == (3, 128) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


def test_int8_close_to_float(tiny_model, crops):
    with Embedder.from_path(tiny_model.int8) as q, Embedder.from_path(tiny_model.float32) as f:
        cosine = np.sum(q.embed(crops) * f.embed(crops), axis=1)
    assert (cosine > 0.99).all(), cosine


@pytest.mark.parametrize("kind", ["int8", "float32"])
def test_batch_equals_single(tiny_model, crops, kind):
    with Embedder.from_path(getattr(tiny_model, kind)) as embedder:
        batch = embedder.embed(crops)
        singles = np.concatenate([embedder.embed(crop[None]) for crop in crops])
        as_list = embedder.embed(list(crops))
    np.testing.assert_allclose(batch, singles, atol=1e-6)
    np.testing.assert_array_equal(batch, as_list)


def test_preprocessing_uses_card_and_input_quantization(tiny_model):
    with Embedder.from_path(tiny_model.int8) as embedder:
        info = embedder._model.input
        pixels = np.array([[[[0, 127, 255]]]], dtype=np.uint8)
        expected = np.clip(np.round((pixels - 127.5) / 128.0 / info.scale) + info.zero_point, -128, 127)
        np.testing.assert_array_equal(embedder.preprocess(pixels), expected.astype(np.int8))


def test_attributes(tiny_model):
    with Embedder.from_path(tiny_model.int8) as embedder:
        assert embedder.input_size == (96, 96)
        assert embedder.model_path == tiny_model.int8
        assert embedder.card.thresholds.far_1e3 == 1.0
        assert embedder.identity.sha256 == hashlib.sha256(tiny_model.int8.read_bytes()).hexdigest()
        assert embedder.identity.compatibility_group == embedder.card.compatibility_group


def test_flip_test_averages_the_crop_and_its_mirror(tiny_model, crops):
    card = dataclasses.replace(ModelCard.load(card_path_for(tiny_model.float32)), flip_test=True)
    with Embedder.from_path(tiny_model.float32) as plain, Embedder.from_path(tiny_model.float32, card=card) as flip:
        mirrored = plain.embed(crops[:, :, ::-1])
        expected = plain.embed(crops) + mirrored
        expected /= np.linalg.norm(expected, axis=1, keepdims=True)
        np.testing.assert_allclose(flip.embed(crops), expected, atol=1e-5)
        # A crop and its mirror image get the same embedding.
        np.testing.assert_allclose(flip.embed(crops[:, :, ::-1]), flip.embed(crops), atol=1e-5)


def test_crop_follows_the_cards_fill(tiny_model, astronaut):
    # A face at the photo's corner: most of its crop lies past the edge and is filled.
    with BlazeFaceDetector() as detector:
        (face,) = detector.detect(astronaut)
    x0, y0 = int(face.box[0]) + 20, int(face.box[1]) + 20
    corner = astronaut[y0:, x0:]
    moved = dataclasses.replace(face, box=face.box - [x0, y0, x0, y0], landmarks=face.landmarks - [x0, y0])
    card = ModelCard.load(card_path_for(tiny_model.float32))
    assert card.fill == "replicate"  # cards written before the field keep the old behaviour
    grey_card = dataclasses.replace(card, fill="grey")
    with Embedder.from_path(tiny_model.float32) as plain, \
            Embedder.from_path(tiny_model.float32, card=grey_card) as grey:
        np.testing.assert_array_equal(plain.crop(corner, moved), align(corner, moved, (96, 96), fill="replicate"))
        grey_crop = grey.crop(corner, moved)
        np.testing.assert_array_equal(grey_crop, align(corner, moved, (96, 96), fill="grey"))
        assert np.all(grey_crop[0, 0] == 128)
        np.testing.assert_array_equal(plain.crop(corner, moved, fill="grey"), grey_crop)
    with pytest.raises(ModelError, match="fill 'blue' is unknown"):
        Embedder.from_path(tiny_model.float32, card=dataclasses.replace(card, fill="blue"))


def test_empty_and_bad_crops(tiny_model):
    with Embedder.from_path(tiny_model.float32) as embedder:
        assert embedder.embed([]).shape == (0, 128)
        with pytest.raises(ValueError, match=r"\(N, 96, 96, 3\)"):
            embedder.embed(np.zeros((1, 112, 112, 3), np.uint8))
        with pytest.raises(ValueError, match="uint8"):
            embedder.embed(np.zeros((1, 96, 96, 3), np.float32))


def test_missing_card(tiny_model, tmp_path):
    path = tmp_path / "orphan.tflite"
    shutil.copy(tiny_model.float32, path)
    with pytest.raises(ModelError, match="orphan.json"):
        Embedder.from_path(path)


def test_card_input_size_must_match_model(tiny_model):
    card = dataclasses.replace(ModelCard.load(card_path_for(tiny_model.float32)), input_height=112, input_width=112)
    with pytest.raises(ModelError, match="112x112"):
        Embedder.from_path(tiny_model.float32, card=card)


def test_closed_embedder(tiny_model, crops):
    with Embedder.from_path(tiny_model.float32) as embedder:
        pass
    with pytest.raises(ModelError, match="closed"):
        embedder.embed(crops)


def test_shipped_default_is_absent_or_trained():
    """No untrained network is ever shipped: either no default, or one with LFW results."""
    try:
        path = default_model_path()
    except ModelError as exc:
        assert str(exc) == embed_module.NO_DEFAULT_MODEL
    else:
        assert ModelCard.load(card_path_for(path)).lfw, f"{path} has no LFW results in its card"


@pytest.fixture
def models_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(embed_module, "MODELS_DIR", tmp_path)
    monkeypatch.setattr(embed_module, "DEFAULT_MODEL_POINTER", tmp_path / "default.txt")
    return tmp_path


def _ship(tiny_model, directory, name):
    path = directory / name
    shutil.copy(tiny_model.float32, path)
    shutil.copy(card_path_for(tiny_model.float32), card_path_for(path))
    return path


def test_default_model_lookup(tiny_model, models_dir):
    with pytest.raises(ModelError, match="no default model is shipped yet; pass --model PATH"):
        default_model_path()
    _ship(tiny_model, models_dir, "blazeface_short_range.tflite")  # the detector never counts
    shutil.copy(tiny_model.float32, models_dir / "uncarded.tflite")
    with pytest.raises(ModelError, match="no default model"):
        default_model_path()
    first = _ship(tiny_model, models_dir, "first.tflite")
    assert default_model_path() == first
    second = _ship(tiny_model, models_dir, "second.tflite")
    with pytest.raises(ModelError, match="several models"):
        default_model_path()
    (models_dir / "default.txt").write_text("second.tflite\n")
    assert default_model_path() == second
    (models_dir / "default.txt").write_text("gone.tflite\n")
    with pytest.raises(ModelError, match="gone.tflite"):
        default_model_path()
