"""Frame sources: OpenCV capture (device index, video file, RTSP/HTTP URL), picamera2,
a folder of images. Each yields ``Frame`` objects holding RGB uint8 images, and says
whether it is ``live`` (a camera or stream, which does not wait for its reader) or not
(a file or folder, read at the reader's pace).

``LatestFrameSource`` wraps a live source in a capture thread that keeps only the newest
frame, so a slow consumer never works on a backlog; ``open_source(spec,
latest_only=True)`` applies it to live sources only.
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import cv2
import numpy as np

from .errors import FacenetEdgeError, ImageError
from .io import read_image

log = logging.getLogger(__name__)

# The user-information part of a URL: rtsp://USER:PASSWORD@host/...
_URL_CREDENTIALS = re.compile(r"(?<=://)[^/@\s]*@")


def redact(spec: object) -> str:
    """A source spec as it may be shown in messages and logs: a URL's user name and
    password (``rtsp://admin:s3cret@cam/s``) replaced by ``***``. Every message about
    a source uses this; applications logging a spec should too."""
    return _URL_CREDENTIALS.sub("***@", str(spec))


@dataclass(frozen=True)
class Frame:
    """One frame. ``timestamp``: seconds — the monotonic clock for live sources, the
    position in the file for video files, the read time for folders. ``lores``: the small
    detection stream when the source has one (picamera2). ``path``: the file it came from
    (folders). ``index``: the frame's number in its source (frames a ``LatestFrameSource``
    dropped keep their numbers, so gaps show)."""

    image: np.ndarray
    timestamp: float
    index: int
    lores: np.ndarray | None = None
    path: Path | None = None


@runtime_checkable
class FrameSource(Protocol):
    """What every source provides: iteration over ``Frame``s, ``close()`` (also as a
    context manager), and ``live``: True for cameras and streams (frames come at the
    source's pace and are lost if not read), False for files and folders."""

    live: bool

    def __iter__(self) -> Iterator[Frame]: ...

    def close(self) -> None: ...

    def __enter__(self) -> FrameSource: ...

    def __exit__(self, *exc: object) -> None: ...


class _Source:
    live: bool = False

    def __init__(self) -> None:
        self._stopping = threading.Event()

    def interrupt(self) -> None:
        """Ask an iteration running in another thread to end soon: a reconnect wait ends
        at once, and the frame being read is the last. Thread-safe; ``close()`` still
        releases the device."""
        self._stopping.set()

    def close(self) -> None:
        """Release the device or file."""
        self._stopping.set()

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _ReconnectingSource(_Source):
    """Reconnect bookkeeping of a live source: consecutive failures with capped
    exponential back-off (``backoff_s``, 2x, 4x, ... up to ``max_backoff_s``); after
    ``max_retries`` reconnect attempts in a row (None: never) ImageError. The count
    starts again after every frame read."""

    def _init_retry(self, what: str, max_retries: int | None, backoff_s: float, max_backoff_s: float) -> None:
        if max_retries is not None and (isinstance(max_retries, bool) or max_retries < 0):
            raise ValueError(f"max_retries must be None (forever) or >= 0, got {max_retries!r}")
        if not 0 < backoff_s <= max_backoff_s:
            raise ValueError(f"need 0 < backoff_s <= max_backoff_s, got {backoff_s!r} and {max_backoff_s!r}")
        self._what = what
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._failures = 0

    def _retry_wait(self, reason: object) -> None:
        """Count a failure, then sleep before the next attempt (ended early by close()
        or interrupt()). Raises ImageError when the attempts are used up."""
        self._failures += 1
        if self.max_retries is not None and self._failures > self.max_retries:
            raise ImageError(f"{self._what} lost ({reason}); gave up after {self.max_retries} reconnect attempt(s)")
        delay = min(self.backoff_s * 2.0 ** min(self._failures - 1, 30), self.max_backoff_s)
        limit = "" if self.max_retries is None else f"/{self.max_retries}"
        log.warning(
            "%s lost (%s); reconnecting (attempt %d%s) in %.1f s", self._what, reason, self._failures, limit, delay
        )
        self._stopping.wait(delay)


class OpenCVSource(_ReconnectingSource):
    """``cv2.VideoCapture`` on a device index, a video file or a stream URL.

    ``live``: True for a device index, a device node (``/dev/video0``) and a URL; False
    for a regular file (None: decide so; pass a bool to override). A file ends at EOF.

    A live source that stops delivering frames is reopened (``reconnect``) with capped
    exponential back-off: ``backoff_s``, doubling up to ``max_backoff_s``. After
    ``max_retries`` attempts in a row without a frame it raises ImageError; None retries
    forever. The count starts again after every frame read, so a camera that opens but
    delivers nothing does not reset it.

    OpenCV settings, applied at every (re)open: ``api_preference`` (a ``cv2.CAP_*``
    backend), ``params`` (open-time ``{cv2.CAP_PROP_*: int}``, e.g.
    ``CAP_PROP_OPEN_TIMEOUT_MSEC``/``CAP_PROP_READ_TIMEOUT_MSEC`` for network streams),
    ``width``/``height`` (requested capture size) and ``properties`` (``{cv2.CAP_PROP_*:
    value}`` set after opening, e.g. ``CAP_PROP_FPS``).

    Close it from the thread that iterates it; to stop an iteration running in another
    thread use ``interrupt()`` (or read through ``LatestFrameSource``).
    """

    def __init__(
        self,
        source: int | str | os.PathLike,
        width: int | None = None,
        height: int | None = None,
        reconnect: bool = True,
        max_retries: int | None = 10,
        backoff_s: float = 0.5,
        max_backoff_s: float = 8.0,
        api_preference: int = cv2.CAP_ANY,
        params: Mapping[int, int] | None = None,
        properties: Mapping[int, float] | None = None,
        live: bool | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(source, int):
            source = os.fspath(source)
        self.source: int | str = source
        path = None if isinstance(source, int) or "://" in source else Path(source)
        if path is not None and not path.exists():
            raise ImageError(f"video file not found: {source}")
        # Devices (an index, /dev/video*) and URLs are live; a regular file is not.
        self.live = (path is None or not path.is_file()) if live is None else bool(live)
        self.width, self.height = width, height
        self.reconnect = reconnect
        self.api_preference = api_preference
        self.params = dict(params or {})
        self.properties = dict(properties or {})
        # Messages and logs name the source without its credentials.
        self._init_retry(f"video source {redact(source)!r}", max_retries, backoff_s, max_backoff_s)
        self._capture = self._open()
        if self._capture is None:
            raise ImageError(f"cannot open {self._what}")

    def _open(self) -> cv2.VideoCapture | None:
        flat = [int(v) for pair in self.params.items() for v in pair]
        try:
            capture = cv2.VideoCapture(self.source, self.api_preference, flat)
        except cv2.error as exc:
            log.warning("cannot open %s: %s", self._what, exc.err)
            return None
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
        for prop, value in self.properties.items():
            if not capture.set(prop, value):
                log.debug("%s: property %d=%r not applied", self._what, prop, value)
        return capture

    def __iter__(self) -> Iterator[Frame]:
        index = 0
        while not self._stopping.is_set():
            if self._capture is None:  # lost: try to reopen it
                self._capture = self._open()
                if self._capture is None:
                    self._retry_wait("cannot reopen")
                    continue
            ok, bgr = self._capture.read()
            if not ok:
                if not self.live:
                    return
                if not self.reconnect:
                    log.warning("%s stopped delivering frames", self._what)
                    return
                self._release()
                self._retry_wait("no frame")
                continue
            self._failures = 0
            stamp = time.monotonic() if self.live else self._capture.get(cv2.CAP_PROP_POS_MSEC) / 1000.0
            yield Frame(image=cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), timestamp=stamp, index=index)
            index += 1

    def _release(self) -> None:
        if self._capture is not None:
            self._capture.release()
            self._capture = None

    def close(self) -> None:
        super().close()
        self._release()


class Picamera2Source(_ReconnectingSource):
    """Raspberry Pi camera through picamera2: ``main`` (RGB, for crops) and ``lores``
    (YUV420, converted to RGB, for detection) from the same request, so they show the
    same instant. Use ``FacePipeline.process_lores(frame.lores, frame.image)``.

    A capture that fails, or gets no frame within ``capture_timeout_s`` (picamera2
    versions that support a timeout), closes the camera and opens it again, with the same
    back-off and ``max_retries`` as ``OpenCVSource`` (None: forever). ``reconnect=False``:
    the failure is raised at once as ImageError. A camera that cannot be opened at all
    raises FacenetEdgeError from the constructor.
    """

    live = True

    def __init__(
        self,
        main_size: tuple[int, int] = (1280, 960),
        lores_size: tuple[int, int] = (320, 240),
        camera_num: int = 0,
        reconnect: bool = True,
        max_retries: int | None = 10,
        backoff_s: float = 0.5,
        max_backoff_s: float = 8.0,
        capture_timeout_s: float | None = 5.0,
    ) -> None:
        super().__init__()
        try:
            from picamera2 import Picamera2
        except ImportError:
            raise FacenetEdgeError(
                "picamera2 is not installed: on Raspberry Pi OS run `sudo apt install python3-picamera2` "
                "and create the virtualenv with --system-site-packages"
            ) from None
        self._factory = Picamera2
        self.main_size, self.lores_size = tuple(main_size), tuple(lores_size)
        self.camera_num = camera_num
        self.reconnect = reconnect
        self.capture_timeout_s = capture_timeout_s
        self._init_retry(f"Pi camera {camera_num}", max_retries, backoff_s, max_backoff_s)
        self._camera: Any = None
        try:
            self._start()
        except Exception as exc:  # picamera2/libcamera raise assorted types (no camera, busy, ...)
            raise FacenetEdgeError(f"cannot open Pi camera {camera_num} with picamera2: {exc}") from exc

    def _start(self) -> None:
        camera = self._factory(self.camera_num)
        try:
            # libcamera's "BGR888" is R, G, B in memory, i.e. what numpy users call RGB.
            config = camera.create_preview_configuration(
                main={"size": self.main_size, "format": "BGR888"},
                lores={"size": self.lores_size, "format": "YUV420"},
            )
            camera.configure(config)
            camera.start()
        except BaseException:
            _quietly(camera.close)
            raise
        self._camera = camera

    def _read(self) -> tuple[np.ndarray, np.ndarray]:
        wait = True if self.capture_timeout_s is None else self.capture_timeout_s
        request = self._camera.capture_request(wait=wait)
        try:
            main = request.make_array("main")
            yuv = request.make_array("lores")  # (h * 3/2, stride): rows may be padded
        finally:
            request.release()
        lores = cv2.cvtColor(yuv, cv2.COLOR_YUV2RGB_I420)[:, : self.lores_size[0]]
        return main, np.ascontiguousarray(lores)

    def __iter__(self) -> Iterator[Frame]:
        index = 0
        while not self._stopping.is_set():
            if self._camera is None:  # lost: open it again
                try:
                    self._start()
                except Exception as exc:
                    self._retry_wait(f"cannot reopen: {exc}")
                    continue
            try:
                main, lores = self._read()
            except Exception as exc:
                if self._stopping.is_set():
                    return
                if not self.reconnect:
                    raise ImageError(f"Pi camera {self.camera_num} failed: {exc}") from exc
                self._stop_camera()
                self._retry_wait(exc)
                continue
            self._failures = 0
            yield Frame(image=main, timestamp=time.monotonic(), index=index, lores=lores)
            index += 1

    def _stop_camera(self) -> None:
        camera, self._camera = self._camera, None
        if camera is not None:
            _quietly(camera.stop)
            _quietly(camera.close)

    def close(self) -> None:
        super().close()
        self._stop_camera()


def _quietly(function: Any) -> None:
    """Call a clean-up function of a camera that may already be broken."""
    try:
        function()
    except Exception as exc:
        log.debug("ignored while closing the camera: %s", exc)


class FolderSource(_Source):
    """Every file in a folder (sorted by name, not recursive) that decodes as an image;
    unreadable files are skipped with a warning. Not live."""

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__()
        self.path = Path(path)
        if not self.path.is_dir():
            raise ImageError(f"not a folder: {self.path}")

    def __iter__(self) -> Iterator[Frame]:
        index = 0
        for file in sorted(p for p in self.path.iterdir() if p.is_file() and not p.name.startswith(".")):
            if self._stopping.is_set():
                return
            try:
                image = read_image(file)
            except ImageError as exc:
                log.warning("skipping %s", exc)
                continue
            yield Frame(image=image, timestamp=time.monotonic(), index=index, path=file)
            index += 1


class LatestFrameSource(_Source):
    """Reads ``source`` in a capture thread and hands out only the newest frame.

    A frame the consumer had not taken when the next one arrived is dropped and counted
    (``dropped``; ``read``: frames read from the source), so a consumer slower than a
    live camera always gets the newest frame, never a backlog of older ones. Meant for
    live sources; ``open_source(spec, latest_only=True)`` wraps only those.

    The thread starts on the first iteration and owns ``source`` from then on: it closes
    it when the source ends, fails or is stopped. An exception in the thread (a camera
    that stayed lost after the source's own reconnect attempts) is raised to the consumer
    after the last frame read before it. ``close()`` stops the thread and joins it (up to
    ``join_timeout_s``; a thread stuck in a read that never returns is left to finish it,
    then closes the source).
    """

    def __init__(self, source: Any, join_timeout_s: float = 5.0) -> None:
        super().__init__()
        self.source = source
        self.live = bool(getattr(source, "live", True))
        self.read = 0
        self.dropped = 0
        self.join_timeout_s = join_timeout_s
        self._newest: Frame | None = None
        self._done = False
        self._error: BaseException | None = None
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        try:
            for frame in self.source:
                with self._changed:
                    if self._newest is not None:
                        self.dropped += 1
                    self._newest = frame
                    self.read += 1
                    self._changed.notify_all()
                if self._stopping.is_set():
                    break
        except BaseException as exc:  # raised in the consumer's thread instead
            self._error = exc
        finally:
            try:
                self.source.close()
            except Exception as exc:
                log.warning("closing %r failed: %s", self.source, exc)
                if self._error is None:
                    self._error = exc
            with self._changed:
                self._done = True
                self._changed.notify_all()

    def _start(self) -> None:
        with self._changed:
            if self._thread is None and not self._stopping.is_set():
                self._thread = threading.Thread(target=self._run, name="facenet-edge-capture", daemon=True)
                self._thread.start()

    def __iter__(self) -> Iterator[Frame]:
        while True:
            try:
                yield self.poll(math.inf)  # an endless wait never returns None
            except EOFError:
                return

    def poll(self, timeout_s: float) -> Frame | None:
        """The newest frame not yet handed out, waiting up to ``timeout_s`` seconds for
        one; None when none came (a stalled source: a door decides "nobody" rather than
        keep the last name). Raises EOFError once the source has ended (or ``close()``
        was called) and every frame was handed out, or the capture thread's error."""
        self._start()
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while self._newest is None and not self._done and not self._stopping.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._changed.wait(min(left, 0.25))  # a timed wait keeps Ctrl-C responsive
            if self._stopping.is_set():
                raise EOFError
            frame, self._newest = self._newest, None
        if frame is None:  # the thread ended and every frame was handed out
            if self._error is not None:
                raise self._error
            raise EOFError
        return frame

    def interrupt(self) -> None:
        """End iteration soon (thread-safe): the consumer's loop ends, and so does the
        source's own iteration where it supports ``interrupt()`` (a reconnect back-off ends
        at once). ``close()`` still joins the thread."""
        self._stopping.set()
        interrupt = getattr(self.source, "interrupt", None)
        if interrupt is not None:
            interrupt()
        with self._changed:
            self._changed.notify_all()

    def close(self) -> None:
        """Stop the capture thread and wait for it to close the source."""
        self.interrupt()
        with self._changed:
            thread = self._thread
            self._changed.notify_all()
        if thread is None:  # never started: the source is still ours to close
            self.source.close()
            return
        if thread is not threading.current_thread():
            thread.join(self.join_timeout_s)
        if thread.is_alive():
            log.warning(
                "capture thread still in a read of %r after %.1f s; it closes the source when the read returns",
                self.source,
                self.join_timeout_s,
            )


# Options the sources take. A source ignores those it cannot apply (a file has the size it
# has; reconnecting means nothing to a folder), so one set of options works for every
# spec; a name no source takes is a TypeError.
_OPENCV_OPTIONS = frozenset({"width", "height", "api_preference", "params", "properties", "live"})
_LIVE_OPTIONS = frozenset({"reconnect", "max_retries", "backoff_s", "max_backoff_s"})
_PICAMERA2_OPTIONS = frozenset({"main_size", "lores_size", "camera_num", "capture_timeout_s", "width", "height"})


@dataclass(frozen=True)
class SourceKind:
    """One kind of source ``open_source`` opens: which specs are its (``matches``, given a
    camera index as an int, anything else as a string), the options it takes, and how to
    open one (``open(spec, options)``, with only those options)."""

    name: str  # as a log line names it: "a camera"
    matches: Callable[[int | str], bool]
    options: frozenset[str]
    open: Callable[[int | str, dict[str, Any]], FrameSource]


def _picamera2(spec: int | str, options: dict[str, Any]) -> FrameSource:
    """picamera2, with ``width`` and ``height`` (both or neither) as ``main_size``."""
    width, height = options.pop("width", None), options.pop("height", None)
    if width is not None or height is not None:
        if width is None or height is None or "main_size" in options:
            raise TypeError("open_source('picamera2'): give width and height together, or main_size, not both")
        options["main_size"] = (int(width), int(height))
    return Picamera2Source(**options)


# The kinds of source, tried in order: the first whose ``matches`` accepts a spec opens
# it. A new kind of source is one entry here.
SOURCES: tuple[SourceKind, ...] = (
    SourceKind(
        "a camera",
        lambda spec: isinstance(spec, int),
        _OPENCV_OPTIONS | _LIVE_OPTIONS,
        lambda spec, o: OpenCVSource(spec, **o),
    ),
    SourceKind("picamera2", lambda spec: spec == "picamera2", _PICAMERA2_OPTIONS | _LIVE_OPTIONS, _picamera2),
    SourceKind(
        "a folder",
        lambda spec: "://" not in str(spec) and Path(spec).is_dir(),
        frozenset(),
        lambda spec, o: FolderSource(spec),
    ),
    SourceKind(
        "a video source", lambda spec: True, _OPENCV_OPTIONS | _LIVE_OPTIONS, lambda spec, o: OpenCVSource(spec, **o)
    ),
)
# Every option some source takes.
SOURCE_OPTIONS = frozenset().union(*(kind.options for kind in SOURCES))


def open_source(spec: str | int | os.PathLike, latest_only: bool = False, **options: Any) -> FrameSource:
    """A source from a command-line style spec: a camera index (``0`` or ``"0"``),
    ``"picamera2"``, a folder of images, else a video file, device node or stream URL
    (a file or folder named with digits: write ``./2024``). ``SOURCES`` says which.

    ``options`` (any of ``SOURCE_OPTIONS``) work with every spec; each source uses those
    it can apply and ignores the rest: OpenCV sources take ``width``, ``height``,
    ``api_preference``, ``params``, ``properties``, ``live``; picamera2 takes
    ``main_size`` (or ``width`` and ``height``), ``lores_size``, ``camera_num``,
    ``capture_timeout_s``; live sources take ``reconnect``, ``max_retries`` (None:
    forever), ``backoff_s``, ``max_backoff_s``. A folder takes none. Unknown names raise
    TypeError.

    ``latest_only``: wrap a live source in ``LatestFrameSource`` (newest frame only,
    drops counted); files and folders are still read frame by frame.
    """
    unknown = sorted(set(options) - SOURCE_OPTIONS)
    if unknown:
        raise TypeError(
            f"open_source() got unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(SOURCE_OPTIONS))}"
        )
    kind, key = _kind_of(spec)
    ignored = sorted(set(options) - kind.options)
    if ignored:
        log.debug("open_source(%r): %s ignored by %s", redact(spec), ", ".join(ignored), kind.name)
    source = kind.open(key, {k: v for k, v in options.items() if k in kind.options})
    if latest_only and source.live:
        return LatestFrameSource(source)
    return source


def _kind_of(spec: object) -> tuple[SourceKind, int | str]:
    """The kind of source for ``spec`` and the spec as it matched: a camera index as an
    int (``"0"`` too), anything else as a string."""
    if isinstance(spec, int) and not isinstance(spec, bool):
        key: int | str = spec
    else:
        text = os.fspath(spec) if not isinstance(spec, str) else spec
        if not isinstance(text, str) or not text:
            raise ValueError(f"open_source() needs a camera index, 'picamera2', a path or a URL, got {redact(spec)!r}")
        key = int(text) if text.isdigit() else text
    return next(kind for kind in SOURCES if kind.matches(key)), key
