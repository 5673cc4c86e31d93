"""Entry point of the ``sglang.srt.plugins`` group: registers the ``kvtier`` radix-cache backend.

SGLang calls ``register`` in its main process and again in every scheduler process it spawns.
"""

from __future__ import annotations

from sglang.srt.mem_cache.registry import get_radix_cache_factory, register_radix_cache_backend

BACKEND = "kvtier"


def _build(ctx):  # imported lazily: torch-heavy modules stay out of processes that never build one
    from kvtier.sglang_ext.radix_cache import build

    return build(ctx)


def register() -> None:
    if get_radix_cache_factory(BACKEND) is None:
        register_radix_cache_backend(BACKEND, _build)
