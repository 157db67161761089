"""The arm64 check for real: build (or reuse) the qemu chroot and compare int8 embeddings.

Slow (the first run debootstraps Debian and installs ai-edge-litert under emulation:
many minutes), so marked ``slow`` and left out of the default run:
``pytest -m slow tests/test_arm_qemu.py`` (as root).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "arm_qemu_check.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("arm_qemu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def arm():
    if shutil.which("debootstrap") is None or not Path("/usr/bin/qemu-aarch64-static").exists():
        pytest.skip("needs qemu-user-static and debootstrap "
                    "(apt-get install qemu-user-static binfmt-support debootstrap)")
    if os.geteuid() != 0:
        pytest.skip("needs root (debootstrap, chroot, mount)")
    return _load_script()


@pytest.fixture(scope="module")
def int8_model(tmp_path_factory):
    keras = pytest.importorskip("keras")
    from facenet_train import convert
    from facenet_train.models import L2Normalize

    keras.utils.set_random_seed(0)
    inputs = keras.Input((96, 96, 3), batch_size=1)
    x = keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu")(inputs)
    x = keras.layers.Conv2D(32, 3, strides=2, padding="same", activation="relu")(x)
    x = keras.layers.AveragePooling2D(tuple(x.shape[1:3]))(x)
    x = keras.layers.Dense(128)(keras.layers.Flatten()(x))
    model = keras.Model(inputs, L2Normalize()(x))
    calibration = np.random.default_rng(0).uniform(-1, 1, size=(16, 96, 96, 3)).astype(np.float32)
    path = tmp_path_factory.mktemp("arm") / "tiny_int8.tflite"
    path.write_bytes(convert.convert_model(model, "int8", calibration))
    return path


def test_arm64_embeddings_match_x86(arm, int8_model, tmp_path):
    out = tmp_path / "arm.json"
    code = arm.main([str(int8_model), "--inputs", "4", "--json", str(out)])
    result = json.loads(out.read_text())
    assert code == 0 and result["within_one_step"], result
    assert result["arm64"]["machine"] == "aarch64"
