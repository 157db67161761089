"""Model family: parameters, multiply-adds and FLOPs per model, and TFLite file size per conversion.

The family is the training stack's (``facenet_train.models``: nn4_small2, nn4, nns1, nns2,
nn2), counted analytically by ``facenet_train.flops``. Each model is converted with
``facenet_train.conversion`` to float32, float16 and full-integer int8 exactly as
``facenet-train convert`` does. The weights are untrained: a file holds the same tensors
whatever their values, so the sizes are a trained model's (the card ``facenet-train
convert`` embeds adds about 2 KB). ``--model`` adds the real files of a converted model
(and its ``NAME_{float32,float16,int8}.tflite`` siblings) with their cards' counts.

Needs TensorFlow (the ``train`` extra). Converting all five models three ways takes minutes.

    python benchmarks/models.py [--family nn4_small2,nn2] [--targets float32,int8] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from common import (
    MB,
    add_common_arguments,
    conversions,
    fmt,
    machine_info,
    machine_line,
    markdown_table,
    models_under_test,
    report,
    run_script,
    write_json,
)

from facenet_edge.arguments import name_list
from facenet_edge.errors import ModelError
from facenet_train.conversion import TARGETS

FAMILY = ("nn4_small2", "nn4", "nns1", "nns2", "nn2")
QUICK_FAMILY = ("nns2",)
QUICK_TARGETS = ("float32",)
CALIBRATION_SAMPLES = 8  # int8 needs activation ranges; their values do not change the file size


@dataclass(frozen=True)
class Conversion:
    target: str
    size_bytes: int
    seconds: float


@dataclass(frozen=True)
class FamilyModel:
    """One architecture: counts per image (``macs``: the FaceNet paper's "FLOPS" column)."""

    name: str
    input_shape: tuple[int, int, int]
    params: int
    trainable_params: int
    macs: int
    flops: int
    paper_params: int | None
    paper_macs: int | None
    conversions: tuple[Conversion, ...]

    def size_mb(self, target: str) -> float | None:
        return next((c.size_bytes / MB for c in self.conversions if c.target == target), None)


@dataclass(frozen=True)
class ModelFile:
    """A converted model on disk, with what its card says."""

    path: str
    target: str
    size_bytes: int
    parameters: int | None
    flops: int | None
    architecture: str


def measure_family(names: Sequence[str], targets: Sequence[str]) -> list[FamilyModel]:
    """Build, count and convert each model (TensorFlow is imported here, not at start-up)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter
    from facenet_train.conversion import convert_model, with_batch_one
    from facenet_train.flops import count_flops
    from facenet_train.models import MODELS, build_model

    rng = np.random.default_rng(0)
    family = []
    for name in names:
        print(f"{name} ...", file=sys.stderr, flush=True)
        model = build_model(name)
        counts = count_flops(model)
        batch_one = with_batch_one(model)
        shape = tuple(int(d) for d in model.input_shape[1:])
        # (pixel - 127.5) / 128: the card's default input range.
        calibration = rng.uniform(-1.0, 1.0, (CALIBRATION_SAMPLES, *shape)).astype(np.float32)
        conversions = []
        for target in targets:
            start = time.perf_counter()
            data = convert_model(batch_one, target, calibration if target == "int8" else None)
            conversions.append(Conversion(target, len(data), time.perf_counter() - start))
        paper = MODELS[name].paper
        family.append(
            FamilyModel(
                name=name,
                input_shape=shape,
                params=counts.params,
                trainable_params=counts.trainable_params,
                macs=counts.macs,
                flops=counts.flops,
                paper_params=paper.params,
                paper_macs=paper.macs,
                conversions=tuple(conversions),
            )
        )
    return family


def model_files(path: Path | None) -> tuple[list[ModelFile], str]:
    """The given (or shipped) model and its conversions; empty, with the reason, when none
    (the family needs no model file)."""
    try:
        models = models_under_test(conversions(path) if path else None)
    except ModelError as exc:
        return [], str(exc)
    return [
        ModelFile(str(m.path), m.target, m.path.stat().st_size, m.card.parameters, m.card.flops, m.card.architecture)
        for m in models
    ], ""


def millions(value: int | None) -> str:
    return "-" if value is None else f"{value / 1e6:.2f}"


def print_tables(family: Sequence[FamilyModel], targets: Sequence[str], files: Sequence[ModelFile], note: str) -> None:
    print("\n## Family (counts per image; M = millions)\n")
    headers = ["model", "input", "params M", "trainable M", "MACs M", "FLOPs M", "paper params M", "paper MACs M"]
    headers += [f"{t} MB" for t in targets]
    rows = [
        [m.name, "x".join(map(str, m.input_shape)), millions(m.params), millions(m.trainable_params)]
        + [millions(m.macs), millions(m.flops), millions(m.paper_params), millions(m.paper_macs)]
        + [fmt(m.size_mb(t)) for t in targets]
        for m in family
    ]
    print(markdown_table(headers, rows))
    print("\nMACs: multiply-adds, the FaceNet paper's 'FLOPS' column; FLOPs: 2 per multiply-add plus the rest.")
    print("\n## Model files\n")
    if not files:
        print(f"none: {note}")
        return
    print(
        markdown_table(
            ["file", "target", "MB", "params M (card)", "FLOPs M (card)", "architecture"],
            [
                [Path(f.path).name, f.target, fmt(f.size_bytes / MB, 3), millions(f.parameters), millions(f.flops)]
                + [f.architecture]
                for f in files
            ],
        )
    )


def run(args: argparse.Namespace) -> int:
    names = args.family or (QUICK_FAMILY if args.quick else FAMILY)
    targets = args.targets or (QUICK_TARGETS if args.quick else TARGETS)
    machine = machine_info()
    print("# facenet-edge model family\n")
    print(machine_line(machine))
    files, note = model_files(args.model)
    family = measure_family(names, targets)
    print_tables(family, targets, files, note)
    results = {"family": [asdict(m) for m in family], "files": [asdict(f) for f in files], "files_note": note}
    config = {"family": list(names), "targets": list(targets), "calibration_samples": CALIBRATION_SAMPLES}
    path = write_json(args.out / "models.json", report("models", machine, config, results, []))
    print(f"\nwrote {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="models", description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--family", type=name_list(FAMILY), metavar="NAME,NAME", help=f"default: {','.join(FAMILY)}")
    parser.add_argument("--targets", type=name_list(TARGETS), metavar="T,T", help=f"default: {','.join(TARGETS)}")
    return run_script(parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
