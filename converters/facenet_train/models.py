"""The FaceNet paper's Inception family, and MobileFaceNet, as Keras 3 functional models.

Every model is ``image -> trunk -> Dense(embedding_size) -> L2Normalize`` and uses only
layers that quantize to int8 and map on the Edge TPU: Conv2D or DepthwiseConv2D +
BatchNormalization (folded into the convolution at conversion) + ReLU, MaxPooling2D,
AveragePooling2D, Concatenate, Add, ZeroPadding2D, Dense, :class:`StaticFlatten` (one RESHAPE)
and :class:`L2Normalize`. Departures from the FaceNet paper, each because of that constraint:

- the paper's L2 pooling inside Inception blocks is average pooling here;
- there is no local response normalisation (batch normalisation follows every convolution).

All padding is ``"same"`` so every shape is static and blocks line up without cropping, except
in layouts with ``symmetric_padding`` (below). Where the paper gives no layer table (``nns1``,
``nns2``) the layout is our reading of its text; docs/models.md states it.

``mobilefacenet`` is Chen et al. 2018's layout as InsightFace trained it (depthwise-separable
inverted residuals, a global depthwise read-out instead of average pooling), with ReLU where
they use PReLU: an int8 PRELU op does not fuse into its convolution and took 3.65x the embed
time on a 2-core EPYC (docs/model.md). ``mobilefacenet_prelu`` is the same with PReLU, to hold
InsightFace's weights as they are (``facenet-train import-mobilefacenet``) as the frozen model
the ReLU one is distilled from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import keras
import numpy as np
import tensorflow as tf

DEFAULT_MODEL = "nn4_small2"


@keras.saving.register_keras_serializable(package="facenet_train")
class L2Normalize(keras.layers.Layer):
    """Scales each row to unit L2 norm.

    ``tf.math.l2_normalize`` converts to one TFLite ``L2_NORMALIZATION`` op, which has an int8
    kernel; Keras' ``UnitNormalization`` falls back to float ops and a ``Lambda`` layer does not
    reload from a ``.keras`` file.
    """

    def call(self, inputs):
        return tf.math.l2_normalize(inputs, axis=1)

    def compute_output_shape(self, input_shape):
        return input_shape


@keras.saving.register_keras_serializable(package="facenet_train")
class StaticFlatten(keras.layers.Layer):
    """Flattens all but the batch axis with a constant target shape.

    Keras' ``Flatten`` reads the batch size at run time, which converts to SHAPE, STRIDED_SLICE
    and PACK ops in front of the RESHAPE; the Edge TPU compiler leaves those, and every op after
    them, on the CPU. ``tf.reshape(x, [-1, n])`` converts to a single RESHAPE.
    """

    def call(self, inputs):
        return tf.reshape(inputs, [-1, math.prod(inputs.shape[1:])])

    def compute_output_shape(self, input_shape):
        return (input_shape[0], math.prod(input_shape[1:]))


@dataclass(frozen=True)
class Conv:
    """Conv2D (no bias) + BatchNormalization + ReLU.

    ``rank > 0``: the k×k convolution is factorized into a k×1 one with ``rank`` filters
    (``{name}_vertical``, linear) and a 1×k one (``name``): the same receptive field at a
    fraction of the multiply-adds, initialised from a trained k×k kernel by SVD
    (:mod:`facenet_train.factorize`).
    """

    name: str
    filters: int
    kernel: int
    stride: int = 1
    rank: int = 0


@dataclass(frozen=True)
class MaxPool:
    """3x3 max pooling between stages."""

    name: str
    size: int = 3
    stride: int = 2


@dataclass(frozen=True)
class Inception:
    """One Inception block, in the columns of the paper's Table 2.

    A zero width drops that branch (or, for ``pool_proj``, passes the pooled input through
    unprojected, as the paper's stride-2 blocks do). With ``stride=2`` the 3x3 and 5x5
    convolutions and the pooling are strided.
    """

    name: str
    n1x1: int
    n3x3_reduce: int
    n3x3: int
    n5x5_reduce: int
    n5x5: int
    pool: str  # "max" or "avg" (the paper's "L2")
    pool_proj: int
    stride: int = 1


@dataclass(frozen=True)
class Depthwise:
    """DepthwiseConv2D (no bias) + BatchNormalization + ReLU."""

    name: str
    kernel: int = 3
    stride: int = 1


@dataclass(frozen=True)
class Bottleneck:
    """MobileNetV2's inverted residual: a 1x1 convolution to ``expand`` channels
    (``{name}_conv_sep``), a 3x3 depthwise one (``{name}_conv_dw``, ``stride``), then a linear
    1x1 projection to ``filters`` (``{name}_conv_proj``); the input is added back
    (``{name}_add``) where the shapes allow (stride 1, as many channels in as out)."""

    name: str
    expand: int
    filters: int
    stride: int = 1


Stage = Conv | MaxPool | Inception | Depthwise | Bottleneck


@dataclass(frozen=True)
class PaperReference:
    """Reference figures for a model; ``None`` where the source gives none.

    ``macs`` is the paper's "FLOPS" column, which counts multiply-adds.
    """

    params: int | None
    macs: int | None
    source: str


@dataclass(frozen=True)
class ModelSpec:
    """A model layout: stages, then the top, then Dense(embedding) and L2 normalisation.

    ``fc_hidden == 0``: average pooling over the whole final map (NN2's top).
    ``fc_hidden > 0``: the final map is flattened into a fully connected ReLU layer of that width
    (NN1's top), which is where most of the parameters of nns1/nns2 sit.
    ``global_depthwise``: instead, a linear depthwise convolution over the whole final map, then
    batch normalisation (MobileFaceNet's "GDC"), which weighs each position of each channel.
    ``prelu``: PReLU layers (``{conv}_prelu``) where the others have ReLU (``{conv}_relu``).
    ``symmetric_padding``: strided convolutions pad (k - 1) / 2 on every side, as MXNet and
    PyTorch do, rather than TensorFlow's "same", which pads an even input's bottom and right
    only; imported weights expect it.
    """

    name: str
    input_shape: tuple[int, int, int]
    stages: tuple[Stage, ...]
    fc_hidden: int
    paper: PaperReference
    summary: str
    global_depthwise: bool = False
    symmetric_padding: bool = False
    prelu: bool = False  # PReLU (one slope per channel) after each convolution instead of ReLU


# NN2's stem, shared by nn2, nn4 and nn4_small2: conv 7x7/2, max pool, 1x1 then 3x3 conv, max pool.
_NN2_STEM: tuple[Stage, ...] = (
    Conv("conv1", 64, 7, 2),
    MaxPool("pool1"),
    Conv("conv2_reduce", 64, 1),
    Conv("conv2", 192, 3),
    MaxPool("pool2"),
)

# The paper's Table 2 (NN2), block by block.
_NN2_3 = (
    Inception("inception_3a", 64, 96, 128, 16, 32, "max", 32),
    Inception("inception_3b", 64, 96, 128, 32, 64, "avg", 64),
    Inception("inception_3c", 0, 128, 256, 32, 64, "max", 0, stride=2),
)
_NN2_4 = (
    Inception("inception_4a", 256, 96, 192, 32, 64, "avg", 128),
    Inception("inception_4b", 224, 112, 224, 32, 64, "avg", 128),
    Inception("inception_4c", 192, 128, 256, 32, 64, "avg", 128),
    Inception("inception_4d", 160, 144, 288, 32, 64, "avg", 128),
    Inception("inception_4e", 0, 160, 256, 64, 128, "max", 0, stride=2),
)

_NN4_SMALL2_BLOCKS = _NN2_3 + (
    _NN2_4[0],
    _NN2_4[-1],
    Inception("inception_5a", 256, 96, 384, 0, 0, "avg", 96),
    Inception("inception_5b", 256, 96, 384, 0, 0, "max", 96),
)

# MobileFaceNet (Chen et al. 2018, Table 1) with InsightFace's layer names: (t, c, n, s) =
# (2, 64, 5, 2), (4, 128, 1, 2), (2, 128, 6, 1), (4, 128, 1, 2), (2, 128, 2, 1).
_MOBILEFACENET: tuple[Stage, ...] = (
    Conv("conv_1", 64, 3, 2),
    Depthwise("conv_2_dw"),
    Bottleneck("dconv_23", 128, 64, 2),
    *(Bottleneck(f"res_3_block{i}", 128, 64) for i in range(4)),
    Bottleneck("dconv_34", 256, 128, 2),
    *(Bottleneck(f"res_4_block{i}", 256, 128) for i in range(6)),
    Bottleneck("dconv_45", 512, 128, 2),
    *(Bottleneck(f"res_5_block{i}", 256, 128) for i in range(2)),
    Conv("conv_6sep", 512, 1),
)

_MOBILEFACENET_SPEC = ModelSpec(
    "mobilefacenet",
    (112, 112, 3),
    _MOBILEFACENET,
    0,
    PaperReference(990_000, 221_000_000, "Chen et al. 2018, MobileFaceNets, Table 2 (0.99M, 221M MAdds)"),
    "MobileFaceNet (InsightFace's layout and names) with ReLU for PReLU",
    global_depthwise=True,
    symmetric_padding=True,
)

MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            "nn4_small2",
            (96, 96, 3),
            _NN2_STEM + _NN4_SMALL2_BLOCKS,
            0,
            PaperReference(3_733_968, None, "OpenFace nn4.small2.def.lua (Torch count; no FLOPs given)"),
            "OpenFace nn4.small2: NN4 without 4b-4d and with narrower 5a/5b",
        ),
        ModelSpec(
            "nn4_small2_sep",
            (128, 128, 3),
            # conv2 holds 30 % of nn4_small2's multiply-adds; factorized at rank 64 it costs
            # 44 % of that, so 128 px input counts about what 112 px does (int8 time does not
            # follow: docs/model.md, "Past 112 px").
            _NN2_STEM[:3] + (Conv("conv2", 192, 3, rank=64), _NN2_STEM[4]) + _NN4_SMALL2_BLOCKS,
            0,
            PaperReference(None, None, "ours: nn4_small2 with conv2 factorized into 3x1 (64) and 1x3"),
            "nn4_small2 at 128x128 with its 3x3 conv2 factorized into 3x1 (rank 64) and 1x3 convolutions",
        ),
        ModelSpec(
            "nn4_small2_wide",
            (96, 96, 3),
            # A capacity probe past the 4 MB int8 budget: 5a and 5b 1.5x as wide, the rest as
            # nn4_small2, so `facenet-train widen` continues a trained nn4_small2 in it.
            _NN2_STEM + _NN4_SMALL2_BLOCKS[:-2] + (
                Inception("inception_5a", 384, 144, 576, 0, 0, "avg", 144),
                Inception("inception_5b", 384, 144, 576, 0, 0, "max", 144),
            ),
            0,
            PaperReference(None, None, "ours: nn4_small2 with 5a and 5b 1.5x as wide"),
            "nn4_small2 with inception 5a and 5b 1.5x as wide (a capacity probe; past the 4 MB int8 budget)",
        ),
        ModelSpec(
            "nn4",
            (96, 96, 3),
            _NN2_STEM
            + _NN2_3
            + _NN2_4
            + (
                # "no 5x5 convolutions in the higher layers": read as 5a/5b, as OpenFace's nn4 does.
                Inception("inception_5a", 384, 192, 384, 0, 0, "avg", 128),
                Inception("inception_5b", 384, 192, 384, 0, 0, "max", 128),
            ),
            0,
            PaperReference(None, 285_000_000, "FaceNet paper, section 3.3 (no parameter count given)"),
            "FaceNet NN4: NN2 at 96x96 without 5x5 convolutions in 5a/5b",
        ),
        ModelSpec(
            "nns1",
            (165, 165, 3),
            (
                Conv("conv1", 32, 7, 2),
                MaxPool("pool1"),
                Conv("conv2_reduce", 32, 1),
                Conv("conv2", 96, 3),
                MaxPool("pool2"),
                Inception("inception_3a", 32, 48, 64, 8, 16, "max", 16),
                Inception("inception_3b", 32, 48, 64, 16, 32, "avg", 32),
                Inception("inception_3c", 0, 64, 128, 16, 32, "max", 0, stride=2),
                Inception("inception_4a", 128, 48, 96, 16, 32, "avg", 64),
                Inception("inception_4e", 0, 80, 128, 32, 64, "max", 0, stride=2),
                Inception("inception_5a", 192, 96, 192, 24, 64, "avg", 64),
                Inception("inception_5b", 192, 96, 192, 24, 64, "max", 64),
            ),
            1344,
            PaperReference(26_000_000, 220_000_000, "FaceNet paper, section 3.3 (no layer table)"),
            "FaceNet NNS1 'mini Inception', our reading: NN2 at half width without 4b-4d, NN1-style FC top",
        ),
        ModelSpec(
            "nns2",
            (140, 116, 3),
            (
                Conv("conv1", 16, 3, 2),
                MaxPool("pool1"),
                Conv("conv2", 32, 3),
                MaxPool("pool2"),
                Inception("inception_3a", 16, 24, 32, 4, 8, "max", 8),
                Inception("inception_3c", 0, 32, 64, 8, 16, "max", 0, stride=2),
                Inception("inception_4a", 64, 24, 48, 8, 16, "avg", 32),
                Inception("inception_4e", 0, 40, 64, 16, 32, "max", 0, stride=2),
                Inception("inception_5a", 96, 48, 96, 0, 0, "avg", 32),
            ),
            896,
            PaperReference(4_300_000, 20_000_000, "FaceNet paper, section 3.3 (no layer table)"),
            "FaceNet NNS2 'tiny Inception', our reading: NN2 at quarter width, shallower, NN1-style FC top",
        ),
        ModelSpec(
            "nn2",
            (224, 224, 3),
            _NN2_STEM
            + _NN2_3
            + _NN2_4
            + (
                Inception("inception_5a", 384, 192, 384, 48, 128, "avg", 128),
                Inception("inception_5b", 384, 192, 384, 48, 128, "max", 128),
            ),
            0,
            PaperReference(7_500_000, 1_600_000_000, "FaceNet paper, Table 2"),
            "FaceNet NN2: the paper's Table 2",
        ),
        _MOBILEFACENET_SPEC,
        replace(_MOBILEFACENET_SPEC, name="mobilefacenet_prelu", prelu=True,
                summary="MobileFaceNet as InsightFace trained it, PReLU included (slow in int8: a teacher)"),
    )
}


def build_model(
    name: str = DEFAULT_MODEL,
    embedding_size: int = 128,
    input_size: int = 0,
    folded_read_out: bool = False,
) -> keras.Model:
    """Builds model ``name`` (a key of :data:`MODELS`) with unit-norm ``embedding_size`` outputs.

    ``input_size``: the side of a square input in pixels instead of the model's native size
    (0). Models that average-pool their whole final map (the NN4 family) keep their
    variables at any size, so their weights load at another one. Input scaling is not part
    of the model; it is done by the caller's preprocessing. ``folded_read_out``: the global
    depthwise read-out with a bias instead of its batch normalisation (:func:`fold_read_out`).
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    spec = MODELS[name]
    inputs = keras.Input(input_shape(name, input_size), name="image")
    x = inputs
    symmetric, act = spec.symmetric_padding, _activation(spec)
    for stage in spec.stages:
        if isinstance(stage, Conv) and stage.rank:
            x = keras.layers.Conv2D(stage.rank, (stage.kernel, 1), (stage.stride, 1), padding="same",
                                    use_bias=False, name=f"{stage.name}_vertical")(x)
            x = _conv_bn_act(x, stage.name, stage.filters, (1, stage.kernel), (1, stage.stride))
        elif isinstance(stage, Conv):
            x = _conv_bn_act(x, stage.name, stage.filters, stage.kernel, stage.stride, symmetric, act)
        elif isinstance(stage, Depthwise):
            x = _conv_bn_act(x, stage.name, 0, stage.kernel, stage.stride, symmetric, act)
        elif isinstance(stage, Bottleneck):
            x = _bottleneck(x, stage, symmetric, act)
        elif isinstance(stage, MaxPool):
            x = keras.layers.MaxPooling2D(stage.size, stage.stride, padding="same", name=stage.name)(x)
        else:
            x = _inception(x, stage)
    if spec.global_depthwise:
        x = keras.layers.DepthwiseConv2D(tuple(x.shape[1:3]), use_bias=folded_read_out, name="gdc",
                                         depthwise_initializer=_depthwise_init(tuple(x.shape[1:3])))(x)
        if not folded_read_out:
            x = keras.layers.BatchNormalization(name="gdc_bn")(x)
        x = StaticFlatten(name="flatten")(x)
    elif spec.fc_hidden:
        x = StaticFlatten(name="flatten")(x)
        x = keras.layers.Dense(spec.fc_hidden, activation="relu", name="fc1")(x)
    else:
        # NN2's average pooling over the whole final map, as one AVERAGE_POOL_2D op.
        x = keras.layers.AveragePooling2D(tuple(x.shape[1:3]), name="avgpool")(x)
        x = StaticFlatten(name="flatten")(x)
    # The embedding stays float32 under a mixed-precision policy: bfloat16's 8-bit mantissa
    # would round distances at the scale of the triplet margin.
    x = keras.layers.Dense(embedding_size, name="embedding_dense", dtype="float32")(x)
    outputs = L2Normalize(name="embedding", dtype="float32")(x)
    return keras.Model(inputs, outputs, name=name)


def fold_read_out(model: keras.Model) -> keras.Model:
    """For conversion: ``model`` computing the same with the batch normalisation after its
    global depthwise read-out folded into that convolution (a per-channel scale of its
    kernel, and a bias). Left to the TFLite converter, it is folded into the Dense layer
    after it instead, so the int8 tensor between them holds the read-out before
    normalisation, where the channels it would amplify keep a step or two of resolution
    (measured on mobilefacenet: cosine 0.66 to the float embedding at that layer, docs/model.md).
    A model without such a read-out (or not of the registry) is returned as it is."""
    spec = MODELS.get(model.name)
    if spec is None or not spec.global_depthwise:
        return model
    folded = build_model(model.name, int(model.output_shape[-1]), input_size_of(model), folded_read_out=True)
    for layer in folded.layers:
        if layer.weights and layer.name != "gdc":
            layer.set_weights(model.get_layer(layer.name).get_weights())
    norm = model.get_layer("gdc_bn")
    gamma, beta, mean, variance = norm.get_weights()
    scale = gamma / np.sqrt(variance + norm.epsilon)
    kernel = model.get_layer("gdc").get_weights()[0]  # (h, w, channels, 1)
    # Cross-layer equalisation (Nagel et al. 2019) of the map the read-out weighs: its
    # channels' ranges differ up to 27-fold, so int8 left most of them a few steps. Each
    # channel c of the last convolution, after its normalisation about N(beta_c, gamma_c^2),
    # is divided by s_c (ReLU commutes with that) and the read-out's kernel for it multiplied
    # by s_c: the same function, every channel with the same range, and no cost to the
    # depthwise kernel, which int8 quantizes channel by channel.
    last = spec.stages[-1].name
    norm_last = model.get_layer(f"{last}_bn")
    g, b, m, v = norm_last.get_weights()
    spread = np.maximum(b + 3 * np.abs(g), 1e-3)
    s = spread / np.median(spread)
    folded.get_layer(f"{last}_bn").set_weights([g / s, b / s, m, v])
    folded.get_layer("gdc").set_weights([kernel * (scale * s)[None, None, :, None], beta - mean * scale])
    return folded


def stage_outputs(name: str) -> list[tuple[str, str]]:
    """(stage, the layer of :func:`build_model` whose output ends it) for each stage of model
    ``name``, then ``("head", "embedding")``: where a model can be cut stage by stage."""
    ends, act = [], _activation(MODELS[name])
    for stage in MODELS[name].stages:
        if isinstance(stage, Conv | Depthwise):
            ends.append((stage.name, f"{stage.name}_{act}"))
        elif isinstance(stage, Bottleneck):
            ends.append((stage.name, f"{stage.name}_add" if _residual(stage, None) else f"{stage.name}_conv_proj_bn"))
        elif isinstance(stage, MaxPool):
            ends.append((stage.name, stage.name))
        else:
            ends.append((stage.name, f"{stage.name}_concat"))
    return ends + [("head", "embedding")]


def input_shape(name: str, input_size: int = 0) -> tuple[int, int, int]:
    """(height, width, channels) that :func:`build_model` gives model ``name`` at ``input_size``."""
    return (input_size, input_size, 3) if input_size else MODELS[name].input_shape


def input_size_of(model: keras.Model) -> int:
    """The ``input_size`` that rebuilds ``model`` with :func:`build_model`: 0 at its native size."""
    shape = tuple(int(d) for d in model.input_shape[1:])
    return 0 if shape == MODELS[model.name].input_shape else shape[0]


def _activation(spec: ModelSpec) -> str:
    return "prelu" if spec.prelu else "relu"


def _conv_bn_act(x, name: str, filters: int, kernel: int | tuple[int, int] = 1,
                 stride: int | tuple[int, int] = 1, symmetric: bool = False, activation: str = "relu"):
    """``filters == 0``: a depthwise convolution; ``activation``: "relu", "prelu" or "" (linear)."""
    padding = "same"
    if symmetric and stride != 1 and kernel != 1:
        x = keras.layers.ZeroPadding2D(kernel // 2, name=f"{name}_pad")(x)
        padding = "valid"
    # No conv bias: batch normalisation's shift replaces it, and both fold into one bias at conversion.
    if filters:
        x = keras.layers.Conv2D(filters, kernel, stride, padding=padding, use_bias=False, name=name)(x)
    else:
        x = keras.layers.DepthwiseConv2D(kernel, stride, padding=padding, use_bias=False, name=name,
                                         depthwise_initializer=_depthwise_init(kernel))(x)
    x = keras.layers.BatchNormalization(name=f"{name}_bn")(x)
    if activation == "prelu":
        return keras.layers.PReLU(shared_axes=[1, 2], name=f"{name}_prelu")(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x) if activation else x


def _depthwise_init(kernel: int | tuple[int, int]) -> keras.initializers.Initializer:
    """He initialisation for a depthwise kernel. Keras counts its fan-in as window x channels,
    though each output sees one channel's window: with its default, activations shrink about
    30-fold at each of MobileFaceNet's 17 depthwise layers and vanish before the embedding."""
    window = math.prod(kernel) if isinstance(kernel, tuple) else kernel * kernel
    return keras.initializers.RandomNormal(stddev=math.sqrt(2.0 / window))


def _residual(block: Bottleneck, channels_in: int | None) -> bool:
    """Whether ``block`` adds its input back; ``None``: as in :data:`MODELS`, where every
    stride-1 bottleneck keeps its width."""
    return block.stride == 1 and channels_in in (None, block.filters)


def _bottleneck(x, block: Bottleneck, symmetric: bool, activation: str):
    name = block.name
    y = _conv_bn_act(x, f"{name}_conv_sep", block.expand, activation=activation)
    y = _conv_bn_act(y, f"{name}_conv_dw", 0, 3, block.stride, symmetric, activation)
    y = _conv_bn_act(y, f"{name}_conv_proj", block.filters, activation="")
    return keras.layers.Add(name=f"{name}_add")([x, y]) if _residual(block, x.shape[-1]) else y


def _inception(x, block: Inception):
    name, stride = block.name, block.stride
    branches = []
    if block.n1x1:
        branches.append(_conv_bn_act(x, f"{name}_1x1", block.n1x1))
    if block.n3x3:
        y = _conv_bn_act(x, f"{name}_3x3_reduce", block.n3x3_reduce)
        branches.append(_conv_bn_act(y, f"{name}_3x3", block.n3x3, 3, stride))
    if block.n5x5:
        y = _conv_bn_act(x, f"{name}_5x5_reduce", block.n5x5_reduce)
        branches.append(_conv_bn_act(y, f"{name}_5x5", block.n5x5, 5, stride))
    pool_layer = {"max": keras.layers.MaxPooling2D, "avg": keras.layers.AveragePooling2D}[block.pool]
    y = pool_layer(3, stride, padding="same", name=f"{name}_pool")(x)
    if block.pool_proj:
        y = _conv_bn_act(y, f"{name}_pool_proj", block.pool_proj)
    branches.append(y)
    return keras.layers.Concatenate(name=f"{name}_concat")(branches)
