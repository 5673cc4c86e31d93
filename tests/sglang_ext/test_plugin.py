"""The installed plugin registers ``--radix-cache-backend kvtier`` and builds a working cache."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def kvtier_env(monkeypatch, tmp_path):
    config = tmp_path / "kvtier.yaml"
    config.write_text("cpu_size_gb: 0.05\nchunk_tokens: 64\n")
    monkeypatch.setenv("KVTIER_CONFIG", str(config))
    for key in [k for k in __import__("os").environ if k.startswith("KVTIER_") and k != "KVTIER_CONFIG"]:
        monkeypatch.delenv(key)


def test_entry_point_is_installed():
    eps = {ep.name: ep.value for ep in entry_points(group="sglang.srt.plugins")}
    assert eps.get("kvtier") == "kvtier.sglang_ext.plugin:register"


def test_sglang_loads_the_plugin_and_builds_the_backend(make_build_context, kvtier_env):
    from sglang.srt.mem_cache.base_prefix_cache import InsertParams, MatchPrefixParams
    from sglang.srt.mem_cache.radix_cache import RadixKey
    from sglang.srt.mem_cache.registry import create_tree_cache, registered_radix_cache_backends
    from sglang.srt.plugins import load_plugins

    load_plugins()
    assert "kvtier" in registered_radix_cache_backends()

    ctx = make_build_context(page_size=16, radix_cache_backend="kvtier")
    cache = create_tree_cache(ctx)  # SGLang's own routing, as in the scheduler
    from kvtier.sglang_ext.radix_cache import KVTierRadixCache

    assert isinstance(cache, KVTierRadixCache)
    pool = ctx.params.token_to_kv_pool_allocator.get_kvcache()
    per_token = 2 * pool.layer_num * pool.head_num * pool.head_dim * 2  # K and V, bf16
    assert cache.store.chunk_bytes == 64 * per_token
    ns = cache.namespace
    assert (ns.page_size, ns.tp_rank, ns.tp_size, ns.kv_dtype, ns.chunk_tokens) == (16, 0, 1, "bfloat16", 64)
    assert ns.layout == "mha-nhd:L2:H2:D32:V32:S0" and "load=dummy" in ns.model

    # The SGLang side still works as a radix cache.
    allocator = ctx.params.token_to_kv_pool_allocator
    tokens = list(range(100, 164))
    slots = allocator.alloc(64)
    cache.insert(InsertParams(key=RadixKey(tokens), value=slots))
    match = cache.match_prefix(MatchPrefixParams(key=RadixKey(tokens + [1, 2, 3])))
    assert torch.equal(match.device_indices, slots)
    cache.store.close()


def test_config_errors_surface_at_build(make_build_context, monkeypatch, tmp_path):
    from kvtier.sglang_ext.config import ConfigError
    from kvtier.sglang_ext.radix_cache import build

    monkeypatch.setenv("KVTIER_CONFIG", str(tmp_path / "kvtier.yaml"))
    (tmp_path / "kvtier.yaml").write_text("chunk_tokens: 100\ncpu_size_gb: 0.05\n")
    with pytest.raises(ConfigError, match="not a multiple of SGLang's --page-size 16"):
        build(make_build_context(page_size=16))


def test_incompatible_server_args_are_refused(make_build_context, kvtier_env):
    from kvtier.sglang_ext.radix_cache import build

    with pytest.raises(ValueError, match="remove --enable-hierarchical-cache"):
        build(make_build_context(enable_hierarchical_cache=True))


def test_mla_pools_are_refused_with_a_clear_message(make_build_context, kvtier_env):
    from sglang.srt.mem_cache.memory_pool import MLATokenToKVPool

    from kvtier.sglang_ext.radix_cache import build

    mla = MLATokenToKVPool(
        size=1024, page_size=16, dtype=torch.bfloat16, kv_lora_rank=64, qk_rope_head_dim=16,
        layer_num=2, device="cpu", enable_memory_saver=False,
    )
    with pytest.raises(ValueError, match="kvtier supports MHA KV pools.*MLATokenToKVPool"):
        build(make_build_context(kv_pool=mla))


def test_our_kernels_folder_does_not_shadow_hugging_face_kernels():
    # Run from the repository root, where a regular package named `kernels` would win.
    code = "import kernels, kvtier.kernels; print(kernels.__file__); print(list(kvtier.kernels.__path__))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    hf_file, ours = out.stdout.strip().splitlines()
    assert "site-packages" in hf_file
    assert str(REPO / "kernels") in ours
