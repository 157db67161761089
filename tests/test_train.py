"""Config, training (tiny model, synthetic clustered faces), checkpoint/resume, LFW evaluation.

The tiny model is registered in ``models.MODELS`` for this module only; the data are
synthetic identities (a smooth colour pattern each, plus noise) written as a crop cache,
and a fake mini-LFW of astronaut variants. No real training data is read.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest

tf = pytest.importorskip("tensorflow", reason="the training stack needs TensorFlow (pip install -e .[dev])")

from facenet_edge.detect import DEFAULT_DETECTOR  # noqa: E402
from facenet_edge.embed import normalise  # noqa: E402
from facenet_train import checkpoint, cli, data, evaluation, models, preprocess, teacher_head, train  # noqa: E402
from facenet_train.augment import augment_views, centre_crop, cut_tight, mix_faces  # noqa: E402
from facenet_train.config import ConfigError, config_from_dict, load_config  # noqa: E402

REAL_LFW = Path(__file__).parents[2] / "shared/data/lfw"
TINY = models.ModelSpec(
    "tiny",
    (96, 96, 3),
    (models.Conv("conv1", 8, 3, 2), models.MaxPool("pool1"), models.Conv("conv2", 16, 3, 2), models.MaxPool("pool2")),
    0,
    models.PaperReference(None, None, "tests only"),
    "two convolutions, for tests",
)
DIM = 16
IDENTITIES, FACES, UNLABELED = 8, 10, 6


@pytest.fixture(scope="module", autouse=True)
def tiny_model():
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(models.MODELS, "tiny", TINY)
        yield


def write_cache(root: Path, crops: np.ndarray, labels: np.ndarray, teacher: np.ndarray | None,
                shard_size: int = 40) -> Path:
    """A complete crop cache (crops with an 8 px border, 96 px ones by default) from arrays."""
    root.mkdir(parents=True, exist_ok=True)
    identities = np.array([f"synthetic/{label}" if label >= 0 else "" for label in labels])
    shards = [data.shard_name(i) for i in range(-(-len(crops) // shard_size))]
    for i, shard in enumerate(shards):
        part = slice(i * shard_size, (i + 1) * shard_size)
        n = len(labels[part])
        data.write_npz_atomic(
            root / shard, crops=crops[part], labels=labels[part].astype(np.int32), identities=identities[part],
            sources=np.array(["synthetic"] * n), paths=np.array([f"/synthetic/{j}.png" for j in range(n)]),
            boxes=np.zeros((n, 4), np.float32), landmarks=np.zeros((n, 4, 2), np.float32),
            scores=np.ones(n, np.float32), pads=np.zeros(n, np.int32),
        )
        if teacher is not None:
            np.save(root / data.teacher_name(shard), teacher[part])
    data.CacheManifest(
        crop_size=crops.shape[1] - 16, border=8, template="facenet96", detector="synthetic",
        aligner=data.aligner_version(), shard_size=shard_size,
        plan="synthetic", people=[f"synthetic/{i}" for i in range(IDENTITIES)], shards=shards,
        sources={"synthetic": {"faces": len(crops)}}, complete=True,
    ).save(root)
    return root


@pytest.fixture(scope="module")
def synthetic_cache(tmp_path_factory) -> Path:
    """8 identities x 10 faces (one smooth random colour pattern per identity, plus noise
    and brightness changes) and 6 unlabeled faces; teacher vectors near one direction per
    identity, one of them missing (NaN)."""
    rng = np.random.default_rng(0)
    patterns = [cv2.resize(rng.random((4, 4, 3)).astype(np.float32), (112, 112), interpolation=cv2.INTER_CUBIC)
                for _ in range(IDENTITIES + UNLABELED)]
    labels = np.concatenate([np.repeat(np.arange(IDENTITIES), FACES), np.full(UNLABELED, -1)])
    sources = np.concatenate([np.repeat(np.arange(IDENTITIES), FACES), IDENTITIES + np.arange(UNLABELED)])
    crops = np.stack([np.clip(patterns[s] * 200 + rng.normal(0, 12, (112, 112, 3)) + rng.uniform(-20, 20) + 20, 0, 255)
                      for s in sources]).astype(np.uint8)
    directions = rng.normal(size=(IDENTITIES + UNLABELED, DIM))
    teacher = (directions[sources] + rng.normal(0, 0.1, (len(sources), DIM))).astype(np.float32)
    teacher[3] = np.nan
    return write_cache(tmp_path_factory.mktemp("synthetic") / "cache", crops, labels, teacher)


def make_config(cache: Path, **sections):
    values = {
        "model": {"name": "tiny", "embedding_size": DIM},
        "data": {"cache": str(cache)},
        "batch": {"p": 4, "k": 4},
        "optimizer": {"learning_rate": 3e-3},
        "schedule": {"kind": "constant", "warmup_steps": 0},
        "train": {"steps": 40, "checkpoint_every": 20, "log_every": 5, "jit_compile": False},
    }
    for name, overrides in sections.items():
        values[name] = {**values.get(name, {}), **overrides}
    return config_from_dict(values)


def logged(run_dir: Path, tag: str) -> list[float]:
    """A scalar's values from the run's TensorBoard event files, in step order."""
    points = []
    for path in sorted((run_dir / checkpoint.LOGS).glob("events.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            points += [(event.step, float(tf.make_ndarray(v.tensor))) for v in event.summary.value if v.tag == tag]
    return [value for _, value in sorted(points)]


@pytest.fixture(scope="module")
def trained_run(synthetic_cache, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    result = train.train(make_config(synthetic_cache), run_dir)
    assert result.step == 40
    return run_dir


# ---------------------------------------------------------------- config


def test_config_file_round_trip_and_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "run.toml"
    path.write_text(textwrap.dedent("""
        [model]
        name = "nn4_small2"
        [data]
        cache = "cache/aligned"
        exclude = ["lists/overlap.txt"]
        [batch]
        p = 30
        k = 4
        [optimizer]
        name = "adagrad"
        learning_rate = 0.05
        [augment]
        jpeg_quality = [40, 80]
        """))
    config = load_config(path)
    assert config.batch.p == 30 and config.optimizer.name == "adagrad" and config.loss.margin == 0.2
    assert config.data.cache == str(tmp_path / "cache/aligned")
    assert config.data.exclude == [str(tmp_path / "lists/overlap.txt")]
    assert config.augment.jpeg_quality == (40, 80)
    json_path = tmp_path / "run.json"
    json_path.write_text(json.dumps({"batch": {"p": 8}}))
    assert load_config(json_path).batch.p == 8

    def error(text: str) -> str:
        path.write_text(text)
        with pytest.raises(ConfigError) as info:
            load_config(path)
        return str(info.value)

    assert "unknown key(s) in [batch]: q" in error("[batch]\nq = 3\n")
    assert "unknown key(s) in [config]: modle" in error("[modle]\nname = 'x'\n")
    assert "expected int" in error("[batch]\np = '30'\n")
    assert "expected float" in error("[optimizer]\nlearning_rate = true\n")
    assert "adam, adagrad or sgd" in error("[optimizer]\nname = 'rmsprop'\n")
    assert "needs data.teacher" in error("[loss]\ndistillation = 1.0\n")
    assert "needs harmonic.old_model" in error("[loss]\nharmonic = 1.0\n")
    assert "not valid TOML" in error("[batch\n")


def test_every_shipped_config_loads():
    configs = sorted((Path(__file__).parents[1] / "configs").glob("*.toml"))
    assert configs
    for path in configs:
        config = load_config(path)
        assert config.model.name in models.MODELS, path


# ---------------------------------------------------------------- training


def test_training_cache_leaves_out_excluded_people_and_unused_faces(synthetic_cache, tmp_path):
    overlap = tmp_path / "overlap.txt"
    overlap.write_text("synthetic\t3\tSomeone\n")
    cache = train.load_training_cache(make_config(synthetic_cache, data={"exclude": [str(overlap)]}))
    assert len(cache) == (IDENTITIES - 1) * FACES and 3 not in cache.labels and (cache.labels >= 0).all()
    with_unlabeled = train.load_training_cache(make_config(
        synthetic_cache, data={"teacher": True}, batch={"unlabeled": 2}, loss={"distillation": 1.0}))
    assert len(with_unlabeled) == IDENTITIES * FACES + UNLABELED and with_unlabeled.teacher.shape == (86, DIM)
    assert len(train.load_training_cache(make_config(synthetic_cache, data={"sources": ["other"]}))) == 0


def test_partial_teacher_trains_before_every_shard_is_described(synthetic_cache, tmp_path):
    partial = tmp_path / "partial"
    partial.mkdir()
    for path in synthetic_cache.iterdir():
        if path.name != data.teacher_name(data.shard_name(1)):
            (partial / path.name).symlink_to(path)
    config = make_config(partial, data={"teacher": True}, batch={"unlabeled": 2}, loss={"distillation": 1.0})
    with pytest.raises(FileNotFoundError, match="teacher descriptors missing"):
        train.load_training_cache(config)
    config = make_config(partial, data={"teacher": True, "partial_teacher": True}, batch={"unlabeled": 2},
                         loss={"distillation": 1.0})
    cache = train.load_training_cache(config)
    # Shard 1 (faces 40-79, all labeled) has no descriptors: NaN rows, faces kept.
    assert len(cache) == IDENTITIES * FACES + UNLABELED and cache.teacher.shape == (86, DIM)
    assert np.isnan(cache.teacher[40:80]).all() and np.isfinite(cache.teacher[80:]).all()


def test_a_cache_from_another_aligner_is_flagged(synthetic_cache, tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    manifest = data.CacheManifest.load(synthetic_cache)
    for shard in manifest.shards:
        (old / shard).symlink_to(synthetic_cache / shard)
    manifest.aligner = "facenet_edge.align v0"
    manifest.save(old)
    with pytest.warns(UserWarning, match="rerun preprocess into a new folder"):
        train.load_training_cache(make_config(old))


def test_training_lowers_the_loss(trained_run):
    loss = logged(trained_run, "loss")
    active = logged(trained_run, "active_fraction")
    assert len(loss) == 8 and len(active) == 8
    assert np.mean(loss[-2:]) < 0.5 * np.mean(loss[:2])
    assert active[-1] < active[0]
    assert logged(trained_run, "learning_rate")[-1] == pytest.approx(3e-3)
    for name in (checkpoint.KERAS_MODEL, checkpoint.WEIGHTS, checkpoint.CONFIG_JSON):
        assert (trained_run / name).is_file()
    assert json.loads((trained_run / checkpoint.CONFIG_JSON).read_text())["model"]["name"] == "tiny"


def test_trained_embeddings_separate_identities(trained_run, synthetic_cache):
    cache = data.load_cache(synthetic_cache)
    model = checkpoint.load_keras_model(trained_run)
    labeled = cache.labels >= 0
    embed = evaluation.keras_embedder(model)
    vectors = embed(cache.crops[labeled][:, 8:104, 8:104])
    labels = cache.labels[labeled]
    d = ((vectors[:, None] - vectors[None]) ** 2).sum(-1)
    same = labels[:, None] == labels[None]
    np.fill_diagonal(same, False)
    different = labels[:, None] != labels[None]
    assert d[same].mean() < 0.5 * d[different].mean()


def _stop_at(step: int):
    """A tqdm whose update raises KeyboardInterrupt once the bar reaches ``step`` (a user's Ctrl-C)."""

    class StoppingBar(train.tqdm):
        def update(self, n=1):
            super().update(n)
            if self.n == step:
                raise KeyboardInterrupt

    return StoppingBar


def test_interrupt_and_resume_continue_the_same_run(synthetic_cache, tmp_path, monkeypatch, capsys):
    config = make_config(synthetic_cache, train={"steps": 10, "checkpoint_every": 4, "log_every": 2})
    straight = train.train(config, tmp_path / "straight")

    run_dir = tmp_path / "resumed"
    monkeypatch.setattr(train, "tqdm", _stop_at(6))
    with pytest.raises(KeyboardInterrupt):
        train.train(config, run_dir)
    monkeypatch.undo()
    assert tf.train.latest_checkpoint(str(run_dir / checkpoint.CHECKPOINTS)).endswith("ckpt-6")
    assert not (run_dir / checkpoint.KERAS_MODEL).exists()
    with pytest.raises(ConfigError, match="--resume"):
        train.train(config, run_dir)
    capsys.readouterr()

    result = train.train(config, run_dir, resume=True)
    assert "from step 6 to 10" in capsys.readouterr().out
    assert result.step == 10
    # Batches and augmentation are functions of the step: the resumed run is the straight run.
    a = checkpoint.load_keras_model(tmp_path / "straight").get_weights()
    b = checkpoint.load_keras_model(run_dir).get_weights()
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)
    assert straight.metrics["loss"] == pytest.approx(result.metrics["loss"], rel=1e-3, abs=1e-5)

    # Training longer: only train.steps may change.
    longer = make_config(synthetic_cache, train={"steps": 12, "checkpoint_every": 4, "log_every": 2})
    assert train.train(longer, run_dir, resume=True).step == 12
    other = make_config(synthetic_cache, train={"steps": 12, "checkpoint_every": 4, "log_every": 2}, batch={"k": 3})
    with pytest.raises(ConfigError, match="only train.steps"):
        train.train(other, run_dir, resume=True)

    # A run folder without model.keras (still training) evaluates from its latest checkpoint.
    keras_weights = checkpoint.load_keras_model(run_dir).get_weights()
    (run_dir / checkpoint.KERAS_MODEL).unlink()
    for x, y in zip(keras_weights, checkpoint.load_keras_model(run_dir).get_weights()):
        np.testing.assert_array_equal(x, y)


def test_a_run_saved_before_an_option_existed_resumes_with_its_default(synthetic_cache, tmp_path):
    config = make_config(synthetic_cache)
    train.prepare_run_dir(config, None, tmp_path, resume=False)
    saved = json.loads((tmp_path / checkpoint.CONFIG_JSON).read_text())
    del saved["loss"]["prototype_margin"]  # as written before the option was added
    (tmp_path / checkpoint.CONFIG_JSON).write_text(json.dumps(saved))
    train.prepare_run_dir(config, None, tmp_path, resume=True)
    changed = make_config(synthetic_cache, loss={"prototype_margin": 0.5})
    with pytest.raises(ConfigError, match="only train.steps"):
        train.prepare_run_dir(changed, None, tmp_path, resume=True)


def test_continuation_on_its_parents_views_is_noted(trained_run, tmp_path):
    parent = json.loads((trained_run / checkpoint.CONFIG_JSON).read_text())

    def continuation(**sections):
        values = {name: {**part, **sections.get(name, {})} for name, part in parent.items()}
        values["model"]["init_weights"] = str(trained_run / checkpoint.WEIGHTS)
        return config_from_dict(values)

    note = train.replayed_views(continuation())
    assert note and "same seed (0)" in note and "train.seed" in note
    assert train.replayed_views(continuation(train={"seed": 1})) is None
    assert train.replayed_views(continuation(augment={"rotation": 3.0})) is None
    assert train.replayed_views(continuation(train={"steps": 80})) is not None  # length changes no view
    weights_alone = config_from_dict({**parent, "model": {**parent["model"], "init_weights": str(tmp_path / "w.npz")}})
    assert train.replayed_views(weights_alone) is None
    # A parent saved before an option existed ran with its default: the same views.
    older = {**parent, "augment": {k: v for k, v in parent["augment"].items() if k != "jpeg"}}
    (tmp_path / "older").mkdir()
    (tmp_path / "older" / checkpoint.CONFIG_JSON).write_text(json.dumps(older))
    from_older = config_from_dict({**parent, "model": {**parent["model"],
                                                       "init_weights": str(tmp_path / "older" / checkpoint.WEIGHTS)}})
    assert train.replayed_views(from_older) is not None


def test_distillation_and_harmonic(synthetic_cache, trained_run, tmp_path):
    config = make_config(
        synthetic_cache,
        data={"teacher": True},
        batch={"unlabeled": 4},
        loss={"distillation": 0.5, "harmonic": 1.0, "mining": "batch_hard"},
        harmonic={"old_model": str(trained_run / checkpoint.WEIGHTS), "old_name": "tiny", "old_embedding_size": DIM},
        model={"init_weights": str(trained_run / checkpoint.WEIGHTS)},
        optimizer={"name": "sgd", "learning_rate": 0.01},
        schedule={"kind": "cosine", "warmup_steps": 2},
        train={"steps": 4, "log_every": 2, "jit_compile": False},
    )
    result = train.train(config, tmp_path / "run")
    for name in ("loss", "triplet", "distillation", "harmonic", "harmonic_active_fraction"):
        assert np.isfinite(result.metrics[name]), name
    # Initialised from the old model, which is also the harmonic reference: old and new agree.
    assert result.metrics["harmonic"] < 0.2
    # Distilled towards centred teacher descriptors: the centre travels with the weights.
    mean = checkpoint.teacher_mean_of(tmp_path / "run")
    cache = train.load_training_cache(config)
    assert mean.shape == (DIM,) and np.allclose(mean, np.nanmean(cache.teacher[np.isfinite(cache.teacher).all(1)], 0))
    exported = checkpoint.save_compact(checkpoint.load_keras_model(tmp_path / "run"), tmp_path / "w.npz", mean)
    assert np.array_equal(checkpoint.teacher_mean_of(exported), mean)
    assert checkpoint.teacher_mean_of(trained_run) is None
    assert logged(tmp_path / "run", "learning_rate")[0] == pytest.approx(0.01)


def test_old_distillation_learns_the_old_models_function_without_labels(synthetic_cache, trained_run, tmp_path):
    old = {"old_model": str(trained_run / checkpoint.WEIGHTS), "old_name": "tiny", "old_embedding_size": DIM}
    config = make_config(synthetic_cache, batch={"unlabeled": 4}, loss={"triplet": 0.0, "old_distillation": 1.0},
                         harmonic=old, train={"steps": 20, "log_every": 1, "jit_compile": False})
    result = train.train(config, tmp_path / "run")
    assert set(result.metrics) >= {"loss", "old_distillation"} and "triplet" not in result.metrics
    # From fresh weights, the new model moves towards the old one's embeddings.
    values = logged(tmp_path / "run", "old_distillation")
    assert len(values) == 20 and np.mean(values[-5:]) < 0.8 * np.mean(values[:5])


def test_the_mirror_term_compares_each_view_with_its_left_right_mirror(synthetic_cache, trained_run, tmp_path):
    config = make_config(synthetic_cache, loss={"mirror": 1.0, "mirror_views": 5},
                         model={"init_weights": str(trained_run / checkpoint.WEIGHTS)})
    trainer = train.Trainer(config, tmp_path / "run", train.load_training_cache(config))
    rng = np.random.default_rng(0)
    half = rng.integers(0, 256, (16, 96, 48, 3), dtype=np.uint8)
    labels = tf.constant(np.repeat(np.arange(4), 4), tf.int32)

    def mirror_loss(images: np.ndarray) -> float:
        return float(trainer._losses(tf.constant(images), labels, None, None, None)[1]["mirror"])

    # Faces that are their own mirror image agree with it exactly; faces symmetric top to
    # bottom but not left to right do not.
    assert mirror_loss(np.concatenate([half, half[:, :, ::-1]], axis=2)) == pytest.approx(0, abs=1e-6)
    assert mirror_loss(np.concatenate([half.transpose(0, 2, 1, 3)[:, ::-1], half.transpose(0, 2, 1, 3)], axis=1)) > 1e-3


def test_teacher_basis_is_orthonormal_and_does_not_depend_on_face_order():
    rng = np.random.default_rng(1)
    teacher = (rng.normal(size=(200, 24)) * np.r_[np.full(8, 3.0), np.full(16, 0.1)]).astype(np.float32)
    teacher[5] = np.nan  # a face without a descriptor is left out
    basis = data.teacher_basis(teacher, 8)
    assert basis.shape == (24, 8)
    assert np.allclose(basis.T @ basis, np.eye(8), atol=1e-5)
    assert np.allclose(data.teacher_basis(teacher[::-1], 8), basis, atol=1e-5)  # signs fixed too
    # The axes span the 8 wide input axes.
    assert np.linalg.norm(basis[:8]) ** 2 > 0.99 * 8
    centre = data.teacher_centre(teacher)
    targets = data.teacher_targets(teacher[:4], centre, basis)
    assert np.allclose(targets, (teacher[:4] - centre) @ basis)


def test_a_wider_teacher_is_projected_on_its_principal_axes(synthetic_cache, tmp_path):
    """A teacher wider than the student (EdgeFace's 512-d for a 128-d student): targets are
    the centred descriptors on their principal axes, fixed for the run and kept on resume."""
    rng = np.random.default_rng(2)
    wide = tmp_path / "wide"
    shutil.copytree(synthetic_cache, wide)
    for path in sorted(wide.glob("teacher-*.npy")):
        narrow = np.load(path)
        np.save(path, np.hstack([narrow, rng.normal(0, 0.01, (len(narrow), 2 * DIM))]).astype(np.float32))
    config = make_config(wide, data={"teacher": True}, loss={"distillation": 1.0},
                         train={"steps": 2, "log_every": 1, "checkpoint_every": 1, "jit_compile": False})
    result = train.train(config, tmp_path / "run")
    assert np.isfinite(result.metrics["distillation"])
    basis = np.load(tmp_path / "run" / checkpoint.TEACHER_BASIS)
    assert basis.shape == (3 * DIM, DIM)
    # The narrow part carries nearly all the variance: the basis lies in it.
    assert np.linalg.norm(basis[:DIM]) ** 2 > 0.99 * DIM
    # Its mean alone maps nothing: no dlib-style centre travels with the weights.
    assert checkpoint.teacher_mean_of(tmp_path / "run") is None
    np.save(tmp_path / "run" / checkpoint.TEACHER_BASIS, basis[:, ::-1])  # resume reads the run's own basis back
    cache = train.load_training_cache(config)
    targets = train.student_space(cache.teacher, config, tmp_path / "run", resume=True).targets(cache.teacher)
    centre = np.load(tmp_path / "run" / checkpoint.TEACHER_MEAN)
    assert np.allclose(targets, (cache.teacher - centre) @ basis[:, ::-1], equal_nan=True)
    # A new run told to keep that run's space takes its centre and axes, not this cache's.
    kept = dataclasses.replace(config, data=dataclasses.replace(config.data, teacher_space=str(tmp_path / "run")))
    (tmp_path / "next").mkdir()
    space = train.student_space(cache.teacher, kept, tmp_path / "next", resume=False)
    assert np.array_equal(space.basis, basis[:, ::-1]) and np.array_equal(space.centre, centre)
    assert np.array_equal(np.load(tmp_path / "next" / checkpoint.TEACHER_BASIS), basis[:, ::-1])
    elsewhere = dataclasses.replace(config, data=dataclasses.replace(config.data, teacher_space=str(tmp_path)))
    with pytest.raises(ConfigError, match="holds no teacher_mean.npy"):
        train.student_space(cache.teacher, elsewhere, tmp_path / "next", resume=False)


class ViewColours:
    """Stands in for the EdgeFace export: a view's mean colour per row, spread over DIM values."""

    def __init__(self, onnx_path, threads=2, flip=True, spinning=True):
        assert not flip, "training views are flipped at random already"
        assert threads == 1 and not spinning, "the view teacher shares the cores with the training step"

    @staticmethod
    def describe(views: np.ndarray) -> np.ndarray:
        colours = views.reshape(len(views), -1, 3).mean(axis=1)
        return np.hstack([colours * (i + 1) for i in range(DIM // 3 + 1)])[:, :DIM].astype(np.float32)


def edgeface_cache(synthetic_cache: Path, root: Path) -> Path:
    cache = root / "edgeface"
    shutil.copytree(synthetic_cache, cache)
    (cache / "teacher.json").write_text('{"teacher": "edgeface"}\n')
    return cache


def view_teacher_trainer(config, run_dir: Path):
    """(cache, student space, trainer) of a run whose targets come from the (fake) view teacher."""
    cache = train.load_training_cache(config)
    run_dir.mkdir()
    space = train.student_space(cache.teacher, config, run_dir, resume=False)
    online = train.view_teacher(config, space, cache, run_dir)
    return cache, space, train.Trainer(config, run_dir, cache, view_teacher=online)


def test_a_view_teacher_describes_each_view_before_its_tight_cut(synthetic_cache, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "EdgeFaceTeacher", ViewColours)
    config = make_config(edgeface_cache(synthetic_cache, tmp_path), data={"teacher": True, "teacher_onnx": "t.onnx"},
                         batch={"unlabeled": 4}, loss={"distillation": 1.0}, augment={"tight": 1.0},
                         train={"steps": 2, "log_every": 1, "checkpoint_every": 1})
    cache, space, trainer = view_teacher_trainer(config, tmp_path / "run")
    batch = trainer.batches(1)
    index = trainer.batches.sampler.batch(1)
    rng = np.random.default_rng([config.train.seed, 1, 1])
    views = augment_views(cache.crops[index.ravel()], 96, config.augment, rng)
    images = cut_tight(views, config.augment, rng)
    np.testing.assert_array_equal(batch["images"].reshape(images.shape), images)
    assert not np.array_equal(images, views)  # every view was cut
    expected = space.targets(ViewColours.describe(views))
    np.testing.assert_allclose(batch["teacher"].reshape(expected.shape), expected, rtol=1e-6)
    assert batch["has_teacher"].all()  # the face without a cached descriptor gets one from its view
    # The cached descriptors still fix the space, and a run trains on the views' targets.
    assert space.centre is not None and np.allclose(space.centre, data.teacher_centre(cache.teacher))
    result = train.train(config, tmp_path / "trained")
    assert np.isfinite(result.metrics["distillation"])


def test_mixup_blends_the_unlabeled_views_and_the_teacher_describes_the_blends(synthetic_cache, tmp_path,
                                                                              monkeypatch):
    monkeypatch.setattr(train, "EdgeFaceTeacher", ViewColours)
    cache_dir = edgeface_cache(synthetic_cache, tmp_path)
    sections = dict(data={"teacher": True, "teacher_onnx": "t.onnx"}, loss={"distillation": 1.0},
                    train={"steps": 2, "log_every": 1, "checkpoint_every": 1})
    plain = make_config(cache_dir, batch={"unlabeled": 4}, **sections)
    mixed = make_config(cache_dir, batch={"unlabeled": 4, "mixup": 1.0}, **sections)
    batches = {"plain": view_teacher_trainer(plain, tmp_path / "plain")[2].batches(1)}
    cache, space, trainer = view_teacher_trainer(mixed, tmp_path / "mixed")
    batches["mixed"] = trainer.batches(1)
    labeled = trainer.spec.labeled
    # The labelled views, which the triplet loss sees, are untouched; every unlabeled one is a blend.
    np.testing.assert_array_equal(batches["mixed"]["images"][:, :labeled], batches["plain"]["images"][:, :labeled])
    changed = batches["mixed"]["images"][:, labeled:] != batches["plain"]["images"][:, labeled:]
    assert changed.any(axis=(2, 3, 4)).all()
    index = trainer.batches.sampler.batch(1)
    views = augment_views(cache.crops[index.ravel()], 96, mixed.augment,
                          np.random.default_rng([mixed.train.seed, 1, 1]))
    mix_rng = np.random.default_rng([mixed.train.seed, 1, 2])
    unlabeled = np.arange(labeled, len(views))
    blended = mix_faces(views, unlabeled[mix_rng.random(len(unlabeled)) < 1.0], mix_rng)
    np.testing.assert_array_equal(batches["mixed"]["images"].reshape(blended.shape), blended)
    expected = space.targets(ViewColours.describe(blended))
    np.testing.assert_allclose(batches["mixed"]["teacher"].reshape(expected.shape), expected, rtol=1e-6)
    result = train.train(mixed, tmp_path / "trained")
    assert np.isfinite(result.metrics["distillation"])


def test_mixup_needs_unlabeled_faces_and_a_view_teacher(synthetic_cache):
    teacher = {"data": {"teacher": True, "teacher_onnx": "t.onnx"}, "loss": {"distillation": 1.0}}
    with pytest.raises(ConfigError, match="batch.mixup > 0 blends unlabeled faces"):
        make_config(synthetic_cache, batch={"mixup": 0.5}, **teacher)
    with pytest.raises(ConfigError, match="batch.mixup > 0 blends unlabeled faces"):
        make_config(synthetic_cache, batch={"unlabeled": 4, "mixup": 0.5}, data={"teacher": True},
                    loss={"distillation": 1.0})
    with pytest.raises(ConfigError, match=r"batch.mixup 1.5: a probability in \[0, 1\]"):
        make_config(synthetic_cache, batch={"unlabeled": 4, "mixup": 1.5}, **teacher)


def test_a_view_teacher_needs_its_own_descriptors_in_the_cache(synthetic_cache, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "EdgeFaceTeacher", ViewColours)
    config = make_config(synthetic_cache, data={"teacher": True, "teacher_onnx": "t.onnx"}, loss={"distillation": 1.0})
    with pytest.raises(ConfigError, match="holds dlib's descriptors"):
        train.train(config, tmp_path / "run")
    with pytest.raises(ConfigError, match="data.teacher_onnx needs data.teacher = true"):
        make_config(synthetic_cache, data={"teacher_onnx": "t.onnx"})


class ViewMaps(ViewColours):
    """ViewColours with feature maps: each view's mean colour over a 6 x 6 grid (the tiny
    model's pool2 grid at 96 px), and two products of those colours."""

    @staticmethod
    def describe_with_features(views: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n, size = len(views), views.shape[1]
        blocks = views.reshape(n, 6, size // 6, 6, size // 6, 3).mean(axis=(2, 4)) / 255
        maps = np.concatenate([blocks, blocks[..., :2] * blocks[..., 1:]], axis=-1).astype(np.float32)
        return ViewColours.describe(views), maps


def hint_config(synthetic_cache, tmp_path, **loss):
    return make_config(edgeface_cache(synthetic_cache, tmp_path), data={"teacher": True, "teacher_onnx": "t.onnx"},
                       batch={"unlabeled": 4}, loss={"distillation": 1.0, "hint": 1.0, "hint_layer": "pool2", **loss},
                       train={"steps": 3, "log_every": 1, "checkpoint_every": 1, "jit_compile": True})


def test_the_hint_term_regresses_the_trunk_map_on_the_teachers(synthetic_cache, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "EdgeFaceTeacher", ViewMaps)
    # With mirrored views in the same pass, as the probe ran: only the views' own maps meet the teacher's.
    config = hint_config(synthetic_cache, tmp_path, mirror=1.0, mirror_views=3)
    cache, space, trainer = view_teacher_trainer(config, tmp_path / "run")
    # Each teacher channel is standardised by its mean and spread over centre crops of the cache's faces.
    faces = np.linspace(0, len(cache) - 1, min(train.FEATURE_SCALE_FACES, len(cache))).astype(int)
    maps = ViewMaps.describe_with_features(centre_crop(cache.crops[faces], 96))[1]
    mean, std = np.load(tmp_path / "run" / train.TEACHER_FEATURES_SCALE)
    np.testing.assert_allclose(mean, maps.mean(axis=(0, 1, 2)), rtol=1e-5)
    np.testing.assert_allclose(std, maps.std(axis=(0, 1, 2)) + 1e-6, rtol=1e-5)
    batch = trainer.batches(1)
    index = trainer.batches.sampler.batch(1)
    rng = np.random.default_rng([config.train.seed, 1, 1])
    views = augment_views(cache.crops[index.ravel()], 96, config.augment, rng)
    expected = (ViewMaps.describe_with_features(views)[1] - mean) / std
    np.testing.assert_allclose(batch["teacher_features"].reshape(expected.shape), expected, rtol=1e-5, atol=1e-6)
    # The adapter starts at the least-squares map: the teacher maps are colours of the view,
    # which the model's pool2 map explains in part.
    unexplained = trainer.fit_adapter(steps=2)
    assert 0 < unexplained < 1
    _, metrics, _ = trainer._losses(tf.constant(batch["images"][0]), tf.constant(batch["labels"][0]),
                                    tf.constant(batch["teacher"][0]), tf.constant(batch["has_teacher"][0]), None,
                                    tf.constant(batch["teacher_features"][0]))
    assert 0 < float(metrics["hint"]) < 1.5
    # Under XLA, and resumed with the adapter it had.
    result = train.train(config, tmp_path / "trained")
    assert result.step == 3 and np.isfinite(result.metrics["hint"])
    longer = dataclasses.replace(config, train=dataclasses.replace(config.train, steps=4))
    assert train.train(longer, tmp_path / "trained", resume=True).step == 4


def test_the_hint_layer_must_lie_on_the_teachers_grid(synthetic_cache, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "EdgeFaceTeacher", ViewMaps)
    with pytest.raises(ConfigError, match="pool1 is a 24x24 map, the teacher's 6x6"):
        view_teacher_trainer(hint_config(synthetic_cache, tmp_path / "a", hint_layer="pool1"), tmp_path / "a" / "run")
    with pytest.raises(ConfigError, match="loss.hint_layer 'inception_4a_concat' is not a layer of tiny"):
        view_teacher_trainer(hint_config(synthetic_cache, tmp_path / "b", hint_layer="inception_4a_concat"),
                             tmp_path / "b" / "run")
    with pytest.raises(ConfigError, match=r"loss.hint > 0 needs data.teacher_onnx"):
        make_config(synthetic_cache, data={"teacher": True}, loss={"hint": 1.0})


def test_mixed_bfloat16_keeps_the_embedding_float32(synthetic_cache, tmp_path):
    config = make_config(synthetic_cache, train={"steps": 2, "log_every": 1, "jit_compile": False,
                                                 "precision": "mixed_bfloat16"})
    result = train.train(config, tmp_path / "run")
    assert np.isfinite(result.metrics["loss"])
    model = checkpoint.load_keras_model(tmp_path / "run")
    assert model.get_layer("embedding_dense").compute_dtype == "float32"
    assert models.build_model("tiny").get_layer("conv1").compute_dtype == "float32"  # the policy did not leak


def test_compact_weights_round_trip_and_feed_training(synthetic_cache, trained_run, tmp_path, capsys):
    assert cli.main(["export-weights", str(trained_run), "--out", str(tmp_path / "w.npz")]) == 0
    assert "w.npz" in capsys.readouterr().out
    original = checkpoint.load_keras_model(trained_run)
    restored = checkpoint.load_keras_model(tmp_path / "w.npz")
    assert restored.name == "tiny" and restored.output_shape[-1] == DIM
    crops = np.random.default_rng(1).random((4, 96, 96, 3)).astype(np.float32)
    cosine = np.sum(original(crops).numpy() * restored(crops).numpy(), axis=1)
    assert cosine.min() > 0.9999  # float16 kernels: a rounding, not a different model
    # Both a harmonic reference and a starting point, without naming the architecture.
    config = make_config(
        synthetic_cache, loss={"harmonic": 1.0}, model={"init_weights": str(tmp_path / "w.npz")},
        harmonic={"old_model": str(tmp_path / "w.npz")}, train={"steps": 2, "log_every": 1, "jit_compile": False},
    )
    result = train.train(config, tmp_path / "run")
    assert result.metrics["harmonic"] < 0.2


def test_export_weights_averages_checkpoints_of_a_run(trained_run, tmp_path, capsys):
    steps = [trained_run / checkpoint.CHECKPOINTS / f"ckpt-{n}" for n in (20, 40)]
    at_20, at_40 = (checkpoint.load_keras_model(p) for p in steps)
    assert any(not np.array_equal(a, b) for a, b in zip(at_20.get_weights(), at_40.get_weights()))
    assert cli.main(["export-weights", *map(str, steps), "--out", str(tmp_path / "mean.npz")]) == 0
    assert "the mean of 2 models" in capsys.readouterr().out
    averaged = checkpoint.load_keras_model(tmp_path / "mean.npz")
    for a, b, mean in zip(at_20.get_weights(), at_40.get_weights(), averaged.get_weights()):
        np.testing.assert_allclose(mean, (a + b) / 2, rtol=2e-3, atol=1e-6)  # float16 kernels in the file
    # The latest checkpoint is what the run folder itself loads.
    for a, b in zip(at_40.get_weights(), checkpoint.load_keras_model(trained_run).get_weights()):
        assert np.array_equal(a, b)


def test_export_weights_refuses_to_average_other_architectures(trained_run, tmp_path):
    other = checkpoint.save_compact(models.build_model("tiny", embedding_size=DIM + 1), tmp_path / "wide.npz")
    with pytest.raises(SystemExit, match=r"wide.npz is not the architecture of .*cannot average them"):
        cli.main(["export-weights", str(trained_run), str(other), "--out", str(tmp_path / "mean.npz")])
    with pytest.raises(SystemExit, match=r"export-weights: error: .*missing does not exist"):
        cli.main(["export-weights", str(tmp_path / "missing"), "--out", str(tmp_path / "x.npz")])
    assert not (tmp_path / "mean.npz").exists()


def test_compact_weights_refuse_another_model_or_file(trained_run, tmp_path):
    checkpoint.save_compact(checkpoint.load_keras_model(trained_run), tmp_path / "w.npz")
    with pytest.raises(ValueError, match=r"embedding_dense/kernel is \(16, 16\), tiny needs \(16, 17\)"):
        checkpoint.load_into(models.build_model("tiny", embedding_size=DIM + 1), tmp_path / "w.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="not a compact weights file"):
        checkpoint.load_compact(tmp_path / "other.npz")


def test_teacher_head_recovers_a_linear_map():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(500, 12))
    kernel, bias = rng.normal(size=(12, 6)), rng.normal(size=6)
    targets = features @ kernel + bias
    fitted_kernel, fitted_bias = teacher_head.fit_head(features, targets, ridge=1e-9)
    fitted = features @ fitted_kernel + fitted_bias
    # Unit targets are not linear in the features: the fit points the same way, at another length.
    cosine = np.sum(fitted * targets, axis=1) / np.linalg.norm(fitted, axis=1) / np.linalg.norm(targets, axis=1)
    assert cosine.mean() > 0.95


def test_fit_rotation_recovers_a_rotation():
    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(300, 8))
    rotation, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    fitted = teacher_head.fit_rotation(embeddings, embeddings @ rotation * 3.0)
    np.testing.assert_allclose(fitted, rotation, atol=1e-5)


def test_teacher_head_rotate_keeps_every_distance(synthetic_cache, trained_run, tmp_path, capsys):
    out = tmp_path / "rotated.weights.h5"
    argv = ["teacher-head", str(trained_run), "--cache", str(synthetic_cache), "--faces", "60", "--rotate",
            "--out", str(out)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    before, after = (float(v) for v in re.findall(r"(-?\d\.\d{3})", printed)[:2])
    assert "head rotated" in printed and after > before
    cache = data.load_cache(synthetic_cache)
    student = checkpoint.load_keras_model(trained_run)
    crops = normalise(centre_crop(cache.crops[:20], 96).astype(np.float32), evaluation.default_card(student))
    original = student(crops).numpy()
    student.load_weights(out)
    rotated = student(crops).numpy()
    assert not np.allclose(rotated, original, atol=1e-3)
    np.testing.assert_allclose(rotated @ rotated.T, original @ original.T, atol=1e-4)


def test_teacher_head_moves_the_student_into_the_teacher_space(synthetic_cache, trained_run, tmp_path, capsys):
    out = tmp_path / "head.weights.h5"
    argv = ["teacher-head", str(trained_run), "--cache", str(synthetic_cache), "--faces", "60", "--out", str(out)]
    assert cli.main(argv) == 0
    assert "mean cosine to the centred teacher" in capsys.readouterr().out
    cache = data.load_cache(synthetic_cache, with_teacher=True)
    keep = np.isfinite(cache.teacher).all(axis=1)
    teacher = cache.teacher[keep] - cache.teacher[keep].mean(axis=0)
    teacher /= np.linalg.norm(teacher, axis=1, keepdims=True)
    student = checkpoint.load_keras_model(trained_run)
    crops = normalise(centre_crop(cache.crops[keep], 96).astype(np.float32), evaluation.default_card(student))

    def cosine(model):
        return float(np.mean(np.sum(model(crops).numpy() * teacher, axis=1)))

    before = cosine(student)
    student.load_weights(out)
    assert cosine(student) > before + 0.2
    with pytest.raises(ValueError, match="faces with teacher descriptors"):
        cli.main(["teacher-head", str(trained_run), "--cache", str(synthetic_cache), "--faces", "500",
                  "--out", str(out)])


def test_xla_compiles_every_loss_term(synthetic_cache, trained_run, tmp_path):
    """The configs' default: the forward and backward pass under XLA (about 20 s to compile here)."""
    config = make_config(
        synthetic_cache,
        data={"teacher": True},
        batch={"unlabeled": 2},
        loss={"distillation": 0.5, "relational": 1.0, "memory_relational": 1.0, "memory_size": 40,
              "prototype": 1.0, "mirror": 1.0, "mirror_views": 3, "harmonic": 1.0},
        harmonic={"old_model": str(trained_run / checkpoint.KERAS_MODEL)},
        train={"steps": 2, "log_every": 1, "jit_compile": True},
    )
    result = train.train(config, tmp_path / "run")
    assert result.step == 2 and all(np.isfinite(v) for v in result.metrics.values())


def test_mirrored_strategy_over_two_cpus(synthetic_cache, tmp_path):
    """The multi-replica path (what several GPUs get), on two logical CPU devices."""
    script = textwrap.dedent(f"""
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_train import TINY, make_config
        from facenet_train import models, train
        models.MODELS["tiny"] = TINY
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        # with the cross-batch memory, which each replica keeps for itself
        config = make_config({str(synthetic_cache)!r}, train={{"steps": 3, "log_every": 1}}, batch={{"p": 4, "k": 3}},
                             data={{"teacher": True}}, loss={{"memory_relational": 1.0, "memory_size": 24}})
        result = train.train(config, {str(tmp_path / "run")!r}, strategy=strategy)
        print("RESULT", strategy.num_replicas_in_sync, result.step, result.metrics["loss"])
        """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    replicas, step, loss = done.stdout.split("RESULT")[1].split()
    assert (replicas, step) == ("2", "3") and np.isfinite(float(loss))


def test_model_and_cache_sizes_must_agree(synthetic_cache, tmp_path):
    config = make_config(synthetic_cache, model={"name": "nns2"})
    with pytest.raises(ConfigError, match="--crop-size 140"):
        train.train(config, tmp_path / "run")


def test_a_model_trains_at_another_input_size_from_weights_of_its_own(synthetic_cache, trained_run, tmp_path):
    config = make_config(synthetic_cache, model={"input_size": 64})
    with pytest.raises(ConfigError, match="set model.input_size = 96"):
        train.train(config, tmp_path / "refused")
    # The same faces cropped at 64 px: the 96 px model's weights start the 64 px run.
    names = data.CacheManifest.load(synthetic_cache).shards
    shards = [np.load(synthetic_cache / name) for name in names]
    crops = np.stack([cv2.resize(c, (80, 80), interpolation=cv2.INTER_AREA) for s in shards for c in s["crops"]])
    labels = np.concatenate([s["labels"] for s in shards])
    teacher = np.concatenate([np.load(synthetic_cache / data.teacher_name(name)) for name in names])
    small = write_cache(tmp_path / "cache64", crops, labels, teacher)
    weights = checkpoint.save_compact(checkpoint.load_keras_model(trained_run), tmp_path / "w96.npz")
    config = make_config(small, model={"input_size": 64, "init_weights": str(weights)}, train={"steps": 2})
    assert train.train(config, tmp_path / "run64").step == 2
    # The run folder and its compact export both rebuild the model at 64 px.
    model = checkpoint.load_keras_model(tmp_path / "run64")
    exported = checkpoint.load_compact(checkpoint.save_compact(model, tmp_path / "w64.npz"))
    assert tuple(model.input_shape) == tuple(exported.input_shape) == (None, 64, 64, 3)
    assert models.input_size_of(exported) == 64 and models.input_size_of(checkpoint.load_compact(weights)) == 0


def test_describe_prints_the_flop_table(capsys):
    assert cli.main(["describe", "tiny", "--embedding-size", "16"]) == 0
    out = capsys.readouterr().out
    assert "conv1" in out and "params" in out


# ---------------------------------------------------------------- evaluation


@pytest.fixture(scope="module")
def fake_lfw(astronaut, tmp_path_factory) -> Path:
    """10 'people' x 2 astronaut variants and a pairs.txt of 10 folds (1 matched + 1
    mismatched pair each)."""
    root = tmp_path_factory.mktemp("lfw")
    for k in range(10):
        person = root / f"Person_{k}"
        person.mkdir()
        for n in (1, 2):
            variant = cv2.resize(astronaut, (250, 250))
            variant = np.clip(variant.astype(int) + 8 * k - 40 + 5 * n, 0, 255).astype(np.uint8)
            if n == 2:
                variant = np.ascontiguousarray(variant[:, ::-1])
            cv2.imwrite(str(person / f"Person_{k}_{n:04d}.jpg"), cv2.cvtColor(variant, cv2.COLOR_RGB2BGR))
    lines = ["10\t1"]
    for k in range(10):
        lines += [f"Person_{k}\t1\t2", f"Person_{k}\t1\tPerson_{(k + 1) % 10}\t2"]
    (root / "pairs.txt").write_text("\n".join(lines) + "\n")
    return root


def _tflite(model_path: Path, out: Path) -> Path:
    """float32 TFLite of a .keras model, with a default card beside it."""
    model = checkpoint.load_keras_model(model_path)
    out.write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
    evaluation.default_card(model).save(out.with_suffix(".json"))
    return out


def test_evaluate_keras_and_tflite_the_same_way(trained_run, fake_lfw, tmp_path, capsys):
    cache = tmp_path / "lfw_cache"
    assert cli.main(["preprocess-lfw", "--lfw", str(fake_lfw), "--out", str(cache), "--workers", "1"]) == 0
    assert data.CacheManifest.load(cache).sources["lfw"]["faces"] == 20

    keras_json, roc, failures = tmp_path / "keras.json", tmp_path / "roc.png", tmp_path / "failures.png"
    assert cli.main(["evaluate", "--checkpoint", str(trained_run), "--lfw", str(fake_lfw),
                     "--aligned-cache", str(cache), "--out", str(keras_json), "--roc", str(roc),
                     "--failures", str(failures)]) == 0
    scores = json.loads(keras_json.read_text())
    assert 0 <= scores["accuracy_mean"] <= 1 and len(scores["fold_accuracies"]) == 10
    assert roc.stat().st_size > 1000
    assert "false rejects and" in capsys.readouterr().out
    assert cv2.imread(str(failures)).shape[1] == 4 * 96 + 12

    # Without a cache, crops are made on the spot by the same code: same scores.
    fresh = tmp_path / "fresh.json"
    assert cli.main(["evaluate", "--checkpoint", str(trained_run / checkpoint.KERAS_MODEL), "--lfw", str(fake_lfw),
                     "--workers", "1", "--out", str(fresh)]) == 0
    assert json.loads(fresh.read_text())["accuracy_mean"] == scores["accuracy_mean"]

    # With the mirror images: the same plain scores, plus how alike the two are described.
    mirrored_json = tmp_path / "mirror.json"
    assert cli.main(["evaluate", "--checkpoint", str(trained_run), "--lfw", str(fake_lfw),
                     "--aligned-cache", str(cache), "--mirror", "--out", str(mirrored_json)]) == 0
    mirrored = json.loads(mirrored_json.read_text())
    assert mirrored["fold_accuracies"] == scores["fold_accuracies"]
    pairs = evaluation.LfwCropPairs.load(fake_lfw, cache, 96)
    embed = evaluation.keras_embedder(checkpoint.load_keras_model(trained_run))
    plain, flipped = pairs.embeddings(embed), embed(np.ascontiguousarray(pairs.crops[:, :, ::-1]))
    assert mirrored["mirror"]["cosine_mean"] == pytest.approx(np.mean(np.sum(plain * flipped, axis=1)), abs=1e-5)
    assert len(mirrored["mirror"]["flip_averaged"]["fold_accuracies"]) == 10
    assert "mirror images: mean cosine" in capsys.readouterr().out

    tflite = _tflite(trained_run / checkpoint.KERAS_MODEL, tmp_path / "tiny.tflite")
    tflite_json = tmp_path / "tflite.json"
    assert cli.main(["evaluate", "--tflite", str(tflite), "--lfw", str(fake_lfw), "--aligned-cache", str(cache),
                     "--out", str(tflite_json)]) == 0
    tflite_scores = json.loads(tflite_json.read_text())
    assert tflite_scores["fold_accuracies"] == scores["fold_accuracies"]
    assert tflite_scores["best_threshold"] == pytest.approx(scores["best_threshold"], abs=0.01)
    assert "accuracy" in capsys.readouterr().out

    # The runtime path: full images through detector, aligner and interpreter, no crop cache.
    runtime_json = tmp_path / "runtime.json"
    assert cli.main(["evaluate", "--tflite", str(tflite), "--lfw", str(fake_lfw), "--runtime-path",
                     "--out", str(runtime_json)]) == 0
    runtime = json.loads(runtime_json.read_text())
    assert runtime["detector"] == DEFAULT_DETECTOR and runtime["pairs"] == 20 and runtime["found"] == 20
    assert 0 <= runtime["accuracy_mean"] <= 1 and len(runtime["fold_accuracies"]) == 10
    assert "runtime path" in capsys.readouterr().out
    with pytest.raises(ValueError, match="neither --aligned-cache, --failures nor --mirror"):
        cli.main(["evaluate", "--tflite", str(tflite), "--lfw", str(fake_lfw), "--runtime-path",
                  "--aligned-cache", str(cache)])


def test_evaluate_refuses_a_cache_of_another_crop_size(trained_run, fake_lfw, tmp_path):
    cache = tmp_path / "lfw_112"
    preprocess.build_lfw_cache(fake_lfw, cache, preprocess.CropOptions(crop_size=112))
    with pytest.raises(ValueError, match="--crop-size 96"):
        cli.main(["evaluate", "--checkpoint", str(trained_run), "--lfw", str(fake_lfw), "--aligned-cache", str(cache)])


@pytest.mark.skipif(not (REAL_LFW / "pairs.txt").is_file(), reason=f"LFW not found at {REAL_LFW} (../shared/data/lfw)")
def test_real_lfw_pairs_name_existing_images():
    samples = preprocess.lfw_samples(REAL_LFW)
    assert len(samples) == len({s.path for s in samples}) > 7000
    assert all(Path(s.path).is_file() for s in samples)
    assert all(s.identity == f"lfw/{Path(s.path).parent.name}" for s in samples)
