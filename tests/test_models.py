"""Model builders and their parameter / operation counts (facenet_train.models, facenet_train.flops)."""

import collections

import keras
import numpy as np
import pytest
import tensorflow as tf

from facenet_train import cli
from facenet_train.checkpoint import save_compact
from facenet_train.factorize import factorize_kernel, factorized_model
from facenet_train.flops import count_flops, format_report
from facenet_train.models import MODELS, build_model, fold_read_out, input_size_of, stage_outputs
from facenet_train.widen import check_wider, widened_model


@pytest.fixture(scope="module")
def reports():
    """One build and count per model, shared by the tests below."""
    return {name: count_flops(build_model(name)) for name in MODELS}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_builds_with_native_shape_and_unit_norm_output(name):
    model = build_model(name)
    assert model.name == name
    assert tuple(model.input_shape) == (None, *MODELS[name].input_shape)
    assert tuple(model.output_shape) == (None, 128)
    images = np.random.default_rng(0).random((2, *MODELS[name].input_shape), dtype=np.float32)
    norms = np.linalg.norm(model(images, training=False).numpy(), axis=1)
    np.testing.assert_allclose(norms, 1.0, rtol=1e-5)
    # Every stage's end names a layer of the built model, in order, the last one its output.
    ends = [model.get_layer(layer) for _, layer in stage_outputs(name)]
    assert [stage for stage, _ in stage_outputs(name)] == [s.name for s in MODELS[name].stages] + ["head"]
    assert ends[-1].output is model.output


def test_embedding_size_and_input_size_override():
    model = build_model("nn4_small2", embedding_size=64, input_size=112)
    assert tuple(model.input_shape) == (None, 112, 112, 3)
    assert tuple(model.output_shape) == (None, 64)
    assert input_size_of(model) == 112 and input_size_of(build_model("nn4_small2")) == 0


def test_unknown_model_names_the_choices():
    with pytest.raises(ValueError, match="nn4_small2"):
        build_model("nn5")


def test_nn4_small2_matches_openface_parameter_count(reports):
    report = reports["nn4_small2"]
    # OpenFace's Torch count (3,733,968) holds conv weights + conv biases + BN scale and shift. Ours has
    # no conv biases (trainable = OpenFace - C) and Keras adds BN's moving mean/variance (all = OpenFace + C),
    # C being the total number of conv output channels: both counts straddle OpenFace's by the same C.
    assert (report.trainable_params, report.params) == (3_729_312, 3_738_624)
    assert (report.params + report.trainable_params) // 2 == MODELS["nn4_small2"].paper.params
    assert report.macs == pytest.approx(207.4e6, rel=1e-3)


def test_nn4_matches_openface_nn4_and_the_paper_flops(reports):
    report = reports["nn4"]
    assert (report.params + report.trainable_params) // 2 == 6_959_088  # OpenFace nn4.def.lua's count
    assert report.macs == pytest.approx(MODELS["nn4"].paper.macs, rel=0.03)  # measured 289.5M vs 285M


@pytest.mark.parametrize(
    "name, params_rel, macs_rel",
    # measured: see docs/models.md; mobilefacenet 995k / 224.2M against the paper's 0.99M / 221M
    [("nn2", 0.01, 0.01), ("nns1", 0.02, 0.02), ("nns2", 0.02, 0.06), ("mobilefacenet", 0.02, 0.02)],
)
def test_totals_near_the_paper(reports, name, params_rel, macs_rel):
    report, paper = reports[name], MODELS[name].paper
    assert report.trainable_params == pytest.approx(paper.params, rel=params_rel)
    assert report.macs == pytest.approx(paper.macs, rel=macs_rel)


# FaceNet Table 2 (NN2), per row: (layer-name prefixes, params, FLOPS = multiply-adds), as printed.
NN2_TABLE = [
    (("conv1",), 9e3, 119e6),
    (("conv2",), 115e3, 360e6),
    (("inception_3a",), 164e3, 128e6),
    (("inception_3b",), 228e3, 179e6),
    (("inception_3c",), 398e3, 108e6),
    (("inception_4a",), 545e3, 107e6),
    (("inception_4b",), 595e3, 117e6),
    (("inception_4c",), 654e3, 128e6),
    (("inception_4d",), 722e3, 142e6),
    (("inception_4e",), 717e3, 56e6),
    (("inception_5a",), 1.6e6, 78e6),
    (("inception_5b",), 1.6e6, 78e6),
    (("embedding_dense",), 131e3, 0.1e6),
]


@pytest.mark.parametrize("prefixes, params, macs", NN2_TABLE, ids=[row[0][0] for row in NN2_TABLE])
def test_nn2_rows_match_the_paper_table(reports, prefixes, params, macs):
    rows = [layer for layer in reports["nn2"].layers if layer.name.startswith(prefixes)]
    # The paper counts a conv's weights and bias; ours are the weights plus BN's scale and shift, one
    # per channel more. Its multiply-adds count the bias; ours count BN's scale-and-shift instead.
    batchnorm_channels = sum(layer.output_shape[-1] for layer in rows if layer.kind == "BatchNormalization")
    deployed_params = sum(layer.params for layer in rows) - 3 * batchnorm_channels  # BN folded into conv biases
    assert deployed_params == pytest.approx(params, rel=0.01, abs=500)
    assert sum(layer.macs for layer in rows) == pytest.approx(macs, rel=0.01, abs=0.05e6)


def test_counts_of_a_hand_computed_model():
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", name="conv")(inputs)  # 8x8x8, bias
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU(name="relu")(x)
    x = keras.layers.MaxPooling2D(2, name="pool")(x)  # 4x4x8
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(4, activation="relu", name="dense")(x)
    report = count_flops(keras.Model(inputs, x, name="tiny"))
    got = {layer.name: (layer.output_shape, layer.params, layer.macs, layer.flops) for layer in report.layers}
    assert got["conv"] == ((8, 8, 8), 3 * 3 * 3 * 8 + 8, 64 * 8 * (27 + 1), 2 * 64 * 8 * 27 + 64 * 8)
    assert got["bn"] == ((8, 8, 8), 4 * 8, 512, 1024)
    assert got["relu"] == ((8, 8, 8), 0, 0, 512)
    assert got["pool"] == ((4, 4, 8), 0, 0, 4 * 128)
    assert got["flatten"] == ((128,), 0, 0, 0)
    assert got["dense"] == ((4,), 128 * 4 + 4, 4 * 129, 2 * 4 * 128 + 4 + 4)
    assert report.params == 224 + 32 + 516
    assert report.trainable_params == report.params - 16  # BN's moving mean and variance
    assert report.input_shape == (16, 16, 3)


def test_counts_of_depthwise_padding_and_residual_layers():
    inputs = keras.Input((8, 8, 4))
    x = keras.layers.ZeroPadding2D(1, name="pad")(inputs)  # 10x10x4
    x = keras.layers.DepthwiseConv2D(3, name="dw")(x)  # 8x8x4, bias
    x = keras.layers.Add(name="add")([inputs, x])
    report = count_flops(keras.Model(inputs, x, name="tiny_dw"))
    got = {layer.name: (layer.output_shape, layer.params, layer.macs, layer.flops) for layer in report.layers}
    assert got["pad"] == ((10, 10, 4), 0, 0, 0)
    assert got["dw"] == ((8, 8, 4), 9 * 4 + 4, 256 * (9 + 1), 2 * 256 * 9 + 256)
    assert got["add"] == ((8, 8, 4), 0, 0, 256)


def test_unknown_layer_kind_is_refused():
    inputs = keras.Input((8, 8, 3))
    model = keras.Model(inputs, keras.layers.LayerNormalization(name="ln")(inputs))
    with pytest.raises(ValueError, match="'ln' of type LayerNormalization"):
        count_flops(model)


def test_counts_agree_with_the_tensorflow_profiler(reports):
    """Cross-check against tf.profiler's graph-based count, layer by layer, on the default model."""
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    model = build_model("nn4_small2")
    fn = tf.function(lambda images: model(images, training=False))
    graph = convert_variables_to_constants_v2(fn.get_concrete_function(tf.TensorSpec((1, 96, 96, 3)))).graph
    builder = tf.compat.v1.profiler.ProfileOptionBuilder
    options = builder(builder.float_operation()).with_empty_output().build()
    profile = tf.compat.v1.profiler.profile(graph=graph, cmd="scope", options=options)
    per_layer = collections.Counter()
    stack = list(profile.children)
    while stack:
        node = stack.pop()
        scopes = node.name.split("/")
        if len(scopes) > 1:  # "<model scope>/<layer name>_1/<op>": sum each op into its layer
            per_layer[scopes[1].removesuffix("_1")] += node.float_ops
        stack.extend(node.children)
    for layer in reports["nn4_small2"].layers:
        profiled = per_layer[layer.name]
        if layer.kind in ("Conv2D", "Dense", "MaxPooling2D", "AveragePooling2D"):
            assert profiled == layer.flops, layer.name
        elif layer.kind == "BatchNormalization":
            # The graph also turns mean/variance/scale into a multiplier and offset per channel on every
            # call (6 ops per channel); a converted model has that folded away.
            assert profiled - layer.flops == 6 * layer.output_shape[-1], layer.name
        elif layer.kind == "ReLU":
            assert profiled == 0  # TensorFlow registers no FLOP count for Relu
        elif layer.kind == "L2Normalize":
            assert profiled == pytest.approx(layer.flops, rel=0.01)


def test_format_report_lists_layers_and_totals(reports):
    report = reports["nns2"]
    text = format_report(report)
    assert text.splitlines()[0] == "nns2: input 140x116x3"
    assert "inception_3a_3x3_reduce" in text
    assert f"{report.macs:,}" in text.splitlines()[-2]
    assert text.splitlines()[-1].startswith(f"params {report.params / 1e6:.2f}M")


def test_keras_file_round_trip_keeps_outputs(tmp_path):
    model = build_model("nns2")  # both custom layers, the fully connected top
    images = np.random.default_rng(1).random((3, 140, 116, 3), dtype=np.float32)
    path = tmp_path / "nns2.keras"
    model.save(path)
    reloaded = keras.models.load_model(path)
    np.testing.assert_array_equal(reloaded(images, training=False).numpy(), model(images, training=False).numpy())


def _int8_ops(model: keras.Model, seed: int) -> collections.Counter:
    """The ops of ``model`` converted to full-integer int8 (calibrated on 4 random images), by kind."""
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    rng = np.random.default_rng(seed)
    shape = (1, *model.input_shape[1:])
    converter.representative_dataset = lambda: ([rng.random(shape, dtype=np.float32)] for _ in range(4))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.uint8
    from ai_edge_litert.interpreter import Interpreter  # the runtime's interpreter

    interpreter = Interpreter(model_content=converter.convert())
    return collections.Counter(op["op_name"] for op in interpreter._get_ops_details())


def test_int8_conversion_uses_only_edge_tpu_ops():
    ops = _int8_ops(build_model("nn4_small2"), seed=2)
    allowed = {"QUANTIZE", "CONV_2D", "MAX_POOL_2D", "AVERAGE_POOL_2D", "CONCATENATION", "RESHAPE",
               "FULLY_CONNECTED", "L2_NORMALIZATION", "DEQUANTIZE"}  # fmt: skip
    assert set(ops) <= allowed, ops
    assert ops["L2_NORMALIZATION"] == 1
    assert ops["CONV_2D"] == 37


def test_mobilefacenet_int8_has_no_prelu_and_pads_its_strided_convolutions_on_every_side():
    model = build_model("mobilefacenet")
    # conv_1 and the three stride-2 depthwise convolutions pad one pixel all round (MXNet's
    # geometry, which imported weights expect); "same" would pad the bottom and right only.
    pads = [layer.name for layer in model.layers if isinstance(layer, keras.layers.ZeroPadding2D)]
    assert pads == ["conv_1_pad", "dconv_23_conv_dw_pad", "dconv_34_conv_dw_pad", "dconv_45_conv_dw_pad"]
    assert [model.get_layer(name).padding for name in ("conv_1", "dconv_23_conv_dw")] == ["valid", "valid"]
    assert not any(isinstance(layer, keras.layers.PReLU) for layer in model.layers)
    ops = _int8_ops(model, seed=3)
    assert set(ops) <= {"QUANTIZE", "PAD", "CONV_2D", "DEPTHWISE_CONV_2D", "ADD", "RESHAPE",
                        "FULLY_CONNECTED", "L2_NORMALIZATION", "DEQUANTIZE"}, ops  # fmt: skip
    assert (ops["DEPTHWISE_CONV_2D"], ops["ADD"], ops["PAD"]) == (17, 12, 4)


def test_folding_the_read_out_for_conversion_computes_the_same():
    model = build_model("mobilefacenet")
    rng = np.random.default_rng(4)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = len(layer.get_weights()[0])
            layer.set_weights([rng.uniform(0.2, 3.0, n), rng.normal(0, 1.0, n), rng.normal(0, 0.1, n),
                               rng.uniform(0.5, 2.0, n)])
    folded = fold_read_out(model)
    assert "gdc_bn" not in [layer.name for layer in folded.layers] and folded.get_layer("gdc").use_bias
    images = rng.normal(0, 1, (2, 112, 112, 3)).astype(np.float32)
    np.testing.assert_allclose(folded(images, training=False).numpy(), model(images, training=False).numpy(),
                               atol=1e-5)
    nn4 = build_model("nn4_small2")
    assert fold_read_out(nn4) is nn4


def test_a_factorized_kernel_composes_back_to_the_original_at_full_rank():
    kernel = np.random.default_rng(0).normal(size=(3, 3, 4, 6)).astype(np.float32)
    vertical, horizontal, kept = factorize_kernel(kernel, 12)
    assert vertical.shape == (3, 1, 4, 12) and horizontal.shape == (1, 3, 12, 6) and kept == pytest.approx(1.0)
    # The two convolutions in a row, with "same" padding, are the original convolution.
    images = np.random.default_rng(1).normal(size=(2, 9, 9, 4)).astype(np.float32)
    full = tf.nn.conv2d(images, kernel, 1, "SAME")
    composed = tf.nn.conv2d(tf.nn.conv2d(images, vertical, 1, "SAME"), horizontal, 1, "SAME")
    np.testing.assert_allclose(composed.numpy(), full.numpy(), atol=1e-4)
    _, _, kept = factorize_kernel(kernel, 4)
    assert 0.3 < kept < 1.0
    with pytest.raises(ValueError, match="rank 13 exceeds"):
        factorize_kernel(kernel, 13)


def test_factorized_model_copies_every_other_variable(tmp_path, capsys):
    source = build_model("nn4_small2", input_size=112)
    rng = np.random.default_rng(0)
    for variable in source.variables:
        variable.assign(rng.normal(size=variable.shape).astype(np.float32) * 0.1)
    target, kept = factorized_model(source, "nn4_small2_sep")
    assert tuple(target.input_shape) == (None, 128, 128, 3) and set(kept) == {"conv2"}
    vertical, horizontal, share = factorize_kernel(source.get_layer("conv2").get_weights()[0], 64)
    assert kept["conv2"] == pytest.approx(share)
    np.testing.assert_array_equal(target.get_layer("conv2_vertical").get_weights()[0], vertical)
    np.testing.assert_array_equal(target.get_layer("conv2").get_weights()[0], horizontal)
    for layer in ("conv1", "conv2_bn", "inception_5b_1x1", "embedding_dense"):
        for got, want in zip(target.get_layer(layer).get_weights(), source.get_layer(layer).get_weights()):
            np.testing.assert_array_equal(got, want)


def randomised(model: keras.Model) -> keras.Model:
    """Every variable drawn at random (batch-normalisation variances positive), as after training."""
    rng = np.random.default_rng(0)
    for variable in model.variables:
        values = rng.normal(size=variable.shape) * 0.1
        variable.assign((np.abs(values) + 0.5 if "variance" in variable.path else values).astype(np.float32))
    return model


def test_a_widened_model_computes_what_the_trained_one_does(tmp_path, capsys):
    source = randomised(build_model("nn4_small2", input_size=64))
    target = widened_model(source, "nn4_small2_wide")
    assert tuple(target.input_shape) == (None, 64, 64, 3)
    assert target.get_layer("inception_5b_concat").output.shape[-1] == 1104  # 736 in nn4_small2
    images = np.random.default_rng(1).normal(size=(3, 64, 64, 3)).astype(np.float32)
    np.testing.assert_allclose(target(images, training=False).numpy(), source(images, training=False).numpy(),
                               atol=1e-5)
    # The new channels are live: their filters are not zero, only the weights reading them.
    assert np.abs(target.get_layer("inception_5a_1x1").get_weights()[0][..., 256:]).sum() > 0
    reading = np.abs(target.get_layer("embedding_dense").get_weights()[0]).sum(axis=1)
    assert np.count_nonzero(reading == 0) == 1104 - 736
    # The command writes it as a compact .npz that loads as the wider model.
    checkpoint = save_compact(source, tmp_path / "trained.npz")
    assert cli.main(["widen", str(checkpoint), "--to", "nn4_small2_wide", "--out", str(tmp_path / "wide.npz")]) == 0
    assert "the same function" in capsys.readouterr().out


@pytest.mark.parametrize("name, message", [("nn4_small2_sep", "another kind of stage"),
                                           ("nn4", "other stages"), ("nns1", "average-pool")])
def test_only_a_wider_layout_of_the_same_stages_is_accepted(name, message):
    with pytest.raises(ValueError, match=message):
        check_wider(MODELS["nn4_small2"], MODELS[name])
    with pytest.raises(ValueError, match="only grow its widths"):
        check_wider(MODELS["nn4_small2_wide"], MODELS["nn4_small2"])
