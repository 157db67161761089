"""``facenet-train convert``: a trained Keras model -> a TFLite model with its model card.

Loads the checkpoint, converts it (``conversion``: the targets and how each is made),
verifies the TFLite model against the Keras one (``verify``), scores it on LFW through the
runtime path for the card's thresholds (``evaluation``), checks it for the Edge TPU
(``edgetpu``), and writes the model, its card and the verification report.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
from facenet_edge.align import FILLS
from facenet_edge.card import ModelCard, Thresholds, card_path_for
from facenet_edge.detect import DEFAULT_DETECTOR
from facenet_edge.embed import normalise
from facenet_edge.fpir import DistributionError

from . import edgetpu, verify
from .checkpoint import load_keras_model, run_config, teacher_mean_of
from .conversion import (
    DYNAMIC_RANGE_NAMES,
    DYNAMIC_RANGE_REFUSAL,
    TARGETS,
    ConversionError,
    calibrate,
    convert_model,
    quantization_params,
    quantize,
    save_model,
    with_batch_one,
)
from .evaluation import evaluate_runtime_path
from .faces import FaceSet, load_faces
from .openset_lfw import impostor_distribution
from .flops import count_flops
from .models import fold_read_out
from .preprocess import CropOptions, build_lfw_cache
from .ranges import DEFAULT_RANGES, RANGES
from .teacher import TEACHERS

DEFAULT_CALIBRATION_FACES = 300
DEFAULT_VERIFY_FACES = 200
# Crop-cache source keys (facenet_train.data) -> the dataset each comes from.
DATASET_NAMES = {
    "celeba_aligned": "CelebA (aligned)",
    "celeba_wild": "CelebA (in the wild)",
    "pins": "Pins Face Recognition",
    "glint24": "Glint360K (24-identity sample)",
    "utkface": "UTKFace",
    "extyaleb": "Extended Yale B",
}


def terms(datasets: list[str], teacher: str | None) -> str:
    """The card's terms line: what the model was made from, and what that allows. Every
    dataset the project trains on, and every teacher it distils from, is licensed for
    non-commercial research only, so every model trained on them inherits that restriction."""
    names = ", ".join(d.split(" [")[0] for d in datasets) or "unrecorded datasets"
    made_from = f"trained on {names}" + (f", distilled from {TEACHERS[teacher].terms}" if teacher else "")
    return f"non-commercial research only: {made_from}; these are licensed for non-commercial research"


def cost_of(model) -> tuple[int | None, dict[str, Any]]:
    """(FLOPs, notes) from ``flops.count_flops``; FLOPs None when a layer has no counting rule."""
    try:
        report = count_flops(model)
    except ValueError as exc:
        return None, {"flops_note": f"not counted: {exc}"}
    return report.flops, {"macs": report.macs}


def training_data(run_config: dict[str, Any] | None) -> list[str]:
    """The datasets a run trained on, from its config (``data.sources``; empty there means
    every source of its crop cache). Empty when unknown."""
    if not run_config:
        return []
    data = run_config.get("data", {})
    sources = list(data.get("sources") or [])
    manifest = Path(data.get("cache", "")) / "manifest.json"
    if not sources and manifest.is_file():
        sources = sorted(json.loads(manifest.read_text()).get("sources", {}))
    return [dataset_label(s) for s in sources]


def dataset_label(key: str) -> str:
    """``celeba_aligned`` -> ``CelebA (aligned) [celeba_aligned]``; other names as given."""
    return f"{DATASET_NAMES[key]} [{key}]" if key in DATASET_NAMES else key


def default_output(checkpoint: Path, name: str, target: str) -> Path:
    """``NAME_TARGET.tflite`` in the run folder, or beside the ``.keras`` file."""
    folder = checkpoint if checkpoint.is_dir() else checkpoint.parent
    return folder / f"{name}_{target}.tflite"


def parse_target(value: str) -> str:
    if value.lower() in DYNAMIC_RANGE_NAMES:
        raise argparse.ArgumentTypeError(DYNAMIC_RANGE_REFUSAL)
    if value not in TARGETS:
        raise argparse.ArgumentTypeError(f"unknown target {value!r}: choose {', '.join(TARGETS)}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path,
                        help="a .keras file or a training run folder (its model.keras, else its latest checkpoint)")
    parser.add_argument("--to", dest="target", required=True, type=parse_target, metavar="|".join(TARGETS),
                        help="float32, float16 or int8 (full integer)")
    parser.add_argument("--edgetpu", action="store_true",
                        help="int8 only: check every op against the Edge TPU's list and run edgetpu_compiler "
                             "if installed")
    parser.add_argument("--calibration", type=Path,
                        help="aligned faces (a crop cache or a folder of aligned crops): the int8 representative set, "
                             "and the faces the TFLite model is verified on")
    parser.add_argument("--calibration-faces", type=int, default=DEFAULT_CALIBRATION_FACES,
                        help="faces for int8 calibration, spread across identities "
                             f"(default {DEFAULT_CALIBRATION_FACES})")
    parser.add_argument("--ranges", choices=RANGES, default=DEFAULT_RANGES,
                        help="int8 activation ranges: the calibrator's min/max, or narrowed to each tensor's "
                             f"MSE-optimal clip over the calibration faces (default {DEFAULT_RANGES})")
    parser.add_argument("--verify-faces", type=int, default=DEFAULT_VERIFY_FACES,
                        help=f"other faces to compare Keras and TFLite embeddings on (default {DEFAULT_VERIFY_FACES})")
    parser.add_argument("--lfw", type=Path, help="LFW folder (pairs.txt): 10-fold accuracy and thresholds for the card")
    parser.add_argument("--lfw-cache", type=Path,
                        help="its `facenet-train preprocess-lfw` crop cache (default: crop the pair images now)")
    parser.add_argument("--workers", type=int, default=2, help="processes for LFW crops made now (default 2)")
    parser.add_argument("--out", type=Path, help="output .tflite (default: NAME_TARGET.tflite beside the checkpoint)")
    parser.add_argument("--name", help="model name for the card (default: the run folder's or checkpoint's name)")
    parser.add_argument("--version", default="1", help="model version for the card (default 1)")
    parser.add_argument("--compatibility-group",
                        help="shared by models trained to give comparable embeddings (harmonic)")
    parser.add_argument("--training-data", help="datasets the model was trained on, comma-separated keys of "
                                                "`datasets.py` or names (default: from the run folder's config.json)")
    parser.add_argument("--flip-test", action="store_true",
                        help="card: embed each crop and its mirror and average them (doubles the embed time)")
    parser.add_argument("--fill", choices=list(FILLS), default=ModelCard.fill,
                        help="card: how the aligner fills a crop past the photo's edge (as the model was trained)")
    parser.add_argument("--teacher", choices=list(TEACHERS),
                        help="the teacher the model was distilled from (named in the card's terms)")
    parser.add_argument("--mean", type=float, default=ModelCard.mean, help="input normalisation: (pixel - mean) / std")
    parser.add_argument("--std", type=float, default=ModelCard.std)
    parser.add_argument("--no-embed-card", dest="embed_card", action="store_false",
                        help="do not store the card inside the .tflite as metadata")
    parser.add_argument("--seed", type=int, default=0, help="face selection seed")


def run(args: argparse.Namespace) -> int:
    """The ``convert`` command: convert, check, verify, write model + card + report."""
    try:
        return _run(args)
    except ConversionError as exc:
        print(f"convert: {exc}", file=sys.stderr)
        return 2


def _read_faces(args: argparse.Namespace, size: tuple[int, int]) -> tuple[FaceSet | None, FaceSet | None]:
    """(calibration, verification) faces from ``--calibration``: disjoint, both spread
    across identities; half each when the source has fewer than asked for."""
    if args.calibration is None:
        return None, None
    wanted = args.verify_faces + (args.calibration_faces if args.target == "int8" else 0)
    try:
        faces = load_faces(args.calibration, size, wanted, args.seed)
    except (ValueError, FileNotFoundError) as exc:
        raise ConversionError(f"--calibration {args.calibration}: {exc}") from None
    n_cal = 0
    if args.target == "int8":
        n_cal = args.calibration_faces if len(faces) >= wanted else len(faces) // 2
    calibration = faces.take(np.arange(n_cal)) if n_cal else None
    verification = faces.take(np.arange(n_cal, len(faces)))
    print(f"faces: {len(faces)} from {faces.source} ({faces.identity_count} identities); "
          f"{n_cal} for calibration, {len(verification)} for verification")
    return calibration, verification


def _crop_lfw(lfw_dir: Path, out: Path, size: int, workers: int) -> None:
    """Detect and align the LFW pair images now (as ``facenet-train preprocess-lfw`` does)."""
    print(f"cropping the LFW pair images of {lfw_dir} (pass --lfw-cache to reuse a preprocess-lfw cache) ...")
    build_lfw_cache(lfw_dir, out, CropOptions(crop_size=size), workers=workers)


def _base_card(args: argparse.Namespace, keras_model) -> ModelCard:
    """The card before conversion: identity, preprocessing, cost, training data, terms."""
    height, width = (int(d) for d in keras_model.input_shape[1:3])
    flops, notes = cost_of(keras_model)
    datasets = ([dataset_label(d.strip()) for d in args.training_data.split(",")] if args.training_data
                else training_data(run_config(args.checkpoint)))
    if not datasets:
        notes["training_data_note"] = "unknown: no run config.json beside the checkpoint and no --training-data"
    mean = teacher_mean_of(args.checkpoint)
    if mean is not None:  # a teacher's descriptor d compares with this model's embeddings as unit(d - mean)
        notes["teacher_mean"] = [round(float(v), 6) for v in mean]
    return ModelCard(
        name=args.name or (args.checkpoint.name if args.checkpoint.is_dir() else args.checkpoint.stem),
        version=args.version,
        architecture=keras_model.name,
        input_height=height,
        input_width=width,
        embedding_size=int(keras_model.output_shape[-1]),
        mean=args.mean,
        std=args.std,
        compatibility_group=args.compatibility_group,
        flip_test=args.flip_test,
        fill=args.fill,
        flops=flops,
        parameters=int(keras_model.count_params()),
        training_data=datasets,
        terms=terms(datasets, args.teacher),
        extra={"converter": {"tensorflow": tf.__version__, "target": args.target, "checkpoint": str(args.checkpoint)},
               **notes},
    )


def _run(args: argparse.Namespace) -> int:
    if args.edgetpu and args.target != "int8":
        raise ConversionError("--edgetpu needs --to int8: the Edge TPU runs only full-integer models")
    if not args.checkpoint.exists():
        raise ConversionError(f"checkpoint not found: {args.checkpoint}")
    try:
        keras_model = load_keras_model(args.checkpoint)
    except (FileNotFoundError, ValueError) as exc:
        raise ConversionError(f"cannot load {args.checkpoint}: {exc}") from None
    model = with_batch_one(fold_read_out(keras_model))
    card = _base_card(args, keras_model)
    out = args.out or default_output(args.checkpoint, card.name, args.target)
    height, width = card.input_size
    calibration, verification = _read_faces(args, (height, width))

    print(f"converting {args.checkpoint} to {args.target} ...")
    calibration_inputs = normalise(calibration.crops.astype(np.float32), card) if calibration is not None else None
    calibrated = calibrate(model, calibration_inputs, args.ranges) if args.target == "int8" else None
    tflite = quantize(calibrated) if calibrated is not None else convert_model(model, args.target)
    card = replace(card, quantization=quantization_params(tflite, args.target, calibration, args.ranges))
    # Written now so the runtime's Embedder can load it for verification; written again
    # below with what verification and the Edge TPU tools add to the card.
    tflite, card = save_model(out, tflite, card, args.embed_card)

    with contextlib.ExitStack() as stack:
        lfw_cache = args.lfw_cache
        if args.lfw is not None and lfw_cache is None:
            lfw_cache = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lfw-crops-")))
            _crop_lfw(args.lfw, lfw_cache, height, args.workers)
        try:
            result = verify.verify_model(
                out, card, keras_model, verification, lfw=args.lfw, lfw_cache=lfw_cache,
                debug_model=(lambda: quantize(calibrated, debug=True)) if calibrated is not None else None,
            )  # fmt: skip
        except (ValueError, FileNotFoundError) as exc:  # an unusable LFW folder or cache
            raise ConversionError(f"verification of {out}: {exc}") from None
    print(verify.format_report(result))
    if result.lfw is not None:
        # What users get: full LFW images through the runtime's default detector and
        # aligner; its thresholds are the ones the runtime applies.
        runtime = evaluate_runtime_path(out, args.lfw, DEFAULT_DETECTOR)
        print(f"  LFW through the runtime path ({DEFAULT_DETECTOR}): {runtime.result.summary()}")
        card = replace(card, thresholds=Thresholds(far_1e3=runtime.result.threshold_at_far,
                                                   best_accuracy=runtime.result.best_threshold),
                       lfw={**result.lfw.card_entry(), "runtime_path": runtime.card_entry()})
        # Open-set thresholds per target FPIR (facenet_edge.fpir) from LFW's calibration half.
        try:
            impostor = impostor_distribution(out, args.lfw, detector=DEFAULT_DETECTOR)
        except DistributionError as exc:  # an LFW stand-in too small to measure it
            print(f"  no impostor distribution for open-set thresholds: {exc}")
        else:
            card = replace(card, extra={**card.extra, "impostor": impostor.to_dict()})
            print(f"  impostor distances: {impostor.pairs} pairs of the LFW calibration half")
    else:
        card = replace(card, extra={**card.extra, "thresholds_note": verify.NO_LFW_NOTE})
        print(f"thresholds: {verify.NO_LFW_NOTE}")

    compiled = None
    if args.edgetpu:
        check = edgetpu.check_model(tflite)
        print("\n".join(check.lines()))
        compiled = edgetpu.compile_model(out)
        print(compiled.message)
        card = replace(card, extra={**card.extra, "edgetpu_check": check.to_dict(),
                                    "edgetpu_compiler": compiled.to_dict()})

    tflite, card = save_model(out, tflite, card, args.embed_card)
    verify.save_report(result, verify.report_path_for(out))
    print(f"wrote {out} ({card.size_bytes} bytes), {card_path_for(out)}, {verify.report_path_for(out)}")
    if compiled is not None and compiled.status == "compiled" and compiled.output_model:
        compiled_path = Path(compiled.output_model)
        replace(card, size_bytes=compiled_path.stat().st_size).save(card_path_for(compiled_path))
        print(f"wrote {compiled_path} and its card")
    return 1 if compiled is not None and compiled.status == "failed" else 0
