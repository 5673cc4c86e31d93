"""Merging results of several invocations (ratios to radix-only), and the plots and table made from them."""

from __future__ import annotations

import json
import subprocess
import sys

import matplotlib.pyplot as plt
import numpy as np
import pytest
from bench_common import BENCHMARKS_DIR, LLAMA3_8B, BenchError, merge_result, model_shape
from long_doc import RequestResult, pass_report

WORKLOAD = {"kind": "rag", "docs": 6, "doc_len": 1000, "concurrency": 2, "output_len": 10, "pool_tokens": 3000,
            "seed": 0, "model": "Llama-3-8B shape, dummy weights", "passes": {"cold": 6, "warm": 6}}


def fake_pass(seed: int, ttft_scale: float, host_share: float) -> dict:
    rng = np.random.default_rng(seed)
    results = []
    for _ in range(6):
        ttft = float(rng.uniform(0.5, 1.5) * ttft_scale)
        host = int(1001 * host_share)
        results.append(RequestResult(ttft, ttft + float(rng.uniform(1, 2)), 1031, 10, 0, host, 0))
    report = pass_report(results, wall_s=4.0)
    report["kvtier"] = "n/a"
    return report


def config_result(name: str, scale: float, host: float, kvtier: bool) -> dict:
    passes = {"cold": fake_pass(1, 1.0, 0.0), "warm": fake_pass(2, scale, host)}
    if kvtier:
        for p in passes.values():
            p["kvtier"] = {"hits": {"cpu": 20, "disk": 3}, "misses": 5, "hit_rate": {"cpu": 0.71, "disk": 0.11},
                           "gb_moved": {"cpu_out": 0.7}, "demotions": 0, "dropped_puts": 0, "gpu_copies": {}}
    return {"passes": passes, "command": f"python benchmarks/long_doc.py --config {name}", "gpu": "NVIDIA H100 80GB HBM3",
            "commit": "abc123", "date": "2026-11-23T01:00:00+00:00", "sglang": "0.5.17",
            "model": model_shape(LLAMA3_8B, WORKLOAD["model"])}


def test_merge_keeps_configs_and_computes_ratios_to_radix(tmp_path):
    out = tmp_path / "r.json"
    kv = config_result("kvtier_cpu", 0.25, 0.97, True)
    merge_result(out, "long_doc", WORKLOAD, "kvtier_cpu", kv)
    assert "vs_radix" not in json.loads(out.read_text())["configs"]["kvtier_cpu"]
    radix = config_result("radix", 1.0, 0.0, False)
    report = merge_result(out, "long_doc", WORKLOAD, "radix", radix)
    assert json.loads(out.read_text()) == report
    warm = report["configs"]["kvtier_cpu"]["vs_radix"]["warm"]
    rw, kw = radix["passes"]["warm"], kv["passes"]["warm"]
    assert warm["ttft_mean"] == round(rw["ttft"]["mean_s"] / kw["ttft"]["mean_s"], 3)
    assert warm["latency_p99"] == round(rw["latency"]["p99_s"] / kw["latency"]["p99_s"], 3)
    assert warm["throughput"] == 1.0
    assert report["configs"]["radix"]["vs_radix"]["cold"]["ttft_mean"] == 1.0
    assert model_shape(LLAMA3_8B, "x")["kv_bytes_per_token"] == 128 * 1024
    with pytest.raises(BenchError, match="--out"):
        merge_result(out, "long_doc", {**WORKLOAD, "docs": 46}, "radix", radix)


def test_plot_script_writes_pngs_and_prints_the_table(tmp_path):
    out = tmp_path / "long_doc.json"
    for name, scale, host, kvtier in (("radix", 1.0, 0.0, False), ("hicache", 0.2, 0.97, False),
                                      ("kvtier_cpu", 0.25, 0.97, True)):
        merge_result(out, "long_doc", WORKLOAD, name, config_result(name, scale, host, kvtier))
    run = subprocess.run([sys.executable, str(BENCHMARKS_DIR / "plot_results.py"), str(out)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    for suffix in ("ttft", "latency", "hits"):
        png = tmp_path / f"long_doc_{suffix}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        image = plt.imread(png)
        assert image.shape[0] > 200 and image.shape[1] > 400
        assert image[..., :3].std() > 0.05  # something was drawn
    table = run.stdout.splitlines()
    assert "NVIDIA H100 80GB HBM3" in table[0] and "abc123" in table[0] and "SGLang 0.5.17" in table[0]
    assert "128 KiB of KV per token" in table[0]
    rows = [line for line in table if line.startswith("| ") and not line.startswith("| config")]
    assert [r.split(" | ")[0:2] for r in rows] == [["| radix", "cold"], ["| radix", "warm"], ["| hicache", "cold"],
                                                   ["| hicache", "warm"], ["| kvtier_cpu", "cold"], ["| kvtier_cpu", "warm"]]
    assert "cpu 20, disk 3, not delivered 5" in rows[-1] and "n/a" in rows[2]
    assert "| cpu 0.0 / 0.7 |" in rows[-1] and "| n/a | 1.00x | 1.00x |" in rows[1]


def test_a_file_without_radix_only_has_no_ratios_in_its_table():
    from plot_results import markdown

    report = {"workload": WORKLOAD, "configs": {"kvtier_cpu": config_result("kvtier_cpu", 0.25, 0.97, True)}}
    rows = [line for line in markdown(report).splitlines() if line.startswith("| kvtier_cpu")]
    assert len(rows) == 2 and all(r.endswith("| n/a | n/a |") for r in rows)


def test_plot_script_refuses_other_files(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"benchmark": "offload_ttft", "configs": {}}))
    run = subprocess.run([sys.executable, str(BENCHMARKS_DIR / "plot_results.py"), str(bad)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and "not a long_doc.py result" in run.stderr


def test_stacked_bars_stack_each_series_on_the_ones_before():
    from plot_results import _stacked_bars

    fig, ax = plt.subplots()
    _stacked_bars(ax, {"gpu": [0.2, 0.5], "host": [0.3, 0.1], "storage": [0.0, 0.4]})
    bars = [v for p in ax.patches for v in (p.get_x() + p.get_width() / 2, p.get_y(), p.get_height())]
    plt.close(fig)
    assert bars == pytest.approx([0, 0, 0.2, 1, 0, 0.5, 0, 0.2, 0.3, 1, 0.5, 0.1, 0, 0.5, 0.0, 1, 0.6, 0.4])
    assert [h.get_label() for h in ax.containers] == ["gpu", "host", "storage"]
