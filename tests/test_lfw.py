"""LFW pairs and overlap files (facenet_train.lfw) and the verification protocol (facenet_train.metrics)."""

from pathlib import Path

import cv2
import numpy as np
import pytest

from facenet_train.lfw import LfwOverlap, Pair, lfw_overlap, read_pairs
from facenet_train.metrics import evaluate_distances, failure_sheet, plot_roc

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ONE_STEP = 1.001e-3  # a plateau's centre is found to within one grid step (plus float rounding)


def write_pairs(path, folds):
    """A pairs.txt with len(folds) folds; each fold is (matched rows, mismatched rows)."""
    per_fold = len(folds[0][0])
    lines = [f"{len(folds)}\t{per_fold}"]
    for matched, mismatched in folds:
        lines += ["\t".join(map(str, row)) for row in matched + mismatched]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_read_pairs_folds_order_and_paths(tmp_path):
    pairs_txt = write_pairs(
        tmp_path / "pairs.txt",
        [
            ([("Ann_Lee", 1, 2), ("Bo", 3, 12)], [("Ann_Lee", 1, "Bo", 3), ("Cy_De_Ru", 7, "Bo", 1)]),
            ([("Cy_De_Ru", 2, 7), ("Bo", 1, 2)], [("Bo", 2, "Ann_Lee", 2), ("Ann_Lee", 1, "Cy_De_Ru", 2)]),
        ],
    )
    folds = read_pairs(pairs_txt)
    assert [len(fold) for fold in folds] == [4, 4]
    assert folds[0][1] == Pair("Bo", 3, "Bo", 12)
    assert folds[1][3] == Pair("Ann_Lee", 1, "Cy_De_Ru", 2)
    assert [pair.issame for fold in folds for pair in fold] == [True, True, False, False] * 2
    assert folds[0][1].paths(tmp_path / "lfw") == (
        tmp_path / "lfw" / "Bo" / "Bo_0003.jpg",
        tmp_path / "lfw" / "Bo" / "Bo_0012.jpg",
    )


@pytest.mark.parametrize(
    "text, message",
    [
        ("ten 300\n", r"pairs.txt:1: expected '<folds> <pairs per fold>'"),
        ("1 1\nAnn 1 2\n", r"so 3 lines; file has 2"),
        ("1 1\nAnn 1 2\nAnn 1 Bo 1\nBo 1 2\n", r"so 3 lines; file has 4"),
        ("1 1\nAnn 1 Bo 2\nAnn 1 Bo 1\n", r"pairs.txt:2: expected a matched pair 'name n1 n2'"),
        ("1 1\nAnn 1 2\nAnn 1 Bo x\n", r"pairs.txt:3: expected a mismatched pair"),
    ],
)
def test_read_pairs_names_the_faulty_line(tmp_path, text, message):
    path = tmp_path / "pairs.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        read_pairs(path)


@pytest.mark.skipif(not (SHARED_DATA / "lfw" / "pairs.txt").exists(), reason="shared LFW copy not present")
def test_official_pairs_file_points_at_existing_images():
    lfw_dir = SHARED_DATA / "lfw"
    folds = read_pairs(lfw_dir / "pairs.txt")
    assert len(folds) == 10 and all(len(fold) == 600 for fold in folds)
    assert all(pair.issame == (i < 300) for fold in folds for i, pair in enumerate(fold))
    missing = [path for fold in folds for pair in fold for path in pair.paths(lfw_dir) if not path.is_file()]
    assert missing == []


def test_lfw_overlap_reads_tab_separated_rows(tmp_path):
    path = tmp_path / "overlap.txt"
    path.write_text("# from datasets.py lfw-overlap\n"
                    "pins\tpins_Bill Gates\tBill_Gates\n\nglint24\tTom Hanks\tTom_Hanks\n")
    assert lfw_overlap(path) == [
        LfwOverlap("pins", "pins_Bill Gates", "Bill_Gates"),
        LfwOverlap("glint24", "Tom Hanks", "Tom_Hanks"),
    ]
    path.write_text("pins\tpins_Bill Gates\n")
    with pytest.raises(ValueError, match=r"overlap.txt:1: expected 'dataset<TAB>folder<TAB>LFW name'"):
        lfw_overlap(path)


@pytest.mark.skipif(not (SHARED_DATA / "lfw_overlap.txt").exists(), reason="shared overlap list not present")
def test_shared_overlap_list():
    rows = lfw_overlap(SHARED_DATA / "lfw_overlap.txt")
    by_dataset = {dataset: [row for row in rows if row.dataset == dataset] for dataset in {row.dataset for row in rows}}
    assert {dataset: len(found) for dataset, found in by_dataset.items()} == {"pins": 15, "glint24": 18}
    assert LfwOverlap("pins", "pins_Robert Downey Jr", "Robert_Downey_Jr") in rows


def folds_of(fold_builder, n_folds=10):
    """Concatenates per-fold (distances, issame) arrays in fold order."""
    parts = [fold_builder(k) for k in range(n_folds)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def fold(same_distances, different_distances):
    distances = np.concatenate([same_distances, different_distances])
    return distances, np.arange(distances.size) < len(same_distances)


def test_separable_distances_score_perfectly():
    rng = np.random.default_rng(0)
    distances, issame = folds_of(lambda k: fold(rng.uniform(0.1, 0.9, 300), rng.uniform(1.3, 3.9, 300)))
    result = evaluate_distances(distances, issame)
    assert result.accuracy_mean == 1.0 and result.accuracy_std == 0.0
    # VAL@FAR puts the threshold at FAR 1e-3, inside the mismatched distances, even here.
    assert result.auc == 1.0 and result.val_mean == 1.0 and 0 < result.far_mean < 2e-3
    assert result.eer == 0.0
    gap = (distances[issame].max(), distances[~issame].min())
    assert result.best_threshold == pytest.approx(sum(gap) / 2, abs=ONE_STEP)  # centre of the gap
    assert np.all((result.fold_thresholds > gap[0]) & (result.fold_thresholds <= gap[1]))


def test_known_overlap_gives_known_accuracy():
    # Every fold: 280 matched at 0.5, 20 at 1.5; 30 mismatched at 1.0, 270 at 2.5. Thresholds in (0.5, 1.0]
    # get 580/600 right, those in (1.5, 2.5] 570/600: the first plateau wins, centred at 0.75.
    distances, issame = folds_of(lambda k: fold([0.5] * 280 + [1.5] * 20, [1.0] * 30 + [2.5] * 270))
    result = evaluate_distances(distances, issame)
    assert result.accuracy_mean == pytest.approx(580 / 600)
    assert result.accuracy_std == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(result.fold_thresholds, 0.75, atol=ONE_STEP)
    assert result.best_threshold == pytest.approx(0.75, abs=ONE_STEP)
    # The ROC runs from accepting nothing to accepting everything; a pair at the threshold is rejected.
    assert (result.tpr[0], result.fpr[0], result.tpr[-1], result.fpr[-1]) == (0, 0, 1, 1)
    assert (result.tpr[1], result.fpr[1]) == (280 / 300, 0)  # threshold 1.0 accepts the matched 0.5s only
    # AUC by its definition: P(matched distance < mismatched distance), ties counting half.
    same, different = distances[issame][:, None], distances[~issame][None, :]
    assert result.auc == pytest.approx(np.mean((same < different) + 0.5 * (same == different)))
    # Accepting the 0.5s leaves FRR 20/300 at FAR 0; taking in the mismatched 1.0s raises FAR to 30/300
    # with FRR unchanged, so the rates meet at 20/300 on that step.
    assert result.eer == pytest.approx(20 / 300)
    assert result.scores()["eer"] == result.eer


def test_equal_error_rate_reads_as_its_count():
    # 270 matched at 0.5, 30 at 1.5; 30 mismatched at 1.0, 270 at 2.5: FAR and FRR meet at 30/300 on a ROC
    # point. Rates from counts give exactly 0.1 (1 - TPR gave 0.09999999999999998, written so into cards).
    distances, issame = folds_of(lambda k: fold([0.5] * 270 + [1.5] * 30, [1.0] * 30 + [2.5] * 270))
    assert evaluate_distances(distances, issame).eer == 0.1


def test_each_fold_is_scored_with_a_threshold_from_the_other_folds():
    # Folds 1-9 separate at (0.5, 1.5]; fold 0's matched pairs sit at 1.2. Fold 0 is scored with the
    # threshold of folds 1-9 (centre 1.0) and loses its matched pairs; the other folds, trained with
    # fold 0 included, move into (1.2, 1.5] and stay perfect.
    distances, issame = folds_of(lambda k: fold([1.2 if k == 0 else 0.5] * 300, [1.5] * 300))
    result = evaluate_distances(distances, issame)
    np.testing.assert_allclose(result.fold_accuracies, [0.5] + [1.0] * 9)
    assert result.accuracy_mean == pytest.approx(0.95)
    assert result.accuracy_std == pytest.approx(0.15)
    assert result.fold_thresholds[0] == pytest.approx(1.0, abs=ONE_STEP)
    np.testing.assert_allclose(result.fold_thresholds[1:], 1.35, atol=ONE_STEP)


def test_val_at_far():
    # Mismatched distances 1.0005 + 0.01 j + 0.003 k (fold k, j < 300): all distinct, between grid points.
    # Matched: half at 0.5, half at 1.5, so VAL is 0.5 at any threshold between 1.0 and 1.5.
    mismatched = 1.0005 + 0.01 * np.arange(300)
    distances, issame = folds_of(lambda k: fold([0.5] * 150 + [1.5] * 150, mismatched + 0.003 * k))
    result = evaluate_distances(distances, issame)
    assert result.val_mean == 0.5 and result.val_std == 0.0
    # Over all 3000 mismatched pairs FAR 1e-3 is 3 pairs: the threshold is the first grid point above
    # the third smallest (1.0065), where the false-accept rate reaches 3/3000.
    assert result.threshold_at_far == 1.007  # the grid value itself, as a model card prints it
    assert np.count_nonzero(distances[~issame] < result.threshold_at_far) == 3
    # Per fold, FAR 1e-3 is 2.7 of the 2700 training negatives: 70% of the way from the first grid point
    # accepting the 2nd smallest to the first accepting the 3rd. Fold 0 trains on 1.0035, 1.0065, 1.0095:
    # 1.007 + 0.7 * 0.003 = 1.0091, which accepts fold 0's own 1.0005 but not 1.0105. Folds 1 and 2
    # (1.0091, 1.0082) accept their smallest too; folds 3-9 (1.0061) none: 3/300 over 10 folds.
    assert result.far_mean == pytest.approx(1e-3)


def test_matches_a_brute_force_grid_search():
    rng = np.random.default_rng(1)
    distances, issame = folds_of(lambda k: fold(rng.normal(1.0, 0.3, 300).clip(0), rng.normal(1.8, 0.3, 300)))
    result = evaluate_distances(distances, issame)
    grid = np.arange(4002) / 1000  # the default step over [0, 4.001]: each the nearest float to its decimal
    folds = np.arange(distances.size) // 600
    for k in range(10):
        train = folds != k
        # Every threshold against every training pair at once.
        correct = ((distances[train][None, :] < grid[:, None]) == issame[train][None, :]).sum(axis=1)
        best = np.flatnonzero(correct == correct.max())
        run = best[: np.argmax(np.diff(np.append(best, -1)) != 1) + 1]
        threshold = grid[run[run.size // 2]]
        assert result.fold_thresholds[k] == threshold
        assert result.fold_accuracies[k] == np.mean((distances[folds == k] < threshold) == issame[folds == k])


@pytest.mark.parametrize(
    "distances, issame, message",
    [
        ([0.1, 0.2], [True], "2 distances but 1 issame"),
        ([0.1, np.nan, 0.3, 0.4], [True, False, True, False], "NaN"),
        ([0.1, 0.2, 0.3, 0.4], [True, True, False, False], "fold 0"),
    ],
)
def test_rejects_unusable_input(distances, issame, message):
    with pytest.raises(ValueError, match=message):
        evaluate_distances(distances, issame, n_folds=2)


def test_plot_roc_writes_a_png(tmp_path):
    rng = np.random.default_rng(2)
    results = {}
    for name, spread in [("a", 0.2), ("b", 0.4)]:
        distances, issame = folds_of(lambda k: fold(rng.normal(1.0, spread, 300).clip(0), rng.normal(1.8, spread, 300)))
        results[name] = evaluate_distances(distances, issame)
    path = plot_roc(results, tmp_path / "roc.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 10_000


def test_failure_sheet_shows_the_worst_errors_of_each_kind(tmp_path):
    crops = np.stack([np.full((96, 96, 3), 40 * i, np.uint8) for i in range(6)])
    first, second = np.array([0, 1, 2, 3, 4]), np.array([1, 2, 3, 4, 5])
    issame = np.array([True, True, False, False, True])
    distances = np.array([0.2, 1.5, 0.3, 2.0, 1.2])  # two rejects (1.5, 1.2), one accept (0.3) at 1.0
    path, errors = failure_sheet(crops, first, second, distances, issame, 1.0, tmp_path / "f.png")
    assert errors == {"false_rejects": 2, "false_accepts": 1}
    sheet = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    assert sheet.shape == (18 + 2 * (96 + 18), 4 * 96 + 12, 3)
    # Worst reject first: pair 1 (crops 1 and 2) tops the left column; the accept (crops 2, 3) the right.
    assert sheet[18 + 48, 48, 0] == 40 and sheet[18 + 48, 96 + 48, 0] == 80
    assert sheet[18 + 48, 2 * 96 + 12 + 48, 0] == 80 and sheet[18 + 48, 3 * 96 + 12 + 48, 0] == 120
