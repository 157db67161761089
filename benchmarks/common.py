"""What the benchmark scripts share.

The general helpers (machine info, percentiles, Markdown tables, JSON output, targets,
a synthetic gallery, test frames, the ``--model/--out/--quick`` arguments) live in
``facenet_edge.bench``, because ``facenet-edge bench`` ships in the wheel and needs them on
a Raspberry Pi; they are re-exported here so every script imports from one place. What
only a source checkout has is defined here: the machine info with the checkout's commit,
LFW beside the repository (``SHARED_LFW``), synthetic int8 embeddings, running a script,
and which models to compare. LFW through the runtime
path (pairs, our detector's face per image, embeddings cached per model and detector,
10-fold scores within one model or across two) lives in ``facenet_train.evaluation``,
shared with ``facenet-train evaluate --runtime-path``, and is re-exported here.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from facenet_edge import bench
from facenet_edge.bench import (
    DEFAULT_OUT,
    MB,
    FaceImage,
    Percentiles,
    Target,
    add_common_arguments,
    bulk_enroll,
    face_images,
    fmt,
    markdown_table,
    random_unit_vectors,
    report,
    resolve_model,
    rss_bytes,
    targets_table,
    time_calls,
    write_json,
)
from facenet_edge.card import ModelCard, card_path_for
from facenet_edge.embed import Embedder
from facenet_edge.errors import FacenetEdgeError
from facenet_edge.gallery import quantize
from facenet_edge.interpreter import load_interpreter, uses_edgetpu
from facenet_train.conversion import TARGETS
from facenet_train.evaluation import (
    Describe,
    LfwFaces,
    describe_with,
    lfw_cross_result,
    lfw_embeddings,
    lfw_result,
)
from facenet_train.lfw import LfwPairs, load_lfw

__all__ = [
    "DEFAULT_OUT",
    "MB",
    "FaceImage",
    "Percentiles",
    "Target",
    "add_common_arguments",
    "bulk_enroll",
    "default_lfw",
    "face_images",
    "face_outcomes",
    "fmt",
    "machine_info",
    "machine_line",
    "markdown_table",
    "report",
    "resolve_model",
    "rss_bytes",
    "run_script",
    "synthetic_embeddings",
    "targets_table",
    "time_calls",
    "write_json",
    "ModelUnderTest",
    "conversions",
    "models_under_test",
    "LfwPairs",
    "load_lfw",
    "LfwFaces",
    "Describe",
    "describe_with",
    "lfw_embeddings",
    "lfw_result",
    "lfw_cross_result",
    "add_lfw_arguments",
    "lfw_name",
    "require_lfw",
    "git_commit",
    "lfw_photos",
]

# The repository: these scripts run from its checkout.
ROOT = Path(__file__).resolve().parents[1]
# Where the project keeps LFW, relative to the repository root.
SHARED_LFW = Path("../shared/data/lfw")


def face_outcomes(outcomes) -> dict[str, int]:
    """How each image's face was found (``lfw_embeddings``' outcomes): directly, after
    padding, or nowhere (a centre box stood in)."""
    return {
        "found": int((outcomes == 0).sum()),
        "found_after_padding": int((outcomes > 0).sum()),
        "centre_box": int((outcomes < 0).sum()),
    }


# --------------------------------------------------------------------------- the checkout


def git_commit() -> str | None:
    """HEAD of the checkout, with ``+dirty`` when tracked files differ from it (None
    without git, or outside a git checkout)."""
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        status = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+dirty" if status.stdout.strip() else "")


def machine_info(threads: Sequence[int] | None = None) -> dict[str, Any]:
    """``facenet_edge.bench.machine_info`` with the checkout's commit (``git_commit``)."""
    return {**bench.machine_info(threads), "git_commit": git_commit()}


def machine_line(machine: dict[str, Any]) -> str:
    """``facenet_edge.bench.machine_line``, then the commit when there is one."""
    commit = machine.get("git_commit")
    suffix = f" (commit {commit[:12]}{'+dirty' if commit.endswith('+dirty') else ''})" if commit else ""
    return bench.machine_line(machine) + suffix


def default_lfw() -> Path | None:
    """``../shared/data/lfw`` beside the checkout, when it exists."""
    path = (ROOT / SHARED_LFW).resolve()
    return path if (path / "pairs.txt").is_file() else None


def lfw_photos(lfw: Path | None) -> Iterator[tuple[str, Path]]:
    """(name, path) of the first photo of each LFW person, in name order (none without LFW)."""
    if lfw is None:
        return
    for person in sorted(p for p in lfw.iterdir() if p.is_dir()):
        first = person / f"{person.name}_0001.jpg"
        if first.is_file():
            yield f"lfw/{person.name}", first


def synthetic_embeddings(count: int, rng: np.random.Generator, size: int = 128) -> np.ndarray:
    """(count, size) int8 rows: random unit vectors quantized exactly as the gallery stores them."""
    return quantize(random_unit_vectors(count, size, rng))


def run_script(
    parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], int], argv: Sequence[str] | None
) -> int:
    """Parse, run, and report a user-fixable error (no model, unreadable image) as one line."""
    args = parser.parse_args(argv)
    try:
        return run(args)
    except FacenetEdgeError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 1

# --------------------------------------------------------------------------- models


@dataclass(frozen=True)
class ModelUnderTest:
    """An embedding model to measure. ``target``: float32, float16, int8 (from the card's
    quantization entry, else the input tensor's type) or edgetpu."""

    path: Path
    card: ModelCard
    target: str
    label: str

    @property
    def int8(self) -> bool:
        return self.target in ("int8", "edgetpu")


def conversions(path: Path) -> list[Path]:
    """``path`` and the ``NAME_{float32,float16,int8}.tflite`` beside it (``facenet-train
    convert``'s names) that have a card; just ``path`` when its name has no target suffix."""
    for target in TARGETS:
        suffix = f"_{target}"
        if path.stem.endswith(suffix):
            base = path.stem[: -len(suffix)]
            siblings = [path.with_name(f"{base}_{t}.tflite") for t in TARGETS]
            return [p for p in siblings if p == path or (p.is_file() and card_path_for(p).is_file())]
    return [path]


def models_under_test(paths: Sequence[Path] | None) -> list[ModelUnderTest]:
    """``--model`` paths as given, else the shipped model and its conversions."""
    chosen = list(paths) if paths else conversions(resolve_model(None))
    models = []
    for path in chosen:
        with Embedder.from_path(path) as embedder:
            card = embedder.card
        if uses_edgetpu(path, None):
            target = "edgetpu"
        elif card.quantization.get("target"):
            target = card.quantization["target"]
        else:
            with load_interpreter(path) as interpreter:
                target = "int8" if interpreter.input.quantized else "float32"
        models.append(ModelUnderTest(path, card, target, path.stem))
    return _distinct_labels(models)


def _distinct_labels(models: list[ModelUnderTest]) -> list[ModelUnderTest]:
    """Labels are file names; where two models share one (a release against its successor,
    both ``nn4_small2_distilled_int8``), their card versions, then their folders, tell them
    apart, so that no table row or JSON entry stands for two models."""
    for describe in (lambda m: f"{m.path.stem} v{m.card.version}", lambda m: f"{m.path.parent.name}/{m.label}"):
        counts = Counter(m.label for m in models)
        models = [replace(m, label=describe(m)) if counts[m.label] > 1 else m for m in models]
    return models


# --------------------------------------------------------------------------- LFW


QUICK_PAIRS = 20  # --quick: pairs spread over the 10 folds


def lfw_name(path: Path) -> str:
    """``Person/Person_0001.jpg``: where an image sits in any LFW folder."""
    return "/".join(path.parts[-2:])


def require_lfw(args: argparse.Namespace) -> LfwPairs:
    """The pairs of ``--lfw`` (``--pairs`` of them, or a few with ``--quick``), or a one-line
    error naming the missing folder."""
    if args.lfw is None or not (args.lfw / "pairs.txt").is_file():
        raise FacenetEdgeError(
            f"LFW not found ({args.lfw or '../shared/data/lfw'}): pass --lfw DIR, a folder with pairs.txt "
            "and one folder of images per person"
        )
    return load_lfw(args.lfw, args.pairs or (QUICK_PAIRS if args.quick else None))


def add_lfw_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--lfw",
        type=Path,
        default=default_lfw(),
        metavar="DIR",
        help="LFW folder with pairs.txt (default: ../shared/data/lfw)",
    )
    parser.add_argument(
        "--pairs", type=int, metavar="N", help="score N pairs spread over the 10 folds (default: all 6000)"
    )
    parser.add_argument("--cache", type=Path, metavar="DIR", help="LFW embedding cache (default: OUT/cache)")
