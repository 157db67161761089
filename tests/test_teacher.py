"""The EdgeFace teacher's labelling path, with a stand-in ONNX model of the same interface
(N x 3 x 112 x 112 in, N x 512 out): preprocessing, the mirror average, the cache files and
the one-teacher-per-cache rule. The real export needs the teacher's weights (docs/model.md)."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="the teacher path needs onnx and onnxruntime (pip install -e .[dev])")
pytest.importorskip("onnxruntime", reason="the teacher path needs onnxruntime (pip install -e .[dev])")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from facenet_train import data, edgeface, teacher  # noqa: E402

ROWS = 3 * edgeface.INPUT_SIZE  # the stand-in averages over image rows: one value per channel and column


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory) -> tuple[str, np.ndarray]:
    """An ONNX model: mean over each image row, then a fixed linear map to 512-d."""
    weight = np.random.default_rng(0).normal(size=(ROWS, edgeface.EMBEDDING_SIZE)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["input", "axes"], ["columns"], keepdims=0),
            helper.make_node("Reshape", ["columns", "shape"], ["flat"]),
            helper.make_node("MatMul", ["flat", "weight"], ["embedding"]),
        ],
        "stand_in",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 3, edgeface.INPUT_SIZE, edgeface.INPUT_SIZE])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["n", edgeface.EMBEDDING_SIZE])],
        [numpy_helper.from_array(np.array([2], np.int64), "axes"),
         numpy_helper.from_array(np.array([-1, ROWS], np.int64), "shape"),
         numpy_helper.from_array(weight, "weight")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    path = tmp_path_factory.mktemp("teacher") / "stand_in.onnx"
    onnx.save(model, path)
    return str(path), weight


@pytest.fixture(scope="module")
def stand_in_with_features(stand_in, tmp_path_factory) -> str:
    """The stand-in plus a second output, as the export has: 16 x 16 average pools, a 7 x 7 x 3 map."""
    model = onnx.load(stand_in[0])
    model.graph.node.append(helper.make_node("AveragePool", ["input"], ["features"], kernel_shape=[16, 16],
                                             strides=[16, 16]))
    model.graph.output.append(helper.make_tensor_value_info("features", TensorProto.FLOAT, ["n", 3, 7, 7]))
    path = tmp_path_factory.mktemp("teacher") / "with_features.onnx"
    onnx.save(model, path)
    return str(path)


def expected(crops: np.ndarray, weight: np.ndarray, flip: bool) -> np.ndarray:
    """What the teacher must give: 96 px crops resized to 112, scaled to [-1, 1], NCHW."""
    x = np.stack([cv2.resize(c, (112, 112), interpolation=cv2.INTER_LINEAR) for c in crops]).astype(np.float32)
    x = ((x / 255.0 - 0.5) / 0.5).transpose(0, 3, 1, 2)
    unit = lambda e: e / np.linalg.norm(e, axis=1, keepdims=True)  # noqa: E731
    e = unit(x.mean(axis=2).reshape(len(x), -1) @ weight)
    if flip:
        e = unit(e + unit(x[..., ::-1].mean(axis=2).reshape(len(x), -1) @ weight))
    return e


def test_describe_preprocesses_like_the_teacher_and_averages_the_mirror(stand_in, astronaut):
    path, weight = stand_in
    rng = np.random.default_rng(1)
    crops = np.stack([astronaut[y:y + 96, x:x + 96] for y, x in rng.integers(0, 300, (5, 2))])
    for flip, spinning in ((False, True), (True, True), (False, False)):
        got = edgeface.EdgeFaceTeacher(path, threads=1, flip=flip, spinning=spinning).describe(crops)
        assert got.shape == (5, edgeface.EMBEDDING_SIZE) and got.dtype == np.float32
        assert np.allclose(got, expected(crops, weight, flip), atol=1e-4)
    # The stand-in is not mirror-symmetric: the average differs from the crop's own vector.
    plain = edgeface.EdgeFaceTeacher(path, threads=1, flip=False).describe(crops)
    assert not np.allclose(plain, edgeface.EdgeFaceTeacher(path, threads=1).describe(crops), atol=1e-3)


def test_describe_with_features_gives_the_maps_of_the_crops_themselves(stand_in, stand_in_with_features, astronaut):
    crops = np.stack([astronaut[y:y + 112, y:y + 112] for y in (0, 40, 90)])
    descriptors, maps = edgeface.EdgeFaceTeacher(stand_in_with_features, threads=1, flip=False
                                                 ).describe_with_features(crops)
    assert np.allclose(descriptors, expected(crops, stand_in[1], flip=False), atol=1e-4)
    x = (crops.astype(np.float32) / 255.0 - 0.5) / 0.5
    assert maps.shape == (3, 7, 7, 3)  # channels last, as the student's maps
    assert np.allclose(maps, x.reshape(3, 7, 16, 7, 16, 3).mean(axis=(2, 4)), atol=1e-5)
    with pytest.raises(ValueError, match="no 'features' output: export it again"):
        edgeface.EdgeFaceTeacher(stand_in[0], threads=1).describe_with_features(crops)


def write_crop_cache(root, astronaut, count: int = 7, shard_size: int = 4):
    root.mkdir()
    shards = [data.shard_name(i) for i in range(-(-count // shard_size))]
    crops = np.stack([astronaut[i * 20:i * 20 + 112, i * 20:i * 20 + 112] for i in range(count)])
    for i, shard in enumerate(shards):
        part = crops[i * shard_size:(i + 1) * shard_size]
        n = len(part)
        data.write_npz_atomic(
            root / shard, crops=part, labels=np.zeros(n, np.int32), identities=np.array(["a/0"] * n),
            sources=np.array(["s"] * n), paths=np.array([f"/s/{j}.png" for j in range(n)]),
            boxes=np.zeros((n, 4), np.float32), landmarks=np.zeros((n, 4, 2), np.float32),
            scores=np.ones(n, np.float32), pads=np.zeros(n, np.int32))
    data.CacheManifest(crop_size=96, border=8, template="facenet96", detector="test", aligner=data.aligner_version(),
                       shard_size=shard_size, plan="test", people=["a/0"], shards=shards,
                       sources={"s": {"faces": count}}, complete=True).save(root)
    return crops


def test_compute_teacher_labels_the_centre_crop_of_every_face_once(stand_in, astronaut, tmp_path):
    path, weight = stand_in
    cache = tmp_path / "cache"
    crops = write_crop_cache(cache, astronaut)
    options = teacher.TeacherOptions("edgeface", workers=1, onnx=path)
    faces, _ = teacher.compute_teacher(cache, options)
    assert faces == 7
    loaded = data.load_cache(cache, with_teacher=True)
    assert loaded.teacher.shape == (7, edgeface.EMBEDDING_SIZE)
    assert np.allclose(loaded.teacher, expected(crops[:, 8:104, 8:104], weight, flip=True), atol=1e-4)
    assert json.loads((cache / teacher.TEACHER_JSON).read_text()) == {"teacher": "edgeface"}
    assert teacher.compute_teacher(cache, options)[0] == 0  # nothing left: a stopped run resumes here
    with pytest.raises(ValueError, match="holds edgeface's descriptors"):
        teacher.compute_teacher(cache, teacher.TeacherOptions("dlib", workers=1))
    fresh = tmp_path / "fresh"
    write_crop_cache(fresh, astronaut)
    with pytest.raises(ValueError, match="needs its ONNX file"):
        teacher.compute_teacher(fresh, teacher.TeacherOptions("edgeface", workers=1))
    # The MobileFaceNet teaches inside the training step (harmonic.old_model), not through a cache.
    with pytest.raises(ValueError, match="'insightface_mobilefacenet' labels no cache; choose one of"):
        teacher.compute_teacher(fresh, teacher.TeacherOptions("insightface_mobilefacenet", workers=1))
    assert teacher.cached_teacher(fresh) is None  # a teacher that could not start claims nothing


def test_descriptors_from_before_the_stamp_are_dlibs(astronaut, tmp_path):
    cache = tmp_path / "cache"
    write_crop_cache(cache, astronaut)
    np.save(cache / data.teacher_name(data.shard_name(0)), np.zeros((4, 128), np.float32))
    assert teacher.cached_teacher(cache) == "dlib"
    with pytest.raises(ValueError, match="holds dlib's descriptors"):
        teacher.compute_teacher(cache, teacher.TeacherOptions("edgeface", workers=1, onnx="x.onnx"))
