"""Open-set identification: LFW's identity halves and the card entries
(facenet_train.openset_lfw), and benchmarks/openset.py on a tiny configuration (skipped
when ../shared/data/lfw is absent)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from facenet_edge.card import ModelCard, card_path_for
from facenet_edge.embed import default_model_path
from facenet_edge.fpir import DistributionError
from facenet_train.openset_lfw import CALIBRATION, EVALUATION, half_of, impostor_distribution, write_card_entry

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
LFW = Path(__file__).resolve().parents[2] / "shared" / "data" / "lfw"
NO_LFW = "LFW not found at ../shared/data/lfw (beside the repository)"


def test_halves_are_fixed_by_name_and_both_used():
    names = [f"Person_{i}" for i in range(200)]
    halves = [half_of(n) for n in names]
    assert halves == [half_of(n) for n in names]
    assert {CALIBRATION, EVALUATION} == set(halves)
    assert 60 < halves.count(CALIBRATION) < 140


def test_card_entry_keeps_every_other_field(tmp_path):
    model = tmp_path / "m.tflite"
    shutil.copy(default_model_path(), model)
    shutil.copy(card_path_for(default_model_path()), card_path_for(model))
    before = json.loads(card_path_for(model).read_text())
    before["future_field"] = {"kept": True}  # a field this version does not know
    card_path_for(model).write_text(json.dumps(before))
    write_card_entry(model, "openset", {"results": []})
    after = json.loads(card_path_for(model).read_text())
    assert after["extra"]["openset"] == {"results": []}
    assert after["future_field"] == {"kept": True}
    assert {k: v for k, v in after.items() if k != "extra"} == {k: v for k, v in before.items() if k != "extra"}
    assert ModelCard.load(card_path_for(model)).extra["impostor"] == before["extra"]["impostor"]


def test_too_small_an_lfw_is_a_clear_error(tmp_path):
    (tmp_path / "Solo_Person").mkdir()
    (tmp_path / "Solo_Person" / "Solo_Person_0001.jpg").write_bytes(b"")
    with pytest.raises(DistributionError, match="fewer than two people"):
        impostor_distribution(default_model_path(), tmp_path)


@pytest.mark.skipif(not (LFW / "pairs.txt").is_file(), reason=NO_LFW)
def test_openset_benchmark_quick(tmp_path):
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "openset.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "|---|" in done.stdout
    report = json.loads((tmp_path / "openset.json").read_text())
    assert report["benchmark"] == "openset" and report["machine"]["cpu"]
    scores = report["results"]["scores"]
    assert {(s["size"], s["enrol"]) for s in scores} == {(5, 1), (5, 3), (20, 1), (20, 3)}
    for s in scores:
        assert s["nonmated"] >= 10 * s["mated"] / s["galleries"]
        assert 0.0 <= s["rank1"] <= 1.0
        assert [a["fpir"] for a in s["at_fpir"]] == [0.01, 0.001]
        assert {a["target"] for a in s["at_target"]} == {0.001, 0.01}  # the shipped card has a distribution
    assert (tmp_path / "openset_det.png").stat().st_size > 0
    # Deterministic: a second run (embeddings now cached) gives the same numbers.
    again = subprocess.run(
        [sys.executable, str(BENCHMARKS / "openset.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert json.loads((tmp_path / "openset.json").read_text())["results"]["scores"] == scores
