"""Dataset readers, identity handling, the P x K sampler and augmentation (no TensorFlow)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from facenet_edge.align import align
from facenet_edge.detect import Detection
from facenet_train import data
from facenet_train.augment import AugmentConfig, augment_batch, centre_crop, mix_faces


def _touch_images(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")


def test_read_source_tree_flat_and_non_images(tmp_path):
    _touch_images(tmp_path / "pins" / "pins_Ann Lee", ["b.jpg", "a.JPG", "notes.txt"])
    _touch_images(tmp_path / "pins" / "pins_Bo", ["x.png"])
    (tmp_path / "pins" / "MANIFEST_OK").write_text("{}")
    _touch_images(tmp_path / "flat", ["2.jpg", "1.pgm"])

    samples = data.read_source(tmp_path / "pins", "pins")
    assert [(Path(s.path).name, s.identity, s.source) for s in samples] == [
        ("a.JPG", "pins/pins_Ann Lee", "pins"),
        ("b.jpg", "pins/pins_Ann Lee", "pins"),
        ("x.png", "pins/pins_Bo", "pins"),
    ]
    flat = data.read_source(tmp_path / "flat", "utk")
    assert [(Path(s.path).name, s.identity) for s in flat] == [("1.pgm", None), ("2.jpg", None)]
    with pytest.raises(FileNotFoundError, match="missing"):
        data.read_source(tmp_path / "missing", "x")


def test_person_keys_merge_the_same_people_across_sources():
    assert data.person_key("pins/pins_Barack Obama") == data.person_key("glint24/Barack Obama") == "names/barack_obama"
    assert data.person_key("celeba_aligned/07201") == data.person_key("celeba_wild/07201") == "celeba/07201"
    assert data.person_key("extyaleb/yaleB01") == "extyaleb/yaleb01"
    assert data.label_table([data.Sample("p", "pins/pins_A b", "pins"), data.Sample("q", "glint24/A B", "glint24"),
                             data.Sample("r", None, "utk")]) == ["names/a_b"]


def test_overlap_file_excludes_people_in_every_source(tmp_path):
    overlap = tmp_path / "overlap.txt"
    overlap.write_text("pins\tpins_Bill Gates\tBill_Gates\n\n# comment\nglint24\tTom Hanks\tTom_Hanks\n")
    assert data.read_overlap(overlap) == {"pins/pins_Bill Gates", "glint24/Tom Hanks"}
    samples = [
        data.Sample("1", "pins/pins_Bill Gates", "pins"),
        data.Sample("2", "glint24/Bill Gates", "glint24"),  # same person under another source
        data.Sample("3", "pins/pins_Tom Hanks", "pins"),
        data.Sample("4", "pins/pins_Ann", "pins"),
        data.Sample("5", None, "utkface"),
    ]
    kept = data.exclude_identities(samples, data.read_overlap(overlap))
    assert [s.path for s in kept] == ["4", "5"]
    overlap.write_text("just-one-field\n")
    with pytest.raises(ValueError, match="overlap.txt:1"):
        data.read_overlap(overlap)


def test_duplicate_photos_dropped_only_where_file_names_are_photo_ids():
    samples = [
        data.Sample("a/07201/001085.jpg", "celeba_aligned/07201", "celeba_aligned"),
        data.Sample("w/07201/001085.jpg", "celeba_wild/07201", "celeba_wild"),
        data.Sample("p/pins_X/0.jpg", "pins/pins_X", "pins"),
        data.Sample("g/X/0.jpg", "glint24/X", "glint24"),
    ]
    kept, dropped = data.drop_duplicate_photos(samples)
    assert [s.path for s in dropped] == ["w/07201/001085.jpg"]
    assert len(kept) == 3


def _labels() -> np.ndarray:
    # 6 identities with 2..7 faces, one identity with a single face, 3 unlabeled faces
    labels = np.concatenate([np.full(n, i) for i, n in enumerate([2, 3, 4, 5, 6, 7])] + [[6], [-1, -1, -1]])
    return np.random.default_rng(0).permutation(labels)


def test_pk_sampler_batches():
    labels = _labels()
    sampler = data.PKSampler(labels, data.SamplerConfig(p=4, k=3, unlabeled=2, seed=1), replicas=2)
    assert sampler.identities == 6 and sampler.batch_size == 14
    batch = sampler.batch(5)
    assert batch.shape == (2, 2 * 3 + 1)
    for row in batch:
        groups = labels[row[:6]].reshape(2, 3)
        assert (groups == groups[:, :1]).all() and groups[0, 0] != groups[1, 0]
        assert labels[row[6]] == -1 or labels[row[6]] == 6  # unlabeled or the one-face identity
    chosen = labels[batch[:, :6]].reshape(-1, 3)[:, 0]
    assert len(set(chosen.tolist())) == 4 and 6 not in chosen and -1 not in chosen
    # An identity with fewer faces than k gets every face before a repeat.
    two = np.flatnonzero(labels == 0)
    for step in range(40):
        flat = sampler.batch(step)[:, :6].reshape(-1, 3)
        for group in flat:
            if labels[group[0]] == 0:
                assert set(group.tolist()) == set(two.tolist())
    np.testing.assert_array_equal(sampler.batch(5), batch)  # a pure function of the step
    assert not np.array_equal(sampler.batch(6), batch)


def test_pk_sampler_identity_power():
    labels = np.concatenate([np.zeros(100, int), np.arange(1, 11).repeat(2)])
    uniform = data.PKSampler(labels, data.SamplerConfig(p=2, k=2, identity_power=0.0))
    by_faces = data.PKSampler(labels, data.SamplerConfig(p=2, k=2, identity_power=1.0))
    hits = lambda s: np.mean([0 in labels[s.batch(i)] for i in range(300)])  # noqa: E731
    assert hits(by_faces) > 0.9 > 0.4 > hits(uniform)


def test_pk_sampler_refuses_unusable_settings():
    with pytest.raises(ValueError, match="identities have 2 or more faces"):
        data.PKSampler(_labels(), data.SamplerConfig(p=7, k=2))
    with pytest.raises(ValueError, match="k >= 2"):
        data.PKSampler(_labels(), data.SamplerConfig(p=2, k=1))
    with pytest.raises(ValueError, match="replicas"):
        data.PKSampler(_labels(), data.SamplerConfig(p=3, k=2), replicas=2)
    with pytest.raises(ValueError, match="no unlabeled"):
        data.PKSampler(np.repeat(np.arange(3), 2), data.SamplerConfig(p=2, k=2, unlabeled=1))


# ---------------------------------------------------------------- augmentation


@pytest.fixture(scope="module")
def bordered(astronaut) -> tuple[np.ndarray, Detection]:
    """The astronaut's face at 96 + 2 * 8 px, and the detection it was cropped with."""
    landmarks = np.array([[204.0, 101.0], [248.0, 108.0], [222.0, 125.0], [219.0, 145.0]])
    detection = Detection(box=np.array([178.0, 81.0, 272.0, 175.0]), score=1.0, landmarks=landmarks)
    return align(astronaut, detection, (96, 96), border=8), detection


def test_centre_crop_is_the_runtime_crop(astronaut, bordered):
    crop, detection = bordered
    runtime = align(astronaut, detection, (96, 96))
    centre = centre_crop(crop[None], 96)[0]
    # Same transform up to an 8 px shift; cv2.warpAffine's fixed-point coordinates (1/32 px)
    # round differently for the two offsets: a few pixels differ by 1-2 levels.
    difference = np.abs(centre.astype(int) - runtime)
    assert difference.max() <= 2 and np.mean(difference > 0) < 0.01
    off = AugmentConfig(enabled=False)
    np.testing.assert_array_equal(augment_batch(crop[None], 96, off, np.random.default_rng(0))[0], centre)
    # The warp path with every transform at zero reproduces it exactly (pixel-centre conventions agree).
    identity = AugmentConfig(flip=0, shift=0, scale=0, rotation=0, brightness=0, contrast=0, saturation=0,
                             grayscale=0, blur=0, jpeg=0)
    np.testing.assert_array_equal(augment_batch(crop[None], 96, identity, np.random.default_rng(0))[0], centre)
    flipped = AugmentConfig(**{**identity.__dict__, "flip": 1.0})
    np.testing.assert_array_equal(augment_batch(crop[None], 96, flipped, np.random.default_rng(0))[0], centre[:, ::-1])


def test_shift_moves_the_window_by_whole_pixels(bordered):
    crop, _ = bordered
    shift_only = AugmentConfig(flip=0, shift=8, scale=0, rotation=0, brightness=0, contrast=0, saturation=0,
                               grayscale=0, blur=0, jpeg=0)
    rng = np.random.default_rng(3)
    out = augment_batch(np.repeat(crop[None], 20, axis=0), 96, shift_only, rng)
    windows = {(y, x): crop[y:y + 96, x:x + 96] for y in range(17) for x in range(17)}
    for view in out:
        assert any(np.array_equal(view, w) for w in windows.values())


def test_augment_shapes_ranges_and_seeding(bordered):
    crop, _ = bordered
    batch = np.repeat(crop[None], 16, axis=0)
    strong = AugmentConfig(grayscale=0.5, blur=0.5, jpeg=0.5)
    a = augment_batch(batch, 96, strong, np.random.default_rng(7))
    b = augment_batch(batch, 96, strong, np.random.default_rng(7))
    assert a.shape == (16, 96, 96, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert len({v.tobytes() for v in a}) == 16  # every view differs
    grey = [v for v in a if np.array_equal(v[..., 0], v[..., 1]) and np.array_equal(v[..., 1], v[..., 2])]
    assert grey  # some views were made greyscale
    # Views stay close to the source on average: no view is wrecked.
    centre = centre_crop(crop[None], 96)[0].astype(np.float32)
    assert all(abs(v.astype(np.float32).mean() - centre.mean()) < 60 for v in a)


def test_colour_jitter_matches_its_definition(bordered):
    crop, _ = bordered
    from facenet_train.augment import _colour_matrix

    view = centre_crop(crop[None], 96)[0]
    mean = sum(cv2.mean(view)[:3]) / 3
    got = cv2.transform(view, _colour_matrix(mean, 20.0, 1.2, 0.5)).astype(np.float32)
    x = view.astype(np.float32) + 20.0
    x = (x - (mean + 20.0)) * 1.2 + (mean + 20.0)
    grey = (x @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]
    x = grey + (x - grey) * 0.5
    np.testing.assert_allclose(got, np.clip(np.rint(x), 0, 255), atol=1.0)


def test_tight_views_keep_a_window_and_fill_the_rest_like_the_aligner(bordered):
    crop, _ = bordered
    identity = AugmentConfig(flip=0, shift=0, scale=0, rotation=0, brightness=0, contrast=0, saturation=0,
                             grayscale=0, blur=0, jpeg=0)
    tight = AugmentConfig(**{**identity.__dict__, "tight": 1.0, "tight_window": (0.75, 0.75)})
    centre = centre_crop(crop[None], 96)[0]
    view = augment_batch(crop[None], 96, tight, np.random.default_rng(0))[0]
    kept = np.all(view == centre, axis=-1) & ~np.all(view == 128, axis=-1)
    ys, xs = np.nonzero(kept)
    side = 72  # 0.75 * 96
    assert np.ptp(ys) + 1 == side and np.ptp(xs) + 1 == side
    assert abs(ys.mean() - 47.5) <= 0.06 * side + 1 and abs(xs.mean() - 47.5) <= 0.06 * side + 1
    outside = np.ones((96, 96), bool)
    outside[ys.min():ys.max() + 1, xs.min():xs.max() + 1] = False
    assert np.all(view[outside] == 128)  # the aligner's "grey" fill, exactly
    # The aligner's other fills are the options; an unknown one is refused when configured.
    replicate = AugmentConfig(**{**tight.__dict__, "tight_fill": "replicate"})
    streaks = augment_batch(crop[None], 96, replicate, np.random.default_rng(0))[0]
    edge = streaks[ys.min(), xs.min()]
    np.testing.assert_array_equal(streaks[ys.min(), :xs.min()], np.repeat(edge[None], xs.min(), 0))
    with pytest.raises(ValueError, match="tight_fill 'blue'"):
        AugmentConfig(tight_fill="blue")


def test_tight_probability_zero_keeps_the_random_stream(bordered):
    crop, _ = bordered
    batch = np.repeat(crop[None], 8, axis=0)
    plain = augment_batch(batch, 96, AugmentConfig(), np.random.default_rng(5))
    np.testing.assert_array_equal(plain, augment_batch(batch, 96, AugmentConfig(tight=0.0), np.random.default_rng(5)))


def test_mix_faces_blends_only_the_rows_named_each_with_another_face():
    # Constant views, one grey level each: a blend is a level between its own and its partner's.
    levels = np.array([0, 60, 120, 180, 240], dtype=np.uint8)
    views = np.broadcast_to(levels[:, None, None, None], (5, 8, 8, 3)).copy()
    rows = np.array([1, 3])
    weights = []
    for seed in range(200):
        mixed = mix_faces(views, rows, np.random.default_rng(seed))
        np.testing.assert_array_equal(np.delete(mixed, rows, axis=0), np.delete(views, rows, axis=0))
        assert (mixed == mixed[:, :1, :1]).all()  # the weight is one per view, not per pixel
        for row in rows:
            value = int(mixed[row, 0, 0, 0])
            partners = [p for p in range(5) if p != row and min(levels[p], levels[row]) <= value <= max(
                levels[p], levels[row])]
            assert partners, f"row {row}: {value} lies between its level and no other view's"
        weights.append((int(mixed[1, 0, 0, 0]), int(mixed[3, 0, 0, 0])))
    assert len(set(weights)) > 100  # weights drawn, not fixed
    np.testing.assert_array_equal(mix_faces(views, rows, np.random.default_rng(7)),
                                  mix_faces(views, rows, np.random.default_rng(7)))
    assert views[1, 0, 0, 0] == 60  # the input is left as it was


def test_teacher_prototypes_are_unit_identity_means_of_the_faces_with_a_target():
    targets = np.array([[3, 0], [0, 2], [np.nan, np.nan], [0, 5], [1, 1], [4, 4]], dtype=np.float32)
    labels = np.array([0, 0, 0, 2, -1, 2])
    prototypes = data.teacher_prototypes(targets, labels)
    half = np.sqrt(0.5)
    # Identity 0: the mean of (1, 0) and (0, 1), the NaN row left out; identity 1 has no face; -1 is unlabeled.
    expected = [[half, half], [0, 0], [np.cos(np.pi / 8), np.sin(np.pi / 8)][::-1]]
    np.testing.assert_allclose(prototypes, expected, atol=1e-6)
    assert prototypes.dtype == np.float32
