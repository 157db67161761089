"""Edge TPU readiness of an int8 model: a static op check and, when installed, the compiler.

The static check encodes Coral's supported-operation table
(https://coral.ai/docs/edgetpu/models-intro/#supported-operations) and its model
requirements: int8/uint8 tensors only, sizes fixed at compile time, tensors of at most 3
dimensions or only the innermost 3 larger than 1 (so batch 1). It is a prediction: the
compiler is the authority and may still refuse an op "due to some unspecified limitation".

The compiler maps one contiguous Edge TPU segment: from the first op it cannot map, that
op and every op after it run on the CPU, even supported ones. This module follows the
execution order to predict that (a graph with parallel branches may fare slightly better).
A QUANTIZE reading the graph input and a DEQUANTIZE writing the graph output are the
exception: they run on the CPU without cutting the segment.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .tflite_graph import ACTIVATION_NAMES, ModelGraph, OpInfo, TensorInfo, read_graph

COMPILER = "edgetpu_compiler"
NOT_INSTALLED = (
    "edgetpu_compiler not installed: it is only distributed for x86-64 Debian from Coral's apt "
    "repository (packages.cloud.google.com), unreachable from this machine; the op check above "
    "is a prediction, not the compiler's verdict"
)

# Ops the Edge TPU runs with no constraint beyond the global ones (int8, static, rank).
UNCONSTRAINED = frozenset(
    {
        "ADD", "SUB", "MUL", "MAXIMUM", "MINIMUM", "SQUARED_DIFFERENCE", "RSQRT",
        "LOGISTIC", "TANH", "RELU", "RELU6", "RELU_N1_TO_1", "L2_NORMALIZATION",
        "QUANTIZE", "RESHAPE", "EXPAND_DIMS", "SQUEEZE", "SLICE", "SPACE_TO_DEPTH",
        "TRANSPOSE", "TRANSPOSE_CONV", "UNIDIRECTIONAL_SEQUENCE_LSTM", "LSTM",
        "RESIZE_BILINEAR", "RESIZE_NEAREST_NEIGHBOR",
    }
)  # fmt: skip
# Ops whose constraints are checked by a function below.
CONSTRAINED = frozenset(
    {
        "CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "AVERAGE_POOL_2D", "MAX_POOL_2D",
        "CONCATENATION", "MEAN", "SUM", "REDUCE_MAX", "REDUCE_MIN", "PACK", "SPLIT", "PAD",
        "PRELU", "SOFTMAX", "STRIDED_SLICE",
    }
)  # fmt: skip
SUPPORTED_OPS = UNCONSTRAINED | CONSTRAINED
INTEGER_TYPES = frozenset({"int8", "uint8"})
# Constants that are not activations: biases, axes, shapes, paddings.
CONSTANT_TYPES = INTEGER_TYPES | {"int32", "int64"}
SOFTMAX_MAX_ELEMENTS = 16000


@dataclass(frozen=True)
class OpVerdict:
    index: int
    name: str
    on_edgetpu: bool
    reason: str = ""  # why it runs on the CPU; empty when mapped


@dataclass(frozen=True)
class EdgeTpuReport:
    """The static prediction for every op, in execution order."""

    ops: tuple[OpVerdict, ...]

    @property
    def fallback(self) -> list[OpVerdict]:
        return [v for v in self.ops if not v.on_edgetpu]

    @property
    def mapped_count(self) -> int:
        return sum(v.on_edgetpu for v in self.ops)

    def lines(self) -> list[str]:
        head = f"Edge TPU op check: {self.mapped_count}/{len(self.ops)} ops would map to the Edge TPU"
        if not self.fallback:
            return [head + " (all)"]
        return [head + "; on the CPU:"] + [f"  #{v.index} {v.name}: {v.reason}" for v in self.fallback]

    def to_dict(self) -> dict:
        return {
            "mapped": self.mapped_count,
            "total": len(self.ops),
            "fallback": [asdict(v) for v in self.fallback],
        }


def _innermost_only(shape: tuple[int, ...], keep: int) -> bool:
    """True when only the ``keep`` innermost dimensions may exceed 1."""
    return all(d == 1 for d in shape[: max(len(shape) - keep, 0)])


def _activation_is_none(op: OpInfo) -> str:
    act = op.options.get("fusedActivationFunction", 0)
    return "" if act == 0 else f"fused activation {ACTIVATION_NAMES.get(act, act)} not supported"


def _axes(op: OpInfo, tensor: TensorInfo) -> list[int] | None:
    if not tensor.is_constant:
        return None
    rank = len(op.inputs[0].shape)
    return [int(a) % rank for a in np.atleast_1d(tensor.values())]


def _constraint(op: OpInfo) -> str:
    """The op-specific constraint this op breaks, or ''."""
    name, opts = op.name, op.options
    if name in ("CONV_2D", "DEPTHWISE_CONV_2D"):
        if opts.get("dilationWFactor", 1) != opts.get("dilationHFactor", 1):
            return "dilation differs between x and y"
        return ""
    if name == "FULLY_CONNECTED":
        if opts.get("weightsFormat", 0) != 0:
            return "only the default weights format is supported"
        if not _innermost_only(op.outputs[0].shape, 1):
            return f"output must be one-dimensional, is {list(op.outputs[0].shape)}"
        return ""
    if name in ("AVERAGE_POOL_2D", "MAX_POOL_2D"):
        return _activation_is_none(op)
    if name == "CONCATENATION":
        reason = _activation_is_none(op)
        constants = [t for t in op.inputs if t.is_constant]
        if constants and (len(op.inputs) != 2 or np.any(constants[0].values())):
            reason = reason or "a constant input is allowed only as the all-zero second of two inputs"
        return reason
    if name in ("MEAN", "SUM", "REDUCE_MAX", "REDUCE_MIN"):
        axes = _axes(op, op.inputs[1])
        if axes is None:
            return "reduction axes are not a constant"
        if 0 in axes:
            return "reduction over the batch dimension"
        rank = len(op.inputs[0].shape)
        if name == "MEAN" and rank - 1 in axes and op.inputs[0].shape[-1] % 4:
            return "channel reduction needs a channel count that is a multiple of 4"
        return ""
    if name == "PACK":
        return "packing along the batch dimension" if opts.get("axis", 0) == 0 else ""
    if name == "SPLIT":
        axes = _axes(op, op.inputs[0])
        if axes is None:
            return "split axis is not a constant"
        return "splitting along the batch dimension" if axes == [0] else ""
    if name == "PAD":
        paddings = op.inputs[1]
        if not paddings.is_constant:
            return "paddings are not a constant"
        return "padding in the batch dimension" if np.any(paddings.values()[0]) else ""
    if name == "PRELU":
        alpha = op.inputs[1]
        if not alpha.is_constant:
            return "alpha is not a compile-time constant"
        return "" if _innermost_only(alpha.shape, 1) else "alpha must be per-channel (1-D)"
    if name == "SOFTMAX":
        shape = op.inputs[0].shape
        if not _innermost_only(shape, 1):
            return "input must be one-dimensional"
        return "" if int(np.prod(shape)) <= SOFTMAX_MAX_ELEMENTS else f"more than {SOFTMAX_MAX_ELEMENTS} elements"
    if name == "STRIDED_SLICE":
        strides = op.inputs[3]
        if not strides.is_constant or np.any(strides.values() != 1):
            return "strides must all be 1"
        if opts.get("ellipsisMask", 0) or opts.get("newAxisMask", 0):
            return "ellipsis or new-axis masks are not supported"
        return ""
    return ""


def op_problem(op: OpInfo) -> str:
    """Why the Edge TPU cannot run this op, or '' when it can (by Coral's table)."""
    if op.name not in SUPPORTED_OPS:
        return "not in the Edge TPU's supported-op list"
    for t in op.tensors:
        allowed = CONSTANT_TYPES if t.is_constant else INTEGER_TYPES
        if t.dtype not in allowed:
            return f"tensor {t.name or t.index} is {t.dtype} (only int8/uint8)"
        if not t.is_constant and any(d < 0 for d in t.shape_signature):
            return f"tensor {t.name or t.index} has a dynamic shape {list(t.shape_signature)}"
        if not t.is_constant and not _innermost_only(t.shape, 3):
            return f"tensor {t.name or t.index} has shape {list(t.shape)}: only the 3 innermost dimensions may exceed 1"
    return _constraint(op)


def _is_boundary(op: OpInfo, graph: ModelGraph) -> bool:
    """Float<->int conversion at the graph's edge: on the CPU, but it does not cut the segment."""
    inputs = {t.index for t in graph.inputs}
    outputs = {t.index for t in graph.outputs}
    if op.name == "QUANTIZE":
        return op.inputs[0].index in inputs
    if op.name == "DEQUANTIZE":
        return op.outputs[0].index in outputs
    return False


def check_graph(graph: ModelGraph) -> EdgeTpuReport:
    verdicts: list[OpVerdict] = []
    cut: OpVerdict | None = None  # the first op that ends the Edge TPU segment
    for op in graph.ops:
        problem = op_problem(op)
        if cut is not None:
            reason = problem or f"after #{cut.index} {cut.name}: the compiler maps one segment only"
            verdicts.append(OpVerdict(op.index, op.name, False, reason))
        elif problem and _is_boundary(op, graph):
            verdicts.append(OpVerdict(op.index, op.name, False, f"{problem} (graph boundary)"))
        elif problem:
            cut = OpVerdict(op.index, op.name, False, problem)
            verdicts.append(cut)
        else:
            verdicts.append(OpVerdict(op.index, op.name, True))
    return EdgeTpuReport(tuple(verdicts))


def check_model(model: bytes) -> EdgeTpuReport:
    """Predict, op by op, what the Edge TPU compiler would map."""
    return check_graph(read_graph(model))


@dataclass(frozen=True)
class CompilerResult:
    """What ``edgetpu_compiler`` did, parsed from its output (or why it did not run)."""

    status: str  # "compiled", "failed" or "skipped"
    message: str
    version: str | None = None
    total_ops: int | None = None
    mapped_ops: int | None = None
    cpu_ops: int | None = None
    output_model: str | None = None
    operations: list[dict] = field(default_factory=list)  # the compiler's per-op table

    def to_dict(self) -> dict:
        return asdict(self)


_OP_ROW = re.compile(r"^([A-Z][A-Z0-9_]*)\s+(\d+)\s+(\S.*?)\s*$")


def parse_compiler_output(text: str) -> dict:
    """Version, op counts and the per-op table from ``edgetpu_compiler -s`` output.

    When every op is mapped the compiler prints only "Total number of operations"; the
    "run on Edge TPU / CPU" lines appear only when some op falls back, so the mapped count
    is then summed from the table ("Mapped to Edge TPU" rows)."""

    def number(label: str) -> int | None:
        match = re.search(rf"{label}:\s*(\d+)", text)
        return int(match.group(1)) if match else None

    version = re.search(r"Edge TPU Compiler version\s+(\S+)", text)
    table = [
        {"op": m.group(1), "count": int(m.group(2)), "status": m.group(3)}
        for m in (_OP_ROW.match(line) for line in text.splitlines())
        if m
    ]
    total = number("Total number of operations")
    mapped = number("Number of operations that will run on Edge TPU")
    if mapped is None and table:
        mapped = sum(row["count"] for row in table if row["status"] == "Mapped to Edge TPU")
    cpu = number("Number of operations that will run on CPU")
    if cpu is None and total is not None and mapped is not None:
        cpu = total - mapped
    output = re.search(r"Output model:\s*(\S+)", text)
    return {
        "version": version.group(1) if version else None,
        "total_ops": total,
        "mapped_ops": mapped,
        "cpu_ops": cpu,
        "output_model": output.group(1) if output else None,
        "operations": table,
    }


def compile_model(model_path: str | Path, out_dir: str | Path | None = None, timeout_s: int = 600) -> CompilerResult:
    """Run ``edgetpu_compiler -s`` when it is on PATH; otherwise a "skipped" result saying why."""
    compiler = shutil.which(COMPILER)
    if compiler is None:
        return CompilerResult(status="skipped", message=NOT_INSTALLED)
    model_path = Path(model_path)
    out_dir = Path(out_dir) if out_dir is not None else model_path.parent
    proc = subprocess.run(
        [compiler, "-s", "-o", str(out_dir), str(model_path)],
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    log = proc.stdout + proc.stderr
    parsed = parse_compiler_output(log)
    if proc.returncode != 0:
        return CompilerResult(status="failed", message=f"{COMPILER} exited {proc.returncode}: {log[-2000:]}", **parsed)
    if parsed["output_model"] and not Path(parsed["output_model"]).is_absolute():
        parsed["output_model"] = str(out_dir / Path(parsed["output_model"]).name)
    message = f"{COMPILER} {parsed['version']}: {parsed['mapped_ops']}/{parsed['total_ops']} ops mapped to the Edge TPU"
    return CompilerResult(status="compiled", message=message, **parsed)
