"""Compact float weights: a trained model's variables in one ``.npz``, small enough to commit.

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
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # TensorFlow is imported only where a model is built
    import keras

FORMAT = "facenet-train compact weights v1"


def save_compact(model: keras.Model, path: str | Path, teacher_mean: np.ndarray | None = None) -> Path:
    """Write ``model``'s variables (trainable and not) to ``path`` (.npz), with the mean
    teacher descriptor of a distilled run (needed to compare the teacher's descriptors
    with this model's embeddings)."""
    path = Path(path)
    arrays = {}
    for variable in model.variables:
        value = np.asarray(variable.numpy())
        arrays[variable.path] = value.astype(np.float16 if value.ndim >= 2 else np.float32)
    meta = {"format": FORMAT, "architecture": model.name, "embedding_size": int(model.output_shape[-1])}
    if teacher_mean is not None:
        meta["teacher_mean"] = np.asarray(teacher_mean, np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.savez_compressed(f, **{f"meta/{k}": np.array(v) for k, v in meta.items()}, **arrays)
    tmp.replace(path)
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
    from .models import build_model

    meta, _ = _read(Path(path))
    model = build_model(str(meta["architecture"]), embedding_size=int(meta["embedding_size"]))
    load_into(model, path)
    return model


def teacher_mean_of(checkpoint: str | Path) -> np.ndarray | None:
    """The mean teacher descriptor a model distilled in the teacher's own space (dlib's) was
    trained against (a run folder's ``teacher_mean.npy`` or a compact file's), None for
    other models, and for a teacher projected onto the student (its mean alone maps nothing)."""
    from .train import TEACHER_BASIS, TEACHER_MEAN

    checkpoint = Path(checkpoint)
    if checkpoint.suffix == ".npz":
        return _read(checkpoint)[0].get("teacher_mean")
    path = checkpoint / TEACHER_MEAN
    if not checkpoint.is_dir() or not path.is_file() or (checkpoint / TEACHER_BASIS).is_file():
        return None
    return np.load(path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path, help="a run folder or a .keras file")
    parser.add_argument("--out", required=True, type=Path, help="the .npz to write")


def run(args: argparse.Namespace) -> int:
    from .train import load_keras_model

    path = save_compact(load_keras_model(args.checkpoint), args.out, teacher_mean_of(args.checkpoint))
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MB)")
    return 0
