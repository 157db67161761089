"""A gallery whose threshold follows a target FPIR per attempt (Gallery.use_fpir)."""

from __future__ import annotations

import numpy as np
import pytest

from facenet_edge.card import ModelIdentity
from facenet_edge.fpir import DistributionError, ImpostorDistribution, threshold_for_fpir
from facenet_edge.gallery import Gallery

IDENTITY = ModelIdentity(sha256="f" * 64)


def distribution() -> ImpostorDistribution:
    u = (np.arange(1_000_000) + 0.5) / 1_000_000
    return ImpostorDistribution.of(np.clip(2.0 + 0.25 * np.log10(u), 0.0, 4.0), "log-linear")  # 1.25 at 1e-3


def unit(rng: np.random.Generator, count: int) -> np.ndarray:
    vectors = rng.normal(size=(count, 128))
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_threshold_follows_the_samples_enrolled(tmp_path):
    rng = np.random.default_rng(0)
    with Gallery.create(tmp_path / "g.db", IDENTITY, 1.0) as gallery:
        assert gallery.operating_point() is None and gallery.threshold == 1.0  # the stored one
        gallery.use_fpir(distribution(), 1e-3)
        thresholds = []
        for person in range(4):
            gallery.add(f"p{person}", unit(rng, 3), IDENTITY)
            point = gallery.operating_point()
            assert (point.fpir, point.samples) == (1e-3, 3 * (person + 1))
            expected = threshold_for_fpir(distribution(), 1e-3, point.samples).threshold
            assert gallery.threshold == point.threshold == expected
            thresholds.append(point.threshold)
        assert thresholds == sorted(thresholds, reverse=True) and thresholds[0] > thresholds[-1]


def test_matches_are_accepted_by_the_derived_threshold(tmp_path):
    rng = np.random.default_rng(1)
    enrolled = unit(rng, 1)
    with Gallery.create(tmp_path / "g.db", IDENTITY, 3.9) as gallery:
        gallery.add("ada", enrolled, IDENTITY)
        query = enrolled[0] + 0.05 * unit(rng, 1)[0]
        (loose,) = gallery.match(query, IDENTITY)
        assert loose.accepted  # the stored 3.9 accepts anything
        gallery.use_fpir(distribution(), 1e-3)
        (strict,) = gallery.match(unit(rng, 1), IDENTITY)  # a stranger: ~2 away
        assert strict.distance > gallery.threshold and not strict.accepted
        (same,) = gallery.match(query, IDENTITY)
        assert same.distance < gallery.threshold and same.accepted


def test_a_bad_target_is_refused(tmp_path):
    with Gallery.create(tmp_path / "g.db", IDENTITY, 1.0) as gallery:
        for bad in (0.0, 1.0, 2, -1e-3):
            with pytest.raises(DistributionError, match="target FPIR"):
                gallery.use_fpir(distribution(), bad)
        assert gallery.operating_point() is None
