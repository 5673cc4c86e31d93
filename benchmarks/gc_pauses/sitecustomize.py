"""Logs the garbage collector's pauses of a Python process started with this folder on PYTHONPATH.

A benchmark puts this folder first on a server's ``PYTHONPATH`` and names a folder in
``GC_PAUSE_LOG``: every Python process of that server (SGLang's tokenizer, scheduler and
detokenizer processes import ``sitecustomize`` at start) then appends each collection that paused it
for at least ``GC_PAUSE_MIN_MS`` (default 2) milliseconds to ``gc-<pid>.jsonl`` there:
``{"t": start (time.monotonic), "s": seconds, "gen": generation, "collected": n, "proc": title}``.
``time.monotonic`` is one clock for every process of the host, so a client can lay the pauses
beside its requests. Without ``GC_PAUSE_LOG`` it does nothing. It shadows any other
``sitecustomize`` (on Debian/Ubuntu Python, apport's crash hook).
"""

import gc
import json
import os
import time

_folder = os.environ.get("GC_PAUSE_LOG")


def _title() -> str:
    """The process title (SGLang renames its processes, e.g. ``sglang::scheduler``), read when asked."""
    try:
        with open("/proc/self/cmdline", "rb") as f:
            return f.read().split(b"\0")[0].decode(errors="replace")[:80]
    except OSError:
        return "?"


if _folder:
    _min_s = float(os.environ.get("GC_PAUSE_MIN_MS", "2")) / 1e3
    _started: dict[int, float] = {}

    def _on_gc(phase: str, info: dict) -> None:
        gen = info["generation"]
        if phase == "start":
            _started[gen] = time.monotonic()
            return
        start = _started.pop(gen, None)
        if start is None:
            return
        pause = time.monotonic() - start
        if pause >= _min_s:
            line = {"t": start, "s": pause, "gen": gen, "collected": info["collected"], "proc": _title()}
            with open(os.path.join(_folder, f"gc-{os.getpid()}.jsonl"), "a") as f:
                f.write(json.dumps(line) + "\n")

    gc.callbacks.append(_on_gc)
