"""``facenet-train train``: a custom step under a ``tf.distribute`` strategy (``MirroredStrategy`` over the
GPUs when there are any, else the default strategy: the same code either way). Batches
are P identities x K faces (+ unlabeled faces for distillation) drawn from the in-memory
crop cache as a pure function of (seed, step), augmented with OpenCV in a tf.data
generator thread while the model runs. A resumed run therefore sees exactly the batches
the stopped one would have: the checkpoint holds model, optimizer and step, and the step
is the whole sampler/augmentation RNG state.

The run folder's layout is ``checkpoint``'s; with ``train.eval_every`` the run is scored
on LFW by ``evaluation``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf
from tqdm import tqdm

import keras
from facenet_edge.embed import normalise
from tensorflow.core.framework import summary_pb2

from . import data, losses
from .augment import augment_views, centre_crop, cut_tight, mix_faces
from .checkpoint import (
    CHECKPOINTS,
    CONFIG_JSON,
    KERAS_MODEL,
    LOGS,
    TEACHER_BASIS,
    TEACHER_MEAN,
    WEIGHTS,
    load_compact,
    load_into,
    run_config,
)
from .config import Config, ConfigError, config_from_dict, load_config
from .edgeface import EdgeFaceTeacher
from .evaluation import LfwCropPairs, default_card, keras_embedder
from .memory import BatchMemory
from .models import build_model, input_shape
from .teacher import cached_teacher

# A run's per-channel mean and standard deviation of the teacher's feature maps (loss.hint).
TEACHER_FEATURES_SCALE = "teacher_features_scale.npy"
# Faces whose centre crops fix that scale, and training batches the hint adapter is first fitted on.
FEATURE_SCALE_FACES, ADAPTER_FIT_STEPS = 512, 4


@dataclass(frozen=True)
class ViewTargets:
    """What the view teacher says of a batch's views: (N, D) targets in the student's space
    and, for the hint term, (N, H, W, C) feature maps with each channel standardised."""

    targets: np.ndarray
    features: np.ndarray | None = None


class ViewTeacher:
    """``data.teacher_onnx`` describing training views, without its mirror (the views are
    flipped at random already): targets in the student's space and, with a ``feature_scale``
    ((2, C): each channel's mean and standard deviation), standardised feature maps."""

    def __init__(self, teacher: EdgeFaceTeacher, space: StudentSpace, size: int,
                 feature_scale: np.ndarray | None = None):
        self.teacher, self.space, self.feature_scale = teacher, space, feature_scale
        self.feature_shape: tuple[int, ...] = ()
        if feature_scale is not None:
            self.feature_shape = teacher.describe_with_features(np.zeros((1, size, size, 3), np.uint8))[1].shape[1:]
            if self.feature_shape[-1] != feature_scale.shape[1]:
                raise ConfigError(f"the teacher's maps have {self.feature_shape[-1]} channels, the run's "
                                  f"{TEACHER_FEATURES_SCALE} {feature_scale.shape[1]}")

    def __call__(self, views: np.ndarray) -> ViewTargets:
        if self.feature_scale is None:
            return ViewTargets(self.space.targets(self.teacher.describe(views)))
        descriptors, features = self.teacher.describe_with_features(views)
        mean, std = self.feature_scale
        return ViewTargets(self.space.targets(descriptors), ((features - mean) / std).astype(np.float32))


# ---------------------------------------------------------------- data feeding


@dataclass(frozen=True)
class FeedSpec:
    """Shapes of one step's batch: ``replicas`` rows of ``per_replica`` faces, the first
    ``labeled`` of each row in P x K order."""

    replicas: int
    per_replica: int
    labeled: int
    size: int
    teacher_dim: int  # 0: no distillation targets fed
    feature_shape: tuple[int, ...] = ()  # (H, W, C) of the teacher's maps; (): none fed


class Batches:
    """The batch of any step, as numpy arrays shaped (replicas, per_replica, ...). With a
    ``view_teacher`` the distillation targets are its description of each view before the
    tight cut, rather than the cached ones of the clean crops; ``batch.mixup`` of the
    unlabeled views are blends of two faces."""

    def __init__(self, cache: data.FaceCache, sampler: data.PKSampler, config: Config, spec: FeedSpec,
                 view_teacher: ViewTeacher | None = None):
        self.cache, self.sampler, self.config, self.spec = cache, sampler, config, spec
        self.view_teacher = view_teacher

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        spec = self.spec
        index = self.sampler.batch(step)
        rng = np.random.default_rng([self.config.train.seed, step, 1])
        views = augment_views(self.cache.crops[index.ravel()], spec.size, self.config.augment, rng)
        if self.config.batch.mixup:
            # Its own random stream: runs without mixup keep the views they always had.
            mix_rng = np.random.default_rng([self.config.train.seed, step, 2])
            unlabeled = np.flatnonzero(np.arange(views.shape[0]) % spec.per_replica >= spec.labeled)
            views = mix_faces(views, unlabeled[mix_rng.random(len(unlabeled)) < self.config.batch.mixup], mix_rng)
        images = cut_tight(views, self.config.augment, rng)
        batch = {
            "images": images.reshape(spec.replicas, spec.per_replica, spec.size, spec.size, 3),
            "labels": self.cache.labels[index].astype(np.int32),
        }
        if spec.teacher_dim:
            if self.view_teacher is None:
                teacher = self.cache.teacher[index]
            else:
                said = self.view_teacher(views)
                teacher = said.targets.reshape(*index.shape, spec.teacher_dim)
                if spec.feature_shape:
                    batch["teacher_features"] = said.features.reshape(*index.shape, *spec.feature_shape)
            batch["has_teacher"] = ~np.isnan(teacher).any(axis=-1)
            batch["teacher"] = np.nan_to_num(teacher).astype(np.float32)
        return batch

    def dataset(self, start: int, stop: int) -> tf.data.Dataset:
        """Steps ``start``..``stop`` - 1, made in a background thread, two steps ahead."""
        spec = self.spec
        signature = {
            "images": tf.TensorSpec((spec.replicas, spec.per_replica, spec.size, spec.size, 3), tf.uint8),
            "labels": tf.TensorSpec((spec.replicas, spec.per_replica), tf.int32),
        }
        if spec.teacher_dim:
            signature["teacher"] = tf.TensorSpec((spec.replicas, spec.per_replica, spec.teacher_dim), tf.float32)
            signature["has_teacher"] = tf.TensorSpec((spec.replicas, spec.per_replica), tf.bool)
        if spec.feature_shape:
            signature["teacher_features"] = tf.TensorSpec((spec.replicas, spec.per_replica, *spec.feature_shape),
                                                          tf.float32)
        steps = lambda: (self(step) for step in range(start, stop))  # noqa: E731
        return tf.data.Dataset.from_generator(steps, output_signature=signature).prefetch(2)


def load_training_cache(config: Config) -> data.FaceCache:
    """The crop cache the config names, minus excluded people (and unlabeled faces when
    no batch uses them), with teacher descriptors when distillation is on."""
    filters: list[data.ShardFilter] = []
    if config.data.sources:
        filters.append(lambda shard: np.isin(shard["sources"], config.data.sources))
    excluded: set[str] = set()
    for path in config.data.exclude:
        excluded |= data.read_overlap(path)
    if excluded:
        filters.append(data.without_people(excluded))
    if not config.batch.unlabeled:  # unlabeled faces would only take memory (UTKFace: 0.9 GB)
        filters.append(lambda shard: shard["labels"] >= 0)
    cache = data.load_cache(config.data.cache, with_teacher=config.data.teacher, filters=filters,
                            partial_teacher=config.data.partial_teacher)
    # A view teacher describes every face's views; only the cached descriptors can be missing.
    if cache.teacher is not None and np.isnan(cache.teacher).any() and not config.data.teacher_onnx:
        without = int(np.isnan(cache.teacher).any(axis=1).sum())
        print(f"{without} of {len(cache.teacher)} faces have no teacher descriptor: triplet loss only for them")
    data.check_aligner(cache.manifest, config.data.cache)
    return cache


# ---------------------------------------------------------------- model, optimizer


def make_strategy() -> tf.distribute.Strategy:
    """All local GPUs when there are any, else the default (single-device) strategy."""
    gpus = tf.config.list_logical_devices("GPU")
    return tf.distribute.MirroredStrategy() if gpus else tf.distribute.get_strategy()


class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from 0 to the peak over ``warmup`` steps, then ``after`` (counted
    from the end of the warm-up)."""

    def __init__(self, peak: float, warmup: int, after: Callable | float):
        self.peak, self.warmup, self.after = peak, warmup, after

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        later = self.after(tf.maximum(step - self.warmup, 0.0)) if callable(self.after) else tf.constant(self.after)
        if not self.warmup:
            return later
        return tf.where(step < self.warmup, self.peak * (step + 1) / self.warmup, later)

    def get_config(self):
        after = keras.saving.serialize_keras_object(self.after) if callable(self.after) else self.after
        return {"peak": self.peak, "warmup": self.warmup, "after": after}


def make_schedule(config: Config) -> WarmupSchedule:
    s, peak, steps = config.schedule, config.optimizer.learning_rate, config.train.steps
    decay_steps = max(steps - s.warmup_steps, 1)
    if s.kind == "cosine":
        after = keras.optimizers.schedules.CosineDecay(peak, decay_steps, alpha=s.final_fraction)
    elif s.kind == "step":
        values = [peak * s.factor**i for i in range(len(s.boundaries) + 1)]
        boundaries = [max(b - s.warmup_steps, 0) for b in s.boundaries]
        after = keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values) if boundaries else peak
    else:
        after = peak
    return WarmupSchedule(peak, s.warmup_steps, after)


def make_optimizer(config: Config) -> keras.optimizers.Optimizer:
    o = config.optimizer
    common = {"learning_rate": make_schedule(config)}
    if o.clipnorm:
        common["clipnorm"] = o.clipnorm
    if o.weight_decay:
        common["weight_decay"] = o.weight_decay
    if o.name == "adam":
        return keras.optimizers.Adam(**common)
    if o.name == "adagrad":
        return keras.optimizers.Adagrad(**common)
    return keras.optimizers.SGD(momentum=o.momentum, **common)


def load_old_model(config: Config) -> keras.Model:
    """The frozen old model of a harmonic run."""
    h = config.harmonic
    if h.old_model.endswith(".keras"):
        old = keras.models.load_model(h.old_model, compile=False)
    elif h.old_model.endswith(".npz"):
        old = load_compact(h.old_model)
    else:
        old = build_model(h.old_name, embedding_size=h.old_embedding_size)
        old.load_weights(h.old_model)
    old.trainable = False
    return old


# tf.summary.scalar lives in the tensorboard package, which tensorflow-cpu does not pull
# in; writing the tensor with the scalar plugin's metadata makes the same event record.
SCALAR_METADATA = summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))


def write_scalars(writer, step: int, values: dict[str, float], prefix: str = "") -> None:
    """TensorBoard scalars, readable by TensorBoard's scalar dashboard."""
    with writer.as_default(step=step):
        for name, value in values.items():
            tf.summary.write(prefix + name, tf.constant(value, tf.float32), metadata=SCALAR_METADATA)


# ---------------------------------------------------------------- training


@dataclass(frozen=True)
class TrainResult:
    """Where a run stopped and its last logged metrics."""

    step: int
    metrics: dict[str, float]
    run_dir: Path


class Trainer:
    """One run: model, optimizer, checkpoint and the distributed train step."""

    def __init__(self, config: Config, run_dir: Path, cache: data.FaceCache,
                 strategy: tf.distribute.Strategy | None = None, view_teacher: ViewTeacher | None = None):
        self.config, self.run_dir = config, run_dir
        # Each identity's centre, from the cached targets (already in the student's space).
        self.prototypes = (tf.constant(data.teacher_prototypes(cache.teacher, cache.labels))
                           if config.loss.needs_prototypes else None)
        self.strategy = strategy or make_strategy()
        replicas = self.strategy.num_replicas_in_sync
        m, size = config.model, cache.manifest.crop_size
        height, width, _ = input_shape(m.name, m.input_size)
        if (height, width) != (size, size):
            raise ConfigError(f"model {m.name} takes {width}x{height} crops, the cache holds {size}px crops; "
                              f"preprocess with --crop-size {height} or set model.input_size = {size}")
        b = config.batch
        sampling = data.SamplerConfig(b.p, b.k, b.unlabeled, b.identity_power, config.train.seed)
        sampler = data.PKSampler(cache.labels, sampling, replicas=replicas)
        teacher_dim = cache.teacher.shape[1] if config.loss.needs_teacher else 0
        if teacher_dim and teacher_dim != config.model.embedding_size:
            raise ConfigError(f"the teacher's descriptors are {teacher_dim}-d; "
                              f"its targets need model.embedding_size = {teacher_dim}")
        if config.loss.needs_features and (view_teacher is None or not view_teacher.feature_shape):
            raise ConfigError("the hint term needs a view teacher with feature maps (data.teacher_onnx)")
        feature_shape = view_teacher.feature_shape if config.loss.needs_features else ()
        self.spec = FeedSpec(replicas, sampler.batch_size // replicas, b.p * b.k // replicas, size, teacher_dim,
                             feature_shape)
        if config.loss.needs_mirrors and config.loss.mirror_views > self.spec.per_replica:
            raise ConfigError(f"loss.mirror_views {config.loss.mirror_views} exceeds the {self.spec.per_replica} "
                              f"faces of each of the {replicas} replicas' batches")
        self.batches = Batches(cache, sampler, config, self.spec, view_teacher)
        self.identities = sampler.identities
        with self.strategy.scope():
            keras.utils.set_random_seed(config.train.seed)
            # The layers keep the policy they were built with; nothing built later inherits it.
            keras.mixed_precision.set_global_policy(config.train.precision)
            self.model = build_model(m.name, embedding_size=m.embedding_size, input_size=m.input_size)
            keras.mixed_precision.set_global_policy("float32")
            self.card = default_card(self.model)  # its preprocessing is the model's input, as on the device
            self.features_model, self.adapter = self._hint_parts(feature_shape)
            # The adapter is training-only: the weights saved are the model's.
            self.variables = self.model.trainable_variables + (self.adapter.trainable_variables if self.adapter else [])
            self.old_model = load_old_model(config) if config.loss.needs_old_model else None
            self.memory = (BatchMemory(config.loss.memory_size, m.embedding_size, teacher_dim)
                           if config.loss.needs_memory else None)
            self.optimizer = make_optimizer(config)
            self.optimizer.build(self.variables)  # slots exist before a restore
            self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
            parts = {"adapter": self.adapter} if self.adapter else {}
            self.checkpoint = tf.train.Checkpoint(model=self.model, optimizer=self.optimizer, step=self.step, **parts)
        self.manager = tf.train.CheckpointManager(self.checkpoint, run_dir / CHECKPOINTS,
                                                  max_to_keep=config.train.keep_checkpoints)
        self._losses_fn = tf.function(self._losses, jit_compile=config.train.jit_compile)
        self._step_fn = tf.function(self._distributed_step)

    def _hint_parts(self, feature_shape: tuple[int, ...]) -> tuple[keras.Model | None, keras.layers.Layer | None]:
        """For the hint term: the model with its hint layer's map as a second output, and the
        1x1 convolution taking that map to the teacher's channels; else (None, None)."""
        if not feature_shape:
            return None, None
        name = self.config.loss.hint_layer
        try:
            layer = self.model.get_layer(name)
        except ValueError:
            raise ConfigError(f"loss.hint_layer {name!r} is not a layer of {self.config.model.name}") from None
        grid = tuple(layer.output.shape[1:3])
        if grid != tuple(feature_shape[:2]):
            raise ConfigError(f"loss.hint_layer {name} is a {grid[0]}x{grid[1]} map, the teacher's "
                              f"{feature_shape[0]}x{feature_shape[1]}: choose a layer of the teacher's grid")
        adapter = keras.layers.Conv2D(feature_shape[2], 1, name="hint_adapter")
        adapter.build(layer.output.shape)
        return keras.Model(self.model.inputs, [self.model.output, layer.output]), adapter

    def _forward(self, x: tf.Tensor, training: bool) -> tuple[tf.Tensor, tf.Tensor | None]:
        """Embeddings of ``x`` and, for the hint term, its hint-layer maps."""
        if self.features_model is None:
            return self.model(x, training=training), None
        embeddings, features = self.features_model(x, training=training)
        return embeddings, features

    def _losses(self, images: tf.Tensor, labels: tf.Tensor, teacher: tf.Tensor | None,
                has_teacher: tf.Tensor | None, memory: losses.MemoryRows | None,
                teacher_features: tf.Tensor | None = None
                ) -> tuple[list[tf.Tensor], dict[str, tf.Tensor], tf.Tensor]:
        """(gradients, metrics, embeddings) of one replica's batch; XLA-compiled when configured."""
        cfg = self.config.loss
        x = normalise(tf.cast(images, tf.float32), self.card)
        rows = tf.shape(x)[0]
        with tf.GradientTape() as tape:
            if cfg.needs_mirrors:
                # The mirror images join the same forward pass (one batch-norm batch with their originals).
                both, features = self._forward(tf.concat([x, tf.reverse(x[: cfg.mirror_views], axis=[2])], axis=0),
                                               training=True)
                embeddings, mirror_embeddings = both[:rows], both[rows:]
            else:
                (embeddings, features), mirror_embeddings = self._forward(x, training=True), None
            # Only the views' own maps meet the teacher's: the mirrored rows skip the adapter.
            features = None if features is None else self.adapter(features[:rows])
            old = None if self.old_model is None else self.old_model(x, training=False)
            inputs = losses.LossInputs(embeddings, labels[: self.spec.labeled], cfg.margin, cfg.mining,
                                       teacher, has_teacher, old, self.prototypes, cfg.prototype_scale,
                                       cfg.prototype_margin, memory, mirror_embeddings, features, teacher_features)
            total, metrics = losses.total_loss(cfg.weights(), inputs)
            # Gradients are summed over replicas: scale so the update is the mean.
            scaled = total / self.strategy.num_replicas_in_sync
        return tape.gradient(scaled, self.variables), metrics, embeddings

    def fit_adapter(self, steps: int = ADAPTER_FIT_STEPS) -> float:
        """Start the hint adapter at the least-squares map from the model's hint-layer maps to
        the teacher's, over the batches of the first ``steps`` steps (a random adapter's
        gradients would first pull the trunk towards noise); returns the share of the teacher
        maps' variance it leaves unexplained there."""
        student, teacher = [], []
        for step in range(steps):
            batch = self.batches(step)
            images = batch["images"].reshape(-1, *batch["images"].shape[2:])
            # In training mode, as the loss sees the maps (batch statistics; moving averages move as in a step).
            _, features = self.features_model(normalise(tf.cast(images, tf.float32), self.card), training=True)
            student.append(features.numpy().reshape(-1, features.shape[-1]))
            teacher.append(batch["teacher_features"].reshape(-1, self.spec.feature_shape[-1]))
        x = np.concatenate(student).astype(np.float64)
        x = np.hstack([x, np.ones((len(x), 1))])
        y = np.concatenate(teacher).astype(np.float64)
        gram = x.T @ x
        ridge = 1e-3 * np.trace(gram) / len(gram)
        solution = np.linalg.solve(gram + ridge * np.eye(len(gram)), x.T @ y)
        kernel, bias = solution[:-1], solution[-1]
        self.adapter.set_weights([kernel[None, None].astype(np.float32), bias.astype(np.float32)])
        return float(np.mean((x @ solution - y) ** 2) / np.mean(y.var(axis=0)))

    def _replica_step(self, batch: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        replica = tf.distribute.get_replica_context().replica_id_in_sync_group
        # Every replica receives the whole batch and takes its own row: rows hold whole identities.
        mine = {k: tf.gather(v, replica) for k, v in batch.items()}
        memory = None if self.memory is None else self.memory.rows()
        gradients, metrics, embeddings = self._losses_fn(mine["images"], mine["labels"], mine.get("teacher"),
                                                         mine.get("has_teacher"), memory, mine.get("teacher_features"))
        self.optimizer.apply_gradients(zip(gradients, self.variables))
        if self.memory is not None:
            self.memory.push(embeddings, mine["teacher"], mine["has_teacher"])
        return metrics

    def _distributed_step(self, batch: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        per_replica = self.strategy.run(self._replica_step, args=(batch,))
        return {k: self.strategy.reduce(tf.distribute.ReduceOp.MEAN, v, axis=None) for k, v in per_replica.items()}

    def restore(self) -> int:
        """Continue from the latest checkpoint; returns its step (0 when there is none)."""
        if self.manager.latest_checkpoint:
            self.checkpoint.restore(self.manager.latest_checkpoint).assert_existing_objects_matched()
        return int(self.step.numpy())

    def save_checkpoint(self) -> None:
        self.manager.save(checkpoint_number=int(self.step.numpy()))

    def run(self, evaluate: Callable[[keras.Model], dict[str, float]] | None = None) -> TrainResult:
        cfg = self.config.train
        start = int(self.step.numpy())
        writer = tf.summary.create_file_writer(str(self.run_dir / LOGS))
        faces = self.spec.replicas * self.spec.per_replica
        last: dict[str, float] = {}
        window_start, window_steps = time.perf_counter(), 0
        bar = tqdm(total=cfg.steps, initial=start, unit="step", desc="train", dynamic_ncols=True, mininterval=1.0)
        try:
            for batch in self.batches.dataset(start, cfg.steps):
                metrics = self._step_fn(batch)
                self.step.assign_add(1)
                step, window_steps = int(self.step.numpy()), window_steps + 1
                bar.update()
                if step % cfg.log_every == 0 or step == cfg.steps:
                    last = {k: float(v) for k, v in metrics.items()}
                    elapsed = time.perf_counter() - window_start
                    last["images_per_second"] = faces * window_steps / elapsed
                    last["learning_rate"] = float(self.optimizer.learning_rate)
                    window_start, window_steps = time.perf_counter(), 0
                    write_scalars(writer, step, last)
                    # A run without the triplet term has no active fraction to show.
                    active = f"{last['active_fraction']:.2f}" if "active_fraction" in last else "-"
                    bar.set_postfix(loss=f"{last['loss']:.4f}", active=active,
                                    img_s=f"{last['images_per_second']:.0f}", refresh=False)
                if step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
                if evaluate and cfg.eval_every and step % cfg.eval_every == 0:
                    scores = evaluate(self.model)
                    write_scalars(writer, step, scores, "lfw/")
                    bar.write(f"step {step}: LFW accuracy {scores['accuracy_mean']:.4f}, "
                              f"VAL@FAR1e-3 {scores['val_mean']:.4f}")
        except KeyboardInterrupt:
            bar.write(f"interrupted: checkpoint at step {int(self.step.numpy())}; continue with --resume")
            self.save_checkpoint()
            raise
        finally:
            bar.close()
            writer.close()
        step = int(self.step.numpy())
        if step % cfg.checkpoint_every:
            self.save_checkpoint()
        self.model.save_weights(self.run_dir / WEIGHTS)
        self.model.save(self.run_dir / KERAS_MODEL)
        return TrainResult(step, last, self.run_dir)


# With the seed, these settings fix every step's faces and views (Batches, data.PKSampler).
VIEW_SETTINGS = (("batch", None), ("augment", None), ("data", "cache"), ("data", "sources"), ("data", "exclude"),
                 ("model", "input_size"), ("train", "seed"))


def replayed_views(config: Config) -> str | None:
    """A note when ``model.init_weights`` comes from a run folder whose batches and views this
    run would draw again, step for step (the same seed and view settings); else None."""
    if not config.model.init_weights:
        return None
    saved = run_config(Path(config.model.init_weights))
    if saved is None:
        return None
    try:
        # Read back through the config, as a resume does, so options added since take their defaults.
        parent = config_from_dict(saved).to_dict()
    except ConfigError:  # a layout this version no longer reads: nothing to say about its views
        return None
    mine = config.to_dict()

    def setting(values: dict, section: str, key: str | None) -> object:
        return values[section] if key is None else values[section][key]

    if any(setting(parent, *where) != setting(mine, *where) for where in VIEW_SETTINGS):
        return None
    return (f"note: {config.model.init_weights} was trained with the same seed ({config.train.seed}) and batch, "
            "augmentation and data settings: this run draws its batches and views again, step for step; "
            "--set train.seed=N gives new ones")


def prepare_run_dir(config: Config, config_file: Path | None, run_dir: Path, resume: bool) -> None:
    """Create the run folder with the config, or check that a resumed run has the same
    config (only ``train.steps`` may grow, to train longer)."""
    saved = run_dir / CONFIG_JSON
    current = config.to_dict()
    if resume and saved.is_file():
        # Read back through the config so options added since the run began take their defaults.
        previous = config_from_dict(json.loads(saved.read_text())).to_dict()
        compare = lambda d: json.loads(json.dumps({**d, "train": {**d["train"], "steps": None}}))  # noqa: E731
        if compare(previous) != compare(current):
            raise ConfigError(f"{config_file or 'the config'} differs from the run's {saved}; "
                              "only train.steps may change on --resume")
    elif not resume and (run_dir / CHECKPOINTS).exists():
        raise ConfigError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(current, indent=1) + "\n")
    if config_file is not None:
        shutil.copyfile(config_file, run_dir / f"config{config_file.suffix}")


def _fixed_for_run(path: Path, resume: bool, compute: Callable[[], np.ndarray]) -> np.ndarray:
    """An array computed at a run's start and read back on resume: the faces described may
    have grown since, and the targets must not move under the model."""
    if resume and path.is_file():
        return np.load(path)
    value = compute()
    np.save(path, value)
    return value


@dataclass(frozen=True)
class StudentSpace:
    """Where the teacher's descriptors go for the student: minus ``centre``, on ``basis`` (each optional)."""

    centre: np.ndarray | None
    basis: np.ndarray | None

    def targets(self, descriptors: np.ndarray) -> np.ndarray:
        return data.teacher_targets(descriptors, self.centre, self.basis)


def student_space(teacher: np.ndarray, config: Config, run_dir: Path, resume: bool) -> StudentSpace:
    """Centred on the cached descriptors' mean (``loss.center_teacher``) and, when the teacher
    is wider than the student, projected on their principal axes — or both taken from the
    run named by ``data.teacher_space``; fixed at the run's start."""
    source = Path(config.data.teacher_space) if config.data.teacher_space else None
    width, size = teacher.shape[1], config.model.embedding_size
    centre = basis = None
    if config.loss.center_teacher:
        centre = _fixed_for_run(run_dir / TEACHER_MEAN, resume,
                                lambda: _space_of(source, TEACHER_MEAN) if source else data.teacher_centre(teacher))
    if width > size:
        basis = _fixed_for_run(run_dir / TEACHER_BASIS, resume,
                               lambda: _space_of(source, TEACHER_BASIS) if source
                               else data.teacher_basis(teacher, size))
        if basis.shape != (width, size):
            raise ConfigError(f"the student's axes ({TEACHER_BASIS} from {source or run_dir}) are {basis.shape}, "
                              f"this teacher and student need {(width, size)}")
    return StudentSpace(centre, basis)


def _space_of(run: Path, name: str) -> np.ndarray:
    path = run / name
    if not path.is_file():
        raise ConfigError(f"data.teacher_space {run} holds no {name} (a distilled run folder has one)")
    return np.load(path)


def view_teacher(config: Config, space: StudentSpace, cache: data.FaceCache, run_dir: Path,
                 resume: bool = False) -> ViewTeacher:
    """The view teacher of ``data.teacher_onnx``; with the hint term, its feature maps'
    scale is fixed at the run's start from the centre crops of faces spread over ``cache``."""
    held = cached_teacher(Path(config.data.cache))
    if held != "edgeface":
        raise ConfigError(f"data.teacher_onnx is an EdgeFace export, but {config.data.cache} holds "
                          f"{held}'s descriptors, which fix the student's space")
    # It runs in the batch thread beside the training step, on the same cores: one thread that
    # does not spin made a step 5 % faster than two spinning ones (5.54 / 5.83 s, 2-core AMD EPYC).
    teacher = EdgeFaceTeacher(config.data.teacher_onnx, threads=1, flip=False, spinning=False)
    size = cache.manifest.crop_size
    scale = None
    if config.loss.needs_features:
        faces = np.linspace(0, len(cache) - 1, min(FEATURE_SCALE_FACES, len(cache))).astype(int)

        def measure() -> np.ndarray:
            features = teacher.describe_with_features(centre_crop(cache.crops[faces], size))[1]
            return np.stack([features.mean(axis=(0, 1, 2)), features.std(axis=(0, 1, 2)) + 1e-6])

        scale = _fixed_for_run(run_dir / TEACHER_FEATURES_SCALE, resume, measure)
    return ViewTeacher(teacher, space, size, scale)


def train(config: Config, run_dir: str | Path, resume: bool = False, config_file: str | Path | None = None,
          strategy: tf.distribute.Strategy | None = None) -> TrainResult:
    """Train (or continue) the run in ``run_dir``."""
    run_dir = Path(run_dir)
    prepare_run_dir(config, Path(config_file) if config_file else None, run_dir, resume)
    cache = load_training_cache(config)
    online = None
    if config.loss.needs_teacher:
        space = student_space(cache.teacher, config, run_dir, resume)
        cache.teacher = space.targets(cache.teacher)
        online = view_teacher(config, space, cache, run_dir, resume) if config.data.teacher_onnx else None
    trainer = Trainer(config, run_dir, cache, strategy, online)
    if config.model.init_weights and not trainer.manager.latest_checkpoint:
        if note := replayed_views(config):
            print(note)
        if config.model.init_weights.endswith(".npz"):
            load_into(trainer.model, config.model.init_weights)
        else:
            trainer.model.load_weights(config.model.init_weights)
    start = trainer.restore() if resume else 0
    if trainer.adapter is not None and not start:
        print(f"hint adapter fitted: {trainer.fit_adapter():.3f} of the teacher maps' variance left unexplained")
    print(f"{len(cache)} faces, {trainer.identities} identities with 2+ faces; {trainer.spec.replicas} replica(s); "
          f"from step {start} to {config.train.steps}")
    evaluate = None
    if config.train.eval_every:
        pairs = LfwCropPairs.load(config.train.lfw, config.train.lfw_cache, cache.manifest.crop_size)
        evaluate = lambda model: pairs.evaluate(keras_embedder(model)).scores()  # noqa: E731
    return trainer.run(evaluate)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="a .toml or .json config (see configs/)")
    parser.add_argument("--out", required=True, type=Path, help="run folder")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value, e.g. --set data.cache=/work/cache/crops --set train.steps=500")


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.set)
    result = train(config, args.out, args.resume, args.config)
    print(f"step {result.step}: " + ", ".join(f"{k} {v:.4g}" for k, v in result.metrics.items()))
    print(f"saved {args.out / KERAS_MODEL} and {args.out / WEIGHTS}")
    return 0
