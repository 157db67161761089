"""``facenet-edge bench``: latency per stage, cold start, pipeline FPS and memory, on this machine.

It ships in the wheel so a Raspberry Pi user can run it after ``pip install .``: it needs
only the runtime's dependencies, plus psutil if installed (else RSS is read from
``/proc/self/statm``); its face photo ships in the wheel (``BENCH_PHOTO``). What it
measures with (machine info, percentiles, Markdown tables, JSON output, targets, a
synthetic gallery, test frames) is here too, and ``benchmarks/common.py`` re-exports it for
the benchmark scripts; what only a source checkout has (its commit, LFW beside it) is
``benchmarks/``'s. ``benchmarks/latency.py`` runs this benchmark with those added.

Measured (docs/benchmarks.md):

- per stage, p50/p90/p99 after warm-up: decode (a 640x480 JPEG), detect (each detector, each
  thread count), align, embed (each thread count, batch 1 and 8), match (a synthetic gallery);
- full-pipeline FPS (``FacePipeline.process`` with a gallery) on 640x480 frames holding one
  face and five faces;
- cold start in fresh processes (import + model load + first frame), and RSS while one of
  those processes streams frames.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import itertools
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from .arguments import int_list, name_list, positive_int
from .card import ModelIdentity
from .detect import DEFAULT_DETECTOR, DETECTORS, Detection, Detector, create_detector
from .embed import Embedder, default_model_path
from .errors import FacenetEdgeError, ModelError
from .files import private_file
from .gallery import Gallery
from .interpreter import EDGETPU_SUFFIX, uses_edgetpu
from .io import read_image
from .pipeline import DEFAULT_DETECT_WIDTH, FacePipeline

DEFAULT_OUT = Path("runs/benchmarks")
# A public-domain face photo shipped as package data, so the benchmark runs with no flags on a device.
BENCH_PHOTO = Path(__file__).resolve().parent / "data" / "astronaut.jpg"
LIBRARIES = (
    "facenet-edge",
    "numpy",
    "simsimd",
    "opencv-python-headless",
    "opencv-python",
    "ai-edge-litert",
    "tflite-runtime",
    "tensorflow",
    "tensorflow-cpu",
    "psutil",
    "dlib",
    "dlib-bin",
    "face-recognition-models",
    "scikit-image",
    "matplotlib",
)
MB = 1024 * 1024

# --------------------------------------------------------------------------- machine


def cpu_model() -> str:
    """The CPU's marketing name (x86 ``model name``), else the board (a Pi's ``Model``)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    board = Path("/proc/device-tree/model")
    if "model name" in fields:
        return fields["model name"]
    if "Model" in fields:
        return fields["Model"]
    if board.is_file():
        return board.read_text().strip("\0\n ")
    return platform.processor() or platform.machine()


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries that decide the numbers (metadata only: nothing imported)."""
    found = {}
    for name in LIBRARIES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def tflite_runtime_module() -> str | None:
    """The interpreter module ``facenet_edge.interpreter`` loads (same order of preference)."""
    for module in ("ai_edge_litert", "tflite_runtime", "tensorflow"):
        if importlib.util.find_spec(module) is not None:
            return module
    return None


def memory_total_mb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def machine_info(threads: Sequence[int] | None = None) -> dict[str, Any]:
    """What a number needs next to it to mean anything. The load average matters: a
    machine shared with other work gives slower, noisier timings."""
    return {
        "cpu": cpu_model(),
        "architecture": platform.machine(),
        "cores": os.cpu_count(),
        "cores_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_mb": memory_total_mb(),
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "os": platform.platform(),
        "python": platform.python_version(),
        "libraries": library_versions(),
        "tflite_runtime": tflite_runtime_module(),
        "threads": list(threads) if threads is not None else None,
        "time_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def machine_line(machine: dict[str, Any]) -> str:
    """One line summarising ``machine_info`` above the tables."""
    libraries, runtime = machine["libraries"], machine["tflite_runtime"]
    runtime_version = libraries.get(runtime.replace("_", "-")) if runtime else None
    # A device runs an installed wheel: its version says what ran.
    source = f"facenet-edge {libraries.get('facenet-edge', '?')}"
    return (
        f"machine: {machine['cpu']} ({machine['architecture']}), {machine['cores_available']} of "
        f"{machine['cores']} cores, load {' '.join(map(str, machine['load_average']))}, "
        f"Python {machine['python']}, numpy {libraries.get('numpy', '?')}, "
        f"{runtime or 'no TFLite runtime'} {runtime_version or ''}, {source}"
    )


# --------------------------------------------------------------------------- timing


@dataclass(frozen=True)
class Percentiles:
    """Repeated timings of one operation, in milliseconds."""

    runs: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float

    @classmethod
    def of(cls, seconds: Sequence[float] | np.ndarray) -> Percentiles:
        ms = np.asarray(seconds, dtype=np.float64) * 1000.0
        if ms.size == 0:
            raise ValueError("no timings")
        p50, p90, p99 = np.percentile(ms, [50, 90, 99])
        return cls(int(ms.size), float(p50), float(p90), float(p99), float(ms.mean()), float(ms.min()))


def time_calls(fn: Callable[[], object], runs: int, warmup: int) -> np.ndarray:
    """Seconds per call of ``fn`` over ``runs`` calls, after ``warmup`` untimed ones
    (first calls pay for lazy allocation, page faults and cold caches)."""
    for _ in range(warmup):
        fn()
    seconds = np.empty(runs, dtype=np.float64)
    for i in range(runs):
        start = time.perf_counter()
        fn()
        seconds[i] = time.perf_counter() - start
    return seconds


def rss_bytes() -> tuple[int, str]:
    """(resident set size of this process, how it was read): psutil when installed, else
    ``/proc/self/statm`` (Linux)."""
    try:
        import psutil
    except ImportError:
        resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
        return resident_pages * os.sysconf("SC_PAGE_SIZE"), "/proc/self/statm"
    return int(psutil.Process().memory_info().rss), "psutil"


# --------------------------------------------------------------------------- output


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub Markdown table; cells are printed with ``str`` (format numbers first)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines.extend("| " + " | ".join(str(cell) for cell in row) + " |" for row in rows)
    return "\n".join(lines)


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_json(path: Path, data: dict[str, Any]) -> Path:
    """Write ``data`` (dataclasses, numpy values and paths allowed) as indented JSON,
    all or nothing (``files.private_file``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, indent=2, default=_jsonable, allow_nan=False) + "\n"
    with private_file(path, FacenetEdgeError) as file:
        file.write(text.encode())
    return path


@dataclass(frozen=True)
class Target:
    """A goal from the benchmark issue. ``measured``: None when this run did not measure
    it (a ``--quick`` run, a missing peer). ``ratio``: measured / limit."""

    name: str
    limit: float
    unit: str
    higher_is_better: bool = False
    measured: float | None = None
    note: str = ""

    @property
    def met(self) -> bool | None:
        if self.measured is None:
            return None
        return self.measured >= self.limit if self.higher_is_better else self.measured <= self.limit

    @property
    def ratio(self) -> float | None:
        return None if self.measured is None else self.measured / self.limit

    @property
    def status(self) -> str:
        return {True: "met", False: "NOT MET", None: "not measured"}[self.met]

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "met": self.met, "ratio": self.ratio, "status": self.status}


def targets_table(targets: Sequence[Target]) -> str:
    rows = []
    for t in targets:
        bound = (">= " if t.higher_is_better else "<= ") + f"{t.limit:g} {t.unit}"
        measured = "-" if t.measured is None else f"{t.measured:.4g} {t.unit}"
        rows.append([t.name, bound, measured, fmt(t.ratio), t.status + (f" ({t.note})" if t.note else "")])
    return markdown_table(["target", "limit", "measured", "measured / limit", "status"], rows)


def report(
    name: str, machine: dict[str, Any], config: dict[str, Any], results: dict[str, Any], targets: Sequence[Target]
) -> dict[str, Any]:
    """The JSON every benchmark writes: what ran where, what came out, which targets hold."""
    return {
        "benchmark": name,
        "machine": machine,
        "config": config,
        "results": results,
        "targets": [t.to_dict() for t in targets],
        "load_average_end": [round(v, 2) for v in os.getloadavg()],
    }


# --------------------------------------------------------------------------- arguments


def add_common_arguments(parser: argparse.ArgumentParser, several_models: bool = False) -> None:
    """``--model``, ``--out`` and ``--quick``, which every benchmark takes."""
    if several_models:
        parser.add_argument(
            "--model",
            type=Path,
            action="append",
            metavar="PATH",
            help="embedding model .tflite with its card beside it; repeat to compare several "
            "(default: the shipped model and its NAME_{float32,float16,int8}.tflite siblings)",
        )
    else:
        parser.add_argument(
            "--model",
            type=Path,
            metavar="PATH",
            help="embedding model .tflite with its card beside it (default: the shipped model)",
        )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        metavar="DIR",
        help="where JSON and PNG files go (default: %(default)s)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny configuration (seconds): checks the script works; numbers mean little",
    )


def resolve_model(path: Path | None) -> Path:
    """``--model``, else the shipped model; ModelError ("... pass --model PATH") when none ships."""
    return path if path is not None else default_model_path()


# --------------------------------------------------------------------------- synthetic gallery


def random_unit_vectors(count: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """(count, size) float32 random unit vectors: synthetic faces."""
    vectors = rng.standard_normal((count, size), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors


def bulk_enroll(
    path: Path, identity: ModelIdentity, people: int, embedding_size: int = 128, seed: int = 0, chunk: int = 65536
) -> float:
    """Create a gallery at ``path`` holding ``people`` synthetic people (one sample each),
    added with ``Gallery.add_many`` in ONE transaction. Returns the seconds that took."""

    def samples() -> Iterator[tuple[str, np.ndarray]]:
        for start in range(0, people, chunk):
            for offset, row in enumerate(random_unit_vectors(min(chunk, people - start), embedding_size, rng)):
                yield f"person-{start + offset:07d}", row

    rng = np.random.default_rng(seed)
    with Gallery.create(path, identity, threshold=1.0, embedding_size=embedding_size) as gallery:
        start = time.perf_counter()
        gallery.add_many(samples(), identity)
        return time.perf_counter() - start


# --------------------------------------------------------------------------- test frames

FRAME_HEIGHT, FRAME_WIDTH = 480, 640  # VGA: a Pi camera's usual detection/preview size
FACE_FRACTION = 0.45  # face box side / tile side; LFW's own framing is about 0.44
TILE_FILL = 0.94  # tile side / grid cell side: a gap between faces
BACKGROUND = 128


@dataclass(frozen=True)
class FaceImage:
    """A photo and its (best) face, as our detector found it."""

    image: np.ndarray
    detection: Detection
    source: str


def _photo_candidates(
    images: Sequence[Path], more: Iterable[tuple[str, Path]]
) -> Iterator[tuple[str, Callable[[], np.ndarray]]]:
    """(name, loader) of face photos in order of preference: ``--image`` files, the
    shipped astronaut photo, then ``more`` (name, path), read only when needed."""
    for path in images:
        yield str(path), lambda path=path: read_image(path)
    yield "astronaut", lambda: read_image(BENCH_PHOTO)
    for name, path in more:
        yield name, lambda path=path: read_image(path)


def face_images(
    count: int, detector: Detector, images: Sequence[Path] = (), more: Iterable[tuple[str, Path]] = ()
) -> list[FaceImage]:
    """Up to ``count`` photos in which ``detector`` finds a face (photos without one are
    skipped): ``images``, the shipped photo, then ``more``."""
    found: list[FaceImage] = []
    for source, load in _photo_candidates(images, more):
        if len(found) == count:
            break
        image = load()
        detections = detector.detect(image)
        if detections:
            found.append(FaceImage(image, detections[0], source))
    if not found:
        raise FacenetEdgeError(
            "the detector found no face in the benchmark photos; pass --image PATH (a photo with a face)"
        )
    return found


def face_tile(face: FaceImage, side: int, mirror: bool = False) -> np.ndarray:
    """A ``side`` x ``side`` crop centred on the face, the face ``FACE_FRACTION`` of it
    (edges replicated where the photo ends)."""
    x1, y1, x2, y2 = (float(v) for v in face.detection.box)
    scale = side * FACE_FRACTION / max(x2 - x1, y2 - y1)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    matrix = np.array([[scale, 0.0, side / 2 - scale * cx], [0.0, scale, side / 2 - scale * cy]])
    tile = cv2.warpAffine(face.image, matrix, (side, side), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return np.ascontiguousarray(tile[:, ::-1]) if mirror else tile


def compose_frame(faces: Sequence[FaceImage], count: int) -> np.ndarray:
    """A 640x480 RGB frame with ``count`` faces on a grey background, on a grid (one face:
    one big tile; five: three above two). With fewer photos than faces, photos repeat,
    mirrored on every other pass."""
    cols = math.ceil(math.sqrt(count))
    rows = math.ceil(count / cols)
    cell_h, cell_w = FRAME_HEIGHT // rows, FRAME_WIDTH // cols
    side = int(min(cell_h, cell_w) * TILE_FILL)
    frame = np.full((FRAME_HEIGHT, FRAME_WIDTH, 3), BACKGROUND, np.uint8)
    for i in range(count):
        row, col = divmod(i, cols)
        y = row * cell_h + (cell_h - side) // 2
        x = col * cell_w + (cell_w - side) // 2
        frame[y : y + side, x : x + side] = face_tile(faces[i % len(faces)], side, mirror=(i // len(faces)) % 2 == 1)
    return frame


# --------------------------------------------------------------------------- latency benchmark


@dataclass(frozen=True)
class LatencyConfig:
    """What ``facenet-edge bench`` measures. ``frames``: timed frames per FPS measurement;
    ``stream_frames``: frames the memory-measuring process streams."""

    threads: tuple[int, ...] = (1, 2, 4)
    batches: tuple[int, ...] = (1, 8)
    detectors: tuple[str, ...] = (DEFAULT_DETECTOR,)
    detect_widths: tuple[int, ...] = (DEFAULT_DETECT_WIDTH,)
    runs: int = 200
    warmup: int = 20
    frames: int = 200
    cold_starts: int = 5
    stream_frames: int = 300
    gallery_size: int = 1000


QUICK = LatencyConfig(threads=(1,), runs=10, warmup=2, frames=5, cold_starts=1, stream_frames=5, gallery_size=100)


@dataclass(frozen=True)
class StageTiming:
    """One stage's timings. ``threads``: None where the stage has no thread setting;
    ``batch``: faces (or queries) per call."""

    stage: str
    detail: str
    threads: int | None
    batch: int
    timing: Percentiles

    @property
    def per_face_ms(self) -> float:
        return self.timing.p50_ms / self.batch


@dataclass(frozen=True)
class PipelineRun:
    """``FacePipeline.process`` (detect, align, embed, match) on one frame, repeatedly."""

    detector: str
    detect_width: int
    threads: int
    faces_in_frame: int
    faces_found: int
    fps: float
    timing: Percentiles


@dataclass(frozen=True)
class ColdStart:
    """Seconds, in a fresh Python process: ``import_s`` (facenet_edge and what the pipeline
    pulls in), ``load_s`` (detector, embedding model, gallery), ``first_frame_s`` (decode
    and process one frame). ``total_s``: their sum, the target's measure. ``process_s``:
    spawn to exit, as seen from outside (interpreter start-up and teardown too)."""

    import_s: float
    load_s: float
    first_frame_s: float
    total_s: float
    process_s: float


@dataclass(frozen=True)
class StreamMemory:
    """RSS of a fresh process streaming frames through the pipeline with a gallery."""

    frames: int
    rss_after_first_frame_mb: float
    rss_peak_mb: float
    rss_final_mb: float
    source: str


# Runs in a fresh interpreter: times the cold start, then streams frames and samples RSS.
# It imports facenet_edge.bench only after the timed part.
CHILD = textwrap.dedent(
    """
    import json, sys, time
    start = time.perf_counter()
    from facenet_edge import FacePipeline, read_image
    from facenet_edge.gallery import Gallery
    imported = time.perf_counter()
    spec = json.loads(sys.argv[1])
    pipeline = FacePipeline(model_path=spec["model"], detector=spec["detector"], num_threads=spec["threads"],
                            detect_width=spec["detect_width"])
    gallery = Gallery.open(spec["gallery"])
    loaded = time.perf_counter()
    frame = read_image(spec["image"])
    pipeline.process(frame, gallery=gallery)
    first = time.perf_counter()
    from facenet_edge.bench import rss_bytes
    after_first, source = rss_bytes()
    samples = []
    for _ in range(spec["stream_frames"]):
        pipeline.process(frame, gallery=gallery)
        samples.append(rss_bytes()[0])
    print(json.dumps({
        "import_s": imported - start, "load_s": loaded - imported, "first_frame_s": first - loaded,
        "rss_after_first_frame": after_first, "rss_samples": samples, "rss_source": source,
    }))
    """
)


def run_child(
    model: Path, image: Path, gallery: Path, detector: str, detect_width: int, threads: int, stream_frames: int
) -> tuple[ColdStart, StreamMemory | None]:
    """One fresh process: its cold start, and its memory when it streamed frames."""
    spec = {
        "model": str(model),
        "image": str(image),
        "gallery": str(gallery),
        "detector": detector,
        "detect_width": detect_width,
        "threads": threads,
        "stream_frames": stream_frames,
    }
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True, text=True, timeout=600)
    process_s = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"cold-start process failed ({done.returncode}):\n{done.stderr.strip()}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    cold = ColdStart(
        import_s=out["import_s"],
        load_s=out["load_s"],
        first_frame_s=out["first_frame_s"],
        total_s=out["import_s"] + out["load_s"] + out["first_frame_s"],
        process_s=process_s,
    )
    if not stream_frames:
        return cold, None
    samples = out["rss_samples"]
    memory = StreamMemory(
        frames=len(samples),
        rss_after_first_frame_mb=out["rss_after_first_frame"] / MB,
        rss_peak_mb=max(samples) / MB,
        rss_final_mb=samples[-1] / MB,
        source=out["rss_source"],
    )
    return cold, memory


@contextmanager
def cv_threads(threads: int) -> Iterator[None]:
    """OpenCV's thread count (resize, warps, the Haar cascade) set for a block."""
    before = cv2.getNumThreads()
    cv2.setNumThreads(threads)
    try:
        yield
    finally:
        cv2.setNumThreads(before)


def measure_stages(
    model: Path, delegate: str | None, frame: np.ndarray, jpeg: Path, gallery: Gallery, config: LatencyConfig
) -> list[StageTiming]:
    """Per-stage timings on the one-face frame."""
    runs, warmup = config.runs, config.warmup
    seconds = time_calls(lambda: read_image(jpeg), runs, warmup)
    rows = [StageTiming("decode", f"{FRAME_WIDTH}x{FRAME_HEIGHT} JPEG", None, 1, Percentiles.of(seconds))]
    detection = None
    for name in config.detectors:
        for threads in config.threads:
            with cv_threads(threads), create_detector(name, num_threads=threads) as detector:
                found = detector.detect(frame)
                if detection is None and found:
                    detection = found[0]
                seconds = time_calls(lambda: detector.detect(frame), runs, warmup)
                rows.append(StageTiming("detect", name, threads, 1, Percentiles.of(seconds)))
    if detection is None:
        raise FacenetEdgeError("no detector found the face in the test frame; pass --image with a clearer face photo")
    with Embedder.from_path(model, delegate=delegate) as embedder:
        gallery_identity, (height, width) = embedder.identity, embedder.input_size
        # The crop the device makes: the card's size, template and fill.
        crop = embedder.crop(frame, detection)
        for batch in config.batches:
            seconds = time_calls(
                lambda batch=batch: [embedder.crop(frame, detection) for _ in range(batch)], runs, warmup
            )
            rows.append(StageTiming("align", f"{width}x{height}", None, batch, Percentiles.of(seconds)))
    embedding = None
    for threads in config.threads:
        with Embedder.from_path(model, num_threads=threads, delegate=delegate) as embedder:
            for batch in config.batches:
                crops = np.repeat(crop[None], batch, axis=0)
                seconds = time_calls(lambda crops=crops: embedder.embed(crops), runs, warmup)
                rows.append(StageTiming("embed", embedder.card.name, threads, batch, Percentiles.of(seconds)))
            embedding = embedder.embed(crop[None])
    for batch in config.batches:
        queries = np.repeat(embedding, batch, axis=0)
        seconds = time_calls(lambda queries=queries: gallery.match(queries, gallery_identity), runs, warmup)
        rows.append(StageTiming("match", f"{config.gallery_size} people", None, batch, Percentiles.of(seconds)))
    return rows


def measure_pipeline(
    model: Path, frames: dict[int, np.ndarray], gallery: Gallery, config: LatencyConfig
) -> list[PipelineRun]:
    """Frames per second of ``FacePipeline.process`` with the gallery, per detector,
    detect width, thread count and frame. Decoding is not included: cameras deliver arrays."""
    rows = []
    for name, width, threads in itertools.product(config.detectors, config.detect_widths, config.threads):
        with cv_threads(threads), FacePipeline(
            model_path=model, detector=name, num_threads=threads, detect_width=width
        ) as pipeline:
            for count, frame in frames.items():
                found = len(pipeline.process(frame, gallery=gallery))
                seconds = time_calls(
                    lambda frame=frame: pipeline.process(frame, gallery=gallery), config.frames, config.warmup
                )
                fps = len(seconds) / float(seconds.sum())
                rows.append(PipelineRun(name, width, threads, count, found, fps, Percentiles.of(seconds)))
    return rows


def latency_targets(pipeline: list[PipelineRun], cold: list[ColdStart], memory: StreamMemory | None) -> list[Target]:
    """The issue's runtime targets; FPS of the first detector and detect width measured, at its
    best thread count."""
    first = (pipeline[0].detector, pipeline[0].detect_width) if pipeline else None
    one_face = [r for r in pipeline if r.faces_in_frame == 1 and (r.detector, r.detect_width) == first]
    best = max(one_face, key=lambda r: r.fps) if one_face else None
    return [
        Target(
            "pipeline FPS, 640x480, one face",
            60,
            "FPS",
            higher_is_better=True,
            measured=best.fps if best else None,
            note=f"{best.detector} (detect width {best.detect_width}), {best.threads} thread(s), best of the "
            "thread counts" if best else "",
        ),
        Target(
            "cold start: import + load + first frame",
            1.5,
            "s",
            measured=float(np.median([c.total_s for c in cold])) if cold else None,
            note="median",
        ),
        Target("RSS while streaming", 200, "MB", measured=memory.rss_peak_mb if memory else None, note="peak"),
    ]


def print_latency(
    stages: list[StageTiming],
    pipeline: list[PipelineRun],
    cold: list[ColdStart],
    memory: StreamMemory | None,
    targets: list[Target],
) -> None:
    print("\n## Latency per stage (ms)\n")
    print(
        markdown_table(
            ["stage", "detail", "threads", "batch", "p50", "p90", "p99", "p50 per face"],
            [
                [
                    s.stage,
                    s.detail,
                    s.threads or "-",
                    s.batch,
                    fmt(s.timing.p50_ms),
                    fmt(s.timing.p90_ms),
                    fmt(s.timing.p99_ms),
                    fmt(s.per_face_ms),
                ]
                for s in stages
            ],
        )
    )
    print(f"\n## Full pipeline, {FRAME_WIDTH}x{FRAME_HEIGHT} (detect + align + embed + match; no decode)\n")
    print(
        markdown_table(
            ["detector", "detect width", "threads", "faces in frame", "faces found", "FPS", "p50 ms", "p99 ms"],
            [
                [
                    r.detector,
                    r.detect_width,
                    r.threads,
                    r.faces_in_frame,
                    r.faces_found,
                    fmt(r.fps, 1),
                    fmt(r.timing.p50_ms),
                    fmt(r.timing.p99_ms),
                ]
                for r in pipeline
            ],
        )
    )
    print("\n## Cold start, fresh process (s)\n")
    print(
        markdown_table(
            ["run", "import", "load", "first frame", "total", "process spawn to exit"],
            [
                [
                    i + 1,
                    fmt(c.import_s, 3),
                    fmt(c.load_s, 3),
                    fmt(c.first_frame_s, 3),
                    fmt(c.total_s, 3),
                    fmt(c.process_s, 3),
                ]
                for i, c in enumerate(cold)
            ],
        )
    )
    if memory is not None:
        print(
            f"\nRSS while streaming {memory.frames} frames ({memory.source}): "
            f"after the first frame {memory.rss_after_first_frame_mb:.1f} MB, "
            f"peak {memory.rss_peak_mb:.1f} MB, final {memory.rss_final_mb:.1f} MB"
        )
    print("\n## Targets\n")
    print(targets_table(targets))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``facenet-edge bench`` and ``benchmarks/latency.py``."""
    add_common_arguments(parser)
    parser.add_argument(
        "--threads", type=int_list, metavar="N,N", help="interpreter (and OpenCV) thread counts (default 1,2,4)"
    )
    parser.add_argument("--batch", type=int_list, metavar="N,N", help="faces per embed/align/match call (default 1,8)")
    parser.add_argument(
        "--detectors",
        type=name_list(sorted(DETECTORS)),
        metavar="NAME,NAME",
        help=f"detectors to time (default {DEFAULT_DETECTOR}; haar is slow at 640x480)",
    )
    parser.add_argument(
        "--detect-widths",
        type=int_list,
        metavar="W,W",
        help=f"the pipeline's detect widths to time: frames wider are shrunk before YuNet and Haar "
        f"(default {DEFAULT_DETECT_WIDTH}: the whole 640x480 frame)",
    )
    parser.add_argument("--runs", type=positive_int, metavar="N", help="timed runs per stage (default 200)")
    parser.add_argument("--warmup", type=int, metavar="N", help="untimed runs first (default 20)")
    parser.add_argument(
        "--frames", type=positive_int, metavar="N", help="timed frames per FPS measurement (default 200)"
    )
    parser.add_argument("--cold-starts", type=positive_int, metavar="N", help="fresh processes timed (default 5)")
    parser.add_argument(
        "--gallery-size", type=positive_int, metavar="N", help="synthetic people in the matched gallery (default 1000)"
    )
    parser.add_argument(
        "--image",
        type=Path,
        action="append",
        default=[],
        metavar="PATH",
        help="face photo(s) to build the test frames from (default: the astronaut photo shipped in the package)",
    )
    parser.add_argument(
        "--delegate",
        choices=["edgetpu"],
        help="run the embedding model on a Coral Edge TPU (the *_edgetpu.tflite model)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print the report (the contents of latency.json) as one JSON object instead of the tables",
    )


def _config(args: argparse.Namespace) -> LatencyConfig:
    """The default (or ``--quick``) configuration with the options given on the command line."""
    base = QUICK if args.quick else LatencyConfig()
    given = {
        "threads": args.threads,
        "batches": args.batch,
        "detectors": args.detectors,
        "detect_widths": args.detect_widths,
        "runs": args.runs,
        "warmup": args.warmup,
        "frames": args.frames,
        "cold_starts": args.cold_starts,
        "gallery_size": args.gallery_size,
    }
    return dataclasses.replace(base, **{k: v for k, v in given.items() if v is not None})


def run(
    args: argparse.Namespace,
    describe: Callable[[Sequence[int]], dict[str, Any]] = machine_info,
    more_photos: Iterable[tuple[str, Path]] = (),
) -> int:
    """The latency benchmark: prints Markdown tables, writes ``latency.json`` to ``--out``.
    ``describe``: what the report says about the machine (benchmarks/ add the checkout's
    commit); ``more_photos``: (name, path) of faces to try after ``--image`` and the
    shipped photo, for the five-face frame."""
    config = _config(args)
    model = resolve_model(args.model)
    if args.delegate == "edgetpu" and not model.name.endswith(EDGETPU_SUFFIX):
        # FacePipeline picks the Edge TPU by the compiler's file name; a CPU model would
        # silently run on the CPU in the pipeline part.
        raise ModelError(f"--delegate edgetpu needs the edgetpu_compiler output (*{EDGETPU_SUFFIX}), got {model}")
    edgetpu = uses_edgetpu(model, args.delegate)
    machine = describe(config.threads)
    with Embedder.from_path(model, delegate=args.delegate) as embedder:
        card, identity = embedder.card, embedder.identity
    with create_detector(DEFAULT_DETECTOR) as detector:
        faces = face_images(5, detector, args.image, more_photos)
    model_line = (
        f"model: {card.name} {card.version} ({model}), input {card.input_width}x{card.input_height}, "
        f"{model.stat().st_size / MB:.2f} MB{', Edge TPU' if edgetpu else ''}; "
        f"faces from {', '.join(f.source for f in faces)}"
    )
    if not args.json:  # what is measured, before the minutes of measuring
        print("# facenet-edge latency benchmark\n")
        print(machine_line(machine))
        print(model_line, flush=True)
    frames = {1: compose_frame(faces, 1), 5: compose_frame(faces, 5)}
    with tempfile.TemporaryDirectory(prefix="facenet-edge-bench-") as tmp:
        jpeg = Path(tmp) / "frame.jpg"
        cv2.imwrite(str(jpeg), cv2.cvtColor(frames[1], cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
        gallery_path = Path(tmp) / "gallery.db"
        bulk_enroll(gallery_path, identity, config.gallery_size, card.embedding_size)
        with Gallery.open(gallery_path) as gallery:
            stages = measure_stages(model, args.delegate, frames[1], jpeg, gallery, config)
            pipeline = measure_pipeline(model, frames, gallery, config)
        # The cold-start processes stream nothing (their spawn-to-exit time stays clean);
        # one more process streams frames for the memory figure.
        child = (model, jpeg, gallery_path, config.detectors[0], config.detect_widths[0], max(config.threads))
        cold = [run_child(*child, stream_frames=0)[0] for _ in range(config.cold_starts)]
        memory = run_child(*child, stream_frames=config.stream_frames)[1]
    targets = latency_targets(pipeline, cold, memory)
    model_info = {
        "path": str(model),
        "name": card.name,
        "version": card.version,
        "sha256": identity.sha256,
        "input": list(card.input_size),
        "quantization": card.quantization.get("target"),
        "size_bytes": model.stat().st_size,
        "edgetpu": edgetpu,
    }
    results = {
        "model": model_info,
        "faces": [f.source for f in faces],
        "stages": [{**dataclasses.asdict(s), "per_face_ms": s.per_face_ms} for s in stages],
        "pipeline": pipeline,
        "cold_start": cold,
        "memory": memory,
    }
    data = report("latency", machine, dataclasses.asdict(config), results, targets)
    path = write_json(args.out / "latency.json", data)
    if args.json:
        print(json.dumps(data, default=_jsonable, allow_nan=False), flush=True)
        print(f"wrote {path}", file=sys.stderr)
    else:
        print_latency(stages, pipeline, cold, memory, targets)
        print(f"\nwrote {path}")
    return 0
