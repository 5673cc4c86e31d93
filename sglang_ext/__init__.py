"""The SGLang-facing side of kvtier: plugin entry point, config, chunk keys and the tier store.

Only ``plugin.py`` and ``radix_cache.py`` import SGLang; the rest is engine-independent.
"""
