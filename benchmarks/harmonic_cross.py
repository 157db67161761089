"""Cross-model LFW accuracy: can a new model's probes be matched against an old model's gallery?

For each LFW pair, the first image is embedded by the OLD model (the enrolled gallery) and the
second by the NEW one (the probe), and the pair is scored with the same 10-fold protocol.
Printed next to old-old and new-new accuracy, for every new model given: a harmonic run
(FaceNet appendix) should keep cross-model accuracy close to its own; a plain fine-tune
from the same start shows what happens without it.

    python benchmarks/harmonic_cross.py --old RUN_OR_KERAS --new NAME=RUN_OR_KERAS [--new ...] \
        --lfw ../shared/data/lfw --lfw-cache LFW_CROP_CACHE [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_info, markdown_table, report, write_json  # noqa: E402

from facenet_train.checkpoint import load_keras_model  # noqa: E402
from facenet_train.evaluation import LfwCropPairs, default_card, keras_embeddings  # noqa: E402
from facenet_train.metrics import evaluate_distances  # noqa: E402


def pair_distances(gallery: np.ndarray, probes: np.ndarray, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Squared L2 between each pair's first image as embedded for the gallery and its second
    as embedded for the probe."""
    return ((gallery[first] - probes[second]) ** 2).sum(axis=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", required=True, help="old model: a run folder or .keras file")
    parser.add_argument("--new", required=True, action="append", metavar="NAME=PATH",
                        help="new model(s): NAME=run folder or .keras file; repeat to compare")
    parser.add_argument("--lfw", type=Path, required=True, help="LFW folder with pairs.txt")
    parser.add_argument("--lfw-cache", type=Path, required=True, help="`facenet-train preprocess-lfw` crop cache")
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks"), help="where harmonic_cross.json goes")
    args = parser.parse_args(argv)

    old_model = load_keras_model(args.old)
    card = default_card(old_model)
    pairs = LfwCropPairs.from_cache(args.lfw, args.lfw_cache, card.input_height)
    crops, first, second, issame = pairs.crops, pairs.first, pairs.second, pairs.issame
    old = keras_embeddings(old_model, crops, card)
    old_result = evaluate_distances(pair_distances(old, old, first, second), issame)

    rows, results = [], {"old": {"path": args.old, "lfw": old_result.scores()}, "new": {}}
    rows.append(["old", "old", "old", f"{100 * old_result.accuracy_mean:.2f} ± {100 * old_result.accuracy_std:.2f}",
                 f"{100 * old_result.val_mean:.1f}"])
    for spec in args.new:
        name, _, path = spec.partition("=")
        if not path:
            parser.error(f"--new takes NAME=PATH, got {spec!r}")
        new = keras_embeddings(load_keras_model(path), crops, card)
        own = evaluate_distances(pair_distances(new, new, first, second), issame)
        cross = evaluate_distances(pair_distances(old, new, first, second), issame)
        results["new"][name] = {"path": path, "lfw": own.scores(), "cross_lfw": cross.scores()}
        for gallery, result in (("new", own), ("old", cross)):
            rows.append([name, gallery, "new", f"{100 * result.accuracy_mean:.2f} ± {100 * result.accuracy_std:.2f}",
                         f"{100 * result.val_mean:.1f}"])

    headers = ["model", "gallery embedded by", "probes embedded by", "LFW 10-fold %", "VAL@FAR=1e-3 %"]
    print(markdown_table(headers, rows))
    config = {"old": args.old, "new": args.new, "lfw": str(args.lfw), "lfw_cache": str(args.lfw_cache)}
    path = write_json(args.out / "harmonic_cross.json", report("harmonic_cross", machine_info(), config, results, []))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
