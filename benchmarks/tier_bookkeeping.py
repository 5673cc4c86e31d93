"""CPU tier bookkeeping: the scheduler thread's time per slot taken from a full tier (LRU eviction).

A spill reserves one slot per chunk; once the tier is full each slot comes from evicting its least
recently used chunk, under the tier's lock, on SGLang's scheduler thread. This fills a ``CpuTier``
of ``--slots`` tiny chunks (the bookkeeping does not depend on the chunk size) and times
``reserve`` + ``commit`` of ``--chunks-per-reserve`` new keys at a time, without a tier below and
with one (demotions that finish at once: the tier's own work around them, no disk). 1,907 slots are
a 64 GB tier of Llama-3-8B 256-token chunks (32 MiB), 30,000 about a 1 TB one. Writes JSON.

    python benchmarks/tier_bookkeeping.py --out benchmarks/results/ab/tier_bookkeeping.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Optional

from bench_common import BENCHMARKS_DIR, add_commit_option, run_facts

from kvtier.sglang_ext.metrics import TierMetrics
from kvtier.sglang_ext.tiers.cpu import CpuTier

CHUNK = 4096


def demoted_at_once(key: bytes, view) -> Optional["Future[bool]"]:
    done: Future[bool] = Future()
    done.set_result(True)
    return done


def us_per_slot(slots: int, chunks_per_reserve: int, reserves: int, below: bool) -> float:
    tier = CpuTier(CHUNK, slots * CHUNK, metrics=TierMetrics(), pin=False, demote=demoted_at_once if below else None)
    for _ in range(0, slots, chunks_per_reserve):
        tier.reserve([os.urandom(16) for _ in range(chunks_per_reserve)]).commit()
    assert len(tier) == slots
    new = [[os.urandom(16) for _ in range(chunks_per_reserve)] for _ in range(reserves)]
    start = time.perf_counter()
    for keys in new:
        tier.reserve(keys).commit()
    seconds = time.perf_counter() - start
    assert all(tier.contains(new[-1])) and len(tier) == slots  # each reserve got every slot it asked for
    return seconds / (reserves * chunks_per_reserve) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slots", type=int, action="append", help="tier sizes in chunks (default 1907 and 30000)")
    ap.add_argument("--chunks-per-reserve", type=int, default=40, help="a 10,000-token document: 40 chunks")
    ap.add_argument("--reserves", type=int, default=20)
    ap.add_argument("--out", default=str(BENCHMARKS_DIR / "results" / "ab" / "tier_bookkeeping.json"))
    add_commit_option(ap)
    args = ap.parse_args()
    cases: dict[str, dict] = {}
    for case, below in (("no_tier_below", False), ("tier_below", True)):
        cases[case] = {}
        for slots in args.slots or [1907, 30_000]:
            us = us_per_slot(slots, args.chunks_per_reserve, args.reserves, below)
            ms = us * args.chunks_per_reserve / 1e3
            cases[case][str(slots)] = {"us_per_slot": round(us, 1), "ms_per_reserve": round(ms, 2)}
            print(f"{case}: full tier of {slots:,} chunks: {us:.1f} us per slot taken, {ms:.2f} ms per reserve "
                  f"of {args.chunks_per_reserve}", flush=True)
    report = {"benchmark": "tier_bookkeeping", "chunks_per_reserve": args.chunks_per_reserve,
              "reserves": args.reserves, "full_tier": cases, **run_facts(args.commit)}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
