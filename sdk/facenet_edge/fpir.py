"""Open-set thresholds for a target false-positive identification rate (FPIR) per attempt.

A stranger in front of a gallery of ``M`` samples is wrongly named when any of the ``M``
distances falls within the threshold. With ``F(t)`` the share of impostor pairs (two
photos of different people) closer than ``t``, and the ``M`` comparisons taken as
independent,

    FPIR(t) = 1 - (1 - F(t)) ** M,   so   F(t) = 1 - (1 - FPIR) ** (1 / M),

and the threshold for a target FPIR is the impostor distance quantile at that per-pair
rate. The model card carries that quantile function (``ModelCard.impostor``), measured on
faces none of the open-set benchmark's probes come from (docs/benchmarks.md).

``F`` is measured with every *person* counting once (a pair of images of people ``a`` and
``b`` weighs ``1 / (n_a * n_b)``), as a gallery enrols each person with a few photos and
each stranger is one attempt. Counting every image pair instead lets the few people with
hundreds of photos set the tail, and on LFW that made thresholds measure 0.3 to 0.8 times
their target (``benchmarks/fpir_calibration.py``, docs/benchmarks.md).

Below the smallest rate the card resolves (about ten impostor pairs), the quantile is
extrapolated linearly in log rate from the lowest decade, and the result says so.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .card import CardError, ModelCard

# One stranger wrongly named in 1,000 attempts: the default target per attempt.
DEFAULT_FPIR = 1e-3
# Rates at which the card stores the impostor quantile: 1, 2, 5 per decade.
_RATE_GRID = tuple(float(f"{m}e{e}") for e in range(-9, 0) for m in (1, 2, 5))
# A quantile is stored only where at least this many impostor pairs lie below it.
_MIN_PAIRS_BELOW = 10
# Impostor distances are computed this many rows at a time (rows x all floats in memory).
_BLOCK_ROWS = 512


class DistributionError(CardError):
    """An impostor distribution that cannot be used (malformed card entry, bad target)."""


@dataclass(frozen=True)
class ImpostorDistribution:
    """Quantiles of the squared-L2 distance between embeddings of different people:
    ``distances[i]`` is the distance below which a share ``rates[i]`` of impostor pairs
    lie. ``pairs``: how many pairs were measured; ``source``: which faces (free text)."""

    rates: tuple[float, ...]
    distances: tuple[float, ...]
    pairs: int
    source: str

    def __post_init__(self) -> None:
        rates, distances = np.asarray(self.rates, float), np.asarray(self.distances, float)
        if len(rates) < 2 or rates.shape != distances.shape:
            raise DistributionError("impostor distribution needs at least two (rate, distance) points of equal count")
        if not (np.all(np.isfinite(rates)) and np.all(np.isfinite(distances))):
            raise DistributionError("impostor distribution holds a non-finite number")
        if np.any(np.diff(rates) <= 0) or rates[0] <= 0 or rates[-1] >= 1:
            raise DistributionError("impostor rates must rise strictly, between 0 and 1")
        if np.any(np.diff(distances) < 0) or distances[0] < 0 or distances[-1] > 4:
            raise DistributionError("impostor distances must not fall, and must lie between 0 and 4")
        if not isinstance(self.pairs, int) or self.pairs < 1:
            raise DistributionError(f"impostor pairs must be a positive integer, got {self.pairs!r}")

    @classmethod
    def of(cls, distances: np.ndarray, source: str, weights: np.ndarray | None = None) -> ImpostorDistribution:
        """From measured impostor distances, each pair weighing ``weights`` (default: all
        equal): the quantile at each grid rate that at least ``_MIN_PAIRS_BELOW`` pairs
        resolve (counted as Kish's effective number, so a few heavy pairs resolve little)."""
        values = np.asarray(distances, dtype=np.float64).ravel()
        shares = np.ones_like(values) if weights is None else np.asarray(weights, dtype=np.float64).ravel()
        if shares.shape != values.shape or not np.all(np.isfinite(shares)) or np.any(shares <= 0):
            raise DistributionError("impostor pair weights must be positive, one per distance")
        order = np.argsort(values, kind="stable")
        ordered, shares = values[order], shares[order]
        below = np.cumsum(shares)
        effective = below**2 / np.cumsum(shares**2)
        below /= below[-1] if len(below) else 1.0
        rates, picks = [], []
        for rate in _RATE_GRID:
            # The largest threshold that accepts at most a share ``rate`` of the weight.
            last = int(np.searchsorted(below, rate * (1 + 1e-9), side="right")) - 1
            if last >= 0 and effective[last] >= _MIN_PAIRS_BELOW:
                rates.append(rate)
                picks.append(ordered[last])
        if len(rates) < 2:
            raise DistributionError(f"{len(values)} impostor distances are too few to describe their distribution")
        return cls(tuple(rates), tuple(round(float(d), 6) for d in picks), len(values), source)

    def distance_at(self, rate: float) -> tuple[float, bool]:
        """(the distance below which a share ``rate`` of impostor pairs lie, whether it was
        extrapolated below the smallest rate measured). Interpolated linearly in log rate."""
        logs = np.log10(self.rates)
        x = math.log10(rate)
        if x >= logs[-1]:
            return self.distances[-1], False
        if x >= logs[0]:
            return float(np.interp(x, logs, self.distances)), False
        # Extrapolate with the slope of the lowest decade (or the lowest two points).
        upper = min(int(np.searchsorted(logs, logs[0] + 1.0)), len(logs) - 1)
        slope = (self.distances[upper] - self.distances[0]) / (logs[upper] - logs[0])
        return max(0.0, self.distances[0] - slope * (logs[0] - x)), True

    def to_dict(self) -> dict[str, Any]:
        return {"rates": list(self.rates), "distances": list(self.distances), "pairs": self.pairs,
                "source": self.source}

    @classmethod
    def from_dict(cls, data: object) -> ImpostorDistribution:
        if not isinstance(data, dict) or set(data) != {"rates", "distances", "pairs", "source"}:
            raise DistributionError("impostor distribution must be an object with rates, distances, pairs, source")
        try:
            return cls(
                tuple(float(r) for r in data["rates"]),
                tuple(float(d) for d in data["distances"]),
                data["pairs"],
                str(data["source"]),
            )
        except (TypeError, ValueError) as exc:
            if isinstance(exc, DistributionError):
                raise
            raise DistributionError(f"impostor distribution: {exc}") from None


@dataclass(frozen=True)
class FpirThreshold:
    """The threshold a gallery of ``samples`` samples uses for a target ``fpir`` per
    attempt. ``pair_rate``: the per-pair false-accept rate that gives it.
    ``extrapolated``: the rate lies below what the card measured."""

    threshold: float
    fpir: float
    samples: int
    pair_rate: float
    extrapolated: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "fpir": self.fpir,
            "samples": self.samples,
            "pair_rate": self.pair_rate,
            "extrapolated": self.extrapolated,
        }


def card_distribution(card: ModelCard) -> ImpostorDistribution | None:
    """The card's impostor distribution (``extra["impostor"]``), None when it has none;
    DistributionError naming the card's model when the entry is malformed."""
    entry = card.extra.get("impostor")
    if entry is None:
        return None
    try:
        return ImpostorDistribution.from_dict(entry)
    except DistributionError as exc:
        raise DistributionError(f"model card of {card.name} {card.version}: {exc}") from None


def check_fpir(fpir: object) -> float:
    """A target FPIR as a float strictly between 0 and 1, else DistributionError."""
    if isinstance(fpir, bool) or not isinstance(fpir, (int, float)) or not 0.0 < float(fpir) < 1.0:
        raise DistributionError(f"target FPIR must be a number strictly between 0 and 1, got {fpir!r}")
    return float(fpir)


def pair_rate(fpir: float, samples: int) -> float:
    """The per-pair false-accept rate at which ``samples`` independent comparisons name a
    stranger with probability ``fpir``."""
    fpir = check_fpir(fpir)
    # expm1/log1p: exact for the tiny rates involved (1 - (1 - 1e-4) ** (1 / 1e6) loses digits).
    return -math.expm1(math.log1p(-fpir) / max(1, samples))


def threshold_for_fpir(distribution: ImpostorDistribution, fpir: float, samples: int) -> FpirThreshold:
    """The threshold (squared L2) for a target ``fpir`` per attempt against a gallery of
    ``samples`` samples (at least 1 counted: an empty gallery names nobody anyway)."""
    samples = max(1, int(samples))
    rate = pair_rate(fpir, samples)
    distance, extrapolated = distribution.distance_at(rate)
    # A threshold of 0 would refuse everyone, galleries need > 0: the smallest float above.
    return FpirThreshold(max(float(distance), 1e-6), check_fpir(fpir), samples, rate, extrapolated)


@dataclass(frozen=True)
class ImpostorPairs:
    """Squared L2 between embeddings of different people, each pair once, and each pair's
    weight ``1 / (n_a * n_b)`` (``n``: that person's image count), so every person counts once."""

    distances: np.ndarray
    weights: np.ndarray


def impostor_pairs(embeddings: np.ndarray, labels: Sequence[object]) -> ImpostorPairs:
    """Every pair of unit ``embeddings`` whose ``labels`` differ, as float32."""
    vectors = np.asarray(embeddings, dtype=np.float32)
    vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    _, codes, counts = np.unique(np.asarray(labels), return_inverse=True, return_counts=True)
    per_image = (1.0 / counts[codes]).astype(np.float32)
    distances, weights = [], []
    for start in range(0, len(vectors), _BLOCK_ROWS):
        block = vectors[start : start + _BLOCK_ROWS]
        distance = 2.0 - 2.0 * (block @ vectors.T)
        rows = np.arange(start, start + len(block))[:, None]
        keep = (np.arange(len(vectors))[None, :] > rows) & (codes[start : start + len(block), None] != codes[None, :])
        distances.append(np.clip(distance[keep], 0.0, 4.0))
        weights.append((per_image[start : start + len(block), None] * per_image[None, :])[keep])
    if not distances:
        return ImpostorPairs(np.empty(0, np.float32), np.empty(0, np.float32))
    return ImpostorPairs(np.concatenate(distances), np.concatenate(weights))
