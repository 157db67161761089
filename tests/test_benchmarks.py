"""The benchmark scripts in benchmarks/ on tiny configurations (``--quick``, the tiny test
model): each runs, prints Markdown tables and writes well-formed JSON with the expected
keys. No timing is asserted: numbers from a test run on a shared machine mean nothing.
harmonic_cross.py runs on random-weight Keras models and a fake LFW of astronaut variants,
tight_crops.py on the same fake LFW, teacher_agreement.py on its crop cache with a fake
ONNX teacher or a teacher cache built from the tiny model's own embeddings, layer_probes.py
on a two-convolution student, a synthetic training crop cache and the same fake LFW.

LFW parts skip when ../shared/data/lfw is absent, dlib parts when dlib is not installed.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from facenet_edge import bench
from facenet_edge import embed as embed_module
from facenet_edge.cli import ExitCode
from facenet_edge.cli import main as cli_main
from facenet_edge.detect import DEFAULT_DETECTOR, DETECTORS, create_detector
from facenet_edge.io import read_image
from facenet_train import augment, data
from facenet_train.edgeface import EdgeFaceTeacher
from facenet_train.evaluation import LfwCropPairs

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SHARED_LFW = Path(__file__).resolve().parents[2] / "shared" / "data" / "lfw"  # common.SHARED_LFW
LFW = SHARED_LFW if (SHARED_LFW / "pairs.txt").is_file() else None
NO_LFW = "LFW not found at ../shared/data/lfw (beside the repository)"
MACHINE_KEYS = {"cpu", "cores", "python", "libraries", "threads", "git_commit", "load_average", "tflite_runtime"}
TARGET_KEYS = {"name", "limit", "unit", "measured", "met", "ratio", "status"}
TIMING_KEYS = {"runs", "p50_ms", "p90_ms", "p99_ms", "mean_ms", "min_ms"}


@pytest.fixture(scope="module")
def common() -> types.ModuleType:
    """benchmarks/common.py (the scripts import it as ``common``; they are not a package)."""
    spec = importlib.util.spec_from_file_location("benchmarks_common", BENCHMARKS / "common.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look up their module while being defined
    spec.loader.exec_module(module)
    return module


def run_benchmark(name: str, out: Path, *args: str, quick: bool = True) -> dict:
    """Run benchmarks/NAME.py (--quick unless ``quick`` is false), check the shared report
    layout, return its JSON."""
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / f"{name}.py"), *(["--quick"] if quick else []), "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "|---|" in done.stdout  # a Markdown table
    report = json.loads((out / f"{name}.json").read_text())
    assert report["benchmark"] == name
    assert MACHINE_KEYS <= set(report["machine"])
    assert report["machine"]["cores"] >= 1
    assert isinstance(report["config"], dict) and isinstance(report["results"], dict)
    for target in report["targets"]:
        assert TARGET_KEYS <= set(target)
        assert target["status"] in ("met", "NOT MET", "not measured")
        assert (target["measured"] is None) == (target["met"] is None)
    return report


# ---------------------------------------------------------------- helpers


def test_percentiles():
    stats = bench.Percentiles.of(np.arange(1, 101) / 1000)  # 1..100 ms
    assert stats.runs == 100
    assert stats.p50_ms == pytest.approx(50.5)
    assert stats.p99_ms == pytest.approx(99.01)
    assert stats.min_ms == pytest.approx(1.0)


def test_targets_and_table():
    fast = bench.Target("fps", 60, "FPS", higher_is_better=True, measured=90)
    slow = bench.Target("cold start", 1.5, "s", measured=3.0)
    absent = bench.Target("rss", 200, "MB", note="not run")
    assert (fast.met, slow.met, absent.met) == (True, False, None)
    assert slow.ratio == pytest.approx(2.0)
    table = bench.targets_table([fast, slow, absent]).splitlines()
    assert len(table) == 5 and "NOT MET" in table[3] and "not measured (not run)" in table[4]


def test_machine_line_names_the_package_not_a_missing_checkout(common):
    machine = bench.machine_info((1,))  # an installed wheel: no checkout
    line = bench.machine_line(machine)
    assert f"facenet-edge {machine['libraries']['facenet-edge']}" in line and "commit" not in line
    assert "git_commit" not in machine
    assert common.machine_info((1,)).keys() == {*machine, "git_commit"}
    line = common.machine_line({**machine, "git_commit": "0123456789abcdef+dirty"})
    assert line.endswith("(commit 0123456789ab+dirty)")
    assert common.machine_line({**machine, "git_commit": None}) == bench.machine_line(machine)


def test_frames_hold_the_faces():
    # The shipped photo: no flags, no scikit-image, no LFW needed.
    with create_detector("haar") as detector:
        faces = bench.face_images(1, detector)
        assert faces[0].source == "astronaut"
        for count in (1, 5):
            frame = bench.compose_frame(faces, count)
            assert frame.shape == (480, 640, 3) and frame.dtype == np.uint8
            assert len(detector.detect(frame)) == count


def test_lfw_subsample_keeps_every_fold_balanced(common, tmp_path):
    folds, per_half = 10, 4
    lines = [f"{folds} {per_half}"]
    for fold in range(folds):
        lines += [f"P{fold}_{i} 1 2" for i in range(per_half)]
        lines += [f"A{fold}_{i} 1 B{fold}_{i} 1" for i in range(per_half)]
    (tmp_path / "pairs.txt").write_text("\n".join(lines) + "\n")
    lfw = common.load_lfw(tmp_path, pairs=40)
    assert len(lfw.pairs) == 40 and lfw.folds == folds
    for fold in np.split(lfw.issame, folds):
        assert fold.sum() == 2 and (~fold).sum() == 2
    first, second = lfw.pair_indices()
    assert len(lfw.images) == 40 + 40 and first.max() < len(lfw.images) and second.max() < len(lfw.images)


def test_cross_model_lfw_scores_a_gallery_against_other_probes(common, tmp_path):
    lines = ["10 2"]
    for fold in range(10):
        lines += [f"P{fold}_{i} 1 2" for i in range(2)] + [f"A{fold}_{i} 1 B{fold}_{i} 1" for i in range(2)]
    (tmp_path / "pairs.txt").write_text("\n".join(lines) + "\n")
    lfw = common.load_lfw(tmp_path)
    rng = np.random.default_rng(0)
    probes = embed_module.l2_normalize(rng.standard_normal((len(lfw.images), 16)))
    first, second = lfw.pair_indices()
    probes[second[lfw.issame]] = probes[first[lfw.issame]]  # matched pairs: the same face vector
    gallery = 7.5 * probes  # dlib-like: the same directions, not unit length
    same = common.lfw_result(lfw, probes)
    cross = common.lfw_cross_result(lfw, gallery, probes)
    assert cross.accuracy_mean == same.accuracy_mean == 1.0
    other = common.lfw_cross_result(lfw, rng.standard_normal(probes.shape), probes)  # another space: chance
    assert other.accuracy_mean < 1.0
    with pytest.raises(ValueError, match="differ in shape"):
        common.lfw_cross_result(lfw, gallery[:, :8], probes)


def test_conversions_are_the_converters_siblings_with_cards(common, tmp_path):
    for name in ("m_int8.tflite", "m_int8.json", "m_float32.tflite", "m_float32.json", "m_float16.tflite"):
        (tmp_path / name).touch()  # m_float16 has no card: not a usable sibling
    assert common.conversions(tmp_path / "m_int8.tflite") == [tmp_path / "m_float32.tflite", tmp_path / "m_int8.tflite"]
    assert common.conversions(tmp_path / "other.tflite") == [tmp_path / "other.tflite"]


def test_models_sharing_a_file_name_get_distinct_labels(common):
    def model(path: str, version: str):
        return common.ModelUnderTest(Path(path), types.SimpleNamespace(version=version), "int8", Path(path).stem)

    shipped, release = model("models/m_int8.tflite", "0.8.0"), model("/tmp/new/m_int8.tflite", "0.9.0")
    copy = model("/tmp/copy/m_int8.tflite", "0.9.0")
    labels = [m.label for m in common._distinct_labels([shipped, release, model("other.tflite", "0.9.0")])]
    assert labels == ["m_int8 v0.8.0", "m_int8 v0.9.0", "other"]
    labels = [m.label for m in common._distinct_labels([shipped, release, copy])]
    assert labels == ["m_int8 v0.8.0", "new/m_int8 v0.9.0", "copy/m_int8 v0.9.0"]


@pytest.mark.skipif(LFW is None, reason=NO_LFW)
def test_lfw_cache_embeds_each_image_once(common, tmp_path):
    described = []

    def describe(images, detections):
        described.extend(images)
        return np.random.default_rng(len(described)).standard_normal((len(images), 128)).astype(np.float32)

    small, large = common.load_lfw(LFW, pairs=20), common.load_lfw(LFW, pairs=40)
    with common.LfwFaces("haar") as faces:
        # A key with a folder in it, as accuracy.py's labels of same-named models have.
        first, outcomes = common.lfw_embeddings(small, faces, "new/fake", describe, tmp_path)
        assert len(described) == len(small.images) == len(first) == len(outcomes)
        again, _ = common.lfw_embeddings(small, faces, "new/fake", describe, tmp_path)
        assert len(described) == len(small.images) and np.array_equal(first, again)
        common.lfw_embeddings(large, faces, "new/fake", describe, tmp_path)
    assert len(described) == len(set(small.images) | set(large.images))
    assert [p.name for p in tmp_path.iterdir()] == ["lfw-new_fake-haar.npz"]


# ---------------------------------------------------------------- the scripts


def test_latency(tiny_model, tmp_path):
    report = run_benchmark("latency", tmp_path, "--model", str(tiny_model.int8), "--detect-widths", "640,320")
    results = report["results"]
    assert {"model", "faces", "stages", "pipeline", "cold_start", "memory"} <= set(results)
    assert {s["stage"] for s in results["stages"]} == {"decode", "detect", "align", "embed", "match"}
    assert {s["batch"] for s in results["stages"] if s["stage"] == "embed"} == {1, 8}
    assert all(TIMING_KEYS <= set(s["timing"]) for s in results["stages"])
    assert {(r["detect_width"], r["faces_in_frame"]) for r in results["pipeline"]} == {
        (w, n) for w in (640, 320) for n in (1, 5)
    }
    assert all(r["fps"] > 0 for r in results["pipeline"])
    assert "detect width 640" in report["targets"][0]["note"]  # the target is the first width's
    assert all(c["total_s"] > 0 for c in results["cold_start"])
    assert results["memory"]["rss_peak_mb"] > 0
    assert [t["measured"] is not None for t in report["targets"]] == [True, True, True]


def test_bench_command_is_registered(capsys):
    assert cli_main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--quick" in out and "--lfw" not in out  # LFW beside a checkout is benchmarks/latency.py's
    assert cli_main(["bench", "--lfw", "x"]) == ExitCode.USAGE


def test_bench_module_loads_only_when_bench_runs():
    code = "import sys, facenet_edge.cli; print('facenet_edge.bench' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stderr


def test_bench_json_prints_the_report(tiny_model, tmp_path, capsys):
    args = ["bench", "--quick", "--json", "--model", str(tiny_model.int8), "--out", str(tmp_path)]
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    (line,) = out.splitlines()  # one JSON object, no tables
    report = json.loads(line)
    assert report == json.loads((tmp_path / "latency.json").read_text())
    assert report["results"]["faces"] == ["astronaut"]  # the shipped photo: a device has no LFW


def test_bench_without_a_model_says_pass_model(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(embed_module, "MODELS_DIR", tmp_path)
    monkeypatch.setattr(embed_module, "DEFAULT_MODEL_POINTER", tmp_path / "default.txt")
    assert cli_main(["bench", "--quick", "--out", str(tmp_path)]) == ExitCode.MODEL
    assert "pass --model" in capsys.readouterr().err
    assert not (tmp_path / "latency.json").exists()


def test_gallery_scaling(tmp_path):
    report = run_benchmark("gallery_scaling", tmp_path / "out", "--tmp", str(tmp_path))
    scales = report["results"]["scales"]
    assert [s["people"] for s in scales] == [1000, 10000]
    for s in scales:
        assert TIMING_KEYS <= set(s["top1"]) and TIMING_KEYS <= set(s["top5"])
        assert s["matrix_mb"] == pytest.approx(s["people"] * 128 / 2**20)
        assert s["index_mb"] > 0 and s["enroll_s"] > 0 and s["search_over_read"] > 0
        assert {"read", "copy", "bytes"} <= set(s["bandwidth"])
    assert report["results"]["add_ms_per_person"] > 0
    assert [t["status"] for t in report["targets"]] == ["not measured", "not measured"]  # no 1M gallery
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "out" / "gallery_scaling.png").stat().st_size > 0


def test_gallery_kernels(tmp_path):
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "gallery_scaling.py"), "--kernels", "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    results = json.loads((tmp_path / "gallery_kernels.json").read_text())["results"]
    assert results["kernels"][0]["name"].startswith("ours")  # then whichever candidates are installed
    assert all(k["agrees"] and k["p50_over_read"] > 0 for k in results["kernels"])


def test_models(tiny_model, tmp_path):
    pytest.importorskip("tensorflow", reason="the model family is built with TensorFlow (the train extra)")
    report = run_benchmark("models", tmp_path, "--model", str(tiny_model.int8))
    (family,) = report["results"]["family"]
    assert family["name"] == "nns2" and family["params"] > 0 and family["flops"] > family["macs"] > 0
    assert [c["target"] for c in family["conversions"]] == ["float32"]
    assert family["conversions"][0]["size_bytes"] > 4 * family["trainable_params"]
    (file,) = report["results"]["files"]
    assert file["size_bytes"] == tiny_model.int8.stat().st_size and file["target"] == "int8"


def test_stage_time_splits_each_model_into_its_stages(tmp_path):
    pytest.importorskip("tensorflow", reason="the stages are cut and converted with TensorFlow (the train extra)")
    report = run_benchmark("stage_time", tmp_path)
    (model,) = report["results"]["models"]
    from facenet_train.flops import count_flops
    from facenet_train.models import MODELS, build_model

    assert model["model"] == "nns2" and model["input"] == "140x116"
    assert [s["name"] for s in model["stages"]] == [s.name for s in MODELS["nns2"].stages] + ["head"]
    assert model["macs"] == count_flops(build_model("nns2")).macs
    assert model["ms"] == pytest.approx(sum(s["ms"] for s in model["stages"]))


def test_embed_time_gives_ratios_to_the_first_model(tiny_model, tmp_path):
    report = run_benchmark("embed_time", tmp_path, "--model", str(tiny_model.int8), "--model", str(tiny_model.float32))
    first, second = (report["results"][path.stem] for path in (tiny_model.int8, tiny_model.float32))
    assert (first["target"], second["target"]) == ("int8", "float32")
    assert first["ratio"] == 1.0 and first["median_ms"] > 0
    assert second["ratio"] == pytest.approx(second["median_ms"] / first["median_ms"])


@pytest.mark.skipif(LFW is None, reason=NO_LFW)
def test_accuracy(tiny_model, tmp_path):
    models = ["--model", str(tiny_model.int8), "--model", str(tiny_model.float32)]
    report = run_benchmark("accuracy", tmp_path, *models, "--pairs", "20")
    scores = report["results"]["scores"]
    assert {(s["model"], s["detector"]) for s in scores} == {
        (m, d) for m in ("tiny_int8", "tiny_float") for d in DETECTORS
    }
    for s in scores:
        assert 0.0 <= s["accuracy_mean"] <= 1.0 and len(s["fold_accuracies"]) == 10
        assert sum(s["images"].values()) == report["config"]["images"]
    assert (tmp_path / "accuracy_roc.png").stat().st_size > 0
    assert len(list((tmp_path / "cache").glob("lfw-*.npz"))) == 2 * len(DETECTORS)
    # The second model against the first, fold by fold, per detector.
    folds = {(s["model"], s["detector"]): np.array(s["fold_accuracies"]) for s in scores}
    for p in report["results"]["paired"]:
        assert (p["model"], p["baseline"]) == ("tiny_float", "tiny_int8")
        expected = 100 * (folds["tiny_float", p["detector"]] - folds["tiny_int8", p["detector"]])
        np.testing.assert_allclose(p["fold_differences"], expected)
        assert p["mean"] == pytest.approx(expected.mean())
        assert p["folds_better"] + p["folds_worse"] <= 10
    assert sorted(p["detector"] for p in report["results"]["paired"]) == sorted(DETECTORS)


def test_peers(tiny_model, tmp_path):
    models = ["--model", str(tiny_model.int8), "--model", str(tiny_model.float32)]
    report = run_benchmark("peers", tmp_path, *models, "--pairs", "20")
    results = report["results"]
    ours = [r for r in results["latency"] if r["peer"] in ("tiny_int8", "tiny_float")]
    assert len(ours) == 2 and all(TIMING_KEYS <= set(r["network"]) for r in ours)
    assert "OpenCV SFace (cv2.FaceRecognizerSF)" in results["unavailable"]
    if LFW is not None:
        assert {a["peer"] for a in results["lfw"]} >= {"tiny_int8", "tiny_float"}
    if importlib.util.find_spec("dlib") is None:
        pytest.skip("dlib is not installed (pip install 'facenet-edge[dlib]'): dlib parts not checked")
    assert results["latency"][0]["peer"] == "dlib ResNet v1"
    assert results["dlib"]["version"]
    assert report["targets"][0]["measured"] is not None  # int8 embed / dlib descriptor
    if LFW is not None:
        assert "dlib ResNet v1" in {a["peer"] for a in results["lfw"]}
        cross = [a for a in results["lfw"] if a["cross"]]
        assert [(a["peer"], a["target"], a["gallery"], a["probes"]) for a in cross] == [
            (f"dlib gallery × {m} probes", "cross", "dlib ResNet v1", m) for m in ("tiny_int8", "tiny_float")
        ]
        for a in cross:
            assert 0.0 <= a["accuracy_mean"] <= 1.0 and 0.0 <= a["auc"] <= 1.0
            assert a["pairs"] == 20


@pytest.fixture(scope="module")
def tiny_lfw_crops(astronaut, tmp_path_factory) -> tuple[Path, Path]:
    """(a fake LFW: 10 'people' x 2 astronaut variants, 10 folds of 1 matched + 1
    mismatched pair; its `facenet-train preprocess-lfw` crop cache, 96 px)."""
    cv2 = pytest.importorskip("cv2")
    preprocess = pytest.importorskip("facenet_train.preprocess")
    root = tmp_path_factory.mktemp("lfw")
    lfw = root / "lfw"
    for k in range(10):
        (lfw / f"Person_{k}").mkdir(parents=True)
        for n in (1, 2):
            variant = np.clip(cv2.resize(astronaut, (250, 250)).astype(int) + 8 * k - 40 + 5 * n, 0, 255)
            variant = variant.astype(np.uint8)[:, :: 3 - 2 * n]  # the second image mirrored
            cv2.imwrite(str(lfw / f"Person_{k}" / f"Person_{k}_{n:04d}.jpg"), np.ascontiguousarray(variant[..., ::-1]))
    lines = ["10\t1"]
    for k in range(10):
        lines += [f"Person_{k}\t1\t2", f"Person_{k}\t1\tPerson_{(k + 1) % 10}\t2"]
    (lfw / "pairs.txt").write_text("\n".join(lines) + "\n")
    preprocess.build_lfw_cache(lfw, root / "crops", preprocess.CropOptions())
    return lfw, root / "crops"


def test_harmonic_cross(tiny_lfw_crops, tmp_path):
    tf = pytest.importorskip("tensorflow", reason="harmonic_cross.py embeds with Keras models (the train extra)")
    lfw, crops = tiny_lfw_crops
    paths = {}
    for name, seed in (("old", 0), ("other", 1)):
        tf.keras.utils.set_random_seed(seed)
        inputs = tf.keras.Input((96, 96, 3))
        x = tf.keras.layers.Conv2D(4, 3, strides=4, activation="relu")(inputs)
        outputs = tf.keras.layers.Dense(8)(tf.keras.layers.GlobalAveragePooling2D()(x))
        paths[name] = tmp_path / f"{name}.keras"
        tf.keras.Model(inputs, outputs, name=name).save(paths[name])
    out = tmp_path / "out"
    new = ["--new", f"other={paths['other']}", "--new", f"same={paths['old']}"]
    args = ["--old", str(paths["old"]), *new, "--lfw", str(lfw), "--lfw-cache", str(crops)]
    results = run_benchmark("harmonic_cross", out, *args, quick=False)["results"]
    assert 0.0 <= results["old"]["lfw"]["accuracy_mean"] <= 1.0
    assert set(results["new"]) == {"other", "same"}
    for scores in results["new"].values():
        for key in ("lfw", "cross_lfw"):
            assert 0.0 <= scores[key]["accuracy_mean"] <= 1.0
    # The old model as its own successor: gallery and probes agree, so cross = its own scores.
    assert results["new"]["same"]["cross_lfw"] == results["new"]["same"]["lfw"] == results["old"]["lfw"]


def test_tight_crops(common, tiny_model, tiny_lfw_crops, tmp_path):
    lfw, _ = tiny_lfw_crops
    tight, cache = tmp_path / "tight", tmp_path / "cache"
    args = ["--model", str(tiny_model.int8), "--lfw", str(lfw), "--tight", str(tight), "--cache", str(cache)]
    report = run_benchmark("tight_crops", tmp_path / "out", *args, "--pairs", "20", quick=False)
    # The tight LFW: LFW's layout and pairs.txt, every image a square cut round the face.
    originals = sorted(p.relative_to(lfw) for p in lfw.glob("*/*.jpg"))
    assert sorted(p.relative_to(tight) for p in tight.glob("*/*.jpg")) == originals
    assert (tight / "pairs.txt").read_text() == (lfw / "pairs.txt").read_text()
    boxes = json.loads((tight / "tight_crops.json").read_text())["boxes"]
    for name in originals:
        left, top, right, bottom = boxes[str(name)]
        cut = read_image(tight / name)
        assert cut.shape[:2] == (bottom - top, right - left) and 40 < cut.shape[0] < 150
    scores = {(s["variant"], s["fill"]): s for s in report["results"]["scores"]}
    assert set(scores) == {(v, f) for v in ("full", "tight") for f in ("replicate", "black", "grey", "reflect")}
    for s in scores.values():
        assert 0.0 <= s["accuracy_mean"] <= 1.0 and len(s["fold_accuracies"]) == 10
        assert [t["pairs"] for t in s["terciles"]] == [7, 7, 6]
        assert sum(s["images"].values()) == report["config"]["images"] == 20
    # A 1.1x cut leaves much of the aligned crop to the fill; the full photo hardly any.
    tight_share = scores[("tight", "replicate")]["outside_fraction_median"]
    assert tight_share > 0.2 and scores[("full", "replicate")]["outside_fraction_median"] < 0.05
    assert scores[("tight", "black")]["images_with_outside"] == 20
    # The fills change what the model sees on the tight cuts.
    embeddings = {}
    for fill in ("replicate", "black"):
        (path,) = cache.glob(f"lfw-tight-tiny_int8-*-{fill}-{DEFAULT_DETECTOR}.npz")
        with np.load(path) as data:
            embeddings[fill] = data["embeddings"]
    assert not np.allclose(embeddings["replicate"], embeddings["black"])
    # The tight folder is a plain LFW: the runtime-path code scores it unchanged, as the script did.
    pairs = common.load_lfw(tight, 20)
    with common.LfwFaces(DEFAULT_DETECTOR) as faces, embed_module.Embedder.from_path(tiny_model.int8) as embedder:
        descriptors, _ = common.lfw_embeddings(pairs, faces, "check", common.describe_with(embedder), tmp_path / "c")
    assert common.lfw_result(pairs, descriptors).accuracy_mean == scores[("tight", "replicate")]["accuracy_mean"]


def test_door_distance_places_the_photo_where_the_camera_would_see_it(common, monkeypatch):
    door = load_benchmark("door_distance", monkeypatch, common=common)
    camera = door.Camera(640, 480, 90.0)  # f = 320 px: eyes 63 mm apart are 20.16 px apart at 1 m
    assert camera.eye_distance_px(1.0) == pytest.approx(20.16)
    photo = np.zeros((250, 250, 3), np.uint8)
    photo[100:150, 100:150] = 255
    metres = camera.focal_px * door.EYE_DISTANCE_M / door.LFW_EYE_DISTANCE_PX  # the photo's own scale
    frame = camera.frame(photo, metres)
    assert frame.shape == (480, 640, 3) and frame[0, 0, 0] == 128
    rows, cols = np.nonzero(frame[..., 0] == 255)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (215, 264, 295, 344)  # centred, unscaled
    near = camera.frame(photo, metres / 4)  # four times larger than the frame is tall: its middle
    assert near.shape == (480, 640, 3) and (near[240, 320] == 255).all() and (near[0, 0] == 0).all()


def test_door_distance(tiny_model, tiny_lfw_crops, tmp_path):
    lfw, _ = tiny_lfw_crops
    args = ["--model", str(tiny_model.int8), "--lfw", str(lfw), "--cache", str(tmp_path / "cache"),
            "--detectors", "blazeface,yunet", "--distances", "0.5,1", "--detect-widths", "640,160"]
    report = run_benchmark("door_distance", tmp_path / "out", *args, quick=False)
    every = report["results"]["scores"]
    scores = {(s["detector"], s["metres"]): s for s in every if s["detect_width"] in (None, 640)}
    assert set(scores) == {(d, m) for d in ("blazeface", "yunet") for m in (None, 0.5, 1.0)}
    assert len(every) == 2 * (1 + 2 * 2)  # per detector: the photos, then two distances per width
    for s in scores.values():
        assert 0.0 <= s["accuracy_mean"] <= 1.0 and len(s["fold_accuracies"]) == 10
        assert 0.0 <= s["found"] <= 1.0
        assert (s["detect_ms"] is None) == (s["metres"] is None)
    # The fake LFW's faces are half LFW's size: 1 m looks like 2 m, where BlazeFace, which sees
    # the whole frame at 128 x 128, misses faces and YuNet finds every one.
    assert scores[("yunet", 1.0)]["found"] == 1.0 and scores[("blazeface", 1.0)]["found"] < 1.0
    # YuNet on frames shrunk to 160 px wide: the faces are a quarter of their size, and it misses some.
    shrunk = {s["metres"]: s for s in every if s["detector"] == "yunet" and s["detect_width"] == 160}
    assert shrunk[1.0]["found"] < 1.0
    assert len(list((tmp_path / "cache").glob("door-*.npz"))) == 8
    assert (tmp_path / "out" / "door_distance.png").stat().st_size > 0


def test_tight_crops_refuses_a_folder_made_otherwise_or_inside_the_repo(tiny_model, tiny_lfw_crops, tmp_path):
    lfw, _ = tiny_lfw_crops
    args = ["--model", str(tiny_model.int8), "--lfw", str(lfw), "--pairs", "20", "--fills", "replicate"]
    run_benchmark("tight_crops", tmp_path / "out", *args, "--tight", str(tmp_path / "tight"), quick=False)
    for tight, factor, error in [
        (tmp_path / "tight", "1.5", "holds a tight LFW made with factor 1.1: pass another --tight DIR"),
        (BENCHMARKS / "tight", "1.1", "is inside the repository: pass a folder outside it"),
    ]:
        done = subprocess.run(
            [sys.executable, str(BENCHMARKS / "tight_crops.py"), *args, "--tight", str(tight), "--factor", factor,
             "--out", str(tmp_path / "out")],
            capture_output=True, text=True, timeout=300,
        )
        assert done.returncode == 1 and error in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (BENCHMARKS / "tight").exists()


def orthonormal_basis(rows: int, columns: int, seed: int) -> np.ndarray:
    """(rows, columns) float32 with orthonormal columns: a teacher_basis.npy."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((rows, columns)))
    return q.astype(np.float32)


def fake_space(folder: Path, width: int = 512, size: int = 128, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A training run folder holding a teacher mean and basis; returns them."""
    folder.mkdir(parents=True)
    mean = np.random.default_rng(seed).standard_normal(width).astype(np.float32)
    basis = orthonormal_basis(width, size, seed)
    np.save(folder / data.TEACHER_MEAN, mean)
    np.save(folder / data.TEACHER_BASIS, basis)
    return mean, basis


def template_crops_of(cache: Path) -> np.ndarray:
    """Every face of a preprocess-lfw cache as the 96 px template crop, in cache order."""
    faces = data.load_cache(cache)
    return augment.centre_crop(faces.crops, faces.manifest.crop_size)


def load_benchmark(name: str, monkeypatch, **siblings: types.ModuleType) -> types.ModuleType:
    """benchmarks/NAME.py as a module, run in this process; each of its ``from SIBLING
    import`` gets the module given for it."""
    for sibling, module in siblings.items():
        monkeypatch.setitem(sys.modules, sibling, module)
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look up their module while being defined
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def teacher_agreement(common, monkeypatch) -> types.ModuleType:
    return load_benchmark("teacher_agreement", monkeypatch, common=common)


@pytest.fixture
def fake_teacher(tmp_path) -> Path:
    """An ONNX stand-in for the EdgeFace export: (n, 3, 112, 112) -> (n, 512), 14 px average
    pooling then a fixed random linear map."""
    onnx = pytest.importorskip("onnx", reason="the fake teacher is written with onnx")
    pytest.importorskip("onnxruntime", reason="the teacher runs in onnxruntime (the teacher extra)")
    from onnx import TensorProto, helper, numpy_helper

    weights = np.random.default_rng(1).standard_normal((3 * 8 * 8, 512)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("AveragePool", ["input"], ["pooled"], kernel_shape=[14, 14], strides=[14, 14]),
         helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
         helper.make_node("MatMul", ["flat", "weights"], ["embedding"])],
        "fake_edgeface",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 3, 112, 112])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["n", 512])],
        [numpy_helper.from_array(weights, "weights")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "fake_edgeface.onnx"
    onnx.save(model, str(path))
    return path


def test_teacher_agreement_is_one_for_a_student_inside_the_teachers_space(tiny_model, tiny_lfw_crops, tmp_path):
    # A teacher whose descriptor is the int8 model's embedding rotated into 512-d and
    # shifted by the run's mean: centred and projected, it is that embedding again.
    _, cache = tiny_lfw_crops
    crops = template_crops_of(cache)
    with embed_module.Embedder.from_path(tiny_model.int8) as embedder:
        int8 = embedder.embed(crops)
    with embed_module.Embedder.from_path(tiny_model.float32) as embedder:
        float32 = embedder.embed(crops)
    mean, basis = fake_space(tmp_path / "run")
    np.save(tmp_path / "teacher.npy", int8 @ basis.T + mean)
    unused = tmp_path / "never_run.onnx"
    unused.write_bytes(b"")  # the cache holds every face: the teacher is not loaded
    args = ["--model", str(tiny_model.int8), "--model", str(tiny_model.float32), "--teacher-onnx", str(unused),
            "--space", str(tmp_path / "run"), "--lfw-cache", str(cache),
            "--teacher-cache", str(tmp_path / "teacher.npy")]
    report = run_benchmark("teacher_agreement", tmp_path / "out", *args, quick=False)
    rows = {r["model"]: r for r in report["results"]["models"]}
    assert set(rows) == {"tiny_int8", "tiny_float"}
    assert rows["tiny_int8"]["faces"] == rows["tiny_float"]["faces"] == len(crops) == 20
    assert report["config"]["teacher_descriptors"].startswith("read from")
    for key in ("mean", "median", "p10"):
        assert rows["tiny_int8"][key] == pytest.approx(1.0, abs=1e-5)
    # The float model against the int8 model's embeddings as the teacher: their own cosines.
    agreement = np.sum(float32 * int8, axis=1)
    assert agreement.min() < 0.9999  # int8 moved the embeddings: the row measures something
    assert rows["tiny_float"]["mean"] == pytest.approx(agreement.mean(), abs=1e-5)
    assert rows["tiny_float"]["median"] == pytest.approx(np.median(agreement), abs=1e-5)
    assert rows["tiny_float"]["p10"] == pytest.approx(np.percentile(agreement, 10), abs=1e-5)


def test_teacher_agreement_describes_every_face_once_into_its_cache(
        teacher_agreement, fake_teacher, tiny_model, tiny_lfw_crops, tmp_path, capsys):
    _, cache = tiny_lfw_crops
    mean, basis = fake_space(tmp_path / "run")
    teacher_cache, out = tmp_path / "teacher.npy", tmp_path / "out"
    args = ["--model", str(tiny_model.int8), "--teacher-onnx", str(fake_teacher), "--space", str(tmp_path / "run"),
            "--lfw-cache", str(cache), "--teacher-cache", str(teacher_cache), "--faces", "8", "--out", str(out)]
    assert teacher_agreement.main(args) == 0
    first = json.loads((out / "teacher_agreement.json").read_text())
    assert first["config"]["teacher_descriptors"] == f"computed, written to {teacher_cache}"
    (row,) = first["results"]["models"]
    assert row["faces"] == 8 and -1.0 <= row["p10"] <= row["median"] <= 1.0
    # The cache: the teacher (with flip, its default) on every face of the LFW cache, in order.
    crops = template_crops_of(cache)
    descriptors = EdgeFaceTeacher(fake_teacher).describe(crops)
    assert np.allclose(np.load(teacher_cache), descriptors, atol=1e-5)
    # The 8 faces spread over the cache, scored as the module's cosine says.
    chosen = teacher_agreement.pick_faces(len(crops), 8)
    assert chosen[0] == 0 and chosen[-1] == len(crops) - 1 and len(set(chosen)) == 8
    with embed_module.Embedder.from_path(tiny_model.int8) as embedder:
        expected = teacher_agreement.cosines(embedder.embed(crops[chosen]), descriptors[chosen], mean, basis)
    assert row["mean"] == pytest.approx(expected.mean(), abs=1e-5)
    # A second run reads the cache and gives the same numbers.
    assert teacher_agreement.main(args) == 0
    second = json.loads((out / "teacher_agreement.json").read_text())
    assert second["config"]["teacher_descriptors"] == f"read from {teacher_cache}"
    assert second["results"] == first["results"]
    assert "| tiny_int8 | int8 | 8 |" in capsys.readouterr().out


def test_teacher_agreement_names_a_missing_or_mismatched_input(teacher_agreement, tiny_model, tiny_lfw_crops,
                                                               tmp_path, capsys):
    _, cache = tiny_lfw_crops
    fake_space(tmp_path / "run")
    onnx_file = tmp_path / "teacher.onnx"
    onnx_file.write_bytes(b"")
    np.save(tmp_path / "short.npy", np.zeros((3, 512), np.float32))
    no_basis = tmp_path / "no_basis"
    fake_space(no_basis)
    (no_basis / data.TEACHER_BASIS).unlink()
    base = {"--teacher-onnx": onnx_file, "--space": tmp_path / "run", "--lfw-cache": cache}
    for change, error in [
        ({"--space": no_basis}, f"--space {no_basis} holds no {data.TEACHER_BASIS}"),
        ({"--teacher-onnx": tmp_path / "absent.onnx"}, "--teacher-onnx"),
        ({"--lfw-cache": tmp_path}, "no crop cache at"),
        ({"--teacher-cache": tmp_path / "short.npy"}, "holds (3, 512) descriptors, --lfw-cache has 20 faces"),
    ]:
        options = {**base, **change}
        args = ["--model", str(tiny_model.int8), "--out", str(tmp_path / "out")]
        args += [str(item) for option, value in options.items() for item in (option, value)]
        assert teacher_agreement.main(args) == 1
        err = capsys.readouterr().err
        assert error in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


@pytest.fixture
def layer_probes(common, teacher_agreement, monkeypatch) -> types.ModuleType:
    return load_benchmark("layer_probes", monkeypatch, common=common, teacher_agreement=teacher_agreement)


PROBE_SHARDS, PROBE_SHARD_SIZE, PROBE_EXCLUDED, PROBE_NO_TEACHER = 4, 150, 5, 3


@pytest.fixture
def probe_inputs(tiny_lfw_crops, monkeypatch, tmp_path) -> dict[str, Path]:
    """What layer_probes.py reads, small: a two-convolution student's compact weights; a
    training crop cache of 4 shards x 150 smooth random colour patterns, whose teacher descriptors are an
    exact linear function of the student's conv2_relu features averaged over positions (the
    first 5 faces an LFW-overlap person's, 3 faces of shard 2 without a descriptor); the
    fake LFW with the teacher's descriptors of its crops made the same way; a run's space."""
    tf = pytest.importorskip("tensorflow", reason="layer_probes.py probes Keras models (the train extra)")
    cv2 = pytest.importorskip("cv2")
    from facenet_train import checkpoint, models
    from facenet_train.evaluation import default_card

    spec = models.ModelSpec("probe_tiny", (96, 96, 3), (models.Conv("conv1", 8, 3, 2), models.MaxPool("pool1"),
                                                         models.Conv("conv2", 8, 3, 2), models.MaxPool("pool2")),
                            0, models.PaperReference(None, None, "tests only"), "two convolutions, for tests")
    monkeypatch.setitem(models.MODELS, spec.name, spec)
    tf.keras.utils.set_random_seed(0)
    model = models.build_model(spec.name, embedding_size=16)
    weights = checkpoint.save_compact(model, tmp_path / "probe_tiny.npz")
    card = default_card(model)
    conv2 = tf.keras.Model(model.input, model.get_layer("conv2_relu").output)

    def pooled(template_crops: np.ndarray) -> np.ndarray:
        return np.asarray(conv2(embed_module.normalise(template_crops.astype(np.float32), card))).mean(axis=(1, 2))

    rng = np.random.default_rng(0)
    count = PROBE_SHARDS * PROBE_SHARD_SIZE
    crops = np.stack([cv2.resize(rng.random((4, 4, 3)).astype(np.float32), (112, 112), interpolation=cv2.INTER_CUBIC)
                      for _ in range(count)])
    crops = (255 * crops.clip(0, 1)).astype(np.uint8)
    identities = np.array(["lfwish/Some_One"] * PROBE_EXCLUDED + [f"synthetic/{i // 6}"
                                                                    for i in range(PROBE_EXCLUDED, count)])
    (tmp_path / "overlap.txt").write_text("lfwish\tSome_One\tSome_One\n")
    features = pooled(augment.centre_crop(crops, 96))
    # The faces the probes train on: shards 0, 2, 3 (3 spread over 4), less the excluded and undescribed ones.
    used = np.isin(np.arange(count) // PROBE_SHARD_SIZE, [0, 2, 3]) & (identities != "lfwish/Some_One")
    undescribed = 2 * PROBE_SHARD_SIZE + np.arange(PROBE_NO_TEACHER)
    used[undescribed] = False
    centre = features[used].mean(axis=0)  # the targets are centred like the probes' standardised features
    mean, basis = fake_space(tmp_path / "run", width=32, size=16)
    mixing = np.random.default_rng(2).standard_normal((features.shape[1], 16)).astype(np.float32)

    def teacher_of(x: np.ndarray) -> np.ndarray:
        return ((x - centre) @ mixing @ basis.T + mean).astype(np.float32)

    teacher = teacher_of(features)
    teacher[undescribed] = np.nan
    cache = tmp_path / "crops"
    cache.mkdir()
    shards = [data.shard_name(i) for i in range(PROBE_SHARDS)]
    for i, shard in enumerate(shards):
        part = slice(i * PROBE_SHARD_SIZE, (i + 1) * PROBE_SHARD_SIZE)
        data.write_npz_atomic(cache / shard, crops=crops[part], labels=np.zeros(PROBE_SHARD_SIZE, np.int32),
                              identities=identities[part], sources=np.array(["synthetic"] * PROBE_SHARD_SIZE),
                              paths=np.array([f"/synthetic/{i}/{j}.png" for j in range(PROBE_SHARD_SIZE)]),
                              boxes=np.zeros((PROBE_SHARD_SIZE, 4), np.float32),
                              landmarks=np.zeros((PROBE_SHARD_SIZE, 4, 2), np.float32),
                              scores=np.ones(PROBE_SHARD_SIZE, np.float32), pads=np.zeros(PROBE_SHARD_SIZE, np.int32))
        np.save(cache / data.teacher_name(shard), teacher[part])
    data.CacheManifest(crop_size=96, border=8, template="facenet96", detector="synthetic",
                       aligner=data.aligner_version(), shard_size=PROBE_SHARD_SIZE, plan="synthetic",
                       people=sorted(set(identities)), shards=shards, complete=True).save(cache)
    lfw, lfw_cache = tiny_lfw_crops
    np.save(tmp_path / "teacher_lfw.npy", teacher_of(pooled(template_crops_of(lfw_cache))))
    unused = tmp_path / "never_run.onnx"
    unused.write_bytes(b"")  # the teacher cache holds every LFW face: the teacher is not loaded
    return {"--weights": weights, "--crops": cache, "--exclude": tmp_path / "overlap.txt", "--space": tmp_path / "run",
            "--lfw": lfw, "--lfw-cache": lfw_cache, "--teacher-onnx": unused,
            "--teacher-cache": tmp_path / "teacher_lfw.npy", "--out": tmp_path / "out"}


def probe_args(inputs: dict[str, Path], *extra: str) -> list[str]:
    return [str(item) for option, value in inputs.items() for item in (option, value)] + list(extra)


def test_layer_probes_recover_a_teacher_linear_in_a_layers_pooled_features(layer_probes, probe_inputs, capsys):
    args = probe_args(probe_inputs, "--shards", "3", "--layers", "conv2_relu", "flatten")
    assert layer_probes.main(args) == 0
    report = json.loads((probe_inputs["--out"] / "layer_probes.json").read_text())
    assert report["benchmark"] == "layer_probes" and MACHINE_KEYS <= set(report["machine"])
    config, results = report["config"], report["results"]
    assert config["shards"] == ["shard-00000.npz", "shard-00002.npz", "shard-00003.npz"]
    assert (config["excluded_faces"], config["faces_without_teacher"]) == (PROBE_EXCLUDED, PROBE_NO_TEACHER)
    assert config["training_faces"] == 3 * PROBE_SHARD_SIZE - PROBE_EXCLUDED - PROBE_NO_TEACHER
    assert config["lfw_crops"] == 20 and config["teacher_descriptors"].startswith("read from")
    probes = {(p["layer"], p["features"]): p for p in results["probes"]}
    # conv2_relu's 12x12x8 map is under 10,000 values: probed pooled and whole; flatten is a vector.
    assert set(probes) == {("conv2_relu", "pooled"), ("conv2_relu", "spatial"), ("flatten", "vector")}
    assert [probes[k]["dims"] for k in sorted(probes)] == [8, 1152, 8]
    # The teacher is linear in conv2_relu's pooled features: that probe finds it, on faces it never saw too
    # (cosine 1 but for the grid's smallest ridge, 10, shrinking it a little); flatten (its max-pooled map,
    # averaged) is not linear in them and does clearly worse.
    exact = probes[("conv2_relu", "pooled")]
    assert exact["heldout_cosine"] > 0.98 and exact["train_cosine"] > 0.98
    assert exact["ridge"] == 10.0 and set(exact["ridge_validation"]) == {"10", "100", "1000", "10000"}
    assert exact["ridge_validation"]["10"] == max(exact["ridge_validation"].values())
    assert probes[("flatten", "vector")]["heldout_cosine"] < exact["heldout_cosine"] - 0.05
    for p in [results["model_output"], *probes.values()]:
        assert 0.0 <= p["lfw"]["accuracy_mean"] <= 1.0 and 0.0 <= p["lfw"]["val_mean"] <= 1.0
    # The reference row: the random-weight model's own 16-d output against the same targets.
    assert results["model_output"]["dims"] == 16 and results["model_output"]["ridge"] is None
    assert -1.0 <= results["model_output"]["heldout_cosine"] < 0.9
    out = capsys.readouterr().out
    assert "| conv2_relu pooled | 8 |" in out and "| model output embedding | 16 | — |" in out


def test_lfw_crop_pairs_name_each_crops_row_in_the_cache(tiny_lfw_crops):
    lfw, cache = tiny_lfw_crops
    pairs = LfwCropPairs.load(lfw, cache, 96)
    assert np.array_equal(pairs.crops, template_crops_of(cache)[pairs.rows])


def test_layer_probes_name_a_missing_or_mismatched_input(layer_probes, probe_inputs, tmp_path, capsys):
    (probe_inputs["--crops"] / data.teacher_name(data.shard_name(3))).unlink()
    for change, extra, error in [
        ({"--weights": tmp_path / "absent.npz"}, [], "--weights"),
        ({"--exclude": tmp_path / "absent.txt"}, [], "--exclude"),
        ({"--crops": tmp_path}, [], "no crop cache at"),
        ({}, ["--shards", "4"], "teacher descriptors missing"),
        ({}, ["--shards", "1", "--layers", "conv2_relu", "no_such_layer"], "probe_tiny has no layer no_such_layer"),
    ]:
        assert layer_probes.main(probe_args({**probe_inputs, **change}, *extra)) == 1
        err = capsys.readouterr().err
        assert error in err and len(err.strip().splitlines()) == 1, err
    assert not probe_inputs["--out"].exists()
