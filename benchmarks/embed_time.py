"""Embed time of several models, interleaved in one run, as ratios to the first.

Issue 13 caps a new default model at 1.5x the embed time of the one it replaces, measured
in the same run: timings drift with the CPU's clock and load, so each round times every
model back to back (``--runs`` single-face embeds each, after a warm-up) and the ratio
is taken of the medians over all rounds. One face: the astronaut photo shipped with
the package, found by the default detector and cropped as each model's card says.

    python benchmarks/embed_time.py --model NEW.tflite --model OLD.tflite [--rounds 20] [--runs 50]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from contextlib import ExitStack

import numpy as np
from common import (
    add_common_arguments,
    machine_info,
    machine_line,
    markdown_table,
    models_under_test,
    report,
    run_script,
    write_json,
)

from facenet_edge.arguments import positive_int
from facenet_edge.bench import BENCH_PHOTO, time_calls
from facenet_edge.detect import DEFAULT_DETECTOR, create_detector, main_face
from facenet_edge.embed import Embedder
from facenet_edge.io import read_image


def measure(args: argparse.Namespace) -> int:
    models = models_under_test(args.model)
    rounds, runs = (2, 5) if args.quick else (args.rounds, args.runs)
    image = read_image(BENCH_PHOTO)
    with create_detector(DEFAULT_DETECTOR) as detector:
        face = main_face(detector.detect(image), image.shape)
    with ExitStack() as stack:
        embedders = [stack.enter_context(Embedder.from_path(m.path, num_threads=args.threads)) for m in models]
        crops = [e.crop(image, face)[None] for e in embedders]
        seconds = [[] for _ in models]
        for _ in range(rounds):
            for times, embedder, crop in zip(seconds, embedders, crops):
                times.append(time_calls(lambda e=embedder, c=crop: e.embed(c), runs, warmup=3))
    medians = [float(np.median(np.concatenate(times))) * 1e3 for times in seconds]
    rows = [[m.label, m.target, f"{ms:.3f}", f"{ms / medians[0]:.2f}"] for m, ms in zip(models, medians)]
    machine = machine_info()
    print(machine_line(machine))
    print(markdown_table(["model", "target", "embed p50 (ms)", f"ratio to {models[0].label}"], rows))
    results = {m.label: {"path": str(m.path), "target": m.target, "median_ms": ms, "ratio": ms / medians[0]}
               for m, ms in zip(models, medians)}
    config = {"rounds": rounds, "runs": runs, "threads": args.threads, "quick": args.quick}
    print(f"wrote {write_json(args.out / 'embed_time.json', report('embed_time', machine, config, results, []))}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="embed_time.py", description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, several_models=True)
    parser.add_argument("--rounds", type=positive_int, default=20, help="interleaved rounds (default %(default)s)")
    parser.add_argument("--runs", type=positive_int, default=50,
                        help="embeds per model per round (default %(default)s)")
    parser.add_argument("--threads", type=positive_int, help="interpreter threads (default: the runtime's)")
    return run_script(parser, measure, argv)


if __name__ == "__main__":
    sys.exit(main())
