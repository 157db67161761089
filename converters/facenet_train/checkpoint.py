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

Given several models (run folders, checkpoints ``RUN_DIR/checkpoints/ckpt-N``, ``.npz``
files), ``export-weights`` writes the mean of their variables: checkpoint averaging, which
lands nearer the middle of the basin the last steps of a run circle in than any one step
does. It only makes sense for models of one chain of runs (one student space).
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


def is_checkpoint_prefix(path: Path) -> bool:
    """Whether ``path`` names one training checkpoint (``RUN_DIR/checkpoints/ckpt-N``)."""
    return path.with_name(path.name + ".index").is_file()


def load_keras_model(path: str | Path) -> keras.Model:
    """A ``.keras`` file; a compact weights ``.npz``; a run folder's ``model.keras``; for a
    run still training, its config's architecture with the latest checkpoint's weights; or
    one checkpoint of a run (``RUN_DIR/checkpoints/ckpt-N``)."""
    path = Path(path)
    if path.suffix == ".npz":
        return load_compact(path)
    if is_checkpoint_prefix(path):
        return _from_checkpoint(path.parent.parent, str(path))
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist (a run folder, RUN_DIR/checkpoints/ckpt-N, .keras or .npz)")
    if path.is_dir() and not (path / KERAS_MODEL).is_file():
        latest = tf.train.latest_checkpoint(str(path / CHECKPOINTS))
        if latest is None:
            raise FileNotFoundError(f"{path} holds neither {KERAS_MODEL} nor {CONFIG_JSON} with {CHECKPOINTS}/")
        return _from_checkpoint(path, latest)
    return keras.models.load_model(path / KERAS_MODEL if path.is_dir() else path, compile=False)


def _from_checkpoint(run_dir: Path, prefix: str) -> keras.Model:
    config_path = run_dir / CONFIG_JSON
    if not config_path.is_file():
        raise FileNotFoundError(f"{run_dir} holds no {CONFIG_JSON} to rebuild the model of {prefix}")
    model_cfg = json.loads(config_path.read_text())["model"]
    model = build_model(model_cfg["name"], embedding_size=model_cfg["embedding_size"],
                        input_size=model_cfg.get("input_size", 0))
    tf.train.Checkpoint(model=model).restore(prefix).expect_partial()
    return model


def average_models(paths: list[Path]) -> keras.Model:
    """The first model of ``paths`` with every variable set to the mean over all of them
    (batch-norm statistics included); they must be one architecture."""
    models = [load_keras_model(p) for p in paths]
    first = models[0]
    layout = [(v.path, tuple(v.shape)) for v in first.variables]
    for path, model in zip(paths[1:], models[1:]):
        if [(v.path, tuple(v.shape)) for v in model.variables] != layout:
            raise ValueError(f"{path} is not the architecture of {paths[0]} ({first.name}): cannot average them")
    for i, variable in enumerate(first.variables):
        variable.assign(np.mean([m.variables[i].numpy() for m in models], axis=0))
    return first


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
    if is_checkpoint_prefix(checkpoint):
        checkpoint = checkpoint.parent.parent
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
    parser.add_argument("checkpoint", type=Path, nargs="+",
                        help="a run folder, a checkpoint (RUN_DIR/checkpoints/ckpt-N), a .keras or .npz file; "
                             "several: their weights averaged")
    parser.add_argument("--out", required=True, type=Path, help="the .npz to write")


def run(args: argparse.Namespace) -> int:
    """The ``export-weights`` command."""
    try:
        means = [teacher_mean_of(p) for p in args.checkpoint]
        if not all(m is None if means[0] is None else m is not None and np.array_equal(m, means[0]) for m in means):
            raise ValueError("they were distilled against different teacher means: their weights do not average")
        model = average_models(args.checkpoint) if len(args.checkpoint) > 1 else load_keras_model(args.checkpoint[0])
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"facenet-train export-weights: error: {exc}") from None
    path = save_compact(model, args.out, means[0])
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MB)"
          + (f", the mean of {len(args.checkpoint)} models" if len(args.checkpoint) > 1 else ""))
    return 0
