"""Gallery: enrolled people and their face embeddings, in one SQLite file.

Storage
    * ``meta``: schema version, the identity of the model that made the embeddings
      (sha256 + compatibility group), the embedding size and the open-set threshold.
    * ``people``: one row per name.
    * ``samples``: several per person; each embedding is a 128-byte int8 BLOB,
      ``round(clip(e, -1, 1) * 127)``.

Durability
    WAL journal with ``synchronous=FULL``. WAL alone survives a killed process; FULL also
    fsyncs the WAL on every commit, so an enrolment that was reported done survives a
    power cut (the common way a Raspberry Pi is switched off). Writes are rare, so the
    fsync per commit costs nothing that matters. Every write is one ``BEGIN IMMEDIATE``
    transaction: taking the write lock up front means two processes writing at once wait
    for each other (``busy_timeout``) instead of failing half-way.

Privacy
    Embeddings are biometric data. The file and its ``-wal``/``-shm`` companions are
    created with mode 0600, deleted rows are overwritten (``secure_delete``), exports are
    0600 too, and nothing here logs or prints an embedding.

Matching
    Open-set: each query gets the nearest people with their squared-L2 distance, and
    ``accepted`` says whether that distance is within the threshold. An unknown face is
    never forced onto the nearest person. A person's distance is that of their closest
    sample, its int8 row renormalised to unit length.

    In memory the gallery is only the int8 matrix (128 bytes per sample, rows grouped by
    person), each row's inverse norm (float32) and its person's id (int32): 136 bytes a
    sample, 130 MB for a million. Names stay in SQLite; the few that a search returns are
    read with one ``SELECT ... WHERE id IN (...)``. Loading streams rows from SQLite in
    chunks straight into the preallocated arrays, so its peak is the final size plus a
    few MB.

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
    of size N is allocated per query. The few kept rows are then scored again in float64 with the exact
    query, which is the ranking returned: the same as a brute-force float computation,
    ties aside, whichever first pass ran.
"""

from __future__ import annotations

import errno
import hashlib
import math
import os
import sqlite3
import stat
import tempfile
import threading
import time
import unicodedata
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

try:  # optional (facenet-edge[search]): an int8 dot product, so a search reads the matrix as stored
    import simsimd as _simsimd
except ImportError:
    _simsimd = None

from .card import ModelIdentity
from .errors import GalleryError, IncompatibleModelError
from .files import open_regular, private_file

SCHEMA_VERSION = 1
EMBEDDING_SIZE = 128
MAX_NAME_LENGTH = 128
EXPORT_FORMAT = "facenet-edge-gallery/1"
# The arrays of an export: name -> (rank, dtype kind, largest item in bytes). Strings are
# numpy "U" (4 bytes a character); the embeddings int8.
_EXPORT_ARRAYS = {
    "format": (0, "U", 4 * 64),
    "names": (1, "U", 4 * MAX_NAME_LENGTH),
    "embeddings": (2, "i", 1),
    "model_sha256": (0, "U", 4 * 64),
    "compatibility_group": (0, "U", 4 * 256),
    "threshold": (0, "f", 8),
}

_SQLITE_HEADER = b"SQLite format 3\x00"
# Unicode categories refused in names: control (Cc), format (Cf: zero-width and bidi
# characters), surrogates (Cs: undecodable bytes from a command line), line and
# paragraph separators (Zl, Zp).
_REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
# Rows converted to float32 per step of a search: 4096 x 128 x 4 bytes = 2 MiB.
_BLOCK_ROWS = 4096
# Rows per BLAS call. With its default GEMM_MULTITHREAD_THRESHOLD (4), OpenBLAS runs gemv
# on one thread below 2304 * 4 = 9216 matrix elements and gemm up to 65536 * 4 = 262144
# multiply-adds; 64 x 128 (x _QUERY_COLUMNS queries) stays within both, so a search never
# wakes BLAS threads.
_GEMV_ROWS = 64
_QUERY_COLUMNS = 32
# Rows fetched from SQLite per step while loading the index.
_LOAD_ROWS = 4096
# Margin (cosine) for float32 rounding in the first pass: a row scoring within it of the
# k-th best person is kept for the exact float64 ranking. The float32 error of one score
# is at most about 128 * 2**-24 (< 1e-5).
_SCORE_SLACK = 1e-4
# Ids per "WHERE id IN (...)" (old SQLite builds allow at most 999 parameters).
_NAME_BATCH = 500
_BUSY_TIMEOUT_S = 10.0
# open_regular needs a limit; a gallery has no useful one (8 GB is 60M faces).
_MAX_GALLERY_BYTES = 1 << 62
# SQLite's result code for "database or disk is full".
_SQLITE_FULL = 13
# Filesystems without hard links (FAT on a USB stick) answer os.link with one of these.
_NO_LINKS = frozenset({errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS})

_SCHEMA = """
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT
);
CREATE TABLE people (
    id      INTEGER PRIMARY KEY,
    name    TEXT NOT NULL UNIQUE,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE samples (
    id        INTEGER PRIMARY KEY,
    person_id INTEGER NOT NULL REFERENCES people(id) ON DELETE CASCADE,
    embedding BLOB NOT NULL CHECK (length(embedding) = 128),
    created   REAL NOT NULL
);
CREATE INDEX samples_person ON samples(person_id);
"""
# What identifies a gallery: these tables with (at least) these columns.
_COLUMNS = {
    "meta": {"key", "value"},
    "people": {"id", "name", "created", "updated"},
    "samples": {"id", "person_id", "embedding", "created"},
}


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


@dataclass
class Person:
    """An enrolled name. ``created``/``updated`` are Unix timestamps."""

    name: str
    samples: int
    created: float
    updated: float


@dataclass(frozen=True)
class _Index:
    """In-memory copy of every sample: the int8 matrix and two numbers a row, nothing else."""

    matrix: np.ndarray  # (N, 128) int8, rows grouped by person (ascending person id)
    inv_norm: np.ndarray  # (N,) float32: 1 / |row| (0 for an all-zero row)
    person: np.ndarray  # (N,) int32 (int64 if ids need it): people.id of each row

    @property
    def nbytes(self) -> int:
        return self.matrix.nbytes + self.inv_norm.nbytes + self.person.nbytes


def first_pass() -> str:
    """Which first pass searches run on this install: "simsimd int8" or "numpy float32"."""
    return "simsimd int8" if _simsimd is not None else "numpy float32"


def quantize(embeddings: np.ndarray) -> np.ndarray:
    """Float embeddings -> int8 as stored: ``round(clip(e, -1, 1) * 127)``."""
    return np.round(np.clip(embeddings, -1.0, 1.0) * 127.0).astype(np.int8)


def validate_name(name: object) -> str:
    """``name`` in Unicode NFC form if it is usable as a person's name, else GalleryError.

    NFC makes an accented letter typed precomposed or as letter + combining accent the
    same name. Control characters and line separators would break one-line output;
    format characters (zero-width spaces and joiners, bidirectional overrides such as
    U+202E) are invisible, so with them two different names could display alike."""
    if not isinstance(name, str):
        raise GalleryError(f"a name must be a string, got {type(name).__name__}")
    bad = sorted({f"U+{ord(ch):04X}" for ch in name if unicodedata.category(ch) in _REFUSED_CATEGORIES})
    if bad:
        raise GalleryError(
            f"a name must not contain control characters, invisible or direction-changing ones "
            f"({', '.join(bad)}): {name!r}"
        )
    name = unicodedata.normalize("NFC", name)
    if not name.strip():
        raise GalleryError("a name must not be empty")
    if len(name) > MAX_NAME_LENGTH:
        raise GalleryError(f"name is {len(name)} characters long; the limit is {MAX_NAME_LENGTH}: {name[:32]!r}...")
    if name != name.strip():
        raise GalleryError(f"a name must not start or end with whitespace: {name!r}")
    return name


def _as_unit_rows(embeddings: np.ndarray, what: str) -> np.ndarray:
    """(N, 128) float32 unit rows from one embedding or a stack of them."""
    array = np.asarray(embeddings, dtype=np.float32)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2 or array.shape[1] != EMBEDDING_SIZE:
        raise ValueError(f"{what}: expected (N, {EMBEDDING_SIZE}) embeddings, got shape {np.shape(embeddings)}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{what}: embeddings contain NaN or infinity")
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise ValueError(f"{what}: an embedding is all zeros")
    return array / norms


def _describe(identity: ModelIdentity) -> str:
    group = identity.compatibility_group or "none"
    return f"model sha256 {identity.sha256[:12]} (compatibility group {group})"


def _check_threshold(threshold: float) -> float:
    value = float(threshold)
    if not (math.isfinite(value) and 0.0 < value < 4.0):
        raise GalleryError(f"threshold must be a squared-L2 distance between 0 and 4, got {threshold!r}")
    return value


def _sidecars(path: Path) -> list[Path]:
    return [path, Path(f"{path}-wal"), Path(f"{path}-shm"), Path(f"{path}-journal")]


def _sqlite_reason(exc: sqlite3.Error) -> str:
    """SQLite's message, with a full disk said plainly."""
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+
    if code == _SQLITE_FULL or "database or disk is full" in str(exc):
        return "no space left on device (database or disk is full)"
    return str(exc)


def _fsync(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to the storage device."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _link(source: Path, target: Path) -> None:
    """Make ``source`` appear at ``target`` unless ``target`` exists (FileExistsError)."""
    try:
        os.link(source, target)
    except OSError as exc:
        if exc.errno not in _NO_LINKS:
            raise
        # No hard links here: check, then rename. Two creators racing within this window
        # (microseconds) could replace the other's just-published gallery, with anything
        # written into it meanwhile; only hard links rule that out.
        if os.path.lexists(target):
            raise FileExistsError(errno.EEXIST, "File exists", str(target)) from None
        os.rename(source, target)


def _make_private(path: Path) -> None:
    """A gallery and its companions are 0600: a file made by an older version or copied
    in with 0644 stops being readable by other users once opened."""
    for file in _sidecars(path):
        try:
            mode = file.stat().st_mode
            if mode & 0o077:
                os.chmod(file, stat.S_IMODE(mode) & 0o700)
        except OSError:  # absent, or not ours to change (read-only medium): reading still works
            continue


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


def _nearest(index: _Index, queries: np.ndarray, k: int) -> list[list[tuple[int, float]]]:
    """Per query, up to ``k`` (person id, cosine similarity), best first."""
    found: list[list[tuple[int, float]]] = []
    for start in range(0, len(queries), _QUERY_COLUMNS):
        batch = queries[start : start + _QUERY_COLUMNS]
        for query, rows in zip(batch, _scan(index, batch, k)):
            found.append(_rank(index, query, rows, k))
    return found


def _scan(index: _Index, queries: np.ndarray, k: int) -> list[np.ndarray]:
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
        count = len(queries)
        self.slack = [_SCORE_SLACK] * count
        self._block = np.empty((block_rows, EMBEDDING_SIZE), dtype=np.float32)
        # Up to 3 queries: one gemv each is faster than a gemm with so few columns (measured).
        self._one_by_one = count < 4
        if self._one_by_one:
            self._vectors = [np.ascontiguousarray(q, dtype=np.float32) for q in queries]
            self._scores = np.empty((count, block_rows), dtype=np.float32)
        else:
            self._columns = np.ascontiguousarray(queries.T, dtype=np.float32)  # (128, Q)
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
            rows[:whole].reshape(-1, _GEMV_ROWS, EMBEDDING_SIZE),
            queries,
            out=out[:whole].reshape(-1, _GEMV_ROWS, *queries.shape[1:]),
        )
    if whole < len(rows):
        np.matmul(rows[whole:], queries, out=out[whole:])


def _rank(index: _Index, query: np.ndarray, rows: np.ndarray, k: int) -> list[tuple[int, float]]:
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


class Gallery:
    """A face gallery stored in one SQLite file. Use :meth:`open` or :meth:`create`.

    Methods take an internal lock, so one instance may be shared by a camera thread and
    the main thread (calls run one at a time). Database failures (disk full, a corrupt
    page, a lock held too long by another process) raise GalleryError naming the file.
    """

    def __init__(self, path: Path, conn: sqlite3.Connection, identity: ModelIdentity, threshold: float):
        self.path = path
        self._conn = conn
        self._identity = identity
        self._threshold = threshold
        self._lock = threading.RLock()
        self._index: _Index | None = None
        self._data_version: int | None = None
        self._checked = False  # integrity checked (before the first write)

    # ---------------------------------------------------------------- opening

    @classmethod
    def create(cls, path: str | os.PathLike, identity: ModelIdentity, threshold: float) -> Gallery:
        """Create a new gallery file for embeddings from ``identity``'s model.

        ``threshold`` is the open-set distance threshold, normally the model card's
        ``thresholds.default()``. Raises GalleryError if ``path`` already exists. The file
        appears complete or not at all (see :meth:`_publish`).
        """
        path = Path(path)
        threshold = _check_threshold(threshold)
        try:
            cls._publish(path, identity, threshold)
        except FileExistsError:
            raise GalleryError(f"gallery already exists: {path}") from None
        return cls.open(path)

    @classmethod
    def _publish(cls, path: Path, identity: ModelIdentity, threshold: float, export: _Export | None = None) -> None:
        """Build a complete gallery (schema, metadata, and ``export``'s samples if given)
        under a temporary name in ``path``'s folder, fsync it, then hard-link it to
        ``path``. A power cut at any moment leaves either no gallery or a complete one
        (at worst a hidden ``.NAME.*.tmp`` file), never a file that blocks the next
        enrolment. The link fails if ``path`` exists, so two processes creating the same
        gallery at once cannot overwrite each other: the loser gets FileExistsError and
        can open the winner's file."""
        try:
            # mkstemp creates the file 0600; SQLite gives companions the database's mode.
            fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        except OSError as exc:
            raise GalleryError(f"cannot create gallery {path}: {exc.strerror}") from None
        os.close(fd)
        tmp = Path(name)
        try:
            conn = cls._connect(tmp)
            try:
                cls._configure(conn)
                # Named after its final path: errors name the file the user asked for.
                staging = cls(path, conn, identity, threshold)
                meta = {
                    "schema": str(SCHEMA_VERSION),
                    "model_sha256": identity.sha256,
                    "compatibility_group": identity.compatibility_group,
                    "embedding_size": str(EMBEDDING_SIZE),
                    "threshold": repr(threshold),
                    "created": repr(time.time()),
                }
                conn.execute("BEGIN IMMEDIATE")
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.executemany("INSERT INTO meta(key, value) VALUES (?, ?)", meta.items())
                conn.execute("COMMIT")
                if export is not None:
                    staging._import(export)
            finally:
                conn.close()
            _fsync(tmp)
            _link(tmp, path)
            _fsync(path.parent)
        except sqlite3.Error as exc:
            raise GalleryError(f"cannot create gallery {path}: {_sqlite_reason(exc)}") from None
        except FileExistsError:
            raise
        except OSError as exc:
            raise GalleryError(f"cannot create gallery {path}: {exc.strerror}") from None
        finally:
            for file in _sidecars(tmp):
                file.unlink(missing_ok=True)

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        create: bool = False,
        threshold: float | None = None,
        identity: ModelIdentity | None = None,
    ) -> Gallery:
        """Open an existing gallery.

        ``threshold``: when given, overrides the stored threshold for this instance only
        (the file is not changed). ``create=True``: a missing file is created with
        ``identity`` and ``threshold`` (both then required); if another process creates
        it at the same moment, theirs is opened.

        Raises GalleryError naming the path when the file is missing (and ``create`` is
        false) or is not a facenet-edge gallery; such a file is left untouched.
        """
        path = Path(path)
        if not os.path.lexists(path):
            if not create:
                raise GalleryError(f"gallery not found: {path}")
            if identity is None or threshold is None:
                raise GalleryError(f"creating gallery {path} needs a model identity and a threshold")
            try:
                cls._publish(path, identity, _check_threshold(threshold))
            except FileExistsError:
                pass  # created by another process meanwhile: open it
        cls._check_header(path)
        conn = cls._connect(path)
        try:
            # Identify our schema and read meta before any PRAGMA that writes (journal_mode
            # rewrites the header): a file that is not ours must come out of this
            # byte-for-byte unchanged.
            try:
                cls._check_schema(path, conn)
                meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            except sqlite3.DatabaseError as exc:
                raise GalleryError(f"not a facenet-edge gallery: {path} ({exc})") from None
            stored_identity, stored_threshold = cls._read_meta(path, meta)
            conn.execute("PRAGMA journal_mode=WAL")
            cls._configure(conn)
        except sqlite3.Error as exc:
            conn.close()
            raise GalleryError(f"cannot open gallery {path}: {_sqlite_reason(exc)}") from None
        except BaseException:
            conn.close()
            raise
        _make_private(path)
        chosen = stored_threshold if threshold is None else _check_threshold(threshold)
        return cls(path, conn, stored_identity, chosen)

    @staticmethod
    def _check_header(path: Path) -> None:
        # open_regular: a FIFO or device at the gallery's path is refused, not waited on.
        with open_regular(path, "gallery", _MAX_GALLERY_BYTES, GalleryError) as file:
            header = file.read(len(_SQLITE_HEADER))
        if not header:
            raise GalleryError(
                f"not a facenet-edge gallery: {path} is empty (left by an older facenet-edge "
                "interrupted while creating it? it holds nothing: delete it)"
            )
        if header != _SQLITE_HEADER:
            raise GalleryError(f"not a facenet-edge gallery: {path} is not an SQLite database")

    @staticmethod
    def _check_schema(path: Path, conn: sqlite3.Connection) -> None:
        """Raise GalleryError unless our tables and columns are there (read-only)."""
        for table, wanted in _COLUMNS.items():
            columns = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
            if not columns:
                raise GalleryError(f"not a facenet-edge gallery: {path} has no {table!r} table")
            if not wanted <= columns:
                missing = ", ".join(sorted(wanted - columns))
                raise GalleryError(f"not a facenet-edge gallery: {path}: table {table!r} lacks {missing}")

    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        # mode=rw: never let SQLite create a file behind our back (create() made it 0600).
        uri = f"{path.resolve().as_uri()}?mode=rw"
        try:
            # isolation_level=None: we issue BEGIN IMMEDIATE/COMMIT ourselves (see _write).
            return sqlite3.connect(
                uri, uri=True, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise GalleryError(f"cannot open gallery {path}: {exc}") from None

    @staticmethod
    def _configure(conn: sqlite3.Connection) -> None:
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        # Removed people's embeddings are overwritten, not left in free pages.
        conn.execute("PRAGMA secure_delete=ON")

    @staticmethod
    def _read_meta(path: Path, meta: dict[str, str | None]) -> tuple[ModelIdentity, float]:
        try:
            schema = int(meta["schema"] or "")
            size = int(meta["embedding_size"] or "")
            sha256 = meta["model_sha256"]
            threshold = float(meta["threshold"] or "")
        except (KeyError, ValueError, TypeError):
            raise GalleryError(f"not a facenet-edge gallery: {path} has incomplete metadata") from None
        if not (math.isfinite(threshold) and 0.0 < threshold < 4.0):
            # 100 would accept every stranger, -5 or NaN nobody: refuse rather than guess.
            raise GalleryError(
                f"gallery {path} stores threshold {meta['threshold']!r}, not a squared-L2 distance "
                "strictly between 0 and 4 (edited by hand?)"
            )
        if schema > SCHEMA_VERSION:
            raise GalleryError(
                f"gallery {path} has schema version {schema}; "
                f"this facenet-edge reads up to {SCHEMA_VERSION} (upgrade facenet-edge)"
            )
        if size != EMBEDDING_SIZE:
            raise GalleryError(f"gallery {path} holds {size}-d embeddings; facenet-edge uses {EMBEDDING_SIZE}")
        if not sha256:
            raise GalleryError(f"not a facenet-edge gallery: {path} names no model")
        identity = ModelIdentity(sha256=sha256, compatibility_group=meta.get("compatibility_group") or None)
        return identity, threshold

    # ---------------------------------------------------------------- properties

    @property
    def identity(self) -> ModelIdentity:
        """The model whose embeddings this gallery holds."""
        return self._identity

    @property
    def threshold(self) -> float:
        """Open-set threshold (squared L2) used by :meth:`match`."""
        return self._threshold

    def __len__(self) -> int:
        with self._read() as conn:
            return conn.execute("SELECT COUNT(*) FROM people").fetchone()[0]

    def __contains__(self, name: object) -> bool:
        with self._read() as conn:
            return conn.execute("SELECT 1 FROM people WHERE name = ?", (name,)).fetchone() is not None

    def __repr__(self) -> str:
        return f"Gallery({str(self.path)!r}, {_describe(self._identity)}, threshold={self._threshold:g})"

    def check_identity(self, identity: ModelIdentity) -> None:
        """Raise IncompatibleModelError unless ``identity``'s embeddings compare with ours."""
        if not self._identity.compatible_with(identity):
            raise IncompatibleModelError(
                f"gallery {self.path} was built with {_describe(self._identity)}; "
                f"embeddings from {_describe(identity)} cannot be compared with it"
            )

    # ---------------------------------------------------------------- writing

    def check_integrity(self) -> None:
        """Raise GalleryError unless SQLite's ``PRAGMA quick_check`` passes (every page
        and index readable and well formed; 29 ms for 100k faces on the development VM,
        docs/reliability.md). Runs by itself before this instance's first write, so
        nothing is ever written into a damaged file; call it early to fail before other
        work."""
        with self._read() as conn:
            try:
                problems = [row[0] for row in conn.execute("PRAGMA quick_check(3)")]
            except sqlite3.DatabaseError as exc:
                problems = [str(exc)]
            if problems != ["ok"]:
                raise GalleryError(
                    f"gallery {self.path} is damaged ({'; '.join(problems)[:200]}); it was not changed. "
                    "Restore it from an export: facenet-edge gallery import EXPORT.npz --gallery NEW.db"
                )
            self._checked = True

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """The connection, under the lock, with SQLite errors reported as GalleryError."""
        with self._lock:
            try:
                yield self._conn
            except sqlite3.Error as exc:
                raise GalleryError(f"gallery {self.path}: {_sqlite_reason(exc)}") from None

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: commit on success, roll back on any exception. The
        first write of an instance checks the file's integrity first."""
        with self._read() as conn:
            if not self._checked:
                self.check_integrity()
            try:
                conn.execute("BEGIN IMMEDIATE")
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:  # SQLite rolls back by itself after some errors
                    conn.execute("ROLLBACK")
                raise
            finally:
                self._index = None

    def _person_id(self, conn: sqlite3.Connection, name: str, now: float) -> int:
        row = conn.execute("SELECT id FROM people WHERE name = ?", (name,)).fetchone()
        if row is not None:
            conn.execute("UPDATE people SET updated = ? WHERE id = ?", (now, row[0]))
            return row[0]
        return conn.execute("INSERT INTO people(name, created, updated) VALUES (?, ?, ?)", (name, now, now)).lastrowid

    def add(self, name: str, embeddings: np.ndarray, identity: ModelIdentity) -> int:
        """Add one (128,) or several (N, 128) samples for ``name`` (created if new), in
        one transaction. Returns the number of samples added."""
        name = validate_name(name)
        self.check_identity(identity)
        rows = quantize(_as_unit_rows(embeddings, f"add {name!r}"))
        now = time.time()
        with self._write() as conn:
            person = self._person_id(conn, name, now)
            conn.executemany(
                "INSERT INTO samples(person_id, embedding, created) VALUES (?, ?, ?)",
                [(person, row.tobytes(), now) for row in rows],
            )
        return len(rows)

    def remove(self, name: str) -> int:
        """Delete ``name`` and all their samples. Returns how many samples were deleted."""
        with self._write() as conn:
            row = conn.execute("SELECT id FROM people WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise GalleryError(f"no person named {name!r} in gallery {self.path}")
            deleted = conn.execute("DELETE FROM samples WHERE person_id = ?", (row[0],)).rowcount
            conn.execute("DELETE FROM people WHERE id = ?", (row[0],))
        # Move the overwritten pages from the WAL into the database file now rather than
        # at some later checkpoint, so the removal is complete on disk.
        with self._read() as conn:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return deleted

    def rename(self, old: str, new: str) -> None:
        """Rename a person. Raises GalleryError if ``old`` is missing or ``new`` is taken."""
        new = validate_name(new)
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM people WHERE name = ?", (new,)).fetchone() is not None:
                raise GalleryError(f"gallery {self.path} already has a person named {new!r}")
            changed = conn.execute(
                "UPDATE people SET name = ?, updated = ? WHERE name = ?", (new, time.time(), old)
            ).rowcount
            if not changed:
                raise GalleryError(f"no person named {old!r} in gallery {self.path}")

    # ---------------------------------------------------------------- reading

    def list(self) -> list[Person]:
        """Everyone enrolled, sorted by name."""
        with self._read() as conn:
            rows = conn.execute(
                "SELECT p.name, COUNT(s.id), p.created, p.updated FROM people p "
                "LEFT JOIN samples s ON s.person_id = p.id GROUP BY p.id ORDER BY p.name"
            ).fetchall()
        return [Person(name, samples, created, updated) for name, samples, created, updated in rows]

    def _samples(self) -> tuple[list[str], np.ndarray]:
        """(name per sample, (N, 128) int8), grouped by person, in one read snapshot."""
        rows = self._conn.execute(
            "SELECT p.name, s.embedding FROM samples s JOIN people p ON p.id = s.person_id ORDER BY p.id, s.id"
        ).fetchall()
        blob = b"".join(embedding for _, embedding in rows)
        matrix = np.frombuffer(blob, dtype=np.int8).reshape(-1, EMBEDDING_SIZE)
        return [name for name, _ in rows], matrix

    def _current_index(self) -> _Index:
        # data_version changes when another connection (another process: an enrolment
        # while a camera loop runs) commits; our own writes reset the index in _write.
        version = self._conn.execute("PRAGMA data_version").fetchone()[0]
        if self._index is None or version != self._data_version:
            self._index = None  # let the old matrix go before the new one is built
            self._index = self._load_index()
            self._data_version = version
        return self._index

    def _load_index(self) -> _Index:
        """Every sample, in one read snapshot, streamed into preallocated arrays."""
        conn = self._conn
        conn.execute("BEGIN")  # one snapshot for the count and the rows
        try:
            count, low, high = conn.execute("SELECT COUNT(*), MIN(person_id), MAX(person_id) FROM samples").fetchone()
            small = np.iinfo(np.int32).min <= (low or 0) and (high or 0) <= np.iinfo(np.int32).max
            id_type = np.int32 if small else np.int64
            matrix = np.empty((count, EMBEDDING_SIZE), dtype=np.int8)
            person = np.empty(count, dtype=id_type)
            inv_norm = np.empty(count, dtype=np.float32)
            cursor = conn.execute("SELECT person_id, embedding FROM samples ORDER BY person_id, id")
            filled = 0
            while rows := cursor.fetchmany(_LOAD_ROWS):
                ids, blobs = zip(*rows)
                chunk = np.frombuffer(b"".join(blobs), dtype=np.int8).reshape(len(rows), EMBEDDING_SIZE)
                end = filled + len(rows)
                if end > count:  # cannot happen inside one snapshot; never write past the end
                    raise GalleryError(f"gallery {self.path}: samples changed while loading")
                matrix[filled:end] = chunk
                person[filled:end] = ids
                floats = chunk.astype(np.float32)
                squares = np.einsum("nd,nd->n", floats, floats)  # exact: integers below 2**24
                with np.errstate(divide="ignore"):
                    inverse = 1.0 / np.sqrt(squares.astype(np.float64))
                inverse[squares == 0] = 0.0
                inv_norm[filled:end] = inverse
                filled = end
        finally:
            conn.execute("COMMIT")
        if filled != count:
            raise GalleryError(f"gallery {self.path}: samples changed while loading")
        return _Index(matrix=matrix, inv_norm=inv_norm, person=person)

    def search(self, embeddings: np.ndarray, identity: ModelIdentity, k: int = 1) -> list[list[Match]]:
        """Up to ``k`` nearest people per query, nearest first (an empty list when the
        gallery is empty). Each query is one (128,) or a row of (N, 128)."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        self.check_identity(identity)
        queries = _as_unit_rows(embeddings, "match")
        attempts = 3
        for attempt in range(attempts):
            with self._read():
                index = self._current_index()
            if not len(index.matrix):
                return [[] for _ in queries]
            nearest = _nearest(index, queries, k)  # outside the lock: the index is immutable
            wanted = sorted({person for found in nearest for person, _ in found})
            names = self._names(wanted)
            if len(names) == len(wanted) or attempt == attempts - 1:
                break
            # Someone was removed since the index was loaded: load it again.
            with self._lock:
                if self._index is index:
                    self._index = None
        return [
            [self._match(names[person], similarity) for person, similarity in found if person in names]
            for found in nearest
        ]

    def _names(self, ids: list[int]) -> dict[int, str]:
        """people.id -> name for ``ids`` (ids of people removed meanwhile are absent)."""
        names: dict[int, str] = {}
        with self._read() as conn:
            for start in range(0, len(ids), _NAME_BATCH):
                batch = ids[start : start + _NAME_BATCH]
                marks = ",".join("?" * len(batch))
                names.update(conn.execute(f"SELECT id, name FROM people WHERE id IN ({marks})", batch).fetchall())
        return names

    def _match(self, name: str, similarity: float) -> Match:
        distance = float(np.clip(2.0 - 2.0 * similarity, 0.0, 4.0))
        return Match(name, distance, 1.0 - distance / 2.0, distance <= self._threshold)

    def match(
        self, embeddings: np.ndarray, identity: ModelIdentity, top_k: int = 1
    ) -> list[Match | None] | list[list[Match]]:
        """Open-set matching of query embeddings against the gallery.

        ``top_k == 1`` (what the pipeline uses): one ``Match | None`` per query, None only
        when the gallery is empty; a face nobody matches gets its nearest person with
        ``accepted=False``. ``top_k > 1``: one list of up to ``top_k`` Matches per query,
        nearest first (as :meth:`search`).

        Raises IncompatibleModelError when ``identity`` is not compatible with the model
        the gallery was built with.
        """
        results = self.search(embeddings, identity, top_k)
        if top_k == 1:
            return [found[0] if found else None for found in results]
        return results

    # ---------------------------------------------------------------- export / import

    def export(self, path: str | os.PathLike) -> int:
        """Write every sample to an ``.npz`` file (mode 0600) at exactly ``path``.

        Arrays: ``format`` (str), ``names`` (N,) str, one per sample; ``embeddings``
        (N, 128) int8 as stored; ``model_sha256`` and ``compatibility_group`` (str, ""
        for none); ``threshold`` (float64). No pickled objects. Returns N.
        """
        path = Path(path)
        with self._read():
            names, matrix = self._samples()
        arrays = {
            "format": np.array(EXPORT_FORMAT),
            "names": np.array(names, dtype=f"<U{MAX_NAME_LENGTH}"),
            "embeddings": matrix,
            "model_sha256": np.array(self._identity.sha256),
            "compatibility_group": np.array(self._identity.compatibility_group or ""),
            "threshold": np.array(self._threshold, dtype=np.float64),
        }
        # 0600, complete or absent (a full disk leaves no partial file), naming the file on failure.
        with private_file(path, GalleryError) as file:
            np.savez(file, **arrays)
        return len(names)

    def import_from(self, path: str | os.PathLike) -> int:
        """Add every sample of an :meth:`export` file, in one transaction.

        Refuses (IncompatibleModelError) a file from an incompatible model. Samples join
        existing people of the same name; samples already present (under any name: a
        sample is known by its content) are skipped, so importing the same file twice, or
        the export of people renamed since, changes nothing. The file's threshold is ignored
        (the gallery keeps its own). Returns the number of samples added.
        """
        return self._import(_read_export(Path(path)))

    @classmethod
    def restore(cls, path: str | os.PathLike, export: str | os.PathLike) -> Gallery:
        """Create a gallery at ``path`` from an :meth:`export` file, with the file's model
        identity and threshold."""
        path = Path(path)
        data = _read_export(Path(export))
        try:
            # Built complete before it appears: an interrupted restore leaves no gallery.
            cls._publish(path, data.identity, data.threshold, data)
        except FileExistsError:
            raise GalleryError(f"gallery already exists: {path}") from None
        return cls.open(path)

    def _import(self, data: _Export) -> int:
        # A sample is known by its content, not by its owner's name: the export of a person
        # renamed since holds samples the gallery already has under the new name.
        self.check_identity(data.identity)
        now = time.time()
        added = 0
        with self._write() as conn:
            present = {_sample_key(row[0]) for row in conn.execute("SELECT embedding FROM samples")}
            incoming: dict[str, list[bytes]] = {}  # name -> its new samples, in file order
            for name, row in zip(data.names, data.matrix):
                blob = row.tobytes()
                key = _sample_key(blob)
                if key not in present:
                    present.add(key)
                    incoming.setdefault(name, []).append(blob)
            # Only people who gain a sample are created or touched ("updated" means changed).
            for name, blobs in incoming.items():
                person = self._person_id(conn, name, now)
                conn.executemany(
                    "INSERT INTO samples(person_id, embedding, created) VALUES (?, ?, ?)",
                    [(person, blob, now) for blob in blobs],
                )
                added += len(blobs)
        return added

    # ---------------------------------------------------------------- closing

    def close(self) -> None:
        """Close the database (idempotent)."""
        with self._lock:
            self._conn.close()
            self._index = None

    def __enter__(self) -> Gallery:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _export_header(
    path: Path, archive: zipfile.ZipFile, key: str, file_size: int
) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of one array of an export, read from its .npy header alone, and
    checked against the format: rank, dtype, and a size the archive really holds."""
    ndim, kind, max_itemsize = _EXPORT_ARRAYS[key]
    try:
        info = archive.getinfo(f"{key}.npy")
    except KeyError:
        raise GalleryError(f"gallery export {path} lacks the {key!r} array") from None
    # np.savez stores arrays uncompressed; a compressed member could inflate past any check.
    if info.compress_type != zipfile.ZIP_STORED or info.file_size > file_size:
        raise GalleryError(f"gallery export {path}: array {key!r} is compressed or larger than the file")
    with archive.open(info) as member:
        version = np.lib.format.read_magic(member)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(member)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(member)
        else:
            raise GalleryError(f"gallery export {path}: array {key!r} has .npy version {version}")
    if len(shape) != ndim or dtype.hasobject or dtype.kind != kind or dtype.itemsize > max_itemsize:
        raise GalleryError(
            f"gallery export {path}: array {key!r} must be {ndim}-d of kind {kind!r} "
            f"(items up to {max_itemsize} bytes), got shape {shape} dtype {dtype}"
        )
    if math.prod(shape) * dtype.itemsize > info.file_size:
        raise GalleryError(f"gallery export {path}: array {key!r} declares {shape} but holds less")
    return shape, dtype


def _export_array(archive: zipfile.ZipFile, key: str) -> np.ndarray:
    with archive.open(f"{key}.npy") as member:
        return np.lib.format.read_array(member, allow_pickle=False)


def _sample_key(blob: bytes) -> bytes:
    """A stored int8 embedding's identity: 16 bytes of hash instead of its 128 (a set of
    a million keys stays small)."""
    return hashlib.blake2b(blob, digest_size=16).digest()


@dataclass
class _Export:
    names: list[str]  # one per sample
    matrix: np.ndarray  # (N, 128) int8
    identity: ModelIdentity
    threshold: float


def _read_export(path: Path) -> _Export:
    """Load and validate an export file.

    Only the arrays the format defines are read, and each array's header (shape and
    dtype) is checked before its data is loaded: an export carrying an extra 3 GB array,
    or declaring a 100 GB one, costs nothing but the check."""
    with open_regular(path, "gallery export", _MAX_GALLERY_BYTES, GalleryError) as file:
        file_size = os.fstat(file.fileno()).st_size
        try:
            with zipfile.ZipFile(file) as archive:
                headers = {key: _export_header(path, archive, key, file_size) for key in _EXPORT_ARRAYS}
                count = headers["names"][0][0]
                if headers["embeddings"][0] != (count, EMBEDDING_SIZE):
                    raise GalleryError(
                        f"gallery export {path}: embeddings must be ({count}, {EMBEDDING_SIZE}) int8 "
                        f"(one per name), got {headers['embeddings'][0]}"
                    )
                arrays = {key: _export_array(archive, key) for key in _EXPORT_ARRAYS}
        except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError, OSError) as exc:
            raise GalleryError(f"not a facenet-edge gallery export: {path} ({exc})") from None
    if str(arrays["format"]) != EXPORT_FORMAT:
        raise GalleryError(f"not a facenet-edge gallery export: {path} (format is not {EXPORT_FORMAT})")
    try:
        names = [validate_name(str(n)) for n in arrays["names"]]
        threshold = _check_threshold(arrays["threshold"])
    except GalleryError as exc:
        raise GalleryError(f"gallery export {path}: {exc}") from None
    matrix = arrays["embeddings"]
    identity = ModelIdentity(
        sha256=str(arrays["model_sha256"]), compatibility_group=str(arrays["compatibility_group"]) or None
    )
    if len(matrix) and not np.all(np.any(matrix != 0, axis=1)):
        raise GalleryError(f"gallery export {path}: contains an all-zero embedding")
    return _Export(names, np.ascontiguousarray(matrix), identity, threshold)
