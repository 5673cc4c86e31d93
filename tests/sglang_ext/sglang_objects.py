"""Real SGLang 0.5.17 objects for the tests (on CPU) and benchmarks/hook_cost.py (on a GPU): a tiny Llama config, ServerArgs, pools, a build context.

Shared by ``conftest.py`` (fixtures) and ``tp_rank.py`` (one TP rank in its own process).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch


def tiny_llama(path: str) -> str:
    """Saves a 2-layer Llama config (no weights: servers use dummy loading) and returns ``path``."""
    from transformers import LlamaConfig

    LlamaConfig(
        architectures=["LlamaForCausalLM"],
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
        max_position_embeddings=8192,
    ).save_pretrained(path)
    return path


def server_args(model_dir: str, device: str = "cpu"):
    from sglang.srt.server_args import ServerArgs

    return ServerArgs(model_path=model_dir, load_format="dummy", device=device, skip_tokenizer_init=True)


def build_context(
    base_args,
    page_size: int = 16,
    pool_tokens: int = 4096,
    kv_pool=None,
    tp_rank: int = 0,
    tp_size: int = 1,
    tp_group: Optional[Any] = None,
    **server_changes,
):
    """A ``TreeCacheBuildContext`` over real pools on ``base_args.device`` (CPU in the tests), as
    SGLang's scheduler builds it."""
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.mem_cache.allocator import PagedTokenToKVPoolAllocator, TokenToKVPoolAllocator
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
    from sglang.srt.mem_cache.registry import TreeCacheBuildContext

    args = dataclasses.replace(base_args, page_size=page_size, **server_changes)
    device = args.device
    model_config = ModelConfig.from_server_args(args)
    if kv_pool is None:
        kv_pool = MHATokenToKVPool(
            size=pool_tokens,
            page_size=page_size,
            dtype=torch.bfloat16,
            head_num=model_config.get_num_kv_heads(tp_size),
            head_dim=model_config.head_dim,
            layer_num=model_config.num_hidden_layers,
            device=device,
            enable_memory_saver=False,
        )
    if page_size == 1:
        allocator = TokenToKVPoolAllocator(pool_tokens, torch.bfloat16, device, kv_pool, need_sort=False)
    else:
        allocator = PagedTokenToKVPoolAllocator(pool_tokens, page_size, torch.bfloat16, device, kv_pool, need_sort=False)
    params = CacheInitParams(
        disable=False,
        req_to_token_pool=ReqToTokenPool(size=8, max_context_len=pool_tokens, device=device, enable_memory_saver=False),
        token_to_kv_pool_allocator=allocator,
        page_size=page_size,
        tp_cache_group=tp_group,
    )
    return TreeCacheBuildContext(
        server_args=args,
        params=params,
        is_hybrid_swa=False,
        is_hybrid_ssm=False,
        enable_hierarchical_cache=args.enable_hierarchical_cache,
        disable_radix_cache=args.disable_radix_cache,
        effective_chunked_prefill_size=args.chunked_prefill_size,
        tp_worker=None,
        model_config=model_config,
        tp_size=tp_size,
        tp_rank=tp_rank,
        tp_group=tp_group,
    )
