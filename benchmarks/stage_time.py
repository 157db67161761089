"""Where an int8 model's time goes: each stage's share of the interpreter time beside its share
of the multiply-adds, for models of the training stack's registry.

Multiply-adds do not predict int8 time: a stage on a large map or with a concatenation of
branches costs more time per multiply-add than a wide convolution on a small one. This is
what bounds a model's capacity under an embed-time cap (issue 13: 1.5x v0.5.0's time).

Each model of ``--family`` (``NAME`` or ``NAME@SIZE`` for another input size) is built
untrained and cut after every stage of its layout (stem convolutions and poolings, each
Inception block, the embedding); each cut is converted to full-integer int8 as
``facenet-train convert`` does, calibrated on random images (the values do not change the
time). All cuts of all models are timed interleaved, one image per invoke, ``--rounds``
rounds of ``--runs`` invokes; a stage's time is the median of its cut minus the previous
cut's. The whole models' medians are also given as ratios to the first one.

Needs TensorFlow (the ``train`` extra). About a minute per model to convert.

    python benchmarks/stage_time.py [--family nn4_small2@112,nn4_small2@128] [--threads N] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from common import (
    DEFAULT_OUT,
    machine_info,
    machine_line,
    markdown_table,
    report,
    run_script,
    write_json,
)

from facenet_edge.arguments import positive_int
from facenet_edge.bench import time_calls
from facenet_edge.interpreter import load_interpreter

DEFAULT_FAMILY = "nn4_small2@112"
QUICK_FAMILY = "nns2"
CALIBRATION_SAMPLES = 8


@dataclass(frozen=True)
class Stage:
    name: str
    macs: int
    ms: float


@dataclass(frozen=True)
class ModelTimes:
    model: str
    input: str  # height x width
    macs: int
    ms: float
    stages: tuple[Stage, ...]


def family(text: str) -> list[tuple[str, int]]:
    """``NAME[@SIZE],...``: registry models and their input sizes (0: the model's own)."""
    from facenet_train.models import MODELS

    specs = []
    for item in text.split(","):
        name, _, size = item.strip().partition("@")
        if name not in MODELS or (size and not size.isdigit()):
            raise argparse.ArgumentTypeError(f"{item!r}: expected NAME or NAME@SIZE with NAME one of {sorted(MODELS)}")
        specs.append((name, int(size or 0)))
    return specs


def convert_cuts(name: str, size: int, folder: Path) -> tuple[list[tuple[str, int, Path]], str]:
    """Each cut of the model as an int8 file under ``folder``, with the multiply-adds of its
    stage; and the model's input (height x width)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    from facenet_train.conversion import convert_model, with_batch_one
    from facenet_train.flops import count_flops
    from facenet_train.models import build_model, stage_outputs

    model = build_model(name, input_size=size)
    shape = tuple(int(d) for d in model.input_shape[1:])
    layer_macs = {layer.name: layer.macs for layer in count_flops(model).layers}
    calibration = np.random.default_rng(0).uniform(-1.0, 1.0, (CALIBRATION_SAMPLES, *shape)).astype(np.float32)
    side = f"{shape[0]}x{shape[1]}"
    cuts, counted = [], set()
    for stage, end in stage_outputs(name):
        print(f"{name} {side} up to {stage} ...", file=sys.stderr, flush=True)
        cut = keras.Model(model.input, model.get_layer(end).output)
        names = {layer.name for layer in cut.layers} - counted
        counted |= names
        path = folder / f"{name}_{side}_{stage}.tflite"
        path.write_bytes(convert_model(with_batch_one(cut), "int8", calibration))
        cuts.append((stage, sum(layer_macs.get(n, 0) for n in names), path))
    return cuts, side


def measure(args: argparse.Namespace) -> int:
    specs = args.family or family(QUICK_FAMILY if args.quick else DEFAULT_FAMILY)
    rounds, runs = (2, 3) if args.quick else (args.rounds, args.runs)
    folder = args.out / "stage_time"
    folder.mkdir(parents=True, exist_ok=True)
    converted = [(name, *convert_cuts(name, size, folder)) for name, size in specs]
    with ExitStack() as stack:
        timed = []
        for _, cuts, _ in converted:
            for _, _, path in cuts:
                model = stack.enter_context(load_interpreter(path, args.threads, embedding=False))
                timed.append((model, np.zeros(model.input.shape, model.input.dtype), []))
        for _ in range(rounds):
            for model, image, seconds in timed:
                seconds.append(time_calls(lambda m=model, x=image: m.run(x), runs, warmup=3))
    medians = iter(float(np.median(np.concatenate(seconds))) * 1e3 for _, _, seconds in timed)
    results = []
    for name, cuts, side in converted:
        stages, before = [], 0.0
        for stage, macs, _ in cuts:
            ms = next(medians)
            stages.append(Stage(stage, macs, ms - before))
            before = ms
        results.append(ModelTimes(name, side, sum(s.macs for s in stages), before, tuple(stages)))
    machine = machine_info([args.threads] if args.threads else None)
    print(machine_line(machine))
    for model in results:
        print(f"\n## {model.model} at {model.input}: {model.macs / 1e6:.1f} M MACs, {model.ms:.3f} ms\n")
        print(markdown_table(["stage", "MACs M", "MACs %", "ms", "time %"], [
            [s.name, f"{s.macs / 1e6:.1f}", f"{100 * s.macs / model.macs:.1f}", f"{s.ms:.3f}",
             f"{100 * s.ms / model.ms:.1f}"] for s in model.stages]))
    first = results[0]
    print("\n## Whole models\n")
    print(markdown_table(["model", "input", "MACs M", "ms", "MACs ratio", "time ratio"], [
        [m.model, m.input, f"{m.macs / 1e6:.1f}", f"{m.ms:.3f}", f"{m.macs / first.macs:.3f}",
         f"{m.ms / first.ms:.3f}"] for m in results]))
    config = {"models": [f"{n}@{s}" for n, s in specs], "rounds": rounds, "runs": runs, "threads": args.threads,
              "quick": args.quick}
    path = write_json(args.out / "stage_time.json",
                      report("stage_time", machine, config, {"models": [asdict(m) for m in results]}, []))
    print(f"\nwrote {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stage_time.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", type=family, metavar="NAME[@SIZE],...", help=f"default: {DEFAULT_FAMILY}")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, metavar="DIR",
                        help="where the JSON and the converted cuts go (default: %(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny configuration (seconds): checks the script works; numbers mean little")
    parser.add_argument("--rounds", type=positive_int, default=15, help="interleaved rounds (default %(default)s)")
    parser.add_argument("--runs", type=positive_int, default=40, help="invokes per cut per round (default %(default)s)")
    parser.add_argument("--threads", type=positive_int, help="interpreter threads (default: the runtime's)")
    return run_script(parser, measure, argv)


if __name__ == "__main__":
    sys.exit(main())
