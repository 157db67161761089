"""Thresholds for a target FPIR per attempt (facenet_edge.fpir): synthetic impostor
distributions whose answer is known in closed form."""

from __future__ import annotations

import math

import numpy as np
import pytest

from facenet_edge.card import ModelCard, card_path_for
from facenet_edge.card_summary import summary
from facenet_edge.embed import default_model_path
from facenet_edge.fpir import (
    DistributionError,
    ImpostorDistribution,
    card_distribution,
    impostor_pairs,
    pair_rate,
    threshold_for_fpir,
)


SLOPE = 0.5  # distance per decade of rate


def log_linear(pairs: int = 2_000_000) -> ImpostorDistribution:
    """Impostor distances with F(t) = 10 ** ((t - 4) / SLOPE): the quantile at rate r is
    4 + SLOPE * log10(r), linear in log rate as the card interpolates (real impostor
    tails are close to it: docs/benchmarks.md)."""
    u = (np.arange(pairs) + 0.5) / pairs
    return ImpostorDistribution.of(np.clip(4.0 + SLOPE * np.log10(u), 0.0, 4.0), "log-linear")


def quantile(rate: float) -> float:
    return 4.0 + SLOPE * math.log10(rate)


def test_pair_rate_inverts_the_independence_model():
    for fpir, samples in ((1e-3, 1), (1e-3, 1000), (1e-4, 5000), (0.01, 10)):
        rate = pair_rate(fpir, samples)
        assert 1 - (1 - rate) ** samples == pytest.approx(fpir, rel=1e-9)
    assert pair_rate(1e-3, 1) == pytest.approx(1e-3)


@pytest.mark.parametrize(("fpir", "samples"), [(1e-3, 1), (1e-3, 100), (1e-2, 30), (1e-4, 10)])
def test_threshold_is_the_quantile_at_the_pair_rate(fpir, samples):
    chosen = threshold_for_fpir(log_linear(), fpir, samples)
    assert chosen.threshold == pytest.approx(quantile(1 - (1 - fpir) ** (1 / samples)), abs=0.01)
    assert not chosen.extrapolated
    assert (chosen.fpir, chosen.samples) == (fpir, samples)


def test_threshold_falls_as_the_gallery_grows():
    distribution = log_linear()
    thresholds = [threshold_for_fpir(distribution, 1e-3, n).threshold for n in (1, 10, 100, 1000)]
    assert thresholds == sorted(thresholds, reverse=True)


def test_rates_below_the_measured_ones_are_extrapolated_and_said_so():
    distribution = log_linear(100_000)  # resolves rates down to 1e-4
    rate = distribution.rates[0] / 100
    chosen = threshold_for_fpir(distribution, rate, 1)
    assert chosen.extrapolated
    assert chosen.threshold == pytest.approx(quantile(rate), abs=0.05)  # from 10 pairs at the lowest rate


def test_measured_fpir_matches_the_target_on_independent_impostors():
    # Strangers against galleries of independent samples, distances from one known law:
    # the share of strangers within the derived threshold of any sample is the target.
    rng = np.random.default_rng(1)
    def draw(shape):
        return np.clip(4.0 + SLOPE * np.log10(rng.uniform(size=shape)), 0.0, 4.0)

    distribution = ImpostorDistribution.of(draw(4_000_000), "log-linear draw")
    samples, attempts, target = 50, 200_000, 1e-2
    threshold = threshold_for_fpir(distribution, target, samples).threshold
    nearest = draw((attempts, samples)).min(axis=1)
    measured = np.mean(nearest <= threshold)
    assert measured == pytest.approx(target, rel=0.1)


def test_impostor_pairs_skip_same_label_pairs_and_weigh_each_person_once():
    vectors = np.eye(4, 128, dtype=np.float32)
    pairs = impostor_pairs(vectors, ["a", "a", "b", "c"])
    # 6 pairs, minus the one a-a pair; orthogonal unit vectors are 2 apart.
    assert len(pairs.distances) == 5
    assert np.allclose(pairs.distances, 2.0)
    # a-b and a-c are two pairs of 1/2 each, b-c one pair of 1: each pair of people weighs 1.
    assert sorted(pairs.weights.tolist()) == [0.5, 0.5, 0.5, 0.5, 1.0]


def test_equal_weights_give_the_unweighted_quantiles_and_heavy_pairs_resolve_less():
    rng = np.random.default_rng(2)
    distances = rng.uniform(0.0, 4.0, 20_000)
    unweighted = ImpostorDistribution.of(distances, "pairs")
    assert ImpostorDistribution.of(distances, "pairs", np.full(len(distances), 3.0)) == unweighted
    # A tenth of the pairs carrying most of the weight: fewer effective pairs below each
    # rate, so the lowest rate it resolves is higher.
    weights = np.where(np.arange(len(distances)) % 10 == 0, 50.0, 1.0)
    assert ImpostorDistribution.of(distances, "pairs", weights).rates[0] > unweighted.rates[0]


def test_a_person_with_many_photos_does_not_set_the_tail():
    # 1,000 people with one photo each, all impostor pairs 2 apart, plus one person with
    # 1,000 photos who lies 1 from everyone: counting image pairs, half of all impostor
    # pairs are that one person's and the 1 % quantile is 1; counting people, that
    # person is one in 1,001 and the 1 % quantile is 2.
    singles = 1000
    distances = np.concatenate([np.full(singles * (singles - 1) // 2, 2.0), np.full(singles * singles, 1.0)])
    weights = np.concatenate([np.ones(singles * (singles - 1) // 2), np.full(singles * singles, 1.0 / singles)])
    assert ImpostorDistribution.of(distances, "pairs").distance_at(0.01)[0] == 1.0
    assert ImpostorDistribution.of(distances, "people", weights).distance_at(0.01)[0] == 2.0


def test_round_trip_and_bad_entries():
    distribution = log_linear(10_000)
    assert ImpostorDistribution.from_dict(distribution.to_dict()) == distribution
    broken = distribution.to_dict() | {"distances": list(reversed(distribution.distances))}
    with pytest.raises(DistributionError, match="must not fall"):
        ImpostorDistribution.from_dict(broken)
    with pytest.raises(DistributionError, match="rates, distances, pairs, source"):
        ImpostorDistribution.from_dict({"rates": [0.1]})
    with pytest.raises(DistributionError, match="too few"):
        ImpostorDistribution.of(np.ones(5), "five")
    with pytest.raises(DistributionError, match="weights"):
        ImpostorDistribution.of(np.ones(50), "fifty", np.zeros(50))
    for bad in (0, 1, -0.1, math.nan, True, "1e-3"):
        with pytest.raises(DistributionError, match="target FPIR"):
            threshold_for_fpir(distribution, bad, 10)


def test_the_shipped_card_carries_a_distribution():
    distribution = card_distribution(ModelCard.load(card_path_for(default_model_path())))
    assert distribution is not None and distribution.pairs > 1_000_000
    # The default target with a small gallery lands inside what the card measured.
    assert not threshold_for_fpir(distribution, 1e-3, 30).extrapolated


def test_info_shows_the_open_set_thresholds_and_headline():
    model = default_model_path()
    rows = {row.key: row.value for row in summary(ModelCard.load(card_path_for(model)), model, "0" * 64)}
    assert rows["open-set thresholds"].startswith("for FPIR 0.001 per attempt: ")
    assert "N=10: FNIR" in rows["open set"]  # benchmarks/openset.py --write-card
