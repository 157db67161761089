"""The facenet-edge command, end to end with the tiny random-weight test model.

The tiny model has random weights, so these tests assert what is true of any
embedding model: the same image embeds to the same vector (distance ~0), outputs have
the documented structure, and errors are reported and leave galleries intact. They do
not assert that a transformed photo is *recognised* (accepted); see
``test_flipped_copy_ranks_above_a_decoy`` for the one ranking claim made.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sqlite3
import stat
import struct
import subprocess
import sys
import zlib
from datetime import datetime
from pathlib import Path

import cv2
import numpy as np
import pytest
from facenet_edge import card_summary
from facenet_edge import embed as embed_module
from facenet_edge.card import ModelCard
from facenet_edge.cli import ExitCode, build_parser, main
from facenet_edge.embed import Embedder
from facenet_edge.fpir import ImpostorDistribution, card_distribution, threshold_for_fpir
from facenet_edge.gallery import Gallery

NAME = "astronaut"


def _save_png(path: Path, rgb: np.ndarray) -> str:
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return str(path)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height but holds no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))


@pytest.fixture(scope="module")
def images(tmp_path_factory, astronaut) -> dict[str, str]:
    """Test images on disk, good and bad."""
    d = tmp_path_factory.mktemp("images")
    head = astronaut[0:300, 80:380]  # a crop where the face fills enough of the frame for BlazeFace
    flipped = cv2.resize(astronaut[:, ::-1], None, fx=0.8, fy=0.8, interpolation=cv2.INTER_AREA)
    paths = {
        "astronaut": _save_png(d / "astronaut.png", astronaut),
        "flipped": _save_png(d / "flipped.png", np.ascontiguousarray(flipped)),
        "blank": _save_png(d / "blank.png", np.full((240, 320, 3), 128, np.uint8)),
        "two_faces": _save_png(d / "two_faces.png", np.hstack([head, head])),
        "one_pixel": _save_png(d / "one_pixel.png", np.zeros((1, 1, 3), np.uint8)),
    }
    (d / "empty.jpg").write_bytes(b"")
    (d / "text.jpg").write_text("this is not a JPEG\n")
    (d / "huge.png").write_bytes(_png_header_only(20000, 20000))
    paths.update(empty=str(d / "empty.jpg"), text=str(d / "text.jpg"), huge=str(d / "huge.png"))
    return paths


@pytest.fixture
def gallery(tmp_path, model, images) -> str:
    """A gallery with the astronaut enrolled from the original photo."""
    path = str(tmp_path / "faces.db")
    assert main(["enroll", "--gallery", path, "--name", NAME, "--model", model, images["astronaut"]]) == 0
    return path


def snapshot(path: str) -> tuple[list, list]:
    conn = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True)
    try:
        return (
            conn.execute("SELECT * FROM people ORDER BY id").fetchall(),
            conn.execute("SELECT * FROM samples ORDER BY id").fetchall(),
        )
    finally:
        conn.close()


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def error_line(capsys) -> str:
    """The command's stderr, which must be exactly one line and no traceback."""
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("facenet-edge: error: ") and "Traceback" not in err
    return lines[0]


# ---------------------------------------------------------------- happy paths


def test_enroll_then_identify(gallery, model, images, capsys):
    capsys.readouterr()
    rc = main(["identify", "--gallery", gallery, "--model", model, "--json", images["astronaut"], images["flipped"]])
    assert rc == ExitCode.OK
    same, flipped = json_lines(capsys.readouterr().out)
    assert same["path"] == images["astronaut"] and flipped["path"] == images["flipped"]
    (face,) = same["faces"]
    assert face["name"] == NAME and face["distance"] < 2e-3  # same photo: only int8 rounding
    assert face["matches"] == [
        {
            "name": NAME,
            "distance": face["distance"],
            "similarity": pytest.approx(1 - face["distance"] / 2, abs=1e-4),
            "accepted": True,
        }
    ]
    assert len(face["box"]) == 4 and 0 < face["score"] <= 1
    # The flipped, rescaled copy: one face, ranked against the only enrolled person.
    (face,) = flipped["faces"]
    assert face["matches"][0]["name"] == NAME and 0 <= face["matches"][0]["distance"] <= 4

    assert main(["identify", "--gallery", gallery, "--model", model, images["astronaut"]]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{images['astronaut']} face 1 [") and f": {NAME} (distance 0.00" in out


def test_flipped_copy_ranks_above_a_decoy(gallery, model, images, capsys):
    """With a second "person" enrolled from a face-free picture (the embedding of a
    cat photo), the flipped, rescaled astronaut still ranks the astronaut first. Even a
    random network maps a mirrored photo of the same scene nearer than a different scene;
    this is the only recognition claim these tests make."""
    data = pytest.importorskip("skimage.data")
    cat = cv2.resize(data.chelsea(), (96, 96), interpolation=cv2.INTER_AREA)
    with Embedder.from_path(model) as embedder, Gallery.open(gallery) as g:
        g.add("decoy", embedder.embed(cat[None]), embedder.identity)
    capsys.readouterr()
    assert main(["identify", "--gallery", gallery, "--model", model, "--json", "--top-k", "2", images["flipped"]]) == 0
    (line,) = json_lines(capsys.readouterr().out)
    names = [m["name"] for m in line["faces"][0]["matches"]]
    assert names == [NAME, "decoy"]


def test_enroll_adds_samples(gallery, model, images, capsys):
    capsys.readouterr()
    argv = ["enroll", "--gallery", gallery, "--name", NAME, "--model", model]
    assert main([*argv, "--json", images["flipped"], images["astronaut"]]) == 0
    enrolment = json.loads(capsys.readouterr().out)
    # How far apart the person's samples are, against the threshold (the same photo: close).
    samples = enrolment.pop("consistency")
    assert (samples["name"], samples["samples"]) == (NAME, 3) and samples["largest"] < samples["threshold"]
    assert enrolment == {
        "gallery": gallery,
        "name": NAME,
        "added": 2,
        "skipped": [],
        "person_samples": 3,
        "gallery_people": 1,
        "gallery_samples": 3,
    }
    assert main(["enroll", "--gallery", gallery, "--name", "twin", "--model", model, images["flipped"]]) == 0
    assert capsys.readouterr().out == (
        f"enrolled 'twin': 1 sample(s) added, 0 image(s) skipped; 'twin' now has 1 sample(s); "
        f"{gallery} holds 4 sample(s) of 2 people\n"
    )


def test_enroll_subject_of_a_group_photo(gallery, model, images, capsys):
    capsys.readouterr()
    argv = ["enroll", "--gallery", gallery, "--name", "pair", "--model", model, "--json", images["two_faces"]]
    assert main([*argv, "--subject"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["added"] == 1
    assert "2 faces in" in captured.err and "enrolling the one covering the centre" in captured.err


def test_verify(model, images, capsys):
    assert main(["verify", "--model", model, "--json", images["astronaut"], images["astronaut"]]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["distance"] < 1e-4 and result["same"] is True
    assert result["threshold"] == 1.0  # the tiny card's far_1e3
    assert main(["verify", "--model", model, images["astronaut"], images["flipped"]]) == 0
    out = capsys.readouterr().out
    assert out.startswith(("same person: distance", "different people: distance")) and "similarity" in out
    assert main(["verify", "--model", model, images["astronaut"], images["blank"]]) == ExitCode.NO_FACE
    assert "blank.png" in error_line(capsys)


def test_embed_json_lines(model, images, capsys):
    paths = [images["astronaut"], images["text"], images["blank"], images["flipped"]]
    rc = main(["embed", "--model", model, "--json", *paths])
    captured = capsys.readouterr()
    lines = json_lines(captured.out)
    assert [line["path"] for line in lines] == paths  # one object per image, in order
    good, unreadable, blank, flipped = lines
    for line in (good, flipped):
        assert set(line) == {"path", "faces"}
        (face,) = line["faces"]
        assert {"box", "score", "embedding"} <= set(face)
        embedding = np.array(face["embedding"])
        assert embedding.shape == (128,) and abs(np.linalg.norm(embedding) - 1) < 1e-4
    assert unreadable["faces"] == [] and "text.jpg" in unreadable["error"]
    assert blank == {"path": images["blank"], "faces": []}
    # Failures are reported and processing goes on; the exit code is the first failure's.
    assert rc == ExitCode.IMAGE
    assert "text.jpg" in captured.err and "blank.png" in captured.err and "2 of 4 image(s) failed" in captured.err


def test_embed_detect_width_reaches_the_detector(model, images, capsys):
    # The 512 px astronaut shrunk to 24 px wide before YuNet looks: too small a face to find.
    assert main(["embed", "--model", model, "--json", "--detect-width", "24", images["astronaut"]]) != 0
    assert json_lines(capsys.readouterr().out)[0]["faces"] == []
    assert main(["embed", "--model", model, "--json", "--detect-width", "512", images["astronaut"]]) == 0
    (face,) = json_lines(capsys.readouterr().out)[0]["faces"]
    assert main(["embed", "--model", model, "--detect-width", "0", images["astronaut"]]) == ExitCode.USAGE
    assert "--detect-width" in capsys.readouterr().err


def test_embed_out_npy(tmp_path, model, images, capsys):
    out = tmp_path / "e.npy"
    assert main(["embed", "--model", model, "--out", str(out), images["astronaut"], images["two_faces"]]) == 0
    matrix = np.load(out)
    assert matrix.shape == (3, 128) and matrix.dtype == np.float32
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    printed = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in printed] == ["row 0", "row 1", "row 2"]


def test_embed_out_unwritable(tmp_path, model, images, capsys):
    out = tmp_path / "missing-folder" / "e.npy"
    assert main(["embed", "--model", model, "--out", str(out), images["astronaut"]]) == ExitCode.ERROR
    assert "cannot write" in error_line(capsys) and not out.parent.exists()


def test_gallery_maintenance(gallery, tmp_path, model, images, capsys):
    def listing() -> dict:
        capsys.readouterr()
        assert main(["gallery", "list", "--gallery", gallery, "--json"]) == 0
        return json.loads(capsys.readouterr().out)

    first = listing()
    assert [p["name"] for p in first["people"]] == [NAME] and first["threshold"] == 1.0
    assert main(["gallery", "rename", NAME, "Neil", "--gallery", gallery]) == 0
    assert [p["name"] for p in listing()["people"]] == ["Neil"]

    export = str(tmp_path / "backup.npz")
    assert main(["gallery", "export", export, "--gallery", gallery]) == 0
    assert stat.S_IMODE(os.stat(export).st_mode) == 0o600
    assert main(["gallery", "remove", "Neil", "--gallery", gallery]) == 0
    assert listing()["people"] == []
    assert main(["gallery", "import", export, "--gallery", gallery]) == 0
    assert [(p["name"], p["samples"]) for p in listing()["people"]] == [("Neil", 1)]

    restored = str(tmp_path / "restored.db")  # import into a missing gallery restores it
    assert main(["gallery", "import", export, "--gallery", restored]) == 0
    assert snapshot(restored)[1][0][2] == snapshot(gallery)[1][0][2]
    capsys.readouterr()
    assert main(["identify", "--gallery", restored, "--model", model, images["astronaut"]]) == 0
    assert ": Neil (distance" in capsys.readouterr().out

    assert main(["gallery", "list", "--gallery", gallery]) == 0
    assert capsys.readouterr().out.startswith("Neil\t1 sample(s)\tupdated ")


def test_stream_over_a_folder(gallery, tmp_path, model, images, capsys):
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, key in enumerate(["blank", "astronaut", "astronaut", "astronaut", "blank"]):
        shutil.copy(images[key], folder / f"{i:02d}.png")
    capsys.readouterr()
    rc = main(
        [
            "stream",
            "--source",
            str(folder),
            "--gallery",
            gallery,
            "--model",
            model,
            "--vote",
            "3:2",
            "--json",
            "--max-frames",
            "4",
        ]
    )
    assert rc == 0
    decisions = json_lines(capsys.readouterr().out)
    # Frames 1 and 2 show the astronaut: the vote settles on frame 2; frame 4 is never read.
    assert [(d["frame"], d["name"]) for d in decisions] == [(2, NAME)]
    (decision,) = decisions
    # Seconds since the first frame, to the millisecond; the wall-clock time in ISO 8601.
    assert decision["t"] >= 0 and round(decision["t"], 3) == decision["t"]
    assert datetime.fromisoformat(decision["time"]).tzinfo is not None

    rc = main(["stream", "--source", str(folder), "--gallery", gallery, "--model", model, "--vote", "3:2"])
    assert rc == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert re.fullmatch(rf"frame 2 t=\d+\.\d{{3}}: {NAME}", line)


def test_info(model, capsys):
    assert main(["info", "--model", model]) == 0
    out = capsys.readouterr().out
    assert "tiny_int8 0" in out and re.search(r"^threshold, FAR 1e-3 +1\.000$", out, re.M)
    # An aligned table: every value starts in the same column.
    columns = {len(re.match(r"\S+(?:[ ,]\S+)*? {2,}", line).group()) for line in out.splitlines()}
    assert len(columns) == 1
    assert main(["info", "--model", model, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["card"]["input_height"] == 96 and len(info["sha256"]) == 64


def test_info_rounds_and_hides_build_paths():
    card = ModelCard(
        name="m",
        version="1",
        architecture="a",
        input_height=96,
        input_width=96,
        lfw={"accuracy_mean": 0.9111666666666667, "accuracy_std": 0.010879389280245073, "far_target": 0.001,
             "val_mean": 0.2843333333333333, "val_std": 0.02848196310337863, "auc": 0.9719841111111112,
             "runtime_path": {"accuracy_mean": 0.9118333333333334, "detector": "blazeface"}},
        quantization={"target": "int8", "calibration": {"faces": 300, "identities": 66, "source": "crop cache /x/y"}},
    )
    rows = {row.key: row.value for row in card_summary.summary(card, Path(__file__), "0" * 64)}
    assert rows["LFW, runtime path"] == "accuracy 91.18 %, blazeface detector"
    assert rows["LFW, aligned crops"] == "accuracy 91.12 ± 1.09 %, VAL@FAR 1e-3 28.43 ± 2.85 %, AUC 0.972"
    assert rows["quantization"] == "int8; calibrated on 300 faces of 66 identities"
    text = "\n".join(value for key, value in rows.items() if key != "model")
    assert "/x/y" not in text and "{" not in text


def test_every_option_has_help():
    def parsers(parser: argparse.ArgumentParser):
        yield parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    yield from parsers(sub)

    for parser in parsers(build_parser()):
        for action in parser._actions:
            if not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                assert action.help, f"{parser.prog} {action.option_strings or action.dest}"


@pytest.mark.parametrize(
    "argv",
    [
        ["gallery", "list", "--gallery", "g", "--model", "m.tflite"],
        ["gallery", "remove", "x", "--gallery", "g", "--threads", "2"],
        ["gallery", "export", "f.npz", "--gallery", "g", "--detector", "haar"],
        ["info", "--detector", "haar"],
        ["info", "--threads", "2"],
        ["verify", "--quiet", "a.jpg", "b.jpg"],
        ["stream", "--source", "0", "--gallery", "g", "--quiet"],
    ],
)
def test_options_that_would_do_nothing_are_refused(argv, capsys):
    assert main(argv) == ExitCode.USAGE
    assert "unrecognized arguments" in capsys.readouterr().err


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "image, code, words",
    [
        ("empty", ExitCode.IMAGE, "empty"),
        ("text", ExitCode.IMAGE, "text.jpg"),
        ("one_pixel", ExitCode.IMAGE, "too small"),
        ("huge", ExitCode.IMAGE, "too large"),
        ("blank", ExitCode.NO_FACE, "no face found in"),
        ("two_faces", ExitCode.MULTIPLE_FACES, "2 faces found in"),
    ],
)
def test_enroll_skips_a_bad_image_and_enrols_the_rest(gallery, model, images, capsys, image, code, words):
    capsys.readouterr()
    argv = ["enroll", "--gallery", gallery, "--name", "someone", "--model", model, "--json"]
    rc = main([*argv, images["astronaut"], images[image], images["flipped"]])
    assert rc == code  # non-zero: one photo was not enrolled
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["added"] == 2 and result["person_samples"] == 2
    ((path, reason),) = [(s["path"], s["reason"]) for s in result["skipped"]]
    assert path == images[image] and words in reason
    (line,) = captured.err.splitlines()
    assert line.startswith("facenet-edge: skipped: ") and words in line and Path(images[image]).name in line
    assert [(p.name, p.samples) for p in Gallery.open(gallery).list()] == [(NAME, 1), ("someone", 2)]


def test_enroll_bad_image_creates_no_gallery(tmp_path, model, images, capsys):
    path = tmp_path / "new.db"
    argv = ["enroll", "--gallery", str(path), "--name", "x", "--model", model, images["blank"], images["text"]]
    assert main(argv) == ExitCode.NO_FACE  # the first failure's code
    assert not path.exists()
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == "facenet-edge: error: nothing enrolled: none of the 2 image(s) was usable"


def test_enroll_invalid_name(gallery, model, images, capsys):
    before = snapshot(gallery)
    capsys.readouterr()
    assert (
        main(["enroll", "--gallery", gallery, "--name", "bad\nname", "--model", model, images["astronaut"]])
        == ExitCode.GALLERY
    )
    assert "control characters" in error_line(capsys)
    assert snapshot(gallery) == before


def test_truncated_model(gallery, tmp_path, model, images, capsys):
    truncated = tmp_path / "truncated.tflite"
    data = Path(model).read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    shutil.copy(Path(model).with_suffix(".json"), truncated.with_suffix(".json"))
    before = snapshot(gallery)
    capsys.readouterr()
    for command in (
        ["enroll", "--gallery", gallery, "--name", "x", images["astronaut"]],
        ["identify", "--gallery", gallery, images["astronaut"]],
        ["info"],
    ):
        assert main([*command, "--model", str(truncated)]) == ExitCode.MODEL
        assert "truncated.tflite" in error_line(capsys)
    assert snapshot(gallery) == before


def test_incompatible_model(gallery, tiny_model, images, capsys):
    before = snapshot(gallery)
    capsys.readouterr()
    other = str(tiny_model.float32)  # different file, no shared compatibility group
    assert main(["identify", "--gallery", gallery, "--model", other, images["astronaut"]]) == ExitCode.INCOMPATIBLE
    assert "cannot be compared" in error_line(capsys)
    assert (
        main(["enroll", "--gallery", gallery, "--name", "x", "--model", other, images["astronaut"]])
        == ExitCode.INCOMPATIBLE
    )
    error_line(capsys)
    assert snapshot(gallery) == before


def test_unknown_gallery_and_names(gallery, tmp_path, model, images, capsys):
    missing = str(tmp_path / "missing.db")
    capsys.readouterr()
    assert main(["identify", "--gallery", missing, "--model", model, images["astronaut"]]) == ExitCode.GALLERY
    assert "gallery not found" in error_line(capsys) and not Path(missing).exists()
    assert main(["gallery", "list", "--gallery", missing]) == ExitCode.GALLERY
    error_line(capsys)
    not_a_gallery = tmp_path / "notes.db"
    not_a_gallery.write_text("hello")
    assert main(["gallery", "list", "--gallery", str(not_a_gallery)]) == ExitCode.GALLERY
    assert "not an SQLite database" in error_line(capsys) and not_a_gallery.read_text() == "hello"
    before = snapshot(gallery)
    assert main(["gallery", "remove", "nobody", "--gallery", gallery]) == ExitCode.GALLERY
    assert "nobody" in error_line(capsys)
    assert main(["gallery", "rename", NAME, "", "--gallery", gallery]) == ExitCode.GALLERY
    error_line(capsys)
    assert snapshot(gallery) == before


def test_no_default_model(monkeypatch, tmp_path, images, capsys):
    monkeypatch.setattr(embed_module, "MODELS_DIR", tmp_path)
    monkeypatch.setattr(embed_module, "DEFAULT_MODEL_POINTER", tmp_path / "default.txt")
    capsys.readouterr()
    assert main(["embed", images["astronaut"]]) == ExitCode.MODEL
    assert "pass --model PATH" in error_line(capsys)


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["identify"],
        ["embed", "--threads", "0", "x.png"],
        ["stream", "--source", "0", "--gallery", "g", "--vote", "2:3"],
        ["nonsense"],
    ],
)
def test_usage_errors(argv, capsys):
    assert main(argv) == ExitCode.USAGE
    assert "usage:" in capsys.readouterr().err


# ---------------------------------------------------------------- the installed command


def _console_script() -> str:
    script = Path(sys.executable).with_name("facenet-edge")
    if not script.exists():
        pytest.skip("the facenet-edge console script is not installed (pip install -e .)")
    return str(script)


def _our_stderr(err: str) -> list[str]:
    # The TFLite runtime prints "INFO: Created TensorFlow Lite XNNPACK delegate for CPU."
    # from native code when a model loads; that line is not ours.
    return [line for line in err.splitlines() if not line.startswith("INFO: Created TensorFlow Lite")]


def test_console_script_embed(model, images):
    run = subprocess.run(
        [_console_script(), "embed", "--json", "--model", model, images["astronaut"]],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    (line,) = json_lines(run.stdout)
    assert len(line["faces"][0]["embedding"]) == 128
    assert _our_stderr(run.stderr) == []


def test_console_script_error(gallery, model, images):
    before = snapshot(gallery)
    run = subprocess.run(
        [_console_script(), "enroll", "--gallery", gallery, "--name", "x", "--model", model, images["two_faces"]],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == ExitCode.MULTIPLE_FACES
    assert run.stdout == ""
    skipped, error = _our_stderr(run.stderr)
    assert skipped.startswith("facenet-edge: skipped: 2 faces found in") and "--subject" in skipped
    assert error == "facenet-edge: error: nothing enrolled: none of the 1 image(s) was usable"
    assert snapshot(gallery) == before


def test_console_script_stream_without_a_camera(gallery, model):
    # OpenCV's own "[ WARN:0@0.188] ... can't open camera by index" must not leak out.
    run = subprocess.run(
        [_console_script(), "stream", "--source", "7", "--gallery", gallery, "--model", model],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == ExitCode.IMAGE
    (line,) = _our_stderr(run.stderr)
    assert line.startswith("facenet-edge: error: ")


# ---------------------------------------------------------------- open-set thresholds, tracking, enrolment quality


def test_enroll_refuses_a_poor_photo_with_the_reason(tmp_path, model, astronaut, capsys):
    blurred = _save_png(tmp_path / "blurred.png", cv2.GaussianBlur(astronaut, (0, 0), 6))
    argv = ["enroll", "--gallery", str(tmp_path / "g.db"), "--name", "Ada", "--model", model, blurred]
    assert main(argv) == ExitCode.IMAGE
    assert "too blurry" in capsys.readouterr().err and not (tmp_path / "g.db").exists()
    assert main([*argv, "--any-photo"]) == 0


@pytest.fixture
def calibrated(tmp_path, model) -> str:
    """The tiny model with an impostor distribution in its card (log-linear: 1.25 at 1e-3)."""
    copy = tmp_path / "calibrated.tflite"
    shutil.copy(model, copy)
    card = json.loads(Path(model).with_suffix(".json").read_text())
    u = (np.arange(1_000_000) + 0.5) / 1_000_000
    entry = ImpostorDistribution.of(np.clip(2.0 + 0.25 * np.log10(u), 0.0, 4.0), "test").to_dict()
    card["extra"] = {**card.get("extra", {}), "impostor": entry}
    copy.with_suffix(".json").write_text(json.dumps(card))
    return str(copy)


def test_fpir_sets_the_threshold_for_the_gallery_size(tmp_path, calibrated, model, images, capsys):
    gallery = str(tmp_path / "g.db")
    assert main(["enroll", "--gallery", gallery, "--name", NAME, "--model", calibrated, images["astronaut"]]) == 0
    distribution = card_distribution(ModelCard.load(Path(calibrated).with_suffix(".json")))
    capsys.readouterr()
    for extra, target in (([], 1e-3), (["--fpir", "1e-4"], 1e-4)):
        assert main(["identify", "--gallery", gallery, "--model", calibrated, "--json", *extra, images["flipped"]]) == 0
        (line,) = json_lines(capsys.readouterr().out)
        expected = threshold_for_fpir(distribution, target, 1).threshold
        assert (line["fpir_target"], line["samples"]) == (target, 1)
        assert line["threshold"] == round(expected, 4)
        assert main(["gallery", "info", "--gallery", gallery, "--model", calibrated, "--json", *extra]) == 0
        info = json.loads(capsys.readouterr().out)
        assert (info["people"], info["samples"], info["fpir_target"]) == (1, 1, target)
        assert info["threshold"] == round(expected, 4) and info["stored_threshold"] == 1.0
    # A fixed threshold, and a card without a distribution: the gallery's own threshold.
    assert main(["identify", "--gallery", gallery, "--model", calibrated, "--json", "--threshold", "0.5",
                 images["flipped"]]) == 0  # fmt: skip
    assert json_lines(capsys.readouterr().out)[0]["fpir_target"] is None
    assert main(["gallery", "info", "--gallery", gallery, "--model", model]) == 0
    assert "threshold 1.0000 (fixed; stored 1.0000)" in capsys.readouterr().out
    assert main(["identify", "--gallery", gallery, "--model", model, "--fpir", "1e-3", images["flipped"]]) != 0
    assert "no impostor distribution" in capsys.readouterr().err
    assert main(["identify", "--gallery", gallery, "--model", model, "--fpir", "2", images["flipped"]]) == 2


def test_stream_with_tracking_decides_from_fused_frames(gallery, tmp_path, model, images, capsys):
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, key in enumerate(["blank", "astronaut", "astronaut", "astronaut", "blank"]):
        shutil.copy(images[key], folder / f"{i:02d}.png")
    capsys.readouterr()
    argv = ["stream", "--source", str(folder), "--gallery", gallery, "--model", model, "--track", "--json"]
    assert main(argv) == 0
    decisions = json_lines(capsys.readouterr().out)
    # Three embedded frames decide the track (TrackerOptions.min_frames); gone with the face.
    assert [(d["frame"], d["name"]) for d in decisions] == [(3, NAME), (4, None)]
