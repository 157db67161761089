"""Face detection backends. (Detection type only: backends are being written.)"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Detection:
    """One face found in an image, in that image's pixel coordinates.

    ``box``: (x1, y1, x2, y2) float. ``landmarks``: (4, 2) float, or None for box-only
    detectors, in this order: image-left eye, image-right eye, nose tip, mouth centre.
    """

    box: np.ndarray
    score: float
    landmarks: np.ndarray | None = None

    def scaled(self, factor: float) -> "Detection":
        """The same detection in an image ``factor`` times larger (detect on ``lores``, crop from ``main``)."""
        landmarks = None if self.landmarks is None else self.landmarks * factor
        return Detection(box=self.box * factor, score=self.score, landmarks=landmarks)
