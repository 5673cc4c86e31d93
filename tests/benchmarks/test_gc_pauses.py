"""GC pause logging (``benchmarks/gc_pauses/sitecustomize.py``) in real Python processes, and
``long_doc.gc_pauses`` reading them back for one pass's time window."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from long_doc import gc_pause_env, gc_pauses

# Builds ~600K objects in reference cycles beside 500K live lists, then collects twice: two full
# collections of many milliseconds (each walks the live lists); prints time.monotonic() between them.
GARBAGE = """
import gc, time
class Node:
    pass
live = [[] for _ in range(500_000)]
keep = []
for _ in range(300_000):
    a, b = Node(), Node()
    a.other, b.other = b, a
    keep.append(a)
del keep
gc.collect()
print(time.monotonic(), flush=True)
gc.collect()
"""


def run_child(env: dict[str, str]) -> float:
    out = subprocess.run([sys.executable, "-c", GARBAGE], env={**os.environ, **env}, check=True,
                         capture_output=True, text=True, timeout=120).stdout
    return float(out.split()[0])


def test_a_child_process_logs_its_full_collections(tmp_path):
    folder = tmp_path / "gc"
    env = gc_pause_env(folder)
    assert env["GC_PAUSE_LOG"] == str(folder) and folder.is_dir()
    start = time.monotonic()
    between = run_child(env)
    end = time.monotonic()

    logs = list(folder.glob("gc-*.jsonl"))
    assert len(logs) == 1  # one process
    lines = [json.loads(line) for line in logs[0].read_text().splitlines()]
    full = [p for p in lines if p["gen"] == 2 and start <= p["t"] <= end]
    assert len(full) >= 2 and all(p["s"] >= 0.002 for p in lines)
    assert max(p["collected"] for p in full) >= 100_000  # the explicit collection freed the cycles
    assert sys.executable in full[0]["proc"] or os.path.basename(sys.executable) in full[0]["proc"]

    pauses = gc_pauses(folder, between, end, origin=start)
    # Only the pauses that began in the window, in order, timed from the origin.
    assert pauses and all(p["at_s"] >= between - start - 1e-4 for p in pauses)  # at_s is rounded to 0.1 ms
    assert [p["at_s"] for p in pauses] == sorted(p["at_s"] for p in pauses)
    assert len(gc_pauses(folder, start, end, origin=start)) > len(pauses)
    assert {"at_s", "ms", "gen", "proc"} == set(pauses[0])


def test_without_the_log_folder_nothing_is_written(tmp_path):
    env = gc_pause_env(tmp_path / "gc")
    del env["GC_PAUSE_LOG"]
    run_child(env)
    assert list((tmp_path / "gc").iterdir()) == []


def test_gc_pause_env_keeps_the_python_path_after_its_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/somewhere")
    env = gc_pause_env(tmp_path / "gc")
    first, rest = env["PYTHONPATH"].split(os.pathsep, 1)
    assert first.endswith("gc_pauses") and rest == "/somewhere"
    (tmp_path / "gc" / "gc-1.jsonl").write_text("{}")
    gc_pause_env(tmp_path / "gc")  # a second server of the run starts with an empty folder
    assert list((tmp_path / "gc").iterdir()) == []
