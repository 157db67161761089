"""Embedding model: aligned face crops -> L2-normalised embeddings.

Everything model-specific (input size, normalisation, channel order, alignment template)
comes from the model card beside the ``.tflite`` file.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np

from .align import FILLS, TEMPLATES, align
from .card import CardError, ModelCard, ModelIdentity, card_path_for, model_identity
from .detect import BLAZEFACE_MODEL, Detection
from .errors import ModelError
from .interpreter import MODELS_DIR, TFLiteModel, check_tflite_file, load_interpreter

# Optional file in models/ naming the packaged default embedding model.
DEFAULT_MODEL_POINTER = MODELS_DIR / "default.txt"
NO_DEFAULT_MODEL = "no default model is shipped yet; pass --model PATH"


def default_model_path() -> Path:
    """The embedding model shipped in the wheel: the one ``models/default.txt`` names,
    else the single ``.tflite`` in ``models/`` that has a card and is not the detector.
    Raises ModelError when none is shipped (never falls back to an untrained network)."""
    if DEFAULT_MODEL_POINTER.is_file():
        path = MODELS_DIR / DEFAULT_MODEL_POINTER.read_text().strip()
        if not path.is_file() or not card_path_for(path).is_file():
            raise ModelError(f"{DEFAULT_MODEL_POINTER} names {path.name}, which is not shipped with its card")
        return path
    candidates = [
        p for p in sorted(MODELS_DIR.glob("*.tflite")) if p.name != BLAZEFACE_MODEL.name and card_path_for(p).is_file()
    ]
    if len(candidates) == 1:
        return candidates[0]
    if candidates:
        names = ", ".join(p.name for p in candidates)
        raise ModelError(f"several models are shipped ({names}) and models/default.txt names none; pass --model PATH")
    raise ModelError(NO_DEFAULT_MODEL)


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (all-zero rows stay zero)."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)


def normalise(crops: np.ndarray, card: ModelCard) -> np.ndarray:
    """Float32 crops -> the model's float input: the card's channel order, then
    (pixel - mean) / std. The one definition: the Embedder, the converter's calibration and
    checks, and the training step (on TensorFlow tensors: operators only) all use it."""
    if card.color_order == "BGR":
        crops = crops[..., ::-1]
    return (crops - card.mean) / card.std


class Embedder:
    """A face embedding model with its card. ``embed`` takes aligned RGB uint8 crops of
    ``input_size`` and returns (N, D) float32 unit vectors (with the card's ``flip_test``,
    the normalised mean of each crop's and its mirror's). Not thread-safe."""

    def __init__(self, model: TFLiteModel, card: ModelCard) -> None:
        self._model = model
        self.card = card
        self.model_path = model.path
        input_h, input_w = model.input.shape[1:3]
        if (input_h, input_w) != card.input_size:
            raise ModelError(
                f"{self.model_path}: the card says input {card.input_height}x{card.input_width}, "
                f"the model takes {input_h}x{input_w}"
            )
        self.embedding_size = model.outputs[0].shape[1]
        if self.embedding_size != card.embedding_size:
            raise ModelError(
                f"{self.model_path}: the card says {card.embedding_size}-d embeddings, "
                f"the model outputs {self.embedding_size}"
            )
        # The card checked its own fields when it was made; the templates live with the
        # aligner (OpenCV), which the card module does not import.
        if card.alignment not in TEMPLATES:
            raise ModelError(
                f"{self.model_path}: the card's alignment {card.alignment!r} is unknown; "
                f"known: {', '.join(sorted(TEMPLATES))}"
            )
        if card.fill not in FILLS:
            raise ModelError(f"{self.model_path}: the card's fill {card.fill!r} is unknown; known: {', '.join(FILLS)}")

    @classmethod
    def from_path(
        cls,
        model_path: str | Path,
        card: ModelCard | None = None,
        num_threads: int | None = None,
        delegate: str | None = None,
    ) -> Embedder:
        """Load a model and its card (default: the JSON beside the model)."""
        # The model first: a missing model is reported as such, not as its missing card.
        model_path = check_tflite_file(model_path)
        if card is None:
            card_path = card_path_for(model_path)
            try:
                card = ModelCard.load(card_path)
            except CardError as exc:
                raise ModelError(f"model card for {model_path} unusable ({exc}); expected {card_path}") from None
        return cls(load_interpreter(model_path, num_threads=num_threads, delegate=delegate), card)

    @property
    def input_size(self) -> tuple[int, int]:
        """(height, width) of the aligned crops ``embed`` takes."""
        return self.card.input_size

    @cached_property
    def identity(self) -> ModelIdentity:
        """What a gallery records about this model (hashing the file once, on first use)."""
        return model_identity(self.model_path, self.card)

    def crop(self, image: np.ndarray, detection: Detection, fill: str | None = None) -> np.ndarray:
        """The crop of ``detection`` that ``embed`` takes: the card's size, template and
        fill (``fill`` overrides the last, for comparing fills)."""
        return align(image, detection, self.input_size, template=self.card.alignment, fill=fill or self.card.fill)

    def preprocess(self, crops: np.ndarray) -> np.ndarray:
        """Crops -> the input tensor: (pixel - mean) / std, then the input's quantization."""
        return self._model.input.quantize(normalise(crops.astype(np.float32), self.card))

    def embed(self, crops: np.ndarray | list[np.ndarray]) -> np.ndarray:
        """(N, D) float32 unit embeddings of RGB uint8 crops shaped (N, h, w, 3)."""
        batch = np.stack(crops) if isinstance(crops, list) and crops else np.asarray(crops)
        h, w = self.input_size
        if batch.size == 0:
            return np.zeros((0, self.embedding_size), dtype=np.float32)
        if batch.ndim != 4 or batch.shape[1:] != (h, w, 3) or batch.dtype != np.uint8:
            raise ValueError(
                f"embed expects uint8 crops of shape (N, {h}, {w}, 3), got {batch.shape} {batch.dtype}"
            )
        embeddings = self._run(batch)
        if self.card.flip_test:
            return l2_normalize(embeddings + self._run(np.ascontiguousarray(batch[:, :, ::-1])))
        return embeddings

    def _run(self, batch: np.ndarray) -> np.ndarray:
        (output,) = self._model.run(self.preprocess(batch))
        return l2_normalize(self._model.outputs[0].dequantize(output))

    def close(self) -> None:
        self._model.close()

    def __enter__(self) -> Embedder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
