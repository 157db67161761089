"""The examples in examples/, driven by video files and image folders instead of a camera,
with the tiny random-weight model. A random model maps the same face to (almost) the same
embedding, so the astronaut enrolled from some frames is recognised in others."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import contextlib
import json
import logging
import os
import socket
import sqlite3
import stat
import sys
import threading
import time
import types
from pathlib import Path

import cv2
import numpy as np
import pytest

from facenet_edge import FacePipeline, Frame, Gallery, LatestFrameSource, ModelError, default_model_path, open_source

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str) -> types.ModuleType:
    """Import examples/NAME/NAME.py (the examples are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / name / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look up their module while being defined
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def door() -> types.ModuleType:
    return load_example("door_access")


@pytest.fixture(scope="module")
def stream() -> types.ModuleType:
    return load_example("stream_embed")


@pytest.fixture(scope="module")
def cluster() -> types.ModuleType:
    return load_example("cluster_photos")


def write_png(path: Path, rgb: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return path


def shifted(image: np.ndarray, k: int) -> np.ndarray:
    """The astronaut moved a few pixels: frames of someone standing still."""
    return np.ascontiguousarray(np.roll(image, 4 * k, axis=1))


@pytest.fixture
def video(tmp_path, astronaut) -> Path:
    """2 s of the astronaut at 10 fps (MJPG .avi): frame i is at t = i / 10."""
    path = tmp_path / "door.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, astronaut.shape[1::-1])
    for i in range(20):
        writer.write(cv2.cvtColor(shifted(astronaut, i % 3), cv2.COLOR_RGB2BGR))
    writer.release()
    return path


@pytest.fixture
def enrolled(tmp_path, door, model, astronaut, caplog) -> Path:
    """A gallery with Ada enrolled from a folder: three good photos, plus photos the
    enrolment must reject, each for its own reason."""
    photos = tmp_path / "ada"
    for k in range(3):
        write_png(photos / f"good{k}.png", shifted(astronaut, k))
    write_png(photos / "blurred.png", cv2.GaussianBlur(astronaut, (0, 0), 4))
    write_png(photos / "small.png", cv2.resize(astronaut, (160, 160)))
    write_png(photos / "two.png", np.concatenate([astronaut[:, 100:356]] * 2, axis=1))
    write_png(photos / "blank.png", np.full((120, 120, 3), 200, np.uint8))
    (photos / "notes.txt").write_text("not a photo")
    gallery = tmp_path / "door.db"
    caplog.set_level(logging.INFO, logger="door_access")
    argv = ["--model", model, "--gallery", str(gallery), "--enroll-folder", str(photos), "--name", "Ada"]
    assert door.main(argv) == 0
    log = caplog.text
    assert "blurred.png rejected: too blurry" in log
    assert "small.png rejected: face too small" in log
    assert "two.png rejected: 2 faces in view" in log
    assert "blank.png rejected: no face found" in log
    with Gallery.open(gallery) as opened:
        [person] = opened.list()
    assert (person.name, person.samples) == ("Ada", 3)
    return gallery


def access_rows(path: Path) -> list[tuple]:
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT name, granted, similarity, thumbnail FROM access ORDER BY id").fetchall()


# ------------------------------------------------------------------ door access


def test_door_grants_enrolled_person_and_logs_privately(door, model, enrolled, video, tmp_path):
    access_log = tmp_path / "access.db"
    argv = ["--model", model, "--gallery", str(enrolled), "--source", str(video), "--access-log", str(access_log)]
    assert door.main([*argv, "--save-thumbnails"]) == 0
    [(name, granted, similarity, thumbnail)] = access_rows(access_log)  # default cooldown: one decision
    assert (name, granted) == ("Ada", 1)
    assert similarity > 0.99  # same face, same frames: distance ~ 0
    assert thumbnail[:2] == b"\xff\xd8"  # a JPEG
    assert cv2.imdecode(np.frombuffer(thumbnail, np.uint8), cv2.IMREAD_COLOR).shape[2] == 3
    assert access_log.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize(("cooldown", "grants"), [(0, 6), (0.5, 3), (100, 1)])
def test_door_cooldown(door, model, enrolled, video, tmp_path, cooldown, grants):
    # 3 agreeing frames decide, then the vote starts afresh: decisions at t = 0.2, 0.5, ... 1.7.
    access_log = tmp_path / "access.db"
    argv = ["--model", model, "--gallery", str(enrolled), "--source", str(video), "--access-log", str(access_log)]
    assert door.main([*argv, "--vote", "5", "3", "--cooldown", str(cooldown)]) == 0
    rows = access_rows(access_log)
    assert [(name, granted) for name, granted, _, _ in rows] == [("Ada", 1)] * grants
    assert all(thumbnail is None for *_, thumbnail in rows)  # only with --save-thumbnails


def test_door_tracking_decides_once_per_person(door, model, enrolled, video, tmp_path):
    access_log = tmp_path / "access.db"
    argv = ["--model", model, "--gallery", str(enrolled), "--source", str(video), "--access-log", str(access_log)]
    assert door.main([*argv, "--track", "--cooldown", "0"]) == 0
    # One person standing still is one track: decided once (after min_frames embeddings),
    # then re-embedded only every reembed_every frames; the cooldown of 0 logs each frame's
    # decision, all for Ada.
    rows = access_rows(access_log)
    assert rows and {(name, granted) for name, granted, _, _ in rows} == {("Ada", 1)}
    with pytest.raises(SystemExit):
        door.main([*argv, "--track", "--fpir", "2"])


def test_door_refuses_and_logs_unknown(door, model, enrolled, video, tmp_path):
    access_log = tmp_path / "access.db"
    argv = ["--model", model, "--gallery", str(enrolled), "--source", str(video), "--access-log", str(access_log)]
    assert door.main([*argv, "--threshold", "1e-9"]) == 0  # nobody is that close
    [(name, granted, similarity, _)] = access_rows(access_log)
    assert (name, granted) == ("unknown", 0)
    assert similarity > 0.99  # the nearest person is still reported


def test_door_enrolls_from_camera_frames(door, model, video, tmp_path, caplog):
    gallery = tmp_path / "door.db"
    argv = ["--model", model, "--gallery", str(gallery), "--source", str(video), "--sample-interval", "0.5"]
    assert door.main([*argv, "--enroll", "Ada", "--samples", "3"]) == 0
    with Gallery.open(gallery) as opened:
        assert [(p.name, p.samples) for p in opened.list()] == [("Ada", 3)]
    # 2 s of video hold 4 samples 0.5 s apart: asking for 5 enrols nothing.
    assert door.main([*argv, "--enroll", "Bob", "--samples", "5"]) == 1
    assert "the source ended after 4 of 5 good frames; nothing enrolled" in caplog.text
    with Gallery.open(gallery) as opened:
        assert "Bob" not in opened


class RecordingUnlocker:
    """A pluggable unlock hook that remembers whom it let in."""

    def __init__(self) -> None:
        self.unlocked: list[str] = []
        self.closed = False

    def unlock(self, name: str) -> None:
        self.unlocked.append(name)

    def close(self) -> None:
        self.closed = True


def test_door_survives_bad_frames_and_ctrl_c(door, model, enrolled, astronaut, tmp_path):
    def frames():
        yield Frame(image=np.zeros((10, 10), np.uint8), timestamp=0.0, index=0)  # not RGB: bad
        for i in range(1, 4):
            yield Frame(image=astronaut, timestamp=i / 10, index=i)
        raise KeyboardInterrupt

    unlocker = RecordingUnlocker()
    access_log = door.AccessLog(tmp_path / "access.db")
    with FacePipeline(model_path=model) as pipeline, Gallery.open(enrolled) as gallery:
        stats = door.run_door(pipeline, gallery, frames(), unlocker, access_log, door.DoorSettings())
    access_log.close()
    assert (stats.frames, stats.bad_frames, stats.granted, stats.interrupted) == (4, 1, 1, True)
    assert unlocker.unlocked == ["Ada"]


def test_door_relay(door, monkeypatch):
    devices = []

    class OutputDevice:
        def __init__(self, pin, active_high=True, initial_value=False):
            self.pin, self.value, self.closed = pin, initial_value, False
            devices.append(self)

        def on(self):
            self.value = True

        def off(self):
            self.value = False

        def close(self):
            self.closed = True

    fake = types.ModuleType("gpiozero")
    fake.__spec__ = importlib.machinery.ModuleSpec("gpiozero", None)
    fake.OutputDevice = OutputDevice
    monkeypatch.setitem(sys.modules, "gpiozero", fake)
    relay = door.make_unlocker(17, seconds=0.05)
    assert isinstance(relay, door.RelayUnlocker)
    relay.unlock("Ada")
    [device] = devices
    assert device.value and device.pin == 17
    deadline = time.monotonic() + 5
    while device.value and time.monotonic() < deadline:  # switched off by its timer
        time.sleep(0.01)
    assert not device.value
    relay.unlock("Ada")
    relay.close()  # closing never leaves the door open
    assert not device.value and device.closed
    assert isinstance(door.make_unlocker(None, seconds=1), door.LogUnlocker)


def test_door_without_gpiozero_logs_unlocks(door, monkeypatch):
    monkeypatch.setitem(sys.modules, "gpiozero", None)  # as if not installed
    assert isinstance(door.make_unlocker(17, seconds=1), door.LogUnlocker)


def test_door_needs_a_model(door, caplog):
    try:
        default_model_path()
        pytest.skip("a default model is shipped")
    except ModelError:
        pass
    assert door.main(["--source", "nowhere.avi"]) == 1
    assert "no default model is shipped yet; pass --model PATH" in caplog.text


# ------------------------------------------------------------------ stream embed


def test_stream_embed_jsonl(stream, model, video, tmp_path, capsys):
    out = tmp_path / "faces.jsonl"
    assert stream.main(["--model", model, "--source", str(video), "--out", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["frame"] for r in records] == list(range(20))  # a file: every frame, in order
    assert [r["timestamp"] for r in records] == pytest.approx([i / 10 for i in range(20)])
    for r in records:
        assert set(r) == {"timestamp", "frame", "box", "score", "embedding"}
        assert len(r["box"]) == 4 and 0 < r["score"] <= 1
        assert len(r["embedding"]) == 128
        assert np.linalg.norm(r["embedding"]) == pytest.approx(1.0, abs=1e-3)
    assert out.stat().st_mode & 0o777 == 0o600
    assert "20 frames read, 20 processed, 0 skipped, 0 dropped" in capsys.readouterr().err


def test_stream_embed_npz_chunks_and_every(stream, model, video, tmp_path):
    out = tmp_path / "faces.npz"
    argv = ["--model", model, "--source", str(video), "--out", str(out), "--chunk", "4", "--every", "2", "-q"]
    assert stream.main(argv) == 0
    chunks = sorted(tmp_path.glob("faces-*.npz"))
    assert [c.name for c in chunks] == ["faces-00000.npz", "faces-00001.npz", "faces-00002.npz"]
    frames = []
    for chunk in chunks:
        assert chunk.stat().st_mode & 0o777 == 0o600
        with np.load(chunk) as data:
            assert data["embedding"].shape[1:] == (128,) and data["box"].shape[1:] == (4,)
            np.testing.assert_allclose(np.linalg.norm(data["embedding"], axis=1), 1.0, atol=1e-3)
            frames.extend(data["frame"].tolist())
    assert frames == list(range(0, 20, 2))


def test_stream_embed_fps_on_a_file_follows_the_video_clock(stream, model, video, tmp_path):
    out = tmp_path / "faces.jsonl"
    assert stream.main(["--model", model, "--source", str(video), "--out", str(out), "--fps", "2", "-q"]) == 0
    stamps = [json.loads(line)["timestamp"] for line in out.read_text().splitlines()]
    assert stamps == pytest.approx([0.0, 0.5, 1.0, 1.5])


def test_stream_embed_refuses_fps_on_a_folder(stream, model, astronaut, tmp_path, capsys):
    folder = tmp_path / "frames"
    for k in range(3):
        write_png(folder / f"{k}.png", shifted(astronaut, k))
    argv = ["--model", model, "--source", str(folder), "--out", str(tmp_path / "faces.jsonl"), "--fps", "2"]
    with pytest.raises(SystemExit) as exit_info:
        stream.main(argv)
    assert exit_info.value.code == 2
    assert "--fps needs a source with a clock (camera, stream, video file); for a folder use --every N" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "faces.jsonl").exists()


@pytest.mark.parametrize("name", ["faces.jsonl", "faces.npz"])
def test_stream_embed_missing_output_folder_is_one_line(stream, model, video, tmp_path, capsys, name):
    out = tmp_path / "nodir" / name
    assert stream.main(["--model", model, "--source", str(video), "--out", str(out), "-q"]) == 1
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == f"stream_embed: error: output folder does not exist: {tmp_path / 'nodir'}"
    assert "Errno" not in err


class FakeLiveSource:
    """A camera delivering frames faster than they are consumed."""

    live = True

    def __init__(self, image: np.ndarray, count: int, interval_s: float):
        self.image, self.count, self.interval_s = image, count, interval_s
        self.closed = threading.Event()

    def __iter__(self):
        for i in range(self.count):
            time.sleep(self.interval_s)
            yield Frame(image=self.image, timestamp=time.monotonic(), index=i)

    def close(self) -> None:
        self.closed.set()


def test_stream_embed_live_source_drops_frames_a_slow_device_cannot_take(stream, model, astronaut, tmp_path):
    source = FakeLiveSource(astronaut, count=60, interval_s=0.001)  # far faster than the pipeline
    writer = stream.JsonLinesWriter(str(tmp_path / "faces.jsonl"))
    with FacePipeline(model_path=model) as pipeline, LatestFrameSource(source) as frames:
        stats = stream.embed_stream(pipeline, frames, writer, stream.FrameGate(), file_clock=False)
    writer.close()
    assert stats.dropped > 0 and stats.read == stats.processed + stats.dropped == 60
    lines = [json.loads(line) for line in (tmp_path / "faces.jsonl").read_text().splitlines()]
    assert [r["frame"] for r in lines] == sorted(r["frame"] for r in lines) and lines[-1]["frame"] == 59
    assert source.closed.is_set()


def test_examples_read_live_sources_newest_frame_first(stream, door, monkeypatch, video):
    calls = []
    monkeypatch.setattr(door, "open_source", lambda spec, **options: calls.append((spec, options)))
    args = door.build_parser().parse_args(["--source", "rtsp://cam/door", "--max-retries", "forever"])
    door.open_camera(args)
    assert calls == [("rtsp://cam/door", {"latest_only": True, "max_retries": None})]
    assert door.build_parser().parse_args([]).max_retries == 10
    with pytest.raises(SystemExit):
        stream.build_parser().parse_args(["--out", "-", "--max-retries", "-1"])
    # latest_only leaves a video file alone: read frame by frame, nothing dropped.
    with open_source(str(video), latest_only=True) as source:
        assert not source.live and not isinstance(source, LatestFrameSource)


def test_stream_embed_skips_bad_frames(stream, model, astronaut, tmp_path):
    frames = [
        Frame(image=astronaut, timestamp=0.0, index=0),
        Frame(image=np.zeros((8, 8, 4), np.uint8), timestamp=0.1, index=1),  # 4 channels: bad
        Frame(image=astronaut, timestamp=0.2, index=2),
    ]
    writer = stream.JsonLinesWriter(str(tmp_path / "faces.jsonl"))
    with FacePipeline(model_path=model) as pipeline:
        stats = stream.embed_stream(
            pipeline, frames, writer, stream.FrameGate(), file_clock=True
        )
    writer.close()
    assert (stats.read, stats.processed, stats.bad, stats.faces, stats.dropped) == (3, 2, 1, 2, 0)


# ------------------------------------------------------------------ cluster photos


@pytest.fixture
def photo_tree(tmp_path, astronaut) -> Path:
    """Astronaut variants in two folders ("people"), blank images, and a file that is not an image."""
    root = tmp_path / "photos"
    for k in range(3):
        write_png(root / "ada" / f"ada_{k}.png", shifted(astronaut, k))
    write_png(root / "bob" / "bob_0.png", np.ascontiguousarray(astronaut[:, ::-1]))
    write_png(root / "bob" / "bob_1.png", cv2.resize(astronaut, (384, 384)))
    write_png(root / "blank_0.png", np.full((64, 64, 3), 255, np.uint8))
    write_png(root / "bob" / "blank_1.png", np.zeros((64, 64, 3), np.uint8))
    (root / "ada" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    return root


def test_cluster_photos(cluster, model, photo_tree, tmp_path, capsys):
    out = tmp_path / "clusters"
    assert cluster.main(["--model", model, str(photo_tree), str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["files"], summary["unreadable"], summary["without_faces"], summary["faces"]) == (8, 1, 2, 5)
    assert summary["threshold"] == 1.0  # the card's far_1e3
    assert summary["method"].startswith("average")  # the default: no chaining
    [group] = summary["clusters"]  # a random model sees one person
    assert group["faces"] == 5 and group["folder"] == "cluster_000"
    links = sorted((out / "cluster_000").glob("*__*.png"))
    names = ["ada__ada_0.png", "ada__ada_1.png", "ada__ada_2.png", "bob__bob_0.png", "bob__bob_1.png"]
    assert [p.name for p in links] == names
    assert all(p.is_symlink() and p.resolve().is_file() for p in links)
    sheet = cv2.imread(str(out / "cluster_000" / "contact_sheet.png"))
    assert sheet.shape == (112, 5 * 112, 3)
    assert stat.S_IMODE((out / "cluster_000" / "contact_sheet.png").stat().st_mode) == 0o600  # faces: private
    assert "labels" not in summary
    assert "1 cluster(s) of 2+ faces (5 faces), 0 unclustered (average, distance 1); " in capsys.readouterr().out
    # The output must be new or empty: a second run does not mix with the first.
    assert cluster.main(["--model", model, str(photo_tree), str(out)]) == 1


def test_cluster_photos_labels_threshold_copy(cluster, model, photo_tree, tmp_path, capsys):
    out = tmp_path / "clusters"
    argv = ["--model", model, "--method", "threshold", "--copy", "--labels-from-folders", "--tile", "64"]
    assert cluster.main([*argv, str(photo_tree), str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "threshold"
    # One cluster of 3 ada + 2 bob: purity 3/5; 4 of its 10 pairs are one person; all same-person pairs together.
    assert summary["labels"] == {
        "faces": 5,
        "people": 2,
        "purity": pytest.approx(0.6),
        "pairwise_precision": pytest.approx(0.4),
        "pairwise_recall": pytest.approx(1.0),
    }
    printed = capsys.readouterr().out.splitlines()[-1]
    assert printed == "labels: 2 people, 5 faces: purity 0.600, pairwise precision 0.400, pairwise recall 1.000"
    copies = list((out / "cluster_000").glob("*__*.png"))
    assert len(copies) == 5 and not any(p.is_symlink() for p in copies)
    assert cv2.imread(str(out / "cluster_000" / "contact_sheet.png")).shape == (64, 5 * 64, 3)


def test_cluster_contact_sheet_shows_the_crops_the_model_embedded(cluster, model, photo_tree, tmp_path):
    out = tmp_path / "clusters"
    assert cluster.main(["--model", model, "--tile", "96", str(photo_tree), str(out)]) == 0  # 96: the model input
    sheet = cv2.cvtColor(cv2.imread(str(out / "cluster_000" / "contact_sheet.png")), cv2.COLOR_BGR2RGB)
    with FacePipeline(model_path=model) as pipeline:
        (face,) = pipeline.process(cluster.read_image(photo_tree / "ada" / "ada_0.png"))  # the group's first face
    np.testing.assert_array_equal(sheet[:, :96], face.crop)


def test_crop_store(cluster):
    crops = [np.full((6, 4, 3), k, np.uint8) for k in range(3)]
    with cluster.CropStore() as store:
        assert [store.add(c) for c in crops] == [0, 1, 2]
        np.testing.assert_array_equal(store.get(1), crops[1])
        assert store.add(crops[0]) == 3 and store.get(2)[0, 0, 0] == 2  # reads and appends interleave
        with pytest.raises(ValueError, match="shape"):
            store.add(np.zeros((4, 4, 3), np.uint8))
        with pytest.raises(IndexError):
            store.get(4)


def test_label_metrics(cluster):
    groups = [np.array([0, 1, 2]), np.array([3, 4]), np.array([5])]
    metrics = cluster.label_metrics(groups, ["a", "a", "b", "b", "b", None])
    # purity (2 + 2) / 5; pairs together 3 + 1, of which a-a and b-b are right; same-person pairs 1 + 3
    assert metrics == {"faces": 5, "people": 2, "purity": 0.8, "pairwise_precision": 0.5, "pairwise_recall": 0.5}


def test_average_linkage_does_not_chain(cluster):
    # Faces along an arc, each within 0.4 of the next: one chain from the first to the last.
    angles = np.arange(12) * 0.3
    x = np.zeros((12, 128), np.float32)
    x[:, 0], x[:, 1] = np.cos(angles), np.sin(angles)  # neighbours: 2 - 2 cos(0.3) = 0.09 apart
    assert len(set(cluster.threshold_components(x, 0.1).tolist())) == 1
    # A third face is 0.09 from one of a pair and 0.35 from the other: 0.22 on average.
    assert np.bincount(cluster.average_clusters(x, 0.1, use_sklearn=False)).max() == 2


def clustered_vectors(seed: int, people: int = 8, faces: int = 80) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(people, 128))
    x = centres[rng.integers(0, people, faces)] / np.linalg.norm(centres, axis=1).mean()
    x = x + rng.normal(scale=0.08, size=x.shape)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Same grouping, whatever the label numbers: labels pair up one to one."""
    pairs = set(zip(a.tolist(), b.tolist(), strict=True))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


@pytest.mark.parametrize("seed", range(5))
def test_clustering_matches_scipy(cluster, seed):
    hierarchy = pytest.importorskip("scipy.cluster.hierarchy")
    from scipy.spatial.distance import squareform

    x = clustered_vectors(seed)
    threshold = [0.6, 0.9, 1.2, 1.5, 1.8][seed]
    distance = np.clip(2 - 2 * x.astype(np.float64) @ x.T.astype(np.float64), 0, 4)
    np.fill_diagonal(distance, 0)
    condensed = squareform(distance, checks=False)
    # Connected components at a threshold = single linkage cut there.
    single = hierarchy.fcluster(hierarchy.linkage(condensed, "single"), threshold, "distance")
    assert same_partition(cluster.threshold_components(x, threshold, block=16), single)
    average = hierarchy.fcluster(hierarchy.linkage(condensed, "average"), threshold, "distance")
    assert same_partition(cluster.average_clusters(x, threshold, use_sklearn=False), average)


def test_average_linkage_sklearn_agrees_with_numpy(cluster):
    pytest.importorskip("sklearn")
    for seed, threshold in enumerate([0.7, 1.1, 1.5]):
        x = clustered_vectors(seed)
        ours = cluster.average_clusters(x, threshold, use_sklearn=False)
        assert same_partition(cluster.average_clusters(x, threshold, use_sklearn=True), ours)


def test_stream_embed_ctrl_c_keeps_what_was_done(stream, model, astronaut, tmp_path):
    def frames():
        yield Frame(image=astronaut, timestamp=0.0, index=0)
        raise KeyboardInterrupt

    out = tmp_path / "faces.npz"
    writer = stream.NpzChunkWriter(str(out), chunk=100)
    with FacePipeline(model_path=model) as pipeline:
        stats = stream.embed_stream(pipeline, frames(), writer, stream.FrameGate(), True)
    writer.close()  # the partial chunk is written
    assert stats.interrupted and stats.processed == 1
    with np.load(tmp_path / "faces-00000.npz") as data:
        assert data["embedding"].shape == (1, 128)


def test_cluster_photos_ctrl_c(cluster, model, photo_tree, tmp_path, monkeypatch, capsys):
    def interrupted(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(cluster, "read_image", interrupted)
    assert cluster.main(["--model", model, str(photo_tree), str(tmp_path / "out")]) == 130
    assert "interrupted after 1 files (0 faces)" in capsys.readouterr().err


# ------------------------------------------------------------------ privacy (issue 14, items 16 and 17)

PASSWORD = "s3cret"


@pytest.fixture
def credentialed_stream(astronaut):
    """The URL of an MJPEG stream on 127.0.0.1 that carries a user and password: 8 frames of
    the astronaut to one client, then gone (connection refused), so a reader is lost, logs
    a reconnect attempt and gives up, naming the source each time."""
    jpeg = cv2.imencode(".jpg", cv2.cvtColor(astronaut, cv2.COLOR_RGB2BGR))[1].tobytes()
    part = b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n%s\r\n" % (len(jpeg), jpeg)
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(60)  # a test that never connects does not leave the thread waiting
    port = server.getsockname()[1]

    def serve() -> None:
        # OSError: the client left early or never came; the test's assertions say what matters.
        with contextlib.suppress(OSError), server:
            conn, _ = server.accept()
            server.close()  # one client only: reconnecting is refused
            with conn:
                conn.recv(65536)  # the request
                conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: multipart/x-mixed-replace;boundary=frame\r\n\r\n")
                for _ in range(8):
                    conn.sendall(part)

    threading.Thread(target=serve, daemon=True).start()
    return f"http://admin:{PASSWORD}@127.0.0.1:{port}/cam.mjpg"


@pytest.mark.parametrize("program", ["door", "door --enroll", "stream"])
def test_examples_never_show_the_camera_password(
    program, door, stream, model, credentialed_stream, tmp_path, request, capfd, caplog
):
    caplog.set_level(logging.INFO)
    common = ["--model", model, "--source", credentialed_stream, "--max-retries", "1"]
    if program == "stream":
        code = stream.main([*common, "--out", str(tmp_path / "faces.jsonl"), "-q"])
    elif program == "door":
        gallery = request.getfixturevalue("enrolled")
        code = door.main([*common, "--gallery", str(gallery), "--access-log", str(tmp_path / "access.db")])
    else:
        code = door.main([*common, "--gallery", str(tmp_path / "door.db"), "--enroll", "Ada", "--samples", "50"])
    out, err = capfd.readouterr()  # file descriptors: OpenCV's and FFmpeg's own lines too
    shown = out + err + caplog.text
    assert code == 1
    # The source was read, lost, retried and given up on, and named each time: without its password.
    assert "lost (no frame); reconnecting (attempt 1/1)" in caplog.text
    assert "lost (cannot reopen); gave up after 1 reconnect attempt(s)" in shown
    assert "http://***@127.0.0.1:" in shown
    assert PASSWORD not in shown and "admin:" not in shown


@pytest.mark.parametrize("name", ["faces.jsonl", "faces.npz"])
def test_stream_embed_replaces_a_world_readable_output(stream, model, video, tmp_path, name):
    out = tmp_path / name
    written = out if name.endswith(".jsonl") else tmp_path / "faces-00000.npz"
    written.write_text("old\n")
    os.chmod(written, 0o644)
    argv = ["--model", model, "--source", str(video), "--out", str(out), "--max-frames", "2", "-q"]
    with open(written) as reader:  # someone who opened it while anyone could
        assert stream.main(argv) == 0
        assert reader.read() == "old\n"  # the embeddings went to a new file, not into this one
    assert stat.S_IMODE(written.stat().st_mode) == 0o600
    if name.endswith(".jsonl"):
        assert [json.loads(line)["frame"] for line in written.read_text().splitlines()] == [0, 1]
    else:
        with np.load(written) as data:
            assert data["embedding"].shape == (2, 128)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_stream_embed_jsonl_lines_reach_the_file_as_they_come(stream, tmp_path):
    out = tmp_path / "faces.jsonl"
    writer = stream.JsonLinesWriter(str(out))
    writer.write([stream.FaceRecord(1.0, 7, np.zeros(4), 0.9, np.full(128, 128**-0.5))])
    assert json.loads(out.read_text())["frame"] == 7  # before close: tail -f follows the file
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    writer.close()


def test_door_outputs_are_private_even_when_they_existed_world_readable(door, model, enrolled, video, tmp_path):
    assert stat.S_IMODE(enrolled.stat().st_mode) == 0o600  # the gallery enrolment created
    access_log = tmp_path / "access.db"
    door.AccessLog(access_log).close()  # a log from an earlier run
    for path in (enrolled, access_log):
        os.chmod(path, 0o644)
    argv = ["--model", model, "--gallery", str(enrolled), "--source", str(video), "--access-log", str(access_log)]
    assert door.main(argv) == 0
    assert [(name, granted) for name, granted, _, _ in access_rows(access_log)] == [("Ada", 1)]
    for path in (enrolled, access_log):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
