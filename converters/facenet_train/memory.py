"""Cross-batch memory: the last ``size`` training rows (student and teacher vectors, unit
length), kept across steps for ``losses.memory_relational_loss``. A ring buffer in
TensorFlow variables, so it lives inside the compiled training step; one per replica
(each replica remembers its own batches). Not checkpointed: after a resume it refills
within ``size`` rows."""

from __future__ import annotations

import tensorflow as tf

from .losses import MemoryRows


def _per_replica(value: tf.Tensor, name: str) -> tf.Variable:
    return tf.Variable(value, trainable=False, name=name, synchronization=tf.VariableSynchronization.ON_READ,
                       aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)


def _unit(rows: tf.Tensor) -> tf.Tensor:
    return tf.math.l2_normalize(tf.cast(rows, tf.float32), axis=1)


class BatchMemory:
    """Create it inside the strategy's scope. Its slots start empty (``valid`` False), so the
    memory term is 0 until the first batch is pushed."""

    def __init__(self, size: int, student_dim: int, teacher_dim: int):
        if size < 1:
            raise ValueError(f"a batch memory needs at least one row, got {size}")
        self.size = size
        self.embeddings = _per_replica(tf.zeros((size, student_dim)), "memory_embeddings")
        self.teacher = _per_replica(tf.zeros((size, teacher_dim)), "memory_teacher")
        self.valid = _per_replica(tf.zeros((size,), tf.bool), "memory_valid")
        self.next_row = _per_replica(tf.constant(0, tf.int32), "memory_next_row")

    def rows(self) -> MemoryRows:
        return MemoryRows(self.embeddings.read_value(), self.teacher.read_value(), self.valid.read_value())

    def push(self, embeddings: tf.Tensor, teacher: tf.Tensor, valid: tf.Tensor) -> None:
        """Store a batch's rows (unit-normalised) over the oldest ones."""
        n = tf.shape(embeddings)[0]
        slots = tf.math.floormod(self.next_row + tf.range(n), self.size)[:, None]
        # A whole-variable assign: per-replica variables have no scatter update.
        for variable, rows in ((self.embeddings, _unit(tf.stop_gradient(embeddings))), (self.teacher, _unit(teacher)),
                               (self.valid, tf.cast(valid, tf.bool))):
            variable.assign(tf.tensor_scatter_nd_update(variable.read_value(), slots, rows))
        self.next_row.assign(tf.math.floormod(self.next_row + n, self.size))
