"""Cluster photos by face: embed every face in a folder tree, group faces of the same
person, and write one folder per group (links to the photos) with a contact sheet.

    python cluster_photos.py ~/Pictures clusters/
    python cluster_photos.py --copy --threshold 0.5 ~/Pictures clusters/
    python cluster_photos.py --labels-from-folders --largest-only lfw/ out/

``average`` (the default) is average-linkage agglomerative clustering cut at the model
card's distance threshold (scikit-learn's when installed, else a numpy nearest-neighbour
chain): two groups merge only when their faces are within it on average, so one close
pair of photos of two people does not join them. ``threshold`` joins any two faces
within it (connected components, single linkage): fast, but one weak link chains two
people together. Distances are squared L2 between unit embeddings (0..4).

Output: ``cluster_000/`` (largest first), ..., ``unclustered/`` (groups smaller than
``--min-size``), each with ``contact_sheet.png``, plus ``summary.json``. Contact sheets
show the aligned crops the pipeline embedded (``Face.crop``), kept in a temporary file
until the groups are known, and are written with mode 0600 (they hold faces).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import os
import shutil
import sys
import tempfile
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from facenet_edge import FacePipeline, FacenetEdgeError, ImageError, read_image
from facenet_edge.detect import DEFAULT_DETECTOR, DETECTORS
from facenet_edge.files import private_file

log = logging.getLogger("cluster_photos")


@dataclass(frozen=True)
class FaceRef:
    """Where a face was found: the photo (relative to the input folder), the detection,
    and the number of its aligned crop in the ``CropStore``."""

    path: Path
    box: np.ndarray
    score: float
    crop: int

    @property
    def label(self) -> str | None:
        """The top-level folder the photo is in (the person, in an LFW-style tree)."""
        return self.path.parts[0] if len(self.path.parts) > 1 else None


@dataclass
class ScanStats:
    files: int = 0
    unreadable: int = 0
    without_faces: int = 0
    faces: int = 0


# ------------------------------------------------------------------ embedding


class CropStore:
    """The aligned face crops (all of one shape) in an unnamed temporary file, read back
    by number for the contact sheets. Memory stays flat however many faces there are (a
    96 x 96 crop is 27 KB); the file is private (mode 0600, no name on POSIX systems) and
    gone when closed or when the process ends."""

    def __init__(self) -> None:
        self._file = tempfile.TemporaryFile(prefix="cluster_photos-crops-")
        self._shape: tuple[int, ...] | None = None
        self._size = 0
        self.count = 0

    def add(self, crop: np.ndarray) -> int:
        """Store a crop; returns its number."""
        if self._shape is None:
            self._shape, self._size = crop.shape, crop.size
        elif crop.shape != self._shape:
            raise ValueError(f"crop shape {crop.shape} differs from the first one, {self._shape}")
        self._file.seek(0, os.SEEK_END)
        self._file.write(np.ascontiguousarray(crop, dtype=np.uint8).tobytes())
        self.count += 1
        return self.count - 1

    def get(self, number: int) -> np.ndarray:
        if not 0 <= number < self.count:
            raise IndexError(f"crop {number} of {self.count}")
        self._file.seek(number * self._size)
        return np.frombuffer(self._file.read(self._size), dtype=np.uint8).reshape(self._shape)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> CropStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def image_files(root: Path) -> list[Path]:
    """Every file under ``root`` (sorted, hidden files and folders left out)."""
    found = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        found.extend(Path(folder, f) for f in sorted(files) if not f.startswith("."))
    return found


def embed_folder(
    pipeline: FacePipeline, root: Path, largest_only: bool, stats: ScanStats, crops: CropStore
) -> tuple[list[FaceRef], np.ndarray]:
    """All faces under ``root`` and their (N, 128) embeddings; each face's aligned crop
    goes to ``crops``. Files that are not readable images are skipped with the reason
    logged."""
    refs: list[FaceRef] = []
    embeddings: list[np.ndarray] = []
    files = image_files(root)
    for number, path in enumerate(files, 1):
        stats.files += 1
        try:
            faces = pipeline.process(read_image(path))
        except ImageError as exc:  # its message names the file
            stats.unreadable += 1
            log.warning("skipping: %s", exc)
            continue
        except (ValueError, cv2.error) as exc:  # a bad image must not end the run
            stats.unreadable += 1
            log.warning("skipping %s: %s", path, exc)
            continue
        if not faces:
            stats.without_faces += 1
            log.info("no face in %s", path)
        if largest_only and faces:  # a labelled tree: the person is the main face, others are bystanders
            faces = [max(faces, key=lambda f: (f.box[2] - f.box[0]) * (f.box[3] - f.box[1]))]
        for face in faces:
            refs.append(FaceRef(path.relative_to(root), face.box, face.score, crops.add(face.crop)))
            embeddings.append(face.embedding)
        if number % 100 == 0:
            log.info("%d of %d files, %d faces", number, len(files), len(refs))
    stats.faces = len(refs)
    return refs, np.array(embeddings, dtype=np.float32).reshape(-1, 128)


# ------------------------------------------------------------------ clustering


def _roots(parent: np.ndarray) -> np.ndarray:
    """Point every node of a union-find forest straight at its root (in place)."""
    while True:
        grand = parent[parent]
        if np.array_equal(grand, parent):
            return parent
        parent[:] = grand


def _join(parent: np.ndarray, u: np.ndarray, v: np.ndarray) -> None:
    """Merge the sets of every pair (u[k], v[k]), vectorised: hang each root under the
    smallest root it is paired with until all pairs share a root. Parents always have a
    smaller index than their children, so no cycle can form."""
    while True:
        roots = _roots(parent)
        ru, rv = roots[u], roots[v]
        differ = ru != rv
        if not differ.any():
            return
        low, high = np.minimum(ru[differ], rv[differ]), np.maximum(ru[differ], rv[differ])
        np.minimum.at(parent, high, low)


def compact(labels: np.ndarray) -> np.ndarray:
    """Labels renumbered 0, 1, 2, ... in order of first appearance."""
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    order = np.argsort(np.argsort(first))
    return order[inverse.ravel()]


def threshold_components(embeddings: np.ndarray, threshold: float, block: int = 512) -> np.ndarray:
    """Connected components of the graph joining faces within ``threshold`` (squared L2).
    The distance matrix is computed ``block`` rows at a time, so memory stays at
    ``block x N`` however many faces there are."""
    n = len(embeddings)
    parent = np.arange(n)
    for start in range(0, n, block):
        # Unit vectors: |a - b|^2 = 2 - 2 a.b
        distance = 2.0 - 2.0 * embeddings[start : start + block] @ embeddings.T
        rows, cols = np.nonzero(distance <= threshold)
        rows += start
        later = cols > rows  # each pair once
        _join(parent, rows[later], cols[later])
    return compact(_roots(parent))


def average_linkage_numpy(distance: np.ndarray, threshold: float) -> np.ndarray:
    """Average-linkage agglomerative clustering of one square distance matrix, keeping
    merges at distances <= ``threshold``. Nearest-neighbour chain: O(n^2) time.

    Average linkage never brings a cluster closer to others by merging, so a cluster
    whose nearest neighbour is beyond the threshold is final and leaves the game."""
    n = len(distance)
    d = distance.astype(np.float64)
    np.fill_diagonal(d, np.inf)
    size = np.ones(n)
    active = np.ones(n, dtype=bool)
    merged_into = np.arange(n)
    chain: list[int] = []
    while active.any():
        if not chain:
            chain.append(int(np.argmax(active)))
        a = chain[-1]
        row = np.where(active, d[a], np.inf)
        b = int(np.argmin(row))
        if len(chain) > 1 and row[chain[-2]] <= row[b]:
            b = chain[-2]  # on a tie, prefer the previous link: it closes the chain
        if not row[b] <= threshold:  # also when a is the last one (inf)
            active[a] = False
            chain.pop()
        elif len(chain) > 1 and b == chain[-2]:  # reciprocal nearest neighbours: merge b into a
            d[a] = (size[a] * d[a] + size[b] * d[b]) / (size[a] + size[b])
            d[:, a] = d[a]
            d[a, a] = np.inf
            size[a] += size[b]
            active[b] = False
            merged_into[b] = a
            chain.pop()
            chain.pop()
        else:
            chain.append(b)
    return compact(_roots(merged_into))


def average_linkage_sklearn(distance: np.ndarray, threshold: float) -> np.ndarray:
    from sklearn.cluster import AgglomerativeClustering

    # scikit-learn merges below the threshold; we merge at or below it.
    model = AgglomerativeClustering(
        n_clusters=None, metric="precomputed", linkage="average", distance_threshold=np.nextafter(threshold, 4.0)
    )
    return compact(model.fit_predict(distance))


def average_clusters(embeddings: np.ndarray, threshold: float, use_sklearn: bool) -> np.ndarray:
    """Average-linkage clusters cut at ``threshold``. Two faces can only end up together
    when some chain of faces within the threshold links them, so each threshold component
    is clustered on its own: memory is the largest component squared, not N squared."""
    components = threshold_components(embeddings, threshold)
    labels = np.empty(len(embeddings), dtype=np.int64)
    next_label = 0
    for component in range(components.max(initial=-1) + 1):
        members = np.flatnonzero(components == component)
        if len(members) == 1:
            part = np.zeros(1, dtype=np.int64)
        else:
            vectors = embeddings[members]
            distance = np.clip(2.0 - 2.0 * vectors @ vectors.T, 0.0, 4.0)
            part = (average_linkage_sklearn if use_sklearn else average_linkage_numpy)(distance, threshold)
        labels[members] = part + next_label
        next_label += part.max() + 1
    return labels


def groups_by_size(labels: np.ndarray) -> list[np.ndarray]:
    """Member indices of each cluster, largest first (ties: first seen first)."""
    groups = [np.flatnonzero(labels == k) for k in range(labels.max(initial=-1) + 1)]
    return sorted(groups, key=len, reverse=True)


# ------------------------------------------------------------------ evaluation


def pairs(counts: Iterable[int]) -> int:
    """Unordered pairs within groups of these sizes."""
    return sum(c * (c - 1) // 2 for c in counts)


def label_metrics(groups: list[np.ndarray], labels: list[str | None]) -> dict[str, float | int | None]:
    """How well clusters match known identities. ``purity``: the share of faces that
    belong to their cluster's most common person. Pairwise ``precision``: of the face pairs
    put in one cluster, the share showing one person; ``recall``: of the pairs showing one
    person, the share put in one cluster. Unlabelled faces are left out."""
    contingency: Counter[tuple[int, str]] = Counter()
    for cluster, members in enumerate(groups):
        for i in members:
            if labels[i] is not None:
                contingency[cluster, labels[i]] += 1
    faces = sum(contingency.values())
    if not faces:
        return {"faces": 0, "people": 0, "purity": None, "pairwise_precision": None, "pairwise_recall": None}
    best: dict[int, int] = defaultdict(int)
    per_cluster: Counter[int] = Counter()
    per_person: Counter[str] = Counter()
    for (cluster, person), count in contingency.items():
        best[cluster] = max(best[cluster], count)
        per_cluster[cluster] += count
        per_person[person] += count
    together, same_person, both = pairs(per_cluster.values()), pairs(per_person.values()), pairs(contingency.values())
    return {
        "faces": faces,
        "people": len(per_person),
        "purity": sum(best.values()) / faces,
        "pairwise_precision": both / together if together else None,
        "pairwise_recall": both / same_person if same_person else None,
    }


# ------------------------------------------------------------------ output


def contact_sheet(tiles: list[np.ndarray], columns: int) -> np.ndarray:
    """Tiles (equal-sized RGB crops) in a grid, row by row, on white."""
    height, width = tiles[0].shape[:2]
    columns = min(columns, len(tiles))
    rows = math.ceil(len(tiles) / columns)
    sheet = np.full((rows * height, columns * width, 3), 255, dtype=np.uint8)
    for k, tile in enumerate(tiles):
        r, c = divmod(k, columns)
        sheet[r * height : (r + 1) * height, c * width : (c + 1) * width] = tile
    return sheet


@dataclass(frozen=True)
class SheetSpec:
    """Contact sheets: the aligned crops scaled to ``tile`` pixels high, ``columns`` per
    row, the first ``limit`` faces of a group."""

    tile: int
    columns: int
    limit: int


def sheet_tiles(crops: CropStore, refs: list[FaceRef], tile: int) -> list[np.ndarray]:
    """The crops the model embedded for ``refs`` (no re-reading, no re-aligning), scaled to
    ``tile`` pixels high (the width follows the model's input shape)."""
    tiles = []
    for ref in refs:
        crop = crops.get(ref.crop)
        height, width = crop.shape[:2]
        if height != tile:
            size = (max(1, round(width * tile / height)), tile)
            crop = cv2.resize(crop, size, interpolation=cv2.INTER_AREA if tile < height else cv2.INTER_LINEAR)
        tiles.append(crop)
    return tiles


def link_name(path: Path) -> str:
    """A flat, unique file name for a photo: its relative path with '__' between parts."""
    return "__".join(path.parts)


def write_group(
    folder: Path, root: Path, refs: list[FaceRef], copy: bool, sheet: SheetSpec, crops: CropStore
) -> list[str]:
    """One output folder: a link (or copy) of each photo, and the contact sheet.
    Returns the photos' paths relative to the input."""
    folder.mkdir()
    photos = sorted({ref.path for ref in refs})
    for photo in photos:
        target = folder / link_name(photo)
        if copy:
            shutil.copy2(root / photo, target)
        else:
            target.symlink_to((root / photo).resolve())
    tiles = sheet_tiles(crops, refs[: sheet.limit], sheet.tile)
    if tiles:
        image = contact_sheet(tiles, sheet.columns)
        ok, png = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        if not ok:
            raise FacenetEdgeError(f"cannot encode the contact sheet of {folder}")
        # Faces are biometric data: the sheet is written private (0600), like embeddings.
        with private_file(folder / "contact_sheet.png", FacenetEdgeError) as file:
            file.write(png.tobytes())
    return [str(p) for p in photos]


# ------------------------------------------------------------------ command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Group the photos in a folder tree by the people in them.")
    parser.add_argument("input", type=Path, help="folder of photos (searched recursively)")
    parser.add_argument("output", type=Path, help="output folder (must not exist, or be empty)")
    parser.add_argument(
        "--model", metavar="PATH", help="embedding model .tflite, its card beside it (default: the packaged model)"
    )
    parser.add_argument(
        "--detector", default=DEFAULT_DETECTOR, choices=sorted(DETECTORS), help="(default: %(default)s)"
    )
    parser.add_argument("--threads", type=int, metavar="N", help="CPU threads for the models")
    parser.add_argument(
        "--method",
        choices=["average", "threshold"],
        default="average",
        help="average: average-linkage agglomerative (default); threshold: connected components, which chain",
    )
    parser.add_argument(
        "--threshold",
        type=float,
        metavar="D",
        help="squared-L2 distance joining two faces (default: the model card's thresholds.far_1e3)",
    )
    parser.add_argument(
        "--min-size", type=int, default=2, metavar="N", help="smaller groups go to unclustered/ (default: 2)"
    )
    parser.add_argument("--largest-only", action="store_true", help="only the largest face of each photo")
    parser.add_argument("--copy", action="store_true", help="copy photos instead of symlinking them")
    parser.add_argument(
        "--labels-from-folders",
        action="store_true",
        help="the input has one folder per person (like LFW): report purity, pairwise precision/recall",
    )
    parser.add_argument(
        "--tile", type=int, default=112, metavar="PX", help="contact sheet tile height in pixels (default: 112)"
    )
    parser.add_argument("--columns", type=int, default=8, metavar="N", help="contact sheet columns (default: 8)")
    parser.add_argument(
        "--sheet-max", type=int, default=64, metavar="N", help="faces per contact sheet at most (default: 64)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Returns the exit code: 0 ok, 1 error, 130 Ctrl-C."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if min(args.min_size, args.tile, args.columns, args.sheet_max) < 1:
        parser.error("--min-size, --tile, --columns and --sheet-max must be at least 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    stats = ScanStats()
    try:
        if not args.input.is_dir():
            raise ImageError(f"not a folder: {args.input}")
        if args.output.exists() and (not args.output.is_dir() or any(args.output.iterdir())):
            raise FileExistsError(f"output {args.output} exists and is not an empty folder")
        with CropStore() as crops:
            with FacePipeline(model_path=args.model, detector=args.detector, num_threads=args.threads) as pipeline:
                threshold = args.threshold if args.threshold is not None else pipeline.card.thresholds.default()
                if threshold is None:
                    raise FacenetEdgeError("the model card has no threshold: pass --threshold D")
                refs, embeddings = embed_folder(pipeline, args.input, args.largest_only, stats, crops)
            use_sklearn = args.method == "average" and importlib.util.find_spec("sklearn") is not None
            if args.method == "threshold":
                labels = threshold_components(embeddings, threshold)
            else:
                labels = average_clusters(embeddings, threshold, use_sklearn)
            groups = groups_by_size(labels)
            summary = write_output(args, refs, groups, threshold, stats, use_sklearn, crops)
    except KeyboardInterrupt:
        print(f"cluster_photos: interrupted after {stats.files} files ({stats.faces} faces)", file=sys.stderr)
        return 130
    except (FacenetEdgeError, OSError) as exc:
        print(f"cluster_photos: error: {exc}", file=sys.stderr)
        return 1
    clustered = summary["clusters"]
    print(
        f"{stats.files} files, {stats.unreadable} unreadable, {stats.without_faces} without faces, "
        f"{stats.faces} faces -> {len(clustered)} cluster(s) of {args.min_size}+ faces "
        f"({sum(c['faces'] for c in clustered)} faces), {summary['unclustered']['faces']} unclustered "
        f"({args.method}, distance {summary['threshold']:.3g}); "
        f"see {args.output / 'summary.json'}"
    )
    if "labels" in summary:
        print(f"labels: {describe_metrics(summary['labels'])}")
    return 0


def describe_metrics(metrics: dict[str, float | int | None]) -> str:
    """``label_metrics`` in one line, three decimals."""
    figures = ", ".join(
        f"{key.replace('_', ' ')} {'n/a' if metrics[key] is None else format(metrics[key], '.3f')}"
        for key in ("purity", "pairwise_precision", "pairwise_recall")
    )
    return f"{metrics['people']} people, {metrics['faces']} faces: {figures}"


def write_output(
    args: argparse.Namespace,
    refs: list[FaceRef],
    groups: list[np.ndarray],
    threshold: float,
    stats: ScanStats,
    use_sklearn: bool,
    crops: CropStore,
) -> dict:
    """Cluster folders, ``unclustered/``, and ``summary.json``; returns the summary."""
    args.output.mkdir(parents=True, exist_ok=True)
    sheet = SheetSpec(args.tile, args.columns, args.sheet_max)
    clusters = []
    small = [i for members in groups if len(members) < args.min_size for i in members]
    for number, members in enumerate(g for g in groups if len(g) >= args.min_size):
        folder = args.output / f"cluster_{number:03d}"
        photos = write_group(folder, args.input, [refs[i] for i in members], args.copy, sheet, crops)
        clusters.append({"folder": folder.name, "faces": len(members), "photos": photos})
    unclustered = {"folder": "unclustered", "faces": len(small), "photos": []}
    if small:
        unclustered["photos"] = write_group(
            args.output / "unclustered", args.input, [refs[i] for i in small], args.copy, sheet, crops
        )
    summary = {
        "input": str(args.input),
        "method": args.method + (" (scikit-learn)" if use_sklearn else ""),
        "threshold": threshold,
        "min_size": args.min_size,
        "files": stats.files,
        "unreadable": stats.unreadable,
        "without_faces": stats.without_faces,
        "faces": stats.faces,
        "clusters": clusters,
        "unclustered": unclustered,
    }
    if args.labels_from_folders:
        metrics = label_metrics(groups, [ref.label for ref in refs])
        # Four decimals: the figures are ratios of a few hundred faces; more is float noise.
        summary["labels"] = {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}
    (args.output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    sys.exit(main())
