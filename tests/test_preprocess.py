"""``facenet-train preprocess`` on a tmp folder of astronaut variants (no TensorFlow)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from facenet_edge.align import align
from facenet_edge.detect import Detection
from facenet_edge.io import read_image
from facenet_train import cli, data, preprocess
from facenet_train.augment import centre_crop

# The astronaut's face as BlazeFace finds it in the 512 x 512 image.
FACE_BOX = (178, 81, 272, 175)


def _write(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


@pytest.fixture(scope="module")
def datasets(astronaut, tmp_path_factory) -> Path:
    """faces/<person>/...: astronaut variants, a tight crop (found only when padded), an
    image without a face and a corrupt file; flat/: two unlabeled images."""
    root = tmp_path_factory.mktemp("datasets")
    x1, y1, x2, y2 = FACE_BOX
    grey = cv2.cvtColor(cv2.cvtColor(astronaut, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
    rotated = cv2.warpAffine(astronaut, cv2.getRotationMatrix2D((256, 256), 10, 1.0), (512, 512))
    tight = cv2.resize(astronaut[y1 + 9:y2 - 9, x1 + 9:x2 - 9], (112, 112))
    noise = np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    _write(root / "faces" / "anna" / "0.png", astronaut)
    _write(root / "faces" / "anna" / "1.jpg", np.ascontiguousarray(astronaut[:, ::-1]))
    _write(root / "faces" / "anna" / "2.png", cv2.resize(astronaut, (256, 256)))
    _write(root / "faces" / "bob" / "0.png", grey)
    _write(root / "faces" / "bob" / "1.png", rotated)
    _write(root / "faces" / "bob" / "2.png", (astronaut * 0.6).astype(np.uint8))
    _write(root / "faces" / "cy" / "0.png", tight)
    _write(root / "faces" / "cy" / "1.png", noise)
    (root / "faces" / "cy" / "2.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    _write(root / "flat" / "a.png", cv2.resize(astronaut, (300, 300)))
    _write(root / "flat" / "b.png", astronaut[40:400, 60:420])
    return root


def _arrays(cache: Path) -> dict[str, np.ndarray]:
    merged: dict[str, list] = {}
    for shard in data.CacheManifest.load(cache).shards:
        for name, array in data.read_shard(cache / shard).items():
            merged.setdefault(name, []).append(array)
    return {name: np.concatenate(parts) for name, parts in merged.items()}


def test_preprocess_command_builds_the_cache(datasets, tmp_path, capsys):
    out = tmp_path / "cache"
    # BlazeFace, which needs the padded retry for the tight photo (YuNet finds that face directly).
    argv = ["preprocess", "--data", "faces,flat", "--datasets-dir", str(datasets), "--out", str(out),
            "--workers", "1", "--shard-size", "4", "--detector", "blazeface"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "11 images from faces, flat" in printed and "identities: 3" in printed

    manifest = data.CacheManifest.load(out)
    assert manifest.complete and manifest.full_size == 112 and manifest.detector == "blazeface"
    assert manifest.aligner == data.aligner_version() and manifest.aligner.startswith("facenet_edge.align sha256:")
    assert manifest.shards == ["shard-00000.npz", "shard-00001.npz", "shard-00002.npz"]
    assert manifest.people == ["faces/anna", "faces/bob", "faces/cy"]
    assert manifest.sources == {"faces": {"faces": 7, "direct": 6, "padded": 1, "failed": 2},
                                "flat": {"faces": 2, "direct": 2}}
    failures = (out / data.FAILURES_NAME).read_text().splitlines()
    assert failures[0] == "source\tpath\treason" and len(failures) == 3
    assert failures[1].endswith("cy/1.png\tno face")
    assert "cy/2.jpg\tunreadable" in failures[2]

    cache = data.load_cache(out)
    assert cache.crops.shape == (9, 112, 112, 3) and cache.crops.dtype == np.uint8
    np.testing.assert_array_equal(cache.labels, [0, 0, 0, 1, 1, 1, 2, -1, -1])
    assert cache.identities.tolist()[:4] == ["faces/anna"] * 3 + ["faces/bob"] and cache.identities[-1] == ""
    assert cache.pads.tolist() == [0, 0, 0, 0, 0, 0, 28, 0, 0]  # the tight crop: 25 % of 112 px of padding
    # The crop is the runtime's crop of the stored detection (in original-image pixels),
    # up to warpAffine's fixed-point rounding (see test_data) and float32 landmarks.
    for i in (0, 4, 6):
        image = read_image(cache.paths[i])
        detection = Detection(box=cache.boxes[i], score=float(cache.scores[i]), landmarks=cache.landmarks[i])
        runtime = align(image, detection, (96, 96))
        difference = np.abs(centre_crop(cache.crops[i:i + 1], 96)[0].astype(int) - runtime)
        assert difference.max() <= 4 and np.mean(difference > 0) < 0.02
    # The padded detection was moved back into the tight crop's own coordinates.
    x1, y1, x2, y2 = cache.boxes[6]
    assert 36 < (x1 + x2) / 2 < 76 and 36 < (y1 + y2) / 2 < 76 and 80 < x2 - x1 < 200


def test_interrupted_preprocess_resumes_to_the_same_cache(datasets, tmp_path, monkeypatch):
    samples, _, _ = preprocess.gather_samples(["faces", "flat"], datasets)
    options = preprocess.CropOptions()
    reference = preprocess.build_cache(samples, tmp_path / "reference", options, shard_size=4)

    real = preprocess._process
    calls = []

    def stop_in_second_shard(item):
        calls.append(item)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return real(item)

    out = tmp_path / "cache"
    monkeypatch.setattr(preprocess, "_process", stop_in_second_shard)
    with pytest.raises(KeyboardInterrupt):
        preprocess.build_cache(samples, out, options, shard_size=4)
    monkeypatch.setattr(preprocess, "_process", real)
    assert sorted(p.name for p in out.glob("shard-*")) == ["shard-00000.npz"]  # no half shard left
    assert not data.CacheManifest.load(out).complete
    with pytest.raises(ValueError, match="incomplete"):
        data.load_cache(out)
    first = (out / "shard-00000.npz").stat().st_mtime_ns

    manifest = preprocess.build_cache(samples, out, options, shard_size=4)
    assert manifest.complete and (out / "shard-00000.npz").stat().st_mtime_ns == first  # not redone
    got, want = _arrays(out), _arrays(tmp_path / "reference")
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert manifest.sources == reference.sources

    with pytest.raises(ValueError, match="other images or settings"):
        preprocess.build_cache(samples, out, preprocess.CropOptions(border=4), shard_size=4)


def test_worker_processes_give_the_same_crops(datasets, tmp_path):
    samples, _, _ = preprocess.gather_samples(["faces"], datasets, limit=5)
    assert len(samples) == 5
    preprocess.build_cache(samples, tmp_path / "one", preprocess.CropOptions(), shard_size=3, workers=1)
    preprocess.build_cache(samples, tmp_path / "two", preprocess.CropOptions(), shard_size=3, workers=2)
    one, two = _arrays(tmp_path / "one"), _arrays(tmp_path / "two")
    for name in one:
        np.testing.assert_array_equal(one[name], two[name], err_msg=name)


def test_exclusion_and_limit(datasets, tmp_path):
    overlap = tmp_path / "overlap.txt"
    overlap.write_text("faces\tbob\tBob\n")
    samples, excluded, duplicates = preprocess.gather_samples(["faces", "flat"], datasets, limit=4,
                                                              exclude_files=[overlap])
    assert excluded == {"faces/bob"} and duplicates == 0
    assert [s.identity for s in samples] == ["faces/anna"] * 3 + ["faces/cy"] + [None, None]


def test_summary_lists_every_source(datasets, tmp_path, capsys):
    samples, _, _ = preprocess.gather_samples(["flat"], datasets)
    manifest = preprocess.build_cache(samples, tmp_path / "c", preprocess.CropOptions(), shard_size=10)
    preprocess.print_summary(manifest, tmp_path / "c")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["source", "faces", "direct", "padded", "fallback", "no", "face"]
    assert lines[1].split() == ["flat", "2", "2", "0", "0", "0"]
    assert json.loads((tmp_path / "c" / data.MANIFEST_NAME).read_text())["complete"] is True


def test_teacher_describes_every_cached_face_and_resumes(datasets, tmp_path):
    pytest.importorskip("dlib", reason="the teacher needs the `teacher` extra (dlib-bin, face-recognition-models)")
    pytest.importorskip("face_recognition_models", reason="the teacher needs face-recognition-models")
    from facenet_train import teacher

    samples, _, _ = preprocess.gather_samples(["faces"], datasets, limit=6)  # anna and bob: 6 faces
    out = tmp_path / "cache"
    preprocess.build_cache(samples, out, preprocess.CropOptions(), shard_size=4)
    faces, seconds = teacher.compute_teacher(out, teacher.TeacherOptions('dlib', workers=1))
    assert faces == 6 and seconds > 0
    cache = data.load_cache(out, with_teacher=True)
    assert cache.teacher.shape == (6, 128) and np.isfinite(cache.teacher).all()
    # The same face in every variant: within dlib's own 0.6 tolerance of the original.
    distances = np.linalg.norm(cache.teacher - cache.teacher[0], axis=1)
    assert distances.max() < 0.6
    assert teacher.compute_teacher(out, teacher.TeacherOptions('dlib', workers=1))[0] == 0  # nothing left to do
