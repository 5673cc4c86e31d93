"""The ``kvtier`` radix-cache backend: SGLang's RadixCache with the tier store behind it.

This module and ``plugin.py`` are the only ones that import SGLang; everything SGLang-version
specific (pool classes, build context fields) is read here and handed on as plain values.
"""

from __future__ import annotations

import logging

from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
from sglang.srt.mem_cache.radix_cache import RadixCache
from sglang.srt.mem_cache.registry import TreeCacheBuildContext

from kvtier.sglang_ext.chunk_keys import KVNamespace
from kvtier.sglang_ext.config import KVTierConfig, check_page_size, load_config
from kvtier.sglang_ext.tiers.store import TierStore

logger = logging.getLogger(__name__)


def kv_pool_layout(pool: object) -> tuple[str, int]:
    """The layout string of an SGLang KV pool and its bytes per token (all layers, K and V)."""
    if type(pool) is not MHATokenToKVPool:
        raise ValueError(
            f"kvtier supports MHA KV pools (Llama, Qwen2/3 and similar); this model uses "
            f"{type(pool).__name__} (MLA, hybrid or quantized pools are not supported yet): "
            "remove --radix-cache-backend kvtier"
        )
    itemsize = pool.store_dtype.itemsize
    per_token = pool.layer_num * pool.head_num * (pool.head_dim + pool.v_head_dim) * itemsize
    layout = (
        f"mha-{pool.kv_cache_layout}:L{pool.layer_num}:H{pool.head_num}:"
        f"D{pool.head_dim}:V{pool.v_head_dim}:S{pool.start_layer}"
    )
    return layout, per_token


def model_identity(ctx: TreeCacheBuildContext) -> str:
    """What makes two servers' KV interchangeable: weights source, revision, quantization."""
    args = ctx.server_args
    mc = ctx.model_config
    return f"{mc.model_path}@{mc.revision or ''}|q={mc.quantization or ''}|load={args.load_format}"


class KVTierRadixCache(RadixCache):
    """SGLang's RadixCache owning a kvtier ``TierStore`` sized for this server's KV pool."""

    def __init__(self, ctx: TreeCacheBuildContext, cfg: KVTierConfig) -> None:
        super().__init__(ctx.params)
        check_page_size(cfg, self.page_size)
        pool = self.token_to_kv_pool_allocator.get_kvcache()
        layout, per_token = kv_pool_layout(pool)
        self.namespace = KVNamespace(
            model=model_identity(ctx),
            kv_dtype=str(pool.store_dtype).removeprefix("torch."),
            layout=layout,
            page_size=self.page_size,
            tp_rank=ctx.tp_rank,
            tp_size=ctx.tp_size,
            chunk_tokens=cfg.chunk_tokens,
        )
        self.store = TierStore(cfg, self.namespace, cfg.chunk_tokens * per_token)


def build(ctx: TreeCacheBuildContext) -> KVTierRadixCache:
    """Factory registered as ``--radix-cache-backend kvtier``; reads ``$KVTIER_CONFIG``."""
    if ctx.enable_hierarchical_cache:
        raise ValueError("--radix-cache-backend kvtier replaces HiCache: remove --enable-hierarchical-cache")
    if ctx.disable_radix_cache:
        raise ValueError("--radix-cache-backend kvtier needs the radix cache: remove --disable-radix-cache")
    return KVTierRadixCache(ctx, load_config())
