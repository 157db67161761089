"""The runtime never imports TensorFlow, and ``import facenet_edge`` stays cheap.

Runs in a fresh interpreter: the test session itself imports TensorFlow to build the
tiny model, so its own ``sys.modules`` proves nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import cv2

SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    start = time.perf_counter()
    import facenet_edge
    heavy_at_import = sorted(m for m in ("cv2", "sqlite3", "tqdm", "tensorflow") if m in sys.modules)
    from facenet_edge import FacePipeline, read_image
    with FacePipeline(model_path=sys.argv[1]) as pipeline:
        faces = pipeline.process(read_image(sys.argv[2]))
    seconds = time.perf_counter() - start
    print(json.dumps({
        "faces": len(faces),
        "heavy_at_import": heavy_at_import,
        "tensorflow": sorted(m for m in sys.modules if m == "tensorflow" or m.startswith(("tensorflow.", "keras"))),
        "seconds": seconds,
    }))
    """
)


def test_runtime_never_imports_tensorflow(tiny_model, astronaut, tmp_path):
    image = tmp_path / "astronaut.png"
    cv2.imwrite(str(image), cv2.cvtColor(astronaut, cv2.COLOR_RGB2BGR))
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tiny_model.int8), str(image)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["faces"] == 1
    assert report["tensorflow"] == []
    assert report["heavy_at_import"] == []
