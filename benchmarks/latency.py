"""Latency per stage, cold start, pipeline FPS and memory: the same benchmark as ``facenet-edge bench``.

Its code is ``facenet_edge.bench``, in the wheel, so a Raspberry Pi runs it with only the
runtime installed. Run from the checkout, the report also names the commit, and the
five-face frame can draw on LFW (``--lfw``, default ``../shared/data/lfw``).
``python benchmarks/latency.py --help`` lists the options.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from common import default_lfw, lfw_photos, machine_info, run_script
from facenet_edge import bench


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="latency", description=bench.__doc__.split("\n\n")[0])
    bench.add_arguments(parser)
    parser.add_argument(
        "--lfw",
        type=Path,
        default=default_lfw(),
        metavar="DIR",
        help="LFW folder: more faces for the five-face frame, after the shipped photo "
        "(default: ../shared/data/lfw beside the checkout)",
    )
    return run_script(parser, lambda args: bench.run(args, machine_info, lfw_photos(args.lfw)), argv)


if __name__ == "__main__":
    sys.exit(main())
