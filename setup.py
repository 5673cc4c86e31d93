"""kvtier: a tiered KV-cache layer for SGLang (pinned CPU, NVMe, remote; PD transfer).

The repository's top-level folders are installed inside the ``kvtier`` namespace
(``kvtier.sglang_ext``, ``kvtier.transfer``, ``kvtier.kernels``, ``kvtier.launch``) so that
nothing we install shadows other distributions; in particular Hugging Face's ``kernels``
package, which SGLang imports, stays reachable as ``kernels``.
"""

from setuptools import setup

PACKAGES = {
    "kvtier.sglang_ext": "sglang_ext",
    "kvtier.sglang_ext.tiers": "sglang_ext/tiers",
    "kvtier.transfer": "transfer",
    "kvtier.kernels": "kernels",
    "kvtier.launch": "launch",
}

setup(
    name="kvtier",
    version="0.1.0",
    description="Tiered KV cache (pinned CPU, NVMe, remote) and PD transfer for SGLang",
    python_requires=">=3.10",
    packages=list(PACKAGES),
    package_dir=PACKAGES,
    install_requires=[
        "sglang==0.5.17",
        "torch",
        "numpy",
        "pyyaml",
        "pyzmq",
        "prometheus-client",
        "xxhash",
        "redis>=5",
    ],
    extras_require={"test": ["pytest", "pytest-timeout"], "bench": ["matplotlib"], "ucx": ["libucx-cu13>=1.19,<1.22"]},
    entry_points={
        "sglang.srt.plugins": ["kvtier = kvtier.sglang_ext.plugin:register"],
    },
)
