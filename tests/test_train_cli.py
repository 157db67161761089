"""``facenet-train`` where the training stack is not installed (``pip install .`` on a device)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

# A fresh interpreter in which TensorFlow cannot be imported (the test session has it).
SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["tensorflow"] = None
    from facenet_train.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


@pytest.mark.parametrize("argv", [["describe", "nn4_small2"], ["train", "--help"], ["evaluate", "--help"]])
def test_without_tensorflow_says_what_to_install(argv):
    run = subprocess.run([sys.executable, "-c", SCRIPT, *argv], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    assert run.stdout == ""
    assert run.stderr.splitlines() == [
        "facenet-train: error: the training stack needs `pip install 'facenet-edge[train]'` (no module 'tensorflow')"
    ]


def test_help_needs_no_training_stack():
    run = subprocess.run([sys.executable, "-c", SCRIPT, "--help"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "preprocess" in run.stdout
