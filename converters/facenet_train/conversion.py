"""Keras model -> TFLite model: the conversion targets, their checks, and the model file with its card.

Targets:

- ``float32``: the reference; any CPU.
- ``float16``: weights stored as float16 (half the file), computed in float32 on the CPU.
- ``int8``: full-integer: per-channel int8 weights, int8 activations, int8 input and
  output, calibrated on aligned faces preprocessed exactly like the runtime does. The
  fast one on a Raspberry Pi CPU and the only one the Coral Edge TPU runs. Made in two
  steps, so the activation ranges can be narrowed in between (``ranges``): TFLite's
  calibrator records each tensor's min/max (``calibrate``), then its MLIR quantizer turns
  the calibrated model into the int8 one (``quantize``), as ``TFLiteConverter.convert``
  does in one call.

Dynamic-range quantization (int8 weights, float activations) is refused: tflite-runtime
2.14 (that package's last release, still what many Pi setups install) cannot load those
models (a TF 2.21 dynamic-range model asks for FULLY_CONNECTED version 12, which 2.14 does
not have; the float32, float16 and int8 models made here load and run in it).

Every model has a fixed batch of 1: the Edge TPU needs static shapes, and with a dynamic
batch Keras' Flatten converts to SHAPE/STRIDED_SLICE/PACK/RESHAPE instead of folding
away. The runtime still feeds larger batches (it resizes the input tensor).

With TF 2.21 and Keras 3, ``TFLiteConverter.from_keras_model`` works (it exports a
SavedModel internally). ``from_concrete_functions`` on a Keras 3 model does not: the
variables stay resource variables (VAR_HANDLE/READ_VARIABLE ops) and int8 calibration
fails in READ_VARIABLE. A fixed batch is therefore set by calling the model on a new
``keras.Input(batch_shape=(1, h, w, 3))``, not by a concrete function's signature.

TensorFlow is imported only where a model is converted: ``TARGETS`` and the card helpers
load without it (the benchmarks use them).
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from facenet_edge.card import ModelCard, card_path_for

from .faces import FaceSet
from .ranges import DEFAULT_RANGES, RANGES, narrowed_ranges
from .tflite_graph import embed_metadata, read_graph, read_metadata

TARGETS = ("float32", "float16", "int8")
DYNAMIC_RANGE_NAMES = ("dynamic", "dynamic-range", "dynamic_range", "drq", "hybrid")
DYNAMIC_RANGE_REFUSAL = (
    "dynamic-range quantization is not produced: tflite-runtime 2.14 (that package's last release, "
    "still installed on many Raspberry Pis) cannot load such models (their FULLY_CONNECTED op "
    "version is too new for it); use --to int8 with --calibration (full integer) or --to float16"
)
CARD_METADATA_NAME = "facenet_edge_card"


class ConversionError(RuntimeError):
    """The model cannot be converted as asked (bad target, float ops left in an int8 model, ...)."""


def with_batch_one(model):
    """The same model (shared weights) with a static batch of 1 (see the module docstring)."""
    import keras

    inputs = keras.Input(batch_shape=(1, *model.input_shape[1:]), name="image")
    return keras.Model(inputs, model(inputs), name=model.name)


def make_converter(model, target: str, calibration: np.ndarray | None = None):
    """A configured ``TFLiteConverter`` for a batch-1 Keras model. ``calibration``: the
    representative set for int8, already normalised, shape (N, H, W, 3)."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if target == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif target == "int8":
        if calibration is None or not len(calibration):
            raise ConversionError(
                "int8 needs a representative set: pass --calibration (a crop cache or a folder of aligned faces); "
                + DYNAMIC_RANGE_REFUSAL
            )
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([sample[None]] for sample in calibration)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
        # Per-channel weights are the default (_experimental_disable_per_channel is False).
    elif target != "float32":
        raise ConversionError(f"unknown target {target!r}: choose {', '.join(TARGETS)}")
    return converter


def run_converter(converter) -> bytes:
    # Keras' SavedModel export prints its endpoint listing to stdout: noise here.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        # Raised for every int8-input conversion: the input scale comes from calibration.
        warnings.filterwarnings("ignore", "Statistics for quantized inputs")
        return converter.convert()


def check_full_integer(model: bytes) -> None:
    """Refuse an "int8" model in which some op still computes in float.

    With ``supported_ops=[TFLITE_BUILTINS_INT8]`` TF 2.21 does not fail on an op that has
    no int8 kernel: it wraps it in DEQUANTIZE/QUANTIZE and leaves it float (seen with
    SIN), which is slow on a Pi and splits the graph on the Edge TPU."""
    bad = read_graph(model).float_ops()
    if bad:
        detail = "; ".join(
            f"{op.describe()} ({', '.join(f'{t.name or t.index}: {t.dtype}' for t in op.float_tensors)})" for op in bad
        )
        names = sorted({op.name for op in bad} - {"QUANTIZE", "DEQUANTIZE"}) or sorted({op.name for op in bad})
        raise ConversionError(
            f"int8 model is not full-integer: op(s) {', '.join(names)} run in float; float tensors at {detail}"
        )


def calibrate(model, calibration: np.ndarray | None, ranges: str = DEFAULT_RANGES) -> bytes:
    """The batch-1 Keras model as a float TFLite model carrying each tensor's int8 range:
    the calibrator's min/max over ``calibration`` (normalised faces), narrowed with
    ``ranges="mse"`` (see ``ranges``)."""
    if ranges not in RANGES:
        raise ConversionError(f"unknown activation ranges {ranges!r}: choose {', '.join(RANGES)}")
    converter = make_converter(model, "int8", calibration)
    converter._experimental_calibrate_only = True  # what QuantizationDebugger uses to get the same model
    calibrated = run_converter(converter)
    return narrowed_ranges(calibrated, calibration) if ranges == "mse" else calibrated


def quantize(calibrated: bytes, debug: bool = False) -> bytes:
    """The full-integer model (int8 input and output) from a ``calibrate``d one, checked to
    be full-integer. ``debug``: with QuantizationDebugger's NumericVerify ops instead (the
    float result of each quantized op kept beside it), for ``verify.layer_errors``."""
    import tensorflow as tf
    from tensorflow.lite.python import convert  # the quantizer TFLiteConverter and QuantizationDebugger call

    tflite = convert.mlir_quantize(calibrated, input_data_type=tf.int8, output_data_type=tf.int8,
                                   enable_numeric_verify=debug)
    if not debug:
        check_full_integer(tflite)
    return tflite


def convert_model(model, target: str, calibration: np.ndarray | None = None, ranges: str = DEFAULT_RANGES) -> bytes:
    """Convert a batch-1 Keras model; int8 models are checked to be full-integer."""
    if target in DYNAMIC_RANGE_NAMES:
        raise ConversionError(DYNAMIC_RANGE_REFUSAL)
    if target == "int8":
        return quantize(calibrate(model, calibration, ranges))
    return run_converter(make_converter(model, target, calibration))


def quantization_params(model: bytes, target: str, calibration: FaceSet | None,
                        ranges: str = DEFAULT_RANGES) -> dict[str, Any]:
    """The card's ``quantization`` entry: what the target is and the I/O tensors' parameters."""
    graph = read_graph(model)

    def io(tensor) -> dict[str, Any]:
        entry: dict[str, Any] = {"dtype": tensor.dtype}
        if tensor.scales:
            entry.update(scale=tensor.scales[0], zero_point=tensor.zero_points[0])
        return entry

    params: dict[str, Any] = {"target": target, "input": io(graph.inputs[0]), "output": io(graph.outputs[0])}
    if target == "int8":
        params["weights"] = "int8, per channel"
        params["activations"] = "int8"
        params["activation_ranges"] = ranges
        if calibration is not None:
            params["calibration"] = {
                "faces": len(calibration),
                "identities": calibration.identity_count,
                "source": calibration.source,
            }
    elif target == "float16":
        params["weights"] = "float16"
        params["activations"] = "float32"
    return params


def save_model(path: Path, model: bytes, card: ModelCard, embed_card: bool = True) -> tuple[bytes, ModelCard]:
    """Write ``path`` and its card beside it. With ``embed_card`` the card JSON is also
    stored in the model as metadata ``facenet_edge_card``. The card records the final
    file size, which embedding changes, so the two are settled together."""
    final, final_card = model, replace(card, size_bytes=len(model))
    for _ in range(8):
        if not embed_card:
            break
        final = embed_metadata(model, CARD_METADATA_NAME, card_json(final_card).encode())
        if final_card.size_bytes == len(final):
            break
        final_card = replace(final_card, size_bytes=len(final))
    else:
        raise ConversionError(f"could not settle the size of {path} with its embedded card")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(final)
    final_card.save(card_path_for(path))
    return final, final_card


def card_json(card: ModelCard) -> str:
    """The card as ``ModelCard.save`` writes it."""
    return json.dumps(card.to_dict(), indent=2, sort_keys=True) + "\n"


def embedded_card(model: bytes) -> ModelCard | None:
    """The card stored in a model's metadata, if any."""
    raw = read_metadata(model, CARD_METADATA_NAME)
    return None if raw is None else ModelCard.from_dict(json.loads(raw))
