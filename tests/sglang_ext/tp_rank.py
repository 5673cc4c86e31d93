"""One TP rank of a kvtier radix cache in its own process (driven by ``test_tp.py``).

argv: rank, world size, a free port for the gloo rendezvous, the tiny Llama dir, and how many
tokens of the shared document this rank stores (whole chunks, then a tail). Prints one JSON line with what it matched and
whether the loaded KV is bit-exact.
"""

from __future__ import annotations

import json
import sys
from array import array

import torch
import torch.distributed as dist
from sglang.srt.managers.schedule_batch import Req
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, InitLoadBackParams, InsertParams
from sglang.srt.mem_cache.radix_cache import RadixKey
from sglang.srt.sampling.sampling_params import SamplingParams

from kvtier.sglang_ext.config import load_config
from kvtier.sglang_ext.radix_cache import KVTierRadixCache
from sglang_objects import build_context, server_args  # this script's own folder is on sys.path

CHUNK = 64


def main() -> None:
    rank, world, port, model_dir, stored = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    ctx = build_context(server_args(model_dir), page_size=16, tp_rank=rank, tp_size=world, tp_group=dist.group.WORLD)
    pool = ctx.params.token_to_kv_pool_allocator.get_kvcache()
    gen = torch.Generator().manual_seed(rank)
    for buf in pool.k_buffer + pool.v_buffer:
        buf.copy_(torch.randn(buf.shape, generator=gen).to(buf.dtype))
    cache = KVTierRadixCache(ctx, load_config(env={}, chunk_tokens=CHUNK, cpu_size_gb=0.02))
    doc = list(range(1000, 1000 + 3 * CHUNK))
    mine = doc[:stored]
    rows = cache.token_to_kv_pool_allocator.alloc(len(mine))
    expected = [buf[rows].clone() for buf in pool.k_buffer + pool.v_buffer]
    cache.insert(InsertParams(key=RadixKey(array("q", mine)), value=rows))
    cache.evict(EvictParams(num_tokens=10**9))
    cache.flush()
    # Eviction frees the rows but leaves their bytes, and the load below gets the same rows back from
    # the allocator: zeroed, only a real load from the host tier can make them equal ``expected``.
    for buf in pool.k_buffer + pool.v_buffer:
        buf.zero_()

    req = Req("r", "", array("q", doc + [1]), SamplingParams(max_new_tokens=1))
    req.init_next_round_input(cache)
    loaded, _ = cache.init_load_back(
        InitLoadBackParams(best_match_node=req.best_match_node, host_hit_length=req.host_hit_length, req=req)
    )
    cache.flush()
    got = [buf[loaded] for buf in pool.k_buffer + pool.v_buffer]
    exact = all(torch.equal(g.view(torch.int16), e[: len(loaded)].view(torch.int16)) for g, e in zip(got, expected))
    print(json.dumps({"rank": rank, "host_hit": req.host_hit_length, "loaded": len(loaded), "exact": exact}), flush=True)
    cache.store.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
