"""What of the GPU-only benchmark scripts runs without a GPU: how their cases are put together."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transfer_gpu


def test_direct_packer_runs_each_mode_once_with_its_spin_and_switch_interval(monkeypatch):
    calls = []

    def fake_run(buffer_bytes, count, tokens, warmup, repeats, spin, switch_s):
        calls.append((spin, switch_s))
        return {"spin": spin, "switch": switch_s}

    monkeypatch.setattr(transfer_gpu, "packer_run", fake_run)
    case = transfer_gpu.direct_packer_case(64 * 10, 4, 10, 1, 2, None)
    assert calls == [(False, None), (True, None)]
    assert case["idle"] == {"spin": False, "switch": None} and case["busy_gil"]["spin"]
    assert case["row_bytes"] == 64 and case["buffers"] == 4 and "busy_gil_switch" not in case

    calls.clear()
    case = transfer_gpu.direct_packer_case(64 * 10, 4, 10, 1, 2, 0.0005)
    assert calls == [(False, None), (True, None), (True, 0.0005)]
    assert case["busy_gil_switch"] == {"spin": True, "switch": 0.0005}


CPU_CASE = """
import json, sys
sys.path.insert(0, {benchmarks!r})
import torch
torch.Tensor.pin_memory = lambda self: self  # no GPU here: plain host memory in both processes
import transfer_gpu
if __name__ == "__main__":
    print(json.dumps(transfer_gpu.case("zmq", "cpu", "cpu", 4096, 3, 1, 2)))
"""


def test_a_transport_case_runs_process_b_moves_the_bytes_and_ends_it(tmp_path):
    """``case`` with the ZMQ transport between host buffers: B starts, takes the writes, serves the reads
    back and is joined (the ``process_b`` plumbing every case shares)."""
    script = tmp_path / "cpu_case.py"
    script.write_text(CPU_CASE.format(benchmarks=str(Path(transfer_gpu.__file__).parent)))
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["bit_exact"] is True and result["ops_per_batch"] == 3
    assert len(result["write_GBps"]) == len(result["read_GBps"]) == 2


def test_hook_cost_replays_loads_on_the_real_cache_and_reports_kvtiers_timers(tmp_path):
    """hook_cost.py on CPU (copies in torch): the warm pass loads documents back from the CPU tier
    through the real KVTierRadixCache, and each variant reports its own load groups and kvtier's
    timers for the hooks the scheduler would call."""
    out = tmp_path / "hook_cost.json"
    done = subprocess.run(
        [sys.executable, str(Path(transfer_gpu.__file__).with_name("hook_cost.py")), "--device", "cpu", "--layers", "2",
         "--docs", "3", "--doc-len", "1000", "--pool-tokens", "1500", "--cpu-gb", "0.2", "--profile-top", "3",
         "--model-dir", str(tmp_path / "model"), "--variant", "lg1:load_layer_groups=1",
         "--variant", "lg2:load_layer_groups=2", "--out", str(out)],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["variants"]) == {"lg1", "lg2"} and report["workload"]["docs"] == 3
    for name, groups in (("lg1", 1), ("lg2", 2)):
        v = report["variants"][name]
        assert v["load_layer_groups"] == groups
        assert v["warm_loaded_tokens"] >= 2 * 256  # whole 256-token chunks of documents evicted in the cold pass
        assert v["warm_ms"]["init_load_back"]["mean"] > 0
        # kvtier's own timer runs inside each call the replay timed (the call adds the spill ahead)
        assert v["warm_hook_seconds"]["init_load_back"]["count"] >= 1
        # twice per warm request, as the scheduler does (schedule policy, then the prefill adder)
        assert v["warm_hook_seconds"]["match_prefix"]["count"] == 6
        # the loads go from the plugin's hook once the (one-request) batch is formed, as in a server
        assert v["warm_hook_seconds"]["launch_loads"]["count"] == v["warm_hook_seconds"]["init_load_back"]["count"]
        assert v["warm_hook_seconds"]["init_load_back"]["mean_s"] * 1e3 <= v["warm_ms"]["init_load_back"]["mean"] + 0.01
    assert report["variants"]["lg1"]["warm_profile_by_cumulative_time"]  # the first variant only is profiled
    assert "warm_profile_by_cumulative_time" not in report["variants"]["lg2"]


def test_hook_cost_without_copies_replays_the_same_hooks(tmp_path):
    """--no-copies: the same replay through the same hooks (documents still found and loaded back in
    the tree) and the mode in the report; --profile-top 0: no profiled replay."""
    out = tmp_path / "hook_cost.json"
    done = subprocess.run(
        [sys.executable, str(Path(transfer_gpu.__file__).with_name("hook_cost.py")), "--device", "cpu", "--layers", "2",
         "--docs", "3", "--doc-len", "1000", "--pool-tokens", "1500", "--cpu-gb", "0.2", "--profile-top", "0",
         "--no-copies", "--model-dir", str(tmp_path / "model"), "--variant", "d:load_layer_groups=1", "--out", str(out)],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    v = report["variants"]["d"]
    assert report["workload"]["copies"] is False and v["warm_loaded_tokens"] >= 2 * 256
    assert v["warm_hook_seconds"]["launch_loads"]["count"] == v["warm_hook_seconds"]["init_load_back"]["count"] >= 1
    assert "warm_profile_by_cumulative_time" not in v


def test_skip_copies_leaves_the_host_slab_and_the_pool_as_they_were(monkeypatch):
    """What --no-copies does to a real PoolIO over a real SGLang pool: a spill writes no host byte,
    a load no pool row, and each still reports done."""
    import hook_cost
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    from kvtier.kernels import kv_pages
    from kvtier.sglang_ext import pool_io

    for name in ("_launch", "_gather_torch", "_scatter_torch"):
        monkeypatch.setattr(kv_pages, name, getattr(kv_pages, name))  # put back after the test
    hook_cost.skip_copies()
    pool = MHATokenToKVPool(64, 1, torch.bfloat16, 2, 8, 2, "cpu", False)
    for buf in pool.k_buffer + pool.v_buffer:
        buf.copy_(torch.randn(buf.shape).to(buf.dtype))
    before = [buf.clone() for buf in pool.k_buffer + pool.v_buffer]
    chunk_bytes = 16 * 2 * 2 * 8 * 2 * 2
    slab = torch.zeros(2 * chunk_bytes, dtype=torch.uint8)
    io = pool_io.PoolIO(pool.k_buffer, pool.v_buffer, 16, slab)
    rows = torch.arange(1, 17)
    done = []
    io.to_host(rows, [slab[:chunk_bytes]], lambda: done.append("spill"))
    slab[chunk_bytes:].fill_(7)
    io.to_device([slab[chunk_bytes:]], rows + 16, lambda: done.append("load"))
    assert done == ["spill", "load"] and not slab[:chunk_bytes].any()
    assert all(torch.equal(b, a) for b, a in zip(pool.k_buffer + pool.v_buffer, before))


def test_tier_bookkeeping_times_puts_into_a_full_real_tier_with_and_without_one_below(tmp_path):
    """tier_bookkeeping.py on a real CpuTier: every case and size in the report, each reserve into the
    full tier got all its slots (the script checks that itself and fails otherwise)."""
    out = tmp_path / "tier_bookkeeping.json"
    done = subprocess.run(
        [sys.executable, str(Path(transfer_gpu.__file__).with_name("tier_bookkeeping.py")), "--slots", "64",
         "--slots", "128", "--chunks-per-reserve", "4", "--reserves", "3", "--out", str(out)],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["full_tier"]) == {"no_tier_below", "tier_below"}
    for case in report["full_tier"].values():
        assert set(case) == {"64", "128"} and all(r["us_per_slot"] > 0 for r in case.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch's sync debug mode watches CUDA calls")
def test_hook_cost_names_a_call_that_waits_for_the_gpu_and_not_one_that_does_not():
    import hook_cost

    found: set[str] = set()
    x = torch.ones(4, device="cuda")
    with hook_cost._watching_syncs(found, "queued", x.device):
        y = x * 2  # queued on the stream: no wait
    assert found == set()
    with hook_cost._watching_syncs(found, "waits", x.device):
        y.sum().item()  # the CPU reads a GPU result: a sync
    assert len(found) == 1 and next(iter(found)).startswith("waits: ") and "test_gpu_scripts.py" in next(iter(found))


def test_launch_cost_times_each_copy_kind_after_a_bit_exact_round_trip(tmp_path):
    """launch_cost.py on CPU through a real PoolIO over a real SGLang pool: each size's round trip is
    checked bit-exact (the script exits non-zero otherwise), then each kind of launch is timed."""
    out = tmp_path / "launch_cost.json"
    done = subprocess.run(
        [sys.executable, str(Path(transfer_gpu.__file__).with_name("launch_cost.py")), "--device", "cpu", "--layers",
         "2", "--chunks", "1,3", "--pool-tokens", "2048", "--repeats", "5", "--load-layer-groups", "2", "--out",
         str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["round_trip_bit_exact"] == {"1": True, "3": True}
    assert report["workload"]["load_layer_groups"] == 2 and report["workload"]["copies"] is True
    assert set(report["by_chunks"]) == {"1", "3"}
    assert report["after_gpu_wait"] is None  # no GPU to have waited for
    for kinds in report["by_chunks"].values():
        assert set(kinds) == {"spill_guarded", "spill_unguarded", "load", "spill_checks", "spill_kernel_call"}
        assert all(0 < t["median_us"] <= t["p90_us"] for t in kinds.values())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without an NVIDIA driver")
def test_cold_thread_without_a_gpu_says_so_and_writes_nothing(tmp_path):
    out = tmp_path / "cold.json"
    done = subprocess.run([sys.executable, str(Path(transfer_gpu.__file__).with_name("cold_thread.py")), "--flags",
                           "auto,spin", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and not out.exists()
    assert "the auto measurement failed" in done.stderr and "needs an NVIDIA GPU and its driver" in done.stderr
