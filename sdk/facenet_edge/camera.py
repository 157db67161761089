"""Frame sources: OpenCV capture (device index, video file, RTSP/HTTP URL), picamera2,
a folder of images. Each yields ``Frame`` objects holding RGB uint8 images."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import cv2
import numpy as np

from .errors import FacenetEdgeError, ImageError
from .io import read_image

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Frame:
    """One frame. ``timestamp``: seconds — the monotonic clock for live sources, the
    position in the file for video files, the read time for folders. ``lores``: the small
    detection stream when the source has one (picamera2). ``path``: the file it came from
    (folders)."""

    image: np.ndarray
    timestamp: float
    index: int
    lores: np.ndarray | None = None
    path: Path | None = None


@runtime_checkable
class FrameSource(Protocol):
    def __iter__(self) -> Iterator[Frame]: ...

    def close(self) -> None: ...

    def __enter__(self) -> FrameSource: ...

    def __exit__(self, *exc: object) -> None: ...


class _Source:
    def close(self) -> None:
        """Release the device or file."""

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class OpenCVSource(_Source):
    """``cv2.VideoCapture`` on a device index, a video file or a stream URL.

    A file ends at EOF. A live source (device or URL) that stops delivering frames is
    reopened with exponential back-off (``reconnect``), up to ``max_retries`` attempts in
    a row; then ImageError.
    """

    def __init__(
        self,
        source: int | str,
        width: int | None = None,
        height: int | None = None,
        reconnect: bool = True,
        max_retries: int = 10,
        backoff_s: float = 0.5,
        max_backoff_s: float = 8.0,
    ) -> None:
        self.source = source
        path = None if isinstance(source, int) or "://" in source else Path(source)
        if path is not None and not path.exists():
            raise ImageError(f"video file not found: {source}")
        # Devices (an index, /dev/video*) and URLs are live; a regular file is not.
        self.live = path is None or not path.is_file()
        self.width, self.height = width, height
        self.reconnect = reconnect
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._capture = self._open()
        if self._capture is None:
            raise ImageError(f"cannot open video source {source!r}")

    def _open(self) -> cv2.VideoCapture | None:
        capture = cv2.VideoCapture(self.source)
        if not capture.isOpened():
            capture.release()
            return None
        if self.width:
            capture.set(cv2.CAP_PROP_FRAME_WIDTH, self.width)
        if self.height:
            capture.set(cv2.CAP_PROP_FRAME_HEIGHT, self.height)
        if self.live:
            # Keep at most one frame queued: a recogniser wants the newest frame, not a backlog.
            capture.set(cv2.CAP_PROP_BUFFERSIZE, 1)
        return capture

    def _reopen(self) -> bool:
        """Reopen a dropped live source, waiting longer after each failure."""
        self._release()
        delay = self.backoff_s
        for attempt in range(1, self.max_retries + 1):
            log.warning("video source %r lost; reconnecting (attempt %d/%d) in %.1f s",
                        self.source, attempt, self.max_retries, delay)
            time.sleep(delay)
            self._capture = self._open()
            if self._capture is not None:
                return True
            delay = min(delay * 2, self.max_backoff_s)
        return False

    def __iter__(self) -> Iterator[Frame]:
        index = 0
        while self._capture is not None:
            ok, bgr = self._capture.read()
            if not ok:
                if not self.live:
                    return
                if not self.reconnect:
                    log.warning("video source %r stopped delivering frames", self.source)
                    return
                if not self._reopen():
                    raise ImageError(f"video source {self.source!r} lost; gave up after {self.max_retries} retries")
                continue
            stamp = time.monotonic() if self.live else self._capture.get(cv2.CAP_PROP_POS_MSEC) / 1000.0
            yield Frame(image=cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), timestamp=stamp, index=index)
            index += 1

    def _release(self) -> None:
        if self._capture is not None:
            self._capture.release()
            self._capture = None

    def close(self) -> None:
        self._release()


class Picamera2Source(_Source):
    """Raspberry Pi camera through picamera2: ``main`` (RGB, for crops) and ``lores``
    (YUV420, converted to RGB, for detection) from the same request, so they show the
    same instant. Use ``FacePipeline.process_lores(frame.lores, frame.image)``."""

    def __init__(self, main_size: tuple[int, int] = (1280, 960), lores_size: tuple[int, int] = (320, 240)) -> None:
        try:
            from picamera2 import Picamera2
        except ImportError:
            raise FacenetEdgeError(
                "picamera2 is not installed: on Raspberry Pi OS run `sudo apt install python3-picamera2` "
                "and create the virtualenv with --system-site-packages"
            ) from None
        self.main_size, self.lores_size = tuple(main_size), tuple(lores_size)
        self._camera: Any = Picamera2()
        # libcamera's "BGR888" is R, G, B in memory, i.e. what numpy users call RGB.
        config = self._camera.create_preview_configuration(
            main={"size": self.main_size, "format": "BGR888"},
            lores={"size": self.lores_size, "format": "YUV420"},
        )
        self._camera.configure(config)
        self._camera.start()

    def __iter__(self) -> Iterator[Frame]:
        index = 0
        width = self.lores_size[0]
        while self._camera is not None:
            request = self._camera.capture_request()
            try:
                main = request.make_array("main")
                yuv = request.make_array("lores")  # (h * 3/2, stride): rows may be padded
            finally:
                request.release()
            lores = cv2.cvtColor(yuv, cv2.COLOR_YUV2RGB_I420)[:, :width]
            yield Frame(image=main, timestamp=time.monotonic(), index=index, lores=np.ascontiguousarray(lores))
            index += 1

    def close(self) -> None:
        if self._camera is not None:
            self._camera.stop()
            self._camera.close()
            self._camera = None


class FolderSource(_Source):
    """Every file in a folder (sorted by name, not recursive) that decodes as an image;
    unreadable files are skipped with a warning."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise ImageError(f"not a folder: {self.path}")

    def __iter__(self) -> Iterator[Frame]:
        index = 0
        for file in sorted(p for p in self.path.iterdir() if p.is_file() and not p.name.startswith(".")):
            try:
                image = read_image(file)
            except ImageError as exc:
                log.warning("skipping %s", exc)
                continue
            yield Frame(image=image, timestamp=time.monotonic(), index=index, path=file)
            index += 1


def open_source(spec: str | int, **options: Any) -> FrameSource:
    """A source from a command-line style spec: a device index ("0"), "picamera2", a
    folder of images, else a video file or stream URL. ``options`` go to the source."""
    if isinstance(spec, int) or str(spec).isdigit():
        return OpenCVSource(int(spec), **options)
    if spec == "picamera2":
        return Picamera2Source(**options)
    if Path(spec).is_dir():
        return FolderSource(spec, **options)
    return OpenCVSource(spec, **options)
