import numpy as np
import pytest
import tensorflow as tf

from facenet_train.memory import BatchMemory


def test_the_memory_keeps_the_last_rows_unit_length_and_wraps_round():
    memory = BatchMemory(5, student_dim=2, teacher_dim=3)
    assert not memory.rows().valid.numpy().any()
    first = np.array([[3.0, 4.0], [0.0, 2.0], [1.0, 0.0]], np.float32)
    memory.push(first, np.ones((3, 3), np.float32), np.array([True, False, True]))
    rows = memory.rows()
    np.testing.assert_allclose(rows.embeddings.numpy()[:3], [[0.6, 0.8], [0.0, 1.0], [1.0, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(rows.teacher.numpy()[:3], axis=1), 1.0, rtol=1e-6)
    assert rows.valid.numpy().tolist() == [True, False, True, False, False]
    # The next batch overwrites the oldest rows once the end is reached.
    second = np.array([[0.0, -1.0]] * 3, np.float32)
    memory.push(second, np.ones((3, 3), np.float32), np.array([True, True, True]))
    rows = memory.rows()
    np.testing.assert_allclose(rows.embeddings.numpy()[[0, 3, 4]], second, rtol=1e-6)
    np.testing.assert_allclose(rows.embeddings.numpy()[1:3], [[0.0, 1.0], [1.0, 0.0]], rtol=1e-6)
    assert rows.valid.numpy().tolist() == [True, False, True, True, True]


def test_the_memory_fills_inside_a_compiled_step():
    memory = BatchMemory(4, student_dim=2, teacher_dim=2)

    @tf.function(jit_compile=False)
    def step(rows):
        memory.push(rows, rows, tf.ones(tf.shape(rows)[:1], tf.bool))

    for value in (1.0, 2.0, 3.0):
        step(tf.fill((2, 2), value))
    assert memory.rows().valid.numpy().all()
    assert int(memory.next_row.numpy()) == 2


def test_a_memory_needs_a_row():
    with pytest.raises(ValueError, match="at least one row"):
        BatchMemory(0, 2, 2)
