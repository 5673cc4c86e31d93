"""trace_summary reads torch profiler traces: a real CPU trace from torch.profiler, and GPU activity laid out by hand
(kernels on two streams that overlap and leave gaps) against spans worked out on paper."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import time

import torch
from bench_common import BENCHMARKS_DIR
from torch.profiler import ProfilerActivity, profile, record_function
from trace_summary import load_events, summarize, union_ms


def test_a_real_cpu_trace_names_its_longest_span(tmp_path):
    torch.randn(64, 64) @ torch.randn(64, 64)  # a first matmul may load its library for longer than the sleep
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function("kvtier_slow_part"):
            time.sleep(0.05)
        with record_function("kvtier_fast_part"):
            torch.randn(64, 64) @ torch.randn(64, 64)
    raw = tmp_path / "trace.json"
    prof.export_chrome_trace(str(raw))
    packed = tmp_path / "host-TP-0.trace.json.gz"
    with gzip.open(packed, "wt") as f:
        f.write(raw.read_text())
    report = summarize(load_events(packed))
    spans = {s["name"]: s for s in report["cpu_spans"]}
    assert spans["kvtier_slow_part"]["ms"] >= 50 and spans["kvtier_fast_part"]["ms"] < spans["kvtier_slow_part"]["ms"]
    assert [s["ms"] for s in report["cpu_spans"]] == sorted((s["ms"] for s in report["cpu_spans"]), reverse=True)
    assert report["gpu_busy_ms"] == 0 and report["streams"] == {} and report["window_ms"] >= 50


def test_gpu_time_is_the_union_of_streams_and_gaps_are_where_no_stream_runs(tmp_path):
    # Stream 7: a 10 ms kernel at 0 and a 5 ms copy at 30; stream 20: a 4 ms kernel at 8 (2 ms overlap
    # with stream 7) and one of 2 ms at 50. Busy 10 + 2 + 5 + 2 = 19 ms; gaps 12 to 30 and 35 to 50.
    ev = [("gemm", "kernel", 7, 0, 10_000), ("Memcpy HtoD", "gpu_memcpy", 7, 30_000, 5_000),
          ("scatter_kv", "kernel", 20, 8_000, 4_000), ("gemm", "kernel", 20, 50_000, 2_000),
          ("run_batch", "python_function", 1, 0, 52_000), ("instant", "kernel", 7, 1_000, None)]
    trace = {"traceEvents": [{"ph": "X", "name": n, "cat": c, "tid": t, "ts": 1e6 + ts, "args": {"stream": t},
                              **({"dur": d} if d is not None else {})} for n, c, t, ts, d in ev]}
    path = tmp_path / "t.json"
    path.write_text(json.dumps(trace))
    report = summarize(load_events(path))
    assert report["events"] == 5  # the event without a duration is not a span
    assert report["gpu_busy_ms"] == 19 and report["gpu_active_ms"] == 52 and report["window_ms"] == 52
    assert report["streams"] == {"7": {"busy_ms": 15, "ops": 2}, "20": {"busy_ms": 6, "ops": 2}}
    assert report["gpu_idle_gaps"] == [{"at_ms": 12, "ms": 18}, {"at_ms": 35, "ms": 15}]
    assert report["kernels"][0] == {"name": "gemm", "count": 2, "total_ms": 12}
    assert report["cpu_spans"] == [{"name": "run_batch", "cat": "python_function", "at_ms": 0, "ms": 52, "tid": 1}]
    # The command line writes the same per file.
    out = tmp_path / "summary.json"
    r = subprocess.run([sys.executable, str(BENCHMARKS_DIR / "trace_summary.py"), str(path), "--out", str(out)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(out.read_text()) == {"t.json": report}
    # --timeline: the named spans, CPU and GPU, by start.
    r = subprocess.run([sys.executable, str(BENCHMARKS_DIR / "trace_summary.py"), str(path), "--out", str(out),
                        "--timeline", "scatter", "--timeline", "run_batch"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(out.read_text())["t.json"]["timeline"] == [
        {"name": "run_batch", "cat": "python_function", "at_ms": 0, "ms": 52, "where": "tid 1"},
        {"name": "scatter_kv", "cat": "kernel", "at_ms": 8, "ms": 4, "where": "stream 20"}]


def test_union_merges_touching_and_nested_spans():
    assert union_ms([(0, 1000), (1000, 2000), (500, 700), (3000, 3500)]) == (2.5, [(0, 2000), (3000, 3500)])
    assert union_ms([]) == (0.0, [])
