"""``facenet-train train`` and ``facenet-train evaluate``.

Training: a custom step under a ``tf.distribute`` strategy (``MirroredStrategy`` over the
GPUs when there are any, else the default strategy: the same code either way). Batches
are P identities x K faces (+ unlabeled faces for distillation) drawn from the in-memory
crop cache as a pure function of (seed, step), augmented with OpenCV in a tf.data
generator thread while the model runs. A resumed run therefore sees exactly the batches
the stopped one would have: the checkpoint holds model, optimizer and step, and the step
is the whole sampler/augmentation RNG state.

A run folder holds ``checkpoints/``, ``logs/`` (TensorBoard), ``config.json`` (resolved)
plus a copy of the config file, and at the end ``model.weights.h5`` and ``model.keras``.

Evaluation scores LFW's 10 folds from aligned crops (a ``preprocess-lfw`` cache, or crops
made on the spot with the same code) through ``verify``'s embedding functions, which
preprocess exactly as the runtime does; Keras and TFLite models go through the same path.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf
from tqdm import tqdm

import keras
from facenet_edge.card import ModelCard
from tensorflow.core.framework import summary_pb2

from . import data, losses
from .augment import augment_batch
from .config import Config, ConfigError, load_config
from .models import MODELS, build_model
from .weights import load_compact, load_into

CHECKPOINTS = "checkpoints"
LOGS = "logs"
CONFIG_JSON = "config.json"
WEIGHTS = "model.weights.h5"
TEACHER_MEAN = "teacher_mean.npy"  # subtracted from the teacher's descriptors (loss.center_teacher)
TEACHER_BASIS = "teacher_basis.npy"  # projects a teacher wider than the student (data.teacher_basis)
KERAS_MODEL = "model.keras"
EVAL_BATCH = 128


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


class Batches:
    """The batch of any step, as numpy arrays shaped (replicas, per_replica, ...)."""

    def __init__(self, cache: data.FaceCache, sampler: data.PKSampler, config: Config, spec: FeedSpec):
        self.cache, self.sampler, self.config, self.spec = cache, sampler, config, spec

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        spec = self.spec
        index = self.sampler.batch(step)
        rng = np.random.default_rng([self.config.train.seed, step, 1])
        images = augment_batch(self.cache.crops[index.ravel()], spec.size, self.config.augment, rng)
        batch = {
            "images": images.reshape(spec.replicas, spec.per_replica, spec.size, spec.size, 3),
            "labels": self.cache.labels[index].astype(np.int32),
        }
        if spec.teacher_dim:
            teacher = self.cache.teacher[index]
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
    if cache.teacher is not None and np.isnan(cache.teacher).any():
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


def normalise(images: tf.Tensor) -> tf.Tensor:
    """uint8 crops -> model input, as the runtime's Embedder does with a default card."""
    return (tf.cast(images, tf.float32) - ModelCard.mean) / ModelCard.std


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
                 strategy: tf.distribute.Strategy | None = None):
        self.config, self.run_dir = config, run_dir
        self.strategy = strategy or make_strategy()
        replicas = self.strategy.num_replicas_in_sync
        spec = MODELS[config.model.name].input_shape
        size = cache.manifest.crop_size
        if spec[0] != size or spec[1] != size:
            raise ConfigError(f"model {config.model.name} takes {spec[1]}x{spec[0]} crops, the cache holds {size}px crops; "
                              f"preprocess with --crop-size {spec[0]}")
        b = config.batch
        sampler = data.PKSampler(cache.labels, data.SamplerConfig(b.p, b.k, b.unlabeled, b.identity_power, config.train.seed),
                                 replicas=replicas)
        teacher_dim = cache.teacher.shape[1] if config.loss.distillation else 0
        if teacher_dim and teacher_dim != config.model.embedding_size:
            raise ConfigError(f"the teacher's descriptors are {teacher_dim}-d; "
                              f"distillation needs model.embedding_size = {teacher_dim}")
        self.spec = FeedSpec(replicas, sampler.batch_size // replicas, b.p * b.k // replicas, size, teacher_dim)
        self.batches = Batches(cache, sampler, config, self.spec)
        self.identities = sampler.identities
        with self.strategy.scope():
            keras.utils.set_random_seed(config.train.seed)
            # The layers keep the policy they were built with; nothing built later inherits it.
            keras.mixed_precision.set_global_policy(config.train.precision)
            self.model = build_model(config.model.name, embedding_size=config.model.embedding_size)
            keras.mixed_precision.set_global_policy("float32")
            self.old_model = load_old_model(config) if config.loss.harmonic else None
            self.optimizer = make_optimizer(config)
            self.optimizer.build(self.model.trainable_variables)  # slots exist before a restore
            self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
            self.checkpoint = tf.train.Checkpoint(model=self.model, optimizer=self.optimizer, step=self.step)
        self.manager = tf.train.CheckpointManager(self.checkpoint, run_dir / CHECKPOINTS,
                                                  max_to_keep=config.train.keep_checkpoints)
        self._losses_fn = tf.function(self._losses, jit_compile=config.train.jit_compile)
        self._step_fn = tf.function(self._distributed_step)

    def _losses(self, images: tf.Tensor, labels: tf.Tensor, teacher: tf.Tensor | None,
                has_teacher: tf.Tensor | None) -> tuple[list[tf.Tensor], dict[str, tf.Tensor]]:
        """(gradients, metrics) of one replica's batch; XLA-compiled when configured."""
        cfg, n = self.config.loss, self.spec.labeled
        x = normalise(images)
        mining = losses.triplet_semihard_loss if cfg.mining == "semihard" else losses.triplet_batch_hard_loss
        with tf.GradientTape() as tape:
            embeddings = self.model(x, training=True)
            triplet = mining(labels[:n], embeddings[:n], cfg.margin)
            total = cfg.triplet * triplet.loss
            metrics = {"triplet": triplet.loss, "active_fraction": triplet.fraction_active}
            if cfg.distillation:
                # Rows without a target are given the student's own vector (zero loss), then
                # the mean is rescaled to the rows with one: static shapes, unlike boolean_mask.
                target = tf.where(has_teacher[:, None], teacher, tf.stop_gradient(embeddings))
                rows = tf.cast(tf.shape(embeddings)[0], tf.float32)
                with_target = tf.maximum(tf.reduce_sum(tf.cast(has_teacher, tf.float32)), 1.0)
                distill = losses.distillation_loss(embeddings, target) * rows / with_target
                total += cfg.distillation * distill
                metrics["distillation"] = distill
            if cfg.harmonic:
                old = self.old_model(x, training=False)
                harmonic = losses.harmonic_triplet_loss(labels[:n], embeddings[:n], old[:n], cfg.margin)
                total += cfg.harmonic * harmonic.loss
                metrics["harmonic"] = harmonic.loss
                metrics["harmonic_active_fraction"] = harmonic.fraction_active
            # Gradients are summed over replicas: scale so the update is the mean.
            scaled = total / self.strategy.num_replicas_in_sync
        metrics["loss"] = total
        return tape.gradient(scaled, self.model.trainable_variables), metrics

    def _replica_step(self, batch: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        replica = tf.distribute.get_replica_context().replica_id_in_sync_group
        # Every replica receives the whole batch and takes its own row: rows hold whole identities.
        mine = {k: tf.gather(v, replica) for k, v in batch.items()}
        gradients, metrics = self._losses_fn(mine["images"], mine["labels"], mine.get("teacher"), mine.get("has_teacher"))
        self.optimizer.apply_gradients(zip(gradients, self.model.trainable_variables))
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
                    bar.set_postfix(loss=f"{last['loss']:.4f}", active=f"{last['active_fraction']:.2f}",
                                    img_s=f"{last['images_per_second']:.0f}", refresh=False)
                if step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
                if evaluate and cfg.eval_every and step % cfg.eval_every == 0:
                    scores = evaluate(self.model)
                    write_scalars(writer, step, scores, "lfw/")
                    bar.write(f"step {step}: LFW accuracy {scores['accuracy_mean']:.4f}, VAL@FAR1e-3 {scores['val_mean']:.4f}")
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


def prepare_run_dir(config: Config, config_file: Path | None, run_dir: Path, resume: bool) -> None:
    """Create the run folder with the config, or check that a resumed run has the same
    config (only ``train.steps`` may grow, to train longer)."""
    saved = run_dir / CONFIG_JSON
    current = config.to_dict()
    if resume and saved.is_file():
        previous = json.loads(saved.read_text())
        compare = lambda d: {**d, "train": {**d["train"], "steps": None}}  # noqa: E731
        if compare(previous) != json.loads(json.dumps(compare(current))):
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


def student_targets(teacher: np.ndarray, config: Config, run_dir: Path, resume: bool) -> np.ndarray:
    """The teacher's descriptors in the student's space: centred (``loss.center_teacher``)
    and, when the teacher is wider than the student, projected on their principal axes."""
    centre = basis = None
    if config.loss.center_teacher:
        centre = _fixed_for_run(run_dir / TEACHER_MEAN, resume, lambda: data.teacher_centre(teacher))
    if teacher.shape[1] > config.model.embedding_size:
        basis = _fixed_for_run(run_dir / TEACHER_BASIS, resume,
                               lambda: data.teacher_basis(teacher, config.model.embedding_size))
    return data.teacher_targets(teacher, centre, basis)


def train(config: Config, run_dir: str | Path, resume: bool = False, config_file: str | Path | None = None,
          strategy: tf.distribute.Strategy | None = None) -> TrainResult:
    """Train (or continue) the run in ``run_dir``."""
    run_dir = Path(run_dir)
    prepare_run_dir(config, Path(config_file) if config_file else None, run_dir, resume)
    cache = load_training_cache(config)
    if config.loss.distillation:
        cache.teacher = student_targets(cache.teacher, config, run_dir, resume)
    trainer = Trainer(config, run_dir, cache, strategy)
    if config.model.init_weights and not trainer.manager.latest_checkpoint:
        if config.model.init_weights.endswith(".npz"):
            load_into(trainer.model, config.model.init_weights)
        else:
            trainer.model.load_weights(config.model.init_weights)
    start = trainer.restore() if resume else 0
    print(f"{len(cache)} faces, {trainer.identities} identities with 2+ faces; {trainer.spec.replicas} replica(s); "
          f"from step {start} to {config.train.steps}")
    evaluate = None
    if config.train.eval_every:
        pairs = LfwCropPairs.load(config.train.lfw, config.train.lfw_cache, cache.manifest.crop_size)
        evaluate = lambda model: lfw_summary(pairs.evaluate(keras_embedder(model)))  # noqa: E731
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


# ---------------------------------------------------------------- evaluation


Embed = Callable[[np.ndarray], np.ndarray]
"""RGB uint8 crops (N, H, W, 3) -> (N, D) unit embeddings."""


def keras_embedder(model: keras.Model) -> Embed:
    from .verify import keras_embeddings

    card = default_card(model)
    return lambda crops: keras_embeddings(model, crops, card)


def tflite_embedder(path: Path) -> tuple[Embed, tuple[int, int]]:
    from facenet_edge.card import card_path_for

    from .verify import tflite_embeddings

    card = ModelCard.load(card_path_for(path))
    return (lambda crops: tflite_embeddings(path, card, crops)), card.input_size


def default_card(model: keras.Model) -> ModelCard:
    """The card a converted model of this run gets by default (its preprocessing)."""
    height, width = (int(d) for d in model.input_shape[1:3])
    return ModelCard(name=model.name, version="0", architecture=model.name, input_height=height, input_width=width,
                     embedding_size=int(model.output_shape[-1]))


@dataclass(frozen=True)
class LfwCropPairs:
    """LFW's pairs as pre-cut crops (``preprocess-lfw`` cache) plus indices, in ``pairs.txt`` fold order.

    For whole images through the runtime detector, see :class:`facenet_train.runtime_lfw.LfwPairs`.
    """

    crops: np.ndarray
    first: np.ndarray
    second: np.ndarray
    issame: np.ndarray

    @classmethod
    def load(cls, lfw_dir: str | Path, lfw_cache: str | Path, size: int) -> LfwCropPairs:
        from .verify import lfw_pairs

        manifest = data.CacheManifest.load(lfw_cache)
        data.check_aligner(manifest, lfw_cache)
        if manifest.crop_size != size:
            raise ValueError(f"LFW cache {lfw_cache} holds {manifest.crop_size}px crops, the model takes {size}px; "
                             f"rebuild it with `facenet-train preprocess-lfw --crop-size {size}`")
        return cls(*lfw_pairs(Path(lfw_dir), Path(lfw_cache), (size, size)))

    def distances(self, embed: Embed) -> np.ndarray:
        """Squared L2 distance of every pair."""
        embeddings = np.concatenate([embed(self.crops[i:i + EVAL_BATCH]) for i in range(0, len(self.crops), EVAL_BATCH)])
        return np.sum((embeddings[self.first] - embeddings[self.second]) ** 2, axis=1)

    def evaluate(self, embed: Embed):
        from .metrics import evaluate_distances

        return evaluate_distances(self.distances(embed), self.issame)


def lfw_summary(result) -> dict[str, float]:
    from .verify import lfw_scores

    return {k: float(v) for k, v in lfw_scores(result).items()}


def load_keras_model(path: str | Path) -> keras.Model:
    """A ``.keras`` file; a compact weights ``.npz``; a run folder's ``model.keras``; or, for
    a run still training, its config's architecture with the latest checkpoint's weights."""
    path = Path(path)
    if path.suffix == ".npz":
        return load_compact(path)
    if path.is_dir() and not (path / KERAS_MODEL).is_file():
        config_path, checkpoints = path / CONFIG_JSON, path / CHECKPOINTS
        latest = tf.train.latest_checkpoint(str(checkpoints))
        if not config_path.is_file() or latest is None:
            raise FileNotFoundError(f"{path} holds neither {KERAS_MODEL} nor {CONFIG_JSON} with {CHECKPOINTS}/")
        model_cfg = json.loads(config_path.read_text())["model"]
        model = build_model(model_cfg["name"], embedding_size=model_cfg["embedding_size"])
        tf.train.Checkpoint(model=model).restore(latest).expect_partial()
        return model
    from . import models  # noqa: F401  (registers the custom layers for deserialisation)

    return keras.models.load_model(path / KERAS_MODEL if path.is_dir() else path, compile=False)


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", type=Path, help="a run folder or a .keras file")
    which.add_argument("--tflite", type=Path, help="a .tflite model with its card (.json) beside it")
    parser.add_argument("--lfw", required=True, type=Path, help="LFW folder (one folder per person, pairs.txt)")
    parser.add_argument("--aligned-cache", type=Path, help="`facenet-train preprocess-lfw` output (default: crop now)")
    parser.add_argument("--runtime-path", action="store_true",
                        help="with --tflite: the full LFW images through the runtime (detector, aligner, "
                             "interpreter), as the model card's `lfw.runtime_path` numbers are measured")
    parser.add_argument("--detector", default="blazeface", choices=["blazeface", "haar"],
                        help="detector for crops made now (without --aligned-cache) or for --runtime-path")
    parser.add_argument("--workers", type=int, default=2, help="processes for crops made now")
    parser.add_argument("--out", type=Path, help="write the scores as JSON")
    parser.add_argument("--roc", type=Path, help="draw the ROC curve (PNG)")
    parser.add_argument("--failures", type=Path,
                        help="contact sheet (PNG) of the worst false rejects and false accepts at the best threshold")


def run_evaluate(args: argparse.Namespace) -> int:
    from .metrics import evaluate_distances, failure_sheet, plot_roc
    from .preprocess import CropOptions, build_lfw_cache

    if args.runtime_path:
        return _run_evaluate_runtime_path(args)
    if args.tflite:
        embed, (height, width) = tflite_embedder(args.tflite)
        name = args.tflite.stem
    else:
        model = load_keras_model(args.checkpoint)
        embed, name = keras_embedder(model), args.checkpoint.stem
        height, width = (int(d) for d in model.input_shape[1:3])
    if height != width:
        raise ValueError(f"{name} takes {width}x{height} crops; the aligned crops are square")
    with tempfile.TemporaryDirectory(prefix="lfw-crops-") as scratch:
        cache = args.aligned_cache
        if cache is None:
            cache = Path(scratch)
            build_lfw_cache(args.lfw, cache, CropOptions(crop_size=height, detector=args.detector), workers=args.workers)
        pairs = LfwCropPairs.load(args.lfw, cache, height)
        distances = pairs.distances(embed)
        result = evaluate_distances(distances, pairs.issame)
        fallback = sum(c.get("fallback", 0) for c in data.CacheManifest.load(cache).sources.values())
    print(f"{name}: {result.summary()}")
    if fallback:
        print(f"({fallback} LFW images had no face found; a centre box stood in)")
    if args.out:
        scores = {"model": str(args.tflite or args.checkpoint), **lfw_summary(result),
                  "fold_accuracies": [float(a) for a in result.fold_accuracies], "centre_fallback_images": fallback}
        args.out.write_text(json.dumps(scores, indent=1) + "\n")
    if args.roc:
        plot_roc({name: result}, args.roc)
    if args.failures:
        path, errors = failure_sheet(pairs.crops, pairs.first, pairs.second, distances, pairs.issame,
                                     result.best_threshold, args.failures)
        print(f"{errors['false_rejects']} false rejects and {errors['false_accepts']} false accepts at "
              f"{result.best_threshold:.3f}; the worst are in {path}")
    return 0


def _run_evaluate_runtime_path(args: argparse.Namespace) -> int:
    from .metrics import plot_roc
    from .runtime_lfw import evaluate_runtime_path

    if not args.tflite or args.aligned_cache or args.failures:
        raise ValueError("--runtime-path scores a --tflite model on the full LFW images: "
                         "it takes neither --aligned-cache nor --failures")
    run = evaluate_runtime_path(args.tflite, args.lfw, args.detector)
    print(f"{args.tflite.stem} (runtime path, {args.detector}): {run.result.summary()}")
    print(f"faces: {run.found} found, {run.padded} after padding, {run.centre_box} centre boxes")
    if args.out:
        args.out.write_text(json.dumps({"model": str(args.tflite), **run.card_entry(),
                                        "fold_accuracies": [float(a) for a in run.result.fold_accuracies]}, indent=1) + "\n")
    if args.roc:
        plot_roc({args.tflite.stem: run.result}, args.roc)
    return 0
