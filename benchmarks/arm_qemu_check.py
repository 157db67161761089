"""Run an int8 embedding model on arm64 (a qemu-user chroot) and compare with x86-64.

The Raspberry Pi runs LiteRT's arm64 kernels (NEON), which are not the x86-64 kernels the
converter and the tests use. This check runs the same ``.tflite`` on the same fixed inputs
on both and reports, per input, how far the int8 embeddings differ (in quantization steps).

Needs root, ``debootstrap`` and ``qemu-user-static`` (``apt-get install qemu-user-static
binfmt-support debootstrap``) and network access to a Debian mirror and PyPI on first use.
The arm64 Debian bookworm rootfs is built once and cached (default
``~/.cache/facenet-edge/arm64-rootfs``). Slow: expect many minutes the first time.

    sudo python benchmarks/arm_qemu_check.py model_int8.tflite [--rootfs DIR] [--json OUT]

The same file runs inside the chroot (``--inner``): there it needs only numpy and
ai-edge-litert, so this module imports nothing else at the top.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Iterator

import numpy as np

DEFAULT_ROOTFS = Path("~/.cache/facenet-edge/arm64-rootfs").expanduser()
DEFAULT_MIRROR = "http://deb.debian.org/debian"
SUITE = "bookworm"
READY_MARKER = ".facenet-edge-ready"
GLIBC_MINOR = 36  # Debian bookworm's glibc 2.36: the newest manylinux tag its wheels may use
WHEELS = "/tmp/facenet-edge-wheels"  # inside the rootfs, during the build only
VENV = "/opt/litert"  # inside the rootfs: Debian's pip refuses system installs (PEP 668)
WORKDIR = "/tmp/facenet-edge-check"  # inside the rootfs
QEMU = "/usr/bin/qemu-aarch64-static"
BINFMT_DIR = Path("/proc/sys/fs/binfmt_misc")


class ArmCheckError(RuntimeError):
    """The arm64 environment cannot be built or the model cannot be run in it."""


@dataclass(frozen=True)
class InputComparison:
    """One input's int8 embedding on x86-64 versus arm64."""

    index: int
    max_abs_steps: int  # largest |x86 - arm| over the embedding, in int8 steps
    differing_values: int
    cosine: float  # between the dequantized, re-normalised embeddings


@dataclass(frozen=True)
class ArmCheckResult:
    model: str
    x86: dict[str, str]
    arm64: dict[str, str]
    output_scale: float
    output_zero_point: int
    inputs: list[InputComparison]

    @property
    def bit_exact(self) -> bool:
        return all(c.max_abs_steps == 0 for c in self.inputs)

    @property
    def within_one_step(self) -> bool:
        return all(c.max_abs_steps <= 1 for c in self.inputs)

    def to_dict(self) -> dict:
        return {**asdict(self), "bit_exact": self.bit_exact, "within_one_step": self.within_one_step}


# --- the part that runs on both machines -------------------------------------------------


def invoke_all(model_path: str | Path, inputs: np.ndarray) -> np.ndarray:
    """Outputs of the model's first output tensor for each input, one at a time.

    One thread so the arithmetic order is fixed (threading does not change int8 results in
    LiteRT's kernels, but there is no reason to add a variable)."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(model_path), num_threads=1)
    interpreter.allocate_tensors()
    inp = interpreter.get_input_details()[0]
    out = interpreter.get_output_details()[0]
    outputs = []
    for sample in inputs:
        interpreter.set_tensor(inp["index"], sample[None].astype(inp["dtype"]))
        interpreter.invoke()
        outputs.append(interpreter.get_tensor(out["index"])[0].copy())
    return np.stack(outputs)


def environment() -> dict[str, str]:
    return {
        "machine": platform.machine(),
        "python": platform.python_version(),
        "ai_edge_litert": version("ai-edge-litert"),
        "numpy": np.__version__,
    }


def inner_main(model: str, inputs: str, output: str) -> None:
    """Entry point inside the chroot: run, save outputs, print the environment as JSON."""
    np.save(output, invoke_all(model, np.load(inputs)))
    print(json.dumps(environment()))


# --- host side ------------------------------------------------------------------------------


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    print("+", " ".join(cmd), flush=True)
    result = subprocess.run(cmd, text=True, capture_output=True, **kwargs)
    if result.returncode != 0:
        raise ArmCheckError(
            f"command failed ({result.returncode}): {' '.join(cmd)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result


def require_host() -> None:
    if os.geteuid() != 0:
        raise ArmCheckError("the arm64 check needs root (debootstrap, chroot, mount)")
    missing = [tool for tool in ("debootstrap", "chroot", "mount") if shutil.which(tool) is None]
    if not Path(QEMU).exists():
        missing.append(QEMU)
    if missing:
        raise ArmCheckError(
            f"missing: {', '.join(missing)}; install with apt-get install qemu-user-static binfmt-support debootstrap"
        )


def ensure_binfmt() -> None:
    """Register qemu-aarch64 with the kernel so arm64 programs exec'd inside the chroot
    (debootstrap's second stage runs hundreds) are run by qemu transparently."""
    if not (BINFMT_DIR / "register").exists():
        run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT_DIR)])
    entry = BINFMT_DIR / "qemu-aarch64"
    if not entry.exists():
        run(["update-binfmts", "--enable", "qemu-aarch64"])
    if not entry.exists() or not entry.read_text().startswith("enabled"):
        raise ArmCheckError(f"qemu-aarch64 is not registered in {BINFMT_DIR} (binfmt-support installed?)")


def mounts_under(rootfs: Path) -> list[str]:
    root = str(rootfs.resolve())
    points = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    return [p for p in points if p == root or p.startswith(root + "/")]


@contextmanager
def chroot_mounts(rootfs: Path) -> Iterator[None]:
    """Mount /proc and /dev only: ai-edge-litert has been seen to crash in such a chroot
    when /sys was mounted, and to run correctly without it. A /sys left mounted (by
    debootstrap's second stage) is unmounted first."""
    stale = [p for p in mounts_under(rootfs) if p.endswith("/sys") or "/sys/" in p]
    for point in sorted(stale, reverse=True):
        run(["umount", "-l", point])
    mounted: list[str] = []
    try:
        run(["mount", "-t", "proc", "proc", str(rootfs / "proc")])
        mounted.append(str(rootfs / "proc"))
        run(["mount", "--bind", "/dev", str(rootfs / "dev")])
        mounted.append(str(rootfs / "dev"))
        yield
    finally:
        for point in reversed(mounted):
            subprocess.run(["umount", "-l", point], check=False)


def build_rootfs(rootfs: Path, mirror: str, litert_version: str) -> None:
    """debootstrap (two stages) + a venv with ai-edge-litert and numpy. Idempotent: a
    marker file records a finished build; an unfinished one is removed and redone."""
    marker = rootfs / READY_MARKER
    if marker.exists() and json.loads(marker.read_text()).get("ai_edge_litert") == litert_version:
        return
    if mounts_under(rootfs):
        raise ArmCheckError(f"refusing to rebuild {rootfs}: something is mounted under it: {mounts_under(rootfs)}")
    if not (rootfs / "debootstrap").exists() and not (rootfs / "usr/bin/python3").exists():
        if rootfs.exists():
            shutil.rmtree(rootfs)
        rootfs.parent.mkdir(parents=True, exist_ok=True)
        run(
            [
                "debootstrap", "--arch=arm64", "--foreign", "--variant=minbase",
                "--include=python3,python3-venv,ca-certificates", SUITE, str(rootfs), mirror,
            ]
        )  # fmt: skip
    shutil.copy2(QEMU, rootfs / "usr/bin/qemu-aarch64-static")
    if (rootfs / "debootstrap").exists():
        run(["chroot", str(rootfs), "/debootstrap/debootstrap", "--second-stage"])
    wheels = rootfs / WHEELS.lstrip("/")
    with chroot_mounts(rootfs):
        python = in_chroot(rootfs, "python3", "-c", "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')")
        download_wheels(wheels, python.stdout.strip(), litert_version)
        in_chroot(rootfs, "python3", "-m", "venv", VENV)
        in_chroot(rootfs, f"{VENV}/bin/pip", "install", "--no-index", "--find-links", WHEELS,
                  f"ai-edge-litert=={litert_version}", "numpy")  # fmt: skip
    shutil.rmtree(wheels)
    marker.write_text(json.dumps({"suite": SUITE, "ai_edge_litert": litert_version}) + "\n")


def in_chroot(rootfs: Path, *cmd: str) -> subprocess.CompletedProcess:
    """Run inside the chroot with a clean environment (the host's PIP_*, PYTHONPATH or
    VIRTUAL_ENV mean nothing there)."""
    env = ["env", "-i", "PATH=/usr/local/bin:/usr/bin:/bin", "HOME=/root", "LC_ALL=C.UTF-8"]
    return run(["chroot", str(rootfs), *env, *cmd])


def download_wheels(dest: Path, python: str, litert_version: str) -> None:
    """aarch64 wheels for the chroot's Python, fetched by the host's pip: it already knows
    this machine's index, proxy and certificates, and runs natively rather than under qemu."""
    platforms = ["manylinux2014_aarch64"] + [f"manylinux_2_{minor}_aarch64" for minor in range(17, GLIBC_MINOR + 1)]
    cmd = [sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--python-version", python,
           "--implementation", "cp", "-d", str(dest)]  # fmt: skip
    for platform_tag in platforms:
        cmd += ["--platform", platform_tag]
    run(cmd + [f"ai-edge-litert=={litert_version}", "numpy"])


def quantized_io(model_path: Path) -> tuple[dict, dict]:
    """(input, output) tensor details of an int8/uint8 model; float models are refused
    (this check compares integer outputs step by step)."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(model_path))
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    if not all(np.issubdtype(d["dtype"], np.integer) and d["quantization"][0] > 0 for d in (inp, out)):
        raise ArmCheckError(f"{model_path} is not a quantized int8 model: this check compares int8 outputs")
    return inp, out


def fixed_inputs(model_path: Path, detail: dict, count: int, seed: int) -> np.ndarray:
    """``count`` random RGB images, preprocessed as the runtime does ((pixel - mean) / std,
    from the card when there is one) and quantized to the model's input tensor."""
    from facenet_edge.card import ModelCard, card_path_for

    card_path = card_path_for(model_path)
    card = ModelCard.load(card_path) if card_path.exists() else None
    mean, std = (card.mean, card.std) if card else (ModelCard.mean, ModelCard.std)
    height, width, channels = (int(v) for v in detail["shape"][1:])
    pixels = np.random.default_rng(seed).integers(0, 256, size=(count, height, width, channels))
    values = (pixels.astype(np.float32) - mean) / std
    scale, zero_point = detail["quantization"]
    info = np.iinfo(detail["dtype"])
    return np.clip(np.round(values / scale) + zero_point, info.min, info.max).astype(detail["dtype"])


def run_in_chroot(rootfs: Path, model_path: Path, inputs: np.ndarray) -> tuple[np.ndarray, dict[str, str]]:
    work = rootfs / WORKDIR.lstrip("/")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    shutil.copy2(model_path, work / "model.tflite")
    shutil.copy2(__file__, work / "check.py")
    np.save(work / "inputs.npy", inputs)
    with chroot_mounts(rootfs):
        result = in_chroot(rootfs, f"{VENV}/bin/python", f"{WORKDIR}/check.py", f"{WORKDIR}/model.tflite", "--inner",
                           f"{WORKDIR}/inputs.npy", f"{WORKDIR}/outputs.npy")  # fmt: skip
    arm_env = json.loads(result.stdout.strip().splitlines()[-1])
    outputs = np.load(work / "outputs.npy")
    shutil.rmtree(work)
    return outputs, arm_env


def compare(x86: np.ndarray, arm: np.ndarray, scale: float, zero_point: int) -> list[InputComparison]:
    rows = []
    for i, (a, b) in enumerate(zip(x86, arm, strict=True)):
        diff = np.abs(a.astype(np.int32) - b.astype(np.int32))
        fa = (a.astype(np.float64) - zero_point) * scale
        fb = (b.astype(np.float64) - zero_point) * scale
        cosine = float(fa @ fb / (np.linalg.norm(fa) * np.linalg.norm(fb)))
        rows.append(InputComparison(i, int(diff.max()), int((diff > 0).sum()), cosine))
    return rows


def check(model_path: Path, rootfs: Path, mirror: str, count: int, seed: int) -> ArmCheckResult:
    require_host()
    inp, out = quantized_io(model_path)
    ensure_binfmt()
    litert_version = version("ai-edge-litert")  # same LiteRT release on both sides
    build_rootfs(rootfs, mirror, litert_version)
    inputs = fixed_inputs(model_path, inp, count, seed)
    x86_out = invoke_all(model_path, inputs)
    arm_out, arm_env = run_in_chroot(rootfs, model_path, inputs)
    scale, zero_point = out["quantization"]
    return ArmCheckResult(
        model=str(model_path),
        x86=environment(),
        arm64=arm_env,
        output_scale=float(scale),
        output_zero_point=int(zero_point),
        inputs=compare(x86_out, arm_out, scale, zero_point),
    )


def print_table(result: ArmCheckResult) -> None:
    print(f"model: {result.model}")
    print(f"x86-64: {result.x86}")
    print(f"arm64:  {result.arm64}")
    print(f"{'input':>5}  {'max |diff| (steps)':>18}  {'values differing':>16}  {'cosine':>10}")
    for row in result.inputs:
        print(f"{row.index:>5}  {row.max_abs_steps:>18}  {row.differing_values:>16}  {row.cosine:>10.6f}")
    verdict = "bit-exact" if result.bit_exact else ("within one step" if result.within_one_step else "DIFFERENT")
    print(f"result: {verdict}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="int8 .tflite (with its card beside it for mean/std)")
    parser.add_argument("--rootfs", type=Path, default=DEFAULT_ROOTFS, help="arm64 rootfs cache (built once)")
    parser.add_argument("--mirror", default=DEFAULT_MIRROR, help="Debian mirror for debootstrap")
    parser.add_argument("--inputs", type=int, default=16, help="number of fixed random inputs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="where to write the result (default: MODEL.arm64.json)")
    parser.add_argument("--inner", nargs=2, metavar=("INPUTS", "OUTPUTS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.inner:
        inner_main(str(args.model), *args.inner)
        return 0
    try:
        result = check(args.model.resolve(), args.rootfs.expanduser(), args.mirror, args.inputs, args.seed)
    except ArmCheckError as exc:
        print(f"arm64 check failed: {exc}", file=sys.stderr)
        return 2
    print_table(result)
    out = args.json or args.model.with_suffix(".arm64.json")
    out.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    print(f"wrote {out}")
    return 0 if result.within_one_step else 1


if __name__ == "__main__":
    sys.exit(main())
