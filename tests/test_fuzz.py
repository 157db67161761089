"""A fuzz corpus run through every command (issue 14): bad images, models, cards,
galleries and exports, generated here at run time (no binary junk in the repository).

Every case runs ``facenet_edge.cli.main`` in one child process per family, so the peak
memory of the child bounds what any single bad input cost. For each case: the exit code
is the documented one (docs/cli.md, ``ExitCode``), stderr holds only our one-line
messages and no traceback, no existing gallery changed, and the child's peak RSS stays
under ``MAX_RSS_MB``. docs/reliability.md counts the cases.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import struct
import subprocess
import sys
import textwrap
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pytest
from facenet_edge.cli import ExitCode, main
from facenet_edge.gallery import Gallery
from facenet_edge.gallery_store import EXPORT_FORMAT

# Peak RSS of the child running a whole family: the runtime, OpenCV, both models and the
# largest single bad input.
MAX_RSS_MB = 300
NAME = "astronaut"
DOCUMENTED = {int(code) for code in ExitCode}

_CHILD = textwrap.dedent(
    """
    import hashlib, json, os, sys, tempfile
    from facenet_edge.cli import main

    def peak_rss_mb():
        # VmHWM: this process image's peak. (resource's ru_maxrss keeps the peak of the
        # forked parent across exec, so a child of a large pytest process would read high.)
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024

    def digest(path):
        try:
            with open(path, "rb") as file:
                return hashlib.sha256(file.read()).hexdigest()
        except OSError:
            return None

    results = []
    for case in json.load(sys.stdin):
        with tempfile.TemporaryFile() as err:
            sys.stdout.flush(); sys.stderr.flush()
            saved_out, saved_err = os.dup(1), os.dup(2)
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
            os.dup2(err.fileno(), 2)
            try:
                code = main(case["argv"])
            except BaseException:
                import traceback
                traceback.print_exc()
                code = None
            finally:
                sys.stdout.flush(); sys.stderr.flush()
                os.dup2(saved_out, 1); os.dup2(saved_err, 2)
                os.close(saved_out); os.close(saved_err)
            err.seek(0)
            results.append({
                "code": code,
                "stderr": err.read().decode("utf-8", "replace"),
                "digests": [digest(path) for path in case["watch"]],
                "rss_mb": peak_rss_mb(),
            })
    json.dump(results, sys.stdout)
    """
)


@dataclass
class Case:
    """One command on one bad input: the exit codes it may give and the stderr lines."""

    label: str
    argv: list[str]
    codes: set[int]
    lines: int = 1  # stderr lines when the exit code is not 0
    watch: list[str] = field(default_factory=list)  # files that must not change


def run_corpus(cases: list[Case]) -> None:
    before = [[_digest(path) for path in case.watch] for case in cases]
    payload = json.dumps([{"argv": case.argv, "watch": case.watch} for case in cases])
    child = subprocess.run(
        [sys.executable, "-c", _CHILD], input=payload, capture_output=True, text=True, timeout=300
    )
    assert child.returncode == 0, child.stderr[-3000:]
    results = json.loads(child.stdout)
    failures = []
    for case, result, digests in zip(cases, results, before):
        err = result["stderr"]
        lines = err.splitlines()
        problems = []
        if result["code"] not in DOCUMENTED or result["code"] not in case.codes:
            problems.append(f"exit {result['code']}, expected one of {sorted(case.codes)}")
        if "Traceback" in err:
            problems.append("traceback")
        if result["code"] != 0 and len(lines) != case.lines:
            problems.append(f"{len(lines)} stderr line(s), expected {case.lines}")
        if result["code"] != 0 and any(not line.startswith("facenet-edge: ") for line in lines):
            problems.append("stderr line not ours")
        if result["digests"] != digests:
            problems.append("a watched file changed")
        if result["rss_mb"] > MAX_RSS_MB:
            problems.append(f"peak RSS {result['rss_mb']:.0f} MB")
        if problems:
            failures.append(f"{case.label}: {'; '.join(problems)}\n    {err.strip()[:300]}")
    assert not failures, f"{len(failures)} of {len(cases)} case(s) failed:\n" + "\n".join(failures)


def _digest(path: str) -> str | None:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


# ---------------------------------------------------------------- fixtures


@pytest.fixture
def gallery(tmp_path, model, photo) -> str:
    path = str(tmp_path / "faces.db")
    assert main(["enroll", "--gallery", path, "--name", NAME, "--model", model, "--quiet", photo]) == 0
    return path


# ---------------------------------------------------------------- images


def _png_header(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))


def bad_images(folder: Path, photo: str) -> dict[str, str]:
    """Files an enrolment folder might receive, none of them a usable photo."""
    rng = np.random.default_rng(14)
    jpeg = cv2.imencode(".jpg", cv2.imread(photo))[1].tobytes()
    files = {
        "empty.jpg": b"",
        "text.jpg": b"this is not a JPEG\n",
        "random.jpg": rng.integers(0, 256, 50_000, dtype=np.uint8).tobytes(),
        "truncated.jpg": jpeg[: len(jpeg) // 3],
        "soi-then-garbage.jpg": b"\xff\xd8" + rng.integers(0, 256, 5_000, dtype=np.uint8).tobytes(),
        "jpeg-huge-sof.jpg": b"\xff\xd8\xff\xc0\x00\x11\x08\xff\xdc\xff\xdc\x03" + bytes(12),
        "png-header-only-huge.png": _png_header(20000, 20000),
        "png-header-only.png": _png_header(640, 480),
        "one-pixel.png": cv2.imencode(".png", np.zeros((1, 1, 3), np.uint8))[1].tobytes(),
        "bmp-huge.bmp": b"BM" + struct.pack("<IHHIIiiHHIIiiII", 0, 0, 0, 54, 40, 60000, 60000, 1, 24, 0, 0, 0, 0, 0, 0),
        "ppm-huge.ppm": b"P6\n60000 60000\n255\n" + bytes(100),
        "blank.png": cv2.imencode(".png", np.full((240, 320, 3), 128, np.uint8))[1].tobytes(),
        "gzip.jpg": zlib.compress(bytes(10_000_000)),
    }
    paths = {}
    for name, data in files.items():
        (folder / name).write_bytes(data)
        paths[name] = str(folder / name)
    with open(folder / "sparse-3g.jpg", "wb") as file:
        file.truncate(3 * 1024**3)
    os.mkfifo(folder / "fifo.jpg")
    (folder / "dir.jpg").mkdir()
    os.symlink("loop.jpg", folder / "loop.jpg")
    paths.update(
        {
            name: str(folder / name)
            for name in ("sparse-3g.jpg", "fifo.jpg", "dir.jpg", "loop.jpg")
        }
    )
    paths.update({"missing.jpg": str(folder / "missing.jpg"), "dev-zero": "/dev/zero", "dev-urandom": "/dev/urandom"})
    return paths


def test_bad_images_through_every_command(tmp_path, gallery, model, photo):
    images = bad_images(tmp_path, photo)
    no_face = {"blank.png"}
    cases = []
    for label, path in images.items():
        code = ExitCode.NO_FACE if label in no_face else ExitCode.IMAGE
        cases += [
            Case(f"embed {label}", ["embed", "--json", "--model", model, path, photo], {code}, 2, [gallery]),
            Case(f"identify {label}", ["identify", "--gallery", gallery, "--model", model, path], {code}, 2, [gallery]),
            Case(f"verify {label}", ["verify", "--model", model, photo, path], {code}, 1, [gallery]),
            Case(
                f"enroll {label}", ["enroll", "--gallery", gallery, "--name", "x", "--model", model, path], {code}, 2,
                [gallery],
            ),
        ]
    run_corpus(cases)


def test_folder_of_bad_images_streams(tmp_path, gallery, model, photo):
    folder = tmp_path / "in"
    folder.mkdir()
    bad_images(folder, photo)
    shutil.copy(photo, folder / "zz-good.png")
    # FolderSource skips what it cannot read (a warning each) and never waits on the FIFO.
    argv = ["stream", "--source", str(folder), "--gallery", gallery, "--model", model]
    run_corpus([Case("stream folder", argv, {ExitCode.OK}, 0, [gallery])])


# ---------------------------------------------------------------- models and cards

# Values of the wrong type or range for card fields (each field gets each).
_WRONG = [None, "96", [1], {"a": 1}, -1, 0, 10**12, "NaN", True, 1.5, ""]
# Fields verify reads after loading (info reads them all).
_USED_BY_VERIFY = {
    "thresholds", "mean", "std", "color_order", "alignment", "input_height", "input_width", "embedding_size",
    "compatibility_group",
}


def test_model_cards_mutated(tmp_path, model, photo):
    card = json.loads(Path(model).with_suffix(".json").read_text())
    cases = []
    for key in sorted(card):
        for number, value in enumerate(_WRONG):
            folder = tmp_path / f"{key}-{number}"
            folder.mkdir()
            target = folder / "m.tflite"
            shutil.copy(model, target)
            edited = dict(card, **{key: value}) if value is not None else {k: v for k, v in card.items() if k != key}
            target.with_suffix(".json").write_text(json.dumps(edited))
            label = f"card {key}={value!r}"
            cases.append(Case(f"info {label}", ["info", "--model", str(target)], {ExitCode.OK, ExitCode.MODEL}))
            if key in _USED_BY_VERIFY:
                argv = ["verify", "--model", str(target), photo, photo]
                cases.append(Case(f"verify {label}", argv, {ExitCode.OK, ExitCode.MODEL}))
    for key in ("far_1e3", "best_accuracy"):
        for number, value in enumerate(["NaN", -1, 0, 4, 10, [0.5], True]):
            target = tmp_path / f"t-{key}-{number}.tflite"
            shutil.copy(model, target)
            target.with_suffix(".json").write_text(json.dumps(dict(card, thresholds={key: value})))
            argv = ["verify", "--model", str(target), photo, photo]
            cases.append(Case(f"verify threshold {key}={value!r}", argv, {ExitCode.MODEL}))
    for number, text in enumerate(["", "{", "[]", "null", '{"name": NaN}', "\xff\xfe", "{}" + " " * 2_000_000]):
        target = tmp_path / f"raw-{number}.tflite"
        shutil.copy(model, target)
        target.with_suffix(".json").write_bytes(text.encode("latin-1"))
        cases.append(Case(f"info raw card {number}", ["info", "--model", str(target)], {ExitCode.MODEL}))
    run_corpus(cases)


def test_bad_models(tmp_path, model, photo):
    data = Path(model).read_bytes()
    card = Path(model).with_suffix(".json").read_text()
    models = {
        "empty": b"",
        "text": b"not a model\n",
        "truncated": data[: len(data) // 2],
        "wrong-identifier": b"\0\0\0\0ABCD" + data[8:],
    }
    paths = {}
    for name, content in models.items():
        path = tmp_path / f"{name}.tflite"
        path.write_bytes(content)
        path.with_suffix(".json").write_text(card)
        paths[name] = str(path)
    sparse = tmp_path / "sparse.tflite"
    with open(sparse, "wb") as file:
        file.truncate(3 * 1024**3)
    sparse.with_suffix(".json").write_text(card)
    os.mkfifo(tmp_path / "fifo.tflite")
    (tmp_path / "fifo.json").write_text(card)
    no_card = tmp_path / "no_card.tflite"
    shutil.copy(model, no_card)
    paths.update(
        sparse=str(sparse),
        fifo=str(tmp_path / "fifo.tflite"),
        directory=str(tmp_path),
        missing=str(tmp_path / "nope.tflite"),
        device="/dev/zero",
        no_card=str(no_card),
    )
    cases = []
    for label, path in paths.items():
        cases.append(Case(f"info {label}", ["info", "--model", path], {ExitCode.MODEL}))
        cases.append(Case(f"verify {label}", ["verify", "--model", path, photo, photo], {ExitCode.MODEL}))
    run_corpus(cases)


# ---------------------------------------------------------------- galleries


def _corrupted(source: str, target: Path) -> None:
    data = bytearray(Path(source).read_bytes())
    middle = len(data) // 2 // 4096 * 4096
    data[middle : middle + 4096] = np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    target.write_bytes(bytes(data))


def bad_galleries(folder: Path, good: str) -> dict[str, str]:
    """Files at a gallery's path that must be refused (or read) without being changed."""
    rng = np.random.default_rng(7)
    big = folder / "big.db"
    with Gallery.open(good) as source:
        identity = source.identity  # the test model's: damage, not the model, is under test
    with Gallery.create(big, identity, 1.0) as gallery:
        for person in range(100):
            gallery.add(f"p{person}", rng.standard_normal((10, 128)).astype(np.float32), identity)
    paths: dict[str, str] = {}

    def write(name: str, data: bytes) -> None:
        (folder / name).write_bytes(data)
        paths[name] = str(folder / name)

    write("empty.db", b"")
    write("text.db", b"people and their faces\n")
    write("header-then-random.db", b"SQLite format 3\x00" + rng.integers(0, 256, 8192, dtype=np.uint8).tobytes())
    write("truncated.db", Path(big).read_bytes()[:20_000])
    _corrupted(str(big), folder / "corrupted.db")
    paths["corrupted.db"] = str(folder / "corrupted.db")
    foreign = folder / "foreign.db"
    conn = sqlite3.connect(foreign)
    conn.executescript(
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);"
        "INSERT INTO meta VALUES ('schema','1'),('embedding_size','128'),('model_sha256','x'),('threshold','1');"
        "CREATE TABLE people (id INTEGER PRIMARY KEY, name TEXT);"
    )
    conn.close()
    paths["foreign.db"] = str(foreign)
    for name, sql in {
        "threshold-100.db": "UPDATE meta SET value='100' WHERE key='threshold'",
        "threshold-nan.db": "UPDATE meta SET value='NaN' WHERE key='threshold'",
        "threshold-null.db": "UPDATE meta SET value=NULL WHERE key='threshold'",
        "schema-99.db": "UPDATE meta SET value='99' WHERE key='schema'",
        "no-model.db": "DELETE FROM meta WHERE key='model_sha256'",
        "size-64.db": "UPDATE meta SET value='64' WHERE key='embedding_size'",
    }.items():
        path = folder / name
        shutil.copy(good, path)
        conn = sqlite3.connect(path)
        conn.execute(sql)
        conn.commit()
        conn.close()
        paths[name] = str(path)
    os.mkfifo(folder / "fifo.db")
    (folder / "dir.db").mkdir()
    paths.update({"fifo.db": str(folder / "fifo.db"), "dir.db": str(folder / "dir.db"), "dev-zero": "/dev/zero"})
    return paths


def test_bad_galleries_through_every_command(tmp_path, gallery, model, photo):
    folder = tmp_path / "galleries"
    folder.mkdir()
    galleries = bad_galleries(folder, gallery)
    export = str(tmp_path / "good.npz")
    assert main(["gallery", "export", export, "--gallery", gallery]) == 0
    # Reading a damaged file may succeed where the damage is not read (list of a file
    # whose broken page holds samples); writing never does.
    readable = {"corrupted.db", "truncated.db"}
    cases = []
    for label, path in galleries.items():
        read_codes = {ExitCode.GALLERY} | ({ExitCode.OK} if label in readable else set())
        watch = [path] if Path(path).is_file() else []
        out = str(tmp_path / f"{label}.npz")
        cases += [
            Case(f"list {label}", ["gallery", "list", "--gallery", path], read_codes, 1, watch),
            Case(f"export {label}", ["gallery", "export", out, "--gallery", path], read_codes, 1, watch),
            Case(f"identify {label}", ["identify", "--gallery", path, "--model", model, photo], read_codes, 1, watch),
            Case(
                f"enroll {label}", ["enroll", "--gallery", path, "--name", "x", "--model", model, photo],
                {ExitCode.GALLERY}, 1, watch,
            ),
            Case(f"remove {label}", ["gallery", "remove", "p1", "--gallery", path], {ExitCode.GALLERY}, 1, watch),
            Case(f"rename {label}", ["gallery", "rename", "p1", "q", "--gallery", path], {ExitCode.GALLERY}, 1, watch),
            Case(f"import {label}", ["gallery", "import", export, "--gallery", path], {ExitCode.GALLERY}, 1, watch),
        ]
    run_corpus(cases)


# ---------------------------------------------------------------- exports


def _arrays(sha256: str = "a" * 64) -> dict[str, np.ndarray]:
    return {
        "format": np.array(EXPORT_FORMAT),
        "names": np.array(["Eve", "Bob"]),
        "embeddings": np.eye(2, 128, dtype=np.int8) * 127,
        "model_sha256": np.array(sha256),
        "compatibility_group": np.array(""),
        "threshold": np.array(1.0),
    }


def _declaring(path: Path, key: str, shape: tuple, dtype: str) -> None:
    """Replace ``key`` by a member that declares ``shape`` and holds no data."""
    with zipfile.ZipFile(path) as archive:
        members = {n: archive.read(n) for n in archive.namelist() if n != f"{key}.npy"}
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
        with archive.open(f"{key}.npy", "w") as member:
            np.lib.format.write_array_header_1_0(
                member, {"descr": np.dtype(dtype).str, "fortran_order": False, "shape": shape}
            )


def bad_exports(folder: Path) -> dict[str, str]:
    paths: dict[str, str] = {}

    def save(name: str, **changes) -> Path:
        arrays = {k: v for k, v in {**_arrays(), **changes}.items() if v is not None}
        path = folder / f"{name}.npz"
        np.savez(path, **arrays)
        paths[name] = str(path)
        return path

    save("names-2d", names=np.array([["Eve", "Bob"]]))
    save("names-object", names=np.array(["Eve", "Bob"], dtype=object))
    save("names-int", names=np.array([1, 2]))
    save("names-bidi", names=np.array(["Eve", "B\u202eob"]))
    save("names-empty", names=np.array(["Eve", ""]))
    save("embeddings-float", embeddings=np.eye(2, 128, dtype=np.float32))
    save("embeddings-count", embeddings=np.ones((3, 128), np.int8))
    save("embeddings-zero", embeddings=np.zeros((2, 128), np.int8))
    save("embeddings-3d", embeddings=np.ones((2, 128, 1), np.int8))
    save("threshold-nan", threshold=np.array(np.nan))
    save("threshold-string", threshold=np.array("1.0"))
    save("format-wrong", format=np.array("something-else/1"))
    save("format-missing", format=None)
    save("embeddings-missing", embeddings=None)
    _declaring(save("declares-100g"), "embeddings", (800_000_000, 128), "i1")
    _declaring(save("names-declares-2g"), "names", (4_000_000,), "<U128")
    np.savez_compressed(folder / "compressed.npz", **_arrays())
    paths["compressed"] = str(folder / "compressed.npz")
    good = save("good-for-truncation")
    (folder / "truncated.npz").write_bytes(good.read_bytes()[:300])
    paths["truncated"] = str(folder / "truncated.npz")
    del paths["good-for-truncation"]
    for name, data in {"empty": b"", "text": b"not an export\n", "zip-of-nothing": b"PK\x05\x06" + bytes(18)}.items():
        (folder / f"{name}.npz").write_bytes(data)
        paths[name] = str(folder / f"{name}.npz")
    os.mkfifo(folder / "fifo.npz")
    paths.update({"fifo": str(folder / "fifo.npz"), "dev-zero": "/dev/zero", "missing": str(folder / "nope.npz")})
    return paths


def test_bad_exports_imported(tmp_path, gallery):
    folder = tmp_path / "exports"
    folder.mkdir()
    cases = []
    for label, path in bad_exports(folder).items():
        argv = ["gallery", "import", path, "--gallery", gallery]
        cases.append(Case(f"import {label}", argv, {ExitCode.GALLERY}, 1, [gallery]))
        # Into a missing gallery (a restore): refused, and no gallery file appears.
        missing = str(tmp_path / f"new-{label}.db")
        cases.append(Case(f"restore {label}", ["gallery", "import", path, "--gallery", missing], {ExitCode.GALLERY}))
    run_corpus(cases)
    assert not list(tmp_path.glob("new-*")) and not list(tmp_path.glob(".new-*"))


def test_export_with_an_unused_large_array_costs_nothing(tmp_path, gallery):
    """An export carrying an extra array (256 MB here; 3 GB in the slow test) imports
    without the child's memory growing by it."""
    _import_with_extra(tmp_path, gallery, 256 * 1024**2)


@pytest.mark.slow
def test_export_with_an_unused_3gb_array(tmp_path, gallery):
    _import_with_extra(tmp_path, gallery, 3 * 1024**3)


def _import_with_extra(tmp_path: Path, gallery: str, size: int) -> None:
    path = tmp_path / "extra.npz"
    with Gallery.open(gallery) as opened:
        sha256 = opened.identity.sha256
    np.savez(path, **_arrays(sha256))
    header = {"descr": "|u1", "fortran_order": False, "shape": (size,)}
    with zipfile.ZipFile(path, "a", allowZip64=True) as archive:
        with archive.open("junk.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array_header_1_0(member, header)
            chunk = bytes(1 << 24)
            for _ in range(size // len(chunk)):
                member.write(chunk)
    run_corpus([Case("import extra", ["gallery", "import", str(path), "--gallery", gallery], {ExitCode.OK})])
    with Gallery.open(gallery) as opened:
        assert {p.name for p in opened.list()} == {NAME, "Eve", "Bob"}
