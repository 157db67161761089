"""Gallery scaling: enrolment, index load, top-1/top-5 search and memory from 1k to 1M people,
against this machine's memory bandwidth.

Each gallery holds synthetic people (one random unit vector each, quantized to int8 as the
gallery stores it), added with ``Gallery.add_many`` in one transaction
(``facenet_edge.bench.bulk_enroll``). Search goes through the public ``Gallery.match`` and
``Gallery.match_top_k``.
Memory: what the in-memory index keeps after loading (``tracemalloc``: numpy buffers,
names, everything Python allocated), next to the bare int8 matrix (N x 128 bytes).
Bandwidth: numpy reading (``sum`` over a uint64 view) and copying an int8 array of exactly
the matrix's bytes; a search cannot be faster than one read of the matrix.

No model is needed (``--model`` only names the model the galleries are recorded for).

    python benchmarks/gallery_scaling.py [--sizes 1000,10000,100000,1000000] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from unittest import mock

import numpy as np
from common import (
    MB,
    Percentiles,
    Target,
    add_common_arguments,
    bulk_enroll,
    fmt,
    machine_info,
    machine_line,
    markdown_table,
    report,
    run_script,
    synthetic_embeddings,
    targets_table,
    time_calls,
    write_json,
)

from facenet_edge import search
from facenet_edge.arguments import int_list
from facenet_edge.card import ModelIdentity
from facenet_edge.embed import Embedder
from facenet_edge.gallery import Gallery
from facenet_edge.search import Index

SIZES = (1_000, 10_000, 100_000, 1_000_000)
QUICK_SIZES = (1_000, 10_000)
ROW_BYTES = 128
# Embeddings are synthetic, so no model is needed: without --model the galleries are
# recorded as made by this placeholder identity (queries carry the same one).
SYNTHETIC_IDENTITY = ModelIdentity(sha256="0" * 64, compatibility_group="synthetic")
MEMORY_TARGET_MB = 150
SEARCH_TARGET_RATIO = 1.2
TARGET_SIZE = 1_000_000
QUICK_KERNEL_ROWS = 10_000


@dataclass(frozen=True)
class Bandwidth:
    """Numpy over an int8 array of ``bytes``: one read pass (sum as uint64) and one copy."""

    bytes: int
    read: Percentiles
    copy: Percentiles

    @property
    def read_gb_s(self) -> float:
        return self.bytes / (self.read.p50_ms / 1000) / 1e9

    @property
    def copy_gb_s(self) -> float:
        """Bytes copied per second (each byte is read once and written once)."""
        return self.bytes / (self.copy.p50_ms / 1000) / 1e9


@dataclass(frozen=True)
class Scale:
    """One gallery size. Times in seconds unless named ``_ms``; memory in MB."""

    people: int
    enroll_s: float
    file_mb: float
    first_match_s: float  # loads the index from SQLite, then searches
    top1: Percentiles
    top5: Percentiles
    top1_float32: Percentiles | None  # numpy's float32 first pass, when the default is int8
    matrix_mb: float
    index_mb: float  # retained after loading (tracemalloc)
    index_peak_mb: float  # peak while loading
    bandwidth: Bandwidth

    @property
    def search_over_read(self) -> float:
        return self.top1.p50_ms / self.bandwidth.read.p50_ms

    @property
    def search_over_copy(self) -> float:
        return self.top1.p50_ms / self.bandwidth.copy.p50_ms

    @property
    def float32_over_read(self) -> float | None:
        return self.top1_float32.p50_ms / self.bandwidth.read.p50_ms if self.top1_float32 else None


def measure_bandwidth(nbytes: int, runs: int) -> Bandwidth:
    """Read and copy ``nbytes`` of int8 with numpy (the same bytes as the gallery matrix)."""
    source = np.random.default_rng(1).integers(-127, 128, nbytes, dtype=np.int8)
    target = np.empty_like(source)
    words = source.view(np.uint64)  # 128-byte rows: always a whole number of words
    read = Percentiles.of(time_calls(words.sum, runs, warmup=2))
    copy = Percentiles.of(time_calls(lambda: np.copyto(target, source), runs, warmup=2))
    return Bandwidth(nbytes, read, copy)


def index_memory(path: Path, query: np.ndarray, identity: ModelIdentity) -> tuple[float, float]:
    """(MB kept, MB at peak) by the gallery's in-memory index, loaded by a first match."""
    with Gallery.open(path) as gallery:
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            gallery.match(query, identity)
            current, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    return (current - before) / MB, (peak - before) / MB


def measure_scale(people: int, directory: Path, runs: int, identity: ModelIdentity) -> Scale:
    path = directory / f"gallery-{people}.db"
    enroll_s = bulk_enroll(path, identity, people)
    # A query near a stored face: a real match exists, as when a known person walks by.
    query = synthetic_embeddings(1, np.random.default_rng(2)).astype(np.float32)
    with Gallery.open(path) as gallery:
        start = time.perf_counter()
        gallery.match(query, identity)
        first_match_s = time.perf_counter() - start
        top1 = Percentiles.of(time_calls(lambda: gallery.match(query, identity), runs, warmup=3))
        top5 = Percentiles.of(time_calls(lambda: gallery.match_top_k(query, identity, 5), runs, warmup=3))
        top1_float32 = None
        if search.first_pass() != "numpy float32":  # the fallback, for the ratio in the same run
            with mock.patch.object(search, "_simsimd", None):
                top1_float32 = Percentiles.of(time_calls(lambda: gallery.match(query, identity), runs, warmup=3))
    index_mb, index_peak_mb = index_memory(path, query, identity)
    scale = Scale(
        people=people,
        enroll_s=enroll_s,
        file_mb=path.stat().st_size / MB,
        first_match_s=first_match_s,
        top1=top1,
        top5=top5,
        top1_float32=top1_float32,
        matrix_mb=people * ROW_BYTES / MB,
        index_mb=index_mb,
        index_peak_mb=index_peak_mb,
        bandwidth=measure_bandwidth(people * ROW_BYTES, runs),
    )
    path.unlink()
    return scale


@dataclass(frozen=True)
class Kernel:
    """One library's top-1 search over the int8 matrix, on one core: its timing, and
    whether it found the row the exact search finds."""

    name: str
    timing: Percentiles
    agrees: bool


def kernel_searches(matrix: np.ndarray, query: np.ndarray) -> dict[str, Callable[[], int]]:
    """name -> a top-1 search of the unit ``query`` over ``matrix`` (N x D int8, cosine)
    returning the row found: ours, and each installed candidate for the ``search`` extra.
    Each does the same work: every row scored against the query, then the best taken."""
    ids = np.arange(len(matrix))
    index = Index.build(len(matrix), matrix.shape[1], (0, len(matrix) - 1), [(ids, matrix)])
    scale = 127.0 / float(np.abs(query).max())
    query8 = np.round(query * scale).astype(np.int8)[None]
    searches = {f"ours ({search.first_pass()})": lambda: search.nearest(index, query[None], 1)[0][0][0]}
    try:  # optional: SimSIMD's successor
        import numkong
    except ImportError:
        numkong = None
    if numkong is not None:

        def numkong_cdist() -> int:
            scores = np.asarray(numkong.cdist(query8, matrix, metric="dot", out_dtype="float32"))[0]
            scores *= index.inv_norm
            return int(scores.argmax())

        packed = numkong.dots_pack(matrix)  # int8, inferred

        def numkong_packed() -> int:
            scores = np.asarray(numkong.dots_packed(query8, packed))[0].astype(np.float32)
            scores *= index.inv_norm
            return int(scores.argmax())

        searches["numkong cdist int8"] = numkong_cdist
        searches["numkong dots_packed int8"] = numkong_packed
    try:  # optional: faiss's 8-bit scalar quantizer (it stores its own codes)
        import faiss
    except ImportError:
        faiss = None
    if faiss is not None:
        faiss.omp_set_num_threads(1)
        sq = faiss.IndexScalarQuantizer(matrix.shape[1], faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
        step = 100_000  # float32 unit rows a step: the whole matrix as float32 would be 512 MB

        def unit(start: int) -> np.ndarray:
            rows = matrix[start : start + step]
            return rows.astype(np.float32) * index.inv_norm[start : start + len(rows), None]

        sq.train(unit(0))
        for start in range(0, len(matrix), step):
            sq.add(unit(start))
        searches["faiss SQ8 (QT_8bit)"] = lambda: int(sq.search(query[None], 1)[1][0, 0])
    return searches


def measure_kernels(rows: int, runs: int) -> tuple[Percentiles, list[Kernel], int]:
    """A plain read of a rows x 128 int8 matrix and each top-1 search over it, pinned to one
    core. Returns (read, kernels, the core)."""
    core = max(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})
    rng = np.random.default_rng(5)
    matrix = synthetic_embeddings(rows, rng)
    # A query near a stored face (as when a known person walks by): every kernel must find it.
    target = rows // 3
    query = matrix[target].astype(np.float32) / 127 + 0.02 * rng.standard_normal(ROW_BYTES).astype(np.float32)
    query /= np.linalg.norm(query)
    words = matrix.view(np.uint64)
    read = Percentiles.of(time_calls(words.sum, runs, warmup=2))
    kernels = []
    for name, run in kernel_searches(matrix, query).items():
        print(f"  {name} ...", file=sys.stderr, flush=True)
        found = run()
        kernels.append(Kernel(name, Percentiles.of(time_calls(run, runs, warmup=2)), found == target))
    return read, kernels, core


def kernel_libraries() -> dict[str, str]:
    """Installed versions of the kernels' libraries (metadata only)."""
    found = {}
    for name in ("simsimd", "numkong", "faiss-cpu"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def run_kernels(args: argparse.Namespace) -> int:
    """``--kernels``: ours against the candidates for the ``search`` extra, one run."""
    rows = QUICK_KERNEL_ROWS if args.quick else TARGET_SIZE
    runs = args.runs or (5 if args.quick else 30)
    machine = machine_info([1])
    print("# facenet-edge search kernels: top-1 over an int8 matrix, one core\n")
    print(machine_line(machine))
    read, kernels, core = measure_kernels(rows, runs)
    print(f"\n{rows:,} x {ROW_BYTES} int8 ({rows * ROW_BYTES / MB:.0f} MB), pinned to CPU {core}; ratios to a")
    print("numpy read of the same bytes (min: the run least disturbed by other work on the machine)\n")
    headers = ["search", "p50 ms", "min ms", "p50 / read p50", "min / read min", "found the face"]
    table = [["numpy read (sum as uint64)", fmt(read.p50_ms, 2), fmt(read.min_ms, 2), "1.00", "1.00", "-"]]
    for k in kernels:
        table.append(
            [k.name, fmt(k.timing.p50_ms, 2), fmt(k.timing.min_ms, 2), fmt(k.timing.p50_ms / read.p50_ms)]
            + [fmt(k.timing.min_ms / read.min_ms), "yes" if k.agrees else "NO"]
        )
    print(markdown_table(headers, table))
    print("\n" + ", ".join(f"{name} {v}" for name, v in kernel_libraries().items()))
    results = {
        "rows": rows,
        "core": core,
        "libraries": kernel_libraries(),
        "read": read,
        "kernels": [
            {
                **asdict(k),
                "p50_over_read": k.timing.p50_ms / read.p50_ms,
                "min_over_read": k.timing.min_ms / read.min_ms,
            }
            for k in kernels
        ],
    }
    config = {"rows": rows, "runs": runs}
    path = write_json(args.out / "gallery_kernels.json", report("gallery_kernels", machine, config, results, []))
    print(f"\nwrote {path}")
    return 0


def measure_add(people: int, directory: Path, identity: ModelIdentity) -> float:
    """Seconds per person enrolled through ``Gallery.add`` (one fsynced transaction each)."""
    rows = synthetic_embeddings(people, np.random.default_rng(3)).astype(np.float32)
    with Gallery.create(directory / "add.db", identity, threshold=1.0) as gallery:
        start = time.perf_counter()
        for i, row in enumerate(rows):
            gallery.add(f"person-{i}", row, identity)
        return (time.perf_counter() - start) / people


def plot(scales: Sequence[Scale], path: Path) -> Path | None:
    """Search time and the bandwidth floor against gallery size, log-log."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    people = [s.people for s in scales]
    fig = Figure(figsize=(6.4, 4.8))
    ax = fig.add_subplot()
    ax.plot(people, [s.top1.p50_ms for s in scales], "o-", label="top-1 search (p50)")
    ax.plot(people, [s.top5.p50_ms for s in scales], "s-", label="top-5 search (p50)")
    ax.plot(people, [s.bandwidth.read.p50_ms for s in scales], "k--", label="numpy read of the same bytes")
    ax.plot(people, [s.bandwidth.copy.p50_ms for s in scales], "k:", label="numpy copy of the same bytes")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("people in the gallery (one 128-byte sample each)")
    ax.set_ylabel("ms per query")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def gallery_targets(scales: Sequence[Scale]) -> list[Target]:
    big = next((s for s in scales if s.people == TARGET_SIZE), None)
    absent = "" if big else f"no {TARGET_SIZE:,}-people gallery in this run"
    return [
        Target(
            "1M-face gallery in memory", MEMORY_TARGET_MB, "MB", measured=big.index_mb if big else None, note=absent
        ),
        Target(
            "1M top-1 search / memory read of the matrix",
            SEARCH_TARGET_RATIO,
            "x",
            measured=big.search_over_read if big else None,
            note=absent or "p50 / p50",
        ),
    ]


def print_tables(scales: Sequence[Scale], add_s: float, add_people: int) -> None:
    print("\n## Enrolment and memory\n")
    headers = ["people", "enrol s (one transaction)", "people/s", "file MB", "first match s"]
    headers += ["matrix MB", "index MB", "load peak MB"]
    rows = [
        [f"{s.people:,}", fmt(s.enroll_s, 3), f"{s.people / s.enroll_s:,.0f}", fmt(s.file_mb, 1)]
        + [fmt(s.first_match_s, 3), fmt(s.matrix_mb, 1), fmt(s.index_mb, 1), fmt(s.index_peak_mb, 1)]
        for s in scales
    ]
    print(markdown_table(headers, rows))
    print(
        f"\n`Gallery.add`, one person per fsynced transaction: {1000 * add_s:.2f} ms per person ({add_people} people)"
    )
    print("\n## Search (ms per query) against memory bandwidth\n")
    headers = ["people", "top-1 p50", "top-1 p90", "top-1 p99", "top-5 p50", "top-5 p99"]
    headers += ["read p50", "read GB/s", "copy p50", "copy GB/s", "top-1 / read", "top-1 / copy"]
    headers += ["numpy float32 top-1 p50", "float32 / read"]
    rows = []
    for s in scales:
        b = s.bandwidth
        times = [s.top1.p50_ms, s.top1.p90_ms, s.top1.p99_ms, s.top5.p50_ms, s.top5.p99_ms]
        rows.append(
            [f"{s.people:,}", *(fmt(v, 3) for v in times), fmt(b.read.p50_ms, 3), fmt(b.read_gb_s, 1)]
            + [fmt(b.copy.p50_ms, 3), fmt(b.copy_gb_s, 1), fmt(s.search_over_read), fmt(s.search_over_copy)]
            + [fmt(s.top1_float32.p50_ms if s.top1_float32 else None, 3), fmt(s.float32_over_read)]
        )
    print(markdown_table(headers, rows))
    print(f"\nFirst pass of top-1 / top-5: {search.first_pass()}")


def run(args: argparse.Namespace) -> int:
    if args.kernels:
        return run_kernels(args)
    sizes = args.sizes or (QUICK_SIZES if args.quick else SIZES)
    runs = args.runs or (5 if args.quick else 50)
    add_people = args.add_people or (10 if args.quick else 200)
    if args.model is not None:
        with Embedder.from_path(args.model) as embedder:
            identity = embedder.identity
    else:
        identity = SYNTHETIC_IDENTITY
    machine = machine_info()
    print("# facenet-edge gallery scaling\n")
    print(machine_line(machine))
    scales = []
    with tempfile.TemporaryDirectory(prefix="gallery-scaling-", dir=args.tmp) as tmp:
        for people in sizes:
            print(f"{people:,} people ...", file=sys.stderr, flush=True)
            scales.append(measure_scale(people, Path(tmp), runs, identity))
        add_s = measure_add(add_people, Path(tmp), identity)
    targets = gallery_targets(scales)
    print_tables(scales, add_s, add_people)
    print("\n## Targets\n")
    print(targets_table(targets))
    args.out.mkdir(parents=True, exist_ok=True)
    png = plot(scales, args.out / "gallery_scaling.png")
    results = {
        "scales": [
            {
                **asdict(s),
                "search_over_read": s.search_over_read,
                "search_over_copy": s.search_over_copy,
                "float32_over_read": s.float32_over_read,
                "read_gb_s": s.bandwidth.read_gb_s,
                "copy_gb_s": s.bandwidth.copy_gb_s,
            }
            for s in scales
        ],
        "first_pass": search.first_pass(),  # of top1 / top5; top1_float32 is numpy's
        "add_ms_per_person": 1000 * add_s,
        "add_people": add_people,
        "plot": str(png) if png else None,
    }
    config = {"sizes": list(sizes), "runs": runs, "add_people": add_people, "model": args.model}
    path = write_json(args.out / "gallery_scaling.json", report("gallery_scaling", machine, config, results, targets))
    print(f"\nwrote {path}" + (f" and {png}" if png else " (no plot: matplotlib is not installed)"))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gallery_scaling", description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    parser.add_argument(
        "--sizes", type=int_list, metavar="N,N", help="gallery sizes (default 1000,10000,100000,1000000)"
    )
    parser.add_argument("--runs", type=int, metavar="N", help="timed searches per size (default 50)")
    parser.add_argument(
        "--add-people", type=int, metavar="N", help="people enrolled one by one with Gallery.add (default 200)"
    )
    parser.add_argument(
        "--tmp", type=Path, metavar="DIR", help="where the gallery files go (default: the system's temp dir)"
    )
    parser.add_argument(
        "--kernels",
        action="store_true",
        help="instead: top-1 over 1M x 128 int8 on one core, ours against numkong and faiss SQ8 (those "
        "installed), each as a ratio to a read of the bytes; writes gallery_kernels.json",
    )
    return run_script(parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
