"""Latency per stage, cold start, pipeline FPS and memory: the same benchmark as ``facenet-edge bench``.

Its code is ``facenet_edge.bench``, in the wheel, so a Raspberry Pi runs it with only the
runtime installed. ``python benchmarks/latency.py --help`` lists the options.
"""

from __future__ import annotations

import sys

from facenet_edge.bench import main

if __name__ == "__main__":
    sys.exit(main())
