"""What a torch profiler trace says about one request, as JSON: GPU time per stream, the GPU's idle gaps,
the kernels that took longest, and the longest CPU spans (GPU diagnostic).

Reads the Chrome-trace files that SGLang's ``/start_profile`` writes (``*.trace.json.gz``;
``offload_ttft.py --profile-warm I`` asks for them), so that traces too large to commit become a
small file that is, and two servers' traces of the same request can be set side by side:

    python benchmarks/trace_summary.py $OUT/traces/*.trace.json.gz --out summary.json

``--timeline NAME`` (repeatable) adds every span whose name contains one of the NAMEs, CPU or GPU,
in the order they started, so one round of requests can be read as a schedule (e.g. ``--timeline
kvtier. --timeline scheduler. --timeline step[ --timeline _kv_copy_kernel``: kvtier's hooks, SGLang's
scheduler steps and batches, the copies; these spans are there also in traces without stacks).
"""

from __future__ import annotations

import argparse
import gzip
import json
from collections import defaultdict
from pathlib import Path
from typing import Iterable

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
CPU_CATEGORIES = ("python_function", "user_annotation", "cpu_op")


def load_events(path: Path) -> list[dict]:
    """The complete ("X") events of a trace file, gzip or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    return [e for e in events if e.get("ph") == "X" and "dur" in e]


def union_ms(spans: Iterable[tuple[float, float]]) -> tuple[float, list[tuple[float, float]]]:
    """Total length of the union of (start, end) spans in microseconds, reported in ms, and the
    merged spans, in order."""
    merged: list[list[float]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return sum(e - s for s, e in merged) / 1e3, [(s, e) for s, e in merged]


def summarize(events: list[dict], top: int = 15) -> dict:
    """GPU busy time per stream and in all, the longest idle gaps of the GPU between its first and last
    activity, the kernels by total time, and the longest CPU spans, all in ms from the trace's start."""
    if not events:
        return {"events": 0}
    t0 = min(e["ts"] for e in events)
    gpu = [e for e in events if e.get("cat") in GPU_CATEGORIES]
    per_stream: dict[str, list[tuple[float, float]]] = defaultdict(list)
    kernels: dict[str, list[float]] = defaultdict(list)
    for e in gpu:
        stream = str(e.get("args", {}).get("stream", e.get("tid")))
        per_stream[stream].append((e["ts"], e["ts"] + e["dur"]))
        kernels[e["name"]].append(e["dur"])
    busy_ms, merged = union_ms(s for spans in per_stream.values() for s in spans)
    gaps = sorted(((b[0] - a[1], a[1]) for a, b in zip(merged, merged[1:])), reverse=True)[:top]
    cpu = sorted((e for e in events if e.get("cat") in CPU_CATEGORIES), key=lambda e: e["dur"], reverse=True)[:top]
    return {
        "events": len(events),
        "window_ms": round((max(e["ts"] + e["dur"] for e in events) - t0) / 1e3, 3),
        "gpu_busy_ms": round(busy_ms, 3),
        "gpu_active_ms": round((merged[-1][1] - merged[0][0]) / 1e3, 3) if merged else 0.0,
        "streams": {s: {"busy_ms": round(union_ms(spans)[0], 3), "ops": len(spans)} for s, spans in per_stream.items()},
        "gpu_idle_gaps": [{"at_ms": round((at - t0) / 1e3, 3), "ms": round(g / 1e3, 3)} for g, at in gaps],
        "kernels": [{"name": n[:120], "count": len(d), "total_ms": round(sum(d) / 1e3, 3)}
                    for n, d in sorted(kernels.items(), key=lambda kv: sum(kv[1]), reverse=True)[:top]],
        "cpu_spans": [{"name": e["name"][:120], "cat": e["cat"], "at_ms": round((e["ts"] - t0) / 1e3, 3),
                       "ms": round(e["dur"] / 1e3, 3), "tid": e.get("tid")} for e in cpu],
    }


def timeline(events: list[dict], names: Iterable[str], limit: int = 2000) -> list[dict]:
    """The spans whose name contains any of ``names``, by start, in ms from the trace's start, with
    their thread (CPU) or stream (GPU); at most ``limit``."""
    names = list(names)
    if not events or not names:
        return []
    t0 = min(e["ts"] for e in events)
    picked = sorted((e for e in events if any(n in e["name"] for n in names)), key=lambda e: e["ts"])[:limit]
    return [{"name": e["name"][:120], "cat": e.get("cat"), "at_ms": round((e["ts"] - t0) / 1e3, 3),
             "ms": round(e["dur"] / 1e3, 3),
             "where": (f"stream {e.get('args', {}).get('stream', e.get('tid'))}" if e.get("cat") in GPU_CATEGORIES
                       else f"tid {e.get('tid')}")} for e in picked]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("traces", nargs="+", type=Path)
    ap.add_argument("--top", type=int, default=15, help="rows of each ranking")
    ap.add_argument("--out", type=Path, help="JSON file (default: print)")
    ap.add_argument("--timeline", action="append", default=[], metavar="NAME",
                    help="also list every span whose name contains NAME, in time order (repeatable)")
    args = ap.parse_args()
    report = {}
    for path in args.traces:
        events = load_events(path)
        report[path.name] = summarize(events, args.top)
        if args.timeline:
            report[path.name]["timeline"] = timeline(events, args.timeline)
    text = json.dumps(report, indent=2) + "\n"
    if args.out:
        args.out.write_text(text)
    else:
        print(text, end="")


if __name__ == "__main__":
    main()
