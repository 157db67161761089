"""facenet-edge: FaceNet-style face recognition on small devices.

Names are imported on first use, so ``import facenet_edge`` stays cheap (no OpenCV,
interpreter or SQLite until needed)::

    from facenet_edge import FacePipeline, Gallery, open_source
    with FacePipeline(model_path="model.tflite") as pipeline, Gallery.open("people.db") as gallery:
        with open_source("0", latest_only=True) as camera:
            for frame in camera:
                faces = pipeline.process(frame.image, gallery=gallery)

The top-level names are the public API; docs/architecture.md lists them.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

from .errors import (
    CardError,
    FacenetEdgeError,
    GalleryError,
    ImageError,
    IncompatibleModelError,
    ModelError,
    MultipleFacesError,
    NoFaceError,
    PoorPhotoError,
)

# OpenCV reads its decoder size limit once, when cv2 is first imported: set it before any
# submodule imports cv2 (same value as facenet_edge.io.MAX_PIXELS; a user setting wins).
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", "100000000")

# name -> submodule it lives in (imported on first access; see __getattr__)
_LAZY = {
    "FacePipeline": "pipeline",
    "PipelineOptions": "pipeline",
    "Face": "pipeline",
    "Vote": "pipeline",
    "Tracker": "tracker",
    "TrackerOptions": "tracker",
    "QualityOptions": "enrolment",
    "check_face": "enrolment",
    "consistency": "enrolment",
    "card_distribution": "fpir",
    "threshold_for_fpir": "fpir",
    "Embedder": "embed",
    "default_model_path": "embed",
    "Detection": "detect",
    "create_detector": "detect",
    "ModelCard": "card",
    "read_image": "io",
    "Gallery": "gallery",
    "Match": "gallery",
    "Person": "gallery",
    "open_source": "camera",
    "Frame": "camera",
    "FrameSource": "camera",
    "LatestFrameSource": "camera",
}

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names load lazily
    from .camera import Frame, FrameSource, LatestFrameSource, open_source
    from .card import ModelCard
    from .detect import Detection, create_detector
    from .embed import Embedder, default_model_path
    from .enrolment import QualityOptions, check_face, consistency
    from .fpir import card_distribution, threshold_for_fpir
    from .gallery import Gallery, Match, Person
    from .io import read_image
    from .pipeline import Face, FacePipeline, PipelineOptions, Vote
    from .tracker import Tracker, TrackerOptions

__all__ = [
    *_LAZY,
    "__version__",
    "CardError",
    "FacenetEdgeError",
    "GalleryError",
    "ImageError",
    "IncompatibleModelError",
    "ModelError",
    "MultipleFacesError",
    "NoFaceError",
    "PoorPhotoError",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    elif name == "__version__":
        from importlib.metadata import version

        value = version("facenet-edge")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
