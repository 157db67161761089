"""Nearest people in an int8 embedding matrix: what a gallery search runs, with no storage.

The index is only the int8 matrix (D bytes per sample, rows grouped by person), each
row's inverse norm (float32) and its person's id (int32): D + 8 bytes a sample, 136 MB for
a million 128-d faces. It is built from chunks streamed into preallocated arrays, so
building peaks at the final size plus one chunk.

A search is one pass over the matrix, block by block (``_BLOCK_ROWS`` rows). With
SimSIMD installed (``pip install facenet-edge[search]``; wheels for x86-64 and aarch64,
not 32-bit ARM) each query is quantized to int8 and the blocks are multiplied as stored
with its int8 dot-product kernels (AVX2 / NEON), one thread. Without it, each block is
converted to float32 (2 MiB) and multiplied with BLAS in calls of ``_GEMV_ROWS`` rows,
small enough that OpenBLAS never hands them to its thread pool: whenever other work
shares the CPU (camera, detector and embedder threads on a Pi) its threads make a match
10-30x slower (measured at load 5 on 2 cores: 4096-row gemv calls took 1.2 s for 1M
faces, 64-row ones 36 ms). numpy has no int8 dot product, so there the conversion
bounds the speed (about 5x a numpy read of the same bytes at 1M faces against 3.4x
with the int8 kernel, on the development VM: docs/benchmarks.md). Only rows scoring at
least the k-th best person so far, less a margin for the first pass's error (float32
rounding; the int8 query's quantization error, bounded per query), are kept, so nothing
of size N is allocated per query. The few kept rows are then scored again in float64
with the exact query, which is the ranking returned: the same as a brute-force float
computation, ties aside, whichever first pass ran.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

try:  # optional (facenet-edge[search]): an int8 dot product, so a search reads the matrix as stored
    import simsimd as _simsimd
except ImportError:
    _simsimd = None

# Rows converted to float32 per step of a search: 4096 x 128 x 4 bytes = 2 MiB.
_BLOCK_ROWS = 4096
# Rows per BLAS call. With its default GEMM_MULTITHREAD_THRESHOLD (4), OpenBLAS runs gemv
# on one thread below 2304 * 4 = 9216 matrix elements and gemm up to 65536 * 4 = 262144
# multiply-adds; 64 x 128 (x _QUERY_COLUMNS queries) stays within both, so a search never
# wakes BLAS threads.
_GEMV_ROWS = 64
_QUERY_COLUMNS = 32
# Margin (cosine) for float32 rounding in the first pass: a row scoring within it of the
# k-th best person is kept for the exact float64 ranking. The float32 error of one score
# is at most about 128 * 2**-24 (< 1e-5).
_SCORE_SLACK = 1e-4


@dataclass(frozen=True)
class Index:
    """In-memory copy of every sample: the int8 matrix and two numbers a row, nothing else."""

    matrix: np.ndarray  # (N, D) int8, rows grouped by person (ascending person id)
    inv_norm: np.ndarray  # (N,) float32: 1 / |row| (0 for an all-zero row)
    person: np.ndarray  # (N,) int32 (int64 if ids need it): the person id of each row

    @property
    def nbytes(self) -> int:
        return self.matrix.nbytes + self.inv_norm.nbytes + self.person.nbytes

    @classmethod
    def build(
        cls, count: int, size: int, ids: tuple[int, int], chunks: Iterable[tuple[np.ndarray, np.ndarray]]
    ) -> Index | None:
        """The index of ``count`` rows of ``size`` int8 values, from ``chunks`` of (person
        ids, (n, size) int8 rows) in order (grouped by person); ``ids``: the smallest and
        largest person id. None when the chunks do not hold exactly ``count`` rows (the
        source changed while it was read)."""
        small = np.iinfo(np.int32).min <= ids[0] and ids[1] <= np.iinfo(np.int32).max
        id_type = np.int32 if small else np.int64
        matrix = np.empty((count, size), dtype=np.int8)
        person = np.empty(count, dtype=id_type)
        inv_norm = np.empty(count, dtype=np.float32)
        filled = 0
        for ids, chunk in chunks:
            end = filled + len(chunk)
            if end > count:  # never write past the end
                return None
            matrix[filled:end] = chunk
            person[filled:end] = ids
            floats = chunk.astype(np.float32)
            squares = np.einsum("nd,nd->n", floats, floats)  # exact: integers below 2**24
            with np.errstate(divide="ignore"):
                inverse = 1.0 / np.sqrt(squares.astype(np.float64))
            inverse[squares == 0] = 0.0
            inv_norm[filled:end] = inverse
            filled = end
        if filled != count:
            return None
        return cls(matrix=matrix, inv_norm=inv_norm, person=person)


def first_pass() -> str:
    """Which first pass searches run on this install: "simsimd int8" or "numpy float32"."""
    return "simsimd int8" if _simsimd is not None else "numpy float32"


def nearest(index: Index, queries: np.ndarray, k: int) -> list[list[tuple[int, float]]]:
    """Per unit query (rows of (Q, D) float32), up to ``k`` (person id, cosine similarity),
    best first: each person scored by their closest sample."""
    found: list[list[tuple[int, float]]] = []
    for start in range(0, len(queries), _QUERY_COLUMNS):
        batch = queries[start : start + _QUERY_COLUMNS]
        for query, rows in zip(batch, _scan(index, batch, k)):
            found.append(_rank(index, query, rows, k))
    return found


class _Candidates:
    """Rows of one query that may still hold the best sample of one of its ``k`` nearest
    people, from the first pass, with the score below which a row cannot matter."""

    def __init__(self, k: int, slack: float):
        self.k = k
        self.slack = slack  # how far a first-pass score may be from the exact one
        self.floor = -np.inf
        self._rows: list[np.ndarray] = []
        self._scores: list[np.ndarray] = []
        self._count = 0
        self._limit = 0  # prune when more rows than this are held

    def add(self, rows: np.ndarray, scores: np.ndarray, person: np.ndarray) -> float:
        """Take rows (ascending, after any added before) and their scores; return the floor."""
        self._rows.append(rows)
        self._scores.append(scores)
        self._count += len(rows)
        if self._count > self._limit or self.floor == -np.inf:
            self._prune(person)
        return self.floor

    def rows(self, person: np.ndarray) -> np.ndarray:
        self._prune(person)
        return self._rows[0]

    def _prune(self, person: np.ndarray) -> None:
        rows = np.concatenate(self._rows) if len(self._rows) != 1 else self._rows[0]
        scores = np.concatenate(self._scores) if len(self._scores) != 1 else self._scores[0]
        if len(rows):
            owners = person[rows]  # grouped: rows ascend and the matrix is grouped by person
            starts = np.flatnonzero(np.concatenate(([True], owners[1:] != owners[:-1])))
            best = np.maximum.reduceat(scores, starts)  # each person's best score
            if len(best) >= self.k:
                kth = np.partition(best, len(best) - self.k)[len(best) - self.k]
                self.floor = max(self.floor, float(kth) - self.slack)
            # A person's exact best is within the slack of their first-pass best.
            own_best = np.repeat(best, np.diff(np.append(starts, len(rows))))
            keep = (scores >= self.floor) & (scores >= own_best - self.slack)
            rows, scores = rows[keep], scores[keep]
        self._rows, self._scores, self._count = [rows], [scores], len(rows)
        # Prune at every add (a raised floor skips later blocks), unless many rows survive
        # (many near-equal samples of the best people): then only once they have doubled.
        self._limit = 2 * len(rows) if len(rows) > 4 * self.k + 256 else 0


def _scan(index: Index, queries: np.ndarray, k: int) -> list[np.ndarray]:
    """First pass over the whole matrix: per query, the rows that may hold the best sample
    of one of its ``k`` nearest people."""
    matrix, inv_norm, person = index.matrix, index.inv_norm, index.person
    block_rows = min(_BLOCK_ROWS, len(matrix))
    scorer = _Int8Scores(queries) if _simsimd is not None else _Float32Scores(queries, block_rows)
    candidates = [_Candidates(k, slack) for slack in scorer.slack]
    floor = np.full(len(queries), -np.inf, dtype=np.float32)
    for start in range(0, len(matrix), _BLOCK_ROWS):
        rows = matrix[start : start + _BLOCK_ROWS]
        out = scorer.dot(rows)  # (n, Q): each row times each query
        out *= inv_norm[start : start + len(rows), None]
        above = out.max(axis=0) >= floor
        if above.any():  # rare once the floors have risen: most blocks end here
            for j in np.flatnonzero(above):
                hits = np.flatnonzero(out[:, j] >= floor[j])
                floor[j] = candidates[j].add(hits + start, out[hits, j], person)
    return [c.rows(person) for c in candidates]


class _Float32Scores:
    """Block scores with numpy: int8 rows converted to float32, times the float32 queries.

    numpy has no int8 dot product, so the conversion bounds the speed (about 5x a read of
    the matrix at 1M faces on the development VM)."""

    def __init__(self, queries: np.ndarray, block_rows: int):
        count, size = queries.shape
        self.slack = [_SCORE_SLACK] * count
        self._block = np.empty((block_rows, size), dtype=np.float32)
        # Up to 3 queries: one gemv each is faster than a gemm with so few columns (measured).
        self._one_by_one = count < 4
        if self._one_by_one:
            self._vectors = [np.ascontiguousarray(q, dtype=np.float32) for q in queries]
            self._scores = np.empty((count, block_rows), dtype=np.float32)
        else:
            self._columns = np.ascontiguousarray(queries.T, dtype=np.float32)  # (D, Q)
            self._scores = np.empty((block_rows, count), dtype=np.float32)

    def dot(self, rows: np.ndarray) -> np.ndarray:
        n = len(rows)
        converted = self._block[:n]
        np.copyto(converted, rows, casting="unsafe")  # int8 -> float32, exact
        if self._one_by_one:
            for vector, out in zip(self._vectors, self._scores[:, :n]):
                _multiply(converted, vector, out)
            return self._scores[:, :n].T  # (n, Q) view
        out = self._scores[:n]
        _multiply(converted, self._columns, out)
        return out


class _Int8Scores:
    """Block scores with SimSIMD's int8 dot product: each query is quantized to int8 at its
    own scale, so the matrix is read once, as stored, with no conversion.

    Quantizing the query moves every cosine by at most ``eps = |q - q8 / scale|``; a row
    within ``2 * eps`` of the k-th best person is kept, and the float64 second pass ranks
    the kept rows with the exact query, so results equal the float32 path's."""

    def __init__(self, queries: np.ndarray):
        scale = 127.0 / np.abs(queries.astype(np.float64)).max(axis=1)  # unit rows: max > 0
        quantized = np.round(queries * scale[:, None])
        error = np.linalg.norm(queries - quantized / scale[:, None], axis=1)
        self.slack = [float(2.0 * e) + _SCORE_SLACK for e in error]
        self._inv_scale = (1.0 / scale).astype(np.float32)[:, None]
        self._queries = quantized.astype(np.int8)

    def dot(self, rows: np.ndarray) -> np.ndarray:
        # Exact: integer sums below 128 * 127 * 127 < 2**24 are exact in float32. No ``out=``:
        # simsimd 6.5 returns None from it without a reference (None's count drops per call
        # until CPython 3.11 aborts).
        out = np.asarray(_simsimd.cdist(self._queries, rows, metric="dot", out_dtype="float32"))
        out *= self._inv_scale  # back to the unit query's scale
        return out.T  # (n, Q) view


def _multiply(rows: np.ndarray, queries: np.ndarray, out: np.ndarray) -> None:
    """``out = rows @ queries`` in BLAS calls of at most _GEMV_ROWS rows (one thread)."""
    whole = len(rows) - len(rows) % _GEMV_ROWS
    if whole:
        np.matmul(
            rows[:whole].reshape(-1, _GEMV_ROWS, rows.shape[1]),
            queries,
            out=out[:whole].reshape(-1, _GEMV_ROWS, *queries.shape[1:]),
        )
    if whole < len(rows):
        np.matmul(rows[whole:], queries, out=out[whole:])


def _rank(index: Index, query: np.ndarray, rows: np.ndarray, k: int) -> list[tuple[int, float]]:
    """Second pass, float64, over the candidate rows: the ``k`` best people."""
    query = query.astype(np.float64)
    similarity = np.empty(len(rows), dtype=np.float64)
    for start in range(0, len(rows), _BLOCK_ROWS):  # usually one step: a few rows
        vectors = index.matrix[rows[start : start + _BLOCK_ROWS]].astype(np.float64)
        norms = np.sqrt(np.einsum("nd,nd->n", vectors, vectors))
        with np.errstate(divide="ignore", invalid="ignore"):
            part = (vectors @ query) / norms
        part[norms == 0] = 0.0
        similarity[start : start + len(vectors)] = part
    found: list[tuple[int, float]] = []
    seen: set[int] = set()
    for i in np.argsort(-similarity, kind="stable"):  # ties: the lower row (person id) first
        person = int(index.person[rows[i]])
        if person not in seen:
            seen.add(person)
            found.append((person, float(similarity[i])))
            if len(found) == k:
                break
    return found
