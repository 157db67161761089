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
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Sequence
from dataclasses import asdict, dataclass
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

SIZES = (1_000, 10_000, 100_000, 1_000_000)
QUICK_SIZES = (1_000, 10_000)
ROW_BYTES = 128
# Embeddings are synthetic, so no model is needed: without --model the galleries are
# recorded as made by this placeholder identity (queries carry the same one).
SYNTHETIC_IDENTITY = ModelIdentity(sha256="0" * 64, compatibility_group="synthetic")
MEMORY_TARGET_MB = 150
SEARCH_TARGET_RATIO = 1.2
TARGET_SIZE = 1_000_000


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
    return run_script(parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
