"""Plots and a Markdown table from a ``long_doc.py`` result file, on any machine with matplotlib.

    python benchmarks/plot_results.py benchmarks/results/long_doc.json

writes ``<name>_ttft.png`` (mean TTFT per configuration and pass, p99 marked),
``<name>_latency.png`` (CDF of request latency, one panel per pass) and ``<name>_hits.png``
(prompt tokens served from GPU / host / storage as SGLang reports them, and kvtier's chunk hit
rate per tier) next to the JSON (or in ``--out-dir``), and prints the Markdown table for the README
(with the GB kvtier moved to and from each tier).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Iterable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ORDER = ("radix", "hicache", "kvtier_cpu", "kvtier_cpu_wt", "kvtier_cpu_disk", "kvtier_disk")


def ordered(configs: dict) -> list[str]:
    """Configuration names, the baseline first, then the known order, then any others by name."""
    return [n for n in ORDER if n in configs] + sorted(n for n in configs if n not in ORDER)


def pass_names(report: dict) -> list[str]:
    """Every pass in the order the workload runs them."""
    names: list[str] = []
    for cfg in report["configs"].values():
        names += [p for p in cfg["passes"] if p not in names]
    return names


def plot_ttft(report: dict, path: Path) -> None:
    names, passes = ordered(report["configs"]), pass_names(report)
    width = 0.8 / len(passes)
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2, 4.5))
    for j, p in enumerate(passes):
        xs = [i + (j - (len(passes) - 1) / 2) * width for i in range(len(names))]
        runs = [report["configs"][n]["passes"].get(p) for n in names]
        ax.bar(xs, [r["ttft"]["mean_s"] if r else 0 for r in runs], width, label=f"{p} mean")
        ax.scatter([x for x, r in zip(xs, runs) if r], [r["ttft"]["p99_s"] for r in runs if r],
                   marker="_", s=200, color="black", zorder=3, label="p99" if j == 0 else None)
    ax.set_xticks(range(len(names)), names, rotation=15)
    ax.set_ylabel("time to first token (s)")
    ax.set_title("TTFT per configuration and pass")
    ax.margins(y=0.2)
    ax.legend(loc="upper left", ncols=len(passes) + 1, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_latency_cdf(report: dict, path: Path) -> None:
    passes = pass_names(report)
    fig, axes = plt.subplots(1, len(passes), figsize=(5 * len(passes), 4), squeeze=False, sharey=True)
    for ax, p in zip(axes[0], passes):
        for n in ordered(report["configs"]):
            run = report["configs"][n]["passes"].get(p)
            if run:
                xs = sorted(run["latency_all_s"])
                ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=n)
        ax.set_title(f"request latency, {p}")
        ax.set_xlabel("seconds")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("fraction of requests")
    axes[0][-1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _stacked_bars(ax, shares: dict[str, list[float]]) -> None:
    """One bar per run, the series of ``shares`` (label -> share per run) stacked in their order."""
    bottom: list[float] = []
    for label, share in shares.items():
        bottom = bottom or [0.0] * len(share)
        ax.bar(range(len(share)), share, bottom=bottom, label=label)
        bottom = [b + s for b, s in zip(bottom, share)]


def plot_hits(report: dict, path: Path) -> None:
    names, passes = ordered(report["configs"]), pass_names(report)
    labels = [f"{n} {p}" for n in names for p in passes if p in report["configs"][n]["passes"]]
    runs = [report["configs"][n]["passes"][p] for n in names for p in passes if p in report["configs"][n]["passes"]]
    # one panel above the other: side by side, a file of many passes made a figure too wide to read
    fig, (left, right) = plt.subplots(2, 1, figsize=(max(10, 0.6 * len(runs)), 8))
    _stacked_bars(left, {level: [r["hit_rate"][level] for r in runs] for level in ("gpu", "host", "storage")})
    left.set_xticks(range(len(runs)), labels, fontsize=7, rotation=35, ha="right")
    left.set_ylim(0, 1)
    left.set_ylabel("share of prompt tokens")
    left.set_title("prompt tokens cached, as SGLang reports them")
    left.legend()
    tiers = sorted({t for r in runs if isinstance(r["kvtier"], dict) for t in r["kvtier"]["hit_rate"]})
    _stacked_bars(right, {tier: [r["kvtier"]["hit_rate"].get(tier, 0.0) if isinstance(r["kvtier"], dict) else 0.0
                                 for r in runs] for tier in tiers})
    right.set_xticks(range(len(runs)), labels, fontsize=7, rotation=35, ha="right")
    right.set_ylim(0, 1)
    right.set_ylabel("share of chunks looked up")
    right.set_title("kvtier chunk hits per tier (n/a: not kvtier)")
    if tiers:
        right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _span(values: Iterable[str]) -> str:
    vals = sorted(set(values))
    return vals[0] if len(vals) == 1 else f"{vals[0]} to {vals[-1]}"


def markdown(report: dict) -> str:
    """The README table: one row per configuration and pass, the run's facts in the caption."""
    cfgs = [report["configs"][n] for n in ordered(report["configs"])]
    w = report["workload"]
    m = cfgs[0]["model"]
    shape = (f"{m['source']} ({m['layers']} layers, {m['kv_heads']} KV heads, head dim {m['head_dim']}, "
             f"{m['dtype']}, {m['kv_bytes_per_token'] // 1024} KiB of KV per token)")
    sizes = (f"{w['docs']} docs x {w['doc_len']:,} tokens" if w["kind"] != "chat"
             else f"{w['users']} users x {w['turns']} turns, first turn {w['doc_len']:,} tokens, +{w['turn_len']:,} per turn")
    lines = [
        f"*{w['kind']} workload: {sizes}, {w['concurrency']} concurrent, {w['output_len']} output tokens, "
        f"{w['pool_tokens']:,}-token GPU pool. GPU: {_span(c['gpu'] for c in cfgs)}; model: {shape}; "
        f"commit {_span(c['commit'] for c in cfgs)}; {_span(c['date'] for c in cfgs)}; "
        f"SGLang {_span(c['sglang'] for c in cfgs)}. Ratios are radix-only time / this time (>1 is faster).*",
        "",
        "| config | pass | TTFT mean / p50 / p99 | latency mean / p50 / p99 | output tok/s "
        "| cached GPU / host / storage | kvtier chunks loaded | kvtier GB to / from each tier "
        "| TTFT vs radix | latency vs radix |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in ordered(report["configs"]):
        cfg = report["configs"][name]
        for p, run in cfg["passes"].items():
            t, lat, h = run["ttft"], run["latency"], run["hit_rate"]
            kv = run["kvtier"]
            chunks = ", ".join([*(f"{tier} {n}" for tier, n in kv["hits"].items() if n), f"not delivered {kv['misses']}"]) \
                if isinstance(kv, dict) else "n/a"
            r = cfg.get("vs_radix", {}).get(p, {})
            lines.append(
                f"| {name} | {p} | {t['mean_s']:.3f} / {t['p50_s']:.3f} / {t['p99_s']:.3f} s "
                f"| {lat['mean_s']:.2f} / {lat['p50_s']:.2f} / {lat['p99_s']:.2f} s | {run['throughput_tok_s']:.0f} "
                f"| {h['gpu']:.0%} / {h['host']:.0%} / {h['storage']:.0%} | {chunks} | {_moved(kv)} "
                f"| {_ratio(r, 'ttft_mean')} | {_ratio(r, 'latency_mean')} |"
            )
    return "\n".join(lines)


def _moved(kvtier: dict | str) -> str:
    """GB kvtier wrote to / read from each tier in a pass (its byte counters), or n/a for other servers."""
    if not isinstance(kvtier, dict):
        return "n/a"
    gb = kvtier["gb_moved"]
    tiers = sorted({key.rsplit("_", 1)[0] for key in gb})
    return ", ".join(f"{t} {gb.get(f'{t}_in', 0.0):.1f} / {gb.get(f'{t}_out', 0.0):.1f}" for t in tiers) or "0 / 0"


def _ratio(vs_radix: dict, key: str) -> str:
    """A ratio to radix-only, or n/a where the file has no radix-only run to compare with."""
    return f"{vs_radix[key]:.2f}x" if key in vs_radix else "n/a"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("result", help="a JSON file written by benchmarks/long_doc.py")
    ap.add_argument("--out-dir", help="where the PNGs go (default: next to the JSON)")
    args = ap.parse_args()
    src = Path(args.result)
    try:
        report = json.loads(src.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        sys.exit(f"plot_results: cannot read {src}: {exc}")
    if report.get("benchmark") != "long_doc" or not report.get("configs"):
        sys.exit(f"plot_results: {src} is not a long_doc.py result with at least one configuration")
    out = Path(args.out_dir or src.parent)
    out.mkdir(parents=True, exist_ok=True)
    for suffix, plot in (("ttft", plot_ttft), ("latency", plot_latency_cdf), ("hits", plot_hits)):
        path = out / f"{src.stem}_{suffix}.png"
        plot(report, path)
        print(f"wrote {path}", file=sys.stderr)
    print(markdown(report))


if __name__ == "__main__":
    main()
