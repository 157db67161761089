"""Image and frame input: read_image errors, folder and video sources, open_source,
live flags, reconnecting, and the keep-newest-frame reader."""

from __future__ import annotations

import importlib.util
import logging
import queue
import struct
import sys
import threading
import time
import types
import zlib

import cv2
import numpy as np
import pytest

from facenet_edge.camera import (
    SOURCE_OPTIONS,
    FolderSource,
    Frame,
    FrameSource,
    LatestFrameSource,
    OpenCVSource,
    Picamera2Source,
    open_source,
)
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


# --------------------------------------------------------------------------- live flags, options, reconnecting


class FakeCapture:
    """Stands in for ``cv2.VideoCapture``. ``opens``: what each successive open does, None
    for an open that fails, else how many frames it reads before failing (a lost camera).
    Records opens and property sets in ``calls``."""

    def __init__(self, opens):
        self.opens = list(opens)
        self.calls = []
        self.frames = 0

    def __call__(self, source, api_preference=cv2.CAP_ANY, params=()):
        self.calls.append(("open", source, api_preference, list(params)))
        reads = self.opens.pop(0) if self.opens else None
        return _Capture(self, reads)


class _Capture:
    def __init__(self, owner, reads):
        self.owner, self.reads = owner, reads

    def isOpened(self):
        return self.reads is not None

    def set(self, prop, value):
        self.owner.calls.append(("set", prop, value))
        return True

    def get(self, prop):
        return 0.0

    def read(self):
        if not self.reads:
            return False, None
        self.reads -= 1
        self.owner.frames += 1
        return True, np.full((4, 6, 3), self.owner.frames % 256, np.uint8)

    def release(self):
        self.owner.calls.append(("release",))


@pytest.fixture
def capture(monkeypatch):
    """Replace cv2.VideoCapture; returns a function setting up what the opens do."""

    def install(*opens):
        fake = FakeCapture(opens)
        monkeypatch.setattr(cv2, "VideoCapture", fake)
        return fake

    return install


FAST = {"backoff_s": 0.001, "max_backoff_s": 0.002}  # reconnect without waiting in tests


def test_live_flags(tmp_path, video, capture):
    capture(*[5] * 6)
    for spec in (0, "0", "rtsp://cam/stream", "http://cam/video.mjpg"):
        with open_source(spec) as source:
            assert source.live is True and isinstance(source, FrameSource), spec
    with open_source(video) as source:  # a Path works as well as a str
        assert source.live is False
    with open_source(str(tmp_path)) as source:
        assert source.live is False and isinstance(source, FolderSource)
    assert Picamera2Source.live is True
    with OpenCVSource(str(video), live=True) as source:  # overridable, e.g. a FIFO
        assert source.live is True


def test_open_source_passes_opencv_options_whatever_the_spec(tmp_path, video, capture):
    options = {
        "width": 640,
        "height": 480,
        "api_preference": cv2.CAP_FFMPEG,
        "params": {cv2.CAP_PROP_OPEN_TIMEOUT_MSEC: 3000},
        "properties": {cv2.CAP_PROP_FPS: 15},
        "max_retries": None,
        "main_size": (1280, 960),  # picamera2's: ignored by OpenCV sources
    }
    for spec in (2, "2", "rtsp://cam/stream", video, str(video)):
        fake = capture(5)
        with open_source(spec, **options) as source:
            assert isinstance(source, OpenCVSource) and source.max_retries is None
        expected_source = 2 if spec in (2, "2") else str(spec)
        assert fake.calls[0] == ("open", expected_source, cv2.CAP_FFMPEG, [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, 3000])
        sets = {prop: value for _, prop, value in (c for c in fake.calls if c[0] == "set")}
        assert sets[cv2.CAP_PROP_FRAME_WIDTH] == 640 and sets[cv2.CAP_PROP_FRAME_HEIGHT] == 480
        assert sets[cv2.CAP_PROP_FPS] == 15
        assert (cv2.CAP_PROP_BUFFERSIZE in sets) == source.live  # one queued frame, live only
    with open_source(str(tmp_path), **options) as source:  # a folder has nothing to apply them to
        assert isinstance(source, FolderSource)
    with pytest.raises(TypeError, match="unknown option.*widht"):
        open_source(str(tmp_path), widht=640)
    assert {"width", "max_retries", "main_size", "properties"} <= SOURCE_OPTIONS


def test_reconnect_reapplies_options_and_continues(capture, caplog):
    fake = capture(2, None, 3)  # 2 frames, lost; the first reopen fails, the second works
    with caplog.at_level(logging.WARNING, logger="facenet_edge.camera"):
        with open_source(0, max_retries=3, properties={cv2.CAP_PROP_FPS: 10}, **FAST) as source:
            frames = [f for _, f in zip(range(5), source)]
    assert [f.index for f in frames] == [0, 1, 2, 3, 4]
    assert [c[0] for c in fake.calls].count("open") == 3
    assert [c for c in fake.calls if c[:2] == ("set", cv2.CAP_PROP_FPS)] == [("set", cv2.CAP_PROP_FPS, 10)] * 2
    assert "attempt 1/3" in caplog.text and "attempt 2/3" in caplog.text


def test_reconnect_gives_up_after_max_retries(capture):
    capture(1, None, None, None)
    with open_source(0, max_retries=2, **FAST) as source, pytest.raises(ImageError, match="after 2 reconnect"):
        list(source)


def test_a_camera_that_opens_but_delivers_nothing_still_runs_out_of_retries(capture):
    fake = capture(1, *[0] * 10)  # every reopen "works", no read ever does
    with open_source(0, max_retries=3, **FAST) as source, pytest.raises(ImageError, match="gave up"):
        list(source)
    assert [c[0] for c in fake.calls].count("open") == 4  # the first open + 3 attempts


def test_max_retries_none_retries_forever(capture):
    fake = capture(1, *[None] * 40, 1)  # 40 failed reopens, then it is back
    with open_source(0, max_retries=None, **FAST) as source:
        assert [f.index for _, f in zip(range(2), source)] == [0, 1]
    assert [c[0] for c in fake.calls].count("open") == 42


def test_backoff_is_exponential_and_capped(capture, monkeypatch):
    capture(1)
    source = OpenCVSource(0, max_retries=None, backoff_s=0.5, max_backoff_s=8.0)
    waits = []
    monkeypatch.setattr(source._stopping, "wait", waits.append)
    for _ in range(2000):  # far past where 2**n would overflow a float
        source._retry_wait("test")
    assert waits[:6] == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0] and max(waits) == 8.0
    with pytest.raises(ValueError, match="max_retries"):
        OpenCVSource(0, max_retries=-1)
    with pytest.raises(ValueError, match="backoff"):
        OpenCVSource(0, backoff_s=2.0, max_backoff_s=1.0)


def test_file_source_ends_at_eof_without_reconnecting(video):
    with open_source(video, max_retries=None) as source:
        assert len(list(source)) == 10


# --------------------------------------------------------------------------- picamera2 (faked)


class FakePicamera2:
    """picamera2.Picamera2 stand-in: ``plan[i]`` is how many requests camera ``i`` (in
    order of creation) serves before failing; a missing entry serves forever; an
    Exception entry makes that camera fail to open."""

    plan: list = []
    made: list = []

    def __init__(self, camera_num=0):
        step = self.plan[len(self.made)] if len(self.made) < len(self.plan) else 10**9
        self.made.append(self)
        if isinstance(step, Exception):
            raise step
        self.camera_num, self.left, self.closed, self.waits = camera_num, step, False, []

    def create_preview_configuration(self, main, lores):
        return {"main": main, "lores": lores}

    def configure(self, config):
        self.config = config

    def start(self):
        pass

    def capture_request(self, wait=None):
        self.waits.append(wait)
        if self.left == 0:
            raise TimeoutError("camera timed out")
        self.left -= 1
        return FakeRequest(self.config)

    def stop(self):
        if self.closed:
            raise RuntimeError("already closed")

    def close(self):
        self.closed = True


class FakeRequest:
    def __init__(self, config):
        self.config = config

    def make_array(self, name):
        width, height = self.config[name]["size"]
        if name == "main":
            return np.zeros((height, width, 3), np.uint8)
        return np.full((height * 3 // 2, width), 128, np.uint8)  # YUV420, grey

    def release(self):
        pass


@pytest.fixture
def picamera2(monkeypatch):
    module = types.ModuleType("picamera2")
    module.Picamera2 = FakePicamera2
    monkeypatch.setitem(sys.modules, "picamera2", module)
    monkeypatch.setattr(FakePicamera2, "made", [])
    monkeypatch.setattr(FakePicamera2, "plan", [])
    return FakePicamera2


def test_picamera2_reconnects_after_a_failed_capture(picamera2, caplog):
    picamera2.plan = [2, RuntimeError("camera busy"), 3]  # fails after 2; one reopen fails; the next works
    with caplog.at_level(logging.WARNING, logger="facenet_edge.camera"):
        with open_source("picamera2", width=640, height=480, lores_size=(160, 120), **FAST) as source:
            assert source.live and source.main_size == (640, 480)
            frames = [f for _, f in zip(range(5), source)]
    assert [f.index for f in frames] == [0, 1, 2, 3, 4]
    assert frames[0].image.shape == (480, 640, 3) and frames[0].lores.shape == (120, 160, 3)
    first, _, third = picamera2.made
    assert first.closed and third.closed and first.waits[0] == 5.0  # capture_timeout_s goes to wait=
    assert "camera timed out" in caplog.text and "camera busy" in caplog.text


def test_picamera2_errors_are_clear(picamera2):
    picamera2.plan = [1]
    with Picamera2Source(reconnect=False) as source, pytest.raises(ImageError, match="Pi camera 0 failed"):
        list(source)
    picamera2.plan = [RuntimeError("no cameras available")]
    picamera2.made = []
    with pytest.raises(FacenetEdgeError, match="cannot open Pi camera 0.*no cameras available"):
        Picamera2Source()
    picamera2.plan = [1, *[RuntimeError("gone")] * 3]
    picamera2.made = []
    with Picamera2Source(max_retries=2, **FAST) as source, pytest.raises(ImageError, match="gave up after 2"):
        list(source)
    with pytest.raises(TypeError, match="width and height together"):
        open_source("picamera2", width=640)


# --------------------------------------------------------------------------- LatestFrameSource


class FakeLiveSource:
    """A camera delivering frames faster than they are consumed, then failing or ending."""

    live = True

    def __init__(self, count: int, interval_s: float, error: Exception | None = None):
        self.count, self.interval_s, self.error = count, interval_s, error
        self.closed = threading.Event()
        self.closed_by: threading.Thread | None = None

    def __iter__(self):
        for i in range(self.count):
            time.sleep(self.interval_s)
            yield Frame(image=np.zeros((4, 4, 3), np.uint8), timestamp=time.monotonic(), index=i)
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        self.closed_by = threading.current_thread()
        self.closed.set()


def test_latest_frame_source_with_a_slow_consumer_drops_and_yields_the_newest():
    source = FakeLiveSource(count=40, interval_s=0.002)
    seen = []
    with LatestFrameSource(source) as latest:
        assert latest.live and isinstance(latest, FrameSource)
        for frame in latest:
            seen.append(frame.index)
            time.sleep(0.02)  # a slow recogniser
    assert latest.read == 40
    assert latest.dropped > 0 and latest.dropped + len(seen) == 40
    assert seen == sorted(seen) and seen[-1] == 39  # never stale, never out of order
    assert source.closed.is_set() and source.closed_by is not threading.main_thread()  # the thread closes it


class ManualSource:
    """A live source that yields exactly the frames the test puts in, when it puts them."""

    live = True

    def __init__(self):
        self.queue: queue.Queue = queue.Queue()
        self.closed = False

    def __iter__(self):
        while (index := self.queue.get()) is not None:
            yield Frame(image=np.zeros((2, 2, 3), np.uint8), timestamp=float(index), index=index)

    def close(self):
        self.closed = True


def wait_until(condition, timeout_s=5.0):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def test_latest_frame_source_hands_out_the_newest_frame_exactly():
    source = ManualSource()
    latest = LatestFrameSource(source)
    frames = iter(latest)
    source.queue.put(0)
    assert next(frames).index == 0  # starts the thread, waits for the first frame
    for i in (1, 2, 3):
        source.queue.put(i)
    wait_until(lambda: latest.read == 4)
    assert next(frames).index == 3 and latest.dropped == 2  # 1 and 2 were replaced unseen
    source.queue.put(4)
    assert next(frames).index == 4 and latest.dropped == 2
    source.queue.put(None)  # the source ends
    assert list(frames) == []
    latest.close()
    assert source.closed


def test_latest_frame_source_raises_the_threads_error_in_the_consumer():
    source = FakeLiveSource(count=2, interval_s=0.0, error=ImageError("camera lost"))
    latest = LatestFrameSource(source)
    with pytest.raises(ImageError, match="camera lost"):
        for _ in latest:
            time.sleep(0.01)
    latest.close()
    assert source.closed.is_set()


def test_latest_frame_source_close_joins_the_thread_even_during_a_reconnect_wait(capture):
    capture(1)  # one frame, then every reopen fails: the source waits up to 30 s between tries
    source = OpenCVSource(0, max_retries=None, backoff_s=30.0, max_backoff_s=30.0)
    latest = LatestFrameSource(source)
    assert next(iter(latest)).index == 0
    wait_until(lambda: source._failures == 1)  # now in the back-off wait
    started = time.monotonic()
    latest.close()
    assert time.monotonic() - started < 2.0
    assert not latest._thread.is_alive() and source._capture is None
    assert list(latest) == []  # closed: iteration ends


def test_latest_frame_source_never_iterated_closes_its_source():
    source = ManualSource()
    LatestFrameSource(source).close()
    assert source.closed


def test_open_source_latest_only_wraps_live_sources_only(capture, video, tmp_path):
    capture(3, 10)  # the camera, then the video file (a regular file, so not live)
    with open_source("0", latest_only=True) as source:
        assert isinstance(source, LatestFrameSource) and source.live
        assert isinstance(source.source, OpenCVSource)
    for spec in (video, tmp_path):
        with open_source(spec, latest_only=True) as source:
            assert not isinstance(source, LatestFrameSource) and not source.live
