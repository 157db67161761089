"""Loading TFLite models: clear errors for bad files, quantization info, batching."""

from __future__ import annotations

import ctypes.util
import shutil

import numpy as np
import pytest

from facenet_edge.detect import BLAZEFACE_MODEL
from facenet_edge.errors import ModelError
from facenet_edge.interpreter import TensorInfo, load_interpreter


def test_missing_file(tmp_path):
    path = tmp_path / "absent.tflite"
    with pytest.raises(ModelError, match="not found") as info:
        load_interpreter(path)
    assert str(path) in str(info.value)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.tflite"
    path.write_bytes(b"")
    with pytest.raises(ModelError, match="empty"):
        load_interpreter(path)


def test_text_file(tmp_path):
    path = tmp_path / "notes.tflite"
    path.write_text("this is not a model, just some text\n")
    with pytest.raises(ModelError, match="not a TFLite model"):
        load_interpreter(path)


@pytest.mark.parametrize("keep", [0.5, 0.05])
def test_truncated_model(tmp_path, keep):
    data = BLAZEFACE_MODEL.read_bytes()
    path = tmp_path / "truncated.tflite"
    path.write_bytes(data[: int(len(data) * keep)])  # identifier intact, body cut
    with pytest.raises(ModelError, match="truncated or corrupt") as info:
        load_interpreter(path, embedding=False)
    assert str(path) in str(info.value)


def test_wrong_output_shape(tiny_model):
    with pytest.raises(ModelError, match="output must be N x D"):
        load_interpreter(tiny_model.wrong_output)


def test_wrong_input_shape(tiny_model):
    with pytest.raises(ModelError, match=r"input must be N x H x W x 3"):
        load_interpreter(tiny_model.wrong_input)


def test_detector_model_is_not_an_embedder():
    with pytest.raises(ModelError, match="one input and one output"):
        load_interpreter(BLAZEFACE_MODEL)


def test_quantization_read(tiny_model):
    with load_interpreter(tiny_model.int8) as model:
        inp, out = model.input, model.outputs[0]
        assert inp.dtype is np.int8 and inp.quantized and inp.scale > 0
        assert out.dtype is np.int8 and out.quantized
        assert inp.shape == (1, 96, 96, 3) and out.shape == (1, 128)
    with load_interpreter(tiny_model.float32) as model:
        assert model.input.dtype is np.float32 and not model.input.quantized
        assert not model.outputs[0].quantized


def test_tensor_quantize_round_trip_and_saturation():
    info = TensorInfo(name="x", index=0, shape=(1, 4), dtype=np.int8, scale=0.5, zero_point=-3)
    q = info.quantize(np.array([0.0, 1.0, 1000.0, -1000.0]))
    assert q.dtype == np.int8
    assert q.tolist() == [-3, -1, 127, -128]
    assert info.dequantize(q[:2]).tolist() == [0.0, 1.0]


def test_batch_resized_only_when_size_changes(tiny_model):
    class Spy:
        def __init__(self, inner):
            self.inner, self.resizes = inner, 0

        def resize_tensor_input(self, *args):
            self.resizes += 1
            return self.inner.resize_tensor_input(*args)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    model = load_interpreter(tiny_model.float32)
    spy = model._interpreter = Spy(model._interpreter)
    for n in (1, 3, 3, 3, 1, 1):
        (out,) = model.run(np.zeros((n, 96, 96, 3), np.float32))
        assert out.shape == (n, 128)
    assert spy.resizes == 2


def test_num_threads(tiny_model):
    with load_interpreter(tiny_model.float32, num_threads=2) as model:
        assert model.run(np.zeros((1, 96, 96, 3), np.float32))[0].shape == (1, 128)
    with pytest.raises(ModelError, match="num_threads"):
        load_interpreter(tiny_model.float32, num_threads=0)


def test_unknown_delegate(tiny_model):
    with pytest.raises(ModelError, match="unknown delegate"):
        load_interpreter(tiny_model.float32, delegate="gpu")


@pytest.mark.skipif(ctypes.util.find_library("edgetpu") is not None, reason="an Edge TPU runtime is installed")
def test_edgetpu_without_runtime(tiny_model, tmp_path):
    path = tmp_path / "tiny_edgetpu.tflite"
    shutil.copy(tiny_model.int8, path)
    with pytest.raises(ModelError, match="libedgetpu.so.1"):
        load_interpreter(path)
    with pytest.raises(ModelError, match="libedgetpu.so.1"):
        load_interpreter(tiny_model.int8, delegate="edgetpu")


def test_closed_model_refuses_to_run(tiny_model):
    model = load_interpreter(tiny_model.float32)
    model.close()
    with pytest.raises(ModelError, match="closed"):
        model.run(np.zeros((1, 96, 96, 3), np.float32))
