"""A model card as a person reads it: ``facenet-edge info``'s rows.

Figures are rounded (accuracies to two decimals of a percent, thresholds and AUC to
three or four significant digits); build-machine details (checkpoint paths, calibration
caches) are left out. ``facenet-edge info --json`` prints the card as stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .card import ModelCard
from .fpir import DEFAULT_FPIR, ImpostorDistribution, card_distribution, threshold_for_fpir

MB = 1_000_000  # decimal, as the README's model table


@dataclass(frozen=True)
class Row:
    key: str
    value: str


def _percent(mean: float, std: float | None) -> str:
    return f"{100 * mean:.2f} ± {100 * std:.2f} %" if std is not None else f"{100 * mean:.2f} %"


def _threshold(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.3f}"


def _count(value: int) -> str:
    """3738624 -> '3.74 M'."""
    for limit, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= limit:
            return f"{value / limit:.3g} {unit}"
    return str(value)


def lfw_line(lfw: dict[str, Any]) -> str:
    """One LFW result (a card's ``lfw`` or its ``runtime_path``): accuracy, VAL at the
    target FAR, AUC, the threshold at that FAR, pairs and detector when given."""
    parts = []
    if "accuracy_mean" in lfw:
        parts.append(f"accuracy {_percent(lfw['accuracy_mean'], lfw.get('accuracy_std'))}")
    if "val_mean" in lfw:
        far = lfw.get("far_target")
        at = f"@FAR {far:.0e}".replace("e-0", "e-") if far is not None else ""
        parts.append(f"VAL{at} {_percent(lfw['val_mean'], lfw.get('val_std'))}")
    if "auc" in lfw:
        parts.append(f"AUC {lfw['auc']:.3f}")
    if "threshold_at_far" in lfw:
        parts.append(f"threshold at that FAR {lfw['threshold_at_far']:.3f}")
    if "pairs" in lfw:
        parts.append(f"{lfw['pairs']} pairs")
    if "detector" in lfw:
        parts.append(f"{lfw['detector']} detector")
    return ", ".join(parts)


def quantization_line(quantization: dict[str, Any]) -> str:
    parts = [str(quantization["target"])] if "target" in quantization else []
    parts += [f"{key} {quantization[key]}" for key in ("weights", "activations") if key in quantization]
    calibration = quantization.get("calibration") or {}
    if "faces" in calibration:
        of = f" of {calibration['identities']} identities" if "identities" in calibration else ""
        parts.append(f"calibrated on {calibration['faces']} faces{of}")
    return "; ".join(parts)


def fpir_line(distribution: ImpostorDistribution) -> str:
    """The thresholds a gallery derives for the default target at a few sizes."""
    points = [threshold_for_fpir(distribution, DEFAULT_FPIR, n) for n in (10, 100, 1000)]
    at = ", ".join(f"{p.threshold:.3f} at {p.samples} samples" for p in points)
    return f"for FPIR {DEFAULT_FPIR:g} per attempt: {at} ({distribution.pairs} impostor pairs)"


def openset_line(openset: dict[str, Any]) -> str:
    """The card's open-set headline (benchmarks/openset.py --write-card): per gallery
    size, with the most enrolment photos measured, FNIR at the default target's threshold."""
    rows = openset.get("results") or []
    most = max((r.get("enrol", 0) for r in rows), default=0)
    key = f"target_{DEFAULT_FPIR:g}"
    parts = [
        f"N={r['size']}: FNIR {100 * r[key]['fnir']:.1f} % at FPIR {r[key]['fpir']:.1e}, "
        f"rank-1 {100 * r['rank1']:.1f} %"
        for r in rows
        if r.get("enrol") == most and isinstance(r.get(key), dict)
    ]
    return f"LFW, {most} photos enrolled: " + "; ".join(parts) if parts else ""


def summary(card: ModelCard, model: Path, sha256: str) -> list[Row]:
    """The rows ``facenet-edge info`` prints, in order; absent card fields give no row."""
    rows = [
        Row("model", str(model)),
        Row("name", f"{card.name} {card.version}"),
        Row("architecture", card.architecture),
        Row(
            "input",
            f"{card.input_height}x{card.input_width} {card.color_order}, (pixel - {card.mean:g}) / {card.std:g}",
        ),
        Row("embedding", f"{card.embedding_size}-d, unit length"),
        Row("alignment", f"{card.alignment}, {card.fill} past the photo's edge"),
        Row("compatibility group", card.compatibility_group or "none"),
    ]
    size = [f"{model.stat().st_size / MB:.1f} MB"]
    if card.parameters:
        size.append(f"{_count(card.parameters)} parameters")
    if card.flops:
        size.append(f"{_count(card.flops)} FLOPs")
    rows += [
        Row("size", ", ".join(size)),
        Row("sha256", sha256),
        Row("threshold, FAR 1e-3", _threshold(card.thresholds.far_1e3)),
        Row("threshold, best accuracy", _threshold(card.thresholds.best_accuracy)),
    ]
    distribution = card_distribution(card)
    if distribution is not None:
        rows.append(Row("open-set thresholds", fpir_line(distribution)))
    openset = card.extra.get("openset")
    if isinstance(openset, dict) and openset_line(openset):
        rows.append(Row("open set", openset_line(openset)))
    runtime_path = card.lfw.get("runtime_path")
    if isinstance(runtime_path, dict) and runtime_path:
        rows.append(Row("LFW, runtime path", lfw_line(runtime_path)))
    if lfw_line(card.lfw):
        rows.append(Row("LFW, aligned crops", lfw_line(card.lfw)))
    if quantization_line(card.quantization):
        rows.append(Row("quantization", quantization_line(card.quantization)))
    if card.training_data:
        rows.append(Row("training data", ", ".join(card.training_data)))
    if card.terms:
        rows.append(Row("terms", card.terms))
    return rows


def format_rows(rows: list[Row]) -> str:
    """Keys left-aligned in one column, values after them."""
    width = max(len(row.key) for row in rows)
    return "\n".join(f"{row.key:<{width}}  {row.value}" for row in rows)
