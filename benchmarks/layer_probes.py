"""Linear probes: how well each layer of a distilled student predicts its teacher's target on
faces it never trained on — is the head, the pooling or the trunk what limits the student's
agreement with its teacher?

The student is a trained model's float weights (``--weights``, a compact ``.npz`` of
``facenet-train export-weights``). Each layer of ``--layers`` gives features of every face:
the layer's map averaged over its positions (``pooled``) and, when the map holds at most
10,000 values, the whole map flattened (``spatial``); a layer whose output is already a
vector is taken as it is (``vector``). From each, a ridge regression (no intercept) maps the
features, standardised with the training faces' mean and standard deviation (+1e-6), to the
unit teacher targets of training faces: the faces of ``--shards N`` shards of the crop cache
(``--crops``) spread evenly over it (``np.linspace(0, shards - 1, N).round()``), less the
LFW-overlap people (``--exclude``) and the faces without a finite teacher descriptor. Their
targets are the cached descriptors (``teacher-NNNNN.npy`` beside each shard) centred and
projected with the run's ``teacher_mean.npy``/``teacher_basis.npy`` (``--space``;
``facenet_train.data.teacher_targets``), as in training. The ridge is chosen from 10, 100,
1000 and 10000 by the mean cosine on the last 10 % of the training faces after fitting the
first 90 % (the smaller one on a tie), then refitted on all of them.

Each probe is scored on the held-out faces, every crop of the ``preprocess-lfw`` cache
(``--lfw-cache``), centre-cut to the template crop: the mean cosine of its unit output to the
teacher's target there (the teacher's descriptors of the LFW crops with flip, as
``teacher_agreement.py`` makes and caches them: ``--teacher-onnx``, ``--teacher-cache``),
the mean cosine on the training faces, and LFW's 10-fold accuracy and VAL at FAR 1e-3 with
its outputs as embeddings (``pairs.txt`` of ``--lfw``). The model's own output is scored
the same way, the reference row: a probe below it does worse than the trained head on the
same features. This script reproduces the diagnostic behind docs/model.md's probe table
(same faces, ridges, standardisation and metrics). The features take most of the time:
about 12 minutes for the default 15 shards (14,723 faces) and LFW's 7,701 crops on two
busy cores.

    python benchmarks/layer_probes.py --crops TRAIN_CROP_CACHE --space RUN_DIR --lfw-cache LFW_CROP_CACHE \\
        --teacher-onnx edgeface_xs.onnx --teacher-cache FILE.npy [--weights W.npz] [--shards N] \\
        [--exclude OVERLAP.txt] [--lfw DIR] [--layers NAME ...] [--threads N]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from common import (
    DEFAULT_OUT,
    ROOT,
    default_lfw,
    machine_info,
    machine_line,
    markdown_table,
    report,
    run_script,
    write_json,
)
from teacher_agreement import load_space, teacher_descriptors, template_crops

from facenet_edge.arguments import positive_int
from facenet_edge.embed import normalise
from facenet_edge.errors import FacenetEdgeError
from facenet_train import data
from facenet_train.augment import centre_crop
from facenet_train.checkpoint import load_compact
from facenet_train.evaluation import LfwCropPairs, default_card
from facenet_train.metrics import LfwResult, evaluate_distances

DEFAULT_WEIGHTS = Path("converters/weights/nn4_small2_distilled.npz")  # in the repository
SHARED_OVERLAP = Path("../shared/data/lfw_overlap.txt")  # beside the repository, as the configs name it
DEFAULT_SHARDS = 15
DEFAULT_LAYERS = ("inception_4a_concat", "inception_4e_concat", "inception_5a_concat", "inception_5b_concat",
                  "flatten", "embedding_dense")
SPATIAL_LIMIT = 10_000  # a map with at most this many values is also probed whole
RIDGES = (1e1, 1e2, 1e3, 1e4)
RIDGE_FIT = 0.9  # the share of the training faces the ridge is fitted on while it is chosen
STANDARDISE_EPS = 1e-6
FEATURE_BATCH = 256


def unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, in their own precision (the probes' outputs are float64)."""
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# --------------------------------------------------------------------------- training faces


@dataclass(frozen=True)
class TrainingFaces:
    """The probes' training faces: template crops and the teacher's descriptors."""

    crops: np.ndarray  # (N, S, S, 3) uint8
    teacher: np.ndarray  # (N, D) float32
    shards: list[str]  # the shards they come from
    shards_in_cache: int
    excluded: int  # faces of LFW-overlap people left out
    without_teacher: int  # faces left out for want of a finite teacher descriptor


def picked_shards(count: int, wanted: int) -> np.ndarray:
    """Indices of ``wanted`` shards of ``count`` spread evenly over them (all of them when
    ``wanted >= count``)."""
    return np.unique(np.linspace(0, count - 1, wanted).round().astype(int))


def training_faces(cache_dir: Path, shards: int, excluded: set[str]) -> TrainingFaces:
    """The faces of ``shards`` shards of the crop cache spread over it, in the manifest's
    order, less the ``excluded`` people and the faces without a finite teacher descriptor;
    the crops centre-cut to the template crop."""
    try:
        manifest = data.CacheManifest.load(cache_dir)
        names = [manifest.shards[i] for i in picked_shards(len(manifest.shards), shards)]
        cache = data.load_cache(cache_dir, with_teacher=True, shards=names)
    except (FileNotFoundError, ValueError) as exc:
        raise FacenetEdgeError(f"--crops: {exc}") from None
    data.check_aligner(manifest, cache_dir)
    person = data.without_people(excluded)({"identities": cache.identities})
    described = np.isfinite(cache.teacher).all(axis=1)
    keep = person & described
    faces = TrainingFaces(centre_crop(cache.crops[keep], manifest.crop_size), cache.teacher[keep].astype(np.float32),
                          names, len(manifest.shards), int(np.count_nonzero(~person)),
                          int(np.count_nonzero(person & ~described)))
    if len(faces.crops) < 2:
        raise FacenetEdgeError(f"--crops {cache_dir}: {len(faces.crops)} training faces left in {len(names)} "
                               "shard(s): pass more --shards")
    return faces


# --------------------------------------------------------------------------- features


def load_student(weights: Path, layers: Sequence[str], threads: int | None):
    """The model of ``weights`` and a Keras model giving each layer's output, then the model's."""
    if threads:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    try:
        model = load_compact(weights)
    except ValueError as exc:
        raise FacenetEdgeError(f"--weights: {exc}") from None
    names = {layer.name for layer in model.layers}
    unknown = [name for name in layers if name not in names]
    if unknown:
        raise FacenetEdgeError(f"--layers: {model.name} has no layer {', '.join(unknown)}")
    outputs = [model.get_layer(name).output for name in layers] + [model.output]
    return model, keras.Model(model.input, outputs)


def feature_views(output: np.ndarray) -> dict[str, np.ndarray]:
    """A layer's output as the probes' features: a map pooled over its positions and, when
    small enough, flattened whole; a vector as it is."""
    if output.ndim == 2:
        return {"vector": output}
    if output.ndim != 4:
        raise FacenetEdgeError(f"--layers: a layer gives {output.shape[1:]} outputs; probes take maps (H, W, C) "
                               "or vectors")
    views = {"pooled": output.mean(axis=(1, 2))}
    if np.prod(output.shape[1:]) <= SPATIAL_LIMIT:
        views["spatial"] = output.reshape(len(output), -1)
    return views


def features(extractor, card, crops: np.ndarray) -> tuple[list[dict[str, np.ndarray]], np.ndarray]:
    """Per layer, its features of every crop (``feature_views``); the model's outputs."""
    parts: list[defaultdict[str, list[np.ndarray]]] = []
    outputs = []
    for start in range(0, len(crops), FEATURE_BATCH):
        batch = normalise(tf.cast(crops[start:start + FEATURE_BATCH], tf.float32), card)
        *layers, output = (np.asarray(r) for r in extractor(batch, training=False))
        if not parts:
            parts = [defaultdict(list) for _ in layers]
        for part, layer in zip(parts, layers, strict=True):
            for kind, values in feature_views(layer).items():
                part[kind].append(values)
        outputs.append(output)
    return [{k: np.concatenate(v) for k, v in part.items()} for part in parts], np.concatenate(outputs)


# --------------------------------------------------------------------------- probes


def lfw_scores(pairs: LfwCropPairs, embeddings: np.ndarray) -> LfwResult:
    """LFW's 10-fold scores of embeddings of every face of the LFW cache (in its order):
    the pairs' crops are its rows ``pairs.rows``."""
    paired = embeddings[pairs.rows]
    return evaluate_distances(np.sum((paired[pairs.first] - paired[pairs.second]) ** 2, axis=1), pairs.issame)


def ridge_solve(gram: np.ndarray, rhs: np.ndarray, ridge: float) -> np.ndarray:
    """(gram + ridge I)^-1 rhs, in float64."""
    system = gram.astype(np.float64)
    system[np.diag_indices_from(system)] += ridge
    return np.linalg.solve(system, rhs)


@dataclass(frozen=True)
class Probe:
    """One probe's scores. ``ridge_validation``: each ridge's mean cosine on the held-back
    10 % of the training faces; ``lfw``: the 10-fold scores of its outputs (fractions)."""

    layer: str
    features: str
    dims: int
    ridge: float | None
    ridge_validation: dict[str, float]
    heldout_cosine: float
    train_cosine: float
    lfw: dict[str, float]

    @property
    def label(self) -> str:
        return f"{self.layer} {self.features}"


def probe(layer: str, kind: str, train: np.ndarray, heldout: np.ndarray, train_targets: np.ndarray,
          heldout_targets: np.ndarray, pairs: LfwCropPairs) -> Probe:
    """Ridge regression from standardised features to unit targets, the ridge chosen on the
    last 10 % of the training faces; scored on the held-out ones."""
    mu, sd = train.mean(0), train.std(0) + STANDARDISE_EPS
    train, heldout = (train - mu) / sd, (heldout - mu) / sd
    cut = int(RIDGE_FIT * len(train))
    fit_gram, fit_rhs = train[:cut].T @ train[:cut], train[:cut].T @ train_targets[:cut]
    validation, best = {}, None
    for ridge in RIDGES:
        w = ridge_solve(fit_gram, fit_rhs, ridge)
        validation[f"{ridge:g}"] = float(np.mean(np.sum(unit(train[cut:] @ w) * train_targets[cut:], 1)))
        if best is None or validation[f"{ridge:g}"] > validation[f"{best:g}"]:
            best = ridge
    w = ridge_solve(train.T @ train, train.T @ train_targets, best)
    predicted_train, predicted = unit(train @ w), unit(heldout @ w)
    return Probe(layer, kind, train.shape[1], best, validation,
                 float(np.mean(np.sum(predicted * heldout_targets, 1))),
                 float(np.mean(np.sum(predicted_train * train_targets, 1))), lfw_scores(pairs, predicted).scores())


# --------------------------------------------------------------------------- run


def check_inputs(args: argparse.Namespace) -> None:
    if not args.weights.is_file():
        raise FacenetEdgeError(f"--weights {args.weights} not found: pass a compact weights .npz "
                               "(facenet-train export-weights)")
    if args.exclude is None or not args.exclude.is_file():
        raise FacenetEdgeError(f"--exclude {args.exclude or SHARED_OVERLAP} not found: pass the LFW overlap list "
                               "(the training configs' exclude)")
    if args.lfw is None or not (args.lfw / "pairs.txt").is_file():
        raise FacenetEdgeError(f"--lfw {args.lfw or '../shared/data/lfw'} holds no pairs.txt: pass the LFW folder")
    if not args.teacher_onnx.is_file():
        raise FacenetEdgeError(f"--teacher-onnx {args.teacher_onnx} not found: pass the EdgeFace export "
                               "(facenet-train teacher-export)")


def run(args: argparse.Namespace) -> int:
    check_inputs(args)
    mean, basis = load_space(args.space)
    try:
        excluded = data.read_overlap(args.exclude)
    except ValueError as exc:
        raise FacenetEdgeError(f"--exclude: {exc}") from None
    machine = machine_info([args.threads] if args.threads else None)

    lfw_crops = template_crops(args.lfw_cache)
    lfw_teacher, source = teacher_descriptors(args, lfw_crops, np.arange(len(lfw_crops)))
    faces = training_faces(args.crops, args.shards, excluded)
    for what, width in (("the LFW crops' teacher descriptors", lfw_teacher.shape[1]),
                        ("--crops' teacher descriptors", faces.teacher.shape[1])):
        if width != len(mean):
            raise FacenetEdgeError(f"{what} are {width}-d, --space {args.space} centres {len(mean)}-d ones: "
                                   "a run distilled from another teacher")
    train_targets = unit(data.teacher_targets(faces.teacher, mean, basis))
    heldout_targets = unit(data.teacher_targets(lfw_teacher, mean, basis))

    model, extractor = load_student(args.weights, args.layers, args.threads)
    card = default_card(model)
    if card.embedding_size != basis.shape[1]:
        raise FacenetEdgeError(f"{args.weights} embeds {card.embedding_size}-d, --space {args.space} projects "
                               f"the teacher to {basis.shape[1]}-d")
    for what, crops in (("--crops", faces.crops), ("--lfw-cache", lfw_crops)):
        if crops.shape[1:3] != card.input_size:
            raise FacenetEdgeError(f"{model.name} takes {card.input_size} crops, {what} holds {crops.shape[1:3]}")
    try:
        pairs = LfwCropPairs.load(args.lfw, args.lfw_cache, card.input_height)
    except (FileNotFoundError, ValueError) as exc:
        raise FacenetEdgeError(f"--lfw: {exc}") from None

    print(f"features of {len(faces.crops)} training faces and {len(lfw_crops)} LFW crops ...", file=sys.stderr,
          flush=True)
    start = time.perf_counter()
    train_features, train_output = features(extractor, card, faces.crops)
    heldout_features, heldout_output = features(extractor, card, lfw_crops)
    feature_seconds = time.perf_counter() - start

    own = Probe("model output", "embedding", heldout_output.shape[1], None, {},
                float(np.mean(np.sum(heldout_output * heldout_targets, 1))),
                float(np.mean(np.sum(train_output * train_targets, 1))),
                lfw_scores(pairs, heldout_output).scores())
    probes = []
    start = time.perf_counter()
    for layer, train, heldout in zip(args.layers, train_features, heldout_features, strict=True):
        for kind in train:
            print(f"probe {layer} {kind} ({train[kind].shape[1]} values) ...", file=sys.stderr, flush=True)
            probes.append(probe(layer, kind, train[kind], heldout[kind], train_targets, heldout_targets, pairs))
    probe_seconds = time.perf_counter() - start

    print("# facenet-edge linear probes of a student's layers to its teacher's target\n")
    print(machine_line(machine))
    print(f"\n## {args.weights.name}: ridge probes from {len(faces.crops)} training faces ({len(faces.shards)} of "
          f"{faces.shards_in_cache} shards), scored on {len(lfw_crops)} LFW crops\n")
    headers = ["features", "dims", "ridge", "held-out cosine", "train cosine", "LFW", "VAL"]
    rows = [[p.label, p.dims, "—" if p.ridge is None else f"{p.ridge:g}", f"{p.heldout_cosine:.3f}",
             f"{p.train_cosine:.3f}", f"{100 * p.lfw['accuracy_mean']:.2f}", f"{100 * p.lfw['val_mean']:.1f}"]
            for p in [own, *probes]]
    print(markdown_table(headers, rows))
    print(f"\nCosines to the teacher's target: its descriptors centred and projected with --space {args.space} "
          f"({basis.shape[0]} -> {basis.shape[1]} dimensions); LFW's held-out ones with flip, {source}. "
          f"LFW: 10-fold accuracy (%) and VAL at FAR 1e-3 (%) of the outputs as embeddings. "
          f"Features in {feature_seconds:.0f} s, probes in {probe_seconds:.0f} s.")
    config = {
        "weights": args.weights,
        "model": model.name,
        "layers": list(args.layers),
        "crops": args.crops,
        "shards": faces.shards,
        "shards_in_cache": faces.shards_in_cache,
        "training_faces": len(faces.crops),
        "excluded_faces": faces.excluded,
        "faces_without_teacher": faces.without_teacher,
        "exclude": args.exclude,
        "space": args.space,
        "lfw": args.lfw,
        "lfw_cache": args.lfw_cache,
        "lfw_crops": len(lfw_crops),
        "teacher_onnx": args.teacher_onnx,
        "teacher_flip": True,
        "teacher_cache": args.teacher_cache,
        "teacher_descriptors": source,
        "ridges": list(RIDGES),
        "ridge_fit": RIDGE_FIT,
        "spatial_limit": SPATIAL_LIMIT,
        "threads": args.threads,
    }
    results = {"model_output": asdict(own), "probes": [asdict(p) for p in probes],
               "feature_seconds": feature_seconds, "probe_seconds": probe_seconds}
    path = write_json(args.out / "layer_probes.json", report("layer_probes", machine, config, results, []))
    print(f"\nwrote {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="layer_probes", description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, default=ROOT / DEFAULT_WEIGHTS, metavar="FILE",
                        help=f"the student's compact weights .npz (default: {DEFAULT_WEIGHTS})")
    parser.add_argument("--crops", type=Path, required=True, metavar="DIR",
                        help="the training crop cache (facenet-train preprocess) with its teacher descriptors")
    parser.add_argument("--shards", type=positive_int, default=DEFAULT_SHARDS, metavar="N",
                        help="train on N shards spread evenly over --crops (default: %(default)s)")
    overlap = (ROOT / SHARED_OVERLAP).resolve()
    parser.add_argument("--exclude", type=Path, default=overlap if overlap.is_file() else None, metavar="FILE",
                        help=f"LFW overlap list: these people are left out of training (default: {SHARED_OVERLAP})")
    parser.add_argument("--space", type=Path, required=True, metavar="RUN_DIR",
                        help="a distilled training run folder (facenet-train train --out) with the teacher's "
                             "mean and basis (.npy)")
    parser.add_argument("--lfw", type=Path, default=default_lfw(), metavar="DIR",
                        help="LFW folder with pairs.txt (default: ../shared/data/lfw)")
    parser.add_argument("--lfw-cache", type=Path, required=True, metavar="DIR",
                        help="`facenet-train preprocess-lfw` crop cache (the held-out faces)")
    parser.add_argument("--teacher-onnx", type=Path, required=True, metavar="FILE",
                        help="the EdgeFace-XS export (facenet-train teacher-export)")
    parser.add_argument("--teacher-cache", type=Path, metavar="FILE",
                        help="the teacher's descriptors of every face of --lfw-cache (.npy): written when absent, "
                             "read when present (teacher_agreement.py's)")
    parser.add_argument("--layers", nargs="+", default=list(DEFAULT_LAYERS), metavar="NAME",
                        help="the layers to probe (default: %(default)s)")
    parser.add_argument("--threads", type=positive_int, metavar="N",
                        help="TensorFlow's and the teacher's threads (default: TensorFlow's own; the teacher's 2)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, metavar="DIR",
                        help="where layer_probes.json goes (default: %(default)s)")
    return run_script(parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
