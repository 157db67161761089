"""facenet-edge: FaceNet-style face recognition on small devices.

Names are imported on first use, so ``import facenet_edge`` stays cheap (no OpenCV,
interpreter or SQLite until needed)::

    from facenet_edge import FacePipeline, read_image
    with FacePipeline(model_path="model.tflite") as pipeline:
        faces = pipeline.process(read_image("photo.jpg"))
"""

from __future__ import annotations

import importlib
import os
from typing import Any

from .errors import (
    FacenetEdgeError,
    GalleryError,
    ImageError,
    IncompatibleModelError,
    ModelError,
    MultipleFacesError,
    NoFaceError,
)

# OpenCV reads its decoder size limit once, when cv2 is first imported: set it before any
# submodule imports cv2 (same value as facenet_edge.io.MAX_PIXELS; a user setting wins).
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", "100000000")

_LAZY = {
    "FacePipeline": "pipeline",
    "PipelineOptions": "pipeline",
    "Face": "pipeline",
    "Vote": "pipeline",
    "Embedder": "embed",
    "default_model_path": "embed",
    "Detection": "detect",
    "create_detector": "detect",
    "ModelCard": "card",
    "read_image": "io",
    "open_source": "camera",
    "Frame": "camera",
}

__all__ = [
    *_LAZY,
    "__version__",
    "FacenetEdgeError",
    "GalleryError",
    "ImageError",
    "IncompatibleModelError",
    "ModelError",
    "MultipleFacesError",
    "NoFaceError",
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
