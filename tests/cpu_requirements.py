"""Print the requirements the CPU test environment installs, one per line.

SGLang is installed with ``--no-deps``; this lists what it and kvtier require, with SGLang's own
pins and environment markers, minus :data:`GPU_ONLY`: SGLang's GPU kernel packages and the media
and quantization extras (torchao, torchaudio, torchcodec) that no CPU test imports. With them the
environment is 9 GB instead of about 6, which has not fit on every CI machine. Everything SGLang imports on the CPU paths the tests use (torch at its exact
pin, triton, transformers, ...) is still installed.

Usage: ``python tests/cpu_requirements.py EXTRA[,EXTRA...]`` inside the venv, after
``pip install --no-deps sglang==... -e .``.
"""

import sys
from importlib.metadata import requires

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

GPU_ONLY = frozenset(
    canonicalize_name(name)
    for name in (
        "cuda-python",
        "flash-attn-4",
        "flashinfer_python",
        "helion",
        "humming-kernels",
        "nvidia-cutlass-dsl",
        "nvidia-mathdx",
        "quack-kernels",
        "sgl-deep-gemm",
        "sglang-kernel",
        "tilelang",
        "tokenspeed_mla",
        "torch_memory_saver",
        "torchao",
        "torchaudio",
        "torchcodec",
    )
)


def wanted(dist: str, extras: list[str]) -> list[str]:
    """``dist``'s requirements that apply here (markers evaluated for ``extras``), GPU_ONLY and
    the distributions installed with ``--no-deps`` left out."""
    out = []
    for line in requires(dist) or []:
        req = Requirement(line)
        name = canonicalize_name(req.name)
        if name in GPU_ONLY or name in {"sglang", "kvtier"}:
            continue
        if req.marker is not None and not any(
            req.marker.evaluate({"extra": extra}) for extra in extras or [""]
        ):
            continue
        req.marker = None
        out.append(str(req))
    return out


def main() -> None:
    extras = [e for e in sys.argv[1].split(",") if e] if len(sys.argv) > 1 else []
    for line in wanted("sglang", []) + wanted("kvtier", extras):
        print(line)


if __name__ == "__main__":
    main()
