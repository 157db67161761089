"""Reading a ``.tflite`` flatbuffer: its ops with their tensors, and named metadata buffers.

The converter, the float-op check and the Edge TPU check all need the op list with each
tensor's type, shape and quantization, plus a few builtin options (fused activations,
dilation). The interpreter exposes only part of that (``_get_ops_details`` has no options
and is private), so the flatbuffer is read directly with the schema bindings that ship
with ai-edge-litert (also present wherever the runtime is installed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import flatbuffers
import numpy as np
from ai_edge_litert import schema_py_generated as schema

FILE_IDENTIFIER = b"TFL3"
FLOAT_TYPES = frozenset({"float32", "float16", "float64", "bfloat16"})

_OP_NAMES = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
_TYPE_NAMES = {v: k.lower() for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
ACTIVATION_NAMES = {v: k for k, v in vars(schema.ActivationFunctionType).items() if not k.startswith("_")}


class GraphError(ValueError):
    """The bytes are not a TFLite model this module can read."""


@dataclass(frozen=True)
class TensorInfo:
    index: int
    name: str
    dtype: str  # "int8", "float32", ... (TFLite TensorType, lower case)
    shape: tuple[int, ...]
    shape_signature: tuple[int, ...]  # -1 marks a dynamic dimension
    scales: tuple[float, ...] = ()
    zero_points: tuple[int, ...] = ()
    # Constant tensors (weights, axes) carry their bytes; activations carry None.
    data: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_TYPES

    @property
    def is_constant(self) -> bool:
        return self.data is not None

    def values(self) -> np.ndarray:
        """A constant tensor's values (e.g. the axes of MEAN)."""
        if self.data is None:
            raise GraphError(f"tensor {self.index} ({self.name}) is not a constant")
        return self.data.view(np.dtype(self.dtype)).reshape(self.shape)


@dataclass(frozen=True)
class OpInfo:
    index: int  # execution order in the main subgraph
    name: str  # builtin name ("CONV_2D") or the custom op's code
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    options: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def tensors(self) -> tuple[TensorInfo, ...]:
        return self.inputs + self.outputs

    @property
    def float_tensors(self) -> tuple[TensorInfo, ...]:
        return tuple(t for t in self.tensors if t.is_float)

    def describe(self) -> str:
        return f"#{self.index} {self.name}"


@dataclass(frozen=True)
class ModelGraph:
    ops: tuple[OpInfo, ...]
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    metadata_names: tuple[str, ...]

    def float_ops(self) -> list[OpInfo]:
        """Ops that read or write a float tensor: in a full-integer model, these run in
        float on the CPU (typically DEQUANTIZE -> OP -> QUANTIZE around an op that has no
        int8 kernel)."""
        return [op for op in self.ops if op.float_tensors]


def _root(model: bytes) -> schema.Model:
    if len(model) < 8 or model[4:8] != FILE_IDENTIFIER:
        raise GraphError("not a TFLite flatbuffer (file identifier TFL3 missing)")
    return schema.Model.GetRootAs(model, 0)


def _tensor(model: schema.ModelT, subgraph: schema.SubGraphT, index: int) -> TensorInfo:
    t = subgraph.tensors[index]
    q = t.quantization
    buffer = model.buffers[t.buffer] if t.buffer < len(model.buffers) else None
    data = buffer.data if buffer is not None and buffer.data is not None and len(buffer.data) else None
    shape = tuple(int(v) for v in (t.shape if t.shape is not None else ()))
    signature = tuple(int(v) for v in t.shapeSignature) if t.shapeSignature is not None else shape
    return TensorInfo(
        index=index,
        name=(t.name or b"").decode("utf-8", "replace"),
        dtype=_TYPE_NAMES.get(t.type, f"type{t.type}"),
        shape=shape,
        shape_signature=signature,
        scales=tuple(float(s) for s in (q.scale if q is not None and q.scale is not None else ())),
        zero_points=tuple(int(z) for z in (q.zeroPoint if q is not None and q.zeroPoint is not None else ())),
        data=data,
    )


def _op_name(model: schema.ModelT, opcode_index: int) -> str:
    code = model.operatorCodes[opcode_index]
    # Codes above 127 live in builtinCode; older files only fill deprecatedBuiltinCode.
    builtin = max(code.builtinCode, code.deprecatedBuiltinCode)
    if builtin == schema.BuiltinOperator.CUSTOM:
        return (code.customCode or b"CUSTOM").decode("utf-8", "replace")
    return _OP_NAMES.get(builtin, f"BUILTIN_{builtin}")


def read_graph(model: bytes) -> ModelGraph:
    """The main subgraph's ops in execution order, with their tensors and options."""
    root = _root(model)
    obj = schema.ModelT.InitFromObj(root)
    if not obj.subgraphs:
        raise GraphError("model has no subgraph")
    sub = obj.subgraphs[0]
    ops = []
    for i, op in enumerate(sub.operators or ()):
        ins = tuple(_tensor(obj, sub, int(j)) for j in (op.inputs if op.inputs is not None else ()) if j >= 0)
        outs = tuple(_tensor(obj, sub, int(j)) for j in (op.outputs if op.outputs is not None else ()))
        options = dict(vars(op.builtinOptions)) if op.builtinOptions is not None else {}
        ops.append(OpInfo(i, _op_name(obj, op.opcodeIndex), ins, outs, options))
    return ModelGraph(
        ops=tuple(ops),
        inputs=tuple(_tensor(obj, sub, int(j)) for j in sub.inputs),
        outputs=tuple(_tensor(obj, sub, int(j)) for j in sub.outputs),
        metadata_names=tuple(m.name.decode("utf-8", "replace") for m in (obj.metadata or ()) if m.name),
    )


def read_metadata(model: bytes, name: str) -> bytes | None:
    """The bytes of the metadata entry ``name``, or None when the model has none."""
    root = _root(model)
    for i in range(root.MetadataLength()):
        entry = root.Metadata(i)
        if entry.Name() is not None and entry.Name().decode("utf-8", "replace") == name:
            return root.Buffers(entry.Buffer()).DataAsNumpy().tobytes()
    return None


def embed_metadata(model: bytes, name: str, data: bytes) -> bytes:
    """A copy of the model with ``data`` stored as metadata entry ``name`` (replacing an
    entry of that name). The interpreter ignores metadata it does not know, so the graph
    and its outputs are unchanged; this is how TFLite Support's MetadataPopulator stores
    its own metadata (object API, re-packed)."""
    obj = schema.ModelT.InitFromObj(_root(model))
    payload = np.frombuffer(data, dtype=np.uint8)
    existing = [m for m in (obj.metadata or []) if m.name is not None and m.name.decode() == name]
    if existing:
        obj.buffers[existing[0].buffer].data = payload
    else:
        buffer = schema.BufferT()
        buffer.data = payload
        obj.buffers.append(buffer)
        entry = schema.MetadataT()
        entry.name = name.encode()
        entry.buffer = len(obj.buffers) - 1
        obj.metadata = [*(obj.metadata or []), entry]
    return _pack(obj, len(model) + len(data))


def activation_ranges(model: bytes) -> dict[int, tuple[float, float]]:
    """Each main-subgraph tensor's recorded (min, max), by tensor index: what TFLite's
    calibrator writes into a calibrated float model, before it is quantized."""
    obj = schema.ModelT.InitFromObj(_root(model))
    ranges = {}
    for i, tensor in enumerate(obj.subgraphs[0].tensors):
        q = tensor.quantization
        if q is not None and q.min is not None and q.max is not None and len(q.min) == len(q.max) == 1:
            ranges[i] = (float(q.min[0]), float(q.max[0]))
    return ranges


def with_activation_ranges(model: bytes, ranges: dict[int, tuple[float, float]]) -> bytes:
    """A copy of a calibrated model with the recorded (min, max) of the tensors in ``ranges`` replaced."""
    obj = schema.ModelT.InitFromObj(_root(model))
    tensors = obj.subgraphs[0].tensors
    for i, (low, high) in ranges.items():
        tensors[i].quantization.min = np.array([low], np.float32)
        tensors[i].quantization.max = np.array([high], np.float32)
    return _pack(obj, len(model))


def _pack(obj: schema.ModelT, size: int) -> bytes:
    """The model object as a .tflite file; ``size``: about how many bytes it will take."""
    builder = flatbuffers.Builder(size + 1024)
    builder.Finish(obj.Pack(builder), file_identifier=FILE_IDENTIFIER)
    return bytes(builder.Output())
