"""Training configuration: every hyper-parameter of a run, read from a TOML (or JSON) file.

Sections mirror the dataclasses below; unknown keys are errors (a typo must not silently
fall back to a default). Relative paths are taken from the working directory and stored
resolved in the run folder's ``config.json``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

if sys.version_info >= (3, 11):
    import tomllib
else:  # the `train` extra installs tomli on 3.10
    import tomli as tomllib

from .augment import AugmentConfig
from .losses import LOSS_TERMS, MINING, PROTOTYPE_MARGIN, PROTOTYPE_SCALE


class ConfigError(ValueError):
    """A config file is unreadable or holds an unknown key or a bad value."""


@dataclass(frozen=True)
class ModelConfig:
    """``name``: a key of ``facenet_train.models.MODELS``. ``input_size``: the square
    input's side in pixels, 0 for the model's native size (96 for the NN4 family); the
    crop cache must hold crops of that size. ``init_weights``: a ``.weights.h5`` or compact
    ``.npz`` to start from (e.g. the old model of a harmonic run), of any input size."""

    name: str = "nn4_small2"
    embedding_size: int = 128
    input_size: int = 0
    init_weights: str = ""


@dataclass(frozen=True)
class DataConfig:
    """``cache``: a ``facenet-train preprocess`` folder. ``sources``: the cached sources
    to train on (empty: all). ``exclude``: identity lists (lfw-overlap format) left out,
    so a model scored on LFW never saw an LFW person. ``teacher``: load the cached dlib
    descriptors (needed when the distillation weight is not 0). ``partial_teacher``: train
    while ``facenet-train teacher`` has not finished: faces of shards without descriptors
    get no distillation target (labeled ones still see the triplet loss). ``teacher_onnx``:
    the cache's teacher exported (``facenet-train teacher-export``): it then describes each
    training view as augmented, before any tight cut, and that is the view's target instead
    of the cached descriptor of the clean crop (which still fixes the centre and axes).
    ``teacher_space``: a run folder whose centre and axes (``teacher_mean.npy``,
    ``teacher_basis.npy``) the student's space takes instead of this cache's descriptors,
    so a run continued on a cache made again (another crop size) keeps its space."""

    cache: str = "cache/aligned"
    sources: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    teacher: bool = False
    partial_teacher: bool = False
    teacher_onnx: str = ""
    teacher_space: str = ""


@dataclass(frozen=True)
class BatchConfig:
    """``p`` identities x ``k`` faces, plus ``unlabeled`` faces for distillation only
    (see ``data.SamplerConfig``). ``mixup``: the probability that an unlabeled face's view
    is blended with another view of the batch (``augment.mix_faces``); only a teacher
    describing each view (``data.teacher_onnx``) can label the blend."""

    p: int = 30
    k: int = 4
    unlabeled: int = 0
    identity_power: float = 0.5
    mixup: float = 0.0

    @property
    def faces(self) -> int:
        """Faces in a step's batch, over all replicas (``data.PKSampler.batch_size``)."""
        return self.p * self.k + self.unlabeled


@dataclass(frozen=True)
class OptimizerConfig:
    """``name``: adam, adagrad or sgd (with ``momentum``). ``learning_rate`` is the peak
    of the schedule. ``clipnorm``: 0 = no gradient clipping."""

    name: str = "adam"
    learning_rate: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    clipnorm: float = 0.0


@dataclass(frozen=True)
class ScheduleConfig:
    """``kind``: constant; cosine (to ``final_fraction`` of the peak at the last step);
    step (multiply by ``factor`` at each of ``boundaries``). A linear warm-up over
    ``warmup_steps`` comes first for every kind."""

    kind: str = "cosine"
    warmup_steps: int = 1000
    final_fraction: float = 0.01
    boundaries: list[int] = field(default_factory=list)
    factor: float = 0.1


@dataclass(frozen=True)
class LossConfig:
    """Weights of the loss terms: a field named as each ``losses.LOSS_TERMS`` entry (0: the
    term is left out). ``mining``: semihard (FaceNet) or batch_hard (``losses.MINING``).
    ``distillation``: towards the cached dlib descriptors. ``center_teacher``: distil
    towards the descriptors minus their mean over the training faces (saved as
    ``teacher_mean.npy`` in the run): dlib's descriptors all lie in a narrow cone (scaled
    to unit length, two different people are 0.33 apart in squared L2 and two photos of
    one person 0.10; centred, 2.0 and 0.59), and a student pulled into that cone has no
    room for the triplet margin (measured: LFW fell from 80.8 % to 75.2 % in 80 steps).
    ``relational``: the teacher's pairwise distances within the batch (rotation-free).
    ``memory_relational``: the same between the batch and the last ``memory_size`` training
    rows (a cross-batch memory, at least one batch long).
    ``prototype``: CosFace (``prototype_scale``, ``prototype_margin``) of the labelled faces
    against each identity's mean teacher target, fixed centres in the student's space.
    ``mirror``: the first ``mirror_views`` views of each replica's batch are embedded mirrored
    as well, and each pair pulled together (``2 - 2 cos``): the teacher describes a face and
    its mirror image alike, the student far less so (docs/model.md).
    ``hint``: the student's ``hint_layer`` map, through a training-only 1x1 convolution, regressed
    on the view teacher's feature map of the same grid (FitNets; each teacher channel
    standardised): the trunk, not only the embedding, learns from the teacher.
    ``harmonic``: mixed old/new triplets (needs ``[harmonic] old_model``).
    ``old_distillation``: every view's embedding pulled onto the frozen old model's embedding
    of the same view (``2 - 2 cos``, needs ``[harmonic] old_model``): the new model learns the
    old one's function, as a ReLU MobileFaceNet learns its PReLU original's
    (configs/mobilefacenet_relu.toml)."""

    triplet: float = 1.0
    mining: str = "semihard"
    margin: float = 0.2
    distillation: float = 0.0
    center_teacher: bool = True
    relational: float = 0.0
    memory_relational: float = 0.0
    memory_size: int = 4096
    prototype: float = 0.0
    prototype_scale: float = PROTOTYPE_SCALE
    prototype_margin: float = PROTOTYPE_MARGIN
    mirror: float = 0.0
    mirror_views: int = 32
    hint: float = 0.0
    hint_layer: str = "inception_4a_concat"
    harmonic: float = 0.0
    old_distillation: float = 0.0

    def weights(self) -> dict[str, float]:
        """The terms a run trains with: ``LOSS_TERMS`` name -> weight, for the weights not 0."""
        return {name: getattr(self, name) for name in LOSS_TERMS if getattr(self, name)}

    @property
    def needs_teacher(self) -> bool:
        """Whether a term trained with needs the teacher's targets."""
        return any(LOSS_TERMS[name].teacher for name in self.weights())

    @property
    def needs_prototypes(self) -> bool:
        """Whether a term trained with needs each identity's mean teacher target."""
        return any(LOSS_TERMS[name].prototypes for name in self.weights())

    @property
    def needs_memory(self) -> bool:
        """Whether a term trained with needs past batches' rows."""
        return any(LOSS_TERMS[name].memory for name in self.weights())

    @property
    def needs_mirrors(self) -> bool:
        """Whether a term trained with needs the embeddings of mirrored views."""
        return any(LOSS_TERMS[name].mirrored for name in self.weights())

    @property
    def needs_features(self) -> bool:
        """Whether a term trained with needs the view teacher's feature maps."""
        return any(LOSS_TERMS[name].features for name in self.weights())

    @property
    def needs_old_model(self) -> bool:
        """Whether a term trained with needs the frozen old model's embeddings."""
        return any(LOSS_TERMS[name].old_model for name in self.weights())


@dataclass(frozen=True)
class HarmonicConfig:
    """The frozen old model whose embedding space the new one must stay compatible with:
    ``old_model`` is a ``.weights.h5`` of architecture ``old_name`` (or a ``.keras``, or a
    compact ``.npz`` from ``facenet-train export-weights``, which names its own architecture)."""

    old_model: str = ""
    old_name: str = "nn4_small2"
    old_embedding_size: int = 128


@dataclass(frozen=True)
class TrainConfig:
    """Loop settings. ``eval_every`` > 0 scores LFW from ``lfw_cache`` (a
    ``preprocess-lfw`` folder) with pairs from ``lfw``. ``jit_compile``: XLA for the
    forward and backward pass (nearly twice the images/s on the 2-core CPU: docs/training.md).
    ``precision``: a Keras dtype policy; ``mixed_bfloat16`` computes the trunk in bfloat16
    (variables and the embedding stay float32), for CPUs with AVX-512 BF16 or AMX."""

    steps: int = 100_000
    seed: int = 0
    jit_compile: bool = True
    precision: str = "float32"
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    log_every: int = 50
    eval_every: int = 0
    lfw: str = ""
    lfw_cache: str = ""


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    harmonic: HarmonicConfig = field(default_factory=HarmonicConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> Config:
        """Check values that would otherwise fail late (after the cache has loaded)."""
        o, s, loss, d, t = self.optimizer, self.schedule, self.loss, self.data, self.train
        weights = loss.weights()
        # What a term needs is declared by its LOSS_TERMS entry; these checks follow from it.
        with_teacher = [name for name, term in LOSS_TERMS.items() if term.teacher]
        teacher_losses, teacher_weights = _one_of(with_teacher), _one_of([f"loss.{n}" for n in with_teacher])
        with_unlabeled = [name for name, term in LOSS_TERMS.items() if term.teacher or term.unlabeled]
        unlabeled_losses = _one_of(with_unlabeled)
        unlabeled_weights = _one_of([f"loss.{n}" for n in with_unlabeled])
        checks = [
            (self.model.input_size >= 0,
             f"model.input_size {self.model.input_size}: pixels on a side, or 0 for the model's own size"),
            (o.name in ("adam", "adagrad", "sgd"), f"optimizer.name {o.name!r}: adam, adagrad or sgd"),
            (s.kind in ("constant", "cosine", "step"), f"schedule.kind {s.kind!r}: constant, cosine or step"),
            (loss.mining in MINING, f"loss.mining {loss.mining!r}: {' or '.join(MINING)}"),
            (loss.prototype_scale > 0 and 0 <= loss.prototype_margin < 1,
             f"loss.prototype_scale {loss.prototype_scale} must be > 0 and loss.prototype_margin "
             f"{loss.prototype_margin} in [0, 1)"),
            (bool(weights), f"every loss weight is 0: set one of {', '.join(f'loss.{n}' for n in LOSS_TERMS)}"),
            *((d.teacher or not LOSS_TERMS[name].teacher, f"loss.{name} > 0 needs data.teacher = true")
              for name in weights),
            (d.teacher or not d.partial_teacher, "data.partial_teacher needs data.teacher = true"),
            (d.teacher or not d.teacher_onnx, "data.teacher_onnx needs data.teacher = true"),
            (d.teacher or not d.teacher_space, "data.teacher_space needs data.teacher = true"),
            (not d.teacher or loss.needs_teacher,
             f"data.teacher = true loads targets only the {teacher_losses} loss uses: set {teacher_weights}"),
            (self.batch.unlabeled == 0 or any(name in weights for name in with_unlabeled),
             f"batch.unlabeled > 0 only feeds the {unlabeled_losses} loss: set {unlabeled_weights}"),
            (0.0 <= self.batch.mixup <= 1.0, f"batch.mixup {self.batch.mixup}: a probability in [0, 1]"),
            (self.batch.mixup == 0 or (self.batch.unlabeled > 0 and bool(d.teacher_onnx)),
             "batch.mixup > 0 blends unlabeled faces for a teacher to describe: "
             "set batch.unlabeled > 0 and data.teacher_onnx"),
            (not loss.needs_memory or loss.memory_size >= self.batch.faces,
             f"loss.memory_size {loss.memory_size} must hold at least one batch ({self.batch.faces} faces)"),
            *((bool(d.teacher_onnx) or not LOSS_TERMS[name].features,
               f"loss.{name} > 0 needs data.teacher_onnx (the teacher's feature maps of each view)")
              for name in weights),
            (not loss.needs_mirrors or 0 < loss.mirror_views <= self.batch.faces,
             f"loss.mirror_views {loss.mirror_views} must be between 1 and the batch's {self.batch.faces} faces"),
            *((bool(self.harmonic.old_model) or not LOSS_TERMS[name].old_model,
               f"loss.{name} > 0 needs harmonic.old_model") for name in weights),
            (t.eval_every == 0 or bool(t.lfw and t.lfw_cache),
             "train.eval_every > 0 needs train.lfw and train.lfw_cache"),
            (t.precision in ("float32", "mixed_bfloat16"),
             f"train.precision {t.precision!r}: float32 or mixed_bfloat16"),
            (t.steps > 0 and t.checkpoint_every > 0 and t.log_every > 0,
             "train.steps, checkpoint_every and log_every must be > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        return self


def _one_of(names: list[str]) -> str:
    """``a``, ``a or b``, ``a, b or c``."""
    return " or ".join(filter(None, [", ".join(names[:-1]), names[-1]]))


def _is_a(value: Any, kind: type) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, kind) and (kind is bool or not isinstance(value, bool))


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    """A dataclass from a dict, converting lists to tuples where the field is a tuple."""
    if not isinstance(values, dict):
        raise ConfigError(f"[{where}] must be a table, got {values!r}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown key(s) in [{where}]: {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            value = _build(hint, value, name)
        elif isinstance(value, list) and str(hint).startswith("tuple"):
            value = tuple(value)
        elif hint in (int, float, str, bool) and not _is_a(value, hint):
            raise ConfigError(f"[{where}] {name} = {value!r}: expected {hint.__name__}")
        kwargs[name] = value
    return cls(**kwargs)


def _resolve_paths(config: Config, base: Path) -> Config:
    def resolve(path: str) -> str:
        return str((base / path).resolve()) if path else path

    return dataclasses.replace(
        config,
        model=dataclasses.replace(config.model, init_weights=resolve(config.model.init_weights)),
        data=dataclasses.replace(config.data, cache=resolve(config.data.cache),
                                 exclude=[resolve(p) for p in config.data.exclude]),
        harmonic=dataclasses.replace(config.harmonic, old_model=resolve(config.harmonic.old_model)),
        train=dataclasses.replace(config.train, lfw=resolve(config.train.lfw),
                                  lfw_cache=resolve(config.train.lfw_cache)),
    )


def config_from_dict(values: dict[str, Any], base: Path | None = None) -> Config:
    """A validated config; relative paths resolved against ``base`` (default: cwd)."""
    return _resolve_paths(_build(Config, values, "config"), base or Path.cwd()).validate()


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``section.key=value`` settings on top of a config's values; the value is read as a
    TOML value when it is one (``train.steps=5000``, ``data.sources=["pins"]``), else as a
    string (``data.cache=/work/cache/crops``)."""
    values = {k: dict(v) if isinstance(v, dict) else v for k, v in values.items()}
    for item in overrides:
        key, sep, raw = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        values.setdefault(section, {})[name] = value
    return values


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read a ``.toml`` or ``.json`` config file, then apply ``overrides``."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    try:
        values = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path} is not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {exc}") from None
    try:
        return config_from_dict(apply_overrides(values, list(overrides)))
    except (ConfigError, TypeError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
