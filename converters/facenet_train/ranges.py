"""int8 activation ranges: the calibrator's min/max, or each range narrowed to its MSE-optimal clip.

TFLite's calibrator records each activation tensor's minimum and maximum over the
representative faces, and int8 spreads its 256 steps over that range, so the rarest
extreme value (one position of one face) sets the step for every face. ``mse`` narrows
each range to the clip that minimises the tensor's expected squared error over the same
faces (rounding error of the values kept inside, plus the distance clipped off the values
outside), from a histogram of what the float model computes; the standard remedy for
min/max calibration (PyTorch's HistogramObserver and NVIDIA's pytorch-quantization MSE calibrator
do the same). Measured on two trained models (docs/model.md, "int8 ranges"): 18–22 % less
error energy (1 − cosine to the float model on held-out training faces).

Only the activations are narrowed: the model's input (pixels, whose range is exact) and
output (``L2_NORMALIZATION``'s fixed 1/128 scale) keep theirs. A ReLU output keeps its
lower end at 0; a signed tensor shrinks both ends by the same factor.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from ai_edge_litert.interpreter import Interpreter, OpResolverType

from .tflite_graph import activation_ranges, with_activation_ranges

RANGES = ("mse", "minmax")
DEFAULT_RANGES = "mse"
BINS = 2048
# Candidate clips, as fractions of the calibrated range: 1.0 keeps min/max.
CLIP_FRACTIONS = np.linspace(0.2, 1.0, 81)


@dataclass
class Histogram:
    """Values of one tensor over the calibration faces in ``BINS`` bins over the calibrated
    range, exact zeros left out: int8 represents zero exactly at any scale, so a ReLU's zeros
    add no error whatever the clip."""

    low: float
    high: float
    counts: np.ndarray = field(default_factory=lambda: np.zeros(BINS, np.int64))

    def add(self, values: np.ndarray) -> None:
        values = values[values != 0]
        width = (self.high - self.low) / BINS
        index = np.clip(((values - self.low) / width).astype(np.int64), 0, BINS - 1)
        self.counts += np.bincount(index, minlength=BINS)

    def mse_range(self) -> tuple[float, float]:
        """The (low, high) among ``CLIP_FRACTIONS`` of the calibrated range with the least
        expected squared error: step² / 12 for each value inside, its distance to the clip
        squared for each value outside."""
        centres = self.low + (np.arange(BINS) + 0.5) * (self.high - self.low) / BINS
        best, best_error = (self.low, self.high), np.inf
        for fraction in CLIP_FRACTIONS:
            low = self.low * fraction if self.low < 0 else self.low
            high = self.high * fraction if self.high > 0 else self.high
            step = (high - low) / 255
            clipped = np.clip(centres, low, high)
            error = float(np.sum(self.counts * ((centres - clipped) ** 2 + step * step / 12)))
            if error < best_error:
                best, best_error = (low, high), error
        return best


def narrowed_ranges(calibrated: bytes, inputs: np.ndarray) -> bytes:
    """The calibrated model (``conversion.calibrate``) with every activation range but the
    input's and output's narrowed to its MSE-optimal clip over ``inputs`` (normalised faces,
    (N, H, W, 3), the calibration set)."""
    calibrated_ranges = activation_ranges(calibrated)
    # Builtin kernels only: a delegate fuses ops and leaves their inner tensors unreadable.
    interpreter = Interpreter(model_content=calibrated, experimental_preserve_all_tensors=True,
                              experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    interpreter.allocate_tensors()
    (model_input,) = interpreter.get_input_details()
    io = {model_input["index"], *(o["index"] for o in interpreter.get_output_details())}
    histograms = {i: Histogram(lo, hi) for i, (lo, hi) in calibrated_ranges.items() if i not in io and hi > lo}
    for face in inputs:
        interpreter.set_tensor(model_input["index"], face[None].astype(np.float32))
        interpreter.invoke()
        for index, histogram in histograms.items():
            histogram.add(interpreter.get_tensor(index).ravel())
    return with_activation_ranges(calibrated, {i: h.mse_range() for i, h in histograms.items()})
