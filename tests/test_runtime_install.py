"""The runtime-only install a device gets (``pip install .``): build the wheel, install it
in a fresh virtualenv without TensorFlow, and run what the README tells a Pi user to run.

Slow (a virtualenv, the runtime's wheels from the package index, a short benchmark):
``python -m pytest -m slow tests/test_runtime_install.py``.
"""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT / "docs" / "images"


def _run(*argv: str | Path, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, cwd=cwd, timeout=timeout)


@pytest.mark.slow
def test_runtime_only_install(tmp_path):
    wheel_args = ("wheel", "--no-deps", "--no-build-isolation", "-w", tmp_path, ROOT)
    built = _run(sys.executable, "-m", "pip", *wheel_args, cwd=tmp_path)
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("facenet_edge-*.whl")
    env = tmp_path / "env"
    venv.create(env, with_pip=True)
    bin_dir = env / "bin"
    installed = _run(bin_dir / "pip", "install", "--quiet", wheel, cwd=tmp_path)
    if installed.returncode != 0 and "No matching distribution" in installed.stderr + installed.stdout:
        pytest.skip(f"the runtime's dependencies cannot be fetched here: {installed.stderr.strip()[-200:]}")
    assert installed.returncode == 0, installed.stderr

    # Run outside the checkout: the shipped model and photo come from the wheel.
    no_tf = _run(bin_dir / "python", "-c", "import tensorflow", cwd=tmp_path)
    assert no_tf.returncode != 0 and "No module named 'tensorflow'" in no_tf.stderr

    bench = _run(bin_dir / "facenet-edge", "bench", "--runs", "3", "--out", tmp_path / "bench", cwd=tmp_path)
    assert bench.returncode == 0, bench.stderr
    machine = next(line for line in bench.stdout.splitlines() if line.startswith("machine: "))
    assert "facenet-edge " in machine and "commit" not in machine
    assert "faces from astronaut" in bench.stdout and (tmp_path / "bench" / "latency.json").is_file()

    photos = (PHOTOS / "astronaut.jpg", PHOTOS / "astronaut_flipped_small.jpg")
    verify = _run(bin_dir / "facenet-edge", "verify", *photos, cwd=tmp_path)
    assert verify.returncode == 0, verify.stderr
    assert verify.stdout.startswith(("same person: distance", "different people: distance"))

    train = _run(bin_dir / "facenet-train", "describe", "nn4_small2", cwd=tmp_path)
    assert train.returncode == 1
    assert train.stderr.strip().splitlines()[-1].startswith(
        "facenet-train: error: the training stack needs `pip install 'facenet-edge[train]'`"
    )
