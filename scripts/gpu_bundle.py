"""Gather, on a machine with registry access, the wheels an offline GPU machine lacks, within a size cap.

Usage:
    python scripts/gpu_bundle.py                      # .gpu_bundle/ for CPython 3.12, manylinux x86_64, 64 MiB
    python scripts/gpu_bundle.py --python-version 3.11 --out /tmp/bundle311    # e.g. an offline dry run here
    python scripts/gpu_bundle.py --skip-faiss-gpu     # do not download the faiss GPU build just to measure it

The target machine (see scripts/gpu_check.sh) already has PyTorch, numpy, Pillow, PyYAML, tqdm, scipy, pyarrow,
safetensors, fsspec, aiohttp, portalocker, tabulate, cloudpickle; it lacks omegaconf (+ the ANTLR runtime),
submitit, webdataset (+ braceexpand), imagehash (+ PyWavelets), fvcore (+ iopath, yacs, termcolor), faiss and
xformers. Required wheels are fetched for the target Python and platform (`pip download --only-binary=:all:`);
fvcore ships only a source archive, pure Python, so its wheel is built here. Optional ones (xformers, a faiss GPU
build with the CUDA libraries it links) are added only if the bundle stays under the cap; what is left out, and
why, is written to `<out>/manifest.json`, which gpu_check.sh prints.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

MIB = 1 << 20
# Wheels the offline machine needs for the project's imports and tests (names as pip resolves them).
REQUIRED = ["omegaconf", "antlr4-python3-runtime", "submitit", "webdataset", "braceexpand", "imagehash",
            "PyWavelets", "iopath", "yacs", "termcolor"]
BUILT_HERE = ["fvcore"]  # source archive only on PyPI; pure Python, so one py3-none-any wheel fits every target
FAISS_CPU = ["faiss-cpu"]
XFORMERS = ["xformers"]
# faiss' GPU wheels link CUDA 12's runtime and cuBLAS; a CUDA 13 machine (PyTorch cu130) has neither.
FAISS_GPU = ["faiss-gpu-cu12", "nvidia-cublas-cu12", "nvidia-cuda-runtime-cu12"]


def _pip_target(args: argparse.Namespace) -> list[str]:
    abi = "cp" + args.python_version.replace(".", "")
    platforms = ["manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_27_x86_64", "manylinux_2_28_x86_64"]
    return ["--only-binary=:all:", "--python-version", args.python_version, "--implementation", "cp",
            "--abi", abi, "--abi", "abi3", "--abi", "none", *[f"--platform={p}" for p in platforms]]


def download(names: list[str], dest: Path, args: argparse.Namespace) -> list[Path]:
    """Wheels of `names` (no dependencies: each list names what is needed) for the target into `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    before = set(dest.iterdir())
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(dest), *_pip_target(args), *names]
    subprocess.run(cmd, check=True)
    return sorted(set(dest.iterdir()) - before)


def build_wheels(names: list[str], dest: Path) -> list[Path]:
    before = set(dest.iterdir())
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dest), *names], check=True)
    built = sorted(set(dest.iterdir()) - before)
    for wheel in built:
        if not wheel.name.endswith("-py3-none-any.whl"):
            raise SystemExit(f"{wheel.name} is not a pure-Python wheel; it cannot be built here for another Python")
    return built


def size_mib(paths: list[Path]) -> float:
    return round(sum(p.stat().st_size for p in paths) / MIB, 2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".gpu_bundle")
    parser.add_argument("--python-version", default="3.12")
    parser.add_argument("--cap-mib", type=float, default=64.0, help="size cap of everything carried")
    parser.add_argument("--reserve-mib", type=float, default=4.0, help="left for the project's own files")
    parser.add_argument("--skip-faiss-gpu", action="store_true", help="record the faiss GPU build as not measured")
    args = parser.parse_args(argv)
    out = Path(args.out)
    wheels = out / "wheels"
    shutil.rmtree(out, ignore_errors=True)
    wheels.mkdir(parents=True)
    budget = args.cap_mib - args.reserve_mib
    manifest: dict = {"python": args.python_version, "cap_mib": args.cap_mib, "included": {}, "left_out": {}}

    got = download(REQUIRED, wheels, args) + build_wheels(BUILT_HERE, wheels)
    manifest["included"]["required"] = {p.name: size_mib([p]) for p in got}
    used = size_mib(got)

    with tempfile.TemporaryDirectory() as tmp:
        staging = Path(tmp)
        groups = {"xformers": XFORMERS, "faiss-gpu": [] if args.skip_faiss_gpu else FAISS_GPU, "faiss-cpu": FAISS_CPU}
        if args.skip_faiss_gpu:
            manifest["left_out"]["faiss-gpu"] = "not measured (--skip-faiss-gpu); faiss GPU tests skip"
        for name, packages in groups.items():
            if not packages or (name == "faiss-cpu" and "faiss-gpu" in manifest["included"]):
                continue  # a faiss GPU build includes the CPU code: never two faiss builds
            try:
                files = download(packages, staging / name, args)
            except subprocess.CalledProcessError:
                manifest["left_out"][name] = f"no {args.python_version} wheel of {packages[0]} for this platform"
                continue
            mib = size_mib(files)
            if used + mib > budget:
                detail = ", ".join(f"{f.name.split('-')[0]} {size_mib([f])} MiB" for f in files)
                manifest["left_out"][name] = (f"{mib} MiB ({detail}) does not fit: {used} MiB already, "
                                              f"{budget} MiB allowed; its tests skip")
                if name == "faiss-cpu":
                    raise SystemExit(f"even faiss-cpu does not fit: {manifest['left_out'][name]}")
                continue
            manifest["included"][name] = {f.name: size_mib([f]) for f in files}
            for f in files:
                shutil.move(str(f), wheels / f.name)
            used = round(used + mib, 2)
    manifest["total_mib"] = used
    # What gpu_check.sh installs with dependency resolution (everything but torch extensions, which go --no-deps).
    names = [*REQUIRED, *BUILT_HERE, "faiss-gpu-cu12" if "faiss-gpu" in manifest["included"] else "faiss-cpu"]
    (out / "requirements.txt").write_text("".join(f"{n}\n" for n in names))
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(json.dumps(manifest, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
