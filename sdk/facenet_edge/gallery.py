"""Gallery: enrolled people (stored by :mod:`facenet_edge.gallery_store`) matched against
query faces (searched by :mod:`facenet_edge.search`). :class:`Gallery` is the public
entry point; storage and search each stand on their own.

Matching
    Open-set: each query gets the nearest people with their squared-L2 distance, and
    ``accepted`` says whether that distance is within the threshold. An unknown face is
    never forced onto the nearest person. A person's distance is that of their closest
    sample, its int8 row renormalised to unit length.

    In memory the gallery is only the search index (the int8 matrix, each row's inverse
    norm and its person's id: 136 bytes a 128-d sample, 130 MB for a million). Names stay
    in SQLite; the few that a search returns are read with one ``SELECT ... WHERE id IN
    (...)``. The index is loaded on the first match and again after any write (this
    instance's or another process's).

Thresholds
    The stored threshold is fixed. With :meth:`Gallery.use_fpir` (the CLI does it whenever
    the model card carries an impostor distribution) the threshold is instead derived for a
    target rate of strangers given a name per attempt (FPIR), for the number of samples
    enrolled at each match (:mod:`facenet_edge.fpir`): the more people enrolled, the
    tighter the threshold, so the rate a door was set for holds as it grows.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .card import ModelIdentity
from .errors import GalleryError
from .fpir import DEFAULT_FPIR, FpirThreshold, ImpostorDistribution, check_fpir, threshold_for_fpir
from .gallery_store import GalleryStore, Person, quantize, unit_rows, validate_name
from .search import Index, nearest

# Names that callers import from here: the gallery's public face.
__all__ = ["Gallery", "Match", "Person", "quantize", "validate_name"]


@dataclass
class Match:
    """One candidate for a query face.

    ``distance``: squared L2 between unit vectors (0..4). ``similarity``: cosine,
    ``1 - distance / 2``. ``accepted``: ``distance <= threshold`` (open-set decision).
    """

    name: str
    distance: float
    similarity: float
    accepted: bool


class Gallery(GalleryStore):
    """A face gallery stored in one SQLite file. Use :meth:`open` or :meth:`create`.

    Storage (people, samples, export/import, transactions) is :class:`GalleryStore`'s;
    this adds matching over an in-memory :class:`~facenet_edge.search.Index`. Methods
    take an internal lock, so one instance may be shared by a camera thread and the
    main thread (calls run one at a time).
    """

    def __init__(
        self, path: Path, conn: sqlite3.Connection, identity: ModelIdentity, threshold: float, embedding_size: int
    ):
        super().__init__(path, conn, identity, threshold, embedding_size)
        self._index: Index | None = None
        self._data_version: tuple[int, int] | None = None  # the store's _version() of _index
        self._fpir: tuple[ImpostorDistribution, float] | None = None

    def use_fpir(self, distribution: ImpostorDistribution, target: float = DEFAULT_FPIR) -> None:
        """Match with the threshold for ``target`` strangers named per attempt, derived
        from ``distribution`` (the model card's, ``fpir.card_distribution``) for the
        samples enrolled at each match, instead of the stored threshold. This instance
        only; the file is not changed."""
        self._fpir = (distribution, check_fpir(target))

    def operating_point(self) -> FpirThreshold | None:
        """The FPIR target this instance holds and the threshold it gives for the samples
        enrolled now; None with a fixed threshold."""
        if self._fpir is None:
            return None
        with self._read() as conn:
            samples = conn.execute("SELECT COUNT(*) FROM samples").fetchone()[0]
        return threshold_for_fpir(*self._fpir, samples)

    @property
    def stored_threshold(self) -> float:
        """The threshold stored in the file (what matching uses without :meth:`use_fpir`)."""
        return super().threshold

    @property
    def threshold(self) -> float:
        """The open-set threshold (squared L2) matching uses now: derived for the FPIR
        target and the samples enrolled (after :meth:`use_fpir`), else the stored one."""
        point = self.operating_point()
        return super().threshold if point is None else point.threshold

    def match(self, embeddings: np.ndarray, identity: ModelIdentity) -> list[Match | None]:
        """Open-set matching, one query per (D,) or row of (N, D): per query its nearest
        person, ``accepted`` or not (a face nobody matches gets its nearest person with
        ``accepted=False``), or None when the gallery is empty.

        Raises IncompatibleModelError when ``identity`` is not compatible with the model
        the gallery was built with.
        """
        return [found[0] if found else None for found in self.match_top_k(embeddings, identity, 1)]

    def match_top_k(self, embeddings: np.ndarray, identity: ModelIdentity, k: int) -> list[list[Match]]:
        """Per query, up to ``k`` nearest people, nearest first (an empty list when the
        gallery is empty)."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        self.check_identity(identity)
        queries = unit_rows(embeddings, self.embedding_size, "match")
        attempts = 3
        for attempt in range(attempts):
            with self._read():
                index = self._current_index()
            if not len(index.matrix):
                return [[] for _ in queries]
            threshold = self._threshold_for(len(index.matrix))
            found = nearest(index, queries, k)  # outside the lock: the index is immutable
            wanted = sorted({person for people in found for person, _ in people})
            names = self._names(wanted)
            if len(names) == len(wanted) or attempt == attempts - 1:
                break
            # Someone was removed since the index was loaded: load it again.
            with self._lock:
                if self._index is index:
                    self._index = None
        return [
            [self._match(names[person], similarity, threshold) for person, similarity in people if person in names]
            for people in found
        ]

    def _threshold_for(self, samples: int) -> float:
        """The threshold for an index of ``samples`` rows."""
        if self._fpir is None:
            return super().threshold
        return threshold_for_fpir(*self._fpir, samples).threshold

    @staticmethod
    def _match(name: str, similarity: float, threshold: float) -> Match:
        distance = float(np.clip(2.0 - 2.0 * similarity, 0.0, 4.0))
        return Match(name, distance, 1.0 - distance / 2.0, distance <= threshold)

    def _current_index(self) -> Index:
        """The index of what is stored now (call under the lock)."""
        version = self._version()
        if self._index is None or version != self._data_version:
            self._index = None  # let the old matrix go before the new one is built
            self._index = self._load_index()
            self._data_version = version
        return self._index

    def _load_index(self) -> Index:
        """Every sample, in one read snapshot, streamed into the index's arrays."""
        with self._snapshot() as samples:
            index = Index.build(samples.count, self.embedding_size, samples.ids, samples.chunks)
        if index is None:  # cannot happen inside one snapshot
            raise GalleryError(f"gallery {self.path}: samples changed while loading")
        return index

    def close(self) -> None:
        """Close the database and drop the index (idempotent)."""
        with self._lock:
            super().close()
            self._index = None
