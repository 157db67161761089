"""Arguments the ``facenet-edge`` commands and the examples share: ``argparse`` ``type=``
callables (a bad value is a usage error naming the value) and options they all take."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

from .pipeline import DEFAULT_DETECT_WIDTH


def positive_int(text: str) -> int:
    """An argument that must be an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def int_list(text: str) -> tuple[int, ...]:
    """``"1,2,4"`` -> (1, 2, 4), every value at least 1."""
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,2,4, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"values must be at least 1, got {text!r}")
    return values


def name_list(choices: Sequence[str]) -> Callable[[str], tuple[str, ...]]:
    """Parser of a comma-separated subset of ``choices``."""

    def parse(text: str) -> tuple[str, ...]:
        names = tuple(part.strip() for part in text.split(",") if part.strip())
        unknown = [n for n in names if n not in choices]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"choose from {','.join(choices)}; got {text!r}")
        return names

    return parse


def add_detect_width(parser: argparse.ArgumentParser) -> None:
    """``--detect-width W``, the pipeline's ``detect_width``."""
    parser.add_argument(
        "--detect-width",
        type=positive_int,
        default=DEFAULT_DETECT_WIDTH,
        metavar="W",
        help="wider images are shrunk to W pixels before YuNet or Haar look for faces: smaller is faster and "
        "misses small, far faces (default: %(default)s)",
    )
