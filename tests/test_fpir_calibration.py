"""benchmarks/fpir_calibration.py's galleries and scoring on synthetic embeddings (no LFW)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from facenet_edge.fpir import threshold_for_fpir

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def script(monkeypatch):
    """benchmarks/fpir_calibration.py (it imports ``common`` from beside it)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("fpir_calibration", BENCHMARKS / "fpir_calibration.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def synthetic(people: int, photos: list[int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unit embeddings clustered per person: person i has ``photos[i % len(photos)]`` images."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((people, 32))
    counts = [photos[i % len(photos)] for i in range(people)]
    names = np.array([f"p{i:03d}" for i, c in enumerate(counts) for _ in range(c)])
    vectors = np.repeat(centres, counts, axis=0) + 0.6 * rng.standard_normal((len(names), 32))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32), names


def test_people_with_k_photos_are_enrolled_and_the_others_are_strangers(script):
    _, names = synthetic(12, [5, 1, 4, 3])
    half = script.measured_half(names, np.arange(len(names)), 4)
    assert [len(rows) for rows in half.people] == [5, 4, 5, 4, 5, 4]
    assert all(len(set(names[rows])) == 1 for rows in half.people)
    assert sorted(set(names[half.strangers])) == ["p001", "p003", "p005", "p007", "p009", "p011"]
    assert len(half.strangers) == 3 * (1 + 3)


def test_nearest_distances_are_each_strangers_nearest_sample(script):
    embeddings, names = synthetic(30, [6, 2])
    half = script.measured_half(names, np.arange(len(names)), 4)
    nearest = script.nearest_distances(embeddings, half, 5, 3, 4, np.random.default_rng(7))
    assert nearest.shape == (4 * len(half.strangers),)
    again = script.nearest_distances(embeddings, half, 5, 3, 4, np.random.default_rng(7))
    np.testing.assert_array_equal(nearest, again)  # seeded
    # The first gallery, drawn the same way by hand.
    rng = np.random.default_rng(7)
    chosen = rng.choice(len(half.people), 5, replace=False)
    samples = np.concatenate([rng.permutation(half.people[c])[:3] for c in chosen])
    assert len(samples) == 15 and not set(samples) & set(half.strangers)
    diff = embeddings[half.strangers][:, None, :] - embeddings[samples][None, :, :]
    expected = np.min(np.sum(diff**2, axis=2), axis=1)
    np.testing.assert_allclose(nearest[: len(half.strangers)], expected, atol=1e-5)


def test_rows_count_the_attempts_within_each_weightings_threshold(script):
    embeddings, names = synthetic(60, [6, 1, 2, 40])
    fit = names < "p030"
    calibrated = script.distributions(embeddings[fit], names[fit], "synthetic")
    assert set(calibrated) == {script.IMAGE_PAIRS, script.EACH_PERSON_ONCE}
    measured = np.flatnonzero(~fit)
    half = script.measured_half(names, measured, 4)
    rows = script.measure("a -> b", embeddings, half, calibrated, {3: 5, 0: 2}, seed=0)
    assert len(rows) == 2 * len(script.ENROLS) * len(script.TARGETS) * 2
    assert {r.size for r in rows} == {3, len(half.people)}
    for r in rows:
        expected = threshold_for_fpir(calibrated[r.weighting], r.target, r.size * r.enrol)
        assert (r.threshold, r.extrapolated) == (expected.threshold, expected.extrapolated)
        assert r.attempts == len(half.strangers) * (5 if r.size == 3 else 2)
        assert 0 <= r.false_positives <= r.attempts
        assert r.ratio == pytest.approx(r.false_positives / r.attempts / r.target)
    # Same seed, same rows; a false positive is an attempt at or within the threshold.
    assert script.measure("a -> b", embeddings, half, calibrated, {3: 5, 0: 2}, seed=0) == rows
    nearest = script.nearest_distances(embeddings, half, 3, 1, 5, np.random.default_rng([0, 0, 1]))
    first = next(r for r in rows if (r.size, r.enrol) == (3, 1))
    assert first.false_positives == int(np.sum(nearest <= first.threshold))
