"""Percentile summaries against numpy, and the scrape of kvtier's real Prometheus registry over HTTP."""

from __future__ import annotations

import socket
import time

import numpy as np
import pytest
from bench_common import BenchError, counter_delta, kvtier_summary, percentile, scrape_metrics, summarize

from kvtier.sglang_ext.metrics import TierMetrics


@pytest.mark.parametrize("n", [1, 2, 3, 10, 46, 199])
def test_percentile_matches_numpy(n):
    values = np.random.default_rng(n).exponential(0.3, size=n).tolist()
    for q in (0, 1, 25, 50, 90, 99, 99.9, 100):
        assert percentile(values, q) == pytest.approx(np.percentile(values, q), rel=1e-12, abs=1e-15)


def test_summarize_matches_numpy():
    values = np.random.default_rng(0).uniform(0.05, 2.0, size=46).tolist()
    s = summarize(values)
    assert s == {"mean_s": round(float(np.mean(values)), 4), "p50_s": round(float(np.median(values)), 4),
                 "p99_s": round(float(np.percentile(values, 99)), 4)}


def test_percentile_refuses_bad_input():
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_scrape_of_served_registry_gives_per_pass_deltas():
    m = TierMetrics()
    port = free_port()
    m.serve(port)
    url = f"http://127.0.0.1:{port}/metrics"
    chunk = 32 << 20
    m.hits.labels("cpu").inc(4)
    m.misses.inc(10)
    m.used.labels("cpu").set(123)
    before = scrape_metrics(url)
    assert before['kvtier_hits_total{tier=cpu}'] == 4
    assert before["kvtier_misses_total{}"] == 10

    m.hits.labels("cpu").inc(30)
    m.hits.labels("disk").inc(6)
    m.misses.inc(4)
    m.bytes.labels("cpu", "out").inc(30 * chunk)
    m.bytes.labels("disk", "in").inc(6 * chunk)
    m.demotions.inc(6)
    m.tail_tokens.inc(48)
    m.spills.labels("ahead").inc(8)
    m.spills.labels("eviction").inc(2)
    m.evictions.labels("cpu").inc(5)
    for t in (0.02, 0.04):
        m.latency.labels("gpu", "load").observe(t)
    for t in (0.0001, 0.0003, 0.0002):
        m.latency.labels("hook", "spill_ahead").observe(t)
    m.latency.labels("store", "acquire").observe(0.5)  # neither a GPU copy nor the hook
    m.used.labels("cpu").set(999)
    delta = counter_delta(before, scrape_metrics(url))
    assert not any(k.startswith("kvtier_used_bytes") for k in delta)
    s = kvtier_summary(delta)
    assert s["hits"] == {"cpu": 30, "disk": 6}
    assert s["misses"] == 4
    assert s["hit_rate"] == {"cpu": 0.75, "disk": 0.15}
    assert s["gb_moved"] == {"cpu_out": round(30 * chunk / 1e9, 3), "disk_in": round(6 * chunk / 1e9, 3)}
    assert s["demotions"] == 6 and s["dropped_puts"] == 0 and s["tail_tokens"] == 48
    assert s["spilled_chunks"] == {"ahead": 8, "eviction": 2}
    assert s["tier_evictions"] == {"cpu": 5}
    assert s["gpu_copies"] == {"load": {"count": 2, "mean_s": 0.03}}
    assert s["hook_seconds"] == {"spill_ahead": {"count": 3, "mean_s": 0.0002, "total_s": 0.001}}


def test_scrape_of_closed_port_fails_fast_with_the_fix():
    start = time.monotonic()
    with pytest.raises(BenchError, match="KVTIER_METRICS_PORT"):
        scrape_metrics(f"http://127.0.0.1:{free_port()}/metrics", timeout_s=2)
    assert time.monotonic() - start < 3
