"""Gallery storage: enrolled people and their face embeddings, in one SQLite file.

Tables
    * ``meta``: schema version, the identity of the model that made the embeddings
      (sha256 + compatibility group), the embedding size D (the model card's) and the
      open-set threshold.
    * ``people``: one row per name.
    * ``samples``: several per person; each embedding is a D-byte int8 BLOB,
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

Searching the stored samples is :mod:`facenet_edge.search`'s; :class:`facenet_edge.gallery.Gallery`
joins the two.
"""

from __future__ import annotations

import errno
import hashlib
import math
import os
import re
import sqlite3
import stat
import tempfile
import threading
import time
import unicodedata
import zipfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from .card import ModelIdentity
from .errors import GalleryError, IncompatibleModelError
from .files import open_regular, private_file

SCHEMA_VERSION = 1
# Embedding sizes a gallery accepts (a model's card says which; FaceNet's is 128).
MAX_EMBEDDING_SIZE = 4096
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
# Rows fetched from SQLite per step while streaming the samples (index loading), and
# rows quantized and inserted per step of a bulk add.
_LOAD_ROWS = 4096
# Ids or names per "WHERE ... IN (...)" (old SQLite builds allow at most 999 parameters).
_NAME_BATCH = 500
_BUSY_TIMEOUT_S = 10.0
# open_regular needs a limit; a gallery has no useful one (8 GB is 60M faces).
_MAX_GALLERY_BYTES = 1 << 62
# SQLite's result code for "database or disk is full".
_SQLITE_FULL = 13
# Filesystems without hard links (FAT on a USB stick) answer os.link with one of these.
_NO_LINKS = frozenset({errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS})

# {size}: the embedding size, fixed when the gallery is created.
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
    embedding BLOB NOT NULL CHECK (length(embedding) = {size}),
    created   REAL NOT NULL
);
CREATE INDEX samples_person ON samples(person_id);
"""
# A store or its subclass (Gallery): what create/open/restore return.
_Store = TypeVar("_Store", bound="GalleryStore")
# The row size the samples table enforces, read back from its schema.
_ROW_CHECK = re.compile(r"length\(embedding\)\s*=\s*(\d+)")
# What identifies a gallery: these tables with (at least) these columns.
_COLUMNS = {
    "meta": {"key", "value"},
    "people": {"id", "name", "created", "updated"},
    "samples": {"id", "person_id", "embedding", "created"},
}


@dataclass
class Person:
    """An enrolled name. ``created``/``updated`` are Unix timestamps."""

    name: str
    samples: int
    created: float
    updated: float


@dataclass
class Samples:
    """Every stored sample, read in one snapshot: ``count`` rows, person ids from
    ``ids[0]`` to ``ids[1]``, and ``chunks`` of (person ids, (n, D) int8 rows), grouped by
    person (ascending id)."""

    count: int
    ids: tuple[int, int]
    chunks: Iterator[tuple[np.ndarray, np.ndarray]]


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


def unit_rows(embeddings: np.ndarray, size: int, what: str) -> np.ndarray:
    """(N, size) float32 unit rows from one embedding or a stack of them."""
    array = np.asarray(embeddings, dtype=np.float32)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2 or array.shape[1] != size:
        raise ValueError(f"{what}: expected (N, {size}) embeddings, got shape {np.shape(embeddings)}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{what}: embeddings contain NaN or infinity")
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise ValueError(f"{what}: an embedding is all zeros")
    return array / norms


def check_threshold(threshold: float) -> float:
    value = float(threshold)
    if not (math.isfinite(value) and 0.0 < value < 4.0):
        raise GalleryError(f"threshold must be a squared-L2 distance between 0 and 4, got {threshold!r}")
    return value


def _check_size(size: object) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 0 < size <= MAX_EMBEDDING_SIZE:
        raise GalleryError(f"embedding size must be an integer from 1 to {MAX_EMBEDDING_SIZE}, got {size!r}")
    return int(size)


def _describe(identity: ModelIdentity) -> str:
    group = identity.compatibility_group or "none"
    return f"model sha256 {identity.sha256[:12]} (compatibility group {group})"


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


class GalleryStore:
    """The SQLite file of a gallery: opening and creating it, people and samples,
    transactions, export and import. :class:`facenet_edge.gallery.Gallery` adds matching.

    Methods take an internal lock, so one instance may be shared by a camera thread and
    the main thread (calls run one at a time). Database failures (disk full, a corrupt
    page, a lock held too long by another process) raise GalleryError naming the file.
    """

    def __init__(
        self, path: Path, conn: sqlite3.Connection, identity: ModelIdentity, threshold: float, embedding_size: int
    ):
        self.path = path
        self._conn = conn
        self._identity = identity
        self._threshold = threshold
        self._embedding_size = embedding_size
        self._lock = threading.RLock()
        self._writes = 0  # this instance's write transactions (see _version)
        self._checked = False  # integrity checked (before the first write)

    # ---------------------------------------------------------------- opening

    @classmethod
    def create(
        cls: type[_Store], path: str | os.PathLike, identity: ModelIdentity, threshold: float, embedding_size: int = 128
    ) -> _Store:
        """Create a new gallery file for embeddings from ``identity``'s model.

        ``threshold`` is the open-set distance threshold, normally the model card's
        ``thresholds.default()``; ``embedding_size`` the card's ``embedding_size``. Raises
        GalleryError if ``path`` already exists. The file appears complete or not at all
        (see :meth:`_publish`).
        """
        path = Path(path)
        threshold = check_threshold(threshold)
        embedding_size = _check_size(embedding_size)
        try:
            cls._publish(path, identity, threshold, embedding_size)
        except FileExistsError:
            raise GalleryError(f"gallery already exists: {path}") from None
        return cls.open(path)

    @classmethod
    def _publish(
        cls, path: Path, identity: ModelIdentity, threshold: float, embedding_size: int, export: _Export | None = None
    ) -> None:
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
                staging = GalleryStore(path, conn, identity, threshold, embedding_size)
                meta = {
                    "schema": str(SCHEMA_VERSION),
                    "model_sha256": identity.sha256,
                    "compatibility_group": identity.compatibility_group,
                    "embedding_size": str(embedding_size),
                    "threshold": repr(threshold),
                    "created": repr(time.time()),
                }
                conn.execute("BEGIN IMMEDIATE")
                for statement in _SCHEMA.format(size=embedding_size).split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.executemany("INSERT INTO meta(key, value) VALUES (?, ?)", meta.items())
                conn.execute("COMMIT")
                if export is not None:
                    staging._import(export)
                # Published in WAL mode (kept in the file's header), so openers racing on a new
                # gallery never switch it: SQLite fails that switch at once ("database is
                # locked") instead of waiting out the busy timeout.
                conn.execute("PRAGMA journal_mode=WAL")
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
        cls: type[_Store],
        path: str | os.PathLike,
        create: bool = False,
        threshold: float | None = None,
        identity: ModelIdentity | None = None,
        embedding_size: int = 128,
    ) -> _Store:
        """Open an existing gallery.

        ``threshold``: when given, overrides the stored threshold for this instance only
        (the file is not changed). ``create=True``: a missing file is created with
        ``identity``, ``threshold`` (both then required) and ``embedding_size``; if
        another process creates it at the same moment, theirs is opened.

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
                cls._publish(path, identity, check_threshold(threshold), _check_size(embedding_size))
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
                (table,) = conn.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'samples'")
            except sqlite3.DatabaseError as exc:
                raise GalleryError(f"not a facenet-edge gallery: {path} ({exc})") from None
            stored_identity, stored_threshold, size = cls._read_meta(path, meta, table[0])
            conn.execute("PRAGMA journal_mode=WAL")
            cls._configure(conn)
        except sqlite3.Error as exc:
            conn.close()
            raise GalleryError(f"cannot open gallery {path}: {_sqlite_reason(exc)}") from None
        except BaseException:
            conn.close()
            raise
        _make_private(path)
        chosen = stored_threshold if threshold is None else check_threshold(threshold)
        return cls(path, conn, stored_identity, chosen, size)

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
    def _read_meta(path: Path, meta: dict[str, str | None], samples_sql: str) -> tuple[ModelIdentity, float, int]:
        """(model identity, threshold, embedding size) as stored, checked."""
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
        row_check = _ROW_CHECK.search(samples_sql or "")
        if not 0 < size <= MAX_EMBEDDING_SIZE or (row_check and int(row_check.group(1)) != size):
            rows = f"{row_check.group(1)}-byte rows" if row_check else "rows of any size"
            raise GalleryError(
                f"gallery {path} says its embeddings are {size}-d but its samples table holds {rows} "
                "(edited by hand?)"
            )
        if not sha256:
            raise GalleryError(f"not a facenet-edge gallery: {path} names no model")
        identity = ModelIdentity(sha256=sha256, compatibility_group=meta.get("compatibility_group") or None)
        return identity, threshold, size

    # ---------------------------------------------------------------- properties

    @property
    def identity(self) -> ModelIdentity:
        """The model whose embeddings this gallery holds."""
        return self._identity

    @property
    def threshold(self) -> float:
        """Open-set threshold (squared L2) used by matching."""
        return self._threshold

    @property
    def embedding_size(self) -> int:
        """D: the size of every stored embedding (the model card's ``embedding_size``)."""
        return self._embedding_size

    def __len__(self) -> int:
        with self._read() as conn:
            return conn.execute("SELECT COUNT(*) FROM people").fetchone()[0]

    def __contains__(self, name: object) -> bool:
        with self._read() as conn:
            return conn.execute("SELECT 1 FROM people WHERE name = ?", (name,)).fetchone() is not None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, {_describe(self._identity)}, threshold={self._threshold:g})"

    def check_identity(self, identity: ModelIdentity) -> None:
        """Raise IncompatibleModelError unless ``identity``'s embeddings compare with ours."""
        if not self._identity.compatible_with(identity):
            raise IncompatibleModelError(
                f"gallery {self.path} was built with {_describe(self._identity)}; "
                f"embeddings from {_describe(identity)} cannot be compared with it"
            )

    # ---------------------------------------------------------------- transactions

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
                self._writes += 1

    def _version(self) -> tuple[int, int]:
        """Changes whenever the stored samples may have: SQLite's data_version counts
        other connections' commits (an enrolment in another process while a camera loop
        runs), ``_writes`` this instance's own. Call under the lock."""
        return self._conn.execute("PRAGMA data_version").fetchone()[0], self._writes

    # ---------------------------------------------------------------- writing

    def _person_id(self, conn: sqlite3.Connection, name: str, now: float) -> int:
        row = conn.execute("SELECT id FROM people WHERE name = ?", (name,)).fetchone()
        if row is not None:
            conn.execute("UPDATE people SET updated = ? WHERE id = ?", (now, row[0]))
            return row[0]
        return conn.execute("INSERT INTO people(name, created, updated) VALUES (?, ?, ?)", (name, now, now)).lastrowid

    def add(self, name: str, embeddings: np.ndarray, identity: ModelIdentity) -> int:
        """Add one (D,) or several (N, D) samples for ``name`` (created if new), in
        one transaction. Returns the number of samples added."""
        name = validate_name(name)
        self.check_identity(identity)
        rows = quantize(unit_rows(embeddings, self._embedding_size, f"add {name!r}"))
        now = time.time()
        with self._write() as conn:
            person = self._person_id(conn, name, now)
            conn.executemany(
                "INSERT INTO samples(person_id, embedding, created) VALUES (?, ?, ?)",
                [(person, row.tobytes(), now) for row in rows],
            )
        return len(rows)

    def add_many(self, samples: Iterable[tuple[str, np.ndarray]], identity: ModelIdentity) -> int:
        """Add ``(name, embedding)`` pairs, each embedding one (D,) or several (N, D), in
        ONE transaction: for loading many people at once (:meth:`add` costs an fsynced
        transaction a person: right for a door, far too slow for a million). People are
        created or joined as by :meth:`add`. A refused pair adds nothing at all. Streams
        ``samples`` (a generator of a million pairs is fine). Returns the samples added."""
        self.check_identity(identity)
        now = time.time()
        added = 0
        with self._write() as conn:
            for names, rows in self._batches(samples):
                wanted = list(dict.fromkeys(names))
                conn.executemany(
                    "INSERT INTO people(name, created, updated) VALUES (?, ?, ?) "
                    "ON CONFLICT(name) DO UPDATE SET updated = excluded.updated",
                    [(name, now, now) for name in wanted],
                )
                ids: dict[str, int] = {}
                for start in range(0, len(wanted), _NAME_BATCH):
                    batch = wanted[start : start + _NAME_BATCH]
                    marks = ",".join("?" * len(batch))
                    ids.update(conn.execute(f"SELECT name, id FROM people WHERE name IN ({marks})", batch))
                conn.executemany(
                    "INSERT INTO samples(person_id, embedding, created) VALUES (?, ?, ?)",
                    [(ids[name], row.tobytes(), now) for name, row in zip(names, rows)],
                )
                added += len(rows)
        return added

    def _batches(self, samples: Iterable[tuple[str, np.ndarray]]) -> Iterator[tuple[list[str], np.ndarray]]:
        """(name per row, (n, D) int8 rows as stored) for about _LOAD_ROWS rows at a time:
        checked and quantized a batch at once, so a million pairs cost seconds."""
        names: list[str] = []
        arrays: list[np.ndarray] = []
        size = self._embedding_size
        for name, embedding in samples:
            name = validate_name(name)
            array = np.asarray(embedding, dtype=np.float32)
            array = array[None, :] if array.ndim == 1 else array
            if array.ndim != 2 or array.shape[1] != size:
                raise ValueError(f"add_many {name!r}: expected (N, {size}) embeddings, got shape {np.shape(embedding)}")
            names += [name] * len(array)
            arrays.append(array)
            if len(names) >= _LOAD_ROWS:
                yield names, quantize(unit_rows(np.concatenate(arrays), size, "add_many"))
                names, arrays = [], []
        if names:
            yield names, quantize(unit_rows(np.concatenate(arrays), size, "add_many"))

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

    def samples_of(self, name: str) -> np.ndarray:
        """``name``'s samples as stored, (N, D) int8, oldest first (GalleryError when
        ``name`` is not enrolled): what enrolment checks for consistency."""
        with self._read() as conn:
            rows = conn.execute(
                "SELECT s.embedding FROM samples s JOIN people p ON p.id = s.person_id WHERE p.name = ? ORDER BY s.id",
                (name,),
            ).fetchall()
        if not rows:
            raise GalleryError(f"no person named {name!r} in gallery {self.path}")
        return np.frombuffer(b"".join(r[0] for r in rows), dtype=np.int8).reshape(len(rows), self._embedding_size)

    @contextmanager
    def _snapshot(self) -> Iterator[Samples]:
        """Every sample in one read snapshot, streamed _LOAD_ROWS rows at a time. Call
        under the lock (``with self._read()``)."""
        conn = self._conn
        conn.execute("BEGIN")  # one snapshot for the count and the rows
        try:
            count, low, high = conn.execute("SELECT COUNT(*), MIN(person_id), MAX(person_id) FROM samples").fetchone()
            cursor = conn.execute("SELECT person_id, embedding FROM samples ORDER BY person_id, id")

            def chunks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
                while rows := cursor.fetchmany(_LOAD_ROWS):
                    ids, blobs = zip(*rows)
                    matrix = np.frombuffer(b"".join(blobs), dtype=np.int8).reshape(len(rows), self._embedding_size)
                    yield np.asarray(ids), matrix

            yield Samples(count=count, ids=(low or 0, high or 0), chunks=chunks())
        finally:
            conn.execute("COMMIT")

    def _names(self, ids: list[int]) -> dict[int, str]:
        """people.id -> name for ``ids`` (ids of people removed meanwhile are absent)."""
        names: dict[int, str] = {}
        with self._read() as conn:
            for start in range(0, len(ids), _NAME_BATCH):
                batch = ids[start : start + _NAME_BATCH]
                marks = ",".join("?" * len(batch))
                names.update(conn.execute(f"SELECT id, name FROM people WHERE id IN ({marks})", batch).fetchall())
        return names

    # ---------------------------------------------------------------- export / import

    def export(self, path: str | os.PathLike) -> int:
        """Write every sample to an ``.npz`` file (mode 0600) at exactly ``path``.

        Arrays: ``format`` (str), ``names`` (N,) str, one per sample; ``embeddings``
        (N, D) int8 as stored; ``model_sha256`` and ``compatibility_group`` (str, ""
        for none); ``threshold`` (float64). No pickled objects. Returns N.
        """
        path = Path(path)
        with self._read() as conn:
            rows = conn.execute(
                "SELECT p.name, s.embedding FROM samples s JOIN people p ON p.id = s.person_id ORDER BY p.id, s.id"
            ).fetchall()
        names = [name for name, _ in rows]
        matrix = np.frombuffer(b"".join(blob for _, blob in rows), dtype=np.int8).reshape(-1, self._embedding_size)
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
        data = _read_export(Path(path))
        self.check_identity(data.identity)
        if data.matrix.shape[1] != self._embedding_size:
            raise GalleryError(
                f"gallery export {path} holds {data.matrix.shape[1]}-d embeddings; "
                f"gallery {self.path} holds {self._embedding_size}-d ones"
            )
        return self._import(data)

    @classmethod
    def restore(cls: type[_Store], path: str | os.PathLike, export: str | os.PathLike) -> _Store:
        """Create a gallery at ``path`` from an :meth:`export` file, with the file's model
        identity, threshold and embedding size."""
        path = Path(path)
        data = _read_export(Path(export))
        try:
            # Built complete before it appears: an interrupted restore leaves no gallery.
            cls._publish(path, data.identity, data.threshold, data.matrix.shape[1], data)
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

    def __enter__(self: _Store) -> _Store:
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
    matrix: np.ndarray  # (N, D) int8
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
                shape = headers["embeddings"][0]
                if shape[0] != count or not 0 < shape[1] <= MAX_EMBEDDING_SIZE:
                    raise GalleryError(
                        f"gallery export {path}: embeddings must be ({count}, D) int8 (one per name, "
                        f"D from 1 to {MAX_EMBEDDING_SIZE}), got {shape}"
                    )
                arrays = {key: _export_array(archive, key) for key in _EXPORT_ARRAYS}
        except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError, OSError) as exc:
            raise GalleryError(f"not a facenet-edge gallery export: {path} ({exc})") from None
    if str(arrays["format"]) != EXPORT_FORMAT:
        raise GalleryError(f"not a facenet-edge gallery export: {path} (format is not {EXPORT_FORMAT})")
    try:
        names = [validate_name(str(n)) for n in arrays["names"]]
        threshold = check_threshold(arrays["threshold"])
    except GalleryError as exc:
        raise GalleryError(f"gallery export {path}: {exc}") from None
    matrix = arrays["embeddings"]
    identity = ModelIdentity(
        sha256=str(arrays["model_sha256"]), compatibility_group=str(arrays["compatibility_group"]) or None
    )
    if len(matrix) and not np.all(np.any(matrix != 0, axis=1)):
        raise GalleryError(f"gallery export {path}: contains an all-zero embedding")
    return _Export(names, np.ascontiguousarray(matrix), identity, threshold)
