"""Face alignment: a similarity transform from detected landmarks to the model's template.

The training stack imports this exact module, so the crops a model is trained on and the
crops it sees on the device are made by the same pure function of
(image, detection, output size, border, fill).
"""

from __future__ import annotations

import cv2
import numpy as np

from .detect import Detection

# Canonical landmark positions, as fractions of the output width/height, in the order of
# Detection.landmarks: image-left eye, image-right eye, nose tip, mouth centre.
# From the widely used ArcFace 112x112 five-point template (mouth corners averaged),
# which keeps the whole face from brow to chin inside a square crop.
TEMPLATES: dict[str, np.ndarray] = {
    "facenet96": np.array(
        [
            [38.2946 / 112, 51.6963 / 112],
            [73.5318 / 112, 51.5014 / 112],
            [56.0252 / 112, 71.7366 / 112],
            [56.1396 / 112, 92.2848 / 112],
        ],
        dtype=np.float64,
    ),
}

# Where those landmarks sit inside a detector's box (fractions of box width/height) on
# average: used when a detector gives a box but no landmarks (the Haar cascade), so a
# box-only detection still gets a defined crop from the same code path.
BOX_LANDMARK_FRACTIONS = np.array(
    [[0.31, 0.40], [0.69, 0.40], [0.50, 0.60], [0.50, 0.80]], dtype=np.float64
)


# How the part of a crop that falls outside the image (a tightly cropped photo) is filled:
# OpenCV border mode and constant. "replicate" is the default because every model so far
# was trained and calibrated on it; "grey" is the inputs' normalisation mean (127.5), so
# the network sees about zero there. benchmarks/tight_crops.py compares them on LFW.
FILLS: dict[str, tuple[int, tuple[int, int, int]]] = {
    "replicate": (cv2.BORDER_REPLICATE, (0, 0, 0)),
    "black": (cv2.BORDER_CONSTANT, (0, 0, 0)),
    "grey": (cv2.BORDER_CONSTANT, (128, 128, 128)),
    "reflect": (cv2.BORDER_REFLECT_101, (0, 0, 0)),
}
DEFAULT_FILL = "replicate"


def box_landmarks(box: np.ndarray, fractions: np.ndarray = BOX_LANDMARK_FRACTIONS) -> np.ndarray:
    """Landmark estimates for a box ``(x1, y1, x2, y2)``."""
    x1, y1, x2, y2 = (float(v) for v in box)
    return np.stack([x1 + fractions[:, 0] * (x2 - x1), y1 + fractions[:, 1] * (y2 - y1)], axis=1)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) mapping src to dst.

    Closed form (Umeyama 1991). OpenCV's estimateAffinePartial2D is a robust estimator that
    may drop one of our four points as an outlier, which would make crops jitter.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    cov = dst_c.T @ src_c / len(src)
    u, s, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[-1] = -1
    rotation = u @ np.diag(d) @ vt
    var_src = (src_c**2).sum() / len(src)
    scale = (s * d).sum() / var_src if var_src > 0 else 1.0
    matrix = np.zeros((2, 3), dtype=np.float64)
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = dst_mean - scale * rotation @ src_mean
    return matrix


def alignment_matrix(
    detection: Detection,
    size: tuple[int, int],
    border: int = 0,
    template: str = "facenet96",
) -> np.ndarray:
    """2x3 matrix taking image coordinates to the aligned crop of ``size`` (height, width),
    grown by ``border`` pixels on every side (training caches a border for random crops;
    the centre ``size`` of a bordered crop is the unbordered crop, up to OpenCV's 1/32-pixel
    warp precision: a few grey levels on under 1% of pixels)."""
    height, width = size
    points = detection.landmarks if detection.landmarks is not None else box_landmarks(detection.box)
    points = np.asarray(points, dtype=np.float64)[:4]
    dst = TEMPLATES[template] * np.array([width, height]) + border
    return similarity_transform(points, dst)


def align(
    image: np.ndarray,
    detection: Detection,
    size: tuple[int, int],
    border: int = 0,
    template: str = "facenet96",
    *,
    fill: str = DEFAULT_FILL,
) -> np.ndarray:
    """Crop and align one face. ``image`` is H x W x 3 uint8 (any channel order: it is
    only resampled). ``fill`` (a name in ``FILLS``) says how the part of the crop outside
    the image is filled. Returns (height + 2*border) x (width + 2*border) x 3 uint8."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"align expects an H x W x 3 image, got shape {image.shape}")
    if fill not in FILLS:
        raise ValueError(f"unknown fill {fill!r}: use one of {', '.join(FILLS)}")
    border_mode, border_value = FILLS[fill]
    height, width = size
    out_size = (width + 2 * border, height + 2 * border)
    matrix = alignment_matrix(detection, size, border, template)
    # A face much larger than the crop is first shrunk by an integer factor with area
    # averaging (plain bilinear warping would alias); only the region the crop reads is
    # shrunk, so the cost does not grow with the frame, and the region starts on a multiple
    # of the factor so the result equals shrinking the whole frame.
    factor = int(1.0 / np.sqrt(abs(np.linalg.det(matrix[:, :2]))))
    if factor >= 2:
        inverse = cv2.invertAffineTransform(matrix)
        corners = np.array([[0, 0, 1], [out_size[0], 0, 1], [0, out_size[1], 1], [out_size[0], out_size[1], 1]], float)
        source = corners @ inverse.T
        x0, y0 = (np.maximum(np.floor(source.min(axis=0) / factor) - 1, 0) * factor).astype(int)
        x1, y1 = np.ceil(source.max(axis=0) / factor + 1).astype(int) * factor
        x1 = x0 + (min(x1, image.shape[1]) - x0) // factor * factor
        y1 = y0 + (min(y1, image.shape[0]) - y0) // factor * factor
        if x1 > x0 and y1 > y0:
            region = image[y0:y1, x0:x1]
            image = cv2.resize(region, ((x1 - x0) // factor, (y1 - y0) // factor), interpolation=cv2.INTER_AREA)
            # A shrunk pixel q is the mean of source pixels whose centre is x0 + (f-1)/2 + f*q.
            offset = np.array([x0, y0], float) + (factor - 1) / 2
            matrix = np.concatenate([matrix[:, :2] * factor, (matrix[:, :2] @ offset + matrix[:, 2])[:, None]], axis=1)
    return cv2.warpAffine(
        image,
        matrix,
        out_size,
        flags=cv2.INTER_LINEAR,
        borderMode=border_mode,
        borderValue=border_value,
    )
