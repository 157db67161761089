"""Reading image files into the runtime's format: RGB uint8 H x W x 3.

Sizes declared in PNG and JPEG headers are checked before decoding, so a small file
claiming a huge image (a decompression bomb) is refused without allocating it.
"""

from __future__ import annotations

import struct
from pathlib import Path

import cv2
import numpy as np

from .errors import ImageError
from .files import read_regular

MAX_PIXELS = 100_000_000
# Larger than any photo a camera writes (a 100-megapixel PNG is rarely over 150 MB);
# checked from the file's size before anything is read.
MAX_FILE_BYTES = 256 * 1024 * 1024
MIN_SIDE = 2

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers (baseline, progressive, lossless, ...); C4, C8 and CC are
# other segments sharing the range.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _png_size(data: bytes) -> tuple[int, int] | None:
    # Signature, then the IHDR chunk: length, b"IHDR", width, height (big-endian).
    if data[:8] != _PNG_SIGNATURE or data[12:16] != b"IHDR" or len(data) < 24:
        return None
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    if data[:2] != b"\xff\xd8":
        return None
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # standalone markers carry no length
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if marker in _JPEG_SOF and pos + 9 <= len(data):
            height, width = struct.unpack(">HH", data[pos + 5 : pos + 9])
            return width, height
        pos += 2 + length
    return None


def declared_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG or JPEG header, None for other formats."""
    return _png_size(data) or _jpeg_size(data)


def _check_size(path: Path, width: int, height: int) -> None:
    if width < MIN_SIDE or height < MIN_SIDE:
        raise ImageError(f"image too small ({width}x{height}): {path}")
    if width * height > MAX_PIXELS:
        raise ImageError(
            f"image too large ({width}x{height} = {width * height / 1e6:.0f} megapixels, "
            f"limit {MAX_PIXELS / 1e6:.0f}): {path}"
        )


def read_image(path: str | Path) -> np.ndarray:
    """Decode an image file to RGB uint8 H x W x 3 (greyscale expanded, alpha dropped,
    EXIF orientation applied). Raises ImageError naming the file when it is missing,
    not a regular file (a FIFO, a device), over 256 MB, empty, not an image, corrupt,
    smaller than 2x2 or over 100 megapixels."""
    path = Path(path)
    data = read_regular(path, "image", MAX_FILE_BYTES, ImageError)
    if not data:
        raise ImageError(f"image file is empty: {path}")
    size = declared_size(data)
    if size is not None:
        _check_size(path, *size)
    elif not cv2.haveImageReader(str(path)):
        raise ImageError(f"not an image (or a format OpenCV cannot read): {path}")
    # imdecode on bytes we already hold: no second read, and non-ASCII paths work everywhere.
    try:
        bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    except cv2.error as exc:  # OpenCV's own size limit (OPENCV_IO_MAX_IMAGE_PIXELS) asserts
        raise ImageError(f"cannot decode image {path}: {exc.err}") from None
    if bgr is None:
        raise ImageError(f"cannot decode image (corrupt or truncated?): {path}")
    _check_size(path, bgr.shape[1], bgr.shape[0])
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
