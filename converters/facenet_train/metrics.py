"""Face verification metrics under the LFW protocol (10-fold cross-validation of a threshold).

A pair is predicted "same person" when its distance is strictly below the threshold (as in the
facenet repository). Distances are normally squared L2 between unit vectors (0..4), but any
non-negative scale works: the threshold grid reaches past the largest distance.

- Accuracy: on each fold, the threshold maximising accuracy on the other nine folds over a grid
  of step ``step`` is scored on that fold. Where several grid points tie, the centre of the first
  run of best points is taken (the facenet repository takes its first point; the centre sits
  in the middle of the gap a separable set leaves). Mean and population std (``ddof=0``, as the
  facenet repository) over folds.
- VAL@FAR: on each fold, the threshold at which the nine other folds' false-accept rate equals the
  target is interpolated linearly between the grid points where that rate steps up, then the
  fold's true-accept rate (VAL) and false-accept rate are measured at it. Mean and std over folds.
- ROC, AUC and EER: over all pairs at once, one point per distinct distance; the equal error
  rate is where the false-accept and false-reject rates cross, interpolated between the two
  ROC points around the crossing. Both are free of the folds' threshold picks, so they move
  less than the accuracy when a model's distances move a little (two evaluation paths of
  one model whose embeddings agree to cosine 0.996 differed by 0.40 accuracy points).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np


@dataclass(frozen=True, eq=False)
class LfwResult:
    """Verification results of one model over LFW's folds (rates are fractions, not percents)."""

    accuracy_mean: float
    accuracy_std: float
    fold_accuracies: np.ndarray
    fold_thresholds: np.ndarray  # the accuracy threshold each fold was scored with (picked on the other folds)
    best_threshold: float  # the accuracy-maximising threshold over all pairs
    tpr: np.ndarray
    fpr: np.ndarray
    roc_thresholds: np.ndarray
    auc: float
    eer: float
    far_target: float
    val_mean: float
    val_std: float
    far_mean: float  # the false-accept rate measured on the held-out folds at the interpolated thresholds
    threshold_at_far: float  # the threshold giving ``far_target`` over all pairs

    def scores(self) -> dict[str, float]:
        """The numbers worth keeping (fractions, squared-L2 thresholds): what model cards,
        conversion reports and benchmark results record."""
        return {
            "accuracy_mean": self.accuracy_mean,
            "accuracy_std": self.accuracy_std,
            "val_mean": self.val_mean,
            "val_std": self.val_std,
            "far_target": self.far_target,
            "far_mean": self.far_mean,
            "auc": self.auc,
            "eer": self.eer,
            "best_threshold": self.best_threshold,
            "threshold_at_far": self.threshold_at_far,
        }

    def summary(self) -> str:
        return (
            f"accuracy {self.accuracy_mean:.4f} ± {self.accuracy_std:.4f} (threshold {self.best_threshold:.3f}), "
            f"AUC {self.auc:.4f}, EER {self.eer:.4f}, VAL {self.val_mean:.4f} ± {self.val_std:.4f} "
            f"@ FAR {self.far_mean:.5f} (target {self.far_target:g}, threshold {self.threshold_at_far:.3f})"
        )


def evaluate_distances(
    distances, issame, n_folds: int = 10, far_target: float = 1e-3, step: float = 1e-3
) -> LfwResult:
    """Scores pair distances against the truth ``issame`` with the LFW protocol.

    Pairs must be in fold order (as :func:`facenet_train.lfw.read_pairs` returns them, flattened):
    fold ``k`` is the ``k``-th of ``n_folds`` consecutive equal slices, and every fold needs
    matched and mismatched pairs.
    """
    d = np.asarray(distances, dtype=np.float64).ravel()
    same = np.asarray(issame, dtype=bool).ravel()
    if d.shape != same.shape:
        raise ValueError(f"{d.size} distances but {same.size} issame flags")
    if not np.all(np.isfinite(d)):
        raise ValueError("distances contain NaN or infinite values")
    folds = np.array_split(np.arange(d.size), n_folds)
    for k, fold in enumerate(folds):
        if same[fold].all() or not same[fold].any():
            raise ValueError(f"fold {k} of {n_folds} needs both matched and mismatched pairs (pairs go in fold order)")
    # From at or below the smallest distance (nothing accepted) to above the largest (everything accepted);
    # rounded so that a chosen threshold reads as its grid value in a card (1.267, not 1.2670000000000001).
    grid = np.round(np.arange(min(0.0, d.min()), max(4.0, d.max()) + 2 * step, step), 12)

    accuracies, thresholds, vals, fars = [], [], [], []
    for fold in folds:
        train = np.ones(d.size, dtype=bool)
        train[fold] = False
        threshold = _best_threshold(d[train], same[train], grid)
        thresholds.append(threshold)
        accuracies.append(np.mean((d[fold] < threshold) == same[fold]))
        far_threshold = _threshold_at_far(d[train & ~same], far_target, grid)
        vals.append(np.mean(d[fold][same[fold]] < far_threshold))
        fars.append(np.mean(d[fold][~same[fold]] < far_threshold))

    tpr, fpr, frr, roc_thresholds = _roc(d, same)
    return LfwResult(
        accuracy_mean=float(np.mean(accuracies)),
        accuracy_std=float(np.std(accuracies)),
        fold_accuracies=np.array(accuracies),
        fold_thresholds=np.array(thresholds),
        best_threshold=_best_threshold(d, same, grid),
        tpr=tpr,
        fpr=fpr,
        roc_thresholds=roc_thresholds,
        auc=float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2)),
        eer=_equal_error_rate(fpr, frr),
        far_target=far_target,
        val_mean=float(np.mean(vals)),
        val_std=float(np.std(vals)),
        far_mean=float(np.mean(fars)),
        threshold_at_far=_threshold_at_far(d[~same], far_target, grid),
    )


def _accepted(sorted_distances: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """How many distances lie strictly below each threshold."""
    return np.searchsorted(sorted_distances, thresholds, side="left")


def _best_threshold(d: np.ndarray, same: np.ndarray, grid: np.ndarray) -> float:
    true_accepts = _accepted(np.sort(d[same]), grid)
    true_rejects = np.count_nonzero(~same) - _accepted(np.sort(d[~same]), grid)
    correct = true_accepts + true_rejects  # integer counts: ties compare exactly
    best = np.flatnonzero(correct == correct.max())
    breaks = np.flatnonzero(np.diff(best) != 1)
    first_run = best[: breaks[0] + 1] if breaks.size else best
    return float(grid[first_run[first_run.size // 2]])


def _threshold_at_far(negative_d: np.ndarray, far_target: float, grid: np.ndarray) -> float:
    far = _accepted(np.sort(negative_d), grid) / negative_d.size
    levels, first = np.unique(far, return_index=True)  # each rate and the grid point it is first reached at
    return float(np.interp(far_target, levels, grid[first]))


def _roc(d: np.ndarray, same: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """True-accept, false-accept and false-reject rates at each distinct distance, and those thresholds."""
    distinct = np.unique(d)
    thresholds = np.append(distinct, np.nextafter(distinct[-1], np.inf))  # the last one accepts every pair
    n_same = np.count_nonzero(same)
    true_accepts = _accepted(np.sort(d[same]), thresholds)
    fpr = _accepted(np.sort(d[~same]), thresholds) / np.count_nonzero(~same)
    # False rejects from counts, not 1 - TPR: an EER of 0.04 stays 0.04, not 0.040000000000000036.
    return true_accepts / n_same, fpr, (n_same - true_accepts) / n_same, thresholds


def _equal_error_rate(fpr: np.ndarray, frr: np.ndarray) -> float:
    """Where the false-accept rate, rising along the ROC, meets the false-reject rate, falling."""
    i = int(np.argmax(fpr >= frr))  # >= 1: the first point accepts nothing (FAR 0, FRR 1)
    below, above = frr[i - 1] - fpr[i - 1], fpr[i] - frr[i]
    return float(fpr[i - 1] + below / (below + above) * (fpr[i] - fpr[i - 1]))


def plot_roc(results: dict[str, LfwResult], path_png: str | Path) -> Path:
    """Draws the ROC curves of ``results`` (name -> result) on a log FAR axis into ``path_png``."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, renders with Agg

    fig = Figure(figsize=(6.4, 4.8))
    ax = fig.add_subplot()
    for name, result in results.items():
        label = f"{name}: acc {100 * result.accuracy_mean:.2f}%, AUC {result.auc:.4f}, VAL {100 * result.val_mean:.1f}%"
        ax.plot(result.fpr, result.tpr, label=label)
    for far_target in sorted({result.far_target for result in results.values()}):
        ax.axvline(far_target, color="grey", linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlim(1e-4, 1.0)
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("false accept rate")
    ax.set_ylabel("true accept rate")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    path = Path(path_png)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def failure_sheet(
    crops: np.ndarray, first: np.ndarray, second: np.ndarray, distances, issame, threshold: float,
    path_png: str | Path, count: int = 24,
) -> tuple[Path, dict[str, int]]:
    """The ``count`` worst false rejects (same person, farthest) and false accepts (different
    people, closest) at ``threshold`` as a contact sheet: one row per pair, its two crops
    side by side and the distance under them, rejects in the left column, accepts in the
    right. Returns the PNG's path and the number of errors of each kind."""
    d, same = np.asarray(distances, np.float64), np.asarray(issame, bool)
    rejects = np.flatnonzero(same & (d >= threshold))
    accepts = np.flatnonzero(~same & (d < threshold))
    columns = [rejects[np.argsort(-d[rejects])][:count], accepts[np.argsort(d[accepts])][:count]]
    size = crops.shape[1]
    label_h, gap = 18, 12
    cell = np.full((size + label_h, 2 * size, 3), 255, np.uint8)
    rows = max(1, *(len(c) for c in columns))
    sheet = np.full((label_h + rows * (size + label_h), 4 * size + gap, 3), 255, np.uint8)
    titles = ("false rejects (same person)", "false accepts (different people)")
    for col, (title, pairs) in enumerate(zip(titles, columns)):
        x0 = col * (2 * size + gap)
        cv2.putText(sheet, title, (x0 + 2, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
        for row, pair in enumerate(pairs):
            tile = cell.copy()
            tile[:size, :size], tile[:size, size:] = crops[first[pair]], crops[second[pair]]
            cv2.putText(tile, f"pair {pair}: d={d[pair]:.3f}", (2, size + 13), cv2.FONT_HERSHEY_SIMPLEX, 0.38,
                        (0, 0, 0), 1, cv2.LINE_AA)
            y0 = label_h + row * (size + label_h)
            sheet[y0:y0 + size + label_h, x0:x0 + 2 * size] = tile
    path = Path(path_png)
    if not cv2.imwrite(str(path), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write {path}")
    return path, {"false_rejects": int(len(rejects)), "false_accepts": int(len(accepts))}
