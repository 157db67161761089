"""Gallery: storage, matching, identity checks, maintenance, file safety. No model needed."""

from __future__ import annotations

import os
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import tracemalloc

import numpy as np
import pytest
from facenet_edge import gallery_store, search
from facenet_edge.card import ModelIdentity
from facenet_edge.errors import GalleryError, IncompatibleModelError
from facenet_edge.gallery import Gallery, Match, Person, quantize

IDENTITY = ModelIdentity(sha256="a" * 64, compatibility_group="facenet-v1")
SUCCESSOR = ModelIdentity(sha256="b" * 64, compatibility_group="facenet-v1")
STRANGER = ModelIdentity(sha256="c" * 64, compatibility_group="other")
THRESHOLD = 1.0


def unit(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float32)
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


def random_unit(rng: np.random.Generator, n: int) -> np.ndarray:
    return unit(rng.standard_normal((n, 128)))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def path(tmp_path):
    return tmp_path / "faces.db"


@pytest.fixture
def gallery(path):
    with Gallery.create(path, IDENTITY, THRESHOLD) as g:
        yield g


def snapshot(path) -> tuple[list[tuple], list[tuple]]:
    """Every person and sample row, read with plain sqlite3 (read-only)."""
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        people = conn.execute("SELECT id, name, created, updated FROM people ORDER BY id").fetchall()
        samples = conn.execute("SELECT id, person_id, embedding FROM samples ORDER BY id").fetchall()
    finally:
        conn.close()
    return people, samples


def test_round_trip(path, rng):
    faces = random_unit(rng, 3)
    with Gallery.create(path, IDENTITY, THRESHOLD) as g:
        assert g.add("Ada Lovelace", faces[:2], IDENTITY) == 2
        assert g.add("Zoë 李", faces[2], IDENTITY) == 1
    with Gallery.open(path) as g:
        assert g.identity == IDENTITY
        assert g.threshold == THRESHOLD
        assert len(g) == 2 and "Ada Lovelace" in g and "nobody" not in g
        people = g.list()
        assert [(p.name, p.samples) for p in people] == [("Ada Lovelace", 2), ("Zoë 李", 1)]
        assert all(isinstance(p, Person) and p.created <= p.updated for p in people)
        matches = g.match(faces, IDENTITY)
    assert [m.name for m in matches] == ["Ada Lovelace", "Ada Lovelace", "Zoë 李"]
    for m in matches:
        assert isinstance(m, Match) and m.accepted
        assert m.distance < 2e-3  # int8 quantization error only
        assert m.similarity == pytest.approx(1 - m.distance / 2)


def test_int8_storage_is_128_bytes_per_face(gallery, path, rng):
    faces = random_unit(rng, 5)
    gallery.add("a", faces, IDENTITY)
    _, samples = snapshot(path)
    assert len(samples) == 5
    for (_, _, blob), face in zip(samples, faces):
        assert isinstance(blob, bytes) and len(blob) == 128
        assert np.array_equal(np.frombuffer(blob, dtype=np.int8), np.round(np.clip(face, -1, 1) * 127).astype(np.int8))


def test_top_k_ordering_matches_brute_force(gallery, rng, first_pass):
    stored: dict[str, np.ndarray] = {}
    for i in range(40):
        faces = random_unit(rng, int(rng.integers(1, 5)))
        gallery.add(f"person {i:02d}", faces, IDENTITY)
        stored[f"person {i:02d}"] = faces
    # Queries near some stored faces, plus pure noise.
    queries = np.concatenate([unit(stored["person 07"][:1] + 0.3 * rng.standard_normal((1, 128))), random_unit(rng, 4)])
    results = gallery.match_top_k(queries, IDENTITY, 5)
    assert len(results) == len(queries)
    for query, found in zip(queries, results):
        expected = []
        for name, faces in stored.items():
            dequantized = unit(quantize(faces).astype(np.float32) / 127)
            expected.append((float(np.min(np.sum((dequantized - query) ** 2, axis=1))), name))
        expected.sort()
        assert [m.name for m in found] == [name for _, name in expected[:5]]
        np.testing.assert_allclose([m.distance for m in found], [d for d, _ in expected[:5]], atol=1e-5)
        assert all(a.distance <= b.distance for a, b in zip(found, found[1:]))
    assert results[0][0].name == "person 07"
    # match gives one Match per query, the head of the top-k list.
    assert [m.name for m in gallery.match(queries, IDENTITY)] == [found[0].name for found in results]


def test_add_many_is_one_transaction_like_add(gallery, path, rng):
    faces = random_unit(rng, 5)
    gallery.add("alice", faces[0], IDENTITY)
    pairs = [("bob", faces[1]), ("alice", faces[2:4]), ("carol", faces[4])]
    assert gallery.add_many(iter(pairs), IDENTITY) == 4
    assert [(p.name, p.samples) for p in gallery.list()] == [("alice", 3), ("bob", 1), ("carol", 1)]
    assert [m.name for m in gallery.match(faces, IDENTITY)] == ["alice", "bob", "alice", "alice", "carol"]
    before = snapshot(path)
    with pytest.raises(ValueError, match=r"add_many 'dave': expected \(N, 128\)"):
        gallery.add_many([("eve", faces[0]), ("dave", np.ones(64, np.float32))], IDENTITY)
    with pytest.raises(GalleryError, match="must not be empty"):
        gallery.add_many([("eve", faces[0]), (" ", faces[1])], IDENTITY)
    with pytest.raises(IncompatibleModelError):
        gallery.add_many([("eve", faces[0])], STRANGER)
    assert snapshot(path) == before  # a refused pair adds nothing


def test_embedding_size_is_the_gallerys(tmp_path, rng):
    faces = unit(rng.standard_normal((3, 64)))
    with Gallery.create(tmp_path / "small.db", IDENTITY, THRESHOLD, embedding_size=64) as small:
        small.add("alice", faces[:2], IDENTITY)
        small.add("bob", faces[2], IDENTITY)
        assert [m.name for m in small.match(faces, IDENTITY)] == ["alice", "alice", "bob"]
        with pytest.raises(ValueError, match=r"expected \(N, 64\)"):
            small.match(random_unit(rng, 1), IDENTITY)
        small.export(tmp_path / "small.npz")
    with Gallery.restore(tmp_path / "copy.db", tmp_path / "small.npz") as copy:
        assert copy.embedding_size == 64
        assert [m.name for m in copy.match(faces, IDENTITY)] == ["alice", "alice", "bob"]
    with Gallery.create(tmp_path / "big.db", IDENTITY, THRESHOLD) as big:
        assert big.embedding_size == 128
        with pytest.raises(GalleryError, match="holds 64-d embeddings; gallery .* holds 128-d ones"):
            big.import_from(tmp_path / "small.npz")
    with pytest.raises(GalleryError, match="embedding size must be an integer from 1 to 4096"):
        Gallery.create(tmp_path / "zero.db", IDENTITY, THRESHOLD, embedding_size=0)


def test_empty_gallery_matches_nothing(gallery, rng):
    queries = random_unit(rng, 2)
    assert gallery.match(queries, IDENTITY) == [None, None]
    assert gallery.match_top_k(queries, IDENTITY, 3) == [[], []]
    assert gallery.match(np.zeros((0, 128), np.float32), IDENTITY) == []


def test_unknown_face_is_rejected_not_forced(gallery, path, rng):
    known = random_unit(rng, 1)
    gallery.add("known", known, IDENTITY)
    stranger = unit(-known + 0.2 * rng.standard_normal((1, 128)))  # far from "known"
    (m,) = gallery.match(stranger, IDENTITY)
    assert m.name == "known" and m.distance > THRESHOLD and not m.accepted
    # A looser threshold given at open time applies to that instance only.
    with Gallery.open(path, threshold=3.99) as loose:
        assert loose.match(stranger, IDENTITY)[0].accepted
    with Gallery.open(path) as again:
        assert again.threshold == THRESHOLD


def test_incompatible_model_refused(gallery, rng):
    faces = random_unit(rng, 2)
    with pytest.raises(IncompatibleModelError) as err:
        gallery.add("x", faces, STRANGER)
    assert "aaaaaaaaaaaa" in str(err.value) and "cccccccccccc" in str(err.value)
    gallery.add("x", faces[:1], IDENTITY)
    with pytest.raises(IncompatibleModelError):
        gallery.match(faces, STRANGER)
    # Different file, same compatibility group: a harmonic successor is accepted.
    gallery.add("x", faces[1:], SUCCESSOR)
    assert [m.name for m in gallery.match(faces, SUCCESSOR)] == ["x", "x"]
    # No group on either side: only the exact same model is compatible.
    ungrouped = ModelIdentity(sha256="d" * 64)
    with pytest.raises(IncompatibleModelError):
        gallery.match(faces, ungrouped)
    assert [p.samples for p in gallery.list()] == [2]


def test_bad_embeddings_rejected(gallery):
    with pytest.raises(ValueError, match="shape"):
        gallery.add("x", np.ones((2, 64), np.float32), IDENTITY)
    with pytest.raises(ValueError, match="NaN"):
        gallery.add("x", np.full(128, np.nan, np.float32), IDENTITY)
    with pytest.raises(ValueError, match="zeros"):
        gallery.match(np.zeros(128, np.float32), IDENTITY)
    assert gallery.list() == []


@pytest.mark.parametrize("name", ["", "   ", "x" * 129, "line\nbreak", "nul\x00", "tab\there", " padded", "sep\u2028"])
def test_name_validation(gallery, rng, name):
    with pytest.raises(GalleryError, match="name"):
        gallery.add(name, random_unit(rng, 1), IDENTITY)
    assert gallery.list() == []


def test_rename_and_remove(gallery, rng):
    a, b = random_unit(rng, 2)
    gallery.add("alice", a, IDENTITY)
    gallery.add("bob", b, IDENTITY)
    assert gallery.match(a, IDENTITY)[0].name == "alice"  # fills the cache
    gallery.rename("alice", "Alice Smith")
    assert [p.name for p in gallery.list()] == ["Alice Smith", "bob"]
    assert gallery.match(a, IDENTITY)[0].name == "Alice Smith"  # cache was invalidated
    with pytest.raises(GalleryError, match="already has"):
        gallery.rename("Alice Smith", "bob")
    with pytest.raises(GalleryError, match="no person named 'carol'"):
        gallery.rename("carol", "dave")
    with pytest.raises(GalleryError, match="name"):
        gallery.rename("bob", "")
    assert gallery.remove("bob") == 1
    with pytest.raises(GalleryError, match="no person named 'bob'"):
        gallery.remove("bob")
    assert [p.name for p in gallery.list()] == ["Alice Smith"]
    assert gallery.match(b, IDENTITY)[0].name == "Alice Smith"


def test_closed_gallery_raises_gallery_error(path):
    g = Gallery.create(path, IDENTITY, THRESHOLD)
    g.close()
    g.close()  # idempotent
    with pytest.raises(GalleryError, match="faces.db"):
        g.list()


def test_writes_from_another_connection_are_seen(gallery, path, rng):
    a, b = random_unit(rng, 2)
    gallery.add("alice", a, IDENTITY)
    assert gallery.match(b, IDENTITY)[0].name == "alice"
    with Gallery.open(path) as other:  # e.g. an enrolment while a camera loop runs
        other.add("bob", b, IDENTITY)
    assert gallery.match(b, IDENTITY)[0].name == "bob"


def test_export_import(gallery, path, tmp_path, rng):
    gallery.add("alice", random_unit(rng, 2), IDENTITY)
    gallery.add("bob", random_unit(rng, 1), IDENTITY)
    export = tmp_path / "backup.npz"
    assert gallery.export(export) == 3
    assert stat.S_IMODE(os.stat(export).st_mode) == 0o600
    with np.load(export, allow_pickle=False) as data:
        assert data["embeddings"].dtype == np.int8 and data["embeddings"].shape == (3, 128)
        assert list(data["names"]) == ["alice", "alice", "bob"]
        assert str(data["model_sha256"]) == IDENTITY.sha256
        assert float(data["threshold"]) == THRESHOLD

    # Into a gallery of a compatible model: same people, same int8 rows.
    other_path = tmp_path / "other.db"
    with Gallery.create(other_path, SUCCESSOR, 0.8) as other:
        other.add("alice", random_unit(rng, 1), SUCCESSOR)
        assert other.import_from(export) == 3
        assert [(p.name, p.samples) for p in other.list()] == [("alice", 3), ("bob", 1)]
        assert other.import_from(export) == 0  # idempotent
        assert other.threshold == 0.8  # keeps its own threshold
    src = {bytes(blob) for _, _, blob in snapshot(path)[1]}
    assert src <= {bytes(blob) for _, _, blob in snapshot(other_path)[1]}

    # Into an incompatible gallery: refused, nothing written.
    stranger_path = tmp_path / "stranger.db"
    with Gallery.create(stranger_path, STRANGER, THRESHOLD) as stranger:
        before = snapshot(stranger_path)
        with pytest.raises(IncompatibleModelError):
            stranger.import_from(export)
        assert snapshot(stranger_path) == before

    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    with pytest.raises(GalleryError, match="junk.npz"):
        gallery.import_from(junk)


def test_import_knows_samples_by_content_not_name(gallery, tmp_path, rng):
    gallery.add("alice", random_unit(rng, 2), IDENTITY)
    gallery.add("bob", random_unit(rng, 1), IDENTITY)
    export = tmp_path / "before-rename.npz"
    gallery.export(export)
    gallery.rename("alice", "Alice Smith")
    before = gallery.list()
    assert gallery.import_from(export) == 0  # alice's samples are Alice Smith's now
    assert gallery.list() == before  # nobody created, nobody's "updated" touched

    gallery.add("carol", random_unit(rng, 1), IDENTITY)
    gallery.export(export)
    gallery.remove("carol")
    before = {p.name: p for p in gallery.list()}
    assert gallery.import_from(export) == 1
    after = {p.name: p for p in gallery.list()}
    assert after["carol"].samples == 1
    assert {name: after[name] for name in before} == before  # only the person who gained a sample changed


def test_files_are_private(tmp_path, rng):
    old = os.umask(0)  # without our care, SQLite would create these 0644 or 0666
    try:
        path = tmp_path / "private.db"
        with Gallery.create(path, IDENTITY, THRESHOLD) as g:
            g.add("a", random_unit(rng, 1), IDENTITY)
            files = [path, tmp_path / "private.db-wal", tmp_path / "private.db-shm"]
            for file in files:
                assert file.exists(), file
                assert stat.S_IMODE(os.stat(file).st_mode) == 0o600, file
            g.export(tmp_path / "e.npz")
            assert stat.S_IMODE(os.stat(tmp_path / "e.npz").st_mode) == 0o600
    finally:
        os.umask(old)


def test_missing_gallery(tmp_path):
    missing = tmp_path / "nope.db"
    with pytest.raises(GalleryError, match="nope.db"):
        Gallery.open(missing)
    assert not missing.exists()
    with Gallery.open(missing, create=True, identity=IDENTITY, threshold=THRESHOLD) as g:
        assert g.list() == []
    with pytest.raises(GalleryError, match="already exists"):
        Gallery.create(missing, IDENTITY, THRESHOLD)


def _other_sqlite(path):
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("CREATE TABLE notes (body TEXT)")
        conn.execute("INSERT INTO notes VALUES ('hello')")
    conn.close()


@pytest.mark.parametrize(
    "make",
    [
        lambda p: p.write_text("name,embedding\nalice,1 2 3\n"),
        lambda p: p.write_bytes(b""),
        lambda p: p.write_bytes(b"SQLite format 3\x00" + b"\xff" * 100),
        _other_sqlite,
    ],
    ids=["text", "empty", "corrupt", "other-sqlite"],
)
def test_foreign_file_refused_and_untouched(tmp_path, make):
    path = tmp_path / "g.db"
    make(path)
    before = (path.read_bytes(), os.stat(path).st_mtime_ns, sorted(os.listdir(tmp_path)))
    with pytest.raises(GalleryError, match="g.db"):
        Gallery.open(path)
    with pytest.raises(GalleryError, match="g.db"):
        Gallery.open(path, create=True, identity=IDENTITY, threshold=THRESHOLD)
    assert (path.read_bytes(), os.stat(path).st_mtime_ns, sorted(os.listdir(tmp_path))) == before


def test_newer_schema_refused(path):
    Gallery.create(path, IDENTITY, THRESHOLD).close()
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema'")
    conn.close()
    with pytest.raises(GalleryError, match="schema version 99"):
        Gallery.open(path)


CHILD = textwrap.dedent(
    """
    import sys
    import numpy as np
    from facenet_edge.card import ModelIdentity
    from facenet_edge.gallery import Gallery

    identity = ModelIdentity(sha256="a" * 64, compatibility_group="facenet-v1")
    with Gallery.open(sys.argv[1]) as g:
        for i in range(100_000):
            g.add(f"p{i}", np.random.default_rng(i).standard_normal(128), identity)
            print(i + 1, flush=True)
    """
)


def test_kill_9_mid_write_keeps_every_reported_commit(path):
    Gallery.create(path, IDENTITY, THRESHOLD).close()
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], stdout=subprocess.PIPE, text=True)
    reported = 0
    try:
        for line in child.stdout:
            reported = int(line)
            if reported >= 40:
                break
        os.kill(child.pid, signal.SIGKILL)
        for line in child.stdout:  # anything it printed before the signal landed
            reported = int(line)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL
    assert reported >= 40

    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    conn.close()
    with Gallery.open(path) as g:
        names = {p.name for p in g.list()}
        assert {f"p{i}" for i in range(reported)} <= names
        assert len(names) <= reported + 1  # at most the one commit it had no time to report
        for i in (0, reported - 1):
            face = np.random.default_rng(i).standard_normal(128)
            m = g.match(face, IDENTITY)[0]
            assert m.name == f"p{i}" and m.distance < 2e-3


# ---------------------------------------------------------------- the in-memory index and search


def _export_file(path, names, matrix):
    """An export file (Gallery.export's format) holding ``matrix`` rows for ``names``."""
    np.savez(
        path,
        format=np.array(gallery_store.EXPORT_FORMAT),
        names=np.array(names, dtype="<U128"),
        embeddings=matrix,
        model_sha256=np.array(IDENTITY.sha256),
        compatibility_group=np.array(IDENTITY.compatibility_group),
        threshold=np.array(THRESHOLD, dtype=np.float64),
    )
    return path


def _brute_force(names, matrix, query, k):
    """(name, distance) of the k nearest people: every row renormalised, in float64."""
    rows = matrix.astype(np.float64)
    similarity = rows @ query.astype(np.float64) / np.linalg.norm(rows, axis=1)
    best: dict[str, float] = {}
    for name, value in zip(names, similarity):
        best[name] = max(best.get(name, -np.inf), value)
    ranked = sorted(best.items(), key=lambda item: -item[1])[:k]
    return [name for name, _ in ranked], [min(max(2.0 - 2.0 * value, 0.0), 4.0) for _, value in ranked]


def _random_people(rng, people=1200):
    """(names, int8 rows): 1-5 samples a person (about 3600 rows), a person's samples near
    each other as real ones are, people in random order of enrolment."""
    names, rows = [], []
    for i in rng.permutation(people):
        count = int(rng.integers(1, 6))
        centre = random_unit(rng, 1)
        rows.append(quantize(unit(centre + 0.35 * rng.standard_normal((count, 128)) / np.sqrt(128))))
        names += [f"person {i:04d}"] * count
    return names, np.concatenate(rows)


@pytest.fixture(params=["int8", "float32"])
def first_pass(request, monkeypatch):
    """Each search runs with SimSIMD's int8 first pass and with numpy's float32 one."""
    if request.param == "int8":
        simsimd = pytest.importorskip("simsimd", reason="facenet-edge[search] not installed")
        monkeypatch.setattr(search, "_simsimd", simsimd)
    else:
        monkeypatch.setattr(search, "_simsimd", None)
    return request.param


@pytest.mark.parametrize("small_steps", [False, True], ids=["default-steps", "small-steps"])
def test_index_and_search_agree_with_brute_force(gallery, tmp_path, rng, monkeypatch, small_steps, first_pass):
    if small_steps:  # many load chunks, blocks and query batches, none of them whole
        monkeypatch.setattr(gallery_store, "_LOAD_ROWS", 97)
        monkeypatch.setattr(search, "_BLOCK_ROWS", 300)
        monkeypatch.setattr(search, "_QUERY_COLUMNS", 4)
    names, matrix = _random_people(rng)
    # Two imports: the second adds samples to people of the first, so a person's rows are
    # not next to each other in the table (the index must group them itself).
    half = rng.random(len(names)) < 0.5
    first = [n for n, h in zip(names, half) if h]
    gallery.import_from(_export_file(tmp_path / "a.npz", first, matrix[half]))
    probe = unit(matrix[~half][:1].astype(np.float32))
    assert gallery.match(probe, IDENTITY)[0].distance > 1e-3  # loaded without the second half
    second = [n for n, h in zip(names, half) if not h]
    gallery.import_from(_export_file(tmp_path / "b.npz", second, matrix[~half]))
    assert gallery.match(probe, IDENTITY)[0].distance < 1e-6  # the import invalidated the index

    index = gallery._index
    order = np.lexsort((np.arange(len(names)), index.person))
    assert np.array_equal(order, np.arange(len(names)))  # rows grouped by person
    stored = sorted(zip(names, map(bytes, matrix)))
    by_id = dict(sqlite3.connect(gallery.path).execute("SELECT id, name FROM people").fetchall())
    assert sorted(zip((by_id[int(p)] for p in index.person), map(bytes, index.matrix))) == stored
    norms = np.linalg.norm(index.matrix.astype(np.float64), axis=1)
    np.testing.assert_allclose(index.inv_norm, 1 / norms, rtol=1e-6)

    queries = np.concatenate(
        [
            unit(matrix[rng.choice(len(matrix), 4)].astype(np.float32)),  # stored samples
            unit(matrix[rng.choice(len(matrix), 4)] / 127 + 0.3 * rng.standard_normal((4, 128)) / np.sqrt(128)),
            random_unit(rng, 2),  # nobody
        ]
    ).astype(np.float32)
    for k in (1, 5, 40):
        results = gallery.match_top_k(queries, IDENTITY, k)
        assert len(results) == len(queries)
        for query, found in zip(queries, results):
            expected_names, expected_distances = _brute_force(names, matrix, query, k)
            assert [m.name for m in found] == expected_names
            # Both in float64; they differ only by the float32 rounding of the query's norm.
            np.testing.assert_allclose([m.distance for m in found], expected_distances, rtol=0, atol=1e-6)
            assert all(m.accepted == (m.distance <= THRESHOLD) for m in found)


def test_index_holds_the_int8_matrix_and_two_numbers_a_row(gallery, tmp_path, rng, monkeypatch):
    names, matrix = _random_people(rng, people=1000)
    gallery.import_from(_export_file(tmp_path / "a.npz", names, matrix))
    gallery.match(random_unit(rng, 1), IDENTITY)
    index = gallery._index
    n = len(names)
    assert index.matrix.dtype == np.int8 and index.matrix.shape == (n, 128)
    assert index.inv_norm.dtype == np.float32 and index.person.dtype == np.int32
    assert set(vars(index)) == {"matrix", "inv_norm", "person"}  # no names, no per-sample objects
    assert index.nbytes == n * 128 + n * 4 + n * 4

    # Loading streams rows into the preallocated arrays: the peak is the index plus one chunk.
    monkeypatch.setattr(gallery_store, "_LOAD_ROWS", 64)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        with gallery._read():
            loaded = gallery._load_index()
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert loaded.nbytes == index.nbytes
    assert peak < index.nbytes + 200_000, peak


def test_person_removed_elsewhere_between_loading_and_naming(gallery, path, rng):
    a, b = random_unit(rng, 2)
    gallery.add("alice", a, IDENTITY)
    gallery.add("bob", b, IDENTITY)
    assert gallery.match(a, IDENTITY)[0].name == "alice"
    with Gallery.open(path) as other:
        other.remove("alice")
    # As if the removal landed after this instance checked data_version: the search finds
    # alice's id gone when it reads the names, reloads and searches again.
    gallery._data_version = gallery._version()
    assert [m.name for m in gallery.match_top_k(a, IDENTITY, 5)[0]] == ["bob"]


def test_person_ids_beyond_int32(gallery, path, rng):
    small, big = random_unit(rng, 2)
    gallery.add("small", small, IDENTITY)
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("INSERT INTO people(id, name, created, updated) VALUES (?, 'big', 0, 0)", (2**40,))
        conn.execute(
            "INSERT INTO samples(person_id, embedding, created) VALUES (?, ?, 0)", (2**40, quantize(big).tobytes())
        )
    conn.close()
    assert [m.name for m in gallery.match(np.stack([small, big]), IDENTITY)] == ["small", "big"]
    assert gallery._index.person.dtype == np.int64


def test_many_equal_samples_of_one_person(gallery, tmp_path, rng, monkeypatch, first_pass):
    # Rows of one person within float32 noise of each other all survive the first pass;
    # it must still finish and rank correctly.
    monkeypatch.setattr(search, "_BLOCK_ROWS", 128)
    face = random_unit(rng, 1)
    names = [f"other {i:03d}" for i in range(300)]
    others = quantize(random_unit(rng, 300))
    gallery.import_from(_export_file(tmp_path / "a.npz", names[:150], others[:150]))
    gallery.add("twin", np.repeat(face, 700, axis=0), IDENTITY)  # add keeps duplicates
    gallery.import_from(_export_file(tmp_path / "b.npz", names[150:], others[150:]))
    found = gallery.match_top_k(face, IDENTITY, 3)[0]
    names = ["twin"] + names
    matrix = np.concatenate([quantize(face), others])
    assert [m.name for m in found] == _brute_force(names, matrix, face[0], 3)[0]
    assert found[0].distance < 1e-3
