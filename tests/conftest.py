"""Shared fixtures: a tiny random-weight embedding model (test use only, never shipped)
and the astronaut test image."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest

from facenet_edge.card import ModelCard, Thresholds

TINY_SIZE = 96
TINY_DIM = 128


@dataclass(frozen=True)
class TinyModels:
    """Paths of the test models; each ``.tflite`` has its card (``.json``) beside it
    except the two with wrong input/output shapes."""

    int8: Path
    float32: Path
    wrong_output: Path  # image -> feature map (N x 12 x 12 x 8), not N x D
    wrong_input: Path  # greyscale N x 96 x 96 x 1 input


@pytest.fixture(scope="session")
def astronaut() -> np.ndarray:
    """skimage's astronaut photo: 512 x 512 RGB uint8, one frontal face."""
    data = pytest.importorskip("skimage.data", reason="scikit-image provides the astronaut test image")
    return np.ascontiguousarray(data.astronaut())


def _tiny_card(name: str) -> ModelCard:
    return ModelCard(
        name=name,
        version="0",
        architecture="tiny random-weight CNN (tests only)",
        input_height=TINY_SIZE,
        input_width=TINY_SIZE,
        embedding_size=TINY_DIM,
        alignment="facenet96",
        thresholds=Thresholds(far_1e3=1.0, best_accuracy=1.1),
        terms="random weights, for tests only; never shipped",
    )


def _random_crops(image: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Random square patches of ``image`` resized to the model input, as uint8."""
    crops = []
    for _ in range(count):
        side = int(rng.integers(96, image.shape[0] // 2))
        y, x = (int(rng.integers(0, image.shape[i] - side)) for i in (0, 1))
        crops.append(cv2.resize(image[y : y + side, x : x + side], (TINY_SIZE, TINY_SIZE)))
    return np.stack(crops)


def _convert(tf, model, representative: np.ndarray | None = None) -> bytes:
    """Keras model -> TFLite bytes; full-integer int8 I/O when ``representative`` is given."""
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if representative is not None:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([sample[None]] for sample in representative)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    return converter.convert()  # its int8-input warning is filtered in pyproject.toml


def _build_tiny_models(directory: Path, astronaut: np.ndarray) -> None:
    tf = pytest.importorskip("tensorflow", reason="TensorFlow builds the tiny test model (pip install -e .[dev])")
    layers = tf.keras.layers
    tf.keras.utils.set_random_seed(0)

    inputs = tf.keras.Input((TINY_SIZE, TINY_SIZE, 3))
    x = layers.Conv2D(8, 3, strides=2, activation="relu")(inputs)
    features = layers.Conv2D(16, 3, strides=2, activation="relu")(x)
    x = layers.Conv2D(32, 3, strides=2, activation="relu")(features)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dense(TINY_DIM)(x)
    outputs = layers.Lambda(lambda t: tf.math.l2_normalize(t, axis=1))(x)
    embedder = tf.keras.Model(inputs, outputs)
    feature_map = tf.keras.Model(inputs, layers.Conv2D(8, 3, strides=2)(features))
    grey_inputs = tf.keras.Input((TINY_SIZE, TINY_SIZE, 1))
    greyscale = tf.keras.Model(grey_inputs, layers.Dense(TINY_DIM)(layers.Flatten()(grey_inputs)))

    crops = _random_crops(astronaut, 32, np.random.default_rng(0))
    representative = (crops.astype(np.float32) - 127.5) / 128.0  # the card's mean/std

    models = _tiny_paths(directory)
    models.int8.write_bytes(_convert(tf, embedder, representative))
    models.float32.write_bytes(_convert(tf, embedder))
    models.wrong_output.write_bytes(_convert(tf, feature_map))
    models.wrong_input.write_bytes(_convert(tf, greyscale))
    for path in (models.int8, models.float32):
        _tiny_card(path.stem).save(path.with_suffix(".json"))


def _tiny_paths(directory: Path) -> TinyModels:
    return TinyModels(
        int8=directory / "tiny_int8.tflite",
        float32=directory / "tiny_float.tflite",
        wrong_output=directory / "tiny_feature_map.tflite",
        wrong_input=directory / "tiny_greyscale.tflite",
    )


@pytest.fixture(scope="session")
def tiny_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
               astronaut: np.ndarray) -> TinyModels:
    """A small random-weight model 96x96x3 -> 128-d (L2-normalised), converted to int8
    and float32 TFLite with cards, plus two models with wrong I/O shapes.

    Building takes ~10 s (TensorFlow import and conversion), so the result is kept in
    pytest's cache, keyed by this file's content, and rebuilt when this file changes."""
    cache = getattr(request.config, "cache", None)
    if cache is None:  # -p no:cacheprovider
        directory = tmp_path_factory.mktemp("tiny_model")
        _build_tiny_models(directory, astronaut)
        return _tiny_paths(directory)
    key = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]
    directory = cache.mkdir(f"tiny_model_{key}")
    if not (directory / "complete").exists():
        staging = Path(tempfile.mkdtemp(dir=directory.parent))
        try:
            _build_tiny_models(staging, astronaut)
            for item in staging.iterdir():  # os.replace: a concurrent session never sees half a file
                os.replace(item, directory / item.name)
            (directory / "complete").touch()
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return _tiny_paths(directory)


@pytest.fixture(scope="session")
def model(tiny_model: TinyModels) -> str:
    """The tiny int8 model's path, as the CLI takes it."""
    return str(tiny_model.int8)


@pytest.fixture(scope="session")
def photo(tmp_path_factory: pytest.TempPathFactory, astronaut: np.ndarray) -> str:
    """The astronaut photo as a PNG file."""
    path = tmp_path_factory.mktemp("photo") / "astronaut.png"
    assert cv2.imwrite(str(path), cv2.cvtColor(astronaut, cv2.COLOR_RGB2BGR))
    return str(path)
