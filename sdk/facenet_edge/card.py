"""Model card: everything the runtime needs to know about an embedding model.

A card is a JSON file beside the model (``model.tflite`` -> ``model.json``). The runtime
reads preprocessing, thresholds and the compatibility group from it; nothing about a
model is hard-coded in the runtime.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CARD_SCHEMA_VERSION = 1


class CardError(ValueError):
    """A model card is missing, unreadable or inconsistent."""


@dataclass(frozen=True)
class Thresholds:
    """Decision thresholds on the squared L2 distance between unit embeddings.

    ``far_1e3``: the largest distance accepted as "same person" at a false-accept rate of
    1e-3 on LFW. ``best_accuracy``: the distance that maximised LFW 10-fold accuracy.
    """

    far_1e3: float | None = None
    best_accuracy: float | None = None

    def default(self) -> float | None:
        """The open-set threshold: the FAR-calibrated one when known (users trust a stated FAR)."""
        return self.far_1e3 if self.far_1e3 is not None else self.best_accuracy


@dataclass(frozen=True)
class ModelCard:
    name: str
    version: str
    architecture: str
    input_height: int
    input_width: int
    embedding_size: int = 128
    color_order: str = "RGB"
    # float input = (pixel - mean) / std, applied before quantization of the input tensor
    mean: float = 127.5
    std: float = 128.0
    # Models in the same group produce directly comparable embeddings (harmonic training).
    compatibility_group: str | None = None
    # Aligner the model was trained with; see facenet_edge.align.TEMPLATES.
    alignment: str = "facenet96"
    thresholds: Thresholds = field(default_factory=Thresholds)
    quantization: dict[str, Any] = field(default_factory=dict)
    lfw: dict[str, Any] = field(default_factory=dict)
    flops: int | None = None
    parameters: int | None = None
    size_bytes: int | None = None
    training_data: list[str] = field(default_factory=list)
    terms: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    schema: int = CARD_SCHEMA_VERSION

    @property
    def input_size(self) -> tuple[int, int]:
        """(height, width) of the aligned face the model takes."""
        return (self.input_height, self.input_width)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelCard:
        if not isinstance(data, dict):
            raise CardError("model card must be a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        missing = [k for k in ("name", "version", "architecture", "input_height", "input_width") if k not in data]
        if missing:
            raise CardError(f"model card lacks required field(s): {', '.join(missing)}")
        kwargs = {k: v for k, v in data.items() if k in known}
        # Unknown keys are kept rather than dropped so a newer card survives a round trip.
        unknown = {k: v for k, v in data.items() if k not in known}
        if unknown:
            kwargs["extra"] = {**kwargs.get("extra", {}), **unknown}
        kwargs["thresholds"] = Thresholds(**(data.get("thresholds") or {}))
        return cls(**kwargs)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelCard:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise CardError(f"model card not found: {path}") from None
        except json.JSONDecodeError as exc:
            raise CardError(f"model card {path} is not valid JSON: {exc}") from None
        return cls.from_dict(data)


def card_path_for(model_path: str | Path) -> Path:
    """The card's conventional location: beside the model, same stem, ``.json``."""
    return Path(model_path).with_suffix(".json")


@dataclass(frozen=True)
class ModelIdentity:
    """What a gallery stores about the model that made its embeddings."""

    sha256: str
    compatibility_group: str | None = None

    def compatible_with(self, other: ModelIdentity) -> bool:
        """Same file, or both declare the same compatibility group (harmonic successors)."""
        if self.sha256 == other.sha256:
            return True
        return self.compatibility_group is not None and self.compatibility_group == other.compatibility_group


def model_identity(model_path: str | Path, card: ModelCard) -> ModelIdentity:
    digest = hashlib.sha256(Path(model_path).read_bytes()).hexdigest()
    return ModelIdentity(sha256=digest, compatibility_group=card.compatibility_group)
