"""On-the-fly augmentation of bordered crops, in numpy/OpenCV.

The cache stores crops with a border (96 + 2 * 8 = 112 px); training samples a 96 px
window from them, evaluation takes the centre window, which is exactly the crop the
runtime's ``facenet_edge.align.align(image, detection, (96, 96))`` makes.

Why OpenCV rather than tf.image: on the 2-core training machine, one affine warp per
image (crop + scale + rotation + flip in a single resample) and one colour matrix took
19-20 ms for 120 faces, the tf.image equivalent in a 2-way parallel tf.data map 72 ms
(docs/training.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from facenet_edge.align import FILLS

# ITU-R BT.601 luma, as tf.image.rgb_to_grayscale and OpenCV use.
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the random transforms; 0 switches one off. Probabilities are per image.

    ``shift``: largest offset (px) of the crop window from the centre (None: the whole
    cached border). ``scale``: +- relative zoom. ``rotation``: +- degrees. ``brightness``:
    +- fraction of full scale added. ``contrast``/``saturation``: +- relative change.
    ``tight``: probability of a tightly cropped source photo: only a square window
    round the face, ``tight_window`` times the output size on a side (0.72 is the median
    of LFW cut to 1.1x BlazeFace's box, where 37 % of the crop fell outside the photo),
    is kept and the rest filled as ``facenet_edge.align`` fills it (``tight_fill``, a
    name in ``FILLS``).
    """

    def __post_init__(self) -> None:
        if self.tight_fill not in FILLS:
            raise ValueError(f"augment.tight_fill {self.tight_fill!r}: use one of {', '.join(FILLS)}")

    enabled: bool = True
    flip: float = 0.5
    shift: int | None = None
    scale: float = 0.1
    rotation: float = 10.0
    brightness: float = 0.15
    contrast: float = 0.3
    saturation: float = 0.3
    grayscale: float = 0.1
    blur: float = 0.15
    blur_sigma: tuple[float, float] = (0.5, 1.5)
    jpeg: float = 0.25
    jpeg_quality: tuple[int, int] = (30, 90)
    tight: float = 0.0
    tight_window: tuple[float, float] = (0.72, 1.0)
    tight_fill: str = "grey"


def centre_crop(crops: np.ndarray, size: int) -> np.ndarray:
    """The centre ``size`` x ``size`` window of (N, S, S, C) crops: the runtime crop."""
    offset = (crops.shape[1] - size) // 2
    if offset < 0 or crops.shape[1] - size != 2 * offset:
        raise ValueError(f"cannot centre-crop {size} px from {crops.shape[1]} px crops (need an even border)")
    return crops[:, offset:offset + size, offset:offset + size]


def _affine(size_in: int, size_out: int, shift: np.ndarray, scale: float, angle: float, flip: bool) -> np.ndarray:
    """2x3 matrix from input to output pixels: rotate/zoom about the (shifted) input
    centre, place it at the output centre, then mirror. Pixel centres sit at (n-1)/2."""
    c_in = (size_in - 1) / 2 + shift
    c_out = (size_out - 1) / 2
    m = cv2.getRotationMatrix2D((float(c_in[0]), float(c_in[1])), angle, scale)
    m[:, 2] += c_out - c_in
    if flip:
        m[0] = -m[0]
        m[0, 2] += size_out - 1
    return m


def _colour_matrix(mean: float, brightness: float, contrast: float, saturation: float) -> np.ndarray:
    """3x4 matrix for: add ``brightness``; scale about the image mean by ``contrast``;
    scale away from the BT.601 grey by ``saturation`` (0 = greyscale). The grey of a
    constant offset is that offset, so the offset passes through saturation unchanged."""
    sat = saturation * np.eye(3) + (1 - saturation) * np.outer(np.ones(3), LUMA)
    offset = contrast * brightness + (1 - contrast) * (mean + brightness)
    return np.hstack([contrast * sat, np.full((3, 1), offset)]).astype(np.float32)


def tight_cut(crop: np.ndarray, side: int, offset: np.ndarray, fill: str) -> np.ndarray:
    """``crop`` as if its source photo ended at a ``side`` px square round its centre
    (moved by ``offset`` px): the rest filled like the aligner fills past an image's edge."""
    full = crop.shape[0]
    x0, y0 = np.clip((full - side) // 2 + offset, 0, full - side)
    border_mode, value = FILLS[fill]
    window = crop[y0:y0 + side, x0:x0 + side]
    return cv2.copyMakeBorder(window, int(y0), int(full - side - y0), int(x0), int(full - side - x0),
                              border_mode, value=value)


def augment_batch(crops: np.ndarray, size: int, config: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """Random ``size`` px views of (N, S, S, 3) uint8 bordered crops -> (N, size, size, 3) uint8."""
    return cut_tight(augment_views(crops, size, config, rng), config, rng)


def augment_views(crops: np.ndarray, size: int, config: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """:func:`augment_batch` before its tight cuts: the views as from the whole photo."""
    if not config.enabled:
        return np.ascontiguousarray(centre_crop(crops, size))
    n, full = crops.shape[0], crops.shape[1]
    border = (full - size) // 2
    max_shift = border if config.shift is None else min(config.shift, border)
    shifts = rng.integers(-max_shift, max_shift + 1, size=(n, 2)) if max_shift else np.zeros((n, 2))
    scales = 1 + rng.uniform(-config.scale, config.scale, n)
    angles = rng.uniform(-config.rotation, config.rotation, n)
    flips = rng.random(n) < config.flip
    # Brightness, contrast and saturation are all affine in colour: fold them into one
    # 3x4 matrix per image, applied with cv2.transform (rounds and saturates to uint8).
    brightness = rng.uniform(-config.brightness, config.brightness, n) * 255
    contrast = rng.uniform(1 - config.contrast, 1 + config.contrast, n)
    saturation = rng.uniform(1 - config.saturation, 1 + config.saturation, n)
    saturation[rng.random(n) < config.grayscale] = 0.0
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        m = _affine(full, size, shifts[i], scales[i], angles[i], flips[i])
        view = cv2.warpAffine(crops[i], m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        colour = _colour_matrix(sum(cv2.mean(view)[:3]) / 3, brightness[i], contrast[i], saturation[i])
        out[i] = cv2.transform(view, colour)

    for i in np.flatnonzero(rng.random(n) < config.blur):
        out[i] = cv2.GaussianBlur(out[i], (0, 0), float(rng.uniform(*config.blur_sigma)))
    for i in np.flatnonzero(rng.random(n) < config.jpeg):
        quality = int(rng.integers(config.jpeg_quality[0], config.jpeg_quality[1] + 1))
        # OpenCV's codec expects BGR: converting keeps its chroma subsampling on the right channels.
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(out[i], cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
        out[i] = cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    return out


def mix_faces(views: np.ndarray, rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``views`` with each of ``rows`` blended with another view of the batch, in a weight
    drawn uniformly from [0, 1]: inputs no photo gives, for a teacher to label (function
    matching, Beyer et al. 2022), so distillation is not limited to the faces held."""
    out = views.copy()
    partners = rng.integers(0, len(views) - 1, len(rows))
    partners += partners >= rows  # never the view itself
    weights = rng.random(len(rows))[:, None, None, None]
    mixed = weights * views[rows] + (1 - weights) * views[partners]
    out[rows] = np.rint(mixed).astype(np.uint8)
    return out


def cut_tight(views: np.ndarray, config: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """A copy of :func:`augment_views`' output with ``config.tight`` of the views tightly cut."""
    out = views.copy()
    if not config.enabled:
        return out
    n, size = views.shape[0], views.shape[1]
    # Last, as the aligner fills after the photo was taken and compressed; drawn last so
    # configs without tight crops keep their random stream.
    tight = np.flatnonzero(rng.random(n) < config.tight)
    sides = np.round(rng.uniform(*config.tight_window, n) * size).astype(int)
    offsets = np.round(rng.uniform(-0.06, 0.06, (n, 2)) * sides[:, None]).astype(int)
    for i in tight:
        out[i] = tight_cut(out[i], sides[i], offsets[i], config.tight_fill)
    return out
