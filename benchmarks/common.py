"""What the benchmark scripts share.

The general helpers (machine info, percentiles, Markdown tables, JSON output, targets,
synthetic galleries, test frames, the ``--model/--out/--quick`` arguments) live in
``facenet_edge.bench``, because ``facenet-edge bench`` ships in the wheel and needs them on
a Raspberry Pi; they are re-exported here so every script imports from one place. What
only the scripts need is defined here: which models to compare. LFW through the runtime
path (pairs, our detector's face per image, embeddings cached per model and detector,
10-fold scores within one model or across two) lives in ``facenet_train.evaluation``,
shared with ``facenet-train evaluate --runtime-path``, and is re-exported here.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from facenet_edge.bench import (
    DEFAULT_OUT,
    MB,
    FaceImage,
    Percentiles,
    Target,
    add_common_arguments,
    bulk_enroll,
    default_lfw,
    face_images,
    fmt,
    machine_info,
    machine_line,
    markdown_table,
    report,
    resolve_model,
    rss_bytes,
    run_script,
    synthetic_embeddings,
    targets_table,
    time_calls,
    write_json,
)
from facenet_edge.card import ModelCard, card_path_for
from facenet_edge.embed import Embedder
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
]


def face_outcomes(outcomes) -> dict[str, int]:
    """How each image's face was found (``lfw_embeddings``' outcomes): directly, after
    padding, or nowhere (a centre box stood in)."""
    return {
        "found": int((outcomes == 0).sum()),
        "found_after_padding": int((outcomes > 0).sum()),
        "centre_box": int((outcomes < 0).sum()),
    }

# --------------------------------------------------------------------------- models


@dataclass(frozen=True)
class ModelUnderTest:
    """An embedding model to measure. ``target``: float32, float16, int8 (from the card's
    quantization entry, else the input tensor's type) or edgetpu."""

    path: Path
    card: ModelCard
    target: str

    @property
    def label(self) -> str:
        return self.path.stem

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
        models.append(ModelUnderTest(path, card, target))
    return models


# --------------------------------------------------------------------------- LFW


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
