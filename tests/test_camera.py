"""Image and frame input: read_image errors, folder and video sources, open_source."""

from __future__ import annotations

import importlib.util
import logging
import struct
import zlib

import cv2
import numpy as np
import pytest

from facenet_edge.camera import FolderSource, Frame, FrameSource, OpenCVSource, Picamera2Source, open_source
from facenet_edge.errors import FacenetEdgeError, ImageError
from facenet_edge.io import declared_size, read_image


def _write_rgb(path, rgb):
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return path


def _png_header(width: int, height: int) -> bytes:
    """A PNG signature and IHDR chunk declaring ``width`` x ``height``, no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))


# --------------------------------------------------------------------------- read_image


def test_read_image_rgb_order(tmp_path):
    rgb = np.zeros((8, 6, 3), np.uint8)
    rgb[..., 0] = 200  # red
    image = read_image(_write_rgb(tmp_path / "red.png", rgb))
    assert image.shape == (8, 6, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image, rgb)


def test_read_image_grey_and_alpha_become_rgb(tmp_path):
    grey = tmp_path / "grey.png"
    cv2.imwrite(str(grey), np.full((5, 7), 90, np.uint8))
    assert read_image(grey).shape == (5, 7, 3)
    rgba = tmp_path / "alpha.png"
    cv2.imwrite(str(rgba), np.full((5, 7, 4), 60, np.uint8))
    assert read_image(rgba).shape == (5, 7, 3)


def test_read_image_jpeg(tmp_path, astronaut):
    path = tmp_path / "astronaut.jpg"
    _write_rgb(path, astronaut)
    assert declared_size(path.read_bytes()) == (512, 512)
    assert np.abs(read_image(path).astype(int) - astronaut).mean() < 5


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.jpg", b"", "empty"),
        ("text.jpg", b"just some text, certainly not a JPEG\n", "not an image"),
        ("corrupt.png", _png_header(64, 64) + b"\x00" * 100, "cannot decode"),
        ("huge.png", _png_header(20000, 20000), "too large"),
        ("huge.jpg", b"\xff\xd8\xff\xc0\x00\x11\x08" + struct.pack(">HH", 20000, 20000) + b"\x03" + b"\x00" * 9,
         "too large"),
    ],
)
def test_read_image_errors(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ImageError, match=message) as info:
        read_image(path)
    assert str(path) in str(info.value)


def test_read_image_too_small(tmp_path):
    path = _write_rgb(tmp_path / "dot.png", np.zeros((1, 1, 3), np.uint8))
    with pytest.raises(ImageError, match=r"too small \(1x1\)"):
        read_image(path)


def test_read_image_missing_and_directory(tmp_path):
    with pytest.raises(ImageError, match="not found"):
        read_image(tmp_path / "absent.png")
    with pytest.raises(ImageError, match="directory"):
        read_image(tmp_path)


def test_opencv_pixel_limit_set_before_cv2():
    import os

    assert os.environ.get("OPENCV_IO_MAX_IMAGE_PIXELS") == "100000000"


# --------------------------------------------------------------------------- sources


def test_folder_source_skips_unreadable(tmp_path, caplog):
    _write_rgb(tmp_path / "b.png", np.full((4, 4, 3), 10, np.uint8))
    _write_rgb(tmp_path / "a.png", np.full((4, 4, 3), 20, np.uint8))
    (tmp_path / "c.jpg").write_text("not an image")
    (tmp_path / "d.png").write_bytes(b"")
    (tmp_path / "sub").mkdir()
    with caplog.at_level(logging.WARNING, logger="facenet_edge.camera"), FolderSource(tmp_path) as source:
        frames = list(source)
    assert [f.path.name for f in frames] == ["a.png", "b.png"]
    assert [f.index for f in frames] == [0, 1]
    assert frames[0].image[0, 0, 0] == 20
    assert "c.jpg" in caplog.text and "d.png" in caplog.text


@pytest.fixture
def video(tmp_path):
    """Ten 64 x 48 red frames (BGR written), MJPEG at 10 fps."""
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    assert writer.isOpened()
    for _ in range(10):
        writer.write(np.full((48, 64, 3), (0, 0, 255), np.uint8))
    writer.release()
    return path


def test_opencv_source_reads_file_to_eof(video):
    with OpenCVSource(str(video)) as source:
        assert not source.live
        frames = list(source)
    assert len(frames) == 10
    assert [f.index for f in frames] == list(range(10))
    assert frames[0].image.shape == (48, 64, 3)
    assert frames[0].image[..., 0].mean() > 200 and frames[0].image[..., 2].mean() < 50  # RGB
    stamps = [f.timestamp for f in frames]
    assert stamps == sorted(stamps) and stamps[-1] == pytest.approx(0.9, abs=0.05)


def test_opencv_source_missing_file(tmp_path):
    with pytest.raises(ImageError, match="not found"):
        OpenCVSource(str(tmp_path / "absent.mp4"))


def test_open_source_dispatch(tmp_path, video):
    with open_source(str(tmp_path)) as source:
        assert isinstance(source, FolderSource) and isinstance(source, FrameSource)
    with open_source(str(video)) as source:
        assert isinstance(source, OpenCVSource)
        assert isinstance(next(iter(source)), Frame)


@pytest.mark.skipif(importlib.util.find_spec("picamera2") is not None, reason="picamera2 is installed")
def test_picamera2_missing_is_a_clear_error():
    with pytest.raises(FacenetEdgeError, match="picamera2 is not installed"):
        open_source("picamera2")
    with pytest.raises(FacenetEdgeError, match="picamera2 is not installed"):
        Picamera2Source()
