"""kvtier configuration: one YAML file plus ``KVTIER_*`` environment overrides, validated at start.

Precedence, lowest to highest: defaults, the YAML file (``KVTIER_CONFIG`` or an explicit path),
environment variables named ``KVTIER_<KEY>`` in upper case (``KVTIER_CPU_SIZE_GB=16``).
Every error names the offending key, the value seen and what to write instead.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Optional

import yaml

CONFIG_ENV = "KVTIER_CONFIG"
ENV_PREFIX = "KVTIER_"
WRITE_POLICIES = ("write_back", "write_through")
PD_TRANSPORTS = ("auto", "zmq", "cuda_ipc")


class ConfigError(ValueError):
    """A kvtier setting is missing, unknown or out of range; the message says how to fix it."""


@dataclass(frozen=True)
class KVTierConfig:
    """All kvtier settings. Sizes are in GB (10**9 bytes)."""

    chunk_tokens: int = 256
    """Tokens per stored chunk; must be a multiple of SGLang's page size."""
    cpu_size_gb: float = 8.0
    """Pinned host memory for the CPU tier, allocated once at start; it also stages disk reads."""
    disk_path: str = ""
    """Directory of the disk tier's slab file; empty disables the disk tier."""
    disk_size_gb: float = 0.0
    """Capacity of the disk tier; required when disk_path is set."""
    disk_o_direct: bool = True
    """Bypass the page cache; falls back with a warning where the filesystem refuses O_DIRECT."""
    disk_write_queue: int = 16
    """Chunks that may wait for the disk writer before further demotions are dropped."""
    remote_url: str = ""
    """Shared remote tier: ``kvtier://host:port?token=T`` (``launch.store``) or
    ``redis://[:password@]host:port[/db]`` (Redis or Valkey), ``redis+cluster://host:port`` (Redis
    Cluster, any node); empty disables."""
    remote_timeout_s: float = 0.5
    """Longest wait for the remote tier per call; past it the lookup is a miss (recompute)."""
    remote_retry_s: float = 5.0
    """After a remote failure, how long lookups skip the remote tier before trying it again."""
    remote_write_queue: int = 256
    """Chunks that may wait for the remote writer (each holds its CPU slot, no copy); beyond that
    new chunks are not written to the remote tier (counted as dropped puts, reason remote_busy)."""
    write_policy: str = "write_back"
    """write_back: copy KV out when the radix tree evicts it; write_through: on insert."""
    spill_ahead: float = 0.75
    """write_back: when a request is scheduled and would leave less than this fraction of the GPU
    pool free, the nodes eviction would take first (in its order: unlocked leaves, a parent once its
    children are counted) are copied out in the background, once no load runs, until that much is
    free or copied; their eviction then frees rows without a copy on the critical path. 0 (with
    ``spill_on_insert`` off) copies only at eviction. H100 long_doc at f560139 (copies held back
    during loads): 0.75 left no eviction copy and the warm pass's first 3-request batch at 0.155 s,
    0.25 copied 151 chunks at eviction (rounds up to 0.181 s); ``ab/long_doc_spill_ahead.json``."""
    spill_on_insert: bool = True
    """write_back: also copy out every node the tree inserts (a prefilled prompt, a finished request),
    held back like spill ahead's copies until no load runs and launched at the scheduler's next step,
    whatever the pool's pressure: a round's KV then crosses PCIe while the round decodes, not when
    the next requests' loads need the link. Counted as spilled ahead; unused by write_through, which
    copies at insert already. H100 at e839597, on vs off side by side: chat turns 2-4 latency
    1.384 / 1.461 / 1.530 vs 1.398 / 1.456 / 1.531 s (off: turn 2's first round 45-120 ms behind
    the others in every run), rag warm TTFT p99 0.151 vs 0.183 s, no-reuse TTFT level
    (``ab/long_doc_chat_soi_sbs.json``, ``ab/long_doc_soi_sbs.json``, ``ab/long_doc_noreuse_soi_sbs.json``)."""
    load_layer_groups: int = 0
    """A load-back is copied in this many groups of layers (at most one per layer) and the forward
    pass reads a layer as soon as its group landed, so the copy runs under the forward pass as
    HiCache's does; 1 copies all layers before the forward pass. 0 (auto) picks by how SGLang runs
    the prefill forward: 32 eagerly (its launches take longer than the copy, which hides under
    them: on an H100, p50 of 10K-token warm hits per pass 0.051-0.077 s, one copy 0.088-0.097 s,
    HiCache 0.063-0.066 s, ``benchmarks/results/ab/offload_ttft_layerwise.json``); 8 under a
    breakable or tc_piecewise prefill CUDA graph (the forward pass is fast and waits for the copy
    anyway, while each launch costs the scheduler's thread ~0.15 ms: a 10K-token load-back's
    ``init_load_back`` 8.7 ms with 32 groups, 4.2 ms with 8, ``benchmarks/results/ab/hook_cost.json``; in
    long_doc's server 5.4 -> 4.4 ms with warm TTFT unchanged, ``ab/long_doc_lg8_9992635.json``);
    1 under a full prefill graph, which replays attention without asking (also for any setting)."""
    spill_max_programs: int = 8
    """Thread blocks a spill kernel may use at most (0: one per 32 KiB tile, every SM it can get).
    Fewer leave SMs to the forward pass the copy runs beside: on an H100, 8 spill at 51.6 GB/s
    (uncapped 51.8) and slow matmuls beside them 1.32x instead of 1.74x."""
    load_max_programs: int = 32
    """The same for a load-back kernel: per-layer loads run beside the forward pass, which wants
    the other SMs (32: p50 0.068 / 0.051 s in that run's two warm passes; 8: 0.058 / 0.077; no
    limit: 0.066 / 0.064; noisy, 32 has the best second pass)."""
    batch_loads: bool = True
    """The load-backs of one prefill batch are queued while SGLang's scheduler forms it and launched
    as one copy once it is formed (as HiCache's ``ready_to_load_host_cache`` does), layer group by
    layer group across all its requests, so the forward pass starts once every request's first group
    landed; false launches each request's load when it is scheduled, request after request, so the
    first layers wait for the last request's load to reach them. H100 at 11262ca, one run each way:
    chat turns 2-4 latency 1.40-1.56 s against 1.45-1.62 s, TTFT p50 0.337-0.427 against
    0.374-0.476 s (``benchmarks/results/ab/long_doc_chat_batch_loads.json``); rag unchanged, its
    batches paced by their loads (``ab/long_doc_batch_loads.json``)."""
    tail_chunks: bool = True
    """Also store the partial chunk at the end of an evicted node (cut to a multiple of 16 tokens), so
    a prompt that continues it (the next chat turn) loads it instead of recomputing up to
    ``chunk_tokens - 1`` tokens (HiCache keeps every token). A tail takes a whole CPU slot, so it is
    expendable: kept in the CPU tier only (never demoted to disk or written to the remote tier) and
    the first evicted there. H100 chat at fda5359, side by side: turns 2-4 latency 1.399 / 1.455 /
    1.534 s with, 1.400 / 1.473 / 1.551 without, HiCache 1.386 / 1.454 / 1.526
    (``benchmarks/results/ab/long_doc_chat_tails.json``); rag unchanged within noise at de6f705
    (``ab/long_doc_tails_de6f705.json``)."""
    spill_staging_chunks: int = 0
    """Spill through a GPU staging ring of this many chunks (each ``chunk_tokens`` of KV, 32 MiB for
    Llama-3-8B at 256 tokens): the kernel gathers into the ring at device-memory speed and the copy
    engine moves it to the host, so the SMs are busy for a fraction of a direct gather over PCIe.
    0 gathers straight into host memory. Off: on an H100 with 8 chunks cold TTFT was 1.023x radix-only
    against 1.028x at 0 and a load beside a spill took 23.5 ms instead of 50, but warm TTFT was no
    better (``benchmarks/results/ab/offload_ttft_staged8.json``)."""
    metrics_port: int = 0
    """Prometheus exposition port (TP rank r listens on port + r); 0 disables."""
    pin_timeout_s: float = 60.0
    """A reader's pins on CPU chunks expire after this long, so a dead reader cannot leak them."""
    lower_tier_wait_s: float = 0.0
    """How long a prefix lookup may wait for chunks being fetched from the disk or remote tier
    into the CPU tier; 0 never waits (those chunks are recomputed now and prefetched for next
    time). The wait holds SGLang's scheduler, so set it only where a fetch beats a recompute."""
    pd_transport: str = "auto"
    """PD KV transport: zmq (host memory, any hosts), cuda_ipc (GPU to GPU, one host), or auto
    (cuda_ipc for a CUDA pool when kvtier.transfer.cuda_ipc is available, else zmq)."""
    pd_direct: bool = True
    """With cuda_ipc and the same TP size on both sides, the prefill stores pages straight into the
    decode's pool (one kernel, peer stores) instead of staging them; false always stages (on 2x H200:
    208 GB/s direct vs 35 GB/s staged in serving, greedy tokens equal either way)."""
    pd_stage_slots: int = 4
    """Staging slots a decode rank keeps per prefill rank: KV writes in flight to it."""
    pd_stage_slot_mb: float = 32.0
    """Size of one staging slot in MiB (rounded down to whole pages, at least one page)."""
    pd_timeout_s: float = 30.0
    """Longest wait for a PD peer (a write, a free staging slot) before the request fails."""
    pd_switch_interval_ms: float = 0.5
    """PD workers: Python's thread switch interval (``sys.setswitchinterval``) in ms; 0 leaves
    Python's 5 ms. kvtier's PD threads wait on GPU syncs and sockets, then need the GIL back from
    SGLang's scheduler loop, which keeps it up to the interval each time. On two H200s at 0.5 ms a
    10,000-token direct transfer beside a busy Python thread took 18 ms instead of 260
    (``transfer_gpu.py``, one run), and in serving 208 GB/s instead of 136 (``pd_serving.py``)."""
    pd_model_id: str = ""
    """Model identity compared between prefill and decode; empty derives it from the model args."""

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def cpu_bytes(self) -> int:
        return int(self.cpu_size_gb * 1e9)

    @property
    def disk_bytes(self) -> int:
        return int(self.disk_size_gb * 1e9)


def load_config(
    path: Optional[str | os.PathLike] = None,
    env: Optional[Mapping[str, str]] = None,
    **overrides: Any,
) -> KVTierConfig:
    """Build the config from ``path`` (else ``$KVTIER_CONFIG``), then env, then ``overrides``."""
    env = os.environ if env is None else env
    path = path or env.get(CONFIG_ENV) or None
    values: dict[str, Any] = {}
    if path:
        values.update(_read_yaml(Path(path)))
    for key, raw in env.items():
        if not key.startswith(ENV_PREFIX) or key == CONFIG_ENV:
            continue
        name = key[len(ENV_PREFIX):].lower()
        _check_known(name, f"environment variable {key}")
        values[name] = _parse_env(name, raw, key)
    for name, value in overrides.items():
        _check_known(name, f"override {name!r}")
        values[name] = value
    for name, value in values.items():
        values[name] = _coerce(name, value)
    return KVTierConfig(**values)


_FIELDS = {f.name: f for f in fields(KVTierConfig)}


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"kvtier config file {path} does not exist (set {CONFIG_ENV} to a YAML file)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"kvtier config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"kvtier config file {path} must hold a mapping of key: value, got {type(data).__name__}")
    for name in data:
        _check_known(str(name), f"key {name!r} in {path}")
    return data


def _check_known(name: str, where: str) -> None:
    if name in _FIELDS:
        return
    close = difflib.get_close_matches(name, list(_FIELDS), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ConfigError(f"unknown kvtier setting in {where}: {hint}valid keys are {sorted(_FIELDS)}")


def _parse_env(name: str, raw: str, env_key: str) -> Any:
    if _FIELDS[name].type in ("str",):
        return raw
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{env_key}={raw!r} cannot be parsed: {exc}") from exc


def _coerce(name: str, value: Any) -> Any:
    kind = _FIELDS[name].type
    expected = {"int": int, "float": float, "bool": bool, "str": str}[kind]
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is str and value is None:
        return ""
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise ConfigError(f"kvtier setting {name!r} must be {kind}, got {value!r} ({type(value).__name__})")
    return value


def _validate(cfg: KVTierConfig) -> None:
    def bad(key: str, fix: str) -> ConfigError:
        return ConfigError(f"kvtier setting {key}={getattr(cfg, key)!r}: {fix}")

    if cfg.chunk_tokens <= 0:
        raise bad("chunk_tokens", "must be a positive number of tokens (default 256)")
    if cfg.cpu_size_gb <= 0:
        raise bad("cpu_size_gb", "must be > 0: the CPU tier stages every GPU copy (for a disk-first setup give it e.g. 1)")
    if cfg.disk_size_gb < 0:
        raise bad("disk_size_gb", "must be >= 0")
    if cfg.disk_path and cfg.disk_size_gb == 0:
        raise bad("disk_size_gb", f"set a capacity for the disk tier at disk_path={cfg.disk_path!r}")
    if cfg.disk_size_gb > 0 and not cfg.disk_path:
        raise bad("disk_path", "set a directory for the disk tier, or disk_size_gb: 0 to disable it")
    if cfg.disk_write_queue < 1:
        raise bad("disk_write_queue", "must be >= 1")
    if cfg.remote_url and not cfg.remote_url.startswith(
        ("redis://", "rediss://", "unix://", "redis+cluster://", "rediss+cluster://", "kvtier://")
    ):
        raise bad("remote_url", "use kvtier://host:port?token=T (launch.store), redis://host:port (Redis or Valkey), "
                                "redis+cluster://host:port (Redis Cluster), or leave it empty")
    if cfg.remote_write_queue < 1:
        raise bad("remote_write_queue", "must be >= 1")
    if cfg.remote_timeout_s <= 0 or cfg.remote_retry_s < 0:
        raise bad("remote_timeout_s", "remote_timeout_s must be > 0 and remote_retry_s >= 0 seconds")
    if cfg.write_policy not in WRITE_POLICIES:
        raise bad("write_policy", f"must be one of {list(WRITE_POLICIES)}")
    if not 0 <= cfg.metrics_port <= 65535:
        raise bad("metrics_port", "must be a TCP port, or 0 to disable metrics")
    if cfg.pin_timeout_s <= 0:
        raise bad("pin_timeout_s", "must be > 0 seconds")
    if cfg.lower_tier_wait_s < 0:
        raise bad("lower_tier_wait_s", "must be >= 0 seconds (0: never wait for the disk or remote tier)")
    if cfg.pd_transport not in PD_TRANSPORTS:
        raise bad("pd_transport", f"must be one of {list(PD_TRANSPORTS)}")
    if cfg.load_layer_groups < 0:
        raise bad("load_layer_groups", "must be >= 0 (0: chosen by the prefill CUDA graph; 1 copies all layers "
                                       "before the forward pass)")
    if not 0 <= cfg.spill_ahead < 1:
        raise bad("spill_ahead", "must be a fraction of the GPU pool in [0, 1) (0: no copies ahead of eviction)")
    for key in ("spill_max_programs", "load_max_programs"):
        if getattr(cfg, key) < 0:
            raise bad(key, "must be >= 0 (0: no limit)")
    if cfg.spill_staging_chunks < 0:
        raise bad("spill_staging_chunks", "must be >= 0 (0: spills gather straight into host memory)")
    if cfg.pd_stage_slots < 1:
        raise bad("pd_stage_slots", "must be >= 1 (4 keeps writes and scatters overlapped)")
    if cfg.pd_stage_slot_mb <= 0:
        raise bad("pd_stage_slot_mb", "must be > 0 MiB (default 32)")
    if cfg.pd_timeout_s <= 0:
        raise bad("pd_timeout_s", "must be > 0 seconds")
    if cfg.pd_switch_interval_ms < 0:
        raise bad("pd_switch_interval_ms", "must be >= 0 ms (0: Python's default, 5 ms)")


def check_page_size(cfg: KVTierConfig, page_size: int) -> None:
    """Chunks hold whole SGLang pages; refuse a chunk size that splits one."""
    if cfg.chunk_tokens % page_size:
        raise ConfigError(
            f"kvtier setting chunk_tokens={cfg.chunk_tokens} is not a multiple of SGLang's "
            f"--page-size {page_size}; use e.g. chunk_tokens: {max(1, cfg.chunk_tokens // page_size) * page_size}"
        )

