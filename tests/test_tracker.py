"""The IoU tracker and per-track fusion (facenet_edge.tracker), on synthetic detections
and a stub pipeline: no model needed; and benchmarks/tracking.py on a tiny configuration
(skipped when ../shared/data/lfw is absent)."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from facenet_edge.detect import Detection
from facenet_edge.pipeline import Vote
from facenet_edge.tracker import Tracker, TrackerOptions, iou, quality

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
LFW = Path(__file__).resolve().parents[2] / "shared" / "data" / "lfw"
NO_LFW = "LFW not found at ../shared/data/lfw (beside the repository)"


def face(x: float, y: float, side: float = 100.0, score: float = 0.9) -> Detection:
    return Detection(box=np.array([x, y, x + side, y + side], dtype=float), score=score)


def test_iou():
    a = np.array([0, 0, 10, 10.0])
    assert iou(a, a) == 1.0
    assert iou(a, np.array([20, 20, 30, 30.0])) == 0.0
    assert iou(a, np.array([5, 0, 15, 10.0])) == pytest.approx(50 / 150)


def test_ids_are_kept_across_small_moves_and_two_faces_stay_apart():
    tracker = Tracker()
    first = tracker.update([face(100, 100), face(400, 100)])
    ids = [t.id for t, _ in first]
    for step in range(1, 10):  # both drift 4 px and grow a little each frame
        moved = tracker.update([face(400 + 4 * step, 100, 100 + step),
                                face(100 + 4 * step, 100 + 2 * step, 100 + step)])
        assert sorted(t.id for t, _ in moved) == sorted(ids)
        assert {t.id: float(d.box[0]) for t, d in moved}[ids[0]] == 100 + 4 * step
    assert all(t.frames == 10 for t in tracker.tracks)


def test_a_gap_longer_than_max_missed_starts_a_new_track():
    tracker = Tracker(TrackerOptions(max_missed=2))
    (track, _), = tracker.update([face(100, 100)])
    for _ in range(2):
        tracker.update([])
    (same, _), = tracker.update([face(102, 100)])
    assert same.id == track.id  # two missed frames: still the same person
    for _ in range(3):
        tracker.update([])
    (new, _), = tracker.update([face(102, 100)])
    assert new.id != track.id


def test_a_jump_across_the_frame_is_a_new_track():
    tracker = Tracker()
    (a, _), = tracker.update([face(0, 0)])
    (b, _), = tracker.update([face(500, 300)])
    assert a.id != b.id


@dataclass
class Found:
    name: str
    distance: float
    accepted: bool


class StubGallery:
    """One enrolled vector: accepted within ``threshold`` (squared L2)."""

    def __init__(self, vector: np.ndarray, threshold: float) -> None:
        self.vector, self.threshold = vector, threshold
        self.queries: list[np.ndarray] = []

    def match(self, embeddings, identity):
        out = []
        for e in np.atleast_2d(embeddings):
            self.queries.append(e)
            d = float(np.sum((e - self.vector) ** 2))
            out.append(Found("ada", d, d <= self.threshold))
        return out


class StubEmbedder:
    def __init__(self, vectors: list[np.ndarray]) -> None:
        self.vectors = iter(vectors)

    def crop(self, image, detection):
        return np.zeros((4, 4, 3), np.uint8)

    def embed(self, crops):
        return np.stack([next(self.vectors) for _ in crops])


class StubPipeline:
    identity = "model"

    def __init__(self, vectors: list[np.ndarray], boxes: list[list[Detection]]) -> None:
        self.embedder = StubEmbedder(vectors)
        self.boxes = iter(boxes)

    def detect(self, image):
        return next(self.boxes)


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def test_fusion_averages_noisy_frames_into_an_accepted_decision():
    rng = np.random.default_rng(0)
    truth = unit(rng.normal(size=128))
    # Each frame alone is too far from the enrolled vector; their mean is close.
    noisy = [unit(truth + 0.13 * rng.normal(size=128)) for _ in range(30)]
    gallery = StubGallery(truth, threshold=0.8)
    assert all(np.sum((n - truth) ** 2) > 0.8 for n in noisy[:5])
    frames = 20
    pipeline = StubPipeline(noisy, [[face(100 + i, 100)] for i in range(frames)])
    tracker = Tracker(TrackerOptions(min_frames=5, fuse=5, reembed_every=10))
    decisions = []
    for _ in range(frames):
        (tracked,) = tracker.step(pipeline, np.zeros((480, 640, 3), np.uint8), gallery)
        decisions.append(tracked.track.match)
    assert decisions[:4] == [None] * 4  # undecided until min_frames embeddings
    assert decisions[4] is not None and decisions[4].accepted
    # Embedded on each of the first 5 frames, then every 10th: 5 + 1 (frame 15) of 20.
    assert tracker.embed_calls == 6 and tracker.faces_seen == frames


def test_fusion_keeps_the_best_quality_frames():
    tracker = Tracker(TrackerOptions(fuse=2))
    (track, _), = tracker.update([face(0, 0)])
    good, bad = unit(np.ones(128)), unit(-np.ones(128))
    tracker.add_embedding(track, good, quality(face(0, 0, 120, 0.9)))
    tracker.add_embedding(track, bad, quality(face(0, 0, 30, 0.5)))  # small, doubtful
    tracker.add_embedding(track, good, quality(face(0, 0, 110, 0.9)))
    assert np.allclose(track.fused(), good)


def test_options_are_checked():
    for bad in ({"min_iou": 0}, {"min_frames": 0}, {"fuse": 0}, {"reembed_every": 0}, {"max_missed": -1}):
        with pytest.raises(ValueError):
            TrackerOptions(**bad)


@pytest.mark.skipif(not (LFW / "pairs.txt").is_file(), reason=NO_LFW)
def test_tracking_benchmark_quick(tmp_path):
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "tracking.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "|---|" in done.stdout
    report = json.loads((tmp_path / "tracking.json").read_text())
    assert report["benchmark"] == "tracking" and report["machine"]["cpu"]
    single, vote, tracking = report["results"]["operating_point"]
    assert [single["policy"], vote["policy"], tracking["policy"]] == ["single frames", "vote 3 of 5 frames",
                                                                      "tracking + fusion"]  # fmt: skip
    assert tracking["mated"] == vote["mated"] == 6 and single["mated"] > 6
    assert 0 < tracking["embed_calls"] < single["embed_calls"]
    # 6 strangers cannot resolve FPIR 1 %: no matched point, but every attempt's score is kept.
    assert [m["target_fpir"] for m in report["results"]["matched"]] == [0.01] * 3 + [0.001] * 3
    assert all("fnir" not in m for m in report["results"]["matched"])
    assert len(report["results"]["scores"]["tracking + fusion"]["nonmated"]) == 6
    assert (tmp_path / "tracking_det.png").stat().st_size > 0


# ------------------------------------------------------------- benchmarks/tracking.py's scores


@pytest.fixture
def tracking(monkeypatch):
    """benchmarks/tracking.py (it imports its siblings ``common`` and ``openset``)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module("tracking")


class ThresholdGallery:
    """The nearest of a few enrolled vectors, accepted below ``threshold`` (the sweep's rule)."""

    def __init__(self, people: dict[str, np.ndarray], threshold: float) -> None:
        self.people, self.threshold = people, threshold

    def match(self, embeddings, identity):
        out = []
        for e in np.atleast_2d(embeddings):
            name, d = min(((n, float(np.sum((e - v) ** 2))) for n, v in self.people.items()), key=lambda x: x[1])
            out.append(Found(name, d, d < self.threshold))
        return out


def test_tracking_scores_decide_exactly_as_the_policies_do_at_each_threshold(tracking):
    """Each policy's per-name thresholds, derived once, say who it names at any threshold t
    (name's threshold < t) exactly as running the policy with matches accepted below t does:
    single frames, Vote's 3 of 5 and the Tracker, ties at the thresholds themselves included."""
    rng = np.random.default_rng(3)
    people = {n: unit(rng.normal(size=16)) for n in ("ada", "bob", "cy")}
    # Three visits (ada, a stranger near bob and cy, bob), each 9 frames with a face that
    # drifts, some frames without one, then the gap.
    centres = [people["ada"], unit(people["bob"] + people["cy"]), people["bob"]]
    boxes, scores, embeddings, visit = [], [], [], []
    for number, centre in enumerate(centres):
        for i in range(9 + tracking.GAP_FRAMES):
            face = i < 9 and i != 4
            boxes.append([100 + 3 * i, 80, 220 + 3 * i, 200] if face else [np.nan] * 4)
            scores.append(0.5 + 0.05 * i if face else 0.0)
            embeddings.append(unit(centre + 0.35 * rng.normal(size=16)) if face else np.zeros(16))
            visit.append(number)
    recording = tracking.Recording(np.array(boxes, float), np.array(scores), np.array(embeddings, np.float32),
                                   np.array(visit), {})  # fmt: skip
    options = TrackerOptions(min_frames=2, fuse=3, reembed_every=3)
    attempts, calls = tracking.policy_attempts(recording, ThresholdGallery(people, 2.0), "model", options)
    assert len(attempts["single frames"]) == 3 * 8 and calls["tracking + fusion"] < calls["single frames"]
    every = sorted({t for a in attempts.values() for at in a for t in at.thresholds.values()})
    assert len(every) > 10
    for t in [0.0, *every, *np.convolve(every, [0.5, 0.5], "valid"), 4.1]:
        gallery = ThresholdGallery(people, t)
        named = {p: [set() for _ in centres] for p in tracking.POLICIES}
        single: list[set[str]] = []
        vote, tracker = Vote(**tracking.VOTE), Tracker(options)
        for frame, number in enumerate(recording.visit):
            face = recording.detection(frame)
            name = None
            if face is not None:
                (match,) = gallery.match(recording.embeddings[frame], "model")
                name = match.name if match.accepted else None
                single.append({name} - {None})
            decided = vote.update(name, frame / tracking.FPS)
            named["vote 3 of 5 frames"][number] |= {decided} - {None}
            for seen in tracker.step_detections(tracking.Replay("model"), recording.embeddings[frame],
                                                [] if face is None else [face], gallery):  # fmt: skip
                if seen.track.match is not None and seen.track.match.accepted:
                    named["tracking + fusion"][number].add(seen.track.match.name)
        named["single frames"] = single
        for policy, sets in named.items():
            assert sets == [{n for n, s in a.thresholds.items() if s < t} for a in attempts[policy]], (policy, t)
            # The attempt's score decides it: someone is named at t iff its first threshold < t.
            assert [bool(s) for s in sets] == [a.first()[1] < t for a in attempts[policy]]


def test_fnir_at_matched_fpir(tracking):
    scores = tracking.PolicyScores("p", np.array([0.1, 0.5, np.inf, 0.3]), np.arange(1000) / 1000 + 0.2, 7)
    point = scores.at_fpir(0.01)  # at most 10 of the 1000 strangers: threshold 0.21
    assert point["false_positives"] == 10 and point["threshold"] == pytest.approx(0.21)
    assert point["missed"] == 3 and point["fnir"] == 0.75
    assert scores.at_fpir(0.0001) is None  # 1000 strangers cannot resolve 1 in 10,000
    assert scores.at(0.4)["missed"] == 2 and scores.at(0.4)["false_positives"] == 200
    curve = scores.det()
    assert (curve["fpir"][0], curve["fnir"][0]) == (0.001, 0.75)  # just below the 2nd stranger's score
    assert (curve["fpir"][-1], curve["fnir"][-1]) == (1.0, 0.25)  # any distance: only the inf is missed
