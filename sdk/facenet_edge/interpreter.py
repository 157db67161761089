"""Loading a ``.tflite`` model with clear errors, thread count, Edge TPU delegate and batching.

The interpreter comes from ``ai_edge_litert`` (the current TFLite runtime wheel), else the
older ``tflite_runtime``, and from ``tensorflow.lite`` only when neither is installed, so
the runtime never pays for importing TensorFlow on a device.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import ModelError
from .files import open_regular

# Where models shipped in the wheel live (the vendored detector, a default embedder if any).
MODELS_DIR = Path(__file__).resolve().with_name("models")

# FlatBuffers file identifier of TFLite models, stored at bytes 4..8.
TFLITE_IDENTIFIER = b"TFL3"
EDGETPU_SUFFIX = "_edgetpu.tflite"
EDGETPU_LIBRARY = "libedgetpu.so.1"
_SUPPORTED_IO_DTYPES = (np.float32, np.int8, np.uint8)
# The TFLite runtime prints "INFO: Created TensorFlow Lite XNNPACK delegate for CPU." from
# native code whenever a model loads (not through Python's logging, and no setting of
# ai-edge-litert 2.3 turns it off): noise on every command, even with --json. Native
# stderr is pointed at /dev/null while a model loads unless this variable is "1"
# (``facenet-edge --verbose`` sets it).
NATIVE_LOG_ENV = "FACENET_EDGE_NATIVE_LOG"
# Far above any model meant for a small device; refuses a device file or a sparse giant.
MAX_MODEL_BYTES = 1024 * 1024 * 1024


def _runtime() -> tuple[type, Callable[..., Any]]:
    """(Interpreter class, load_delegate function) of the lightest TFLite runtime installed."""
    try:
        from ai_edge_litert.interpreter import Interpreter, load_delegate
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter, load_delegate
        except ImportError:
            try:
                from tensorflow import lite
            except ImportError:
                raise ModelError(
                    "no TFLite runtime is installed: pip install ai-edge-litert"
                ) from None
            return lite.Interpreter, lite.experimental.load_delegate
    return Interpreter, load_delegate


@dataclass(frozen=True)
class TensorInfo:
    """Name, shape, dtype and (per-tensor) quantization of one model input or output."""

    name: str
    index: int
    shape: tuple[int, ...]
    dtype: type
    scale: float
    zero_point: int

    @classmethod
    def from_details(cls, details: dict[str, Any]) -> TensorInfo:
        scale, zero_point = details["quantization"]
        return cls(
            name=details["name"],
            index=int(details["index"]),
            shape=tuple(int(v) for v in details["shape"]),
            dtype=np.dtype(details["dtype"]).type,
            scale=float(scale),
            zero_point=int(zero_point),
        )

    @property
    def quantized(self) -> bool:
        return self.dtype in (np.int8, np.uint8) and self.scale > 0

    def quantize(self, values: np.ndarray) -> np.ndarray:
        """Real values -> this tensor's dtype (rounded and saturated when quantized)."""
        if not self.quantized:
            return np.asarray(values, dtype=self.dtype)
        info = np.iinfo(self.dtype)
        q = np.round(np.asarray(values, dtype=np.float32) / self.scale) + self.zero_point
        return np.clip(q, info.min, info.max).astype(self.dtype)

    def dequantize(self, values: np.ndarray) -> np.ndarray:
        """This tensor's values -> float32 real values."""
        if not self.quantized:
            return np.asarray(values, dtype=np.float32)
        return ((values.astype(np.float32) - self.zero_point) * self.scale).astype(np.float32)


@contextmanager
def _native_log_silenced() -> Iterator[None]:
    """Native writes to stderr (file descriptor 2) go to /dev/null inside the block.
    Errors still reach the user: the runtime raises them as exceptions, reported after
    the block. (Another thread writing to stderr in these milliseconds is silenced too.)"""
    if os.environ.get(NATIVE_LOG_ENV) == "1":
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def check_tflite_file(path: str | Path) -> Path:
    """Refuse a missing, empty or non-TFLite file before the interpreter sees it: the
    native loader may crash outright on garbage instead of raising."""
    path = Path(path)
    with open_regular(path, "model", MAX_MODEL_BYTES, ModelError) as f:
        head = f.read(8)
    if not head:
        raise ModelError(f"model file is empty: {path}")
    if len(head) < 8 or head[4:8] != TFLITE_IDENTIFIER:
        raise ModelError(f"{path} is not a TFLite model (no 'TFL3' identifier at bytes 4..8)")
    return path


def uses_edgetpu(path: str | Path, delegate: str | None) -> bool:
    """Edge TPU compiled models are recognised by the compiler's file name suffix."""
    return delegate == "edgetpu" or Path(path).name.endswith(EDGETPU_SUFFIX)


class TFLiteModel:
    """A loaded interpreter with its input/output descriptions.

    ``run(batch)`` resizes the batch dimension only when it changes (re-allocation costs
    milliseconds). Not thread-safe: use one instance per thread.
    """

    def __init__(self, interpreter: Any, path: Path, delegated: bool) -> None:
        self._interpreter = interpreter
        self.path = path
        self.delegated = delegated
        self.inputs = [TensorInfo.from_details(d) for d in interpreter.get_input_details()]
        self.outputs = [TensorInfo.from_details(d) for d in interpreter.get_output_details()]
        self._batch = self.inputs[0].shape[0] if self.inputs and self.inputs[0].shape else 1

    @property
    def input(self) -> TensorInfo:
        return self.inputs[0]

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        """Run the (single-input) model on ``batch`` already in the input tensor's dtype;
        returns every output, in the order of ``outputs``."""
        if self._interpreter is None:
            raise ModelError(f"model {self.path} has been closed")
        batch = np.ascontiguousarray(batch, dtype=self.input.dtype)
        n = batch.shape[0]
        if n == 0:
            raise ValueError(f"empty batch for {self.path}")
        if self.delegated and n != self._batch:
            return self._run_fixed_batch(batch)
        if n != self._batch:
            self._interpreter.resize_tensor_input(self.input.index, [n, *self.input.shape[1:]])
            self._interpreter.allocate_tensors()
            self._batch = n
        self._interpreter.set_tensor(self.input.index, batch)
        self._interpreter.invoke()
        return [self._interpreter.get_tensor(o.index) for o in self.outputs]

    def _run_fixed_batch(self, batch: np.ndarray) -> list[np.ndarray]:
        """Compiled Edge TPU graphs have fixed shapes: feed them chunks of their own batch
        size, padding the last one by repeating its final item."""
        n, size = batch.shape[0], self._batch
        parts = []
        for start in range(0, n, size):
            chunk = batch[start : start + size]
            used = len(chunk)
            if used < size:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], size - used, axis=0)])
            parts.append([out[:used] for out in self.run(chunk)])
        return [np.concatenate(outs) for outs in zip(*parts)]

    def close(self) -> None:
        """Free the interpreter (and the delegate's device) now rather than at GC time."""
        self._interpreter = None

    def __enter__(self) -> TFLiteModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_embedding_io(model: TFLiteModel) -> None:
    """An embedding model maps N x H x W x 3 images to N x D vectors."""
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ModelError(
            f"{model.path}: an embedding model has one input and one output, "
            f"this one has {len(model.inputs)} and {len(model.outputs)}"
        )
    inp, out = model.input, model.outputs[0]
    if len(inp.shape) != 4 or inp.shape[3] != 3:
        raise ModelError(f"{model.path}: input must be N x H x W x 3, got {list(inp.shape)}")
    if len(out.shape) != 2:
        raise ModelError(f"{model.path}: output must be N x D, got {list(out.shape)}")
    for tensor in (inp, out):
        if tensor.dtype not in _SUPPORTED_IO_DTYPES:
            raise ModelError(
                f"{model.path}: tensor {tensor.name!r} has unsupported dtype {np.dtype(tensor.dtype).name}"
            )


def load_interpreter(
    path: str | Path,
    num_threads: int | None = None,
    delegate: str | None = None,
    *,
    embedding: bool = True,
) -> TFLiteModel:
    """Load a TFLite model.

    ``num_threads``: CPU threads for the interpreter (None: the runtime's default).
    ``delegate``: None, or ``"edgetpu"`` (implied by a ``*_edgetpu.tflite`` file name).
    ``embedding``: also check the model maps N x H x W x 3 images to N x D vectors
    (the face detector, which has other outputs, passes False).
    """
    path = check_tflite_file(path)
    if delegate not in (None, "edgetpu"):
        raise ModelError(f"unknown delegate {delegate!r} for {path}: use None or 'edgetpu'")
    if num_threads is not None and (not isinstance(num_threads, int) or num_threads < 1):
        raise ModelError(f"num_threads must be a positive integer, got {num_threads!r}")
    interpreter_cls, load_delegate = _runtime()
    delegates = []
    if uses_edgetpu(path, delegate):
        try:
            # Probe with ctypes first: a failed load_delegate leaves a half-built Delegate
            # whose destructor raises (ai-edge-litert 2.3), noise on top of our error.
            ctypes.CDLL(EDGETPU_LIBRARY)
            delegates.append(load_delegate(EDGETPU_LIBRARY))
        except (ValueError, OSError) as exc:
            raise ModelError(
                f"{path} needs the Edge TPU runtime ({EDGETPU_LIBRARY}), which could not be "
                f"loaded ({exc}); install libedgetpu1-std and plug in the Coral, "
                "or use the CPU model"
            ) from None
    try:
        with _native_log_silenced():
            interpreter = interpreter_cls(
                model_path=str(path), num_threads=num_threads, experimental_delegates=delegates or None
            )
            interpreter.allocate_tensors()
    except (ValueError, RuntimeError) as exc:
        raise ModelError(f"cannot load {path} (truncated or corrupt TFLite file?): {exc}") from None
    model = TFLiteModel(interpreter, path, delegated=bool(delegates))
    if embedding:
        check_embedding_io(model)
    return model
