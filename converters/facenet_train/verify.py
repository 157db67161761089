"""Does the TFLite model compute what the Keras model computes?

- Cosine similarity between Keras and TFLite embeddings of real aligned faces (median,
  5th percentile, worst). TFLite embeddings come from the runtime's own ``Embedder``, so
  preprocessing, quantization and batching are the device's.
- With LFW: 10-fold accuracy of both, side by side, and the TFLite model's thresholds
  (the card's, since the TFLite model is what runs).
- For int8, targets: median cosine >= 0.99 and LFW accuracy drop <= 0.3 points. When one
  is missed, ``tf.lite.experimental.QuantizationDebugger`` gives each quantized layer's
  error; the worst layers (RMSE / scale: error in units of the layer's quantization
  step) are listed.

The report is printed and saved as JSON beside the model (``model.verify.json``).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from facenet_edge.card import ModelCard
from facenet_edge.embed import l2_normalize, normalise

from .evaluation import LfwCropPairs, keras_embeddings, tflite_embeddings
from .faces import FaceSet

INT8_MEDIAN_COSINE_TARGET = 0.99
LFW_DROP_TARGET_POINTS = 0.3
WORST_LAYERS = 10
DEBUG_FACES = 64  # the layer-wise debugger runs float and int8 models per face: keep it short
NO_LFW_NOTE = "thresholds not calibrated: LFW was not evaluated (convert with --lfw)"


@dataclass(frozen=True)
class CosineStats:
    """Cosine similarity between two embeddings of each face."""

    faces: int
    median: float
    p5: float
    worst: float
    mean: float

    @classmethod
    def between(cls, a: np.ndarray, b: np.ndarray) -> CosineStats:
        cosine = np.sum(l2_normalize(a) * l2_normalize(b), axis=1).astype(np.float64)
        return cls(
            faces=len(cosine),
            median=float(np.median(cosine)),
            p5=float(np.percentile(cosine, 5)),
            worst=float(cosine.min()),
            mean=float(cosine.mean()),
        )


@dataclass(frozen=True)
class LayerError:
    """One quantized tensor's error against the float model (QuantizationDebugger)."""

    op: str
    tensor: str
    rmse_over_scale: float  # RMS error in quantization steps; ~0.29 is pure rounding
    max_abs_error: float
    scale: float


@dataclass(frozen=True)
class LfwComparison:
    """LFW 10-fold results of the Keras and the TFLite model (accuracy in [0, 1])."""

    keras: dict[str, Any]
    tflite: dict[str, Any]
    thresholds: dict[str, float | None]  # the TFLite model's: far_1e3, best_accuracy
    pairs: int

    @property
    def drop_points(self) -> float:
        return 100.0 * (self.keras["accuracy_mean"] - self.tflite["accuracy_mean"])

    def card_entry(self) -> dict[str, Any]:
        """The card's ``lfw`` field: the TFLite model's own scores."""
        return {**self.tflite, "pairs": self.pairs, "keras_accuracy_mean": self.keras["accuracy_mean"]}


@dataclass(frozen=True)
class VerifyReport:
    model: str
    target: str
    cosine: CosineStats | None
    lfw: LfwComparison | None = None
    worst_layers: list[LayerError] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def misses(self) -> list[str]:
        """The int8 targets this model misses (none are set for float models)."""
        if self.target != "int8":
            return []
        missed = []
        if self.cosine is not None and self.cosine.median < INT8_MEDIAN_COSINE_TARGET:
            missed.append(f"median cosine {self.cosine.median:.4f} < {INT8_MEDIAN_COSINE_TARGET}")
        if self.lfw is not None and self.lfw.drop_points > LFW_DROP_TARGET_POINTS:
            missed.append(f"LFW drop {self.lfw.drop_points:.2f} points > {LFW_DROP_TARGET_POINTS}")
        return missed

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["targets"] = {
            "int8_median_cosine": INT8_MEDIAN_COSINE_TARGET,
            "lfw_drop_points": LFW_DROP_TARGET_POINTS,
        }
        out["misses"] = self.misses
        if self.lfw is not None:
            out["lfw"]["drop_points"] = self.lfw.drop_points
        return out


def layer_errors(debug_model: bytes, inputs: np.ndarray, count: int = WORST_LAYERS) -> list[LayerError]:
    """The ``count`` quantized tensors with the largest RMSE / scale, from the int8 model in
    debug mode (``conversion.quantize(..., debug=True)``) run on ``inputs``."""
    import tensorflow as tf

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        # The debugger runs tf.lite.Interpreter (deprecated in favour of ai-edge-litert) and
        # converts with int8 inputs: both warn on every run, and Keras' export prints its
        # endpoints; none of it matters here.
        warnings.simplefilter("ignore", UserWarning)
        debugger = tf.lite.experimental.QuantizationDebugger(
            quant_debug_model_content=debug_model, debug_dataset=lambda: ([x[None]] for x in inputs)
        )
        debugger.run()
    dump = io.StringIO()
    debugger.layer_statistics_dump(dump)
    rows = []
    for row in csv.DictReader(io.StringIO(dump.getvalue())):
        scale = float(row["scale"])
        if scale > 0:
            rmse = float(np.sqrt(float(row["mean_squared_error"])))
            error = LayerError(row["op_name"], row["tensor_name"], rmse / scale, float(row["max_abs_error"]), scale)
            rows.append(error)
    return sorted(rows, key=lambda r: r.rmse_over_scale, reverse=True)[:count]


def verify_model(
    model_path: Path,
    card: ModelCard,
    keras_model,
    faces: FaceSet | None,
    lfw: Path | None = None,
    lfw_cache: Path | None = None,
    debug_model: Callable[[], bytes] | None = None,
) -> VerifyReport:
    """Compare the TFLite model at ``model_path`` with ``keras_model`` (a float model with
    a free batch size) on ``faces`` and, with ``lfw`` (the LFW folder) and ``lfw_cache``
    (its ``preprocess-lfw`` crops), on LFW. ``debug_model``: makes the int8 model in debug
    mode, for the layer-wise errors when a target is missed."""
    target = card.quantization.get("target", "")
    notes = []
    cosine = None
    if faces is not None and len(faces):
        cosine = CosineStats.between(
            keras_embeddings(keras_model, faces.crops, card), tflite_embeddings(model_path, card, faces.crops)
        )
    else:
        notes.append("no faces given (--calibration): Keras/TFLite agreement not measured")
    comparison = None
    if lfw is not None:
        pairs = LfwCropPairs.load(lfw, lfw_cache, card.input_height)
        keras_result = pairs.evaluate(lambda crops: keras_embeddings(keras_model, crops, card))
        tflite_result = pairs.evaluate(lambda crops: tflite_embeddings(model_path, card, crops))
        comparison = LfwComparison(
            keras=keras_result.scores(),
            tflite=tflite_result.scores(),
            thresholds={"far_1e3": tflite_result.threshold_at_far, "best_accuracy": tflite_result.best_threshold},
            pairs=len(pairs.issame),
        )
    report = VerifyReport(str(model_path), target, cosine, comparison, notes=notes)
    if report.misses and debug_model is not None and faces is not None:
        worst = layer_errors(debug_model(), normalise(faces.crops[:DEBUG_FACES].astype(np.float32), card))
        report = VerifyReport(report.model, target, cosine, comparison, worst, notes)
    return report


def format_report(report: VerifyReport) -> str:
    lines = [f"verification of {report.model} ({report.target})"]
    c = report.cosine
    if c is not None:
        lines.append(
            f"  cosine(Keras, TFLite) over {c.faces} faces: median {c.median:.5f}, "
            f"5th percentile {c.p5:.5f}, worst {c.worst:.5f}"
        )
    if report.lfw is not None:
        k, t = report.lfw.keras, report.lfw.tflite
        lines.append(
            f"  LFW 10-fold accuracy ({report.lfw.pairs} pairs): Keras {100 * k['accuracy_mean']:.2f} "
            f"+- {100 * k['accuracy_std']:.2f} %, "
            f"TFLite {100 * t['accuracy_mean']:.2f} +- {100 * t['accuracy_std']:.2f} % "
            f"(drop {report.lfw.drop_points:.2f} points); VAL@FAR={t['far_target']:g}: Keras "
            f"{100 * k['val_mean']:.1f} %, TFLite {100 * t['val_mean']:.1f} %"
        )
    lines.extend(f"  note: {n}" for n in report.notes)
    if report.target == "int8":
        if report.misses:
            lines.append("  MISSED: " + "; ".join(report.misses))
        else:
            lines.append("  int8 targets met")
    if report.worst_layers:
        lines.append("  worst layers (RMSE / scale = error in quantization steps):")
        for layer in report.worst_layers:
            lines.append(
                f"    {layer.rmse_over_scale:8.3f}  {layer.op:<20} max |err| {layer.max_abs_error:.4g}  {layer.tensor}"
            )
    return "\n".join(lines)


def report_path_for(model_path: str | Path) -> Path:
    """``model.tflite`` -> ``model.verify.json``."""
    return Path(model_path).with_suffix(".verify.json")


def save_report(report: VerifyReport, path: str | Path) -> None:
    Path(path).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
