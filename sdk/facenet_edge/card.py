"""Model card: everything the runtime needs to know about an embedding model.

A card is a JSON file beside the model (``model.tflite`` -> ``model.json``). The runtime
reads preprocessing, thresholds and the compatibility group from it; nothing about a
model is hard-coded in the runtime.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CardError, ModelError
from .files import open_regular, read_regular
from .interpreter import MAX_MODEL_BYTES

CARD_SCHEMA_VERSION = 1
# A card is a few kB of JSON; anything much larger is not a card.
MAX_CARD_BYTES = 1024 * 1024
_HASH_CHUNK = 1024 * 1024


def _is_number(value: object) -> bool:
    # numbers.Real: numpy scalars too (the converter computes thresholds with numpy).
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_threshold(value: object, what: str) -> float:
    """A decision threshold as a float: a finite squared-L2 distance between unit
    vectors, strictly between 0 (nothing accepted) and 4 (everything accepted); else
    CardError naming ``what``."""
    if not _is_number(value) or not (math.isfinite(value) and 0.0 < value < 4.0):
        raise CardError(f"{what} must be a squared-L2 distance strictly between 0 and 4, got {value!r}")
    return float(value)


# What a field may hold -> how the error names it. Numbers are numbers.* so that numpy
# scalars (as a converter computes them) pass; bool, although an int, is never a number.
_KINDS: dict[type, str] = {
    str: "a string",
    bool: "true or false",
    numbers.Integral: "an integer",
    numbers.Real: "a number",
    dict: "an object",
    list: "a list",
}


def _check_type(card: object, name: str, kind: type, optional: bool = False) -> None:
    value = getattr(card, name)
    if value is None and optional:
        return
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        wanted = _KINDS[kind] + (" or null" if optional else "")
        raise CardError(f"model card field {name!r} must be {wanted}, got {value!r}")


@dataclass(frozen=True)
class Thresholds:
    """Decision thresholds on the squared L2 distance between unit embeddings.

    ``far_1e3``: the largest distance accepted as "same person" at a false-accept rate of
    1e-3 on LFW. ``best_accuracy``: the distance that maximised LFW 10-fold accuracy.
    """

    far_1e3: float | None = None
    best_accuracy: float | None = None

    def __post_init__(self) -> None:
        for name in ("far_1e3", "best_accuracy"):
            value = getattr(self, name)
            if value is not None and not _is_number(value):
                raise CardError(f"model card threshold {name!r} must be a number or null, got {value!r}")
            if value is not None:
                object.__setattr__(self, name, float(value))

    def default(self) -> float | None:
        """The open-set threshold: the FAR-calibrated one when known (users trust a stated
        FAR). Raises CardError when it is not a distance strictly between 0 and 4: -1
        would call identical faces different, 10 would accept strangers. (The range is
        checked here, where a threshold is used, not when a card is made: a converter
        may record a degenerate calibration, and ``info`` still shows it.)"""
        name = "far_1e3" if self.far_1e3 is not None else "best_accuracy"
        value = getattr(self, name)
        return None if value is None else check_threshold(value, f"model card threshold {name!r}")


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
    # How the aligner fills the part of a crop past the photo's edge (a name in
    # facenet_edge.align.FILLS): the fill the model was trained with.
    fill: str = "replicate"
    # Embed each crop and its mirror image, and use their normalised mean (test-time flip):
    # set when it measured worth its doubled embed time (docs/model.md).
    flip_test: bool = False
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

    def __post_init__(self) -> None:
        """Check every field's type and range, so a bad card fails here, naming the field,
        rather than deep inside preprocessing or a gallery write."""
        for name in ("name", "version", "architecture", "color_order", "alignment", "fill", "terms"):
            _check_type(self, name, str)
        _check_type(self, "compatibility_group", str, optional=True)
        _check_type(self, "flip_test", bool)
        for name in ("input_height", "input_width", "embedding_size", "schema"):
            _check_type(self, name, numbers.Integral)
            if getattr(self, name) < 1:
                raise CardError(f"model card field {name!r} must be at least 1, got {getattr(self, name)!r}")
        for name in ("flops", "parameters", "size_bytes"):
            _check_type(self, name, numbers.Integral, optional=True)
        for name in ("mean", "std"):
            _check_type(self, name, numbers.Real)
            if not math.isfinite(getattr(self, name)):
                raise CardError(f"model card field {name!r} must be finite, got {getattr(self, name)!r}")
        if self.std == 0:
            raise CardError("model card field 'std' must not be 0")
        if self.color_order not in ("RGB", "BGR"):
            raise CardError(f"model card field 'color_order' must be RGB or BGR, got {self.color_order!r}")
        if self.compatibility_group == "":
            raise CardError("model card field 'compatibility_group' must be null or a non-empty string")
        for name in ("quantization", "lfw", "extra"):
            _check_type(self, name, dict)
        _check_type(self, "training_data", list)
        if not all(isinstance(item, str) for item in self.training_data):
            raise CardError(f"model card field 'training_data' must be a list of strings, got {self.training_data!r}")
        if not isinstance(self.thresholds, Thresholds):
            raise CardError(f"model card field 'thresholds' must be a Thresholds, got {self.thresholds!r}")
        if self.schema > CARD_SCHEMA_VERSION:
            raise CardError(
                f"model card schema {self.schema} is newer than this facenet-edge reads ({CARD_SCHEMA_VERSION})"
            )

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
            extra = kwargs.get("extra", {})
            if not isinstance(extra, dict):
                raise CardError(f"model card field 'extra' must be an object, got {extra!r}")
            kwargs["extra"] = {**extra, **unknown}
        thresholds = data.get("thresholds") or {}
        if not isinstance(thresholds, dict):
            raise CardError(f"model card field 'thresholds' must be an object, got {thresholds!r}")
        allowed = {f.name for f in dataclasses.fields(Thresholds)}
        if set(thresholds) - allowed:
            raise CardError(
                f"model card field 'thresholds' has unknown key(s) {', '.join(sorted(set(thresholds) - allowed))}; "
                f"known: {', '.join(sorted(allowed))}"
            )
        kwargs["thresholds"] = Thresholds(**thresholds)
        return cls(**kwargs)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelCard:
        path = Path(path)
        raw = read_regular(path, "model card", MAX_CARD_BYTES, CardError)
        try:
            # parse_constant: JSON has no NaN or Infinity; Python's reader accepts them.
            data = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
        except UnicodeDecodeError:
            raise CardError(f"model card {path} is not UTF-8 text") from None
        except ValueError as exc:  # JSONDecodeError, and the constants refused
            raise CardError(f"model card {path} is not valid JSON: {exc}") from None
        try:
            return cls.from_dict(data)
        except CardError as exc:
            raise CardError(f"model card {path}: {exc}") from None


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


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
    digest = hashlib.sha256()
    with open_regular(model_path, "model", MAX_MODEL_BYTES, ModelError) as file:
        while chunk := file.read(_HASH_CHUNK):
            digest.update(chunk)
    return ModelIdentity(sha256=digest.hexdigest(), compatibility_group=card.compatibility_group)
