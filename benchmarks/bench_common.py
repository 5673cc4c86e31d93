"""What the GPU benchmarks share: the dummy model, the server configurations, statistics, metrics, results.

``offload_ttft.py`` and ``long_doc.py`` (and ``examples/demo.py`` through it) import this module
instead of copying it: the dummy-weight Llama-3-8B shape, the table of server configurations
(radix-only, SGLang HiCache, kvtier with its tiers), percentile summaries, the Prometheus scrape of
kvtier's ``/metrics`` with per-pass deltas, the facts a result must carry (command, GPU, commit,
date, SGLang version) and the merge of several invocations into one JSON file.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import math
import shlex
import subprocess
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from prometheus_client.parser import text_string_to_metric_families

BENCHMARKS_DIR = Path(__file__).resolve().parent
REPO = BENCHMARKS_DIR.parent

LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "torch_dtype": "bfloat16", "tie_word_embeddings": False, "bos_token_id": 128000,
    "eos_token_id": 128001, "hidden_act": "silu",
}

KVTIER_ARGS = ("--radix-cache-backend", "kvtier")


class BenchError(RuntimeError):
    """A benchmark cannot go on; the message says what to change."""


@dataclass(frozen=True)
class ServerSetup:
    """One configuration: SGLang arguments beyond the pool size, kvtier environment, a disk tier folder."""

    description: str
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    disk_dir: str = ""
    disk_gb: float = 0.0

    @property
    def is_kvtier(self) -> bool:
        return KVTIER_ARGS[1] in self.args


def setups(host_gb: float, disk_root: str, cpu_disk_cpu_gb: float, cpu_disk_gb: float, disk_cpu_gb: float,
           disk_gb: float, metrics_port: int = 9400) -> dict[str, ServerSetup]:
    """The configurations compared, by name; every GPU pool size is set by the caller.

    ``host_gb`` sizes HiCache's host pool and kvtier's CPU-only tier alike; ``kvtier_cpu_disk``
    has a ``cpu_disk_cpu_gb`` CPU tier over a ``cpu_disk_gb`` disk tier and ``kvtier_disk`` a
    ``disk_cpu_gb`` CPU tier (it stages every copy) over a ``disk_gb`` disk tier, each in its
    own folder under ``disk_root``.
    """
    port = {"KVTIER_METRICS_PORT": str(metrics_port)}

    def kvtier(cpu_gb: float, **extra: str) -> dict[str, str]:
        return {"KVTIER_CPU_SIZE_GB": f"{cpu_gb:g}", **extra, **port}

    def disk(name: str, cpu_gb: float, gb: float, text: str) -> ServerSetup:
        folder = str(Path(disk_root) / name)
        env = kvtier(cpu_gb, KVTIER_DISK_PATH=folder, KVTIER_DISK_SIZE_GB=f"{gb:g}")
        return ServerSetup(text, KVTIER_ARGS, env, folder, gb)

    return {
        "radix": ServerSetup("radix cache only"),
        "hicache": ServerSetup(
            f"SGLang HiCache, write_through, {host_gb:g} GB host",
            ("--enable-hierarchical-cache", "--hicache-size", f"{host_gb:g}", "--hicache-write-policy", "write_through"),
        ),
        "kvtier_cpu": ServerSetup(f"kvtier CPU tier {host_gb:g} GB, write_back", KVTIER_ARGS, kvtier(host_gb)),
        "kvtier_cpu_wt": ServerSetup(
            f"kvtier CPU tier {host_gb:g} GB, write_through", KVTIER_ARGS, kvtier(host_gb, KVTIER_WRITE_POLICY="write_through")
        ),
        "kvtier_cpu_disk": disk("kvtier_cpu_disk", cpu_disk_cpu_gb, cpu_disk_gb,
                                f"kvtier CPU tier {cpu_disk_cpu_gb:g} GB + disk {cpu_disk_gb:g} GB"),
        "kvtier_disk": disk("kvtier_disk", disk_cpu_gb, disk_gb, f"kvtier disk {disk_gb:g} GB (CPU tier {disk_cpu_gb:g} GB)"),
    }


def parse_variant(spec: str) -> tuple[str, dict[str, str]]:
    """``NAME:key=value,key=value`` (kvtier settings) -> ``(NAME, {"KVTIER_KEY": "value", ...})``:
    a kvtier configuration with these settings changed, so an A/B needs no code change. Unknown
    keys and bad values are refused with kvtier's own config message."""
    from kvtier.sglang_ext.config import ConfigError, load_config

    name, sep, settings = spec.partition(":")
    if not sep or not name or not settings:
        raise BenchError(f"--variant {spec!r}: expected NAME:key=value[,key=value...], e.g. "
                         "lg4:load_layer_groups=4,load_max_programs=32")
    env = {}
    for item in settings.split(","):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise BenchError(f"--variant {spec!r}: {item!r} is not key=value")
        env[f"KVTIER_{key.strip().upper()}"] = value.strip()
    try:
        load_config(env=env)
    except ConfigError as e:
        raise BenchError(f"--variant {spec!r}: {e}") from None
    return name, env


def write_dummy_model(model_dir: str | Path, config: Mapping = LLAMA3_8B) -> Path:
    """A model folder holding only ``config.json``, for ``--load-format dummy`` (random weights)."""
    path = Path(model_dir)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(dict(config)))
    return path


def model_shape(config: Mapping, source: str) -> dict:
    """Layers, KV heads, head dim, dtype and KV bytes per token of a Llama-style ``config.json``."""
    heads = config.get("num_key_value_heads", config.get("num_attention_heads"))
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    dtype = str(config.get("torch_dtype", "bfloat16"))
    item = 4 if dtype == "float32" else 2
    return {
        "source": source,
        "layers": config["num_hidden_layers"],
        "kv_heads": heads,
        "head_dim": head_dim,
        "dtype": dtype,
        "kv_bytes_per_token": 2 * config["num_hidden_layers"] * heads * head_dim * item,
    }


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation between order statistics (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q={q} must be within 0..100")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Mean, p50 and p99 of a list of seconds, rounded to 0.1 ms."""
    return {
        "mean_s": round(sum(values) / len(values), 4),
        "p50_s": round(percentile(values, 50), 4),
        "p99_s": round(percentile(values, 99), 4),
    }


def scrape_metrics(url: str, timeout_s: float = 5.0) -> dict[str, float]:
    """Every sample of a Prometheus ``/metrics`` page as ``{'name{label=value,...}': value}``."""
    try:
        text = urllib.request.urlopen(url, timeout=timeout_s).read().decode()
    except OSError as exc:
        raise BenchError(f"cannot read metrics at {url} ({exc}); is KVTIER_METRICS_PORT set and free?") from exc
    return parse_metrics(text)


def parse_metrics(text: str) -> dict[str, float]:
    """Every sample of Prometheus exposition ``text`` as ``{'name{label=value,...}': value}``."""
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.endswith("_created"):
                continue
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}"] = s.value
    return samples


def counter_delta(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float]:
    """``after - before`` for counters and histogram sums and counts (gauges are left out)."""
    out = {}
    for key, value in after.items():
        name = key.split("{", 1)[0]
        if name.endswith(("_total", "_sum", "_count")):
            out[key] = value - before.get(key, 0.0)
    return out


def metric_label(key: str, label: str) -> str:
    """One label's value in a scraped counter's key (``name{a=1,b=2}``), or ``""``."""
    inner = key.split("{", 1)[1].rstrip("}")
    return dict(part.split("=", 1) for part in inner.split(",") if part).get(label, "")


def kvtier_summary(delta: Mapping[str, float]) -> dict:
    """Chunks loaded per tier, chunks asked for but not delivered (``misses``, kvtier_misses_total:
    the radix hook asks only for chunks its match reported, so a cold prompt adds none), each tier's
    share of the chunks asked for, GB moved per tier and direction, tokens loaded in tails (the partial
    chunk after the last whole one), chunks copied out by what started
    the copy (``eviction`` ones are on a request's path), chunks each tier evicted (the CPU tier's
    include tails, the first to go when it is full), GPU copy times, and the time the
    hook spent on SGLang's scheduler thread per operation (what kvtier adds to every request there)."""
    hits = {metric_label(k, "tier"): v for k, v in delta.items() if k.startswith("kvtier_hits_total{")}
    misses = sum(v for k, v in delta.items() if k.startswith("kvtier_misses_total{"))
    looked_up = sum(hits.values()) + misses
    moved = {f"{metric_label(k, 'tier')}_{metric_label(k, 'direction')}": round(v / 1e9, 3)
             for k, v in delta.items() if k.startswith("kvtier_bytes_total{")}
    timed: dict[str, dict[str, dict]] = {"gpu": {}, "hook": {}}
    for k, count in delta.items():
        tier, op = metric_label(k, "tier"), metric_label(k, "op")
        if k.startswith("kvtier_op_seconds_count{") and tier in timed and count:
            total = delta[f"kvtier_op_seconds_sum{{op={op},tier={tier}}}"]
            timed[tier][op] = {"count": int(count), "mean_s": round(total / count, 4 if tier == "gpu" else 6),
                               **({"total_s": round(total, 3)} if tier == "hook" else {})}
    return {
        "hits": {tier: int(v) for tier, v in sorted(hits.items())},
        "misses": int(misses),
        "hit_rate": {tier: round(v / looked_up, 4) if looked_up else 0.0 for tier, v in sorted(hits.items())},
        "gb_moved": dict(sorted(moved.items())),
        "demotions": int(sum(v for k, v in delta.items() if k.startswith("kvtier_demotions_total{"))),
        "dropped_puts": int(sum(v for k, v in delta.items() if k.startswith("kvtier_dropped_puts_total{"))),
        "tail_tokens": int(sum(v for k, v in delta.items() if k.startswith("kvtier_tail_tokens_total{"))),
        "spilled_chunks": {metric_label(k, "when"): int(v) for k, v in sorted(delta.items())
                           if k.startswith("kvtier_spilled_chunks_total{")},
        "tier_evictions": {metric_label(k, "tier"): int(v) for k, v in sorted(delta.items())
                           if k.startswith("kvtier_evictions_total{")},
        "gpu_copies": dict(sorted(timed["gpu"].items())),
        "hook_seconds": dict(sorted(timed["hook"].items())),
    }


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=REPO).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def gpu_name() -> str:
    """The first GPU's name from ``nvidia-smi``, or ``unknown``."""
    names = _run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"]).splitlines()
    return names[0].strip() if names else "unknown"


def gpu_names() -> list[str]:
    """``index, name`` of every GPU from ``nvidia-smi``; empty without one."""
    return [line.strip() for line in _run(["nvidia-smi", "--query-gpu=index,name", "--format=csv,noheader"]).splitlines()
            if line.strip()]


def git_commit() -> str:
    """The checkout's commit (``+dirty`` when tracked files changed), or ``unknown`` outside git."""
    commit = _run(["git", "rev-parse", "--short=12", "HEAD"])
    if not commit:
        return "unknown"
    return commit + ("+dirty" if _run(["git", "status", "--porcelain", "--untracked-files=no"]) else "")


def sglang_version() -> str:
    try:
        return importlib.metadata.version("sglang")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def add_commit_option(ap: argparse.ArgumentParser) -> None:
    """``--commit``, for ``run_facts``: needed where the tree's ``.git`` is not the code's commit, as in
    the device tool's copy of a working tree (its ``.git`` is older; ``git_commit`` then says +dirty)."""
    ap.add_argument("--commit", help="the git commit to record (default: the checkout's, +dirty if changed)")


def run_facts(commit: str | None = None) -> dict[str, str]:
    """The exact command line, GPU, git commit, UTC date and SGLang version of this invocation."""
    return {
        "command": shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv])),
        "gpu": gpu_name(),
        "commit": commit or git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "sglang": sglang_version(),
    }


def merge_result(out: str | Path, benchmark: str, workload: Mapping, name: str, result: Mapping) -> dict:
    """Add one configuration's result to the JSON file ``out`` (created if missing) and return the report.

    Results of one file must come from the same workload, so that their ratios mean something;
    a different workload is refused with the way out.
    """
    path = Path(out)
    report = json.loads(path.read_text()) if path.exists() else {"benchmark": benchmark, "workload": dict(workload), "configs": {}}
    if report.get("workload") != dict(workload):
        raise BenchError(
            f"{path} holds results of another workload ({report.get('workload')}); "
            f"pass --out with a new file for this one ({dict(workload)})"
        )
    report["configs"][name] = dict(result)
    add_ratios(report)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return report


RATIO_KEYS = (("ttft", "mean_s"), ("ttft", "p50_s"), ("ttft", "p99_s"),
              ("latency", "mean_s"), ("latency", "p50_s"), ("latency", "p99_s"))


def add_ratios(report: dict, baseline: str = "radix") -> None:
    """Per configuration and pass, ``vs_<baseline>``: baseline time / this time (>1 is faster), and throughput ratio."""
    base = report["configs"].get(baseline)
    for cfg in report["configs"].values():
        cfg.pop(f"vs_{baseline}", None)
        if base is None:
            continue
        ratios = {}
        for pass_name, p in cfg["passes"].items():
            b = base["passes"].get(pass_name)
            if b is None:
                continue
            r = {f"{m}_{s.removesuffix('_s')}": round(b[m][s] / p[m][s], 3) for m, s in RATIO_KEYS if p[m][s] > 0}
            if b["throughput_tok_s"] > 0:
                r["throughput"] = round(p["throughput_tok_s"] / b["throughput_tok_s"], 3)
            ratios[pass_name] = r
        cfg[f"vs_{baseline}"] = ratios
