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
    sample. The int8 matrix is cached in memory (128 bytes/face) and dequantized on the
    fly in blocks that stay in cache: at 100k faces that is as fast as keeping a float32
    copy (measured) with a quarter of the memory. The dot products use numpy's own
    single-threaded loops (``einsum``), not BLAS: OpenBLAS's thread pool made a 100k-face
    match 10-20x slower whenever other work shared the CPU (camera, detector, embedder
    threads on a Pi; measured at load 5 on 2 cores: 9 ms with einsum, 90-190 ms with
    ``matmul``), while unloaded the two are within a few milliseconds.
"""

from __future__ import annotations

import math
import os
import sqlite3
import tempfile
import threading
import time
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .card import ModelIdentity
from .errors import GalleryError, IncompatibleModelError

SCHEMA_VERSION = 1
EMBEDDING_SIZE = 128
MAX_NAME_LENGTH = 128
EXPORT_FORMAT = "facenet-edge-gallery/1"

_SQLITE_HEADER = b"SQLite format 3\x00"
# Rows dequantized per block while matching: 4096 x 128 float32 = 2 MiB, about an L2 cache.
_BLOCK_ROWS = 4096
_BUSY_TIMEOUT_S = 10.0

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


@dataclass
class _Index:
    """In-memory copy of every sample, rows grouped by person."""

    matrix: np.ndarray  # (N, 128) int8
    inv_norm: np.ndarray  # (N,) float32: 1 / |row|, the renormalisation after dequantizing
    person: np.ndarray  # (N,) int: index into names
    names: list[str]
    max_samples: int  # most samples any one person has


def quantize(embeddings: np.ndarray) -> np.ndarray:
    """Float embeddings -> int8 as stored: ``round(clip(e, -1, 1) * 127)``."""
    return np.round(np.clip(embeddings, -1.0, 1.0) * 127.0).astype(np.int8)


def validate_name(name: object) -> str:
    """Return ``name`` if it is usable as a person's name, else raise GalleryError."""
    if not isinstance(name, str):
        raise GalleryError(f"a name must be a string, got {type(name).__name__}")
    if not name.strip():
        raise GalleryError("a name must not be empty")
    if len(name) > MAX_NAME_LENGTH:
        raise GalleryError(f"name is {len(name)} characters long; the limit is {MAX_NAME_LENGTH}: {name[:32]!r}...")
    if name != name.strip():
        raise GalleryError(f"a name must not start or end with whitespace: {name!r}")
    # Control and line/paragraph separators would break one-line output and listings.
    bad = [ch for ch in name if unicodedata.category(ch) in ("Cc", "Zl", "Zp")]
    if bad:
        raise GalleryError(f"a name must not contain control characters: {name!r}")
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

    # ---------------------------------------------------------------- opening

    @classmethod
    def create(cls, path: str | os.PathLike, identity: ModelIdentity, threshold: float) -> Gallery:
        """Create a new gallery file for embeddings from ``identity``'s model.

        ``threshold`` is the open-set distance threshold, normally the model card's
        ``thresholds.default()``. Raises GalleryError if ``path`` already exists.
        """
        path = Path(path)
        threshold = _check_threshold(threshold)
        try:
            # The file exists with mode 0600 before SQLite opens it; SQLite gives the
            # -wal and -shm files the database file's mode.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise GalleryError(f"gallery already exists: {path}") from None
        except OSError as exc:
            raise GalleryError(f"cannot create gallery {path}: {exc.strerror}") from None
        os.close(fd)
        conn = None
        try:
            conn = cls._connect(path)
            conn.execute("PRAGMA journal_mode=WAL")
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
            cls._configure(conn)
        except BaseException:
            if conn is not None:
                conn.close()
            for file in _sidecars(path):
                file.unlink(missing_ok=True)
            raise
        return cls(path, conn, identity, threshold)

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
        ``identity`` and ``threshold`` (both then required).

        Raises GalleryError naming the path when the file is missing (and ``create`` is
        false) or is not a facenet-edge gallery; such a file is left untouched.
        """
        path = Path(path)
        if not path.exists():
            if not create:
                raise GalleryError(f"gallery not found: {path}")
            if identity is None or threshold is None:
                raise GalleryError(f"creating gallery {path} needs a model identity and a threshold")
            return cls.create(path, identity, threshold)
        cls._check_header(path)
        conn = cls._connect(path)
        try:
            # Read meta before any PRAGMA that writes (journal_mode rewrites the header):
            # a file that is not ours must come out of this byte-for-byte unchanged.
            try:
                meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            except sqlite3.DatabaseError as exc:
                raise GalleryError(f"not a facenet-edge gallery: {path} ({exc})") from None
            stored_identity, stored_threshold = cls._read_meta(path, meta)
            conn.execute("PRAGMA journal_mode=WAL")
            cls._configure(conn)
        except BaseException:
            conn.close()
            raise
        chosen = stored_threshold if threshold is None else _check_threshold(threshold)
        return cls(path, conn, stored_identity, chosen)

    @staticmethod
    def _check_header(path: Path) -> None:
        try:
            with open(path, "rb") as file:
                header = file.read(len(_SQLITE_HEADER))
        except IsADirectoryError:
            raise GalleryError(f"gallery path is a directory: {path}") from None
        except OSError as exc:
            raise GalleryError(f"cannot read gallery {path}: {exc.strerror}") from None
        if not header:
            raise GalleryError(f"not a facenet-edge gallery: {path} is empty")
        if header != _SQLITE_HEADER:
            raise GalleryError(f"not a facenet-edge gallery: {path} is not an SQLite database")

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
        except (KeyError, ValueError):
            raise GalleryError(f"not a facenet-edge gallery: {path} has incomplete metadata") from None
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

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """The connection, under the lock, with SQLite errors reported as GalleryError."""
        with self._lock:
            try:
                yield self._conn
            except sqlite3.Error as exc:
                raise GalleryError(f"gallery {self.path}: {exc}") from None

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: commit on success, roll back on any exception."""
        with self._read() as conn:
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
            sample_names, matrix = self._samples()
            names = list(dict.fromkeys(sample_names))  # rows come grouped by person
            number = {name: i for i, name in enumerate(names)}
            person = np.array([number[name] for name in sample_names], dtype=np.intp)
            norms = np.linalg.norm(matrix.astype(np.float32), axis=1)
            self._index = _Index(
                matrix=matrix,
                inv_norm=(1.0 / norms).astype(np.float32),
                person=person,
                names=names,
                max_samples=int(np.bincount(person).max()) if len(person) else 0,
            )
            self._data_version = version
        return self._index

    def search(self, embeddings: np.ndarray, identity: ModelIdentity, k: int = 1) -> list[list[Match]]:
        """Up to ``k`` nearest people per query, nearest first (an empty list when the
        gallery is empty). Each query is one (128,) or a row of (N, 128)."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        self.check_identity(identity)
        queries = _as_unit_rows(embeddings, "match")
        with self._read():
            index = self._current_index()
        if not index.names:
            return [[] for _ in queries]
        similarity = self._similarities(queries, index)
        return [self._top_people(row, index, k) for row in similarity]

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

    @staticmethod
    def _similarities(queries: np.ndarray, index: _Index) -> np.ndarray:
        """Cosine similarity (Q, N) of unit queries with the renormalised int8 rows."""
        out = np.empty((len(queries), len(index.matrix)), dtype=np.float32)
        for start in range(0, len(index.matrix), _BLOCK_ROWS):
            block = index.matrix[start : start + _BLOCK_ROWS].astype(np.float32)
            np.einsum("qd,nd->qn", queries, block, out=out[:, start : start + _BLOCK_ROWS])
        out *= index.inv_norm  # the /127 cancels in the renormalisation
        return out

    def _top_people(self, similarity: np.ndarray, index: _Index, k: int) -> list[Match]:
        """Best ``k`` distinct people for one query row of similarities."""
        # The k best people are among the k * max_samples best samples, so only those
        # need sorting; a person's first appearance in that order is their best sample.
        candidates = min(len(similarity), k * index.max_samples)
        if candidates < len(similarity):
            top = np.argpartition(-similarity, candidates - 1)[:candidates]
        else:
            top = np.arange(len(similarity))
        top = top[np.argsort(-similarity[top], kind="stable")]
        matches: list[Match] = []
        seen: set[int] = set()
        for row in top:
            person = int(index.person[row])
            if person in seen:
                continue
            seen.add(person)
            distance = float(np.clip(2.0 - 2.0 * float(similarity[row]), 0.0, 4.0))
            matches.append(Match(index.names[person], distance, 1.0 - distance / 2.0, distance <= self._threshold))
            if len(matches) == k:
                break
        return matches

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
        # mkstemp creates the file 0600; the rename makes the export all-or-nothing.
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        except OSError as exc:
            raise GalleryError(f"cannot write export {path}: {exc.strerror}") from None
        try:
            with os.fdopen(fd, "wb") as file:
                np.savez(file, **arrays)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return len(names)

    def import_from(self, path: str | os.PathLike) -> int:
        """Add every sample of an :meth:`export` file, in one transaction.

        Refuses (IncompatibleModelError) a file from an incompatible model. Samples join
        existing people of the same name; samples already present are skipped, so
        importing the same file twice changes nothing. The file's threshold is ignored
        (the gallery keeps its own). Returns the number of samples added.
        """
        return self._import(_read_export(Path(path)))

    @classmethod
    def restore(cls, path: str | os.PathLike, export: str | os.PathLike) -> Gallery:
        """Create a gallery at ``path`` from an :meth:`export` file, with the file's model
        identity and threshold."""
        data = _read_export(Path(export))
        gallery = cls.create(path, data.identity, data.threshold)
        try:
            gallery._import(data)
        except BaseException:
            gallery.close()
            for file in _sidecars(gallery.path):
                file.unlink(missing_ok=True)
            raise
        return gallery

    def _import(self, data: _Export) -> int:
        self.check_identity(data.identity)
        incoming: dict[str, dict[bytes, None]] = {}  # name -> its samples, ordered, de-duplicated
        for name, row in zip(data.names, data.matrix):
            incoming.setdefault(name, {})[row.tobytes()] = None
        now = time.time()
        added = 0
        with self._write() as conn:
            for name, blobs in incoming.items():
                person = self._person_id(conn, name, now)
                present = {
                    row[0] for row in conn.execute("SELECT embedding FROM samples WHERE person_id = ?", (person,))
                }
                new = [blob for blob in blobs if blob not in present]
                conn.executemany(
                    "INSERT INTO samples(person_id, embedding, created) VALUES (?, ?, ?)",
                    [(person, blob, now) for blob in new],
                )
                added += len(new)
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


@dataclass
class _Export:
    names: list[str]  # one per sample
    matrix: np.ndarray  # (N, 128) int8
    identity: ModelIdentity
    threshold: float


def _read_export(path: Path) -> _Export:
    """Load and validate an export file."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except FileNotFoundError:
        raise GalleryError(f"export file not found: {path}") from None
    except (OSError, ValueError, EOFError) as exc:
        raise GalleryError(f"not a facenet-edge gallery export: {path} ({exc})") from None
    if str(arrays.get("format", "")) != EXPORT_FORMAT:
        raise GalleryError(f"not a facenet-edge gallery export: {path} (format is not {EXPORT_FORMAT})")
    try:
        names = [validate_name(str(n)) for n in arrays["names"]]
        matrix = arrays["embeddings"]
        identity = ModelIdentity(
            sha256=str(arrays["model_sha256"]), compatibility_group=str(arrays["compatibility_group"]) or None
        )
        threshold = _check_threshold(arrays["threshold"])
    except KeyError as exc:
        raise GalleryError(f"gallery export {path} lacks the {exc.args[0]!r} array") from None
    except (GalleryError, TypeError, ValueError) as exc:
        raise GalleryError(f"gallery export {path}: {exc}") from None
    if matrix.dtype != np.int8 or matrix.shape != (len(names), EMBEDDING_SIZE):
        raise GalleryError(
            f"gallery export {path}: embeddings must be ({len(names)}, {EMBEDDING_SIZE}) int8, "
            f"got {matrix.shape} {matrix.dtype}"
        )
    if len(matrix) and not np.all(np.any(matrix != 0, axis=1)):
        raise GalleryError(f"gallery export {path}: contains an all-zero embedding")
    return _Export(names, np.ascontiguousarray(matrix), identity, threshold)
