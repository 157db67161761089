"""LFW files: the official View 2 ``pairs.txt`` (parsed here only) and the list of training
identities that are LFW people."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Pair:
    """One LFW pair: image ``n1`` of ``name1`` and image ``n2`` of ``name2`` (numbers from 1)."""

    name1: str
    n1: int
    name2: str
    n2: int

    @property
    def issame(self) -> bool:
        return self.name1 == self.name2

    def paths(self, lfw_dir: str | Path) -> tuple[Path, Path]:
        """Image paths under the LFW folder: ``lfw_dir/<name>/<name>_<4-digit n>.jpg``."""
        root = Path(lfw_dir)
        return (
            root / self.name1 / f"{self.name1}_{self.n1:04d}.jpg",
            root / self.name2 / f"{self.name2}_{self.n2:04d}.jpg",
        )


@dataclass(frozen=True)
class LfwOverlap:
    """A training identity folder that is also an LFW person."""

    dataset: str
    folder: str
    lfw_name: str


def read_pairs(pairs_txt: str | Path) -> list[list[Pair]]:
    """Reads View 2 ``pairs.txt`` into its folds, in file order.

    The first line is ``<folds> <n>`` ("10 300" in the official file); each fold then has ``n``
    matched lines ``name n1 n2`` followed by ``n`` mismatched lines ``name1 n1 name2 n2``.
    Raises ``ValueError`` naming the file and line when the file does not follow that layout.
    """
    path = Path(pairs_txt)
    lines = path.read_text().splitlines()
    try:
        n_folds, per_fold = (int(field) for field in lines[0].split())
    except (IndexError, ValueError):
        raise ValueError(f"{path}:1: expected '<folds> <pairs per fold>', e.g. '10 300'") from None
    expected = 1 + n_folds * 2 * per_fold
    if len(lines) < expected or any(line.strip() for line in lines[expected:]):
        raise ValueError(
            f"{path}: header says {n_folds} folds of 2x{per_fold} pairs, so {expected} lines; file has {len(lines)}"
        )
    folds = []
    for fold in range(n_folds):
        start = 1 + fold * 2 * per_fold
        rows = range(start, start + 2 * per_fold)
        folds.append([_parse_pair(lines[i], i < start + per_fold, path, i + 1) for i in rows])
    return folds


@dataclass(frozen=True)
class LfwPairs:
    """LFW View 2 pairs, in fold order (``pairs`` may be a subsample, equal per fold)."""

    root: Path
    pairs: list[Pair]
    folds: int

    @property
    def images(self) -> list[Path]:
        """Every image the pairs use, once, sorted."""
        return sorted({p for pair in self.pairs for p in pair.paths(self.root)})

    @property
    def issame(self) -> np.ndarray:
        return np.array([pair.issame for pair in self.pairs])

    def pair_indices(self) -> tuple[np.ndarray, np.ndarray]:
        """Each pair's first and second image as rows of ``images``."""
        row = {path: i for i, path in enumerate(self.images)}
        first, second = zip(*(tuple(row[p] for p in pair.paths(self.root)) for pair in self.pairs))
        return np.array(first), np.array(second)


def load_lfw(root: str | Path, pairs: int | None = None) -> LfwPairs:
    """``root/pairs.txt``; with ``pairs``, that many pairs spread evenly over every fold,
    half matched and half mismatched (so the 10-fold protocol still applies)."""
    root = Path(root)
    folds = read_pairs(root / "pairs.txt")
    if pairs is None:
        return LfwPairs(root, [p for fold in folds for p in fold], len(folds))
    per_half = pairs // (2 * len(folds))
    if per_half < 1:
        raise ValueError(f"pairs must be at least {2 * len(folds)} (one matched and one mismatched pair per fold)")
    chosen = []
    for fold in folds:
        half = len(fold) // 2
        picks = np.unique(np.linspace(0, half - 1, min(per_half, half)).round().astype(int))
        chosen += [fold[i] for i in picks] + [fold[half + i] for i in picks]
    return LfwPairs(root, chosen, len(folds))


def _parse_pair(line: str, issame: bool, path: Path, line_no: int) -> Pair:
    fields = line.split()
    try:
        if issame and len(fields) == 3:
            return Pair(fields[0], int(fields[1]), fields[0], int(fields[2]))
        if not issame and len(fields) == 4:
            return Pair(fields[0], int(fields[1]), fields[2], int(fields[3]))
    except ValueError:
        pass
    layout = "name n1 n2" if issame else "name1 n1 name2 n2"
    kind = "matched" if issame else "mismatched"
    raise ValueError(f"{path}:{line_no}: expected a {kind} pair '{layout}', got {line!r}")


def lfw_overlap(path: str | Path) -> list[LfwOverlap]:
    """Reads an LFW-overlap list: tab-separated ``dataset  folder  LFW name`` lines.

    This is what ``shared/tools/datasets.py lfw-overlap`` writes (e.g. ``pins\tpins_Bill Gates\tBill_Gates``);
    folder names may contain spaces. Training sets leave these folders out so LFW scores are not
    inflated by people seen in training. Blank lines and ``#`` comment lines are skipped.
    """
    path = Path(path)
    rows = []
    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split("\t")
        if len(fields) != 3 or not all(fields):
            raise ValueError(f"{path}:{line_no}: expected 'dataset<TAB>folder<TAB>LFW name', got {line!r}")
        rows.append(LfwOverlap(*fields))
    return rows
