"""A trained model on disk: a run folder, a ``.keras`` file or a compact weights ``.npz``.

A run folder (``facenet-train train --out``) holds ``checkpoints/``, ``logs/``
(TensorBoard), ``config.json`` (resolved) plus a copy of the config file, the teacher's
``teacher_mean.npy``/``teacher_basis.npy`` of a distilled run, and at the end
``model.weights.h5`` and ``model.keras``.

Compact weights: a trained model's variables in one ``.npz``, small enough to commit.
Convolution and dense kernels (99 % of the bytes) are stored as float16, everything else
(batch-norm statistics, biases) as float32: half the size of ``model.weights.h5``, and the
rounding moves embeddings far less than int8 conversion does. The file names its
architecture and embedding size, so ``load_compact`` rebuilds the model without a config.
Used to ship the float model beside the int8 file: successors are trained compatible
with it (``harmonic.old_model``), started from it (``model.init_weights``), or it is
re-converted (``facenet-train convert FILE.npz``).

    facenet-train export-weights RUN_DIR --out converters/weights/NAME.npz
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from facenet_edge.files import private_file

# Importing models also registers its custom layers, which loading a .keras file needs.
from .data import TEACHER_BASIS, TEACHER_MEAN
from .models import build_model, input_size_of

CHECKPOINTS = "checkpoints"
LOGS = "logs"
CONFIG_JSON = "config.json"
WEIGHTS = "model.weights.h5"
KERAS_MODEL = "model.keras"

FORMAT = "facenet-train compact weights v1"


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
        model = build_model(model_cfg["name"], embedding_size=model_cfg["embedding_size"],
                            input_size=model_cfg.get("input_size", 0))
        tf.train.Checkpoint(model=model).restore(latest).expect_partial()
        return model
    return keras.models.load_model(path / KERAS_MODEL if path.is_dir() else path, compile=False)


def run_config(checkpoint: Path) -> dict[str, Any] | None:
    """The ``config.json`` of the run folder ``checkpoint`` is (or whose ``model.keras`` it
    is), written by ``facenet-train train``: it names the training data."""
    folder = checkpoint if checkpoint.is_dir() else checkpoint.parent
    path = folder / CONFIG_JSON
    return json.loads(path.read_text()) if path.is_file() else None


def teacher_mean_of(checkpoint: str | Path) -> np.ndarray | None:
    """The mean teacher descriptor a model distilled in the teacher's own space (dlib's) was
    trained against (a run folder's ``teacher_mean.npy`` or a compact file's), None for
    other models, and for a teacher projected onto the student (its mean alone maps nothing)."""
    checkpoint = Path(checkpoint)
    if checkpoint.suffix == ".npz":
        return _read(checkpoint)[0].get("teacher_mean")
    path = checkpoint / TEACHER_MEAN
    if not checkpoint.is_dir() or not path.is_file() or (checkpoint / TEACHER_BASIS).is_file():
        return None
    return np.load(path)


# ---------------------------------------------------------------- compact weights


def save_compact(model: keras.Model, path: str | Path, teacher_mean: np.ndarray | None = None) -> Path:
    """Write ``model``'s variables (trainable and not) to ``path`` (.npz), with the mean
    teacher descriptor of a distilled run (needed to compare the teacher's descriptors
    with this model's embeddings)."""
    path = Path(path)
    arrays = {}
    for variable in model.variables:
        value = np.asarray(variable.numpy())
        arrays[variable.path] = value.astype(np.float16 if value.ndim >= 2 else np.float32)
    meta = {"format": FORMAT, "architecture": model.name, "embedding_size": int(model.output_shape[-1]),
            "input_size": input_size_of(model)}
    if teacher_mean is not None:
        meta["teacher_mean"] = np.asarray(teacher_mean, np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    with private_file(path, OSError) as f:
        np.savez_compressed(f, **{f"meta/{k}": np.array(v) for k, v in meta.items()}, **arrays)
    return path


def _read(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    with np.load(path) as data:
        meta = {k.removeprefix("meta/"): data[k] if data[k].ndim else data[k].item()
                for k in data.files if k.startswith("meta/")}
        arrays = {k: data[k] for k in data.files if not k.startswith("meta/")}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a compact weights file (written by `facenet-train export-weights`)")
    return meta, arrays


def load_into(model: keras.Model, path: str | Path) -> None:
    """Set every variable of ``model`` from ``path``; the names and shapes must match exactly."""
    path = Path(path)
    meta, arrays = _read(path)
    wanted = {v.path: v for v in model.variables}
    if set(wanted) != set(arrays):
        missing, extra = sorted(set(wanted) - set(arrays)), sorted(set(arrays) - set(wanted))
        raise ValueError(f"{path} holds {meta['architecture']} weights that do not fit {model.name}: "
                         f"missing {missing[:3]}, unexpected {extra[:3]}")
    for name, variable in wanted.items():
        if tuple(variable.shape) != arrays[name].shape:
            raise ValueError(f"{path}: {name} is {arrays[name].shape}, {model.name} needs {tuple(variable.shape)}")
        variable.assign(arrays[name].astype(np.float32))


def load_compact(path: str | Path) -> keras.Model:
    """The model stored in ``path``, rebuilt from its architecture name."""
    meta, _ = _read(Path(path))
    model = build_model(str(meta["architecture"]), embedding_size=int(meta["embedding_size"]),
                        input_size=int(meta.get("input_size", 0)))
    load_into(model, path)
    return model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path, help="a run folder or a .keras file")
    parser.add_argument("--out", required=True, type=Path, help="the .npz to write")


def run(args: argparse.Namespace) -> int:
    """The ``export-weights`` command."""
    path = save_compact(load_keras_model(args.checkpoint), args.out, teacher_mean_of(args.checkpoint))
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MB)")
    return 0
