"""Triplet, distillation (vector, relational and feature-map hints), prototype, mirror and harmonic losses
as pure TensorFlow functions.

Every distance is a squared L2 distance (the FaceNet paper's convention), so no square root is
ever taken and the gradient stays finite when two embeddings coincide. The functions work eagerly
and inside ``tf.function`` with a dynamic batch size.

Semi-hard mining (:func:`semihard_triplets`), following the paper and TF-Addons'
``triplet_semihard_loss``:

- every ordered anchor-positive pair in the batch is used (each image is the anchor of each of
  its positives);
- its negative is the closest negative farther from the anchor than the positive,
  ``d(a,p) < d(a,n)``. When that one lies within the margin it is the hardest semi-hard negative;
  when it lies beyond, the triplet is inactive (zero loss) — no semi-hard negative exists;
- when no negative is farther than the positive, the farthest negative is taken (the easiest of
  the hard ones), as TF-Addons does, so the pair still pulls the positive in;
- anchors without any negative in the batch (a single identity) form no triplet.

The training step's loss is a weighted sum of the terms in :data:`LOSS_TERMS`, the registry:
a term's name there is its weight's key in a config's ``[loss]`` and its logged metric.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import tensorflow as tf


class TripletLoss(NamedTuple):
    """A triplet loss and the fraction of its triplets with a positive loss."""

    loss: tf.Tensor
    fraction_active: tf.Tensor


class Triplets(NamedTuple):
    """Row indices of mined triplets (int64 vectors of one length)."""

    anchor: tf.Tensor
    positive: tf.Tensor
    negative: tf.Tensor


# CosFace's scale and margin (Wang et al. 2018) for the prototype term, the config's defaults.
PROTOTYPE_SCALE, PROTOTYPE_MARGIN = 32.0, 0.35


def pairwise_squared_distances(x: tf.Tensor, y: tf.Tensor | None = None) -> tf.Tensor:
    """Squared L2 distances between the rows of ``x`` and of ``y`` (default ``x``), clipped at 0.

    With ``y`` omitted the diagonal is exactly zero.
    """
    x = tf.cast(x, tf.float32)
    other = x if y is None else tf.cast(y, tf.float32)
    sq_x = tf.reduce_sum(tf.square(x), axis=1, keepdims=True)
    sq_y = tf.reduce_sum(tf.square(other), axis=1, keepdims=True)
    # The Gram form rounds slightly below zero for near-equal rows: clip.
    d = tf.maximum(sq_x - 2.0 * tf.matmul(x, other, transpose_b=True) + tf.transpose(sq_y), 0.0)
    if y is None:
        d = tf.linalg.set_diag(d, tf.zeros(tf.shape(d)[:1], d.dtype))
    return d


def semihard_triplets(labels: tf.Tensor, embeddings: tf.Tensor) -> Triplets:
    """The triplets :func:`triplet_semihard_loss` uses (see the module docstring for the rule)."""
    return _mine_semihard(pairwise_squared_distances(embeddings), *_label_masks(labels))


def triplet_semihard_loss(labels: tf.Tensor, embeddings: tf.Tensor, margin: float = 0.2) -> TripletLoss:
    """FaceNet's triplet loss with all anchor-positive pairs and semi-hard negatives.

    ``mean(max(d(a,p) - d(a,n) + margin, 0))`` over the triplets of :func:`semihard_triplets`;
    0 when the batch yields no triplet.
    """
    d = pairwise_squared_distances(embeddings)
    return _triplet_loss(d, _mine_semihard(d, *_label_masks(labels)), margin)


def triplet_batch_hard_loss(labels: tf.Tensor, embeddings: tf.Tensor, margin: float = 0.2) -> TripletLoss:
    """Batch-hard triplet loss (Hermans et al. 2017): per anchor, its farthest positive and closest negative.

    Averaged over anchors that have at least one positive and one negative; 0 when none has.
    """
    d = pairwise_squared_distances(embeddings)
    positive, negative = _label_masks(labels)
    hardest_positive = tf.reduce_max(tf.where(positive, d, 0.0), axis=1)
    hardest_negative = tf.reduce_min(tf.where(negative, d, float("inf")), axis=1)
    valid = tf.reduce_any(positive, axis=1) & tf.reduce_any(negative, axis=1)
    losses = tf.nn.relu(tf.boolean_mask(hardest_positive - hardest_negative + margin, valid))
    return _mean_and_active(losses)


def harmonic_triplet_loss(
    labels: tf.Tensor, new_embeddings: tf.Tensor, old_embeddings: tf.Tensor, margin: float = 0.2
) -> TripletLoss:
    """The paper's harmonic triplet loss: new-model embeddings stay comparable with an old model's.

    ``old_embeddings`` are the frozen old model's embeddings of the same images (no gradient flows
    into them). Both sets are pooled: anchor-positive pairs are every ordered same-identity pair
    with at least one new embedding (anchor from either model, positive from either — including an
    image's new and old embedding as a pair); old-old pairs are left out because no part of them
    is trained. Negatives are mined semi-hard, as in :func:`triplet_semihard_loss`, from the
    whole pool of both models' embeddings.
    """
    labels = tf.reshape(labels, [-1])
    old = tf.stop_gradient(tf.cast(old_embeddings, tf.float32))
    d = pairwise_squared_distances(tf.concat([tf.cast(new_embeddings, tf.float32), old], axis=0))
    pairs, negatives = _label_masks(tf.concat([labels, labels], axis=0))
    is_old = tf.range(tf.shape(d)[0]) >= tf.shape(labels)[0]
    pairs &= tf.logical_not(is_old[:, None] & is_old[None, :])
    return _triplet_loss(d, _mine_semihard(d, pairs, negatives), margin)


def _unit_pair(student_embeddings: tf.Tensor, teacher_embeddings: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Both scaled to unit length (a teacher that is not unit-norm, e.g. dlib's, is usable);
    no gradient flows into the teacher."""
    student = tf.math.l2_normalize(tf.cast(student_embeddings, tf.float32), axis=1)
    teacher = tf.math.l2_normalize(tf.stop_gradient(tf.cast(teacher_embeddings, tf.float32)), axis=1)
    return student, teacher


def distillation_loss(student_embeddings: tf.Tensor, teacher_embeddings: tf.Tensor) -> tf.Tensor:
    """Pulls student embeddings onto a teacher's: the mean squared L2 distance between each
    unit student vector and its unit teacher vector, ``2 - 2 cos``. Both need one dimension."""
    student, teacher = _unit_pair(student_embeddings, teacher_embeddings)
    return tf.reduce_mean(tf.reduce_sum(tf.square(student - teacher), axis=1))


def relational_distillation_loss(student_embeddings: tf.Tensor, teacher_embeddings: tf.Tensor,
                                 valid: tf.Tensor | None = None) -> tf.Tensor:
    """Copies the teacher's geometry, not its vectors: the mean over pairs ``i != j`` of
    ``(d_s(i,j) - d_t(i,j))**2``, the two models' squared L2 distances between unit vectors.
    A rotation of the whole student space leaves it unchanged, and the dimensions may differ.
    ``valid``: rows that have a teacher vector (pairs with another row are left out)."""
    student, teacher = _unit_pair(student_embeddings, teacher_embeddings)
    n = tf.shape(student)[0]
    pairs = tf.logical_not(tf.eye(n, dtype=tf.bool))
    if valid is not None:
        pairs &= valid[:, None] & valid[None, :]
    return _pair_mse(pairwise_squared_distances(student) - pairwise_squared_distances(teacher), pairs)


def memory_relational_loss(student_embeddings: tf.Tensor, teacher_embeddings: tf.Tensor, valid: tf.Tensor,
                           memory: MemoryRows) -> tf.Tensor:
    """The relational loss between the batch's rows and the rows of past batches (``memory``,
    as in cross-batch memory, Wang et al. 2020): a batch of 150 faces holds 11k pairs, most of
    them two strangers far apart; a memory of a few thousand past views gives each face
    hundreds of times more partners, its near look-alikes among them. The memory's vectors
    are constants (its student vectors are as the model was a few steps ago: it moves little
    in a run continuing a trained model)."""
    student, teacher = _unit_pair(student_embeddings, teacher_embeddings)
    past_student = tf.stop_gradient(tf.cast(memory.embeddings, tf.float32))
    past_teacher = tf.stop_gradient(tf.cast(memory.teacher, tf.float32))
    diff = pairwise_squared_distances(student, past_student) - pairwise_squared_distances(teacher, past_teacher)
    return _pair_mse(diff, valid[:, None] & memory.valid[None, :])


def mirror_consistency_loss(embeddings: tf.Tensor, mirror_embeddings: tf.Tensor) -> tf.Tensor:
    """Pulls each view's embedding and its mirror image's together: the mean squared L2
    distance of the unit vectors, ``2 - 2 cos``, with the gradient into both (rows pair up)."""
    a = tf.math.l2_normalize(tf.cast(embeddings, tf.float32), axis=1)
    b = tf.math.l2_normalize(tf.cast(mirror_embeddings, tf.float32), axis=1)
    return tf.reduce_mean(tf.reduce_sum(tf.square(a - b), axis=1))


def hint_loss(student_features: tf.Tensor, teacher_features: tf.Tensor, has_teacher: tf.Tensor) -> tf.Tensor:
    """Mean squared difference of (N, H, W, C) maps over the rows with a teacher (FitNets,
    Romero et al. 2015): with standardised teacher channels, the share of the teacher's
    feature variance the student's adapted map leaves unexplained (1: none explained by a
    zero map)."""
    per_row = tf.reduce_mean(tf.square(tf.cast(student_features, tf.float32) - teacher_features), axis=[1, 2, 3])
    weights = tf.cast(has_teacher, tf.float32)
    return tf.reduce_sum(per_row * weights) / tf.maximum(tf.reduce_sum(weights), 1.0)


def _pair_mse(diff: tf.Tensor, pairs: tf.Tensor) -> tf.Tensor:
    """The mean of ``diff**2`` over the ``pairs`` that are True (0 when none is)."""
    weight = tf.cast(pairs, tf.float32)
    return tf.math.divide_no_nan(tf.reduce_sum(weight * tf.square(diff)), tf.reduce_sum(weight))


def prototype_cosface_loss(labels: tf.Tensor, embeddings: tf.Tensor, prototypes: tf.Tensor,
                           scale: float = PROTOTYPE_SCALE, margin: float = PROTOTYPE_MARGIN) -> tf.Tensor:
    """CosFace (Wang et al. 2018) against fixed class centres: the teacher's mean target of
    each identity (``prototypes``, one row per label; all-zero rows, identities left out of
    the run, take no part). Every step sees all identities as negatives, where the triplet
    loss sees the batch's few; the centres are not learnt, so they cannot overfit the
    labelled faces as a learnt classifier does (the issue's CosFace from scratch peaked at
    90.4 %), and they lie in the student's space, as the distillation targets do (the idea
    of ProxylessKD, Shi et al. 2020)."""
    student = tf.math.l2_normalize(tf.cast(embeddings, tf.float32), axis=1)
    centres = tf.stop_gradient(tf.cast(prototypes, tf.float32))
    present = tf.reduce_any(tf.not_equal(centres, 0.0), axis=1)
    cosine = tf.matmul(student, tf.math.l2_normalize(centres, axis=1), transpose_b=True)
    labels = tf.reshape(tf.cast(labels, tf.int32), [-1])
    logits = scale * (cosine - margin * tf.one_hot(labels, tf.shape(centres)[0]))
    logits = tf.where(present[None, :], logits, tf.constant(-1e9, tf.float32))
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))


def _label_masks(labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(anchor-positive pairs, anchor-negative pairs) as N x N boolean masks."""
    labels = tf.reshape(labels, [-1])
    same = tf.equal(labels[:, None], labels[None, :])
    pairs = same & tf.logical_not(tf.eye(tf.shape(labels)[0], dtype=tf.bool))
    return pairs, tf.logical_not(same)


def _mine_semihard(d: tf.Tensor, pairs: tf.Tensor, negatives: tf.Tensor) -> Triplets:
    """One negative per anchor-positive pair in ``pairs`` (N x N masks over the rows of ``d``).

    Sorting each anchor's negative distances once and binary-searching every d(a,p) in them keeps
    memory at O(N^2) (the usual masked (N, N, N) tensor would not fit at the paper's ~1,800 batch).
    """
    d = tf.stop_gradient(d)
    negative_d = tf.where(negatives, d, float("inf"))
    order = tf.argsort(negative_d, axis=1, stable=True)
    sorted_d = tf.gather(negative_d, order, batch_dims=1)
    n_negatives = tf.reduce_sum(tf.cast(negatives, tf.int32), axis=1, keepdims=True)
    # First negative strictly farther than the positive; past the last negative when none is.
    first_farther = tf.searchsorted(sorted_d, d, side="right")
    slot = tf.where(first_farther < n_negatives, first_farther, n_negatives - 1)
    anchor_positive = tf.where(pairs & (n_negatives > 0))
    anchor = anchor_positive[:, 0]
    negative = tf.gather_nd(order, tf.stack([anchor, tf.cast(tf.gather_nd(slot, anchor_positive), tf.int64)], axis=1))
    return Triplets(anchor, anchor_positive[:, 1], tf.cast(negative, tf.int64))


def _triplet_loss(d: tf.Tensor, triplets: Triplets, margin: float) -> TripletLoss:
    d_ap = tf.gather_nd(d, tf.stack([triplets.anchor, triplets.positive], axis=1))
    d_an = tf.gather_nd(d, tf.stack([triplets.anchor, triplets.negative], axis=1))
    return _mean_and_active(tf.nn.relu(d_ap - d_an + margin))


def _mean_and_active(losses: tf.Tensor) -> TripletLoss:
    count = tf.cast(tf.size(losses), tf.float32)
    active = tf.cast(tf.math.count_nonzero(losses > 0.0), tf.float32)
    return TripletLoss(tf.math.divide_no_nan(tf.reduce_sum(losses), count), tf.math.divide_no_nan(active, count))


# ---------------------------------------------------------------- the terms of a training step

MINING: dict[str, Callable[[tf.Tensor, tf.Tensor, float], TripletLoss]] = {
    "semihard": triplet_semihard_loss,
    "batch_hard": triplet_batch_hard_loss,
}


class MemoryRows(NamedTuple):
    """Rows of past batches (``memory.BatchMemory``): unit student and teacher vectors, and
    which rows hold a face with a teacher target (an empty slot holds none)."""

    embeddings: tf.Tensor
    teacher: tf.Tensor
    valid: tf.Tensor


@dataclass(frozen=True)
class LossInputs:
    """What the loss terms see of one replica's batch. ``embeddings`` holds every row, the
    labelled P x K faces first (``labels``: their identities), then the unlabeled faces."""

    embeddings: tf.Tensor
    labels: tf.Tensor
    margin: float
    mining: str  # a key of MINING
    # The teacher's target of every row; has_teacher is False where a face has none (its target is then 0).
    teacher: tf.Tensor | None = None
    has_teacher: tf.Tensor | None = None
    old_embeddings: tf.Tensor | None = None  # the frozen old model's, of every row
    prototypes: tf.Tensor | None = None  # the teacher's mean target of each label (prototype_cosface_loss)
    prototype_scale: float = PROTOTYPE_SCALE
    prototype_margin: float = PROTOTYPE_MARGIN
    memory: MemoryRows | None = None  # past batches' rows (memory_relational_loss)
    mirror_embeddings: tf.Tensor | None = None  # of the first rows' mirror images, in row order
    # Every row's hint-layer map through the adapter, and the teacher's standardised map of its view.
    student_features: tf.Tensor | None = None
    teacher_features: tf.Tensor | None = None

    def labeled(self, rows: tf.Tensor) -> tf.Tensor:
        """The labelled rows of ``rows`` (a static slice when the batch shape is static, as under XLA)."""
        return rows[: tf.shape(self.labels)[0]]


class TermValue(NamedTuple):
    """A term's loss (logged under the term's name) and the other metrics it logs."""

    loss: tf.Tensor
    metrics: dict[str, tf.Tensor]


@dataclass(frozen=True)
class LossTerm:
    """One term of the training loss. What it needs decides what the trainer feeds and loads,
    and what a config must name (``config.Config.validate``)."""

    compute: Callable[[LossInputs], TermValue]
    # Needs LossInputs.teacher (data.teacher); such terms feed on unlabeled faces too.
    teacher: bool = False
    old_model: bool = False  # needs LossInputs.old_embeddings (harmonic.old_model)
    unlabeled: bool = False  # feeds on unlabeled faces without a teacher (batch.unlabeled)
    prototypes: bool = False  # needs LossInputs.prototypes (from the teacher's cached targets)
    memory: bool = False  # needs LossInputs.memory (past batches' rows, kept by the trainer)
    mirrored: bool = False  # needs LossInputs.mirror_embeddings (the trainer embeds the mirror images too)
    features: bool = False  # needs LossInputs.student_features / teacher_features (data.teacher_onnx)


def _triplet(inputs: LossInputs) -> TermValue:
    triplet = MINING[inputs.mining](inputs.labels, inputs.labeled(inputs.embeddings), inputs.margin)
    return TermValue(triplet.loss, {"active_fraction": triplet.fraction_active})


def _distillation(inputs: LossInputs) -> TermValue:
    embeddings, has_teacher = inputs.embeddings, inputs.has_teacher
    # Rows without a target are given the student's own vector (zero loss), then the mean is
    # rescaled to the rows with one: static shapes, unlike boolean_mask.
    target = tf.where(has_teacher[:, None], inputs.teacher, tf.stop_gradient(embeddings))
    rows = tf.cast(tf.shape(embeddings)[0], tf.float32)
    with_target = tf.maximum(tf.reduce_sum(tf.cast(has_teacher, tf.float32)), 1.0)
    return TermValue(distillation_loss(embeddings, target) * rows / with_target, {})


def _relational(inputs: LossInputs) -> TermValue:
    return TermValue(relational_distillation_loss(inputs.embeddings, inputs.teacher, inputs.has_teacher), {})


def _memory_relational(inputs: LossInputs) -> TermValue:
    return TermValue(memory_relational_loss(inputs.embeddings, inputs.teacher, inputs.has_teacher, inputs.memory), {})


def _prototype(inputs: LossInputs) -> TermValue:
    return TermValue(prototype_cosface_loss(inputs.labels, inputs.labeled(inputs.embeddings), inputs.prototypes,
                                            inputs.prototype_scale, inputs.prototype_margin), {})


def _mirror(inputs: LossInputs) -> TermValue:
    mirrors = inputs.mirror_embeddings
    return TermValue(mirror_consistency_loss(inputs.embeddings[: tf.shape(mirrors)[0]], mirrors), {})


def _hint(inputs: LossInputs) -> TermValue:
    return TermValue(hint_loss(inputs.student_features, inputs.teacher_features, inputs.has_teacher), {})


def _old_distillation(inputs: LossInputs) -> TermValue:
    return TermValue(distillation_loss(inputs.embeddings, inputs.old_embeddings), {})


def _harmonic(inputs: LossInputs) -> TermValue:
    harmonic = harmonic_triplet_loss(inputs.labels, inputs.labeled(inputs.embeddings),
                                     inputs.labeled(inputs.old_embeddings), inputs.margin)
    return TermValue(harmonic.loss, {"harmonic_active_fraction": harmonic.fraction_active})


# Each name is also a weight in config.LossConfig (default 0 for a new term: existing configs keep their meaning).
LOSS_TERMS: dict[str, LossTerm] = {
    "triplet": LossTerm(_triplet),
    "distillation": LossTerm(_distillation, teacher=True),
    "relational": LossTerm(_relational, teacher=True),
    "memory_relational": LossTerm(_memory_relational, teacher=True, memory=True),
    "prototype": LossTerm(_prototype, teacher=True, prototypes=True),
    "mirror": LossTerm(_mirror, mirrored=True),
    "hint": LossTerm(_hint, teacher=True, features=True),
    "harmonic": LossTerm(_harmonic, old_model=True),
    "old_distillation": LossTerm(_old_distillation, old_model=True, unlabeled=True),
}


def total_loss(weights: Mapping[str, float], inputs: LossInputs) -> tuple[tf.Tensor, dict[str, tf.Tensor]]:
    """``sum(weight * term)`` over ``weights`` (``LOSS_TERMS`` name -> weight; summed and logged
    in this order), and the metrics of a step: each term's value under its name, its other
    metrics, the sum as ``loss``."""
    metrics: dict[str, tf.Tensor] = {}
    weighted = []
    for name, weight in weights.items():
        value = LOSS_TERMS[name].compute(inputs)
        metrics[name] = value.loss
        metrics.update(value.metrics)
        weighted.append(weight * value.loss)
    metrics["loss"] = sum(weighted)
    return metrics["loss"], metrics
