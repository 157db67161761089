"""``facenet-train``: preprocess, teacher, factorize, widen, train, evaluate, describe, convert and the other commands.

Only the chosen command's module is imported (its arguments are added then), so
``facenet-train --help`` and ``preprocess`` do not pay for importing TensorFlow, and
``convert`` (another module's) plugs in through the same ``add_arguments``/``run`` pair.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    module: str
    help: str
    add_arguments: str = "add_arguments"
    run: str = "run"


COMMANDS: dict[str, Command] = {
    "preprocess": Command("facenet_train.preprocess", "detect, align and cache training faces"),
    "preprocess-lfw": Command("facenet_train.preprocess", "detect, align and cache the LFW images used by the pairs",
                              "add_lfw_arguments", "run_lfw"),
    "teacher-export": Command("facenet_train.edgeface", "export the EdgeFace-XS teacher to ONNX and score it on LFW"),
    "teacher": Command("facenet_train.teacher",
                       "cache a teacher's descriptors of the cached faces (distillation targets)"),
    "teacher-head": Command("facenet_train.teacher_head",
                            "refit a trained model's embedding layer to the teacher (a distillation start)"),
    "factorize": Command("facenet_train.factorize",
                         "carry trained weights into a layout with factorized convolutions (nn4_small2_sep)"),
    "import-mobilefacenet": Command("facenet_train.mobilefacenet_import",
                                    "load InsightFace's MobileFaceNet (ncnn files) into the mobilefacenet layout"),
    "widen": Command("facenet_train.widen",
                     "carry trained weights into a wider layout, computing the same (nn4_small2_wide)"),
    "train": Command("facenet_train.train", "train an embedding model from a config file"),
    "evaluate": Command("facenet_train.evaluate", "LFW 10-fold verification of a Keras run or a TFLite model"),
    "describe": Command("facenet_train.flops", "parameters and FLOPs of a model in the registry"),
    "convert": Command("facenet_train.convert", "convert a trained model to TFLite with its model card"),
    "calibrate-openset": Command("facenet_train.openset_lfw",
                                 "write the impostor distance distribution (open-set thresholds) into a model card"),
    "export-weights": Command("facenet_train.checkpoint",
                              "write a run's float weights as a compact .npz (to commit)"),
}


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="facenet-train", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, command in COMMANDS.items():
        sub = commands.add_parser(name, help=command.help, description=command.help)
        if name == chosen:
            module = importlib.import_module(command.module)
            getattr(module, command.add_arguments)(sub)
            sub.set_defaults(run=getattr(module, command.run))
    return parser


# Installed by the ``train`` extra only: ``pip install .`` (a device) gets the script without them.
TRAINING_STACK = {"tensorflow", "keras", "matplotlib", "tomli"}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser(argv).parse_args(argv)
        return int(args.run(args) or 0)
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").partition(".")[0]
        if missing not in TRAINING_STACK:
            raise
        print(
            "facenet-train: error: the training stack needs `pip install 'facenet-edge[train]'` "
            f"(no module {missing!r})",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
