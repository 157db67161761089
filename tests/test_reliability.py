"""Reliability at the door (issue 14): each defect a fault-and-fuzz run found, reproduced.

A door box runs unattended: power is cut, SD cards fill, cameras drop, strange files
land in the enrolment folder. Each test here is one such case. Slow variants (hundreds
of kills, multi-gigabyte files) are marked ``slow``; a fast one runs in the default
suite. docs/reliability.md states the guarantees these tests hold.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
import time
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
from facenet_edge import gallery_store
from facenet_edge.camera import FolderSource, OpenCVSource, redact
from facenet_edge.card import CardError, ModelCard, ModelIdentity, Thresholds
from facenet_edge.cli import ExitCode, main
from facenet_edge.errors import GalleryError, ImageError
from facenet_edge.gallery import Gallery, validate_name
from facenet_edge.io import MAX_FILE_BYTES, read_image

IDENTITY = ModelIdentity(sha256="a" * 64, compatibility_group="facenet-v1")
NAME = "astronaut"


# ---------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def deadline():
    """A hang (a FIFO waited on) fails the test instead of stalling the suite."""

    def expired(signum, frame):
        raise TimeoutError("blocked for 60 s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def gallery(tmp_path, model, photo) -> str:
    path = str(tmp_path / "faces.db")
    assert main(["enroll", "--gallery", path, "--name", NAME, "--model", model, photo]) == 0
    return path


def digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def one_error(capsys) -> str:
    """The command's stderr: exactly one line, ours, no traceback."""
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("facenet-edge: error: ") and "Traceback" not in err, err
    return lines[0]


def edited_model(tmp_path: Path, model: str, **changes) -> str:
    """A copy of ``model`` whose card has ``changes`` applied (None deletes a key)."""
    target = tmp_path / "edited.tflite"
    shutil.copy(model, target)
    card = json.loads(Path(model).with_suffix(".json").read_text())
    for key, value in changes.items():
        if value is None:
            card.pop(key, None)
        else:
            card[key] = value
    target.with_suffix(".json").write_text(json.dumps(card))
    return str(target)


# ---------------------------------------------------------------- 1, 2: unbounded reads, FIFOs


def test_device_file_refused_and_the_batch_goes_on(model, photo, capsys):
    assert main(["embed", "--json", "--model", model, "/dev/zero", photo]) == ExitCode.IMAGE
    out, err = capsys.readouterr()
    first, second = (json.loads(line) for line in out.splitlines())
    assert "character device" in first["error"] and second["faces"]
    assert err.splitlines()[0] == "facenet-edge: error: image path is a character device, not a regular file: /dev/zero"


def test_sparse_giant_refused_by_size_before_reading(tmp_path):
    giant = tmp_path / "x.jpg"
    with open(giant, "wb") as file:
        file.truncate(3 * 1024**3)  # sparse: no disk used
    with pytest.raises(ImageError, match=r"image file too large \(3\.2 GB, limit 268\.4 MB\)"):
        read_image(giant)


def test_folder_source_skips_giant_and_fifo(tmp_path, photo, caplog):
    shutil.copy(photo, tmp_path / "b.png")
    with open(tmp_path / "a.jpg", "wb") as file:
        file.truncate(MAX_FILE_BYTES + 1)
    os.mkfifo(tmp_path / "c.jpg")
    with caplog.at_level(logging.WARNING), FolderSource(tmp_path) as source:
        frames = list(source)
    assert [f.path.name for f in frames] == ["b.png"]  # the FIFO is passed over, not waited on
    assert "image file too large" in caplog.text


@pytest.mark.parametrize("command", ["embed", "identify", "verify", "enroll", "import"])
def test_fifo_refused_not_waited_on(tmp_path, gallery, model, photo, capsys, command):
    fifo = str(tmp_path / "p.jpg")
    os.mkfifo(fifo)
    argv = {
        "embed": ["embed", "--model", model, fifo],
        "identify": ["identify", "--gallery", gallery, "--model", model, fifo],
        "verify": ["verify", "--model", model, fifo, photo],
        "enroll": ["enroll", "--gallery", gallery, "--name", "x", "--model", model, fifo],
        "import": ["gallery", "import", fifo, "--gallery", gallery],
    }[command]
    before = digest(gallery)
    capsys.readouterr()
    assert main(argv) in (ExitCode.IMAGE, ExitCode.GALLERY)
    assert "FIFO (named pipe), not a regular file" in capsys.readouterr().err
    assert digest(gallery) == before


def test_fifo_as_gallery_or_model(tmp_path, model, photo, capsys):
    fifo = str(tmp_path / "g.db")
    os.mkfifo(fifo)
    assert main(["gallery", "list", "--gallery", fifo]) == ExitCode.GALLERY
    assert "FIFO" in one_error(capsys)
    assert main(["verify", "--model", fifo, photo, photo]) == ExitCode.MODEL
    assert "FIFO" in one_error(capsys)


# ---------------------------------------------------------------- 3, 4, 5: cards and models

BAD_CARDS = {
    "thresholds-list": ({"thresholds": [0.5, 1.0]}, "'thresholds' must be an object"),
    "thresholds-unknown-key": ({"thresholds": {"far_1e3": 0.5, "far_1e6": 0.2}}, "unknown key(s) far_1e6"),
    "thresholds-nan-string": ({"thresholds": {"far_1e3": "NaN"}}, "'far_1e3' must be a number or null"),
    "mean-string": ({"mean": "127.5"}, "'mean' must be a number"),
    "std-zero": ({"std": 0}, "'std' must not be 0"),
    "alignment-unknown": ({"alignment": "arcface112"}, "alignment 'arcface112' is unknown"),
    "group-list": ({"compatibility_group": ["a"]}, "'compatibility_group' must be a string or null"),
    "input-height-string": ({"input_height": "96"}, "'input_height' must be an integer"),
    "embedding-size-bool": ({"embedding_size": True}, "'embedding_size' must be an integer"),
    "color-order": ({"color_order": "GBR"}, "'color_order' must be RGB or BGR"),
    "extra-list": ({"extra": [1], "unknown_field": 1}, "'extra' must be an object"),
    "schema-newer": ({"schema": 99}, "schema 99 is newer"),
    "name-missing": ({"name": None}, "lacks required field(s): name"),
}


@pytest.mark.parametrize("case", sorted(BAD_CARDS))
@pytest.mark.parametrize("command", ["verify", "info", "embed"])
def test_malformed_card_exit_7_naming_the_field(tmp_path, model, photo, capsys, case, command):
    changes, words = BAD_CARDS[case]
    edited = edited_model(tmp_path, model, **changes)
    argv = {
        "verify": ["verify", "--model", edited, photo, photo],
        "info": ["info", "--model", edited],
        "embed": ["embed", "--model", edited, photo],
    }[command]
    assert main(argv) == ExitCode.MODEL
    assert words in one_error(capsys)


@pytest.mark.parametrize("value", [-1, 0, 4, 10])
@pytest.mark.parametrize("command", ["verify", "enroll"])
def test_absurd_card_threshold_refused_where_used(tmp_path, model, photo, capsys, value, command):
    edited = edited_model(tmp_path, model, thresholds={"far_1e3": value})
    argv = {
        "verify": ["verify", "--model", edited, photo, photo],
        "enroll": ["enroll", "--gallery", str(tmp_path / "new.db"), "--name", NAME, "--model", edited, photo],
    }[command]
    assert main(argv) == ExitCode.MODEL
    assert "threshold 'far_1e3' must be a squared-L2 distance strictly between 0 and 4" in one_error(capsys)
    assert not (tmp_path / "new.db").exists()
    # --threshold overrides the card's: the command works.
    assert main([*argv[:1], "--threshold", "1.0", *argv[1:]]) == ExitCode.OK


def test_card_json_nan_literal_refused(tmp_path, model):
    edited = Path(edited_model(tmp_path, model))
    card = edited.with_suffix(".json")
    card.write_text(card.read_text().replace('"far_1e3": 1.0', '"far_1e3": NaN'))
    with pytest.raises(CardError, match="NaN is not a JSON number"):
        ModelCard.load(card)


def test_thresholds_checked_when_made_and_when_used():
    for value in ("0.5", True, [1.0]):
        with pytest.raises(CardError, match="must be a number or null"):
            Thresholds(far_1e3=value)
    for value in (-1, 0, 4, 10, float("nan"), float("inf")):
        with pytest.raises(CardError, match="strictly between 0 and 4"):
            Thresholds(far_1e3=value).default()
    assert Thresholds(far_1e3=np.float32(0.5), best_accuracy=0.0).default() == 0.5
    assert Thresholds().default() is None


def test_missing_model_named_as_such(tmp_path, photo, capsys):
    assert main(["verify", "--model", str(tmp_path / "nope.tflite"), photo, photo]) == ExitCode.MODEL
    assert one_error(capsys) == f"facenet-edge: error: model not found: {tmp_path / 'nope.tflite'}"
    assert main(["info", "--model", str(tmp_path)]) == ExitCode.MODEL
    assert one_error(capsys) == f"facenet-edge: error: model path is a directory, not a regular file: {tmp_path}"


# ---------------------------------------------------------------- 6, 7: creating a gallery


def test_creation_interrupted_before_publishing_leaves_nothing(tmp_path, monkeypatch):
    path = tmp_path / "faces.db"

    def power_cut(*args):
        raise KeyboardInterrupt  # stands for the process dying at this instant

    monkeypatch.setattr(gallery_store.os, "link", power_cut)
    with pytest.raises(KeyboardInterrupt):
        Gallery.create(path, IDENTITY, 1.0)
    assert list(tmp_path.iterdir()) == []  # no gallery, no temporary file
    monkeypatch.undo()
    with Gallery.open(path, create=True, identity=IDENTITY, threshold=1.0) as gallery:
        gallery.add("x", np.eye(128, dtype=np.float32)[0], IDENTITY)


def test_creation_without_hard_links(tmp_path, monkeypatch):
    def no_links(source, target):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(gallery_store.os, "link", no_links)
    with Gallery.create(tmp_path / "faces.db", IDENTITY, 1.0) as gallery:
        assert len(gallery) == 0
    with pytest.raises(GalleryError, match="already exists"):
        Gallery.create(tmp_path / "faces.db", IDENTITY, 1.0)
    assert [p.name for p in tmp_path.iterdir()] == ["faces.db"]


_KILLER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from facenet_edge.card import ModelIdentity
    from facenet_edge.gallery import Gallery
    folder, identity = Path(sys.argv[1]), ModelIdentity("a" * 64, "facenet-v1")
    print("ready", flush=True)
    for number in range(10**6):
        Gallery.create(folder / f"g{number}.db", identity, 1.0).close()
    """
)


def _kill_during_creation(folder: Path, kills: int) -> None:
    """Kill -9 a process creating galleries in a loop, ``kills`` times at random moments;
    after each kill every file named like a gallery must open (none is half made)."""
    rng = random.Random(14)
    for _ in range(kills):
        child = subprocess.Popen([sys.executable, "-c", _KILLER, str(folder)], stdout=subprocess.PIPE)
        assert child.stdout.readline() == b"ready\n"
        time.sleep(rng.uniform(0.0, 0.05))
        child.kill()
        child.wait()
        child.stdout.close()
        for path in folder.glob("g*.db"):
            Gallery.open(path).close()
            path.unlink()


def test_kill_9_during_creation_never_leaves_a_broken_gallery(tmp_path):
    _kill_during_creation(tmp_path, kills=5)


@pytest.mark.slow
def test_kill_9_during_creation_200_times(tmp_path):
    _kill_during_creation(tmp_path, kills=200)


def test_concurrent_creation_both_enrolments_land(tmp_path):
    for trial in range(20):
        path = tmp_path / f"g{trial}.db"
        start = threading.Barrier(2)
        errors: list[BaseException] = []

        def enrol(name: str, row: int) -> None:
            try:
                start.wait()
                with Gallery.open(path, create=True, identity=IDENTITY, threshold=1.0) as gallery:
                    gallery.add(name, np.eye(128, dtype=np.float32)[row], IDENTITY)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=enrol, args=(name, row)) for row, name in enumerate(("Ada", "Bob"))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        with Gallery.open(path) as gallery:
            assert [p.name for p in gallery.list()] == ["Ada", "Bob"]


# ---------------------------------------------------------------- 8, 9, 10: damaged and foreign files


def _corrupt(path: Path) -> None:
    """4 KiB of random bytes over a page in the middle of the file."""
    data = bytearray(path.read_bytes())
    page = 4096
    middle = (len(data) // 2) // page * page
    data[middle : middle + page] = np.random.default_rng(14).integers(0, 256, page, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))


@pytest.fixture
def damaged(tmp_path) -> Path:
    path = tmp_path / "faces.db"
    rng = np.random.default_rng(0)
    with Gallery.create(path, IDENTITY, 1.0) as gallery:
        for person in range(100):
            gallery.add(f"p{person}", rng.standard_normal((10, 128)).astype(np.float32), IDENTITY)
    assert path.stat().st_size > 150_000 and not Path(f"{path}-wal").exists()
    _corrupt(path)
    return path


def test_damaged_gallery_is_never_written(damaged):
    before = digest(damaged)
    with Gallery.open(damaged) as gallery:
        with pytest.raises(GalleryError, match=r"is damaged .*it was not changed\. Restore it from an export"):
            gallery.add("new", np.eye(128, dtype=np.float32)[0], IDENTITY)
        with pytest.raises(GalleryError, match="is damaged"):
            gallery.remove("p1")
    assert digest(damaged) == before


def test_damaged_gallery_cli(damaged, model, photo, capsys):
    before = digest(damaged)
    for argv in (
        ["gallery", "remove", "p1", "--gallery", str(damaged)],
        ["gallery", "rename", "p1", "q", "--gallery", str(damaged)],
    ):
        assert main(argv) == ExitCode.GALLERY
        assert "is damaged" in one_error(capsys)
    assert digest(damaged) == before


def test_foreign_database_with_our_meta_is_untouched(tmp_path):
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.executescript(
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);"
        "INSERT INTO meta VALUES ('schema', '1'), ('embedding_size', '128'), ('model_sha256', 'x'), ('threshold', '1');"
        "CREATE TABLE invoices (id INTEGER PRIMARY KEY);"
    )
    conn.close()
    before = path.read_bytes()
    with pytest.raises(GalleryError, match="not a facenet-edge gallery: .* has no 'people' table"):
        Gallery.open(path)
    assert path.read_bytes() == before  # still in rollback-journal mode (header bytes 18-19)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.db"]


@pytest.mark.parametrize("value", ["100", "-5", "NaN", "inf", "0", "4"])
def test_edited_gallery_threshold_refused(gallery, capsys, value):
    conn = sqlite3.connect(gallery)
    conn.execute("UPDATE meta SET value = ? WHERE key = 'threshold'", (value,))
    conn.commit()
    conn.close()
    assert main(["gallery", "list", "--gallery", gallery]) == ExitCode.GALLERY
    assert f"stores threshold {value!r}, not a squared-L2 distance strictly between 0 and 4" in one_error(capsys)


# ---------------------------------------------------------------- 11, 12, 13: names and exports


@pytest.mark.parametrize(
    "name", ["Astro\u200bnaut", "\u202etuanortsA", "Astronaut\u2066", "Ast\ufeffronaut", "A\udcff"]
)
def test_invisible_and_bidi_names_refused(name):
    with pytest.raises(GalleryError, match="control characters, invisible or direction-changing"):
        validate_name(name)


def test_names_are_nfc(tmp_path):
    with Gallery.create(tmp_path / "g.db", IDENTITY, 1.0) as gallery:
        gallery.add("Zoe\u0301", np.eye(128, dtype=np.float32)[0], IDENTITY)  # e + combining acute
        gallery.add("Zo\u00e9", np.eye(128, dtype=np.float32)[1], IDENTITY)  # precomposed
        assert [(p.name, p.samples) for p in gallery.list()] == [("Zo\u00e9", 2)]


def _export(tmp_path: Path, **arrays) -> Path:
    """A valid export of two samples, with ``arrays`` replacing or adding arrays."""
    base = {
        "format": np.array(gallery_store.EXPORT_FORMAT),
        "names": np.array(["Eve", "Bob"]),
        "embeddings": np.eye(2, 128, dtype=np.int8) * 127,
        "model_sha256": np.array(IDENTITY.sha256),
        "compatibility_group": np.array(IDENTITY.compatibility_group),
        "threshold": np.array(1.0),
    }
    path = tmp_path / "export.npz"
    np.savez(path, **{**base, **arrays})
    return path


def _header_only_member(path: Path, key: str, shape: tuple, dtype: str) -> None:
    """Replace ``key`` in an export by an array that declares ``shape`` but holds nothing."""
    header = {"descr": np.dtype(dtype).str, "fortran_order": False, "shape": shape}
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist() if name != f"{key}.npy"}
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
        with archive.open(f"{key}.npy", "w") as member:
            np.lib.format.write_array_header_1_0(member, header)


def test_export_with_2d_names_refused(tmp_path):
    path = _export(tmp_path, names=np.array([["Eve", "Bob"]]))
    with pytest.raises(GalleryError, match=r"array 'names' must be 1-d"):
        Gallery.restore(tmp_path / "g.db", path)
    assert not (tmp_path / "g.db").exists()


@pytest.mark.parametrize(
    "arrays, words",
    [
        ({"embeddings": np.eye(2, 128, dtype=np.float32)}, "array 'embeddings' must be 2-d of kind 'i'"),
        ({"embeddings": np.ones((3, 128), np.int8)}, "embeddings must be (2, D) int8"),
        ({"threshold": np.array("1.0")}, "array 'threshold' must be 0-d of kind 'f'"),
        ({"threshold": np.array(7.0)}, "threshold must be a squared-L2 distance"),
        ({"format": np.array(["x", "y"])}, "array 'format' must be 0-d"),
        ({"names": np.array(["Eve", "x" * 200])}, "items up to 512 bytes"),
        ({"names": np.array(["Eve", "B\u202eob"])}, "direction-changing"),
    ],
)
def test_export_arrays_checked(tmp_path, arrays, words):
    with pytest.raises(GalleryError, match=None) as raised:
        Gallery.restore(tmp_path / "g.db", _export(tmp_path, **arrays))
    assert words in str(raised.value)


def test_export_with_pickled_object_array_refused(tmp_path):
    path = _export(tmp_path, names=np.array(["Eve", "Bob"], dtype=object))
    with pytest.raises(GalleryError, match="array 'names' must be 1-d of kind 'U'"):
        Gallery.restore(tmp_path / "g.db", path)


@pytest.mark.parametrize(
    "key, shape, dtype",
    [("names", (500_000_000,), "<U1"), ("embeddings", (800_000_000, 128), "i1"), ("names", (2,), "<U128")],
)
def test_export_declaring_more_than_it_holds_refused(tmp_path, key, shape, dtype):
    path = _export(tmp_path)
    _header_only_member(path, key, shape, dtype)
    with pytest.raises(GalleryError, match=f"array '{key}' declares .* but holds less"):
        Gallery.restore(tmp_path / "g.db", path)


def test_export_extra_arrays_are_not_read(tmp_path, monkeypatch):
    path = _export(tmp_path, junk=np.zeros(1000, np.uint8))
    _header_only_member(path, "junk", (3 * 1024**3,), "u1")  # 3 GiB declared, never loaded
    read = []
    real = gallery_store._export_array
    monkeypatch.setattr(gallery_store, "_export_array", lambda archive, key: read.append(key) or real(archive, key))
    with Gallery.restore(tmp_path / "g.db", path) as gallery:
        assert [p.name for p in gallery.list()] == ["Bob", "Eve"]
    assert "junk" not in read


def test_export_compressed_member_refused(tmp_path):
    path = tmp_path / "export.npz"
    np.savez_compressed(path, **{k: v for k, v in np.load(_export(tmp_path)).items()})
    with pytest.raises(GalleryError, match="is compressed or larger than the file"):
        Gallery.restore(tmp_path / "g.db", path)


# ---------------------------------------------------------------- 14, 15: full disk


@pytest.fixture
def full_disk(tmp_path) -> Path:
    """A 256 kB tmpfs, filled (needs root; skipped elsewhere)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        with open(mount / "filler", "wb", buffering=0) as file:
            try:
                while True:
                    file.write(b"\0" * 4096)
            except OSError:
                pass
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_gallery_creation_on_a_full_disk(full_disk, model, photo, capsys):
    path = full_disk / "faces.db"
    assert main(["enroll", "--gallery", str(path), "--name", NAME, "--model", model, photo]) == ExitCode.GALLERY
    line = one_error(capsys)
    assert str(path) in line and ("no space left on device" in line.lower())
    assert sorted(p.name for p in full_disk.iterdir()) == ["filler"]


def test_export_and_embed_out_on_a_full_disk(full_disk, gallery, model, photo, capsys):
    export = full_disk / "backup.npz"
    assert main(["gallery", "export", str(export), "--gallery", gallery]) == ExitCode.GALLERY
    assert one_error(capsys) == f"facenet-edge: error: cannot write {export}: No space left on device"
    out = full_disk / "e.npy"
    (full_disk / "filler").write_bytes(b"\0" * (256 * 1024 - 8192))  # room for the temporary file only
    assert main(["embed", "--out", str(out), "--model", model, *[photo] * 40]) == ExitCode.ERROR
    last = capsys.readouterr().err.splitlines()[-1]
    assert last == f"facenet-edge: error: cannot write {out}: No space left on device"
    assert sorted(p.name for p in full_disk.iterdir()) == ["filler"]  # no partial file


# ---------------------------------------------------------------- 16, 17, 18: privacy and noise


def test_credentials_redacted_in_errors_and_logs(caplog):
    url = "rtsp://admin:s3cret@127.0.0.1:9/s"
    assert redact(url) == "rtsp://***@127.0.0.1:9/s"
    assert redact("http://cam.local/x?user=a") == "http://cam.local/x?user=a"
    with caplog.at_level(logging.WARNING), pytest.raises(ImageError) as raised:
        OpenCVSource(url, params={cv2.CAP_PROP_OPEN_TIMEOUT_MSEC: 500})
    assert "s3cret" not in str(raised.value) and "admin" not in str(raised.value)
    assert "***@127.0.0.1:9" in str(raised.value) and "s3cret" not in caplog.text


def test_stream_error_does_not_print_the_password(gallery, model, capsys):
    code = main(["stream", "--source", "rtsp://admin:s3cret@127.0.0.1:9/s", "--gallery", gallery, "--model", model])
    assert code == ExitCode.IMAGE
    assert "s3cret" not in capsys.readouterr().err


def test_files_holding_embeddings_become_private(tmp_path, gallery, model, photo):
    os.chmod(gallery, 0o644)
    out, export = tmp_path / "e.npy", tmp_path / "backup.npz"
    for path in (out, export):
        path.write_bytes(b"old")
        os.chmod(path, 0o644)
    assert main(["enroll", "--gallery", gallery, "--name", "x", "--model", model, photo]) == 0
    assert main(["embed", "--out", str(out), "--model", model, photo]) == 0
    assert main(["gallery", "export", str(export), "--gallery", gallery]) == 0
    for path in (gallery, f"{gallery}-wal", f"{gallery}-shm", out, export):
        if os.path.exists(path):
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path


def _console_script() -> str:
    script = Path(sys.executable).with_name("facenet-edge")
    if not script.exists():
        pytest.skip("the facenet-edge console script is not installed (pip install -e .)")
    return str(script)


def test_no_native_noise_on_stderr(model, photo, tmp_path):
    run = subprocess.run(
        [_console_script(), "embed", "--json", "--model", model, photo], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0 and run.stderr == ""
    verbose = subprocess.run(
        [_console_script(), "embed", "--verbose", "--model", model, photo], capture_output=True, text=True, timeout=120
    )
    assert "XNNPACK" in verbose.stderr


def test_damaged_video_gives_a_few_lines_not_thousands(gallery, model, tmp_path):
    video = tmp_path / "v.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 25, (160, 120))
    if not writer.isOpened():
        pytest.skip("this OpenCV cannot write MP4")
    for i in range(100):
        writer.write(np.full((120, 160, 3), i % 255, np.uint8))
    writer.release()
    data = bytearray(video.read_bytes())
    quarter = len(data) // 4
    data[len(data) // 8 : len(data) // 8 + quarter] = bytes(quarter)
    video.write_bytes(bytes(data))
    run = subprocess.run(
        [_console_script(), "stream", "--source", str(video), "--gallery", gallery, "--model", model],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode in (ExitCode.OK, ExitCode.IMAGE)
    assert len(run.stderr.splitlines()) <= 1, run.stderr[:2000]


# ---------------------------------------------------------------- a stalled stream


class _StallingCamera:
    """A live source that shows one face, then delivers nothing until released."""

    live = True

    def __init__(self, image: np.ndarray):
        self.image = image
        self.release = threading.Event()

    def __iter__(self):
        from facenet_edge.camera import Frame

        yield Frame(image=self.image, timestamp=time.monotonic(), index=0)
        self.release.wait(30)

    def interrupt(self):
        self.release.set()

    def close(self):
        self.release.set()


def test_stalled_stream_decides_nobody(gallery, model, astronaut, monkeypatch, capsys):
    from facenet_edge import camera

    stalling = _StallingCamera(astronaut)
    printed = []

    def open_source(spec, latest_only=False, **options):
        return camera.LatestFrameSource(stalling)

    real_print = print

    def watch(*args, **kwargs):  # release the camera once "nobody" has been decided
        real_print(*args, **kwargs)
        printed.append(args[0])
        if args[0].endswith(": nobody"):
            stalling.release.set()

    monkeypatch.setattr(camera, "open_source", open_source)
    monkeypatch.setattr("builtins.print", watch)
    argv = ["stream", "--source", "0", "--gallery", gallery, "--model", model, "--vote", "1:1", "--vote-max-age", "0.2"]
    code = main(argv)
    assert code == ExitCode.OK
    assert [line.split(": ")[1] for line in printed] == [NAME, "nobody"]
    assert "no frame from 0 for 0.2 s: deciding nobody" in capsys.readouterr().err
