"""EdgeFace-XS (George et al. 2024), the distillation teacher: export to ONNX, describe crops.

EdgeFace-XS is an EdgeNeXt-x-small trunk with a 512-d linear head, trained with CosFace on
WebFace; 99.4 % on LFW through our own BlazeFace + aligner crops at 3.4 ms a face on a CPU,
against our student's ~91 %. Its weights come stored dynamically quantized
(``edgeface_xs_q.pt``: the linears int8); :func:`export_onnx` copies them, dequantized, into
the float model and writes ONNX, so labelling needs only onnxruntime.

Export needs torch and timm (the ``teacher`` extra; timm 1.0.9 or older: later releases
import torchvision, whose index wheel fails beside the CPU torch wheel). Labelling needs
onnxruntime only. The weights' terms are not stated beside them; the authors publish them
for non-commercial research, and a model distilled from them is treated the same.

    facenet-train teacher-export edgeface_xs_q.pt --out edgeface_xs.onnx \\
        --lfw ../shared/data/lfw --lfw-cache /work/cache/lfw_crops

The teacher's input is its 112x112 crop; we give it the runtime's 96x96 template crop
resized to 112 (the same framing as ArcFace's template to within a few pixels), RGB,
``(x / 255 - 0.5) / 0.5``, so it describes exactly the face the student sees.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np

from . import data
# No TensorFlow in this module (evaluation needs none): torch's triton, when installed,
# segfaulted importing after TensorFlow in one process here.
from .evaluation import LfwCropPairs

INPUT_SIZE = 112
EMBEDDING_SIZE = 512
TRUNK = "edgenext_x_small"
BATCH = 64
# The export's second output, for the hint loss (``loss.hint``): the trunk's stride-16 stage, a
# 7 x 7 x 100 map at 112 px, the same grid as the student's inception 4a.
FEATURE_STAGE = 2
OUTPUTS = ("embedding", "features")


def export_onnx(checkpoint: str | Path, out: str | Path) -> float:
    """Write the float ONNX model of a stored ``edgeface_xs_q.pt``; returns the lowest
    cosine between the stored (quantized) model and the export on a few random inputs."""
    try:
        import timm
        import torch
        from torch import nn
    except ImportError as exc:
        raise ImportError(f"exporting the teacher needs torch and timm ({exc.name} is missing): "
                          "pip install 'facenet-edge[teacher]'") from None

    class EdgeFace(nn.Module):  # the authors' TimmFRWrapperV2: the trunk with a 512-d head
        def __init__(self):
            super().__init__()
            self.model = timm.create_model(TRUNK)
            self.model.reset_classifier(EMBEDDING_SIZE)

        def forward(self, x):
            x = self.model.stem(x)
            for index, stage in enumerate(self.model.stages):
                x = stage(x)
                if index == FEATURE_STAGE:
                    features = x
            return self.model.forward_head(self.model.norm_pre(x)), features

    stored = torch.ao.quantization.quantize_dynamic(EdgeFace(), qconfig_spec={nn.Linear}, dtype=torch.qint8)
    stored.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=False))
    state = {k: v for k, v in stored.state_dict().items()
             if "_packed_params" not in k and not k.endswith((".scale", ".zero_point"))}
    for name, module in stored.named_modules():
        if isinstance(module, torch.ao.nn.quantized.dynamic.Linear):
            state[f"{name}.weight"] = module.weight().dequantize()
            if module.bias() is not None:
                state[f"{name}.bias"] = module.bias()
    model = EdgeFace()
    model.load_state_dict(state, strict=True)
    model.eval()
    stored.eval()
    probe = torch.randn(8, 3, INPUT_SIZE, INPUT_SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cosine = float(nn.functional.cosine_similarity(stored(probe)[0], model(probe)[0]).min())
    torch.onnx.export(model, torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE), str(out), input_names=["input"],
                      output_names=list(OUTPUTS), dynamic_axes={name: {0: "n"} for name in ("input", *OUTPUTS)},
                      opset_version=17, dynamo=False)
    return cosine


class EdgeFaceTeacher:
    """The exported model in onnxruntime: runtime crops in, unit 512-d descriptors out.
    ``spinning``: onnxruntime's threads busy-wait for work between runs; turn it off where
    the teacher shares the cores with other work (training's batch thread)."""

    def __init__(self, onnx_path: str | Path, threads: int = 2, flip: bool = True, spinning: bool = True):
        try:
            import onnxruntime
        except ImportError:
            raise ImportError("the EdgeFace teacher needs onnxruntime: pip install 'facenet-edge[teacher]'") from None
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        self._session = onnxruntime.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        self.flip = flip

    def describe(self, crops: np.ndarray) -> np.ndarray:
        """(N, S, S, 3) RGB uint8 template crops (no border) -> (N, 512) unit descriptors;
        with ``flip``, the mean of the crop's and its mirror's (the student trains on both)."""
        out = []
        for start in range(0, len(crops), BATCH):
            x = _inputs(crops[start:start + BATCH])
            e = self._run(x)
            if self.flip:
                e = e + self._run(np.ascontiguousarray(x[..., ::-1]))
            out.append(e / np.linalg.norm(e, axis=1, keepdims=True))
        return np.concatenate(out) if out else np.zeros((0, EMBEDDING_SIZE), np.float32)

    def describe_with_features(self, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(unit descriptors without the mirror, (N, H, W, C) maps of ``FEATURE_STAGE``) of
        (N, S, S, 3) crops; the export must carry the ``features`` output (``teacher-export``)."""
        if "features" not in self._outputs:
            raise ValueError("this EdgeFace export has no 'features' output: export it again with "
                             "`facenet-train teacher-export`")
        descriptors, features = [], []
        for start in range(0, len(crops), BATCH):
            e, f = self._session.run(list(OUTPUTS), {"input": _inputs(crops[start:start + BATCH])})
            descriptors.append(e / np.linalg.norm(e, axis=1, keepdims=True))
            features.append(f.transpose(0, 2, 3, 1))
        return np.concatenate(descriptors), np.concatenate(features)

    @property
    def _outputs(self) -> list[str]:
        return [output.name for output in self._session.get_outputs()]

    def _run(self, x: np.ndarray) -> np.ndarray:
        e = self._session.run(["embedding"], {"input": x})[0]
        return e / np.linalg.norm(e, axis=1, keepdims=True)


def _inputs(crops: np.ndarray) -> np.ndarray:
    """The teacher's input of template crops: resized to 112, scaled to [-1, 1], NCHW."""
    x = np.stack([cv2.resize(c, (INPUT_SIZE, INPUT_SIZE), interpolation=cv2.INTER_LINEAR) for c in crops])
    return ((x.astype(np.float32) / 255.0 - 0.5) / 0.5).transpose(0, 3, 1, 2)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path,
                        help="edgeface_xs_q.pt (github:yayoimizuha/face_recognition_train, checkpoints/)")
    parser.add_argument("--out", required=True, type=Path, help="the ONNX file to write")
    parser.add_argument("--lfw", type=Path, help="LFW folder: score the export on LFW's pairs (reproduce its figure)")
    parser.add_argument("--lfw-cache", type=Path,
                        help="`facenet-train preprocess-lfw` output (96 px crops), with --lfw")


def run(args: argparse.Namespace) -> int:
    if bool(args.lfw) != bool(args.lfw_cache):
        raise ValueError("--lfw and --lfw-cache go together")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    cosine = export_onnx(args.checkpoint, args.out)
    print(f"wrote {args.out}; cosine to the stored quantized model >= {cosine:.4f} on random inputs")
    if args.lfw:
        pairs = LfwCropPairs.load(args.lfw, args.lfw_cache, data.CacheManifest.load(args.lfw_cache).crop_size)
        for flip in (False, True):
            scores = pairs.evaluate(EdgeFaceTeacher(args.out, flip=flip).describe).scores()
            print(f"LFW {'with' if flip else 'without'} flip: {100 * scores['accuracy_mean']:.2f} "
                  f"± {100 * scores['accuracy_std']:.2f} %, VAL@FAR1e-3 {100 * scores['val_mean']:.1f} %")
    return 0
