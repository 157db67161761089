"""Triplet, distillation, prototype and harmonic losses against brute-force numpy references; the
registry of loss terms against the training step's sum as it was written before it."""

from typing import get_type_hints

import numpy as np
import pytest
import tensorflow as tf

from facenet_train.config import ConfigError, LossConfig, config_from_dict
from facenet_train.losses import (
    LOSS_TERMS,
    LossInputs,
    LossTerm,
    MemoryRows,
    distillation_loss,
    memory_relational_loss,
    mirror_consistency_loss,
    relational_distillation_loss,
    harmonic_triplet_loss,
    hint_loss,
    pairwise_squared_distances,
    prototype_cosface_loss,
    semihard_triplets,
    triplet_batch_hard_loss,
    total_loss,
    triplet_semihard_loss,
)

SEEDS = range(8)


def random_batch(seed, n=18, identities=5, dim=8):
    """Overlapping identity clusters on the unit sphere: every mining case turns up."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, identities, n)
    centres = rng.normal(size=(identities, dim))
    embeddings = 0.6 * centres[labels] + rng.normal(size=(n, dim))
    return labels.astype(np.int32), (embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)).astype(np.float32)


def squared_distances(e):
    e = e.astype(np.float64)
    return ((e[:, None, :] - e[None, :, :]) ** 2).sum(-1)


def reference_semihard(labels, d, use_pair=lambda a, p: True):
    """Loop-by-loop version of the documented rule; returns triplets and which case chose each."""
    triplets, cases = [], []
    n = len(labels)
    for a in range(n):
        negatives = [k for k in range(n) if labels[k] != labels[a]]
        for p in range(n):
            if p == a or labels[p] != labels[a] or not negatives or not use_pair(a, p):
                continue
            farther = [k for k in negatives if d[a, k] > d[a, p]]
            if farther:
                triplets.append((a, p, min(farther, key=lambda k: d[a, k])))
                cases.append("farther")
            else:
                triplets.append((a, p, max(negatives, key=lambda k: d[a, k])))
                cases.append("none farther")
    return triplets, cases


def reference_loss(triplets, d, margin):
    if not triplets:
        return 0.0, 0.0
    losses = np.array([max(d[a, p] - d[a, k] + margin, 0.0) for a, p, k in triplets])
    return losses.mean(), (losses > 0).mean()


def as_triplet_list(triplets):
    return sorted(zip(*(t.numpy().tolist() for t in triplets)))


def test_pairwise_squared_distances_match_numpy():
    _, e = random_batch(0)
    d = pairwise_squared_distances(e).numpy()
    np.testing.assert_allclose(d, squared_distances(e), atol=1e-5)
    assert np.all(np.diag(d) == 0) and np.all(d >= 0)
    other = e[:5] * 2
    np.testing.assert_allclose(
        pairwise_squared_distances(e, other).numpy(), ((e[:, None] - other[None]) ** 2).sum(-1), atol=1e-5
    )


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("margin", [0.2, 1.0])
def test_semihard_mining_and_loss_match_reference(seed, margin):
    labels, e = random_batch(seed)
    d = squared_distances(e)
    expected, _ = reference_semihard(labels, d)
    assert as_triplet_list(semihard_triplets(labels, e)) == sorted(expected)
    loss, active = triplet_semihard_loss(labels, e, margin)
    expected_loss, expected_active = reference_loss(expected, d, margin)
    assert float(loss) == pytest.approx(expected_loss, abs=1e-5)
    assert float(active) == pytest.approx(expected_active)


def test_random_batches_cover_every_mining_case():
    """The batches above exercise semi-hard, beyond-the-margin and no-farther-negative triplets."""
    seen = set()
    for seed in SEEDS:
        labels, e = random_batch(seed)
        d = squared_distances(e)
        triplets, cases = reference_semihard(labels, d)
        for (a, p, k), case in zip(triplets, cases):
            if case == "farther":
                seen.add("semi-hard" if d[a, k] < d[a, p] + 0.2 else "beyond margin")
            else:
                seen.add(case)
    assert seen == {"semi-hard", "beyond margin", "none farther"}


def points(*xs):
    """Embeddings on a line (second coordinate 0), for hand-worked examples."""
    return np.array([[x, 0.0] for x in xs], dtype=np.float32)


def test_semihard_picks_the_closest_negative_beyond_the_positive():
    # anchor 0.0, positive 0.3 (d=0.09); negatives at d=0.04 (hard), 0.16 and 0.25 (semi-hard), 1.0 (easy)
    labels = np.array([0, 0, 1, 2, 3, 4])
    e = points(0.0, 0.3, 0.2, 0.4, 0.5, 1.0)
    # From anchor 0.3 back to 0.0 (d=0.09) only the negative at 1.0 (d=0.49) is farther: inactive.
    assert as_triplet_list(semihard_triplets(labels, e)) == [(0, 1, 3), (1, 0, 5)]
    loss, active = triplet_semihard_loss(labels, e, 0.2)
    assert float(loss) == pytest.approx((0.09 - 0.16 + 0.2) / 2, abs=1e-6)
    assert float(active) == 0.5


def test_a_negative_as_far_as_the_positive_is_not_farther():
    # From anchor 0.0 the positive 0.5 and the negative -0.5 tie at d=0.25 exactly: the rule is strict.
    labels = np.array([0, 0, 1, 2])
    assert as_triplet_list(semihard_triplets(labels, points(0.0, 0.5, -0.5, 0.6))) == [(0, 1, 3), (1, 0, 2)]


def test_without_a_farther_negative_the_farthest_is_used():
    labels = np.array([0, 0, 1, 2])
    e = points(0.0, 1.0, 0.1, 0.5)
    assert as_triplet_list(semihard_triplets(labels, e)) == [(0, 1, 3), (1, 0, 2)]
    loss, active = triplet_semihard_loss(labels, e, 0.2)
    assert float(loss) == pytest.approx(((1 - 0.25 + 0.2) + (1 - 0.81 + 0.2)) / 2, abs=1e-6)
    assert float(active) == 1.0


@pytest.mark.parametrize("loss_fn", [triplet_semihard_loss, triplet_batch_hard_loss])
@pytest.mark.parametrize("labels", [[3, 3, 3, 3], [0, 1, 2, 3]], ids=["one identity", "no positives"])
def test_batches_without_triplets_give_zero(loss_fn, labels):
    e = random_batch(1, n=4)[1]
    with tf.GradientTape() as tape:
        embeddings = tf.constant(e)
        tape.watch(embeddings)
        loss, active = loss_fn(np.array(labels), embeddings)
    assert float(loss) == 0.0 and float(active) == 0.0
    gradient = tape.gradient(loss, embeddings)
    assert gradient is None or np.all(tf.convert_to_tensor(gradient).numpy() == 0)
    if loss_fn is triplet_semihard_loss:
        assert as_triplet_list(semihard_triplets(np.array(labels), e)) == []


@pytest.mark.parametrize("seed", SEEDS)
def test_batch_hard_matches_reference(seed):
    labels, e = random_batch(seed)
    d = squared_distances(e)
    losses = []
    for a in range(len(labels)):
        positives = [d[a, p] for p in range(len(labels)) if p != a and labels[p] == labels[a]]
        negatives = [d[a, k] for k in range(len(labels)) if labels[k] != labels[a]]
        if positives and negatives:
            losses.append(max(max(positives) - min(negatives) + 0.2, 0.0))
    loss, active = triplet_batch_hard_loss(labels, e, 0.2)
    assert float(loss) == pytest.approx(np.mean(losses), abs=1e-5)
    assert float(active) == pytest.approx(np.mean(np.array(losses) > 0))


@pytest.mark.parametrize("seed", SEEDS)
def test_harmonic_matches_reference(seed):
    labels, new = random_batch(seed)
    old = random_batch(seed + 100, n=len(labels))[1]
    pooled_labels = np.concatenate([labels, labels])
    d = squared_distances(np.concatenate([new, old]))
    n = len(labels)
    triplets, _ = reference_semihard(pooled_labels, d, use_pair=lambda a, p: a < n or p < n)
    # Every image pairs with its own old embedding: the term that keeps the two models comparable.
    assert all((i, i + n) in {(a, p) for a, p, _ in triplets} for i in range(n) if (labels != labels[i]).any())
    expected_loss, expected_active = reference_loss(triplets, d, 0.2)
    loss, active = harmonic_triplet_loss(labels, new, old, 0.2)
    assert float(loss) == pytest.approx(expected_loss, abs=1e-5)
    assert float(active) == pytest.approx(expected_active)


def test_harmonic_trains_only_the_new_embeddings():
    labels, new = random_batch(3)
    old = random_batch(4, n=len(labels))[1]
    new_t, old_t = tf.constant(new), tf.constant(old)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([new_t, old_t])
        loss, _ = harmonic_triplet_loss(labels, new_t, old_t)
    assert tape.gradient(loss, old_t) is None
    assert np.abs(tape.gradient(loss, new_t).numpy()).sum() > 0


@pytest.mark.parametrize(
    "loss_fn",
    [
        triplet_semihard_loss,
        triplet_batch_hard_loss,
        lambda labels, e: harmonic_triplet_loss(labels, e, e[::-1]),
        lambda labels, e: distillation_loss(e, e[::-1]),
        lambda labels, e: relational_distillation_loss(e, e[::-1]),
        lambda labels, e: prototype_cosface_loss(labels, e, tf.eye(3, e.shape[1])),
        lambda labels, e: mirror_consistency_loss(e, e[::-1]),
    ],
    ids=["semihard", "batch_hard", "harmonic", "distillation", "relational", "prototype", "mirror"],
)
def test_gradients_are_finite_when_embeddings_coincide(loss_fn):
    labels = np.array([0, 0, 1, 1, 2])
    e = tf.constant(points(0.5, 0.5, 0.5, -0.5, 0.5))  # identical rows within and across identities
    with tf.GradientTape() as tape:
        tape.watch(e)
        result = loss_fn(labels, e)
        loss = result[0] if isinstance(result, tuple) else result
    assert np.all(np.isfinite(tape.gradient(loss, e).numpy()))


def test_losses_trace_in_tf_function_with_dynamic_batch():
    @tf.function(input_signature=[tf.TensorSpec([None], tf.int32), tf.TensorSpec([None, 8], tf.float32)])
    def losses(labels, embeddings):
        return (
            triplet_semihard_loss(labels, embeddings),
            triplet_batch_hard_loss(labels, embeddings),
            harmonic_triplet_loss(labels, embeddings, tf.reverse(embeddings, [0])),
            distillation_loss(embeddings, tf.reverse(embeddings, [0])),
            relational_distillation_loss(embeddings, tf.reverse(embeddings, [0]), embeddings[:, 0] > 0),
            prototype_cosface_loss(labels, embeddings, tf.eye(5, 8)),
        )

    for seed, n in [(0, 18), (1, 7)]:
        labels, e = random_batch(seed, n=n)
        traced, eager = losses(labels, e), losses.python_function(labels, e)
        np.testing.assert_allclose(tf.nest.flatten(traced), tf.nest.flatten(eager), rtol=1e-6)


def test_distillation_point_term():
    e1, e2 = points(1.0), np.array([[0.0, 1.0]], np.float32)
    assert float(distillation_loss(e1, e1)) == pytest.approx(0.0, abs=1e-7)
    assert float(distillation_loss(e1, e2)) == pytest.approx(2.0)  # orthogonal: 2 - 2 cos = 2
    assert float(distillation_loss(e1, -e1)) == pytest.approx(4.0)
    _, student = random_batch(5)
    teacher = random_batch(6)[1] * 3.0  # the teacher need not be unit length
    assert float(distillation_loss(student, teacher)) == pytest.approx(
        float(distillation_loss(student, teacher / 3.0)), rel=1e-6
    )


def test_distillation_matches_reference():
    _, student = random_batch(7)
    teacher = random_batch(8)[1] * 2.0
    s = student / np.linalg.norm(student, axis=1, keepdims=True)
    t = teacher / np.linalg.norm(teacher, axis=1, keepdims=True)
    point = np.mean(np.sum((s - t) ** 2, axis=1))
    n = len(s)
    relational = np.sum((squared_distances(s) - squared_distances(t)) ** 2) / (n * (n - 1))
    assert float(distillation_loss(student, teacher)) == pytest.approx(point, rel=1e-5)
    assert float(relational_distillation_loss(student, teacher)) == pytest.approx(relational, rel=1e-5)
    # It ignores a rotation of the whole embedding space, which the point term does not.
    rotation = np.linalg.qr(np.random.default_rng(9).normal(size=(8, 8)))[0].astype(np.float32)
    rotated = s @ rotation
    assert float(relational_distillation_loss(rotated, s)) == pytest.approx(0, abs=1e-5)
    assert float(distillation_loss(rotated, s)) > 0.1
    # Rows without a teacher vector drop out with their pairs: the same as leaving them out.
    valid = np.arange(n) % 3 != 0
    masked = relational_distillation_loss(student, np.where(valid[:, None], teacher, 9.0), tf.constant(valid))
    assert float(masked) == pytest.approx(float(relational_distillation_loss(student[valid], teacher[valid])), rel=1e-5)


def unit(rows):
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_memory_relational_matches_reference():
    _, student = random_batch(10)
    teacher = random_batch(11)[1] * 2.0
    past_student, past_teacher = unit(random_batch(12, n=7)[1]), unit(random_batch(13, n=7)[1])
    valid, past_valid = np.arange(18) % 4 != 0, np.arange(7) != 2
    s, t = unit(student), unit(teacher)
    d_s = np.sum((s[:, None] - past_student[None]) ** 2, axis=2)
    d_t = np.sum((t[:, None] - past_teacher[None]) ** 2, axis=2)
    expected = np.mean(((d_s - d_t) ** 2)[valid][:, past_valid])
    memory = MemoryRows(tf.constant(past_student), tf.constant(past_teacher), tf.constant(past_valid))
    loss = memory_relational_loss(student, teacher, tf.constant(valid), memory)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    # The memory's rows are constants: only the batch's student vectors get a gradient.
    e = tf.constant(student)
    with tf.GradientTape() as tape:
        tape.watch([e, memory.embeddings])
        loss = memory_relational_loss(e, teacher, tf.constant(valid), memory)
    grad_batch, grad_memory = tape.gradient(loss, [e, memory.embeddings])
    assert grad_memory is None and np.all(np.isfinite(grad_batch.numpy()))
    # An empty memory (nothing pushed yet) contributes nothing.
    empty = MemoryRows(tf.zeros((7, 8)), tf.zeros((7, 8)), tf.zeros((7,), tf.bool))
    assert float(memory_relational_loss(student, teacher, tf.constant(valid), empty)) == 0.0


# ---------------------------------------------------------------- the registry


def step_before_the_registry(cfg, labels, embeddings, teacher, has_teacher, old):
    """``train.Trainer._losses``'s sum as written before ``LOSS_TERMS``, from the loss functions:
    ``labels`` of every row (-1: unlabeled, after the labelled rows)."""
    n = int(np.sum(labels >= 0))
    mining = triplet_semihard_loss if cfg.mining == "semihard" else triplet_batch_hard_loss
    triplet = mining(labels[:n], embeddings[:n], cfg.margin)
    total = cfg.triplet * triplet.loss
    metrics = {"triplet": triplet.loss, "active_fraction": triplet.fraction_active}
    if cfg.distillation:
        target = tf.where(has_teacher[:, None], teacher, tf.stop_gradient(embeddings))
        rows = tf.cast(tf.shape(embeddings)[0], tf.float32)
        with_target = tf.maximum(tf.reduce_sum(tf.cast(has_teacher, tf.float32)), 1.0)
        distill = distillation_loss(embeddings, target) * rows / with_target
        total += cfg.distillation * distill
        metrics["distillation"] = distill
    if cfg.harmonic:
        harmonic = harmonic_triplet_loss(labels[:n], embeddings[:n], old[:n], cfg.margin)
        total += cfg.harmonic * harmonic.loss
        metrics["harmonic"] = harmonic.loss
        metrics["harmonic_active_fraction"] = harmonic.fraction_active
    metrics["loss"] = total
    return metrics


def replica_batch(seed, identities=4, k=3, unlabeled=4, dim=8):
    """P x K labelled rows then unlabeled ones; teacher targets missing (zeros, as fed) for some
    rows of both kinds; an old model's embeddings near the new ones."""
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.repeat(np.arange(identities), k), np.full(unlabeled, -1)]).astype(np.int32)
    unit = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
    centres = rng.normal(size=(identities + 1, dim))
    embeddings = unit(0.6 * centres[labels] + rng.normal(size=(len(labels), dim)))
    has_teacher = rng.random(len(labels)) > 0.3
    has_teacher[[1, -1]] = False
    teacher = np.where(has_teacher[:, None], rng.normal(size=embeddings.shape), 0.0).astype(np.float32)
    old = unit(embeddings + 0.3 * rng.normal(size=embeddings.shape))
    return labels, embeddings, teacher, has_teacher, old


@pytest.mark.parametrize("cfg", [
    LossConfig(),
    LossConfig(mining="batch_hard", margin=0.3),
    LossConfig(distillation=0.5),
    LossConfig(harmonic=1.0),
    LossConfig(triplet=0.5, mining="batch_hard", distillation=2.0, harmonic=0.7),
], ids=["triplet", "batch_hard", "triplet+distillation", "triplet+harmonic", "all"])
@pytest.mark.parametrize("seed", range(3))
def test_the_registry_sums_what_the_step_summed(cfg, seed):
    labels, embeddings, teacher, has_teacher, old = replica_batch(seed)
    n = int(np.sum(labels >= 0))
    e = tf.constant(embeddings)
    # The trainer feeds teacher targets and the old model only to runs whose terms need them.
    inputs = LossInputs(e, tf.constant(labels[:n]), cfg.margin, cfg.mining,
                        tf.constant(teacher) if cfg.needs_teacher else None,
                        tf.constant(has_teacher) if cfg.needs_teacher else None,
                        tf.constant(old) if cfg.needs_old_model else None)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(e)
        expected = step_before_the_registry(cfg, labels, e, teacher, has_teacher, old)
        total, metrics = total_loss(cfg.weights(), inputs)
    assert list(metrics) == list(expected)  # the same names, logged in the same order
    assert {k: float(v) for k, v in metrics.items()} == {k: float(v) for k, v in expected.items()}
    assert float(total) == float(expected["loss"])
    np.testing.assert_array_equal(tape.gradient(total, e), tape.gradient(expected["loss"], e))


def test_the_relational_term_skips_rows_without_a_teacher():
    labels, embeddings, teacher, has_teacher, _ = replica_batch(4)
    n = int(np.sum(labels >= 0))
    cfg = LossConfig(distillation=1.0, relational=2.0)
    inputs = LossInputs(tf.constant(embeddings), tf.constant(labels[:n]), cfg.margin, cfg.mining,
                        tf.constant(teacher), tf.constant(has_teacher))
    total, metrics = total_loss(cfg.weights(), inputs)
    kept = relational_distillation_loss(embeddings[has_teacher], teacher[has_teacher])
    assert float(metrics["relational"]) == pytest.approx(float(kept), rel=1e-5)
    assert float(total) == pytest.approx(float(metrics["triplet"] + metrics["distillation"] + 2 * kept), rel=1e-5)


def reference_prototype_cosface(labels, embeddings, prototypes, scale, margin):
    """CosFace's definition, one face at a time, over the identities that have a centre."""
    present = [c for c in range(len(prototypes)) if np.any(prototypes[c])]
    losses = []
    for label, e in zip(labels, embeddings.astype(np.float64)):
        e = e / np.linalg.norm(e)
        logits = {c: scale * (e @ prototypes[c] / np.linalg.norm(prototypes[c]) - margin * (c == label))
                  for c in present}
        top = max(logits.values())
        losses.append(top + np.log(sum(np.exp(v - top) for v in logits.values())) - logits[label])
    return np.mean(losses)


@pytest.mark.parametrize("seed", range(4))
def test_prototype_cosface_matches_its_definition_and_skips_absent_identities(seed):
    labels, embeddings = random_batch(seed, identities=5)
    labels = np.where(labels == 3, 4, labels)  # identity 3 has no face here; its centre is zero below
    prototypes = np.random.default_rng(seed).normal(size=(5, 8)).astype(np.float32)
    prototypes[3] = 0.0
    loss = prototype_cosface_loss(labels, embeddings, prototypes, scale=16.0, margin=0.3)
    expected = reference_prototype_cosface(labels, embeddings, prototypes, 16.0, 0.3)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    # Faces on their own centres with every other centre far: a small loss; a margin raises it.
    centres = np.eye(5, 8, dtype=np.float32)
    on_centre = prototype_cosface_loss(labels, centres[labels], centres, scale=16.0, margin=0.0)
    assert float(on_centre) < 1e-5
    assert float(prototype_cosface_loss(labels, centres[labels], centres, 16.0, 0.35)) > float(on_centre)


def test_the_prototype_term_sees_the_labelled_rows_and_the_configured_margin():
    labels, embeddings, teacher, has_teacher, _ = replica_batch(5)
    n = int(np.sum(labels >= 0))
    prototypes = np.random.default_rng(5).normal(size=(4, 8)).astype(np.float32)
    cfg = LossConfig(triplet=0.0, prototype=2.0, prototype_scale=20.0, prototype_margin=0.2)
    inputs = LossInputs(tf.constant(embeddings), tf.constant(labels[:n]), cfg.margin, cfg.mining,
                        tf.constant(teacher), tf.constant(has_teacher), None, tf.constant(prototypes),
                        cfg.prototype_scale, cfg.prototype_margin)
    total, metrics = total_loss(cfg.weights(), inputs)
    expected = reference_prototype_cosface(labels[:n], embeddings[:n], prototypes, 20.0, 0.2)
    assert float(metrics["prototype"]) == pytest.approx(expected, rel=1e-5)
    assert float(total) == pytest.approx(2 * expected, rel=1e-5)


def test_the_mirror_term_pulls_the_first_rows_and_their_mirrors_together():
    rng = np.random.default_rng(0)
    embeddings = tf.constant(rng.normal(size=(6, 4)).astype(np.float32))
    mirrors = tf.constant(rng.normal(size=(2, 4)).astype(np.float32))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([embeddings, mirrors])
        total, metrics = total_loss({"mirror": 1.0}, LossInputs(embeddings, tf.zeros(6, tf.int32), 0.2, "semihard",
                                                                mirror_embeddings=mirrors))
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    cosine = np.sum(unit(embeddings.numpy()[:2]) * unit(mirrors.numpy()), axis=1)
    assert float(metrics["mirror"]) == pytest.approx(np.mean(2 - 2 * cosine), rel=1e-5)
    # Both sides move; the rows without a mirror take no part.
    assert np.any(tape.gradient(total, mirrors).numpy() != 0)
    assert np.any(tape.gradient(total, embeddings).numpy()[:2] != 0)
    assert np.all(tape.gradient(total, embeddings).numpy()[2:] == 0)
    assert float(mirror_consistency_loss(embeddings[:2], 3.0 * embeddings[:2])) == pytest.approx(0, abs=1e-6)


def test_old_distillation_pulls_every_row_onto_the_old_models_embedding():
    rng = np.random.default_rng(1)
    embeddings = tf.constant(rng.normal(size=(6, 4)).astype(np.float32))
    old = tf.constant(rng.normal(size=(6, 4)).astype(np.float32))
    with tf.GradientTape() as tape:
        tape.watch([embeddings, old])
        # Two labelled rows, four unlabeled: the term sees all six.
        total, metrics = total_loss({"old_distillation": 2.0},
                                    LossInputs(embeddings, tf.zeros(2, tf.int32), 0.2, "semihard", old_embeddings=old))
    assert float(metrics["old_distillation"]) == pytest.approx(float(distillation_loss(embeddings, old)), rel=1e-6)
    assert float(total) == pytest.approx(2 * float(metrics["old_distillation"]), rel=1e-6)
    gradients = tape.gradient(total, [embeddings, old])
    assert np.all(np.any(gradients[0].numpy() != 0, axis=1)) and gradients[1] is None
    assert LOSS_TERMS["old_distillation"].unlabeled and LOSS_TERMS["old_distillation"].old_model


def test_every_loss_term_has_a_weight_in_the_config():
    hints = get_type_hints(LossConfig)
    assert all(hints.get(name) is float for name in LOSS_TERMS)
    assert LossConfig().weights() == {"triplet": 1.0}
    assert list(LossConfig(harmonic=1.0, distillation=0.5).weights()) == ["triplet", "distillation", "harmonic"]


def test_what_a_config_needs_follows_the_loss_terms(monkeypatch):
    def error(values):
        with pytest.raises(ConfigError) as info:
            config_from_dict(values)
        return str(info.value)

    assert "every loss weight is 0" in error({"loss": {"triplet": 0.0}})
    # A term that declares it needs teacher targets makes the config name them.
    monkeypatch.setitem(LOSS_TERMS, "harmonic", LossTerm(LOSS_TERMS["harmonic"].compute, teacher=True))
    assert "loss.harmonic > 0 needs data.teacher = true" in error({"loss": {"harmonic": 1.0}})
    assert ("only the distillation, relational, memory_relational, prototype, hint or harmonic loss uses: "
            "set loss.distillation, loss.relational, loss.memory_relational, loss.prototype, loss.hint or loss.harmonic"
            ) in error({"data": {"teacher": True}})
    # The memory must hold a whole batch (30 x 4 labelled + 30 unlabeled faces here).
    assert "loss.memory_size 100 must hold at least one batch (150 faces)" in error(
        {"data": {"teacher": True}, "batch": {"p": 30, "k": 4, "unlabeled": 30},
         "loss": {"memory_relational": 1.0, "memory_size": 100}})
    assert "loss.mirror_views 0 must be between 1 and the batch's 120 faces" in error(
        {"loss": {"mirror": 1.0, "mirror_views": 0}})
    # Unlabeled faces feed the teacher's terms and the old model's distillation, nothing else.
    assert "batch.unlabeled > 0 only feeds the distillation" in error({"batch": {"unlabeled": 4}})
    assert "or old_distillation loss: set" in error({"batch": {"unlabeled": 4}})
    config_from_dict({"batch": {"unlabeled": 4}, "loss": {"triplet": 0.0, "old_distillation": 1.0},
                      "harmonic": {"old_model": "old.npz"}})


@pytest.mark.parametrize("loss", [{"prototype_scale": 0.0}, {"prototype_margin": 1.0}, {"prototype_margin": -0.1}])
def test_prototype_scale_and_margin_are_checked(loss):
    with pytest.raises(ConfigError, match="loss.prototype_scale .* loss.prototype_margin"):
        config_from_dict({"loss": loss})


def test_hint_loss_is_the_mean_squared_map_difference_over_rows_with_a_teacher():
    rng = np.random.default_rng(0)
    teacher = rng.normal(size=(3, 2, 2, 4)).astype(np.float32)
    student = teacher + np.array([0.0, 1.0, 3.0], np.float32)[:, None, None, None]
    has_teacher = tf.constant([True, True, False])
    assert float(hint_loss(tf.constant(teacher), tf.constant(teacher), has_teacher)) == 0
    # Row 2 has no teacher map: only rows 0 and 1 count, (0 + 1) / 2.
    assert float(hint_loss(tf.constant(student), tf.constant(teacher), has_teacher)) == pytest.approx(0.5)
    # A zero map leaves all of standardised maps' variance unexplained.
    standard = (teacher - teacher.mean(axis=(0, 1, 2))) / teacher.std(axis=(0, 1, 2))
    zero = tf.zeros_like(standard)
    assert float(hint_loss(zero, tf.constant(standard), tf.constant([True] * 3))) == pytest.approx(1, abs=1e-5)
